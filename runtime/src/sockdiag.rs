//! Socket diagnostics (NETLINK_SOCK_DIAG): which unix socket is connected to which, by inode.
//! Unprivileged; the kernel answers for every unix socket of the network namespace.

use std::collections::HashMap;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UNIX_DIAG_PEER: u16 = 2;

/// inode → peer inode for every connected unix socket on this host (namespace).
pub fn unix_peers() -> HashMap<u64, u64> {
    let mut req = Vec::with_capacity(24);
    req.push(libc::AF_UNIX as u8); // sdiag_family
    req.push(0); // sdiag_protocol
    req.extend_from_slice(&0u16.to_ne_bytes()); // pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    req.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // no cookie
    let Ok(msgs) = crate::sys::netlink_dump(libc::NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, &req)
    else {
        return HashMap::new();
    };
    msgs.iter().filter_map(|m| parse_unix_msg(m)).collect()
}

/// unix_diag_msg (16 bytes: family, type, state, pad, ino u32, cookie [u32; 2]) then rtattrs.
fn parse_unix_msg(m: &[u8]) -> Option<(u64, u64)> {
    let ino = u32::from_ne_bytes(m.get(4..8)?.try_into().ok()?) as u64;
    let mut rest = m.get(16..)?;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]);
        if len < 4 || len > rest.len() {
            break;
        }
        if ty == UNIX_DIAG_PEER && len >= 8 {
            let peer = u32::from_ne_bytes(rest[4..8].try_into().ok()?) as u64;
            return Some((ino, peer));
        }
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn finds_socketpair_peers() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let ino = |s: &std::os::unix::net::UnixStream| {
            use std::os::fd::AsRawFd;
            std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let peers = unix_peers();
        assert_eq!(peers.get(&ino(&a)), Some(&ino(&b)));
        assert_eq!(peers.get(&ino(&b)), Some(&ino(&a)));
    }
}
