//! mig's help with a frozen process's page walk. Its dump asks the kernel which pages of
//! its memory exist (and which were written since the last pre-copy round): a walk of every
//! page table entry, ~2 ms per GiB on this machine kind, inside the freeze. While the
//! process's control thread walks the lower part of its largest anonymous mapping, mig
//! walks the upper part through /proc/PID/pagemap on another CPU and passes on what it
//! found through a pipe (migrt::dirty::write_walked).

use migrt::dirty::PageRegion;
use std::os::fd::AsRawFd;

/// Mappings smaller than this are walked by the dump alone: mig's part costs ~0.1 ms to
/// set up inside the freeze (its map read, a pipe), more than it saves below.
const WORTH: u64 = 128 << 20;

/// mig's walking thread, started before the freeze (starting it is not part of it).
pub struct Walker {
    jobs: std::sync::mpsc::Sender<Job>,
}

/// A part of a process's memory to walk, and where to write what is found.
struct Job {
    pagemap: std::fs::File,
    range: (u64, u64),
    out: std::fs::File,
}

/// A walk asked for, for the dump of one process.
pub struct Helping {
    /// `(path of the pipe, start, end)`, as the dump request carries it.
    pub offer: migrt::wire::Walked,
    read: std::fs::File,
}

impl Walker {
    pub fn new() -> Walker {
        let (jobs, todo) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            let mut found: Vec<PageRegion> = Vec::with_capacity(1 << 16);
            for mut job in todo {
                found.clear();
                let done = migrt::dirty::existing_into(&job.pagemap, job.range, false, &mut found)
                    .unwrap_or(false);
                // (A dump that did not take it up has closed its end: the write fails.)
                let _ = migrt::dirty::write_walked(&mut job.out, done.then_some(&found[..]));
            }
        });
        Walker { jobs }
    }

    /// Has the upper part of process `pid`'s largest anonymous private mapping walked, if
    /// it is large and mig may read the process's page map (same user); None otherwise.
    pub fn start(&self, pid: i32) -> Option<Helping> {
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
        let largest = migrt::procfs::all_mappings(&pid.to_string())
            .into_iter()
            .filter(|m| m.inode == 0 && m.name.0.is_empty() && m.perms.starts_with("rw"))
            .filter(|m| m.perms.as_bytes().get(3) == Some(&b'p'))
            .max_by_key(|m| m.end - m.start)?;
        let len = largest.end - largest.start;
        if len < WORTH {
            return None;
        }
        // (mig starts at once, the dump only once it has written the process's
        // description: mig takes the larger part.)
        let page = migrt::image::PAGE as u64;
        let range = (largest.start + len * 3 / 8 / page * page, largest.end);
        let (read, out) = migrt::sys::pipe().ok()?;
        migrt::sys::grow_pipe(&out, 1 << 20);
        let path = format!("/proc/{}/fd/{}", std::process::id(), read.as_raw_fd());
        self.jobs
            .send(Job {
                pagemap,
                range,
                out,
            })
            .ok()?;
        Some(Helping {
            offer: (path, range.0, range.1),
            read,
        })
    }
}

impl Helping {
    /// Once the dump is written. (If it did not read the walk, writing it fails now that
    /// no one can.)
    pub fn end(self) {
        drop(self.read);
    }
}
