//! Shared by the end-to-end tests: a private runtime directory per test, `mig` with it,
//! and helpers to start, inspect and stop sessions.
#![allow(dead_code)]

pub mod agents;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use migshim_examples::c_program;

pub const VPID_BASE: i64 = 4_200_000;

pub fn mig_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mig"))
}

/// cargo builds libmigshim.so into deps/ for the tests (dev-dependency); put it beside
/// `mig`, where `mig` looks by default.
fn ensure_shim_beside_mig() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dir = mig_bin().parent().unwrap().to_path_buf();
        let built = dir.join("deps/libmigshim.so");
        let beside = dir.join("libmigshim.so");
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if built.exists() && mtime(&built) > mtime(&beside) {
            let tmp = dir.join(format!(".libmigshim.so.{}", std::process::id()));
            std::fs::copy(&built, &tmp).unwrap();
            std::fs::rename(&tmp, &beside).unwrap();
        }
        assert!(
            beside.exists(),
            "libmigshim.so not built at {}",
            beside.display()
        );
    });
}

pub fn shim_lib() -> PathBuf {
    ensure_shim_beside_mig();
    mig_bin().with_file_name("libmigshim.so")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A private runtime directory (and scratch space) for one test.
pub struct Env {
    pub root: PathBuf,
    pub rt: PathBuf,
}

impl Env {
    pub fn new(tag: &str) -> Env {
        ensure_shim_beside_mig();
        let root = std::env::temp_dir().join(format!("migtest-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let rt = root.join("rt");
        Env { root, rt }
    }

    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.root.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn mig(&self) -> Command {
        let mut c = Command::new(mig_bin());
        c.env("MIGSHIM_RUNTIME_DIR", &self.rt)
            .env_remove("MIGSHIM_SESSION")
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null());
        c
    }

    /// `mig ARGS...`, waited for (at most a minute: then it and every process of this
    /// test's sessions are killed, so a hang fails the test instead of stalling the suite).
    pub fn run(&self, args: &[&str]) -> Output {
        let mut c = self.mig();
        c.args(args);
        self.output(c)
    }

    /// Runs a command to completion under the same one-minute watchdog.
    pub fn output(&self, c: Command) -> Output {
        self.output_pid(c).1
    }

    /// As `output`, with the command's pid. The command gets a process group of its own, so
    /// that the watchdog can kill it with everything it started.
    pub fn output_pid(&self, mut c: Command) -> (i32, Output) {
        use std::os::unix::process::CommandExt;
        let child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("starting");
        let pid = child.id() as i32;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, rt) = (done.clone(), self.rt.clone());
        let watchdog = std::thread::spawn(move || {
            let t = Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if t.elapsed() > Duration::from_secs(60) {
                    eprintln!("watchdog: killing a command that ran over a minute");
                    kill_sessions(&rt);
                    // SAFETY: killing the process group of the child we started.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let out = child.wait_with_output().expect("waiting");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watchdog.join().unwrap();
        (pid, out)
    }

    /// `mig run --detach --name NAME --log LOG -- CMD...`; returns the log path.
    pub fn detach(&self, name: &str, cmd: &[&str]) -> PathBuf {
        let log = self.root.join(format!("{name}.log"));
        let log_s = log.to_str().unwrap().to_string();
        let mut args = vec!["run", "--detach", "--name", name, "--log", &log_s, "--"];
        args.extend_from_slice(cmd);
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "mig run --detach failed: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout).trim(), name);
        log
    }

    pub fn ps(&self) -> Value {
        let out = self.run(&["ps", "--json"]);
        assert!(out.status.success(), "mig ps: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The live processes of one session, from `mig ps --json`.
    pub fn processes(&self, session: &str) -> Vec<Value> {
        self.ps()
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == session)
            .map(|s| s["processes"].as_array().unwrap().clone())
            .unwrap_or_default()
    }

    pub fn table(&self, session: &str, journal: bool) -> Value {
        let mut args = vec!["table", session, "--json"];
        if journal {
            args.push("--journal");
        }
        let out = self.run(&args);
        assert!(out.status.success(), "mig table: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until `pred` holds for the session's process list.
    pub fn wait_processes(
        &self,
        session: &str,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let p = self.processes(session);
            if pred(&p) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; processes: {p:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills every process of the session and waits until `mig ps` no longer lists it.
    /// (Each time round: a child forked after one listing, before its parent was killed,
    /// is in the next.)
    pub fn stop(&self, session: &str) {
        self.wait_processes(session, "the session to end", |p| {
            for p in p {
                // SAFETY: signalling a process of our own test session.
                unsafe { libc::kill(p["pid"].as_i64().unwrap() as i32, libc::SIGKILL) };
            }
            p.is_empty()
        });
    }
}

/// Kills every process of every session under runtime directory `rt`.
fn kill_sessions(rt: &Path) {
    let out = Command::new(mig_bin())
        .env("MIGSHIM_RUNTIME_DIR", rt)
        .args(["ps", "--json"])
        .output();
    let mut killed = Vec::new();
    if let Ok(Value::Array(sessions)) =
        out.map(|o| serde_json::from_slice::<Value>(&o.stdout).unwrap_or(Value::Null))
    {
        for s in sessions {
            for p in s["processes"].as_array().into_iter().flatten() {
                let pid = p["pid"].as_i64().unwrap_or(0) as i32;
                // SAFETY: cleaning up our own test sessions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed.push(pid);
            }
        }
    }
    // System V segments they made (a subject killed before it removed its own).
    let segments = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
    for l in segments.lines().skip(1) {
        // key shmid perms size cpid ...
        let f: Vec<&str> = l.split_whitespace().collect();
        let parsed = (
            f.get(1).map(|s| s.parse()),
            f.get(4).map(|s| s.parse::<i32>()),
        );
        if let (Some(Ok(id)), Some(Ok(cpid))) = parsed
            && killed.contains(&cpid)
        {
            // SAFETY: removing a segment a killed test process made (it goes once no one
            // has it attached).
            unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // System V segments the sessions' restores made outlive the processes killed
        // (listed in each session's `sysv` file: old and new id per line; read before the
        // cleanup of dead sessions takes the files away).
        each_under(&self.root, 6, "sysv", &mut |path| {
            let made = std::fs::read_to_string(path).unwrap_or_default();
            for id in made
                .lines()
                .filter_map(|l| l.split_once(' ')?.1.parse().ok())
            {
                // SAFETY: removing a segment a test's restore made (it goes once no one
                // has it attached).
                unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
            }
        });
        kill_sessions(&self.rt);
        // (Session tables may live in /dev/shm, linked from their session's directory.)
        remove_tables(&self.root, 6);
        // A failed test's logs (its sessions', its agents') are kept for a look.
        if std::thread::panicking() {
            eprintln!("kept {} (the test failed)", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Calls `f` with every file called `name` under `dir`, down to `depth` levels.
fn each_under(dir: &Path, depth: u32, name: &str, f: &mut dyn FnMut(&Path)) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if e.file_name() == name {
            f(&path);
        } else if depth > 0 && e.file_type().is_ok_and(|t| t.is_dir()) {
            each_under(&path, depth - 1, name, f);
        }
    }
}

/// Removes the session tables in /dev/shm linked from session directories under `dir` (the
/// tests' own and their agents'), down to `depth` levels.
pub fn remove_tables(dir: &Path, depth: u32) {
    each_under(dir, depth, "procs", &mut |path| {
        if let Ok(table) = std::fs::read_link(path) {
            let _ = std::fs::remove_file(table);
        }
    });
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits until `path` contains `needle`; returns the whole content.
pub fn wait_for_text(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = std::fs::read_to_string(path).unwrap_or_default();
        if t.contains(needle) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?} in {}: {t}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn is_vpid(v: i64) -> bool {
    v > VPID_BASE && v < VPID_BASE + (1 << 18)
}

/// All integers after "key=" in `s`, e.g. ints_after("children=1,2,3", "children").
pub fn ints_after(s: &str, key: &str) -> Vec<i64> {
    let k = format!("{key}=");
    s.split_whitespace()
        .filter_map(|w| w.strip_prefix(&k))
        .flat_map(|v| {
            v.split(',')
                .filter_map(|x| x.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `mig ARGS`, which must succeed; returns its stdout.
pub fn ok(env: &Env, args: &[&str]) -> String {
    let o = env.run(args);
    assert!(
        o.status.success(),
        "mig {args:?}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// `mig checkpoint SESSION --out IMG --stop`, and the session is gone.
pub fn stop_into(env: &Env, session: &str, img: &Path) {
    ok(
        env,
        &[
            "checkpoint",
            session,
            "--out",
            img.to_str().unwrap(),
            "--stop",
        ],
    );
    env.wait_processes(session, "the session to end", |p| p.is_empty());
}

/// `mig restore IMG --detach --log ROOT/NAME`; returns the log.
pub fn restore_detached(env: &Env, img: &Path, name: &str) -> std::path::PathBuf {
    restore_detached_with(env, img, name, &[])
}

/// The same, with more arguments (`--map-port ...`).
pub fn restore_detached_with(env: &Env, img: &Path, name: &str, more: &[&str]) -> PathBuf {
    let (log, o) = try_restore_detached(env, img, name, more);
    assert!(
        o.status.success(),
        "mig restore: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    log
}

/// `mig restore IMG --detach --log ROOT/NAME MORE...`, which may fail: (log, its output).
pub fn try_restore_detached(env: &Env, img: &Path, name: &str, more: &[&str]) -> (PathBuf, Output) {
    let log = env.root.join(name);
    let mut args = vec![
        "restore",
        img.to_str().unwrap(),
        "--detach",
        "--log",
        log.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    let o = env.run(&args);
    (log, o)
}

/// The first number of every line of `log` that starts with `prefix`.
pub fn numbers(log: &Path, prefix: &str) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.strip_prefix(prefix)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Waits until `log` has `n` such lines; returns their numbers.
pub fn wait_numbers(log: &Path, prefix: &str, n: usize) -> Vec<u64> {
    let t = std::time::Instant::now();
    loop {
        let c = numbers(log, prefix);
        if c.len() >= n {
            return c;
        }
        assert!(
            t.elapsed().as_secs() < 15,
            "{} {prefix:?} lines in {}: {:?}",
            c.len(),
            log.display(),
            std::fs::read_to_string(log)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether `program` is installed (on PATH).
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A redis-server on 127.0.0.1:`port` that keeps nothing on disk (its files in `dir`).
pub fn redis_server(port: &str, dir: &Path) -> Vec<String> {
    let dir = dir.to_str().unwrap();
    [
        "redis-server",
        "--port",
        port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A TCP port on loopback nobody holds (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Process `pid`'s uids (real, effective, saved, file system), from /proc.
pub fn uids_of(pid: i64) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|v| v.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .unwrap_or_default()
}

/// Asserts the first of `pids` runs as root again and the others as nobody (a server whose
/// workers changed user, after a restore).
pub fn assert_root_then_nobody(pids: &[i64]) {
    let uids: Vec<Vec<u32>> = pids.iter().map(|&p| uids_of(p)).collect();
    assert_eq!(uids.len(), 3, "{uids:?}");
    assert_eq!(
        uids[0], [0; 4],
        "the first process is root's again: {uids:?}"
    );
    assert!(
        uids[1..].iter().all(|u| *u == [65534; 4]),
        "the others are nobody's again: {uids:?}"
    );
}

/// A forked tree of 4 ("pK N ok" lines, or "DAMAGED"): a prefork server whose workers
/// share 48 MiB the parent wrote before forking them, copy-on-write, each with pages of
/// its own, and pages only the parent has.
pub const COW_TREE: &str = r#"
import mmap, os, time, zlib
buf = bytearray(range(256)) * (48 << 12)    # 48 MiB, written before the forks
m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE)
m[:128 << 12] = bytes(range(256)) * (2 << 10)
kids = 3
for k in range(kids):
    if os.fork() == 0:
        break
else:
    k = kids
for p in range(k * 64, k * 64 + 16):        # pages unlike everyone else's
    buf[p * 4096] = 200 + k
m[(130 + k) << 12] = 1 + k                  # a page only it has (the parent: 133)
if k == kids:
    m[200 << 12:210 << 12] = b"p" * (10 << 12)   # pages the children do not have
want = zlib.crc32(buf) ^ zlib.crc32(m)
for n in range(1, 100000):
    ok = zlib.crc32(buf) ^ zlib.crc32(m) == want
    os.write(1, f"p{k} {n} {'ok' if ok else 'DAMAGED'}\n".encode())
    time.sleep(0.1)
"#;

/// A daemon that forked twice beside its starter: "pK N ok" lines (or "DAMAGED") from the
/// starter (p0), the daemon (p1: a session of its own, its parent ended, so not p0's
/// child) and the daemon's worker (p2: its child), each checking 8 MiB of its own.
pub const DAEMON: &str = r#"
import os, time, zlib
root = os.getpid()
k = 0
if os.fork() == 0:
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    k, daemon = 1, os.getpid()
    if os.fork() == 0:
        k = 2
else:
    os.wait()
buf = bytearray([k]) * (8 << 20)
want = zlib.crc32(buf)
for n in range(1, 100000):
    ok = zlib.crc32(buf) == want
    ok = ok and (k != 1 or os.getppid() != root) and (k != 2 or os.getppid() == daemon)
    os.write(1, f"p{k} {n} {'ok' if ok else 'DAMAGED'}\n".encode())
    time.sleep(0.1)
"#;

/// A tree of `n` processes printing "pK N ok" lines (or "DAMAGED") into `before` went on
/// in `after`: each from its last number, undamaged.
pub fn tree_went_on(before: &Path, after: &Path, n: usize) {
    for k in 0..n {
        let who = format!("p{k} ");
        let last = *numbers(before, &who).last().unwrap();
        assert_eq!(wait_numbers(after, &who, 2)[0], last + 1, "{who}went on");
    }
    let out = std::fs::read_to_string(after).unwrap();
    assert!(!out.contains("DAMAGED"), "{out}");
}

/// The proportional set size of processes `pids` together, in MiB (what they share
/// counted once).
pub fn pss_mib(pids: &[i32]) -> f64 {
    let kib: u64 = (pids.iter())
        .map(|p| {
            let text = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"));
            let text = text.unwrap_or_default();
            let line = text.lines().find(|l| l.starts_with("Pss:")).unwrap_or("");
            let kib = line.split_whitespace().nth(1).and_then(|n| n.parse().ok());
            kib.unwrap_or(0)
        })
        .sum();
    kib as f64 / 1024.0
}

/// COW_TREE, brought back, shares its memory again: not a copy each (~4 x 56 MiB).
pub fn assert_shares_again(before: f64, after: f64) {
    println!("proportional set size of the tree: {before:.1} MiB before, {after:.1} MiB after");
    assert!(
        after < before * 1.3 + 8.0,
        "{before:.1} MiB before, {after:.1} MiB after"
    );
}
