//! Processes under the shim: virtual pids seen consistently by real programs (C, python3,
//! /bin/sh) across fork, exec, spawn, wait and kill; `mig ps` shows the tree.

mod common;
use common::*;
use serde_json::Value;

#[test]
fn c_fork_tree_cross_checks_pids() {
    let env = Env::new("forktree");
    let mut c = env.mig();
    c.args(["run", "--"]).arg(c_program("forktree"));
    let out = env.output(c);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "forktree failed: {stdout}{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("checks passed"), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("pids ")).unwrap();
    let mut ids: Vec<i64> = ["parent", "children", "grandchild"]
        .iter()
        .flat_map(|k| ints_after(line, k))
        .collect();
    assert_eq!(ids.len(), 5, "{line}");
    assert!(
        ids.iter().all(|&p| is_vpid(p)),
        "all pids the app saw are virtual: {line}"
    );
    assert_eq!(
        ids[0],
        VPID_BASE + 1,
        "the session's first process is vpid {}",
        VPID_BASE + 1
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "distinct: {line}");
}

#[test]
fn exit_status_passes_through() {
    let env = Env::new("exit");
    let code = |args: &[&str]| env.run(args).status.code();
    assert_eq!(code(&["run", "--", "sh", "-c", "exit 7"]), Some(7));
    assert_eq!(
        code(&["run", "--", "sh", "-c", "kill -TERM $$"]),
        Some(128 + 15)
    );
    let out = env.run(&["run", "--", "no-such-program-xyz"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("mig: no-such-program-xyz: not found"),
        "{}",
        text(&out.stderr)
    );
}

const PY_PROCS: &str = r#"
import json, os, signal, subprocess, sys, threading, time
me = os.getpid()
out = {"me": me, "ppid": os.getppid()}
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.write(w, json.dumps([os.getpid(), os.getppid()]).encode())
    time.sleep(30)
    os._exit(0)
seen = json.loads(os.read(r, 100))
out["fork_ret"], out["child_pid"], out["child_ppid"] = child, seen[0], seen[1]
os.kill(child, signal.SIGTERM)
pid, st = os.waitpid(child, 0)
out["waited"], out["term"] = pid, os.WIFSIGNALED(st) and os.WTERMSIG(st)
p = subprocess.run(["sh", "-c", "echo $$ $PPID"], capture_output=True, text=True)
out["sub_pid"], out["sub_ppid"] = map(int, p.stdout.split())
pop = subprocess.Popen(["sleep", "0.1"])
out["popen_pid"], out["popen_wait"] = pop.pid, pop.wait()
tids = []
def work():
    tids.append(threading.get_native_id())
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
out["tids"], out["main_tid"] = tids, threading.get_native_id()
print(json.dumps(out))
"#;

#[test]
fn python_fork_subprocess_threading() {
    let env = Env::new("python");
    let mut c = env.mig();
    c.args(["run", "--", "python3", "-c", PY_PROCS]);
    let (mig_pid, out) = env.output_pid(c);
    let mig_pid = mig_pid as i64;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let n = |k: &str| v[k].as_i64().unwrap_or_else(|| panic!("{k} in {v}"));
    assert!(is_vpid(n("me")), "{v}");
    assert_eq!(
        n("ppid"),
        mig_pid,
        "the session root's parent is outside: its real pid passes through"
    );
    assert_eq!(n("fork_ret"), n("child_pid"), "{v}");
    assert_eq!(n("child_ppid"), n("me"));
    assert_eq!(n("waited"), n("fork_ret"));
    assert_eq!(n("term"), 15);
    assert!(is_vpid(n("sub_pid")) && n("sub_ppid") == n("me"), "{v}");
    assert!(is_vpid(n("popen_pid")) && n("popen_wait") == 0, "{v}");
    let tids: Vec<i64> = v["tids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    assert_eq!(n("main_tid"), n("me"), "the main thread's tid is the pid");
    assert!(tids.iter().all(|&t| is_vpid(t) && t != n("me")), "{v}");
    let mut uniq = tids.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 4, "{v}");
}

#[test]
fn shell_pipelines_and_subshells() {
    let env = Env::new("sh");
    let script = r#"echo outer $$; sh -c 'echo inner $$ $PPID' | cat; (echo sub $(sh -c 'echo $PPID')) | cat"#;
    let out = env.run(&["run", "--", "sh", "-c", script]);
    let s = text(&out.stdout);
    assert!(out.status.success(), "{s}{}", text(&out.stderr));
    let nums = |tag: &str| -> Vec<i64> {
        s.lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("no {tag} in {s}"))
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect()
    };
    let outer = nums("outer")[0];
    let inner = nums("inner");
    assert!(
        is_vpid(outer) && is_vpid(inner[0]) && inner[0] != outer,
        "{s}"
    );
    assert_eq!(
        inner[1], outer,
        "the pipeline's shell is the outer shell's child: {s}"
    );
    let sub = nums("sub")[0];
    assert!(
        is_vpid(sub) && sub != outer,
        "a subshell is a process of its own: {s}"
    );
}

#[test]
fn ps_shows_the_tree_and_table_the_threads() {
    let env = Env::new("ps");
    env.detach("tree", &["sh", "-c", "sleep 60 & sleep 60 & python3 -c 'import threading, time; [threading.Thread(target=time.sleep, args=(60,), daemon=True).start() for _ in range(3)]; time.sleep(60)' & wait"]);
    let procs = env.wait_processes("tree", "4 processes", |p| {
        p.len() == 4 && p.iter().any(|x| x["threads"] == 4)
    });
    let root = procs
        .iter()
        .find(|p| p["vpid"] == VPID_BASE + 1)
        .expect("root process");
    assert_eq!(
        root["parent_vpid"], 0,
        "the root's parent is outside the session"
    );
    assert!(root["command"].as_str().unwrap().starts_with("sh -c"));
    for p in procs.iter().filter(|p| p["vpid"] != root["vpid"]) {
        assert_eq!(p["parent_vpid"], root["vpid"], "{p}");
        assert_ne!(p["pid"], p["vpid"]);
    }
    let py = procs
        .iter()
        .find(|p| p["vpid"] != root["vpid"] && p["command"].as_str().unwrap().contains("python3"))
        .unwrap();
    assert_eq!(
        py["threads"], 4,
        "3 app threads + main; the control thread is hidden"
    );
    let ps_text = text(&env.run(&["ps"]).stdout);
    assert!(
        ps_text.contains("tree") && ps_text.contains(&(VPID_BASE + 1).to_string()),
        "{ps_text}"
    );

    let t = env.table("tree", false);
    let pyt = t["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["vpid"] == py["vpid"])
        .unwrap();
    let threads = pyt["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 4);
    assert!(
        threads
            .iter()
            .all(|th| is_vpid(th["vtid"].as_i64().unwrap()))
    );
    env.stop("tree");
}

#[test]
fn exec_keeps_vpid_and_table() {
    let env = Env::new("exec");
    let f = env.scratch("x").join("kept.txt");
    let script = format!("exec 7>{}; echo $$; exec sleep 60", f.display());
    let log = env.detach("ex", &["sh", "-c", &script]);
    let procs = env.wait_processes("ex", "sleep to run", |p| {
        p.len() == 1 && p[0]["command"].as_str().unwrap().starts_with("sleep")
    });
    let said: i64 = wait_for_text(&log, "\n").trim().parse().unwrap();
    assert_eq!(
        procs[0]["vpid"].as_i64().unwrap(),
        said,
        "the vpid survives exec"
    );
    let t = env.table("ex", false);
    let fds = t["processes"][0]["fds"].as_array().unwrap();
    let fd7 = fds
        .iter()
        .find(|f| f["fd"] == 7)
        .expect("fd 7 inherited across exec");
    assert_eq!(fd7["object"]["kind"], "file");
    assert_eq!(fd7["object"]["path"], f.to_str().unwrap());
    assert_eq!(fd7["journaled"], true, "the table was carried across exec");
    env.stop("ex");
}

#[test]
fn table_answers_while_processes_start_exec_and_end() {
    // A shell starting short-lived programs all the time: a child listed may exec (its
    // control thread closes the connection: its new program is asked again) or end
    // (left out) while `mig table` asks it; neither is an error.
    let env = Env::new("churn");
    let churn = "while :; do sh -c 'exec /bin/true'; /bin/true; done";
    env.detach("churn", &["sh", "-c", churn]);
    env.wait_processes("churn", "a child of the shell", |p| p.len() > 1);
    for _ in 0..40 {
        let t = env.table("churn", false);
        let procs = t["processes"].as_array().unwrap();
        assert!(
            procs.iter().any(|p| p["vpid"] == VPID_BASE + 1),
            "the shell is listed: {procs:#?}"
        );
    }
    env.stop("churn");
}

#[test]
fn pids_outside_the_session_pass_through() {
    let env = Env::new("outside");
    let me = std::process::id();
    // A real pid outside the session can be signalled; an unassigned virtual pid cannot.
    let script = format!(
        "kill -0 {me}; echo outside=$?; kill -0 {} 2>/dev/null; echo unknown=$?",
        VPID_BASE + 999
    );
    let out = env.run(&["run", "--", "sh", "-c", &script]);
    let s = text(&out.stdout);
    assert!(s.contains("outside=0"), "{s}");
    assert!(s.contains("unknown=1"), "{s}");
}

#[test]
fn fork_in_a_busy_multithreaded_process() {
    // Threads journal open/close flat out while the main thread forks: every child must
    // come up with its own vpid and exit (no lock inherited held).
    let env = Env::new("mtfork");
    let script = r#"
import os, threading
stop = False
def churn():
    while not stop:
        os.close(os.open("/dev/null", os.O_RDONLY))
ts = [threading.Thread(target=churn) for _ in range(3)]
[t.start() for t in ts]
me, kids = os.getpid(), set()
for i in range(60):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(os.open("/dev/null", os.O_RDONLY))
        os.write(w, str(os.getpid()).encode()); os._exit(0)
    os.close(w)
    assert int(os.read(r, 32)) == pid
    os.close(r)
    assert os.waitpid(pid, 0)[0] == pid
    kids.add(pid)
stop = True
[t.join() for t in ts]
print("forks", len(kids))
"#;
    let mut c = env.mig();
    c.args(["run", "--", "python3", "-c", script]);
    let out = env.output(c);
    assert!(
        text(&out.stdout).contains("forks 60"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn works_for_a_normal_user() {
    if !is_root() {
        println!("already a normal user: the other tests cover it");
        return;
    }
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP: setpriv (util-linux) missing");
        return;
    }
    let env = Env::new("user");
    // The binaries, where any user can reach them (the checkout may not be).
    let bin = std::env::temp_dir().join(format!("migtest-user-bin-{}", std::process::id()));
    std::fs::create_dir_all(&bin).unwrap();
    for (from, to) in [
        (mig_bin(), "mig"),
        (shim_lib(), "libmigshim.so"),
        (c_program("forktree"), "forktree"),
    ] {
        std::fs::copy(&from, bin.join(to)).unwrap();
    }
    let rt = bin.join("rt");
    std::fs::create_dir_all(&rt).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::process::Command::new("chown")
        .args(["65534:65534"])
        .arg(&rt)
        .status()
        .unwrap();
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin.join("mig"))
        .args(["run", "--"])
        .arg(bin.join("forktree"))
        .env("MIGSHIM_RUNTIME_DIR", &rt);
    let out = env.output(c);
    let _ = std::fs::remove_dir_all(&bin);
    let s = text(&out.stdout);
    assert!(
        out.status.success() && s.contains("checks passed"),
        "{s}{}",
        text(&out.stderr)
    );
    assert!(
        ints_after(s.lines().find(|l| l.starts_with("pids")).unwrap(), "parent")
            .iter()
            .all(|&p| is_vpid(p))
    );
}

fn threads_of(pid: i64) -> u32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn control_thread_starts_only_when_asked_even_in_busy_programs() {
    let env = Env::new("wake");
    env.detach("busy-sh", &["sh", "-c", "while :; do :; done"]);
    env.detach("busy-py", &["python3", "-c", "while True: pass"]);
    env.detach(
        "sleeper",
        &[c_program("counter").to_str().unwrap(), "2", "1"],
    );
    for s in ["busy-sh", "busy-py", "sleeper"] {
        let p = env.wait_processes(s, "the program", |p| p.len() == 1);
        let pid = p[0]["pid"].as_i64().unwrap();
        assert_eq!(
            threads_of(pid),
            1,
            "{s}: no shim thread until mig asks (the program stays single-threaded)"
        );
        let t = env.table(s, false);
        assert_eq!(t["processes"][0]["vpid"], VPID_BASE + 1, "{s}");
        assert_eq!(threads_of(pid), 2, "{s}: the control thread runs now");
        assert_eq!(
            t["processes"][0]["threads"].as_array().unwrap().len(),
            1,
            "{s}: and is hidden from the table"
        );
        assert_eq!(env.processes(s)[0]["threads"], 1, "{s}: and from mig ps");
        env.stop(s);
    }
}

#[test]
fn processes_parked_in_lock_waits_can_be_reached() {
    let env = Env::new("waits");
    // Single-threaded, parked in a futex wait: woken (no libc lock can be held).
    env.detach(
        "waiter",
        &[
            "python3",
            "-c",
            "import threading; threading.Event().wait()",
        ],
    );
    // Main thread parked in join: the control thread started with the app's first thread.
    env.detach("joiner", &["python3", "-c", "import threading, time; t = threading.Thread(target=time.sleep, args=(60,)); t.start(); t.join()"]);
    let w = env.wait_processes("waiter", "the waiter", |p| p.len() == 1);
    assert_eq!(threads_of(w[0]["pid"].as_i64().unwrap()), 1);
    let j = env.wait_processes("joiner", "the joiner's thread", |p| {
        p.len() == 1 && p[0]["threads"] == 2
    });
    assert_eq!(
        threads_of(j[0]["pid"].as_i64().unwrap()),
        3,
        "main, worker, and the shim's thread"
    );
    for s in ["waiter", "joiner"] {
        let t = env.table(s, false);
        assert_eq!(t["processes"][0]["vpid"], VPID_BASE + 1, "{s}");
        env.stop(s);
    }
}

#[test]
fn the_app_can_neither_take_nor_block_the_reserved_signal() {
    let env = Env::new("sig");
    let script = r#"
import signal, time
signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
print("reported-blocked", 63 in signal.pthread_sigmask(signal.SIG_BLOCK, []))
old = signal.signal(63, lambda *a: print("app got 63", flush=True))
print("was-default", old == signal.SIG_DFL, "now-app", signal.getsignal(63) not in (signal.SIG_DFL, signal.SIG_IGN))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {63})
print("reported-unblocked", 63 not in signal.pthread_sigmask(signal.SIG_BLOCK, []), flush=True)
time.sleep(60)
"#;
    let log = env.detach("sig", &["python3", "-c", script]);
    let said = wait_for_text(&log, "reported-unblocked");
    assert!(said.contains("reported-blocked True"), "{said}");
    assert!(said.contains("was-default True now-app True"), "{said}");
    assert!(said.contains("reported-unblocked True"), "{said}");
    // Everything blocked, yet mig reaches it; the app's handler never runs.
    let t = env.table("sig", false);
    assert_eq!(t["processes"][0]["vpid"], VPID_BASE + 1);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap()
            .contains("app got 63")
    );
    env.stop("sig");
}

#[test]
fn signal_handlers_may_call_wrapped_functions_while_main_code_allocates() {
    let env = Env::new("handlers");
    let mut c = env.mig();
    c.args(["run", "--"]).arg(c_program("sighandler"));
    let out = env.output(c);
    let s = text(&out.stdout);
    assert!(out.status.success(), "{s}{}", text(&out.stderr));
    assert!(s.contains("handlers reported ok"), "{s}");
}

#[test]
fn capability_calls_name_the_caller_by_its_vpid_and_work() {
    // libcap-ng (setpriv) puts getpid() — a vpid here — in capset's header.
    let env = Env::new("caps");
    let mut c = env.mig();
    c.args(["run", "--", "setpriv", "--inh-caps=-all", "--"])
        .args(["sh", "-c", "grep CapInh /proc/self/status"]);
    let o = env.output(c);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(
        text(&o.stdout).contains("CapInh:\t0000000000000000"),
        "{}",
        text(&o.stdout)
    );
}
