//! mig's help with a frozen process's page walk. Its dump asks the kernel which pages of
//! its memory exist (and which were written since the last pre-copy round): a walk of every
//! page table entry, ~2.5 ms per GiB on this machine kind, inside the freeze. While the
//! process's control thread walks the lower part of its largest anonymous mapping, mig
//! walks the upper part through /proc/PID/pagemap on another CPU and passes on what it
//! found through a pipe (migrt::dirty::write_walked).

use migrt::dirty::PageRegion;
use std::os::fd::AsRawFd;

/// Mappings smaller than this are walked by the dump alone (a thread costs more than half
/// of their walk).
const WORTH: u64 = 64 << 20;

/// A walk going on (or done), for the dump of one process.
pub struct Helping {
    /// `(path of the pipe, start, end)`, as the dump request carries it.
    pub offer: (String, u64, u64),
    read: std::fs::File,
    thread: std::thread::JoinHandle<()>,
}

/// Starts walking the upper part of process `pid`'s largest anonymous private mapping, if
/// it is large and mig may read the process's page map (same user); None otherwise.
pub fn start(pid: i32) -> Option<Helping> {
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
    let largest = migrt::procfs::all_mappings(&pid.to_string())
        .into_iter()
        .filter(|m| m.inode == 0 && m.name.0.is_empty() && m.perms.starts_with("rw"))
        .filter(|m| m.perms.as_bytes().get(3) == Some(&b'p'))
        .max_by_key(|m| m.end - m.start)?;
    if largest.end - largest.start < WORTH {
        return None;
    }
    let page = migrt::image::PAGE as u64;
    // (mig starts at once, the dump only once it has written the process's description:
    // mig takes the larger part.)
    let len = largest.end - largest.start;
    let (start, end) = (largest.start + len * 3 / 8 / page * page, largest.end);
    let (read, mut write) = migrt::sys::pipe().ok()?;
    migrt::sys::grow_pipe(&write, 1 << 20);
    let thread = std::thread::spawn(move || {
        let mut found: Vec<PageRegion> = Vec::with_capacity(1 << 16);
        let done =
            migrt::dirty::existing_into(&pagemap, (start, end), false, &mut found).unwrap_or(false);
        // (A dump that did not take it up has closed its end: the write fails, unread.)
        let _ = migrt::dirty::write_walked(&mut write, done.then_some(&found[..]));
    });
    let path = format!("/proc/{}/fd/{}", std::process::id(), read.as_raw_fd());
    Some(Helping {
        offer: (path, start, end),
        read,
        thread,
    })
}

impl Helping {
    /// Once the dump is written: the walk ends (if the dump did not read it, its write
    /// fails now that no one can).
    pub fn end(self) {
        drop(self.read);
        let _ = self.thread.join();
    }
}
