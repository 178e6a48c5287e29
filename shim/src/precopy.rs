//! Pre-copy rounds (`mig migrate --mode precopy`): while the app runs on, its private
//! memory is written ahead — all of it in the first round, then only what the app wrote
//! since the round before (migrt::dirty tracks the writes) — so that the image written
//! once the app is frozen holds just the pages written after the last round (dump.rs).

use crate::interpose::real_pid;
use migrt::dirty::{NOT_OWN, Tracker};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering::Relaxed};

struct State {
    /// The process that made the tracker (a forked child has a copy that is not its own).
    owner: i32,
    tracker: Tracker,
    /// Tracked ranges a round could not read whole: the final image stores them whole.
    tainted: Vec<(u64, u64)>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
/// The tracker's fds, for `is_own_fd` and a forked child (which must not use a lock).
static FDS: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

fn state() -> std::sync::MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn is_own_fd(fd: i32) -> bool {
    fd >= 0 && FDS.iter().any(|f| f.load(Relaxed) == fd)
}

/// In a forked child: the tracker's fds act on the parent's memory; closed here, and the
/// state (the parent's) is forgotten at its next use.
pub fn after_fork_child() {
    for f in &FDS {
        // (Read first: a write costs the child a copy-on-write fault when there is none.)
        if f.load(Relaxed) >= 0 {
            crate::interpose::close_real(f.swap(-1, Relaxed));
        }
    }
}

/// Tracking ends (the migration is over, or failed).
pub fn end() {
    let old = state().take();
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
    let tracker = Tracker::start(ranges)?;
    for (f, fd) in FDS.iter().zip(tracker.raw_fds()) {
        f.store(fd, Relaxed);
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
/// may hold the page's old data), and whether it is the first. Mig reads them.
pub fn round() -> std::io::Result<(Vec<(u64, u64)>, bool)> {
    let mut st = state();
    let first = start(&mut st, &private_ranges())?;
    let s = st.as_mut().expect("set above");
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
    Ok((runs, first))
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

/// What the final image needs of the rounds: the ranges still tracked as a whole (their
/// unwritten pages are kept from the rounds), checked while the app is frozen.
pub struct Delta<'a> {
    pub tracker: &'a Tracker,
    pub tracked: Vec<(u64, u64)>,
}

/// Runs `f` (the frozen process's dump) with the rounds' delta, if this process made
/// rounds. Meanwhile the state is out of its place, unlocked: the image must show no lock
/// held and no tracking (the restored process has neither).
pub fn with_delta<T>(f: impl FnOnce(Option<&Delta>) -> T) -> T {
    let taken = state().take();
    let fds = FDS.each_ref().map(|f| f.swap(-1, Relaxed));
    let r = match taken.as_ref().filter(|s| s.owner == real_pid()) {
        Some(s) => {
            let tracked = s
                .tracker
                .ranges()
                .iter()
                .copied()
                .filter(|r| !s.tainted.contains(r))
                .collect();
            f(Some(&Delta {
                tracker: &s.tracker,
                tracked,
            }))
        }
        None => f(None),
    };
    for (f, fd) in FDS.iter().zip(fds) {
        f.store(fd, Relaxed);
    }
    *state() = taken;
    r
}
