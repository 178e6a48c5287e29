//! `mig restore DIR [--name NAME] [--detach]`: bring a checkpointed session back.
//!
//! Every image is read and verified in full before anything is created. Then the session
//! is made anew (same vpids), a restore plan is written for the restorer (which regions
//! to map where — libraries from their files — and which pages to copy in from the image),
//! and the restorer — embedded in `mig` and run from a memfd — becomes the process again.
//! Its stdio is `mig restore`'s own.
//!
//! Several processes come back as the same tree (the root's restorer forks one restorer per
//! child before it restores itself). Pipes are made anew here, refilled with their unread
//! bytes and handed to each process over its own channel. Not yet: sockets and the other
//! fd kinds (issue #4: left closed).

use crate::objects::{self, Objects};
use crate::prebuilt::{Object, Prebuilt};
use crate::run::exit_code;
use crate::sessions;
use crate::terminal;
use anyhow::{Context, Result, bail};
use migrt::image::{
    self, PAGE, PageMap, Precopied, ProcessMeta, Region, SessionManifest, SharedPart, Tag,
    ThreadState,
};
use migrt::record::Bytes;
use migrt::sessiontable::{Kind, SessionTable};
use migrt::sockstate::SocketState;
use migrt::table::{Folded, ProcessTable};
use migrt::wire::{RESTART_BACK, RESTART_GO, RESTART_READY};
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

static RESTORER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/migrestore"));

const PLAN_MAGIC: u64 = u64::from_le_bytes(*b"MIGPLAN1");
/// Marks a child's plan fd in its parent's plan: an orphan, made the parent's sibling.
const ORPHAN: u64 = 1 << 63;
/// The fds handed to the restorer sit at or above this number.
const FD_BASE: i32 = 900;
/// How many of them the fd table has room for before the restore starts (with room for
/// more, the kernel rounds up to a power of two: 16384 fds, 128 KiB).
const FDS_AHEAD: i32 = 8192;
/// Regions the restorer does not recreate: the kernel's (the new host's vDSO block is moved
/// there instead) and the shim's checkpoint scratch buffer.
const SPECIAL: [&[u8]; 5] = [
    b"[vvar]",
    b"[vvar_vclock]",
    b"[vdso]",
    b"[vsyscall]",
    b"[migshim-scratch]",
];

pub struct RestoreArgs {
    pub dir: PathBuf,
    pub name: Option<String>,
    pub detach: bool,
    pub log: Option<PathBuf>,
    pub allow_changed_files: bool,
    /// Memory filled in after the process runs again (pager.rs).
    pub lazy: bool,
    /// With `lazy`: even what a forked tree shares (inherit.rs).
    pub no_sharing: bool,
    /// With `lazy`: where the pages kept in a lazy migration's source are asked for.
    pub pages_from: Option<std::os::fd::OwnedFd>,
    /// Started before the image is all there: wait for a line `go` on stdin first. (The
    /// image came through a MAC-checked stream: its page data is not checked again.)
    pub when_told: bool,
    pub rebind: migrt::rebind::Rebind,
    /// Files for the restored process's stdin/stdout/stderr (default: mig restore's own).
    pub stdio: [Option<PathBuf>; 3],
}

/// A process image, verified and decoded; page data stays in the file.
pub struct ProcImage {
    pub path: PathBuf,
    pub meta: ProcessMeta,
    pub table: ProcessTable,
    /// The journal's intent behind the table (how sockets were made, ...).
    pub folded: Folded,
    /// Unread bytes of the pipes it reads from, by pipe id.
    pub pipes: Vec<(u64, Bytes)>,
    pub sockets: Vec<SocketState>,
    /// Content of its memfds, deleted files and POSIX shared memory objects, by inode.
    pub contents: Vec<(u64, Bytes)>,
    /// Its POSIX shared memory objects.
    pub host_files: Vec<migrt::image::HostFile>,
    /// The pseudo-terminals whose master it holds.
    pub ptys: Vec<migrt::image::PtyState>,
    pub threads: Vec<ThreadState>,
    pub regions: Vec<Region>,
    /// Where its page data is, in order (a later run of a page overrides an earlier one).
    pub runs: Vec<Run>,
    /// The files the runs refer to: the image, then any pre-copy rounds.
    pub files: Vec<PathBuf>,
    /// Page data not verified yet (read for a lazy restore): checked as it is read.
    pub checks: Vec<Check>,
}

/// The `file` of a run whose pages are still in a lazy migration's source (at their own
/// address there).
pub const REMOTE: usize = usize::MAX;

/// Pages that follow each other both in memory and in file `file` of a ProcImage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Run {
    pub addr: u64,
    pub pages: u64,
    pub file: usize,
    pub offset: u64,
}

/// Page data of file `file` at `offset` whose checksum must be `crc`.
#[derive(Clone, Copy, Debug)]
pub struct Check {
    pub file: usize,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

/// Adds a run, merged into the last one if it continues it.
fn push_run(runs: &mut Vec<Run>, run: Run) {
    match runs.last_mut() {
        Some(r)
            if r.file == run.file
                && r.addr + r.pages * PAGE as u64 == run.addr
                && r.offset + r.pages * PAGE as u64 == run.offset =>
        {
            r.pages += run.pages
        }
        _ => runs.push(run),
    }
}

/// The runs of an image's PageMap/PageData pairs (and the checks of its page data left
/// unverified).
fn page_runs(
    path: &Path,
    sections: &[image::Section],
    file: usize,
    checks: &mut Vec<Check>,
) -> Result<Vec<Run>> {
    let mut runs: Vec<Run> = Vec::new();
    let mut pending: Option<PageMap> = None;
    for s in sections {
        match s.tag {
            Tag::PageMap => pending = Some(s.decode(path)?),
            Tag::PageData => {
                let map = pending
                    .take()
                    .with_context(|| format!("{}: page data without a page map", path.display()))?;
                let mut offset = (s.offset + 32).div_ceil(PAGE as u64) * PAGE as u64;
                if let Some((len, crc)) = s.unchecked {
                    checks.push(Check {
                        file,
                        offset,
                        len,
                        crc,
                    });
                }
                let mut i = 0;
                while i < map.count {
                    let start = i;
                    while i < map.count && map.is_present(i) {
                        i += 1;
                    }
                    if i == start {
                        i += 1;
                        continue;
                    }
                    let pages = i - start;
                    let addr = map.start + start * PAGE as u64;
                    push_run(
                        &mut runs,
                        Run {
                            addr,
                            pages,
                            file,
                            offset,
                        },
                    );
                    offset += pages * PAGE as u64;
                }
            }
            _ => {}
        }
    }
    Ok(runs)
}

/// A pre-copy round: its runs, sorted by address (as file 0), its unverified page data,
/// and the objects its shared memory belongs to.
struct Round {
    runs: Vec<Run>,
    checks: Vec<Check>,
    shared: Vec<SharedPart>,
}

/// Reads and verifies a pre-copy round (its page data too, unless `lazy`).
fn read_round(path: &Path, lazy: bool) -> Result<Round> {
    let (kind, sections) = image::read_verified_metadata(path, lazy)?;
    if kind != image::Kind::Pages {
        bail!("{}: not a pre-copy round", path.display());
    }
    let mut checks = Vec::new();
    let mut runs = page_runs(path, &sections, 0, &mut checks)?;
    runs.sort_by_key(|r| r.addr);
    let shared = match sections.iter().find(|s| s.tag == Tag::Shared) {
        Some(s) => s.decode(path)?,
        None => Vec::new(),
    };
    Ok(Round {
        runs,
        checks,
        shared,
    })
}

/// Rounds read ahead, by file name (`--when-told`: while the session still runs at the
/// source, each round is read as soon as the agent has all of it).
type ReadAhead = HashMap<String, Round>;

/// What `--when-told` read before "go": the rounds, the process images that came whole
/// while others were still coming (a session of several processes), and the shared memory
/// built from the rounds.
#[derive(Default)]
struct Ahead {
    rounds: ReadAhead,
    images: HashMap<String, ProcImage>,
    shared: Prebuilt,
}

/// The runs of the pages an image keeps from its pre-copy rounds (files beside it, each
/// verified; a later round's page overrides an earlier one's), their files added to `files`.
/// (`shared`: its shared memory's mappings, in address order.)
fn kept_runs(
    (image, shared): (&Path, &[(u64, u64)]),
    p: &Precopied,
    (files, checks): (&mut Vec<PathBuf>, &mut Vec<Check>),
    lazy: bool,
    ahead: &mut ReadAhead,
) -> Result<Vec<Run>> {
    let dir = image.parent().unwrap_or(Path::new("."));
    let mut rounds: Vec<Vec<Run>> = Vec::new();
    for name in &p.rounds {
        if name == image::SOURCE_ROUND {
            if !lazy {
                bail!(
                    "{}: its memory is still in the source of a lazy migration: only the agent receiving that migration restores it, lazily",
                    image.display()
                );
            }
            // The source holds every page of its own memory: runs over the whole address
            // space but its shared memory (which came with the image, or in rounds).
            let top = 1u64 << 47;
            let mut at = 0;
            let mut runs = Vec::new();
            for &(start, end) in shared.iter().chain([&(top, top)]) {
                if start > at {
                    runs.push(Run {
                        addr: at,
                        pages: (start - at) / PAGE as u64,
                        file: REMOTE,
                        offset: at,
                    });
                }
                at = at.max(end);
            }
            rounds.push(runs);
            continue;
        }
        if name.contains('/') || name.starts_with('.') {
            bail!("{}: bad pre-copy round name {name:?}", image.display());
        }
        let path = dir.join(name);
        let Round {
            mut runs,
            checks: mut more,
            ..
        } = match ahead.remove(name) {
            Some(read) => read,
            None => read_round(&path, lazy)?,
        };
        for r in &mut runs {
            r.file = files.len();
        }
        for c in &mut more {
            c.file = files.len();
        }
        checks.extend(more);
        rounds.push(runs);
        files.push(path);
    }
    // Newest round first: what it holds of the kept ranges is taken, the rest is looked
    // for in the rounds before; what no round holds stays zero.
    let page = PAGE as u64;
    let mut need: Vec<(u64, u64)> = p.kept.clone();
    need.sort();
    let mut out: Vec<Run> = Vec::new();
    for runs in rounds.iter().rev() {
        let mut still = Vec::new();
        for &(start, end) in &need {
            let mut at = start;
            let mut k = runs.partition_point(|r| r.addr + r.pages * page <= start);
            while at < end && k < runs.len() && runs[k].addr < end {
                let r = runs[k];
                if r.addr > at {
                    still.push((at, r.addr));
                    at = r.addr;
                }
                let to = (r.addr + r.pages * page).min(end);
                out.push(Run {
                    addr: at,
                    pages: (to - at) / page,
                    file: r.file,
                    offset: r.offset + (at - r.addr),
                });
                at = to;
                k += 1;
            }
            if at < end {
                still.push((at, end));
            }
        }
        need = still;
    }
    out.sort_by_key(|r| r.addr);
    let mut runs = Vec::with_capacity(out.len());
    for r in out {
        push_run(&mut runs, r);
    }
    Ok(runs)
}

/// A process image, verified — its page data too, unless `lazy` (then checked as it is
/// read: ProcImage::checks).
fn read_image(path: &Path, lazy: bool, ahead: &mut ReadAhead) -> Result<ProcImage> {
    let (kind, sections) = image::read_verified_metadata(path, lazy)?;
    if kind != image::Kind::Process {
        bail!("{}: not a process image", path.display());
    }
    let mut img = ProcImage {
        path: path.into(),
        meta: Default::default(),
        table: Default::default(),
        folded: Default::default(),
        pipes: vec![],
        sockets: vec![],
        contents: vec![],
        host_files: vec![],
        ptys: vec![],
        threads: vec![],
        regions: vec![],
        runs: vec![],
        files: vec![path.into()],
        checks: vec![],
    };
    let mut precopied: Option<Precopied> = None;
    for s in &sections {
        match s.tag {
            Tag::Meta => img.meta = s.decode(path)?,
            Tag::Table => (img.table, img.folded) = s.decode(path)?,
            Tag::Pipes => img.pipes = s.decode(path)?,
            Tag::Sockets => img.sockets = s.decode(path)?,
            Tag::Contents => img.contents = s.decode(path)?,
            Tag::HostFiles => img.host_files = s.decode(path)?,
            Tag::Ptys => img.ptys = s.decode(path)?,
            Tag::Threads => img.threads = s.decode(path)?,
            Tag::Regions => img.regions = s.decode(path)?,
            Tag::Precopied => precopied = Some(s.decode(path)?),
            _ => {}
        }
    }
    let own = page_runs(path, &sections, 0, &mut img.checks)?;
    if let Some(p) = precopied {
        let shared: Vec<(u64, u64)> = (img.regions.iter())
            .filter(|r| shared_anonymous(r))
            .map(|r| (r.start, r.end))
            .collect();
        let files = (&mut img.files, &mut img.checks);
        img.runs = kept_runs((path, &shared), &p, files, lazy, ahead)?;
    }
    img.runs.extend(own);
    Ok(img)
}

fn prot(perms: &str) -> u64 {
    let b = perms.as_bytes();
    let bit = |i: usize, c: u8, v: i32| if b.get(i) == Some(&c) { v as u64 } else { 0 };
    bit(0, b'r', libc::PROT_READ) | bit(1, b'w', libc::PROT_WRITE) | bit(2, b'x', libc::PROT_EXEC)
}

/// Hands every process its objects through its own channel (a seqpacket socket pair: one
/// message per fd — its number and close-on-exec flag — with the fd attached; an empty
/// message ends). Returns, per process, the channel end it inherits (kept open here until
/// the restore is done) and its fd number.
fn hand_down(objects: &Objects) -> Result<Vec<(std::os::unix::net::UnixStream, u64)>> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    for fds in &objects.fds {
        let (ours, theirs) = migrt::sys::seqpacket_pair()?;
        for (fd, cloexec, obj) in fds {
            let mut msg = fd.to_le_bytes().to_vec();
            msg.push(*cloexec as u8);
            migrt::sys::send_fd(ours.as_raw_fd(), &msg, obj.as_raw_fd())?;
        }
        migrt::sys::send_fd(ours.as_raw_fd(), &[], -1)?;
        ours.set_nonblocking(true)?;
        let fd = migrt::sys::inheritable_fd_of(theirs.as_raw_fd(), FD_BASE)?;
        drop(theirs);
        out.push((ours, fd as u64));
    }
    Ok(out)
}

/// Waits until every restored process said `what` on its channel (one byte each, see
/// `migrt::wire::RESTART_READY`): fails when the restorer ends first or after 10 s. Once
/// told to go, the session's programs run: one may end another (a parent killing its
/// child) before it says it is back, and one gone then counts as heard.
fn hear_all(
    channels: &[(std::os::unix::net::UnixStream, u64)],
    what: u8,
    restorer: &mut std::process::Child,
    log: Option<&Path>,
    vpids: &[i32],
    table: &SessionTable,
) -> Result<()> {
    let t = Instant::now();
    let mut heard = vec![false; channels.len()];
    loop {
        for ((c, _), h) in channels.iter().zip(&mut heard) {
            let mut byte = [0u8];
            *h |= std::io::Read::read(&mut &*c, &mut byte).is_ok_and(|n| n == 1 && byte[0] == what);
        }
        if what == RESTART_BACK {
            for (v, h) in vpids.iter().zip(&mut heard) {
                *h |= table.real_of(*v).is_some_and(crate::sessions::gone);
            }
        }
        // (Woken by the first process not heard yet saying so, else soon, to look at the
        // others and at the restorer.)
        let Some(k) = heard.iter().position(|h| !h) else {
            return Ok(());
        };
        if let Some(st) = restorer.try_wait()? {
            let log = log.map(|l| format!("; its log, {}, may say why", l.display()));
            bail!(
                "the restore failed (restorer exit code {}){}",
                exit_code(st),
                log.unwrap_or_default()
            );
        }
        if t.elapsed() > Duration::from_secs(10) {
            let stuck = where_it_waits(vpids[k], table);
            let _ = restorer.kill();
            bail!("the restored process did not come back within 10 s ({stuck})");
        }
        migrt::sys::wait_readable(&channels[k].0, Duration::from_millis(2))?;
    }
}

/// Where restored process `vpid` waits: each thread's state, system call (with the
/// mapping its first argument points into: a futex's, say) and program counter, for an
/// error.
fn where_it_waits(vpid: i32, table: &SessionTable) -> String {
    let Some(pid) = table.real_of(vpid).filter(|&p| p > 0) else {
        return format!("process {vpid} never started");
    };
    let maps = migrt::procfs::all_mappings(&pid.to_string());
    // An address as "0x...: NAME+OFFSET" (the offset in the file a code address lies in).
    let place = |a: u64| match maps.iter().find(|m| (m.start..m.end).contains(&a)) {
        Some(m) => format!("{a:#x}: {}+{:#x}", m.name.lossy(), a - m.start + m.offset),
        None => format!("{a:#x}"),
    };
    let threads = migrt::procfs::list_tasks(&pid.to_string())
        .into_iter()
        .map(|tid| {
            let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/{f}"));
            let stat = read("stat").unwrap_or_default();
            let state = stat.rfind(')').and_then(|at| stat.get(at + 2..at + 3));
            // "NR ARG1 .. ARG6 SP PC" while in a system call.
            let call = read("syscall").unwrap_or_default();
            let f: Vec<&str> = call.split_whitespace().collect();
            let hex = |s: &&str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
            let at = match (f.get(1).and_then(hex), f.get(8).and_then(hex)) {
                (Some(arg), Some(pc)) => {
                    format!(", first argument {}, pc {}", place(arg), place(pc))
                }
                _ => String::new(),
            };
            let wchan = read("wchan").unwrap_or_default();
            format!(
                "thread {tid} {} in system call {} ({wchan}{at})",
                state.unwrap_or("?"),
                f.first().unwrap_or(&"-")
            )
        });
    format!(
        "process {vpid}, pid {pid}: {}",
        threads.collect::<Vec<_>>().join(", ")
    )
}

/// Per process, the fd (inherited by the restorer) of the terminal it takes as its
/// controlling terminal before it forks its children — only a session leader can, and its
/// children have one only if born with it — or u64::MAX.
fn controlling_terminals(images: &[ProcImage], objects: &Objects) -> Result<Vec<u64>> {
    use std::os::fd::AsRawFd;
    images
        .iter()
        .zip(&objects.fds)
        .map(|(img, fds)| {
            let held = img
                .meta
                .ctty_fd
                .filter(|_| img.table.sid == img.meta.vpid)
                .and_then(|n| fds.iter().find(|(fd, _, _)| *fd == n));
            Ok(match held {
                Some((_, _, obj)) => {
                    migrt::sys::inheritable_fd_of(obj.as_raw_fd(), FD_BASE)? as u64
                }
                None => u64::MAX,
            })
        })
        .collect()
}

/// The pager as mig restore holds it: the socket end the restored processes inherit (fd at
/// FD_BASE or above) to send it their userfaultfds, and the hold on its fill.
struct Pager {
    sock: std::os::fd::OwnedFd,
    /// While this is open, the pager answers faults but does not fill in the rest: the
    /// restore is not done, and the fill would take the CPUs its processes need to come
    /// back (a tree of them restarting at once on two CPUs). Dropped once all are back.
    hold: std::fs::File,
}

/// Starts the pager of a lazy restore (a process of its own: it outlives `mig restore
/// --detach`; what it has to say goes to `log`, else to mig restore's stderr) with each
/// process's pages to fill. Pages still in a lazy migration's source are asked for through
/// `remote`.
fn start_pager(
    mapped: &[Mapped],
    log: Option<&std::fs::File>,
    remote: Option<crate::pager::Remote>,
) -> Result<Pager> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let checks = mapped.iter().flat_map(|m| m.checks.clone()).collect();
    let runs: Vec<Vec<crate::pager::Run>> = mapped
        .iter()
        .map(|m| {
            m.entries
                .iter()
                .filter(|e| e[6] == 2)
                .map(|e| crate::pager::Run {
                    addr: e[0],
                    len: e[1],
                    fd: e[4] as i32,
                    offset: e[5],
                })
                .collect()
        })
        .collect();
    let (ours, theirs) = migrt::sys::seqpacket_pair()?;
    let theirs_fd = migrt::sys::inheritable_fd_of(theirs.as_raw_fd(), FD_BASE)?;
    drop(theirs);
    let (held, hold) = migrt::sys::pipe()?;
    // SAFETY: mig restore has no other thread; the child only runs the pager and exits.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("starting the pager"),
        0 => {
            // SAFETY: plain calls on fds of our own; the pager then runs to its end.
            unsafe {
                libc::close(theirs_fd);
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::setsid();
            }
            drop(hold);
            crate::owner::drop_lent_capabilities();
            if let Some(f) = log {
                // SAFETY: dup2 onto our own stderr.
                unsafe { libc::dup2(f.as_raw_fd(), 2) };
            }
            crate::pager::serve(ours.into(), held.into(), runs, checks, remote);
            std::process::exit(0);
        }
        _ => Ok(Pager {
            // SAFETY: the inheritable duplicate made above is ours to own.
            sock: unsafe { OwnedFd::from_raw_fd(theirs_fd) },
            hold,
        }),
    }
}

/// Refuses a file that changed since the checkpoint: the program would run other code
/// than its memory was made by.
fn check_unchanged(r: &Region, f: &std::fs::File) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if r.file_size == 0 && r.file_mtime_ns == 0 {
        return Ok(());
    }
    let md = f.metadata()?;
    let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
    if md.size() != r.file_size || mtime != r.file_mtime_ns {
        bail!(
            "{} changed since the checkpoint (size {} → {}, modified {} → {}): the restored program would run other code than its memory expects; pass --allow-changed-files to restore anyway",
            r.name,
            r.file_size,
            md.size(),
            r.file_mtime_ns,
            mtime
        );
    }
    Ok(())
}

/// The mapping part of a process's plan, and the fds it refers to (kept open in `keep`).
struct Mapped {
    entries: Vec<[u64; 7]>,
    fds: Vec<u64>,
    /// The page data the pager checks before it reads it.
    checks: Vec<crate::pager::Check>,
}

/// Anonymous memory shared between processes (MAP_SHARED|MAP_ANONYMOUS, kept by fork):
/// one object per mapping identity (its inode), made anew as a memfd holding the pages
/// the images store of it (or built from the rounds already: `ahead`), and mapped shared
/// by every process that had it. Returns inode → inheritable fd.
fn shared_memory(
    images: &[ProcImage],
    by_inode: &HashMap<u64, std::fs::File>,
    keep: &mut Vec<std::fs::File>,
    ahead: &mut Prebuilt,
) -> Result<HashMap<u64, u64>> {
    let mut out = HashMap::new();
    let mut made: HashMap<u64, Object> = HashMap::new();
    let mut buf = vec![0u8; 1 << 20];
    // (Each image holds the pages of the part it maps, unless one before it held them:
    // image::shared_stored_before.)
    for img in images {
        let files = open_all(&img.files)?;
        for r in img.regions.iter().filter(|r| shared_anonymous(r)) {
            // A memfd or deleted file that an fd holds too: the object made for the fd.
            if let Some(f) = by_inode.get(&r.inode) {
                if let std::collections::hash_map::Entry::Vacant(v) = out.entry(r.inode) {
                    v.insert(migrt::sys::inheritable_fd(f, FD_BASE)? as u64);
                }
                continue;
            }
            let obj = match made.entry(r.inode) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(ahead.take(r.inode)?),
            };
            let size = r.offset + (r.end - r.start);
            if obj.mem.metadata()?.len() < size {
                obj.mem.set_len(size)?;
            }
            for (at, file, offset, len) in region_runs(img, r) {
                let known = ahead.index(&img.files[file]);
                let from = (&files[file], known, offset);
                obj.put(r.offset + at, from, len, &mut buf)?;
            }
        }
    }
    for (inode, obj) in made {
        let mem = obj.finish()?;
        out.insert(inode, migrt::sys::inheritable_fd(&mem, FD_BASE)? as u64);
        keep.push(mem);
    }
    Ok(out)
}

fn open_all(paths: &[PathBuf]) -> Result<Vec<std::fs::File>> {
    Ok(paths
        .iter()
        .map(std::fs::File::open)
        .collect::<std::io::Result<_>>()?)
}

/// The pages of region `r` the image stores: (offset in the region, file index, offset
/// there, length), a run of consecutive ones at a time.
fn region_runs<'a>(
    img: &'a ProcImage,
    r: &'a Region,
) -> impl Iterator<Item = (u64, usize, u64, u64)> + 'a {
    img.runs.iter().filter_map(|run| {
        let (start, end) = (run.addr, run.addr + run.pages * PAGE as u64);
        let (from, to) = (start.max(r.start), end.min(r.end));
        (from < to).then(|| {
            (
                from - r.start,
                run.file,
                run.offset + (from - start),
                to - from,
            )
        })
    })
}

/// Calls `put(offset in the region, pages)` for the pages of region `r` the image stores,
/// a span of consecutive ones at a time (up to a mebibyte).
pub fn region_pages(
    img: &ProcImage,
    r: &Region,
    mut put: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let files = open_all(&img.files)?;
    let mut buf = vec![0u8; 1 << 20];
    for (at, file, offset, len) in region_runs(img, r) {
        read_chunks((&files[file], offset, len), &mut buf, |done, data| {
            put(at + done, data)
        })?;
    }
    Ok(())
}

/// Reads `len` bytes of `file` at `offset` a buffer `buf` at a time, calling
/// `put(bytes before them, bytes)` with each.
pub fn read_chunks(
    (file, offset, len): (&std::fs::File, u64, u64),
    buf: &mut [u8],
    mut put: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + done)?;
        put(done, &buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// A MAP_SHARED mapping of no file of its own (shared anonymous memory, a memfd), System V
/// segments aside (sysv.rs).
fn shared_anonymous(r: &Region) -> bool {
    migrt::image::shared_anonymous(&r.perms, &r.name.0)
}

/// The mapped files opened for the restorer so far, by (name, opened for writing): one fd
/// each for the whole session (a tree's processes map the same libraries).
type MappedFiles = HashMap<(Vec<u8>, bool), i32>;

fn map_regions(
    img: &ProcImage,
    policy: &objects::Policy,
    shared: &HashMap<u64, u64>,
    (keep, files): (&mut Vec<std::fs::File>, &mut MappedFiles),
    (lazy, trusted): (bool, bool),
) -> Result<Mapped> {
    let mut fds: Vec<u64> = Vec::new();
    for path in &img.files {
        let f = std::fs::File::open(path)?;
        fds.push(migrt::sys::inheritable_fd(&f, FD_BASE)? as u64);
        keep.push(f);
    }
    let page_fds = fds.clone();
    let mut entries: Vec<[u64; 7]> = Vec::new();
    let private = libc::MAP_PRIVATE as u64;
    // Page data is copied in (by the restorer, or lazily by the pager), not mapped from the
    // image: mapped, anonymous memory would stop behaving as such (after MADV_DONTNEED it
    // would read back the image's old data, not zeros, which malloc relies on; the kernel
    // shows the command line only from anonymous memory).
    const COPY: u64 = 1;
    const PAGER: u64 = 2;
    const REGISTER: u64 = 3;
    for r in &img.regions {
        // (System V segments are attached by the process itself.)
        if SPECIAL.contains(&r.name.0.as_slice()) || crate::sysv::is_sysv(r) {
            continue;
        }
        let (len, p) = (r.end - r.start, prot(&r.perms));
        let file = r.name.0.first() == Some(&b'/')
            && !r.name.0.ends_with(b" (deleted)")
            && !r.name.0.starts_with(b"/memfd:");
        if let Some(&fd) = shared_anonymous(r).then(|| shared.get(&r.inode)).flatten() {
            entries.push([r.start, len, p, libc::MAP_SHARED as u64, fd, r.offset, 0]);
        } else if !file {
            // Without reserving its size: a program may have reserved more than this host
            // has (MAP_NORESERVE does not show in /proc/PID/maps), and the pages it uses
            // are charged as it touches them.
            let anonymous = private | libc::MAP_NORESERVE as u64;
            entries.push([r.start, len, p, anonymous, u64::MAX, 0, 0]);
        } else {
            // A shared writable mapping writes through to its file.
            let write = r.perms.starts_with("rw") && r.perms.ends_with('s');
            let fd = match files.get(&(r.name.0.clone(), write)) {
                Some(&fd) => fd,
                None => {
                    let mapped = policy.rebind.path(&r.name.0);
                    let path = std::ffi::OsStr::from_bytes(&mapped.0);
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(write)
                        .open(path)
                        .with_context(|| {
                            format!(
                                "the image maps {} (at {:#x}), which this host does not have",
                                path.to_string_lossy(),
                                r.start
                            )
                        })?;
                    // (A POSIX shared memory object's content came with the image.)
                    if !policy.allow_changed_files && !migrt::image::host_memory_file(&r.name.0) {
                        check_unchanged(r, &f)?;
                    }
                    let fd = migrt::sys::inheritable_fd(&f, FD_BASE)?;
                    keep.push(f);
                    files.insert((r.name.0.clone(), write), fd);
                    fds.push(fd as u64);
                    fd
                }
            };
            let shared = if r.perms.as_bytes().get(3) == Some(&b's') {
                libc::MAP_SHARED as u64
            } else {
                private
            };
            entries.push([r.start, len, p, shared, fd as u64, r.offset, 0]);
        }
    }
    // Then the page data, copied into the memory mapped above: runs of present pages, cut
    // where a page lies outside every region (memory the process unmapped while it was
    // being written, e.g. the shim's own).
    // (Shared memory's pages are in its object already.)
    let target = |a: u64| {
        img.regions.iter().find(|r| {
            a >= r.start
                && a < r.end
                && !SPECIAL.contains(&r.name.0.as_slice())
                && !shared_anonymous(r)
                && !crate::sysv::is_sysv(r)
        })
    };
    // Lazily: the copies into anonymous memory are the pager's, and those regions are
    // registered for it (a file's private mapping cannot be: its copies are made first),
    // unless the region holds little here (image::SMALL_REGION: copied first too).
    // (Only the span of a region that has saved pages: the rest of it is zero, and a
    // fault there is the kernel's to fill, not a round trip to the pager.)
    let mut registered: Vec<(u64, u64)> = Vec::new();
    // The pager's runs (entry, region) and the bytes each region has here.
    let mut paged: Vec<(usize, (u64, u64))> = Vec::new();
    let mut here: HashMap<u64, u64> = HashMap::new();
    for run in &img.runs {
        let at = |i: u64| run.addr + i * PAGE as u64;
        let mut i = 0;
        while i < run.pages {
            let Some(r) = target(at(i)) else {
                i += 1;
                continue;
            };
            let start = i;
            while i < run.pages && at(i) < r.end {
                i += 1;
            }
            let lazy = lazy && image::pageable(&r.name.0);
            if lazy {
                paged.push((entries.len(), (r.start, r.end)));
                if run.file != REMOTE {
                    *here.entry(r.start).or_default() += (i - start) * PAGE as u64;
                }
            }
            entries.push([
                at(start),
                (i - start) * PAGE as u64,
                0,
                private,
                page_fds.get(run.file).copied().unwrap_or(u64::MAX),
                run.offset + start * PAGE as u64,
                if lazy { PAGER } else { COPY },
            ]);
        }
    }
    for (k, (r_start, r_end)) in paged {
        let (start, end) = (entries[k][0], entries[k][0] + entries[k][1]);
        let remote = entries[k][4] == u64::MAX;
        if !remote
            && here
                .get(&r_start)
                .is_some_and(|&b| b <= image::SMALL_REGION)
        {
            entries[k][6] = COPY;
            continue;
        }
        match registered.iter_mut().find(|s| s.0 < r_end && s.1 > r_start) {
            Some(s) => *s = (s.0.min(start), s.1.max(end)),
            None => registered.push((start, end)),
        }
    }
    for (start, end) in registered {
        entries.push([start, end - start, 0, private, 0, 0, REGISTER]);
    }
    // What comes through a MAC-checked stream (`trusted`: the agent checked it) is not
    // checked again, by the restorer or the pager; otherwise what the restorer copies in
    // itself is checked now, and the pager checks the rest as it reads it.
    let unchecked = if trusted { &[][..] } else { &img.checks[..] };
    let checks: Vec<crate::pager::Check> = unchecked
        .iter()
        .map(|c| crate::pager::Check {
            fd: page_fds[c.file] as i32,
            offset: c.offset,
            len: c.len,
            crc: c.crc,
            name: img.files[c.file].display().to_string(),
            verified: Default::default(),
        })
        .collect();
    for e in entries.iter().filter(|e| e[6] == COPY && e[4] != u64::MAX) {
        crate::pager::verify(&checks, e[4] as i32, e[5], e[1])?;
    }
    Ok(Mapped {
        entries,
        fds,
        checks,
    })
}

/// What a process's plan refers to besides its own image.
struct Links<'a> {
    session_dir: &'a Path,
    /// The plan fds of its child processes.
    children: &'a [u64],
    /// The fds every restored process closes.
    closes: &'a [u64],
    /// The fd of its objects' channel.
    channel: u64,
    /// Its System V attachments (sysv.rs).
    sysv: &'a [[u64; 3]],
    /// The fd of the terminal it takes as its controlling terminal, or u64::MAX.
    ctty: u64,
    /// The pager's socket and this process's index for it (u64::MAX: no pager).
    pager: [u64; 2],
    /// Whether it forks its children once its memory is in place (inherit.rs).
    forks_late: bool,
}

fn write_plan(
    img: &ProcImage,
    entries: &[[u64; 7]],
    plan_file: &std::fs::File,
    l: &Links,
) -> Result<()> {
    let Links {
        session_dir,
        children,
        closes,
        channel,
        sysv,
        ctty,
        pager,
        ..
    } = *l;
    let size_of = |n: &[u8]| {
        img.regions
            .iter()
            .find(|r| r.name.0 == n)
            .map_or(0, |r| r.end - r.start)
    };
    let vvar = img
        .regions
        .iter()
        .find(|r| r.name.0 == b"[vvar]")
        .map_or(0, |r| r.start);

    let mut args: Vec<u64> = Vec::new();
    let push_bytes = |args: &mut Vec<u64>, b: &[u8]| {
        args.push(b.len() as u64);
        for c in b.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            args.push(u64::from_le_bytes(w));
        }
    };
    push_bytes(&mut args, session_dir.as_os_str().as_bytes());
    let m = &img.meta;
    args.push(closes.len() as u64);
    args.extend(closes);
    args.extend([m.tid_offset as u64, m.main_ucontext, m.main_fs_base]);
    let mut mm = m.mm.clone();
    mm.resize(11, 0);
    args.extend(&mm);
    push_bytes(&mut args, &m.auxv);
    // The other threads: where each one's context and TLS are, and its vtid.
    let others: Vec<&ThreadState> = img.threads.iter().filter(|t| t.vtid != m.vpid).collect();
    args.push(others.len() as u64);
    for t in others {
        args.extend([t.ucontext_addr, t.fs_base, t.vtid as u64]);
    }
    args.push(channel);
    args.push(sysv.len() as u64);
    args.extend(sysv.iter().flatten());

    let head = 16u64;
    let t = &img.table;
    let leads =
        (t.sid == m.vpid) as u64 | ((t.pgid == m.vpid) as u64) << 1 | (l.forks_late as u64) << 2;
    let children_at = head + entries.len() as u64 * 7;
    let args_at = (children_at + children.len() as u64) * 8;
    let mut words: Vec<u64> = vec![
        PLAN_MAGIC,
        entries.len() as u64,
        m.restart_entry,
        args_at,
        m.main_fs_base,
        (m.main_ucontext - 8192) & !15,
        vvar,
        size_of(b"[vvar]"),
        size_of(b"[vvar_vclock]"),
        size_of(b"[vdso]"),
        children.len() as u64,
        children_at,
        leads,
        ctty,
        pager[0],
        pager[1],
    ];
    for e in entries {
        words.extend(e);
    }
    words.extend(children);
    words.extend(args);
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    use std::io::Write;
    (&*plan_file).write_all(&bytes)?;
    Ok(())
}

/// `--when-told`: says `ready` on stdout, then waits for the line `go` on stdin, reading
/// each round named on a line `have NAME` before it meanwhile (so that reading it is not
/// part of the freeze).
fn wait_to_go(dir: &Path, lazy: bool) -> Result<Ahead> {
    // (The agent waits for this before it lets the sender go on.)
    println!("ready");
    let mut ahead = Ahead::default();
    let mut line = String::new();
    loop {
        line.clear();
        std::io::stdin().read_line(&mut line)?;
        match line.trim().split_once(' ') {
            _ if line.trim() == "go" => return Ok(ahead),
            Some(("have", name)) if !name.contains('/') && !name.starts_with('.') => {
                // (Its rounds were all here before it was.)
                let path = dir.join(name);
                match name.starts_with(image::PROCESS_PREFIX) {
                    true => {
                        let img = read_image(&path, lazy, &mut ahead.rounds)?;
                        ahead.images.insert(name.to_string(), img);
                    }
                    false => {
                        let round = read_round(&path, lazy)?;
                        (ahead.shared).apply(&path, &round.runs, &round.shared)?;
                        ahead.rounds.insert(name.to_string(), round);
                    }
                }
            }
            _ => bail!("not told to go: the image did not all come"),
        }
    }
}

/// A restore's session (named, its table made), its log and its restorer: made before the
/// image is all here when the restore is told when to go (the agent's), out of the freeze —
/// and a name already taken refuses before the session is frozen at the sender.
struct Made {
    dir: migrt::paths::SessionDir,
    table: SessionTable,
    /// `--detach`: the file the restored session writes to, and its path.
    log: Option<(std::fs::File, PathBuf)>,
    /// The restorer, in memory.
    restorer: std::fs::File,
    /// What writes what `mig ps` says of it (sessions::describe, `restored`).
    describing: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Made {
    fn new(rt: &Path, name: &str, a: &RestoreArgs) -> Result<Made> {
        let signal = migrt::wire::DEFAULT_SIGNAL;
        // (Its command is written once the image says it.)
        let dir = sessions::create(rt, Some(name), &[], signal)?;
        let made = (|| {
            let log = match a.detach {
                true => {
                    let log = a
                        .log
                        .clone()
                        .unwrap_or_else(|| migrt::paths::logs_dir(rt).join(format!("{name}.log")));
                    if let Some(d) = log.parent() {
                        std::fs::create_dir_all(d)?;
                    }
                    Some((std::fs::File::create(&log)?, log))
                }
                false => None,
            };
            let restorer = migrt::sys::memfd(c"migrestore", false)?;
            std::io::Write::write_all(&mut &restorer, RESTORER)?;
            // (Where the restorer's fds go, FD_BASE on, before another thread runs here:
            // the description's. Seen: 12 ms inside the freeze; postgres's 8 processes
            // take ~300.)
            migrt::sys::grow_fd_table(FD_BASE + FDS_AHEAD)?;
            Ok(Made {
                table: SessionTable::open(&dir.procs())?,
                dir: dir.clone(),
                log,
                restorer,
                describing: None,
            })
        })();
        if made.is_err() {
            dir.remove();
        }
        made
    }

    /// Waits until what `mig ps` says of it is written (or failed: said, the restore goes
    /// on).
    fn described(&mut self) {
        match self.describing.take().map(|h| h.join()) {
            None | Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => eprintln!("mig restore: describing the session: {e:#}"),
            Some(Err(_)) => eprintln!("mig restore: describing the session failed"),
        }
    }
}

pub fn restore(a: RestoreArgs) -> Result<i32> {
    let rt = sessions::runtime_dir()?;
    let detach = a.detach;
    let mut made = match (&a.name, a.when_told) {
        (Some(name), true) => Some(Made::new(&rt, name, &a)?),
        _ => None,
    };
    let result = restore_into(a, &rt, &mut made);
    if let Some(mut m) = made
        && !(detach && result.is_ok())
    {
        m.described();
        if result.is_err() {
            crate::sysv::remove_made(&m.dir.0);
        }
        sessions::remove_if_dead(&m.dir);
    }
    result
}

/// The restore, into the session made before (`made`) or made here.
fn restore_into(mut a: RestoreArgs, rt: &Path, made: &mut Option<Made>) -> Result<i32> {
    let lazy = a.lazy
        && {
            let ok = crate::pager::available();
            if !ok {
                eprintln!(
                    "mig restore: --lazy needs a userfaultfd that handles faults in system calls and reports forks (root); the pages are copied in first"
                );
            }
            ok
        };
    let mut ahead = match a.when_told {
        true => wait_to_go(&a.dir, lazy)?,
        false => Ahead::default(),
    };
    // 1. Everything verified before anything is made (lazily: page data as it is read).
    let session_img = a.dir.join("session.img");
    let (kind, sections) = image::read_all(&session_img)?;
    let manifest: SessionManifest = match (kind, sections.first()) {
        (image::Kind::Session, Some(s)) if s.tag == Tag::Meta => s.decode(&session_img)?,
        _ => bail!("{}: not a session image", session_img.display()),
    };
    let mut images: Vec<ProcImage> = manifest
        .processes
        .iter()
        .map(|(_, _, f)| match ahead.images.remove(f) {
            Some(img) => Ok(img),
            None => read_image(&a.dir.join(f), lazy, &mut ahead.rounds),
        })
        .collect::<Result<_>>()?;
    // Which socket is connected to which, session-wide.
    let mut tables: Vec<ProcessTable> = images.iter().map(|i| i.table.clone()).collect();
    migrt::link::link_peers(&mut tables);
    for (img, t) in images.iter_mut().zip(tables) {
        img.table = t;
    }
    for img in &images {
        if img.meta.restart_entry == 0 || img.meta.main_ucontext == 0 {
            bail!(
                "{}: the image does not say where to resume",
                img.path.display()
            );
        }
    }
    // The tree: one root (its parent outside the session), every other process under a
    // process of the image — or an orphan: its parent had ended (init or a subreaper
    // had taken it; a daemon that forked twice), and the root's restorer makes it its
    // sibling instead of its child. (With the first process gone, the lowest vpid of
    // those is the root.)
    let vpids: Vec<i32> = images.iter().map(|i| i.meta.vpid).collect();
    let parent_of = |i: &ProcImage| {
        manifest
            .processes
            .iter()
            .find(|p| p.0 == i.meta.vpid)
            .map_or(0, |p| p.1)
    };
    let roots: Vec<usize> = (0..images.len())
        .filter(|&k| !vpids.contains(&parent_of(&images[k])))
        .collect();
    let Some(root) = roots.iter().copied().min_by_key(|&k| {
        let i = &images[k];
        (parent_of(i) != 0, i.meta.vpid)
    }) else {
        bail!("the image holds no process");
    };
    let img = &images[root];

    // 2. The session, with the same vpid.
    let name = a.name.clone().unwrap_or_else(|| manifest.name.clone());
    let command: Vec<String> = img.meta.command.iter().map(|c| c.to_string()).collect();
    let made = match made {
        Some(m) => m,
        None => made.insert(Made::new(rt, &name, &a)?),
    };
    let (dir, table) = (&made.dir, &made.table);
    let rules = a.rebind.to_string();
    let restored = format!(
        "from {} (checkpointed on {}); rebinding: {}",
        a.dir.display(),
        manifest.host,
        if rules.is_empty() {
            "none, old bindings"
        } else {
            &rules
        }
    );
    // What `mig ps` says of it, written beside the restore (the restored processes do not
    // read it): a file made on a disk file system can wait for its journal.
    made.describing = Some({
        let dir = dir.clone();
        std::thread::spawn(move || -> Result<()> {
            sessions::describe(&dir, &command)?;
            Ok(std::fs::write(dir.0.join("restored"), restored)?)
        })
    });
    for p in &images {
        let parent = parent_of(p);
        table.restore_slot(
            p.meta.vpid,
            Kind::Process,
            if vpids.contains(&parent) { parent } else { 0 },
        )?;
        for t in p.threads.iter().filter(|t| t.vtid != p.meta.vpid) {
            table.restore_slot(t.vtid, Kind::Thread, p.meta.vpid)?;
        }
    }

    // 3. The plan, and the restorer.
    let mut keep = Vec::new();
    let policy = objects::Policy {
        rebind: &a.rebind,
        allow_changed_files: a.allow_changed_files,
        fifo_contents: std::cell::RefCell::new(
            images
                .iter()
                .flat_map(|i| &i.contents)
                .map(|(ino, c)| (*ino, c.0.clone()))
                .collect(),
        ),
        stdio_given: [
            a.stdio[0].is_some(),
            a.stdio[1].is_some() || a.log.is_some(),
            a.stdio[2].is_some() || a.stdio[1].is_some() || a.log.is_some(),
        ],
    };
    let mut made_files = objects::host_memory_files(&images, &policy)?;
    let mut objects = objects::build(&images, &manifest.shared, &policy)?;
    let shared = shared_memory(&images, &objects.by_inode, &mut keep, &mut ahead.shared)?;
    let sysv_ids = crate::sysv::make(&images, &dir.0)?;
    let mut files = MappedFiles::new();
    // A child takes over from its parent what it has alike, where that is worth forking
    // it late (inherit.rs). The pager would fill each process's memory on its own: lazily,
    // such a parent and child are copied in first instead.
    let parent_at = |img: &ProcImage| vpids.iter().position(|&v| v == parent_of(img));
    let mut paged = vec![lazy; images.len()];
    let sharing = lazy && !a.no_sharing;
    for (k, img) in images.iter().enumerate() {
        if let Some(p) =
            parent_at(img).filter(|&p| sharing && crate::inherit::worth_it(img, &images[p]))
        {
            (paged[k], paged[p]) = (false, false);
        }
    }
    let mut mapped: Vec<Mapped> = (images.iter().zip(&paged))
        .map(|(i, &paged)| {
            let opened = (&mut keep, &mut files);
            map_regions(i, &policy, &shared, opened, (paged, a.when_told))
        })
        .collect::<Result<_>>()?;
    let mut forks_late = vec![false; images.len()];
    let plain: Vec<Vec<[u64; 7]>> = mapped.iter().map(|m| m.entries.clone()).collect();
    for (k, img) in images.iter().enumerate() {
        if let Some(p) = parent_at(img).filter(|&p| !paged[k] && !paged[p]) {
            let mut marked = plain[k].clone();
            if crate::inherit::mark(&mut marked, &plain[p]) >= crate::inherit::WORTH {
                mapped[k].entries = marked;
                forks_late[p] = true;
            }
        }
    }
    let mut plans = Vec::new();
    for _ in &images {
        let f = migrt::sys::memfd(c"migshim-plan", false)?;
        let fd = migrt::sys::inheritable_fd(&f, FD_BASE)?;
        plans.push((f, fd as u64));
    }
    let channels = hand_down(&objects)?;
    let cttys = controlling_terminals(&images, &objects)?;
    let detach_log = &made.log;
    let remote = a.pages_from.take().map(|sock| crate::pager::Remote {
        sock: sock.into(),
        vpids: vpids.clone(),
        ahead: Default::default(),
    });
    let pager = match lazy {
        true => Some(start_pager(
            &mapped,
            detach_log.as_ref().map(|l| &l.0),
            remote,
        )?),
        false => None,
    };
    let pager_fd = pager
        .as_ref()
        .map_or(u64::MAX, |p| p.sock.as_raw_fd() as u64);
    let closes: Vec<u64> = mapped
        .iter()
        .flat_map(|m| m.fds.iter().copied())
        .chain(plans.iter().map(|p| p.1))
        .chain(channels.iter().map(|c| c.1))
        .chain(shared.values().copied())
        .chain(cttys.iter().copied().filter(|&f| f != u64::MAX))
        .chain(pager.iter().map(|p| p.sock.as_raw_fd() as u64))
        .collect();
    for (k, i) in images.iter().enumerate() {
        let orphans = roots.iter().filter(|&&c| k == root && c != root);
        let children: Vec<u64> = (0..images.len())
            .filter(|&c| parent_of(&images[c]) == i.meta.vpid)
            .map(|c| plans[c].1)
            .chain(orphans.map(|&c| plans[c].1 | ORPHAN))
            .collect();
        let links = Links {
            session_dir: &dir.0,
            children: &children,
            closes: &closes,
            channel: channels[k].1,
            sysv: &crate::sysv::attachments(i, &sysv_ids),
            ctty: cttys[k],
            pager: [pager_fd, k as u64],
            forks_late: forks_late[k],
        };
        write_plan(i, &mapped[k].entries, &plans[k].0, &links)?;
    }
    let plan_fd = plans[root].1.to_string().into_bytes();
    use std::os::fd::AsRawFd;
    let restorer = made.restorer.as_raw_fd();
    let mut c = Command::new(format!("/proc/self/fd/{restorer}"));
    c.arg0("migrestore")
        .arg(std::ffi::OsStr::from_bytes(&plan_fd))
        .arg("a");
    if let Some((out, _)) = &detach_log {
        c.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out.try_clone()?)
            .process_group(0);
    }
    let [stdin, stdout, stderr] = &a.stdio;
    if let Some(p) = stdin {
        c.stdin(std::fs::File::open(p).with_context(|| format!("--stdin {}", p.display()))?);
    }
    let append = |p: &PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))
    };
    if let Some(p) = stdout {
        c.stdout(append(p)?);
    }
    if let Some(p) = stderr.as_ref().or(stdout.as_ref()) {
        c.stderr(append(p)?);
    }
    if !a.detach {
        terminal::restore_modes(&images);
    }
    let mut child = c.spawn().context("starting the restorer")?;
    // (It needed them; nothing after it does.)
    crate::owner::drop_lent_capabilities();
    // (The restored processes hold the pager's socket now: it ends when they all did.)
    let hold = pager.map(|p| p.hold);
    // 4. Each process says when it is ready (nothing of its restart can fail any more);
    // none runs app code until all are and its connections handed over are live. Then
    // running again once each says it is back (its threads and timers again).
    let log = detach_log.as_ref().map(|l| l.1.as_path());
    hear_all(&channels, RESTART_READY, &mut child, log, &vpids, table)?;
    // (MIGSHIM_RESTORE_PAUSE=FILE, for the tests: the restore waits here, its session
    // made but nothing of it running yet, until FILE exists.)
    if let Some(f) = std::env::var_os("MIGSHIM_RESTORE_PAUSE") {
        while !Path::new(&f).exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    objects.handed.go_live()?;
    for (c, _) in &channels {
        std::io::Write::write_all(&mut &*c, &[RESTART_GO]).context("a restored process")?;
    }
    hear_all(&channels, RESTART_BACK, &mut child, log, &vpids, table)?;
    drop(hold);
    // Its objects are the processes' now (mig's copies would keep a connection the
    // session closes from ending).
    objects.handed.keep();
    made_files.keep();
    drop(objects);
    made.described();
    if a.detach {
        println!("{name}");
        return Ok(0);
    }
    migrt::sys::ignore_terminal_signals();
    terminal::redraw(&images);
    Ok(exit_code(child.wait()?))
}
