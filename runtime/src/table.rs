//! A process's state table: what stands behind each fd, its threads, its file mappings.
//!
//! Two layers: [`Folded`] is what the journal says (the intent recorded by the wrappers:
//! the path a file was opened as, how a socket was made, epoll interests, inotify paths);
//! [`ProcessTable`] is what a reader gets, the folded journal reconciled with `/proc`
//! (offsets, counters, addresses, and fds no wrapper saw).

use crate::fdmap::FdMap;
use crate::record::{Bytes, Record};
use crate::sockaddr::SockAddr;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Folded {
    pub fds: FdMap<FdIntent>,
    /// File-backed mappings by start address.
    pub maps: BTreeMap<u64, MapIntent>,
    /// Program of the last exec, if any.
    pub exec: Option<Bytes>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FdIntent {
    pub cloexec: bool,
    pub opened: Opened,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Opened {
    File {
        dirfd: Option<i32>,
        path: Bytes,
        flags: i32,
        mode: u32,
    },
    Pipe {
        flags: i32,
    },
    Socket(SocketIntent),
    Epoll {
        interest: BTreeMap<i32, (u32, u64)>,
    },
    EventFd {
        initval: u32,
        flags: i32,
    },
    TimerFd {
        clockid: i32,
        flags: i32,
        setting: Option<(i32, u64, u64)>,
    },
    SignalFd {
        mask: u64,
        flags: i32,
    },
    MemFd {
        name: Bytes,
        flags: u32,
    },
    Inotify {
        watches: BTreeMap<i32, (Bytes, u32)>,
    },
    PtyMaster {
        flags: i32,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SocketIntent {
    pub domain: i32,
    pub ty: i32,
    pub protocol: i32,
    pub bound: Option<SockAddr>,
    pub connected: Option<SockAddr>,
    pub backlog: Option<i32>,
    pub accepted_from: Option<i32>,
    pub shutdown: Option<i32>,
    /// Made by socketpair.
    pub pair: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapIntent {
    pub len: u64,
    pub prot: i32,
    pub flags: i32,
    pub offset: i64,
    /// Path of the fd the mapping was made from, when the journal knew it.
    pub path: Option<Bytes>,
}

impl Folded {
    /// Applies one record.
    /// Applies one record (owned, as decoded, or borrowed, as a wrapper makes it).
    pub fn apply<B: AsRef<[u8]>>(&mut self, r: &Record<B>) {
        use Record::*;
        let cloexec_of = |flags: i32| flags & libc::O_CLOEXEC != 0;
        match r {
            Open {
                fd,
                dirfd,
                path,
                flags,
                mode,
            } => self.put(
                *fd,
                cloexec_of(*flags),
                Opened::File {
                    dirfd: *dirfd,
                    path: Bytes::from(path.as_ref()),
                    flags: *flags,
                    mode: *mode,
                },
            ),
            Close { fd } => {
                self.fds.remove(fd);
            }
            CloseRange {
                first,
                last,
                cloexec_only,
            } => {
                let range = (*first as i64)..=(*last as i64);
                if *cloexec_only {
                    self.fds
                        .for_range_mut(clamp(*first), clamp(*last), |i| i.cloexec = true);
                } else {
                    self.fds.retain(|fd, _| !range.contains(&(fd as i64)));
                }
            }
            Dup { old, new, cloexec } => {
                if let Some(i) = self.fds.get(old).cloned() {
                    self.put(*new, *cloexec, i.opened);
                } else {
                    self.fds.remove(new);
                }
            }
            SetCloexec { fd, cloexec } => {
                if let Some(i) = self.fds.get_mut(fd) {
                    i.cloexec = *cloexec;
                }
            }
            Pipe { read, write, flags } => {
                self.put(*read, cloexec_of(*flags), Opened::Pipe { flags: *flags });
                self.put(*write, cloexec_of(*flags), Opened::Pipe { flags: *flags });
            }
            Socket {
                fd,
                domain,
                ty,
                protocol,
            } => self.put(
                *fd,
                ty & libc::SOCK_CLOEXEC != 0,
                Opened::Socket(SocketIntent {
                    domain: *domain,
                    ty: *ty,
                    protocol: *protocol,
                    ..Default::default()
                }),
            ),
            SocketPair {
                fds,
                domain,
                ty,
                protocol,
            } => {
                for fd in fds {
                    self.put(
                        *fd,
                        ty & libc::SOCK_CLOEXEC != 0,
                        Opened::Socket(SocketIntent {
                            domain: *domain,
                            ty: *ty,
                            protocol: *protocol,
                            pair: true,
                            ..Default::default()
                        }),
                    );
                }
            }
            Accept {
                listener,
                fd,
                flags,
            } => {
                let mut s = match self.fds.get(listener).map(|i| &i.opened) {
                    Some(Opened::Socket(s)) => SocketIntent {
                        domain: s.domain,
                        ty: s.ty,
                        protocol: s.protocol,
                        ..Default::default()
                    },
                    _ => SocketIntent::default(),
                };
                s.accepted_from = Some(*listener);
                self.put(*fd, flags & libc::SOCK_CLOEXEC != 0, Opened::Socket(s));
            }
            Bind { fd, addr } => self.socket(*fd, |s| s.bound = Some(addr.clone())),
            Listen { fd, backlog } => self.socket(*fd, |s| s.backlog = Some(*backlog)),
            Connect { fd, addr } => self.socket(*fd, |s| s.connected = Some(addr.clone())),
            Shutdown { fd, how } => self.socket(*fd, |s| {
                s.shutdown = Some(match s.shutdown {
                    Some(old) if old != *how => libc::SHUT_RDWR,
                    _ => *how,
                })
            }),
            EpollCreate { fd, flags } => self.put(
                *fd,
                cloexec_of(*flags),
                Opened::Epoll {
                    interest: BTreeMap::new(),
                },
            ),
            EpollCtl {
                epfd,
                op,
                fd,
                events,
                data,
            } => {
                if let Some(FdIntent {
                    opened: Opened::Epoll { interest },
                    ..
                }) = self.fds.get_mut(epfd)
                {
                    if *op == libc::EPOLL_CTL_DEL {
                        interest.remove(fd);
                    } else {
                        interest.insert(*fd, (*events, *data));
                    }
                }
            }
            EventFd { fd, initval, flags } => self.put(
                *fd,
                flags & libc::EFD_CLOEXEC != 0,
                Opened::EventFd {
                    initval: *initval,
                    flags: *flags,
                },
            ),
            TimerFd { fd, clockid, flags } => self.put(
                *fd,
                flags & libc::TFD_CLOEXEC != 0,
                Opened::TimerFd {
                    clockid: *clockid,
                    flags: *flags,
                    setting: None,
                },
            ),
            TimerFdSet {
                fd,
                flags,
                interval_ns,
                value_ns,
            } => {
                if let Some(FdIntent {
                    opened: Opened::TimerFd { setting, .. },
                    ..
                }) = self.fds.get_mut(fd)
                {
                    *setting = Some((*flags, *interval_ns, *value_ns));
                }
            }
            SignalFd { fd, mask, flags } => {
                // signalfd on an existing signalfd changes its mask.
                let cloexec = self
                    .fds
                    .get(fd)
                    .map_or(flags & libc::SFD_CLOEXEC != 0, |i| i.cloexec);
                self.put(
                    *fd,
                    cloexec,
                    Opened::SignalFd {
                        mask: *mask,
                        flags: *flags,
                    },
                )
            }
            MemFd { fd, name, flags } => self.put(
                *fd,
                *flags & libc::MFD_CLOEXEC != 0,
                Opened::MemFd {
                    name: Bytes::from(name.as_ref()),
                    flags: *flags,
                },
            ),
            Inotify { fd, flags } => self.put(
                *fd,
                flags & libc::IN_CLOEXEC != 0,
                Opened::Inotify {
                    watches: BTreeMap::new(),
                },
            ),
            InotifyWatch { fd, wd, path, mask } => {
                if let Some(FdIntent {
                    opened: Opened::Inotify { watches },
                    ..
                }) = self.fds.get_mut(fd)
                {
                    watches.insert(*wd, (Bytes::from(path.as_ref()), *mask));
                }
            }
            InotifyUnwatch { fd, wd } => {
                if let Some(FdIntent {
                    opened: Opened::Inotify { watches },
                    ..
                }) = self.fds.get_mut(fd)
                {
                    watches.remove(wd);
                }
            }
            PtyMaster { fd, flags } => {
                self.put(*fd, cloexec_of(*flags), Opened::PtyMaster { flags: *flags })
            }
            Mmap {
                addr,
                len,
                prot,
                flags,
                fd,
                offset,
            } => {
                self.unmap(*addr, *len);
                let path = match self.fds.get(fd).map(|i| &i.opened) {
                    Some(Opened::File { path, .. }) => Some(path.clone()),
                    Some(Opened::MemFd { name, .. }) => Some(name.clone()),
                    _ => None,
                };
                self.maps.insert(
                    *addr,
                    MapIntent {
                        len: *len,
                        prot: *prot,
                        flags: *flags,
                        offset: *offset,
                        path,
                    },
                );
            }
            Munmap { addr, len } => self.unmap(*addr, *len),
            Exec { path } => {
                self.fds.retain(|_, i| !i.cloexec);
                self.maps.clear();
                self.exec = Some(Bytes::from(path.as_ref()));
            }
        }
    }

    fn put(&mut self, fd: i32, cloexec: bool, opened: Opened) {
        self.fds.insert(fd, FdIntent { cloexec, opened });
    }

    fn socket(&mut self, fd: i32, f: impl FnOnce(&mut SocketIntent)) {
        if let Some(FdIntent {
            opened: Opened::Socket(s),
            ..
        }) = self.fds.get_mut(&fd)
        {
            f(s)
        }
    }

    /// Drops the mappings that [addr, addr+len) covers (a partial unmap drops the whole
    /// mapping from the intent; `/proc/self/maps` stays the truth for what is left).
    fn unmap(&mut self, addr: u64, len: u64) {
        let end = addr.saturating_add(len);
        self.maps
            .retain(|&a, m| a.saturating_add(m.len) <= addr || a >= end);
    }
}

fn clamp(fd: u32) -> i32 {
    fd.min(i32::MAX as u32) as i32
}

// ---------------------------------------------------------------------------------------
// The reconciled table, as readers see it.

/// What a reader of the table gets for one process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessTable {
    pub vpid: i32,
    pub real_pid: i32,
    /// 0 when the parent is outside the session.
    pub parent_vpid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub command: Vec<Bytes>,
    pub threads: Vec<ThreadEntry>,
    pub fds: Vec<FdEntry>,
    pub mappings: Vec<Mapping>,
    /// Things the reconciliation noticed (fds closed or opened behind the wrappers' backs).
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadEntry {
    pub vtid: i32,
    pub tid: i32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FdEntry {
    pub fd: i32,
    pub cloexec: bool,
    /// Status flags (O_ACCMODE, O_APPEND, O_NONBLOCK, ...) as the kernel reports them.
    pub flags: i32,
    /// False when no wrapper saw the fd being made (inherited, or opened inside libc).
    pub journaled: bool,
    pub object: Object,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipeEnd {
    Read,
    Write,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Object {
    File {
        path: Bytes,
        /// The path as the app gave it, when it differs from `path`.
        opened_as: Option<Bytes>,
        offset: i64,
        size: i64,
        dev: u64,
        ino: u64,
        /// Last modification (ns since the epoch), so that a restore notices a change.
        mtime_ns: i64,
        deleted: bool,
        /// Locks this process holds on it.
        locks: Vec<FileLock>,
    },
    Directory {
        path: Bytes,
        offset: i64,
        dev: u64,
        /// How many entries lie before the read position (positions are cookies of one
        /// filesystem: on another, the restore skips this many entries instead).
        before: u32,
    },
    /// A character device: /dev/null, /dev/urandom, a terminal, ...
    Device {
        path: Bytes,
        rdev: u64,
        tty: bool,
    },
    Fifo {
        path: Bytes,
        end: PipeEnd,
        ino: u64,
    },
    Pipe {
        id: u64,
        ino: u64,
        end: PipeEnd,
    },
    Socket(SocketInfo),
    Epoll {
        interest: Vec<EpollInterest>,
    },
    EventFd {
        count: u64,
        semaphore: bool,
    },
    TimerFd {
        clockid: i32,
        value_ns: u64,
        interval_ns: u64,
        ticks: u64,
    },
    SignalFd {
        mask: u64,
    },
    Inotify {
        watches: Vec<InotifyWatch>,
    },
    MemFd {
        name: Bytes,
        size: i64,
        ino: u64,
    },
    PtyMaster {
        index: Option<u32>,
    },
    /// Anything else (`anon_inode:[io_uring]`, ...): described, not understood.
    Other {
        link: Bytes,
    },
}

/// A lock held on a file: flock (of the open file) or POSIX record lock (of the process).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    pub posix: bool,
    pub write: bool,
    pub start: u64,
    /// Last byte locked; None: to the end of the file, however long.
    pub end: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SocketInfo {
    /// Session-unique id (stays the same wherever the session runs).
    pub id: u64,
    pub ino: u64,
    pub domain: i32,
    pub ty: i32,
    pub protocol: i32,
    pub local: Option<SockAddr>,
    pub peer: Option<SockAddr>,
    pub listening: bool,
    /// Inode of the peer socket on this host (unix sockets), for linking.
    pub peer_ino: Option<u64>,
    /// The other end, when it is inside the session (filled in session-wide by `link`).
    pub peer_link: Option<PeerLink>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLink {
    pub id: u64,
    pub vpid: i32,
    pub fd: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollInterest {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    pub wd: i32,
    pub path: Option<Bytes>,
    pub ino: u64,
    pub mask: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub path: Bytes,
}

impl Object {
    /// Short name of the kind, as `mig table` prints it.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::File { .. } => "file",
            Object::Directory { .. } => "directory",
            Object::Device { .. } => "device",
            Object::Fifo { .. } => "fifo",
            Object::Pipe { .. } => "pipe",
            Object::Socket(_) => "socket",
            Object::Epoll { .. } => "epoll",
            Object::EventFd { .. } => "eventfd",
            Object::TimerFd { .. } => "timerfd",
            Object::SignalFd { .. } => "signalfd",
            Object::Inotify { .. } => "inotify",
            Object::MemFd { .. } => "memfd",
            Object::PtyMaster { .. } => "pty-master",
            Object::Other { .. } => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(fd: i32, path: &str, flags: i32) -> Record {
        Record::Open {
            fd,
            dirfd: None,
            path: path.into(),
            flags,
            mode: 0,
        }
    }

    #[test]
    fn fold_tracks_fds() {
        let mut f = Folded::default();
        for r in [
            open(3, "/a", 0),
            open(4, "/b", libc::O_CLOEXEC),
            Record::Dup {
                old: 3,
                new: 10,
                cloexec: false,
            },
            Record::Close { fd: 3 },
            Record::Pipe {
                read: 5,
                write: 6,
                flags: 0,
            },
            Record::CloseRange {
                first: 6,
                last: 6,
                cloexec_only: false,
            },
        ] {
            f.apply::<Bytes>(&r);
        }
        assert_eq!(f.fds.keys().collect::<Vec<_>>(), vec![4, 5, 10]);
        assert!(f.fds.get(&4).unwrap().cloexec);
        assert!(
            matches!(&f.fds.get(&10).unwrap().opened, Opened::File { path, .. } if path.0 == b"/a")
        );
        f.apply::<Bytes>(&Record::Exec {
            path: "/bin/x".into(),
        });
        assert_eq!(f.fds.keys().collect::<Vec<_>>(), vec![5, 10]);
    }

    #[test]
    fn fold_sockets_epoll_inotify() {
        let mut f = Folded::default();
        let addr = SockAddr::V4 {
            ip: [127, 0, 0, 1],
            port: 80,
        };
        for r in [
            Record::Socket {
                fd: 3,
                domain: libc::AF_INET,
                ty: libc::SOCK_STREAM,
                protocol: 0,
            },
            Record::Bind {
                fd: 3,
                addr: addr.clone(),
            },
            Record::Listen { fd: 3, backlog: 5 },
            Record::Accept {
                listener: 3,
                fd: 4,
                flags: 0,
            },
            Record::EpollCreate { fd: 5, flags: 0 },
            Record::EpollCtl {
                epfd: 5,
                op: libc::EPOLL_CTL_ADD,
                fd: 4,
                events: 1,
                data: 9,
            },
            Record::Inotify { fd: 6, flags: 0 },
            Record::InotifyWatch {
                fd: 6,
                wd: 1,
                path: "/tmp".into(),
                mask: 2,
            },
        ] {
            f.apply::<Bytes>(&r);
        }
        let Opened::Socket(s) = &f.fds.get(&3).unwrap().opened else {
            panic!()
        };
        assert_eq!((s.bound.as_ref(), s.backlog), (Some(&addr), Some(5)));
        let Opened::Socket(a) = &f.fds.get(&4).unwrap().opened else {
            panic!()
        };
        assert_eq!((a.domain, a.accepted_from), (libc::AF_INET, Some(3)));
        let Opened::Epoll { interest } = &f.fds.get(&5).unwrap().opened else {
            panic!()
        };
        assert_eq!(interest[&4], (1, 9));
        let Opened::Inotify { watches } = &f.fds.get(&6).unwrap().opened else {
            panic!()
        };
        assert_eq!(watches[&1].0.0, b"/tmp");
    }
}
