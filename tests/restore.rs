//! Restore of real programs: a checkpointed (and stopped) session comes back with the same
//! vpid and goes on exactly where it stopped, memory intact, also after many cycles and in
//! a fresh PID namespace; a damaged image is refused before anything is made.

mod common;
use common::*;
use std::path::Path;

fn counts(log: &Path) -> Vec<u64> {
    numbers(log, "count ")
}

fn wait_counts(log: &Path, n: usize) -> Vec<u64> {
    wait_numbers(log, "count ", n)
}

fn start_counter(env: &Env, mib: &str) -> std::path::PathBuf {
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "40", mib]);
    wait_counts(&log, 3);
    log
}

#[test]
fn a_stopped_session_restores_and_goes_on_where_it_stopped() {
    let env = Env::new("restore");
    let log = start_counter(&env, "16");
    let img = env.root.join("img");
    stop_into(&env, "cnt", &img);
    let last = *counts(&log).last().unwrap();
    let log2 = env.root.join("after.log");
    let said = ok(
        &env,
        &[
            "restore",
            img.to_str().unwrap(),
            "--detach",
            "--log",
            log2.to_str().unwrap(),
        ],
    );
    assert_eq!(said.trim(), "cnt");
    let after = wait_counts(&log2, 5);
    assert_eq!(after[0], last + 1, "it goes on from {last}: {after:?}");
    let text2 = std::fs::read_to_string(&log2).unwrap();
    assert!(
        text2
            .lines()
            .all(|l| l.ends_with(&format!("pid {}", VPID_BASE + 1))),
        "same vpid: {text2}"
    );
    assert!(
        !text2.contains("damaged"),
        "its 16 MiB verify on every tick"
    );
    let p = env.processes("cnt");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0]["vpid"], VPID_BASE + 1);
    assert!(
        p[0]["command"].as_str().unwrap().contains("counter 40 16"),
        "ps shows its own command line: {}",
        p[0]
    );
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", p[0]["pid"])).unwrap();
    assert_eq!(comm.trim(), "counter");
    // The restored process answers mig like any other.
    let t = env.table("cnt", false);
    assert_eq!(t["processes"][0]["vpid"], VPID_BASE + 1);
    env.stop("cnt");
}

#[test]
fn ten_checkpoint_restore_cycles_leave_the_state_intact() {
    let env = Env::new("cycles");
    let mut log = start_counter(&env, "8");
    for i in 0..10 {
        let img = env.root.join(format!("img{i}"));
        ok(
            &env,
            &[
                "checkpoint",
                "cnt",
                "--out",
                img.to_str().unwrap(),
                "--stop",
            ],
        );
        env.wait_processes("cnt", "the session to end", |p| p.is_empty());
        let last = *counts(&log).last().unwrap();
        // The previous image goes: each image stands on its own.
        if i > 0 {
            std::fs::remove_dir_all(env.root.join(format!("img{}", i - 1))).unwrap();
        }
        log = env.root.join(format!("after{i}.log"));
        ok(
            &env,
            &[
                "restore",
                img.to_str().unwrap(),
                "--detach",
                "--log",
                log.to_str().unwrap(),
            ],
        );
        let after = wait_counts(&log, 2);
        assert_eq!(after[0], last + 1, "cycle {i}: {after:?}");
    }
    assert!(!std::fs::read_to_string(&log).unwrap().contains("damaged"));
    env.stop("cnt");
}

#[test]
fn a_lazy_restore_checks_what_it_copies_in_before_anything_runs() {
    // Lazily, most page data is checked as the pager reads it; what the restorer copies in
    // itself (the stack, small regions) is checked before anything is made.
    if !is_root() {
        println!("SKIP: a lazy restore needs a userfaultfd that reports forks (root)");
        return;
    }
    use migrt::image::{self, PageMap, Region, Tag};
    let env = Env::new("damaged-copy");
    start_counter(&env, "4");
    let img = env.root.join("img");
    stop_into(&env, "cnt", &img);
    let file = img.join(format!("proc-{}.img", VPID_BASE + 1));
    let (_, sections) = image::read_all(&file).unwrap();
    let stack = sections
        .iter()
        .find(|s| s.tag == Tag::Regions)
        .map(|s| s.decode::<Vec<Region>>(&file).unwrap())
        .unwrap()
        .into_iter()
        .find(|r| r.name.0 == b"[stack]")
        .unwrap();
    // The page data that follows the stack's page map (at the page boundary after its
    // section header, as the restore reads it).
    let data = sections
        .windows(2)
        .find(|w| {
            w[0].tag == Tag::PageMap
                && (stack.start..stack.end).contains(&w[0].decode::<PageMap>(&file).unwrap().start)
        })
        .map(|w| (w[1].offset + 32).div_ceil(4096) * 4096)
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[data as usize + 100] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let o = env.run(&["restore", img.to_str().unwrap(), "--lazy", "--detach"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    let e = text(&o.stderr);
    assert!(
        e.contains(file.to_str().unwrap()) && e.contains("damaged"),
        "{e}"
    );
    assert!(
        env.processes("cnt").is_empty(),
        "nothing runs: {:?}",
        env.ps()
    );
}

#[test]
fn a_damaged_image_is_refused_before_anything_is_made() {
    let env = Env::new("damaged");
    start_counter(&env, "4");
    let img = env.root.join("img");
    stop_into(&env, "cnt", &img);
    let file = img.join(format!("proc-{}.img", VPID_BASE + 1));
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let at = good.len() / 2;
    bad[at] ^= 1;
    std::fs::write(&file, &bad).unwrap();
    let o = env.run(&["restore", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(
        e.contains(file.to_str().unwrap()) && e.contains("damaged"),
        "{e}"
    );
    assert!(
        env.ps().as_array().unwrap().is_empty(),
        "no session was made"
    );
    // Lazily, page data is checked as it is read: the process is ended the moment its
    // damaged pages are found, with the file named in its log.
    if is_root() {
        let log = env.root.join("lazy.log");
        let o = env.run(&[
            "restore",
            img.to_str().unwrap(),
            "--lazy",
            "--detach",
            "--log",
            log.to_str().unwrap(),
        ]);
        // (Found while it starts, the restore fails; after, the session ends.)
        let t = wait_for_text(&log, "damaged");
        assert!(t.contains(file.to_str().unwrap()), "{t}");
        if !o.status.success() {
            assert!(text(&o.stderr).contains("lazy.log"), "{}", text(&o.stderr));
        }
        env.wait_processes("cnt", "the damaged session to end", |p| p.is_empty());
    }
    std::fs::write(&file, &good[..good.len() - 100]).unwrap();
    let e = text(&env.run(&["restore", img.to_str().unwrap()]).stderr);
    assert!(e.contains("truncated"), "{e}");
    let e = text(
        &env.run(&["restore", env.root.join("nothing").to_str().unwrap()])
            .stderr,
    );
    assert!(e.contains("session.img"), "{e}");
    // Intact again, it restores.
    std::fs::write(&file, &good).unwrap();
    ok(
        &env,
        &[
            "restore",
            img.to_str().unwrap(),
            "--detach",
            "--log",
            env.root.join("ok.log").to_str().unwrap(),
        ],
    );
    // A second copy under the same, live, name is refused; under another name it runs.
    let o = env.run(&["restore", img.to_str().unwrap(), "--detach"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("already running"),
        "{}",
        text(&o.stderr)
    );
    env.stop("cnt");
}

#[test]
fn restores_inside_a_fresh_pid_namespace_with_other_real_pids() {
    if !is_root() {
        println!("SKIP: needs root for a PID namespace (unshare -p)");
        return;
    }
    let env = Env::new("pidns");
    start_counter(&env, "4");
    let img = env.root.join("img");
    stop_into(&env, "cnt", &img);
    let log = env.root.join("ns.log");
    let ps = env.root.join("ps.json");
    let script = format!(
        "{mig} restore {img} --detach --log {log} >/dev/null && sleep 0.5 && {mig} ps --json > {ps}",
        mig = mig_bin().display(),
        img = img.display(),
        log = log.display(),
        ps = ps.display()
    );
    let mut c = std::process::Command::new("unshare");
    c.args(["-p", "-f", "--mount-proc", "sh", "-c", &script])
        .env("MIGSHIM_RUNTIME_DIR", &env.rt);
    let o = env.output(c);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ps).unwrap()).unwrap();
    let p = &v[0]["processes"][0];
    assert_eq!(p["vpid"], VPID_BASE + 1);
    assert!(
        p["pid"].as_i64().unwrap() < 10,
        "a fresh namespace gives small real pids: {p}"
    );
    let c = counts(&log);
    assert!(c.len() >= 3, "it ran there: {c:?}");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .all(|l| l.ends_with(&format!("pid {}", VPID_BASE + 1)))
    );
}

/// A restore for the tests that run both ways: plainly, or inside a fresh PID namespace
/// (its init kept alive until this is dropped). Returns the restored session's log.
enum Restored {
    Plain,
    InPidNamespace(std::process::Child),
}

impl Restored {
    fn new(
        env: &Env,
        img: &Path,
        name: &str,
        pid_namespace: bool,
    ) -> (Restored, std::path::PathBuf) {
        if !pid_namespace {
            return (Restored::Plain, restore_detached(env, img, name));
        }
        let log = env.root.join(name);
        let script = format!(
            "{} restore {} --detach --log {} >/dev/null && exec sleep 600",
            mig_bin().display(),
            img.display(),
            log.display()
        );
        let child = std::process::Command::new("unshare")
            .args([
                "-p",
                "-f",
                "--kill-child",
                "--mount-proc",
                "sh",
                "-c",
                &script,
            ])
            .env("MIGSHIM_RUNTIME_DIR", &env.rt)
            .spawn()
            .unwrap();
        (Restored::InPidNamespace(child), log)
    }

    /// Ends the restored session.
    fn end(self, env: &Env, session: &str) {
        match self {
            Restored::Plain => env.stop(session),
            Restored::InPidNamespace(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The test's Env (tag suffixed for the PID-namespace run); None, said why, without root
/// for a PID namespace.
fn env_for(pid_namespace: bool, tag: &str) -> Option<Env> {
    if pid_namespace && !is_root() {
        println!("SKIP: needs root for a PID namespace (unshare -p)");
        return None;
    }
    Some(Env::new(&if pid_namespace {
        format!("{tag}-ns")
    } else {
        tag.to_string()
    }))
}

fn python_dict_and_file(pid_namespace: bool) {
    let Some(env) = env_for(pid_namespace, "pyrestore") else {
        return;
    };
    let out = env.root.join("numbers.txt");
    let script = format!(
        r#"
import time
d = {{i: str(i) * 3 for i in range(200000)}}
f = open("{out}", "w")
n = 0
while True:
    n += 1
    assert all(d[i] == str(i) * 3 for i in range(0, 200000, 997))
    f.write(f"{{n}}\n"); f.flush()
    print("count", n, flush=True)
    time.sleep(0.02)
"#,
        out = out.display()
    );
    let log = env.detach("py", &["python3", "-c", &script]);
    wait_counts(&log, 5);
    let img = env.root.join("img");
    stop_into(&env, "py", &img);
    let last = *counts(&log).last().unwrap();
    let (restored, log2) = Restored::new(&env, &img, "after.log", pid_namespace);
    let after = wait_counts(&log2, 5);
    restored.end(&env, "py");
    assert_eq!(after[0], last + 1, "{after:?}");
    // The file went on at its offset: every number once, in order.
    let nums: Vec<u64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(nums.len() as u64 >= last + 5);
    assert!(
        nums.iter().enumerate().all(|(i, &n)| n == i as u64 + 1),
        "{nums:?}"
    );
}

#[test]
fn python_with_a_large_dict_and_an_open_file_restores_intact() {
    python_dict_and_file(false);
}

#[test]
fn python_with_a_large_dict_restores_inside_a_fresh_pid_namespace() {
    python_dict_and_file(true);
}

#[test]
fn threads_with_mutexes_condvars_signals_and_join_restore() {
    threads_case("0", &[]);
}

#[test]
fn a_threaded_program_with_a_gibibyte_of_patterned_memory_restores_verified() {
    // The subject verifies its 1 GiB every tick and fails on the first wrong byte; lazily
    // restored, its threads fault the pages in together while the pager fills the rest.
    threads_case("1024", &["--lazy"]);
}

fn threads_case(mib: &str, restore_args: &[&str]) {
    let env = Env::new(&format!("threads-{mib}"));
    let log = env.detach(
        "th",
        &[c_program("threads").to_str().unwrap(), "60", "20", mib],
    );
    let ticks = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("tick"))
            .map(String::from)
            .collect()
    };
    wait_numbers(&log, "tick ", 5);
    let img = env.root.join("img");
    stop_into(&env, "th", &img);
    let before = ticks(&log);
    let last = before.last().unwrap().clone();
    // Not detached: mig restore returns the program's exit status.
    let mut c = env.mig();
    c.args(["restore", img.to_str().unwrap()])
        .args(restore_args);
    let o = env.output(c);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    assert!(
        out.contains("joined rseq=1,1,1,1"),
        "every thread was joined with its return value, its rseq area registered again: {out}"
    );
    let after: Vec<&str> = out.lines().filter(|l| l.starts_with("tick")).collect();
    let n = |l: &str| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
    assert_eq!(
        n(after[0]),
        n(&last) + 1,
        "goes on from {last}: {}",
        after[0]
    );
    let field = |l: &str, k: &str| -> Vec<i64> {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap()
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect()
    };
    let (w0, w1) = (field(&last, "work="), field(after.last().unwrap(), "work="));
    let (s0, s1) = (field(&last, "sig="), field(after.last().unwrap(), "sig="));
    for i in 0..3 {
        assert!(
            w1[i] > w0[i] + 10,
            "worker {i} kept working (condvar): {w0:?} -> {w1:?}"
        );
        assert!(
            s1[i] > s0[i] + 10,
            "pthread_kill reached worker {i}: {s0:?} -> {s1:?}"
        );
    }
    assert_eq!(
        field(&last, "tids="),
        field(after.last().unwrap(), "tids="),
        "same vtids"
    );
    assert!(field(&last, "tids=").iter().all(|&t| is_vpid(t)));
}

#[test]
fn process_state_comes_back_cwd_umask_rlimits_timers_and_handlers() {
    let env = Env::new("pstate");
    let dir = env.scratch("work here");
    let script = r#"
import os, resource, signal, time
os.chdir(os.environ["WORK"])
os.umask(0o027)
resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
alarms = 0
def on_alarm(s, f):
    global alarms
    alarms += 1
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
n = 0
while True:
    n += 1
    m = os.umask(0); os.umask(m)
    print("count", n, "alarms", alarms, "cwd", os.getcwd(), "umask", oct(m), "nofile", resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
    time.sleep(0.05)
"#;
    let mut c = env.mig();
    c.env("WORK", &dir)
        .args(["run", "--detach", "--name", "ps", "--log"])
        .arg(env.root.join("a.log"))
        .args(["--", "python3", "-c", script]);
    assert!(env.output(c).status.success());
    let log = env.root.join("a.log");
    wait_counts(&log, 5);
    let img = env.root.join("img");
    stop_into(&env, "ps", &img);
    let before = std::fs::read_to_string(&log).unwrap();
    let alarms = |l: &str| l.split_whitespace().nth(3).unwrap().parse::<u64>().unwrap();
    let a0 = alarms(before.lines().last().unwrap());
    let log2 = restore_detached(&env, &img, "b.log");
    let after = wait_counts(&log2, 8);
    assert!(after.len() >= 8);
    let text2 = std::fs::read_to_string(&log2).unwrap();
    let last = text2.lines().last().unwrap();
    assert!(
        alarms(last) > a0 + 5,
        "the interval timer and its handler run on: {a0} -> {last}"
    );
    assert!(last.contains(&format!("cwd {}", dir.display())), "{last}");
    assert!(
        last.contains("umask 0o27") && last.contains("nofile 200"),
        "{last}"
    );
    env.stop("ps");
}

#[test]
fn a_program_file_changed_since_the_checkpoint_is_refused_unless_allowed() {
    let env = Env::new("changed");
    // A copy of the counter that the test can change.
    let prog = env.scratch("bin").join("counter");
    std::fs::copy(c_program("counter"), &prog).unwrap();
    let log = env.detach("cnt", &[prog.to_str().unwrap(), "40", "1"]);
    wait_counts(&log, 3);
    let img = env.root.join("img");
    stop_into(&env, "cnt", &img);
    let bytes = std::fs::read(&prog).unwrap();
    std::fs::write(&prog, [&bytes[..], b"\0"].concat()).unwrap();
    let o = env.run(&["restore", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(
        e.contains("changed since the checkpoint") && e.contains("--allow-changed-files"),
        "{e}"
    );
    assert!(
        env.ps().as_array().unwrap().is_empty(),
        "nothing was started"
    );
    // Put back as it was (same size, same time), it restores; stdout goes where asked.
    std::fs::write(&prog, &bytes).unwrap();
    let out = env.root.join("out.txt");
    let o = env.run(&[
        "restore",
        img.to_str().unwrap(),
        "--allow-changed-files",
        "--detach",
        "--stdout",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_counts(&out, 2);
    env.stop("cnt");
}

#[test]
fn a_process_tree_restores_and_its_children_are_reaped_with_their_vpids() {
    let env = Env::new("tree");
    let script = r#"
import os, time
kids = []
for k in range(2):
    pid = os.fork()
    if pid == 0:
        for n in range(1, 1000):
            os.write(1, f"child {k} {os.getpid()} {os.getppid()} {n}\n".encode())
            time.sleep(0.05)
            if n >= 80: os._exit(7 + k)
    kids.append(pid)
os.write(1, f"kids {kids[0]} {kids[1]}\n".encode())
for pid in kids:
    r, st = os.waitpid(pid, 0)
    os.write(1, f"reaped {r} {os.WEXITSTATUS(st)}\n".encode())
os.write(1, b"all reaped\n")
"#;
    let log = env.detach("tree", &["python3", "-c", script]);
    env.wait_processes("tree", "3 processes", |p| p.len() == 3);
    let groups = |env: &Env| -> Vec<(i64, i64)> {
        env.table("tree", false)["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["pgid"].as_i64().unwrap(), p["sid"].as_i64().unwrap()))
            .collect()
    };
    let before = groups(&env);
    assert!(
        before.iter().all(|g| g.0 == VPID_BASE + 1),
        "one group, led by the root: {before:?}"
    );
    wait_for_text(&log, "child 1");
    let kids: Vec<i64> = wait_for_text(&log, "kids")
        .lines()
        .find(|l| l.starts_with("kids"))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let img = env.root.join("img");
    stop_into(&env, "tree", &img);
    let log2 = restore_detached(&env, &img, "after.log");
    let after = groups(&env);
    assert_eq!(after.len(), 3);
    assert!(
        after.iter().all(|g| g.0 == VPID_BASE + 1),
        "the same group again: {after:?}"
    );
    let out = wait_for_text(&log2, "all reaped");
    // The children run on under their parent, and it reaps them with their vpids.
    for (k, kid) in kids.iter().enumerate() {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("child {k} ")))
            .unwrap_or_else(|| panic!("{out}"));
        let f: Vec<i64> = line
            .split_whitespace()
            .skip(2)
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!((f[0], f[1]), (*kid, VPID_BASE + 1), "{line}");
        assert!(out.contains(&format!("reaped {kid} {}", 7 + k)), "{out}");
    }
    assert!(out.contains("all reaped"), "{out}");
}

/// Runs python `script` (with `wait()`, which waits for the go file, and `read_all(fd)`)
/// as a session of `processes` processes once it says "ready", checkpoints and restores
/// it, lets it go on, and returns its log once it says "read:".
fn pipe_read_after_restore(name: &str, script: &str, processes: usize) -> String {
    let env = Env::new(name);
    let go = env.root.join("go");
    let prelude = format!(
        r#"
import os, time
def wait():
    while not os.path.exists("{}"):
        time.sleep(0.02)
def read_all(fd):
    data = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
"#,
        go.display()
    );
    let log = env.detach("p", &["python3", "-c", &(prelude + script)]);
    wait_for_text(&log, "ready");
    env.wait_processes("p", "its processes", |p| p.len() == processes);
    std::thread::sleep(std::time::Duration::from_millis(200)); // what they write is written
    let img = env.root.join("img");
    stop_into(&env, "p", &img);
    let log2 = restore_detached(&env, &img, "after.log");
    std::fs::write(&go, "").unwrap();
    wait_for_text(&log2, "read:")
}

#[test]
fn a_pipe_between_processes_comes_back_with_its_unread_bytes() {
    let script = r#"
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    os.write(w, b"before the checkpoint\n")
    wait()
    os.write(w, b"after the restore\n")
    os._exit(0)
os.close(w)
os.write(1, b"ready\n")
wait()
os.write(1, b"read: " + read_all(r).replace(b"\n", b"|") + b"\n")
os.wait()
"#;
    let out = pipe_read_after_restore("pipes", script, 2);
    assert!(
        out.contains("read: before the checkpoint|after the restore|"),
        "{out}"
    );
}

#[test]
fn a_pipe_that_eight_processes_read_comes_back_with_its_unread_bytes_once() {
    // Their images are written at once; only the first one's dump reads out what the pipe
    // holds (and puts it back): several at once would each get part of it.
    let script = r#"
r, w = os.pipe()
held = bytes(i % 251 for i in range(60000))
os.write(w, held)
os.close(w)
for k in range(7):
    if os.fork() == 0:
        wait()
        os._exit(0)
os.write(1, b"ready\n")
wait()
data = read_all(r)
ok = b"as held" if data == held else b"NOT as held"
os.write(1, b"read: %d bytes, %s\n" % (len(data), ok))
for k in range(7):
    os.wait()
"#;
    let out = pipe_read_after_restore("pipes8", script, 8);
    assert!(out.contains("read: 60000 bytes, as held"), "{out}");
}

fn bash_loop(pid_namespace: bool) {
    let Some(env) = env_for(pid_namespace, "bashloop") else {
        return;
    };
    let log = env.detach(
        "lb",
        &[
            "bash",
            "-c",
            "i=0; while true; do i=$((i+1)); echo \"loop $i $$\"; sleep 0.05; done",
        ],
    );
    wait_numbers(&log, "loop ", 5);
    let img = env.root.join("img");
    stop_into(&env, "lb", &img);
    let last = *numbers(&log, "loop ").last().unwrap();
    let (restored, log2) = Restored::new(&env, &img, "after.log", pid_namespace);
    let after = wait_numbers(&log2, "loop ", 5);
    restored.end(&env, "lb");
    assert_eq!(after[0], last + 1, "{after:?}");
    assert!(
        std::fs::read_to_string(&log2)
            .unwrap()
            .lines()
            .all(|l| l.ends_with(&format!(" {}", VPID_BASE + 1))),
        "same $$"
    );
}

#[test]
fn a_bash_loop_script_restores_and_goes_on() {
    bash_loop(false);
}

#[test]
fn a_bash_loop_script_restores_inside_a_fresh_pid_namespace() {
    bash_loop(true);
}

#[test]
fn anonymous_shared_memory_stays_shared_between_restored_processes() {
    let env = Env::new("shm");
    let script = r#"
import mmap, os, struct, time
m = mmap.mmap(-1, 4096)   # MAP_SHARED | MAP_ANONYMOUS, kept across fork
m[:8] = struct.pack("Q", 1000)
if os.fork() == 0:
    while True:   # the child counts in the shared page
        n = struct.unpack("Q", m[:8])[0]
        m[:8] = struct.pack("Q", n + 1)
        time.sleep(0.01)
while True:      # the parent reports what it sees there
    os.write(1, f"seen {struct.unpack('Q', m[:8])[0]}\n".encode())
    time.sleep(0.05)
"#;
    let log = env.detach("shm", &["python3", "-c", script]);
    env.wait_processes("shm", "both processes", |p| p.len() == 2);
    let seen = |p: &Path| -> Vec<u64> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("seen ")?.parse().ok())
            .collect()
    };
    let t = std::time::Instant::now();
    while seen(&log).last().copied().unwrap_or(0) < 1010 {
        assert!(t.elapsed().as_secs() < 10, "{:?}", seen(&log));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let img = env.root.join("img");
    stop_into(&env, "shm", &img);
    let before = *seen(&log).last().unwrap();
    let log2 = restore_detached(&env, &img, "after.log");
    let t = std::time::Instant::now();
    loop {
        let s = seen(&log2);
        // The parent sees the restored child's counting: the page is one object again.
        if s.len() >= 3 && s.last().unwrap() > &(s[0] + 5) {
            assert!(s[0] >= before, "{before} then {s:?}");
            break;
        }
        assert!(
            t.elapsed().as_secs() < 10,
            "the parent no longer sees the child's writes: {s:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    env.stop("shm");
}

#[test]
fn shared_memory_of_a_tree_is_stored_once_and_every_process_has_it_whole_again() {
    // postgres's buffers, a forked server's scoreboard: one object mapped by all.
    let env = Env::new("shm-once");
    let script = r#"
import hashlib, mmap, os, random, time
m = mmap.mmap(-1, 24 << 20)   # MAP_SHARED | MAP_ANONYMOUS, kept across fork
for at in range(0, len(m), 1 << 16):   # (no 24 MiB copy in each process's heap)
    m[at:at + (1 << 16)] = random.randbytes(1 << 16)
want = hashlib.sha256(m).hexdigest()
kids = 3
for k in range(kids):
    if os.fork() == 0:
        break
else:
    k = kids
for n in range(1, 100000):
    ok = hashlib.sha256(m).hexdigest() == want
    os.write(1, f"p{k} {n} {'ok' if ok else 'DAMAGED'}\n".encode())
    time.sleep(0.1)
"#;
    let log = env.detach("shm", &["python3", "-c", script]);
    for k in 0..4 {
        wait_numbers(&log, &format!("p{k} "), 2);
    }
    let img = env.root.join("img");
    let said = ok(
        &env,
        &[
            "checkpoint",
            "shm",
            "--out",
            img.to_str().unwrap(),
            "--stop",
        ],
    );
    env.wait_processes("shm", "the session to end", |p| p.is_empty());
    // Once (24 MiB, and ~8 MiB of python's own per process), not once per process
    // (96 MiB and theirs).
    let written = agents::kib_before(&said, "written") / 1024.0;
    assert!(written < 80.0, "{written} MiB written: {said}");
    restored_tree_goes_on(&env, &img, &log, 4);
    env.stop("shm");
}

/// Restores `img` (a tree of `n` processes printing "pK N ok" lines into `log`, or
/// "DAMAGED"): each goes on from its last number, undamaged.
fn restored_tree_goes_on(env: &Env, img: &Path, log: &Path, n: usize) {
    tree_went_on(log, &restore_detached(env, img, "after.log"), n);
}

#[test]
fn a_forked_tree_comes_back_sharing_what_its_processes_had_alike() {
    // A prefork server: workers forked once the parent filled its memory share it,
    // copy-on-write, each with pages of its own. Restored, they share it again (not a copy
    // each), and each still sees its own pages, and not the others'.
    let env = Env::new("cow-tree");
    let log = env.detach("cow", &["python3", "-c", COW_TREE]);
    for k in 0..4 {
        wait_numbers(&log, &format!("p{k} "), 2);
    }
    let pids = |env: &Env| -> Vec<i32> {
        let ps = env.processes("cow");
        ps.iter()
            .map(|p| p["pid"].as_i64().unwrap() as i32)
            .collect()
    };
    let before = pss_mib(&pids(&env));
    let img = env.root.join("img");
    stop_into(&env, "cow", &img);
    restored_tree_goes_on(&env, &img, &log, 4);
    assert_shares_again(before, pss_mib(&pids(&env)));
    env.stop("cow");
}

#[test]
fn python_multiprocessing_with_a_pool_a_lock_a_queue_and_a_shared_value_goes_on() {
    // Its shared objects live in files made by mkstemp (O_NOFOLLOW) and deleted at once.
    let env = Env::new("mp");
    let script = r#"
import multiprocessing as mp, time
def square(x):
    return x * x
def bump(v, lock, q):
    while True:
        with lock:
            v.value += 1
        q.put(v.value)
        time.sleep(0.02)
if __name__ == "__main__":
    v, lock, q = mp.Value("i", 0), mp.Lock(), mp.Queue()
    mp.Process(target=bump, args=(v, lock, q), daemon=True).start()
    with mp.Pool(3) as pool:
        for n in range(1, 100000):
            r = sum(pool.map(square, range(100)))
            print(f"round {n} {r} value={v.value} queued={q.get(timeout=10)}", flush=True)
            time.sleep(0.05)
"#;
    let script_file = env.root.join("mp.py");
    std::fs::write(&script_file, script).unwrap();
    let log = env.detach("mp", &["python3", script_file.to_str().unwrap()]);
    wait_numbers(&log, "round ", 3);
    let img = env.root.join("img");
    stop_into(&env, "mp", &img);
    let last = *numbers(&log, "round ").last().unwrap();
    let value = |l: &str| -> u64 { ints_after(l, "value")[0] as u64 };
    let before = std::fs::read_to_string(&log).unwrap();
    let last_value = before
        .lines()
        .rfind(|l| l.starts_with("round "))
        .map(value)
        .unwrap();
    let log2 = restore_detached(&env, &img, "after.log");
    let after = wait_numbers(&log2, "round ", 3);
    assert_eq!(after[0], last + 1, "the pool's rounds went on");
    let said = std::fs::read_to_string(&log2).unwrap();
    let rounds: Vec<&str> = said.lines().filter(|l| l.starts_with("round ")).collect();
    // The pool's answers are right, and the shared value went on counting from where it was.
    assert!(rounds.iter().all(|l| l.contains(" 328350 ")), "{said}");
    assert!(
        rounds.iter().all(|l| value(l) > last_value),
        "{last_value} then {said}"
    );
    assert!(!said.contains("Traceback"), "{said}");
    env.stop("mp");
}

#[test]
fn a_posix_shared_memory_object_comes_back_on_a_host_that_lacks_it() {
    // shm_open's objects live in /dev/shm, memory of the host: they go with the image.
    let env = Env::new("posix-shm");
    let name = format!("migtest-{}", std::process::id());
    let script = r#"
import os, sys, time
from multiprocessing import shared_memory
s = shared_memory.SharedMemory(create=True, size=1 << 20, name=sys.argv[1])
s.buf[:8] = b"pattern!"
if os.fork() == 0:   # the child attaches by name and reports what the parent wrote
    t = shared_memory.SharedMemory(name=sys.argv[1])
    while True:
        os.write(1, f"seen {t.buf[8]} {bytes(t.buf[:8])}\n".encode()); time.sleep(0.05)
for n in range(1, 100000):
    s.buf[8] = n % 256
    os.write(1, f"wrote {n % 256}\n".encode()); time.sleep(0.05)
"#;
    let log = env.detach("psm", &["python3", "-c", script, &name]);
    wait_numbers(&log, "seen ", 3);
    let img = env.root.join("img");
    stop_into(&env, "psm", &img);
    let object = std::path::Path::new("/dev/shm").join(&name);
    std::fs::remove_file(&object).unwrap(); // as on another host
    let log2 = restore_detached(&env, &img, "after.log");
    wait_numbers(&log2, "wrote ", 5);
    let seen = wait_numbers(&log2, "seen ", 5);
    let wrote = numbers(&log2, "wrote ");
    // The child still sees the parent's writes: the object is one again, and whole.
    assert!(
        seen.iter().any(|s| wrote.contains(s) && *s > wrote[0]),
        "{seen:?} {wrote:?}"
    );
    let said = std::fs::read_to_string(&log2).unwrap();
    assert!(
        said.lines()
            .filter(|l| l.starts_with("seen "))
            .all(|l| l.ends_with("b'pattern!'")),
        "{said}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&object).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "made again with its mode");
    env.stop("psm");
    let _ = std::fs::remove_file(&object);
}

#[test]
fn a_program_that_reserved_more_memory_than_the_host_has_restores() {
    // MAP_NORESERVE, as runtimes and sanitizers reserve: twice the host's memory and swap.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib = |k: &str| -> u64 {
        let l = meminfo.lines().find(|l| l.starts_with(k)).unwrap();
        l.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let gib = (kib("MemTotal:") + kib("SwapTotal:")) / (1 << 20) * 2 + 1;
    let env = Env::new("reserved");
    let sparse = c_program("sparsemem");
    let log = env.detach("res", &[sparse.to_str().unwrap(), "16", &gib.to_string()]);
    wait_numbers(&log, "tick ", 2);
    let img = env.root.join("img");
    stop_into(&env, "res", &img);
    let last = *numbers(&log, "tick ").last().unwrap();
    let log2 = restore_detached(&env, &img, "after.log");
    assert_eq!(
        wait_numbers(&log2, "tick ", 2)[0],
        last + 1,
        "{gib} GiB reserved"
    );
    let out = std::fs::read_to_string(&log2).unwrap();
    assert!(!out.contains("BAD"), "{out}");
    env.stop("res");
}

#[test]
fn a_lazy_restore_runs_at_once_and_its_memory_is_filled_in_while_it_changes_it() {
    // The subject frees, moves and forks its memory every tick, checking it each time;
    // the pager is slowed so that all of this happens while pages are still missing.
    if !is_root() {
        println!("SKIP: a lazy restore needs userfaultfd for kernel-mode faults (root here)");
        return;
    }
    let env = Env::new("lazy");
    let log = env.detach("lazy", &[c_program("lazymem").to_str().unwrap(), "128"]);
    wait_numbers(&log, "tick ", 3);
    let img = env.root.join("img");
    stop_into(&env, "lazy", &img);
    let last = *numbers(&log, "tick ").last().unwrap();
    let mut c = env.mig();
    c.env("MIGSHIM_PAGER_THROTTLE_MS", "5").args([
        "restore",
        img.to_str().unwrap(),
        "--detach",
        "--lazy",
        "--log",
        env.root.join("restored.log").to_str().unwrap(),
    ]);
    let o = env.output(c);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // Back means itself again: ps shows its command line as soon as mig restore returns.
    let p = env.processes("lazy");
    assert!(
        p[0]["command"].as_str().unwrap().contains("lazymem 128"),
        "{p:?}"
    );
    let rlog = env.root.join("restored.log");
    let after = wait_numbers(&rlog, "tick ", 30);
    assert_eq!(after[0], last + 1, "it went on: {after:?}");
    let text = std::fs::read_to_string(&rlog).unwrap();
    assert!(!text.contains("BAD"), "{text}");
    // Filled in, the pager is gone; the session checkpoints and restores (eagerly) again.
    let t = std::time::Instant::now();
    while pager_running(&img) {
        assert!(t.elapsed().as_secs() < 30, "the pager never finished");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let img2 = env.root.join("img2");
    stop_into(&env, "lazy", &img2);
    let last = *numbers(&rlog, "tick ").last().unwrap();
    let rlog2 = restore_detached(&env, &img2, "again.log");
    let after = wait_numbers(&rlog2, "tick ", 5);
    assert_eq!(after[0], last + 1);
    assert!(!std::fs::read_to_string(&rlog2).unwrap().contains("BAD"));
    env.stop("lazy");
}

/// Whether a lazy restore's pager for image `img` is still running.
fn pager_running(img: &Path) -> bool {
    let needle = img.to_str().unwrap();
    std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
        std::fs::read(p.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
    })
}

#[test]
fn a_worker_forked_from_a_signal_handler_is_frozen_and_restored_like_any_other() {
    // postgres's postmaster starts its children from its signal handlers: each lives its
    // whole life inside the handler its parent ran.
    let env = Env::new("handlerfork");
    let file = env.root.join("worker.out");
    let log = env.detach(
        "hf",
        &[
            c_program("handlerfork").to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    );
    wait_numbers(&log, "worker ", 3);
    let img = env.root.join("img");
    stop_into(&env, "hf", &img);
    let (worker, parent) = (numbers(&log, "worker "), numbers(&log, "parent "));
    let log2 = restore_detached(&env, &img, "after.log");
    let after = wait_numbers(&log2, "worker ", 3);
    wait_numbers(&log2, "parent ", 3);
    assert_eq!(after[0], worker.last().unwrap() + 1, "the worker went on");
    assert_eq!(
        numbers(&log2, "parent ")[0],
        parent.last().unwrap() + 1,
        "the parent went on"
    );
    // Its file offset came back with it: each line's size check held.
    let out = std::fs::read_to_string(&log2).unwrap();
    assert!(!out.contains("BAD") && !out.contains("ended"), "{out}");
    // It can be frozen again there: it journals (a table with its file), as any process.
    let table = env.table("hf", false).to_string();
    assert!(table.contains("worker.out"), "{table}");
    env.stop("hf");
}

#[test]
fn workers_that_changed_user_are_checkpointed_and_come_back_as_that_user() {
    // As servers started by root run their workers (nginx, apache): forked, then as nobody;
    // or as a program started as nobody (runuser, su, setpriv: they change user, then exec
    // it — it may not open the session's table by its path).
    if !is_root() {
        println!("SKIP: needs root (the workers change their user)");
        return;
    }
    let env = Env::new("user");
    let script = r#"
import os, subprocess, sys, time
TICK = """import os, sys, time
for n in range(1, 100000):
    os.write(1, f"{sys.argv[1]} {n} uid {os.getuid()} {os.geteuid()} gid {os.getgid()}\\n".encode())
    time.sleep(0.05)
"""
if os.fork() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    sys.argv[1:] = ["worker"]
    exec(TICK)
nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
subprocess.Popen(nobody + [sys.executable, "-c", TICK, "execd"])
for n in range(1, 100000):
    os.write(1, f"main {n}\n".encode())
    time.sleep(0.05)
"#;
    let log = env.detach("user", &["python3", "-c", script]);
    wait_numbers(&log, "worker ", 3);
    wait_numbers(&log, "execd ", 3);
    let img = env.root.join("img");
    stop_into(&env, "user", &img);
    let log2 = restore_detached(&env, &img, "after.log");
    for who in ["worker ", "execd "] {
        let last = *numbers(&log, who).last().unwrap();
        assert_eq!(wait_numbers(&log2, who, 3)[0], last + 1, "{who}went on");
    }
    let said = std::fs::read_to_string(&log2).unwrap();
    assert!(
        said.lines()
            .filter(|l| !l.starts_with("main "))
            .all(|l| l.contains("uid 65534 65534 gid 65534")),
        "{said}"
    );
    let pids: Vec<i64> = env
        .processes("user")
        .iter()
        .map(|p| p["pid"].as_i64().unwrap())
        .collect();
    assert_root_then_nobody(&pids);
    // Their own control sockets could not be made in root's session directory: they are
    // reached another way, and checkpointed again there.
    let done = numbers(&log2, "execd ").len();
    let img2 = env.root.join("img2");
    ok(
        &env,
        &["checkpoint", "user", "--out", img2.to_str().unwrap()],
    );
    wait_numbers(&log2, "execd ", done + 3);
    env.stop("user");
}

/// Python that ticks ("tick N", every 50 ms) while `sys.argv[1]` does not exist (forever
/// with `go=None`), then does the script's next step.
const TICKS: &str = r#"
import os, signal, sys, time
n = 0
def ticks(go=sys.argv[1]):
    global n
    while go is None or not os.path.exists(go):
        n += 1
        print(f"tick {n}", flush=True)
        time.sleep(0.05)
"#;

/// Two children that end at once; the parent waits for them only once `sys.argv[1]`
/// exists — the first with waitpid, the second with waitid for any child — and says what
/// it got.
const ENDED_UNWAITED: &str = r#"
kids = []
for code in (7, 9):
    pid = os.fork()
    if pid == 0:
        os._exit(code)
    kids.append(pid)
ticks()
p, st = os.waitpid(kids[0], 0)
print(f"waitpid {p == kids[0]} {os.waitstatus_to_exitcode(st)}", flush=True)
info = os.waitid(os.P_ALL, 0, os.WEXITED)
print(f"waitid {info.si_pid == kids[1]} {info.si_status}", flush=True)
child = os.fork()
if child == 0:
    os._exit(0)
print(f"new child {child not in kids}", flush=True)
os.waitpid(child, 0)
ticks(None)
"#;

#[test]
fn children_that_ended_unwaited_are_waited_for_after_the_restore() {
    // Frozen between its children's exit and its wait: they are no processes (zombies), and
    // no restore can make them again; its waits answer them as the kernel would have.
    let env = Env::new("restore-zombies");
    let go = env.root.join("go");
    let log = env.detach(
        "z",
        &[
            "python3",
            "-c",
            &format!("{TICKS}{ENDED_UNWAITED}"),
            go.to_str().unwrap(),
        ],
    );
    wait_numbers(&log, "tick ", 3);
    let img = env.root.join("img");
    stop_into(&env, "z", &img);
    let there = restore_detached(&env, &img, "z2");
    wait_numbers(&there, "tick ", 2);
    std::fs::write(&go, "").unwrap();
    let text = wait_for_text(&there, "new child");
    assert!(text.contains("waitpid True 7"), "{text}");
    assert!(text.contains("waitid True 9"), "{text}");
    assert!(text.contains("new child True"), "{text}");
    env.stop("z2");
}

/// Twenty children that end while SIGCHLD is ignored; once `sys.argv[1]` exists, the
/// parent says whether it has a child to wait for.
const REAPED_BY_THE_KERNEL: &str = r#"
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
for _ in range(20):
    if os.fork() == 0:
        os._exit(3)
time.sleep(0.3)
ticks()
try:
    os.wait()
    print("a child to wait for", flush=True)
except ChildProcessError:
    print("no child to wait for", flush=True)
ticks(None)
"#;

#[test]
fn children_the_kernel_reaped_itself_cost_the_freeze_nothing_and_stay_gone() {
    // SIGCHLD ignored: the kernel reaps the children as they end, and nobody waits for
    // them. The dump must not wait for them to become waitable (it once did, 100 ms each:
    // two seconds frozen here), and no restore makes them waitable.
    let env = Env::new("restore-reaped");
    let go = env.root.join("go");
    let log = env.detach(
        "r",
        &[
            "python3",
            "-c",
            &format!("{TICKS}{REAPED_BY_THE_KERNEL}"),
            go.to_str().unwrap(),
        ],
    );
    wait_numbers(&log, "tick ", 3);
    let img = env.root.join("img");
    let out = ok(
        &env,
        &["checkpoint", "r", "--out", img.to_str().unwrap(), "--stop"],
    );
    let frozen: f64 = out
        .split("frozen ")
        .nth(1)
        .and_then(|s| s.split(" ms").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no freeze time in: {out}"));
    assert!(
        frozen < 1000.0,
        "frozen {frozen} ms for 20 reaped children: {out}"
    );
    env.wait_processes("r", "the session to end", |p| p.is_empty());
    let there = restore_detached(&env, &img, "r2");
    wait_numbers(&there, "tick ", 2);
    std::fs::write(&go, "").unwrap();
    let text = wait_for_text(&there, "child to wait for");
    assert!(text.contains("no child to wait for"), "{text}");
    env.stop("r2");
}

/// A thread and a child process per round, each ended and waited for before the next;
/// three threads live throughout. Every 200 rounds: "tick ROUND HIGHEST" (the highest id
/// given in those rounds, less the first virtual id's base); "collision" if a new id was
/// one a living thread or the process itself has.
/// "tick N ID" lines: the ids handed out stay within the first ~1,100.
fn assert_ids_stay_low(text: &str) {
    let highest = (text.lines())
        .filter_map(|l| {
            l.strip_prefix("tick ")?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0u32);
    assert!(highest < 1100, "ids up to {highest}: {text}");
}

const A_THREAD_AND_A_CHILD_PER_ROUND: &str = r#"
import os, threading, time
BASE = 4200000
keep = [os.getpid()]
for _ in range(3):
    threading.Thread(target=lambda: keep.append(threading.get_native_id()) or time.sleep(1e9), daemon=True).start()
time.sleep(0.1)
ids = []
n = 0
while True:
    n += 1
    t = threading.Thread(target=lambda: ids.append(threading.get_native_id()))
    t.start()
    t.join()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    ids.append(pid)
    if ids[-1] in keep or ids[-2] in keep:
        print("collision", flush=True)
    if n % 200 == 0:
        print(f"tick {n} {max(ids) - BASE}", flush=True)
        ids.clear()
"#;

#[test]
fn ids_of_ended_threads_and_children_are_given_again_before_and_after_a_restore() {
    // A server starting a thread or a process per request: the ids of those that ended
    // are given again (after about a thousand others), so the table does not fill up.
    let env = Env::new("restore-reuse");
    let log = env.detach("reuse", &["python3", "-c", A_THREAD_AND_A_CHILD_PER_ROUND]);
    let before = wait_numbers(&log, "tick ", 5);
    let img = env.root.join("img");
    stop_into(&env, "reuse", &img);
    let there = restore_detached(&env, &img, "reuse2");
    let after = wait_numbers(&there, "tick ", 5);
    assert!(
        after[0] > *before.last().unwrap(),
        "{before:?} then {after:?}"
    );
    let text = format!(
        "{}{}",
        std::fs::read_to_string(&log).unwrap(),
        std::fs::read_to_string(&there).unwrap()
    );
    assert!(!text.contains("collision"), "{text}");
    // 2,000 threads and 2,000 processes before the checkpoint, as many after: the ids
    // stay within the first ~1,100.
    assert_ids_stay_low(&text);
    env.stop("reuse2");
}

/// A parent whose child starts a thread and is killed outright, then waited for, round
/// after round; "tick N ID" every 100 rounds (ID: the last child's, less 4200000).
const KILLS_ITS_CHILDREN: &str = r#"
import os, threading, time
n = 0
while True:
    n += 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        threading.Thread(target=time.sleep, args=(1e9,), daemon=True).start()
        os.write(w, b"x")
        time.sleep(1e9)
    os.read(r, 1)
    os.close(r)
    os.close(w)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    if n % 100 == 0:
        print(f"tick {n} {pid - 4200000}", flush=True)
"#;

#[test]
fn children_killed_outright_are_waited_for_after_restores_and_their_ids_given_again() {
    // Three ways this went wrong: a checkpoint between the kill and the wait missed the
    // dying child (its slot cannot say it ended), and waitpid said ECHILD after the restore
    // (python: ChildProcessError); one before the kill brought the child back, the parent
    // killed it at once, and the restore failed ("did not come back"), as it waited for the
    // child to say it was back; and the thread of each killed child kept its id, and its
    // process's, for good (the table grew by two per round).
    let env = Env::new("restore-kills");
    let mut log = env.detach("k", &["python3", "-c", KILLS_ITS_CHILDREN]);
    let mut text = String::new();
    for i in 0..4 {
        let last = *wait_numbers(&log, "tick ", 2).last().unwrap();
        let img = env.root.join(format!("img{i}"));
        stop_into(&env, "k", &img);
        text += &std::fs::read_to_string(&log).unwrap();
        log = restore_detached(&env, &img, &format!("k{i}.log"));
        let after = wait_numbers(&log, "tick ", 2);
        assert!(after[0] > last, "ticks {last} then {after:?}");
    }
    text += &std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("Error"), "{text}");
    assert_ids_stay_low(&text);
    env.stop("k");
}

#[test]
fn children_forked_as_a_control_thread_starts_come_back() {
    // A fork copies whatever another thread holds at that instant. The control thread, as
    // it started, read the session's place under a lock: a child forked then had that lock
    // held for good, and its restore waited on it until mig gave up (1 in ~20 restores of
    // the objects subject, whose timer thread starts just before its fork). A chain of 13,
    // each starting a thread and forking the next at once, comes back whole. (The instant
    // is a few microseconds wide: this chain did not meet it in 30 runs before the fix;
    // the objects tests, run in a loop, did.)
    let env = Env::new("restore-fork-threads");
    let log = env.detach("f", &[c_program("threadfork").to_str().unwrap()]);
    for k in 0..13 {
        wait_numbers(&log, &format!("p{k} "), 2);
    }
    let img = env.root.join("img");
    stop_into(&env, "f", &img);
    let there = restore_detached(&env, &img, "f2");
    tree_went_on(&log, &there, 13);
    env.stop("f2");
}

#[test]
fn a_daemon_whose_parent_ended_comes_back_beside_the_session_first_process() {
    // It forked twice: its parent ended, and it is nobody's child in the session. Before,
    // the restore refused such an image ("the image's processes form 2 trees, not one").
    let env = Env::new("restore-daemon");
    let log = env.detach("d", &["python3", "-c", DAEMON]);
    for k in 0..3 {
        wait_numbers(&log, &format!("p{k} "), 3);
    }
    let img = env.root.join("img");
    stop_into(&env, "d", &img);
    let there = restore_detached(&env, &img, "d2");
    tree_went_on(&log, &there, 3);
    env.stop("d2");
}
