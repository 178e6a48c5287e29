//! Where an incoming session's image is kept until its restore has read it: in memory
//! (memfds, reached by the restore through a symlink per file to the agent's fd) when the
//! host has room for it beside the restored session, else in files in the agent's state
//! directory. On this machine kind, writing a gibibyte into ext4's page cache took 2.5 s
//! of CPU, into memory 0.4 s: the agent's writes were most of a pre-copy migration's time.

use crate::owner::Owner;
use anyhow::{Context, Result};
use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Memory kept free beside the image and the restored session.
const MARGIN: u64 = 256 << 20;

/// Whether a session of `resident` bytes is kept in memory: its image and, once restored,
/// the session itself (until the pager has filled it in, both are held) fit into what the
/// host has available now, and into what the agent's memory cgroup still allows.
pub fn in_memory(resident: u64) -> bool {
    let room = available().map(|a| a.min(cgroup_room().unwrap_or(u64::MAX)));
    room.is_some_and(|a| resident.saturating_mul(2).saturating_add(MARGIN) < a)
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// What this process's memory cgroup still allows (limit less usage), if it has a limit:
/// cgroup v2 (`0::PATH`: memory.max, memory.current) or v1 (`N:memory:PATH`).
fn cgroup_room() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |p: String| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    groups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (dir, limit, usage) = match controllers {
            "" => (
                format!("/sys/fs/cgroup{path}"),
                "memory.max",
                "memory.current",
            ),
            "memory" => (
                format!("/sys/fs/cgroup/memory{path}"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ),
            _ => return None,
        };
        let limit = read(format!("{dir}/{limit}"))?; // ("max": no limit)
        Some(limit.saturating_sub(read(format!("{dir}/{usage}")).unwrap_or(0)))
    })
}

/// Makes `dir`, where an incoming image is kept: in memory, a link to a directory in
/// /dev/shm where that is a tmpfs (returned), made before the image comes — on a disk file
/// system, making the process images' links in `dir` itself waited for the journal inside
/// the freeze (~1 ms each on ext4). Another user's image (`owner`, whose restore reads it)
/// is kept in a directory they may search but not change.
pub fn make_dir(dir: &Path, memory: bool, owner: Option<&Owner>) -> Result<Option<PathBuf>> {
    let private = |d: &Path| {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(d)
            .with_context(|| format!("making {}", d.display()))
    };
    let searchable = |d: &Path| match owner {
        Some(_) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("opening {} to its owner", d.display())),
        None => Ok(()),
    };
    // (What is there already is a leftover: the name holds this agent's pid, which one
    // killed before had too — in a container an agent may always have the same pid.)
    let _ = std::fs::remove_dir_all(dir);
    let shm = Path::new(SHM);
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let (Some(name), true) = (name, memory && migrt::sys::on_tmpfs(shm)) else {
        private(dir)?;
        searchable(dir)?;
        return Ok(None);
    };
    let real = shm.join(format!(
        "{SHM_PREFIX}{}-{}-{name}",
        migrt::sys::getuid(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&real);
    private(&real)?;
    let linked = searchable(&real)
        .and_then(|_| dir.parent().map_or(Ok(()), private))
        .and_then(|_| {
            std::os::unix::fs::symlink(&real, dir)
                .with_context(|| format!("making {}", dir.display()))
        });
    if let Err(e) = linked {
        let _ = std::fs::remove_dir_all(&real);
        return Err(e);
    }
    Ok(Some(real))
}

const SHM: &str = "/dev/shm";
const SHM_PREFIX: &str = "migshim-incoming-";

/// Removes what agents of this user that were killed left in /dev/shm (their links; the
/// memory they led to went with them).
pub fn sweep() {
    let Ok(entries) = std::fs::read_dir(SHM) else {
        return;
    };
    let mine = format!("{SHM_PREFIX}{}-", migrt::sys::getuid());
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(&mine)
            .and_then(|r| r.split('-').next()?.parse().ok());
        if pid.is_some_and(|p: i32| !migrt::sys::alive(p)) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Creates image file `name` in `dir` (in memory: a symlink there to the memfd, which lives
/// as long as the returned File). Another user's (`owner`) is a file of theirs (in memory:
/// in /dev/shm, where `dir` leads), which their restore may open.
pub fn create(
    dir: &Path,
    name: &str,
    memory: bool,
    owner: Option<&Owner>,
) -> Result<std::fs::File> {
    let path = dir.join(name);
    let made = if memory && owner.is_none() {
        migrt::sys::memfd(&CString::new(name)?, false).and_then(|f| {
            let fd = format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd());
            std::os::unix::fs::symlink(fd, &path).map(|_| f)
        })
    } else {
        // (Read too: pages sent once are copied from where they came first.)
        std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true),
            0o600,
        )
        .open(&path)
        .and_then(|f| match owner {
            Some(o) => std::os::unix::fs::fchown(&f, Some(o.uid), Some(o.gid)).map(|_| f),
            None => Ok(f),
        })
    };
    made.with_context(|| format!("image file {name}"))
}

/// Writes an incoming image's chunks on a thread of its own, in order, while the link is
/// read and checked meanwhile: a gibibyte written into fresh memory took this machine kind
/// 0.5-3 s (its host backs a page only when first touched), as long as the rest of the
/// receiving. The buffers go back and forth (a fresh one per chunk would cost as much).
pub struct Writer {
    jobs: Option<std::sync::mpsc::SyncSender<Job>>,
    back: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    free: Vec<Vec<u8>>,
    /// Buffers made so far (at most DEPTH).
    made: usize,
}

enum Job {
    Write(Arc<std::fs::File>, Vec<u8>, std::ops::Range<usize>),
    /// `len` bytes of the first file at `offset` (written before) appended to the second.
    Same(Arc<std::fs::File>, u64, u64, Arc<std::fs::File>),
    /// Answered once everything before is written.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// Chunks on their way to the writer at most.
const DEPTH: usize = 4;

impl Writer {
    pub fn new() -> Writer {
        let (jobs, todo) = std::sync::mpsc::sync_channel::<Job>(DEPTH);
        let (done, back) = std::sync::mpsc::sync_channel(DEPTH);
        let thread = std::thread::spawn(move || -> Result<()> {
            for job in todo {
                match job {
                    Job::Write(f, buf, range) => {
                        (&*f).write_all(&buf[range]).context("storing the image")?;
                        let _ = done.try_send(buf);
                    }
                    Job::Same(from, offset, len, to) => {
                        migrt::sys::append_range(&from, offset, len, &to)
                            .context("storing the image (pages sent before)")?;
                    }
                    Job::Barrier(ack) => {
                        let _ = ack.send(());
                    }
                }
            }
            Ok(())
        });
        Writer {
            jobs: Some(jobs),
            back,
            thread: Some(thread),
            free: Vec::new(),
            made: 0,
        }
    }

    /// A buffer to receive a chunk into (waits for one the writer is done with).
    pub fn buffer(&mut self) -> Result<Vec<u8>> {
        if let Some(b) = self.free.pop() {
            return Ok(b);
        }
        if self.made < DEPTH {
            self.made += 1;
            return Ok(Vec::new());
        }
        match self.back.recv() {
            Ok(b) => Ok(b),
            Err(_) => Err(self.failure()),
        }
    }

    /// A buffer not written after all.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.free.push(buf);
    }

    /// `buf[range]` appended to `file`, later.
    pub fn write(
        &mut self,
        file: &Arc<std::fs::File>,
        buf: Vec<u8>,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        let job = Job::Write(file.clone(), buf, range);
        match self.jobs.as_ref().map(|j| j.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.failure()),
        }
    }

    /// `len` bytes of `from` at `offset` (given before) appended to `to`, later.
    pub fn same(
        &mut self,
        (from, offset, len): (&Arc<std::fs::File>, u64, u64),
        to: &Arc<std::fs::File>,
    ) -> Result<()> {
        let job = Job::Same(from.clone(), offset, len, to.clone());
        match self.jobs.as_ref().map(|j| j.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.failure()),
        }
    }

    /// Waits until everything given is written.
    pub fn wait(&mut self) -> Result<()> {
        let (ack, acked) = std::sync::mpsc::sync_channel(1);
        let sent = self.jobs.as_ref().map(|j| j.send(Job::Barrier(ack)));
        match (sent, acked.recv()) {
            (Some(Ok(())), Ok(())) => Ok(()),
            _ => Err(self.failure()),
        }
    }

    /// Why the writer stopped.
    fn failure(&mut self) -> anyhow::Error {
        self.jobs = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e,
            _ => anyhow::anyhow!("the image writer stopped"),
        }
    }

    /// Ends the thread, once it has stored what it was given.
    pub fn stop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_session_is_kept_in_memory_only_where_it_fits() {
        // (This machine kind has gigabytes free; no host has an exabyte.)
        assert!(super::in_memory(1 << 20));
        assert!(!super::in_memory(1 << 60));
    }
}
