//! mig's help with a frozen process's page walk. Its dump asks the kernel which pages of
//! its memory exist (and which were written since the last pre-copy round): a walk of every
//! page table entry, ~2 ms per GiB on this machine kind, inside the freeze. While the
//! process's control thread walks the lower half of its largest anonymous mapping, mig
//! walks the upper half through /proc/PID/pagemap on another CPU and passes on what it
//! found through a pipe (migrt::dirty::write_walked).

use migrt::dirty::PageRegion;
use std::io::Read;
use std::os::fd::AsRawFd;

/// Mappings smaller than this are walked by the dump alone: mig's part costs ~0.1 ms to
/// set up inside the freeze (its map read, pipes), more than it saves below.
const WORTH: u64 = 128 << 20;

/// mig's walking thread, started before the freeze (starting it is not part of it).
pub struct Walker {
    jobs: std::sync::mpsc::Sender<Job>,
}

/// A part of a process's memory to walk once told to, and where to write what is found.
struct Job {
    pagemap: std::fs::File,
    range: (u64, u64),
    go: std::fs::File,
    out: std::fs::File,
}

/// A walk asked for, for the dump of one process.
pub struct Helping {
    /// As the dump request carries it.
    pub offer: migrt::wire::Walked,
    /// mig's ends of the pipes the dump opens.
    ends: [std::fs::File; 2],
}

impl Walker {
    pub fn new() -> Walker {
        let (jobs, todo) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            let mut found: Vec<PageRegion> = Vec::with_capacity(1 << 16);
            for mut job in todo {
                // (Not told: the dump did not need it, or failed.)
                if !told(&mut job.go) {
                    continue;
                }
                found.clear();
                let done = migrt::dirty::existing_into(&job.pagemap, job.range, false, &mut found)
                    .unwrap_or(false);
                // (A dump that did not take it up has closed its end: the write fails.)
                let _ = migrt::dirty::write_walked(&mut job.out, done.then_some(&found[..]));
            }
        });
        Walker { jobs }
    }

    /// Has the upper half of process `pid`'s largest anonymous private mapping walked, if
    /// it is large and mig may read the process's page map (same user); None otherwise.
    /// (`maps`: its mappings.)
    pub fn start(&self, pid: i32, maps: &[migrt::procfs::MapsLine]) -> Option<Helping> {
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
        let largest = maps
            .iter()
            .filter(|m| m.inode == 0 && m.name.0.is_empty() && m.perms.starts_with("rw"))
            .filter(|m| m.perms.as_bytes().get(3) == Some(&b'p'))
            .max_by_key(|m| m.end - m.start)?;
        let len = largest.end - largest.start;
        if len < WORTH {
            return None;
        }
        let page = migrt::image::PAGE as u64;
        let (start, end) = (largest.start + len / 2 / page * page, largest.end);
        let (go, tell) = migrt::sys::pipe().ok()?;
        let (read, out) = migrt::sys::pipe().ok()?;
        migrt::sys::grow_pipe(&out, 1 << 20);
        let path = |f: &std::fs::File| format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd());
        let offer = migrt::wire::Walked {
            go: path(&tell),
            found: path(&read),
            start,
            end,
        };
        let job = Job {
            pagemap,
            range: (start, end),
            go,
            out,
        };
        self.jobs.send(job).ok()?;
        Some(Helping {
            offer,
            ends: [tell, read],
        })
    }
}

/// Waits for the dump's word to walk: polled for the first 20 ms (a thread asleep on
/// this machine kind can take a millisecond to wake: inside the freeze), then asleep.
fn told(go: &mut std::fs::File) -> bool {
    let t = std::time::Instant::now();
    let polled = migrt::sys::set_status_flags(go.as_raw_fd(), libc::O_NONBLOCK).is_ok();
    loop {
        match go.read(&mut [0u8]) {
            Ok(n) => return n == 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
        if !polled || t.elapsed() > std::time::Duration::from_millis(20) {
            break;
        }
        std::thread::yield_now();
    }
    let _ = migrt::sys::set_status_flags(go.as_raw_fd(), 0);
    go.read(&mut [0u8]).ok() == Some(1)
}

impl Helping {
    /// Once the dump is written: a walk it did not ask for is not made, one it did not
    /// read fails to write it.
    pub fn end(self) {
        drop(self.ends);
    }
}
