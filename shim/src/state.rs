//! The shim's process-wide state: the session it belongs to, its virtual pid, each thread's
//! virtual tid, the journal, and the guard that keeps the shim's own libc use from being
//! journaled (or re-entering a wrapper that holds a lock, e.g. from a signal handler).
//!
//! The journal sits behind a std `Mutex` rather than parking_lot's: across `fork` the child
//! must be able to unlock the copy it inherits, and std's futex mutex has no process-global
//! parking table that another parent thread could have held at the fork.

use crate::interpose::{real_pid, real_ppid, real_tid};
use migrt::journal::Journal;
use migrt::paths::{ENV_SESSION, SessionDir};
use migrt::record::{BytesRef, Record};
use migrt::sessiontable::{Kind, SessionTable, State};
use migrt::table::Folded;
use std::cell::{Cell, RefCell};
use std::ffi::{CString, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering::*};
use std::sync::{Mutex, MutexGuard, OnceLock};

pub struct Shim {
    pub table: SessionTable,
    pub journal: Mutex<Journal>,
    /// "LD_PRELOAD=<this library>", put back into the environment of an exec or spawn
    /// that dropped it, so the session follows.
    pub env_preload: CString,
    /// Where the session lives on this host: set at load, replaced when the process is
    /// restored (the old one is leaked: a reader may still use it). Not behind a lock: a
    /// fork while another thread read it (the control thread starting) would leave the
    /// child's copy of the lock held for good, and the child's next restore waiting on it.
    place: AtomicPtr<Place>,
}

#[derive(Clone)]
pub struct Place {
    pub dir: SessionDir,
    /// "MIGSHIM_SESSION=<dir>", for the environment of exec and spawn.
    pub env_session: CString,
}

impl Place {
    fn new(dir: SessionDir) -> Place {
        let mut b = format!("{ENV_SESSION}=").into_bytes();
        b.extend(dir.0.as_os_str().as_bytes());
        Place {
            dir,
            env_session: CString::new(b).unwrap_or_default(),
        }
    }
}

impl Shim {
    pub fn place(&self) -> &'static Place {
        // SAFETY: always a leaked Box (init, move_to), never freed.
        unsafe { &*self.place.load(Acquire) }
    }

    pub fn dir(&self) -> SessionDir {
        self.place().dir.clone()
    }

    /// After a restore: the session's directory on this host.
    pub fn move_to(&self, dir: SessionDir) {
        let new = Box::into_raw(Box::new(Place::new(dir)));
        self.place.store(new, Release);
    }
}

static SHIM: OnceLock<Shim> = OnceLock::new();
static VPID: AtomicI32 = AtomicI32::new(0);
/// The control socket's path, leaked, so exit can unlink it without allocating.
pub static CTL_PATH: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

thread_local! {
    static VTID: Cell<i32> = const { Cell::new(0) };
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

#[unsafe(link_section = ".text.hot.migshim_fork")]
pub fn shim() -> Option<&'static Shim> {
    SHIM.get()
}

/// This process's virtual pid, 0 when not in a session.
#[unsafe(link_section = ".text.hot.migshim_fork")]
pub fn vpid() -> i32 {
    VPID.load(Relaxed)
}

/// Marks the current thread as inside the shim until the guard drops. `None` when it is
/// already inside (the shim's own libc use, or a signal handler interrupting a wrapper).
pub fn enter() -> Option<Busy> {
    // (`then`, not `then_some`: a guard made for nothing would be dropped, and its drop
    // would mark the thread as outside the shim while it still is.)
    BUSY.try_with(|b| (!b.replace(true)).then(|| Busy))
        .ok()
        .flatten()
}

pub struct Busy;

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = BUSY.try_with(|b| b.set(false));
    }
}

/// Marks the current thread as the shim's own for good (the control thread), or until
/// `leave_to` (the restart path); returns whether it was inside the shim already.
pub fn enter_forever() -> bool {
    BUSY.try_with(|b| b.replace(true)).unwrap_or(true)
}

/// The restart path's end: the main thread goes back into the app inside the shim only if
/// it was when it was frozen (`was`, from enter_forever).
pub fn leave_to(was: bool) {
    let _ = BUSY.try_with(|b| b.set(was));
}

/// Whether the current thread is inside the shim (a wrapper, or the control thread).
pub fn busy() -> bool {
    BUSY.try_with(Cell::get).unwrap_or(true)
}

pub fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(e: i32) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = e }
}

pub fn journal(s: &Shim) -> MutexGuard<'_, Journal> {
    s.journal.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends the record `make` builds, unless the thread is already inside the shim or in an
/// app signal handler (journaling allocates: not async-signal-safe). Then the
/// reconciliation with /proc is what catches the change. errno is preserved.
pub fn record<'a>(make: impl FnOnce() -> Record<BytesRef<'a>>) {
    let Some(s) = shim() else { return };
    if crate::interpose::in_signal_handler() {
        return;
    }
    let Some(_busy) = enter() else { return };
    let e = errno();
    journal(s).append(&make());
    set_errno(e);
}

/// The current thread's virtual tid (registering a thread no wrapper saw being created).
pub fn vtid() -> Option<i32> {
    let v = VTID.try_with(Cell::get).ok()?;
    if v != 0 {
        return Some(v);
    }
    let s = shim()?;
    let real = real_tid();
    let v = if real == real_pid() {
        vpid()
    } else {
        s.table.register(real, Kind::Thread, vpid()).ok()?
    };
    let _ = VTID.try_with(|c| c.set(v));
    Some(v)
}

/// A thread started through the pthread_create wrapper joins the session.
pub fn thread_started() {
    if shim().is_some() {
        let _ = vtid();
        let _ = EXIT.try_with(|_| ());
    }
}

/// Marks the thread's slot when the thread ends (thread-local destructor).
struct ThreadExit;

impl Drop for ThreadExit {
    fn drop(&mut self) {
        if let (Some(s), Ok(v)) = (shim(), VTID.try_with(Cell::get))
            && v != 0
            && v != vpid()
        {
            s.table.set_state(v, State::Reaped, 0);
        }
    }
}

thread_local! {
    static EXIT: ThreadExit = const { ThreadExit };
}

fn warn(msg: &str) {
    // Once per session tree: children inherit the marker.
    if std::env::var_os("MIGSHIM_WARNED").is_none() {
        eprintln!("migshim: {msg}; the program runs without checkpoint support");
        // SAFETY: called from init, before the app's main: no other thread reads environ.
        unsafe { std::env::set_var("MIGSHIM_WARNED", "1") };
    }
}

/// Library load: join the session, start the control thread.
pub fn init() {
    let _busy = enter();
    let Some(dir) = std::env::var_os(ENV_SESSION).filter(|d| !d.is_empty()) else {
        warn("MIGSHIM_SESSION is not set (start programs with `mig run`)");
        return;
    };
    let dir = SessionDir(dir.into());
    // (A program started by a process that changed to another user may not open it by
    // its path: then through the fd that one held, see creds.rs.)
    let table = match SessionTable::open(&dir.procs()) {
        Ok(t) => t,
        Err(e) => match crate::creds::inherited_table() {
            Some(f) => match SessionTable::open_file(&f, &dir.procs()) {
                Ok(t) => t,
                Err(e) => return warn(&format!("session unusable: {e}")),
            },
            None => return warn(&format!("session unusable: {e}")),
        },
    };
    // (While the process has one thread.)
    crate::interpose::reserve_high_fds();
    // Not taken between joining the table (from then on mig may signal us) and the
    // handler (install_signal lets it through).
    crate::interpose::hold_signal(table.signal(), true);
    let real = real_pid();
    let parent = table.vid_of(real_ppid()).unwrap_or(0);
    let vpid = match table.register(real, Kind::Process, parent) {
        Ok(v) => v,
        Err(e) => return warn(&e.to_string()),
    };
    let journal = carried_journal();
    let env = |k: &str, v: OsString| {
        let mut b = k.as_bytes().to_vec();
        b.extend(v.into_vec());
        CString::new(b).unwrap_or_default()
    };
    let shim = Shim {
        table,
        env_preload: env("LD_PRELOAD=", crate::interpose::own_path()),
        place: AtomicPtr::new(Box::into_raw(Box::new(Place::new(dir)))),
        journal: Mutex::new(journal),
    };
    if SHIM.set(shim).is_err() {
        return;
    }
    VPID.store(vpid, Relaxed);
    let _ = VTID.try_with(|c| c.set(vpid));
    crate::interpose::register_atfork();
    crate::interpose::prefetch();
    crate::interpose::install_signal(shim_table_signal());
}

fn shim_table_signal() -> i32 {
    shim().map_or(0, |s| s.table.signal())
}

/// The environment variable naming the memfd an exec'ing process left its table in.
pub const ENV_CARRY: &str = "MIGSHIM_CARRY";
/// That memfd's name.
const CARRY_NAME: &str = "migshim-carry";

/// The journal the program before this one in the same process (same vpid) left in a
/// memfd, else an empty one. (A memfd, not a file in the session's directory: that
/// program may have changed to a user who may not write there.)
fn carried_journal() -> Journal {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let Some(fd) = std::env::var(ENV_CARRY)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return Journal::default();
    };
    // SAFETY: called from init, before the app's main: no other thread reads environ.
    unsafe { std::env::remove_var(ENV_CARRY) };
    let ours = std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|l| {
        l.as_os_str()
            .as_bytes()
            .starts_with(format!("/memfd:{CARRY_NAME}").as_bytes())
    });
    if !ours {
        return Journal::default();
    }
    // SAFETY: the memfd was left for this program alone; it is closed here.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    let base: Folded = postcard::from_bytes(&bytes).unwrap_or_default();
    let mut j = Journal::from_table(base);
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    j.append(&Record::Exec {
        path: BytesRef(exe.as_os_str().as_bytes()),
    });
    j
}

/// This process's table for the program it is about to exec: a memfd kept across the exec
/// (the fd, to close if the exec fails) and "MIGSHIM_CARRY=<fd>" for its environment.
pub fn carry_across_exec() -> Option<(i32, CString)> {
    use std::io::Write;
    use std::os::fd::{FromRawFd, IntoRawFd};
    let s = shim()?;
    let _busy = enter()?;
    let bytes = postcard::to_stdvec(journal(s).folded()).ok()?;
    let name = CString::new(CARRY_NAME).ok()?;
    // SAFETY: a raw memfd_create (the wrapper would journal it); the fd is ours.
    let fd = unsafe {
        crate::interpose::raw::syscall6(
            libc::SYS_memfd_create,
            name.as_ptr() as usize,
            0,
            0,
            0,
            0,
            0,
        )
    };
    if fd < 0 {
        return None;
    }
    let fd = crate::interpose::keep_across_exec(crate::interpose::move_fd_high(fd as i32));
    // SAFETY: the fd was just made and is owned here.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    if f.write_all(&bytes)
        .and_then(|_| std::io::Seek::rewind(&mut f))
        .is_err()
    {
        return None; // (f closes it)
    }
    let env = CString::new(format!("{ENV_CARRY}={fd}")).ok()?;
    Some((f.into_raw_fd(), env))
}

thread_local! {
    /// The journal lock (and the busy mark) held by the forking thread across fork.
    static FORK_HOLD: RefCell<Option<(Busy, MutexGuard<'static, Journal>)>> = const { RefCell::new(None) };
    /// The vpid reserved for the child of the fork this thread is making.
    static FORK_CHILD: Cell<i32> = const { Cell::new(0) };
}

unsafe extern "C" {
    /// glibc's own "no thread was ever created" flag (glibc >= 2.32).
    static __libc_single_threaded: libc::c_char;
}

#[unsafe(link_section = ".text.hot.migshim_fork")]
pub fn single_threaded() -> bool {
    // SAFETY: a byte glibc keeps for exactly this kind of question.
    unsafe { std::ptr::read_volatile(&raw const __libc_single_threaded) != 0 }
}

/// Before fork: reserve the child's vpid, and (when other threads could be appending)
/// hold the journal so the child's copy is consistent. A single-threaded process skips
/// the lock: every page written after a fork costs a copy-on-write fault in the parent.
pub fn fork_prepare() {
    let Some(s) = shim() else { return };
    let Some(busy) = enter() else { return };
    let child = s.table.reserve(vpid()).unwrap_or(0);
    let _ = FORK_CHILD.try_with(|c| c.set(child));
    if single_threaded() {
        return;
    }
    let guard = journal(s);
    let _ = FORK_HOLD.try_with(|h| *h.borrow_mut() = Some((busy, guard)));
}

/// After fork, in parent and child alike.
#[unsafe(link_section = ".text.hot.migshim_fork")]
pub fn fork_release() {
    if !single_threaded() {
        let _ = FORK_HOLD.try_with(|h| h.borrow_mut().take());
    }
}

/// In the parent after fork: the child's vpid (0 when none was reserved), bound to its
/// real pid — or given back when the fork failed.
#[unsafe(link_section = ".text.hot.migshim_fork")]
pub fn forked_child(real: i32) -> i32 {
    if real == 0 {
        return 0; // the child: after_fork_child took the reservation
    }
    let v = FORK_CHILD.try_with(|c| c.replace(0)).unwrap_or(0);
    if let (Some(s), true) = (shim(), v != 0) {
        if real > 0 {
            s.table.bind(v, real);
        } else {
            s.table.set_state(v, State::Reaped, 0);
        }
    }
    v
}

/// In the child of a fork: take the reserved vpid (a few stores: the child's path is kept
/// short, every page it touches costs a fault).
/// (In the fork path's section: a fork child faults in one page of text, not several.)
#[unsafe(link_section = ".text.hot.migshim_fork")]
pub fn after_fork_child() {
    let Some(s) = shim() else { return };
    let v = match FORK_CHILD.try_with(|c| c.replace(0)).unwrap_or(0) {
        0 => s
            .table
            .register(real_pid(), Kind::Process, vpid())
            .unwrap_or(0),
        v => {
            s.table.bind(v, real_pid());
            v
        }
    };
    VPID.store(v, Relaxed);
    let _ = VTID.try_with(|c| c.set(v));
    crate::control::after_fork();
    crate::ctlheap::start_again();
    crate::precopy::after_fork_child();
    crate::interpose::timers::after_fork();
    crate::interpose::signals::after_fork();
}

/// Process exit: the slot says so, the control socket goes. Allocation-free.
#[unsafe(link_section = ".text.hot.migshim_fork")]
pub fn leave() {
    if let Some(s) = shim() {
        let v = vpid();
        if v != 0 {
            s.table.set_state(v, State::Exited, 0);
        }
        crate::control::unlink_socket();
    }
}
