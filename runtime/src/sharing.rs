//! Which fds of a session are one open file (after dup, or inherited across fork): they
//! share an offset and status flags, so a restore must make them one object again, not one
//! open per fd. Found with kcmp while the session is frozen.

use crate::table::{Object, ProcessTable};

/// Groups of (vpid, fd) that are one open file (each group at least two).
pub type Shared = Vec<Vec<(i32, i32)>>;

/// What can only be the same open file if this is equal (a cheap first cut).
fn key(o: &Object) -> Option<(&'static str, u64)> {
    Some(match o {
        Object::File { dev, ino, .. } => ("file", dev ^ ino.rotate_left(32)),
        Object::Directory { dev, path, .. } => ("dir", dev ^ path.0.len() as u64),
        Object::Device { rdev, .. } => ("device", *rdev),
        Object::Fifo { ino, .. } => ("fifo", *ino),
        Object::MemFd { ino, .. } => ("memfd", *ino),
        Object::EventFd { .. } => ("eventfd", 0),
        Object::TimerFd { .. } => ("timerfd", 0),
        Object::SignalFd { .. } => ("signalfd", 0),
        Object::Inotify { .. } => ("inotify", 0),
        // Pipes and sockets are made once per kernel object already; epolls are the
        // process's own work; the rest is not rebuilt.
        _ => return None,
    })
}

/// Candidates of one open file: their key, and (vpid, real pid, fd) of each member.
type Group = ((&'static str, u64), Vec<(i32, i32, i32)>);

/// The sharing among the fds of `tables` (their real pids must be alive and frozen).
pub fn find(tables: &[ProcessTable]) -> Shared {
    let mut groups: Vec<Group> = Vec::new();
    for t in tables {
        for f in &t.fds {
            let Some(k) = key(&f.object) else { continue };
            let me = (t.vpid, t.real_pid, f.fd);
            let same = groups.iter_mut().find(|(gk, members)| {
                *gk == k
                    && members.first().is_some_and(|&(_, pid, fd)| {
                        crate::sys::same_open_file(pid, fd, me.1, me.2)
                    })
            });
            match same {
                Some((_, members)) => members.push(me),
                None => groups.push((k, vec![me])),
            }
        }
    }
    groups
        .into_iter()
        .filter(|(_, m)| m.len() > 1)
        .map(|(_, m)| m.into_iter().map(|(v, _, fd)| (v, fd)).collect())
        .collect()
}
