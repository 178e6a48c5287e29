//! The restart path: where the restorer hands over, inside the restored process, on the
//! main thread's own stack with its TLS in place. It makes the shim's world true again on
//! this host — glibc's cached tid, the session table, the new real pid, the control
//! thread's leftovers, the kernel's view of the command line — and then returns the main
//! thread into its saved context with rt_sigreturn, as if its freeze signal had just been
//! handled.
//!
//! Arguments (written by `mig restore` into the plan): the session directory (u64 length,
//! bytes, padded to 8), the number of fds to close (u64) and those fds (u64 each), the old
//! process's TLS offset of glibc's tid (u64), the main thread's ucontext (u64), its TLS
//! base (u64), prctl_mm_map fields (11 u64) with the auxv (u64 length, bytes), the other
//! threads (u64 count, then ucontext, TLS base and vtid, u64 each), the fd of the
//! channel its objects come through (u64), and its System V attachments (u64 count, then
//! address, segment id and flags, u64 each).

use crate::interpose::raw::syscall6;
use crate::state::{shim, vpid};
use migrt::paths::SessionDir;
use migrt::wire::{RESTART_BACK, RESTART_GO, RESTART_READY};
use std::os::unix::ffi::OsStrExt;

struct Args<'a> {
    words: &'a [u8],
    at: usize,
}

impl<'a> Args<'a> {
    fn u64(&mut self) -> u64 {
        let v = u64::from_le_bytes(
            self.words[self.at..self.at + 8]
                .try_into()
                .unwrap_or([0; 8]),
        );
        self.at += 8;
        v
    }

    fn bytes(&mut self) -> &'a [u8] {
        let n = self.u64() as usize;
        let b = &self.words[self.at..self.at + n];
        self.at += n.div_ceil(8) * 8;
        b
    }
}

/// Entered by the restorer (see the module comment); never returns.
///
/// # Safety
/// Called only by the restorer, with `args` pointing at the plan's argument block.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn migshim_restart(args: *const u8) -> ! {
    // Inside the shim until it goes back into the app: what the restart path does with
    // libc (reading files, placing the objects it receives) is not the app's to journal.
    let was_busy = crate::state::enter_forever();
    // No signal until each thread is back in its own context (rt_sigreturn puts its own
    // mask back): timers and pending signals set again below fire only then.
    crate::interpose::raw::sigmask(libc::SIG_SETMASK, !0);
    // The old process's control thread and its heap's state are gone (allocation-free).
    crate::control::forget();
    crate::ctlheap::restarting(true);
    // SAFETY: the block is at most 1 MiB and mapped by the restorer for the whole restart.
    let mut a = Args {
        words: unsafe { std::slice::from_raw_parts(args, 1 << 20) },
        at: 0,
    };
    let dir = SessionDir(std::ffi::OsStr::from_bytes(a.bytes()).into());
    let closes: Vec<u64> = (0..a.u64()).map(|_| a.u64()).collect();
    let tid_offset = a.u64() as usize;
    let ucontext = a.u64() as usize;
    let fs_base = a.u64() as usize;
    let mut mm: Vec<u64> = (0..11).map(|_| a.u64()).collect();
    let auxv = a.bytes().to_vec();
    let threads: Vec<[u64; 3]> = (0..a.u64()).map(|_| [a.u64(), a.u64(), a.u64()]).collect();
    let channel = a.u64() as i32;
    let sysv: Vec<[u64; 3]> = (0..a.u64()).map(|_| [a.u64(), a.u64(), a.u64()]).collect();

    // glibc answers pthread_self()->tid from its cache: the new kernel tid.
    let tid = unsafe { syscall6(libc::SYS_gettid, 0, 0, 0, 0, 0, 0) } as i32;
    if tid_offset != 0 {
        // SAFETY: the offset was found in this very thread descriptor at checkpoint time.
        unsafe { std::ptr::write_volatile((fs_base + tid_offset) as *mut i32, tid) };
    }
    // rseq: glibc registered an area per thread at a fixed offset from the thread pointer;
    // the new process has none registered. Each thread registers its own again (the
    // others in respawn), so that sched_getcpu and glibc's rseq users see this CPU.
    let rseq = rseq_area();
    if let Some((off, size)) = rseq {
        // SAFETY: the area lies in this thread's TLS block, restored with the process.
        unsafe {
            syscall6(
                libc::SYS_rseq,
                (fs_base as i64 + off) as usize,
                size as usize,
                0,
                RSEQ_SIG as usize,
                0,
                0,
            )
        };
    }
    // (The old process's control socket and listener were forgotten first: their fd
    // numbers mean other things now.)
    crate::interpose::freeze::forget();
    if let Some(s) = shim() {
        if let Err(e) = s.table.remap(&dir.procs()) {
            eprintln!("migshim: restore: {e}");
        }
        crate::creds::hold_table_again(&dir.procs());
        s.table.bind(vpid(), tid);
        crate::interpose::sysv::load_ids(
            &std::fs::read_to_string(dir.0.join("sysv")).unwrap_or_default(),
        );
        s.move_to(dir);
        // The processes of the tree come back in any order: until the parent and the
        // children have their new pids, getppid() and waitpid() could not translate them.
        // Wait for them (briefly).
        let me = vpid();
        let parent = s.table.get(me).map_or(0, |e| e.parent);
        let pending = || {
            s.table.entries().iter().any(|e| {
                e.kind == migrt::sessiontable::Kind::Process
                    && e.state == migrt::sessiontable::State::Running
                    && e.real == 0
                    && (e.vid == parent || e.parent == me)
            })
        };
        let t = std::time::Instant::now();
        while pending() && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        crate::zombies::restored(&s.table, me);
    }
    crate::interpose::freeze::restore_process_state();
    rejoin_group();
    receive_objects(channel);
    // (Its own channel stays open until it is back: see the end.)
    for fd in closes.into_iter().filter(|&fd| fd != channel as u64) {
        crate::interpose::close_real(fd as i32);
    }
    rebuild_epolls();
    attach_sysv(&sysv);
    retake_terminal();
    retake_locks();
    // The restorer's leftovers: its code, the plan (the arguments were copied above), and
    // the stack the kernel gave it (found by name before set_mm renames the app's stack).
    let leftovers: Vec<(u64, u64)> = migrt::procfs::all_mappings("self")
        .iter()
        .filter(|m| {
            m.name.0 == b"[stack]"
                || m.name.0.starts_with(b"/memfd:migrestore")
                || m.name.0.starts_with(b"/memfd:migshim-plan")
        })
        .map(|m| (m.start, m.end))
        .collect();
    set_mm(&mut mm, &auxv);
    for (start, end) in leftovers {
        crate::interpose::unmap(start as *mut u8, (end - start) as usize);
    }
    // Its user again (the restorer's privilege was needed until here); the threads made
    // next inherit it.
    if let Err(e) = crate::creds::take_back() {
        eprintln!("migshim: restore: {e}");
        crate::interpose::raw::exit_group(1);
    }
    // Nothing of the app has run yet: mig restore hears this process is ready and says go
    // once all of the session's are (and its connections are out of repair mode). If it
    // cannot (it is gone: killed, or it gave up), this restore was abandoned and the
    // process must not run on.
    if !say(channel, RESTART_READY) || !heard_go(channel) {
        crate::interpose::raw::exit_group(128 + libc::SIGKILL);
    }
    // Last, the other threads: each goes straight back into its own saved context.
    for [ucontext, fs_base, vtid] in threads {
        // SAFETY: context and TLS of a thread of this very process, restored with it.
        let area = rseq.map_or((0, 0), |(off, size)| ((fs_base as i64 + off) as u64, size));
        let tid = unsafe { respawn(ucontext, fs_base, fs_base + tid_offset as u64, area) };
        if tid > 0 {
            if let Some(s) = shim() {
                s.table.bind(vtid as i32, tid as i32);
            }
        } else {
            eprintln!("migshim: restore: recreating thread {vtid} failed ({tid})");
        }
    }
    // Its POSIX timers (some notify the threads just made).
    crate::interpose::timers::restore();
    // mig restore hears it is back (its threads running, its timers set).
    say(channel, RESTART_BACK);
    crate::interpose::close_real(channel);
    crate::ctlheap::restarting(false);
    crate::state::leave_to(was_busy);
    // Back into the app: rt_sigreturn reads the saved frame just above the ucontext.
    // SAFETY: ucontext is the main thread's signal frame, restored with its stack.
    unsafe {
        std::arch::asm!("mov rsp, {uc}", "mov eax, 15", "syscall", uc = in(reg) ucontext, options(noreturn));
    }
}

/// Sends one byte on the channel; whether it went.
fn say(channel: i32, byte: u8) -> bool {
    // SAFETY: a one-byte send from a local on the channel mig handed down.
    let sent = unsafe {
        syscall6(
            libc::SYS_sendto,
            channel as usize,
            (&raw const byte) as usize,
            1,
            libc::MSG_NOSIGNAL as usize,
            0,
            0,
        )
    };
    sent == 1
}

/// Waits for mig restore's go; false when the channel ended (or said something else).
fn heard_go(channel: i32) -> bool {
    let mut byte = 0u8;
    loop {
        // SAFETY: a one-byte receive into a local from the channel mig handed down.
        let n = unsafe {
            syscall6(
                libc::SYS_recvfrom,
                channel as usize,
                (&raw mut byte) as usize,
                1,
                0,
                0,
                0,
            )
        };
        match n {
            n if n == -(libc::EINTR as isize) => continue,
            1 => return byte == RESTART_GO,
            _ => return false,
        }
    }
}

/// The signature glibc registers its rseq areas with (x86-64).
const RSEQ_SIG: u32 = 0x5305_3053;

/// glibc's rseq area of every thread: (offset from the thread pointer, size); None when
/// glibc registered none (turned off with GLIBC_TUNABLES, or a kernel without rseq).
fn rseq_area() -> Option<(i64, u32)> {
    // SAFETY: dlsym of two data symbols glibc ≥ 2.35 exports; read only if present.
    unsafe {
        let off = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) as *const isize;
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) as *const u32;
        if off.is_null() || size.is_null() || *size == 0 {
            return None;
        }
        Some((*off as i64, (*size).max(32)))
    }
}

/// The process's session and process group as at the checkpoint, when they are the
/// session's own (ones outside it stay mig restore's). A group whose leader is not back yet
/// is waited for, briefly.
fn rejoin_group() {
    let Some(t) = FROZEN.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        return;
    };
    let Some(s) = shim() else { return };
    let me = vpid();
    // SAFETY: setsid/setpgid on the calling process.
    unsafe {
        if t.sid == me {
            libc::setsid();
            return;
        }
        if t.pgid == me {
            libc::setpgid(0, 0);
            return;
        }
        if !migrt::sessiontable::is_virtual(t.pgid) {
            return;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let real = s.table.real_of(t.pgid).unwrap_or(0);
            if (real != 0 && libc::setpgid(0, real) == 0) || std::time::Instant::now() > deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// A thread again: a raw clone sharing everything, with the thread's TLS, its glibc tid
/// field written by the kernel at start and cleared (with a futex wake, for pthread_join)
/// at its end; the new thread rt_sigreturns at once into its saved context. Returns the
/// new tid (or -errno).
unsafe fn respawn(ucontext: u64, fs_base: u64, tid_field: u64, rseq: (u64, u32)) -> i64 {
    let flags = libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_SETTLS
        | libc::CLONE_CHILD_SETTID
        | libc::CLONE_CHILD_CLEARTID;
    // A stack for the instant between clone and sigreturn: below its own signal frame.
    let stack = (ucontext - 8192) & !15;
    let ret: i64;
    // SAFETY (caller): ucontext and fs_base are this thread's, restored with the process.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            // The new thread: its rseq area registered again (when glibc had one), then
            // back into its saved context.
            "test r13, r13",
            "jz 3f",
            "mov rdi, r13",
            "mov esi, r14d",
            "xor edx, edx",
            "mov r10d, 0x53053053",
            "mov eax, 334",
            "syscall",
            "3:",
            "mov rsp, r12",
            "mov eax, 15",
            "syscall",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone => ret,
            in("rdi") flags as u64,
            in("rsi") stack,
            in("rdx") 0u64,
            in("r10") tid_field,
            in("r8") fs_base,
            in("r12") ucontext,
            in("r13") rseq.0,
            in("r14") rseq.1 as u64,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}

/// The objects mig made anew for this process (every fd but epolls, see objects.rs): one
/// message per fd — its number and close-on-exec flag, the fd attached — until an empty one.
fn receive_objects(channel: i32) {
    let mut msg = [0u8; 8];
    while let Ok((n, fd)) = migrt::sys::recv_fd(channel, &mut msg) {
        if n == 0 || fd < 0 {
            break;
        }
        let target = i32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let cloexec = if msg.get(4) == Some(&1) {
            libc::O_CLOEXEC
        } else {
            0
        };
        // SAFETY: placing the received fd at the number the app knows.
        unsafe {
            if fd != target {
                libc::dup3(fd, target, cloexec);
                crate::interpose::close_real(fd);
            } else if cloexec == 0 {
                libc::fcntl(fd, libc::F_SETFD, 0);
            }
        }
    }
}

/// The table as it was at the last freeze (the image carries this static memory).
static FROZEN: std::sync::Mutex<Option<migrt::table::ProcessTable>> = std::sync::Mutex::new(None);

pub fn keep_table(t: &migrt::table::ProcessTable) {
    *FROZEN.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.clone());
    *CTTY.lock().unwrap_or_else(|p| p.into_inner()) = controlling_terminal(t);
}

/// An fd that is the process's controlling terminal, as at the last freeze.
pub fn controlling_fd() -> Option<i32> {
    CTTY.lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|(fd, _)| fd)
}

/// The process's controlling terminal as at the last freeze, when it holds it open: (an fd
/// that is it, the vpid of its foreground process group).
static CTTY: std::sync::Mutex<Option<(i32, i32)>> = std::sync::Mutex::new(None);

fn controlling_terminal(t: &migrt::table::ProcessTable) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let tty_nr: u64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(4)?
        .parse()
        .ok()?;
    if tty_nr == 0 {
        return None;
    }
    // tty_nr packs major and minor as the kernel's new_encode_dev does.
    let (major, minor) = (
        (tty_nr >> 8) & 0xfff,
        (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00),
    );
    let fd = t.fds.iter().find_map(|f| match &f.object {
        migrt::table::Object::Device { rdev, .. }
            if libc::major(*rdev) as u64 == major && libc::minor(*rdev) as u64 == minor =>
        {
            Some(f.fd)
        }
        _ => None,
    })?;
    // (tcgetpgrp and tcsetpgrp go through the shim's wrappers: virtual ids.)
    let fg = migrt::sys::foreground_group(fd)?;
    Some((fd, fg))
}

/// A session leader whose controlling terminal came back (a pseudo-terminal of the
/// session) takes it again, and gives it its foreground group back once that group exists.
fn retake_terminal() {
    let (Some(t), Some((fd, fg))) = (
        FROZEN.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        *CTTY.lock().unwrap_or_else(|p| p.into_inner()),
    ) else {
        return;
    };
    if t.sid != vpid() || migrt::sys::take_controlling_tty(fd).is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if migrt::sys::set_foreground_group(fd, fg).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// System V segments attached again at their addresses (mig made them anew; `flags`: 1
/// read-only, 2 marked for removal — done once attached, as the process had it).
fn attach_sysv(segments: &[[u64; 3]]) {
    const SHM_REMAP: usize = 0o40000;
    for &[addr, id, flags] in segments {
        let ro = if flags & 1 != 0 {
            libc::SHM_RDONLY as usize
        } else {
            0
        };
        // SAFETY: maps the segment over the hole the restorer left at its old address.
        let r = unsafe {
            syscall6(
                libc::SYS_shmat,
                id as usize,
                addr as usize,
                SHM_REMAP | ro,
                0,
                0,
                0,
            )
        };
        if r as i64 != addr as i64 {
            eprintln!(
                "migshim: restore: System V segment {id} cannot be attached at {addr:#x} ({r})"
            );
        }
        if flags & 2 != 0 {
            migrt::sys::sysv_remove(id as i32);
        }
    }
}

/// Epoll instances come back once every other fd is in place (mig made those): their
/// interest lists name fds by number, and the kernel keys each interest by the fd number
/// it was added under. Two passes, so that an epoll watching another epoll finds it.
fn rebuild_epolls() {
    use migrt::table::Object;
    let Some(t) = FROZEN.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        return;
    };
    let epolls: Vec<_> = t
        .fds
        .iter()
        .filter_map(|f| match &f.object {
            Object::Epoll { interest } => Some((f, interest)),
            _ => None,
        })
        .collect();
    for (f, _) in &epolls {
        let cloexec = if f.cloexec { libc::EPOLL_CLOEXEC } else { 0 };
        // SAFETY: a fresh epoll fd, moved to the number the app knows.
        unsafe {
            let ep = libc::epoll_create1(cloexec);
            if ep >= 0 && ep != f.fd {
                libc::dup3(ep, f.fd, cloexec);
                crate::interpose::close_real(ep);
            }
        }
    }
    for (f, interest) in &epolls {
        for i in interest.iter() {
            let mut ev = libc::epoll_event {
                events: i.events,
                u64: i.data,
            };
            // SAFETY: ev is a valid epoll_event; both fds are in place.
            let r = unsafe { libc::epoll_ctl(f.fd, libc::EPOLL_CTL_ADD, i.fd, &mut ev) };
            if r != 0 {
                eprintln!(
                    "migshim: restore: epoll fd {}: watching fd {} again failed ({})",
                    f.fd,
                    i.fd,
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Locks come back taken by the process itself, on the files mig reopened: POSIX record
/// locks belong to the process, and a flock taken here names this process as its holder
/// (taken by mig, the next checkpoint would not know it as this process's).
fn retake_locks() {
    use migrt::table::Object;
    let Some(t) = FROZEN.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        return;
    };
    for f in &t.fds {
        if let Object::File { locks, path, .. } = &f.object {
            for l in locks {
                let taken = if l.posix {
                    migrt::sys::posix_lock(f.fd, l.write, l.start, l.end)
                } else {
                    migrt::sys::flock(f.fd, l.write)
                };
                if let Err(e) = taken {
                    eprintln!(
                        "migshim: restore: the lock on {path} (fd {}) cannot be taken again: {e}",
                        f.fd
                    );
                }
            }
        }
    }
}

/// The kernel's idea of where the command line, environment and heap are (ps reads the
/// command line from there). Best effort: refused without the right privileges.
fn set_mm(mm: &mut [u64], auxv: &[u8]) {
    #[repr(C)]
    struct PrctlMmMap {
        fields: [u64; 11],
        auxv: u64,
        auxv_size: u32,
        exe_fd: u32,
    }
    if mm.len() != 11 {
        return;
    }
    let map = PrctlMmMap {
        fields: mm.try_into().unwrap_or([0; 11]),
        auxv: auxv.as_ptr() as u64,
        auxv_size: auxv.len() as u32,
        exe_fd: u32::MAX,
    };
    const PR_SET_MM: usize = 35;
    const PR_SET_MM_MAP: usize = 14;
    // SAFETY: prctl reads the struct we pass, of the size we say.
    unsafe {
        syscall6(
            libc::SYS_prctl,
            PR_SET_MM,
            PR_SET_MM_MAP,
            (&raw const map) as usize,
            std::mem::size_of::<PrctlMmMap>(),
            0,
            0,
        );
    }
}
