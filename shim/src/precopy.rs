//! Pre-copy rounds (`mig migrate --mode precopy`): while the app runs on, its private
//! memory is sent ahead — all of it in the first round, then only what the app wrote
//! since the round before (migrt::dirty tracks the writes) — so that the image written
//! once the app is frozen holds just the pages written after the last round (dump.rs).
//! This process says which runs of its memory a round holds; mig reads and sends them.
//! Where the kernel tracks no writes, mig finds what changed by comparing page hashes
//! (migrt::rounds), and tells the dump.

use crate::interpose::real_pid;
use migrt::dirty::{NOT_OWN, PageRegion, Tracker};
use migrt::image::PAGE;
use migrt::rounds::Compared;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicI32, Ordering::Relaxed};

struct State {
    /// The process that made the tracker (a forked child has a copy that is not its own).
    owner: i32,
    tracker: Tracker,
    /// Tracked ranges a round could not read whole: the final image stores them whole.
    tainted: Vec<(u64, u64)>,
}

/// (parking_lot's: a forked child can let go of the lock the parent's control thread may
/// have held at the fork, in the middle of a round.)
static STATE: Mutex<Option<State>> = Mutex::new(None);
/// The tracker's fds, for `is_own_fd` and a forked child (which must not use a lock).
static FDS: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

fn state() -> parking_lot::MutexGuard<'static, Option<State>> {
    STATE.lock()
}

pub fn is_own_fd(fd: i32) -> bool {
    fd >= 0 && FDS.iter().any(|f| f.load(Relaxed) == fd)
}

/// In a forked child: the tracker's fds act on the parent's memory; closed here, and the
/// state (the parent's) is forgotten at its next use.
pub fn after_fork_child() {
    if STATE.is_locked() {
        // SAFETY: a fork child has one thread, and it holds no guard: the holder was a
        // thread of the parent, which is not in this process.
        unsafe { STATE.force_unlock() };
    }
    for f in &FDS {
        // (Read first: a write costs the child a copy-on-write fault when there is none.)
        if f.load(Relaxed) >= 0 {
            crate::interpose::close_real(f.swap(-1, Relaxed));
        }
    }
}

/// Tracking ends (the migration is over, or failed). Under the journal, which a fork
/// holds: a child forked between forgetting the fds and closing them would keep copies.
pub fn end() {
    let old = state().take();
    let _no_fork = crate::state::shim().map(crate::state::journal);
    for f in &FDS {
        f.store(-1, Relaxed);
    }
    match old {
        Some(s) if s.owner != real_pid() => std::mem::forget(s),
        other => drop(other),
    }
}

/// The private memory a round covers: what an image stores of it (dump::stored), less
/// shared mappings (their pages are the object's, stored whole by the final image) and
/// code (nothing writes it; tracking a file's would make its unwritten pages look like the
/// process's own, sent for nothing). (What is not tracked is stored whole by the final
/// image.)
fn private_ranges() -> Vec<(u64, u64)> {
    migrt::procfs::all_mappings("self")
        .iter()
        .filter(|m| m.perms.as_bytes().get(3) == Some(&b'p') && crate::dump::stored(m, &[]))
        .filter(|m| m.perms.as_bytes().get(2) != Some(&b'x'))
        .map(|m| (m.start, m.end))
        .collect()
}

/// Starts tracking `ranges` (if this process does not yet); whether it just started.
fn start(st: &mut Option<State>, ranges: &[(u64, u64)]) -> std::io::Result<bool> {
    if st.as_ref().is_some_and(|s| s.owner != real_pid()) {
        std::mem::forget(st.take());
    }
    if st.is_some() {
        return Ok(false);
    }
    // A fork holds the journal: the tracker's fds are made and noted under it, so that a
    // fork child always knows them and closes its copies (kept, they would be fds of the
    // app's in the child, and refuse its next checkpoint).
    let no_fork = crate::state::shim().map(crate::state::journal);
    let made = Tracker::new();
    if let Ok(t) = &made {
        for (f, fd) in FDS.iter().zip(t.raw_fds()) {
            f.store(fd, Relaxed);
        }
    }
    drop(no_fork);
    let mut tracker = made?;
    if let Err(e) = tracker.track(ranges) {
        for f in &FDS {
            f.store(-1, Relaxed);
        }
        return Err(e);
    }
    *st = Some(State {
        owner: real_pid(),
        tracker,
        tainted: Vec::new(),
    });
    Ok(true)
}

/// A round: the runs of memory to send (first everything the app has of its own — no
/// file page, no shared zero page; then what it wrote since, zeros too: an older round
/// may hold the page's old data), whether it is the first, and whether by hash: without
/// write tracking (asked for, or the kernel has none) the runs are all of its private
/// memory, and mig sends what changed by content (migrt::rounds). Mig reads them.
pub fn round(by_hash: bool) -> std::io::Result<Round> {
    let mut st = state();
    let ranges = private_ranges();
    let first = match by_hash {
        true => None,
        false => start(&mut st, &ranges).ok(),
    };
    let (Some(first), Some(s)) = (first, st.as_mut()) else {
        return Ok(Round {
            runs: ranges,
            first: false,
            by_hash: true,
        });
    };
    let mut runs = Vec::new();
    for &(start, end) in s.tracker.ranges() {
        if first {
            let existing = s.tracker.existing(start, end)?;
            runs.extend(
                existing
                    .into_iter()
                    .filter(|r| r.categories & NOT_OWN == 0)
                    .map(|r| (r.start, r.end)),
            );
        } else {
            runs.extend(
                s.tracker
                    .take_written(start, end)?
                    .iter()
                    .map(|r| (r.start, r.end)),
            );
        }
    }
    Ok(Round {
        runs,
        first,
        by_hash: false,
    })
}

/// A round's runs of memory, whether it is the first, whether by hash.
pub struct Round {
    pub runs: Vec<(u64, u64)>,
    pub first: bool,
    pub by_hash: bool,
}

/// Runs mig could not read whole (the app unmapped them meanwhile): the tracked ranges
/// holding them are stored whole by the final image.
pub fn unread(runs: &[(u64, u64)]) {
    if let Some(s) = state().as_mut().filter(|s| s.owner == real_pid()) {
        for &(a, b) in runs {
            let hit = s
                .tracker
                .ranges()
                .iter()
                .find(|r| r.0 < b && a < r.1)
                .copied();
            if let Some(r) = hit.filter(|r| !s.tainted.contains(r)) {
                s.tainted.push(r);
            }
        }
    }
}

/// Address ranges (start, end).
type Ranges = Vec<(u64, u64)>;

/// The shared memory this process's image stores — its shared anonymous mappings but those
/// in `skip` (another's image holds them) — and the runs of their pages that exist, as
/// mincore says: the object's pages, whoever wrote them (this process's page tables know
/// only its own). A mapping that goes away meanwhile is left out.
pub fn shared_memory(skip: &[(u64, u64)]) -> (Ranges, Ranges) {
    let table = crate::state::shim().map(|s| {
        let (at, len) = s.table.mapping();
        (at as u64, (at + len) as u64)
    });
    let candidates = migrt::procfs::all_mappings("self")
        .into_iter()
        .filter(|m| migrt::image::shared_anonymous(&m.perms, &m.name.0))
        .filter(|m| crate::dump::stored(m, &[]) && Some((m.start, m.end)) != table)
        .filter(|m| !skip.iter().any(|&(s, e)| m.start >= s && m.end <= e));
    let (mut mappings, mut resident) = (Vec::new(), Vec::new());
    let mut held = vec![0u8; 1 << 16];
    for m in candidates {
        let before = resident.len();
        let mut at = m.start;
        while at < m.end {
            let pages = ((m.end - at) as usize / PAGE).min(held.len());
            // SAFETY: mincore writes one byte per page of the range into `held`, which has
            // room for `pages`; an address no longer mapped is an error, not a fault.
            let ok = unsafe {
                libc::mincore(at as *mut libc::c_void, pages * PAGE, held.as_mut_ptr()) == 0
            };
            if !ok {
                break;
            }
            for (i, _) in held[..pages]
                .iter()
                .enumerate()
                .filter(|(_, b)| *b & 1 == 1)
            {
                let a = at + (i * PAGE) as u64;
                match resident.last_mut() {
                    Some((_, e)) if *e == a => *e = a + PAGE as u64,
                    _ => resident.push((a, a + PAGE as u64)),
                }
            }
            at += (pages * PAGE) as u64;
        }
        if at < m.end {
            resident.truncate(before);
        } else {
            mappings.push((m.start, m.end));
        }
    }
    (mappings, resident)
}

/// What the final image needs of the rounds: which of its memory they cover as a whole,
/// and of that, which pages changed since the last round — its private memory as this
/// process's write tracking says, checked while the app is frozen, or as mig found by
/// hash; its shared memory as mig found by hash.
pub struct Delta<'a> {
    private: Private<'a>,
    shared: Option<&'a Compared>,
}

enum Private<'a> {
    Tracked {
        tracker: &'a Tracker,
        tracked: Vec<(u64, u64)>,
    },
    Compared(&'a Compared),
    Not,
}

impl Delta<'_> {
    /// Whether the mapping `start..end` (shared memory or not) lies in what the rounds
    /// cover as a whole.
    pub fn covers(&self, (start, end): (u64, u64), shared: bool) -> bool {
        match (shared, &self.private) {
            (true, _) => self.shared.is_some_and(|c| c.covers(start, end)),
            (false, Private::Tracked { tracked, .. }) => {
                tracked.iter().any(|&(s, e)| start >= s && end <= e)
            }
            (false, Private::Compared(c)) => c.covers(start, end),
            (false, Private::Not) => false,
        }
    }

    /// The pages of `range` that exist, those changed since the last round marked written
    /// (dirty::Tracker::existing_into: nothing allocated; Ok(false) if `out` had no room).
    pub fn existing_into(
        &self,
        range: (u64, u64),
        (file_backed, shared): (bool, bool),
        out: &mut Vec<PageRegion>,
    ) -> std::io::Result<bool> {
        match (shared.then_some(self.shared).flatten(), &self.private) {
            (Some(c), _) | (None, &Private::Compared(c)) => Ok(c.existing_into(range, out)),
            (None, Private::Tracked { tracker, .. }) => {
                tracker.existing_into(range, file_backed, out)
            }
            (None, Private::Not) => Ok(false),
        }
    }
}

/// Runs `f` (the frozen process's dump) with the rounds' delta, if this process made
/// rounds: `compared` where they were made by hash, `shared` what they sent of its shared
/// memory. Meanwhile the state is out of its place, unlocked: the image must show no lock
/// held and no tracking (the restored process has neither).
pub fn with_delta<T>(
    (compared, shared): (Option<&Compared>, Option<&Compared>),
    f: impl FnOnce(Option<&Delta>) -> T,
) -> T {
    let taken = state().take();
    let fds = FDS.each_ref().map(|f| f.swap(-1, Relaxed));
    let private = match (compared, taken.as_ref().filter(|s| s.owner == real_pid())) {
        (Some(c), _) => Private::Compared(c),
        (None, Some(s)) => Private::Tracked {
            tracker: &s.tracker,
            tracked: (s.tracker.ranges().iter().copied())
                .filter(|r| !s.tainted.contains(r))
                .collect(),
        },
        (None, None) => Private::Not,
    };
    let r = match (&private, shared) {
        (Private::Not, None) => f(None),
        _ => f(Some(&Delta { private, shared })),
    };
    for (f, fd) in FDS.iter().zip(fds) {
        f.store(fd, Relaxed);
    }
    *state() = taken;
    r
}
