//! Talking to a shim process over its control socket.

use anyhow::{Context, Result, bail};
use migrt::paths::SessionDir;
use migrt::wire::{self, Request, Response};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Why a process could not be asked: it has `Exited` (found at connect; its pid may be
/// another's by the time the caller looks), or its control thread `Ended` the connection
/// before answering (the process exited, or exec'd a new program, whose own control
/// thread can be asked anew).
#[derive(Debug, PartialEq, Eq)]
pub enum Gone {
    Exited,
    Ended,
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Gone::Exited => "exited",
            Gone::Ended => "its control thread closed the connection",
        })
    }
}

impl std::error::Error for Gone {}

impl Gone {
    pub fn is(e: &anyhow::Error, which: Gone) -> bool {
        e.downcast_ref::<Gone>() == Some(&which)
    }
}

pub struct Client {
    stream: UnixStream,
    vpid: i32,
}

/// The control socket of a process that changed to another user (paths.rs): only taken
/// when the process listening on it is the one asked (anyone could have taken the name).
fn by_abstract_name(dir: &SessionDir, vpid: i32, pid: i32) -> std::io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(dir.ctl_abstract(vpid))?;
    let s = UnixStream::connect_addr(&addr)?;
    let listener = migrt::sys::getsockopt_sized(
        std::os::fd::AsRawFd::as_raw_fd(&s),
        libc::SOL_SOCKET,
        libc::SO_PEERCRED,
        std::mem::size_of::<libc::ucred>(),
    )?;
    // struct ucred { pid, uid, gid }: the listener's process.
    if listener.get(..4) != Some(&pid.to_ne_bytes()[..]) {
        return Err(std::io::Error::other(format!(
            "another process listens on process {vpid}'s control socket name"
        )));
    }
    Ok(s)
}

impl Client {
    /// Connects to process `vpid` (real pid `pid`). Its control thread is started on
    /// demand: if it is not listening yet, the session's signal wakes it — each of its
    /// threads in turn, every 50 ms (the shim starts the thread only where the interrupted
    /// code holds no libc lock, so another thread may be the one that can) for up to 5 s.
    pub fn connect(dir: &SessionDir, vpid: i32, pid: i32, signal: i32) -> Result<Client> {
        let path = dir.ctl(vpid);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last_wake: Option<Instant> = None;
        let mut wakes = 0usize;
        let stream = loop {
            match UnixStream::connect(&path).or_else(|_| by_abstract_name(dir, vpid, pid)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| {
                        format!(
                            "process {vpid} (pid {pid}) of session {} did not open its control socket {} within 5 s: is it stopped, or not running under the shim?",
                            dir.name(),
                            path.display()
                        )
                    });
                }
                Err(_) => {}
            }
            if crate::sessions::gone(pid) {
                return Err(anyhow::Error::new(Gone::Exited).context(format!(
                    "process {vpid} (pid {pid}) of session {} has exited",
                    dir.name()
                )));
            }
            if last_wake.is_none_or(|t| t.elapsed() > Duration::from_millis(50)) {
                let tasks = migrt::procfs::list_tasks(&pid.to_string());
                let tid = tasks
                    .get(wakes % tasks.len().max(1))
                    .copied()
                    .unwrap_or(pid);
                wakes += 1;
                // A thread that just ended is no error: the next try takes another.
                let _ = migrt::sys::thread_sigqueue(pid, tid, signal, migrt::wire::WAKE);
                last_wake = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client { stream, vpid })
    }

    /// How long an answer may take (10 s unless set).
    pub fn set_patience(&self, d: Duration) -> Result<()> {
        Ok(self.stream.set_read_timeout(Some(d))?)
    }

    /// At least `d` for an answer (a longer patience set before stays).
    pub fn allow(&self, d: Duration) -> Result<()> {
        match self.stream.read_timeout()? {
            Some(now) if now >= d => Ok(()),
            _ => self.set_patience(d),
        }
    }

    /// A call answered by Pages: `out.len()` bytes of its memory at `addr`, read into `out`.
    pub fn pages(&mut self, addr: u64, out: &mut [u8]) -> Result<()> {
        let len = out.len() as u64;
        match self.call(&Request::Pages { addr, len })? {
            Response::Pages { len: n } if n == len => {
                std::io::Read::read_exact(&mut self.stream, out)
                    .with_context(|| format!("pages from process {}", self.vpid))
            }
            other => bail!("process {}: unexpected answer {other:?}", self.vpid),
        }
    }

    /// The shared memory its image stores (but `skip`): its pid, the mappings, and the runs
    /// of their pages that exist (Request::SharedMemory).
    pub fn shared_memory(&mut self, skip: &[(u64, u64)]) -> Result<SharedMemory> {
        let skip = skip.to_vec();
        match self.call(&Request::SharedMemory { skip })? {
            Response::SharedMemory {
                pid,
                mappings,
                resident,
            } => Ok(SharedMemory {
                pid,
                mappings,
                resident,
            }),
            other => bail!("process {}: unexpected answer {other:?}", self.vpid),
        }
    }

    pub fn call(&mut self, req: &Request) -> Result<Response> {
        self.send(req)?;
        self.answer()
    }

    /// A request whose answer is read later (`answer`): several processes work on theirs
    /// at once.
    pub fn send(&mut self, req: &Request) -> Result<()> {
        wire::write_frame(&mut self.stream, req).map_err(|e| self.failed(e, "no request to"))
    }

    /// Sends `req` with `fd` attached (a file to write to).
    pub fn send_with_fd(&mut self, req: &Request, fd: std::os::fd::BorrowedFd) -> Result<()> {
        use std::os::fd::AsRawFd;
        wire::write_frame_with_fd(self.stream.as_raw_fd(), req, fd.as_raw_fd())
            .map_err(|e| self.failed(e, "no request to"))
    }

    /// A failed exchange as an error: Gone::Ended when the control thread closed the
    /// connection (`what`: "no answer from", say).
    fn failed(&self, e: migrt::Error, what: &str) -> anyhow::Error {
        let e = match e {
            migrt::Error::Closed => anyhow::Error::new(Gone::Ended),
            e => e.into(),
        };
        e.context(format!("{what} process {}", self.vpid))
    }

    /// The answer to the request sent last.
    pub fn answer(&mut self) -> Result<Response> {
        let resp: Response =
            wire::read_frame(&mut self.stream).map_err(|e| self.failed(e, "no answer from"))?;
        if let Response::Error(e) = &resp {
            bail!("process {}: {e}", self.vpid);
        }
        Ok(resp)
    }
}

/// The shared memory a process's image stores: its pid (to read it), its mappings, and the
/// runs of their pages that exist.
pub struct SharedMemory {
    pub pid: i32,
    pub mappings: Vec<(u64, u64)>,
    pub resident: Vec<(u64, u64)>,
}
