//! `mig demo`: a guided run on this host, with nothing to set up. A counter (mig's own
//! hidden `counter` subcommand, so no other program is needed) runs as a session; the demo
//! shows it from outside (`mig ps`) and inside (`mig table`), checkpoints and stops it,
//! restores it — it counts on from where it stopped — then migrates it to an agent (a
//! second "host": this one, with a state directory and key of its own) where it counts on
//! again, and ends it.

use crate::sessions;
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

/// The demo subject: counts, holds a file, a pipe and a socket pair, prints its pid.
pub fn counter(hz: f64, dir: &std::path::Path) -> Result<i32> {
    let file = dir.join("counter.txt");
    let mut f =
        std::fs::File::create(&file).with_context(|| format!("creating {}", file.display()))?;
    let (_a, _b) = std::os::unix::net::UnixStream::pair()?;
    let (_r, _w) = std::io::pipe()?;
    for count in 1u64.. {
        writeln!(f, "{count}")?;
        println!("count {count} (pid {})", std::process::id());
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_secs_f64(1.0 / hz));
    }
    Ok(0)
}

pub fn demo() -> Result<i32> {
    let rt = sessions::runtime_dir()?;
    let work = rt.join(format!("demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let (log, log2, image) = (
        work.join("before.log"),
        work.join("after.log"),
        work.join("image"),
    );
    let name = format!("demo-{}", std::process::id());
    let exe = std::env::current_exe()?;
    let mig = |args: &[&str]| -> Result<()> {
        let st = Command::new(&exe).args(args).status()?;
        if !st.success() {
            bail!("mig {} failed", args.join(" "));
        }
        Ok(())
    };
    println!("== 1. mig run --detach --name {name} -- mig counter");
    mig(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--log",
        &log.display().to_string(),
        "--",
        &exe.display().to_string(),
        "counter",
        "--dir",
        &work.display().to_string(),
    ])?;
    wait_for(&log, "count 5 ")?;
    show_tail(
        &log,
        "   its output (the pid it sees is virtual, the same wherever it runs):",
    );
    println!("\n== 2. mig ps");
    let live = sessions::find(&rt, &name)?;
    print!("{}", crate::show::ps_text(std::slice::from_ref(&live)));
    println!("\n== 3. mig table {name}   (what stands behind each fd)");
    print!("{}", crate::table::text(&live, false)?);
    println!(
        "\n== 4. mig checkpoint {name} --out {} --stop",
        image.display()
    );
    mig(&[
        "checkpoint",
        &name,
        "--out",
        &image.display().to_string(),
        "--stop",
    ])?;
    let stopped_at = last_count(&log);
    println!("   the counter stopped at {stopped_at}");
    println!("\n== 5. mig restore {} --detach", image.display());
    mig(&[
        "restore",
        &image.display().to_string(),
        "--detach",
        "--log",
        &log2.display().to_string(),
    ])?;
    wait_for(&log2, &format!("count {} ", stopped_at + 3))?;
    show_tail(
        &log2,
        "   it goes on where it stopped, same pid, new process:",
    );
    let live = sessions::find(&rt, &name)?;
    print!("{}", crate::show::ps_text(std::slice::from_ref(&live)));
    println!("\n== 6. mig agent   (a second host: this one, with its own state directory and key)");
    let (state, key) = (work.join("agent"), work.join("agent.key"));
    // (any 16 bytes or more; between real hosts, the same secret file on both)
    std::fs::write(
        &key,
        format!("mig demo key of process {:>16}", std::process::id()),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let to = format!("127.0.0.1:{port}");
    let mut agent = Command::new(&exe)
        .args([
            "agent",
            "--listen",
            &to,
            "--key",
            &key.display().to_string(),
        ])
        .arg("--state-dir")
        .arg(&state)
        .stderr(std::fs::File::create(work.join("agent.log"))?)
        .spawn()?;
    wait_for(&work.join("agent.log"), "listening on")?;
    println!("   listening on {to}");
    println!("\n== 7. mig migrate {name} --to {to} --mode precopy");
    let migrated = mig(&[
        "migrate",
        &name,
        "--to",
        &to,
        "--mode",
        "precopy",
        "--key",
        &key.display().to_string(),
    ]);
    let there = state.join("run").join("logs").join(format!("{name}.log"));
    let moved = migrated.and_then(|_| {
        let at = last_count(&log2);
        wait_for(&there, &format!("count {} ", at + 3))?;
        show_tail(&there, "   it counts on there, from where it was:");
        println!("\n   mig ps --host {to}:");
        mig(&["ps", "--host", &to, "--key", &key.display().to_string()])
    });
    println!("\n== 8. ending the session");
    let ours: Vec<sessions::Live> = sessions::list(&rt)
        .into_iter()
        .chain(sessions::list(&state.join("run")))
        .filter(|l| l.name() == name)
        .collect();
    for l in &ours {
        for p in l.processes() {
            migrt::sys::terminate(p.pid);
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    // (Once they have ended, their directories go with their tables, which may be in
    // /dev/shm.)
    let t = std::time::Instant::now();
    while ours.iter().any(|l| !l.processes().is_empty()) && t.elapsed().as_secs() < 2 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for l in &ours {
        l.dir.remove();
    }
    moved?;
    let _ = std::fs::remove_dir_all(&work);
    println!("   done.");
    Ok(0)
}

fn last_count(log: &std::path::Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("count ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn show_tail(log: &std::path::Path, title: &str) {
    println!("{title}");
    let out = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = out.lines().collect();
    for l in &lines[lines.len().saturating_sub(3)..] {
        println!("   | {l}");
    }
}

/// Waits (10 s at most) until `log` contains `needle`.
fn wait_for(log: &std::path::Path, needle: &str) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(needle)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{needle:?} did not show within 10 s; see {}", log.display())
}
