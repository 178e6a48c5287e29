//! `mig run`: start a program as a new session, with the shim preloaded.

use crate::sessions;
use anyhow::{Context, Result, bail};
use migrt::paths::{self, ENV_SESSION, SessionDir};
use migrt::sessiontable::{SessionTable, State, VPID_BASE};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct RunArgs {
    pub name: Option<String>,
    pub detach: bool,
    pub allow_static: bool,
    pub log: Option<PathBuf>,
    pub command: Vec<String>,
}

/// The shim: `MIGSHIM_LIB`, else `libmigshim.so` beside the mig binary.
pub fn shim_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MIGSHIM_LIB").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("MIGSHIM_LIB={} is not a file", p.display());
        }
        return Ok(std::fs::canonicalize(p)?);
    }
    let exe = std::env::current_exe().context("locating the mig binary")?;
    let lib = exe.with_file_name("libmigshim.so");
    if !lib.is_file() {
        bail!(
            "libmigshim.so not found beside mig (looked for {}); build it with `cargo build --release` or set MIGSHIM_LIB",
            lib.display()
        );
    }
    Ok(lib)
}

/// The real-time signal the session's shims reserve: `MIGSHIM_SIGNAL`, else the default.
fn reserved_signal() -> Result<u32> {
    let Ok(v) = std::env::var("MIGSHIM_SIGNAL") else {
        return Ok(migrt::wire::DEFAULT_SIGNAL);
    };
    match v.parse::<u32>() {
        Ok(n) if (34..=64).contains(&n) => Ok(n),
        _ => bail!("MIGSHIM_SIGNAL={v}: give a real-time signal number from 34 to 64"),
    }
}

/// The program as exec would find it, or None.
fn find_program(cmd: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| executable(p))
}

/// Exit code of a finished command as a shell reports it.
pub fn exit_code(st: std::process::ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

pub fn run(a: RunArgs) -> Result<i32> {
    let cmd = &a.command[0];
    let Some(program) = find_program(cmd) else {
        eprintln!("mig: {cmd}: not found");
        return Ok(127);
    };
    if crate::elf::is_static(&program) == Some(true) && !a.allow_static {
        bail!(
            "{} is statically linked: LD_PRELOAD cannot reach it, so its pids and fds cannot be virtualised or checkpointed. Use a dynamically linked build, or pass --allow-static to run it anyway (unmanaged)",
            program.display()
        );
    }
    let lib = shim_library()?;
    let rt = sessions::runtime_dir()?;
    let signal = reserved_signal()?;
    let dir = sessions::create(&rt, a.name.as_deref(), &a.command, signal)?;

    let preload = match std::env::var("LD_PRELOAD") {
        Ok(old) if !old.is_empty() => format!("{} {old}", lib.display()),
        _ => lib.display().to_string(),
    };
    let mut c = Command::new(&program);
    c.arg0(cmd)
        .args(&a.command[1..])
        .env("LD_PRELOAD", preload)
        .env(ENV_SESSION, &dir.0)
        .env_remove("MIGSHIM_WARNED");
    if a.detach {
        let log = match &a.log {
            Some(l) => l.clone(),
            None => {
                let d = paths::logs_dir(&rt);
                paths::ensure_private_dir(&d)?;
                d.join(format!("{}.log", dir.name()))
            }
        };
        let out = std::fs::File::create(&log)
            .with_context(|| format!("creating log {}", log.display()))?;
        c.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => {
                sessions::remove_if_dead(&dir);
                bail!("starting {}: {e}", program.display());
            }
        };
        wait_running(&dir, &mut child, &log)?;
        println!("{}", dir.name());
        return Ok(0);
    }
    migrt::sys::ignore_terminal_signals();
    let status = match c.spawn() {
        Ok(mut ch) => ch.wait(),
        Err(e) => {
            sessions::remove_if_dead(&dir);
            bail!("starting {}: {e}", program.display());
        }
    }?;
    sessions::remove_if_dead(&dir);
    Ok(exit_code(status))
}

/// Waits until the session's first process has joined the session.
fn wait_running(dir: &SessionDir, child: &mut std::process::Child, log: &Path) -> Result<()> {
    let table = SessionTable::open(&dir.procs())?;
    let root = VPID_BASE + 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if table.get(root).is_some_and(|e| e.state == State::Running) {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "session {} ended at once (exit code {}); its output is in {}",
                dir.name(),
                exit_code(st),
                log.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "session {}: the program started but did not join the session within 10 s (is it statically linked or does it clear LD_PRELOAD?)",
                dir.name()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
