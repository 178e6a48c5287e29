//! Sessions on this host: creating one, finding the live ones, clearing away the dead.

use anyhow::{Context, Result, bail};
use migrt::paths::{self, SessionDir};
use migrt::procfs;
use migrt::sessiontable::{Kind, SessionTable, State};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    pub host: String,
    pub uid: u32,
    /// Seconds since the epoch.
    pub created: u64,
    pub command: Vec<String>,
    /// The `mig run` that started it, while it waits for the session.
    pub runner: i32,
}

/// One process of a live session, as `mig ps` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Proc {
    pub vpid: i32,
    pub pid: i32,
    /// 0 when the parent is outside the session.
    pub parent_vpid: i32,
    pub command: String,
    pub threads: u32,
    pub state: String,
}

pub struct Live {
    pub dir: SessionDir,
    pub meta: Meta,
    pub table: SessionTable,
}

impl Live {
    pub fn name(&self) -> String {
        self.dir.name()
    }

    /// The session's processes that are alive now.
    pub fn processes(&self) -> Vec<Proc> {
        live_processes(&self.table)
    }

    /// The memory its processes hold, in bytes (pages they share counted in each).
    pub fn resident(&self) -> u64 {
        self.processes().iter().map(|p| resident(p.pid)).sum()
    }
}

/// The resident size of process `pid`, in bytes (0 if it is gone).
pub fn resident(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * migrt::image::PAGE as u64
}

fn live_processes(table: &SessionTable) -> Vec<Proc> {
    table
        .entries()
        .into_iter()
        .filter(|e| e.kind == Kind::Process && e.state == State::Running)
        .filter_map(|e| {
            let (state, threads) = procfs::status(e.real)?;
            if state == 'Z' || state == 'X' {
                return None;
            }
            let command = procfs::cmdline(e.real)
                .iter()
                .map(|a| a.lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            Some(Proc {
                vpid: e.vid,
                pid: e.real,
                parent_vpid: e.parent,
                command,
                threads: threads.saturating_sub(e.hidden),
                state: state.to_string(),
            })
        })
        .collect()
}

pub fn runtime_dir() -> Result<std::path::PathBuf> {
    let rt = paths::runtime_dir();
    paths::ensure_private_dir(&paths::sessions_dir(&rt))?;
    Ok(rt)
}

fn read_meta(dir: &SessionDir) -> Option<Meta> {
    serde_json::from_slice(&std::fs::read(dir.meta()).ok()?).ok()
}

/// Opens a session directory; None (and the directory removed) when nothing of it lives.
fn open_live(dir: SessionDir) -> Option<Live> {
    let meta = read_meta(&dir);
    let table = SessionTable::open(&dir.procs()).ok();
    let runner_alive = meta.as_ref().is_some_and(|m| migrt::sys::alive(m.runner));
    match (meta, table) {
        (Some(meta), Some(table)) => {
            let live = Live { dir, meta, table };
            if runner_alive || !live.processes().is_empty() {
                return Some(live);
            }
            live.dir.remove();
            None
        }
        _ => {
            // Half-made (a launcher is still creating it) or damaged: clear it once stale.
            let age = std::fs::metadata(&dir.0)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if !runner_alive && age.is_some_and(|a| a.as_secs() > 10) {
                dir.remove();
            }
            None
        }
    }
}

/// Every live session, by name.
pub fn list(rt: &Path) -> Vec<Live> {
    let mut names: Vec<String> = std::fs::read_dir(paths::sessions_dir(rt))
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string()))
                .collect()
        })
        .unwrap_or_default();
    names.sort_by(|a, b| match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    });
    names
        .into_iter()
        .filter_map(|n| open_live(SessionDir::new(rt, &n)))
        .collect()
}

pub fn find(rt: &Path, name: &str) -> Result<Live> {
    paths::validate_name(name)?;
    open_live(SessionDir::new(rt, name))
        .with_context(|| format!("no live session named {name:?} on this host (see `mig ps`)"))
}

/// Creates the directory and table of a new session. Without a name, the smallest free
/// number is taken.
pub fn create(
    rt: &Path,
    name: Option<&str>,
    command: &[String],
    signal: u32,
) -> Result<SessionDir> {
    let names: Vec<String> = match name {
        Some(n) => {
            paths::validate_name(n)?;
            vec![n.to_string()]
        }
        None => (1..10_000).map(|i| i.to_string()).collect(),
    };
    for n in names {
        let dir = SessionDir::new(rt, &n);
        // A dead session of that name is cleared away first.
        if dir.0.exists() && open_live(dir.clone()).is_some() {
            if name.is_some() {
                bail!(
                    "a session named {n:?} is already running (see `mig ps`); choose another --name"
                );
            }
            continue;
        }
        match std::fs::create_dir(&dir.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && name.is_none() => continue,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("a session named {n:?} is being created right now; choose another --name")
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.0.display())),
        }
        let meta = Meta {
            name: n.clone(),
            host: migrt::sys::hostname(),
            uid: migrt::sys::getuid(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            command: command.to_vec(),
            runner: std::process::id() as i32,
        };
        SessionTable::create(&dir.procs(), signal)?;
        std::fs::create_dir(dir.ctl_dir())?;
        std::fs::write(dir.meta(), serde_json::to_vec_pretty(&meta)?)?;
        return Ok(dir);
    }
    bail!(
        "no free session name under {}",
        paths::sessions_dir(rt).display()
    )
}

/// Says what a session runs (its command, as `mig ps` shows it).
pub fn describe(dir: &SessionDir, command: &[String]) -> Result<()> {
    let mut meta = read_meta(dir).context("the session's description is gone")?;
    meta.command = command.to_vec();
    std::fs::write(dir.meta(), serde_json::to_vec_pretty(&meta)?)?;
    Ok(())
}

/// Removes a session's directory if nothing of it lives any more.
pub fn remove_if_dead(dir: &SessionDir) {
    let alive = SessionTable::open(&dir.procs()).is_ok_and(|t| !live_processes(&t).is_empty());
    if !alive {
        dir.remove();
    }
}

/// Whether a process has ended (gone, or a zombie not reaped yet).
pub fn gone(pid: i32) -> bool {
    !migrt::sys::alive(pid) || migrt::procfs::status(pid).is_some_and(|(s, _)| s == 'Z')
}
