//! Freezing the app's threads for a checkpoint.
//!
//! The control thread sends each app thread the reserved signal with the value
//! `FREEZE + slot`. The handler (signals.rs) parks the thread here — only at a point where
//! it holds no libc or shim lock, else it returns and is asked again a millisecond later —
//! after noting where the kernel saved its registers (the `ucontext` on its own stack), its
//! TLS base and its alternate signal stack. It then sleeps on a futex until the control
//! thread thaws the process. Because no parked thread holds a lock the control thread
//! could need, the control thread may allocate and do I/O freely while the app is frozen.
//!
//! The parking side runs in signal context: no allocation, no locks, raw system calls only.

use super::raw::syscall6;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::time::{Duration, Instant};

/// sigqueue values `FREEZE..FREEZE + MAX_THREADS` ask a thread to park in that slot.
pub const FREEZE: usize = 0x6d69_6700_0000;
pub const MAX_THREADS: usize = 4096;

struct Slot {
    /// 0 free, 1 asked, 2 parked
    state: AtomicU32,
    ucontext: AtomicUsize,
    fs_base: AtomicU64,
    alt_base: AtomicU64,
    alt_size: AtomicU64,
    alt_flags: AtomicI32,
}

static SLOTS: [Slot; MAX_THREADS] = [const {
    Slot {
        state: AtomicU32::new(0),
        ucontext: AtomicUsize::new(0),
        fs_base: AtomicU64::new(0),
        alt_base: AtomicU64::new(0),
        alt_size: AtomicU64::new(0),
        alt_flags: AtomicI32::new(0),
    }
}; MAX_THREADS];

/// The futex word parked threads sleep on; bumped to thaw them.
static GENERATION: AtomicU32 = AtomicU32::new(0);
static PARKED: AtomicU32 = AtomicU32::new(0);

/// What the dump needs of one parked thread.
pub struct Parked {
    pub tid: i32,
    pub ucontext: *const libc::ucontext_t,
    pub fs_base: u64,
    pub altstack: (u64, u64, i32),
}

const ARCH_GET_FS: usize = 0x1003;

unsafe fn futex(word: &AtomicU32, op: libc::c_int, val: u32) {
    syscall6(
        libc::SYS_futex,
        word.as_ptr() as usize,
        (op | libc::FUTEX_PRIVATE_FLAG) as usize,
        val as usize,
        0,
        0,
        0,
    );
}

/// Signal context: park the calling thread in slot `value - FREEZE` until thawed.
pub unsafe fn park(value: usize, uc: *const libc::ucontext_t) {
    let Some(i) = value.checked_sub(FREEZE).filter(|&i| i < MAX_THREADS) else {
        return;
    };
    let slot = &SLOTS[i];
    if slot.state.load(Acquire) != 1 {
        return; // stale request
    }
    let generation = GENERATION.load(Acquire);
    let mut fs: u64 = 0;
    syscall6(
        libc::SYS_arch_prctl,
        ARCH_GET_FS,
        (&raw mut fs) as usize,
        0,
        0,
        0,
        0,
    );
    let mut ss: libc::stack_t = std::mem::zeroed();
    syscall6(libc::SYS_sigaltstack, 0, (&raw mut ss) as usize, 0, 0, 0, 0);
    slot.ucontext.store(uc as usize, Relaxed);
    slot.fs_base.store(fs, Relaxed);
    slot.alt_base.store(ss.ss_sp as u64, Relaxed);
    slot.alt_size.store(ss.ss_size as u64, Relaxed);
    slot.alt_flags.store(ss.ss_flags, Relaxed);
    slot.state.store(2, Release);
    PARKED.fetch_add(1, AcqRel);
    futex(&PARKED, libc::FUTEX_WAKE, 1);
    while GENERATION.load(Acquire) == generation {
        futex(&GENERATION, libc::FUTEX_WAIT, generation);
    }
    slot.state.store(0, Release);
}

/// Sends the freeze request to thread `tid` for slot `i` (SI_QUEUE with the value).
fn ask(sig: i32, tid: i32, i: usize) {
    // SAFETY: rt_tgsigqueueinfo with a siginfo filled as sigqueue would.
    unsafe {
        let mut si: libc::siginfo_t = std::mem::zeroed();
        si.si_signo = sig;
        si.si_code = libc::SI_QUEUE;
        let p = (&raw mut si).cast::<u8>().add(16);
        let pid = super::real_pid();
        *p.cast::<i32>() = pid;
        *p.add(4).cast::<u32>() = libc::getuid();
        *p.add(8).cast::<usize>() = FREEZE + i;
        syscall6(
            libc::SYS_rt_tgsigqueueinfo,
            pid as usize,
            tid as usize,
            sig as usize,
            (&raw const si) as usize,
            0,
            0,
        );
    }
}

/// Whether thread `tid` of this process has signal `sig` blocked.
fn blocks_signal(tid: i32, sig: i32) -> bool {
    migrt::procfs::task_sigmask(tid).is_some_and(|m| m & (1u64 << (sig - 1)) != 0)
}

/// Freezes every thread of the process but the caller (the control thread). Threads
/// created meanwhile are caught by listing the tasks again until the list is stable.
pub fn freeze(sig: i32, deadline: Duration) -> Result<Vec<Parked>, String> {
    let me = super::real_tid();
    let t0 = Instant::now();
    let mut asked: Vec<(i32, usize)> = Vec::new();
    // Threads seen with the freeze signal blocked, and since when (all along).
    let mut blocking: Vec<(i32, Instant)> = Vec::new();
    loop {
        let tasks: Vec<i32> = migrt::procfs::list_tasks("self")
            .into_iter()
            .filter(|&t| t != me)
            .collect();
        for &t in &tasks {
            if !asked.iter().any(|&(a, _)| a == t) {
                if asked.len() >= MAX_THREADS {
                    thaw();
                    return Err(format!("more than {MAX_THREADS} threads"));
                }
                let i = asked.len();
                SLOTS[i].state.store(1, Release);
                asked.push((t, i));
            }
        }
        // Threads that ended meanwhile are let go.
        asked.retain(|&(t, i)| {
            let alive = tasks.contains(&t);
            if !alive {
                SLOTS[i].state.store(0, Release);
            }
            alive
        });
        let waiting: Vec<(i32, usize)> = asked
            .iter()
            .copied()
            .filter(|&(_, i)| SLOTS[i].state.load(Acquire) != 2)
            .collect();
        if waiting.is_empty() {
            // Stable? One more listing finds no newcomer.
            let again = migrt::procfs::list_tasks("self")
                .into_iter()
                .filter(|&t| t != me)
                .count();
            if again == asked.len() {
                break;
            }
            continue;
        }
        // A thread that keeps the freeze signal blocked (libc's own helper threads block
        // every signal: glibc's SIGEV_THREAD timer thread does) never parks: say so soon.
        // glibc blocks all signals for short moments too (e.g. in pthread_create): only a
        // thread seen blocking it all along for 200 ms counts (once, on a loaded machine, a
        // moment's block met a slow freeze).
        blocking.retain(|(t, _)| waiting.iter().any(|w| w.0 == *t) && blocks_signal(*t, sig));
        for &(t, _) in &waiting {
            if !blocking.iter().any(|b| b.0 == t) && blocks_signal(t, sig) {
                blocking.push((t, Instant::now()));
            }
        }
        let blocked = blocking
            .iter()
            .find(|(_, since)| since.elapsed() > Duration::from_millis(200));
        if let Some(&(t, _)) = blocked.filter(|_| t0.elapsed() > Duration::from_millis(300)) {
            thaw();
            return Err(format!(
                "thread {t} blocks the freeze signal {sig} (it is in system call {}; glibc's helper thread for SIGEV_THREAD timers does this, e.g. in vim): such a thread cannot be frozen yet",
                migrt::procfs::task_syscall(t).unwrap_or(-1)
            ));
        }
        if t0.elapsed() > deadline {
            thaw();
            return Err(format!(
                "{} thread(s) did not reach a safe point within {deadline:?} (tids {:?})",
                waiting.len(),
                waiting.iter().map(|w| w.0).collect::<Vec<_>>()
            ));
        }
        for &(t, i) in &waiting {
            ask(sig, t, i);
        }
        // A thread parks within tens of microseconds when it can: looked at often, asked
        // again only every half millisecond.
        let asked_at = Instant::now();
        while asked_at.elapsed() < Duration::from_micros(500)
            && waiting
                .iter()
                .any(|&(_, i)| SLOTS[i].state.load(Acquire) != 2)
        {
            std::thread::sleep(Duration::from_micros(25));
        }
    }
    Ok(asked
        .iter()
        .map(|&(tid, i)| {
            let s = &SLOTS[i];
            Parked {
                tid,
                ucontext: s.ucontext.load(Acquire) as *const libc::ucontext_t,
                fs_base: s.fs_base.load(Relaxed),
                altstack: (
                    s.alt_base.load(Relaxed),
                    s.alt_size.load(Relaxed),
                    s.alt_flags.load(Relaxed),
                ),
            }
        })
        .collect())
}

/// What the kernel held for the process at the freeze and a restore must set again:
/// every signal's disposition, the thread name, working directory, umask, resource
/// limits, interval timers and the signals pending for the process. Kept in static memory, which the image
/// carries; read back by the restart path.
struct Kept {
    /// The kernel's struct sigaction: handler, flags, restorer, mask.
    actions: [[u64; 4]; 65],
    comm: [u8; 16],
    cwd: [u8; 4096],
    umask: u32,
    rlimits: [[u64; 2]; 16],
    /// ITIMER_REAL, _VIRTUAL, _PROF: interval and value (sec, usec each).
    itimers: [[i64; 4]; 3],
    /// Signals pending for the whole process (ShdPnd), raised again after a restore.
    pending: u64,
}

static KEPT: std::sync::Mutex<Kept> = std::sync::Mutex::new(Kept {
    actions: [[0; 4]; 65],
    comm: [0; 16],
    cwd: [0; 4096],
    umask: 0o022,
    rlimits: [[0; 2]; 16],
    itimers: [[0; 4]; 3],
    pending: 0,
});

/// Notes the signal dispositions and the thread name (control thread, app frozen).
pub fn keep_process_state() {
    // SAFETY: raw rt_sigaction, getrlimit and getitimer into buffers of the kernel's sizes.
    unsafe {
        let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
        for sig in 1..65 {
            syscall6(
                libc::SYS_rt_sigaction,
                sig,
                0,
                (&raw mut kept.actions[sig]) as usize,
                8,
                0,
                0,
            );
        }
        let comm = std::fs::read("/proc/self/comm").unwrap_or_default(); // the main thread's
        let n = comm
            .iter()
            .position(|&c| c == b'\n')
            .unwrap_or(comm.len())
            .min(15);
        kept.comm = [0; 16];
        kept.comm[..n].copy_from_slice(&comm[..n]);
        let cwd = std::fs::read_link("/proc/self/cwd").unwrap_or_default();
        let cwd = std::os::unix::ffi::OsStrExt::as_bytes(cwd.as_os_str());
        kept.cwd = [0; 4096];
        kept.cwd[..cwd.len().min(4095)].copy_from_slice(&cwd[..cwd.len().min(4095)]);
        kept.umask = super::current_umask();
        for (r, lim) in kept.rlimits.iter_mut().enumerate() {
            syscall6(
                libc::SYS_getrlimit,
                r,
                lim.as_mut_ptr() as usize,
                0,
                0,
                0,
                0,
            );
        }
        for (w, t) in kept.itimers.iter_mut().enumerate() {
            syscall6(libc::SYS_getitimer, w, t.as_mut_ptr() as usize, 0, 0, 0, 0);
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        kept.pending = status
            .lines()
            .find_map(|l| l.strip_prefix("ShdPnd:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
    }
}

/// After a restore: the dispositions and the name again.
pub fn restore_process_state() {
    // SAFETY: the kernel's own structures handed back; SIGKILL and SIGSTOP are skipped.
    unsafe {
        let kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
        for sig in 1..65 {
            if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
                continue;
            }
            syscall6(
                libc::SYS_rt_sigaction,
                sig,
                (&raw const kept.actions[sig]) as usize,
                0,
                8,
                0,
                0,
            );
        }
        libc::prctl(libc::PR_SET_NAME, kept.comm.as_ptr());
        if kept.cwd[0] == b'/' && libc::chdir(kept.cwd.as_ptr().cast()) != 0 {
            eprintln!(
                "migshim: restore: the working directory is gone here; staying in the restorer's"
            );
        }
        libc::umask(kept.umask);
        for (r, lim) in kept.rlimits.iter().enumerate() {
            // Raising a hard limit may be refused without privilege: the rest still applies.
            syscall6(libc::SYS_setrlimit, r, lim.as_ptr() as usize, 0, 0, 0, 0);
        }
        for (w, t) in kept.itimers.iter().enumerate() {
            if t.iter().any(|&v| v != 0) {
                syscall6(libc::SYS_setitimer, w, t.as_ptr() as usize, 0, 0, 0, 0);
            }
        }
        for sig in 1..65 {
            if kept.pending >> (sig - 1) & 1 == 1 {
                syscall6(libc::SYS_kill, super::real_pid() as usize, sig, 0, 0, 0, 0);
            }
        }
    }
}

/// glibc's cached tid: its offset from the TLS base, found at freeze time by looking for
/// the main thread's tid in its thread descriptor (0x2d0 in glibc 2.36).
pub fn tid_offset(fs_base: u64, tid: i32) -> Option<u32> {
    let at = |off: usize| {
        // SAFETY: the thread descriptor lies at the TLS base and spans more than 2 KiB.
        unsafe { std::ptr::read_volatile((fs_base as usize + off) as *const i32) }
    };
    if at(0x2d0) == tid {
        return Some(0x2d0);
    }
    (0x10..0x800)
        .step_by(4)
        .find(|&o| at(o) == tid)
        .map(|o| o as u32)
}

/// After a restore: no thread is parked any more (they resumed from their saved contexts).
pub fn forget() {
    for s in &SLOTS {
        s.state.store(0, Release);
    }
    PARKED.store(0, Release);
}

/// Lets every parked thread go.
pub fn thaw() {
    GENERATION.fetch_add(1, AcqRel);
    PARKED.store(0, Release);
    // SAFETY: waking every waiter on our own futex word.
    unsafe { futex(&GENERATION, libc::FUTEX_WAKE, i32::MAX as u32) };
    for s in &SLOTS {
        if s.state.load(Relaxed) == 1 {
            s.state.store(0, Release);
        }
    }
}

/// The registers' save area of a parked thread, copied: the `ucontext_t`, and the FPU and
/// vector state it points to (its size read from the xsave header when there is one).
pub fn context_bytes(p: &Parked) -> (Vec<u8>, Vec<u8>) {
    const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
    // SAFETY: p.ucontext points at the kernel's signal frame on the parked thread's stack,
    // which stays put while the thread is parked; fpregs points into the same frame.
    unsafe {
        let uc = std::slice::from_raw_parts(
            p.ucontext.cast::<u8>(),
            std::mem::size_of::<libc::ucontext_t>(),
        )
        .to_vec();
        let fp = (*p.ucontext).uc_mcontext.fpregs as *const u8;
        if fp.is_null() {
            return (uc, Vec::new());
        }
        // struct _fpx_sw_bytes sits at byte 464 of the 512-byte legacy area.
        let magic = std::ptr::read_unaligned(fp.add(464).cast::<u32>());
        let extended = std::ptr::read_unaligned(fp.add(468).cast::<u32>()) as usize;
        let len = if magic == FP_XSTATE_MAGIC1 && (512..=64 * 1024).contains(&extended) {
            extended
        } else {
            512
        };
        (uc, std::slice::from_raw_parts(fp, len).to_vec())
    }
}
