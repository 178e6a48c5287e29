//! `mig demo`: a guided run on this host, with nothing to set up. A counter (mig's own
//! hidden `counter` subcommand, so no other program is needed) runs as a session; the demo
//! shows what the session looks like from outside (`mig ps`) and inside (`mig table`),
//! then ends it.

use crate::run::{self, RunArgs};
use crate::sessions;
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::time::{Duration, Instant};

/// The demo subject: counts, holds a file, a pipe and a socket pair, prints its pid.
pub fn counter(hz: f64, dir: &std::path::Path) -> Result<i32> {
    let file = dir.join("counter.txt");
    let mut f = std::fs::File::create(&file).with_context(|| format!("creating {}", file.display()))?;
    let (_a, _b) = std::os::unix::net::UnixStream::pair()?;
    let (_r, _w) = std::io::pipe()?;
    for count in 1u64.. {
        writeln!(f, "{count}")?;
        println!("count {count} (pid {})", std::process::id());
        std::thread::sleep(Duration::from_secs_f64(1.0 / hz));
    }
    Ok(0)
}

pub fn demo() -> Result<i32> {
    let rt = sessions::runtime_dir()?;
    let work = rt.join("demo");
    std::fs::create_dir_all(&work)?;
    let log = work.join("counter.log");
    let name = format!("demo-{}", std::process::id());
    let exe = std::env::current_exe()?;
    println!("== 1. mig run --detach --name {name} -- mig counter");
    run::run(RunArgs {
        name: Some(name.clone()),
        detach: true,
        allow_static: false,
        log: Some(log.clone()),
        command: vec![
            exe.display().to_string(),
            "counter".into(),
            "--dir".into(),
            work.display().to_string(),
        ],
    })?;
    wait_for(&log, "count 3")?;
    let out = std::fs::read_to_string(&log)?;
    println!("   its output so far (the pid it sees is virtual, the same on any host):");
    for l in out.lines().take(3) {
        println!("   | {l}");
    }
    println!("\n== 2. mig ps");
    let live = sessions::find(&rt, &name)?;
    print!("{}", crate::show::ps_text(std::slice::from_ref(&live)));
    println!("\n== 3. mig table {name}   (what a checkpoint will record)");
    print!("{}", crate::table::text(&live, false)?);
    println!("\n== 4. ending the session");
    for p in live.processes() {
        migrt::sys::terminate(p.pid);
    }
    println!("   done. Checkpoint, restore and migration of this counter come next (see README).");
    Ok(0)
}

fn wait_for(log: &std::path::Path, needle: &str) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if std::fs::read_to_string(log).unwrap_or_default().contains(needle) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the demo counter did not start; see {}", log.display())
}
