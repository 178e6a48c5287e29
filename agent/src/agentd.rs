//! `mig agent [--listen ADDR] [--key FILE] [--state-dir DIR]`: the per-host daemon. It
//! accepts sessions from peers holding the shared key, restores them here, and answers
//! `mig ps --host`.
//!
//! An incoming session is received into the state directory (its images, checked against
//! the stream's MAC before anything is used), restored with `mig restore --detach`, and
//! its files removed again; the sender hears "running" or why not. Limits: how many
//! sessions may come in at once, how large one may be, how long the peer may stay silent.
//! Every refusal is logged with its reason and sent to the peer. An agent running as root
//! takes other users' sessions too, and restores each as its owner (owner.rs).

use crate::netaddr;
use crate::owner::Owner;
use crate::peer::{self, Link, Msg};
use crate::relay::{self, Relay};
use crate::sessions;
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub struct AgentArgs {
    pub listen: String,
    pub key: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub max_incoming: usize,
    pub max_bytes: u64,
    pub timeout: Duration,
}

struct Agent {
    key: Vec<u8>,
    state: PathBuf,
    incoming: AtomicUsize,
    max_incoming: usize,
    max_bytes: u64,
    timeout: Duration,
    counter: AtomicUsize,
}

fn log(msg: std::fmt::Arguments) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    eprintln!("[{t:.3}] mig agent: {msg}");
}

pub fn agent(a: AgentArgs) -> Result<i32> {
    let key = peer::read_or_make_key(&peer::key_path(a.key.as_deref()))?;
    if let Some(d) = &a.state_dir {
        // The sessions restored here live in the state directory's runtime area (seen by
        // `mig ps` with the same MIGSHIM_RUNTIME_DIR, and by `mig ps --host`).
        std::fs::create_dir_all(d)?;
        let d = d.canonicalize()?;
        // SAFETY: set before this process starts any thread (nothing reads it concurrently).
        unsafe { std::env::set_var("MIGSHIM_RUNTIME_DIR", d.join("run")) };
    }
    let rt = sessions::runtime_dir()?;
    let state = a.state_dir.clone().unwrap_or_else(|| rt.clone());
    crate::spool::sweep();
    // (Room for the fds of several incoming sessions: the table grown inside a freeze
    // would wait for an RCU grace period first, this process having threads.)
    let _ = migrt::sys::grow_fd_table(1000);
    let listener = std::net::TcpListener::bind(&a.listen)
        .with_context(|| format!("listening on {}", a.listen))?;
    log(format_args!(
        "listening on {} (state {})",
        listener.local_addr()?,
        state.display()
    ));
    let agent = Arc::new(Agent {
        key,
        state,
        incoming: AtomicUsize::new(0),
        max_incoming: a.max_incoming,
        max_bytes: a.max_bytes,
        timeout: a.timeout,
        counter: AtomicUsize::new(0),
    });
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let agent = agent.clone();
        std::thread::spawn(move || {
            let peer = stream.peer_addr().map_or("?".into(), |p| p.to_string());
            if let Err(e) = agent.serve(stream) {
                log(format_args!("{peer}: {e:#}"));
            }
        });
    }
    Ok(0)
}

impl Agent {
    fn serve(&self, stream: std::net::TcpStream) -> Result<()> {
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        stream.set_nodelay(true)?;
        let mut link = peer::accept(stream, &self.key)?;
        match link.recv()? {
            Msg::Ps { json, uid } => {
                // (Root's answer: the asker's sessions, which it restored as them.)
                let rt = match uid != migrt::sys::getuid() && migrt::sys::getuid() == 0 {
                    true => match Owner::lookup(uid) {
                        Ok(o) => o.runtime_dir(),
                        Err(e) => return refuse(&mut link, format!("{e:#}")),
                    },
                    false => sessions::runtime_dir()?,
                };
                link.send(&Msg::Sessions(crate::show::ps(&sessions::list(&rt), json)?))?;
                Ok(())
            }
            Msg::Incoming {
                name,
                uid,
                restore_args,
                moving,
                lazy,
                resident,
            } => {
                let admitted = (self.admit(&name, uid, lazy, &moving)).and_then(|owner| {
                    allowed_restore_args(&restore_args)?;
                    Ok((owner, homes(&moving)?))
                });
                let (owner, homes) = match admitted {
                    Ok(h) => h,
                    Err(e) => return refuse(&mut link, format!("session {name}: {e:#}")),
                };
                if self.incoming.fetch_add(1, Ordering::SeqCst) >= self.max_incoming {
                    self.incoming.fetch_sub(1, Ordering::SeqCst);
                    return refuse(
                        &mut link,
                        format!(
                            "{} migrations are coming in already; try again later",
                            self.max_incoming
                        ),
                    );
                }
                let how = Incoming {
                    name: &name,
                    rt: match &owner {
                        Some(o) => o.runtime_dir(),
                        None => sessions::runtime_dir()?,
                    },
                    owner,
                    restore_args: &restore_args,
                    homes: &homes,
                    lazy,
                    in_memory: crate::spool::in_memory(resident),
                    streamed: std::cell::Cell::new(true),
                };
                let n = self.counter.fetch_add(1, Ordering::SeqCst);
                let mut spooled = Spooled {
                    dir: (self.state.join("incoming"))
                        .join(format!("{name}-{}-{n}", std::process::id())),
                    in_shm: None,
                    files: Vec::new(),
                    writer: crate::spool::Writer::new(),
                };
                let result = self.receive(&mut link, &mut spooled, &how);
                let result = match result {
                    // The sender went away meanwhile (it was killed): it has let the session
                    // run on there, so this copy must not run too.
                    Ok(_) if gone(&link.stream) => {
                        abandon(&how);
                        Err(anyhow::anyhow!(
                            "session {name}: the sender went away before it heard the session runs here: ended here (it runs on there)"
                        ))
                    }
                    Ok(pager) => {
                        log(format_args!("session {name} restored, running"));
                        let running = link.send(&Msg::Running { name: name.clone() });
                        // (Its image goes only now, beside what follows: closing a gibibyte
                        // of memory files takes a millisecond.)
                        std::thread::spawn(move || drop(spooled));
                        match (running, pager) {
                            (Ok(()), Some(pager)) => self.post_copy(&mut link, &how, pager),
                            (Ok(()), None) => Ok(()),
                            // (The sender cannot have heard it: it lets the session run on
                            // there.)
                            (Err(e), _) => {
                                abandon(&how);
                                Err(e.context(format!(
                                    "session {name}: the sender could not be told it runs here: ended here"
                                )))
                            }
                        }
                    }
                    Err(e) => {
                        // The sender hears why once it has sent all (it is not listening
                        // before); what it still sends is read and dropped.
                        while !how.streamed.get()
                            && let Ok(m) = link.recv()
                        {
                            // (A sender waiting to hear all is stored hears why now.)
                            how.streamed.set(matches!(m, Msg::Sent { .. } | Msg::Sync));
                        }
                        refuse(&mut link, format!("session {name}: {e:#}"))
                    }
                };
                self.incoming.fetch_sub(1, Ordering::SeqCst);
                result
            }
            other => bail!("unexpected {other:?}"),
        }
    }

    /// Whether a session of this name and owner may come (lazily: whether its memory can
    /// be filled in here after it runs; `moving`: the addresses that move with it). Root
    /// takes other users' sessions too: their owner, whom it restores them as.
    fn admit(&self, name: &str, uid: u32, lazy: bool, moving: &[String]) -> Result<Option<Owner>> {
        migrt::paths::validate_name(name)?;
        if lazy && !crate::pager::available() {
            bail!(
                "a lazy migration needs a userfaultfd that handles faults in system calls and reports forks on this host (an agent running as root); use --mode precopy"
            );
        }
        let owner = match uid == migrt::sys::getuid() {
            true => None,
            false if migrt::sys::getuid() != 0 => bail!(
                "the session belongs to uid {uid}; this agent runs as uid {} and restores only its own user's sessions (an agent running as root restores anyone's, as them)",
                migrt::sys::getuid()
            ),
            false => Some(Owner::lookup(uid)?),
        };
        if owner.is_some() && !moving.is_empty() {
            bail!(
                "addresses move only with sessions of this agent's own user: the restore of another user's session may not make connections in TCP repair mode"
            );
        }
        let rt = match &owner {
            Some(o) => Ok(o.runtime_dir()),
            None => sessions::runtime_dir(),
        };
        if let Ok(rt) = rt
            && sessions::find(&rt, name).is_ok()
        {
            bail!("a session named {name} runs here already");
        }
        Ok(owner)
    }

    /// A lazily restored session's memory, fetched from the sender while it runs here: the
    /// pager's requests relayed over the link (each answer checked against its MAC) until
    /// the pager has filled everything and ends. If that fails, the session cannot go on
    /// here (its memory would be incomplete): it is ended, and the sender, seeing the link
    /// end, lets it run on there.
    fn post_copy(&self, link: &mut Link, how: &Incoming, mut pager: Relay) -> Result<()> {
        let name = how.name;
        match pager.run(link, None, self.timeout / 3) {
            Ok(_) => {
                log(format_args!(
                    "session {name}: all its memory is here ({} MiB fetched in {:.0} ms)",
                    pager.bytes >> 20,
                    pager.since.elapsed().as_secs_f64() * 1e3
                ));
                link.send(&Msg::Complete)
            }
            Err(e) => {
                abandon(how);
                Err(e.context(format!(
                    "session {name}: its memory could not be fetched; ended here"
                )))
            }
        }
    }

    /// Receives a session's images and restores it, with the addresses that move with it
    /// put on their interfaces here first; its files are in `spooled` (the caller drops them
    /// once the sender knows). Lazily: the socket its pager asks for the memory still in the
    /// sender on.
    fn receive(
        &self,
        link: &mut Link,
        spooled: &mut Spooled,
        how: &Incoming,
    ) -> Result<Option<Relay>> {
        spooled.in_shm = crate::spool::make_dir(&spooled.dir, how.in_memory, how.owner.as_ref())?;
        let (dir, out) = (&spooled.dir, &mut spooled.files);
        let name = how.name;
        // The restore is started first and waits until the image is all here: what it takes
        // to start `mig` is not part of the freeze (nor does it go on beside it: the sender
        // freezes the session only once it hears Ready). Ended if anything fails before.
        let (mut restore, pager) = self.start_restore(dir, how)?;
        restore.ready(self.timeout)?;
        log(format_args!(
            "session {name}: coming in, its image kept {}",
            match how.in_memory {
                true => "in memory".to_string(),
                false => format!("in {}", dir.display()),
            }
        ));
        link.send(&Msg::Ready)?;
        how.streamed.set(false);
        let files = match link.recv()? {
            Msg::Files(f) => f,
            other => bail!("expected the image's file list, got {other:?}"),
        };
        // Each file, its name and whether it has all come (and the restore been told so).
        // More files may be announced on the way (pre-copy rounds, then the image).
        let add = |out: &mut Vec<_>, files: &[String]| -> Result<()> {
            if files.is_empty()
                || files
                    .iter()
                    .any(|f| f.contains('/') || f.starts_with('.') || f.is_empty())
            {
                bail!("bad image file names {files:?}");
            }
            for f in files {
                let file = crate::spool::create(dir, f, how.in_memory, how.owner.as_ref())?;
                out.push((Arc::new(file), f.clone(), Arrival::Coming));
            }
            Ok(())
        };
        add(out, &files)?;
        let mut total = 0u64;
        // How much of each file has come.
        let mut sizes: Vec<u64> = Vec::new();
        // Chunks are written from the frame as it came (not copied out of it first), by
        // the writer while the next is read.
        let writer = &mut spooled.writer;
        loop {
            let mut body = writer.buffer()?;
            let (file, piece) = match link.recv_chunk(&mut body)? {
                Ok((file, at)) => (file, Piece::Bytes(at)),
                Err(m) => {
                    writer.recycle(std::mem::take(&mut body));
                    match m {
                        Msg::Same {
                            file,
                            from,
                            offset,
                            len,
                        } => (file, Piece::Same(from, offset, len)),
                        Msg::Files(more) => {
                            add(out, &more)?;
                            continue;
                        }
                        Msg::Sync => {
                            // (The restore reads the rounds that are all here while it
                            // waits.)
                            writer.wait()?;
                            for (_, name, arrival) in out.iter_mut() {
                                if *arrival == Arrival::Complete {
                                    restore.have(name)?;
                                    *arrival = Arrival::Told;
                                }
                            }
                            link.send(&Msg::Synced)?;
                            continue;
                        }
                        Msg::Sent { mac } => {
                            how.streamed.set(true);
                            if !link.verify(&mac) {
                                bail!(
                                    "the stream does not match its MAC: damaged or tampered with on the way"
                                );
                            }
                            writer.wait()?;
                            break;
                        }
                        other => bail!("unexpected {other:?} in the middle of the images"),
                    }
                }
            };
            sizes.resize(out.len(), 0);
            let len = match &piece {
                Piece::Bytes(at) => at.len() as u64,
                Piece::Same(from, offset, len) => {
                    let had = sizes.get(*from as usize).copied().unwrap_or(0);
                    if *len == 0 || offset.checked_add(*len).is_none_or(|end| end > had) {
                        bail!("pages sent before that did not come");
                    }
                    *len
                }
            };
            let (f, _, arrival) = out
                .get_mut(file as usize)
                .context("a chunk of no announced file")?;
            total += len;
            if total > self.max_bytes {
                bail!(
                    "the image is over this agent's limit of {} bytes",
                    self.max_bytes
                );
            }
            if *arrival != Arrival::Coming {
                bail!("more of a file after its end");
            }
            let ended = len == 0;
            sizes[file as usize] += len;
            match piece {
                Piece::Bytes(at) => writer.write(f, body, at)?,
                Piece::Same(from, offset, len) => {
                    let f = f.clone();
                    writer.same((&out[from as usize].0, offset, len), &f)?;
                }
            }
            let (_, name, arrival) = &mut out[file as usize];
            if ended {
                *arrival = Arrival::Complete;
                // A process image all here is read by the restore while the others come.
                // (Best effort: a restore that cannot hear it fails at "go", after the
                // stream's MAC has been checked — which says it first if it was damaged.)
                if name.starts_with(migrt::image::PROCESS_PREFIX) {
                    writer.wait()?;
                    if restore.have(name).is_ok() {
                        *arrival = Arrival::Told;
                    }
                }
            }
        }
        log(format_args!(
            "session {name}: {total} bytes received, restoring"
        ));
        // The addresses first: the restore binds the handed-over connections to them. (Taken
        // off again if the restore fails.)
        let mut added = netaddr::Changes::default();
        for h in how.homes {
            added.add(h)?;
        }
        restore.go()?;
        // Lazily, the restored processes need pages from the sender before they are back.
        // (What comes after the image counts against the same limit.)
        let mut pager = pager.map(|p| Relay::new(p, self.max_bytes.saturating_sub(total)));
        match pager.as_mut() {
            Some(r) => {
                let said = std::os::fd::AsRawFd::as_raw_fd(restore.output()?);
                let back = &mut || restore.back();
                if let Err(e) = r.run(link, Some((back, said)), self.timeout / 3) {
                    drop(restore);
                    end_session(&how.rt, name);
                    return Err(e);
                }
            }
            None => {
                while !restore.back()? {
                    migrt::sys::wait_readable(restore.output()?, Duration::from_millis(2))?;
                }
            }
        }
        // (Its exit is not waited for: it has nothing more to say.)
        restore.reap_later();
        // The neighbours hear where the addresses are now beside the sender hearing it
        // runs here: an ARP socket's close waits for an RCU grace period (milliseconds of
        // freeze otherwise).
        let (homes, name) = (added.added().cloned().collect::<Vec<_>>(), name.to_string());
        std::thread::spawn(move || {
            for h in &homes {
                if let Err(e) = netaddr::announce(h) {
                    log(format_args!("session {name}: {e:#}"));
                }
            }
        });
        added.keep();
        Ok(pager)
    }

    /// Starts `mig restore` of the image that comes into `dir`, waiting to be told to go
    /// (and, lazily, the socket its pager will ask for pages on).
    fn start_restore(
        &self,
        dir: &Path,
        how: &Incoming,
    ) -> Result<(Restore, Option<std::os::unix::net::UnixStream>)> {
        let logf = migrt::paths::logs_dir(&how.rt).join(format!("{}.log", how.name));
        let mut restore = std::process::Command::new(std::env::current_exe()?);
        restore.arg("restore");
        // (Another user's restore runs as them, in the image's directory.)
        match &how.owner {
            Some(owner) => {
                let opened = std::fs::File::open(dir)
                    .with_context(|| format!("opening {}", dir.display()))?;
                owner.apply(restore.arg("."), opened.into());
            }
            None => _ = restore.arg(dir),
        }
        restore
            // (Lazily: it runs as soon as its image is here; pages follow from the files.)
            .args([
                "--detach",
                "--lazy",
                "--when-told",
                "--name",
                how.name,
                "--log",
            ])
            .arg(&logf)
            .args(how.restore_args);
        // If this agent dies before the restore is done, the restore goes too (and the
        // processes it made, which cannot say they are back): the sender, seeing the link
        // end, lets the session run on there.
        // SAFETY: between fork and exec only prctl (async-signal-safe) runs.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut restore, || {
                match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) {
                    -1 => Err(std::io::Error::last_os_error()),
                    _ => Ok(()),
                }
            })
        };
        let pager = match how.lazy {
            true => Some(relay::pages_socket(&mut restore)?),
            false => None,
        };
        let child = restore
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running mig restore")?;
        if let Some(out) = &child.stdout {
            use std::os::fd::AsRawFd;
            migrt::sys::set_status_flags(out.as_raw_fd(), libc::O_NONBLOCK)?;
        }
        Ok((
            Restore {
                child: Some(child),
                said: Vec::new(),
            },
            pager,
        ))
    }
}

/// An incoming image: its files (in memory, or in `dir`), each with its name and how far it
/// has come. Removed when dropped — not before the restore has opened every file: in
/// memory, a file is gone when the agent closes it.
struct Spooled {
    dir: PathBuf,
    /// Where `dir` links to, if it is a link (spool::make_dir).
    in_shm: Option<PathBuf>,
    files: Vec<(Arc<std::fs::File>, String, Arrival)>,
    /// What stores the chunks as they come.
    writer: crate::spool::Writer,
}

impl Drop for Spooled {
    fn drop(&mut self) {
        self.writer.stop();
        self.files.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(d) = &self.in_shm {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A piece of an incoming file: bytes where they are in the frame received, or bytes of a
/// file come already (file, offset, length).
enum Piece {
    Bytes(std::ops::Range<usize>),
    Same(u32, u64, u64),
}

/// How far an incoming file has come.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arrival {
    Coming,
    Complete,
    /// Complete, and the restore told so.
    Told,
}

/// A `mig restore` started before its image is all here; ended (if it still runs) when
/// dropped, unless it said the session is back.
struct Restore {
    child: Option<std::process::Child>,
    /// What it printed and is not taken as a line yet (`ready`, then the session's name
    /// once it is back).
    said: Vec<u8>,
}

impl Restore {
    fn child(&mut self) -> Result<&mut std::process::Child> {
        self.child.as_mut().context("mig restore is gone")
    }

    /// File `name` is all here (the restore may read it ahead).
    fn have(&mut self, name: &str) -> Result<()> {
        let told = self
            .child()?
            .stdin
            .as_mut()
            .context("mig restore's input")?;
        writeln!(told, "have {name}").context("telling mig restore what is here")
    }

    /// Its output (which says when it is ready, then when the session is back).
    fn output(&mut self) -> Result<&std::process::ChildStdout> {
        self.child()?
            .stdout
            .as_ref()
            .context("mig restore's output")
    }

    /// Waits (up to `patience`) until it says it is ready: started, waiting to be told.
    fn ready(&mut self, patience: Duration) -> Result<()> {
        let t = std::time::Instant::now();
        loop {
            match self.line()? {
                Some(l) if l == "ready" => return Ok(()),
                Some(l) => bail!("mig restore said {l:?}"),
                None if t.elapsed() > patience => bail!("mig restore did not start"),
                None => {
                    migrt::sys::wait_readable(self.output()?, Duration::from_millis(100))?;
                }
            }
        }
    }

    /// Whether the restored processes are back (mig restore prints the session's name
    /// then, before it exits); an error with what it said if it ended without.
    fn back(&mut self) -> Result<bool> {
        Ok(self.line()?.is_some())
    }

    /// The next line it printed, if one has come; an error with what it said if it ended
    /// without one. (Once it has ended, its output is read once more: its last line may
    /// have come just after the read before.)
    fn line(&mut self) -> Result<Option<String>> {
        use std::io::Read;
        for _ in 0..2 {
            if let Some(l) = self.printed()? {
                return Ok(Some(l));
            }
            if self.child()?.try_wait()?.is_none() {
                return Ok(None);
            }
        }
        let child = self.child()?;
        let status = child.wait()?;
        let mut why = String::new();
        child.stderr.take().map(|mut e| e.read_to_string(&mut why));
        match why.trim() {
            "" => bail!("mig restore ended ({status}) without the session back"),
            why => bail!("{why}"),
        }
    }

    /// The next whole line of what it printed so far, if any.
    fn printed(&mut self) -> Result<Option<String>> {
        use std::io::Read;
        let child = self.child.as_mut().context("mig restore is gone")?;
        let out = child.stdout.as_mut().context("mig restore's output")?;
        let mut buf = [0u8; 256];
        loop {
            match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.said.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("reading mig restore's output"),
            }
        }
        let line = self.said.iter().position(|&b| b == b'\n').map(|end| {
            let line: Vec<u8> = self.said.drain(..=end).collect();
            String::from_utf8_lossy(&line).trim().to_string()
        });
        Ok(line)
    }

    /// It said the session is back: it ends by itself, reaped by a thread of its own.
    fn reap_later(mut self) {
        if let Some(c) = self.child.take() {
            std::thread::spawn(move || c.wait_with_output());
        }
    }

    /// The image is complete: it restores now.
    fn go(&mut self) -> Result<()> {
        let mut told = self.child()?.stdin.take().context("mig restore's input")?;
        told.write_all(b"go\n").context("telling mig restore to go")
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Not told to go yet: told that nothing comes (its input ends), it takes away the
            // session it made for the image.
            if c.stdin.take().is_some() {
                let t = std::time::Instant::now();
                while c.try_wait().is_ok_and(|s| s.is_none())
                    && t.elapsed() < Duration::from_secs(1)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What comes with an incoming session.
struct Incoming<'a> {
    name: &'a str,
    /// The runtime directory it goes to: its owner's.
    rt: PathBuf,
    /// Its owner, where that is not this agent's user.
    owner: Option<Owner>,
    restore_args: &'a [String],
    homes: &'a [netaddr::Held],
    lazy: bool,
    /// Whether its image is kept in memory (spool.rs).
    in_memory: bool,
    /// Whether nothing more comes from the sender before it listens: true before Ready
    /// (it waits for that) and once the whole stream (up to its MAC) has come.
    streamed: std::cell::Cell<bool>,
}

/// Whether the peer at the other end of `stream` has closed it (nothing is expected from
/// it now).
/// What a sender may ask of the restore here: the rebinding rules and --no-sharing, as
/// `mig migrate` passes them; nothing else (`--stdout FILE` from a peer would have the
/// restore write where this agent may).
fn allowed_restore_args(args: &[String]) -> Result<()> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--map-path" | "--map-port" | "--map-addr" if it.next().is_some() => {}
            "--no-sharing" => {}
            other => bail!("restore argument {other:?} is not one a sender may give"),
        }
    }
    Ok(())
}

fn gone(stream: &std::net::TcpStream) -> bool {
    migrt::sys::wait_readable(stream, Duration::ZERO).unwrap_or(true)
        && stream.peek(&mut [0u8]).map_or(true, |n| n == 0)
}

/// Gives up a session restored here: its processes end, the addresses that came with it
/// go back to the sender.
fn abandon(how: &Incoming) {
    end_session(&how.rt, how.name);
    for h in how.homes {
        let mut undo = netaddr::Changes::default();
        let _ = undo.remove(h);
        undo.keep();
    }
}

/// Ends every process of a session restored here, in runtime directory `rt` (its memory
/// cannot be completed).
fn end_session(rt: &Path, name: &str) {
    if let Ok(live) = sessions::find(rt, name) {
        for p in live.processes() {
            // SAFETY: kill takes plain values.
            unsafe { libc::kill(p.pid, libc::SIGKILL) };
        }
    }
}

/// Where each address that moves with a session goes on this host (`ADDR/PREFIX`: the
/// interface on that subnet); only root can put it there.
fn homes(moving: &[String]) -> Result<Vec<netaddr::Held>> {
    if !moving.is_empty() && migrt::sys::geteuid() != 0 {
        bail!("this agent is not root: it cannot take over the addresses {moving:?}");
    }
    moving
        .iter()
        .map(|m| {
            let (ip, prefix) = m.split_once('/').context("an address without prefix")?;
            netaddr::home_for(ip.parse()?, prefix.parse()?)
        })
        .collect()
}

fn refuse(link: &mut Link, why: String) -> Result<()> {
    log(format_args!("refused: {why}"));
    link.send(&Msg::Refused(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_may_give_the_restore_its_rebinding_rules_and_nothing_else() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = args(&[
            "--map-port",
            "80=8080",
            "--map-path",
            "/a=/b",
            "--no-sharing",
        ]);
        assert!(allowed_restore_args(&ok).is_ok());
        assert!(allowed_restore_args(&[]).is_ok());
        for bad in [
            &["--stdout", "/etc/passwd"][..],
            &["--map-port"][..],
            &["--allow-changed-files"][..],
            &["--lazy", "--pages-from", "3"][..],
        ] {
            let e = allowed_restore_args(&args(bad)).unwrap_err();
            assert!(e.to_string().contains("not one a sender may give"), "{e}");
        }
    }
}
