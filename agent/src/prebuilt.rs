//! Shared anonymous memory built on the target while a migration's pre-copy rounds come
//! (`mig restore --when-told`), not in the freeze: each round's pages of shared memory
//! are written into their object's memfd as the round arrives (the round's Tag::Shared
//! says which object and where in it), and where each page came from is remembered. At
//! the freeze, restore::shared_memory puts each object's final pages in: a page already
//! there from the same place is not written again; pages written ahead that no image keeps
//! any more are zeroed (a hole punched).

use crate::restore::{Run, read_chunks};
use anyhow::Result;
use migrt::image::{PAGE, SharedPart};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PAGE64: u64 = PAGE as u64;

/// The objects built so far, by inode (the source's), and the round files they came from.
#[derive(Default)]
pub struct Prebuilt {
    rounds: Vec<PathBuf>,
    objects: HashMap<u64, Object>,
}

impl Prebuilt {
    /// Writes the shared pages of the round at `path` (its `runs`, file 0, and `parts`)
    /// into their objects.
    pub fn apply(&mut self, path: &Path, runs: &[Run], parts: &[SharedPart]) -> Result<()> {
        if parts.is_empty() {
            return Ok(());
        }
        let round = File::open(path)?;
        let known = self.rounds.len();
        self.rounds.push(path.into());
        let mut buf = vec![0u8; 1 << 20];
        for p in parts {
            let obj = match self.objects.entry(p.inode) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(Object::new()?),
            };
            let k = runs.partition_point(|r| r.addr + r.pages * PAGE64 <= p.start);
            for r in runs[k..].iter().take_while(|r| r.addr < p.end) {
                let (start, end) = (r.addr.max(p.start), (r.addr + r.pages * PAGE64).min(p.end));
                let at = p.offset + (start - p.start);
                let from = (&round, known, r.offset + (start - r.addr));
                obj.write_ahead(at, from, end - start, &mut buf)?;
            }
        }
        Ok(())
    }

    /// The object `inode` as built so far, or a new one.
    pub fn take(&mut self, inode: u64) -> Result<Object> {
        match self.objects.remove(&inode) {
            Some(o) => Ok(o),
            None => Object::new(),
        }
    }

    /// `file`'s index among the rounds applied (for Object::put).
    pub fn index(&self, file: &Path) -> Option<usize> {
        self.rounds.iter().position(|f| f == file)
    }
}

/// A shared anonymous object being made: its memfd, and which of its pages hold what
/// (round index, offset there) — until an image's page confirms or replaces them.
pub struct Object {
    pub mem: File,
    ahead: HashMap<u64, (usize, u64)>,
}

impl Object {
    fn new() -> Result<Object> {
        Ok(Object {
            mem: migrt::sys::memfd(c"migshim-shared", false)?,
            ahead: HashMap::new(),
        })
    }

    /// Writes `len` bytes (whole pages) from `file` at `offset` to the object at `at`,
    /// ahead of the freeze, remembering where each page came from (round `round`).
    fn write_ahead(
        &mut self,
        at: u64,
        (file, round, offset): (&File, usize, u64),
        len: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        copy(file, offset, (&self.mem, at), len, buf)?;
        for p in 0..len / PAGE64 {
            (self.ahead).insert(at / PAGE64 + p, (round, offset + p * PAGE64));
        }
        Ok(())
    }

    /// Puts `len` bytes (whole pages) from `file` at `offset` in the object at `at`, in
    /// the freeze — all but the pages that came ahead from the same place (`known`: the
    /// file's index among the rounds applied, if it is one). Each page put is settled.
    pub fn put(
        &mut self,
        at: u64,
        (file, known, offset): (&File, Option<usize>, u64),
        len: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let pages = len / PAGE64;
        let most = buf.len() as u64 / PAGE64;
        // The first page of the span being gathered to write.
        let mut span: Option<u64> = None;
        for p in 0..=pages {
            let write = p < pages && {
                let came = self.ahead.remove(&(at / PAGE64 + p));
                came.is_none() || came != known.map(|k| (k, offset + p * PAGE64))
            };
            if let Some(s) = span.filter(|&s| !write || p - s == most) {
                let (o, n) = (s * PAGE64, (p - s) * PAGE64);
                copy(file, offset + o, (&self.mem, at + o), n, buf)?;
                span = None;
            }
            if write && span.is_none() {
                span = Some(p);
            }
        }
        Ok(())
    }

    /// The object's memfd, the pages written ahead that no image put there zeroed.
    pub fn finish(self) -> Result<File> {
        let mut pages: Vec<u64> = self.ahead.into_keys().collect();
        pages.sort_unstable();
        for run in pages.chunk_by(|a, b| a + 1 == *b) {
            let len = run.len() as u64 * PAGE64;
            migrt::sys::punch_hole(&self.mem, run[0] * PAGE64, len)?;
        }
        Ok(self.mem)
    }
}

/// Copies `len` bytes of `from` at `offset` to `to` at `at`, through `buf`.
fn copy(from: &File, offset: u64, (to, at): (&File, u64), len: u64, buf: &mut [u8]) -> Result<()> {
    read_chunks((from, offset, len), buf, |done, data| {
        Ok(to.write_all_at(data, at + done)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE]
    }

    fn file_of(dir: &Path, name: &str, pages: &[u8]) -> PathBuf {
        let data: Vec<u8> = pages.iter().flat_map(|&b| page(b)).collect();
        let path = dir.join(name);
        std::fs::write(&path, data).unwrap();
        path
    }

    #[test]
    fn pages_from_the_same_place_stay_others_are_written_and_what_no_image_keeps_is_zero() {
        let dir = std::env::temp_dir().join(format!("migshim-prebuilt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let round = file_of(&dir, "round", &[1, 2, 3, 4]);
        // The round holds pages 0-3 of a mapping at 0x10000 of object 7, from its page 2.
        let runs = [Run {
            addr: 0x10000,
            pages: 4,
            file: 0,
            offset: 0,
        }];
        let part = SharedPart {
            start: 0x10000,
            end: 0x20000,
            inode: 7,
            offset: 2 * PAGE64,
        };
        let mut ahead = Prebuilt::default();
        ahead.apply(&round, &runs, &[part]).unwrap();
        // The round's file changes after (it never does): what is put from the same
        // place is not read again.
        file_of(&dir, "round", &[9, 9, 9, 9]);
        let image = file_of(&dir, "image", &[5]);
        let mut obj = ahead.take(7).unwrap();
        let (r, i) = (File::open(&round).unwrap(), File::open(&image).unwrap());
        let known = ahead.index(&round);
        let mut buf = vec![0u8; 1 << 20];
        obj.put(2 * PAGE64, (&r, known, 0), 2 * PAGE64, &mut buf)
            .unwrap();
        obj.put(4 * PAGE64, (&i, None, 0), PAGE64, &mut buf)
            .unwrap();
        // The round's page 3 (object page 5) was kept by no image.
        let mem = obj.finish().unwrap();
        let mut got = vec![0u8; 6 * PAGE];
        mem.read_exact_at(&mut got, 0).unwrap();
        let want: Vec<u8> = [0, 0, 1, 2, 5, 0].iter().flat_map(|&b| page(b)).collect();
        assert!(
            got == want,
            "object pages {:?}",
            got.chunks(PAGE).map(|p| p[0]).collect::<Vec<_>>()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
