//! What a socket holds beyond its addresses, captured at a checkpoint and put back on
//! restore: the bytes its owner has not read yet and the options it was given.
//!
//! Unread bytes are peeked (`MSG_PEEK` with a moving `SO_PEEK_OFF`), never consumed, so the
//! running session is untouched. They are put back by sending them from the rebuilt peer.
//! Kept for unix sockets and TCP; a UDP queue is not (its sender's address cannot be
//! forged without privileges, and UDP may lose datagrams anyway).

use crate::record::Bytes;
use crate::sockaddr::SockAddr;
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
    /// A TCP socket's send queue, if it had bytes it had not sent yet (e.g. while the
    /// peer's receive window was full): read in repair mode (root); what the peer had not
    /// taken goes again after the peer's unread bytes on restore (`after_peer`).
    pub unsent: Bytes,
    /// How many of its last bytes were not sent yet.
    pub not_sent: u32,
    /// The TCP sequence number just after the last byte of `unsent`, and the one just
    /// after the last of `unread` (root): the two ends are read one after the other, and
    /// what went from one to the other meanwhile is in both.
    pub sent_upto: Option<u32>,
    pub received_upto: Option<u32>,
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
    (id, domain, ty): (u64, i32, i32),
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
    let tcp = domain != libc::AF_UNIX && ty == libc::SOCK_STREAM && !listening;
    // (A TCP receive queue may grow while it is read: where it is known to end is known
    // only if it did not.)
    let mut received_upto = None;
    let unread = if listening || !keeps_data {
        Vec::new()
    } else if tcp {
        let mut tries = 0;
        loop {
            let before = crate::tcprepair::next_received(fd);
            let unread = peek_all(fd, true);
            let after = crate::tcprepair::next_received(fd);
            tries += 1;
            if before == after || tries == 10 {
                received_upto = before.filter(|_| before == after);
                break unread;
            }
        }
    } else {
        peek_all(fd, false)
    };
    // Only what was never sent: bytes sent but not acknowledged yet are in the peer's
    // receive queue already (between processes of one host nothing is lost on the way),
    // where they are captured as its unread bytes.
    // The whole send queue, and where it ends: its part the peer has already is told by
    // the peer's `received_upto` (without that, only the part not sent yet goes again).
    let not_sent = if tcp { sys::send_queue_sizes(fd).1 } else { 0 };
    let (queue, sent_upto) = match not_sent {
        0 => (Vec::new(), None),
        _ => crate::tcprepair::peek_send_queue(fd)
            .map_or((Vec::new(), None), |(q, end)| (q, Some(end))),
    };
    let captured = queue.len() as u32 >= not_sent;
    let not_sent = not_sent.min(queue.len() as u32);
    Ok(SocketState {
        id,
        unread,
        options,
        unsent_lost: if captured { 0 } else { not_sent },
        unsent: Bytes(queue),
        not_sent,
        sent_upto,
        received_upto,
        ..Default::default()
    })
}

impl SocketState {
    /// What of `unsent` is sent again on restore, after the peer's unread bytes (`peer`):
    /// from where the peer's queue ended, where both ends' sequence numbers say so; else
    /// the bytes not sent yet (the others are in the peer's queue, unless it took them
    /// after it was read: then they are lost — settle() makes that rare).
    pub fn after_peer(&self, peer: Option<&SocketState>) -> &[u8] {
        let data = &self.unsent.0;
        let tail = &data[data.len() - (self.not_sent as usize).min(data.len())..];
        let ends = (self.sent_upto, peer.and_then(|p| p.received_upto));
        let (Some(end), Some(received)) = ends else {
            return tail;
        };
        let start = end.wrapping_sub(data.len() as u32);
        match received.wrapping_sub(start) as i32 {
            ..0 => tail,
            taken => data.get(taken as usize..).unwrap_or_default(),
        }
    }
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

/// Whether a connection to `peer` can have its other end in the session too, so that
/// both ends' queues are captured and must be `settle`d first: `peer` is a loopback
/// address or one of `local` (this host's). (A connection to elsewhere is captured whole
/// at this end, in TCP repair mode, or not at all.)
pub fn peer_may_be_here(peer: Option<&SockAddr>, local: &[std::net::IpAddr]) -> bool {
    use std::net::IpAddr;
    let ip = match peer {
        Some(SockAddr::V4 { ip, .. }) => IpAddr::from(*ip),
        Some(SockAddr::V6 { ip, .. }) => IpAddr::from(*ip).to_canonical(),
        _ => return false,
    };
    ip.is_loopback() || local.contains(&ip)
}

/// Waits (at most `patience`) until the TCP sockets `fds` (of a frozen session) have no
/// data on the way: every byte they sent acknowledged — so in its receiver's queue — and
/// what is left unsent no longer moving (the peer's window is full). Only then do a
/// receiver's unread bytes and a sender's queue add up to what was written, whichever is
/// captured first. A session just restored may still be pouring bytes back in.
pub fn settle(fds: &[i32], patience: std::time::Duration) {
    use std::time::{Duration, Instant};
    let t = Instant::now();
    let (mut last, mut since): (Vec<(u32, u32)>, Instant) = (Vec::new(), t);
    loop {
        let now: Vec<(u32, u32)> = fds.iter().map(|&fd| sys::send_queue_sizes(fd)).collect();
        if now != last {
            (last, since) = (now, Instant::now());
        }
        // Looked at often (an acknowledgement comes within a fraction of a millisecond
        // on a local link, and the session is frozen meanwhile); what is left unsent is
        // taken as not moving once it stayed the same for a millisecond; nothing queued at
        // all is settled at once.
        let acked = last.iter().all(|(all, not_sent)| all == not_sent);
        let empty = last.iter().all(|&(all, _)| all == 0);
        let still = since.elapsed() >= Duration::from_millis(1);
        if (acked && (empty || still)) || t.elapsed() > patience {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
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

    #[test]
    fn only_connections_that_can_end_in_the_session_are_settled() {
        let local = [std::net::IpAddr::from([10, 78, 0, 1])];
        let v4 = |ip| Some(SockAddr::V4 { ip, port: 80 });
        let mapped = |v4: [u8; 4]| {
            let mut ip = [0u8; 16];
            ip[10..12].copy_from_slice(&[0xff, 0xff]);
            ip[12..].copy_from_slice(&v4);
            Some(SockAddr::V6 { ip, port: 80 })
        };
        let mut v6_loopback = [0u8; 16];
        v6_loopback[15] = 1;
        let here = |p: Option<SockAddr>| peer_may_be_here(p.as_ref(), &local);
        assert!(here(v4([127, 0, 0, 1])));
        assert!(here(v4([127, 1, 2, 3])));
        assert!(here(v4([10, 78, 0, 1])));
        assert!(here(mapped([10, 78, 0, 1])));
        assert!(here(mapped([127, 0, 0, 1])));
        assert!(here(Some(SockAddr::V6 {
            ip: v6_loopback,
            port: 80
        })));
        assert!(!here(v4([10, 78, 0, 2])));
        assert!(!here(mapped([10, 78, 0, 2])));
        assert!(!here(None));
        // (This host's own, as getifaddrs lists them: loopback's at least.)
        assert!(sys::local_addresses().iter().any(|a| a.is_loopback()));
    }

    /// A plain unix socket's state.
    fn unix(fd: i32, id: u64, ty: i32) -> SocketState {
        capture(fd, (id, libc::AF_UNIX, ty), false, false).unwrap()
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

    #[test]
    fn what_the_peer_took_after_the_sender_was_read_is_not_sent_twice() {
        // The sender's queue: 10 bytes ending at sequence 1000 (990..1000), the last 6 not
        // sent yet when read.
        let sender = SocketState {
            unsent: Bytes((0..10).collect()),
            not_sent: 6,
            sent_upto: Some(1000),
            ..Default::default()
        };
        let peer = |received| SocketState {
            received_upto: received,
            ..Default::default()
        };
        // The peer, read later, had taken up to 996: only what lies after goes.
        assert_eq!(sender.after_peer(Some(&peer(Some(996)))), [6, 7, 8, 9]);
        assert_eq!(sender.after_peer(Some(&peer(Some(1000)))), [] as [u8; 0]);
        assert_eq!(
            sender.after_peer(Some(&peer(Some(990)))),
            (0..10).collect::<Vec<u8>>()
        );
        // Across the wrap of sequence numbers.
        let wrapped = SocketState {
            sent_upto: Some(4),
            ..sender.clone()
        };
        assert_eq!(wrapped.after_peer(Some(&peer(Some(2)))), [8, 9]);
        // Without the peer's sequence number, or behind the queue: the part not sent.
        assert_eq!(sender.after_peer(Some(&peer(None))), [4, 5, 6, 7, 8, 9]);
        assert_eq!(sender.after_peer(None), [4, 5, 6, 7, 8, 9]);
        assert_eq!(
            sender.after_peer(Some(&peer(Some(900)))),
            [4, 5, 6, 7, 8, 9]
        );
    }
}
