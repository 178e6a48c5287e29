//! Each page sent once per migration. The processes of a forked tree hold mostly the same
//! pages (a 9-process python tree's images: 64 MiB of pages, 9 MiB of them distinct), and
//! a page sent in a pre-copy round often comes again. The files a migration sends are
//! page-aligned where they hold pages (image.rs), so a whole page of a file that was sent
//! before — in any file — goes as a reference to it (`Msg::Same`), which the agent copies
//! from what it has stored. (A page wrongly taken for another would still be caught: every
//! image checks its page data's checksums.)

use std::collections::HashMap;

pub const PAGE: usize = 4096;

/// The pages sent so far: by content hash, where they are (file, offset).
#[derive(Default)]
pub struct SentPages(HashMap<u128, (u32, u64), Hashed>);

/// The keys are hashes already: their low bits serve.
#[derive(Default, Clone, Copy)]
struct Hashed;

impl std::hash::BuildHasher for Hashed {
    type Hasher = LowBits;
    fn build_hasher(&self) -> LowBits {
        LowBits(0)
    }
}

struct LowBits(u64);

impl std::hash::Hasher for LowBits {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ *b as u64;
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A part of a piece of file sent: bytes as they are, or pages the agent has already.
#[derive(Debug, PartialEq)]
pub enum Part {
    Data(std::ops::Range<usize>),
    Same { from: u32, offset: u64, len: u64 },
}

/// The hash of each whole page of `data`, which is at `offset` in its file (pages begin
/// at multiples of PAGE there): (its place in `data`, hash). Computed before the link is
/// taken: the forwarders of several processes hash at once.
pub fn hashes(offset: u64, data: &[u8]) -> Vec<(usize, u128)> {
    let first = (offset as usize).next_multiple_of(PAGE) - offset as usize;
    (first..data.len().saturating_sub(PAGE - 1))
        .step_by(PAGE)
        .map(|at| (at, xxhash_rust::xxh3::xxh3_128(&data[at..at + PAGE])))
        .collect()
}

impl SentPages {
    /// How `len` bytes at `offset` of file `file`, whose pages have `hashes`, are sent: the
    /// pages sent before as references (runs of them merged), the rest as data. Its other
    /// pages are noted as sent (the caller sends the parts in order, before anything else).
    pub fn parts(
        &mut self,
        file: u32,
        offset: u64,
        len: usize,
        hashes: &[(usize, u128)],
    ) -> Vec<Part> {
        let mut parts: Vec<Part> = Vec::new();
        let mut data_from = 0;
        for &(at, h) in hashes {
            let here = (file, offset + at as u64);
            let Some(&(from, off)) = self.0.get(&h).filter(|&&s| s != here) else {
                self.0.insert(h, here);
                continue;
            };
            if data_from < at {
                parts.push(Part::Data(data_from..at));
            }
            data_from = at + PAGE;
            match parts.last_mut() {
                Some(Part::Same {
                    from: f,
                    offset: o,
                    len,
                }) if *f == from && *o + *len == off => *len += PAGE as u64,
                _ => parts.push(Part::Same {
                    from,
                    offset: off,
                    len: PAGE as u64,
                }),
            }
        }
        if data_from < len {
            parts.push(Part::Data(data_from..len));
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_sent_before_go_as_references_to_where_they_went() {
        let page = |v: u8| vec![v; PAGE];
        let mut sent = SentPages::default();
        // File 0: a header of 100 bytes, padding, then pages A B C.
        let mut f0 = vec![7u8; 100];
        f0.resize(PAGE, 0);
        for v in [1, 2, 3] {
            f0.extend(page(v));
        }
        let h = hashes(0, &f0);
        assert_eq!(h.len(), 4);
        assert_eq!(sent.parts(0, 0, f0.len(), &h), [Part::Data(0..f0.len())]);
        // File 1, its second piece (at 2 pages): B C, then D, then A, then a part page.
        let mut f1 = Vec::new();
        for v in [2, 3, 4, 1] {
            f1.extend(page(v));
        }
        f1.extend([9u8; 10]);
        let h = hashes(2 * PAGE as u64, &f1);
        assert_eq!(h.len(), 4, "whole pages only");
        let p = PAGE as u64;
        assert_eq!(
            sent.parts(1, 2 * p, f1.len(), &h),
            [
                Part::Same {
                    from: 0,
                    offset: 2 * p,
                    len: 2 * p
                },
                Part::Data(2 * PAGE..3 * PAGE),
                Part::Same {
                    from: 0,
                    offset: p,
                    len: p
                },
                Part::Data(4 * PAGE..f1.len()),
            ]
        );
        // D is now known as file 1's, at 4 pages; a piece not at a page's start is hashed
        // from its first whole page on.
        let mut f2 = vec![0u8; 50];
        f2.extend(page(4));
        let h = hashes(p - 50, &f2);
        assert_eq!(h.iter().map(|x| x.0).collect::<Vec<_>>(), [50]);
        assert_eq!(
            sent.parts(2, p - 50, f2.len(), &h),
            [
                Part::Data(0..50),
                Part::Same {
                    from: 1,
                    offset: 4 * p,
                    len: p
                }
            ]
        );
    }
}
