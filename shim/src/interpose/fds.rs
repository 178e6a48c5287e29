//! Descriptors: every call that makes, copies, changes or drops an fd is journaled after
//! the real call succeeded. read/write and friends are not interposed at all: the table
//! reads offsets and counters from /proc when it is asked, so I/O runs at native speed.

use super::paths::translate;
use super::process::{to_real, to_virtual};
use crate::control::{is_shim_fd, make_room};
use crate::state::{errno, record, set_errno, shim};
use libc::{FILE, c_char, c_int, c_long, c_uint, c_void, mode_t, off_t, size_t};
use migrt::record::{BytesRef, Record};
use std::ffi::CStr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Bytes of a C string (empty for NULL), borrowed for the duration of the call.
pub unsafe fn bytes<'a>(p: *const c_char) -> BytesRef<'a> {
    if p.is_null() {
        BytesRef(&[])
    } else {
        BytesRef(CStr::from_ptr(p).to_bytes())
    }
}

fn opened(fd: c_int, dirfd: c_int, path: *const c_char, flags: c_int, mode: mode_t) {
    if fd < 0 || shim().is_none() {
        return;
    }
    record(|| {
        // SAFETY: path is the caller's NUL-terminated path, valid for this call.
        let path = unsafe { bytes(path) };
        let dirfd = (dirfd != libc::AT_FDCWD && path.0.first() != Some(&b'/')).then_some(dirfd);
        Record::Open {
            fd,
            dirfd,
            path,
            flags,
            mode,
        }
    });
}

/// Declares the open-style wrappers: path rewritten for /proc/<vpid>, result journaled.
macro_rules! open_like {
    ($name:ident(path, flags, mode)) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
            let t = translate(path);
            let fd = real!($name: fn(*const c_char, c_int, mode_t) -> c_int)(t.as_ref().map_or(path, |c| c.as_ptr()), flags, mode);
            opened(fd, libc::AT_FDCWD, path, flags, mode);
            fd
        }
    };
    ($name:ident(path, flags)) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int) -> c_int {
            let t = translate(path);
            let fd = real!($name: fn(*const c_char, c_int) -> c_int)(t.as_ref().map_or(path, |c| c.as_ptr()), flags);
            opened(fd, libc::AT_FDCWD, path, flags, 0);
            fd
        }
    };
    ($name:ident(dirfd, path, flags, mode)) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
            let t = translate(path);
            let fd = real!($name: fn(c_int, *const c_char, c_int, mode_t) -> c_int)(dirfd, t.as_ref().map_or(path, |c| c.as_ptr()), flags, mode);
            opened(fd, dirfd, path, flags, mode);
            fd
        }
    };
    ($name:ident(dirfd, path, flags)) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
            let t = translate(path);
            let fd = real!($name: fn(c_int, *const c_char, c_int) -> c_int)(dirfd, t.as_ref().map_or(path, |c| c.as_ptr()), flags);
            opened(fd, dirfd, path, flags, 0);
            fd
        }
    };
    ($name:ident(path, mode) as creat) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: mode_t) -> c_int {
            let fd = real!($name: fn(*const c_char, mode_t) -> c_int)(path, mode);
            opened(fd, libc::AT_FDCWD, path, libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC, mode);
            fd
        }
    };
}

open_like!(open(path, flags, mode));
open_like!(open64(path, flags, mode));
open_like!(__open_2(path, flags));
open_like!(__open64_2(path, flags));
open_like!(openat(dirfd, path, flags, mode));
open_like!(openat64(dirfd, path, flags, mode));
open_like!(__openat_2(dirfd, path, flags));
open_like!(__openat64_2(dirfd, path, flags));
open_like!(creat(path, mode) as creat);
open_like!(creat64(path, mode) as creat);

/// open(2) flags of an fopen mode string.
fn fopen_flags(mode: *const c_char) -> c_int {
    // SAFETY: fopen's mode is a NUL-terminated string.
    let m = unsafe { bytes(mode) }.0;
    let mut f = match m.first() {
        Some(b'w') => libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        Some(b'a') => libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
        _ => libc::O_RDONLY,
    };
    for c in &m[1..] {
        match c {
            b'+' => f = (f & !libc::O_ACCMODE) | libc::O_RDWR,
            b'e' => f |= libc::O_CLOEXEC,
            b'x' => f |= libc::O_EXCL,
            b',' => break,
            _ => {}
        }
    }
    f
}

fn fopened(fp: *mut FILE, path: *const c_char, mode: *const c_char) -> *mut FILE {
    if !fp.is_null() && shim().is_some() {
        // SAFETY: fp is a live stream libc just returned.
        let fd = unsafe { libc::fileno(fp) };
        opened(fd, libc::AT_FDCWD, path, fopen_flags(mode), 0o666);
    }
    fp
}

/// Declares fopen/fopen64 and freopen/freopen64: path rewritten for /proc/<vpid>, the
/// stream's fd journaled (freopen: the old fd closed first).
macro_rules! fopen_like {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: *const c_char) -> *mut FILE {
            let t = translate(path);
            let p = t.as_ref().map_or(path, |c| c.as_ptr());
            fopened(real!($name: fn(*const c_char, *const c_char) -> *mut FILE)(p, mode), path, mode)
        }
    };
    ($name:ident reopen) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: *const c_char, stream: *mut FILE) -> *mut FILE {
            let old = libc::fileno(stream);
            let t = translate(path);
            let p = t.as_ref().map_or(path, |c| c.as_ptr());
            let fp = real!($name: fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE)(p, mode, stream);
            reopened(old, fp, path, mode)
        }
    };
}

fopen_like!(fopen);
fopen_like!(fopen64);

unsafe fn reopened(
    old_fd: c_int,
    fp: *mut FILE,
    path: *const c_char,
    mode: *const c_char,
) -> *mut FILE {
    if !path.is_null() {
        let e = errno();
        record(|| Record::Close { fd: old_fd });
        set_errno(e);
        return fopened(fp, path, mode);
    }
    fp
}

fopen_like!(freopen reopen);
fopen_like!(freopen64 reopen);

/// fclose closes its fd inside libc, past the close wrapper.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fclose(fp: *mut FILE) -> c_int {
    let fd = if fp.is_null() { -1 } else { libc::fileno(fp) };
    let r = real!(fclose: fn(*mut FILE) -> c_int)(fp);
    if fd >= 0 {
        record(|| Record::Close { fd });
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut libc::DIR {
    let t = translate(path);
    let d = real!(opendir: fn(*const c_char) -> *mut libc::DIR)(
        t.as_ref().map_or(path, |c| c.as_ptr()),
    );
    if !d.is_null() {
        opened(
            libc::dirfd(d),
            libc::AT_FDCWD,
            path,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            0,
        );
    }
    d
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn closedir(d: *mut libc::DIR) -> c_int {
    let fd = if d.is_null() { -1 } else { libc::dirfd(d) };
    let r = real!(closedir: fn(*mut libc::DIR) -> c_int)(d);
    if fd >= 0 {
        record(|| Record::Close { fd });
    }
    r
}

// ---- close and dup ---------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if is_shim_fd(fd) {
        // The app never opened it: to the app it is not open.
        set_errno(libc::EBADF);
        return -1;
    }
    let r = real!(close: fn(c_int) -> c_int)(fd);
    if r == 0 || errno() != libc::EBADF {
        record(|| Record::Close { fd });
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let real = real!(close_range: fn(c_uint, c_uint, c_int) -> c_int);
    let cloexec_only = flags & libc::CLOSE_RANGE_CLOEXEC as c_int != 0;
    let mut r = 0;
    let mut from = first;
    if !cloexec_only {
        // Close around the shim's own fds (all high).
        let own = [
            crate::control::listen_fd(),
            crate::control::conn_fd(),
            crate::creds::table_fd(),
        ];
        let mut keep: Vec<c_uint> = own
            .into_iter()
            .filter(|&fd| fd >= 0 && (fd as c_uint) >= first && (fd as c_uint) <= last)
            .map(|fd| fd as c_uint)
            .collect();
        keep.sort_unstable();
        for k in keep {
            if k > from {
                r |= real(from, k - 1, flags);
            }
            from = k + 1;
        }
    }
    if from <= last && from >= first {
        r |= real(from, last, flags);
    }
    record(|| Record::CloseRange {
        first,
        last,
        cloexec_only,
    });
    if r != 0 { -1 } else { 0 }
}

fn duped(old: c_int, new: c_int, cloexec: bool) -> c_int {
    if new >= 0 {
        record(|| Record::Dup { old, new, cloexec });
    }
    new
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(old: c_int) -> c_int {
    duped(old, real!(dup: fn(c_int) -> c_int)(old), false)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    if is_shim_fd(new) {
        make_room(new);
    }
    duped(old, real!(dup2: fn(c_int, c_int) -> c_int)(old, new), false)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    if is_shim_fd(new) {
        make_room(new);
    }
    duped(
        old,
        real!(dup3: fn(c_int, c_int, c_int) -> c_int)(old, new, flags),
        flags & libc::O_CLOEXEC != 0,
    )
}

/// F_SETOWN_EX / F_GETOWN_EX and their `struct f_owner_ex` (not in the libc crate).
const F_SETOWN_EX: c_int = 15;
const F_GETOWN_EX: c_int = 16;
#[repr(C)]
struct OwnerEx {
    ty: c_int,
    pid: libc::pid_t,
}

/// fcntl: dup commands and FD_CLOEXEC are journaled; F_SETOWN/F_GETOWN speak vpids.
unsafe fn fcntl_common(
    real: unsafe extern "C" fn(c_int, c_int, c_long) -> c_int,
    fd: c_int,
    cmd: c_int,
    arg: c_long,
) -> c_int {
    match cmd {
        libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
            duped(fd, real(fd, cmd, arg), cmd == libc::F_DUPFD_CLOEXEC)
        }
        libc::F_SETFD => {
            let r = real(fd, cmd, arg);
            if r == 0 {
                record(|| Record::SetCloexec {
                    fd,
                    cloexec: arg as c_int & libc::FD_CLOEXEC != 0,
                });
            }
            r
        }
        libc::F_SETOWN => {
            let owner = arg as c_int;
            let owner = if owner < 0 {
                -to_real(-owner)
            } else {
                to_real(owner)
            };
            real(fd, cmd, owner as c_long)
        }
        libc::F_GETOWN => {
            let r = real(fd, cmd, arg);
            if r < 0 {
                -to_virtual(-r)
            } else {
                to_virtual(r)
            }
        }
        F_SETOWN_EX | F_GETOWN_EX if arg != 0 => {
            // struct f_owner_ex { int type; pid_t pid; } in the caller's memory.
            let owner = arg as *mut OwnerEx;
            if cmd == F_SETOWN_EX {
                let mut copy = std::ptr::read(owner);
                copy.pid = to_real(copy.pid);
                real(fd, cmd, (&raw mut copy) as c_long)
            } else {
                let r = real(fd, cmd, arg);
                if r == 0 {
                    (*owner).pid = to_virtual((*owner).pid);
                }
                r
            }
        }
        _ => real(fd, cmd, arg),
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_long) -> c_int {
    fcntl_common(
        real!(fcntl: fn(c_int, c_int, c_long) -> c_int),
        fd,
        cmd,
        arg,
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_long) -> c_int {
    fcntl_common(
        real!(fcntl64: fn(c_int, c_int, c_long) -> c_int),
        fd,
        cmd,
        arg,
    )
}

/// ioctl: the terminal's process group speaks vpids.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, req: libc::c_ulong, arg: *mut c_void) -> c_int {
    let real = real!(ioctl: fn(c_int, libc::c_ulong, *mut c_void) -> c_int);
    match req {
        libc::TIOCSPGRP if !arg.is_null() => {
            let mut pg: libc::pid_t = to_real(*arg.cast::<libc::pid_t>());
            real(fd, req, (&raw mut pg).cast())
        }
        libc::TIOCGPGRP | libc::TIOCGSID if !arg.is_null() => {
            let r = real(fd, req, arg);
            if r == 0 {
                let p = arg.cast::<libc::pid_t>();
                *p = to_virtual(*p);
            }
            r
        }
        _ => real(fd, req, arg),
    }
}

// ---- pipes and event objects -----------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pipe(fds: *mut c_int) -> c_int {
    pipe2(fds, 0)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pipe2(fds: *mut c_int, flags: c_int) -> c_int {
    let r = real!(pipe2: fn(*mut c_int, c_int) -> c_int)(fds, flags);
    if r == 0 {
        let (read, write) = (*fds, *fds.add(1));
        record(|| Record::Pipe { read, write, flags });
    }
    r
}

fn made<'a>(fd: c_int, rec: impl FnOnce(c_int) -> Record<BytesRef<'a>>) -> c_int {
    if fd >= 0 {
        record(|| rec(fd));
    }
    fd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_create(size: c_int) -> c_int {
    made(real!(epoll_create: fn(c_int) -> c_int)(size), |fd| {
        Record::EpollCreate { fd, flags: 0 }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_create1(flags: c_int) -> c_int {
    made(real!(epoll_create1: fn(c_int) -> c_int)(flags), |fd| {
        Record::EpollCreate { fd, flags }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    ev: *mut libc::epoll_event,
) -> c_int {
    let r = real!(epoll_ctl: fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int)(
        epfd, op, fd, ev,
    );
    if r == 0 {
        // epoll_event is packed: read it unaligned.
        let (events, data) = if ev.is_null() {
            (0, 0)
        } else {
            let e = std::ptr::read_unaligned(ev);
            (e.events, e.u64)
        };
        record(|| Record::EpollCtl {
            epfd,
            op,
            fd,
            events,
            data,
        });
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn eventfd(initval: c_uint, flags: c_int) -> c_int {
    made(
        real!(eventfd: fn(c_uint, c_int) -> c_int)(initval, flags),
        |fd| Record::EventFd { fd, initval, flags },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn timerfd_create(clockid: c_int, flags: c_int) -> c_int {
    made(
        real!(timerfd_create: fn(c_int, c_int) -> c_int)(clockid, flags),
        |fd| Record::TimerFd { fd, clockid, flags },
    )
}

fn ns(t: &libc::timespec) -> u64 {
    (t.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec.max(0) as u64)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn timerfd_settime(
    fd: c_int,
    flags: c_int,
    new: *const libc::itimerspec,
    old: *mut libc::itimerspec,
) -> c_int {
    let r = real!(timerfd_settime: fn(c_int, c_int, *const libc::itimerspec, *mut libc::itimerspec) -> c_int)(
        fd, flags, new, old,
    );
    if r == 0 && !new.is_null() {
        let (interval_ns, value_ns) = (ns(&(*new).it_interval), ns(&(*new).it_value));
        record(|| Record::TimerFdSet {
            fd,
            flags,
            interval_ns,
            value_ns,
        });
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn signalfd(fd: c_int, mask: *const libc::sigset_t, flags: c_int) -> c_int {
    let r = real!(signalfd: fn(c_int, *const libc::sigset_t, c_int) -> c_int)(fd, mask, flags);
    if r >= 0 && !mask.is_null() {
        // The kernel's signal set is the first 64 bits of glibc's sigset_t.
        let m = std::ptr::read_unaligned(mask.cast::<u64>());
        record(|| Record::SignalFd {
            fd: r,
            mask: m,
            flags,
        });
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memfd_create(name: *const c_char, flags: c_uint) -> c_int {
    made(
        real!(memfd_create: fn(*const c_char, c_uint) -> c_int)(name, flags),
        |fd| Record::MemFd {
            fd,
            // SAFETY: memfd_create's name is NUL-terminated.
            name: unsafe { bytes(name) },
            flags,
        },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn inotify_init() -> c_int {
    made(real!(inotify_init: fn() -> c_int)(), |fd| Record::Inotify {
        fd,
        flags: 0,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn inotify_init1(flags: c_int) -> c_int {
    made(real!(inotify_init1: fn(c_int) -> c_int)(flags), |fd| {
        Record::Inotify { fd, flags }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn inotify_add_watch(fd: c_int, path: *const c_char, mask: u32) -> c_int {
    let wd = real!(inotify_add_watch: fn(c_int, *const c_char, u32) -> c_int)(fd, path, mask);
    if wd >= 0 {
        // SAFETY: path is the caller's NUL-terminated path.
        record(|| Record::InotifyWatch {
            fd,
            wd,
            path: unsafe { bytes(path) },
            mask,
        });
    }
    wd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn inotify_rm_watch(fd: c_int, wd: c_int) -> c_int {
    let r = real!(inotify_rm_watch: fn(c_int, c_int) -> c_int)(fd, wd);
    if r == 0 {
        record(|| Record::InotifyUnwatch { fd, wd });
    }
    r
}

// ---- terminals -------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_openpt(flags: c_int) -> c_int {
    made(real!(posix_openpt: fn(c_int) -> c_int)(flags), |fd| {
        Record::PtyMaster { fd, flags }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpt() -> c_int {
    made(real!(getpt: fn() -> c_int)(), |fd| Record::PtyMaster {
        fd,
        flags: libc::O_RDWR | libc::O_NOCTTY,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn openpty(
    master: *mut c_int,
    slave: *mut c_int,
    name: *mut c_char,
    termp: *const libc::termios,
    winp: *const libc::winsize,
) -> c_int {
    let r = real!(openpty: fn(*mut c_int, *mut c_int, *mut c_char, *const libc::termios, *const libc::winsize) -> c_int)(
        master, slave, name, termp, winp,
    );
    if r == 0 {
        let (m, s) = (*master, *slave);
        let flags = libc::O_RDWR | libc::O_NOCTTY;
        record(|| Record::PtyMaster { fd: m, flags });
        let path = std::fs::read_link(format!("/proc/self/fd/{s}")).unwrap_or_default();
        use std::os::unix::ffi::OsStrExt;
        record(|| Record::Open {
            fd: s,
            dirfd: None,
            path: BytesRef(path.as_os_str().as_bytes()),
            flags,
            mode: 0,
        });
    }
    r
}

// ---- file mappings ---------------------------------------------------------------------

/// File mappings journaled so far; until there is one, munmap is not journaled.
static FILE_MAPS: AtomicUsize = AtomicUsize::new(0);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    let p = real!(mmap: fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void)(
        addr, len, prot, flags, fd, off,
    );
    if p != libc::MAP_FAILED && fd >= 0 && flags & libc::MAP_ANONYMOUS == 0 && shim().is_some() {
        FILE_MAPS.fetch_add(1, Relaxed);
        record(|| Record::Mmap {
            addr: p as u64,
            len: len as u64,
            prot,
            flags,
            fd,
            offset: off,
        });
    }
    p
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    mmap(addr, len, prot, flags, fd, off)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    let r = real!(munmap: fn(*mut c_void, size_t) -> c_int)(addr, len);
    if r == 0 && FILE_MAPS.load(Relaxed) > 0 {
        record(|| Record::Munmap {
            addr: addr as u64,
            len: len as u64,
        });
    }
    r
}
