//! Writing this process's image while its app threads are parked (on the control thread).
//!
//! Memory is written straight from the address space: resident pages only (from
//! /proc/self/pagemap), zero pages left out, in page-aligned chunks. Regions the restorer
//! recreates ([vdso] and friends), the session table, unreadable regions and read-only
//! file mappings (mapped again from their file) are described but not stored.

use crate::interpose::freeze::{Parked, context_bytes};
use crate::precopy::Delta;
use crate::state::{Shim, vpid};
use migrt::dirty::{NOT_OWN, PAGE_IS_PRESENT, PAGE_IS_WRITTEN as WRITTEN, PageRegion};
use migrt::image::{ImageWriter, Kind, PAGE, Precopied, ProcessMeta, Region, Tag, ThreadState};
use migrt::record::Bytes;
use migrt::table::{Folded, ProcessTable};
use migrt::wire::Walked;
use std::io::{Read, Seek, SeekFrom};

use std::os::unix::ffi::OsStrExt;

/// Region names of the shim's own mappings in an image.
pub const MIGSHIM_TABLE: &str = "[migshim-table]";
pub const MIGSHIM_SCRATCH: &str = "[migshim-scratch]";

/// A mapping kept in the source of a lazy migration that is this large is not walked in
/// the freeze (~1 ms per 0.5 GiB here): all of it is kept, and the source finds out which
/// of its pages exist as the target asks for them (agent/src/sparse.rs).
const UNWALKED: u64 = 32 << 20;

/// Pages per PageMap/PageData pair (4 MiB: a lazy restore checksums a pair before it
/// serves any page of it).
const CHUNK: u64 = 1024;

#[derive(Debug, Default)]
pub struct Dumped {
    pub bytes: u64,
    pub threads: u32,
    pub regions: u32,
    pub pages: u64,
    /// The process holding the pages kept in the source (lazy migration: this one, or a
    /// snapshot of it), or 0.
    pub snapshot: i32,
}

/// A mapping backed by a file the restore maps again (its unmodified pages come from there).
fn file_backed(m: &migrt::procfs::MapsLine) -> bool {
    file_name(&m.name.0)
}

fn file_name(name: &[u8]) -> bool {
    name.first() == Some(&b'/') && !name.starts_with(b"/memfd:") && !name.ends_with(b" (deleted)")
}

/// Whether the image holds page data of this mapping: every readable mapping but the ones
/// the restorer recreates, the shim's own working memory, and shared file mappings (their
/// data is the file's). Of a private file mapping only the pages the process changed
/// (copy-on-write, e.g. relocated RELRO) are stored.
pub fn stored(m: &migrt::procfs::MapsLine, own: &[(u64, u64)]) -> bool {
    stored_raw(m.start, m.end, m.perms.as_bytes(), &m.name.0, own)
}

fn stored_raw(start: u64, end: u64, perms: &[u8], name: &[u8], own: &[(u64, u64)]) -> bool {
    let special = [&b"[vvar]"[..], b"[vvar_vclock]", b"[vdso]", b"[vsyscall]"];
    let shared = perms.get(3) == Some(&b's');
    !(special.contains(&name)
        || own.iter().any(|&(s, e)| start >= s && end <= e)
        || perms.first() != Some(&b'r')
        || (file_name(name) && shared))
}

fn link(p: &str) -> Bytes {
    Bytes(
        std::fs::read_link(p)
            .map(|p| p.as_os_str().as_bytes().to_vec())
            .unwrap_or_default(),
    )
}

/// What other processes' images hold, which this one's leaves out (their dumps read it
/// meanwhile).
pub struct Theirs<'a> {
    /// Ranges of shared memory: their pages.
    pub memory: &'a [(u64, u64)],
    /// Pipes and FIFOs, by inode: their unread bytes.
    pub pipes: &'a [u64],
    /// POSIX shared memory objects, by inode: their content.
    pub host_files: &'a [u64],
}

/// Writes the image (what `theirs` says another process's image holds left out). With pre-copy `rounds` (their files) and their `delta`, memory the
/// rounds tracked is stored only where written since the last round; its other pages are
/// listed as kept from the rounds (image::Precopied). With the round that stays in the
/// source (image::SOURCE_ROUND, a lazy migration), none of the anonymous memory is stored:
/// every page of it that exists is listed as kept there.
pub fn dump(
    s: &Shim,
    file: std::fs::File,
    frozen: &Frozen,
    sockets: &[migrt::sockstate::SocketState],
    theirs: &Theirs,
    sync: bool,
    (rounds, delta, walked): (&[String], Option<&Delta>, Option<&Walked>),
) -> std::io::Result<Dumped> {
    // (Before any memory is read: the note goes with it.)
    crate::zombies::note(&s.table, crate::state::vpid());
    // Kept in the source (lazy migration): only what the target's pager fills in; the
    // rest (the stack, private file mappings' changed pages) goes with the image.
    let in_source = rounds.iter().any(|n| n == migrt::image::SOURCE_ROUND);
    let delta = delta.filter(|_| !rounds.is_empty());
    let (parked, table, folded) = (&frozen.parked[..], &frozen.table, &frozen.folded);
    let scratch = Scratch::new()?;
    let mut w = ImageWriter::new(&file, Kind::Process)?;
    let enc = |e: migrt::Error| std::io::Error::other(e.to_string());
    // (Read once for what is said of it before its pages: a map of hundreds of mappings
    // takes a fraction of a millisecond. The page loop reads it again.)
    let maps = migrt::procfs::all_mappings("self");
    let main = parked.iter().find(|p| p.tid == table.real_pid);
    let meta = ProcessMeta {
        restart_entry: crate::restart::migshim_restart as *const () as u64,
        main_ucontext: main.map_or(0, |p| p.ucontext as u64),
        main_fs_base: main.map_or(0, |p| p.fs_base),
        tid_offset: main
            .and_then(|p| crate::interpose::freeze::tid_offset(p.fs_base, p.tid))
            .unwrap_or(0),
        mm: mm_layout(&maps),
        auxv: std::fs::read("/proc/self/auxv").unwrap_or_default(),
        comm: std::fs::read_to_string("/proc/self/comm")
            .unwrap_or_default()
            .trim_end()
            .to_string(),
        tty: (0..3).find_map(migrt::sys::tty_state),
        ctty_fd: crate::restart::controlling_fd(),
        sysv: sysv_attached(&maps),
        vpid: vpid(),
        parent_vpid: table.parent_vpid,
        real_pid: table.real_pid,
        host: migrt::sys::hostname(),
        command: table.command.clone(),
        exe: link("/proc/self/exe"),
        cwd: link("/proc/self/cwd"),
        umask: crate::interpose::current_umask(),
        taken: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    w.postcard(Tag::Meta, &meta).map_err(enc)?;
    w.postcard(Tag::Table, &(table, folded)).map_err(enc)?;
    let threads: Vec<ThreadState> = parked
        .iter()
        .map(|p| {
            let (ucontext, fpstate) = context_bytes(p);
            ThreadState {
                vtid: s.table.vid_of(p.tid).unwrap_or(p.tid),
                tid: p.tid,
                ucontext_addr: p.ucontext as u64,
                ucontext,
                fpstate,
                fs_base: p.fs_base,
                altstack: p.altstack,
            }
        })
        .collect();
    w.postcard(Tag::Threads, &threads).map_err(enc)?;
    w.postcard(Tag::Pipes, &pipe_contents(table, theirs.pipes))
        .map_err(enc)?;
    w.postcard(Tag::Sockets, &sockets).map_err(enc)?;
    let own_table = s.table.mapping().0 as u64;
    let (host_files, mut contents) =
        host_memory_files(table, (&maps, own_table), theirs.host_files);
    contents.extend(file_contents(table, theirs.pipes));
    w.postcard(Tag::HostFiles, &host_files).map_err(enc)?;
    w.postcard(Tag::Contents, &contents).map_err(enc)?;
    w.postcard(Tag::Ptys, &pty_states(table)).map_err(enc)?;

    // Left out: the session table and the scratch buffer, both shared mappings, which the
    // kernel never merges with the app's private memory. (This thread's stack is stored
    // like any memory: it may share a mapping with the app's, and every page goes through
    // the scratch copy, so its changing while being written does no harm.)
    let (shm, shm_len) = s.table.mapping();
    let table_range = (shm as u64, (shm + shm_len) as u64);
    let own = [table_range, scratch.range()];
    // Everything the page loop needs is allocated now; the address space is read into it
    // just before the loop, and nothing is allocated or freed from then until the pages are
    // written (the control thread's own heap, ctlheap.rs, is part of what is written).
    let mut maps_file = std::fs::File::open("/proc/self/maps")?;
    let mut help = walked.and_then(|w| {
        let go = std::fs::OpenOptions::new().write(true).open(&w.go).ok()?;
        Some(Help {
            file: std::fs::File::open(&w.found).ok()?,
            go: Some(go),
            start: w.start,
            end: w.end,
        })
    });
    let maps_text = &mut scratch.maps[..];
    let mut spans: Vec<Span> = Vec::with_capacity(1 << 16);
    let own = own.to_vec();
    let is_own = |m: &migrt::procfs::MapsLine| own.iter().any(|&(s, e)| m.start >= s && m.end <= e);
    // Shared memory another process's image holds: described, its pages left out.
    let mine = |start: u64, end: u64| !(theirs.memory.iter()).any(|&(s, e)| start >= s && end <= e);
    let identity = |m: &migrt::procfs::MapsLine| -> (u64, i64) {
        use std::os::unix::fs::MetadataExt;
        if !file_backed(m) {
            return (0, 0);
        }
        std::fs::metadata(std::ffi::OsStr::from_bytes(&m.name.0)).map_or((0, 0), |md| {
            (md.size(), md.mtime() * 1_000_000_000 + md.mtime_nsec())
        })
    };
    let describe = |maps: &[migrt::procfs::MapsLine]| -> Vec<Region> {
        // (A file's mappings come one after the other: it is looked at once.)
        let mut last: Option<(&[u8], (u64, i64))> = None;
        maps.iter()
            .map(|m| match last {
                Some((name, id)) if name == &m.name.0[..] => (m, id),
                _ => {
                    let id = identity(m);
                    last = Some((&m.name.0, id));
                    (m, id)
                }
            })
            .map(|(m, (file_size, file_mtime_ns))| Region {
                start: m.start,
                end: m.end,
                perms: m.perms.clone(),
                offset: m.offset,
                // The shim's own mappings (session table, scratch, control stack) are its
                // business on restore: named so, they are placeholders.
                // The session table is mapped again there by the restart path; the scratch
                // buffer is not recreated at all.
                name: if (m.start, m.end) == table_range {
                    Bytes::from(MIGSHIM_TABLE)
                } else if is_own(m) {
                    Bytes::from(MIGSHIM_SCRATCH)
                } else {
                    m.name.clone()
                },
                inode: m.inode,
                file_size,
                file_mtime_ns,
                stored: stored(m, &own) && mine(m.start, m.end),
            })
            .collect()
    };

    // From here on nothing is allocated or freed: every page written is first copied to the
    // scratch mapping (left out of the image, as is this thread's stack), so that what is
    // checksummed is what is written, and the heap the app will find again is the heap as
    // it was when the app was parked.
    let mut pagemap = std::fs::File::open("/proc/self/pagemap")?;
    // (Room for the delta's page categories and kept ranges, allocated now.)
    let room = if delta.is_some() || in_source {
        1 << 16
    } else {
        0
    };
    let mut existing: Vec<PageRegion> = Vec::with_capacity(room);
    let mut kept: Vec<(u64, u64)> = Vec::with_capacity(room);
    let mut len = 0;
    loop {
        match maps_file.read(&mut maps_text[len..])? {
            0 => break,
            n => len += n,
        }
        if len == maps_text.len() {
            return Err(std::io::Error::other("more than 16 MiB of mappings"));
        }
    }
    for line in maps_text[..len].split(|&b| b == b'\n') {
        if let Some((start, end, perms, name)) = migrt::procfs::maps_fields(line)
            && spans.len() < spans.capacity()
        {
            spans.push(Span {
                start,
                end,
                stored: stored_raw(start, end, perms, name, &own) && mine(start, end),
                file: file_name(name),
                shared: perms.get(3) == Some(&b's'),
                // (Not the shim's own static data: the restart path needs it at once, so it
                // goes with the image rather than being fetched page by page from afar.)
                // Nor the control thread's heaps (its own, and the libc arena it is served
                // from, unless that is the app's main one): they may change after the dump
                // (ctlheap.rs).
                pageable: migrt::image::pageable(name)
                    && !(start..end).contains(&own_statics())
                    && !crate::ctlheap::contains(start)
                    && (!crate::ctlheap::holds_libc_arena(start, end) || name == b"[heap]"),
            });
        }
    }
    // mig walks its part from now on (nothing is mapped from here to the end).
    if let Some(go) = help.as_mut().and_then(|h| h.go.take()) {
        let _ = std::io::Write::write_all(&mut &go, &[1]);
    }
    let mut pages = 0u64;
    for &Span {
        start,
        end,
        file,
        shared,
        pageable,
        ..
    } in spans.iter().filter(|s| s.stored)
    {
        let r = Region {
            start,
            end,
            ..Default::default()
        };
        // Tracked by the rounds: the pages written since the last one are stored, the
        // others kept from the rounds (the shared zero page and file pages are neither).
        // In the source: every page of its own memory is kept there (shared memory goes
        // as in pre-copy, or with the image).
        existing.clear();
        let kept_here = in_source && !shared;
        // What counts as written since: kept in the source, nothing (all of it stays there).
        let written_bit = if kept_here { 0 } else { WRITTEN };
        let whole = kept_here && pageable && end - start >= UNWALKED;
        let delta = match (kept_here, delta) {
            // (A mapping holding little goes with the image: image::SMALL_REGION.)
            (true, _) => {
                whole
                    || pageable
                        && existing_with_help(
                            &mut help,
                            (start, end),
                            !file,
                            |r, out| migrt::dirty::existing_into(&pagemap, r, file, out),
                            &mut existing,
                        )
                        && existing
                            .iter()
                            .filter(|p| p.categories & NOT_OWN == 0)
                            .map(|p| p.end - p.start)
                            .sum::<u64>()
                            > migrt::image::SMALL_REGION
            }
            (false, Some(d)) => {
                d.covers((start, end), shared)
                    && existing_with_help(
                        &mut help,
                        (start, end),
                        pageable && !file && !shared,
                        |r, out| d.existing_into(r, (file, shared), out),
                        &mut existing,
                    )
            }
            (false, None) => false,
        } && kept.capacity() - kept.len() >= existing.len();
        if whole {
            keep(&mut kept, start, end);
        } else if delta {
            for p in existing
                .iter()
                .filter(|p| p.categories & (written_bit | NOT_OWN) == 0)
            {
                match p.categories & PAGE_IS_PRESENT {
                    0 => keep_swapped(&mut pagemap, scratch.entries, (p.start, p.end), &mut kept)?,
                    _ => keep(&mut kept, p.start, p.end),
                }
            }
        }
        let mut cursor = 0;
        let mut written = |a: u64| {
            while cursor < existing.len() && existing[cursor].end <= a {
                cursor += 1;
            }
            existing.get(cursor).is_some_and(|p| {
                p.start <= a && p.categories & written_bit != 0 && p.categories & NOT_OWN == 0
            })
        };
        let total = (r.end - r.start) / PAGE as u64;
        let mut first = 0;
        let mut ahead = 0;
        while first < total {
            if delta {
                // Only the pages written since are stored: straight to the next one (a
                // gibibyte's pagemap is not read for the few written).
                let at = r.start + first * PAGE as u64;
                while existing.get(ahead).is_some_and(|p| {
                    p.end <= at || p.categories & written_bit == 0 || p.categories & NOT_OWN != 0
                }) {
                    ahead += 1;
                }
                match existing.get(ahead) {
                    Some(p) if p.start < r.end => first = (p.start.max(at) - r.start) / PAGE as u64,
                    _ => break,
                }
            }
            let count = CHUNK.min(total - first);
            let addr = r.start + first * PAGE as u64;
            // Bit 63: present in memory; bit 62: swapped out; bit 61: a page of the file (or
            // shared), not one the process made its own.
            pagemap.seek(SeekFrom::Start(addr / PAGE as u64 * 8))?;
            let entries = &mut scratch.entries[..count as usize * 8];
            pagemap.read_exact(entries)?;
            // Shared memory (anonymous, memfd, System V) holds pages this process has not
            // touched since it was restored: the object's residency says what it holds.
            let resident = if shared {
                let v = &mut scratch.resident[..count as usize];
                // SAFETY: mincore writes one byte per page of a range this process maps.
                let ok = unsafe {
                    libc::mincore(
                        addr as *mut libc::c_void,
                        (count * PAGE as u64) as usize,
                        v.as_mut_ptr(),
                    ) == 0
                };
                ok.then_some(&*v)
            } else {
                None
            };
            let present = &mut scratch.present[..count.div_ceil(64) as usize];
            present.fill(0);
            let mut n = 0usize;
            for i in 0..count {
                let e = u64::from_le_bytes(entries[i as usize * 8..][..8].try_into().unwrap());
                let swapped = e >> 62 & 1 == 1;
                let own_page = e >> 63 == 1 && (e >> 61 & 1 == 0 || !file);
                let held = resident.is_some_and(|r| r[i as usize] & 1 == 1);
                let wanted = if delta {
                    written(addr + i * PAGE as u64)
                } else {
                    swapped || own_page || held
                };
                if !wanted {
                    continue;
                }
                // SAFETY: the page lies in a readable mapping of this process, and every app
                // thread is parked: nothing unmaps it while it is read.
                let page = unsafe {
                    std::slice::from_raw_parts((addr + i * PAGE as u64) as *const u8, PAGE)
                };
                if !file && is_zero(page) {
                    continue; // a zero page of a private file mapping may differ from the file's
                }
                scratch.data[n * PAGE..][..PAGE].copy_from_slice(page);
                present[(i / 64) as usize] |= 1 << (i % 64);
                n += 1;
            }
            if n > 0 {
                pages += n as u64;
                let map = PageMapRef {
                    start: addr,
                    count,
                    present,
                };
                let enc = postcard::to_slice(&map, &mut scratch.enc[..])
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                w.section(Tag::PageMap, enc)?;
                w.section(Tag::PageData, &scratch.data[..n * PAGE])?;
            }
            first += count;
        }
    }
    // Pages kept in the source are read from the process itself: nothing of the app runs
    // until it ends here, and the control thread writes only to its own heap (ctlheap.rs) —
    // unless that was full: then from a snapshot made now, before anything is allocated
    // again, as they were when the pages written since were stored.
    // (Or the control thread is served from libc's main arena, the app's: what libc
    // allocates for it there could change the app's pages after the dump.)
    let changing = crate::ctlheap::spilled()
        || spans
            .iter()
            .any(|s| s.pageable && crate::ctlheap::holds_libc_arena(s.start, s.end));
    let snapshot = match (in_source, changing) {
        (true, false) => Snapshot(crate::interpose::real_pid()),
        (true, true) => match crate::interpose::raw::snapshot() {
            pid if pid > 0 => Snapshot(pid as i32),
            e => return Err(std::io::Error::from_raw_os_error(-e as i32)),
        },
        (false, _) => Snapshot(0),
    };
    if delta.is_some() || in_source {
        let p = Precopied {
            rounds: rounds.to_vec(),
            kept,
        };
        w.postcard(Tag::Precopied, &p).map_err(enc)?;
    }
    // The regions as the page loop saw them (written last: describing them allocates).
    let regions = describe(&migrt::procfs::parse_maps(&maps_text[..len]));
    w.postcard(Tag::Regions, &regions).map_err(enc)?;
    let bytes = w.written();
    w.finish()?;
    if sync {
        file.sync_all()?;
    }
    Ok(Dumped {
        bytes,
        threads: threads.len() as u32,
        regions: regions.len() as u32,
        pages,
        snapshot: snapshot.keep(),
    })
}

/// mig's part of the walk of one large anonymous mapping (`start..end`, its upper part):
/// what it found comes through `file`.
struct Help {
    file: std::fs::File,
    /// Told to go on this once the dump maps nothing more.
    go: Option<std::fs::File>,
    start: u64,
    end: u64,
}

/// The pages of `start..end` that exist, appended to `existing` (nothing is allocated):
/// walked here (`walk`), but for the upper part mig walked meanwhile (`help`, where it
/// fits, `may`: a mapping of the app's own, not file-backed), read from it — or walked
/// here after all if that fails (a dump written again finds it read already). False where
/// `existing` has no room.
fn existing_with_help(
    help: &mut Option<Help>,
    (start, end): (u64, u64),
    may: bool,
    walk: impl Fn((u64, u64), &mut Vec<PageRegion>) -> std::io::Result<bool>,
    existing: &mut Vec<PageRegion>,
) -> bool {
    match help.take_if(|h| may && h.end == end && start < h.start && h.start < end) {
        Some(mut h) => {
            walk((start, h.start), existing).unwrap_or(false) && {
                let before = existing.len();
                migrt::dirty::read_walked(&mut h.file, existing).unwrap_or(false) || {
                    existing.truncate(before);
                    walk((h.start, end), existing).unwrap_or(false)
                }
            }
        }
        None => walk((start, end), existing).unwrap_or(false),
    }
}

/// Adds `start..end` to the kept ranges (merged; within the room they have: when full, the
/// last range grows over what lies between, which the restore then reads as kept too — the
/// pages the image stores override it).
fn keep(kept: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let full = kept.len() == kept.capacity();
    match kept.last_mut() {
        Some(k) if k.1 == start || full => k.1 = end,
        _ => kept.push((start, end)),
    }
}

/// The swap type of a uffd-wp marker in /proc/PID/pagemap (SWP_PTE_MARKER, the last of the
/// 5-bit types).
const PTE_MARKER: u64 = 31;

/// Keeps the pages of `range` (none present, all "swapped") that are swapped out for real:
/// write tracking marks never-touched memory too (UFFD_FEATURE_WP_UNPOPULATED), and such a
/// marker reads as swapped — but it is no data, it reads as zero.
fn keep_swapped(
    pagemap: &mut std::fs::File,
    entries: &mut [u8],
    (start, end): (u64, u64),
    kept: &mut Vec<(u64, u64)>,
) -> std::io::Result<()> {
    let page = PAGE as u64;
    let mut at = start;
    while at < end {
        let count = ((end - at) / page).min(entries.len() as u64 / 8);
        pagemap.seek(SeekFrom::Start(at / page * 8))?;
        pagemap.read_exact(&mut entries[..count as usize * 8])?;
        for i in 0..count {
            let e = u64::from_le_bytes(entries[i as usize * 8..][..8].try_into().unwrap());
            if e >> 62 & 1 == 1 && e & 0x1f != PTE_MARKER {
                keep(kept, at + i * page, at + (i + 1) * page);
            }
        }
        at += count * page;
    }
    Ok(())
}

/// An address in the shim's zero-initialised static data (its .bss, an anonymous mapping
/// after its file's).
fn own_statics() -> u64 {
    static MARK: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    &MARK as *const _ as u64
}

/// A mapping as the page loop sees it.
struct Span {
    start: u64,
    end: u64,
    /// The image holds its pages (dump::stored).
    stored: bool,
    /// Backed by a file of its own.
    file: bool,
    shared: bool,
    /// Anonymous and not the stack: a lazy restore's pager may fill it in.
    pageable: bool,
}

/// A snapshot process (0: none; the process itself: no other), ended when dropped unless
/// kept.
struct Snapshot(i32);

impl Snapshot {
    fn keep(mut self) -> i32 {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if self.0 > 0 {
            crate::interpose::raw::end_snapshot(self.0);
        }
    }
}

/// The unread bytes of every pipe this process reads from, but those another's image holds
/// (`theirs`, inodes): read out through a second open of the read end (the app's own flags
/// untouched), and written straight back, in order. Every process of the session is
/// frozen, and no other dump reads this pipe, so nothing else reads or writes meanwhile.
fn pipe_contents(table: &ProcessTable, theirs: &[u64]) -> Vec<(u64, Bytes)> {
    use migrt::table::{Object, PipeEnd};
    let mut out: Vec<(u64, Bytes)> = Vec::new();
    for f in &table.fds {
        if let Object::Pipe {
            id,
            ino,
            end: PipeEnd::Read,
        } = f.object
            && !out.iter().any(|(i, _)| *i == id)
            && !theirs.contains(&ino)
        {
            out.push((id, Bytes(unread_bytes(f.fd))));
        }
    }
    out
}

/// Reads what a pipe or FIFO holds and puts it back (see pipe_contents).
fn unread_bytes(fd: i32) -> Vec<u8> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = format!("/proc/self/fd/{fd}");
    let open = |write: bool| {
        std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
    };
    let Ok(mut r) = open(false) else {
        return Vec::new();
    };
    let mut data = Vec::new();
    let _ = r.read_to_end(&mut data); // ends with WouldBlock once the pipe is empty
    if !data.is_empty()
        && let Ok(mut w) = open(true)
    {
        let _ = w.write_all(&data);
    }
    data
}

/// The System V segments this process has attached (a mapping named /SYSV<key> whose
/// inode is the segment's id).
fn sysv_attached(maps: &[migrt::procfs::MapsLine]) -> Vec<migrt::image::SysvSegment> {
    migrt::procfs::sysv_segments()
        .into_iter()
        .filter(|s| {
            maps.iter()
                .any(|m| m.name.0.starts_with(b"/SYSV") && m.inode == s.id as u64)
        })
        .map(|s| migrt::image::SysvSegment {
            app_id: crate::interpose::sysv::app_id(s.id),
            ..s
        })
        .collect()
}

/// The pseudo-terminals whose master this process holds: modes, window size, and the
/// output waiting on the master — read, and written back through the slave (output
/// processing off) so that the running session still finds it there.
fn pty_states(table: &ProcessTable) -> Vec<migrt::image::PtyState> {
    use migrt::table::Object;
    use std::os::unix::fs::OpenOptionsExt;
    let mut out: Vec<migrt::image::PtyState> = Vec::new();
    for f in &table.fds {
        let Object::PtyMaster { index: Some(index) } = f.object else {
            continue;
        };
        if out.iter().any(|p| p.index == index) {
            continue;
        }
        let Some(tty) = migrt::sys::tty_state(f.fd) else {
            continue;
        };
        let output = migrt::sys::read_some(f.fd, migrt::sys::readable_bytes(f.fd));
        if !output.is_empty() {
            let slave = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(format!("/dev/pts/{index}"));
            if let Ok(mut s) = slave {
                let _ = migrt::sys::write_raw_output(&mut s, &output);
            }
        }
        out.push(migrt::image::PtyState {
            index,
            tty,
            output: Bytes(output),
        });
    }
    out
}

/// Unread bytes and options of every socket this process holds (once per socket) but
/// those another's image holds (`theirs`, by id); the connections to hand over (by id)
/// are read in repair mode, and stay in it: their fds are noted in `frozen.repaired`.
pub fn socket_states(
    frozen: &mut Frozen,
    handover: &[u64],
    theirs: &[u64],
) -> std::io::Result<Vec<migrt::sockstate::SocketState>> {
    let mut out: Vec<migrt::sockstate::SocketState> = Vec::new();
    for f in &frozen.table.fds {
        if let migrt::table::Object::Socket(s) = &f.object
            && !out.iter().any(|o| o.id == s.id)
            && !theirs.contains(&s.id)
        {
            let whole = handover.contains(&s.id);
            if whole {
                frozen.repaired.push(f.fd);
            }
            let kind = (s.id, s.domain, s.ty);
            let state = migrt::sockstate::capture(f.fd, kind, s.listening, whole).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("fd {} (TCP connection to hand over): {e}", f.fd),
                )
            })?;
            out.push(state);
        }
    }
    Ok(out)
}

/// The app as it was parked: its threads, and its table at that instant.
pub struct Frozen {
    pub parked: Vec<Parked>,
    pub table: ProcessTable,
    pub folded: Folded,
    /// Sockets left in TCP repair mode by the dump (connections handed over).
    pub repaired: Vec<i32>,
    /// The snapshot of a lazy migration's dump (0: none): its pages are read from it.
    pub snapshot: i32,
}

impl Frozen {
    /// The handed-over connections run on here (the migration did not happen): out of
    /// repair mode, with a window probe so their peers resume at once.
    pub fn let_out(&mut self) {
        for fd in self.repaired.drain(..) {
            migrt::tcprepair::leave(fd, true);
        }
        if self.snapshot > 0 {
            crate::interpose::raw::end_snapshot(std::mem::take(&mut self.snapshot));
        }
    }
}

/// The content of files that exist nowhere else — memfds and files deleted while open (read
/// without moving the app's offset) — and what FIFOs hold unread (but those another's image
/// holds, `theirs`), by inode.
fn file_contents(table: &ProcessTable, theirs: &[u64]) -> Vec<(u64, Bytes)> {
    use migrt::table::Object;
    use std::os::unix::fs::FileExt;
    let mut out: Vec<(u64, Bytes)> = Vec::new();
    for f in &table.fds {
        // A FIFO's content is what it holds unread.
        if let Object::Fifo { ino, .. } = f.object {
            if !out.iter().any(|(i, _)| *i == ino) && !theirs.contains(&ino) {
                out.push((ino, Bytes(unread_bytes(f.fd))));
            }
            continue;
        }
        if !matches!(
            f.object,
            Object::MemFd { .. } | Object::File { deleted: true, .. }
        ) {
            continue;
        }
        let Ok(st) = migrt::sys::fstat(f.fd) else {
            continue;
        };
        if out.iter().any(|(ino, _)| *ino == st.st_ino) {
            continue;
        }
        let Ok(file) = std::fs::File::open(format!("/proc/self/fd/{}", f.fd)) else {
            continue;
        };
        let mut data = vec![0u8; st.st_size.max(0) as usize];
        let mut at = 0;
        while at < data.len() {
            match file.read_at(&mut data[at..], at as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => at += n,
            }
        }
        data.truncate(at);
        out.push((st.st_ino, Bytes(data)));
    }
    out
}

/// The POSIX shared memory objects this process holds open or maps (image::HostFile),
/// and their content by inode, but of those in `theirs` (another image holds it). (Not
/// the session table, mapped at `own_table`.)
fn host_memory_files(
    table: &ProcessTable,
    (maps, own_table): (&[migrt::procfs::MapsLine], u64),
    theirs: &[u64],
) -> (Vec<migrt::image::HostFile>, Vec<(u64, Bytes)>) {
    use migrt::table::Object;
    use std::os::unix::fs::MetadataExt;
    let held = table.fds.iter().filter_map(|f| match &f.object {
        Object::File {
            path,
            deleted: false,
            ..
        } => Some(path.0.clone()),
        _ => None,
    });
    let mapped = maps
        .iter()
        .filter(|m| m.start != own_table)
        .map(|m| m.name.0.clone());
    let (mut files, mut contents) = (Vec::new(), Vec::new());
    for path in held.chain(mapped) {
        if !migrt::image::host_memory_file(&path) {
            continue;
        }
        let name = std::ffi::OsStr::from_bytes(&path);
        let Ok(md) = std::fs::metadata(name) else {
            continue;
        };
        if files
            .iter()
            .any(|f: &migrt::image::HostFile| f.ino == md.ino())
        {
            continue;
        }
        if !theirs.contains(&md.ino()) {
            let Ok(data) = std::fs::read(name) else {
                continue;
            };
            contents.push((md.ino(), Bytes(data)));
        }
        files.push(migrt::image::HostFile {
            ino: md.ino(),
            path: Bytes(path),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
        });
    }
    (files, contents)
}

/// prctl_mm_map's first eleven fields, from /proc/self/stat (brk: the end of [heap] in
/// `maps`).
fn mm_layout(maps: &[migrt::procfs::MapsLine]) -> Vec<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    // Field n of stat(5) is f[n - 3].
    let field = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let brk = maps
        .iter()
        .find(|m| m.name.0 == b"[heap]")
        .map_or(field(47), |m| m.end);
    vec![
        field(26),
        field(27),
        field(45),
        field(46),
        field(47),
        brk,
        field(28),
        field(48),
        field(49),
        field(50),
        field(51),
    ]
}

/// A PageMap encoded from borrowed parts (same encoding as `image::PageMap`).
#[derive(serde::Serialize)]
struct PageMapRef<'a> {
    start: u64,
    count: u64,
    present: &'a [u64],
}

/// Working memory of the page loop: its own shared anonymous mapping (never merged with
/// the app's memory), made before the loop.
struct Scratch {
    data: &'static mut [u8],
    entries: &'static mut [u8],
    present: &'static mut [u64],
    enc: &'static mut [u8],
    /// mincore's answer for a chunk of shared memory (a byte per page).
    resident: &'static mut [u8],
    /// The text of /proc/self/maps (room for MAPS_TEXT bytes; pages are touched as used).
    maps: &'static mut [u8],
    /// (Last: unmapped after the slices into it are gone.)
    mem: crate::interpose::Anonymous,
}

/// Room for the text of /proc/self/maps.
const MAPS_TEXT: usize = 16 << 20;

impl Scratch {
    fn new() -> std::io::Result<Scratch> {
        let data = CHUNK as usize * PAGE;
        let entries = CHUNK as usize * 8;
        let present = CHUNK as usize / 8;
        let enc = PAGE;
        let resident = CHUNK as usize;
        let before_maps = data + entries + present + enc + resident;
        // Whole pages, so that the mapping /proc shows is exactly this range.
        let len = (before_maps + MAPS_TEXT).div_ceil(PAGE) * PAGE;
        let mem = crate::interpose::Anonymous::new(len)?;
        let p = mem.as_mut_ptr();
        // SAFETY: a fresh mapping of `len` bytes, carved into disjoint slices, which live
        // no longer than it (fields drop in order: `mem` last).
        unsafe {
            Ok(Scratch {
                data: std::slice::from_raw_parts_mut(p, data),
                entries: std::slice::from_raw_parts_mut(p.add(data), entries),
                present: std::slice::from_raw_parts_mut(
                    p.add(data + entries).cast::<u64>(),
                    present / 8,
                ),
                enc: std::slice::from_raw_parts_mut(p.add(data + entries + present), enc),
                resident: std::slice::from_raw_parts_mut(
                    p.add(data + entries + present + enc),
                    resident,
                ),
                maps: std::slice::from_raw_parts_mut(p.add(before_maps), MAPS_TEXT),
                mem,
            })
        }
    }

    fn range(&self) -> (u64, u64) {
        self.mem.range()
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}
