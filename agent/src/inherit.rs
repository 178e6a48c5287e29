//! A forked tree comes back sharing memory as it did: each child's restorer is forked once
//! its parent's memory is in place, and takes over each private mapping the parent has at
//! the same place and of the same kind, copy-on-write, writing only the pages that differ —
//! as a fork had left them before the checkpoint. (Without this, a prefork server's workers
//! would each come back with a copy of what they shared: their memory times the number of
//! workers.)
//!
//! Here the plan of each child gets its marks (plan entries, see restore.rs and the
//! restorer): such a mapping and the copies into it carry INHERIT (the copies then write a
//! page only where it differs from the parent's), and the parent's pages the child does not
//! have are DROP entries. A child restorer not forked from its parent (one that ran itself
//! again for another layout) ignores both and makes everything itself, as without them.

/// A bit of an entry's kind: a mapping the parent's restorer made alike, left as it is by
/// a child forked from it; a copy into one, made only where the pages differ.
pub const INHERIT: u64 = 1 << 8;
/// An entry's kind: pages of the parent's that the child has not (`madvise(DONTNEED)`:
/// zero again, or the file's again).
pub const DROP: u64 = 4;
use crate::restore::{ProcImage, REMOTE};
use migrt::image::{PAGE, Region};

/// The kinds of entries `mark` reads: mapping, and copy into it.
const MAP: u64 = 0;
const COPY: u64 = 1;

type Entry = [u64; 7];

/// Below this much to take over from its parent (in bytes of its copies), a child is not
/// worth the wait: a restorer forks its children before making its own memory, unless one
/// of them has at least this much (forking a process with its memory in place costs
/// ~1 ms; writing 4 MiB of fresh pages, ~2).
pub const WORTH: u64 = 4 << 20;

/// In a lazy restore (a migration's), what a child must have alike with its parent for
/// the two to be copied in before they run rather than paged in after: that wait is part
/// of the freeze (a tree of 4 python processes sharing 48 MiB: ~17 -> ~95 ms here), so
/// only large sharing is worth it (a prefork server's preloaded application, not the
/// few MiB of an interpreter's own every child has alike).
const WORTH_COPYING_FIRST: u64 = 16 << 20;

/// Whether `child` has WORTH_COPYING_FIRST or more of its pages to take over from
/// `parent` (in private mappings alike in both), all of them here (a lazy migration leaves
/// pages at its source: those the pager fetches for each process apart).
pub fn worth_it(child: &ProcImage, parent: &ProcImage) -> bool {
    if [child, parent]
        .iter()
        .any(|i| i.runs.iter().any(|r| r.file == REMOTE))
    {
        return false;
    }
    let alike: Vec<&Region> = (child.regions.iter())
        .filter(|r| r.perms.ends_with('p'))
        .filter(|r| {
            parent.regions.iter().any(|p| {
                (p.start, p.end, p.offset) == (r.start, r.end, r.offset)
                    && (&p.perms, &p.name) == (&r.perms, &r.name)
            })
        })
        .collect();
    let inside = |a: u64| alike.iter().any(|r| a >= r.start && a < r.end);
    let pages: u64 = (child.runs.iter())
        .filter(|run| inside(run.addr))
        .map(|run| run.pages)
        .sum();
    pages * PAGE as u64 >= WORTH_COPYING_FIRST
}

/// Marks in `child`'s entries what it can take over from `parent`'s (both as
/// restore::map_regions made them, with copies only, not lazily); returns the bytes of its
/// copies into what it takes over.
pub fn mark(child: &mut Vec<Entry>, parent: &[Entry]) -> u64 {
    let private = |e: &&Entry| e[6] == MAP && e[3] & libc::MAP_SHARED as u64 == 0;
    let alike: Vec<(u64, u64)> = child
        .iter()
        .filter(private)
        .filter(|c| parent.iter().filter(private).any(|p| p[..6] == c[..6]))
        .map(|r| (r[0], r[0] + r[1]))
        .collect();
    let inside = |e: &Entry, &(start, end): &(u64, u64)| e[0] >= start && e[0] + e[1] <= end;
    let mut taken_over = 0;
    for e in child.iter_mut() {
        let taken = alike.iter().any(|r| inside(e, r));
        if taken && (e[6] == COPY || (e[6] == MAP && alike.contains(&(e[0], e[0] + e[1])))) {
            taken_over += if e[6] == COPY { e[1] } else { 0 };
            e[6] |= INHERIT;
        }
    }
    // The parent's pages where the child has none.
    let copies = |es: &[Entry], r: &(u64, u64)| -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = (es.iter())
            .filter(|e| e[6] & !INHERIT == COPY && inside(e, r))
            .map(|e| (e[0], e[0] + e[1]))
            .collect();
        v.sort_unstable();
        v
    };
    let mut drops = Vec::new();
    for r in &alike {
        let mine = copies(child, r);
        for (mut a, b) in copies(parent, r) {
            let over: Vec<(u64, u64)> = mine
                .iter()
                .filter(|m| m.1 > a && m.0 < b)
                .copied()
                .collect();
            for (s, e) in over {
                if s > a {
                    drops.push([a, s - a, 0, 0, 0, 0, DROP]);
                }
                a = a.max(e);
            }
            if a < b {
                drops.push([a, b - a, 0, 0, 0, 0, DROP]);
            }
        }
    }
    child.extend(drops);
    taken_over
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    #[test]
    fn a_child_takes_over_the_mappings_alike_and_drops_what_only_the_parent_has() {
        let anon = |at: u64, len: u64| [at, len, 3, 0x22, u64::MAX, 0, MAP];
        let copy = |at: u64, pages: u64, off: u64| [at, pages * P, 0, 2, 7, off, COPY];
        let parent = vec![
            anon(0x10000, 16 * P),
            anon(0x40000, 4 * P),
            copy(0x10000, 4, 0),
            copy(0x10000 + 8 * P, 8, 4 * P),
            copy(0x40000, 4, 12 * P),
        ];
        let mut child = vec![
            anon(0x10000, 16 * P),
            anon(0x40000, 8 * P), // not alike: another size
            copy(0x10000 + 2 * P, 8, 0),
            copy(0x40000, 4, 8 * P),
        ];
        assert_eq!(mark(&mut child, &parent), 8 * P);
        assert_eq!(child[0][6], MAP | INHERIT);
        assert_eq!(child[1][6], MAP, "a mapping of another size is made anew");
        assert_eq!(child[2][6], COPY | INHERIT);
        assert_eq!(
            child[3][6], COPY,
            "a copy into a mapping made anew is made whole"
        );
        // The parent has pages 0-3 and 8-15; the child 2-9.
        let drops: Vec<(u64, u64)> = (child.iter())
            .filter(|e| e[6] == DROP)
            .map(|e| ((e[0] - 0x10000) / P, e[1] / P))
            .collect();
        assert_eq!(drops, vec![(0, 2), (10, 6)]);
    }
}
