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

/// exit_group: ends every thread of the process.
pub fn exit_group(status: i32) -> ! {
    // SAFETY: exit_group takes one integer and does not return.
    unsafe {
        core::arch::asm!("syscall", in("rax") libc::SYS_exit_group, in("rdi") status, options(noreturn))
    }
}
