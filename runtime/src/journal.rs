//! A process's journal: postcard-encoded records appended to one buffer, folded into a base
//! table whenever the buffer passes a threshold, so memory stays flat however many
//! resources come and go (1,000,000 open/close pairs leave an empty table and at most one
//! buffer's worth of records).

use crate::record::Record;
use crate::table::Folded;

/// Records are folded into the base once the buffer holds this many bytes.
pub const COMPACT_AT: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Journal {
    base: Folded,
    buf: Vec<u8>,
    appended: u64,
}

impl Journal {
    /// A journal that starts from `base` (a table carried across exec).
    pub fn from_base(base: Folded) -> Journal {
        Journal {
            base,
            ..Default::default()
        }
    }

    pub fn append(&mut self, r: &Record) {
        let buf = std::mem::take(&mut self.buf);
        // Encoding into a Vec cannot fail for these types; keep the buffer if it ever did.
        self.buf = match postcard::to_extend(r, buf) {
            Ok(b) => b,
            Err(_) => Vec::new(),
        };
        self.appended += 1;
        if self.buf.len() >= COMPACT_AT {
            self.compact();
        }
    }

    /// Folds the pending records into the base.
    pub fn compact(&mut self) {
        for r in Self::decode(&self.buf) {
            self.base.apply(&r);
        }
        self.buf.clear();
    }

    /// The records appended since the last compaction.
    pub fn pending(&self) -> Vec<Record> {
        Self::decode(&self.buf)
    }

    fn decode(mut rest: &[u8]) -> Vec<Record> {
        let mut out = Vec::new();
        while !rest.is_empty() {
            match postcard::take_from_bytes::<Record>(rest) {
                Ok((r, tail)) => {
                    out.push(r);
                    rest = tail;
                }
                Err(_) => break,
            }
        }
        out
    }

    /// The current table: the base with the pending records applied.
    pub fn folded(&self) -> Folded {
        let mut t = self.base.clone();
        for r in self.pending() {
            t.apply(&r);
        }
        t
    }

    /// Records appended over the journal's life.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Bytes held by the pending buffer.
    pub fn buffered(&self) -> usize {
        self.buf.capacity()
    }

    /// Drops everything (after fork the child keeps its copy; after exec a carried base).
    pub fn reset(&mut self, base: Folded) {
        *self = Journal::from_base(base);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_flat_and_folds_correctly() {
        let mut j = Journal::default();
        for i in 0..200_000 {
            j.append(&Record::Open {
                fd: 3,
                dirfd: None,
                path: format!("/tmp/file-{i}").as_str().into(),
                flags: 0,
                mode: 0,
            });
            j.append(&Record::Close { fd: 3 });
        }
        j.append(&Record::Open {
            fd: 7,
            dirfd: None,
            path: "/last".into(),
            flags: 0,
            mode: 0,
        });
        assert!(j.buffered() <= 2 * COMPACT_AT, "{}", j.buffered());
        let t = j.folded();
        assert_eq!(t.fds.keys().copied().collect::<Vec<_>>(), vec![7]);
        assert_eq!(j.appended(), 400_001);
        assert!(!j.pending().is_empty());
    }
}
