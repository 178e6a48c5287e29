//! What a socket holds beyond its addresses, captured at a checkpoint and put back on
//! restore: the bytes its owner has not read yet and the options it was given.
//!
//! Unread bytes are peeked (`MSG_PEEK` with a moving `SO_PEEK_OFF`), never consumed, so the
//! running session is untouched. They are put back by sending them from the rebuilt peer.
//! Kept for unix sockets and TCP; a UDP queue is not (its sender's address cannot be
//! forged without privileges, and UDP may lose datagrams anyway).

use crate::record::Bytes;
use crate::sys;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SocketState {
    /// The session-wide socket id (table::SocketInfo::id).
    pub id: u64,
    /// Unread data: one entry per message (datagram, seqpacket), or one for a stream.
    pub unread: Vec<Bytes>,
    /// (level, option, value as the kernel gave it)
    pub options: Vec<(i32, i32, Bytes)>,
    /// Bytes a TCP socket had not sent yet (the tail of its send queue, e.g. while the
    /// peer's receive window was full): read in repair mode (root), sent again after the
    /// peer's unread bytes on restore.
    pub unsent: Bytes,
    /// How many of those could not be read (no CAP_NET_ADMIN): lost, and said so.
    pub unsent_lost: u32,
    /// A connection to a peer outside the session, handed over whole (its address moves
    /// with the session): read in repair mode, where its socket stays (tcprepair.rs).
    pub handover: Option<crate::tcprepair::TcpRepair>,
}

/// Options put back on a rebuilt socket (before it is bound, so that e.g. SO_REUSEADDR
/// and IPV6_V6ONLY take effect as they did).
const OPTIONS: &[(i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_PASSCRED),
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
    (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::SOL_SOCKET, libc::SO_PRIORITY),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
];

fn applies(level: i32, domain: i32, ty: i32) -> bool {
    match level {
        libc::IPPROTO_TCP => domain != libc::AF_UNIX && ty == libc::SOCK_STREAM,
        libc::IPPROTO_IPV6 => domain == libc::AF_INET6,
        _ => true,
    }
}

/// Captures socket `fd` of the calling process (all of the session frozen). `listening`
/// sockets have no data of their own. A connection to be handed over (`handover`) is read
/// in repair mode and left in it; that can fail (no CAP_NET_ADMIN, not established).
pub fn capture(
    fd: i32,
    id: u64,
    domain: i32,
    ty: i32,
    listening: bool,
    handover: bool,
) -> std::io::Result<SocketState> {
    let options = OPTIONS
        .iter()
        .filter(|(level, _)| applies(*level, domain, ty))
        .filter_map(|&(level, name)| {
            Some((level, name, Bytes(sys::getsockopt_bytes(fd, level, name)?)))
        })
        .collect();
    if handover {
        crate::tcprepair::enter(fd)?;
        return Ok(SocketState {
            id,
            options,
            handover: Some(crate::tcprepair::capture(fd)?),
            ..Default::default()
        });
    }
    let keeps_data = domain == libc::AF_UNIX || ty == libc::SOCK_STREAM;
    let unread = if listening || !keeps_data {
        Vec::new()
    } else {
        peek_all(fd, ty == libc::SOCK_STREAM)
    };
    // Only what was never sent: bytes sent but not acknowledged yet are in the peer's
    // receive queue already (between processes of one host nothing is lost on the way),
    // where they are captured as its unread bytes.
    let (queued, not_sent) = if domain != libc::AF_UNIX && ty == libc::SOCK_STREAM && !listening {
        sys::send_queue_sizes(fd)
    } else {
        (0, 0)
    };
    let mut unsent = if not_sent > 0 {
        crate::tcprepair::peek_send_queue(fd, queued as usize).unwrap_or_default()
    } else {
        Vec::new()
    };
    let captured = unsent.len() as u32 >= not_sent;
    unsent.drain(..unsent.len().saturating_sub(not_sent as usize));
    Ok(SocketState {
        id,
        unread,
        options,
        unsent_lost: if captured { 0 } else { not_sent },
        unsent: Bytes(unsent),
        handover: None,
    })
}

/// Every unread message (or the stream's bytes, as one), without consuming any.
fn peek_all(fd: i32, stream: bool) -> Vec<Bytes> {
    let Some(old_off) = sys::sockopt_int(fd, libc::SO_PEEK_OFF).ok() else {
        return Vec::new();
    };
    if sys::set_sockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).is_err() {
        return Vec::new();
    }
    let mut out: Vec<Bytes> = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    // A bound on the number of messages: the queue cannot grow while frozen, but an
    // empty datagram does not move the peek offset.
    for _ in 0..1_000_000 {
        match sys::recv_peek(fd, &mut buf) {
            Some(n) if n > 0 || !stream => {
                let got = &buf[..n];
                match (stream, out.last_mut()) {
                    (true, Some(last)) => last.0.extend_from_slice(got),
                    _ => out.push(Bytes(got.to_vec())),
                }
                if n == 0 {
                    break; // an empty datagram: offsets do not pass it
                }
            }
            _ => break,
        }
    }
    let _ = sys::set_sockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old_off);
    out
}

/// Waits (at most `patience`) until the TCP sockets `fds` (of a frozen session) have no
/// data on the way: every byte they sent acknowledged — so in its receiver's queue — and
/// what is left unsent no longer moving (the peer's window is full). Only then do a
/// receiver's unread bytes and a sender's queue add up to what was written, whichever is
/// captured first. A session just restored may still be pouring bytes back in.
pub fn settle(fds: &[i32], patience: std::time::Duration) {
    let t = std::time::Instant::now();
    let mut last: Vec<(u32, u32)> = Vec::new();
    loop {
        let now: Vec<(u32, u32)> = fds.iter().map(|&fd| sys::send_queue_sizes(fd)).collect();
        let quiet = now.iter().all(|(all, not_sent)| all == not_sent) && now == last;
        if quiet || t.elapsed() > patience {
            return;
        }
        last = now;
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Puts the captured options on a rebuilt socket; returns the ones the kernel refused.
pub fn apply_options(fd: i32, state: &SocketState) -> Vec<(i32, i32)> {
    state
        .options
        .iter()
        .filter(|(level, name, value)| sys::setsockopt_bytes(fd, *level, *name, &value.0).is_err())
        .map(|(l, n, _)| (*l, *n))
        .collect()
}

/// Makes closing a TCP socket send a reset instead of a FIN, so that no TIME_WAIT is left
/// holding its address (for a session that ends because it moves).
pub fn abort_on_close(fd: i32) {
    // struct linger { int l_onoff = 1; int l_linger = 0; }
    let linger = [1i32.to_ne_bytes(), 0i32.to_ne_bytes()].concat();
    let _ = sys::setsockopt_bytes(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixDatagram, UnixStream};

    /// A plain unix socket's state.
    fn unix(fd: i32, id: u64, ty: i32) -> SocketState {
        capture(fd, id, libc::AF_UNIX, ty, false, false).unwrap()
    }

    #[test]
    fn peeks_stream_and_datagrams_without_consuming() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"hello ").unwrap();
        a.write_all(b"world").unwrap();
        let s = unix(b.as_raw_fd(), 7, libc::SOCK_STREAM);
        assert_eq!(s.unread, vec![Bytes(b"hello world".to_vec())]);
        let again = unix(b.as_raw_fd(), 7, libc::SOCK_STREAM);
        assert_eq!(again.unread, s.unread, "peeking consumed data");

        let (c, d) = UnixDatagram::pair().unwrap();
        for m in [&b"one"[..], b"two", b"three"] {
            c.send(m).unwrap();
        }
        let s = unix(d.as_raw_fd(), 8, libc::SOCK_DGRAM);
        let msgs: Vec<&[u8]> = s.unread.iter().map(|m| m.0.as_slice()).collect();
        assert_eq!(msgs, vec![&b"one"[..], b"two", b"three"]);
        let mut buf = [0u8; 16];
        let n = d.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"one");
    }
}
