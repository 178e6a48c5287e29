//! The pager of a lazy restore (`mig restore --lazy`): the restored processes run at once,
//! their saved pages still in the image files. Each process registered its private memory
//! with a userfaultfd (in its restorer) and sent it here; the pager answers every fault on
//! a missing page with the page's data from the image (or zeros, if the image has none),
//! and meanwhile fills in everything else, a chunk at a time. Once a process has all its
//! pages, its userfaultfd is closed and its memory is ordinary memory again.
//!
//! The app may change its memory meanwhile: what it frees (madvise, munmap) must read as
//! zero afterwards, not be filled; what it moves (mremap) is followed; a process it forks
//! gets a userfaultfd of its own (its missing pages are the same as the parent's) and is
//! filled too, once it has lived a while (most such children end at once). The kernel
//! reports all four, and holds the process until the pager has read the report.
//!
//! After a lazy migration (`mig migrate --mode lazy`), most pages are not in any file: they
//! are still in the frozen source (runs with fd -1, their offset the source address), and
//! come through the agent, which fetches them over the link (`Remote`).
//! What one process fetches from there is given to the others of the same image that miss
//! it (a child forked meanwhile misses what its parent missed then).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

const PAGE: u64 = 4096;
/// A fault is answered with this much (within the run of the faulting page).
const FAULT_CHUNK: u64 = 16 * PAGE;
/// The background fill copies this much at a time.
const FILL_CHUNK: u64 = 64 * PAGE;
/// ... and this much of the pages still in a lazy migration's source (a round trip each).
const REMOTE_CHUNK: u64 = 256 * PAGE;

const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// Saved pages of a process: `len` bytes at `addr`, in file `fd` at `offset` (fd -1: in the
/// source of a lazy migration, at address `offset` there).
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub addr: u64,
    pub len: u64,
    pub fd: RawFd,
    pub offset: u64,
}

/// A change the app made to its address space, in the addresses of that moment.
#[derive(Clone, Copy)]
enum Change {
    /// mremap: `len` bytes from `from` to `to` (what was at `to` is gone).
    Moved { from: u64, to: u64, len: u64 },
    /// madvise(MADV_DONTNEED) or munmap: what was there is gone (reads as zero).
    Gone { start: u64, end: u64 },
}

/// Page data of the image (in file `fd` at `offset`) whose checksum must be `crc`: checked
/// the first time any of it is read (a lazy restore does not read it all first).
#[derive(Clone, Debug)]
pub struct Check {
    pub fd: RawFd,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
    /// The file, for the message if it is damaged.
    pub name: String,
    pub verified: std::cell::Cell<bool>,
}

/// The pages still in a lazy migration's source: a stream socket to the agent, which fetches
/// them over its link. Asked: the process (vpid), the address there, the length (3 × u64);
/// answered, in the order asked: which of the pages have data, and those pages (sparse.rs;
/// the others are left missing: they read as zero). The agent closes the socket when it
/// cannot answer (the link broke).
pub struct Remote {
    pub sock: std::os::unix::net::UnixStream,
    /// The vpid of each process, by index.
    pub vpids: Vec<i32>,
    /// A request sent before its answer was needed — the fill's next chunk, asked for
    /// before this one is copied in, so that it comes meanwhile — and its answer, once
    /// another request had to be answered first.
    pub ahead: std::cell::RefCell<Option<(Ask, Option<Answer>)>>,
}

/// An answer kept: what it says, and the pages, each at its place.
pub type Answer = (Got, Vec<u8>);

/// What an answer from the source says besides its pages (sparse.rs): which of them have
/// data, and where the next page with data may be past them (a source address; 0: not
/// known).
pub struct Got {
    map: Vec<u8>,
    next: u64,
}

/// A request to the source: process (vpid), address there, length.
pub type Ask = (i32, u64, u64);

/// The pager's last word to the agent: it has filled in all it had to.
pub const DONE: Ask = (0, 0, 0);

impl Remote {
    fn ask(&self, (vpid, addr, len): Ask) -> std::io::Result<()> {
        use std::io::Write;
        let mut ask = [0u8; 24];
        for (k, w) in [vpid as u64, addr, len].iter().enumerate() {
            ask[k * 8..][..8].copy_from_slice(&w.to_le_bytes());
        }
        (&self.sock).write_all(&ask)
    }

    /// The pages of process `vpid` at `addr` that have data, into `buf` (each at its
    /// place; the others' bytes are left as they were); returns which they are.
    fn fetch(&self, vpid: i32, addr: u64, buf: &mut [u8]) -> std::io::Result<Got> {
        let want = (vpid, addr, buf.len() as u64);
        let ahead = self.ahead.take();
        let got = match ahead {
            Some((a, Some((got, data)))) if a == want => {
                buf.copy_from_slice(&data);
                Ok(got)
            }
            Some((a, None)) if a == want => self.answer(buf),
            ahead => {
                // (An answer to something else comes first: kept for when it is wanted,
                // unless it was kept already — then the fill went another way.)
                if let Some((a, None)) = ahead {
                    let mut data = vec![0u8; a.2 as usize];
                    let got = self.answer(&mut data).map_err(|e| self.broke(a.1, e))?;
                    *self.ahead.borrow_mut() = Some((a, Some((got, data))));
                }
                self.ask(want).and_then(|_| self.answer(buf))
            }
        };
        got.map_err(|e| self.broke(addr, e))
    }

    /// Reads the answer to a request of `buf.len()` bytes: its pages into `buf`, each at
    /// its place, and what it says of them.
    fn answer(&self, buf: &mut [u8]) -> std::io::Result<Got> {
        use std::io::Read;
        let mut map = vec![0u8; crate::sparse::map_len(buf.len() as u64)];
        (&self.sock).read_exact(&mut map)?;
        let n = crate::sparse::data_len(&map);
        let asked = buf.len();
        let data = buf.get_mut(..n).ok_or_else(|| {
            std::io::Error::other(format!("{n} bytes of pages for {asked} asked"))
        })?;
        (&self.sock).read_exact(data)?;
        crate::sparse::unpack(&map, buf);
        let mut next = [0u8; crate::sparse::NEXT];
        (&self.sock).read_exact(&mut next)?;
        Ok(Got {
            map,
            next: u64::from_le_bytes(next),
        })
    }

    /// Asks for `a` now, to be fetched later (unless a request is ahead already).
    fn prefetch(&self, a: Ask) -> std::io::Result<()> {
        if self.ahead.borrow().is_some() {
            return Ok(());
        }
        self.ask(a).map_err(|e| self.broke(a.1, e))?;
        *self.ahead.borrow_mut() = Some((a, None));
        Ok(())
    }

    fn broke(&self, addr: u64, e: std::io::Error) -> std::io::Error {
        std::io::Error::other(format!(
            "the pages at {addr:#x} did not come from the source ({e}): the link to it broke"
        ))
    }
}

/// Checks the page data that `len` bytes of `fd` at `offset` belong to, once.
pub fn verify(checks: &[Check], fd: RawFd, offset: u64, len: u64) -> std::io::Result<()> {
    for c in checks.iter().filter(|c| {
        c.fd == fd && !c.verified.get() && offset < c.offset + c.len && offset + len > c.offset
    }) {
        // (One buffer, reused: fresh memory costs a fault per page, slow on some VMs.)
        thread_local! {
            static DATA: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let ok = DATA.with_borrow_mut(|data| {
            data.resize(c.len as usize, 0);
            // SAFETY: pread into our own buffer of c.len bytes.
            let n =
                unsafe { libc::pread(fd, data.as_mut_ptr().cast(), data.len(), c.offset as i64) };
            n == c.len as isize && migrt::image::checksum(data) == c.crc
        });
        if !ok {
            return Err(std::io::Error::other(format!(
                "{}: damaged page data at offset {} (checksum mismatch)",
                c.name, c.offset
            )));
        }
        c.verified.set(true);
    }
    Ok(())
}

/// One address space being filled: a restored process, or a child it forked meanwhile.
struct Space {
    uffd: OwnedFd,
    runs: Rc<Vec<Run>>,
    checks: Rc<[Check]>,
    /// The background fill's place: run index and offset in it.
    next: (usize, u64),
    /// What the app did to its memory since it was restored, in order.
    changes: Vec<Change>,
    /// Faults not answered yet (the app's memory was changing): tried again.
    pending: Vec<u64>,
    /// The process (0: a child forked meanwhile, pid unknown).
    pid: i32,
    /// Where the pages kept in a lazy migration's source come from, and whose they are.
    remote: Option<(Rc<Remote>, i32)>,
    /// What was fetched from there already (image addresses).
    fetched: Spans,
    /// Where the last fault's pages ended, and how much it fetched.
    ahead: (u64, u64),
    /// The fill's next piece from the source, asked for once this one has come.
    then: std::cell::Cell<Option<Ask>>,
    /// Where the source said the next page with data may be, past what it sent last.
    data_next: std::cell::Cell<u64>,
    /// Pages read that a copy could not place yet (the app's memory was changing), kept
    /// for the next try, and where the source said the next page with data may be.
    held: Option<(Pages, u64)>,
    /// When the background fill may begin (a child forked meanwhile: once it has lived a
    /// while, see CHILD_GRACE).
    fill_from: std::time::Instant,
    /// What it fetched from the source since the pager last offered it to the others (see
    /// `offer`).
    fresh: Vec<Pages>,
}

/// Saved pages read: their image address, data, and which of them have data (None: all).
type Pages = (u64, Vec<u8>, Option<Vec<u8>>);

/// A child the app forks while pages are missing is filled only once it has lived this
/// long; until then only its faults are answered. Most such children end at once (a
/// `fork` + `exec`, a short-lived worker): filling each from the start cost, for a python
/// process forking every few ms, 1.9 GiB fetched for 20 MiB of memory.
const CHILD_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// Address ranges, merged: start → end.
#[derive(Default, Clone)]
struct Spans(std::collections::BTreeMap<u64, u64>);

impl Spans {
    /// The first piece of `from..to` that is in no range.
    fn missing(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        let mut at = from;
        // A range that starts before `at` and reaches it covers the start.
        if let Some((_, &e)) = self.0.range(..=at).next_back()
            && e > at
        {
            at = e;
        }
        if at >= to {
            return None;
        }
        let end = self.0.range(at..to).next().map_or(to, |(&s, _)| s);
        Some((at, end))
    }

    fn add(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.0.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        let inside: Vec<u64> = self.0.range(start..=end).map(|(&s, _)| s).collect();
        for s in inside {
            end = end.max(self.0.remove(&s).unwrap_or(end));
        }
        self.0.insert(start, end);
    }
}

/// What a copy into the app's memory came to.
enum Copied {
    Done,
    /// The app's memory is changing (an event waits to be read): try again after.
    Later,
}

/// Where the range `a..a+len` went through the changes, if it went as one piece:
/// Some(Some(x)) now at x, Some(None) gone, None split.
fn follow(changes: &[Change], a: u64, len: u64) -> Option<Option<u64>> {
    let inside = |x: u64, s: u64, e: u64| x >= s && x + len <= e;
    let apart = |x: u64, s: u64, e: u64| x + len <= s || x >= e;
    let mut x = a;
    for c in changes {
        match *c {
            Change::Moved { from, to, len: n } if inside(x, from, from + n) => x = x - from + to,
            Change::Moved { from, to, len: n }
                if apart(x, from, from + n) && apart(x, to, to + n) => {}
            Change::Moved { to, len: n, .. } if inside(x, to, to + n) => return Some(None),
            Change::Gone { start, end } if apart(x, start, end) => {}
            Change::Gone { start, end } if inside(x, start, end) => return Some(None),
            _ => return None,
        }
    }
    Some(Some(x))
}

impl Space {
    fn new(uffd: OwnedFd, runs: Rc<Vec<Run>>, checks: Rc<[Check]>, pid: i32) -> Space {
        Space {
            uffd,
            runs,
            checks,
            next: (0, 0),
            changes: Vec::new(),
            pending: Vec::new(),
            pid,
            remote: None,
            fetched: Spans::default(),
            ahead: (0, 0),
            then: std::cell::Cell::new(None),
            data_next: std::cell::Cell::new(0),
            held: None,
            fill_from: std::time::Instant::now(),
            fresh: Vec::new(),
        }
    }

    /// The saved data of `len` bytes of `run` at image address `a`, read into `buf`; from
    /// a lazy migration's source, which pages have data (sparse.rs; None: all).
    fn read(
        &self,
        run: &Run,
        a: u64,
        len: u64,
        buf: &mut [u8],
    ) -> std::io::Result<Option<Vec<u8>>> {
        let off = run.offset + (a - run.addr);
        if run.fd < 0 {
            let (remote, vpid) = self.remote.as_ref().ok_or_else(|| {
                std::io::Error::other("pages kept in a migration's source, and no link to it")
            })?;
            let got = remote.fetch(*vpid, off, buf)?;
            if let Some(next) = self.then.take() {
                remote.prefetch(next)?;
            }
            self.data_next.set(got.next);
            return Ok(Some(got.map));
        }
        verify(&self.checks, run.fd, off, len)?;
        // SAFETY: pread into our own buffer of `len` bytes.
        let n = unsafe { libc::pread(run.fd, buf.as_mut_ptr().cast(), len as usize, off as i64) };
        if n != len as isize {
            return Err(std::io::Error::other(format!(
                "reading saved pages (fd {}, offset {off}): short read",
                run.fd
            )));
        }
        Ok(None)
    }

    /// The image address of the page now at `x`, if it holds one (not something made
    /// after a change there).
    fn image(&self, mut x: u64) -> Option<u64> {
        for c in self.changes.iter().rev() {
            match *c {
                Change::Moved { from, to, len } if (to..to + len).contains(&x) => x = x - to + from,
                Change::Moved { from, len, .. } if (from..from + len).contains(&x) => return None,
                Change::Gone { start, end } if (start..end).contains(&x) => return None,
                _ => {}
            }
        }
        Some(x)
    }

    /// The saved data of image range `a..a+len` (within one run) copied to where it is now
    /// (page by page where the range went in pieces; nothing where it is gone).
    /// (From a lazy migration's source: only what was not fetched before, each piece once.)
    fn copy(&mut self, run: &Run, a: u64, len: u64, buf: &mut Vec<u8>) -> std::io::Result<Copied> {
        if run.fd >= 0 {
            return self.copy_range(run, a, len, buf);
        }
        let mut at = a;
        while let Some((s, e)) = self.fetched.missing(at, a + len) {
            if let Copied::Later = self.copy_range(run, s, e - s, buf)? {
                return Ok(Copied::Later);
            }
            self.fetched.add(s, e);
            at = e;
        }
        Ok(Copied::Done)
    }

    fn copy_range(
        &mut self,
        run: &Run,
        a: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<Copied> {
        // (Read again, pages from the source would take another round trip, during which
        // the app may change its memory again — a parent forking every few ms did, and the
        // fill never ended.)
        let map = match self.held.take() {
            Some(((at, data, map), next)) if at == a && data.len() as u64 == len => {
                *buf = data;
                self.data_next.set(next);
                map
            }
            held => {
                self.held = held;
                buf.resize(len as usize, 0);
                self.read(run, a, len, buf)?
            }
        };
        if let Copied::Later = self.place(a, buf, &map)? {
            // (What was placed already is found there next time: EEXIST.)
            let next = self.data_next.get();
            self.held = Some(((a, std::mem::take(buf), map), next));
            return Ok(Copied::Later);
        }
        // (Only where another space has the same image: `serve` holds one count of it, each
        // space one.)
        if run.fd < 0 && Rc::strong_count(&self.runs) > 2 {
            self.fresh.push((a, buf.clone(), map));
        }
        Ok(Copied::Done)
    }

    /// Copies `data`, the saved pages of image range `a..` (`map`: which of them have
    /// data; None: all), to where they are now.
    fn place(&self, a: u64, data: &[u8], map: &Option<Vec<u8>>) -> std::io::Result<Copied> {
        let pages = data.len() / PAGE as usize;
        let all = [(0, pages, true)];
        let runs: Box<dyn Iterator<Item = (usize, usize, bool)>> = match map {
            Some(map) => Box::new(crate::sparse::runs(map, pages)),
            None => Box::new(all.into_iter()),
        };
        // Pages without data are left missing (a fault there gets the zero page).
        for (first, count, _) in runs.filter(|r| r.2) {
            let (from, n) = (first as u64 * PAGE, count as u64 * PAGE);
            let step = match follow(&self.changes, a + from, n) {
                Some(_) => n,
                None => PAGE,
            };
            for at in (from..from + n).step_by(step as usize) {
                let Some(Some(x)) = follow(&self.changes, a + at, step) else {
                    continue;
                };
                if let Copied::Later = uffd_copy(&self.uffd, x, data[at as usize..].as_ptr(), step)?
                {
                    return Ok(Copied::Later);
                }
            }
        }
        Ok(Copied::Done)
    }

    /// Pages another space of the same image fetched from the source (`fresh`), placed
    /// here too where this space still misses all of them: a child the app forked misses
    /// what its parent missed then, and what one fetches the other would fetch again.
    fn offer(&mut self, (a, data, map): &Pages) {
        let end = a + data.len() as u64;
        if self.fetched.missing(*a, end) == Some((*a, end))
            && let Ok(Copied::Done) = self.place(*a, data, map)
        {
            self.fetched.add(*a, end);
        }
    }

    /// Answers a fault at `x` (where the app is now).
    fn fault(&mut self, x: u64, buf: &mut Vec<u8>) -> std::io::Result<Copied> {
        let page = x & !(PAGE - 1);
        let run = self.image(page).and_then(|a| {
            let r = self
                .runs
                .iter()
                .find(|r| (r.addr..r.addr + r.len).contains(&a))?;
            Some((*r, a))
        });
        match run {
            // From the source already, with no data there (sparse.rs): zeros.
            Some((r, a)) if r.fd < 0 && self.fetched.missing(a, a + PAGE).is_none() => {
                uffd_zero(&self.uffd, page)
            }
            Some((r, a)) => {
                // (From a lazy migration's source, a fault right after the last one's pages
                // fetches twice as much, up to a fill chunk: read-ahead for sequential use.)
                let chunk = match self.ahead {
                    (end, n) if r.fd < 0 && end == a => (2 * n).min(REMOTE_CHUNK),
                    _ => FAULT_CHUNK,
                };
                let len = chunk.min(r.addr + r.len - a);
                self.ahead = (a + len, chunk);
                // (Read-ahead at full size: the next chunk is asked for before this one is
                // copied in.)
                if chunk == REMOTE_CHUNK && self.fetched.missing(a, a + len) == Some((a, a + len)) {
                    self.then.set(self.first_missing(&r, a + len, chunk));
                }
                let copied = self.copy(&r, a, len, buf);
                self.then.set(None);
                match (copied?, r.fd) {
                    // From the source, the page may have had no data (or came earlier):
                    // zeros where it is still missing.
                    (Copied::Done, fd) if fd < 0 => uffd_zero(&self.uffd, page),
                    (copied, _) => Ok(copied),
                }
            }
            None => uffd_zero(&self.uffd, page),
        }
    }

    /// Fills the next chunk; Ok(true) once everything is in.
    fn fill(&mut self, buf: &mut Vec<u8>) -> std::io::Result<bool> {
        let Some((run, a, len)) = self.fill_chunk(self.next) else {
            return Ok(true);
        };
        let after = match self.next.1 + len >= run.len {
            true => (self.next.0 + 1, 0),
            false => (self.next.0, self.next.1 + len),
        };
        // (Asked ahead only where this chunk is one request: the next must follow it.)
        if self.fetched.missing(a, a + len) == Some((a, a + len)) {
            let next = self.fill_chunk(after);
            self.then
                .set(next.and_then(|(r, a, len)| self.first_missing(&r, a, len)));
        }
        self.data_next.set(0);
        let copied = self.copy(&run, a, len, buf);
        self.then.set(None);
        if let Copied::Later = copied? {
            return Ok(false);
        }
        self.next = self.skip(after, &run);
        Ok(self.next.0 >= self.runs.len())
    }

    /// Where the fill goes on after a chunk of `run` (`after`): past the pages without
    /// data the source said follow it (to the next run if they reach its end).
    fn skip(&self, after: (usize, u64), run: &Run) -> (usize, u64) {
        let next = self.data_next.take();
        if run.fd >= 0 || next <= run.offset || after.0 != self.next.0 {
            return after;
        }
        match (next - run.offset) & !(PAGE - 1) {
            at if at >= run.len => (after.0 + 1, 0),
            at => (after.0, at.max(after.1)),
        }
    }

    /// The fill's chunk at `next` (run index, offset): the run, its image address, length.
    fn fill_chunk(&self, (i, off): (usize, u64)) -> Option<(Run, u64, u64)> {
        let run = self.runs.get(i).copied()?;
        let chunk = if run.fd < 0 { REMOTE_CHUNK } else { FILL_CHUNK };
        Some((run, run.addr + off, chunk.min(run.len - off)))
    }

    /// What a copy of `len` bytes of `run` at image address `a` (cut at the run's end)
    /// asks the source for first, if anything.
    fn first_missing(&self, run: &Run, a: u64, len: u64) -> Option<Ask> {
        let (_, vpid) = self.remote.as_ref().filter(|_| run.fd < 0)?;
        let end = (a + len).min(run.addr + run.len);
        let (s, e) = self.fetched.missing(a, end)?;
        Some((*vpid, run.offset + (s - run.addr), e - s))
    }

    /// Reads what the kernel reports (a forked child's space goes to `forks`), then answers
    /// the faults.
    /// Returns whether there were faults.
    fn events(&mut self, buf: &mut Vec<u8>, forks: &mut Vec<Space>) -> std::io::Result<bool> {
        self.read_events(forks);
        let faults = !self.pending.is_empty();
        let mut still = Vec::new();
        for x in std::mem::take(&mut self.pending) {
            if let Copied::Later = self.fault(x, buf)? {
                still.push(x);
            }
        }
        self.pending = still;
        Ok(faults)
    }

    fn read_events(&mut self, forks: &mut Vec<Space>) {
        let mut msgs = [0u8; 32 * 16];
        loop {
            // SAFETY: reading into our own buffer from our userfaultfd.
            let n =
                unsafe { libc::read(self.uffd.as_raw_fd(), msgs.as_mut_ptr().cast(), msgs.len()) };
            if n <= 0 {
                return; // EAGAIN: nothing more now
            }
            for m in msgs[..n as usize].chunks_exact(32) {
                let word = |i: usize| u64::from_le_bytes(m[i..i + 8].try_into().unwrap());
                match m[0] {
                    EVENT_PAGEFAULT => self.pending.push(word(16)),
                    EVENT_FORK => {
                        let fd = u32::from_le_bytes(m[8..12].try_into().unwrap()) as i32;
                        // SAFETY: the kernel made this fd for us.
                        let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
                        // Its missing pages are the parent's, as the app has changed them.
                        let mut child = Space::new(uffd, self.runs.clone(), self.checks.clone(), 0);
                        child.changes = self.changes.clone();
                        child.remote = self.remote.clone();
                        child.fetched = self.fetched.clone();
                        child.fill_from += CHILD_GRACE;
                        forks.push(child);
                    }
                    EVENT_REMAP => self.changes.push(Change::Moved {
                        from: word(8),
                        to: word(16),
                        len: word(24),
                    }),
                    EVENT_REMOVE | EVENT_UNMAP => self.changes.push(Change::Gone {
                        start: word(8),
                        end: word(16),
                    }),
                    _ => {}
                }
            }
        }
    }
}

fn ioctl(fd: &OwnedFd, req: u64, arg: &mut [u64]) -> std::io::Result<Copied> {
    // SAFETY: `arg` is the structure `req` expects.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg.as_mut_ptr()) } == 0 {
        return Ok(Copied::Done);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Ok(Copied::Later),
        // Already there (the app faulted it in, or a fork copied it), or unmapped since.
        Some(libc::EEXIST) | Some(libc::ENOENT) | Some(libc::EFAULT) => Ok(Copied::Done),
        _ => Err(e),
    }
}

/// Copies `len` bytes at `src` into the app's missing pages at `dst` (waking who waits).
fn uffd_copy(fd: &OwnedFd, dst: u64, src: *const u8, len: u64) -> std::io::Result<Copied> {
    let mut arg = [dst, src as u64, len, 0, 0];
    let r = ioctl(fd, UFFDIO_COPY, &mut arg)?;
    // Stopped at a page that is there already (the app faulted it in, or a fork copied
    // it): the rest page by page.
    let copied = arg[4] as i64;
    if len > PAGE && (copied == -(libc::EEXIST as i64) || (copied > 0 && (copied as u64) < len)) {
        let from = copied.max(0) as u64 & !(PAGE - 1);
        for at in (from..len).step_by(PAGE as usize) {
            // SAFETY: within the caller's buffer of `len` bytes.
            if let Copied::Later = uffd_copy(fd, dst + at, unsafe { src.add(at as usize) }, PAGE)? {
                return Ok(Copied::Later);
            }
        }
        return Ok(Copied::Done);
    }
    Ok(r)
}

fn uffd_zero(fd: &OwnedFd, page: u64) -> std::io::Result<Copied> {
    ioctl(fd, UFFDIO_ZEROPAGE, &mut [page, PAGE, 0, 0])
}

/// The features a restored process asks its userfaultfd for (runtime/restorer/main.rs):
/// fork, mremap, madvise(DONTNEED) and munmap reported to the pager.
const FEATURES: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);
const UFFDIO_API: u64 = 0xc018_aa3f;

/// Whether this user may make a userfaultfd that also handles faults taken inside system
/// calls (root, or vm.unprivileged_userfaultfd = 1) and reports forks (CAP_SYS_PTRACE: a
/// normal user's restore cannot follow a process the app forks meanwhile).
pub fn available() -> bool {
    // SAFETY: userfaultfd takes flags only; the fd is owned at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        return false;
    }
    // SAFETY: as above.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = [0xAA, FEATURES, 0];
    matches!(ioctl(&fd, UFFDIO_API, &mut api), Ok(Copied::Done))
}

/// The processes being filled in: a pager that fails midway (a bug: it panics) ends them —
/// with it gone, their missing pages would read as zeros.
static FILLING: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

fn end_filling() {
    let pids = FILLING.lock().unwrap_or_else(|p| p.into_inner());
    for &pid in pids.iter() {
        // SAFETY: kill takes plain values.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Serves the processes whose userfaultfds come on `sock` (a message each: the process's
/// index into `runs` and its pid, the fd attached) until every one is filled and `sock` has
/// no sender left. Until `hold` is closed (the restore is done), faults are answered but
/// nothing else filled in.
pub fn serve(
    sock: OwnedFd,
    hold: OwnedFd,
    runs: Vec<Vec<Run>>,
    checks: Vec<Check>,
    remote: Option<Remote>,
) {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("mig restore: lazy restore: the pager failed; the processes it filled in end");
        end_filling();
    }));
    let remote = remote.map(Rc::new);
    let checks: Rc<[Check]> = checks.into();
    let runs: Vec<Rc<Vec<Run>>> = runs.into_iter().map(Rc::new).collect();
    // A pause between chunks of the fill (MIGSHIM_PAGER_THROTTLE_MS: tests use it to keep
    // the app running long while pages are missing); faults are answered meanwhile.
    let pause = std::time::Duration::from_millis(
        std::env::var("MIGSHIM_PAGER_THROTTLE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let mut filled_at = std::time::Instant::now() - pause;
    // The fill waits while the app faults (it is starting: each fault it takes would wait
    // behind a chunk of the fill); it goes on once the app has been quiet this long.
    let quiet = std::time::Duration::from_millis(2);
    let mut faulted_at = std::time::Instant::now() - quiet;
    let mut hold = Some(hold);
    let mut spaces: Vec<Space> = Vec::new();
    let mut open = true;
    let mut buf = Vec::new();
    while open || !spaces.is_empty() {
        let mut polls: Vec<libc::pollfd> = spaces
            .iter()
            .map(|s| libc::pollfd {
                fd: s.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // (A hold's end is seen as POLLHUP; it is never written to.)
        polls.extend(hold.iter().map(|h| libc::pollfd {
            fd: h.as_raw_fd(),
            events: 0,
            revents: 0,
        }));
        if open {
            polls.push(libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Wait only when there is nothing to fill (or until the next chunk is due).
        let timeout = match spaces.is_empty() || hold.is_some() {
            true => -1,
            false => {
                let now = std::time::Instant::now();
                let first = spaces.iter().map(|s| s.fill_from).min().unwrap_or(now);
                pause
                    .saturating_sub(filled_at.elapsed())
                    .max(quiet.saturating_sub(faulted_at.elapsed()))
                    .max(first.saturating_duration_since(now))
                    .as_millis() as i32
            }
        };
        // SAFETY: polls is a valid array of pollfds.
        unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as _, timeout) };
        if hold.is_some() && polls[spaces.len()].revents != 0 {
            hold = None;
        }
        if open && polls.last().is_some_and(|p| p.revents != 0) {
            let mut msg = [0u8; 16];
            match migrt::sys::recv_fd(sock.as_raw_fd(), &mut msg) {
                Ok((16, fd)) if fd >= 0 => {
                    let word = |k: usize| u64::from_le_bytes(msg[k..k + 8].try_into().unwrap());
                    let (i, pid) = (word(0) as usize, word(8) as i32);
                    // SAFETY: the fd came with the message; it is ours now.
                    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
                    if let Some(r) = runs.get(i) {
                        let mut space = Space::new(uffd, r.clone(), checks.clone(), pid);
                        space.remote = remote
                            .as_ref()
                            .and_then(|m| Some((m.clone(), *m.vpids.get(i)?)));
                        FILLING.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
                        spaces.push(space);
                    }
                }
                _ => open = false, // every sender has closed its end
            }
        }
        let mut forks = Vec::new();
        let fill_now =
            hold.is_none() && filled_at.elapsed() >= pause && faulted_at.elapsed() >= quiet;
        if fill_now {
            filled_at = std::time::Instant::now();
        }
        // What the spaces fetched from the source this time round, and whose image it is.
        let mut fresh = Vec::new();
        let mut i = 0;
        while i < spaces.len() {
            let s = &mut spaces[i];
            // Reports first (faults waiting, and changes a fill must know of), then a chunk.
            let result = s.events(&mut buf, &mut forks).and_then(|faults| {
                if faults {
                    faulted_at = std::time::Instant::now();
                }
                match fill_now && !faults && s.fill_from <= std::time::Instant::now() {
                    true => s.fill(&mut buf),
                    false => Ok(false),
                }
            });
            fresh.extend(s.fresh.drain(..).map(|f| (s.runs.clone(), f)));
            let filled = result.unwrap_or_else(|e| {
                // Its memory cannot be completed: it must not run on with zeros instead.
                // (Unless it ended by itself: a child the app forked and that exited.)
                if e.raw_os_error() != Some(libc::ESRCH) {
                    eprintln!("mig restore: lazy restore: {e}; process {} ended", s.pid);
                }
                if s.pid > 0 {
                    // SAFETY: kill takes plain values.
                    unsafe { libc::kill(s.pid, libc::SIGKILL) };
                }
                true
            });
            if filled {
                // Drained again, so that no fork report is lost with the fd.
                let _ = spaces[i].events(&mut buf, &mut forks);
                let done = spaces.swap_remove(i);
                FILLING
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|&p| p != done.pid);
            } else {
                i += 1;
            }
        }
        spaces.extend(forks);
        for (runs, piece) in &fresh {
            for s in spaces.iter_mut().filter(|s| Rc::ptr_eq(&s.runs, runs)) {
                s.offer(piece);
            }
        }
    }
    // An answer still coming is read (the agent must not find the pager gone mid-answer),
    // then the agent told that this is the end: a pager killed midway only closes its
    // socket, and the source must then keep the session.
    if let Some(r) = remote.as_ref() {
        if let Some((a, None)) = r.ahead.take() {
            let _ = std::io::Read::read_exact(&mut &r.sock, &mut vec![0u8; a.2 as usize]);
        }
        let _ = r.ask(DONE);
    }
}

#[cfg(test)]
mod tests {
    use super::Spans;

    #[test]
    fn spans_say_what_is_missing_and_merge() {
        let mut s = Spans::default();
        assert_eq!(s.missing(0, 100), Some((0, 100)));
        s.add(10, 20);
        s.add(30, 40);
        assert_eq!(s.missing(0, 100), Some((0, 10)));
        assert_eq!(s.missing(10, 100), Some((20, 30)));
        assert_eq!(s.missing(15, 18), None);
        assert_eq!(s.missing(35, 100), Some((40, 100)));
        s.add(20, 30);
        assert_eq!(s.0.len(), 1, "touching ranges merge");
        assert_eq!(s.missing(10, 40), None);
        s.add(5, 50);
        assert_eq!(s.0.iter().collect::<Vec<_>>(), [(&5, &50)]);
        assert_eq!(s.missing(0, 60), Some((0, 5)));
        assert_eq!(s.missing(5, 60), Some((50, 60)));
    }
}
