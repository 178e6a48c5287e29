//! The hidden control thread: started on demand in a shim process when `mig` sends the
//! session's reserved signal (signals.rs), it listens on the process's socket in the
//! session directory (`ctl/<vpid>`; the directory is the owner's only, and the peer's uid
//! is checked again on accept) and serves `migrt::wire` requests. Checkpoint and migration
//! will be further requests on this same channel.
//!
//! Why on demand: a second thread makes glibc take its cancellable path on every read,
//! write and other blocking call (measured here: pipe write+read 700 ns → 845 ns), and
//! starting a thread in every process and fork child costs start-up time. A process that
//! nobody inspects stays single-threaded.
//!
//! The thread is the shim's, not the app's: it blocks every signal, is left out of the
//! thread list of the table, and its fds are hidden from the app's close calls and from the
//! table.

use crate::dump::Frozen;
use crate::interpose::{
    block_all_signals, close_real, freeze, move_fd_high, peer_uid, raw, real_pid, real_tid,
};
use crate::state::{CTL_PATH, enter_forever, shim, vpid};
use migrt::sockstate::peer_may_be_here;
use migrt::sys::local_addresses;
use migrt::wire::{self, PROTOCOL_VERSION, Request, Response};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::*};
use std::time::Duration;

static LISTEN_FD: AtomicI32 = AtomicI32::new(-1);
static CONN_FD: AtomicI32 = AtomicI32::new(-1);
static TID: AtomicI32 = AtomicI32::new(0);
static STARTED: AtomicBool = AtomicBool::new(false);

pub fn started() -> bool {
    STARTED.load(Acquire)
}

/// Whether `fd` belongs to the shim (the app may not close it; the table leaves it out).
pub fn is_shim_fd(fd: i32) -> bool {
    fd >= 0
        && (fd == LISTEN_FD.load(Relaxed)
            || fd == CONN_FD.load(Relaxed)
            || fd == crate::creds::table_fd()
            || crate::precopy::is_own_fd(fd))
}

pub fn listen_fd() -> i32 {
    LISTEN_FD.load(Relaxed)
}

pub fn conn_fd() -> i32 {
    CONN_FD.load(Relaxed)
}

/// Real tid of the control thread (0 if none).
pub fn control_tid() -> i32 {
    TID.load(Relaxed)
}

/// The shim's fd numbered `fd` moves aside because the app wants its number (dup2 onto it).
pub fn make_room(fd: i32) {
    if fd >= 0 && fd == LISTEN_FD.load(Relaxed) {
        LISTEN_FD.store(move_fd_high(fd), Relaxed);
    }
    crate::creds::make_room(fd);
}

/// Starts the control thread (once). Called from the reserved signal's handler at a point
/// where the interrupted code holds no libc lock.
pub fn start() {
    if shim().is_none() || STARTED.swap(true, AcqRel) {
        return;
    }
    // (Before there is one more thread.)
    crate::interpose::reserve_high_fds();
    // The shim's own thread: the pthread_create wrapper must not make it an app thread.
    let _busy = crate::state::enter();
    let spawned = std::thread::Builder::new()
        .name("migshim-ctl".into())
        .spawn(serve);
    if spawned.is_err() {
        STARTED.store(false, Release);
    }
}

/// Binds the control socket (on the control thread).
fn listen() -> Option<i32> {
    let s = shim()?;
    let v = vpid();
    let dir = s.dir();
    let path = dir.ctl(v);
    let _ = std::fs::create_dir_all(dir.ctl_dir());
    let _ = std::fs::remove_file(&path);
    // A fork holds the journal: none can happen between making the socket and noting its
    // number, so a fork child always knows the parent's listener and drops its copy (the
    // copy is the same socket: kept, it would listen on the parent's path for ever).
    let fd = {
        let _no_fork = crate::state::journal(s);
        // SAFETY: a raw socket(2) (the wrapper would journal, under the lock held here).
        let n = unsafe {
            crate::interpose::raw::syscall6(
                libc::SYS_socket,
                libc::AF_UNIX as usize,
                (libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as usize,
                0,
                0,
                0,
                0,
            )
        } as i32;
        if n < 0 {
            return None;
        }
        let fd = move_fd_high(n);
        LISTEN_FD.store(fd, Relaxed);
        fd
    };
    // A process that changed to another user may not make its socket in the session's
    // directory: it listens on an abstract name instead (what mig tries next).
    let by_path = bind_listen(fd, path.as_os_str().as_bytes(), false);
    let bound = by_path || bind_listen(fd, &dir.ctl_abstract(v), true);
    if !bound {
        eprintln!(
            "migshim: control socket {}: {}; mig cannot reach this process",
            path.display(),
            std::io::Error::last_os_error()
        );
        LISTEN_FD.store(-1, Relaxed);
        close_real(fd);
        return None;
    }
    if by_path && let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
        CTL_PATH.store(c.into_raw(), Release);
    }
    s.table.set_hidden(v, 1);
    Some(fd)
}

/// Binds `fd` to `name` (a path, or an abstract name) and listens.
fn bind_listen(fd: i32, name: &[u8], abstract_name: bool) -> bool {
    // SAFETY: the name is cut to fit sun_path (a path with its terminating zero, an
    // abstract name after its leading zero); the address length covers what is used.
    unsafe {
        let mut a: libc::sockaddr_un = std::mem::zeroed();
        a.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let skip = usize::from(abstract_name);
        let n = name.len().min(a.sun_path.len() - 1);
        for (d, s) in a.sun_path[skip..].iter_mut().zip(&name[..n]) {
            *d = *s as libc::c_char;
        }
        let len = match abstract_name {
            true => std::mem::offset_of!(libc::sockaddr_un, sun_path) + 1 + n,
            false => std::mem::size_of::<libc::sockaddr_un>(),
        };
        libc::bind(fd, (&raw const a).cast(), len as libc::socklen_t) == 0
            && libc::listen(fd, 16) == 0
    }
}

/// In a fork child: the parent's control thread did not come along; drop the copies of its
/// listener (the socket file stays the parent's) and of mig's connection.
#[unsafe(link_section = ".text.hot.migshim_fork")]
pub fn after_fork() {
    // Nothing to undo unless the parent's thread had started (writes cost the child a
    // copy-on-write fault each, so they are skipped when there is nothing to change).
    if !STARTED.load(Acquire) {
        return;
    }
    CTL_PATH.store(std::ptr::null_mut(), Release);
    TID.store(0, Relaxed);
    STARTED.store(false, Release);
    for f in [&LISTEN_FD, &CONN_FD] {
        let fd = f.swap(-1, Relaxed);
        if fd >= 0 {
            close_real(fd);
        }
    }
}

/// After a restore: the control thread and its sockets (and its heap's state) were the old
/// process's.
pub fn forget() {
    crate::ctlheap::start_again();
    CTL_PATH.store(std::ptr::null_mut(), Release);
    TID.store(0, Relaxed);
    CONN_FD.store(-1, Relaxed);
    LISTEN_FD.store(-1, Relaxed);
    STARTED.store(false, Release);
}

/// Removes this process's control socket (at exit). Allocation-free.
#[unsafe(link_section = ".text.hot.migshim_fork")]
pub fn unlink_socket() {
    if CTL_PATH.load(Acquire).is_null() {
        return;
    }
    let p = CTL_PATH.swap(std::ptr::null_mut(), AcqRel);
    if !p.is_null() {
        crate::interpose::unlink_real(p);
    }
}

fn serve() {
    crate::ctlheap::enter();
    enter_forever();
    block_all_signals();
    TID.store(real_tid(), Relaxed);
    let Some(fd) = listen() else {
        STARTED.store(false, Release);
        return;
    };
    // SAFETY: fd is the listener this thread was handed; nothing else owns it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    loop {
        let mut conn = match accept(&listener) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(_) => break, // the listener is gone (closed behind our back): stop serving
        };
        // Only the session's owner (or root) may command it: not the user a process
        // changed to (no more than it may trace the process).
        let owner = shim().map(|s| s.table.owner());
        if !peer_uid(conn.as_raw_fd()).is_some_and(|u| u == 0 || Some(u) == owner) {
            hang_up(conn);
            continue;
        }
        crate::creds::open_to_mig();
        let mut session = Session::default();
        let mut reader = wire::FdReader {
            sock: conn.as_raw_fd(),
            fd: None,
        };
        while let Ok(req) = wire::read_frame::<Request>(&mut reader) {
            let stop = matches!(req, Request::Stop);
            let resp = session.handle(req, reader.fd.take());
            // A frozen app waits at most this long for mig's next word.
            let _ = conn.set_read_timeout(session.frozen.as_ref().map(|_| FROZEN_PATIENCE));
            if wire::write_frame(&mut conn, &resp).is_err() {
                break;
            }
            if let Response::Pages { len } = resp
                && std::io::Write::write_all(&mut conn, &session.pages[..len as usize]).is_err()
            {
                break;
            }
            if stop && matches!(resp, Response::Done) {
                crate::interpose::raw::exit_group(0);
            }
        }
        // mig went away (or gave up): whatever happened, the app runs on, untracked.
        crate::precopy::end();
        session.thaw();
        crate::creds::closed_again();
        hang_up(conn);
    }
    // Leaked on purpose: the fd number may already be someone else's.
    let _ = listener.into_raw_fd();
}

/// Waits for mig's connection and takes it, moved out of the app's fd range. A fork holds
/// the journal: the connection is taken and its number noted under it, so a fork child
/// always knows it and closes its copy (kept, the child would show a socket to nowhere in
/// its next checkpoint). The listener is non-blocking: after the wait, nothing else takes
/// the connection, but the client may have given up on it.
fn accept(listener: &UnixListener) -> std::io::Result<UnixStream> {
    let fd = listener.as_raw_fd();
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: raw ppoll on one pollfd this function owns, no timeout, no signal mask.
    let n = unsafe { raw::syscall6(libc::SYS_ppoll, (&raw mut p) as usize, 1, 0, 0, 0, 0) };
    if n < 0 {
        return Err(std::io::Error::from_raw_os_error(-n as i32));
    }
    let _no_fork = crate::state::journal(shim().ok_or(std::io::ErrorKind::NotFound)?);
    // SAFETY: raw accept4 on the listener (the wrapper would journal, under the lock held).
    let c = unsafe {
        raw::syscall6(
            libc::SYS_accept4,
            fd as usize,
            0,
            0,
            libc::SOCK_CLOEXEC as usize,
            0,
            0,
        )
    };
    if c < 0 {
        return Err(std::io::Error::from_raw_os_error(-c as i32));
    }
    let c = move_fd_high(c as i32);
    CONN_FD.store(c, Relaxed);
    // SAFETY: c is the connection just accepted; nothing else owns it.
    Ok(unsafe { UnixStream::from_raw_fd(c) })
}

/// Closes mig's connection and forgets its number, both under the journal: a fork child
/// made between the two would keep a copy it does not know to close.
fn hang_up(conn: UnixStream) {
    let _no_fork = shim().map(crate::state::journal);
    close_real(conn.into_raw_fd());
    CONN_FD.store(-1, Relaxed);
}

/// How long a frozen process waits for mig before it thaws on its own.
const FROZEN_PATIENCE: Duration = Duration::from_secs(60);

/// One connection's state: whether it holds the app frozen; the buffer of the last Pages
/// answer (reused: fresh memory for each would cost a fault per page).
#[derive(Default)]
struct Session {
    frozen: Option<Frozen>,
    pages: Vec<u8>,
}

impl Session {
    fn thaw(&mut self) {
        if let Some(mut f) = self.frozen.take() {
            f.let_out();
            freeze::thaw();
        }
    }

    /// Answers `req`; `fd` is the file that came with it, if any.
    fn handle(&mut self, req: Request, fd: Option<std::os::fd::OwnedFd>) -> Response {
        match req {
            Request::Hello { .. } => Response::Hello {
                version: PROTOCOL_VERSION,
                vpid: vpid(),
            },
            Request::Table { journal } => {
                let (table, journal) = crate::reconcile::table(journal);
                Response::Table { table, journal }
            }
            Request::Freeze => self.freeze(),
            Request::Precopy { by_hash } => match self.frozen {
                Some(_) => Response::Error("frozen: a pre-copy round is made while running".into()),
                None => match crate::precopy::round(by_hash) {
                    Ok(r) => Response::Round {
                        pid: real_pid(),
                        runs: r.runs,
                        first: r.first,
                        by_hash: r.by_hash,
                    },
                    Err(e) => Response::Error(format!("pre-copy round: {e}")),
                },
            },
            Request::SharedMemory { skip } => {
                let (mappings, resident) = crate::precopy::shared_memory(&skip);
                Response::SharedMemory {
                    pid: real_pid(),
                    mappings,
                    resident,
                }
            }
            Request::Unread { ranges } => {
                crate::precopy::unread(&ranges);
                Response::Done
            }
            Request::Pages { addr, len } => {
                // (Frozen and not dumped lazily, the process itself is as frozen.)
                let from = match &self.frozen {
                    Some(f) if f.snapshot > 0 => f.snapshot,
                    _ => real_pid(),
                };
                self.pages.resize(len as usize, 0);
                match migrt::sys::read_memory(from, addr, &mut self.pages) {
                    Ok(()) => Response::Pages { len },
                    Err(e) => Response::Error(format!("reading {len} bytes at {addr:#x}: {e}")),
                }
            }
            Request::Dump {
                path,
                sync,
                rounds,
                handover,
                compared,
                shared,
                walked,
                skip,
                pipes_elsewhere,
                sockets_elsewhere,
                host_files_elsewhere,
            } => match (&mut self.frozen, shim()) {
                (Some(f), Some(s)) => {
                    let theirs = &sockets_elsewhere[..];
                    let sockets = match crate::dump::socket_states(f, &handover, theirs) {
                        Ok(socks) => socks,
                        Err(e) => return Response::Error(format!("writing {path}: {e}")),
                    };
                    // mig hands over the image's file with the request (a process that
                    // changed to another user could not open it by its path).
                    let Some(out) = fd else {
                        return Response::Error(format!(
                            "writing {path}: no file came with the request"
                        ));
                    };
                    let result =
                        crate::precopy::with_delta((compared.as_deref(), shared.as_deref()), |d| {
                            let delta = (&rounds[..], d, walked.as_deref());
                            let theirs = crate::dump::Theirs {
                                memory: &skip,
                                pipes: &pipes_elsewhere,
                                host_files: &host_files_elsewhere,
                            };
                            let (sockets, theirs) = (&sockets[..], &theirs);
                            crate::dump::dump(s, out.into(), &*f, sockets, theirs, sync, delta)
                        });
                    match result {
                        Ok(d) => {
                            if d.snapshot > 0 {
                                let old = std::mem::replace(&mut f.snapshot, d.snapshot);
                                if old > 0 {
                                    crate::interpose::raw::end_snapshot(old);
                                }
                            }
                            Response::Dumped {
                                bytes: d.bytes,
                                threads: d.threads,
                                regions: d.regions,
                                pages: d.pages,
                                snapshot: d.snapshot,
                            }
                        }
                        Err(e) => Response::Error(format!("writing {path}: {e}")),
                    }
                }
                _ => Response::Error("not frozen: send Freeze first".into()),
            },
            Request::Thaw => {
                self.thaw();
                Response::Done
            }
            Request::Stop => match &self.frozen {
                Some(f) => {
                    // Its TCP connections end without TIME_WAIT, which would keep their
                    // ports from the restored session on this host.
                    for fd in &f.table.fds {
                        if let migrt::table::Object::Socket(s) = &fd.object
                            && s.domain != libc::AF_UNIX
                            && s.ty == libc::SOCK_STREAM
                        {
                            migrt::sockstate::abort_on_close(fd.fd);
                        }
                    }
                    Response::Done
                }
                None => Response::Error(
                    "not frozen: a process is stopped only after its checkpoint".into(),
                ),
            },
        }
    }

    fn freeze(&mut self) -> Response {
        if self.frozen.is_some() {
            return Response::Error("already frozen".into());
        }
        let Some(s) = shim() else {
            return Response::Error("not in a session".into());
        };
        let t0 = std::time::Instant::now();
        match freeze::freeze(s.table.signal(), Duration::from_secs(10)) {
            Ok(parked) => {
                let micros = t0.elapsed().as_micros() as u64;
                freeze::keep_process_state();
                crate::creds::keep();
                crate::interpose::timers::keep();
                let (table, _) = crate::reconcile::table(false);
                // (Connections to elsewhere are not waited for: see peer_may_be_here.)
                let local = std::cell::OnceCell::new();
                let tcp: Vec<i32> = table
                    .fds
                    .iter()
                    .filter(|f| {
                        matches!(&f.object, migrt::table::Object::Socket(s)
                            if s.domain != libc::AF_UNIX && s.ty == libc::SOCK_STREAM && !s.listening
                                && peer_may_be_here(s.peer.as_ref(), local.get_or_init(local_addresses)))
                    })
                    .map(|f| f.fd)
                    .collect();
                migrt::sockstate::settle(&tcp, Duration::from_millis(500));
                crate::restart::keep_table(&table);
                let folded = crate::state::journal(s).folded().clone();
                let threads = parked.len() as u32;
                let response = Response::Frozen {
                    threads,
                    micros,
                    table: table.clone(),
                };
                self.frozen = Some(Frozen {
                    parked,
                    table,
                    folded,
                    repaired: Vec::new(),
                    snapshot: 0,
                });
                response
            }
            Err(e) => Response::Error(format!("freezing: {e}")),
        }
    }
}
