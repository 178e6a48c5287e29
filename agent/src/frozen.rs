//! A session held frozen by `mig` (for a checkpoint or a migration): every process frozen
//! consistently, its images written one by one, then let go — thawed, or ended. Dropping a
//! `Frozen` that was not released thaws every process: whatever fails on the way, the
//! session goes on as if nothing happened.

use crate::client::{Client, Gone};
use crate::sessions::{self, Live};
use anyhow::{Context, Result, bail};
use migrt::image::{ImageWriter, Kind, SessionManifest, Tag};
use migrt::wire::{Request, Response};
use std::time::{Duration, Instant};

/// The end of user space (x86-64, 4-level page tables): a page map is not scanned past it.
const USER_END: u64 = 0x7fff_ffff_f000;

pub struct Frozen<'a> {
    pub live: &'a Live,
    /// (vpid, parent vpid, control connection), in the order they were frozen.
    clients: Vec<(i32, i32, Client)>,
    /// Their tables as they were frozen.
    tables: Vec<migrt::table::ProcessTable>,
    pub threads: u32,
    pub at: Instant,
    released: bool,
    /// fds that are one open file, found while frozen (check_supported).
    shared: migrt::sharing::Shared,
    /// The pre-copy rounds' files of each process that made rounds.
    pub rounds: std::collections::HashMap<i32, Vec<String>>,
    /// Of each process whose rounds went by hash: what changed since the last one.
    pub compared: std::collections::HashMap<i32, migrt::rounds::Compared>,
    /// Of each process whose rounds sent shared memory: what changed of it since.
    pub compared_shared: std::collections::HashMap<i32, migrt::rounds::Compared>,
    /// Connections to peers outside the session handed over whole (socket ids).
    handover: Vec<u64>,
    /// mig's copies of those connections, which it put in TCP repair mode for the dump
    /// (a process that runs as another user than root may not): let out again if the
    /// session runs on here.
    repairing: Vec<std::os::fd::OwnedFd>,
    /// Where each process's memory is read after a lazy migration's dump (the process
    /// itself, or a snapshot of it: a pid), read directly while that is allowed (ptrace
    /// access: same user, no stricter Yama policy).
    snapshots: std::collections::HashMap<i32, i32>,
    /// Whether they are read directly (outgoing::read_pages).
    direct: bool,
    /// Their page maps (/proc/PID/pagemap, by that pid; None: not readable), which say
    /// where a post-copy's pages exist.
    pagemaps: std::collections::HashMap<i32, Option<std::fs::File>>,
    /// Walks part of the memory of each process whose dump walks it (walkhelp.rs).
    pub walker: Option<crate::walkhelp::Walker>,
    /// Each process's mappings as frozen, read once: several steps need them, and the map
    /// of a process with hundreds of mappings takes a fraction of a millisecond to read.
    maps: std::cell::OnceCell<Vec<Vec<migrt::procfs::MapsLine>>>,
}

impl<'a> Frozen<'a> {
    /// Freezes all, so that what passes between them is consistent. A process that ends
    /// before it is frozen ended before the checkpoint and is left out; one started
    /// meanwhile is frozen too (frozen processes start none, so this settles).
    pub fn freeze(live: &'a Live) -> Result<Frozen<'a>> {
        Self::freeze_with(live, Vec::new())
    }

    /// The same, over connections already open to some of its processes (by vpid).
    pub fn freeze_with(live: &'a Live, mut open: Vec<(i32, Client)>) -> Result<Frozen<'a>> {
        let mut f = Frozen {
            live,
            clients: Vec::new(),
            tables: Vec::new(),
            threads: 0,
            at: Instant::now(),
            released: false,
            shared: Vec::new(),
            rounds: Default::default(),
            compared: Default::default(),
            compared_shared: Default::default(),
            handover: Vec::new(),
            repairing: Vec::new(),
            snapshots: Default::default(),
            direct: crate::outgoing::reads_directly(),
            pagemaps: Default::default(),
            walker: None,
            maps: Default::default(),
        };
        let mut ended: std::collections::HashMap<i32, u32> = Default::default();
        loop {
            let newcomers: Vec<_> = live
                .processes()
                .into_iter()
                .filter(|p| !f.clients.iter().any(|c| c.0 == p.vpid))
                .collect();
            if newcomers.is_empty() {
                break;
            }
            // Each process starts freezing as soon as it is asked; the answers are read
            // once all are. (One dropped unanswered thaws: its connection closes.)
            let mut asked = Vec::new();
            for p in newcomers {
                let known = open.iter().position(|o| o.0 == p.vpid);
                let connected = match known {
                    Some(i) => Ok(open.swap_remove(i).1),
                    None => Client::connect(&live.dir, p.vpid, p.pid, live.table.signal()),
                };
                let mut c = match connected {
                    Ok(c) => c,
                    Err(e) if sessions::gone(p.pid) || Gone::is(&e, Gone::Exited) => {
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                match c.send(&Request::Freeze) {
                    Ok(()) => asked.push((p, c)),
                    Err(_) if sessions::gone(p.pid) => {}
                    Err(e) if Gone::is(&e, Gone::Ended) => ask_again(&mut ended, p.vpid, e)?,
                    Err(e) => return Err(e),
                }
            }
            for (p, mut c) in asked {
                match c.answer() {
                    Ok(Response::Frozen {
                        threads: n, table, ..
                    }) => {
                        f.threads += n;
                        f.clients.push((p.vpid, p.parent_vpid, c));
                        f.tables.push(table);
                    }
                    Err(_) if sessions::gone(p.pid) => {}
                    Err(e) if Gone::is(&e, Gone::Ended) => ask_again(&mut ended, p.vpid, e)?,
                    Ok(other) => bail!("process {}: unexpected answer {other:?}", p.vpid),
                    Err(e) => return Err(e),
                }
            }
        }
        if f.clients.is_empty() {
            bail!("session {} has no live process", live.name());
        }
        Ok(f)
    }

    pub fn processes(&self) -> usize {
        self.clients.len()
    }

    pub fn vpids(&self) -> Vec<i32> {
        self.clients.iter().map(|c| c.0).collect()
    }

    /// Refuses (naming each) the fds a restore could not rebuild, unless told to ignore
    /// them (they then read as closed after a restore); notes which fds are one open file,
    /// and which TCP connections are handed over whole (those from the addresses `moving`
    /// with the session). Returns how many are.
    pub fn check_supported(
        &mut self,
        ignore: bool,
        moving: &[std::net::Ipv4Addr],
    ) -> Result<usize> {
        let mut tables = self.tables.clone();
        migrt::link::link_peers(&mut tables);
        self.shared = migrt::sharing::find(&tables);
        self.handover = migrt::support::handover(&tables, moving);
        let unsupported = migrt::support::unsupported(&tables, &self.handover);
        let mut list: Vec<String> = unsupported.iter().map(|u| format!("  {u}")).collect();
        // Seccomp filters the session installed are not carried (it would run on without
        // them); those of the environment mig runs in too (a container's) are the target's
        // business.
        let around = migrt::procfs::seccomp_filters("self");
        list.extend(
            tables
                .iter()
                .filter(|t| migrt::procfs::seccomp_filters(&t.real_pid.to_string()) > around)
                .map(|t| format!("  process {}: a seccomp filter of its own", t.vpid)),
        );
        if list.is_empty() {
            return Ok(self.handover.len());
        }
        if !ignore {
            bail!(
                "session {} holds what a restore cannot rebuild:\n{}\n(nothing was written; checkpoint anyway with --ignore-unsupported: after a restore such fds read as closed, such processes run without their seccomp filter)",
                self.live.name(),
                list.join("\n")
            );
        }
        eprintln!(
            "mig: ignored, as asked (after a restore such fds read as closed, such processes run without their seccomp filter):\n{}",
            list.join("\n")
        );
        Ok(self.handover.len())
    }

    /// Writes every process's image into what `place(vpid)` gives — (its file's name in
    /// the image, a path naming it in messages, the file or pipe it goes into, handed to
    /// the process) — and returns the bytes written and the session manifest.
    pub fn dump(
        &mut self,
        mut place: impl FnMut(i32) -> Result<(String, String, std::fs::File)>,
        sync: bool,
    ) -> Result<(u64, SessionManifest)> {
        let mut bytes = 0;
        let mut manifest = SessionManifest {
            name: self.live.name(),
            host: self.live.meta.host.clone(),
            taken: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            processes: Vec::new(),
            shared: self.shared.clone(),
        };
        // The processes are asked all at once and write their images meanwhile; the
        // answers are read in order. (A dump reads out what a pipe holds and puts it back,
        // and peeks at a socket's queues, a TCP one's in repair mode: of a pipe, FIFO or
        // socket several hold, only the first one's dump does.) Where the same socket has
        // different ids in different processes, they are dumped one after the other.
        // (Once one was asked, its answer is read, even after a failure.)
        self.repair_handed_over()?;
        let mut skips = self.shared_skips().into_iter();
        let mut pipes_elsewhere = pipes_read_before(&self.tables).into_iter();
        let sockets = sockets_read_before(&self.tables);
        let at_once = sockets.is_some();
        let mut sockets_elsewhere = sockets.unwrap_or_default().into_iter();
        let mut host_files_elsewhere = host_files_before(&self.tables, self.maps()).into_iter();
        let (mut asked, mut failed) = (Vec::new(), None);
        for k in 0..self.clients.len() {
            let vpid = self.clients[k].0;
            let sent = place(vpid).and_then(|(file, path, out)| {
                let rounds = self.rounds.get(&vpid).cloned().unwrap_or_default();
                let compared = self.compared.get(&vpid).cloned().map(Box::new);
                let shared = self.compared_shared.get(&vpid).cloned().map(Box::new);
                // The dump walks its memory's page tables where the rounds track it (not
                // by hash): mig helps with that. (Lazily, it leaves large mappings unwalked.)
                let lazily = rounds.iter().any(|n| n == migrt::image::SOURCE_ROUND);
                let helping = match rounds.is_empty() || compared.is_some() || lazily {
                    true => None,
                    false => (self.walker.as_ref())
                        .and_then(|w| w.start(self.tables[k].real_pid, &self.maps()[k])),
                };
                let dump = Request::Dump {
                    path,
                    sync,
                    rounds,
                    handover: self.handover.clone(),
                    compared,
                    shared,
                    walked: helping.as_ref().map(|h| Box::new(h.offer.clone())),
                    skip: skips.next().unwrap_or_default(),
                    pipes_elsewhere: pipes_elsewhere.next().unwrap_or_default(),
                    sockets_elsewhere: sockets_elsewhere.next().unwrap_or_default(),
                    host_files_elsewhere: host_files_elsewhere.next().unwrap_or_default(),
                };
                // (A large process writing to a slow disk takes its time.)
                let resident = sessions::resident(self.tables[k].real_pid);
                let c = &mut self.clients[k].2;
                c.allow(Duration::from_secs(10 + resident / (32 << 20)))?;
                c.send_with_fd(&dump, std::os::fd::AsFd::as_fd(&out))?;
                Ok((k, file, helping))
            });
            match sent {
                Ok(one) => asked.push(one),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            if !at_once {
                bytes += self.answers(asked.drain(..), &mut manifest, &mut failed);
                if failed.is_some() {
                    break;
                }
            }
        }
        bytes += self.answers(asked.drain(..), &mut manifest, &mut failed);
        if let Some(e) = failed {
            return Err(e);
        }
        Ok((bytes, manifest))
    }

    /// Puts the connections handed over in repair mode, through copies of their fds.
    fn repair_handed_over(&mut self) -> Result<()> {
        use std::os::fd::AsRawFd;
        for t in &self.tables {
            for f in &t.fds {
                if let migrt::table::Object::Socket(s) = &f.object
                    && self.handover.contains(&s.id)
                {
                    let copy = migrt::sys::fd_of(t.real_pid, f.fd).with_context(|| {
                        format!("process {}: taking fd {} to hand it over", t.vpid, f.fd)
                    })?;
                    migrt::tcprepair::enter(copy.as_raw_fd())
                        .with_context(|| format!("process {}: fd {}", t.vpid, f.fd))?;
                    self.repairing.push(copy);
                }
            }
        }
        Ok(())
    }

    /// The connections handed over run on here: out of repair mode, with a window probe.
    fn let_out(&mut self) {
        use std::os::fd::AsRawFd;
        for fd in self.repairing.drain(..) {
            migrt::tcprepair::leave(fd.as_raw_fd(), true);
        }
    }

    /// Reads the answers of the processes `asked` to dump (index, image file, mig's walk),
    /// adding each dumped one to `manifest` and keeping the first failure in `failed`;
    /// returns the bytes they wrote.
    fn answers(
        &mut self,
        asked: impl Iterator<Item = (usize, String, Option<crate::walkhelp::Helping>)>,
        manifest: &mut SessionManifest,
        failed: &mut Option<anyhow::Error>,
    ) -> u64 {
        let mut bytes = 0;
        for (k, file, helping) in asked {
            let (vpid, parent, c) = &mut self.clients[k];
            let answer = c.answer();
            if let Some(h) = helping {
                h.end();
            }
            match answer {
                Ok(Response::Dumped {
                    bytes: b, snapshot, ..
                }) => {
                    bytes += b;
                    if snapshot > 0 {
                        self.snapshots.insert(*vpid, snapshot);
                    }
                    manifest.processes.push((*vpid, *parent, file));
                }
                Ok(other) => {
                    let e = anyhow::anyhow!("process {vpid}: unexpected answer {other:?}");
                    failed.get_or_insert(e);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        bytes
    }

    /// Of each process, in the order of their images, the ranges of shared memory an image
    /// before its own holds (image::shared_stored_before).
    pub fn shared_skips(&self) -> Vec<Vec<(u64, u64)>> {
        migrt::image::shared_stored_before(self.maps())
    }

    fn maps(&self) -> &[Vec<migrt::procfs::MapsLine>] {
        self.maps.get_or_init(|| {
            // (Of several processes, half on a second thread: the kernel's formatting of
            // hundreds of lines per process is most of it, ~0.5 ms each for postgres's.)
            let read = |ts: &[migrt::table::ProcessTable]| -> Vec<_> {
                let pids = ts.iter().map(|t| t.real_pid.to_string());
                pids.map(|p| migrt::procfs::all_mappings(&p)).collect()
            };
            if self.tables.len() < 4 {
                return read(&self.tables);
            }
            let (first, second) = self.tables.split_at(self.tables.len() / 2);
            std::thread::scope(|s| {
                let other = s.spawn(|| read(second));
                let mut maps = read(first);
                maps.extend(other.join().unwrap_or_else(|_| read(second)));
                maps
            })
        })
    }

    /// The control connection to process `vpid`.
    pub fn client(&mut self, vpid: i32) -> Result<&mut Client> {
        (self.clients.iter_mut().find(|c| c.0 == vpid))
            .map(|c| &mut c.2)
            .with_context(|| format!("no process {vpid} in this session"))
    }

    /// `len` bytes of process `vpid`'s memory at `addr` as it was dumped (kept here), into
    /// `buf`.
    pub fn pages(&mut self, vpid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
        let snapshot = self.snapshots.get(&vpid).copied();
        let mut direct = self.direct;
        let c = self.client(vpid)?;
        let read = match snapshot {
            Some(pid) => {
                crate::outgoing::read_pages(&mut direct, pid, (addr, buf), |a, b| c.pages(a, b))
            }
            None => c.pages(addr, buf),
        };
        self.direct = direct;
        read
    }

    /// `len` bytes of process `vpid`'s memory at `addr` as it was dumped, as a post-copy
    /// sends them (sparse.rs): in `out`, the map of the pages with data, then those pages.
    /// Only pages that exist there are read, where its page map says so (the frozen
    /// process's pages do not change). Returns the bytes of page data.
    pub fn sparse_pages(
        &mut self,
        vpid: i32,
        addr: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<usize> {
        use migrt::dirty::{PAGE_IS_PFNZERO, PageRegion};
        let page = crate::sparse::PAGE as u64;
        let head = crate::sparse::map_len(len);
        out.resize(head + len as usize, 0);
        // The ranges that may hold data: the pages that exist and are not the zero page.
        let pid = self.snapshots.get(&vpid).copied();
        let pagemap = pid.and_then(|pid| {
            let open = || std::fs::File::open(format!("/proc/{pid}/pagemap")).ok();
            self.pagemaps.entry(pid).or_insert_with(open).as_ref()
        });
        let mut found: Vec<PageRegion> = Vec::with_capacity((len / page) as usize);
        let walked = pagemap.is_some_and(|m| {
            migrt::dirty::existing_into(m, (addr, addr + len), false, &mut found).unwrap_or(false)
        });
        // Where the next existing page is past the range (the scan skips empty page tables:
        // a far one costs little), or where the scan ended without finding one.
        let next = pagemap.map_or(0, |m| {
            let (from, to) = (
                addr + len,
                (addr + len).saturating_add(1 << 40).min(USER_END),
            );
            migrt::dirty::first_existing(m, (from, to)).map_or(0, |first| first.unwrap_or(to))
        });
        let ranges: Vec<(u64, u64)> = match walked {
            true => found
                .iter()
                .filter(|r| r.categories & PAGE_IS_PFNZERO == 0)
                .map(|r| (r.start, r.end))
                .collect(),
            false => vec![(addr, addr + len)],
        };
        for &(s, e) in &ranges {
            let at = head + (s - addr) as usize;
            self.pages(vpid, s, &mut out[at..at + (e - s) as usize])?;
        }
        let read = |i: usize| {
            let a = addr + i as u64 * page;
            ranges.iter().any(|&(s, e)| (s..e).contains(&a))
        };
        let n = crate::sparse::pack(out, len, read);
        out.truncate(head + n);
        out.extend(next.to_le_bytes());
        Ok(n)
    }

    /// Tells every process that mig is still there (a frozen process left alone for long
    /// thaws by itself).
    pub fn keep_waiting(&mut self) -> Result<()> {
        for (vpid, _, c) in self.clients.iter_mut() {
            match c.call(&Request::Hello {
                version: migrt::wire::PROTOCOL_VERSION,
            })? {
                Response::Hello { .. } => {}
                other => bail!("process {vpid}: unexpected answer {other:?}"),
            }
        }
        Ok(())
    }

    /// Lets the session go: running on, or ended (then gone before this returns, briefly
    /// waited for). Returns how long it was frozen.
    pub fn release(mut self, stop: bool) -> Result<Duration> {
        self.released = true;
        // System V segments outlive their processes: the ones only this session used go
        // with it (the session now lives in its image, or elsewhere).
        let sysv: Vec<u64> = if stop {
            self.live
                .processes()
                .iter()
                .flat_map(|p| migrt::procfs::all_mappings(&p.pid.to_string()))
                .filter(|m| m.name.0.starts_with(b"/SYSV"))
                .map(|m| m.inode)
                .collect()
        } else {
            Vec::new()
        };
        let last = if stop { Request::Stop } else { Request::Thaw };
        if !stop {
            self.let_out();
        }
        for (vpid, _, c) in self.clients.iter_mut() {
            match c.call(&last)? {
                Response::Done => {}
                other => bail!("process {vpid}: unexpected answer {other:?}"),
            }
        }
        let frozen = self.at.elapsed();
        if stop {
            let t = Instant::now();
            while !self.live.processes().is_empty() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(2));
            }
            for s in migrt::procfs::sysv_segments() {
                if sysv.contains(&(s.id as u64)) && s.attached == 0 {
                    migrt::sys::sysv_remove(s.id);
                }
            }
        }
        Ok(frozen)
    }
}

/// A process whose control thread closed the connection before it answered: it exec'd
/// meanwhile, and the new program is asked in the next pass, as a newcomer. (One that keeps
/// closing it — refusing this user, say — is an error after a few tries.)
fn ask_again(
    ended: &mut std::collections::HashMap<i32, u32>,
    vpid: i32,
    e: anyhow::Error,
) -> Result<()> {
    let tries = ended.entry(vpid).or_insert(0);
    *tries += 1;
    match *tries > 10 {
        true => Err(e),
        false => Ok(()),
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if !self.released {
            self.let_out();
            for (_, _, c) in &mut self.clients {
                let _ = c.call(&Request::Thaw);
            }
        }
    }
}

/// The session manifest as an image file's bytes.
pub fn manifest_bytes(m: &SessionManifest) -> Result<Vec<u8>> {
    let mut w = ImageWriter::new(Vec::new(), Kind::Session)?;
    w.postcard(Tag::Meta, m)?;
    Ok(w.finish()?)
}

pub fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

/// Of each process, the pipes (read ends) and FIFOs (either end) that a process before it
/// holds too, by inode: its dump leaves what they hold to the first one's.
fn pipes_read_before(tables: &[migrt::table::ProcessTable]) -> Vec<Vec<u64>> {
    use migrt::table::{Object, PipeEnd};
    held_before(tables, |o| match o {
        Object::Pipe {
            ino,
            end: PipeEnd::Read,
            ..
        }
        | Object::Fifo { ino, .. } => Some(*ino),
        _ => None,
    })
}

/// Of each process, the sockets (by id) that a process before it holds too: its dump
/// leaves their state to the first one's. None if a socket has different ids in
/// different processes (a restore looks its state up by id).
fn sockets_read_before(tables: &[migrt::table::ProcessTable]) -> Option<Vec<Vec<u64>>> {
    use migrt::table::Object;
    let socket = |o: &Object| match o {
        Object::Socket(s) => Some((s.ino, s.id)),
        _ => None,
    };
    let all = || {
        tables
            .iter()
            .flat_map(|t| &t.fds)
            .filter_map(|f| socket(&f.object))
    };
    if all().any(|(ino, id)| all().any(|(i, d)| i == ino && d != id)) {
        return None;
    }
    let inos = held_before(tables, |o| socket(o).map(|s| s.0));
    let ids = tables.iter().zip(inos).map(|(t, before)| {
        let held = t.fds.iter().filter_map(|f| socket(&f.object));
        held.filter(|s| before.contains(&s.0))
            .map(|s| s.1)
            .collect()
    });
    Some(ids.collect())
}

/// Of each process, the objects (`key` of what its fds stand for: an inode) that a
/// process before it holds too.
/// Of each process, the POSIX shared memory objects (by inode) that a process before it
/// holds or maps (`maps`) too: its dump leaves their content to the first one's.
fn host_files_before(
    tables: &[migrt::table::ProcessTable],
    maps: &[Vec<migrt::procfs::MapsLine>],
) -> Vec<Vec<u64>> {
    use migrt::image::host_memory_file;
    use migrt::table::Object;
    let mut seen: Vec<u64> = Vec::new();
    let mut out = Vec::new();
    for (t, maps) in tables.iter().zip(maps) {
        let held = t.fds.iter().filter_map(|f| match &f.object {
            Object::File {
                path,
                ino,
                deleted: false,
                ..
            } if host_memory_file(&path.0) => Some(*ino),
            _ => None,
        });
        let mapped = (maps.iter())
            .filter(|m| host_memory_file(&m.name.0))
            .map(|m| m.inode);
        let mut mine: Vec<u64> = held.chain(mapped).collect();
        mine.sort_unstable();
        mine.dedup();
        let (before, new): (Vec<u64>, Vec<u64>) = mine.into_iter().partition(|i| seen.contains(i));
        seen.extend(new);
        out.push(before);
    }
    out
}

fn held_before(
    tables: &[migrt::table::ProcessTable],
    key: impl Fn(&migrt::table::Object) -> Option<u64>,
) -> Vec<Vec<u64>> {
    let mut seen: Vec<(u64, i32)> = Vec::new();
    let mut out = Vec::new();
    for t in tables {
        let mut before = Vec::new();
        for ino in t.fds.iter().filter_map(|f| key(&f.object)) {
            match seen.iter().any(|&(i, v)| i == ino && v != t.vpid) {
                true => before.push(ino),
                false => seen.push((ino, t.vpid)),
            }
        }
        out.push(before);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrt::table::{FdEntry, Object, ProcessTable, SocketInfo};

    fn holding(vpid: i32, sockets: &[(u64, u64)]) -> ProcessTable {
        let fds = sockets.iter().enumerate().map(|(k, &(ino, id))| FdEntry {
            fd: 3 + k as i32,
            cloexec: false,
            flags: 0,
            journaled: true,
            object: Object::Socket(SocketInfo {
                id,
                ino,
                domain: libc::AF_UNIX,
                ty: libc::SOCK_STREAM,
                protocol: 0,
                local: None,
                peer: None,
                listening: false,
                peer_ino: None,
                peer_link: None,
            }),
        });
        ProcessTable {
            vpid,
            fds: fds.collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_socket_several_hold_is_read_by_the_first_and_different_ids_dump_in_turn() {
        // (inode, id): a parent, a child holding two of its sockets, another one.
        let tables = [
            holding(1, &[(10, 1), (11, 2)]),
            holding(2, &[(10, 1), (11, 2), (12, 3)]),
            holding(3, &[(12, 3), (13, 4)]),
        ];
        let got = sockets_read_before(&tables);
        assert_eq!(got, Some(vec![vec![], vec![1, 2], vec![3]]));
        // The same socket under two ids: no process leaves it to another.
        let tables = [holding(1, &[(10, 1)]), holding(2, &[(10, 5)])];
        assert_eq!(sockets_read_before(&tables), None);
    }

    #[test]
    fn a_shared_memory_object_held_or_mapped_by_several_is_read_by_the_first() {
        let file = |ino: u64, path: &str| FdEntry {
            fd: 3,
            cloexec: false,
            flags: 0,
            journaled: true,
            object: Object::File {
                path: path.as_bytes().into(),
                opened_as: None,
                offset: 0,
                size: 0,
                dev: 0,
                ino,
                mtime_ns: 0,
                deleted: false,
                locks: Vec::new(),
            },
        };
        let mapping = |inode: u64, name: &str| migrt::procfs::MapsLine {
            start: 0,
            end: 4096,
            perms: "rw-s".into(),
            offset: 0,
            inode,
            name: name.as_bytes().into(),
        };
        // The first holds the object (and a plain file), the second maps it and another,
        // the third holds and maps both.
        let mut tables = [holding(1, &[]), holding(2, &[]), holding(3, &[])];
        tables[0].fds = vec![file(7, "/dev/shm/psm"), file(8, "/etc/hosts")];
        tables[2].fds = vec![file(7, "/dev/shm/psm")];
        let maps = [
            vec![],
            vec![mapping(7, "/dev/shm/psm"), mapping(9, "/dev/shm/sem.x")],
            vec![mapping(9, "/dev/shm/sem.x"), mapping(7, "/dev/shm/psm")],
        ];
        let got = host_files_before(&tables, &maps);
        assert_eq!(got, vec![vec![], vec![7], vec![7, 9]]);
    }
}
