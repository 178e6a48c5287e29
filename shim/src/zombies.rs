//! Children that had ended, not yet waited for, when the process was frozen (zombies):
//! the kernel keeps them where the process ran, and a restore cannot make them again. The
//! dump notes each (its vpid and wait status) in this process's own memory, which goes
//! with the image; once restored, the process's waits answer them from there as the
//! kernel would have (their vpids stay taken in the table until then). Without this, a
//! parent frozen between its child's exit and its wait got ECHILD after a restore (python:
//! ChildProcessError, and the program ended).

use migrt::sessiontable::{Kind, SessionTable, State};
use std::sync::atomic::{AtomicU64, Ordering::AcqRel, Ordering::Acquire, Ordering::Release};

const MAX: usize = 64;
/// Each noted child: its vpid (low 32 bits; 0: a free entry), its wait status (bits
/// 32-62), and whether a restore brought the note here (bit 63: answered by waits).
static NOTED: [AtomicU64; MAX] = [const { AtomicU64::new(0) }; MAX];
const RESTORED: u64 = 1 << 63;
/// How long a child that is ending is waited for to be waitable.
const ENDING: std::time::Duration = std::time::Duration::from_millis(100);

fn pack(vpid: i32, status: i32) -> u64 {
    vpid as u32 as u64 | ((status as u32 as u64) & 0x7fff_ffff) << 32
}

fn unpack(n: u64) -> (i32, i32) {
    (n as u32 as i32, ((n >> 32) & 0x7fff_ffff) as i32)
}

/// In the dump (the process frozen): notes which children of process `me` (in `table`)
/// have ended and wait to be waited for. What an earlier dump noted and no restore took is
/// dropped first (the process ran on where it was: the kernel answers those); what a
/// restore brought and no wait took yet stays.
pub fn note(table: &SessionTable, me: i32) {
    for n in &NOTED {
        let _ = n.fetch_update(AcqRel, Acquire, |v| (v & RESTORED == 0).then_some(0));
    }
    let children = table.entries().into_iter().filter(|e| {
        e.kind == Kind::Process
            && e.parent == me
            && matches!(e.state, State::Running | State::Exited)
            && e.real > 0
            && e.real != migrt::sessiontable::NO_PROCESS
    });
    for e in children {
        // One that is ending (its slot says so, or it was killed outright: its slot cannot
        // say) may not be waitable yet: the kernel waits for its other threads to go first
        // — up to ~12 ms seen, with both CPUs busy freezing.
        // One the kernel reaped itself (SIGCHLD ignored, SA_NOCLDWAIT) is no child any more:
        // nothing to wait for, and no time of the freeze spent on it.
        let t = std::time::Instant::now();
        let mut got = ended(e.real);
        while got == Child::Running
            && (e.state == State::Exited || killed(e.real))
            && t.elapsed() < ENDING
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
            got = ended(e.real);
        }
        if let Child::Ended(status) = got {
            let free = NOTED.iter().find(|n| n.load(Acquire) == 0);
            if let Some(n) = free {
                n.store(pack(e.vid, status), Release);
            }
        }
    }
}

/// Whether process `real` is being killed (SIGKILL pending) or is already a zombie.
fn killed(real: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{real}/status")) else {
        return false;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let pending = |name| {
        field(name)
            .and_then(|m| u64::from_str_radix(m, 16).ok())
            .is_some_and(|m| m & 1 << (libc::SIGKILL - 1) != 0)
    };
    field("State:").is_some_and(|s| s.starts_with(['Z', 'X']))
        || pending("SigPnd:")
        || pending("ShdPnd:")
}

#[derive(PartialEq)]
enum Child {
    /// Ended, with this wait status, and waits to be waited for.
    Ended(i32),
    Running,
    /// Not (or no longer) a child to wait for: reaped already.
    Gone,
}

/// Whether child `real` has ended (left to be waited for: WNOWAIT).
fn ended(real: i32) -> Child {
    // SAFETY: siginfo_t is plain data; waitid fills it (or leaves si_pid 0).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let options = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: the system call itself (libc's syscall() is the shim's, which would make the
    // pid it answers virtual) into our own buffer.
    let r = unsafe {
        crate::interpose::raw::syscall6(
            libc::SYS_waitid,
            libc::P_PID as usize,
            real as usize,
            (&raw mut info) as usize,
            options as usize,
            0,
            0,
        )
    };
    // SAFETY: filled by the kernel for a child that changed state.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if r != 0 {
        return Child::Gone;
    }
    if pid != real {
        return Child::Running;
    }
    Child::Ended(match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => status & 0x7f,
    })
}

/// In the restart path: what the dump noted is this process's to answer from now on;
/// their vpids are taken in the new table (`me`: the process's vpid).
pub fn restored(table: &SessionTable, me: i32) {
    for n in &NOTED {
        let v = n.load(Acquire);
        if v != 0 {
            let _ = table.restore_ended(unpack(v).0, me);
            n.store(v | RESTORED, Release);
        }
    }
}

/// A wait for `pid` (as waitpid takes it: > 0 a vpid, -1 or 0 any child; a process group
/// is left to the kernel): a restored child that ended and matches, with its wait status;
/// taken unless `keep` (WNOWAIT).
pub fn take(pid: i32, keep: bool) -> Option<(i32, i32)> {
    if pid < -1 {
        return None;
    }
    NOTED.iter().find_map(|n| {
        let v = n.load(Acquire);
        let (vpid, status) = unpack(v);
        let matches = v & RESTORED != 0 && (pid <= 0 || pid == vpid);
        let taken = matches && (keep || n.compare_exchange(v, 0, AcqRel, Acquire).is_ok());
        taken.then_some((vpid, status))
    })
}
