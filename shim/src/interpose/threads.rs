//! Threads created with pthread_create join the session: each gets its virtual tid when it
//! starts, and its slot is marked when it ends.

use crate::state::{self, shim};
use libc::{c_int, c_void, pthread_attr_t, pthread_t};

type StartFn = extern "C" fn(*mut c_void) -> *mut c_void;

struct Start {
    f: StartFn,
    arg: *mut c_void,
}

/// "C-unwind": pthread_exit and cancellation unwind through this frame.
extern "C-unwind" fn trampoline(p: *mut c_void) -> *mut c_void {
    // SAFETY: p is the Box<Start> leaked by pthread_create below, handed over exactly once.
    let start = unsafe { Box::from_raw(p.cast::<Start>()) };
    state::thread_started();
    (start.f)(start.arg)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_create(
    thread: *mut pthread_t,
    attr: *const pthread_attr_t,
    f: StartFn,
    arg: *mut c_void,
) -> c_int {
    let real = real!(pthread_create: fn(*mut pthread_t, *const pthread_attr_t, *const c_void, *mut c_void) -> c_int);
    // The shim's own threads (its control thread) are not the app's.
    let Some(_busy) = shim().and_then(|_| state::enter()) else {
        return real(thread, attr, f as *const c_void, arg);
    };
    // (The control thread comes next: its fds' room is made while this may still be the
    // only thread, see reserve_high_fds.)
    if !crate::control::started() {
        super::reserve_high_fds();
    }
    let start = Box::into_raw(Box::new(Start { f, arg }));
    let r = real(thread, attr, trampoline as *const c_void, start.cast());
    if r != 0 {
        drop(Box::from_raw(start));
        return r;
    }
    // The app is multithreaded now, so a control thread costs it nothing more; started
    // here, in plain context, it needs no wake-up later (a thread parked in a libc lock
    // wait could not be woken safely).
    drop(_busy);
    crate::control::start();
    r
}
