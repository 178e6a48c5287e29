//! A pre-copy round's file (image kind Pages): the pages of a process's memory runs, read
//! while it runs, as PageMap/PageData pairs. `mig` writes it straight into the stream to
//! the target, reading the pages itself (the process only says which runs, shim/src/precopy.rs).
//!
//! Which pages a round sends: those the process wrote since the round before, as its
//! write tracking says (crate::dirty) — or, where the kernel has no such tracking (before
//! Linux 6.7, or no userfaultfd), those whose content hash differs from the one of the
//! version sent last (PageHashes): every round then reads all of the memory, and the frozen
//! process's memory is compared once more (Compared) to tell the dump which pages the
//! rounds hold as they are.

use crate::dirty::{PAGE_IS_PRESENT, PAGE_IS_WRITTEN, PageRegion};
use crate::image::{ImageWriter, PAGE, PageMap, Tag};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Result, Write};

/// Pages read and written at a time.
pub const RUN: usize = 1024;

/// Reads `out.len()` bytes of a process's memory at an address.
pub type Read<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> Result<()>;

/// Pages `start..end` read with `read` (the app runs: a page may change while read, and
/// then counts as written for the next round) and written as PageMap/PageData pairs, in
/// pieces of at most `buf.len()` bytes (a multiple of the page size); only the pages that
/// `send` (given each page's address and content) says. Returns the pages written; fails
/// if part of the range cannot be read (what was written before stays written).
pub fn write_run<W: Write>(
    w: &mut ImageWriter<W>,
    (start, end): (u64, u64),
    send: &mut dyn FnMut(u64, &[u8]) -> bool,
    buf: &mut [u8],
    read: Read,
) -> Result<u64> {
    let mut pages = 0;
    let mut at = start;
    while at < end {
        let count = ((end - at) as usize / PAGE).min(buf.len() / PAGE);
        let len = count * PAGE;
        read(at, &mut buf[..len])?;
        let mut present = vec![0u64; count.div_ceil(64)];
        let mut n = 0;
        for i in 0..count {
            let page = i * PAGE;
            if !send(at + page as u64, &buf[page..page + PAGE]) {
                continue;
            }
            if n != i {
                buf.copy_within(page..page + PAGE, n * PAGE);
            }
            present[i / 64] |= 1 << (i % 64);
            n += 1;
        }
        if n > 0 {
            let map = PageMap {
                start: at,
                count: count as u64,
                present,
            };
            w.postcard(Tag::PageMap, &map)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            w.section(Tag::PageData, &buf[..n * PAGE])?;
            pages += n as u64;
        }
        at += len as u64;
    }
    Ok(pages)
}

pub fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// A page's content, as far as pre-copy by hash compares it: XXH3-128 (not a MAC — what
/// the link carries is MAC-checked — but 128 bits, and three times as fast as BLAKE3 on a
/// page here: 170 against 530 ms per GiB).
fn hash(page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

/// Pre-copy without write tracking: the hash of each page as it was last sent (a page
/// never sent reads as zero on the target).
#[derive(Default)]
pub struct PageHashes {
    sent: HashMap<u64, u128>,
    /// The ranges the last round covered.
    ranges: Vec<(u64, u64)>,
    zero: u128,
}

impl PageHashes {
    pub fn new() -> PageHashes {
        PageHashes {
            zero: hash(&[0u8; PAGE]),
            ..Default::default()
        }
    }

    /// A round covers `ranges`.
    pub fn covering(&mut self, ranges: &[(u64, u64)]) {
        self.ranges = ranges.to_vec();
    }

    /// Whether page `addr` differs from what the target has of it (then it is taken as sent).
    pub fn send(&mut self, addr: u64, page: &[u8]) -> bool {
        let h = hash(page);
        let before = self.sent.get(&addr).copied().unwrap_or(self.zero);
        if h == before {
            return false;
        }
        self.sent.insert(addr, h);
        true
    }

    /// The frozen process's memory compared with what the rounds sent: the ranges read
    /// whole (a range it unmapped is not vouched for), and the runs in them that differ.
    pub fn compare(&self, buf: &mut [u8], read: Read) -> Compared {
        let mut c = Compared::default();
        for &(start, end) in &self.ranges {
            let mut changed = Vec::new();
            if self.differing((start, end), (&mut *buf, &mut *read), false, &mut changed) {
                c.tracked.push((start, end));
                c.changed.extend(changed);
            }
        }
        c
    }

    /// Pages of `runs` (sorted) went to the target another way (written pages of memory
    /// whose writes are tracked): what this table says the target has there no longer holds.
    pub fn forget(&mut self, runs: &[(u64, u64)]) {
        if !self.sent.is_empty() {
            self.sent.retain(|&a, _| !within(runs, a));
        }
    }

    /// Only pages of `mappings` (sorted) are remembered: the rest is memory the round
    /// covers no more.
    pub fn keep_only(&mut self, mappings: &[(u64, u64)]) {
        self.sent.retain(|&a, _| within(mappings, a));
    }

    /// Shared memory, frozen, compared with what the rounds sent of it: of `mappings`
    /// (sorted), the pages that exist (the `resident` runs) are read, and those the rounds
    /// did not send as they are now are changed (a page they never sent too: whatever a
    /// round sent at its address before this table knew it is not it). Pages that do not
    /// exist are neither kept nor stored (zero): they are not read either — reading would
    /// give shared memory pages. A mapping part of which could not be read is not vouched for.
    pub fn compare_existing(
        &mut self,
        mappings: &[(u64, u64)],
        resident: &[(u64, u64)],
        buf: &mut [u8],
        read: Read,
    ) -> Compared {
        self.keep_only(mappings);
        let (mut c, mut existing) = (Compared::default(), Vec::new());
        for &(start, end) in mappings {
            let mut changed = Vec::new();
            let here: Vec<(u64, u64)> = (resident.iter())
                .filter(|r| r.0 < end && r.1 > start)
                .map(|&(s, e)| (s.max(start), e.min(end)))
                .collect();
            let whole = (here.iter())
                .all(|&run| self.differing(run, (&mut *buf, &mut *read), true, &mut changed));
            if whole {
                c.tracked.push((start, end));
                c.changed.extend(changed);
                existing.extend(here);
            }
        }
        c.existing = Some(existing);
        c
    }

    /// Reads `start..end` and adds the runs of pages in it that differ from what was sent
    /// to `changed` (a page never sent differs if `unknown`, else unless it is zero); false
    /// if part of it could not be read.
    fn differing(
        &self,
        (start, end): (u64, u64),
        (buf, read): (&mut [u8], Read),
        unknown: bool,
        changed: &mut Vec<(u64, u64)>,
    ) -> bool {
        let mut at = start;
        while at < end {
            let len = ((end - at) as usize).min(buf.len());
            if read(at, &mut buf[..len]).is_err() {
                return false;
            }
            for (i, page) in buf[..len].chunks(PAGE).enumerate() {
                let a = at + (i * PAGE) as u64;
                let same = match self.sent.get(&a) {
                    Some(&h) => hash(page) == h,
                    None => !unknown && hash(page) == self.zero,
                };
                if !same {
                    match changed.last_mut() {
                        Some((_, e)) if *e == a => *e = a + PAGE as u64,
                        _ => changed.push((a, a + PAGE as u64)),
                    }
                }
            }
            at += len as u64;
        }
        true
    }
}

/// Whether `a` lies in one of the sorted, disjoint `runs`.
fn within(runs: &[(u64, u64)], a: u64) -> bool {
    let k = runs.partition_point(|&(_, e)| e <= a);
    runs.get(k).is_some_and(|&(s, _)| s <= a)
}

/// What pre-copy by hash found of a frozen process's memory: the ranges compared, and the
/// runs in them that differ from what the rounds sent (the rest the rounds hold as it is).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Compared {
    pub tracked: Vec<(u64, u64)>,
    pub changed: Vec<(u64, u64)>,
    /// The runs of pages that exist in the ranges compared (None: all of them).
    pub existing: Option<Vec<(u64, u64)>>,
}

impl Compared {
    /// Whether `start..end` lies in one compared range.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        self.tracked.iter().any(|&(s, e)| start >= s && end <= e)
    }

    /// `start..end` as write tracking would report it: the pages that exist present, those
    /// that changed written; appended to `out` within the room it has (nothing is
    /// allocated: for a frozen process's dump). Ok(false) when the room did not suffice.
    pub fn existing_into(&self, (start, end): (u64, u64), out: &mut Vec<PageRegion>) -> bool {
        match &self.existing {
            None => self.run_into((start, end), out),
            Some(runs) => (runs.iter())
                .filter(|&&(s, e)| s < end && e > start)
                .all(|&(s, e)| self.run_into((s.max(start), e.min(end)), out)),
        }
    }

    /// existing_into for `start..end`, all of whose pages exist.
    fn run_into(&self, (start, end): (u64, u64), out: &mut Vec<PageRegion>) -> bool {
        let mut at = start;
        let push = |out: &mut Vec<PageRegion>, s: u64, e: u64, categories: u64| {
            if s < e && out.len() < out.capacity() {
                out.push(PageRegion {
                    start: s,
                    end: e,
                    categories,
                });
                return true;
            }
            s >= e
        };
        for &(s, e) in self.changed.iter().filter(|&&(s, e)| s < end && e > start) {
            let (s, e) = (s.max(start), e.min(end));
            if !push(out, at, s, PAGE_IS_PRESENT)
                || !push(out, s, e, PAGE_IS_PRESENT | PAGE_IS_WRITTEN)
            {
                return false;
            }
            at = e;
        }
        push(out, at, end, PAGE_IS_PRESENT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ImageReader, Kind};

    /// `range` as Compared::existing_into reports it: (start, end, categories).
    fn categories(c: &Compared, range: (u64, u64)) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::with_capacity(8);
        assert!(c.existing_into(range, &mut out));
        out.iter().map(|r| (r.start, r.end, r.categories)).collect()
    }

    #[test]
    fn a_run_is_written_in_pieces_without_its_zero_pages() {
        // Five pages at 0x10000, the second zero; read two pages at a time.
        let mem: Vec<u8> = (0..5 * PAGE)
            .map(|i| {
                if i / PAGE == 1 {
                    0
                } else {
                    (i / PAGE + 1) as u8
                }
            })
            .collect();
        let base = 0x10000u64;
        let mut read = |addr: u64, out: &mut [u8]| {
            let at = (addr - base) as usize;
            out.copy_from_slice(&mem[at..at + out.len()]);
            Ok(())
        };
        let mut w = ImageWriter::new(Vec::new(), Kind::Pages).unwrap();
        let mut buf = vec![0u8; 2 * PAGE];
        let mut nonzero = |_: u64, p: &[u8]| !is_zero(p);
        let range = (base, base + 5 * PAGE as u64);
        let n = write_run(&mut w, range, &mut nonzero, &mut buf, &mut read);
        assert_eq!(n.unwrap(), 4);
        let file = w.finish().unwrap();
        let mut r = ImageReader::new(&file[..], std::path::Path::new("round")).unwrap();
        let mut maps = Vec::new();
        let mut data = Vec::new();
        while let Some(s) = r.next_section().unwrap() {
            match s.tag {
                Tag::PageMap => maps.push(s.decode::<PageMap>("round".as_ref()).unwrap()),
                Tag::PageData => data.extend_from_slice(&s.payload),
                _ => {}
            }
        }
        let starts: Vec<u64> = maps.iter().map(|m| m.start).collect();
        assert_eq!(
            starts,
            [base, base + 2 * PAGE as u64, base + 4 * PAGE as u64]
        );
        assert_eq!(maps[0].present, [0b01]);
        let firsts: Vec<u8> = data.chunks(PAGE).map(|p| p[0]).collect();
        assert_eq!(firsts, [1, 3, 4, 5]);
        // A range that cannot be read fails.
        let mut fail = |_: u64, _: &mut [u8]| Err(std::io::Error::other("gone"));
        let mut w = ImageWriter::new(Vec::new(), Kind::Pages).unwrap();
        let one = (base, base + PAGE as u64);
        assert!(write_run(&mut w, one, &mut nonzero, &mut buf, &mut fail).is_err());
    }

    #[test]
    fn pages_are_sent_again_only_when_their_content_changed() {
        let base = 0x40000u64;
        let mut mem = vec![0u8; 4 * PAGE];
        mem[PAGE] = 1; // page 1 has data, the others are zero
        let mut h = PageHashes::new();
        h.covering(&[(base, base + 4 * PAGE as u64)]);
        let sent = |h: &mut PageHashes, mem: &[u8]| -> Vec<usize> {
            (0..4)
                .filter(|&i| h.send(base + (i * PAGE) as u64, &mem[i * PAGE..][..PAGE]))
                .collect()
        };
        assert_eq!(sent(&mut h, &mem), [1], "zero pages the target has already");
        assert_eq!(sent(&mut h, &mem), [] as [usize; 0]);
        mem[3 * PAGE + 9] = 7;
        mem[PAGE] = 0;
        assert_eq!(
            sent(&mut h, &mem),
            [1, 3],
            "changed, and changed back to zero"
        );
        // Frozen: page 2 changed since; the range is compared whole.
        mem[2 * PAGE] = 5;
        let mut read = |a: u64, out: &mut [u8]| {
            let at = (a - base) as usize;
            out.copy_from_slice(&mem[at..at + out.len()]);
            Ok(())
        };
        let c = h.compare(&mut vec![0u8; 2 * PAGE], &mut read);
        let p = |i: u64| base + i * PAGE as u64;
        assert_eq!(c.tracked, [(p(0), p(4))]);
        assert_eq!(c.changed, [(p(2), p(3))]);
        // As write tracking would say it, for the part of a mapping from page 1 on.
        let (present, written) = (PAGE_IS_PRESENT, PAGE_IS_PRESENT | PAGE_IS_WRITTEN);
        assert_eq!(
            categories(&c, (p(1), p(4))),
            [
                (p(1), p(2), present),
                (p(2), p(3), written),
                (p(3), p(4), present)
            ]
        );
        // Memory that went away is not vouched for.
        let mut gone = |_: u64, _: &mut [u8]| Err(std::io::Error::other("unmapped"));
        assert_eq!(
            h.compare(&mut vec![0u8; PAGE], &mut gone),
            Compared::default()
        );
    }

    #[test]
    fn shared_memory_is_compared_where_it_exists_and_only_pages_sent_as_they_are_are_kept() {
        let base = 0x80000u64;
        let p = |i: u64| base + i * PAGE as u64;
        let mut mem = vec![0u8; 6 * PAGE];
        for i in [0, 1, 2, 4] {
            mem[i * PAGE] = i as u8 + 1;
        }
        let mut h = PageHashes::new();
        for i in 0..6 {
            h.send(p(i as u64), &mem[i * PAGE..][..PAGE]);
        }
        // Frozen: page 1 changed, page 2 is gone (hole punched: not resident), page 5
        // appeared; page 3 exists and is zero, but was never sent.
        mem[PAGE] = 9;
        mem[2 * PAGE] = 0;
        mem[5 * PAGE] = 6;
        let resident = [(p(0), p(2)), (p(3), p(6))];
        let mut reads = Vec::new();
        let mut read = |a: u64, out: &mut [u8]| {
            reads.push(a);
            let at = (a - base) as usize;
            out.copy_from_slice(&mem[at..at + out.len()]);
            Ok(())
        };
        let mut buf = vec![0u8; PAGE];
        let c = h.compare_existing(&[(p(0), p(6))], &resident, &mut buf, &mut read);
        assert_eq!(c.tracked, [(p(0), p(6))]);
        assert_eq!(c.changed, [(p(1), p(2)), (p(3), p(4)), (p(5), p(6))]);
        assert!(
            !reads.contains(&p(2)),
            "a page that does not exist is not read"
        );
        // As the dump sees it: pages 0 and 4 kept, 1, 3 and 5 stored, 2 neither.
        let (present, written) = (PAGE_IS_PRESENT, PAGE_IS_PRESENT | PAGE_IS_WRITTEN);
        assert_eq!(
            categories(&c, (p(0), p(6))),
            [
                (p(0), p(1), present),
                (p(1), p(2), written),
                (p(3), p(4), written),
                (p(4), p(5), present),
                (p(5), p(6), written)
            ]
        );
        // Pages sent as written pages of tracked memory: the table forgets them; outside
        // the mappings it keeps nothing.
        h.forget(&[(p(4), p(5))]);
        assert!(h.sent.contains_key(&p(0)) && !h.sent.contains_key(&p(4)));
        h.keep_only(&[(p(0), p(1))]);
        assert_eq!(h.sent.len(), 1);
    }
}
