//! Pages as a lazy migration's post-copy sends them: for a range asked for, a map with a
//! bit per page (set: the source has data there), then the data of those pages, in order,
//! then where the next page with data may be past the range (NEXT). A page the source
//! never had, or one of zeros, costs a bit rather than 4 KiB on the link and no memory on
//! the target (its pager leaves it missing: it reads as zero), and a stretch of them the
//! pager's fill skips (a mapping of gibibytes reserved and barely used is not asked for a
//! mebibyte at a time).
//!
//! The dump of a lazy migration does not walk the page tables of large mappings inside
//! the freeze (shim/src/dump.rs): all of such a mapping is kept in the source, and which of
//! its pages exist is found out here, as they are asked for.

pub const PAGE: usize = 4096;

/// The answer's last 8 bytes (little-endian): the source address of the first page that
/// may hold data past the range (0: not known; past the mapping's end: none in it).
pub const NEXT: usize = 8;

/// The length of the map of `len` bytes of pages.
pub fn map_len(len: u64) -> usize {
    (len as usize / PAGE).div_ceil(8)
}

/// Whether page `i` of the map has data.
pub fn has(map: &[u8], i: usize) -> bool {
    map.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)
}

/// The length of the data the map says follows it.
pub fn data_len(map: &[u8]) -> usize {
    map.iter().map(|b| b.count_ones() as usize).sum::<usize>() * PAGE
}

/// Makes an answer in `buf`: room for the map of `len` bytes of pages, then those pages,
/// read where `read` may have data. Every page of zeros is left out; the others are moved
/// up to follow each other. Returns the bytes of page data.
pub fn pack(buf: &mut [u8], len: u64, read: impl Fn(usize) -> bool) -> usize {
    let head = map_len(len);
    let (map, pages) = buf.split_at_mut(head);
    map.fill(0);
    let mut n = 0;
    for i in 0..len as usize / PAGE {
        let at = i * PAGE;
        if !read(i) || pages[at..at + PAGE].iter().all(|&b| b == 0) {
            continue;
        }
        map[i / 8] |= 1 << (i % 8);
        if n != at {
            pages.copy_within(at..at + PAGE, n);
        }
        n += PAGE;
    }
    n
}

/// Puts the pages of an answer in place: `buf` holds at its start the data of the pages
/// the map has, in order; each is moved to its page (the last first: none is overwritten
/// before it has moved). The others are left as they were.
pub fn unpack(map: &[u8], buf: &mut [u8]) {
    let mut n = data_len(map);
    for i in (0..buf.len() / PAGE).rev() {
        if has(map, i) {
            n -= PAGE;
            if n != i * PAGE {
                buf.copy_within(n..n + PAGE, i * PAGE);
            }
        }
    }
}

/// The runs of `pages` pages with data and without, in order: (first page, count, data).
pub fn runs(map: &[u8], pages: usize) -> impl Iterator<Item = (usize, usize, bool)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= pages {
            return None;
        }
        let (first, data) = (i, has(map, i));
        while i < pages && has(map, i) == data {
            i += 1;
        }
        Some((first, i - first, data))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_packs_the_pages_with_data_and_unpacks_them_in_place() {
        let pages = 20;
        let len = (pages * PAGE) as u64;
        let head = map_len(len);
        let mut buf = vec![0u8; head + pages * PAGE];
        // Pages 1, 2, 7 and 19 hold data; 5 was read as zeros; 9 holds data but is not read.
        for (i, v) in [(1, 1u8), (2, 2), (7, 7), (19, 19), (9, 9)] {
            buf[head + i * PAGE + 100] = v;
        }
        let n = pack(&mut buf, len, |i| i != 9);
        assert_eq!(n, 4 * PAGE);
        let (map, data) = buf.split_at_mut(head);
        assert_eq!(data_len(map), n);
        let with: Vec<usize> = (0..pages).filter(|&i| has(map, i)).collect();
        assert_eq!(with, [1, 2, 7, 19]);
        let got: Vec<(usize, usize, bool)> = runs(map, pages).collect();
        assert_eq!(
            got,
            [
                (0, 1, false),
                (1, 2, true),
                (3, 4, false),
                (7, 1, true),
                (8, 11, false),
                (19, 1, true)
            ]
        );
        // As the pager gets it: the data first, then each page put in place.
        let mut out = vec![0u8; pages * PAGE];
        out[..n].copy_from_slice(&data[..n]);
        unpack(map, &mut out);
        for (i, v) in [(1, 1u8), (2, 2), (7, 7), (19, 19)] {
            assert_eq!(out[i * PAGE + 100], v, "page {i}");
            assert!(out[i * PAGE..][..PAGE].iter().filter(|&&b| b != 0).count() == 1);
        }
    }
}
