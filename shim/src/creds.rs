//! Whose process it is: its user and group ids and supplementary groups, kept at each
//! freeze and taken back by the restart path (a server started as root whose workers run
//! as another user comes back so); and its dumpable flag, which a change of user clears
//! and which keeps a process from opening its own /proc/self/pagemap: lifted while mig is
//! connected, put back when it leaves.
//!
//! The kept values live in the process's memory, so they come back with it.
//!
//! A process about to change its uid opens the session table while it still may: a new
//! program it (or a child of it) starts could not open it by its path, in the owner's
//! private directory. The fd is inherited across fork and exec (its number goes in the
//! environment, MIGSHIM_TABLE_FD), hidden from the app like the shim's other fds.

use crate::interpose::raw::syscall6;
use std::ffi::CString;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering::*};

/// The environment variable naming the held table's fd.
pub const ENV_TABLE_FD: &str = "MIGSHIM_TABLE_FD";

/// The session table held open by this process (-1: none).
static TABLE_FD: AtomicI32 = AtomicI32::new(-1);

pub fn table_fd() -> i32 {
    TABLE_FD.load(Relaxed)
}

/// Opens `path` (the session table) read-write as a high fd that is kept across exec.
fn open_high(path: &std::path::Path) -> Option<i32> {
    use std::os::fd::IntoRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ok()?
        .into_raw_fd();
    Some(crate::interpose::keep_across_exec(
        crate::interpose::move_fd_high(f),
    ))
}

/// Before the app changes its uid: hold the table (once).
pub fn hold_table() {
    if table_fd() >= 0 {
        return;
    }
    let Some(s) = crate::state::shim() else {
        return;
    };
    let Some(_busy) = crate::state::enter() else {
        return;
    };
    if let Some(fd) = open_high(&s.dir().procs()) {
        TABLE_FD.store(fd, Relaxed);
    }
}

/// At load, when the table cannot be opened by its path: the one the program that exec'd
/// this one held, which this one then holds.
pub fn inherited_table() -> Option<std::mem::ManuallyDrop<std::fs::File>> {
    use std::os::fd::FromRawFd;
    let fd: i32 = std::env::var(ENV_TABLE_FD).ok()?.parse().ok()?;
    // SAFETY: a raw fcntl F_GETFD only checks the number is open.
    if unsafe {
        syscall6(
            libc::SYS_fcntl,
            fd as usize,
            libc::F_GETFD as usize,
            0,
            0,
            0,
            0,
        )
    } < 0
    {
        return None;
    }
    TABLE_FD.store(fd, Relaxed);
    // SAFETY: the fd stays open (ManuallyDrop): the table's, for as long as the process.
    Some(std::mem::ManuallyDrop::new(unsafe {
        std::fs::File::from_raw_fd(fd)
    }))
}

/// "MIGSHIM_TABLE_FD=N" for the environment of an exec or spawn, when the table is held.
pub fn table_env() -> Option<CString> {
    let fd = table_fd();
    (fd >= 0).then(|| CString::new(format!("{ENV_TABLE_FD}={fd}")).unwrap_or_default())
}

/// The app wants the held table's number (dup2 onto it): the table moves aside.
pub fn make_room(fd: i32) {
    if fd >= 0 && fd == table_fd() {
        let new = crate::interpose::keep_across_exec(crate::interpose::move_fd_high(fd));
        TABLE_FD.store(new, Relaxed);
    }
}

/// After a restore (still privileged): the held table open again at its number.
pub fn hold_table_again(path: &std::path::Path) {
    let fd = table_fd();
    if fd < 0 {
        return;
    }
    if let Some(new) = open_high(path) {
        // SAFETY: a raw dup3 onto the number the restored process knows the table by.
        unsafe { syscall6(libc::SYS_dup3, new as usize, fd as usize, 0, 0, 0, 0) };
        crate::interpose::close_real(new);
    }
}

struct Kept {
    /// real, effective, saved uid; then gid (none kept yet: empty).
    ids: Vec<u32>,
    groups: Vec<u32>,
    /// PR_GET_DUMPABLE when mig came.
    dumpable: i32,
}

static KEPT: Mutex<Kept> = Mutex::new(Kept {
    ids: Vec::new(),
    groups: Vec::new(),
    dumpable: 1,
});

/// The dumpable flag the app had before mig lifted it (-1: not lifted).
static LIFTED: AtomicI32 = AtomicI32::new(-1);

fn dumpable() -> i32 {
    // SAFETY: a prctl query without pointers.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE) }
}

fn set_dumpable(v: i32) {
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, v as libc::c_ulong) };
}

/// mig connected: a process that is not dumpable becomes so while mig works on it.
pub fn open_to_mig() {
    let d = dumpable();
    if d == 0 && LIFTED.compare_exchange(-1, d, AcqRel, Relaxed).is_ok() {
        set_dumpable(1);
    }
}

/// mig left: the flag as the app had it.
pub fn closed_again() {
    let d = LIFTED.swap(-1, AcqRel);
    if d >= 0 {
        set_dumpable(d);
    }
}

fn ids() -> Vec<u32> {
    let mut v = [0u32; 6];
    // SAFETY: raw getresuid/getresgid into three u32 each.
    unsafe {
        let p = v.as_mut_ptr() as usize;
        syscall6(libc::SYS_getresuid, p, p + 4, p + 8, 0, 0, 0);
        syscall6(libc::SYS_getresgid, p + 12, p + 16, p + 20, 0, 0, 0);
    }
    v.to_vec()
}

fn groups() -> Vec<u32> {
    // SAFETY: raw getgroups: the count first, then into a buffer of that many.
    unsafe {
        let n = syscall6(libc::SYS_getgroups, 0, 0, 0, 0, 0, 0);
        let mut g = vec![0u32; n.max(0) as usize];
        let n = syscall6(
            libc::SYS_getgroups,
            g.len(),
            g.as_mut_ptr() as usize,
            0,
            0,
            0,
            0,
        );
        g.truncate(n.max(0) as usize);
        g
    }
}

/// At the freeze (the control thread's ids are the process's: glibc sets them on all).
pub fn keep() {
    let mut k = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    k.ids = ids();
    k.groups = groups();
    k.dumpable = match LIFTED.load(Acquire) {
        -1 => dumpable(),
        d => d,
    };
}

/// In the restart path, on the only thread (the others, made after, inherit what it sets):
/// the kept groups, gids and uids, in the order that keeps the privilege to set the next;
/// then the dumpable flag. Err says which ids could not be set.
pub fn take_back() -> Result<(), String> {
    LIFTED.store(-1, Release);
    let k = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    if k.ids.len() != 6 {
        return Ok(()); // kept by no freeze
    }
    let want = &k.ids;
    if groups() != k.groups {
        // Without privilege the restorer's own groups stay (its user's, as they are now).
        // SAFETY: a raw setgroups with a buffer of its own count.
        unsafe {
            let g = &k.groups;
            syscall6(
                libc::SYS_setgroups,
                g.len(),
                g.as_ptr() as usize,
                0,
                0,
                0,
                0,
            )
        };
    }
    if ids() != *want {
        // SAFETY: raw id calls with plain values.
        let r = unsafe {
            [
                syscall6(
                    libc::SYS_setresgid,
                    want[3] as usize,
                    want[4] as usize,
                    want[5] as usize,
                    0,
                    0,
                    0,
                ),
                syscall6(
                    libc::SYS_setresuid,
                    want[0] as usize,
                    want[1] as usize,
                    want[2] as usize,
                    0,
                    0,
                    0,
                ),
            ]
        };
        if let Some(e) = r.iter().find(|&&r| r < 0) {
            return Err(format!(
                "it ran as uid {} gid {} and may not be made so again here ({}): restore it as root",
                want[1],
                want[4],
                std::io::Error::from_raw_os_error(-*e as i32)
            ));
        }
    }
    set_dumpable(k.dumpable);
    Ok(())
}
