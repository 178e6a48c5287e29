//! Another user's session coming to a root agent. Its restore runs as that user (the ids
//! and groups this host's user database gives them), so that an image — which its sender
//! could have made up — gets no more than the user could get by restoring it themself: no
//! file, port, id or address the user may not have. One capability is lent to it:
//! CAP_SYS_PTRACE, without which a userfaultfd does not report forks (the target of every
//! migration restores lazily, and a lazy migration needs it). The restorer drops it before
//! the program runs again. The session lives where the user's own `mig` looks for it.

use anyhow::{Result, bail};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;

/// What the restore is lent (capability number, linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;
const CAP_VERSION_3: u32 = 0x2008_0522;

pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    groups: Vec<libc::gid_t>,
    name: String,
    home: PathBuf,
}

impl Owner {
    /// The account of `uid` on this host.
    pub fn lookup(uid: u32) -> Result<Owner> {
        // SAFETY: passwd is plain data (integers and pointers), all-zero a valid value.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0u8; 16 << 10];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: getpwuid_r fills `pw` with pointers into `buf`, which outlives their use
        // below; `found` says whether it did.
        let r = unsafe {
            libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut found)
        };
        if r != 0 || found.is_null() {
            bail!("uid {uid} has no account on this host");
        }
        // SAFETY: found: pw_name and pw_dir are NUL-terminated strings in `buf`.
        let (name, home) = unsafe {
            (
                std::ffi::CStr::from_ptr(pw.pw_name).to_owned(),
                std::ffi::CStr::from_ptr(pw.pw_dir)
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        Ok(Owner {
            uid,
            gid: pw.pw_gid,
            groups: groups_of(&name, pw.pw_gid),
            name: name.to_string_lossy().into_owned(),
            home: home.into(),
        })
    }

    /// Where the user's own `mig` looks for sessions (when they set nothing): in the
    /// runtime directory a login gives them (/run/user/UID, if it is there and theirs),
    /// else /tmp/migshim-UID.
    pub fn runtime_dir(&self) -> PathBuf {
        use std::os::unix::fs::MetadataExt;
        let login = PathBuf::from(format!("/run/user/{}", self.uid));
        match std::fs::symlink_metadata(&login) {
            Ok(m) if m.is_dir() && m.uid() == self.uid => login.join("migshim"),
            _ => migrt::paths::shared_tmp_runtime_dir(self.uid),
        }
    }

    /// Makes `cmd` run as this user, CAP_SYS_PTRACE lent, in directory `cwd` (opened here:
    /// the user need not be able to reach it by its path), with an environment of its own:
    /// the user's, and what configures mig (the agent's key left out).
    pub fn apply(&self, cmd: &mut Command, cwd: OwnedFd) {
        let keep: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
            .filter(|(k, _)| {
                let k = k.to_string_lossy();
                (k.starts_with("MIGSHIM_") && k != "MIGSHIM_KEY")
                    || ["PATH", "LANG", "TZ", "RUST_BACKTRACE"].contains(&k.as_ref())
                    || k.starts_with("LC_")
            })
            .collect();
        cmd.env_clear()
            .envs(keep)
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env(migrt::paths::ENV_RUNTIME_DIR, self.runtime_dir());
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        // SAFETY: between fork and exec only system calls run, on values made before.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, move || {
                become_user(cwd.as_raw_fd(), (uid, gid, &groups))
            })
        };
    }
}

/// `name`'s groups: its primary group `gid` and those it is a member of.
fn groups_of(name: &CString, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut n = groups.len() as i32;
        // SAFETY: getgrouplist writes at most `n` gids into `groups` and says how many.
        let r = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if r >= 0 {
            groups.truncate(n as usize);
            return groups;
        }
        groups.resize((n as usize).max(groups.len() * 2), 0);
    }
}

/// In the forked child: into `cwd`, then the user's groups and ids, CAP_SYS_PTRACE kept
/// (permitted, effective, and ambient so that it crosses exec) and nothing else.
fn become_user(cwd: i32, (uid, gid, groups): (u32, u32, &[libc::gid_t])) -> std::io::Result<()> {
    let check = |r: libc::c_long| match r {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    };
    let cap = 1u32 << CAP_SYS_PTRACE;
    let head = [CAP_VERSION_3, 0];
    // (effective, permitted, inheritable) of capabilities 0-31, then of 32-63.
    let sets = [cap, cap, cap, 0, 0, 0];
    // SAFETY: raw system calls with plain values and buffers of the sizes they take.
    unsafe {
        check(libc::fchdir(cwd).into())?;
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0).into())?;
        check(libc::syscall(
            libc::SYS_setgroups,
            groups.len(),
            groups.as_ptr(),
        ))?;
        check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
        check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
        check(libc::syscall(
            libc::SYS_capset,
            head.as_ptr(),
            sets.as_ptr(),
        ))?;
        let raise = (
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            CAP_SYS_PTRACE as libc::c_ulong,
        );
        check(libc::prctl(libc::PR_CAP_AMBIENT, raise.0, raise.1, 0, 0).into())?;
    }
    Ok(())
}

/// Drops whatever capability this process was lent (as above), on the calling thread: a
/// restore as another user does so once its restorer is started, its pager at once.
pub fn drop_lent_capabilities() {
    if migrt::sys::getuid() == 0 {
        return;
    }
    let head = [CAP_VERSION_3, 0];
    let none = [0u32; 6];
    // SAFETY: capset with buffers of the sizes it takes.
    unsafe { libc::syscall(libc::SYS_capset, head.as_ptr(), none.as_ptr()) };
}
