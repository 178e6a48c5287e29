//! The session's shared process table.
//!
//! One file per session (`sessions/<name>/procs`), mapped `MAP_SHARED` by every shim process
//! of the session and read by `mig`. It answers "which real pid is virtual pid V now" and
//! "which virtual pid is real pid R" for every process and thread of the session, without a
//! round trip to anybody. Reads are lock-free (atomics); changes (a process or thread joins
//! or leaves) take a robust, process-shared mutex that lives in the file itself, so a member
//! killed while holding it does not wedge the session.
//!
//! Virtual ids (pids, tids, pgids, sids share one space, as in the kernel) are
//! `VPID_BASE + slot index`. `VPID_BASE` lies above the kernel's `PID_MAX_LIMIT` (4,194,304),
//! so a virtual pid can never be mistaken for a real pid of any Linux host: a pid that is not
//! a virtual one names a process outside the session and is passed through unchanged.
//!
//! The file is sparse: only touched pages take memory.

use crate::{Error, Result};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::*};

/// First virtual id minus one; above the kernel's PID_MAX_LIMIT (1 << 22).
pub const VPID_BASE: i32 = 4_200_000;
/// Processes and threads one session can have at once (ended ones' slots are taken
/// again: see `reusable`).
pub const MAX_SLOTS: usize = 1 << 18;
/// Slots handed out before any is taken again. A freed id is given again only once the
/// search for free slots has gone round to it (as the kernel cycles through its pids), so
/// that an id kept after its thread or process ended names nobody rather than a newcomer,
/// for a while.
const REUSE_FROM: usize = 1024;
/// Slots one allocation looks at for a free one before it takes a new slot instead.
const REUSE_PROBES: usize = 64;
/// Kernel objects (sockets, pipes) that can hold a session-unique id.
pub const MAX_OBJECTS: usize = 1 << 16;

const MAGIC: u64 = u64::from_le_bytes(*b"MIGSESS\0");
const VERSION: u32 = 3;
const HEADER_SIZE: usize = 4096;
const SLOTS_OFF: usize = HEADER_SIZE;
const OBJECTS_OFF: usize = SLOTS_OFF + MAX_SLOTS * std::mem::size_of::<Slot>();
/// Size of the table file.
/// The pages written at creation, at the start of the table and of its objects.
const EARLY_PAGES: usize = 16;
pub const FILE_SIZE: usize = OBJECTS_OFF + MAX_OBJECTS * std::mem::size_of::<ObjectEntry>();

/// The table file for `path`, created where its pages live in memory: at `path` itself on
/// a tmpfs, else in /dev/shm with `path` a symlink to it. On a disk file system a write
/// through the shared mapping can wait for the file system's journal (seen on ext4: 2-15
/// ms for one page, at random, and in the middle of a freeze when an object got its id).
fn create_in_memory(path: &Path) -> Result<std::fs::File> {
    let new = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
            .map_err(|e| Error::io("creating session table", p, e))
    };
    let shm = Path::new("/dev/shm");
    let parent = path.parent().unwrap_or(Path::new("."));
    if crate::sys::on_tmpfs(parent) || !crate::sys::on_tmpfs(shm) {
        return new(path);
    }
    // A name no one can have taken (created exclusively: an existing file or link fails).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let file = shm.join(format!(
        "migshim-{}-{}-{nanos}",
        crate::sys::getuid(),
        std::process::id()
    ));
    // (Where /dev/shm cannot take it, the table goes beside the session after all.)
    let Ok(f) = new(&file) else {
        return new(path);
    };
    if let Err(e) = std::os::unix::fs::symlink(&file, path) {
        let _ = std::fs::remove_file(&file);
        return Err(Error::io("creating session table", path, e));
    }
    Ok(f)
}

#[repr(C)]
struct Header {
    magic: u64,
    version: u32,
    _pad: u32,
    lock: libc::pthread_mutex_t,
    /// The slots handed out so far end here (ended ones are taken again); slot 0 is never
    /// used.
    used: AtomicU32,
    /// The real-time signal reserved for the shim in this session.
    signal: AtomicU32,
    next_object: AtomicU64,
    /// Slots handed out (new or again) so far: each slot's `born`.
    born: AtomicU64,
    /// Where the search for a slot to take again goes on (an index less one).
    cursor: AtomicU32,
}

#[repr(C)]
struct Slot {
    state: AtomicU32,
    kind: AtomicU32,
    real: AtomicI32,
    /// Process: the parent's vpid (0 when the parent is outside the session).
    /// Thread: the vpid of the process it belongs to.
    parent: AtomicI32,
    /// Wait status once reaped.
    status: AtomicI32,
    /// Threads of this process that belong to the shim (its control thread), not the app.
    hidden: AtomicU32,
    /// When it was handed out (the header's count then): of the slots that had a real
    /// id, the newest is the one with the highest.
    born: AtomicU64,
}

#[repr(C)]
struct ObjectEntry {
    key: AtomicU64,
    id: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum State {
    Free = 0,
    Running = 1,
    /// Exited, not (yet) reaped by a parent inside the session.
    Exited = 2,
    /// Reaped by its parent; `status` holds the wait status.
    Reaped = 3,
}

impl State {
    fn from_u32(v: u32) -> State {
        match v {
            1 => State::Running,
            2 => State::Exited,
            3 => State::Reaped,
            _ => State::Free,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    Process = 1,
    Thread = 2,
}

/// A copy of one slot.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub vid: i32,
    pub state: State,
    pub kind: Kind,
    pub real: i32,
    pub parent: i32,
    pub status: i32,
    pub hidden: u32,
}

/// The real pid of a restored slot whose process is not here (above any pid Linux gives:
/// signalling or waiting for it finds no process).
pub const NO_PROCESS: i32 = i32::MAX;

/// Kinds of kernel objects that get a session-unique id.
#[derive(Clone, Copy, Debug)]
pub enum ObjectKind {
    Socket = 1,
    Pipe = 2,
}

pub fn is_virtual(id: i32) -> bool {
    id > VPID_BASE && ((id - VPID_BASE) as usize) < MAX_SLOTS
}

pub struct SessionTable {
    base: *mut u8,
    /// The uid owning the table file: the session's owner.
    owner: std::sync::atomic::AtomicU32,
}

// SAFETY: the mapping is shared memory accessed only through atomics and the process-shared
// mutex; the pointer itself never changes after mapping.
unsafe impl Send for SessionTable {}
// SAFETY: as above.
unsafe impl Sync for SessionTable {}

impl SessionTable {
    /// Creates a fresh table file (fails if it exists). `signal` is the real-time signal
    /// the session's shims reserve (to wake their control thread, later to freeze).
    pub fn create(path: &Path, signal: u32) -> Result<SessionTable> {
        let f = create_in_memory(path)?;
        f.set_len(FILE_SIZE as u64)
            .map_err(|e| Error::io("sizing session table", path, e))?;
        // The pages a session uses first are written now (zeros): on a disk file system
        // the first write through the mapping into a hole costs milliseconds (the file
        // system finds room for the page then), into a written page almost nothing.
        let zeros = vec![0u8; EARLY_PAGES * 4096];
        for at in [0, OBJECTS_OFF] {
            std::os::unix::fs::FileExt::write_all_at(&f, &zeros, at as u64)
                .map_err(|e| Error::io("writing session table", path, e))?;
        }
        let t = Self::map(&f, path)?;
        let h = t.header_mut_ptr();
        // SAFETY: the file is new and only this process maps it; the header region is
        // zeroed, properly aligned (page start) and large enough for Header.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            libc::pthread_mutexattr_init(&mut attr);
            libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            libc::pthread_mutex_init(&raw mut (*h).lock, &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
            (*h).version = VERSION;
            (*h).used.store(1, Release);
            (*h).signal.store(signal, Release);
            (*h).next_object.store(1, Release);
            std::ptr::write_volatile(&raw mut (*h).magic, MAGIC);
        }
        Ok(t)
    }

    /// Removes the table file at `path` (and, when `path` links to it, the file in memory).
    pub fn remove(path: &Path) {
        if let Ok(target) = std::fs::read_link(path) {
            let _ = std::fs::remove_file(target);
        }
        let _ = std::fs::remove_file(path);
    }

    /// Maps an existing table.
    pub fn open(path: &Path) -> Result<SessionTable> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("opening session table", path, e))?;
        Self::open_file(&f, path)
    }

    /// Maps the table open as `f` (named `path` in errors).
    pub fn open_file(f: &std::fs::File, path: &Path) -> Result<SessionTable> {
        use std::os::unix::fs::MetadataExt;
        let md = f
            .metadata()
            .map_err(|e| Error::io("reading session table", path, e))?;
        let len = md.len();
        if len != FILE_SIZE as u64 {
            return Err(Error::BadSessionTable {
                path: path.into(),
                version: 0,
            });
        }
        let t = Self::map(f, path)?;
        t.owner.store(md.uid(), Release);
        let h = t.header();
        if h.magic != MAGIC || h.version != VERSION {
            return Err(Error::BadSessionTable {
                path: path.into(),
                version: h.version,
            });
        }
        Ok(t)
    }

    fn map(f: &std::fs::File, path: &Path) -> Result<SessionTable> {
        // SAFETY: mapping a file we hold open, shared, at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io(
                "mapping session table",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(SessionTable {
            base: p.cast(),
            owner: Default::default(),
        })
    }

    /// The session's reserved real-time signal.
    pub fn signal(&self) -> i32 {
        self.header().signal.load(Acquire) as i32
    }

    /// The mapped range, so a checkpoint can leave it out.
    pub fn mapping(&self) -> (usize, usize) {
        (self.base as usize, FILE_SIZE)
    }

    #[inline]
    fn header_mut_ptr(&self) -> *mut Header {
        self.base.cast()
    }

    #[inline]
    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a Header and lives as long as self.
        unsafe { &*self.header_mut_ptr() }
    }

    #[inline]
    fn slot(&self, index: usize) -> &Slot {
        debug_assert!(index < MAX_SLOTS);
        // SAFETY: index is within the slot array of the mapping.
        unsafe { &*self.base.add(SLOTS_OFF).cast::<Slot>().add(index) }
    }

    fn object(&self, index: usize) -> &ObjectEntry {
        // SAFETY: index < MAX_OBJECTS (callers take it modulo), inside the mapping.
        unsafe {
            &*self
                .base
                .add(OBJECTS_OFF)
                .cast::<ObjectEntry>()
                .add(index % MAX_OBJECTS)
        }
    }

    #[inline]
    fn used(&self) -> usize {
        (self.header().used.load(Acquire) as usize).min(MAX_SLOTS)
    }

    fn with_lock<T>(&self, f: impl FnOnce() -> T) -> T {
        // SAFETY: the header lives in the mapping for as long as self; the mutex in it was
        // initialised by create(), robust and process-shared.
        let m = unsafe { &raw mut (*self.header_mut_ptr()).lock };
        // SAFETY: as above.
        let r = unsafe { libc::pthread_mutex_lock(m) };
        if r == libc::EOWNERDEAD {
            // A member died holding the lock. Every change under it is a sequence of
            // atomic stores that leaves the table readable, so it is consistent as is.
            // SAFETY: we own the lock now.
            unsafe { libc::pthread_mutex_consistent(m) };
        }
        let out = f();
        // SAFETY: we hold the lock.
        unsafe { libc::pthread_mutex_unlock(m) };
        out
    }

    #[inline]
    fn entry(&self, index: usize) -> Entry {
        let s = self.slot(index);
        Entry {
            vid: VPID_BASE + index as i32,
            state: State::from_u32(s.state.load(Acquire)),
            kind: if s.kind.load(Relaxed) == Kind::Thread as u32 {
                Kind::Thread
            } else {
                Kind::Process
            },
            real: s.real.load(Relaxed),
            parent: s.parent.load(Relaxed),
            status: s.status.load(Relaxed),
            hidden: s.hidden.load(Relaxed),
        }
    }

    /// The newest slot of `kind` whose process or thread has real id `real` and is running
    /// (or, with `exited`, has exited but not been reaped).
    fn find(&self, real: i32, kind: Kind, exited: bool) -> Option<usize> {
        self.newest(|s| {
            let st = s.state.load(Acquire);
            (st == State::Running as u32 || (exited && st == State::Exited as u32))
                && s.real.load(Relaxed) == real
                && s.kind.load(Relaxed) == kind as u32
        })
    }

    /// The slot handed out last of those `pick` takes.
    fn newest(&self, pick: impl Fn(&Slot) -> bool) -> Option<usize> {
        (1..self.used())
            .filter(|&i| pick(self.slot(i)))
            .max_by_key(|&i| self.slot(i).born.load(Acquire))
    }

    /// The virtual id of the calling process or thread (real id `real`, alive), registering
    /// it if it is new. A running slot with the same real id but another parent is a
    /// leftover of a dead process whose pid the kernel reused: it is retired.
    pub fn register(&self, real: i32, kind: Kind, parent: i32) -> Result<i32> {
        self.register_as(real, kind, parent, false)
    }

    /// The virtual id of a child the caller just forked or spawned. Parent and child both
    /// register and land on one slot, whichever comes first; the child may already have
    /// exited (not yet reaped, so its pid is still its own).
    pub fn register_child(&self, real: i32, parent: i32) -> Result<i32> {
        self.register_as(real, Kind::Process, parent, true)
    }

    fn register_as(&self, real: i32, kind: Kind, parent: i32, exited: bool) -> Result<i32> {
        self.with_lock(|| {
            if let Some(i) = self.find(real, kind, exited) {
                let s = self.slot(i);
                let p = s.parent.load(Relaxed);
                if kind == Kind::Thread || parent == 0 || p == parent {
                    return Ok(VPID_BASE + i as i32);
                }
                s.state.store(State::Exited as u32, Release);
            }
            self.allocate(real, kind, parent)
        })
    }

    /// Takes a slot (under the lock): one to take again, else the next new one.
    fn allocate(&self, real: i32, kind: Kind, parent: i32) -> Result<i32> {
        let used = self.header().used.load(Acquire) as usize;
        let i = match self.reusable(used) {
            Some(i) => i,
            None if used >= MAX_SLOTS => return Err(Error::TableFull(used)),
            None => used,
        };
        let s = self.slot(i);
        s.kind.store(kind as u32, Relaxed);
        s.real.store(real, Relaxed);
        s.parent.store(parent, Relaxed);
        s.status.store(0, Relaxed);
        s.hidden.store(0, Relaxed);
        self.stamp(s);
        s.state.store(State::Running as u32, Release);
        if i == used {
            self.header().used.store(i as u32 + 1, Release);
        }
        Ok(VPID_BASE + i as i32)
    }

    fn stamp(&self, s: &Slot) {
        s.born
            .store(self.header().born.fetch_add(1, AcqRel) + 1, Release);
    }

    /// A slot whose id can be given again (under the lock), once `used` slots are
    /// REUSE_FROM or more: among the next REUSE_PROBES from where the last search ended.
    /// Without this a server starting a thread or a process per request filled the table
    /// (and every lookup, which goes through it, got slower with each request).
    fn reusable(&self, used: usize) -> Option<usize> {
        if used < REUSE_FROM {
            return None;
        }
        let cursor = &self.header().cursor;
        let start = cursor.load(Relaxed) as usize;
        let found = (0..REUSE_PROBES)
            .map(|n| (start + n) % (used - 1))
            .find(|&at| self.ended_for_good(at + 1));
        let next = found.map_or(start + REUSE_PROBES, |at| at + 1) % (used - 1);
        cursor.store(next as u32, Relaxed);
        found.map(|at| at + 1)
    }

    /// Whether nothing names slot `i` any more: free, or a thread that ended (or whose
    /// process was waited for: one killed outright never says its threads ended), or a
    /// process that was waited for, whose id no process group still has (kernel: its pid is
    /// not given again then either) and no process of the session has as its parent (a
    /// restore would make it theirs). A session whose leader is gone is not seen, if no
    /// group has its id.
    fn ended_for_good(&self, i: usize) -> bool {
        let s = self.slot(i);
        let thread = s.kind.load(Relaxed) == Kind::Thread as u32;
        match State::from_u32(s.state.load(Acquire)) {
            State::Free => true,
            State::Reaped if thread => true,
            State::Running | State::Exited if thread => self.reaped_process(s.parent.load(Relaxed)),
            State::Reaped => {
                let (real, vid) = (s.real.load(Relaxed), VPID_BASE + i as i32);
                !crate::sys::group_exists(real)
                    && !(1..self.used()).any(|j| {
                        let c = self.slot(j);
                        c.parent.load(Relaxed) == vid
                            && c.kind.load(Relaxed) == Kind::Process as u32
                            && matches!(
                                State::from_u32(c.state.load(Acquire)),
                                State::Running | State::Exited
                            )
                    })
            }
            State::Running | State::Exited => false,
        }
    }

    /// Whether `vid` is a process that was waited for (so none of its threads runs).
    fn reaped_process(&self, vid: i32) -> bool {
        let i = (vid - VPID_BASE) as usize;
        is_virtual(vid) && i < self.used() && {
            let p = self.slot(i);
            p.kind.load(Relaxed) == Kind::Process as u32
                && State::from_u32(p.state.load(Acquire)) == State::Reaped
        }
    }

    /// A vpid for a process about to be forked by `parent`: taken before the fork, so that
    /// neither side has to search or lock afterwards; each side then `bind`s the real pid.
    pub fn reserve(&self, parent: i32) -> Result<i32> {
        self.with_lock(|| self.allocate(0, Kind::Process, parent))
    }

    /// Takes slot `vid` for a process being restored (its real pid comes with `bind`).
    pub fn restore_slot(&self, vid: i32, kind: Kind, parent: i32) -> Result<()> {
        self.restore_slot_as(vid, (kind, parent), (0, State::Running))
    }

    /// Takes slot `vid` for a child of `parent` that had ended, not waited for, where the
    /// session was frozen: no process here has its id, which stays taken until it is
    /// waited for (its real pid is one no process has).
    pub fn restore_ended(&self, vid: i32, parent: i32) -> Result<()> {
        self.restore_slot_as(vid, (Kind::Process, parent), (NO_PROCESS, State::Exited))
    }

    fn restore_slot_as(
        &self,
        vid: i32,
        (kind, parent): (Kind, i32),
        (real, state): (i32, State),
    ) -> Result<()> {
        if !is_virtual(vid) {
            return Err(Error::TableFull(0));
        }
        let i = (vid - VPID_BASE) as usize;
        self.with_lock(|| {
            let s = self.slot(i);
            s.kind.store(kind as u32, Relaxed);
            s.real.store(real, Relaxed);
            s.parent.store(parent, Relaxed);
            self.stamp(s);
            s.state.store(state as u32, Release);
            let used = &self.header().used;
            if (used.load(Acquire) as usize) <= i {
                used.store(i as u32 + 1, Release);
            }
        });
        Ok(())
    }

    /// Maps the table file `path` where this table was mapped (a restored process finds
    /// its new session's table at the address its memory remembers).
    pub fn remap(&self, path: &Path) -> Result<()> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("opening session table", path, e))?;
        // SAFETY: replacing our own mapping, same size, at the same address.
        let p = unsafe {
            libc::mmap(
                self.base.cast(),
                FILE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                f.as_raw_fd(),
                0,
            )
        };
        if p != self.base.cast() {
            return Err(Error::io(
                "mapping session table",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        if let Ok(md) = f.metadata() {
            use std::os::unix::fs::MetadataExt;
            self.owner.store(md.uid(), Release);
        }
        Ok(())
    }

    /// The session's owner: the uid the table file belongs to.
    pub fn owner(&self) -> u32 {
        self.owner.load(Acquire)
    }

    /// Records the real pid behind a reserved vpid (parent and child both do, same value).
    #[inline]
    pub fn bind(&self, vid: i32, real: i32) {
        // No look at the header: in a fork child every page touched costs a fault.
        if is_virtual(vid) {
            self.slot((vid - VPID_BASE) as usize)
                .real
                .store(real, Release);
        }
    }

    /// Current state of virtual id `vid`.
    #[inline]
    pub fn get(&self, vid: i32) -> Option<Entry> {
        if !is_virtual(vid) {
            return None;
        }
        let i = (vid - VPID_BASE) as usize;
        (i < self.used()).then(|| self.entry(i))
    }

    /// Real pid/tid behind `vid`, if it is one of this session's.
    pub fn real_of(&self, vid: i32) -> Option<i32> {
        self.get(vid)
            .filter(|e| e.state != State::Free)
            .map(|e| e.real)
    }

    /// Virtual id of real pid/tid `real`: a running one first, else the newest that had it
    /// (a process group whose leader has exited keeps the leader's id).
    pub fn vid_of(&self, real: i32) -> Option<i32> {
        let newest = |running: bool| {
            self.newest(|s| {
                let st = s.state.load(Acquire);
                s.real.load(Relaxed) == real
                    && if running {
                        st == State::Running as u32
                    } else {
                        st != State::Free as u32
                    }
            })
        };
        newest(true)
            .or_else(|| newest(false))
            .map(|i| VPID_BASE + i as i32)
    }

    #[inline]
    pub fn set_state(&self, vid: i32, state: State, status: i32) {
        if let Some(e) = self.get(vid) {
            let s = self.slot((e.vid - VPID_BASE) as usize);
            s.status.store(status, Relaxed);
            s.state.store(state as u32, Release);
        }
    }

    pub fn set_hidden(&self, vid: i32, hidden: u32) {
        if self.get(vid).is_some() {
            self.slot((vid - VPID_BASE) as usize)
                .hidden
                .store(hidden, Release);
        }
    }

    /// Every slot handed out so far.
    pub fn entries(&self) -> Vec<Entry> {
        (1..self.used()).map(|i| self.entry(i)).collect()
    }

    /// The session-unique id of a kernel object known on this host by `ino`, assigned on
    /// first sight. `None` when the object table is full.
    pub fn object_id(&self, kind: ObjectKind, ino: u64) -> Option<u64> {
        let key = ((kind as u64) << 56) | (ino & ((1 << 56) - 1));
        let start = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize;
        let probe = |insert: bool| {
            for n in 0..MAX_OBJECTS {
                let o = self.object(start + n);
                match o.key.load(Acquire) {
                    k if k == key => return Some(o.id.load(Acquire)),
                    0 if insert => {
                        let id = self.header().next_object.fetch_add(1, AcqRel);
                        o.id.store(id, Release);
                        o.key.store(key, Release);
                        return Some(id);
                    }
                    0 => return None,
                    _ => {}
                }
            }
            None
        };
        probe(false).or_else(|| self.with_lock(|| probe(true)))
    }
}

impl Drop for SessionTable {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no references outlive self.
        unsafe { libc::munmap(self.base.cast(), FILE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("migrt-{}-{name}", std::process::id()));
        SessionTable::remove(&p);
        p
    }

    #[test]
    fn register_converges_and_translates() {
        let p = tmp("reg");
        let t = SessionTable::create(&p, 63).unwrap();
        let root = t.register(100, Kind::Process, 0).unwrap();
        assert_eq!(root, VPID_BASE + 1);
        // parent side and child side of a fork land on one slot
        let c1 = t.register(200, Kind::Process, root).unwrap();
        let c2 = t.register(200, Kind::Process, root).unwrap();
        assert_eq!(c1, c2);
        assert_eq!(t.real_of(c1), Some(200));
        assert_eq!(t.vid_of(200), Some(c1));
        assert_eq!(t.vid_of(999), None);
        assert_eq!(t.real_of(12345), None, "real pids are not virtual ones");
        // a child that exited before its parent registered it is still that child
        let quick = t.register(300, Kind::Process, root).unwrap();
        t.set_state(quick, State::Exited, 0);
        assert_eq!(t.register_child(300, root).unwrap(), quick);
        // but a live process registering itself never takes an exited slot
        assert_ne!(t.register(300, Kind::Process, root).unwrap(), quick);
        // a reserved slot is bound by both sides of the fork
        let r = t.reserve(root).unwrap();
        assert_eq!(t.real_of(r), Some(0));
        t.bind(r, 400);
        assert_eq!(t.vid_of(400), Some(r));
        // a reused real pid under another parent is a new process
        let c3 = t.register(200, Kind::Process, c1).unwrap();
        assert_ne!(c3, c1);
        assert_eq!(t.get(c1).unwrap().state, State::Exited);
        // a second mapping sees the same table
        let t2 = SessionTable::open(&p).unwrap();
        assert_eq!(t2.vid_of(200), Some(c3));
        assert_eq!(t2.signal(), 63);
        assert_eq!(
            t.object_id(ObjectKind::Socket, 77),
            t2.object_id(ObjectKind::Socket, 77)
        );
        assert_ne!(
            t.object_id(ObjectKind::Socket, 77),
            t.object_id(ObjectKind::Pipe, 77)
        );
        // Its pages are in memory: the file itself, or the one it links to.
        let real = std::fs::canonicalize(&p).unwrap();
        assert!(
            crate::sys::on_tmpfs(real.parent().unwrap()),
            "{}",
            real.display()
        );
        SessionTable::remove(&p);
        assert!(!real.exists() && std::fs::symlink_metadata(&p).is_err());
    }

    #[test]
    fn ended_ids_are_given_again_once_the_search_comes_round_to_them() {
        let p = tmp("reuse");
        let t = SessionTable::create(&p, 63).unwrap();
        let root = t.register(100, Kind::Process, 0).unwrap();
        // A thread per request, each ending before the next: the table stays as large as
        // REUSE_FROM, and an id comes back only after about that many others.
        let mut last_use = std::collections::HashMap::new();
        for n in 0..10 * REUSE_FROM {
            let v = t.register(1000 + n as i32, Kind::Thread, root).unwrap();
            if let Some(before) = last_use.insert(v, n) {
                assert!(
                    n - before >= REUSE_FROM - 2,
                    "{v} again after {}",
                    n - before
                );
            }
            t.set_state(v, State::Reaped, 0);
        }
        assert!(t.used() <= REUSE_FROM + 1, "{} slots", t.used());
        // Of the slots that had a real id, the one handed out last answers for it, where
        // it lies in the table.
        let high = VPID_BASE + t.used() as i32 - 1;
        let again = t
            .register(t.get(high).unwrap().real, Kind::Thread, root)
            .unwrap();
        assert!(again < high);
        t.set_state(again, State::Reaped, 0);
        assert_eq!(t.vid_of(t.get(high).unwrap().real), Some(again));
        SessionTable::remove(&p);
    }

    #[test]
    fn a_process_waited_for_keeps_its_id_while_a_group_or_a_child_has_it() {
        let p = tmp("reuse-procs");
        let t = SessionTable::create(&p, 63).unwrap();
        let root = t.register(100, Kind::Process, 0).unwrap();
        // Our own process group exists; pid 4194303 (PID_MAX_LIMIT - 1) is not one here.
        let group = t
            .register(unsafe { libc::getpgrp() }, Kind::Process, root)
            .unwrap();
        let parent = t.register(4_194_303, Kind::Process, root).unwrap();
        let child = t.register(4_194_302, Kind::Process, parent).unwrap();
        let gone = t.register(4_194_301, Kind::Process, root).unwrap();
        for v in [group, parent, gone] {
            t.set_state(v, State::Reaped, 0);
        }
        let mut given = std::collections::HashSet::new();
        for n in 0..3 * REUSE_FROM {
            let v = t.reserve(root).unwrap();
            given.insert(v);
            t.bind(v, 2000 + n as i32);
            t.set_state(v, State::Reaped, 0);
        }
        assert!(given.contains(&gone));
        assert!(!given.contains(&group) && !given.contains(&parent) && !given.contains(&child));
        // Threads of a process killed outright stay "running" in the table: once the
        // process is waited for, their ids and its own are given again too.
        let killed = t.register(4_194_300, Kind::Process, root).unwrap();
        let its_thread = t.register(4_194_299, Kind::Thread, killed).unwrap();
        t.set_state(killed, State::Reaped, 0);
        let mut given = std::collections::HashSet::new();
        for n in 0..2 * REUSE_FROM {
            let v = t.reserve(root).unwrap();
            given.insert(v);
            t.bind(v, 3000 + n as i32);
            t.set_state(v, State::Reaped, 0);
        }
        assert!(given.contains(&killed) && given.contains(&its_thread));
        // Once its child is waited for too, the parent's id is free.
        t.set_state(child, State::Reaped, 0);
        let again: Vec<_> = (0..REUSE_FROM).map(|_| t.reserve(root).unwrap()).collect();
        assert!(again.contains(&parent) && again.contains(&child));
        SessionTable::remove(&p);
    }

    #[test]
    fn refuses_foreign_file() {
        let p = tmp("bad");
        std::fs::write(&p, b"hello").unwrap();
        assert!(matches!(
            SessionTable::open(&p),
            Err(Error::BadSessionTable { .. })
        ));
        std::fs::remove_file(&p).unwrap();
    }
}
