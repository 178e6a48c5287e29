//! Where an incoming session's image is kept until its restore has read it: in memory
//! (memfds, reached by the restore through a symlink per file to the agent's fd) when the
//! host has room for it beside the restored session, else in files in the agent's state
//! directory. On this machine kind, writing a gibibyte into ext4's page cache took 2.5 s
//! of CPU, into memory 0.4 s: the agent's writes were most of a pre-copy migration's time.

use anyhow::{Context, Result};
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::Path;

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

/// Creates image file `name` in `dir` (in memory: a symlink there to the memfd, which lives
/// as long as the returned File).
pub fn create(dir: &Path, name: &str, memory: bool) -> Result<std::fs::File> {
    let path = dir.join(name);
    let made = if memory {
        migrt::sys::memfd(&CString::new(name)?, false).and_then(|f| {
            let fd = format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd());
            std::os::unix::fs::symlink(fd, &path).map(|_| f)
        })
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
    };
    made.with_context(|| format!("image file {name}"))
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
