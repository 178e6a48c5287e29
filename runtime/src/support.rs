//! What a restore can rebuild, decided in one place for `mig checkpoint` (which refuses an
//! image it could not bring back, unless told to ignore) and `mig restore` (which rebuilds
//! by the same classification).

use crate::sockaddr::SockAddr;
use crate::table::{Object, ProcessTable, SocketInfo};

/// Character devices that are the same everywhere and hold no state.
const PLAIN_DEVICES: &[&[u8]] = &[
    b"/dev/null",
    b"/dev/zero",
    b"/dev/full",
    b"/dev/random",
    b"/dev/urandom",
];

/// How a socket of the session comes back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketRole {
    /// Listening: bound again at its address.
    Listener,
    /// One end of a connection whose other end (this id) is in the session too.
    Connected(u64),
    /// A connection the listener with this id had not accepted yet: connected again.
    Pending(u64),
    /// Not connected, or datagram (bound/connected by address again).
    Lone,
    /// Connected to something outside the session: cannot be rebuilt by a restore.
    External(String),
}

pub fn socket_role(s: &SocketInfo, listeners: &[&SocketInfo]) -> SocketRole {
    if s.listening {
        return SocketRole::Listener;
    }
    if let Some(p) = &s.peer_link {
        return SocketRole::Connected(p.id);
    }
    let stream = s.ty == libc::SOCK_STREAM || s.ty == libc::SOCK_SEQPACKET;
    let unix = s.domain == libc::AF_UNIX;
    let connected = match &s.peer {
        Some(SockAddr::Unnamed) => s.peer_ino.is_some(),
        Some(_) => true,
        None => false,
    };
    if !connected || !stream {
        return SocketRole::Lone;
    }
    if let Some(l) = listeners.iter().find(|l| {
        l.domain == s.domain && l.ty == s.ty && s.peer.as_ref().is_some_and(|p| serves(l, p))
    }) {
        return SocketRole::Pending(l.id);
    }
    let peer = s.peer.as_ref().map_or("?".into(), |p| p.to_string());
    SocketRole::External(if unix {
        format!("a unix connection to {peer}, outside the session")
    } else {
        let local = match &s.local {
            Some(SockAddr::V4 { ip, .. }) => std::net::Ipv4Addr::from(*ip).to_string(),
            _ => "ADDRESS".into(),
        };
        format!(
            "a TCP connection to {peer}, outside the session (a migration keeps it when its address moves along: mig migrate --move-addr {local}, as root)"
        )
    })
}

/// Whether listener `l` is the one a connection to `addr` reached.
fn serves(l: &SocketInfo, addr: &SockAddr) -> bool {
    match (l.local.as_ref(), addr) {
        (Some(SockAddr::V4 { ip, port }), SockAddr::V4 { ip: i, port: p }) => {
            port == p && (ip == i || *ip == [0; 4])
        }
        (Some(SockAddr::V6 { ip, port }), SockAddr::V6 { ip: i, port: p }) => {
            port == p && (ip == i || *ip == [0; 16])
        }
        (Some(a), b) => a == b,
        (None, _) => false,
    }
}

/// Every listening socket of the session.
pub fn listeners<'a>(tables: impl IntoIterator<Item = &'a ProcessTable>) -> Vec<&'a SocketInfo> {
    tables
        .into_iter()
        .flat_map(|t| &t.fds)
        .filter_map(|f| match &f.object {
            Object::Socket(s) if s.listening => Some(s),
            _ => None,
        })
        .collect()
}

/// An fd a restore cannot bring back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    pub vpid: i32,
    pub fd: i32,
    pub kind: &'static str,
    pub why: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "process {} fd {} ({}): {}",
            self.vpid, self.fd, self.kind, self.why
        )
    }
}

/// The sockets (by id) of connections to peers outside the session that a migration hands
/// over whole: TCP over IPv4 from one of the addresses that move with the session.
pub fn handover(tables: &[ProcessTable], moving: &[std::net::Ipv4Addr]) -> Vec<u64> {
    let listeners = listeners(tables);
    let mut ids: Vec<u64> = tables
        .iter()
        .flat_map(|t| &t.fds)
        .filter_map(|f| match &f.object {
            Object::Socket(s)
                if s.domain == libc::AF_INET
                    && s.ty == libc::SOCK_STREAM
                    && matches!(&s.local, Some(SockAddr::V4 { ip, .. }) if moving.contains(&(*ip).into()))
                    && matches!(socket_role(s, &listeners), SocketRole::External(_)) =>
            {
                Some(s.id)
            }
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Why the object behind an fd cannot be rebuilt, if it cannot. `handed`: the sockets a
/// migration hands over (see `handover`).
pub fn why_unsupported(o: &Object, listeners: &[&SocketInfo], handed: &[u64]) -> Option<String> {
    match o {
        Object::Other { link } => Some(format!("{link} is not something a restore can rebuild")),
        Object::PtyMaster { index: None } => {
            Some("a pseudo-terminal master of unknown number".into())
        }
        Object::Device {
            path, tty: false, ..
        } if !PLAIN_DEVICES.contains(&path.0.as_slice()) => Some(format!(
            "the device {path} holds state a restore cannot rebuild"
        )),
        Object::Socket(s)
            if ![libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].contains(&s.domain) =>
        {
            Some(format!("a socket of address family {}", s.domain))
        }
        Object::Socket(s) => match socket_role(s, listeners) {
            SocketRole::External(_) if handed.contains(&s.id) => None,
            SocketRole::External(why) => Some(why),
            _ => None,
        },
        Object::Inotify { watches } => watches
            .iter()
            .find(|w| w.path.is_none())
            .map(|w| format!("inotify watch {} on a path the journal did not see", w.wd)),
        _ => None,
    }
}

/// Every fd of the session (stdio excepted: a restore rebinds it) that cannot come back,
/// the sockets `handed` over aside. The tables must be linked (link::link_peers).
pub fn unsupported(tables: &[ProcessTable], handed: &[u64]) -> Vec<Unsupported> {
    let listeners = listeners(tables);
    tables
        .iter()
        .flat_map(|t| t.fds.iter().map(move |f| (t.vpid, f)))
        .filter(|(_, f)| f.fd > 2)
        .filter_map(|(vpid, f)| {
            Some(Unsupported {
                vpid,
                fd: f.fd,
                kind: f.object.kind(),
                why: why_unsupported(&f.object, &listeners, handed)?,
            })
        })
        .collect()
}
