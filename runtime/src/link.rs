//! Session-wide view: links the two ends of every connection whose both ends are held by
//! processes of the session (unix sockets by peer inode, TCP/UDP by mirrored addresses).

use crate::table::{Object, PeerLink, ProcessTable, SocketInfo};
use std::collections::HashMap;

pub fn link_peers(tables: &mut [ProcessTable]) {
    let mut by_ino: HashMap<u64, PeerLink> = HashMap::new();
    let mut by_addr: HashMap<(String, String), PeerLink> = HashMap::new();
    for t in tables.iter() {
        for f in &t.fds {
            if let Object::Socket(s) = &f.object {
                let here = PeerLink {
                    id: s.id,
                    vpid: t.vpid,
                    fd: f.fd,
                };
                by_ino.entry(s.ino).or_insert(here.clone());
                if let Some(k) = inet_key(s) {
                    by_addr.entry(k).or_insert(here);
                }
            }
        }
    }
    for t in tables.iter_mut() {
        for f in &mut t.fds {
            if let Object::Socket(s) = &mut f.object {
                s.peer_link = match s.peer_ino {
                    Some(p) => by_ino.get(&p).cloned(),
                    None => inet_key(s).and_then(|(l, p)| by_addr.get(&(p, l))).cloned(),
                };
            }
        }
    }
}

/// (local, peer) of a connected inet socket.
fn inet_key(s: &SocketInfo) -> Option<(String, String)> {
    if s.domain != libc::AF_INET && s.domain != libc::AF_INET6 {
        return None;
    }
    Some((s.local.as_ref()?.to_string(), s.peer.as_ref()?.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockaddr::SockAddr;
    use crate::table::FdEntry;

    fn sock(fd: i32, id: u64, info: SocketInfo) -> FdEntry {
        FdEntry {
            fd,
            cloexec: false,
            flags: 2,
            journaled: true,
            object: Object::Socket(SocketInfo { id, ..info }),
        }
    }

    #[test]
    fn links_unix_and_tcp() {
        let v4 = |port| SockAddr::V4 {
            ip: [127, 0, 0, 1],
            port,
        };
        let tcp = |l, p| SocketInfo {
            domain: libc::AF_INET,
            local: Some(v4(l)),
            peer: Some(v4(p)),
            ..Default::default()
        };
        let unix = |ino, peer| SocketInfo {
            domain: libc::AF_UNIX,
            ino,
            peer_ino: Some(peer),
            ..Default::default()
        };
        let mut t = vec![
            ProcessTable {
                vpid: 1,
                fds: vec![sock(3, 10, unix(100, 101)), sock(4, 20, tcp(5000, 80))],
                ..Default::default()
            },
            ProcessTable {
                vpid: 2,
                fds: vec![
                    sock(5, 11, unix(101, 100)),
                    sock(6, 21, tcp(80, 5000)),
                    sock(7, 30, unix(102, 999)),
                ],
                ..Default::default()
            },
        ];
        link_peers(&mut t);
        let link = |p: usize, i: usize| match &t[p].fds[i].object {
            Object::Socket(s) => s.peer_link.clone(),
            _ => None,
        };
        assert_eq!(
            link(0, 0),
            Some(PeerLink {
                id: 11,
                vpid: 2,
                fd: 5
            })
        );
        assert_eq!(
            link(1, 0),
            Some(PeerLink {
                id: 10,
                vpid: 1,
                fd: 3
            })
        );
        assert_eq!(
            link(0, 1),
            Some(PeerLink {
                id: 21,
                vpid: 2,
                fd: 6
            })
        );
        assert_eq!(link(1, 2), None, "peer outside the session");
    }
}
