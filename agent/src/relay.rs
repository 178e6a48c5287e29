//! The agent's side of a lazy migration's post-copy: the restored session's pager asks
//! for the memory still in the sender (process, address, length) on a socket of its own;
//! each request goes over the link as `Want`, each answer (`Pages`: the pages with data,
//! sparse.rs; then the MAC so far) is checked — it must name what was asked — and handed
//! to the pager. The pager's fill asks
//! for its memory a chunk after another, so the next chunk is asked for while the pager
//! copies this one in.

use crate::peer::{self, Link, Msg};
use anyhow::{Context, Result, bail};
use std::time::Duration;

/// The fd a lazy restore's pager asks for pages on, in `mig restore`.
const PAGES_FD: i32 = 899;

/// A stream socket pair for a lazy restore: one end goes to `restore` (at PAGES_FD, in
/// that child only: other restores started meanwhile must not hold it), the other is ours.
pub fn pages_socket(restore: &mut std::process::Command) -> Result<std::os::unix::net::UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let fd = theirs.as_raw_fd();
    restore.args(["--pages-from", &PAGES_FD.to_string()]);
    // SAFETY: between fork and exec only dup2 (async-signal-safe) runs; `theirs` stays
    // open in the parent until the Command is dropped (it is moved into the closure).
    unsafe {
        restore.pre_exec(move || {
            let _keep = &theirs;
            match libc::dup2(fd, PAGES_FD) {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            }
        })
    };
    Ok(ours)
}

/// A lazy restore's pager, asking for the memory still in the sender.
pub struct Relay {
    pager: std::os::unix::net::UnixStream,
    /// Bytes fetched so far, since when, and how many the agent takes at most.
    pub bytes: u64,
    pub since: std::time::Instant,
    limit: u64,
    /// The last frame of pages (reused).
    body: Vec<u8>,
    /// A request sent ahead whose answer has not been read yet: the pager's fill asks for
    /// its memory a chunk after another, so the next chunk is asked for while the pager
    /// copies this one in (the sender reads it meanwhile).
    ahead: Option<Ask>,
    /// The pager said it is done (perhaps before the restore was: a session that needs
    /// nothing from the sender).
    done: bool,
}

/// What the pager asks for: `len` bytes of process `vpid`'s memory at `addr`.
#[derive(Clone, Copy, PartialEq)]
struct Ask {
    vpid: i32,
    addr: u64,
    len: u64,
}

impl Relay {
    pub fn new(pager: std::os::unix::net::UnixStream, limit: u64) -> Relay {
        Relay {
            pager,
            bytes: 0,
            since: std::time::Instant::now(),
            limit,
            body: Vec::new(),
            ahead: None,
            done: false,
        }
    }

    /// Relays the pager's requests (vpid, address, length) over the link until the pager
    /// says it is done (everything filled: true; its end without a word is an error) or, if
    /// given, `restored` says the restore is done (false; its error ends the relay) — asked
    /// whenever `fd` (what the restore says) has something. Says `Waiting` to the sender
    /// whenever the pager is quiet for `quiet`.
    pub fn run(
        &mut self,
        link: &mut Link,
        mut restored: Option<(&mut dyn FnMut() -> Result<bool>, std::os::fd::RawFd)>,
        quiet: Duration,
    ) -> Result<bool> {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let mut ask = [0u8; 24];
        if self.done {
            return Ok(true);
        }
        loop {
            if let Some((done, _)) = restored.as_mut()
                && done()?
            {
                return Ok(false);
            }
            let fds = [
                self.pager.as_raw_fd(),
                restored.as_ref().map_or(-1, |r| r.1),
            ];
            match migrt::sys::wait_readable_any(&fds, quiet)? {
                Some(0) => {}
                Some(_) => continue,
                None => {
                    if restored.is_none() {
                        link.send(&Msg::Waiting)?;
                    }
                    continue;
                }
            }
            match (&self.pager).read_exact(&mut ask) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    bail!("the pager ended before the session had all its memory (killed?)")
                }
                Err(e) => return Err(e).context("reading the pager's request"),
            }
            let word = |k: usize| u64::from_le_bytes(ask[k * 8..][..8].try_into().unwrap());
            let want = Ask {
                vpid: word(0) as i32,
                addr: word(1),
                len: word(2),
            };
            if (want.vpid, want.addr, want.len) == crate::pager::DONE {
                // (What was asked ahead is read, so that the sender is not cut off
                // mid-answer.)
                if let Some(a) = self.ahead.take() {
                    self.answer(link, a)?;
                }
                self.done = true;
                return Ok(true);
            }
            if want.len == 0 || want.len > peer::CHUNK as u64 {
                bail!("the pager asked for {} bytes at once", want.len);
            }
            if self.ahead != Some(want) {
                self.want(link, want, false)?;
                if let Some(a) = self.ahead.take() {
                    self.answer(link, a)?; // a wrong guess, dropped
                }
            }
            // A whole chunk: most likely, the next one follows.
            self.ahead = None;
            if want.len == peer::CHUNK as u64 {
                let next = Ask {
                    addr: want.addr + want.len,
                    ..want
                };
                self.want(link, next, true)?;
                self.ahead = Some(next);
            }
            let data = self.answer(link, want)?;
            let (head, tail) = (crate::sparse::map_len(want.len), crate::sparse::NEXT);
            let pages = match self.body[data.clone()].get(..head) {
                Some(map) if data.len() == head + crate::sparse::data_len(map) + tail => {
                    data.len() - head - tail
                }
                _ => bail!(
                    "{} bytes of pages for {} asked: not a map of them and their data",
                    data.len(),
                    want.len
                ),
            };
            self.bytes += pages as u64;
            if self.bytes > self.limit {
                bail!("the session's memory is over this agent's limit (--max-bytes)");
            }
            (&self.pager).write_all(&self.body[data])?;
        }
    }

    fn want(&self, link: &mut Link, a: Ask, ahead: bool) -> Result<()> {
        let (vpid, addr, len) = (a.vpid, a.addr, a.len);
        link.send(&Msg::Want {
            vpid,
            addr,
            len,
            ahead,
        })
    }

    /// Reads the answer to `a` (where its bytes are in `body`), checked against the MAC.
    fn answer(&mut self, link: &mut Link, a: Ask) -> Result<std::ops::Range<usize>> {
        let empty = Msg::Pages {
            vpid: a.vpid,
            addr: a.addr,
            data: Vec::new(),
        };
        let data = match link.recv_with_data(&mut self.body, &empty)? {
            Ok(at) => at,
            Err(Msg::Refused(why)) => bail!("the sender could not send the pages: {why}"),
            Err(other) => bail!("expected pages, got {other:?}"),
        };
        match link.recv()? {
            Msg::Sent { mac } if link.verify(&mac) => Ok(data),
            _ => bail!("pages that do not match their MAC: damaged or tampered with on the way"),
        }
    }
}
