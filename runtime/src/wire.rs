//! The control protocol between `mig` and each shim process: length-prefixed postcard
//! frames over the process's unix control socket. One request, one response, repeatable on
//! one connection. New commands (checkpoint, migrate) are new variants, not new channels.

use crate::record::Record;
use crate::table::ProcessTable;
use crate::{Error, Result};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::io::{Read, Write};

pub const PROTOCOL_VERSION: u32 = 11;

/// Default real-time signal a session reserves (`MIGSHIM_SIGNAL` at `mig run` overrides).
pub const DEFAULT_SIGNAL: u32 = 63;

/// sigqueue value asking a shim process to open its control channel.
pub const WAKE: usize = 0x6d69_6701;
const MAX_FRAME: usize = 256 << 20;

/// A restored process and `mig restore`, on the channel its objects came through (one
/// byte each): the process says READY once nothing of its restart can fail any more,
/// runs no app code until told GO (sent when all of the session's are ready), and says
/// BACK when its threads and timers are back.
pub const RESTART_READY: u8 = 1;
pub const RESTART_GO: u8 = 2;
pub const RESTART_BACK: u8 = 3;

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Hello {
        version: u32,
    },
    /// The process's reconciled table, and with `journal` the most recent records.
    Table {
        journal: bool,
    },
    /// Park every app thread (until Thaw, Stop, or the connection ends).
    Freeze,
    /// While frozen: write the process image to `path` (fsync'd with `sync`). With the
    /// files of the pre-copy rounds this process wrote, only what changed since the last.
    /// The sockets `handover` (session-wide ids) are connections handed over whole: read
    /// in repair mode and kept in it until Thaw (let out) or Stop (closed silently).
    Dump {
        path: String,
        sync: bool,
        rounds: Vec<String>,
        handover: Vec<u64>,
        /// Rounds made by hash: what mig found changed since the last one.
        compared: Option<Box<crate::rounds::Compared>>,
        /// The shared memory the rounds sent (by hash, whoever wrote it): what changed.
        shared: Option<Box<crate::rounds::Compared>>,
        walked: Option<Box<Walked>>,
        /// Ranges of shared memory whose pages another process's image holds.
        skip: Vec<(u64, u64)>,
        /// Pipes and FIFOs (inodes) whose unread bytes another process's image holds:
        /// not read (the other's dump reads them meanwhile).
        pipes_elsewhere: Vec<u64>,
        /// Sockets (session-wide ids) another process's image holds the state of: not read
        /// (the other's dump reads them meanwhile).
        sockets_elsewhere: Vec<u64>,
        /// POSIX shared memory objects (inodes) another process's image holds the content
        /// of: described, not read (every postgres process maps the same megabyte).
        host_files_elsewhere: Vec<u64>,
    },
    /// While running: a pre-copy round — which runs of its memory to send (the first
    /// round: all it has; the next ones: what was written since the round before). Mig
    /// reads the pages itself (or through Pages) and writes the round (crate::rounds).
    /// `by_hash`: without write tracking, even where the kernel has it (the answer says
    /// which way it is: where it has none, always by hash).
    Precopy {
        by_hash: bool,
    },
    /// Running or frozen: the shared memory this process's image stores (its shared
    /// anonymous mappings but `skip`, which another's holds) — the mappings, and the runs
    /// of their pages that exist (the object's pages, whoever wrote them). Pre-copy sends
    /// it by hash: no process's write tracking sees the others' writes.
    SharedMemory {
        skip: Vec<(u64, u64)>,
    },
    /// After a round: ranges mig could not read whole (unmapped meanwhile): the final
    /// image stores the tracked ranges holding them whole.
    Unread {
        ranges: Vec<(u64, u64)>,
    },
    /// `len` bytes at `addr` of its memory, for mig where it may not read the process's
    /// memory itself: as they are now (a pre-copy round; frozen, the comparison of rounds
    /// made by hash); after a lazy migration's Dump, as the dump left it (read from the
    /// process, or the dump's snapshot). Answered by Pages, followed on the stream by the bytes themselves,
    /// unframed (no copies of a megabyte into and out of a frame).
    Pages {
        addr: u64,
        len: u64,
    },
    /// Let the app run on.
    Thaw,
    /// End the process (after a complete checkpoint).
    Stop,
}

/// mig walks `start..end`, the upper part of one large anonymous mapping, while the
/// process dumps: once the dump writes a byte into the pipe at `go` (when it has mapped
/// all it maps: the walk holds the memory map's lock, a mapping made would wait for all of
/// it), and writes what it finds into the pipe at `found` (dirty::write_walked). The dump
/// reads it from there rather than walk that part.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Walked {
    pub go: String,
    pub found: String,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Hello {
        version: u32,
        vpid: i32,
    },
    Table {
        table: ProcessTable,
        journal: Option<JournalView>,
    },
    /// Every thread parked: how many, how long that took, and the process's table as it
    /// is frozen.
    Frozen {
        threads: u32,
        micros: u64,
        table: ProcessTable,
    },
    Dumped {
        bytes: u64,
        threads: u32,
        regions: u32,
        pages: u64,
        /// The pid of the process holding the pages kept in the source (lazy: the process
        /// itself, or a snapshot of it), or 0.
        snapshot: i32,
    },
    /// A pre-copy round's runs of memory (start, end), whether it is the first (zero pages
    /// are left out then), and the process's pid for reading them. `by_hash`: no write
    /// tracking — the runs are all its private memory, mig sends what changed by hash.
    Round {
        pid: i32,
        runs: Vec<(u64, u64)>,
        first: bool,
        by_hash: bool,
    },
    /// Its shared memory (Request::SharedMemory), and its pid for reading it.
    SharedMemory {
        pid: i32,
        mappings: Vec<(u64, u64)>,
        resident: Vec<(u64, u64)>,
    },
    /// `len` bytes follow, unframed.
    Pages {
        len: u64,
    },
    Done,
    Error(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalView {
    /// Records appended over the process's life (this image).
    pub appended: u64,
    /// The most recent records (a bounded window), oldest first.
    pub recent: Vec<Record>,
}

pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<()> {
    write_frame_body(w, &postcard::to_stdvec(msg)?)
}

/// Sends an already encoded frame body.
pub fn write_frame_body(w: &mut impl Write, body: &[u8]) -> Result<()> {
    w.write_all(&framed(body))
        .and_then(|_| w.flush())
        .map_err(sending)
}

/// A frame whose first byte carries `fd` (SCM_RIGHTS) over unix socket `sock`: the
/// receiver reads it with an FdReader.
pub fn write_frame_with_fd<T: Serialize>(sock: i32, msg: &T, fd: i32) -> Result<()> {
    crate::sys::send_fd(sock, &framed(&postcard::to_stdvec(msg)?), fd).map_err(sending)
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn sending(e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => Error::Closed,
        _ => Error::Wire(format!("sending: {e}")),
    }
}

/// Reads a unix socket as a stream, keeping the fd a frame came with (the last one).
pub struct FdReader {
    pub sock: i32,
    pub fd: Option<std::os::fd::OwnedFd>,
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::FromRawFd;
        let (n, fd) = crate::sys::recv_fd(self.sock, buf)?;
        if fd >= 0 {
            // SAFETY: the fd just received is ours alone.
            self.fd = Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        }
        Ok(n)
    }
}

pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T> {
    read_frame_upto(r, MAX_FRAME).map(|(v, _)| v)
}

/// A frame of at most `max` bytes; also returns its encoded body (for a running MAC).
pub fn read_frame_upto<T: DeserializeOwned>(r: &mut impl Read, max: usize) -> Result<(T, Vec<u8>)> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => Error::Closed,
        _ => Error::Wire(format!("receiving: {e}")),
    })?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(Error::Wire(format!(
            "frame of {len} bytes is over the limit"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|e| Error::Wire(format!("receiving {len} bytes: {e}")))?;
    Ok((postcard::from_bytes(&body)?, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Table { journal: true }).unwrap();
        write_frame(&mut buf, &Response::Error("x".into())).unwrap();
        let mut r = &buf[..];
        assert!(matches!(
            read_frame::<Request>(&mut r).unwrap(),
            Request::Table { journal: true }
        ));
        assert!(matches!(read_frame::<Response>(&mut r).unwrap(), Response::Error(s) if s == "x"));
        assert!(read_frame::<Response>(&mut &buf[..3]).is_err());
    }
}
