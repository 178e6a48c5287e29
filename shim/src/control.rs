//! The hidden control thread: one per shim process, listening on the process's socket in
//! the session directory (`ctl/<vpid>`, the directory is the owner's only, and the peer's
//! uid is checked again on accept). It serves `migrt::wire` requests; checkpoint and
//! migration will be further requests on this same channel.
//!
//! The thread is the shim's, not the app's: it blocks every signal, is left out of the
//! thread list of the table, and its fds are hidden from the app's close calls and from the
//! table.

use crate::interpose::{block_all_signals, close_real, move_fd_high, peer_uid, real_tid};
use crate::state::{CTL_PATH, enter_forever, shim, vpid};
use migrt::wire::{self, PROTOCOL_VERSION, Request, Response};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicI32, Ordering::*};

static LISTEN_FD: AtomicI32 = AtomicI32::new(-1);
static CONN_FD: AtomicI32 = AtomicI32::new(-1);
static TID: AtomicI32 = AtomicI32::new(0);

/// Whether `fd` belongs to the shim (the app may not close it; the table leaves it out).
pub fn is_shim_fd(fd: i32) -> bool {
    fd >= 0 && (fd == LISTEN_FD.load(Relaxed) || fd == CONN_FD.load(Relaxed))
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

/// The listener moved aside because the app wants its number (dup2 onto it).
pub fn relocate_listener() {
    let fd = LISTEN_FD.load(Relaxed);
    if fd >= 0 {
        let new = move_fd_high(fd);
        LISTEN_FD.store(new, Relaxed);
    }
}

pub fn start() {
    let Some(s) = shim() else { return };
    let v = vpid();
    let path = s.dir.ctl(v);
    let _ = std::fs::create_dir_all(s.dir.ctl_dir());
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "migshim: control socket {}: {e}; mig cannot reach this process",
                path.display()
            );
            return;
        }
    };
    let fd = move_fd_high(listener.into_raw_fd());
    LISTEN_FD.store(fd, Relaxed);
    if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
        CTL_PATH.store(c.into_raw(), Release);
    }
    s.table.set_hidden(v, 1);
    let spawned = std::thread::Builder::new()
        .name("migshim-ctl".into())
        .spawn(move || serve(fd));
    if spawned.is_err() {
        s.table.set_hidden(v, 0);
    }
}

/// In a fork child: drop the parent's listener copy, then (unless the child is a vfork
/// child about to exec) listen on our own socket.
pub fn after_fork(start_control: bool) {
    CTL_PATH.store(std::ptr::null_mut(), Release);
    TID.store(0, Relaxed);
    CONN_FD.store(-1, Relaxed);
    let fd = LISTEN_FD.swap(-1, Relaxed);
    if fd >= 0 {
        close_real(fd);
    }
    if start_control {
        start();
    } else if let Some(s) = shim() {
        s.table.set_hidden(vpid(), 0);
    }
}

/// Removes this process's control socket (at exit). Allocation-free.
pub fn unlink_socket() {
    let p = CTL_PATH.swap(std::ptr::null_mut(), AcqRel);
    if !p.is_null() {
        crate::interpose::unlink_real(p);
    }
}

fn serve(fd: i32) {
    enter_forever();
    block_all_signals();
    TID.store(real_tid(), Relaxed);
    // SAFETY: fd is the listener this thread was handed; nothing else owns it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    loop {
        let mut conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(_) => break, // the listener is gone (closed behind our back): stop serving
        };
        // SAFETY: getuid cannot fail.
        if peer_uid(conn.as_raw_fd()) != Some(unsafe { libc::getuid() }) {
            continue;
        }
        CONN_FD.store(conn.as_raw_fd(), Relaxed);
        while let Ok(req) = wire::read_frame::<Request>(&mut conn) {
            if wire::write_frame(&mut conn, &handle(req)).is_err() {
                break;
            }
        }
        CONN_FD.store(-1, Relaxed);
    }
    // Leaked on purpose: the fd number may already be someone else's.
    let _ = listener.into_raw_fd();
}

fn handle(req: Request) -> Response {
    match req {
        Request::Hello { .. } => Response::Hello {
            version: PROTOCOL_VERSION,
            vpid: vpid(),
        },
        Request::Table { journal } => {
            let (table, journal) = crate::reconcile::table(journal);
            Response::Table { table, journal }
        }
    }
}
