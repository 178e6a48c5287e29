//! Process and thread identity: getpid and friends answer virtual ids; every call that
//! hands a pid, tid, pgid or sid to the kernel translates it to the real one, and every
//! answer that carries one translates it back. Ids outside the session pass unchanged (they
//! cannot collide with virtual ones, see migrt::sessiontable).

use crate::state::{self, shim, vpid};
use libc::{c_int, c_long, c_void, pid_t};
use migrt::sessiontable::{State, is_virtual};
use std::sync::atomic::{AtomicI32, Ordering::Relaxed};

pub fn real_pid() -> pid_t {
    // SAFETY: no arguments.
    unsafe { real!(getpid: fn() -> pid_t)() }
}

pub fn real_ppid() -> pid_t {
    // SAFETY: no arguments.
    unsafe { real!(getppid: fn() -> pid_t)() }
}

pub fn real_tid() -> pid_t {
    // SAFETY: no arguments.
    unsafe { real!(gettid: fn() -> pid_t)() }
}

pub fn real_pgid_sid() -> (pid_t, pid_t) {
    // SAFETY: 0 = the calling process.
    unsafe {
        (
            real!(getpgid: fn(pid_t) -> pid_t)(0),
            real!(getsid: fn(pid_t) -> pid_t)(0),
        )
    }
}

/// A virtual id as the kernel knows it (unknown virtual ids stay as they are: the kernel
/// answers ESRCH, since they are above any real pid).
pub fn to_real(id: pid_t) -> pid_t {
    match shim() {
        Some(s) if is_virtual(id) => s.table.real_of(id).unwrap_or(id),
        _ => id,
    }
}

/// A real id as the app sees it.
pub fn to_virtual(id: pid_t) -> pid_t {
    match shim() {
        Some(s) if id > 0 => s.table.vid_of(id).unwrap_or(id),
        _ => id,
    }
}

/// kill/waitpid style: >0 a process, <-1 a process group, 0 and -1 as they are.
fn pid_arg(pid: pid_t) -> pid_t {
    if pid > 0 {
        to_real(pid)
    } else if pid < -1 {
        -to_real(-pid)
    } else {
        pid
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn getpid() -> pid_t {
    match vpid() {
        0 => real_pid(),
        v => v,
    }
}

static PPID_REAL: AtomicI32 = AtomicI32::new(0);
static PPID_VIRTUAL: AtomicI32 = AtomicI32::new(0);

/// The current parent: virtual when it is in the session, else its real pid (so a process
/// orphaned to init still sees 1).
#[unsafe(no_mangle)]
pub extern "C" fn getppid() -> pid_t {
    let real = real_ppid();
    if shim().is_none() {
        return real;
    }
    if PPID_REAL.load(Relaxed) == real {
        return PPID_VIRTUAL.load(Relaxed);
    }
    let v = to_virtual(real);
    PPID_VIRTUAL.store(v, Relaxed);
    PPID_REAL.store(real, Relaxed);
    v
}

#[unsafe(no_mangle)]
pub extern "C" fn gettid() -> pid_t {
    state::vtid().unwrap_or_else(real_tid)
}

// ---- fork ------------------------------------------------------------------------------

/// The child's vpid was reserved by the prepare handler (below) and is bound here.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hot.migshim_fork")]
pub unsafe extern "C" fn fork() -> pid_t {
    let pid = real!(fork: fn() -> pid_t)();
    match crate::state::forked_child(pid) {
        v if v > 0 && pid > 0 => v,
        _ => pid,
    }
}

/// vfork becomes fork: a vfork child shares its parent's stack, and a wrapper must not
/// return into a frame the child could clobber.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vfork() -> pid_t {
    fork()
}

/// pthread_atfork handlers, registered at init (so ours run last before and first after
/// the fork): the journal is locked across the fork, and the child takes its own vpid
/// before any app handler can ask for it. Forks inside libc (daemon()) are covered too.
pub fn register_atfork() {
    unsafe extern "C" fn prepare() {
        crate::state::fork_prepare();
    }
    unsafe extern "C" fn parent() {
        crate::state::fork_release();
    }
    #[unsafe(link_section = ".text.hot.migshim_fork")]
    unsafe extern "C" fn child() {
        crate::state::fork_release();
        crate::state::after_fork_child();
        if PPID_REAL.load(Relaxed) != 0 {
            PPID_REAL.store(0, Relaxed);
        }
    }
    // SAFETY: registering plain functions that live as long as the library.
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
}

// ---- wait ------------------------------------------------------------------------------

/// A child the kernel reported: mark it reaped (when it ended) and answer its vpid.
fn reported(real: pid_t, status: c_int) -> pid_t {
    let Some(s) = shim() else { return real };
    if real <= 0 {
        return real;
    }
    match s.table.vid_of(real) {
        Some(v) => {
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                reap(v, status);
            }
            v
        }
        None => real,
    }
}

fn reap(vpid: pid_t, status: c_int) {
    if let Some(s) = shim() {
        s.table.set_state(vpid, State::Reaped, status);
    }
}

/// A wait for a child that a restore gave a new real pid: the kernel restarts the
/// interrupted call with the old one and answers ECHILD; translated again, it goes on.
/// So does one for a child that had ended unwaited (zombies.rs), now answered here.
fn rewait(pid: pid_t, tried: pid_t, r: isize) -> bool {
    r == -1
        && state::errno() == libc::ECHILD
        && (pid_arg(pid) != tried || crate::zombies::take(pid, true).is_some())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait4(
    pid: pid_t,
    status: *mut c_int,
    options: c_int,
    ru: *mut libc::rusage,
) -> pid_t {
    let real = real!(wait4: fn(pid_t, *mut c_int, c_int, *mut libc::rusage) -> pid_t);
    let mut st = 0;
    let r = loop {
        if let Some((v, st)) = crate::zombies::take(pid, false) {
            if !status.is_null() {
                *status = st;
            }
            if !ru.is_null() {
                *ru = std::mem::zeroed();
            }
            reap(v, st);
            return v;
        }
        let tried = pid_arg(pid);
        let r = real(tried, &mut st, options, ru);
        if !rewait(pid, tried, r as isize) {
            break r;
        }
    };
    if r > 0 && !status.is_null() {
        *status = st;
    }
    reported(r, st)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn waitpid(pid: pid_t, status: *mut c_int, options: c_int) -> pid_t {
    wait4(pid, status, options, std::ptr::null_mut())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait(status: *mut c_int) -> pid_t {
    wait4(-1, status, 0, std::ptr::null_mut())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait3(status: *mut c_int, options: c_int, ru: *mut libc::rusage) -> pid_t {
    wait4(-1, status, options, ru)
}

/// In `siginfo_t` for SIGCHLD, si_pid sits at byte 16 and si_status at byte 24 (x86-64).
const SI_PID: usize = 16;
const SI_STATUS: usize = 24;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn waitid(
    idtype: libc::idtype_t,
    id: libc::id_t,
    info: *mut libc::siginfo_t,
    options: c_int,
) -> c_int {
    let translate = || match idtype {
        libc::P_PID | libc::P_PGID => to_real(id as pid_t) as libc::id_t,
        _ => id,
    };
    let f = real!(waitid: fn(libc::idtype_t, libc::id_t, *mut libc::siginfo_t, c_int) -> c_int);
    // (As waitpid takes it: a process group is the kernel's to answer.)
    let pid = match idtype {
        libc::P_ALL => -1,
        libc::P_PID => id as pid_t,
        _ => -2,
    };
    let keep = options & libc::WNOWAIT != 0;
    let r = loop {
        let noted = (options & libc::WEXITED != 0)
            .then(|| crate::zombies::take(pid, keep))
            .flatten();
        if let Some((v, st)) = noted {
            if !info.is_null() {
                answer_ended(info, v, st);
            }
            if !keep {
                reap(v, st);
            }
            return 0;
        }
        let tried = translate();
        let r = f(idtype, tried, info, options);
        let noted = || options & libc::WEXITED != 0 && crate::zombies::take(pid, true).is_some();
        if !(r == -1 && state::errno() == libc::ECHILD && (translate() != tried || noted())) {
            break r;
        }
    };
    if r == 0 && !info.is_null() && shim().is_some() {
        // Reading and rewriting si_pid in the caller's siginfo buffer (filled by the kernel).
        let pid_ptr = info.cast::<u8>().add(SI_PID).cast::<pid_t>();
        let real = *pid_ptr;
        if real > 0 {
            let code = (*info).si_code;
            let ended = matches!(code, libc::CLD_EXITED | libc::CLD_KILLED | libc::CLD_DUMPED);
            let status = *info.cast::<u8>().add(SI_STATUS).cast::<c_int>();
            let wstatus = if code == libc::CLD_EXITED {
                (status & 0xff) << 8
            } else {
                status & 0x7f
            };
            *pid_ptr = if ended && options & libc::WNOWAIT == 0 {
                reported(real, wstatus)
            } else {
                to_virtual(real)
            };
        }
    }
    r
}

/// Fills `info` as waitid does for child `vpid` that ended with wait status `status`.
unsafe fn answer_ended(info: *mut libc::siginfo_t, vpid: pid_t, status: c_int) {
    // SAFETY: the caller's siginfo buffer; the fields at their x86-64 offsets.
    unsafe {
        *info = std::mem::zeroed();
        (*info).si_signo = libc::SIGCHLD;
        let (code, value) = match (libc::WIFEXITED(status), libc::WCOREDUMP(status)) {
            (true, _) => (libc::CLD_EXITED, libc::WEXITSTATUS(status)),
            (false, true) => (libc::CLD_DUMPED, libc::WTERMSIG(status)),
            (false, false) => (libc::CLD_KILLED, libc::WTERMSIG(status)),
        };
        (*info).si_code = code;
        *info.cast::<u8>().add(SI_PID).cast::<pid_t>() = vpid;
        *info.cast::<u8>().add(SI_STATUS).cast::<c_int>() = value;
    }
}

// ---- signals ---------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn kill(pid: pid_t, sig: c_int) -> c_int {
    real!(kill: fn(pid_t, c_int) -> c_int)(pid_arg(pid), sig)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn killpg(pgrp: pid_t, sig: c_int) -> c_int {
    real!(killpg: fn(pid_t, c_int) -> c_int)(to_real(pgrp), sig)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn tgkill(tgid: pid_t, tid: pid_t, sig: c_int) -> c_int {
    real!(tgkill: fn(pid_t, pid_t, c_int) -> c_int)(to_real(tgid), to_real(tid), sig)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigqueue(pid: pid_t, sig: c_int, value: *mut c_void) -> c_int {
    real!(sigqueue: fn(pid_t, c_int, *mut c_void) -> c_int)(to_real(pid), sig, value)
}

// ---- process groups and sessions -------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn setpgid(pid: pid_t, pgid: pid_t) -> c_int {
    real!(setpgid: fn(pid_t, pid_t) -> c_int)(to_real(pid), to_real(pgid))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpgid(pid: pid_t) -> pid_t {
    to_virtual(real!(getpgid: fn(pid_t) -> pid_t)(to_real(pid)))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpgrp() -> pid_t {
    to_virtual(real!(getpgrp: fn() -> pid_t)())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsid(pid: pid_t) -> pid_t {
    to_virtual(real!(getsid: fn(pid_t) -> pid_t)(to_real(pid)))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn setsid() -> pid_t {
    to_virtual(real!(setsid: fn() -> pid_t)())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn tcgetpgrp(fd: c_int) -> pid_t {
    to_virtual(real!(tcgetpgrp: fn(c_int) -> pid_t)(fd))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn tcsetpgrp(fd: c_int, pgrp: pid_t) -> c_int {
    real!(tcsetpgrp: fn(c_int, pid_t) -> c_int)(fd, to_real(pgrp))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn tcgetsid(fd: c_int) -> pid_t {
    to_virtual(real!(tcgetsid: fn(c_int) -> pid_t)(fd))
}

// ---- other calls that name a pid or tid ------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sched_setaffinity(
    pid: pid_t,
    size: usize,
    mask: *const libc::cpu_set_t,
) -> c_int {
    real!(sched_setaffinity: fn(pid_t, usize, *const libc::cpu_set_t) -> c_int)(
        to_real(pid),
        size,
        mask,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sched_getaffinity(
    pid: pid_t,
    size: usize,
    mask: *mut libc::cpu_set_t,
) -> c_int {
    real!(sched_getaffinity: fn(pid_t, usize, *mut libc::cpu_set_t) -> c_int)(
        to_real(pid),
        size,
        mask,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sched_setscheduler(
    pid: pid_t,
    policy: c_int,
    p: *const libc::sched_param,
) -> c_int {
    real!(sched_setscheduler: fn(pid_t, c_int, *const libc::sched_param) -> c_int)(
        to_real(pid),
        policy,
        p,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sched_getscheduler(pid: pid_t) -> c_int {
    real!(sched_getscheduler: fn(pid_t) -> c_int)(to_real(pid))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sched_setparam(pid: pid_t, p: *const libc::sched_param) -> c_int {
    real!(sched_setparam: fn(pid_t, *const libc::sched_param) -> c_int)(to_real(pid), p)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sched_getparam(pid: pid_t, p: *mut libc::sched_param) -> c_int {
    real!(sched_getparam: fn(pid_t, *mut libc::sched_param) -> c_int)(to_real(pid), p)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn prlimit(
    pid: pid_t,
    res: c_int,
    new: *const libc::rlimit,
    old: *mut libc::rlimit,
) -> c_int {
    real!(prlimit: fn(pid_t, c_int, *const libc::rlimit, *mut libc::rlimit) -> c_int)(
        to_real(pid),
        res,
        new,
        old,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn prlimit64(
    pid: pid_t,
    res: c_int,
    new: *const libc::rlimit64,
    old: *mut libc::rlimit64,
) -> c_int {
    real!(prlimit64: fn(pid_t, c_int, *const libc::rlimit64, *mut libc::rlimit64) -> c_int)(
        to_real(pid),
        res,
        new,
        old,
    )
}

fn who_arg(which: c_int, who: libc::id_t) -> libc::id_t {
    match which as u32 {
        libc::PRIO_PROCESS | libc::PRIO_PGRP => to_real(who as pid_t) as libc::id_t,
        _ => who,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpriority(which: c_int, who: libc::id_t) -> c_int {
    real!(getpriority: fn(c_int, libc::id_t) -> c_int)(which, who_arg(which, who))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn setpriority(which: c_int, who: libc::id_t, prio: c_int) -> c_int {
    real!(setpriority: fn(c_int, libc::id_t, c_int) -> c_int)(which, who_arg(which, who), prio)
}

// A change of uid: the session's table is held first (creds.rs).

#[unsafe(no_mangle)]
pub unsafe extern "C" fn setuid(uid: libc::uid_t) -> c_int {
    crate::creds::hold_table();
    real!(setuid: fn(libc::uid_t) -> c_int)(uid)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn seteuid(uid: libc::uid_t) -> c_int {
    crate::creds::hold_table();
    real!(seteuid: fn(libc::uid_t) -> c_int)(uid)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn setreuid(r: libc::uid_t, e: libc::uid_t) -> c_int {
    crate::creds::hold_table();
    real!(setreuid: fn(libc::uid_t, libc::uid_t) -> c_int)(r, e)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn setresuid(r: libc::uid_t, e: libc::uid_t, s: libc::uid_t) -> c_int {
    crate::creds::hold_table();
    real!(setresuid: fn(libc::uid_t, libc::uid_t, libc::uid_t) -> c_int)(r, e, s)
}

/// capget/capset name a thread in their header (`{ u32 version; i32 pid }`): libcap and
/// libcap-ng put getpid() there, which the kernel must get as the real one.
unsafe fn caps(n: c_long, hdr: *mut [i32; 2], data: c_long) -> c_long {
    if hdr.is_null() {
        return raw_syscall(n, 0, data, 0, 0, 0, 0);
    }
    let mut h = std::ptr::read(hdr);
    h[1] = to_real(h[1]);
    let r = raw_syscall(n, (&raw mut h) as c_long, data, 0, 0, 0, 0);
    // The kernel writes back the version it prefers when asked for one it does not know.
    (*hdr)[0] = h[0];
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn capget(hdr: *mut [i32; 2], data: *mut c_void) -> c_int {
    caps(libc::SYS_capget, hdr, data as c_long) as c_int
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn capset(hdr: *mut [i32; 2], data: *const c_void) -> c_int {
    caps(libc::SYS_capset, hdr, data as c_long) as c_int
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pidfd_open(pid: pid_t, flags: libc::c_uint) -> c_int {
    real!(pidfd_open: fn(pid_t, libc::c_uint) -> c_int)(to_real(pid), flags)
}

/// In `struct sigevent`, the thread id of SIGEV_THREAD_ID sits at byte 16 (x86-64).
pub(super) const SIGEV_TID: usize = 16;

/// A SIGEV_THREAD_ID timer names a thread: the kernel must get the real tid (vim 9 and
/// glibc's SIGEV_THREAD timers use this).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn timer_create(
    clock: libc::clockid_t,
    sev: *mut libc::sigevent,
    timer: *mut libc::timer_t,
) -> c_int {
    let f =
        real!(timer_create: fn(libc::clockid_t, *mut libc::sigevent, *mut libc::timer_t) -> c_int);
    if !sev.is_null() && (*sev).sigev_notify == libc::SIGEV_THREAD {
        return super::timers::create_thread_timer(f, clock, sev, timer);
    }
    if sev.is_null() || (*sev).sigev_notify != libc::SIGEV_THREAD_ID {
        let r = f(clock, sev, timer);
        if r == 0 {
            super::timers::note(*timer, clock, sev);
        }
        return r;
    }
    // A copy of the caller's sigevent with the tid translated.
    let mut copy = std::ptr::read(sev);
    let tid = (&raw mut copy).cast::<u8>().add(SIGEV_TID).cast::<pid_t>();
    *tid = to_real(*tid);
    let r = f(clock, &mut copy, timer);
    if r == 0 {
        super::timers::note(*timer, clock, &copy);
    }
    r
}

/// Straight to exit_group, as glibc's _exit does: a fork child's exit path then touches no
/// further page of libc or of the shim's symbol cache (each costs the child a fault).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hot.migshim_fork")]
pub unsafe extern "C" fn _exit(status: c_int) -> ! {
    state::leave();
    super::raw::exit_group(status)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn _Exit(status: c_int) -> ! {
    _exit(status)
}

/// `syscall()` for the id calls; everything else goes through untouched.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn syscall(
    n: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    let pid = |a: c_long| a as pid_t;
    match n {
        libc::SYS_getpid => getpid() as c_long,
        libc::SYS_getppid => getppid() as c_long,
        libc::SYS_gettid => gettid() as c_long,
        libc::SYS_kill => kill(pid(a1), a2 as c_int) as c_long,
        libc::SYS_tgkill => tgkill(pid(a1), pid(a2), a3 as c_int) as c_long,
        libc::SYS_getpgid => getpgid(pid(a1)) as c_long,
        libc::SYS_getsid => getsid(pid(a1)) as c_long,
        libc::SYS_setpgid => setpgid(pid(a1), pid(a2)) as c_long,
        libc::SYS_tkill
        | libc::SYS_pidfd_open
        | libc::SYS_sched_getaffinity
        | libc::SYS_sched_setaffinity => {
            raw_syscall(n, to_real(pid(a1)) as c_long, a2, a3, a4, a5, a6)
        }
        libc::SYS_capget | libc::SYS_capset => caps(n, a1 as *mut [i32; 2], a2),
        libc::SYS_wait4 => wait4(
            pid(a1),
            a2 as *mut c_int,
            a3 as c_int,
            a4 as *mut libc::rusage,
        ) as c_long,
        _ => raw_syscall(n, a1, a2, a3, a4, a5, a6),
    }
}

unsafe fn raw_syscall(
    n: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    real!(syscall: fn(c_long, c_long, c_long, c_long, c_long, c_long, c_long) -> c_long)(
        n, a1, a2, a3, a4, a5, a6,
    )
}
