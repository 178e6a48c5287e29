//! The objects behind a restored session's fds, made anew by `mig restore` and handed to
//! each process at its own fd numbers.
//!
//! fds that were one open file (dup, or inherited across fork: one offset, one set of
//! status flags — found with kcmp at the checkpoint) get one object again. Objects with
//! an identity across processes are made once and handed to every process that held them: pipes (refilled with their unread bytes), sockets (sockets.rs), and
//! files that exist nowhere else — memfds and files deleted while open — filled with the
//! content the image carries (the same object backs their shared mappings). The rest is
//! made per fd: files and directories reopened at their offsets (through the path policy;
//! a file that changed since the checkpoint is refused unless allowed), plain devices,
//! FIFOs, eventfds with their counters, timerfds with their remaining time and interval,
//! signalfds with their masks, inotify instances with their watches at the same watch
//! numbers. Epoll instances are the process's own work (shim/src/restart.rs): their
//! interest lists name fds by number, so they are made once every fd is in place.
//!
//! Stdio (fds 0–2) that came from outside the session (a terminal, a pipe, `mig run`'s log)
//! is `mig restore`'s own; a file the session opened itself (a shell's redirection) or a
//! pipe or socket inside the session comes back as it was, unless the user chose that fd
//! (--stdin/--stdout/--stderr/--log). An fd the checkpoint was told to ignore (`--ignore-unsupported`) gets a
//! stand-in that reads as closed (a socket whose peer is gone, or /dev/null), so that its
//! number is not taken by the next file the program opens; each one is reported.

use crate::restore::ProcImage;
use crate::sockets::{self, SessionSocket};
use anyhow::{Context, Result, bail};
use migrt::rebind::Rebind;
use migrt::record::Bytes;
use migrt::table::{FdEntry, Object, PipeEnd};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;

pub struct Policy<'a> {
    pub rebind: &'a Rebind,
    pub allow_changed_files: bool,
    /// Stdio fds the user gave `mig restore` explicitly (--stdin/--stdout/--stderr/--log).
    pub stdio_given: [bool; 3],
    /// What FIFOs held unread, by inode (taken by the first fd of each that is made).
    pub fifo_contents: std::cell::RefCell<HashMap<u64, Vec<u8>>>,
}

/// Every process's fds (by image index): (fd, close-on-exec, object).
pub struct Objects {
    /// (First: dropped before the fds.)
    pub handed: Handed,
    pub fds: Vec<Vec<(i32, bool, OwnedFd)>>,
    /// Files that exist nowhere else, by their old inode: their fds and shared mappings
    /// use the same new object.
    pub by_inode: HashMap<u64, File>,
}

/// What a restore made that it takes back (`undo` on each) unless it succeeds.
pub struct Undo<T> {
    made: Vec<T>,
    undo: fn(&T),
}

impl<T> Undo<T> {
    fn new(undo: fn(&T)) -> Undo<T> {
        Undo {
            made: Vec::new(),
            undo,
        }
    }

    /// The restore succeeded: what it made is the restored session's now.
    pub fn keep(&mut self) {
        self.made.clear();
    }
}

impl<T> Drop for Undo<T> {
    fn drop(&mut self) {
        self.made.iter().for_each(self.undo);
    }
}

/// The connections a migration handed over, made again in repair mode (with the bytes
/// they had not sent yet), let out of it only once the restore can no longer fail before
/// its processes run (`go_live`): if it fails they are (back) in repair mode when closed,
/// so that closing them ends nothing for their peers, and they took in nothing from them
/// (the session goes on with them where it came from).
pub type Handed = Undo<(socket2::Socket, Vec<u8>)>;

impl Handed {
    pub fn go_live(&self) -> Result<()> {
        for (sock, unsent) in &self.made {
            migrt::tcprepair::go_live(sock, unsent).context("a handed-over connection")?;
        }
        Ok(())
    }
}

fn back_into_repair((sock, _): &(socket2::Socket, Vec<u8>)) {
    let _ = migrt::tcprepair::enter(sock.as_raw_fd());
}

/// The POSIX shared memory objects the session held that this host lacks, made again
/// (name, owner, mode, content) before anything opens or maps them; removed again if the
/// restore fails. (Where one exists — the same host — it is the session's, left as it is.)
pub fn host_memory_files(images: &[ProcImage], policy: &Policy) -> Result<MadeFiles> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut made = MadeFiles::new(remove);
    let mut seen = Vec::new();
    for (img, h) in images
        .iter()
        .flat_map(|i| i.host_files.iter().map(move |h| (i, h)))
    {
        if seen.contains(&h.ino) {
            continue;
        }
        seen.push(h.ino);
        let p = policy.rebind.path(&h.path.0);
        let path = std::path::Path::new(path_of(&p));
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(h.mode)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("making {p} again")),
        };
        made.made.push(path.to_path_buf());
        // (Its content is in one image only: the first holder's, mostly this one.)
        let mut all = images.iter().flat_map(|i| &i.contents);
        let content = (img.contents.iter().find(|(i, _)| *i == h.ino))
            .or_else(|| all.find(|(i, _)| *i == h.ino));
        f.write_all(content.map_or(&[][..], |(_, c)| &c.0))
            .with_context(|| format!("filling {p}"))?;
        // (As the restorer's user it may not: the object is then the restorer's.)
        let _ = std::os::unix::fs::fchown(&f, Some(h.uid), Some(h.gid));
        let _ = f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(h.mode));
    }
    Ok(made)
}

/// POSIX shared memory objects a restore made: removed unless it succeeds.
pub type MadeFiles = Undo<std::path::PathBuf>;

fn remove(path: &std::path::PathBuf) {
    let _ = std::fs::remove_file(path);
}

fn path_of(b: &Bytes) -> &std::ffi::OsStr {
    std::ffi::OsStr::from_bytes(&b.0)
}

pub fn build(
    images: &[ProcImage],
    shared: &migrt::sharing::Shared,
    policy: &Policy,
) -> Result<Objects> {
    // fds that were one open file are made once (the first one met) and shared.
    let group_of = |vpid: i32, fd: i32| shared.iter().position(|g| g.contains(&(vpid, fd)));
    let mut made_for_group: HashMap<usize, OwnedFd> = HashMap::new();
    let listeners = migrt::support::listeners(images.iter().map(|i| &i.table));
    // Connections to the outside a migration handed over whole (their repair state).
    let handed: Vec<u64> = images
        .iter()
        .flat_map(|i| &i.sockets)
        .filter(|st| st.handover.is_some())
        .map(|st| st.id)
        .collect();
    // Stdio inside the session always comes back; a file the session opened for itself,
    // unless the user chose that fd.
    let kept = |f: &FdEntry| {
        f.fd > 2
            || match f.object {
                Object::File { .. } => !policy.stdio_given[f.fd as usize] && inside(f, images),
                _ => inside(f, images),
            }
    };

    // Sockets, all together (connections need both ends).
    let mut socks: Vec<SessionSocket> = Vec::new();
    for img in images {
        for f in img.table.fds.iter().filter(|f| kept(f)) {
            if let Object::Socket(s) = &f.object
                && !socks.iter().any(|x| x.info.id == s.id)
                && migrt::support::why_unsupported(&f.object, &listeners, &handed).is_none()
            {
                socks.push(SessionSocket {
                    info: s,
                    state: images
                        .iter()
                        .flat_map(|i| &i.sockets)
                        .find(|st| st.id == s.id),
                    intent: intent(img, f.fd),
                });
            }
        }
    }
    let sockets = sockets::build(&socks, policy.rebind)?;
    let mut handed_over = Handed::new(back_into_repair);
    for id in &handed {
        let state = socks
            .iter()
            .find(|s| s.info.id == *id)
            .and_then(|s| s.state);
        let repair = state.and_then(|st| st.handover.as_ref());
        if let (Some(s), Some(r)) = (sockets.get(id), repair) {
            let unsent = migrt::tcprepair::unsent(r).to_vec();
            handed_over.made.push((s.try_clone()?, unsent));
        }
    }

    let ptys = pseudo_terminals(images)?;
    let mut pipes: HashMap<u64, (File, File)> = HashMap::new();
    let mut by_inode: HashMap<u64, File> = HashMap::new();
    let mut out = Vec::new();
    for img in images {
        let mut fds = Vec::new();
        for f in img.table.fds.iter().filter(|f| kept(f)) {
            let group = group_of(img.meta.vpid, f.fd);
            if let Some(one) = group.and_then(|g| made_for_group.get(&g)) {
                fds.push((f.fd, f.cloexec, one.try_clone()?));
                continue;
            }
            let made: OwnedFd = if let Some(why) =
                migrt::support::why_unsupported(&f.object, &listeners, &handed)
            {
                eprintln!(
                    "mig: restore: process {} fd {} ({}): {why}; it reads as closed",
                    img.meta.vpid,
                    f.fd,
                    f.object.kind()
                );
                stand_in(&f.object)?
            } else {
                match &f.object {
                    Object::Pipe { id, end, .. } => {
                        let (r, w) = match pipes.entry(*id) {
                            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                            std::collections::hash_map::Entry::Vacant(v) => {
                                v.insert(pipe(*id, images)?)
                            }
                        };
                        (if *end == PipeEnd::Read { &*r } else { &*w })
                            .try_clone()?
                            .into()
                    }
                    Object::PtyMaster { index: Some(i) } if ptys.contains_key(i) => {
                        ptys[i].0.try_clone()?.into()
                    }
                    Object::Device {
                        path, tty: true, ..
                    } if pty_number(path).is_some_and(|n| ptys.contains_key(&n)) => {
                        let slave = &ptys[&pty_number(path).unwrap_or_default()].1;
                        open_with(slave.as_os_str(), f.flags | libc::O_NOCTTY)
                            .with_context(|| {
                                format!("opening the new terminal {}", slave.display())
                            })?
                            .into()
                    }
                    Object::Socket(s) => match sockets.get(&s.id) {
                        Some(sock) => sock.try_clone()?.into(),
                        None => continue,
                    },
                    Object::File {
                        deleted: true,
                        ino,
                        path,
                        ..
                    } => {
                        let obj = content_object(&mut by_inode, *ino, images, Some(path), policy)?;
                        reopen_content(obj, f)?
                    }
                    Object::MemFd { ino, name, .. } => {
                        let obj = content_object(&mut by_inode, *ino, images, None, policy)
                            .with_context(|| format!("remaking memfd {name}"))?;
                        reopen_content(obj, f)?
                    }
                    other => match per_fd(other, f, policy) {
                        Ok(Some(fd)) => fd,
                        Ok(None) => continue,
                        Err(e) => {
                            return Err(e.context(format!(
                                "process {} fd {} ({})",
                                img.meta.vpid,
                                f.fd,
                                f.object.kind()
                            )));
                        }
                    },
                }
            };
            let _ = migrt::sys::set_status_flags(made.as_raw_fd(), f.flags);
            if let Some(g) = group {
                made_for_group.insert(g, made.try_clone()?);
            }
            fds.push((f.fd, f.cloexec, made));
        }
        out.push(fds);
    }
    Ok(Objects {
        handed: handed_over,
        fds: out,
        by_inode,
    })
}

/// The session's pseudo-terminals made anew, by their old number: (master, slave path),
/// with their modes, window size, and the output that was waiting on the master.
fn pseudo_terminals(images: &[ProcImage]) -> Result<HashMap<u32, (File, std::path::PathBuf)>> {
    let mut out = HashMap::new();
    for p in images.iter().flat_map(|i| &i.ptys) {
        if out.contains_key(&p.index) {
            continue;
        }
        let (master, slave, _) = migrt::sys::pty_pair().context("making a pseudo-terminal")?;
        migrt::sys::set_termios(master.as_raw_fd(), &p.tty.termios)?;
        migrt::sys::set_window_size(master.as_raw_fd(), p.tty.rows, p.tty.cols);
        if !p.output.0.is_empty() {
            let mut s = open_with(slave.as_os_str(), libc::O_RDWR | libc::O_NOCTTY)?;
            migrt::sys::write_raw_output(&mut s, &p.output.0)?;
        }
        out.insert(p.index, (master, slave));
    }
    Ok(out)
}

/// N of /dev/pts/N.
fn pty_number(path: &Bytes) -> Option<u32> {
    std::str::from_utf8(path.0.strip_prefix(b"/dev/pts/")?)
        .ok()?
        .parse()
        .ok()
}

/// Whether a stdio object belongs to the session: a pipe or socket that leads to another
/// fd of the session, a file the session opened itself (a shell's redirection; not the log
/// `mig run` gave it). Else it is the outside world's, and the restore rebinds it.
fn inside(f: &FdEntry, images: &[ProcImage]) -> bool {
    match &f.object {
        Object::Device {
            path, tty: true, ..
        } => pty_number(path)
            .is_some_and(|n| images.iter().flat_map(|i| &i.ptys).any(|p| p.index == n)),
        Object::File { dev, ino, .. } => images.iter().flat_map(|i| &i.table.fds).any(|g| {
            g.journaled
                && matches!(&g.object, Object::File { dev: d, ino: n, .. } if d == dev && n == ino)
        }),
        Object::Pipe { id, end, .. } => images.iter().flat_map(|i| &i.table.fds).any(
            |g| matches!(&g.object, Object::Pipe { id: i, end: e, .. } if i == id && e != end),
        ),
        Object::Socket(s) => s.peer_link.is_some() || s.listening,
        _ => false,
    }
}

fn intent(img: &ProcImage, fd: i32) -> Option<&migrt::table::SocketIntent> {
    match img.folded.fds.get(&fd).map(|i| &i.opened) {
        Some(migrt::table::Opened::Socket(s)) => Some(s),
        _ => None,
    }
}

/// A pipe made anew with its unread bytes.
fn pipe(id: u64, images: &[ProcImage]) -> Result<(File, File)> {
    let (r, mut w) = migrt::sys::pipe()?;
    let data = images
        .iter()
        .flat_map(|i| &i.pipes)
        .find(|(pid, _)| *pid == id)
        .map(|(_, d)| &d.0);
    if let Some(d) = data.filter(|d| !d.is_empty()) {
        migrt::sys::grow_pipe(&w, d.len());
        w.write_all(d)
            .with_context(|| format!("refilling pipe {id} ({} bytes)", d.len()))?;
    }
    Ok((r, w))
}

/// The new object for a file that exists nowhere else: a file deleted while open comes back
/// as an unnamed file in its old directory (O_TMPFILE), else — and for memfds — as a memfd;
/// filled with the content the image carries.
fn content_object<'a>(
    by_inode: &'a mut HashMap<u64, File>,
    ino: u64,
    images: &[ProcImage],
    path: Option<&Bytes>,
    policy: &Policy,
) -> Result<&'a File> {
    if let std::collections::hash_map::Entry::Vacant(v) = by_inode.entry(ino) {
        let content = images
            .iter()
            .flat_map(|i| &i.contents)
            .find(|(i, _)| *i == ino)
            .map(|(_, c)| c.0.as_slice())
            .unwrap_or_default();
        let tmp = path.and_then(|p| {
            let p = policy.rebind.path(&p.0);
            let dir = std::path::Path::new(path_of(&p)).parent()?.to_path_buf();
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .open(dir)
                .ok()
        });
        let mut f = match tmp {
            Some(f) => f,
            None => migrt::sys::memfd(c"migshim-restored", false)?,
        };
        f.write_all(content)?;
        v.insert(f);
    }
    Ok(&by_inode[&ino])
}

/// A new open of a content object with the fd's own access mode and offset. (Through its
/// /proc/self/fd link: not with the flags that would refuse a link or make a new file —
/// mkstemp opens with O_NOFOLLOW, and the flags stay on the open file.)
fn reopen_content(obj: &File, f: &FdEntry) -> Result<OwnedFd> {
    let file = open_with(
        format!("/proc/self/fd/{}", obj.as_raw_fd()).as_ref(),
        f.flags & !(libc::O_NOFOLLOW | libc::O_TMPFILE),
    )?;
    if let Object::File { offset, .. } = &f.object {
        migrt::sys::seek(file.as_raw_fd(), *offset)?;
    }
    Ok(file.into())
}

fn open_with(path: &std::ffi::OsStr, flags: i32) -> std::io::Result<File> {
    let acc = flags & libc::O_ACCMODE;
    std::fs::OpenOptions::new()
        .read(acc != libc::O_WRONLY)
        .write(acc != libc::O_RDONLY)
        .custom_flags(flags & !(libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL))
        .open(path)
}

/// The objects made for one fd alone (None: left to the process, e.g. epoll).
fn per_fd(o: &Object, f: &FdEntry, policy: &Policy) -> Result<Option<OwnedFd>> {
    let nonblock = f.flags & libc::O_NONBLOCK;
    Ok(Some(match o {
        Object::File {
            path,
            offset,
            size,
            dev,
            ino,
            mtime_ns,
            ..
        } => {
            let p = policy.rebind.path(&path.0);
            let file = open_with(path_of(&p), f.flags).with_context(|| format!("reopening {p}"))?;
            // (A POSIX shared memory object's content came with the image.)
            if !policy.allow_changed_files
                && p.0 == path.0
                && !migrt::image::host_memory_file(&path.0)
            {
                use std::os::unix::fs::MetadataExt;
                let md = file.metadata()?;
                let now = md.mtime() * 1_000_000_000 + md.mtime_nsec();
                // The inode says something only on the same filesystem (on another host,
                // a copy of the file has another one).
                let same_fs = md.dev() == *dev;
                if md.size() as i64 != *size || (same_fs && md.ino() != *ino) || now != *mtime_ns {
                    bail!(
                        "{p} changed since the checkpoint (size {size} → {}, inode {ino} → {}, modified {mtime_ns} → {now} ns); pass --allow-changed-files to restore anyway",
                        md.size(),
                        md.ino()
                    );
                }
            }
            migrt::sys::seek(file.as_raw_fd(), *offset)?;
            file.into()
        }
        Object::Directory {
            path,
            offset,
            dev,
            before,
        } => {
            let p = policy.rebind.path(&path.0);
            let dir = open_with(path_of(&p), libc::O_RDONLY | libc::O_DIRECTORY)
                .with_context(|| format!("reopening the directory {p}"))?;
            // A read position is a cookie of its filesystem: elsewhere, skip as many
            // entries as had been read.
            use std::os::unix::fs::MetadataExt;
            let at = if dir.metadata()?.dev() == *dev || *before == 0 {
                *offset
            } else {
                let positions = migrt::sys::dir_positions(&dir, *before as usize);
                positions.last().copied().unwrap_or(0)
            };
            migrt::sys::seek(dir.as_raw_fd(), at)?;
            dir.into()
        }
        Object::Device { tty: true, .. } => match open_with("/dev/tty".as_ref(), libc::O_RDWR) {
            Ok(t) => t.into(),
            Err(_) => {
                eprintln!(
                    "mig: restore: fd {} was a terminal and this restore has none: it reads from /dev/null",
                    f.fd
                );
                open_with("/dev/null".as_ref(), libc::O_RDWR)?.into()
            }
        },
        Object::Device { path, .. } => open_with(path_of(path), f.flags)
            .with_context(|| format!("reopening {path}"))?
            .into(),
        Object::Fifo { path, ino, .. } => {
            // Opened for both directions so that the open neither blocks nor fails for
            // want of the other end; refilled with what it held, once.
            let p = policy.rebind.path(&path.0);
            let mut fifo = open_with(path_of(&p), libc::O_RDWR | libc::O_NONBLOCK)
                .with_context(|| format!("reopening the FIFO {p}"))?;
            if let Some(data) = policy.fifo_contents.borrow_mut().remove(ino) {
                fifo.write_all(&data)
                    .with_context(|| format!("refilling the FIFO {p}"))?;
            }
            fifo.into()
        }
        Object::EventFd { count, semaphore } => {
            let sem = if *semaphore { libc::EFD_SEMAPHORE } else { 0 };
            migrt::sys::eventfd(*count, sem | nonblock)?
        }
        Object::TimerFd {
            clockid,
            value_ns,
            interval_ns,
            ..
        } => migrt::sys::timerfd(*clockid, nonblock, *value_ns, *interval_ns)?,
        Object::SignalFd { mask } => migrt::sys::signalfd(*mask, nonblock)?,
        Object::Inotify { watches } => {
            let fd = migrt::sys::inotify(nonblock)?;
            let mut sorted = watches.clone();
            sorted.sort_by_key(|w| w.wd);
            for w in sorted {
                // Watch numbers are handed out in order: pad the gaps so each watch gets
                // its old number.
                let path = policy.rebind.path(&w.path.map(|p| p.0).unwrap_or_default());
                for _ in 0..=w.wd {
                    let wd = migrt::sys::inotify_watch(fd.as_raw_fd(), &path.0, w.mask)
                        .with_context(|| format!("watching {path} again (inotify)"))?;
                    if wd >= w.wd {
                        break;
                    }
                    migrt::sys::inotify_unwatch(fd.as_raw_fd(), wd);
                }
            }
            // The padding left IN_IGNORED events the program must not see.
            let mut f = File::from(fd);
            migrt::sys::set_status_flags(f.as_raw_fd(), libc::O_NONBLOCK)?;
            let mut buf = [0u8; 4096];
            while std::io::Read::read(&mut f, &mut buf).is_ok_and(|n| n > 0) {}
            f.into()
        }
        _ => return Ok(None),
    }))
}

/// What an fd the restore cannot rebuild becomes: a socket whose peer has gone (reads end
/// of file, writes fail), or /dev/null for what was not a socket.
fn stand_in(o: &Object) -> Result<OwnedFd> {
    if matches!(o, Object::Socket(_)) {
        let (a, _gone) = socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        return Ok(a.into());
    }
    Ok(open_with("/dev/null".as_ref(), libc::O_RDWR)?.into())
}
