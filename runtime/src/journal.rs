//! A process's journal. Each record is folded into the table as it is appended (so the
//! table is always current and reading it costs nothing), and kept, postcard-encoded, in a
//! bounded buffer of recent records (what `mig table --journal` shows). Memory stays flat
//! however many resources come and go: 1,000,000 open/close pairs leave an empty table and
//! at most `KEEP` bytes of recent records.

use crate::record::Record;
use crate::table::Folded;
use serde::Serialize;
use std::collections::VecDeque;

/// Bytes of encoded recent records kept; past it the oldest half is dropped.
pub const KEEP: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Journal {
    table: Folded,
    recent: Vec<u8>,
    /// Where each kept record starts in `recent`.
    starts: VecDeque<usize>,
    appended: u64,
}

impl Journal {
    /// A journal that starts from `table` (a table carried across exec).
    pub fn from_table(table: Folded) -> Journal {
        Journal {
            table,
            ..Default::default()
        }
    }

    pub fn append<B: AsRef<[u8]> + Serialize>(&mut self, r: &Record<B>) {
        self.table.apply(r);
        self.appended += 1;
        let at = self.recent.len();
        let buf = std::mem::take(&mut self.recent);
        // Encoding into a Vec cannot fail for these types; start afresh if it ever did.
        self.recent = match postcard::to_extend(r, buf) {
            Ok(b) => b,
            Err(_) => {
                self.starts.clear();
                return;
            }
        };
        self.starts.push_back(at);
        if self.recent.len() > KEEP {
            self.drop_oldest_half();
        }
    }

    fn drop_oldest_half(&mut self) {
        let cut = self
            .starts
            .iter()
            .position(|&s| s >= self.recent.len() / 2)
            .unwrap_or(self.starts.len());
        let offset = self.starts.get(cut).copied().unwrap_or(self.recent.len());
        self.recent.drain(..offset);
        self.starts.drain(..cut);
        for s in &mut self.starts {
            *s -= offset;
        }
    }

    /// The most recent records, oldest first.
    pub fn recent(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.starts.len());
        let mut rest = &self.recent[..];
        while let Ok((r, tail)) = postcard::take_from_bytes::<Record>(rest) {
            out.push(r);
            rest = tail;
        }
        out
    }

    /// The current table.
    pub fn folded(&self) -> &Folded {
        &self.table
    }

    /// Records appended over the journal's life (this process image).
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Bytes held for recent records.
    pub fn buffered(&self) -> usize {
        self.recent.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::BytesRef;

    #[test]
    fn stays_flat_and_folds_correctly() {
        let mut j = Journal::default();
        for i in 0..200_000 {
            let p = format!("/tmp/file-{i}");
            j.append(&Record::Open {
                fd: 3,
                dirfd: None,
                path: BytesRef(p.as_bytes()),
                flags: 0,
                mode: 0,
            });
            j.append::<BytesRef>(&Record::Close { fd: 3 });
        }
        let last: Record = Record::Open {
            fd: 7,
            dirfd: None,
            path: "/last".into(),
            flags: 0,
            mode: 0,
        };
        j.append(&last);
        assert!(j.buffered() <= 2 * KEEP, "{}", j.buffered());
        assert_eq!(j.folded().fds.keys().collect::<Vec<_>>(), vec![7]);
        assert_eq!(j.appended(), 400_001);
        let recent = j.recent();
        assert!(
            recent.len() > 100 && recent.len() < 20_000,
            "{}",
            recent.len()
        );
        assert_eq!(recent.last(), Some(&last), "the newest record is kept");
        assert!(matches!(recent[recent.len() - 2], Record::Close { fd: 3 }));
    }
}
