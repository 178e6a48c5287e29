//! Lazy migration (issue #5, `mig migrate --mode lazy`): the session runs on the target at
//! once, its memory fetched from the frozen source — what it touches first, the rest in the
//! background — and it ends here once all is there. A dead agent or a cut link during that
//! post-copy ends the copy there, and the session runs on here as it was frozen, intact.

mod common;
use common::agents::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether the target can serve faults from userspace (a userfaultfd for kernel-mode
/// faults that reports forks: root); says why not.
fn userfaultfd() -> bool {
    if !is_root() {
        println!(
            "SKIP: a lazy migration needs a userfaultfd that reports forks on the target (root)"
        );
        return false;
    }
    true
}

fn lazy_args<'a>(session: &'a str, to: &'a str, key: &'a Path) -> Vec<&'a str> {
    let mut args = migrate_args(session, to, key).to_vec();
    args.extend(["--mode", "lazy"]);
    args
}

#[test]
fn a_lazy_migration_runs_there_at_once_and_fetches_its_memory_from_here() {
    if !userfaultfd() {
        return;
    }
    let env = Env::new("lazy-migrate");
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    // 64 MiB, 8 MiB/s of it written anew, every page checked against its generation each tick.
    let log = env.detach(
        "cnt",
        &[c_program("counter").to_str().unwrap(), "40", "64", "8"],
    );
    wait_numbers(&log, "count ", 3);
    let o = env.run(&lazy_args("cnt", &agent.addr, &key));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    // Frozen, only what is not anonymous memory went (the stack, the program's own data);
    // the rest was fetched after it ran there.
    let (frozen, after) = (
        kib_before(&out, "frozen)"),
        kib_before(&out, "after it ran there"),
    );
    assert!(frozen < 8.0 * 1024.0, "little went frozen: {out}");
    assert!(after > 60.0 * 1024.0, "its memory came afterwards: {out}");
    assert!(env.processes("cnt").is_empty(), "the session ended here");
    let there = agent.session_log("cnt");
    assert_went_on(&log, &there);
    counts_on_undamaged(&there, 20);
    let agent_log = std::fs::read_to_string(env.root.join("agent.log")).unwrap();
    assert!(agent_log.contains("all its memory is here"), "{agent_log}");
    println!("{out}");
}

/// A parent and two children, each child checking 8 MiB of its own memory every tick and
/// reporting through a pipe the parent reads and prints.
const TREE: &str = r#"
import hashlib, os, time
r, w = os.pipe()
for k in range(2):
    if os.fork() == 0:
        os.close(r)
        data = bytearray(8 << 20)
        for i in range(0, len(data), 4096):
            data[i:i + 8] = (i * (k + 3)).to_bytes(8, "little")
        h = hashlib.sha256(data).digest()
        n = 0
        while True:
            n += 1
            ok = hashlib.sha256(data).digest() == h
            j = n * 4096 * 7 % len(data)
            data[j:j + 8] = n.to_bytes(8, "little")
            h = hashlib.sha256(data).digest()
            os.write(w, f"child {k} tick {n} {'ok' if ok else 'DAMAGED'}\n".encode())
            time.sleep(0.1)
os.close(w)
for line in os.fdopen(r):
    print(line.strip(), flush=True)
"#;

/// The ticks child `k` reported in `log`.
fn ticks(log: &Path, k: usize) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("child {k} tick ")))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn a_process_tree_with_a_pipe_moves_lazily_between_network_namespaces() {
    if !userfaultfd() {
        return;
    }
    let env = Env::new("lazy-tree");
    let Some((hosts, agent, key)) = two_hosts(&env, "z") else {
        return;
    };
    let log = env.root.join("tree.log");
    run_in(
        &env,
        &hosts.names[0],
        "tree",
        &log,
        &["python3", "-c", TREE],
    );
    let t = Instant::now();
    while ticks(&log, 0).len() < 3 || ticks(&log, 1).len() < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the tree does not tick"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = migrate_in(
        &env,
        &hosts.names[0],
        "tree",
        &agent.addr,
        &key,
        &["--mode", "lazy"],
    );
    assert!(out.contains("3 process(es)"), "{out}");
    let there = agent.session_log("tree");
    for k in 0..2 {
        let last = *ticks(&log, k).last().unwrap();
        let t = Instant::now();
        while ticks(&there, k).len() < 5 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "child {k} does not tick there"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            ticks(&there, k)[0],
            last + 1,
            "child {k} went on from tick {last}"
        );
    }
    let text = std::fs::read_to_string(&there).unwrap();
    assert!(!text.contains("DAMAGED"), "{text}");
    let o = agent.mig().args(["ps", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["processes"].as_array().unwrap().len(), 3, "{v}");
    println!("{out}");
}

/// One process with 64 MiB it does not touch while it counts; once `check` exists it
/// says whether that memory is as it made it.
fn idle_memory(check: &Path) -> String {
    format!(
        r#"
import hashlib, os, time
data = bytearray(64 << 20)
for i in range(0, len(data), 4096):
    data[i:i + 8] = i.to_bytes(8, "little")
h = hashlib.sha256(data).digest()
n, told = 0, False
while True:
    n += 1
    print(f"count {{n}}", flush=True)
    if not told and os.path.exists("{check}"):
        told = True
        print("memory", "intact" if hashlib.sha256(data).digest() == h else "DAMAGED", flush=True)
    time.sleep(0.05)
"#,
        check = check.display()
    )
}

/// Starts a lazy migration of session "idle" (by `mig` run with `cmd`) and waits until it
/// runs on the target (counting in its log there) while its memory is still coming.
/// Returns the migration, and the restored processes' pids.
fn until_it_runs_there(mut cmd: Command, agent: &Agent) -> (std::process::Child, Vec<i32>) {
    let m = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let there = agent.session_log("idle");
    let t = Instant::now();
    while numbers(&there, "count ").len() < 3 {
        assert!(t.elapsed() < Duration::from_secs(30), "it never ran there");
        std::thread::sleep(Duration::from_millis(10));
    }
    (m, agent.restored_pids())
}

/// After a post-copy broke off: the migration failed saying so, the copy there is gone,
/// and the session goes on here as it was frozen, its memory intact.
fn assert_back_here(env: &Env, m: std::process::Child, pids: &[i32], log: &Path, check: &Path) {
    let last = *numbers(log, "count ").last().unwrap();
    let o = m.wait_with_output().unwrap();
    assert!(!o.status.success(), "the migration cannot have succeeded");
    let err = text(&o.stderr);
    assert!(err.contains("runs on here"), "{err}");
    println!("{err}");
    wait_gone(pids);
    let after = wait_numbers(log, "count ", numbers(log, "count ").len() + 3);
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "counted on here from {last}"
    );
    std::fs::write(check, "").unwrap();
    let out = wait_for_text(log, "memory ");
    assert!(out.contains("memory intact"), "{out}");
    assert_eq!(env.processes("idle").len(), 1);
    env.stop("idle");
}

/// The agent's pager fills slowly: the post-copy lasts long enough to break it.
const SLOW: [(&str, &str); 1] = [("MIGSHIM_PAGER_THROTTLE_MS", "200")];

#[test]
fn an_agent_that_dies_during_the_post_copy_leaves_the_session_running_here() {
    post_copy_broken("lazy-dies", |agent| agent.child.kill().unwrap());
}

#[test]
fn a_pager_killed_during_the_post_copy_leaves_the_session_running_here() {
    // The pager there is what fills the restored memory in: killed (by the OOM killer, say),
    // the pages it did not fill would read as zeros. The agent must not take its end for
    // the end of the copy: the copy there ends, and the session runs on here.
    post_copy_broken("lazy-pager", |agent| {
        let pager = pagers(&agent.state);
        assert_eq!(pager.len(), 1, "one pager: {pager:?}");
        // SAFETY: kill takes plain values.
        unsafe { libc::kill(pager[0], libc::SIGKILL) };
    });
}

/// A lazy migration to an agent on this host, broken by `break_it` while the session runs
/// there and its memory still comes: it must run on here, intact.
fn post_copy_broken(name: &str, break_it: impl FnOnce(&mut Agent)) {
    if !userfaultfd() {
        return;
    }
    let env = Env::new(name);
    let key = key(&env);
    let mut agent = Agent::start_with(&env, "agent", &key, None, &[], &SLOW);
    let check = env.root.join("check");
    let log = env.detach("idle", &["python3", "-c", &idle_memory(&check)]);
    wait_numbers(&log, "count ", 3);
    let mut c = env.mig();
    c.args(lazy_args("idle", &agent.addr, &key));
    let (m, pids) = until_it_runs_there(c, &agent);
    break_it(&mut agent);
    assert_back_here(&env, m, &pids, &log, &check);
}

/// The pagers of the lazy restores of the agent with state directory `state`: `mig
/// restore` processes that lead a session of their own (the pager's setsid) and ask for
/// pages from afar.
fn pagers(state: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let sid = stat
                .rsplit(") ")
                .next()
                .and_then(|rest| rest.split(' ').nth(3))
                .and_then(|s| s.parse::<i32>().ok());
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("--pages-from")
                && cmd.contains(state.to_str().unwrap())
                && sid == Some(*pid)
        })
        .collect()
}

#[test]
fn a_link_cut_during_the_post_copy_leaves_the_session_running_here() {
    if !userfaultfd() {
        return;
    }
    let env = Env::new("lazy-cut");
    let Some(hosts) = is_root().then(|| Hosts::new("y", 2)) else {
        println!("SKIP: needs root for network namespaces");
        return;
    };
    let key = key(&env);
    let agent = Agent::start_with(
        &env,
        "agent",
        &key,
        Some((&hosts.names[1], "10.77.0.2")),
        &["--timeout", "3"],
        &SLOW,
    );
    let check = env.root.join("check");
    let log: PathBuf = env.root.join("idle.log");
    run_in(
        &env,
        &hosts.names[0],
        "idle",
        &log,
        &["python3", "-c", &idle_memory(&check)],
    );
    wait_numbers(&log, "count ", 3);
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &hosts.names[0]])
        .arg(mig_bin())
        .args(lazy_args("idle", &agent.addr, &key))
        .args(["--timeout", "3"])
        .env("MIGSHIM_RUNTIME_DIR", &env.rt);
    let (m, pids) = until_it_runs_there(c, &agent);
    hosts.ip(0, &["link", "set", &hosts.links[0], "down"]);
    assert_back_here(&env, m, &pids, &log, &check);
}

#[test]
fn memory_forked_freed_and_moved_during_the_post_copy_comes_out_right() {
    // The subject forks, frees and moves parts of its memory every tick, checking all of it
    // (and its children check theirs); the pager there is slowed, so all of this happens
    // while its pages are still coming from here.
    if !userfaultfd() {
        return;
    }
    let env = Env::new("lazy-changes");
    let key = key(&env);
    let agent = Agent::start_with(
        &env,
        "agent",
        &key,
        None,
        &[],
        &[("MIGSHIM_PAGER_THROTTLE_MS", "5")],
    );
    let log = env.detach("lm", &[c_program("lazymem").to_str().unwrap(), "128"]);
    wait_numbers(&log, "tick ", 3);
    let o = env.run(&lazy_args("lm", &agent.addr, &key));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_ticked_on(&log, &agent.session_log("lm"), 30);
    println!("{}", crate::text(&o.stdout));
}

#[test]
fn memory_over_the_agents_limit_ends_the_copy_there_and_the_session_runs_on_here() {
    // The image is small, the memory that follows is not: the agent takes 16 MiB at most.
    if !userfaultfd() {
        return;
    }
    let env = Env::new("lazy-limit");
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &["--max-bytes", "16777216"]);
    let log = env.detach(
        "cnt",
        &[c_program("counter").to_str().unwrap(), "40", "64", "8"],
    );
    wait_numbers(&log, "count ", 3);
    let o = env.run(&lazy_args("cnt", &agent.addr, &key));
    assert_refused(&o, &["runs on here"]);
    let said = wait_for_text(&env.root.join("agent.log"), "limit");
    assert!(
        said.contains("--max-bytes"),
        "the agent's log says why: {said}"
    );
    counts_on_undamaged(&log, 3);
    assert_eq!(env.processes("cnt").len(), 1);
    wait_gone(&agent.restored_pids());
    env.stop("cnt");
}

#[test]
fn a_large_mapping_mostly_untouched_moves_lazily_as_what_it_holds() {
    // 512 MiB mapped, one page in 64 holding data; others written with zeros, only read,
    // or never touched. The freeze does not walk such a mapping: the source finds out what
    // exists as the target asks. Only the data comes, and only the data is memory there.
    if !userfaultfd() {
        return;
    }
    let env = Env::new("lazy-sparse");
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    // (And 2 GiB reserved, untouched but for its last page, which it checks: the fill
    // skips what the source says holds nothing, rather than asking for it a mebibyte at a
    // time.)
    let log = env.detach(
        "sp",
        &[c_program("sparsemem").to_str().unwrap(), "512", "2"],
    );
    wait_numbers(&log, "tick ", 3);
    let o = env.run(&lazy_args("sp", &agent.addr, &key));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let (frozen, after) = (
        kib_before(&out, "frozen)"),
        kib_before(&out, "after it ran there"),
    );
    assert!(frozen < 4.0 * 1024.0, "little went frozen: {out}");
    // 8 MiB of data pages (and the few written since).
    assert!(
        (7.5 * 1024.0..12.0 * 1024.0).contains(&after),
        "the data pages came afterwards, nothing else: {out}"
    );
    let text = assert_ticked_on(&log, &agent.session_log("sp"), 10);
    // All its memory was there when mig migrate ended: what it holds is what it used here.
    let rss: u64 = text
        .lines()
        .last()
        .and_then(|l| l.split(" rss ").nth(1)?.trim().parse().ok())
        .unwrap();
    assert!(rss < 32 * 1024, "{rss} KiB resident there: {text}");
    println!("{out}");
}

/// A python process holding 64 MiB that forks a short-lived child every tick, which reads
/// all of it ("BAD" if it reads other than its parent wrote) and ends.
const SHORT_CHILDREN: &str = r#"
import os, time
data = bytearray(os.urandom(64 << 20))
want = sum(data[::4096])
n = 0
while True:
    n += 1
    pid = os.fork()
    if pid == 0:
        if sum(data[::4096]) != want:
            print("BAD child read other memory", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print(f"tick {n}", flush=True)
    time.sleep(0.01)
"#;

#[test]
fn children_that_end_while_their_pages_come_read_them_right_and_leave_no_word() {
    // The pager there fills each child forked meanwhile too; one that ended first is
    // simply done with (before, each left a line "lazy restore: No such process" in the
    // session's log).
    if !userfaultfd() {
        return;
    }
    let env = Env::new("lazy-short-children");
    let key = key(&env);
    let vars = [("MIGSHIM_PAGER_THROTTLE_MS", "2")];
    let agent = Agent::start_with(&env, "agent", &key, None, &[], &vars);
    let log = env.detach("kids", &["python3", "-c", SHORT_CHILDREN]);
    wait_numbers(&log, "tick ", 3);
    let o = env.run(&lazy_args("kids", &agent.addr, &key));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let there = assert_ticked_on(&log, &agent.session_log("kids"), 20);
    assert!(!there.contains("mig restore:"), "{there}");
}

#[test]
fn a_daemon_whose_parent_ended_moves_lazily_with_its_worker() {
    // Made there beside the session's first process (not its child), its memory and its
    // worker's fetched by the pager as everyone's.
    if !userfaultfd() {
        return;
    }
    let env = Env::new("lazy-daemon");
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    let log = env.detach("d", &["python3", "-c", DAEMON]);
    for k in 0..3 {
        wait_numbers(&log, &format!("p{k} "), 3);
    }
    let o = env.run(&lazy_args("d", &agent.addr, &key));
    assert!(o.status.success(), "{}", text(&o.stderr));
    tree_went_on(&log, &agent.session_log("d"), 3);
}

/// A python process holding 8 MiB that forks a child every few ms (the child ends at
/// once); on SIGUSR1 it checks its memory and says so.
const FORKS_ALL_THE_TIME: &str = r#"
import os, signal
data = bytearray(os.urandom(8 << 20))
want = sum(data[::4096]) + sum(data[-4096:])
asked = []
signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
n = 0
while True:
    n += 1
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    if asked:
        asked.clear()
        ok = sum(data[::4096]) + sum(data[-4096:]) == want
        print("memory ok" if ok else "BAD memory", flush=True)
    if n % 50 == 0:
        print(f"tick {n}", flush=True)
"#;

#[test]
fn a_process_that_forks_all_the_time_moves_lazily_over_a_slow_link() {
    // Each fork holds the parent's userfaultfd copies back (EAGAIN) until the pager has
    // read the fork's report. The fill threw away what it had fetched when its copy met
    // one, and fetched it again: over a link where a 1 MiB fetch outlasts the app's fork
    // period, every try met one, and the post-copy never ended (first seen as a lazy test
    // that stalled on a loaded machine).
    if !userfaultfd() {
        return;
    }
    let env = Env::new("lazy-slow-forks");
    let Some((hosts, agent, key)) = two_hosts(&env, "f") else {
        return;
    };
    // 50 Mbit/s out of the source's host: a 1 MiB fetch takes ~170 ms.
    let shaped = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.names[0],
            "tc",
            "qdisc",
            "add",
            "dev",
        ])
        .args([
            &hosts.links[0],
            "root",
            "tbf",
            "rate",
            "50mbit",
            "burst",
            "32kb",
        ])
        .args(["latency", "400ms"])
        .output();
    if !shaped.is_ok_and(|o| o.status.success()) {
        println!("SKIP: needs tc with the tbf qdisc to slow the link down");
        return;
    }
    let log = env.root.join("forks.log");
    let cmd = ["python3", "-c", FORKS_ALL_THE_TIME];
    run_in(&env, &hosts.names[0], "forks", &log, &cmd);
    wait_numbers(&log, "tick ", 3);
    let t = Instant::now();
    let out = migrate_in(
        &env,
        &hosts.names[0],
        "forks",
        &agent.addr,
        &key,
        &["--mode", "lazy"],
    );
    // (Its ~25 MiB over 50 Mbit/s: ~4 s.)
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "{:?}: {out}",
        t.elapsed()
    );
    // Not fetched again and again: 45-70 MiB for its ~25 MiB here. Each child filled in
    // whole, and nothing one space fetched given to the others, took 262 MiB (1.9 GiB over
    // 500 Mbit/s).
    let fetched = kib_before(&out, "after it ran there");
    assert!(fetched < 128.0 * 1024.0, "{out}");
    let there = agent.session_log("forks");
    let last = *numbers(&log, "tick ").last().unwrap();
    let after = wait_numbers(&there, "tick ", 3);
    assert!(after[0] > last, "ticks {last} here, then {after:?} there");
    // (The parent, and whatever child is listed beside it: a child only ends.)
    for pid in agent.restored_pids() {
        // SAFETY: signalling the restored processes of our own test session.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
    }
    let t = Instant::now();
    while !std::fs::read_to_string(&there)
        .unwrap()
        .contains("memory ok")
    {
        let text = std::fs::read_to_string(&there).unwrap();
        assert!(!text.contains("BAD"), "{text}");
        assert!(t.elapsed() < Duration::from_secs(20), "no check: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("{out}");
}
