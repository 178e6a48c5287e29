//! POSIX timers: kept across a restore, and `SIGEV_THREAD` ones run by the shim.
//!
//! Every timer the process creates is noted (id, clock, how it notifies, and — at each
//! freeze — its remaining time and interval); the restart path makes each again with the
//! same id (`PR_TIMER_CREATE_RESTORE_IDS`, Linux 6.17+) and arms it as it was.
//!
//! `SIGEV_THREAD` timers: glibc runs them from a helper thread that keeps every signal blocked — the freeze
//! signal too — so a process that has one (vim has) could never be frozen. The shim's own
//! helper blocks only the timer signal and waits for it; each expiry runs the app's
//! function in a new detached thread, as glibc does. The helper is an ordinary thread of
//! the process: frozen, written and restored with the others.
//!
//! The kernel timer notifies the helper by its thread id, looked up again at each
//! `timer_create` and at the restore (which gives the helper a new one).

use crate::state::errno;
use libc::{c_int, c_void};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering::Relaxed};

/// The signal the kernel sends the helper: glibc's own SIGTIMER (32), which no app can use.
const SIGTIMER: c_int = 32;

/// The helper's virtual thread id (0: not started).
static HELPER: AtomicI32 = AtomicI32::new(0);
static START: Mutex<()> = Mutex::new(());

/// What one timer runs.
struct Job {
    func: extern "C" fn(libc::sigval),
    value: libc::sigval,
}

/// Jobs by kernel timer id, freed by timer_delete.
static JOBS: Mutex<Vec<(c_int, usize)>> = Mutex::new(Vec::new());

fn timer_set() -> u64 {
    1u64 << (SIGTIMER - 1)
}

extern "C" fn run_job(arg: *mut c_void) -> *mut c_void {
    // SAFETY: arg is a Job that lives until its timer is deleted.
    let job = unsafe { &*(arg as *const Job) };
    (job.func)(job.value);
    std::ptr::null_mut()
}

extern "C" fn helper(_: *mut c_void) -> *mut c_void {
    let set = timer_set();
    // (Raw: glibc would refuse to block its own signal.)
    super::raw::sigmask(libc::SIG_BLOCK, set);
    // SAFETY: rt_sigtimedwait on an 8-byte set; siginfo is written by the kernel.
    unsafe {
        HELPER.store(crate::state::vtid().unwrap_or(0), Relaxed);
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = super::raw::syscall6(
                libc::SYS_rt_sigtimedwait,
                (&raw const set) as usize,
                (&raw mut info) as usize,
                0,
                8,
                0,
                0,
            );
            if r != SIGTIMER as isize || info.si_code != libc::SI_TIMER {
                continue;
            }
            let job = info.si_value().sival_ptr;
            let mut t: libc::pthread_t = 0;
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            libc::pthread_attr_init(&mut attr);
            libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
            libc::pthread_create(&mut t, &attr, run_job, job);
            libc::pthread_attr_destroy(&mut attr);
        }
    }
}

/// The helper's current real tid, starting it if needed.
fn helper_tid() -> Option<c_int> {
    if HELPER.load(Relaxed) == 0 {
        let _once = START.lock().unwrap_or_else(|p| p.into_inner());
        if HELPER.load(Relaxed) == 0 {
            let mut t: libc::pthread_t = 0;
            // SAFETY: a detached thread running `helper`, which never returns.
            unsafe {
                if libc::pthread_create(&mut t, std::ptr::null(), helper, std::ptr::null_mut()) != 0
                {
                    return None;
                }
                libc::pthread_detach(t);
            }
            while HELPER.load(Relaxed) == 0 {
                std::thread::yield_now();
            }
        }
    }
    Some(super::process::to_real(HELPER.load(Relaxed)))
}

/// timer_create for SIGEV_THREAD: the helper is notified instead of glibc's.
///
/// # Safety
/// `sev` points to the caller's sigevent, `timer` to where the id goes.
pub unsafe fn create_thread_timer(
    real: unsafe extern "C" fn(libc::clockid_t, *mut libc::sigevent, *mut libc::timer_t) -> c_int,
    clock: libc::clockid_t,
    sev: *mut libc::sigevent,
    timer: *mut libc::timer_t,
) -> c_int {
    let Some(tid) = helper_tid() else {
        return real(clock, sev, timer); // glibc's way, then
    };
    // sigev_notify_function sits where the kernel's union keeps the thread id's neighbour.
    let func: extern "C" fn(libc::sigval) =
        std::ptr::read((sev as *const u8).add(SIGEV_FUNCTION).cast());
    let job = Box::into_raw(Box::new(Job {
        func,
        value: (*sev).sigev_value,
    }));
    let mut k: libc::sigevent = std::mem::zeroed();
    k.sigev_notify = libc::SIGEV_THREAD_ID;
    k.sigev_signo = SIGTIMER;
    k.sigev_value = libc::sigval {
        sival_ptr: job.cast(),
    };
    *(&raw mut k)
        .cast::<u8>()
        .add(super::process::SIGEV_TID)
        .cast::<libc::pid_t>() = tid;
    let r = real(clock, &mut k, timer);
    if r == 0 {
        note(*timer, clock, &k);
        JOBS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((*timer as usize as c_int, job as usize));
    } else {
        let e = errno();
        drop(Box::from_raw(job));
        crate::state::set_errno(e);
    }
    r
}

/// Offset of sigev_notify_function in struct sigevent (x86-64: after value, signo, notify).
const SIGEV_FUNCTION: usize = 16;

/// A timer as the kernel was asked to make it.
struct Timer {
    id: c_int,
    clock: libc::clockid_t,
    /// The sigevent passed to the kernel (None: the default, SIGALRM).
    sev: Option<libc::sigevent>,
    /// The thread it notifies (SIGEV_THREAD_ID), virtual; 0 for none.
    vtid: libc::pid_t,
    /// interval and value (sec, nsec each) at the last freeze.
    setting: [i64; 4],
}

// SAFETY: sigevent holds a plain pointer value (sival_ptr) the kernel hands back; it is
// never dereferenced through this list.
unsafe impl Send for Timer {}

static TIMERS: Mutex<Vec<Timer>> = Mutex::new(Vec::new());
/// Whether the process ever made a timer (a fork child checks this first: clearing the
/// lists costs it a copy-on-write fault).
static ANY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// In a fork child: timers and the helper thread are the parent's (POSIX timers are not
/// inherited).
pub fn after_fork() {
    if !ANY.load(Relaxed) {
        return;
    }
    ANY.store(false, Relaxed);
    HELPER.store(0, Relaxed);
    TIMERS.lock().unwrap_or_else(|p| p.into_inner()).clear();
    JOBS.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// Notes a timer the kernel made (`sev` as passed to it).
///
/// # Safety
/// `sev` is null or points to a sigevent.
pub unsafe fn note(id: libc::timer_t, clock: libc::clockid_t, sev: *const libc::sigevent) {
    ANY.store(true, Relaxed);
    let sev = (!sev.is_null()).then(|| std::ptr::read(sev));
    let vtid = match &sev {
        Some(e) if e.sigev_notify == libc::SIGEV_THREAD_ID => super::process::to_virtual(
            *(e as *const libc::sigevent)
                .cast::<u8>()
                .add(super::process::SIGEV_TID)
                .cast::<libc::pid_t>(),
        ),
        _ => 0,
    };
    TIMERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Timer {
            id: id as usize as c_int,
            clock,
            sev,
            vtid,
            setting: [0; 4],
        });
}

/// At a freeze: each timer's remaining time and interval.
pub fn keep() {
    for t in TIMERS.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
        // SAFETY: timer_gettime writes one itimerspec (four i64).
        unsafe {
            super::raw::syscall6(
                libc::SYS_timer_gettime,
                t.id as usize,
                t.setting.as_mut_ptr() as usize,
                0,
                0,
                0,
                0,
            )
        };
    }
}

/// In the restart path, once every thread is back: every timer made again with its id and
/// armed as it was.
pub fn restore() {
    const PR_TIMER_CREATE_RESTORE_IDS: usize = 77;
    let timers = TIMERS.lock().unwrap_or_else(|p| p.into_inner());
    if timers.is_empty() {
        return;
    }
    // SAFETY: prctl, timer_create and timer_settime with buffers of the kernel's sizes.
    unsafe {
        super::raw::syscall6(libc::SYS_prctl, PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0);
        for t in timers.iter() {
            let mut sev = t.sev.map(|mut e| {
                if t.vtid != 0 {
                    *(&raw mut e)
                        .cast::<u8>()
                        .add(super::process::SIGEV_TID)
                        .cast::<libc::pid_t>() = super::process::to_real(t.vtid);
                }
                e
            });
            let sevp = sev
                .as_mut()
                .map_or(0, |e| e as *mut libc::sigevent as usize);
            let mut id: c_int = t.id;
            let r = super::raw::syscall6(
                libc::SYS_timer_create,
                t.clock as usize,
                sevp,
                (&raw mut id) as usize,
                0,
                0,
                0,
            );
            if r != 0 || id != t.id {
                eprintln!(
                    "migshim: restore: POSIX timer {} cannot be made again ({r})",
                    t.id
                );
                continue;
            }
            if t.setting[2] != 0 || t.setting[3] != 0 {
                super::raw::syscall6(
                    libc::SYS_timer_settime,
                    id as usize,
                    0,
                    t.setting.as_ptr() as usize,
                    0,
                    0,
                    0,
                );
            }
        }
        super::raw::syscall6(libc::SYS_prctl, PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0);
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn timer_delete(timer: libc::timer_t) -> c_int {
    let r = real!(timer_delete: fn(libc::timer_t) -> c_int)(timer);
    if r == 0 {
        TIMERS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|t| t.id != timer as usize as c_int);
        let mut jobs = JOBS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = jobs
            .iter()
            .position(|(id, _)| *id == timer as usize as c_int)
        {
            drop(Box::from_raw(jobs.swap_remove(i).1 as *mut Job));
        }
    }
    r
}
