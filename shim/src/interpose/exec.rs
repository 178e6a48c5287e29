//! exec and spawn: the session follows. The environment of the new image gets the shim and
//! the session back if the app dropped them, and an exec'ing process leaves its table in
//! the session directory for the image that replaces it (same process, same vpid).

use super::process::to_virtual;
use crate::state::{self, errno, set_errno, shim, vpid};
use libc::{c_char, c_int, pid_t};
use std::ffi::{CStr, CString};

type Argv = *const *const c_char;

unsafe extern "C" {
    static environ: Argv;
}

/// An environment with the session's LD_PRELOAD and MIGSHIM_SESSION in it.
struct Env {
    _owned: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

/// `envp` (a NULL-terminated array, libc's contract) fixed up, or None when it already
/// carries the session. `more`: entries to add ("MIGSHIM_CARRY=..."); the held table's fd
/// is added when there is one (creds.rs). Earlier values of those are dropped.
unsafe fn session_env(envp: Argv, more: Option<CString>) -> Option<Env> {
    let s = shim()?;
    let session = s.place().env_session.clone();
    let ours = s.env_preload.to_bytes();
    let lib = &ours[b"LD_PRELOAD=".len()..];
    let mut owned: Vec<CString> = more.into_iter().chain(crate::creds::table_env()).collect();
    let mut entries = Vec::new();
    let (mut preload, mut session_ok, mut stale) = (None, false, false);
    let mut p = envp;
    while !p.is_null() && !(*p).is_null() {
        let e = CStr::from_ptr(*p).to_bytes();
        if let Some(v) = e.strip_prefix(b"LD_PRELOAD=") {
            preload = Some(v);
        } else if e.starts_with(b"MIGSHIM_SESSION=") {
            session_ok = e == session.to_bytes();
        } else if [state::ENV_CARRY, crate::creds::ENV_TABLE_FD]
            .iter()
            .any(|k| {
                e.strip_prefix(k.as_bytes())
                    .is_some_and(|r| r.first() == Some(&b'='))
            })
        {
            stale = true;
        } else {
            entries.push(*p);
        }
        p = p.add(1);
    }
    let has_lib = preload.is_some_and(|v| v.split(|&c| c == b':' || c == b' ').any(|x| x == lib));
    if has_lib && session_ok && owned.is_empty() && !stale {
        return None;
    }
    match preload {
        Some(v) if has_lib => owned.extend(CString::new([b"LD_PRELOAD=", v].concat())),
        Some(v) if !v.is_empty() => owned.extend(CString::new([ours, b" ", v].concat())),
        _ => owned.push(s.env_preload.clone()),
    }
    owned.push(session);
    entries.extend(owned.iter().map(|c| c.as_ptr()));
    entries.push(std::ptr::null());
    Some(Env {
        _owned: owned,
        ptrs: entries,
    })
}

/// Runs an exec call with the session's environment and the table carried; on failure the
/// carried table is dropped.
unsafe fn exec_with(envp: Argv, f: impl FnOnce(Argv) -> c_int) -> c_int {
    if shim().is_none() {
        return f(envp);
    }
    let (carried, entry) = state::carry_across_exec().unzip();
    let env = session_env(envp, entry);
    let sig = super::signals::reserved();
    super::signals::hold(sig, true);
    let r = f(env.as_ref().map_or(envp, |e| e.ptrs.as_ptr()));
    super::signals::hold(sig, false);
    let e = errno();
    if let Some(fd) = carried {
        super::close_real(fd);
    }
    set_errno(e);
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(path: *const c_char, argv: Argv, envp: Argv) -> c_int {
    exec_with(envp, |env| {
        real!(execve: fn(*const c_char, Argv, Argv) -> c_int)(path, argv, env)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execv(path: *const c_char, argv: Argv) -> c_int {
    execve(path, argv, environ)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvpe(file: *const c_char, argv: Argv, envp: Argv) -> c_int {
    exec_with(envp, |env| {
        real!(execvpe: fn(*const c_char, Argv, Argv) -> c_int)(file, argv, env)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: Argv) -> c_int {
    execvpe(file, argv, environ)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fexecve(fd: c_int, argv: Argv, envp: Argv) -> c_int {
    exec_with(envp, |env| {
        real!(fexecve: fn(c_int, Argv, Argv) -> c_int)(fd, argv, env)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execveat(
    dirfd: c_int,
    path: *const c_char,
    argv: Argv,
    envp: Argv,
    flags: c_int,
) -> c_int {
    exec_with(envp, |env| {
        real!(execveat: fn(c_int, *const c_char, Argv, Argv, c_int) -> c_int)(
            dirfd, path, argv, env, flags,
        )
    })
}

// execl, execlp, execle take a variable argument list: they jump, registers and stack
// untouched, to C functions (variadic.c) that collect the arguments and call execv,
// execvp or execve above.
unsafe extern "C" {
    fn migshim_execl();
    fn migshim_execlp();
    fn migshim_execle();
}

#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execl() {
    core::arch::naked_asm!("jmp {}", sym migshim_execl)
}

#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execlp() {
    core::arch::naked_asm!("jmp {}", sym migshim_execlp)
}

#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execle() {
    core::arch::naked_asm!("jmp {}", sym migshim_execle)
}

type SpawnFn = unsafe extern "C" fn(
    *mut pid_t,
    *const c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    Argv,
    Argv,
) -> c_int;

/// The child joins the session from its own side at start; here the parent learns its vpid
/// (both land on the same slot, whichever registers first).
unsafe fn spawned(
    real: SpawnFn,
    pid: *mut pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: Argv,
    envp: Argv,
) -> c_int {
    let env = session_env(envp, None);
    // The child starts with the reserved signal held (see signals::hold): it inherits the
    // caller's mask, or takes the one `attr` sets, with the signal added to a copy.
    let sig = super::signals::reserved();
    let mut own_attr = None;
    let mut flags: libc::c_short = 0;
    if sig != 0
        && !attr.is_null()
        && libc::posix_spawnattr_getflags(attr, &mut flags) == 0
        && flags as c_int & libc::POSIX_SPAWN_SETSIGMASK != 0
    {
        let mut copy = *attr;
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::posix_spawnattr_getsigmask(&copy, &mut mask);
        libc::sigaddset(&mut mask, sig);
        libc::posix_spawnattr_setsigmask(&mut copy, &mask);
        own_attr = Some(copy);
    }
    let attr = own_attr.as_ref().map_or(attr, |a| a as *const _);
    super::signals::hold(sig, true);
    let r = real(
        pid,
        path,
        fa,
        attr,
        argv,
        env.as_ref().map_or(envp, |e| e.ptrs.as_ptr()),
    );
    super::signals::hold(sig, false);
    if r == 0
        && !pid.is_null()
        && let Some(s) = shim()
    {
        *pid = s
            .table
            .register_child(*pid, vpid())
            .unwrap_or_else(|_| to_virtual(*pid));
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: Argv,
    envp: Argv,
) -> c_int {
    spawned(
        real!(posix_spawn: fn(*mut pid_t, *const c_char, *const libc::posix_spawn_file_actions_t, *const libc::posix_spawnattr_t, Argv, Argv) -> c_int),
        pid,
        path,
        fa,
        attr,
        argv,
        envp,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut pid_t,
    file: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: Argv,
    envp: Argv,
) -> c_int {
    spawned(
        real!(posix_spawnp: fn(*mut pid_t, *const c_char, *const libc::posix_spawn_file_actions_t, *const libc::posix_spawnattr_t, Argv, Argv) -> c_int),
        pid,
        file,
        fa,
        attr,
        argv,
        envp,
    )
}
