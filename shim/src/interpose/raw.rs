//! Raw system calls, for code that may run in a signal handler or a fork child: no libc
//! wrapper (which could be one of the shim's own, or not yet resolved), no errno.

/// A system call with up to six arguments; returns the kernel's value (-errno on failure).
#[inline(always)]
pub unsafe fn syscall6(
    n: i64,
    a1: usize,
    a2: usize,
    a3: usize,
    a4: usize,
    a5: usize,
    a6: usize,
) -> isize {
    let ret: isize;
    // SAFETY (caller): the arguments are what system call `n` expects.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a1, in("rsi") a2, in("rdx") a3, in("r10") a4, in("r8") a5, in("r9") a6,
            lateout("rcx") _, lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

/// rt_sigprocmask for the calling thread: `how` (SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK) with
/// the kernel's 8-byte set (bit n-1: signal n). Unlike libc's, it may block any signal,
/// glibc's own and the shim's reserved one.
pub fn sigmask(how: i32, set: u64) {
    // SAFETY: rt_sigprocmask reads an 8-byte set we own; no old set is asked for.
    unsafe {
        syscall6(
            libc::SYS_rt_sigprocmask,
            how as usize,
            (&raw const set) as usize,
            0,
            8,
            0,
            0,
        )
    };
}

/// close(2) of an fd the shim owns (the wrapper would journal it).
pub fn close(fd: i32) {
    // SAFETY: close takes one integer.
    unsafe { syscall6(libc::SYS_close, fd as usize, 0, 0, 0, 0, 0) };
}

/// exit_group: ends every thread of the process.
pub fn exit_group(status: i32) -> ! {
    // SAFETY: exit_group takes one integer and does not return.
    unsafe {
        core::arch::asm!("syscall", in("rax") libc::SYS_exit_group, in("rdi") status, options(noreturn))
    }
}

/// A copy of this process's memory as it is at this instant, for a lazy migration to read
/// pages from after the app's own threads (and this one) have moved on: a child made by a
/// raw fork — no atfork handlers; no exit signal, so the app's own waits never see it —
/// that closes every fd it inherited (a pipe or socket held open by it would not end when
/// the app closes it) and then only sleeps until it is killed, or until the thread that
/// made it ends (PR_SET_PDEATHSIG). Its pid, or -errno.
pub fn snapshot() -> isize {
    // SAFETY: clone with no flags and no new stack is a fork whose child goes on here, on
    // a copy of this stack, and makes only raw system calls until it is killed.
    let pid = unsafe { syscall6(libc::SYS_clone, 0, 0, 0, 0, 0, 0) };
    if pid == 0 {
        // SAFETY: prctl and pause take plain values.
        unsafe {
            syscall6(
                libc::SYS_prctl,
                libc::PR_SET_PDEATHSIG as usize,
                libc::SIGKILL as usize,
                0,
                0,
                0,
                0,
            );
            syscall6(libc::SYS_close_range, 0, u32::MAX as usize, 0, 0, 0, 0);
            loop {
                syscall6(libc::SYS_pause, 0, 0, 0, 0, 0, 0);
            }
        }
    }
    pid
}

/// Ends a snapshot made by `snapshot` and reaps it (raw: the shim's own wait wrappers would
/// translate the pid). The process itself, when it is its own snapshot, is left alone.
pub fn end_snapshot(pid: i32) {
    if pid == crate::interpose::real_pid() {
        return;
    }
    // SAFETY: kill and wait4 take plain values; no status is asked for.
    unsafe {
        syscall6(
            libc::SYS_kill,
            pid as usize,
            libc::SIGKILL as usize,
            0,
            0,
            0,
            0,
        );
        syscall6(
            libc::SYS_wait4,
            pid as usize,
            0,
            libc::__WCLONE as usize,
            0,
            0,
            0,
        );
    }
}
