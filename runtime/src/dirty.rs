//! Which pages a process wrote since a point in time, asked by the process itself: its
//! private memory registered with a userfaultfd in asynchronous write-protect mode (no
//! fault ever waits on anyone: the kernel just marks the page written and lets the write
//! through), and read back — and protected again — with the PAGEMAP_SCAN ioctl of
//! /proc/self/pagemap. Linux 6.7 or later; soft-dirty bits, the older way, are not built
//! into every kernel (this machine's has none).
//!
//! Raw system calls throughout: inside the shim, libc's entry points are the shim's own.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// <linux/userfaultfd.h>
const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: usize = 1;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;

// <linux/fs.h>
const PAGEMAP_SCAN: u64 = 0xc060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// Pages that are not the process's own data: a file's, or the shared zero page.
pub const NOT_OWN: u64 = PAGE_IS_FILE | PAGE_IS_PFNZERO;

/// What a scan does and reports: its flags, the pages it matches (any of these
/// categories), the categories it returns.
#[derive(Clone, Copy)]
struct Query {
    flags: u64,
    anyof: u64,
    ret: u64,
}

/// Pages that exist (present or swapped out), with all their categories.
const EXISTING: Query = Query {
    flags: 0,
    anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
    ret: PAGE_IS_WRITTEN | PAGE_IS_FILE | PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
};
/// The same in anonymous memory, which holds no file's pages: not asking whether a page is
/// a file's spares the kernel a look at each page's descriptor (1 GiB: 15 → 6 ms here).
const EXISTING_ANON: Query = Query {
    ret: EXISTING.ret & !PAGE_IS_FILE,
    ..EXISTING
};
/// Written pages, protected again as they are reported.
const TAKE_WRITTEN: Query = Query {
    flags: PM_SCAN_WP_MATCHING,
    anyof: PAGE_IS_WRITTEN,
    ret: PAGE_IS_WRITTEN,
};
/// Only a flag: every page protected, or the check that all are tracked.
const fn only(flags: u64) -> Query {
    Query {
        flags,
        anyof: 0,
        ret: 0,
    }
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// Pages `start..end` (addresses) that share the `categories` asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

fn ioctl(fd: i32, req: u64, arg: *mut u8) -> io::Result<i64> {
    // SAFETY: `arg` points at the structure `req` expects, alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_ioctl, fd, req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Write tracking of some ranges of this process's memory; stopped when dropped.
pub struct Tracker {
    uffd: OwnedFd,
    pagemap: std::fs::File,
    /// The ranges registered (others could not be: they are not tracked).
    ranges: Vec<(u64, u64)>,
}

impl Tracker {
    /// Starts tracking `ranges` (page-aligned, each within one mapping or several): every
    /// page counts as unwritten from now on.
    /// A tracker of nothing yet: its fds, made with system calls only (nothing journals
    /// them: the shim makes them while it holds its journal, see shim/src/precopy.rs).
    pub fn new() -> io::Result<Tracker> {
        // SAFETY: userfaultfd takes flags only; the fd is fresh and ours.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY as i32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = [
            UFFD_API,
            UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            0,
        ];
        ioctl(uffd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr().cast()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("userfaultfd asynchronous write-protection (Linux 6.7+): {e}"),
            )
        })?;
        // SAFETY: openat with a NUL-terminated path; the fd is fresh and ours.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/proc/self/pagemap".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let pagemap = unsafe { std::fs::File::from_raw_fd(fd as i32) };
        Ok(Tracker {
            uffd,
            pagemap,
            ranges: Vec::new(),
        })
    }

    /// Starts tracking `ranges` (those that can be tracked).
    pub fn track(&mut self, ranges: &[(u64, u64)]) -> io::Result<()> {
        for &(start, end) in ranges {
            let mut reg = [start, end - start, UFFDIO_REGISTER_MODE_WP, 0];
            if ioctl(
                self.uffd.as_raw_fd(),
                UFFDIO_REGISTER,
                reg.as_mut_ptr().cast(),
            )
            .is_ok()
            {
                self.ranges.push((start, end));
            }
        }
        // Everything write-protected: from here on a write marks its page.
        for &(start, end) in &self.ranges {
            scan(
                &self.pagemap,
                start,
                end,
                only(PM_SCAN_WP_MATCHING),
                (&mut [], 0),
            )?;
        }
        Ok(())
    }

    /// The ranges being tracked.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Pages of `start..end` written since the start or the last call, write-protected
    /// again as they are reported (a write after that marks the page again).
    pub fn take_written(&self, start: u64, end: u64) -> io::Result<Vec<PageRegion>> {
        self.collect(start, end, TAKE_WRITTEN)
    }

    /// Pages of `start..end` that exist (present or swapped out), with their categories
    /// (written, file, zero page, ...); nothing is protected again.
    pub fn existing(&self, start: u64, end: u64) -> io::Result<Vec<PageRegion>> {
        self.collect(start, end, EXISTING)
    }

    /// The same, appended to `out` within the room it has (nothing is allocated: for a
    /// frozen process's dump); `file_backed`: whether the range maps a file (if not, no
    /// page is reported as a file's). Ok(false) when the room did not suffice; an error
    /// when part of the range is not tracked (a mapping made anew there since the start).
    pub fn existing_into(
        &self,
        (start, end): (u64, u64),
        file_backed: bool,
        out: &mut Vec<PageRegion>,
    ) -> io::Result<bool> {
        let q = existing(file_backed, PM_SCAN_CHECK_WPASYNC);
        Ok(scan_into(&self.pagemap, start, end, q, out)? >= end)
    }

    /// Its file descriptors (a forked child closes its copies: they act on the parent).
    pub fn raw_fds(&self) -> [i32; 2] {
        [self.uffd.as_raw_fd(), self.pagemap.as_raw_fd()]
    }

    fn collect(&self, start: u64, end: u64, q: Query) -> io::Result<Vec<PageRegion>> {
        let mut out = Vec::with_capacity(4096);
        let mut at = start;
        while at < end {
            at = scan_into(&self.pagemap, at, end, q, &mut out)?;
            out.reserve(out.capacity());
        }
        Ok(out)
    }
}

/// Pages of `start..end` of this process that exist (present or swapped out), with their
/// categories, appended to `out` within the room it has (nothing is allocated: for a frozen
/// process's dump), asked through `pagemap` (/proc/self/pagemap) with no write tracking;
/// `file_backed` as for Tracker::existing_into. Ok(false) when the room did not suffice.
pub fn existing_into(
    pagemap: &std::fs::File,
    (start, end): (u64, u64),
    file_backed: bool,
    out: &mut Vec<PageRegion>,
) -> io::Result<bool> {
    Ok(scan_into(pagemap, start, end, existing(file_backed, 0), out)? >= end)
}

/// Where the first page of `start..end` that exists is (asked through `pagemap` as by
/// `existing_into`), if one does. The walk stops at it: a walk for the whole region that
/// page begins would go on through all of a mapping whose pages all exist.
pub fn first_existing(
    pagemap: &std::fs::File,
    (start, end): (u64, u64),
) -> io::Result<Option<u64>> {
    let mut one = [PageRegion::default()];
    let (n, _) = scan(pagemap, start, end, existing(false, 0), (&mut one, 1))?;
    Ok((n > 0).then_some(one[0].start))
}

/// What a walk of part of a frozen process's memory found, written by another process
/// that walked it (`existing_into` through /proc/PID/pagemap) for the process's dump,
/// which walks the rest meanwhile: the count of regions (u64::MAX: the walk did not
/// complete), then each region's three words, little-endian.
pub fn write_walked(w: &mut impl io::Write, found: Option<&[PageRegion]>) -> io::Result<()> {
    let mut bytes = found
        .map_or(u64::MAX, |f| f.len() as u64)
        .to_le_bytes()
        .to_vec();
    for r in found.unwrap_or_default() {
        for word in [r.start, r.end, r.categories] {
            bytes.extend(word.to_le_bytes());
        }
    }
    w.write_all(&bytes)
}

/// Reads what `write_walked` wrote, appended to `out` within the room it has (nothing is
/// allocated: for a frozen process's dump). Ok(false) when the walk did not complete or the
/// room did not suffice.
pub fn read_walked(r: &mut impl io::Read, out: &mut Vec<PageRegion>) -> io::Result<bool> {
    let mut count = [0u8; 8];
    r.read_exact(&mut count)?;
    let mut left = match u64::from_le_bytes(count) {
        u64::MAX => return Ok(false),
        n => n,
    };
    let mut buf = [0u8; 24 * 128];
    let mut fits = true;
    while left > 0 {
        let n = left.min(128) as usize;
        r.read_exact(&mut buf[..n * 24])?;
        for w in buf[..n * 24].chunks_exact(24) {
            let word = |i: usize| u64::from_le_bytes(w[i * 8..][..8].try_into().unwrap());
            fits &= out.len() < out.capacity();
            if fits {
                out.push(PageRegion {
                    start: word(0),
                    end: word(1),
                    categories: word(2),
                });
            }
        }
        left -= n as u64;
    }
    Ok(fits)
}

/// The query for existing pages, with `flags`.
fn existing(file_backed: bool, flags: u64) -> Query {
    let q = if file_backed { EXISTING } else { EXISTING_ANON };
    Query { flags, ..q }
}

/// Regions appended to `out` within the room it has; returns where the walk got to
/// (`end` when done).
fn scan_into(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    q: Query,
    out: &mut Vec<PageRegion>,
) -> io::Result<u64> {
    let mut at = start;
    while at < end {
        let room = out.spare_capacity_mut();
        if room.is_empty() {
            break;
        }
        // SAFETY: the kernel writes at most room.len() regions into the spare capacity,
        // and says how many; only those are counted in.
        let room = unsafe { std::slice::from_raw_parts_mut(room.as_mut_ptr().cast(), room.len()) };
        let (n, walked) = scan(pagemap, at, end, q, (room, 0))?;
        // SAFETY: n regions were written just past the old length.
        unsafe { out.set_len(out.len() + n) };
        if walked <= at {
            return Ok(end);
        }
        at = walked;
    }
    Ok(at)
}

/// One PAGEMAP_SCAN call, into `out` (and no more than `max_pages` pages, if not 0):
/// (regions filled, where the walk stopped).
fn scan(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    q: Query,
    (out, max_pages): (&mut [PageRegion], u64),
) -> io::Result<(usize, u64)> {
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: q.flags,
        start,
        end,
        walk_end: 0,
        vec: out.as_mut_ptr() as u64,
        vec_len: out.len() as u64,
        max_pages,
        category_inverted: 0,
        // (Protecting again only what is reported.)
        category_mask: if q.flags & PM_SCAN_WP_MATCHING != 0 {
            q.anyof
        } else {
            0
        },
        category_anyof_mask: q.anyof,
        return_mask: q.ret,
    };
    if out.is_empty() {
        arg.vec = 0;
    }
    let n = ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, (&raw mut arg).cast())?;
    Ok((n as usize, arg.walk_end))
}

impl Drop for Tracker {
    fn drop(&mut self) {
        for &(start, end) in &self.ranges {
            let mut range = [start, end - start];
            let _ = ioctl(
                self.uffd.as_raw_fd(),
                UFFDIO_UNREGISTER,
                range.as_mut_ptr().cast(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh private anonymous mapping of `len` bytes (the test unmaps it).
    fn anonymous(len: usize) -> *mut u8 {
        // SAFETY: mmap of new memory, checked.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        mem.cast()
    }

    #[test]
    fn the_first_existing_page_is_found_past_empty_ones() {
        const PAGE: usize = 4096;
        let len = 32 * PAGE;
        let mem = anonymous(len);
        let (start, end) = (mem as u64, mem as u64 + len as u64);
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        match first_existing(&pagemap, (start, end)) {
            Ok(none) => assert_eq!(none, None, "nothing touched yet"),
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        }
        // SAFETY: pages 5.. of the mapping.
        unsafe { std::ptr::write_bytes(mem.add(5 * PAGE), 1, len - 5 * PAGE) };
        let first = first_existing(&pagemap, (start, end)).unwrap();
        assert_eq!(first, Some(start + 5 * PAGE as u64));
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(mem.cast(), len) };
    }

    #[test]
    fn writes_are_seen_once_and_tracking_starts_again() {
        const PAGE: usize = 4096;
        let len = 64 * PAGE;
        let mem = anonymous(len);
        let start = mem as u64;
        // SAFETY: within the mapping.
        unsafe { std::ptr::write_bytes(mem, 1, len) };
        let t = match Tracker::new().and_then(|mut t| {
            t.track(&[(start, start + len as u64)])?;
            Ok(t)
        }) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        assert!(
            t.take_written(start, start + len as u64)
                .unwrap()
                .is_empty()
        );
        // SAFETY: pages 3 and 10..12 of the mapping.
        unsafe {
            *mem.add(3 * PAGE + 5) = 7;
            std::ptr::write_bytes(mem.add(10 * PAGE), 2, 2 * PAGE);
        }
        let w = t.take_written(start, start + len as u64).unwrap();
        let pages: Vec<(u64, u64)> = w
            .iter()
            .map(|r| {
                (
                    (r.start - start) / PAGE as u64,
                    (r.end - start) / PAGE as u64,
                )
            })
            .collect();
        assert_eq!(pages, vec![(3, 4), (10, 12)]);
        assert!(
            t.take_written(start, start + len as u64)
                .unwrap()
                .is_empty()
        );
        let all = t.existing(start, start + len as u64).unwrap();
        assert_eq!(all.first().map(|r| r.start), Some(start));
        let mut room = Vec::with_capacity(16);
        assert!(
            t.existing_into((start, start + len as u64), false, &mut room)
                .unwrap()
        );
        assert_eq!(room, all);
        assert!(all.iter().all(|r| r.categories & PAGE_IS_WRITTEN == 0));
        // Mapped anew: no longer tracked.
        // SAFETY: replaces the first page of the mapping made above.
        let again = unsafe {
            libc::mmap(
                mem.cast(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        assert_eq!(again, mem.cast());
        room.clear();
        assert!(
            t.existing_into((start, start + len as u64), false, &mut room)
                .is_err()
        );
        drop(t);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(mem.cast(), len) };
    }

    #[test]
    fn a_walk_passed_on_reads_back_as_found_within_the_room_it_has() {
        let found: Vec<PageRegion> = (0..300u64)
            .map(|i| PageRegion {
                start: i * 8192,
                end: i * 8192 + 4096,
                categories: PAGE_IS_PRESENT | ((i % 2) * PAGE_IS_WRITTEN),
            })
            .collect();
        let mut bytes = Vec::new();
        write_walked(&mut bytes, Some(&found)).unwrap();
        // Appended after what is there.
        let mut out = Vec::with_capacity(400);
        out.push(PageRegion::default());
        assert!(read_walked(&mut &bytes[..], &mut out).unwrap());
        assert_eq!(&out[1..], &found[..]);
        // Not room for all: as many as fit, and false.
        let mut small = Vec::with_capacity(100);
        assert!(!read_walked(&mut &bytes[..], &mut small).unwrap());
        assert_eq!(&small[..], &found[..small.len()]);
        // A walk that did not complete.
        let mut failed = Vec::new();
        write_walked(&mut failed, None).unwrap();
        assert!(!read_walked(&mut &failed[..], &mut out).unwrap());
        // Cut short: an error, not a guess.
        assert!(read_walked(&mut &bytes[..100], &mut Vec::with_capacity(400)).is_err());
    }
}
