//! Sockets: how each was made, bound, connected, accepted and shut down is journaled; its
//! session-unique id is handed out by the session table (by inode) when the table is read.

use super::process::to_virtual;
use crate::state::{errno, record};
use libc::{c_int, c_void, sockaddr, socklen_t};
use migrt::record::Record;
use migrt::sockaddr::SockAddr;

/// The caller's address argument (valid for `len` bytes, libc's contract).
unsafe fn addr_of(addr: *const sockaddr, len: socklen_t) -> SockAddr {
    if addr.is_null() {
        return SockAddr::Unnamed;
    }
    SockAddr::from_bytes(std::slice::from_raw_parts(addr.cast::<u8>(), len as usize))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int {
    let fd = real!(socket: fn(c_int, c_int, c_int) -> c_int)(domain, ty, protocol);
    if fd >= 0 {
        record(|| Record::Socket {
            fd,
            domain,
            ty,
            protocol,
        });
    }
    fd
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn socketpair(
    domain: c_int,
    ty: c_int,
    protocol: c_int,
    sv: *mut c_int,
) -> c_int {
    let r =
        real!(socketpair: fn(c_int, c_int, c_int, *mut c_int) -> c_int)(domain, ty, protocol, sv);
    if r == 0 {
        let fds = [*sv, *sv.add(1)];
        record(|| Record::SocketPair {
            fds,
            domain,
            ty,
            protocol,
        });
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    accept4(fd, addr, len, 0)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    let new = real!(accept4: fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int)(
        fd, addr, len, flags,
    );
    if new >= 0 {
        record(|| Record::Accept {
            listener: fd,
            fd: new,
            flags,
        });
    }
    new
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let r = real!(bind: fn(c_int, *const sockaddr, socklen_t) -> c_int)(fd, addr, len);
    if r == 0 {
        let a = addr_of(addr, len);
        record(|| Record::Bind { fd, addr: a });
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    let r = real!(listen: fn(c_int, c_int) -> c_int)(fd, backlog);
    if r == 0 {
        record(|| Record::Listen { fd, backlog });
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let r = real!(connect: fn(c_int, *const sockaddr, socklen_t) -> c_int)(fd, addr, len);
    if r == 0 || errno() == libc::EINPROGRESS {
        let a = addr_of(addr, len);
        record(|| Record::Connect { fd, addr: a });
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    let r = real!(shutdown: fn(c_int, c_int) -> c_int)(fd, how);
    if r == 0 {
        record(|| Record::Shutdown { fd, how });
    }
    r
}

/// SO_PEERCRED answers the peer's pid: virtual when the peer is in the session.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    let r = real!(getsockopt: fn(c_int, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int)(
        fd, level, name, val, len,
    );
    if r == 0
        && level == libc::SOL_SOCKET
        && name == libc::SO_PEERCRED
        && !val.is_null()
        && *len as usize >= std::mem::size_of::<libc::ucred>()
    {
        let cred = val.cast::<libc::ucred>();
        (*cred).pid = to_virtual((*cred).pid);
    }
    r
}
