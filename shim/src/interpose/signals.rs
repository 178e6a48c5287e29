//! The session's reserved real-time signal (63 unless `MIGSHIM_SIGNAL` said otherwise at
//! `mig run`): `mig` sends it to wake a process's control thread. The app can neither take
//! it nor block it, and sees its own settings for it reported back unchanged: sigaction and
//! signal on it are remembered, not installed; masks have it taken out and put back.
//! Every app handler runs with it blocked, so it never lands inside an app handler that
//! may have interrupted libc.
//!
//! App handlers are installed behind a trampoline that marks the thread as being in a
//! signal handler: there the wrappers do not journal (journaling allocates, and the handler
//! may have interrupted malloc); the table's reconciliation with /proc still sees the fds.
//!
//! The reserved signal's handler runs in signal context. It allocates and starts a thread only when the
//! interrupted point holds no libc lock for sure: outside the text of libc, the loader,
//! the malloc in use and the shim, or stopped at a blocking system call. Otherwise it
//! does nothing and `mig` asks again a moment later.

use crate::control;
use crate::state::{errno, set_errno};
use libc::{c_int, c_void, sigset_t};
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering::Relaxed};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

thread_local! {
    /// Whether the app asked to block the reserved signal in this thread.
    static APP_BLOCKS: Cell<bool> = const { Cell::new(false) };
}

/// What the app installed for the reserved signal (never installed for real).
static APP_ACTION: Mutex<Option<libc::sigaction>> = Mutex::new(None);

/// The app's handler for each signal, called by the trampoline; with its SA_SIGINFO flag.
static APP_HANDLER: [AtomicUsize; 65] = [const { AtomicUsize::new(0) }; 65];
static APP_SIGINFO: [std::sync::atomic::AtomicBool; 65] =
    [const { std::sync::atomic::AtomicBool::new(false) }; 65];

thread_local! {
    static IN_HANDLER: Cell<u32> = const { Cell::new(0) };
    /// How often the reserved signal, and an app handler, ran on this thread (waits.rs
    /// tells by them whose signal cut a wait short).
    static OURS: Cell<u64> = const { Cell::new(0) };
    static APPS: Cell<u64> = const { Cell::new(0) };
}

/// (reserved-signal runs, app-handler runs) on the calling thread so far.
pub fn interruptions() -> (u64, u64) {
    (
        OURS.try_with(Cell::get).unwrap_or(0),
        APPS.try_with(Cell::get).unwrap_or(0),
    )
}

/// Whether the calling thread is running an app signal handler.
pub fn in_handler() -> bool {
    IN_HANDLER.try_with(Cell::get).unwrap_or(0) > 0
}

/// In a fork child: a fork made from an app handler (postgres's postmaster starts its
/// children from its SIGUSR1 and SIGCHLD handlers) leaves the child inside that handler for
/// its whole life, never returning. The child is a new process with one thread, whose
/// malloc locks glibc's fork has made fresh (a handler that interrupted malloc could not
/// have forked: fork takes those locks); it is no longer marked as in a handler, or it
/// would never journal and never reach a safe point to be frozen at; and the reserved
/// signal, which every app handler runs with blocked, is let through again (unless the app
/// asked to block it), or mig could never wake it.
#[unsafe(link_section = ".text.hot.migshim_fork")]
pub fn after_fork() {
    if in_handler() {
        let _ = IN_HANDLER.try_with(|c| c.set(0));
        if !APP_BLOCKS.try_with(Cell::get).unwrap_or(false) {
            hold(reserved(), false);
        }
    }
}

/// Runs the app's handler for `sig`, marked. A handler that leaves by siglongjmp leaves
/// the mark set: the thread then stops journaling (reconciliation still covers it).
extern "C" fn trampoline(sig: c_int, info: *mut libc::siginfo_t, uc: *mut c_void) {
    let Some(i) = usize::try_from(sig).ok().filter(|&i| i < APP_HANDLER.len()) else {
        return;
    };
    let h = APP_HANDLER[i].load(Relaxed);
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        return;
    }
    let _ = IN_HANDLER.try_with(|c| c.set(c.get() + 1));
    let _ = APPS.try_with(|c| c.set(c.get() + 1));
    // SAFETY: h is the handler the app installed for sig, with the signature its
    // SA_SIGINFO flag promised.
    unsafe {
        if APP_SIGINFO[i].load(Relaxed) {
            std::mem::transmute::<usize, extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void)>(
                h,
            )(sig, info, uc);
        } else {
            std::mem::transmute::<usize, extern "C" fn(c_int)>(h)(sig);
        }
    }
    let _ = IN_HANDLER.try_with(|c| c.set(c.get().saturating_sub(1)));
}

const MAX_RANGES: usize = 32;
/// Executable ranges where the interrupted thread may hold a libc lock.
static UNSAFE_TEXT: [(AtomicUsize, AtomicUsize); MAX_RANGES] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; MAX_RANGES];
/// Writable ranges of libc and the loader: a futex there is one of their internal locks.
static LIBC_DATA: [(AtomicUsize, AtomicUsize); MAX_RANGES] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; MAX_RANGES];

fn in_ranges(ranges: &[(AtomicUsize, AtomicUsize)], a: usize) -> bool {
    ranges.iter().any(|(s, e)| {
        let (s, e) = (s.load(Relaxed), e.load(Relaxed));
        s != 0 && a >= s && a < e
    })
}

/// System calls that block without holding any libc lock (numbers as the kernel restarts them).
const BLOCKING: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_pause,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_pselect6,
    libc::SYS_ppoll,
    libc::SYS_restart_syscall,
];

pub fn reserved() -> c_int {
    SIGNAL.load(Relaxed)
}

/// Holds (`true`) or lets through again the reserved signal `sig` for the calling thread.
/// An image being exec'd must not take it: until the new image's shim installs its handler
/// the signal has its default action, which ends the process. So an exec (or spawn) holds
/// it, the mask and the pending signal carry over, and `install` lets it through.
pub fn hold(sig: c_int, hold: bool) {
    if !(libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) {
        return;
    }
    let how = if hold {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // (Raw: the app's mask wrappers hide this signal.)
    super::raw::sigmask(how, 1 << (sig - 1));
}

/// Installs the handler (at library load, when the session is known) and lets the signal
/// through (one held across the exec that made this image is taken now).
pub fn install(sig: c_int) {
    if !(libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) {
        return;
    }
    collect_unsafe_text();
    // SAFETY: a zeroed sigaction with a valid handler and mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigfillset(&mut sa.sa_mask);
        if real_sigaction(sig, &sa, std::ptr::null_mut()) == 0 {
            SIGNAL.store(sig, Relaxed);
            hold(sig, false);
        }
    }
}

/// Signal context: see the module comment.
extern "C" fn on_signal(_sig: c_int, info: *mut libc::siginfo_t, uc: *mut c_void) {
    let _ = OURS.try_with(|c| c.set(c.get() + 1));
    // SAFETY: the kernel hands a valid siginfo and ucontext for an SA_SIGINFO handler.
    let (value, safe) = unsafe { ((*info).si_value().sival_ptr as usize, safe_point(uc.cast())) };
    if !safe {
        return; // mig (or the control thread) asks again in a moment
    }
    let e = errno();
    if value == migrt::wire::WAKE {
        if !control::started() {
            control::start();
        }
    } else {
        // SAFETY: uc is this handler's ucontext, valid while the handler runs.
        unsafe { super::freeze::park(value, uc.cast()) };
    }
    set_errno(e);
}

/// Whether the interrupted point certainly holds no libc or shim lock: outside their code
/// (and not in an app signal handler, which may have interrupted them), or stopped at a
/// blocking system call, or waiting on a futex that is not one of libc's own locks.
unsafe fn safe_point(uc: *const libc::ucontext_t) -> bool {
    if in_handler() || crate::state::busy() {
        return false;
    }
    let rip = (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] as usize;
    let rax = (*uc).uc_mcontext.gregs[libc::REG_RAX as usize];
    let rdi = (*uc).uc_mcontext.gregs[libc::REG_RDI as usize] as usize;
    if !in_ranges(&UNSAFE_TEXT, rip) {
        return true;
    }
    // Stopped at a system call (the text is readable: rip is inside a mapped library).
    // Restarted: rip points at `syscall` and rax holds its number again. Interrupted: rip
    // follows `syscall` and rax holds -EINTR.
    const SYSCALL: [u8; 2] = [0x0f, 0x05];
    let at = std::ptr::read(rip as *const [u8; 2]);
    let after = std::ptr::read((rip - 2) as *const [u8; 2]);
    // A futex wait in a process that never had a second thread cannot be a libc-internal
    // lock wait (nothing to contend with). Otherwise it is the app's (a condition variable,
    // a join, a mutex of its own: the waiter holds no libc lock) unless the futex word is
    // in libc's data or at the head of a malloc arena (arenas are 64 MiB aligned).
    const ARENA: usize = 64 << 20;
    let libc_lock = in_ranges(&LIBC_DATA, rdi) || rdi % ARENA < 4096;
    let blocking = BLOCKING.contains(&rax)
        || (rax == libc::SYS_futex && (crate::state::single_threaded() || !libc_lock));
    (at == SYSCALL && blocking) || (after == SYSCALL && rax == -(libc::EINTR as i64))
}

/// The executable segments of libc, the loader, the shim and whatever provides malloc.
fn collect_unsafe_text() {
    struct Ctx {
        malloc: usize,
        own: usize,
        n: usize,
        d: usize,
    }
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        let ctx = &mut *data.cast::<Ctx>();
        let info = &*info;
        let name = if info.dlpi_name.is_null() {
            &[][..]
        } else {
            std::ffi::CStr::from_ptr(info.dlpi_name).to_bytes()
        };
        let named = |n: &[u8]| name.windows(n.len()).any(|w| w == n);
        let segs = |flag: u32| -> Vec<(usize, usize)> {
            (0..info.dlpi_phnum as usize)
                .map(|i| &*info.dlpi_phdr.add(i))
                .filter(|ph| ph.p_type == libc::PT_LOAD && ph.p_flags & flag != 0)
                .map(|ph| {
                    let s = info.dlpi_addr as usize + ph.p_vaddr as usize;
                    (s, s + ph.p_memsz as usize)
                })
                .collect()
        };
        let text = segs(libc::PF_X);
        let holds = |a: usize| text.iter().any(|&(s, e)| a >= s && a < e);
        let libc = named(b"libc.so") || named(b"ld-linux");
        if libc || holds(ctx.malloc) || holds(ctx.own) {
            for (s, e) in text.iter().copied() {
                if ctx.n < MAX_RANGES {
                    UNSAFE_TEXT[ctx.n].0.store(s, Relaxed);
                    UNSAFE_TEXT[ctx.n].1.store(e, Relaxed);
                    ctx.n += 1;
                }
            }
        }
        if libc {
            for (s, e) in segs(libc::PF_W) {
                if ctx.d < MAX_RANGES {
                    LIBC_DATA[ctx.d].0.store(s, Relaxed);
                    LIBC_DATA[ctx.d].1.store(e, Relaxed);
                    ctx.d += 1;
                }
            }
        }
        0
    }
    // SAFETY: dl_iterate_phdr calls `each` with valid entries; ctx outlives the call.
    unsafe {
        let mut ctx = Ctx {
            malloc: libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) as usize,
            own: collect_unsafe_text as *const () as usize,
            n: 0,
            d: 0,
        };
        libc::dl_iterate_phdr(Some(each), (&raw mut ctx).cast());
    }
}

unsafe fn real_sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    real!(sigaction: fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int)(
        sig, act, old,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    let ours = reserved();
    if ours == 0 {
        return real_sigaction(sig, act, old);
    }
    if sig == ours {
        let mut app = APP_ACTION.lock().unwrap_or_else(|p| p.into_inner());
        if !old.is_null() {
            *old = app.unwrap_or_else(|| std::mem::zeroed());
        }
        if !act.is_null() {
            *app = Some(*act);
        }
        return 0;
    }
    let slot = usize::try_from(sig).ok().filter(|&i| i < APP_HANDLER.len());
    let before = slot.map(|i| (APP_HANDLER[i].load(Relaxed), APP_SIGINFO[i].load(Relaxed)));
    let r = if act.is_null() {
        real_sigaction(sig, act, old)
    } else {
        let mut copy = *act;
        libc::sigaddset(&mut copy.sa_mask, ours);
        let h = copy.sa_sigaction;
        // SA_RESETHAND handlers run once, as the kernel would leave them: not behind the
        // trampoline (which could not follow the reset).
        let wrap =
            h != libc::SIG_DFL && h != libc::SIG_IGN && copy.sa_flags & libc::SA_RESETHAND == 0;
        if let (Some(i), true) = (slot, wrap) {
            APP_HANDLER[i].store(h, Relaxed);
            APP_SIGINFO[i].store(copy.sa_flags & libc::SA_SIGINFO != 0, Relaxed);
            copy.sa_sigaction = trampoline as *const () as usize;
            copy.sa_flags |= libc::SA_SIGINFO;
        }
        let r = real_sigaction(sig, &copy, old);
        if r != 0
            && let (Some(i), Some((h, si))) = (slot, before)
        {
            APP_HANDLER[i].store(h, Relaxed);
            APP_SIGINFO[i].store(si, Relaxed);
        }
        r
    };
    if r == 0 && !old.is_null() {
        libc::sigdelset(&mut (*old).sa_mask, ours);
        // Report the app's own handler and flag, not the trampoline.
        if let (Some((h, si)), true) = (
            before,
            (*old).sa_sigaction == trampoline as *const () as usize,
        ) {
            (*old).sa_sigaction = h;
            if !si {
                (*old).sa_flags &= !libc::SA_SIGINFO;
            }
        }
    }
    r
}

/// signal()/bsd_signal(): BSD semantics, as glibc gives them, through the wrapper above.
unsafe fn install_simple(
    sig: c_int,
    handler: libc::sighandler_t,
    flags: c_int,
) -> libc::sighandler_t {
    let mut sa: libc::sigaction = std::mem::zeroed();
    sa.sa_sigaction = handler;
    sa.sa_flags = flags;
    libc::sigemptyset(&mut sa.sa_mask);
    if flags & libc::SA_NODEFER == 0 {
        libc::sigaddset(&mut sa.sa_mask, sig);
    }
    let mut old: libc::sigaction = std::mem::zeroed();
    if sigaction(sig, &sa, &mut old) < 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    install_simple(sig, handler, libc::SA_RESTART)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    install_simple(sig, handler, libc::SA_RESTART)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sysv_signal(
    sig: c_int,
    handler: libc::sighandler_t,
) -> libc::sighandler_t {
    install_simple(sig, handler, libc::SA_RESETHAND | libc::SA_NODEFER)
}

/// A mask call with the reserved signal taken out of what is blocked, and the app's own
/// wish for it reported back in `old`.
unsafe fn masked(
    how: c_int,
    set: *const sigset_t,
    old: *mut sigset_t,
    real: impl FnOnce(*const sigset_t) -> c_int,
    ok: c_int,
) -> c_int {
    let ours = reserved();
    if ours == 0 {
        return real(set);
    }
    let mut copy: sigset_t = if set.is_null() {
        std::mem::zeroed()
    } else {
        *set
    };
    libc::sigdelset(&mut copy, ours);
    let set2 = if set.is_null() || how == libc::SIG_UNBLOCK {
        set
    } else {
        &copy
    };
    let before = APP_BLOCKS.try_with(Cell::get).unwrap_or(false);
    let r = real(set2);
    if r != ok {
        return r;
    }
    if !old.is_null() {
        if before {
            libc::sigaddset(old, ours);
        } else {
            libc::sigdelset(old, ours);
        }
    }
    if !set.is_null() {
        let asked = libc::sigismember(set, ours) == 1;
        let now = match how {
            libc::SIG_BLOCK => before || asked,
            libc::SIG_UNBLOCK => before && !asked,
            _ => asked,
        };
        let _ = APP_BLOCKS.try_with(|b| b.set(now));
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const sigset_t,
    old: *mut sigset_t,
) -> c_int {
    let f = real!(sigprocmask: fn(c_int, *const sigset_t, *mut sigset_t) -> c_int);
    masked(how, set, old, |s| f(how, s, old), 0)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const sigset_t,
    old: *mut sigset_t,
) -> c_int {
    let f = real!(pthread_sigmask: fn(c_int, *const sigset_t, *mut sigset_t) -> c_int);
    masked(how, set, old, |s| f(how, s, old), 0)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigsuspend(mask: *const sigset_t) -> c_int {
    let f = real!(sigsuspend: fn(*const sigset_t) -> c_int);
    let ours = reserved();
    if ours == 0 || mask.is_null() {
        return f(mask);
    }
    let mut copy = *mask;
    libc::sigdelset(&mut copy, ours);
    f(&copy)
}
