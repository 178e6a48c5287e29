//! Waits that the reserved signal must not cut short.
//!
//! poll, select and epoll_wait (and their variants) are never restarted by the kernel once
//! a signal handler ran: they fail with EINTR. When the handler was the shim's — waking its
//! control thread, freezing for a checkpoint, or the return into a restored process — the
//! app must not see that: some programs treat EINTR there as fatal (util-linux `script`
//! did, and quit). So these wrappers wait again, for what is left of the timeout, when the
//! shim's signal and no app handler interrupted them. (Calls libc makes internally are not
//! covered: they return EINTR as for any signal.)

use super::signals::interruptions;
use crate::state::errno;
use libc::c_int;
use std::time::{Duration, Instant};

/// Whether a wait that returned `r` was cut short by the shim's signal alone.
fn again(before: (u64, u64), r: c_int) -> bool {
    if r != -1 || errno() != libc::EINTR {
        return false;
    }
    let now = interruptions();
    now.0 != before.0 && now.1 == before.1
}

/// A wait's end: None waits forever.
struct Deadline(Option<Instant>);

impl Deadline {
    fn millis(ms: c_int) -> Deadline {
        Deadline((ms >= 0).then(|| Instant::now() + Duration::from_millis(ms as u64)))
    }

    /// # Safety
    /// `ts` is null or points to a timespec.
    unsafe fn timespec(ts: *const libc::timespec) -> Deadline {
        Deadline((!ts.is_null()).then(|| {
            let t = &*ts;
            Instant::now()
                + Duration::new(
                    t.tv_sec.max(0) as u64,
                    t.tv_nsec.clamp(0, 999_999_999) as u32,
                )
        }))
    }

    fn left(&self) -> Option<Duration> {
        self.0.map(|d| d.saturating_duration_since(Instant::now()))
    }

    fn left_millis(&self) -> c_int {
        // Rounded up, so that a wait never ends before its time.
        self.left().map_or(-1, |l| {
            l.as_micros().div_ceil(1000).min(c_int::MAX as u128) as c_int
        })
    }

    fn left_timespec(&self) -> Option<libc::timespec> {
        self.left().map(|l| libc::timespec {
            tv_sec: l.as_secs() as libc::time_t,
            tv_nsec: l.subsec_nanos() as _,
        })
    }
}

/// Calls `wait` (given the time left) until it ends for another reason than the shim's
/// own signal.
fn waiting(deadline: Deadline, mut wait: impl FnMut(&Deadline) -> c_int) -> c_int {
    loop {
        let before = interruptions();
        let r = wait(&deadline);
        if !again(before, r) {
            return r;
        }
    }
}

fn ptr_or_null(t: &Option<libc::timespec>) -> *const libc::timespec {
    t.as_ref().map_or(std::ptr::null(), |t| t)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, timeout: c_int) -> c_int {
    let real = real!(poll: fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int);
    waiting(Deadline::millis(timeout), |d| real(fds, n, d.left_millis()))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    timeout: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    let real = real!(ppoll: fn(*mut libc::pollfd, libc::nfds_t, *const libc::timespec, *const libc::sigset_t) -> c_int);
    waiting(Deadline::timespec(timeout), |d| {
        real(fds, n, ptr_or_null(&d.left_timespec()), mask)
    })
}

/// select updates its timeout to the time left (Linux), so waiting again with the same
/// arguments waits for the rest; the sets are left as given when it fails.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn select(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: *mut libc::timeval,
) -> c_int {
    let real = real!(select: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *mut libc::timeval) -> c_int);
    waiting(Deadline(None), |_| real(n, r, w, e, timeout))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pselect(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    let real = real!(pselect: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *const libc::timespec, *const libc::sigset_t) -> c_int);
    waiting(Deadline::timespec(timeout), |d| {
        real(n, r, w, e, ptr_or_null(&d.left_timespec()), mask)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_wait(
    ep: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    let real = real!(epoll_wait: fn(c_int, *mut libc::epoll_event, c_int, c_int) -> c_int);
    waiting(Deadline::millis(timeout), |d| {
        real(ep, events, max, d.left_millis())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    ep: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const libc::sigset_t,
) -> c_int {
    let real = real!(epoll_pwait: fn(c_int, *mut libc::epoll_event, c_int, c_int, *const libc::sigset_t) -> c_int);
    waiting(Deadline::millis(timeout), |d| {
        real(ep, events, max, d.left_millis(), mask)
    })
}
