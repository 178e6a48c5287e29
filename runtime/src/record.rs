//! Journal records: one per interposed call that creates, changes or destroys a resource.
//! Encoded with postcard; folding them gives a process's table (`table.rs`).

use crate::sockaddr::SockAddr;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Raw bytes (paths, names): bytes on the wire, a (lossy) string for people and JSON.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    pub fn lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for BytesRef<'_> {
    fn as_ref(&self) -> &[u8] {
        self.0
    }
}

impl From<&[u8]> for Bytes {
    fn from(b: &[u8]) -> Self {
        Bytes(b.to_vec())
    }
}

impl From<&str> for Bytes {
    fn from(s: &str) -> Self {
        Bytes(s.as_bytes().to_vec())
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lossy())
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.lossy())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.lossy())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("bytes or a string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Bytes, E> {
                Ok(Bytes(v.as_bytes().to_vec()))
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V)
        } else {
            d.deserialize_bytes(V)
        }
    }
}

/// Borrowed bytes that encode exactly as [`Bytes`]: the wrappers journal a path without
/// copying it first (the open+close hot path).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BytesRef<'a>(pub &'a [u8]);

impl Serialize for BytesRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// One journal record. Add new kinds at the end: the encoding numbers them in order.
/// `B` is how paths and names are held: owned [`Bytes`] when decoded, [`BytesRef`] when a
/// wrapper encodes one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Record<B = Bytes> {
    /// open/openat/creat/fopen/freopen/opendir: `dirfd` is set for *at calls with a relative path.
    Open {
        fd: i32,
        dirfd: Option<i32>,
        path: B,
        flags: i32,
        mode: u32,
    },
    Close {
        fd: i32,
    },
    CloseRange {
        first: u32,
        last: u32,
        cloexec_only: bool,
    },
    /// dup/dup2/dup3/F_DUPFD*.
    Dup {
        old: i32,
        new: i32,
        cloexec: bool,
    },
    SetCloexec {
        fd: i32,
        cloexec: bool,
    },
    Pipe {
        read: i32,
        write: i32,
        flags: i32,
    },
    Socket {
        fd: i32,
        domain: i32,
        ty: i32,
        protocol: i32,
    },
    SocketPair {
        fds: [i32; 2],
        domain: i32,
        ty: i32,
        protocol: i32,
    },
    Accept {
        listener: i32,
        fd: i32,
        flags: i32,
    },
    Bind {
        fd: i32,
        addr: SockAddr,
    },
    Listen {
        fd: i32,
        backlog: i32,
    },
    Connect {
        fd: i32,
        addr: SockAddr,
    },
    Shutdown {
        fd: i32,
        how: i32,
    },
    EpollCreate {
        fd: i32,
        flags: i32,
    },
    EpollCtl {
        epfd: i32,
        op: i32,
        fd: i32,
        events: u32,
        data: u64,
    },
    EventFd {
        fd: i32,
        initval: u32,
        flags: i32,
    },
    TimerFd {
        fd: i32,
        clockid: i32,
        flags: i32,
    },
    TimerFdSet {
        fd: i32,
        flags: i32,
        interval_ns: u64,
        value_ns: u64,
    },
    SignalFd {
        fd: i32,
        mask: u64,
        flags: i32,
    },
    MemFd {
        fd: i32,
        name: B,
        flags: u32,
    },
    Inotify {
        fd: i32,
        flags: i32,
    },
    InotifyWatch {
        fd: i32,
        wd: i32,
        path: B,
        mask: u32,
    },
    InotifyUnwatch {
        fd: i32,
        wd: i32,
    },
    /// posix_openpt/openpty master side.
    PtyMaster {
        fd: i32,
        flags: i32,
    },
    /// A file-backed mmap.
    Mmap {
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        offset: i64,
    },
    Munmap {
        addr: u64,
        len: u64,
    },
    /// The process image was replaced; the table was carried across.
    Exec {
        path: B,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_and_owned_encode_alike() {
        let owned: Record = Record::Exec {
            path: "/bin/sh".into(),
        };
        let borrowed = Record::Exec {
            path: BytesRef(b"/bin/sh"),
        };
        let a = postcard::to_stdvec(&owned).unwrap();
        assert_eq!(a, postcard::to_stdvec(&borrowed).unwrap());
        assert_eq!(postcard::from_bytes::<Record>(&a).unwrap(), owned);
    }
}
