//! TCP repair mode (Linux, CAP_NET_ADMIN): an established connection to a peer outside the
//! session is read out on the source — sequence numbers, both queues, the options agreed
//! at its handshake, its window — and made again on the target as the same connection,
//! without a handshake and without the peer noticing more than a pause.
//!
//! While a socket is in repair mode the kernel sends nothing on it, and closing it sends
//! neither FIN nor reset. The source keeps its handed-over sockets in repair mode until
//! the migration ends: closed silently when the session stops, or let out again (with a
//! window probe, so the peer resumes at once) when the migration fails and it thaws.

use crate::record::Bytes;
use crate::sys;
use serde::{Deserialize, Serialize};
use std::io;

const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const NO_QUEUE: i32 = 0;
const RECV_QUEUE: i32 = 1;
const SEND_QUEUE: i32 = 2;
const TCP_ESTABLISHED: u8 = 1;
/// Leaving repair mode without the window probe.
const REPAIR_OFF_NO_WP: i32 = -1;

// TCP_INFO: tcpi_options at byte 5, then snd_wscale (low nibble) and rcv_wscale (high).
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
// TCP_REPAIR_OPTIONS codes (struct tcp_repair_opt { u32 code; u32 value; }).
const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;

/// An established TCP connection as repair mode shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpRepair {
    /// The sequence number after the last byte queued to send (write_seq).
    pub send_seq: u32,
    /// The sequence number of the next byte expected from the peer (rcv_nxt).
    pub recv_seq: u32,
    /// Everything in the send queue: sent and not acknowledged, then not sent yet.
    pub send_queue: Bytes,
    /// How many bytes at the end of `send_queue` were never sent.
    pub unsent: u32,
    /// The receive queue: bytes the owner had not read.
    pub recv_queue: Bytes,
    pub mss: u32,
    /// TCPI_OPT_* agreed at the handshake.
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// The connection's TCP timestamp clock.
    pub timestamp: u32,
    /// struct tcp_repair_window: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
}

fn tcp(fd: i32, name: i32, value: i32) -> io::Result<()> {
    sys::set_sockopt_int(fd, libc::IPPROTO_TCP, name, value)
}

/// A TCP option of `size` bytes.
fn tcp_bytes(fd: i32, name: i32, size: usize, what: &str) -> io::Result<Vec<u8>> {
    sys::getsockopt_sized(fd, libc::IPPROTO_TCP, name, size)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {what}: {e}")))
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    b.get(i * 4..i * 4 + 4)
        .map_or(0, |w| u32::from_ne_bytes(w.try_into().unwrap_or_default()))
}

/// Puts socket `fd` in repair mode (and leaves it there). One that mig put in repair mode
/// already (through its own copy: a process without CAP_NET_ADMIN may not) is taken as it is.
pub fn enter(fd: i32) -> io::Result<()> {
    let repairing = || tcp_bytes(fd, TCP_REPAIR_WINDOW, 20, "the window").is_ok();
    tcp(fd, libc::TCP_REPAIR, 1)
        .or_else(|e| match repairing() {
            true => Ok(()),
            false => Err(e),
        })
        .map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::EPERM) {
                " (needs CAP_NET_ADMIN: run the session as root)"
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("TCP repair mode refused: {e}{why}"))
        })
}

/// Lets socket `fd` out of repair mode; with `probe` it sends a window probe at once, so
/// that the peer resumes without waiting for its retransmission timer.
pub fn leave(fd: i32, probe: bool) {
    let _ = tcp(fd, TCP_REPAIR_QUEUE, NO_QUEUE);
    let _ = tcp(
        fd,
        libc::TCP_REPAIR,
        if probe { 0 } else { REPAIR_OFF_NO_WP },
    );
}

/// Peeks `len` bytes of queue `queue` of a socket in repair mode.
fn peek_queue(fd: i32, queue: i32, len: usize) -> io::Result<Vec<u8>> {
    tcp(fd, TCP_REPAIR_QUEUE, queue)?;
    let mut buf = vec![0u8; len];
    let got = if len == 0 {
        Some(0)
    } else {
        sys::recv_peek(fd, &mut buf)
    };
    buf.truncate(got.ok_or_else(io::Error::last_os_error)?);
    Ok(buf)
}

fn queue_seq(fd: i32, queue: i32) -> io::Result<u32> {
    tcp(fd, TCP_REPAIR_QUEUE, queue)?;
    Ok(u32_at(
        &tcp_bytes(fd, TCP_QUEUE_SEQ, 4, "a queue's sequence number")?,
        0,
    ))
}

/// A TCP socket's send queue, read without consuming it, and the sequence number just
/// after its last byte (fixed while its owner writes nothing): repair mode is entered and
/// left again (without a window probe). None without CAP_NET_ADMIN.
pub fn peek_send_queue(fd: i32) -> Option<(Vec<u8>, u32)> {
    let (queued, _) = sys::send_queue_sizes(fd);
    tcp(fd, libc::TCP_REPAIR, 1).ok()?;
    let got = peek_queue(fd, SEND_QUEUE, queued as usize)
        .and_then(|data| Ok((data, queue_seq(fd, SEND_QUEUE)?)));
    leave(fd, false);
    got.ok()
}

/// The sequence number a TCP socket expects next (just after its last unread byte), read
/// in repair mode (entered and left again). None without CAP_NET_ADMIN.
pub fn next_received(fd: i32) -> Option<u32> {
    tcp(fd, libc::TCP_REPAIR, 1).ok()?;
    let seq = queue_seq(fd, RECV_QUEUE);
    leave(fd, false);
    seq.ok()
}

/// Reads established connection `fd`, which must be in repair mode (`enter`); it stays so.
pub fn capture(fd: i32) -> io::Result<TcpRepair> {
    let info = tcp_bytes(fd, libc::TCP_INFO, 8, "TCP_INFO")?;
    if info.first() != Some(&TCP_ESTABLISHED) {
        return Err(io::Error::other(format!(
            "the connection is not established (TCP state {}): only established connections are handed over",
            info.first().copied().unwrap_or(0)
        )));
    }
    let (queued, unsent) = sys::send_queue_sizes(fd);
    let inq = sys::readable_bytes(fd);
    let window = tcp_bytes(fd, TCP_REPAIR_WINDOW, 20, "the window")?;
    let r = TcpRepair {
        send_seq: queue_seq(fd, SEND_QUEUE)?,
        recv_seq: queue_seq(fd, RECV_QUEUE)?,
        send_queue: Bytes(peek_queue(fd, SEND_QUEUE, queued as usize)?),
        unsent,
        recv_queue: Bytes(peek_queue(fd, RECV_QUEUE, inq)?),
        mss: u32_at(&tcp_bytes(fd, libc::TCP_MAXSEG, 4, "the MSS")?, 0),
        options: info.get(5).copied().unwrap_or(0),
        snd_wscale: info.get(6).map_or(0, |b| b & 0xf),
        rcv_wscale: info.get(6).map_or(0, |b| b >> 4),
        timestamp: u32_at(&tcp_bytes(fd, TCP_TIMESTAMP, 4, "the timestamp")?, 0),
        window: std::array::from_fn(|i| u32_at(&window, i)),
    };
    tcp(fd, TCP_REPAIR_QUEUE, NO_QUEUE)?;
    if r.send_queue.0.len() != queued as usize || r.recv_queue.0.len() != inq {
        return Err(io::Error::other("a queue changed while it was read"));
    }
    Ok(r)
}

/// Puts `data` into queue `queue` of a socket in repair mode (the receive queue: as if
/// received; the send queue: as if sent and not acknowledged yet).
fn fill_queue(fd: i32, queue: i32, data: &[u8]) -> io::Result<()> {
    tcp(fd, TCP_REPAIR_QUEUE, queue)?;
    let mut at = 0;
    while at < data.len() {
        // SAFETY: the kernel reads at most the given length from the slice.
        let n = unsafe {
            libc::send(
                fd,
                data[at..].as_ptr().cast(),
                data.len() - at,
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("putting {} bytes back into a TCP queue: {e}", data.len()),
            ));
        }
        at += n as usize;
    }
    Ok(())
}

/// Makes fresh TCP socket `fd` the connection `r` from `local` to `peer` again (it enters
/// repair mode, binds, connects without a handshake, gets its queues, options and window
/// back), left in repair mode: `go_live` lets it out once nothing can fail any more. (Out
/// of repair mode it acknowledges what its peer sends: if the restore failed then, the
/// peer would not send that again to the session going on where it came from.)
pub fn rebuild(
    sock: &socket2::Socket,
    r: &TcpRepair,
    local: &socket2::SockAddr,
    peer: &socket2::SockAddr,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    enter(fd)?;
    let step = |what: &str, res: io::Result<()>| {
        res.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
    };
    step("binding", sock.bind(local))?;
    let recv_start = r.recv_seq.wrapping_sub(r.recv_queue.0.len() as u32);
    let send_start = r.send_seq.wrapping_sub(r.send_queue.0.len() as u32);
    step(
        "setting the receive sequence",
        set_queue_seq(fd, RECV_QUEUE, recv_start),
    )?;
    step(
        "setting the send sequence",
        set_queue_seq(fd, SEND_QUEUE, send_start),
    )?;
    step("connecting (repair mode)", sock.connect(peer))?;
    step("setting the options", set_options(fd, r))?;
    if r.options & TCPI_OPT_TIMESTAMPS != 0 {
        step(
            "setting the timestamp",
            tcp(fd, TCP_TIMESTAMP, r.timestamp as i32),
        )?;
    }
    let sent = r.send_queue.0.len() - unsent(r).len();
    fill_queue(fd, RECV_QUEUE, &r.recv_queue.0)?;
    fill_queue(fd, SEND_QUEUE, &r.send_queue.0[..sent])?;
    let window: Vec<u8> = r.window.iter().flat_map(|w| w.to_ne_bytes()).collect();
    step(
        "setting the window",
        sys::setsockopt_bytes(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &window),
    )?;
    Ok(())
}

/// The bytes of `r`'s send queue its peer was never sent.
pub fn unsent(r: &TcpRepair) -> &[u8] {
    let q = &r.send_queue.0;
    &q[q.len() - (r.unsent as usize).min(q.len())..]
}

/// Lets a rebuilt connection out of repair mode with a window probe; its `unsent` bytes
/// are sent afterwards, as the application's.
pub fn go_live(sock: &socket2::Socket, unsent: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    leave(sock.as_raw_fd(), true);
    let mut rest = unsent;
    while !rest.is_empty() {
        let n = sock.send(rest).map_err(|e| {
            io::Error::new(e.kind(), format!("sending the unsent bytes again: {e}"))
        })?;
        rest = &rest[n..];
    }
    Ok(())
}

fn set_queue_seq(fd: i32, queue: i32, seq: u32) -> io::Result<()> {
    tcp(fd, TCP_REPAIR_QUEUE, queue)?;
    tcp(fd, TCP_QUEUE_SEQ, seq as i32)
}

fn set_options(fd: i32, r: &TcpRepair) -> io::Result<()> {
    let mut opts = vec![(TCPOPT_MSS, r.mss)];
    if r.options & TCPI_OPT_WSCALE != 0 {
        opts.push((
            TCPOPT_WINDOW,
            r.snd_wscale as u32 | (r.rcv_wscale as u32) << 16,
        ));
    }
    if r.options & TCPI_OPT_SACK != 0 {
        opts.push((TCPOPT_SACK_PERM, 0));
    }
    if r.options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push((TCPOPT_TIMESTAMP, 0));
    }
    let bytes: Vec<u8> = opts
        .iter()
        .flat_map(|(c, v)| [c.to_ne_bytes(), v.to_ne_bytes()])
        .flatten()
        .collect();
    sys::setsockopt_bytes(fd, libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, &bytes)
}
