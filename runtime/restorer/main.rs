//! migrestore — the restorer. `mig restore` runs it (from a memfd) once per process; it
//! becomes that process again.
//!
//! Signal-handler-grade code: no std, no allocation, no libc, raw system calls only; it
//! applies its own relocations first (a static-pie has no loader to do it). It:
//!   1. reads the restore plan `mig` prepared (fd in argv[1]), and forks one restorer per
//!      child process, each with that child's plan — after step 3 instead where the plan
//!      says its children take over some of its memory (the rest of them then drop);
//!   2. checks that none of the saved regions overlaps where the kernel put the restorer
//!      (its code, stack, vDSO); if one does, it runs itself again for another random layout;
//!   3. maps every saved region at its address — page data straight from the image file
//!      (MAP_PRIVATE: lazy, copy-on-write), libraries from their files, the rest anonymous;
//!   4. moves this host's [vvar] [vvar_vclock] [vdso] block to where the image had it;
//!   5. drops any capability lent to the restore (a restorer not running as root has none
//!      of its own);
//!   6. sets the TLS base and jumps, on the saved thread's stack, into the restored shim's
//!      restart path, which does the rest.
//!
//! Plan (little-endian u64 words): magic, entry count, restart entry, offset of the
//! restart arguments in the plan, fs_base, restart stack, vvar target, the three expected
//! block sizes, the number of child processes and the word offset of their plan fds (bit 63
//! set: an orphan, see fork_children), the leadership flags (1: session leader, 2: process group leader, 4: forks its children once
//! its memory is in place), the fd of the terminal a
//! session leader takes as its controlling terminal (or u64::MAX), the pager's socket for a
//! lazy restore (or u64::MAX) and the process's index for it, then 7 words per entry (addr, len, prot, flags, fd, offset, kind:
//! 0 map, 1 copy from fd into the memory mapped before, 2 the same copy left to the pager,
//! 3 a range the pager fills: registered with a userfaultfd, which goes to the pager; 4 pages
//! of the parent's to drop, in a child forked from it), kind bit 256 marking what a child
//! forked from its parent takes over: a mapping left as it is, a copy made only where the
//! pages differ (agent/src/inherit.rs).
//!
//! Lazy restore: the kind-3 ranges are registered for missing-page faults with a fresh
//! userfaultfd, sent to the pager (`mig restore`'s helper), which serves each fault from the
//! image and fills the rest in the background. If that cannot be set up (no userfaultfd for
//! this user), the kind-2 copies are made here, as kind 1.
#![no_std]
#![no_main]

use core::arch::{asm, naked_asm};

const PLAN_MAGIC: u64 = u64::from_le_bytes(*b"MIGPLAN1");
const HEAD_WORDS: usize = 16;
const ENTRY_WORDS: usize = 7;
const PAGE: usize = 4096;
const MAX_ATTEMPTS: u8 = 16;

const SYS_READ: usize = 0;
const SYS_WRITE: usize = 1;
const SYS_OPEN: usize = 2;
const SYS_CLOSE: usize = 3;
const SYS_FSTAT: usize = 5;
const SYS_MMAP: usize = 9;
const SYS_MREMAP: usize = 25;
const SYS_MPROTECT: usize = 10;
const SYS_MADVISE: usize = 28;
const MADV_POPULATE_WRITE: usize = 23;
const SYS_PREAD64: usize = 17;
const PROT_WRITE: usize = 2;
const SYS_EXECVE: usize = 59;
const SYS_CLONE: usize = 56;
const SYS_SETPGID: usize = 109;
const SYS_SETSID: usize = 112;
const SYS_IOCTL: usize = 16;
const SYS_SENDMSG: usize = 46;
const SYS_GETPID: usize = 39;
const SYS_USERFAULTFD: usize = 323;
const SYS_GETUID: usize = 102;
const SYS_CAPSET: usize = 126;
const CAP_VERSION_3: u32 = 0x2008_0522;
const O_CLOEXEC: usize = 0o2000000;
const O_NONBLOCK: usize = 0o4000;
const UFFDIO_API: usize = 0xc018_aa3f;
const UFFDIO_REGISTER: usize = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// Fork, mremap, madvise(DONTNEED) and munmap are reported to the pager.
const UFFD_FEATURES: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);
const TIOCSCTTY: usize = 0x540E;
const SIGCHLD: usize = 17;
const CLONE_PARENT: usize = 0x8000;
const EINVAL: isize = 22;
/// Marks a child's plan fd: an orphan (see fork_children).
const ORPHAN: u64 = 1 << 63;
const SYS_EXIT_GROUP: usize = 231;
const SYS_ARCH_PRCTL: usize = 158;
const ARCH_SET_FS: usize = 0x1002;
const MAP_SHARED: usize = 0x01;
const MAP_PRIVATE: usize = 0x02;
const MAP_FIXED: usize = 0x10;
const MAP_ANONYMOUS: usize = 0x20;
const MREMAP_MAYMOVE: usize = 1;
const MREMAP_FIXED: usize = 2;
const SYS_MUNMAP: usize = 11;
const MADV_DONTNEED: usize = 4;
/// A bit of an entry's kind: made alike by the parent's restorer (left as it is by a child
/// forked from it; as if unmarked otherwise).
const INHERIT: u64 = 1 << 8;
/// An entry's kind: pages of the parent's this child has not (dropped when inheriting).
const DROP: u64 = 4;
/// (What an entry taken over from the parent is to do: a mapping, nothing; a copy, write
/// the pages that differ.)
const DONE: u64 = u64::MAX;
const CHANGED: u64 = u64::MAX - 1;

unsafe fn sys6(n: usize, a: usize, b: usize, c: usize, d: usize, e: usize, f: usize) -> isize {
    let r: isize;
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => r, in("rdi") a, in("rsi") b, in("rdx") c,
             in("r10") d, in("r8") e, in("r9") f, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    r
}

fn write(s: &[u8]) {
    unsafe { sys6(SYS_WRITE, 2, s.as_ptr() as usize, s.len(), 0, 0, 0) };
}

fn die(msg: &[u8]) -> ! {
    write(b"migrestore: ");
    write(msg);
    write(b"\n");
    unsafe { sys6(SYS_EXIT_GROUP, 125, 0, 0, 0, 0, 0) };
    loop {}
}

/// Dies with a number (an address, an error) in hex after the message.
fn die_at(msg: &[u8], v: usize) -> ! {
    let mut buf = [b'0'; 18];
    buf[1] = b'x';
    for i in 0..16 {
        let d = (v >> ((15 - i) * 4)) & 0xf;
        buf[2 + i] = if d < 10 { b'0' + d as u8 } else { b'a' + d as u8 - 10 };
    }
    write(b"migrestore: ");
    write(msg);
    write(b" ");
    die(&buf)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    die(b"internal error")
}

// core needs these; written as plain loops the compiler must not turn back into calls.
#[unsafe(no_mangle)]
unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    unsafe { asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _, options(nostack)) };
    d
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) {
        return unsafe { memcpy(d, s, n) };
    }
    let mut i = n;
    while i > 0 {
        i -= 1;
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
    }
    d
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    unsafe { asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8, options(nostack)) };
    d
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[unsafe(no_mangle)]
unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    while unsafe { core::ptr::read_volatile(s.add(n)) } != 0 {
        n += 1;
    }
    n
}

/// The prebuilt core refers to it; with panic=abort it is never called.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

#[unsafe(naked)]
#[unsafe(no_mangle)]
unsafe extern "C" fn _start() -> ! {
    naked_asm!(
        "mov r12, rsp",
        "and rsp, -16",
        "lea rdi, [rip + __ehdr_start]",
        "lea rsi, [rip + _DYNAMIC]",
        "call {relocate}",
        "mov rdi, r12",
        "call {start}",
        "ud2",
        relocate = sym relocate,
        start = sym start,
    )
}

/// Applies this program's own R_X86_64_RELATIVE relocations (no loader did): `base` is
/// where the kernel loaded it, `dynamic` its _DYNAMIC array. Runs before anything that
/// could go through the GOT, and uses nothing that could.
unsafe extern "C" fn relocate(base: usize, dynamic: *const u64) {
    const DT_RELA: u64 = 7;
    const DT_RELASZ: u64 = 8;
    const R_X86_64_RELATIVE: u64 = 8;
    let (mut rela, mut size) = (0usize, 0usize);
    let mut d = dynamic;
    unsafe {
        loop {
            let tag = core::ptr::read_volatile(d);
            let val = core::ptr::read_volatile(d.add(1));
            match tag {
                0 => break,
                DT_RELA => rela = val as usize,
                DT_RELASZ => size = val as usize,
                _ => {}
            }
            d = d.add(2);
        }
        let mut off = 0;
        while off + 24 <= size {
            let e = (base + rela + off) as *const u64;
            let (at, info, addend) = (core::ptr::read_volatile(e), core::ptr::read_volatile(e.add(1)), core::ptr::read_volatile(e.add(2)));
            if info & 0xffff_ffff == R_X86_64_RELATIVE {
                core::ptr::write_volatile((base + at as usize) as *mut u64, (base as u64).wrapping_add(addend));
            }
            off += 24;
        }
    }
}

/// A mapped range [start, end).
#[derive(Clone, Copy)]
struct Range(usize, usize);

impl Range {
    fn overlaps(self, o: Range) -> bool {
        self.0 < o.1 && o.0 < self.1
    }
}

/// What the kernel mapped for the restorer, read from /proc/self/maps.
#[derive(Clone, Copy)]
struct Own {
    ranges: [Range; 64],
    n: usize,
    vvar: Range,
    vclock: Range,
    vdso: Range,
}

fn hex(s: &[u8]) -> usize {
    s.iter().fold(0, |a, &c| {
        a * 16 + match c {
            b'0'..=b'9' => (c - b'0') as usize,
            b'a'..=b'f' => (c - b'a' + 10) as usize,
            _ => 0,
        }
    })
}

fn own_mappings(buf: &mut [u8]) -> Own {
    let mut own = Own { ranges: [Range(0, 0); 64], n: 0, vvar: Range(0, 0), vclock: Range(0, 0), vdso: Range(0, 0) };
    let fd = unsafe { sys6(SYS_OPEN, c"/proc/self/maps".as_ptr() as usize, 0, 0, 0, 0, 0) };
    if fd < 0 {
        die(b"cannot read /proc/self/maps");
    }
    let mut len = 0;
    loop {
        let n = unsafe { sys6(SYS_READ, fd as usize, buf.as_mut_ptr() as usize + len, buf.len() - len, 0, 0, 0) };
        if n <= 0 {
            break;
        }
        len += n as usize;
    }
    unsafe { sys6(SYS_CLOSE, fd as usize, 0, 0, 0, 0, 0) };
    for line in buf[..len].split(|&c| c == b'\n') {
        let Some(dash) = line.iter().position(|&c| c == b'-') else { continue };
        let Some(sp) = line.iter().position(|&c| c == b' ') else { continue };
        let r = Range(hex(&line[..dash]), hex(&line[dash + 1..sp]));
        if line.ends_with(b"[vvar]") {
            own.vvar = r;
        } else if line.ends_with(b"[vvar_vclock]") {
            own.vclock = r;
        } else if line.ends_with(b"[vdso]") {
            own.vdso = r;
        }
        if own.n < own.ranges.len() {
            own.ranges[own.n] = r;
            own.n += 1;
        }
    }
    own
}

unsafe extern "C" fn start(sp: *const usize) -> ! {
    let argc = unsafe { *sp };
    let argv = unsafe { sp.add(1) } as *const *const u8;
    let envp = unsafe { argv.add(argc + 1) };
    if argc < 3 {
        die(b"usage: migrestore PLAN_FD ATTEMPT (run by mig restore)");
    }
    let arg = |i: usize| unsafe {
        let p = *argv.add(i);
        let mut n = 0;
        while *p.add(n) != 0 {
            n += 1;
        }
        core::slice::from_raw_parts(p, n)
    };
    let plan_fd = arg(1).iter().fold(0usize, |a, &c| a * 10 + (c - b'0') as usize);
    let attempt = arg(2)[0].wrapping_sub(b'a');
    unsafe { restore(plan_fd, attempt, *argv, envp, None) }
}

/// Copies `len` bytes of saved pages from `fd` at `off` into the memory at `addr`.
fn copy_in(addr: usize, len: usize, fd: usize, off: usize) {
    // The run's pages made present in one go (cheaper than a fault per page while pread
    // fills them); a kernel without MADV_POPULATE_WRITE just faults them in.
    unsafe { sys6(SYS_MADVISE, addr, len, MADV_POPULATE_WRITE, 0, 0, 0) };
    let mut done = 0;
    while done < len {
        let n = unsafe { sys6(SYS_PREAD64, fd, addr + done, len - done, off + done, 0, 0) };
        if n <= 0 {
            die_at(b"reading saved pages failed at", addr + done);
        }
        done += n as usize;
    }
}

/// As copy_in, into memory taken over from the parent: only the pages that differ from
/// what is there are written (the others stay shared with the parent).
fn copy_changed(addr: usize, len: usize, fd: usize, off: usize) {
    const WORDS: usize = PAGE / 8;
    let mut buf = [0u64; 16 * WORDS];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() * 8);
        let mut got = 0;
        while got < n {
            let r = unsafe { sys6(SYS_PREAD64, fd, buf.as_mut_ptr() as usize + got, n - got, off + done + got, 0, 0) };
            if r <= 0 {
                die_at(b"reading saved pages failed at", addr + done + got);
            }
            got += r as usize;
        }
        for (i, saved) in buf[..n / 8].chunks(WORDS).enumerate() {
            let at = (addr + done + i * PAGE) as *mut u64;
            // SAFETY: a page of a private mapping of this process, writable while copied
            // into. (Compared whole, without stopping early: the loop vectorizes.)
            unsafe {
                let here = core::slice::from_raw_parts(at, WORDS);
                if here.iter().zip(saved).fold(0, |d, (a, b)| d | (a ^ b)) != 0 {
                    memcpy(at.cast(), saved.as_ptr().cast(), PAGE);
                }
            }
        }
        done += n;
    }
}

/// Forks one restorer per child process of plan `w` that `which` takes (told whether it
/// is an orphan), each of which becomes that child (`from`: what it has of this one, when
/// this one's memory is in place). An orphan (its parent had ended where it ran) is made
/// this process's sibling, where the kernel allows (not from a PID namespace's first
/// process: its child then).
unsafe fn fork_children(w: &[u64], argv0: *const u8, envp: *const *const u8, from: Option<Inherited>, which: impl Fn(bool) -> bool) {
    let (nchildren, at) = (w[10] as usize, w[11] as usize);
    for &child in w.get(at..at + nchildren).unwrap_or(&[]) {
        let orphan = child & ORPHAN != 0;
        if !which(orphan) {
            continue;
        }
        let mut pid = -EINVAL;
        if orphan {
            pid = unsafe { sys6(SYS_CLONE, SIGCHLD | CLONE_PARENT, 0, 0, 0, 0, 0) };
        }
        if pid == -EINVAL {
            pid = unsafe { sys6(SYS_CLONE, SIGCHLD, 0, 0, 0, 0, 0) };
        }
        if pid < 0 {
            die(b"cannot fork a child process");
        }
        if pid == 0 {
            unsafe { restore((child & !ORPHAN) as usize, 0, argv0, envp, from) };
        }
    }
}

/// Registers the kind-3 ranges with a new userfaultfd and sends it to the pager on socket
/// `sock` (with the process's index); false if there is no pager or it cannot be done.
unsafe fn hand_to_pager(entries: &[u64], sock: u64, index: u64) -> bool {
    if sock == u64::MAX {
        return false;
    }
    let uffd = unsafe { sys6(SYS_USERFAULTFD, O_CLOEXEC | O_NONBLOCK, 0, 0, 0, 0, 0) };
    if uffd < 0 {
        return false;
    }
    let uffd = uffd as usize;
    let mut api = [0xAAu64, UFFD_FEATURES, 0];
    let mut ok = unsafe { sys6(SYS_IOCTL, uffd, UFFDIO_API, api.as_mut_ptr() as usize, 0, 0, 0) } == 0;
    for e in entries.chunks(ENTRY_WORDS).filter(|e| e[6] == 3) {
        let mut reg = [e[0], e[1], UFFDIO_REGISTER_MODE_MISSING, 0];
        ok = ok && unsafe { sys6(SYS_IOCTL, uffd, UFFDIO_REGISTER, reg.as_mut_ptr() as usize, 0, 0, 0) } == 0;
    }
    // One message: the index and the pid, with the userfaultfd attached (SCM_RIGHTS).
    let body = [index, unsafe { sys6(SYS_GETPID, 0, 0, 0, 0, 0, 0) } as u64];
    let mut iov = [body.as_ptr() as u64, 16];
    let mut control = [20u64, 1 | (1 << 32), uffd as u64];
    let msg = [0u64, 0, iov.as_mut_ptr() as u64, 1, control.as_mut_ptr() as u64, 24, 0];
    ok = ok && unsafe { sys6(SYS_SENDMSG, sock as usize, msg.as_ptr() as usize, 0, 0, 0, 0) } == 16;
    unsafe { sys6(SYS_CLOSE, uffd, 0, 0, 0, 0, 0) };
    // (Registered but not sent: closing the userfaultfd unregistered the ranges.)
    ok
}

/// What a child's restorer forked once its parent's memory was in place has of it: the
/// parent's plan entries (for the mappings it drops or keeps) and what the kernel mapped
/// for the first restorer (the same here).
#[derive(Clone, Copy)]
struct Inherited<'a> {
    entries: &'a [u64],
    own: &'a Own,
}

/// Becomes the process of plan `plan_fd`, forking one restorer per child process, so that
/// the restored tree has its real parent-child links — once its own memory is in place,
/// unless restored lazily, so that a child takes over what it has alike (`from`).
/// A restorer not running as root has no capability of its own: whatever it has was lent
/// for the restore (root's sessions keep theirs, and lose them where the restart path
/// changes user). Cleared from every set (the ambient one goes with the permitted).
unsafe fn drop_lent_capabilities() {
    if unsafe { sys6(SYS_GETUID, 0, 0, 0, 0, 0, 0) } == 0 {
        return;
    }
    let head = [CAP_VERSION_3, 0];
    let none = [0u32; 6];
    if unsafe { sys6(SYS_CAPSET, head.as_ptr() as usize, none.as_ptr() as usize, 0, 0, 0, 0) } < 0 {
        die(b"cannot drop the capabilities lent to the restore");
    }
}

unsafe fn restore(plan_fd: usize, attempt: u8, argv0: *const u8, envp: *const *const u8, from: Option<Inherited>) -> ! {
    // 1. The plan, read into fresh memory.
    let mut st = [0u64; 18];
    if unsafe { sys6(SYS_FSTAT, plan_fd, st.as_mut_ptr() as usize, 0, 0, 0, 0) } < 0 {
        die(b"cannot stat the plan");
    }
    let size = st[6] as usize;
    let plan = unsafe { sys6(SYS_MMAP, 0, size.max(8), 1, MAP_PRIVATE, plan_fd, 0) };
    if plan < 0 {
        die(b"cannot map the plan");
    }
    let w = unsafe { core::slice::from_raw_parts(plan as *const u64, size / 8) };
    if w.len() < HEAD_WORDS || w[0] != PLAN_MAGIC {
        die(b"not a restore plan");
    }
    let count = w[1] as usize;
    if w.len() < HEAD_WORDS + count * ENTRY_WORDS {
        die(b"truncated restore plan");
    }
    let entries = &w[HEAD_WORDS..HEAD_WORDS + count * ENTRY_WORDS];

    // 2. Room: no saved region may land on the restorer, its stack or its vDSO block.
    // (A child forked from its parent's restorer has the same; its maps list the parent's
    // regions too.)
    let mut mapsbuf = [0u8; 8192];
    let own = match &from {
        Some(f) => *f.own,
        None => own_mappings(&mut mapsbuf),
    };
    let plan_range = Range(plan as usize, plan as usize + size);
    let clash = entries.chunks(ENTRY_WORDS).any(|e| {
        let r = Range(e[0] as usize, (e[0] + e[1]) as usize);
        own.ranges[..own.n].iter().any(|&o| o.overlaps(r)) || plan_range.overlaps(r)
    });
    if clash {
        if attempt >= MAX_ATTEMPTS {
            die(b"the saved address space overlaps the restorer every time; giving up");
        }
        let mut fd = [0u8; 24];
        let mut n = plan_fd;
        let mut i = fd.len() - 1; // fd[23] stays the terminating NUL
        loop {
            i -= 1;
            fd[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let next = [b'a' + attempt + 1, 0];
        let argv2 = [argv0, fd[i..].as_ptr(), next.as_ptr(), core::ptr::null()];
        unsafe { sys6(SYS_EXECVE, c"/proc/self/exe".as_ptr() as usize, argv2.as_ptr() as usize, envp as usize, 0, 0, 0) };
        die(b"cannot run itself again");
    }

    // A session or group it leads is made before its children are forked, so that they
    // are born into it (a process cannot join another session later) — and so is the
    // session's controlling terminal: a process only has one if born with it.
    if w[12] & 1 != 0 {
        unsafe { sys6(SYS_SETSID, 0, 0, 0, 0, 0, 0) };
        if w[13] != u64::MAX {
            unsafe { sys6(SYS_IOCTL, w[13] as usize, TIOCSCTTY, 0, 0, 0, 0) };
        }
    } else if w[12] & 2 != 0 {
        unsafe { sys6(SYS_SETPGID, 0, 0, 0, 0, 0, 0) };
    }
    // The children first, unless the plan says they take over some of this memory (then
    // none of it is the pager's: a range registered before a fork would hand the pager
    // the child as the parent's fork).
    let late = w[12] & 4 != 0;
    unsafe { fork_children(w, argv0, envp, None, |orphan| orphan || !late) };

    // A child forked from its parent's restorer takes over what its plan marks (INHERIT)
    // and drops the rest of the parent's mappings; one that was not ignores the marks.
    let inheriting = from.is_some();
    let kind = |e: &[u64]| match (e[6] & INHERIT != 0, e[6] & !INHERIT) {
        (false, k) => k,
        (true, k) if !inheriting => k,
        (true, 1) => CHANGED,
        (true, _) => DONE,
    };
    if let Some(f) = &from {
        for p in f.entries.chunks(ENTRY_WORDS).filter(|p| p[6] & !INHERIT == 0) {
            if !entries.chunks(ENTRY_WORDS).any(|e| e[6] == INHERIT && e[0] == p[0] && e[1] == p[1]) {
                unsafe { sys6(SYS_MUNMAP, p[0] as usize, p[1] as usize, 0, 0, 0, 0) };
            }
        }
    }

    // 3. Every region: mapped (from a file, the image's pages lazily), or, for kind 1,
    // copied from the image into the anonymous memory already there.
    // (Only a private mapping copied into is writable until the copies are in: each one
    // made read-only again afterwards costs an mprotect — hundreds in a process with many
    // libraries.)
    let copied_into = |e: &[u64]| {
        entries.chunks(ENTRY_WORDS).any(|c| matches!(kind(c), 1 | 2 | CHANGED) && c[0] < e[0] + e[1] && e[0] < c[0] + c[1])
    };
    let writable_first = |e: &[u64]| e[3] as usize & MAP_SHARED == 0 && e[2] as usize & PROT_WRITE == 0 && copied_into(e);
    for e in entries.chunks(ENTRY_WORDS) {
        let (addr, len, prot, flags, fd, off) = (e[0] as usize, e[1] as usize, e[2] as usize, e[3] as usize, e[4] as i64, e[5] as usize);
        match kind(e) {
            1 => copy_in(addr, len, fd as usize, off),
            CHANGED => copy_changed(addr, len, fd as usize, off),
            DROP => unsafe {
                sys6(SYS_MADVISE, addr, len, MADV_DONTNEED, 0, 0, 0);
            },
            // (Taken over, in its final protection: writable while copied into.)
            DONE if e[6] == INHERIT && writable_first(e) => unsafe {
                sys6(SYS_MPROTECT, addr, len, prot | PROT_WRITE, 0, 0, 0);
            },
            0 => {
                let (fd, flags) = if fd < 0 { (usize::MAX, flags | MAP_ANONYMOUS) } else { (fd as usize, flags) };
                // Private memory copied into is writable until the copies are in; the final
                // protection comes after. (A shared mapping is never copied into, and may
                // come from a read-only fd.)
                let prot = if writable_first(e) { prot | PROT_WRITE } else { prot };
                let r = unsafe { sys6(SYS_MMAP, addr, len, prot, flags | MAP_FIXED, fd, off) };
                if r as usize != addr {
                    die_at(b"mapping a saved region failed at", addr);
                }
            }
            _ => {}
        }
    }
    // The pages left to the pager: it takes them, or they are copied now.
    if !unsafe { hand_to_pager(entries, w[14], w[15]) } {
        for e in entries.chunks(ENTRY_WORDS).filter(|e| e[6] == 2) {
            copy_in(e[0] as usize, e[1] as usize, e[4] as usize, e[5] as usize);
        }
    }
    for e in entries.chunks(ENTRY_WORDS) {
        if e[6] & !INHERIT == 0 && writable_first(e) {
            unsafe { sys6(SYS_MPROTECT, e[0] as usize, e[1] as usize, e[2] as usize, 0, 0, 0) };
        }
    }
    if late {
        let from = Inherited { entries, own: &own };
        unsafe { fork_children(w, argv0, envp, Some(from), |orphan| !orphan) };
    }

    // 4. This host's vDSO block where the image had it (same layout, or refuse).
    let (target, sizes) = (w[6] as usize, [w[7] as usize, w[8] as usize, w[9] as usize]);
    if target != 0 {
        let mine = [own.vvar, own.vclock, own.vdso];
        if mine.iter().zip(sizes).any(|(r, s)| r.1 - r.0 != s) {
            die(b"this host's vDSO block differs in size from the image's: cannot restore here");
        }
        let mut at = target;
        for r in mine {
            let len = r.1 - r.0;
            if len == 0 {
                continue;
            }
            let m = unsafe { sys6(SYS_MREMAP, r.0, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, at, 0) };
            if m as usize != at {
                die(b"moving the vDSO failed");
            }
            at += len;
        }
    }

    // 5. No capability a user's restore was lent (a root agent restoring another user's
    // session lends CAP_SYS_PTRACE, for the userfaultfd) goes on into the program.
    unsafe { drop_lent_capabilities() };

    // 6. TLS, stack, and into the shim.
    let (entry, args, fs, stack) = (w[2] as usize, plan as usize + w[3] as usize, w[4] as usize, w[5] as usize);
    unsafe {
        sys6(SYS_ARCH_PRCTL, ARCH_SET_FS, fs, 0, 0, 0, 0);
        // As if called: the return address slot keeps the ABI's stack alignment.
        asm!("mov rsp, {stack}", "xor ebp, ebp", "push rbp", "jmp {entry}", stack = in(reg) stack, entry = in(reg) entry, in("rdi") args, options(noreturn));
    }
}
