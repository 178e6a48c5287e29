//! The interposed libc functions.
//!
//! Each wrapper is a plain `#[unsafe(no_mangle)] extern "C"` function that calls the real
//! libc function (found once with `dlsym(RTLD_NEXT)`, cached in an atomic) and journals the
//! result. redhook was considered and left out: it has no re-entrancy guard (the shim's own
//! libc use would journal itself), calls the real function again if a hook body panics (a
//! side effect twice), and hides the real pointer we need for fork/exec tricks; a macro of
//! a dozen lines does the same job as fast.
//!
//! Safety, for the whole module: every wrapper receives exactly the arguments its libc
//! counterpart does and hands them on unchanged (or translated to an equivalent value of
//! the same type), so the caller's obligations towards libc carry over; the few places that
//! read or write through the caller's pointers say so. Variadic functions (open, fcntl,
//! ioctl, syscall) take a fixed argument list: on x86-64 the optional arguments travel in
//! registers (or the caller's stack area for a 6th syscall argument), so reading them
//! unconditionally is harmless when the caller passed fewer.
#![allow(unsafe_op_in_unsafe_fn, clippy::missing_safety_doc)]

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

#[macro_use]
mod macros {
    /// `real!(name: fn(T1, T2) -> R)` — the next definition of `name` after the shim.
    macro_rules! real {
        ($name:ident : fn($($t:ty),*) -> $r:ty) => {{
            static SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let p = $crate::interpose::resolve(&SLOT, concat!(stringify!($name), "\0"));
            std::mem::transmute::<usize, unsafe extern "C" fn($($t),*) -> $r>(p)
        }};
    }
}

mod exec;
mod fds;
pub mod freeze;
mod paths;
mod process;
pub mod raw;
pub mod signals;
mod sockets;
pub mod sysv;
mod threads;
pub mod timers;
mod waits;

pub use process::{real_pgid_sid, real_pid, real_ppid, real_tid, register_atfork};
pub use signals::{
    hold as hold_signal, in_handler as in_signal_handler, install as install_signal,
};

/// Functions a fork child commonly calls first (shells and spawners: redirect, set up
/// signals and groups, exec or exit). Resolved once at load, so that each child does not
/// pay for its own dlsym (measured: it was most of the shim's cost on fork+wait).
const PREFETCH: [&str; 16] = [
    "execve\0",
    "execvpe\0",
    "dup2\0",
    "dup3\0",
    "close\0",
    "close_range\0",
    "open64\0",
    "openat64\0",
    "fcntl\0",
    "sigaction\0",
    "sigprocmask\0",
    "setpgid\0",
    "setsid\0",
    "kill\0",
    "tcsetpgrp\0",
    "chdir\0",
];
static PREFETCHED: [AtomicUsize; PREFETCH.len()] = [const { AtomicUsize::new(0) }; PREFETCH.len()];

pub fn prefetch() {
    for (name, slot) in PREFETCH.iter().zip(&PREFETCHED) {
        // SAFETY: names are NUL-terminated.
        slot.store(
            unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) } as usize,
            Relaxed,
        );
    }
}

pub fn resolve(slot: &AtomicUsize, name: &'static str) -> usize {
    let p = slot.load(Relaxed);
    if p != 0 {
        return p;
    }
    if let Some(i) = PREFETCH.iter().position(|n| *n == name) {
        let p = PREFETCHED[i].load(Relaxed);
        if p != 0 {
            slot.store(p, Relaxed);
            return p;
        }
    }
    // SAFETY: name is NUL-terminated (the macro appends it); RTLD_NEXT asks for the next
    // object after this one in the lookup order.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) } as usize;
    if p == 0 {
        let msg = format!(
            "migshim: libc has no {}; cannot continue\n",
            name.trim_end_matches('\0')
        );
        // SAFETY: writing a valid buffer to stderr, then aborting.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::abort();
        }
    }
    slot.store(p, Relaxed);
    p
}

/// Path of this library, for re-injecting LD_PRELOAD.
pub fn own_path() -> std::ffi::OsString {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: dladdr fills `info` for an address inside a loaded object; dli_fname then
    // points at a NUL-terminated string owned by the loader.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(own_path as *const libc::c_void, &mut info) != 0
            && !info.dli_fname.is_null()
        {
            let name = std::ffi::CStr::from_ptr(info.dli_fname);
            let p = std::fs::canonicalize(std::ffi::OsStr::from_bytes(name.to_bytes()))
                .unwrap_or_else(|_| std::ffi::OsStr::from_bytes(name.to_bytes()).into());
            return p.into_os_string();
        }
    }
    "libmigshim.so".into()
}

pub fn close_real(fd: i32) {
    // SAFETY: closing an fd the shim owns.
    unsafe { real!(close: fn(libc::c_int) -> libc::c_int)(fd) };
}

/// Allocation-free unlink of a NUL-terminated path.
pub fn unlink_real(path: *const libc::c_char) {
    // SAFETY: path is a leaked, NUL-terminated CString.
    unsafe { libc::unlink(path) };
}

/// `fd` (the shim's) with its close-on-exec flag cleared: for the next program.
pub fn keep_across_exec(fd: i32) -> i32 {
    // SAFETY: a raw fcntl on the shim's own fd (the wrapper would journal it).
    unsafe {
        raw::syscall6(
            libc::SYS_fcntl,
            fd as usize,
            libc::F_SETFD as usize,
            0,
            0,
            0,
            0,
        )
    };
    fd
}

/// Where the shim's own fds go: high, out of the app's usual range, yet under the soft
/// RLIMIT_NOFILE and select()'s 1024.
fn high_fds() -> i32 {
    // SAFETY: getrlimit fills the rlimit it is given.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        match raw::syscall6(
            libc::SYS_getrlimit,
            libc::RLIMIT_NOFILE as usize,
            (&raw mut lim) as usize,
            0,
            0,
            0,
            0,
        ) {
            0 => lim.rlim_cur.min(1024) as i32 - 64,
            _ => 0,
        }
    }
}

/// Moves a shim fd to a high number (out of the app's usual range), close-on-exec.
pub fn move_fd_high(fd: i32) -> i32 {
    // SAFETY: fcntl/close on an fd the shim owns.
    unsafe {
        let new = real!(fcntl: fn(libc::c_int, libc::c_int, libc::c_long) -> libc::c_int)(
            fd,
            libc::F_DUPFD_CLOEXEC,
            high_fds().max(fd + 1) as libc::c_long,
        );
        if new < 0 {
            return fd;
        }
        close_real(fd);
        new
    }
}

/// Grows this process's fd table to reach the shim's high fds now, while the process most
/// likely has one thread: at its start, and before its control thread or its first thread
/// starts (a fork child has a table only as large as its open fds need). Grown later — by
/// the control thread's first fd, with other threads sharing the table — the kernel waits
/// for an RCU grace period before it swaps the table, and holds every thread's new fds
/// meanwhile (expand_fdtable's synchronize_rcu): 10-17 ms here, most of the time `mig`'s
/// first request to a process used to take. (Not in every fork child: 5-8 µs a fork.)
pub fn reserve_high_fds() {
    let top = high_fds();
    if top <= 64 {
        return; // (within the table every process starts with)
    }
    let fcntl = |fd: i32| {
        // SAFETY: a raw fcntl(F_DUPFD_CLOEXEC): a new fd at `top` or above, if `fd` is open.
        unsafe {
            raw::syscall6(
                libc::SYS_fcntl,
                fd as usize,
                libc::F_DUPFD_CLOEXEC as usize,
                top as usize,
                0,
                0,
                0,
            )
        }
    };
    // A copy of any open fd does; one of the standard three, else the root directory.
    let copy = (0..3).map(fcntl).find(|&r| r >= 0).or_else(|| {
        // SAFETY: a raw openat of a NUL-terminated path, O_PATH: nothing is read.
        let root = unsafe {
            raw::syscall6(
                libc::SYS_openat,
                libc::AT_FDCWD as usize,
                c"/".as_ptr() as usize,
                (libc::O_PATH | libc::O_CLOEXEC) as usize,
                0,
                0,
                0,
            )
        };
        (root >= 0).then(|| {
            let r = fcntl(root as i32);
            raw::close(root as i32);
            r
        })
    });
    if let Some(fd) = copy.filter(|&r| r >= 0) {
        raw::close(fd as i32);
    }
}

/// The uid of the process at the other end of a unix socket.
pub fn peer_uid(fd: i32) -> Option<u32> {
    // SAFETY: ucred is a valid out-buffer of the size given.
    unsafe {
        let mut c: libc::ucred = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let r = real!(getsockopt: fn(libc::c_int, libc::c_int, libc::c_int, *mut libc::c_void, *mut libc::socklen_t) -> libc::c_int)(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut c).cast(),
            &mut len,
        );
        (r == 0).then_some(c.uid)
    }
}

/// A shared anonymous mapping: the shim's own working memory, apart from the app's heap
/// (the kernel never merges it with private memory) and the control thread's (ctlheap.rs:
/// a buffer there would be written anew each time, and stay); unmapped when dropped.
pub struct Anonymous {
    base: *mut u8,
    len: usize,
}

impl Anonymous {
    pub fn new(len: usize) -> std::io::Result<Anonymous> {
        // SAFETY: asking the kernel for fresh memory at an address of its choosing.
        let p = unsafe {
            real!(mmap: fn(*mut libc::c_void, usize, libc::c_int, libc::c_int, libc::c_int, libc::off_t) -> *mut libc::c_void)(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Anonymous {
            base: p.cast(),
            len,
        })
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.base
    }

    pub fn range(&self) -> (u64, u64) {
        (self.base as u64, self.base as u64 + self.len as u64)
    }
}

impl Drop for Anonymous {
    fn drop(&mut self) {
        unmap(self.base, self.len);
    }
}

pub fn unmap(p: *mut u8, len: usize) {
    // SAFETY: unmapping memory that nothing uses any more.
    unsafe { real!(munmap: fn(*mut libc::c_void, usize) -> libc::c_int)(p.cast(), len) };
}

/// The process's umask (read by setting and restoring it: only while the app is frozen).
pub fn current_umask() -> u32 {
    // SAFETY: umask cannot fail; the value is put back at once.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    }
}

/// The calling thread takes no signals (the control thread).
pub fn block_all_signals() {
    // SAFETY: a full set, applied to the calling thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        real!(pthread_sigmask: fn(libc::c_int, *const libc::sigset_t, *mut libc::sigset_t) -> libc::c_int)(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        );
    }
}
