//! Reading `/proc`: a process's fds described from the kernel's side (the truth the journal
//! is reconciled with), its threads, its file mappings, its command line.

use crate::record::Bytes;
use crate::sessiontable::ObjectKind;
use crate::sockaddr::SockAddr;
use crate::sys;
use crate::table::{EpollInterest, FileLock, InotifyWatch, Mapping, Object, PipeEnd, SocketInfo};
use std::os::unix::ffi::OsStrExt;

/// fds open in `/proc/<pid>` (`pid` may be "self"), ascending.
pub fn list_fds(pid: &str) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Thread ids of `/proc/<pid>/task`, ascending.
pub fn list_tasks(pid: &str) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

pub fn cmdline(pid: i32) -> Vec<Bytes> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(Bytes::from)
                .collect()
        })
        .unwrap_or_default()
}

/// (state letter, thread count) from /proc/<pid>/status.
pub fn status(pid: i32) -> Option<(char, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| s.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let state = field("State:")?.chars().next()?;
    let threads = field("Threads:")?.parse().ok()?;
    Some((state, threads))
}

/// How many seccomp filters process `pid` ("self": this one) runs under.
pub fn seccomp_filters(pid: &str) -> u32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The parsed lines of `/proc/<pid>/fdinfo/<fd>`.
#[derive(Debug, Default, Clone)]
pub struct FdInfo {
    pub pos: i64,
    pub flags: i32,
    pub lines: Vec<String>,
}

impl FdInfo {
    pub fn parse(text: &str) -> FdInfo {
        let mut fi = FdInfo::default();
        for l in text.lines() {
            if let Some(v) = l.strip_prefix("pos:") {
                fi.pos = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = l.strip_prefix("flags:") {
                fi.flags = i32::from_str_radix(v.trim(), 8).unwrap_or(0);
            } else {
                fi.lines.push(l.to_string());
            }
        }
        fi
    }

    /// The flock and POSIX locks process `pid` holds on the file (from the `lock:` lines,
    /// which list every lock on the file; waiters are marked `->` and left out).
    pub fn locks(&self, pid: u32) -> Vec<FileLock> {
        self.lines
            .iter()
            .filter_map(|l| {
                let f: Vec<&str> = l.strip_prefix("lock:")?.split_whitespace().collect();
                // "1:" KIND ADVISORY|MANDATORY READ|WRITE PID DEV:INO START END|EOF
                let [_, kind, _, mode, who, _, start, end] = f[..] else {
                    return None;
                };
                let posix = match kind {
                    "POSIX" => true,
                    "FLOCK" => false,
                    _ => return None,
                };
                (who.parse::<u32>().ok()? == pid).then_some(())?;
                Some(FileLock {
                    posix,
                    write: mode == "WRITE",
                    start: start.parse().ok()?,
                    end: end.parse().ok(),
                })
            })
            .collect()
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    }

    fn hex(&self, key: &str) -> u64 {
        self.value(key)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0)
    }

    fn num(&self, key: &str) -> u64 {
        self.value(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// "(secs, nsecs)" as nanoseconds.
    fn timespec(&self, key: &str) -> u64 {
        let Some(v) = self.value(key) else { return 0 };
        let v = v.trim_matches(|c| c == '(' || c == ')');
        let mut it = v.split(',').map(|x| x.trim().parse::<u64>().unwrap_or(0));
        let (s, ns) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        s.saturating_mul(1_000_000_000).saturating_add(ns)
    }

    /// The "key:value" tokens of each line that starts with `prefix` (a bare token, such as
    /// the fd after "tfd:", comes under the key "").
    fn records(&self, prefix: &str) -> Vec<Vec<(String, String)>> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|rest| {
                let mut out = Vec::new();
                let mut toks = rest.split_whitespace();
                while let Some(t) = toks.next() {
                    match t.split_once(':') {
                        Some((k, "")) => out.push((k.into(), toks.next().unwrap_or("").into())),
                        Some((k, v)) => out.push((k.into(), v.into())),
                        None => out.push((String::new(), t.into())),
                    }
                }
                out
            })
            .collect()
    }

    pub fn epoll_interest(&self) -> Vec<EpollInterest> {
        self.records("tfd:")
            .into_iter()
            .map(|r| {
                let get = |k: &str| {
                    r.iter()
                        .find(|(kk, _)| kk == k)
                        .map_or("", |(_, v)| v.as_str())
                };
                EpollInterest {
                    fd: get("").parse().unwrap_or(-1),
                    events: u32::from_str_radix(get("events"), 16).unwrap_or(0),
                    data: u64::from_str_radix(get("data"), 16).unwrap_or(0),
                }
            })
            .collect()
    }

    pub fn inotify_watches(&self) -> Vec<InotifyWatch> {
        self.records("inotify")
            .into_iter()
            .map(|r| {
                let hex = |k: &str| {
                    r.iter()
                        .find(|(kk, _)| kk == k)
                        .and_then(|(_, v)| u64::from_str_radix(v, 16).ok())
                        .unwrap_or(0)
                };
                InotifyWatch {
                    wd: hex("wd") as i32,
                    path: None,
                    ino: hex("ino"),
                    mask: hex("mask") as u32,
                }
            })
            .collect()
    }
}

pub fn fdinfo(pid: &str, fd: i32) -> Option<FdInfo> {
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .ok()
        .map(|t| FdInfo::parse(&t))
}

pub fn readlink_fd(pid: &str, fd: i32) -> Option<Vec<u8>> {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .ok()
        .map(|p| p.as_os_str().as_bytes().to_vec())
}

/// "pipe:[123]" → 123
fn bracket_ino(link: &[u8], prefix: &[u8]) -> Option<u64> {
    let rest = link.strip_prefix(prefix)?.strip_prefix(b"[")?;
    std::str::from_utf8(rest.strip_suffix(b"]")?)
        .ok()?
        .parse()
        .ok()
}

/// How many entries of directory fd `fd` lie before read position `pos` (read through a
/// second open of it, so the app's position stays).
fn entries_before(fd: i32, pos: i64) -> u32 {
    if pos == 0 {
        return 0;
    }
    let Ok(dir) = std::fs::File::open(format!("/proc/self/fd/{fd}")) else {
        return 0;
    };
    let positions = sys::dir_positions(&dir, 1 << 20);
    positions
        .iter()
        .position(|&p| p == pos)
        .map_or(0, |i| i as u32 + 1)
}

/// The calling process's real pid (getpid and readlink("/proc/self") answer the virtual
/// one inside a session; the content of /proc/self/stat is the kernel's).
fn own_pid() -> u32 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Describes one fd of the calling process from the kernel's side. `ids` hands out
/// session-unique ids for sockets and pipes (by inode).
pub fn describe_own_fd(
    fd: i32,
    ids: &dyn Fn(ObjectKind, u64) -> Option<u64>,
) -> Option<(FdInfo, Object)> {
    let info = fdinfo("self", fd)?;
    let link = readlink_fd("self", fd)?;
    let end = if info.flags & libc::O_ACCMODE == libc::O_WRONLY {
        PipeEnd::Write
    } else {
        PipeEnd::Read
    };
    let object = if let Some(ino) = bracket_ino(&link, b"socket:") {
        let opt = |o| sys::sockopt_int(fd, o).unwrap_or(-1);
        let peer = sys::sock_name(fd, true);
        Object::Socket(SocketInfo {
            id: ids(ObjectKind::Socket, ino).unwrap_or(0),
            ino,
            domain: opt(libc::SO_DOMAIN),
            ty: opt(libc::SO_TYPE),
            protocol: opt(libc::SO_PROTOCOL),
            local: sys::sock_name(fd, false),
            peer: peer.filter(|p| *p != SockAddr::Unnamed || opt(libc::SO_DOMAIN) == libc::AF_UNIX),
            listening: opt(libc::SO_ACCEPTCONN) == 1,
            peer_ino: None,
            peer_link: None,
        })
    } else if let Some(ino) = bracket_ino(&link, b"pipe:") {
        Object::Pipe {
            id: ids(ObjectKind::Pipe, ino).unwrap_or(0),
            ino,
            end,
        }
    } else if link == b"anon_inode:[eventfd]" {
        Object::EventFd {
            count: info.hex("eventfd-count:"),
            semaphore: info.num("eventfd-semaphore:") == 1,
        }
    } else if link == b"anon_inode:[timerfd]" {
        Object::TimerFd {
            clockid: info.num("clockid:") as i32,
            value_ns: info.timespec("it_value:"),
            interval_ns: info.timespec("it_interval:"),
            ticks: info.num("ticks:"),
        }
    } else if link == b"anon_inode:[signalfd]" {
        Object::SignalFd {
            mask: info.hex("sigmask:"),
        }
    } else if link == b"anon_inode:[eventpoll]" {
        Object::Epoll {
            interest: info.epoll_interest(),
        }
    } else if link == b"anon_inode:inotify" {
        Object::Inotify {
            watches: info.inotify_watches(),
        }
    } else if let Some(name) = link.strip_prefix(b"/memfd:") {
        let name = name.strip_suffix(b" (deleted)").unwrap_or(name);
        let st = sys::fstat(fd).ok();
        Object::MemFd {
            name: Bytes::from(name),
            size: st.map_or(0, |s| s.st_size),
            ino: st.map_or(0, |s| s.st_ino),
        }
    } else if link.first() == Some(&b'/') {
        let st = sys::fstat(fd).ok()?;
        let deleted = st.st_nlink == 0 && link.ends_with(b" (deleted)");
        let path = if deleted {
            Bytes::from(&link[..link.len() - b" (deleted)".len()])
        } else {
            Bytes(link)
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => Object::File {
                path,
                opened_as: None,
                offset: info.pos,
                size: st.st_size,
                dev: st.st_dev,
                ino: st.st_ino,
                mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
                deleted,
                locks: info.locks(own_pid()),
            },
            libc::S_IFDIR => Object::Directory {
                before: entries_before(fd, info.pos),
                path,
                offset: info.pos,
                dev: st.st_dev,
            },
            libc::S_IFIFO => Object::Fifo {
                path,
                end,
                ino: st.st_ino,
            },
            libc::S_IFCHR if path.0 == b"/dev/ptmx" || path.0 == b"/dev/pts/ptmx" => {
                Object::PtyMaster {
                    index: sys::pty_index(fd),
                }
            }
            libc::S_IFCHR => Object::Device {
                tty: sys::isatty(fd),
                path,
                rdev: st.st_rdev,
            },
            _ => Object::Other { link: path },
        }
    } else {
        Object::Other { link: Bytes(link) }
    };
    Some((info, object))
}

/// The blocked-signal mask of thread `tid` of the calling process.
pub fn task_sigmask(tid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("SigBlk:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The system call thread `tid` of the calling process is in (-1: none, running).
pub fn task_syscall(tid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    match s.split_whitespace().next()? {
        "running" => Some(-1),
        n => n.parse().ok(),
    }
}

/// The System V shared memory segments of this host (IPC namespace), from
/// /proc/sysvipc/shm.
pub fn sysv_segments() -> Vec<crate::image::SysvSegment> {
    let text = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(crate::image::SysvSegment {
                key: f.first()?.parse().ok()?,
                id: f.get(1)?.parse().ok()?,
                app_id: f.get(1)?.parse().ok()?,
                mode: u32::from_str_radix(f.get(2)?, 8).ok()?,
                size: f.get(3)?.parse().ok()?,
                attached: f.get(6)?.parse().ok()?,
            })
        })
        .collect()
}

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsLine {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub inode: u64,
    pub name: Bytes,
}

/// Every mapping of `/proc/<pid>/maps`, in address order.
pub fn all_mappings(pid: &str) -> Vec<MapsLine> {
    std::fs::read(format!("/proc/{pid}/maps")).map_or_else(|_| Vec::new(), |t| parse_maps(&t))
}

/// The lines of a `/proc/<pid>/maps` text.
pub fn parse_maps(text: &[u8]) -> Vec<MapsLine> {
    text.split(|&b| b == b'\n')
        .filter_map(parse_maps_bytes)
        .collect()
}

/// (start, end, perms, name) of one maps line, without allocating.
pub fn maps_fields(l: &[u8]) -> Option<(u64, u64, &[u8], &[u8])> {
    let mut fields = l.splitn(6, |&b| b == b' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let (_off, _dev, _ino) = (fields.next()?, fields.next()?, fields.next()?);
    let name = fields.next().map(|n| n.trim_ascii_start()).unwrap_or(&[]);
    let dash = range.iter().position(|&b| b == b'-')?;
    let hex = |s: &[u8]| {
        std::str::from_utf8(s)
            .ok()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
    };
    Some((hex(&range[..dash])?, hex(&range[dash + 1..])?, perms, name))
}

fn parse_maps_bytes(l: &[u8]) -> Option<MapsLine> {
    // start-end perms offset dev inode [name, which may contain spaces]
    let mut fields = l.splitn(6, |&b| b == b' ');
    let range = std::str::from_utf8(fields.next()?).ok()?;
    let perms = std::str::from_utf8(fields.next()?).ok()?.to_string();
    let offset = u64::from_str_radix(std::str::from_utf8(fields.next()?).ok()?, 16).ok()?;
    let _dev = fields.next()?;
    let inode = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let name = fields.next().map(|n| n.trim_ascii_start()).unwrap_or(&[]);
    let (s, e) = range.split_once('-')?;
    Some(MapsLine {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms,
        offset,
        inode,
        name: Bytes::from(name),
    })
}

/// File-backed mappings of `/proc/<pid>/maps`.
pub fn file_mappings(pid: &str) -> Vec<Mapping> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(l: &str) -> Option<Mapping> {
    let mut it = l.split_whitespace();
    let range = it.next()?;
    let perms = it.next()?.to_string();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let inode: u64 = it.next()?.parse().ok()?;
    let path = it.collect::<Vec<_>>().join(" ");
    if inode == 0 || !path.starts_with('/') {
        return None;
    }
    let (s, e) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms,
        offset,
        path: Bytes(path.into_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_own_locks() {
        let f = FdInfo::parse(
            "pos:\t0\nflags:\t02\n\
             lock:\t1: FLOCK  ADVISORY  WRITE 77 fe:00:12 0 EOF\n\
             lock:\t2: POSIX  ADVISORY  READ 77 fe:00:12 5 14\n\
             lock:\t3: POSIX  ADVISORY  WRITE 99 fe:00:12 20 30\n\
             lock:\t3: -> POSIX  ADVISORY  WRITE 77 fe:00:12 20 30\n",
        );
        let l = f.locks(77);
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!(
            (l[0].posix, l[0].write, l[0].start, l[0].end),
            (false, true, 0, None)
        );
        assert_eq!(
            (l[1].posix, l[1].write, l[1].start, l[1].end),
            (true, false, 5, Some(14))
        );
    }

    #[test]
    fn parses_fdinfo_kinds() {
        let ep = FdInfo::parse(
            "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
             tfd:        5 events:       19 data:       0000000000000007  pos:0 ino:3f sdev:8\n\
             tfd:        9 events:        1 data:       00000000ffffffff  pos:0 ino:40 sdev:8\n",
        );
        assert_eq!(ep.flags, 0o2000002);
        let i = ep.epoll_interest();
        assert_eq!(i.len(), 2);
        assert_eq!((i[0].fd, i[0].events, i[0].data), (5, 0x19, 7));
        assert_eq!((i[1].fd, i[1].data), (9, 0xffff_ffff));

        let ev = FdInfo::parse(
            "pos:\t0\nflags:\t02\neventfd-count:                2a\neventfd-id: 3\neventfd-semaphore: 1\n",
        );
        assert_eq!(ev.hex("eventfd-count:"), 42);
        assert_eq!(ev.num("eventfd-semaphore:"), 1);

        let tf = FdInfo::parse(
            "clockid: 1\nticks: 3\nsettime flags: 00\nit_value: (1, 500)\nit_interval: (2, 0)\n",
        );
        assert_eq!(tf.timespec("it_value:"), 1_000_000_500);
        assert_eq!(tf.timespec("it_interval:"), 2_000_000_000);

        let ino = FdInfo::parse(
            "inotify wd:1 ino:2a sdev:800001 mask:fff ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:0\n",
        );
        let w = ino.inotify_watches();
        assert_eq!((w[0].wd, w[0].ino, w[0].mask), (1, 42, 0xfff));
    }

    #[test]
    fn parses_all_maps_lines() {
        let m = parse_maps_bytes(b"7f00-7f10 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(
            (m.start, m.perms.as_str(), m.name.0.len()),
            (0x7f00, "rw-p", 0)
        );
        let m = parse_maps_bytes(b"7f00-7f10 r--s 00001000 08:01 99    /a b (deleted)").unwrap();
        assert_eq!((m.inode, m.name.0.as_slice()), (99, &b"/a b (deleted)"[..]));
        assert!(all_mappings("self").iter().any(|m| m.name.0 == b"[stack]"));
    }

    #[test]
    fn parses_maps() {
        let m = parse_maps_line("7f00-7f10 r-xp 00001000 08:01 1234   /usr/lib/x y.so").unwrap();
        assert_eq!((m.start, m.end, m.offset), (0x7f00, 0x7f10, 0x1000));
        assert_eq!(m.path.0, b"/usr/lib/x y.so");
        assert!(parse_maps_line("7f00-7f10 rw-p 00000000 00:00 0   [heap]").is_none());
    }

    #[test]
    fn describes_own_fds() {
        let (r, w) = {
            let mut fds = [0; 2];
            // SAFETY: fds is a valid 2-int array.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            (fds[0], fds[1])
        };
        let ids = |_k, ino| Some(ino + 1);
        let (_, o) = describe_own_fd(w, &ids).unwrap();
        let Object::Pipe { id, ino, end } = o else {
            panic!("{o:?}")
        };
        assert_eq!((id, end), (ino + 1, PipeEnd::Write));
        let f = std::fs::File::open("/proc/self/status").unwrap();
        use std::os::fd::AsRawFd;
        let (_, o) = describe_own_fd(f.as_raw_fd(), &ids).unwrap();
        assert_eq!(o.kind(), "file");
        // SAFETY: closing the fds we made.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }
}
