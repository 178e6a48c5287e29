//! What `mig migrate` sends the agent: files announced, then written into the link as
//! Chunk frames — a frozen process's image forwarded from the pipe it writes into, a
//! pre-copy round read by `mig` itself from the running process (the process says which
//! runs of its memory; mig reads them with process_vm_readv: no copy through a pipe).

use crate::client::Client;
use crate::frozen::human;
use crate::peer::{CHUNK, Link, Msg};
use crate::samepages::{PAGE, Part, SentPages};
use anyhow::{Context, Result, bail};
use migrt::image::{ImageWriter, Kind, SharedPart, Tag};
use migrt::rounds::PageHashes;
use migrt::wire::{Request, Response};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The link, shared with the threads that forward images as they are written.
pub type Shared = Arc<Mutex<Sender>>;

pub struct Sender {
    pub link: Link,
    /// The bytes sent so far.
    pub bytes: u64,
    /// The pages sent so far, and where (each goes once), if pages are compared.
    sent: Option<SentPages>,
}

impl Sender {
    pub fn shared(link: Link, compare: bool) -> Shared {
        Arc::new(Mutex::new(Sender {
            link,
            bytes: 0,
            sent: compare.then(SentPages::default),
        }))
    }
}

/// Announces more files to the agent; returns the index of the first (files are numbered
/// in the order announced, across messages).
pub fn announce(link: &Shared, announced: &mut u32, names: Vec<String>) -> Result<u32> {
    let first = *announced;
    *announced += names.len() as u32;
    link.lock()
        .unwrap_or_else(|p| p.into_inner())
        .link
        .send(&Msg::Files(names))?;
    Ok(first)
}

/// File `file` on the agent, written as Chunk frames of at most CHUNK bytes — its pages
/// sent before as references to them (samepages.rs) — the sent bytes counted, shown on a
/// terminal. `end` ends the file.
pub struct Chunks {
    link: Shared,
    file: u32,
    /// Where in the file the next byte goes.
    offset: u64,
    /// Whether its pages are compared with the pages sent before.
    compare: bool,
    progress: bool,
    shown: Instant,
}

impl Chunks {
    pub fn new(link: &Shared, file: u32) -> Chunks {
        let compare = link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sent
            .is_some();
        Chunks {
            link: link.clone(),
            file,
            offset: 0,
            compare,
            progress: migrt::sys::isatty(2),
            shown: Instant::now(),
        }
    }

    fn send(&mut self, data: &[u8]) -> Result<()> {
        let hashes = match self.compare {
            true => crate::samepages::hashes(self.offset, data),
            false => Vec::new(),
        };
        let mut l = self.link.lock().unwrap_or_else(|p| p.into_inner());
        let file = self.file;
        let parts = match (data.is_empty(), l.sent.as_mut()) {
            (false, Some(sent)) => sent.parts(file, self.offset, data.len(), &hashes),
            _ => vec![Part::Data(0..data.len())], // (empty: the end)
        };
        for part in parts {
            match part {
                Part::Data(r) => {
                    let empty = Msg::Chunk {
                        file,
                        data: Vec::new(),
                    };
                    l.link.send_with_data(&empty, &data[r.clone()])?;
                    l.bytes += r.len() as u64;
                }
                Part::Same { from, offset, len } => l.link.send(&Msg::Same {
                    file,
                    from,
                    offset,
                    len,
                })?,
            }
        }
        self.offset += data.len() as u64;
        if self.progress && self.shown.elapsed() > Duration::from_millis(200) {
            eprint!("\rmig migrate: {} sent", human(l.bytes));
            self.shown = Instant::now();
        }
        Ok(())
    }

    pub fn end(mut self) -> Result<()> {
        self.send(&[])
    }
}

impl std::io::Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(CHUNK);
        if n > 0 {
            self.send(&buf[..n]).map_err(std::io::Error::other)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A pipe whose content goes to file `index` on the agent: (the end to write, the
/// forwarding thread).
pub type Stream = (std::fs::File, std::thread::JoinHandle<Result<()>>);

pub fn stream_to(link: &Shared, index: u32) -> Result<Stream> {
    let (r, w) = migrt::sys::pipe()?;
    migrt::sys::grow_pipe(&w, 1 << 20);
    let mut out = Chunks::new(link, index);
    let forward = std::thread::spawn(move || {
        let mut pipe = r;
        let mut buf = vec![0u8; CHUNK];
        // Sent in whole pages (but at the end): a page split between two reads would not
        // be found among the pages sent before. What is left over goes with the next.
        let mut have = 0;
        loop {
            let n = pipe.read(&mut buf[have..])?;
            if n == 0 {
                if have > 0 {
                    out.send(&buf[..have])?;
                }
                return out.end();
            }
            have += n;
            let whole = have / PAGE * PAGE;
            if whole > 0 {
                out.send(&buf[..whole])?;
                buf.copy_within(whole..have, 0);
                have -= whole;
            }
        }
    });
    Ok((w, forward))
}

/// Waits for a stream's forwarder: it ends once every end to write is closed, and says
/// why it failed first.
pub fn finish(t: std::thread::JoinHandle<Result<()>>) -> Result<()> {
    t.join()
        .map_err(|_| anyhow::anyhow!("the forwarding thread failed"))?
}

/// Whether mig reads the memory of a session's processes itself (process_vm_readv), as
/// it does unless told otherwise. (MIGSHIM_PAGES_THROUGH_SHIM: the tests take the other
/// way too.)
pub fn reads_directly() -> bool {
    std::env::var_os("MIGSHIM_PAGES_THROUGH_SHIM").is_none()
}

/// `out.len()` bytes of process `pid`'s memory at `addr`: read directly while `*direct`,
/// else — and from the first refusal on (a process that made itself undumpable, a stricter
/// Yama policy) — `through` the process.
pub fn read_pages(
    direct: &mut bool,
    pid: i32,
    (addr, out): (u64, &mut [u8]),
    through: impl FnOnce(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    if *direct {
        match migrt::sys::read_memory(pid, addr, out) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => *direct = false,
            r => return r.with_context(|| format!("process {pid}'s memory at {addr:#x}")),
        }
    }
    through(addr, out)
}

/// Where mig reads a process's pages (read_pages), noting whether a read failed.
pub struct Reader<'a> {
    pub pid: i32,
    through: &'a mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    direct: bool,
    /// Whether a read failed (memory the app unmapped meanwhile).
    failed: bool,
}

impl<'a> Reader<'a> {
    pub fn new(pid: i32, through: &'a mut dyn FnMut(u64, &mut [u8]) -> Result<()>) -> Self {
        Reader {
            pid,
            through,
            direct: reads_directly(),
            failed: false,
        }
    }

    pub fn read(&mut self, addr: u64, out: &mut [u8]) -> std::io::Result<()> {
        let r = read_pages(&mut self.direct, self.pid, (addr, out), &mut *self.through);
        self.failed |= r.is_err();
        r.map_err(std::io::Error::other)
    }
}

/// The shared memory a round sends: the runs of its pages that exist, and the objects
/// they belong to.
type SharedRound = (Vec<(u64, u64)>, Vec<SharedPart>);

/// A process of the session as pre-copy sends it: its connection (its write tracking
/// lives as long as it), its rounds' files and — where its rounds go by hash — what they
/// sent (to compare its memory with once it is frozen); the same of the shared memory its
/// rounds send (always by hash: its write tracking does not see the other processes').
pub struct Sending {
    pub vpid: i32,
    pub pid: i32,
    pub client: Client,
    pub files: Vec<String>,
    pub hashes: Option<PageHashes>,
    pub shared: Option<PageHashes>,
}

impl Sending {
    /// Its next pre-copy round, written into file `index` on the agent; returns the bytes
    /// written. `buf` (a multiple of the page size) holds the pages read at a time. With
    /// write tracking, the shared memory its image stores (all but `skip`) goes by hash;
    /// only that unless `private` (a lazy migration sends no private memory ahead).
    /// (MIGSHIM_PRECOPY_BY_HASH: by hash even where the kernel tracks writes.)
    pub fn round(
        &mut self,
        link: &Shared,
        (index, skip): (u32, &[(u64, u64)]),
        buf: &mut [u8],
        private: bool,
    ) -> Result<u64> {
        let asked = std::env::var_os("MIGSHIM_PRECOPY_BY_HASH").is_some();
        let by_hash = self.hashes.is_some() || asked;
        let (pid, runs, first, by_hash) = match private {
            true => match self.client.call(&Request::Precopy { by_hash })? {
                Response::Round {
                    pid,
                    runs,
                    first,
                    by_hash,
                } => (pid, runs, first, by_hash),
                other => bail!("process {}: unexpected answer {other:?}", self.vpid),
            },
            false => (self.pid, Vec::new(), false, false),
        };
        let mut hashes = match (by_hash, self.hashes.take()) {
            (true, Some(h)) => Some(h),
            (true, None) => {
                if !asked {
                    eprintln!(
                        "mig migrate: process {}: its writes cannot be tracked here (that needs Linux 6.7+ and a userfaultfd): pre-copy compares page hashes, and the freeze reads all of its memory",
                        self.vpid
                    );
                }
                Some(PageHashes::new())
            }
            (false, _) => None,
        };
        if let Some(h) = hashes.as_mut() {
            h.covering(&runs);
        }
        let shared = match by_hash {
            true => None,
            false => self.shared_round(skip, &runs)?,
        };
        let mut w = ImageWriter::new(Chunks::new(link, index), Kind::Pages)?;
        // (So that the target builds the objects as the rounds come: restore::prebuilt.)
        if let Some((_, parts)) = shared.as_ref().filter(|s| !s.1.is_empty()) {
            w.postcard(Tag::Shared, parts)?;
        }
        let client = &mut self.client;
        let mut through = |addr, out: &mut [u8]| client.pages(addr, out);
        let mut reader = Reader::new(pid, &mut through);
        let mut send = |addr, page: &[u8]| match hashes.as_mut() {
            Some(h) => h.send(addr, page),
            None => !first || !migrt::rounds::is_zero(page),
        };
        let mut unread = Vec::new();
        for run in runs {
            reader.failed = false;
            let read = &mut |addr, out: &mut [u8]| reader.read(addr, out);
            match migrt::rounds::write_run(&mut w, run, &mut send, buf, read) {
                Ok(_) => {}
                Err(_) if reader.failed => unread.push(run),
                Err(e) => return Err(e.into()),
            }
        }
        if let (Some((resident, _)), Some(h)) = (shared, self.shared.as_mut()) {
            let mut send = |addr, page: &[u8]| h.send(addr, page);
            for run in resident {
                let read = &mut |addr, out: &mut [u8]| reader.read(addr, out);
                // (What could not be read, unmapped meanwhile, the freeze compares again.)
                match migrt::rounds::write_run(&mut w, run, &mut send, buf, read) {
                    Err(e) if !reader.failed => return Err(e.into()),
                    _ => reader.failed = false,
                }
            }
        }
        let bytes = w.written();
        w.finish()?.end()?;
        self.hashes = hashes;
        // (By hash, what could not be read differs when frozen, or is not vouched for.)
        if !unread.is_empty() && !by_hash {
            self.client.call(&Request::Unread { ranges: unread })?;
        }
        Ok(bytes)
    }

    /// The shared memory a round sends: of what the process's image stores (all but
    /// `skip`), the runs of pages that exist, and the objects they belong to. The hashes
    /// of what was sent of it forget the pages the round's private `runs` send (a mapping
    /// replaced by another at the place).
    fn shared_round(
        &mut self,
        skip: &[(u64, u64)],
        runs: &[(u64, u64)],
    ) -> Result<Option<SharedRound>> {
        let found = self.client.shared_memory(skip)?;
        if found.mappings.is_empty() && self.shared.is_none() {
            return Ok(None);
        }
        let h = self.shared.get_or_insert_with(PageHashes::new);
        let mut runs = runs.to_vec();
        runs.sort_unstable();
        h.forget(&runs);
        h.keep_only(&found.mappings);
        let maps = migrt::procfs::all_mappings(&found.pid.to_string());
        let parts = migrt::image::shared_parts(&maps, &found.mappings);
        Ok(Some((found.resident, parts)))
    }
}
