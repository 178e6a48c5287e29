//! The runtime's few raw calls into libc, each small and explained. Used by `mig` and by the
//! shim's control thread (never from a signal handler).

use crate::sockaddr::SockAddr;
use std::io;

pub fn getuid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

pub fn fstat(fd: i32) -> io::Result<libc::stat> {
    // SAFETY: `st` is a properly sized out-buffer; an invalid fd yields EBADF.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) == 0 {
            Ok(st)
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

pub fn sockopt_int(fd: i32, opt: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid out-pointers of the sizes given.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// getsockname (`peer` false) or getpeername (`peer` true); `None` when not bound/connected.
pub fn sock_name(fd: i32, peer: bool) -> Option<SockAddr> {
    // SAFETY: sockaddr_storage is large enough for any address; len tells the kernel so.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let p = (&raw mut ss).cast::<libc::sockaddr>();
        let r = if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        };
        if r != 0 {
            return None;
        }
        let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        let bytes = std::slice::from_raw_parts((&raw const ss).cast::<u8>(), len);
        Some(SockAddr::from_bytes(bytes))
    }
}

pub fn isatty(fd: i32) -> bool {
    // SAFETY: isatty only queries the fd.
    unsafe { libc::isatty(fd) == 1 }
}

/// The pty index behind a master fd (TIOCGPTN).
pub fn pty_index(fd: i32) -> Option<u32> {
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGPTN, &mut n) };
    (r == 0).then_some(n)
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether a process with this real pid exists (and we may see it).
pub fn alive(pid: i32) -> bool {
    pid > 0 && signal_reaches(pid)
}

/// Whether a process group with this real id exists.
pub fn group_exists(pgid: i32) -> bool {
    pgid > 0 && signal_reaches(-pgid)
}

/// Whether kill(`target`, 0) finds someone (allowed to signal or not).
fn signal_reaches(target: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission. (In the shim this is its
    // own kill, which passes real ids through as they are.)
    (unsafe { libc::kill(target, 0) } == 0)
        || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sends one netlink dump request and returns the payload of every answer message
/// (the bytes after each `nlmsghdr`) until NLMSG_DONE.
pub fn netlink_dump(protocol: i32, msg_type: u16, request: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    netlink_call(protocol, msg_type, libc::NLM_F_DUMP, request)
}

/// Sends one netlink request (flags besides NLM_F_REQUEST: `flags`) and returns the
/// payload of every answer message until NLMSG_DONE, or an acknowledgement (an
/// NLMSG_ERROR of 0: success), or the error it says.
pub fn netlink_call(
    protocol: i32,
    msg_type: u16,
    flags: i32,
    request: &[u8],
) -> io::Result<Vec<Vec<u8>>> {
    const HDR: usize = 16;
    // SAFETY: plain socket creation; the fd is closed by OwnedFd below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh fd we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    use std::os::fd::AsRawFd;
    let mut msg = Vec::with_capacity(HDR + request.len());
    msg.extend_from_slice(&((HDR + request.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&msg_type.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | flags) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    msg.extend_from_slice(request);
    // SAFETY: msg is a valid buffer of its length; netlink to the kernel needs no address
    // for a freshly created socket (send goes to pid 0).
    if unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= HDR {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if len < HDR || len > rest.len() {
                return Ok(out);
            }
            match ty as i32 {
                libc::NLMSG_DONE => return Ok(out),
                libc::NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(rest[HDR..HDR + 4].try_into().unwrap_or([0; 4]));
                    return match errno {
                        0 => Ok(out),
                        _ => Err(io::Error::from_raw_os_error(-errno)),
                    };
                }
                _ => out.push(rest[HDR..len].to_vec()),
            }
            rest = &rest[(len + 3) & !3..];
        }
        if n == 0 {
            return Ok(out);
        }
    }
}

/// A launcher waiting for its child ignores the terminal's interrupt and quit keys, as a
/// shell does: they reach the child (same process group), which decides.
pub fn ignore_terminal_signals() {
    // SAFETY: setting the disposition of two signals to SIG_IGN.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
}

/// Sends `sig` with a value to one thread `tid` of process `pid` (rt_tgsigqueueinfo):
/// how `mig` wakes a shim process, a thread at a time.
pub fn thread_sigqueue(pid: i32, tid: i32, sig: i32, value: usize) -> io::Result<()> {
    // SAFETY: a zeroed siginfo filled as sigqueue(3) would (SI_QUEUE, our pid and uid,
    // the value); the kernel copies it.
    let r = unsafe {
        let mut si: libc::siginfo_t = std::mem::zeroed();
        si.si_signo = sig;
        si.si_code = libc::SI_QUEUE;
        // The _rt member of the union: si_pid, si_uid, then the value, from byte 16.
        let p = (&raw mut si).cast::<u8>().add(16);
        *p.cast::<i32>() = libc::getpid();
        *p.add(4).cast::<u32>() = libc::getuid();
        *p.add(8).cast::<usize>() = value;
        libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, sig, &raw const si)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks a process to end (SIGTERM).
pub fn terminate(pid: i32) {
    // SAFETY: sending a signal; failure (gone already) is fine.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// Appends `len` bytes of `from` at `offset` to `to` (at its file position), copied by the
/// kernel (copy_file_range: no trip through a buffer of ours).
pub fn append_range(
    from: &std::fs::File,
    offset: u64,
    len: u64,
    to: &std::fs::File,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (mut at, end) = (offset as i64, offset + len);
    while (at as u64) < end {
        // SAFETY: two open files of ours; `at` is ours; the kernel advances `to`'s position.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut at,
                to.as_raw_fd(),
                std::ptr::null_mut(),
                (end - at as u64) as usize,
                0,
            )
        };
        match n {
            n if n > 0 => {}
            0 => return Err(io::Error::other("the range to copy ends early")),
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}

/// Frees `len` bytes of file `f` at `offset` (they read as zeros again), its size kept.
pub fn punch_hole(f: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on an open file of ours; no memory is passed.
    match unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// An anonymous in-memory file (memfd), close-on-exec unless `inherit`.
pub fn memfd(name: &std::ffi::CStr, inherit: bool) -> io::Result<std::fs::File> {
    let flags = if inherit { 0 } else { libc::MFD_CLOEXEC };
    // SAFETY: name is NUL-terminated; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Moves an open file to fd `min` or above, inheritable across exec; returns the new fd
/// (the File keeps the old one, which stays close-on-exec).
pub fn inheritable_fd(f: &std::fs::File, min: i32) -> io::Result<i32> {
    use std::os::fd::AsRawFd;
    inheritable_fd_of(f.as_raw_fd(), min)
}

/// Grows this process's fd table to hold fd `fd` now (its soft limit on open files raised
/// for it, as far as the hard limit allows). Grown when a new fd needs it, while another
/// thread of the process runs, the kernel first waits for an RCU grace period
/// (milliseconds, inside a freeze when it happens there).
pub fn grow_fd_table(fd: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit of this process's own limit, through a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur <= fd as u64 {
            lim.rlim_cur = lim.rlim_max.min(fd as u64 + 1);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    let fd = fd.min(lim.rlim_cur.saturating_sub(1).min(i32::MAX as u64) as i32);
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: a duplicate of an fd we hold, made at `fd` or above, closed at once.
    let dup = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, fd) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the duplicate was just made here and is owned by nothing else.
    unsafe { libc::close(dup) };
    Ok(())
}

/// As inheritable_fd, for any fd we hold.
pub fn inheritable_fd_of(fd: i32, min: i32) -> io::Result<i32> {
    // SAFETY: F_DUPFD on an fd we hold; the duplicate is deliberately left open for the
    // child to inherit (mig exits soon after).
    let fd = unsafe { libc::fcntl(fd, libc::F_DUPFD, min) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

/// Takes an fd inherited from the process that started us (named on the command line):
/// checked open, made close-on-exec (it goes no further), owned from now on.
pub fn take_inherited(fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: fcntl on a plain number: EBADF if it is not open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::other(format!(
            "fd {fd} is not an inherited open fd"
        )));
    }
    // SAFETY: open, and named to us alone: nothing else in this process owns it.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The memory of process `pid` at `addr`, as much as fills `data` (process_vm_readv: an
/// error, not a crash, where it is not mapped; another process's needs ptrace access).
pub fn read_memory(pid: i32, addr: u64, data: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: one local buffer of data.len() bytes we own; the remote range is only read,
    // and checked by the kernel.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    match n {
        n if n as usize == data.len() => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other(
            "a short read (part of the range is unmapped)",
        )),
    }
}

/// Whether `fd` has something to read (or its end) within `timeout`.
pub fn wait_readable(
    fd: &impl std::os::fd::AsRawFd,
    timeout: std::time::Duration,
) -> io::Result<bool> {
    Ok(wait_readable_any(&[fd.as_raw_fd()], timeout)?.is_some())
}

/// Which of `fds` (the first, by index) has something to read (or its end) within
/// `timeout`, if any; a negative fd is left out.
pub fn wait_readable_any(fds: &[i32], timeout: std::time::Duration) -> io::Result<Option<usize>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: pollfds of our own (poll skips negative fds).
    match unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) } {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        _ => Ok(p.iter().position(|p| p.revents != 0)),
    }
}

/// A pipe (close-on-exec) as (read, write) Files.
pub fn pipe() -> io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a 2-int out-array; the fds become Files we own.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd;
        Ok((
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        ))
    }
}

/// Grows a pipe to hold at least `bytes` (up to the system's limit).
pub fn grow_pipe(f: &std::fs::File, bytes: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ on a pipe we hold; failure leaves it as it was.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETPIPE_SZ, bytes as libc::c_int) };
}

/// A unix seqpacket socket pair (close-on-exec).
pub fn seqpacket_pair() -> io::Result<(
    std::os::unix::net::UnixStream,
    std::os::unix::net::UnixStream,
)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a 2-int out-array; the fds become sockets we own.
    unsafe {
        if libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd;
        Ok((
            std::os::unix::net::UnixStream::from_raw_fd(fds[0]),
            std::os::unix::net::UnixStream::from_raw_fd(fds[1]),
        ))
    }
}

/// A copy of fd `fd` of process `pid` (pidfd_getfd: needs the right to trace it).
pub fn fd_of(pid: i32, fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: raw pidfd_open and pidfd_getfd; each fd returned is owned here alone.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(got as i32))
    }
}

/// Sends `payload` with one fd attached (SCM_RIGHTS), or none when `fd` is negative.
pub fn send_fd(sock: i32, payload: &[u8], fd: i32) -> io::Result<()> {
    // SAFETY: msghdr with one iovec over payload and a control buffer sized for one fd.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr() as *mut _,
            iov_len: payload.len(),
        };
        let mut cbuf = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if fd >= 0 {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        }
        let sent = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        // The rest (a stream socket may take part of it), without the fd.
        let mut rest = &payload[sent as usize..];
        while !rest.is_empty() {
            let n = libc::send(sock, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL);
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
                continue;
            }
            rest = &rest[n as usize..];
        }
    }
    Ok(())
}

/// Receives one message and the fd attached to it (-1 if none): (payload length, fd).
pub fn recv_fd(sock: i32, payload: &mut [u8]) -> io::Result<(usize, i32)> {
    // SAFETY: as send_fd; the kernel writes at most the buffers' sizes.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        let mut cbuf = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        let fd = if !c.is_null() && (*c).cmsg_type == libc::SCM_RIGHTS {
            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>())
        } else {
            -1
        };
        Ok((n as usize, fd))
    }
}

/// An option's raw value (up to 64 bytes), or None when the kernel refuses it.
pub fn getsockopt_bytes(fd: i32, level: i32, name: i32) -> Option<Vec<u8>> {
    getsockopt_sized(fd, level, name, 64).ok()
}

/// getsockopt with a buffer of `size` bytes (some options insist on their exact size).
pub fn getsockopt_sized(fd: i32, level: i32, name: i32, size: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; size];
    let mut len = size as libc::socklen_t;
    // SAFETY: v and len are valid out-pointers of the sizes given.
    let r = unsafe { libc::getsockopt(fd, level, name, v.as_mut_ptr().cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    v.truncate((len as usize).min(size));
    Ok(v)
}

pub fn setsockopt_bytes(fd: i32, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: the kernel reads value.len() bytes from value.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn set_sockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    setsockopt_bytes(fd, level, name, &value.to_ne_bytes())
}

/// recv(MSG_PEEK | MSG_DONTWAIT): the length peeked, or None (nothing queued, or an error).
pub fn recv_peek(fd: i32, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    (n >= 0).then_some(n as usize)
}

/// A TCP socket's send queue: (bytes not yet acknowledged by its peer (SIOCOUTQ), of
/// which not even sent yet (SIOCOUTQNSD)).
/// The addresses of this host's (network namespace's) interfaces.
pub fn local_addresses() -> Vec<std::net::IpAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs makes a list that is only read here, each address as its family
    // says, and freed once.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut p = list;
        while let Some(i) = p.as_ref() {
            match i.ifa_addr.as_ref().map(|a| a.sa_family as i32) {
                Some(libc::AF_INET) => {
                    let a = &*i.ifa_addr.cast::<libc::sockaddr_in>();
                    out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))));
                }
                Some(libc::AF_INET6) => {
                    let a = &*i.ifa_addr.cast::<libc::sockaddr_in6>();
                    out.push(IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)));
                }
                _ => {}
            }
            p = i.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

pub fn send_queue_sizes(fd: i32) -> (u32, u32) {
    const SIOCOUTQNSD: libc::c_ulong = 0x894b;
    let (mut all, mut unsent): (libc::c_int, libc::c_int) = (0, 0);
    // SAFETY: both ioctls write one int.
    unsafe {
        if libc::ioctl(fd, libc::TIOCOUTQ, &mut all) != 0 {
            all = 0;
        }
        if libc::ioctl(fd, SIOCOUTQNSD, &mut unsent) != 0 {
            unsent = 0;
        }
    }
    (all.max(0) as u32, unsent.clamp(0, all.max(0)) as u32)
}

fn owned(fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned to us by the kernel and is owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// An eventfd holding `count` (the kernel's initial value is only 32 bits wide: the rest
/// is written).
pub fn eventfd(count: u64, flags: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: eventfd takes plain values.
    let fd = owned(unsafe { libc::eventfd(0, flags | libc::EFD_CLOEXEC) })?;
    if count > 0 {
        // SAFETY: writes the 8-byte counter increment eventfd expects.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&raw const count).cast(), 8) };
        if n != 8 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// A timerfd armed to fire in `value_ns` (0: disarmed), then every `interval_ns`.
pub fn timerfd(
    clock: i32,
    flags: i32,
    value_ns: u64,
    interval_ns: u64,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: timerfd_create takes plain values.
    let fd = owned(unsafe { libc::timerfd_create(clock, flags | libc::TFD_CLOEXEC) })?;
    let ts = |ns: u64| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as i64,
        tv_nsec: (ns % 1_000_000_000) as i64,
    };
    let spec = libc::itimerspec {
        it_interval: ts(interval_ns),
        it_value: ts(value_ns),
    };
    // SAFETY: spec is a valid itimerspec; the old value is not asked for.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A signalfd for the signals in `mask` (bit n-1 for signal n).
pub fn signalfd(mask: u64, flags: i32) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: the kernel reads an 8-byte signal set (the size passed).
    owned(unsafe {
        libc::syscall(
            libc::SYS_signalfd4,
            -1,
            &raw const mask,
            8,
            flags | libc::SFD_CLOEXEC,
        ) as i32
    })
}

pub fn inotify(flags: i32) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: inotify_init1 takes plain flags.
    owned(unsafe { libc::inotify_init1(flags | libc::IN_CLOEXEC) })
}

/// inotify_add_watch; returns the watch descriptor.
pub fn inotify_watch(fd: i32, path: &[u8], mask: u32) -> io::Result<i32> {
    let path =
        std::ffi::CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: path is NUL-terminated.
    let wd = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), mask) };
    if wd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(wd)
    }
}

pub fn inotify_unwatch(fd: i32, wd: i32) {
    // SAFETY: removes a watch of an inotify fd we hold; failure changes nothing.
    unsafe { libc::inotify_rm_watch(fd, wd) };
}

/// Sets an open file's status flags (O_APPEND, O_NONBLOCK, ...).
pub fn set_status_flags(fd: i32, flags: i32) -> io::Result<()> {
    // SAFETY: F_SETFL on an fd we hold.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn seek(fd: i32, offset: i64) -> io::Result<()> {
    // SAFETY: lseek on an fd we hold.
    if unsafe { libc::lseek(fd, offset, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The terminal `fd` is, as a process left it: (termios bytes, rows, cols, whether the
/// caller's process group is its foreground group). None if `fd` is no terminal.
pub fn tty_state(fd: i32) -> Option<crate::image::TtyState> {
    // SAFETY: termios and winsize are plain out-structs of the sizes the calls expect.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return None;
        }
        let mut w: libc::winsize = std::mem::zeroed();
        libc::ioctl(fd, libc::TIOCGWINSZ, &mut w);
        let bytes = std::slice::from_raw_parts(
            (&raw const t).cast::<u8>(),
            std::mem::size_of::<libc::termios>(),
        );
        Some(crate::image::TtyState {
            termios: bytes.to_vec(),
            rows: w.ws_row,
            cols: w.ws_col,
            foreground: libc::tcgetpgrp(fd) == libc::getpgrp(),
        })
    }
}

/// Puts saved terminal modes (tcgetattr bytes) on terminal `fd`.
pub fn set_termios(fd: i32, termios: &[u8]) -> io::Result<()> {
    if termios.len() != std::mem::size_of::<libc::termios>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the bytes are a termios of this very layout (checked by size), copied out.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        std::ptr::copy_nonoverlapping(termios.as_ptr(), (&raw mut t).cast::<u8>(), termios.len());
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A terminal's window size (rows, cols).
pub fn window_size(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: winsize is a plain out-struct.
    unsafe {
        let mut w: libc::winsize = std::mem::zeroed();
        (libc::ioctl(fd, libc::TIOCGWINSZ, &mut w) == 0).then_some((w.ws_row, w.ws_col))
    }
}

/// Sets a terminal's window size; the kernel signals SIGWINCH to its foreground group.
pub fn set_window_size(fd: i32, rows: u16, cols: u16) {
    let w = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &w) };
}

/// Takes a flock on an open file without waiting.
pub fn flock(fd: i32, write: bool) -> io::Result<()> {
    let op = if write { libc::LOCK_EX } else { libc::LOCK_SH };
    // SAFETY: flock on an fd we hold.
    if unsafe { libc::flock(fd, op | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes a POSIX record lock for the calling process without waiting (`end` None: to EOF).
pub fn posix_lock(fd: i32, write: bool, start: u64, end: Option<u64>) -> io::Result<()> {
    // SAFETY: a zeroed flock is valid; F_SETLK reads it.
    unsafe {
        let mut l: libc::flock = std::mem::zeroed();
        l.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
        l.l_whence = libc::SEEK_SET as i16;
        l.l_start = start as i64;
        l.l_len = end.map_or(0, |e| (e + 1 - start) as i64);
        if libc::fcntl(fd, libc::F_SETLK, &l) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A new pseudo-terminal: (master, slave path, its number). The master is close-on-exec.
pub fn pty_pair() -> io::Result<(std::fs::File, std::path::PathBuf, u32)> {
    // SAFETY: posix_openpt/grantpt/unlockpt on the fd we just got; TIOCGPTN writes one int.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd;
        let master = std::fs::File::from_raw_fd(m);
        let mut n: libc::c_uint = 0;
        if libc::grantpt(m) != 0
            || libc::unlockpt(m) != 0
            || libc::ioctl(m, libc::TIOCGPTN, &mut n) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok((master, format!("/dev/pts/{n}").into(), n))
    }
}

/// Bytes waiting to be read on a terminal or pipe (FIONREAD).
pub fn readable_bytes(fd: i32) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r == 0 { n.max(0) as usize } else { 0 }
}

/// Makes terminal `fd` the calling session leader's controlling terminal.
pub fn take_controlling_tty(fd: i32) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal).
    if unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The foreground process group of terminal `fd` (the caller's terminal), if any.
pub fn foreground_group(fd: i32) -> Option<i32> {
    // SAFETY: tcgetpgrp only queries.
    let g = unsafe { libc::tcgetpgrp(fd) };
    (g > 0).then_some(g)
}

pub fn set_foreground_group(fd: i32, pgid: i32) -> io::Result<()> {
    // SAFETY: tcsetpgrp takes plain values.
    if unsafe { libc::tcsetpgrp(fd, pgid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `data` to a terminal as raw output (output processing off meanwhile, so that it
/// reaches the other side exactly as given).
pub fn write_raw_output(tty: &mut std::fs::File, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let fd = tty.as_raw_fd();
    // SAFETY: termios is a plain struct tcgetattr fills.
    let old = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        t
    };
    let mut raw = old;
    raw.c_oflag &= !libc::OPOST;
    // SAFETY: setting termios values we read and changed.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) };
    let written = tty.write_all(data);
    // SAFETY: as above, the old modes.
    unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &old) };
    written
}

/// Reads up to `n` bytes from an fd we do not own (the caller knows they are there).
pub fn read_some(fd: i32, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    // SAFETY: the kernel writes at most n bytes into buf.
    let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), n) };
    buf.truncate(got.max(0) as usize);
    buf
}

/// A new System V shared memory segment (IPC_EXCL: never someone else's): its id.
pub fn sysv_create(key: i32, size: u64, mode: u32) -> io::Result<i32> {
    let key = if key == 0 { libc::IPC_PRIVATE } else { key };
    // SAFETY: shmget takes plain values.
    let id = unsafe {
        libc::shmget(
            key,
            size as usize,
            libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as i32,
        )
    };
    if id < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(id)
    }
}

/// Runs `f` on the memory of segment `id`, attached for the moment.
pub fn sysv_fill(id: i32, size: u64, f: impl FnOnce(&mut [u8])) -> io::Result<()> {
    // SAFETY: a fresh attachment of `size` bytes, ours until the shmdt below.
    unsafe {
        let p = libc::shmat(id, std::ptr::null(), 0);
        if p as isize == -1 {
            return Err(io::Error::last_os_error());
        }
        f(std::slice::from_raw_parts_mut(
            p.cast::<u8>(),
            size as usize,
        ));
        libc::shmdt(p);
    }
    Ok(())
}

/// Marks a segment for removal (it goes once no process has it attached).
pub fn sysv_remove(id: i32) {
    // SAFETY: IPC_RMID takes no buffer.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
}

/// Makes a socket buffer (SO_RCVBUF or SO_SNDBUF) hold at least `bytes` more than its
/// default: the privileged form first (past net.core.*mem_max), else the plain one.
pub fn ensure_buffer(fd: i32, which: i32, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let force = if which == libc::SO_RCVBUF {
        libc::SO_RCVBUFFORCE
    } else {
        libc::SO_SNDBUFFORCE
    };
    let want = (bytes * 2 + (256 << 10)).min(i32::MAX as usize) as i32;
    if sockopt_int(fd, which).is_ok_and(|now| now >= want) {
        return;
    }
    if set_sockopt_int(fd, libc::SOL_SOCKET, force, want).is_err() {
        let _ = set_sockopt_int(fd, libc::SOL_SOCKET, which, want);
    }
}

/// The read positions (d_off) of a directory's entries in order, as getdents64 gives them,
/// reading `dir` from its start (at most `max` entries).
pub fn dir_positions(dir: &std::fs::File, max: usize) -> Vec<i64> {
    use std::os::fd::AsRawFd;
    let fd = dir.as_raw_fd();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 << 10];
    // SAFETY: getdents64 writes at most buf.len() bytes of records into buf; each record is
    // read within the length the kernel returned (d_off at 8, d_reclen at 16).
    unsafe {
        libc::lseek(fd, 0, libc::SEEK_SET);
        while out.len() < max {
            let n = libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len());
            if n <= 0 {
                break;
            }
            let mut at = 0usize;
            while at + 19 <= n as usize && out.len() < max {
                let off = i64::from_ne_bytes(buf[at + 8..at + 16].try_into().unwrap_or([0; 8]));
                let len = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
                out.push(off);
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }
    out
}

/// Whether fd `a` of process `pa` and fd `b` of process `pb` are one open file (kcmp
/// KCMP_FILE: same offset and status flags, as after dup or fork). False when unsure.
pub fn same_open_file(pa: i32, a: i32, pb: i32, b: i32) -> bool {
    const KCMP_FILE: i64 = 0;
    // SAFETY: kcmp only compares kernel objects; no memory is passed.
    unsafe { libc::syscall(libc::SYS_kcmp, pa, pb, KCMP_FILE, a, b) == 0 }
}

/// A whole file mapped read-only (prefaulted), unmapped when dropped.
pub struct MappedFile {
    ptr: *mut u8,
    len: usize,
}

impl MappedFile {
    /// `populate`: its page tables made at once (cheaper than a fault per page when all of
    /// it is read; a waste when little is).
    pub fn new(f: &std::fs::File, populate: bool) -> io::Result<MappedFile> {
        use std::os::fd::AsRawFd;
        let len = f.metadata()?.len() as usize;
        if len == 0 {
            return Ok(MappedFile {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a fresh private read-only mapping of the whole file; it lives until Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | if populate { libc::MAP_POPULATE } else { 0 },
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MappedFile { ptr: p.cast(), len })
    }

    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: ptr maps len readable bytes for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping what new() mapped; no slice of it outlives self.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

/// A command that only prints ends quietly when its reader goes away (`mig ps | head`),
/// as Unix tools do, instead of failing on EPIPE. (Rust ignores SIGPIPE by default.)
pub fn quiet_broken_pipe() {
    // SAFETY: setting SIGPIPE's disposition back to the default.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Whether `dir` is on a tmpfs (its files' pages live in memory, and making one never waits
/// for a disk file system's journal).
pub fn on_tmpfs(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct given; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    }
}
