//! Socket addresses as the state table keeps them, parsed from raw `sockaddr` bytes.

use crate::record::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SockAddr {
    Unnamed,
    Path(Bytes),
    Abstract(Bytes),
    V4 { ip: [u8; 4], port: u16 },
    V6 { ip: [u8; 16], port: u16 },
    Other { family: u16 },
}

impl SockAddr {
    /// Parses a `struct sockaddr_*` as the kernel or the app laid it out.
    pub fn from_bytes(b: &[u8]) -> SockAddr {
        if b.len() < 2 {
            return SockAddr::Unnamed;
        }
        let family = u16::from_ne_bytes([b[0], b[1]]);
        match family as i32 {
            libc::AF_UNIX => {
                let p = &b[2..];
                match p.first() {
                    None => SockAddr::Unnamed,
                    Some(0) if p.len() == 1 => SockAddr::Unnamed,
                    Some(0) => SockAddr::Abstract(Bytes(p[1..].to_vec())),
                    Some(_) => {
                        let end = p.iter().position(|&c| c == 0).unwrap_or(p.len());
                        SockAddr::Path(Bytes(p[..end].to_vec()))
                    }
                }
            }
            libc::AF_INET if b.len() >= 8 => SockAddr::V4 {
                port: u16::from_be_bytes([b[2], b[3]]),
                ip: [b[4], b[5], b[6], b[7]],
            },
            libc::AF_INET6 if b.len() >= 24 => {
                let mut ip = [0; 16];
                ip.copy_from_slice(&b[8..24]);
                SockAddr::V6 {
                    port: u16::from_be_bytes([b[2], b[3]]),
                    ip,
                }
            }
            _ => SockAddr::Other { family },
        }
    }
}

impl fmt::Display for SockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SockAddr::Unnamed => f.write_str("unnamed"),
            SockAddr::Path(p) => write!(f, "{p}"),
            SockAddr::Abstract(p) => write!(f, "@{p}"),
            SockAddr::V4 { ip, port } => write!(f, "{}:{port}", std::net::Ipv4Addr::from(*ip)),
            SockAddr::V6 { ip, port } => write!(f, "[{}]:{port}", std::net::Ipv6Addr::from(*ip)),
            SockAddr::Other { family } => write!(f, "family {family}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_families() {
        let mut un = vec![1u8, 0];
        un.extend_from_slice(b"/tmp/s\0\0\0");
        assert_eq!(SockAddr::from_bytes(&un).to_string(), "/tmp/s");
        assert_eq!(
            SockAddr::from_bytes(&[1, 0, 0, b'a', b'b']).to_string(),
            "@ab"
        );
        assert_eq!(SockAddr::from_bytes(&[1, 0]), SockAddr::Unnamed);
        let v4 = [2u8, 0, 0x1f, 0x90, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(SockAddr::from_bytes(&v4).to_string(), "127.0.0.1:8080");
        let mut v6 = vec![10u8, 0, 0, 80, 0, 0, 0, 0];
        v6.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0; 4]);
        assert_eq!(SockAddr::from_bytes(&v6).to_string(), "[::1]:80");
    }
}
