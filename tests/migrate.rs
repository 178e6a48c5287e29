//! Migration through agents (issue #5): a session moves to an agent and goes on there; a
//! wrong key, a refusing agent or one that dies mid-transfer leave it running here, intact.
//! Between network namespaces when root.

mod common;
use common::agents::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn a_session_migrates_to_an_agent_and_goes_on_there() {
    let env = Env::new("migrate");
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "40", "64"]);
    wait_numbers(&log, "count ", 3);
    let o = migrate(&env, "cnt", &agent.addr, &key);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("migrated session cnt") && out.contains("frozen") && out.contains("sent"),
        "the summary: {out}"
    );
    assert!(env.processes("cnt").is_empty(), "the session ended here");
    assert_went_on(&log, &agent.session_log("cnt"));
    // The agent answers for its sessions.
    let o = env.run(&[
        "ps",
        "--host",
        &agent.addr,
        "--key",
        key.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(v[0]["name"], "cnt", "mig ps --host --json: {v}");
    let o = env.run(&["ps", "--host", &agent.addr, "--key", key.to_str().unwrap()]);
    assert!(
        text(&o.stdout).contains("cnt"),
        "mig ps --host: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert!(
        std::fs::read_dir(agent.state.join("incoming"))
            .unwrap()
            .next()
            .is_none(),
        "no image is left on the target"
    );
}

#[test]
fn a_forked_tree_migrates_sharing_what_its_processes_had_alike() {
    let (before, after) = migrate_cow_tree("migrate-cow", &[]);
    assert_shares_again(before, after);
}

#[test]
fn with_no_sharing_a_forked_tree_is_paged_in_process_by_process() {
    // (A shorter freeze; a copy each.)
    let (before, after) = migrate_cow_tree("migrate-cow-apart", &["--no-sharing"]);
    assert!(
        after > before * 2.5,
        "{before:.1} MiB before, {after:.1} MiB after"
    );
}

/// COW_TREE migrated to an agent (`mig migrate` with `more`): it goes on there; the
/// proportional set size of the tree here before, and there after (MiB).
fn migrate_cow_tree(tag: &str, more: &[&str]) -> (f64, f64) {
    let env = Env::new(tag);
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    let log = env.detach("cow", &["python3", "-c", COW_TREE]);
    for k in 0..4 {
        wait_numbers(&log, &format!("p{k} "), 2);
    }
    let here = env.processes("cow");
    let before = pss_mib(
        &here
            .iter()
            .map(|p| p["pid"].as_i64().unwrap() as i32)
            .collect::<Vec<_>>(),
    );
    let mut args = migrate_args("cow", &agent.addr, &key).to_vec();
    args.extend_from_slice(more);
    let o = env.run(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    println!("{}", text(&o.stdout));
    tree_went_on(&log, &agent.session_log("cow"), 4);
    (before, pss_mib(&agent.restored_pids()))
}

/// The session runs on here, counting, after a failed migration.
fn assert_runs_on_here(env: &Env, log: &Path) {
    counts_on_undamaged(log, 3);
    assert_eq!(env.processes("cnt").len(), 1);
}

#[test]
fn precopy_sends_memory_while_the_session_runs_and_little_frozen() {
    precopy("migrate-precopy", &[], (&[], &[]));
}

#[test]
fn precopy_goes_by_page_hashes_where_userfaultfd_is_not_allowed() {
    // As in a container whose seccomp filter refuses userfaultfd: the session runs under
    // such a filter. The filter itself is not carried, so the migration is refused unless
    // told to go on without it; then mig must say that it goes by hashes, and the memory
    // must still come out right with little sent frozen.
    let wrap = c_program("nouffd");
    let out = precopy(
        "migrate-precopy-nouffd",
        &[],
        (&[wrap.to_str().unwrap()], &["--ignore-unsupported"]),
    );
    assert!(out.contains("pre-copy compares page hashes"), "{out}");
    assert!(out.contains("a seccomp filter"), "{out}");
}

#[test]
fn a_process_under_a_seccomp_filter_is_not_migrated_without_it_unless_told() {
    let env = Env::new("migrate-seccomp");
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    let wrap = c_program("nouffd");
    let log = env.detach(
        "cnt",
        &[
            wrap.to_str().unwrap(),
            "sh",
            "-c",
            "echo count 1; sleep 600",
        ],
    );
    wait_numbers(&log, "count ", 1);
    let o = env.run(&migrate_args("cnt", &agent.addr, &key));
    assert_refused(
        &o,
        &["a seccomp filter", "--ignore-unsupported", "runs on here"],
    );
    assert_eq!(env.processes("cnt").len(), 2, "it runs on here, untouched");
    env.stop("cnt");
}

#[test]
fn precopy_rounds_read_through_the_process_itself_come_out_right() {
    // (Where mig may not read a process's memory — one that made itself undumpable, for a
    // normal user — each round's pages come through the process's control thread.)
    precopy(
        "migrate-precopy-shim",
        &[("MIGSHIM_PAGES_THROUGH_SHIM", "1")],
        (&[], &[]),
    );
}

#[test]
fn precopy_by_page_hashes_sends_memory_while_the_session_runs_and_little_frozen() {
    // Where the kernel tracks no writes (before Linux 6.7, or no userfaultfd): each round
    // sends the pages whose content changed since they were sent, and the frozen memory
    // is compared once more.
    precopy(
        "migrate-precopy-hash",
        &[("MIGSHIM_PRECOPY_BY_HASH", "1")],
        (&[], &[]),
    );
}

/// `mig migrate --mode precopy [MORE...]` of the counter subject (started through `wrap`),
/// `mig` run with `env_vars`; returns what mig said on stderr.
fn precopy(name: &str, env_vars: &[(&str, &str)], (wrap, more): (&[&str], &[&str])) -> String {
    let env = Env::new(name);
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    // 64 MiB, of which it writes 8 MiB/s anew: each page's generation is checked against a
    // table, so a page that came back older (or newer) than its table entry shows.
    let cnt = c_program("counter");
    let command: Vec<&str> = wrap
        .iter()
        .copied()
        .chain([cnt.to_str().unwrap(), "40", "64", "8"])
        .collect();
    let log = env.detach("cnt", &command);
    wait_numbers(&log, "count ", 3);
    let mut args = migrate_args("cnt", &agent.addr, &key).to_vec();
    args.extend(["--mode", "precopy"]);
    args.extend(more);
    let mut c = env.mig();
    c.args(&args).envs(env_vars.iter().copied());
    let o = env.output(c);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let rounds: u32 = out
        .lines()
        .next()
        .unwrap_or_default()
        .split(", ")
        .find_map(|p| p.strip_suffix(" pre-copy round(s)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("rounds in {out}"));
    assert!(rounds >= 1, "{out}");
    let (before, frozen) = (
        kib_before(&out, "before the freeze"),
        kib_before(&out, "frozen)"),
    );
    assert!(
        before > 60.0 * 1024.0,
        "all of its memory went ahead: {out}"
    );
    assert!(
        frozen * 8.0 < before,
        "only what it wrote since went frozen: {out}"
    );
    assert!(env.processes("cnt").is_empty(), "the session ended here");
    assert_went_on(&log, &agent.session_log("cnt"));
    // It goes on writing there, and checking.
    counts_on_undamaged(&agent.session_log("cnt"), 20);
    text(&o.stderr)
}

#[test]
fn memory_forked_freed_and_moved_during_the_precopy_rounds_comes_out_right() {
    precopy_changes("migrate-precopy-changes", &[]);
}

#[test]
fn memory_forked_freed_and_moved_during_precopy_by_hash_comes_out_right() {
    precopy_changes(
        "migrate-precopy-hash-changes",
        &[("MIGSHIM_PRECOPY_BY_HASH", "1")],
    );
}

/// The subject forks, frees and moves parts of its memory every tick, checking all of it
/// (and its children check theirs), while mig (run with `env_vars`) reads its rounds: a
/// page freed after a round must come back zero, a chunk away while read must still come
/// back whole.
fn precopy_changes(name: &str, env_vars: &[(&str, &str)]) {
    let env = Env::new(name);
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    let log = env.detach("lm", &[c_program("lazymem").to_str().unwrap(), "256"]);
    wait_numbers(&log, "tick ", 3);
    let mut args = migrate_args("lm", &agent.addr, &key).to_vec();
    args.extend(["--mode", "precopy"]);
    let mut c = env.mig();
    c.args(&args).envs(env_vars.iter().copied());
    let o = env.output(c);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_ticked_on(&log, &agent.session_log("lm"), 20);
}

#[test]
fn a_worker_forked_during_the_precopy_rounds_gets_rounds_of_its_own() {
    // The subject forks a worker (a copy of its 256 MiB) while the first round is being
    // sent: the worker has no rounds, and it lives on, so it must get rounds of its own
    // before the freeze rather than go whole with the frozen image. Both go on there,
    // their memory intact.
    let env = Env::new("migrate-late-worker");
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    let log = env.detach("wk", &[c_program("worker").to_str().unwrap(), "256"]);
    wait_numbers(&log, "tick ", 2);
    let pid = env.processes("wk")[0]["pid"].as_i64().unwrap() as i32;
    let mut args = migrate_args("wk", &agent.addr, &key).to_vec();
    args.extend(["--mode", "precopy"]);
    let mut c = env.mig();
    c.args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let m = c.spawn().unwrap();
    wait_for_text(&env.root.join("agent.log"), "coming in");
    // SAFETY: kill takes plain values.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let o = m.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains(" 2 process(es)"), "the worker went too: {out}");
    assert!(
        kib_before(&out, "frozen)") < 32.0 * 1024.0,
        "the worker's memory went ahead, not frozen: {out}"
    );
    let there = agent.session_log("wk");
    wait_numbers(&there, "worker tick ", 5);
    wait_numbers(&there, "tick ", 5);
    let said = std::fs::read_to_string(&there).unwrap();
    assert!(!said.contains("BAD"), "{said}");
    assert!(env.processes("wk").is_empty(), "the session ended here");
}

#[test]
fn a_wrong_key_or_a_refusing_agent_leaves_the_session_running_here() {
    let env = Env::new("migrate-refused");
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &["--max-bytes", "1000000"]);
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "40", "16"]);
    wait_numbers(&log, "count ", 3);

    let wrong = env.root.join("wrong");
    std::fs::write(&wrong, "not the agent's key at all, sorry").unwrap();
    let o = migrate(&env, "cnt", &agent.addr, &wrong);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("wrong key") || text(&o.stderr).contains("refused"),
        "{}",
        text(&o.stderr)
    );
    assert!(
        wait_for_text(&env.root.join("agent.log"), "authentication failed")
            .contains("authentication failed"),
        "the agent's log says why"
    );
    assert_runs_on_here(&env, &log);

    // 16 MiB is over this agent's limit: refused mid-transfer, thawed here.
    let o = migrate(&env, "cnt", &agent.addr, &key);
    assert_refused(&o, &["limit", "runs on here"]);
    assert_runs_on_here(&env, &log);
    // The session made there for it (while the image came) is gone again.
    assert!(!agent.state.join("run/sessions/cnt").exists());
    env.stop("cnt");
}

#[test]
fn a_restore_that_fails_there_is_reported_at_once_and_the_session_runs_on_here() {
    // A server migrated to an agent on the same host: its port is still taken by the
    // original, so the restore there fails after the whole image has come.
    let env = Env::new("migrate-restore-fails");
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    let port = free_port().to_string();
    let log = env.detach(
        "web",
        &["python3", "-m", "http.server", &port, "--bind", "127.0.0.1"],
    );
    wait_for_text(&log, "Serving HTTP");
    let t = Instant::now();
    let o = migrate(&env, "web", &agent.addr, &key);
    assert_refused(
        &o,
        &["Address already in use", "--map-port", "runs on here"],
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the refusal waited for a time-out ({:?})",
        t.elapsed()
    );
    let page = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).map(|mut s| {
        use std::io::{Read, Write};
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    });
    assert!(
        page.unwrap().starts_with("HTTP/1.0 200"),
        "it serves on here"
    );
    env.stop("web");
}

/// An agent whose restores wait, their session made but nothing of it running (its
/// processes made, told nothing yet), until the returned file exists; a stop-and-copy migration of session "cnt" to it, started (and
/// the session's log). Returns once the restore waits.
fn held_migration(env: &Env) -> (Agent, std::process::Child, PathBuf, PathBuf) {
    let key = key(env);
    let go = env.root.join("go");
    let pause = [("MIGSHIM_RESTORE_PAUSE", go.to_str().unwrap())];
    let agent = Agent::start_with(env, "agent", &key, None, &[], &pause);
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "40", "16"]);
    wait_numbers(&log, "count ", 3);
    let mut m = env.mig();
    m.args(migrate_args("cnt", &agent.addr, &key))
        .args(["--mode", "stop-and-copy"]);
    let m = m
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    // (The session there is made while the image comes; its `restored` note once the
    // restore goes.)
    while !agent.state.join("run/sessions/cnt/restored").exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "no restore started");
        std::thread::sleep(Duration::from_millis(2));
    }
    // (The image is held in the agent's memory: each file a link to one of its memfds.)
    let incoming = std::fs::read_dir(agent.state.join("incoming"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path());
    for f in incoming {
        let memfd = std::fs::read_link(std::fs::read_link(&f).unwrap()).unwrap();
        let memfd = memfd.to_string_lossy();
        assert!(memfd.starts_with("/memfd:"), "{} → {memfd}", f.display());
    }
    // The restored process is made, and waits to be told to go on: in recvfrom (45),
    // still in its restart path.
    let waiting = |p: &i32| {
        std::fs::read_to_string(format!("/proc/{p}/syscall")).is_ok_and(|s| s.starts_with("45 "))
    };
    while !agent.restored_pids().iter().any(waiting) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no restored process waits"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (agent, m, log, go)
}

#[test]
fn an_agent_killed_while_it_restores_leaves_one_copy_running_here() {
    // The whole image went; the agent is killed during the restore: its restore goes with
    // it, nothing runs there, and the session runs on here.
    let env = Env::new("migrate-agent-killed");
    let (mut agent, m, log, go) = held_migration(&env);
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let o = m.wait_with_output().unwrap();
    assert_refused(&o, &["runs on here"]);
    // (Were the restore still there, it would go on now.)
    std::fs::write(&go, "").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let alive: Vec<i32> = agent
        .restored_pids()
        .into_iter()
        .filter(|p| *p > 0 && Path::new(&format!("/proc/{p}")).exists())
        .collect();
    assert!(alive.is_empty(), "nothing runs there: {alive:?}");
    counts_on_undamaged(&log, 3);
    assert_eq!(env.processes("cnt").len(), 1);
    env.stop("cnt");
}

#[test]
fn a_sender_killed_while_the_target_restores_leaves_one_copy_running_here() {
    // mig is killed after the whole image went, while the agent restores: the session
    // thaws here, so the copy there must not run too.
    let env = Env::new("migrate-sender-killed");
    let (agent, mut m, log, go) = held_migration(&env);
    m.kill().unwrap();
    m.wait().unwrap();
    counts_on_undamaged(&log, 3);
    // Once the restore is done, the agent sees its sender gone and ends its copy.
    std::fs::write(&go, "").unwrap();
    let said = wait_for_text(&env.root.join("agent.log"), "the sender went away");
    assert!(said.contains("ended here"), "{said}");
    wait_gone(&agent.restored_pids());
    counts_on_undamaged(&log, 3);
    assert_eq!(env.processes("cnt").len(), 1);
    env.stop("cnt");
}

#[test]
fn a_name_being_taken_at_the_target_is_refused_before_anything_is_frozen() {
    // A session of that name is being made there (its directory without its description
    // yet, as `mig run` leaves it for a moment): the agent lets it come (nothing of that
    // name runs), but the restore it starts cannot take the name — which it tries while
    // the image is still to come, so the sender hears it before it freezes anything.
    let env = Env::new("migrate-name-taken");
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    std::fs::create_dir_all(agent.state.join("run/sessions/cnt")).unwrap();
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "40", "4"]);
    wait_numbers(&log, "count ", 3);
    let o = migrate(&env, "cnt", &agent.addr, &key);
    assert_refused(&o, &["refused", "being created right now"]);
    let said = std::fs::read_to_string(env.root.join("agent.log")).unwrap();
    assert!(said.contains("being created right now"), "{said}");
    assert!(
        !said.contains("coming in"),
        "refused before the image came: {said}"
    );
    assert_runs_on_here(&env, &log);
    env.stop("cnt");
}

#[test]
fn no_agent_at_the_target_leaves_the_session_running_here() {
    let env = Env::new("migrate-none");
    let key = key(&env);
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "40", "4"]);
    wait_numbers(&log, "count ", 3);
    let o = migrate(&env, "cnt", &format!("127.0.0.1:{}", free_port()), &key);
    assert_refused(&o, &["is `mig agent` running there?"]);
    assert_runs_on_here(&env, &log);
    env.stop("cnt");
}

#[test]
fn an_agent_that_dies_mid_transfer_leaves_the_session_running_here() {
    agent_dies_mid_transfer("stop-and-copy");
}

#[test]
fn an_agent_that_dies_during_precopy_leaves_the_session_running_here() {
    agent_dies_mid_transfer("precopy");
}

fn agent_dies_mid_transfer(mode: &str) {
    let env = Env::new(&format!("migrate-dies-{mode}"));
    let key = key(&env);
    let mut agent = Agent::start(&env, "agent", &key, None, &[]);
    let log = env.detach(
        "cnt",
        &[c_program("counter").to_str().unwrap(), "40", "1024", "8"],
    );
    wait_numbers(&log, "count ", 2);
    let mut c = env.mig();
    c.args(migrate_args("cnt", &agent.addr, &key))
        .args(["--mode", mode])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let m = c.spawn().unwrap();
    // Kill the agent once part of the image has arrived.
    let t = Instant::now();
    while !arrived(&agent) {
        assert!(t.elapsed() < Duration::from_secs(30), "nothing arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    agent.child.kill().unwrap();
    let o = m.wait_with_output().unwrap();
    assert!(!o.status.success(), "the migration cannot have succeeded");
    assert!(text(&o.stderr).contains("mig"), "{}", text(&o.stderr));
    assert_runs_on_here(&env, &log);
    // Whole as before: a checkpoint of it restores and goes on.
    let img = env.root.join("img");
    stop_into(&env, "cnt", &img);
    let rlog = restore_detached(&env, &img, "restored.log");
    assert_went_on(&log, &rlog);
    env.stop("cnt");
}

#[test]
fn a_session_migrates_between_network_namespaces() {
    let env = Env::new("migrate-ns");
    let Some((hosts, agent, key)) = two_hosts(&env, "m") else {
        return;
    };
    // The session runs in the first namespace (host A), writing its memory; it moves with
    // pre-copy.
    let log = counter_in(&env, &hosts.names[0], "64", "8");
    wait_numbers(&log, "count ", 3);
    let out = migrate_in(
        &env,
        &hosts.names[0],
        "cnt",
        &agent.addr,
        &key,
        &["--mode", "precopy"],
    );
    assert!(!out.contains(" 0 pre-copy round"), "{out}");
    assert_went_on(&log, &agent.session_log("cnt"));
    assert!(env.processes("cnt").is_empty());
}

#[test]
fn every_kind_of_fd_comes_back_after_a_migration_between_namespaces() {
    // The objects subject (two processes, every kind of fd, its own TCP listener, a unix
    // socket path) moves to host B, whose agent has a filesystem of its own for the
    // subject's directory (a private tmpfs holding a copy of it, as another host would),
    // and checks each object there.
    let env = Env::new("migrate-objects");
    if !is_root() || Command::new("ip").arg("-V").output().is_err() {
        println!("SKIP: needs root and iproute2 for network namespaces");
        return;
    }
    let key = key(&env);
    let hosts = Hosts::new("o", 2);
    let dir = env.scratch("objects");
    let log = env.root.join("obj.log");
    let obj = c_program("objects");
    run_in(
        &env,
        &hosts.names[0],
        "obj",
        &log,
        &[obj.to_str().unwrap(), dir.to_str().unwrap()],
    );
    wait_for_text(&log, "ready");
    // Host B: its own copy of the directory (files as the subject left them, no sockets).
    let copy = env.scratch("copy");
    let sh = |c: &str| {
        Command::new("sh")
            .args(["-c", c])
            .status()
            .unwrap()
            .success()
    };
    assert!(sh(&format!(
        "cp -a {}/. {}/ && rm -f {}/sock",
        dir.display(),
        copy.display(),
        copy.display()
    )));
    let state = env.root.join("agent");
    let port = 7071;
    let agent_log = env.root.join("agent.log");
    let script = format!(
        "mount -t tmpfs none {dir} && cp -a {copy}/. {dir}/ && exec {mig} agent --listen 10.77.0.2:{port} --key {key} --state-dir {state}",
        dir = dir.display(),
        copy = copy.display(),
        mig = mig_bin().display(),
        key = key.display(),
        state = state.display()
    );
    let mut agent = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.names[1],
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .stdout(std::fs::File::create(&agent_log).unwrap())
        .stderr(std::fs::File::create(env.root.join("agent.err")).unwrap())
        .spawn()
        .unwrap();
    wait_for_text(&env.root.join("agent.err"), "listening on");
    migrate_in(
        &env,
        &hosts.names[0],
        "obj",
        &format!("10.77.0.2:{port}"),
        &key,
        &["--mode", "precopy"],
    );
    // "go" in host B's directory (the agent's mount namespace).
    let agent_pid = agent.id().to_string();
    assert!(sh(&format!(
        "nsenter -t $(pgrep -P {agent_pid} -f 'mig agent' || echo {agent_pid}) -m touch {}/go",
        dir.display()
    )));
    let restored = state.join("run/logs/obj.log");
    let out = wait_for_text(&restored, "checked ");
    let _ = sh(&format!("pkill -f 'objects {}'", dir.display()));
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        out.contains("checked 43 failed 0"),
        "after the migration:\n{out}"
    );
}

#[test]
fn redis_keeps_its_keys_across_a_migration_between_namespaces() {
    if !have("redis-server") {
        println!("SKIP: redis-server not installed (.ci/run installs it)");
        return;
    }
    let env = Env::new("migrate-redis");
    let Some((hosts, agent, key)) = two_hosts(&env, "r") else {
        return;
    };
    let data = env.scratch("redis");
    let log = env.root.join("redis.log");
    let server = redis_server("6390", &data);
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    run_in(&env, &hosts.names[0], "redis", &log, &server);
    let cli = |ns: &str, args: &[&str]| -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", ns, "redis-cli", "-p", "6390"])
            .args(args)
            .output()
            .unwrap();
        text(&o.stdout).trim().to_string()
    };
    let t = Instant::now();
    while cli(&hosts.names[0], &["ping"]) != "PONG" {
        assert!(t.elapsed() < Duration::from_secs(15), "redis did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..200 {
        cli(
            &hosts.names[0],
            &["set", &format!("key{i}"), &format!("value{i}")],
        );
    }
    migrate_in(
        &env,
        &hosts.names[0],
        "redis",
        &agent.addr,
        &key,
        &["--mode", "precopy"],
    );
    assert_ne!(cli(&hosts.names[0], &["ping"]), "PONG", "gone from host A");
    let t = Instant::now();
    while cli(&hosts.names[1], &["ping"]) != "PONG" {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "redis does not answer on host B"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cli(&hosts.names[1], &["dbsize"]), "200");
    assert_eq!(cli(&hosts.names[1], &["get", "key123"]), "value123");
}

#[test]
fn a_link_cut_mid_transfer_leaves_the_session_running_here() {
    let env = Env::new("migrate-cut");
    let Some((hosts, agent, key)) = two_hosts(&env, "c") else {
        return;
    };
    let log = counter_in(&env, &hosts.names[0], "1024", "0");
    wait_numbers(&log, "count ", 2);
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &hosts.names[0]])
        .arg(mig_bin())
        .args([
            "migrate",
            "cnt",
            "--to",
            &agent.addr,
            "--timeout",
            "3",
            "--key",
        ])
        .arg(&key)
        .env("MIGSHIM_RUNTIME_DIR", &env.rt)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let m = c.spawn().unwrap();
    // Cut the link once part of the image has arrived.
    let t = Instant::now();
    while !arrived(&agent) {
        assert!(t.elapsed() < Duration::from_secs(30), "nothing arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    hosts.ip(0, &["link", "set", &hosts.links[0], "down"]);
    let o = m.wait_with_output().unwrap();
    assert!(!o.status.success(), "the migration cannot have succeeded");
    // The session runs on in the first namespace.
    counts_on_undamaged(&log, 3);
}

#[test]
fn a_session_migrates_there_and_back() {
    // A → B → A: what the agent on B restored migrates again, to an agent on A.
    let env = Env::new("migrate-back");
    let Some((hosts, agent_b, key)) = two_hosts(&env, "p") else {
        return;
    };
    let agent_a = Agent::start(
        &env,
        "agent-a",
        &key,
        Some((&hosts.names[0], "10.77.0.1")),
        &[],
    );
    let log = counter_in(&env, &hosts.names[0], "64", "0");
    wait_numbers(&log, "count ", 3);
    migrate_in(&env, &hosts.names[0], "cnt", &agent_b.addr, &key, &[]);
    let on_b = agent_b.session_log("cnt");
    assert_went_on(&log, &on_b);
    // From B (its agent's runtime area) back to A.
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &hosts.names[1]])
        .arg(mig_bin())
        .args(migrate_args("cnt", &agent_a.addr, &key))
        .env("MIGSHIM_RUNTIME_DIR", agent_b.state.join("run"));
    let o = env.output(c);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_went_on(&on_b, &agent_a.session_log("cnt"));
}

/// The service address that moves with the session in the hand-over tests (on host A).
const SERVICE: &str = "10.77.0.100";

/// Three hosts — A runs the session and holds SERVICE, B has the agent (`more`: its
/// arguments), C the outside client — or None without root.
fn service_lan(env: &Env, tag: &str, more: &[&str]) -> Option<(Hosts, Agent, PathBuf)> {
    let (hosts, agent, key) = hosts(env, tag, 3, more)?;
    let a = format!("{SERVICE}/24");
    hosts.ip(0, &["addr", "add", &a, "dev", &hosts.links[0]]);
    Some((hosts, agent, key))
}

/// Session `name` from A to `agent`, pre-copied, SERVICE moving along; its summary.
fn migrate_with_service(env: &Env, hosts: &Hosts, name: &str, agent: &Agent, key: &Path) -> String {
    migrate_with_service_in(env, hosts, name, agent, key, "precopy")
}

/// The same in mode `mode`.
fn migrate_with_service_in(
    env: &Env,
    hosts: &Hosts,
    name: &str,
    agent: &Agent,
    key: &Path,
    mode: &str,
) -> String {
    let more = ["--mode", mode, "--move-addr", SERVICE];
    migrate_in(env, &hosts.names[0], name, &agent.addr, key, &more)
}

/// Which hosts hold SERVICE.
fn service_holders(hosts: &Hosts) -> Vec<usize> {
    (0..hosts.names.len())
        .filter(|&h| {
            hosts
                .ip(h, &["-4", "-o", "addr", "show"])
                .contains(&format!("{SERVICE}/"))
        })
        .collect()
}

/// An HTTP client that keeps one connection and requests a file through it until `stop`
/// exists: "ok N port P worst SECONDS" per answer; "BAD"/"RECONNECTED" (and exit 1) if an
/// answer is wrong or the connection had to be made again; a traceback on any error.
const HTTP_CLIENT: &str = r#"
import http.client, os, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
started = time.time()
while True:  # the server may still be starting
    try:
        c = http.client.HTTPConnection(host, port, timeout=60)
        c.connect()
        break
    except OSError:
        if time.time() - started > 60:
            raise
        time.sleep(0.1)
n, worst, first = 0, 0.0, None
while not os.path.exists(stop):
    t = time.time()
    c.request("GET", "/hello.txt")
    r = c.getresponse()
    body = r.read()
    if r.status != 200 or body != b"hello from the session\n":
        print(f"BAD {r.status} {body!r}", flush=True)
        sys.exit(1)
    port_now = c.sock.getsockname()[1]
    first = first or port_now
    if port_now != first:
        print(f"RECONNECTED {first} -> {port_now}", flush=True)
        sys.exit(1)
    worst = max(worst, time.time() - t)
    n += 1
    print(f"ok {n} port {port_now} worst {worst:.3f}", flush=True)
    time.sleep(0.01)
print(f"done {n} worst {worst:.3f}", flush=True)
"#;

/// The directory an HTTP server of these tests serves: hello.txt, which HTTP_CLIENT asks
/// for (readable by any user: a server's workers may run as nobody).
fn www(env: &Env) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let www = env.scratch("www");
    std::fs::write(www.join("hello.txt"), "hello from the session\n").unwrap();
    for d in [&env.root, &www] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    www
}

/// python3's http.server as session "web" on host A (HTTP/1.1: connections are kept), and
/// HTTP_CLIENT on host C requesting from it through SERVICE; (client, its log, stop file).
fn web_and_client(env: &Env, hosts: &Hosts) -> (Child, PathBuf, PathBuf) {
    let www = www(env);
    let server = [
        "python3",
        "-m",
        "http.server",
        "--bind",
        "0.0.0.0",
        "--protocol",
        "HTTP/1.1",
        "--directory",
        www.to_str().unwrap(),
        "8000",
    ];
    server_and_client(env, hosts, "web", &server)
}

/// Session `name` running `server` (an HTTP server on port 8000) on host A, and
/// HTTP_CLIENT on host C requesting from it through SERVICE; (client, its log, stop file).
fn server_and_client(
    env: &Env,
    hosts: &Hosts,
    name: &str,
    server: &[&str],
) -> (Child, PathBuf, PathBuf) {
    let log = env.root.join(format!("{name}.log"));
    run_in(env, &hosts.names[0], name, &log, server);
    let (log, stop) = (env.root.join("client.log"), env.root.join("client.stop"));
    let client = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.names[2],
            "python3",
            "-c",
            HTTP_CLIENT,
        ])
        .args([SERVICE, "8000", stop.to_str().unwrap()])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    // (The client waits for the server to listen; the session may be slow to start.)
    let t = Instant::now();
    while numbers(&log, "ok ").len() < 20 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the client got no answers: {}",
            std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (client, log, stop)
}

/// Ends HTTP_CLIENT; asserts it never failed, and returns its answers and worst pause.
fn client_result(client: Child, log: &Path, stop: &Path) -> (u64, f64) {
    std::fs::write(stop, "").unwrap();
    let o = client.wait_with_output().unwrap();
    let out = std::fs::read_to_string(log).unwrap();
    assert!(
        o.status.success() && out.contains("done "),
        "the client failed:\n{}\n{}",
        out.lines().rev().take(5).collect::<Vec<_>>().join("\n"),
        std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
    );
    let last = out.lines().last().unwrap().to_string();
    let w: Vec<&str> = last.split_whitespace().collect();
    (w[1].parse().unwrap(), w[3].parse().unwrap())
}

#[test]
fn an_http_server_moves_with_its_address_and_its_client_sees_a_pause_not_an_error() {
    let env = Env::new("migrate-http");
    let Some((hosts, agent, key)) = service_lan(&env, "h", &[]) else {
        return;
    };
    let (client, log, stop) = web_and_client(&env, &hosts);
    let before = *numbers(&log, "ok ").last().unwrap();
    let out = migrate_with_service(&env, &hosts, "web", &agent, &key);
    assert_eq!(service_holders(&hosts), vec![1], "the address moved to B");
    assert!(env.processes("web").is_empty(), "gone from A");
    // The same connection goes on being answered, now from B.
    wait_numbers(&log, "ok ", before as usize + 50);
    // And a new connection reaches the server's listener there.
    let fresh = Command::new("ip")
        .args(["netns", "exec", &hosts.names[2], "python3", "-c"])
        .arg(format!(
            "import urllib.request; print(urllib.request.urlopen('http://{SERVICE}:8000/hello.txt', timeout=30).read().decode())"
        ))
        .output()
        .unwrap();
    assert_eq!(text(&fresh.stdout), "hello from the session\n\n");
    let (answers, worst) = client_result(client, &log, &stop);
    println!("{out}client: {answers} answers on one connection, longest wait {worst:.3} s");
}

#[test]
fn nginx_with_workers_as_nobody_moves_with_its_address_and_its_client_sees_a_pause_not_an_error() {
    nginx_moves("precopy");
}

#[test]
fn nginx_moves_lazily_though_it_needs_nothing_from_the_source_after_the_freeze() {
    // Its few MiB all go with the image: the target's pager is done before the restore
    // says it is back.
    nginx_moves("lazy");
}

fn nginx_moves(mode: &str) {
    // Started by root, its workers run as nobody: they may neither make their control
    // sockets in root's session directory nor put their connections in repair mode.
    if !have("nginx") {
        println!("SKIP: nginx is not installed");
        return;
    }
    let env = Env::new(&format!("migrate-nginx-{mode}"));
    let tag = if mode == "lazy" { "w" } else { "x" };
    let Some((hosts, agent, key)) = service_lan(&env, tag, &[]) else {
        return;
    };
    let (www, root) = (www(&env), env.root.display());
    let conf = env.root.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process on; worker_processes 2; user nobody nogroup;\n\
             pid {root}/nginx.pid; error_log {root}/nginx-error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;\n\
             server {{ listen 8000; root {}; }} }}\n",
            www.display()
        ),
    )
    .unwrap();
    let nginx = [
        "nginx",
        "-c",
        conf.to_str().unwrap(),
        "-p",
        &root.to_string(),
    ];
    let (client, log, stop) = server_and_client(&env, &hosts, "nginx", &nginx);
    let before = *numbers(&log, "ok ").last().unwrap();
    let out = migrate_with_service_in(&env, &hosts, "nginx", &agent, &key, mode);
    assert_eq!(service_holders(&hosts), vec![1], "the address moved to B");
    assert!(env.processes("nginx").is_empty(), "gone from A");
    wait_numbers(&log, "ok ", before as usize + 50);
    // On B the master is root's again and its workers nobody's.
    let pids: Vec<i64> = agent.restored_pids().iter().map(|&p| p as i64).collect();
    assert_root_then_nobody(&pids);
    let (answers, worst) = client_result(client, &log, &stop);
    println!("{out}client: {answers} answers on one connection, longest wait {worst:.3} s");
}

/// Debian's postgres server (not on PATH): the newest version's `bin` directory.
fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|b| b.join("postgres").exists() && b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

#[test]
fn postgres_run_as_its_own_user_moves_with_its_address_and_an_open_psql_session_goes_on() {
    // A server of several processes (started from its signal handlers, sharing memory and a
    // System V segment) that runuser starts as user postgres; a psql session on host C
    // inserts through one connection all along.
    let (Some(bin), true) = (postgres_bin(), have("psql") && have("runuser")) else {
        println!("SKIP: needs postgresql (server and psql) and runuser");
        return;
    };
    let env = Env::new("migrate-pg");
    let Some((hosts, plain, key)) = service_lan(&env, "g", &[]) else {
        return;
    };
    drop(plain);
    let agent = Agent::start_apart(&env, "agent-apart", &key, (&hosts.names[1], "10.77.0.2"));
    let segments = || -> Vec<PathBuf> {
        let dir = std::fs::read_dir("/dev/shm").unwrap();
        let mut v: Vec<PathBuf> = dir.filter_map(|e| Some(e.ok()?.path())).collect();
        v.retain(|p| p.to_string_lossy().starts_with("/dev/shm/PostgreSQL."));
        v
    };
    let others = segments();
    let data = env.scratch("pgdata");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&env.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sh = |args: &[&str]| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(args.join(" "))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    };
    let (d, initdb) = (data.display(), bin.join("initdb"));
    sh(&["chown postgres", &d.to_string()]);
    sh(&[
        "runuser -u postgres --",
        &initdb.display().to_string(),
        "-A trust -U postgres -D",
        &d.to_string(),
        ">/dev/null",
    ]);
    std::fs::write(data.join("pg_hba.conf"), "host all all 0.0.0.0/0 trust\n").unwrap();
    let (postgres, listen) = (bin.join("postgres"), format!("listen_addresses={SERVICE}"));
    let log = env.root.join("pg.log");
    let d = d.to_string();
    let server = [
        "runuser",
        "-u",
        "postgres",
        "--",
        postgres.to_str().unwrap(),
        "-D",
        &d,
        "-k",
        "",
        "-p",
        "5432",
        "-c",
        &listen,
    ];
    run_in(&env, &hosts.names[0], "pg", &log, &server);
    wait_for_text(&log, "ready to accept connections");
    let mut psql = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.names[2],
            "psql",
            "-h",
            SERVICE,
            "-U",
            "postgres",
        ])
        .args(["-At", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_psql = psql.stdin.take().unwrap();
    let answers = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let (out, answers) = (psql.stdout.take().unwrap(), answers.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                answers.lock().unwrap().push(l);
            }
        })
    };
    use std::io::Write;
    let sent = std::cell::Cell::new(0u64);
    let insert = |to: &mut std::process::ChildStdin| {
        sent.set(sent.get() + 1);
        writeln!(to, "insert into t values ({}) returning x;", sent.get()).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    };
    writeln!(to_psql, "create table t (x int);").unwrap();
    // (The inserts' numbers; psql also says "INSERT 0 1" for each.)
    let answered = || {
        let a = answers.lock().unwrap();
        a.iter().filter(|l| l.parse::<u64>().is_ok()).count()
    };
    while answered() < 30 {
        insert(&mut to_psql);
    }
    let out = std::thread::scope(|s| {
        let m = s.spawn(|| migrate_with_service(&env, &hosts, "pg", &agent, &key));
        while !m.is_finished() {
            insert(&mut to_psql);
        }
        m.join().unwrap()
    });
    assert_eq!(service_holders(&hosts), vec![1], "the address moved to B");
    assert!(env.processes("pg").is_empty(), "gone from A");
    let after = sent.get() as usize;
    while answered() < after + 30 {
        insert(&mut to_psql);
    }
    writeln!(to_psql, "select 'rows', count(*) from t;").unwrap();
    drop(to_psql);
    let st = psql.wait().unwrap();
    reader.join().unwrap();
    let said = answers.lock().unwrap().clone();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut psql.stderr.take().unwrap(), &mut err).unwrap();
    assert!(st.success(), "psql: {err}\n{}", said.join("\n"));
    // Every insert answered, once, in order, on the one connection; all of them stored.
    let (numbers, sent): (Vec<u64>, u64) = (
        said.iter().filter_map(|l| l.parse().ok()).collect(),
        sent.get(),
    );
    assert_eq!(numbers, (1..=sent).collect::<Vec<_>>(), "{err}");
    assert_eq!(said.last().unwrap(), &format!("rows|{sent}"));
    // On B, runuser is root's again and the server's processes postgres's.
    let uids: Vec<u32> = agent
        .restored_pids()
        .iter()
        .map(|&p| uids_of(p as i64)[0])
        .collect();
    assert_eq!(uids[0], 0, "{uids:?}");
    assert!(
        uids.len() >= 6 && uids[1..].iter().all(|&u| u != 0),
        "{uids:?}"
    );
    println!("{out}psql: {sent} inserts on one connection");
    // Killed, it leaves its dynamic shared memory behind.
    drop(agent);
    for p in segments().into_iter().filter(|p| !others.contains(p)) {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn redis_under_a_redis_benchmark_load_moves_and_loses_no_acknowledged_write() {
    redis_under_load("precopy");
}

#[test]
fn redis_under_a_redis_benchmark_load_moves_lazily_and_loses_no_acknowledged_write() {
    // (Its memory comes after it runs there: the load's first requests there fault it in.)
    redis_under_load("lazy");
}

fn redis_under_load(mode: &str) {
    if !have("redis-benchmark") {
        println!("SKIP: redis-benchmark not installed (.ci/run installs redis-tools)");
        return;
    }
    let env = Env::new(&format!("migrate-redisload-{mode}"));
    let Some((hosts, agent, key)) = service_lan(&env, if mode == "lazy" { "q" } else { "l" }, &[])
    else {
        return;
    };
    let data = env.scratch("redis");
    let mut server = redis_server("6390", &data);
    server[4] = "0.0.0.0".into(); // --bind: reachable from host C
    server.extend(["--protected-mode".into(), "no".into()]);
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    run_in(
        &env,
        &hosts.names[0],
        "redis",
        &env.root.join("redis.log"),
        &server,
    );
    let cli = |args: &[&str]| -> String {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &hosts.names[2],
                "redis-cli",
                "-h",
                SERVICE,
                "-p",
                "6390",
            ])
            .args(args)
            .output()
            .unwrap();
        text(&o.stdout).trim().to_string()
    };
    let t = Instant::now();
    while cli(&["ping"]) != "PONG" {
        assert!(t.elapsed() < Duration::from_secs(15), "redis did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Four connections incrementing one counter: every INCR redis-benchmark counts was
    // acknowledged, so the counter must end at exactly that many.
    const N: u64 = 400_000;
    let n = N.to_string();
    let bench = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.names[2],
            "redis-benchmark",
            "-h",
            SERVICE,
        ])
        .args(["-p", "6390", "-t", "incr", "-c", "4", "-q", "-n", &n])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let key_name = "counter:__rand_int__";
    while cli(&["get", key_name]).parse::<u64>().unwrap_or(0) < 20_000 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = migrate_with_service_in(&env, &hosts, "redis", &agent, &key, mode);
    let mut bench = bench;
    assert!(
        bench.try_wait().unwrap().is_none(),
        "the load ended before the migration did: the test proves nothing"
    );
    let o = bench.wait_with_output().unwrap();
    let report = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert!(
        o.status.success() && !report.contains("Error") && !report.contains("rror:"),
        "redis-benchmark: {report}"
    );
    assert_eq!(service_holders(&hosts), vec![1]);
    assert_eq!(cli(&["get", key_name]), n, "acknowledged INCRs");
    println!("{out}");
}

#[test]
fn a_refused_hand_over_puts_the_address_back_and_the_connection_goes_on_here() {
    let env = Env::new("migrate-handback");
    // The agent takes at most 1 MiB: it refuses once the session is frozen, the address
    // off A and the connection read.
    let Some((hosts, agent, key)) = service_lan(&env, "k", &["--max-bytes", "1048576"]) else {
        return;
    };
    let (client, log, stop) = web_and_client(&env, &hosts);
    let before = *numbers(&log, "ok ").last().unwrap();
    let mut args = migrate_args("web", &agent.addr, &key).to_vec();
    args.extend_from_slice(&["--move-addr", SERVICE]);
    let o = mig_in(&env, &hosts.names[0], &args);
    assert_refused(&o, &["limit", "runs on here"]);
    assert_eq!(service_holders(&hosts), vec![0], "the address is back on A");
    wait_numbers(&log, "ok ", before as usize + 50);
    assert_eq!(env.processes("web").len(), 1);
    let (answers, worst) = client_result(client, &log, &stop);
    println!("client: {answers} answers on one connection, longest wait {worst:.3} s");
}

#[test]
fn a_hand_over_that_fails_in_the_restore_there_leaves_the_connection_going_on_here() {
    // The server holds a System V segment whose key is taken on the target (the test's
    // hosts share one IPC namespace: the source's own segment): the restore there fails
    // after it made the connection again. Closing that copy must end nothing for the client.
    let env = Env::new("migrate-failover");
    let Some((hosts, agent, key)) = service_lan(&env, "f", &[]) else {
        return;
    };
    let www = www(&env);
    let server = format!(
        "import ctypes, functools, http.server\n\
         libc = ctypes.CDLL(None); libc.shmat.restype = ctypes.c_void_p\n\
         seg = libc.shmget({}, 4096, 0o1600)\n\
         assert seg >= 0 and libc.shmat(seg, None, 0) not in (None, -1)\n\
         h = functools.partial(http.server.SimpleHTTPRequestHandler, directory='{}')\n\
         h.func.protocol_version = 'HTTP/1.1'\n\
         http.server.ThreadingHTTPServer(('0.0.0.0', 8000), h).serve_forever()\n",
        0x6d00_0000 + std::process::id() % 0x10000,
        www.display()
    );
    let (client, log, stop) = server_and_client(&env, &hosts, "web", &["python3", "-c", &server]);
    let before = *numbers(&log, "ok ").last().unwrap();
    let mut args = migrate_args("web", &agent.addr, &key).to_vec();
    args.extend_from_slice(&["--move-addr", SERVICE]);
    let o = mig_in(&env, &hosts.names[0], &args);
    assert_refused(&o, &["System V", "runs on here"]);
    assert_eq!(service_holders(&hosts), vec![0], "the address is back on A");
    wait_numbers(&log, "ok ", before as usize + 50);
    assert!(agent.restored_pids().is_empty(), "nothing left on B");
    let (answers, worst) = client_result(client, &log, &stop);
    println!("client: {answers} answers on one connection, longest wait {worst:.3} s");
}

/// `mig` (a copy any user can reach, in `bin`) as user nobody, with runtime directory `rt`.
fn mig_as_nobody(bin: &Path, rt: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin.join("mig"))
        .env("MIGSHIM_RUNTIME_DIR", rt)
        .env("HOME", bin);
    c
}

#[test]
fn a_normal_user_migrates_to_their_own_agent() {
    // No root on either side: the session, the agent and mig run as nobody. Lazy mode needs
    // a userfaultfd that reports forks on the target, which a normal user never has
    // (CAP_SYS_PTRACE): the agent refuses it before anything is frozen.
    if !is_root() || Command::new("setpriv").arg("--version").output().is_err() {
        println!("SKIP: needs root (to become another user) and setpriv");
        return;
    }
    let env = Env::new("migrate-user");
    let bin = std::env::temp_dir().join(format!("migtest-user-mig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    for (from, to) in [
        (mig_bin(), "mig"),
        (shim_lib(), "libmigshim.so"),
        (c_program("counter"), "counter"),
    ] {
        std::fs::copy(&from, bin.join(to)).unwrap();
    }
    let (src, state) = (bin.join("src"), bin.join("agent"));
    std::fs::write(bin.join("key"), "a shared key for the tests, 32+ bytes").unwrap();
    for d in [&src, &state] {
        std::fs::create_dir_all(d).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&bin)
        .output()
        .unwrap();
    assert!(o.status.success());
    let port = free_port().to_string();
    let to = format!("127.0.0.1:{port}");
    let key = bin.join("key");
    let agent_log = env.root.join("agent.log");
    let mut agent = mig_as_nobody(&bin, &state.join("run"))
        .args(["agent", "--listen", &to, "--key"])
        .arg(&key)
        .arg("--state-dir")
        .arg(&state)
        .stdout(std::fs::File::create(&agent_log).unwrap())
        .stderr(std::fs::File::create(env.root.join("agent.err")).unwrap())
        .spawn()
        .unwrap();
    wait_for_text(&env.root.join("agent.err"), "listening on");
    let log = bin.join("cnt.log");
    let o = env.output({
        let mut c = mig_as_nobody(&bin, &src);
        c.args(["run", "--detach", "--name", "cnt", "--log"])
            .arg(&log)
            .arg("--")
            .arg(bin.join("counter"))
            .args(["40", "32", "4"]);
        c
    });
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_numbers(&log, "count ", 3);
    let migrate = |mode: &str| {
        let mut c = mig_as_nobody(&bin, &src);
        c.args(["migrate", "cnt", "--to", &to, "--key"])
            .arg(&key)
            .args(["--mode", mode]);
        env.output(c)
    };
    let lazy = {
        let o = migrate("lazy");
        let before = numbers(&log, "count ").len();
        let runs_on = wait_numbers(&log, "count ", before + 3).len() > before;
        (o, runs_on)
    };
    let o = migrate("precopy");
    let there = state.join("run/logs/cnt.log");
    let went_on = o
        .status
        .success()
        .then(|| wait_numbers(&there, "count ", 3));
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", bin.join("counter").to_str().unwrap()])
        .status();
    let _ = agent.kill();
    let _ = agent.wait();
    let err = std::fs::read_to_string(env.root.join("agent.err")).unwrap_or_default();
    let last = *numbers(&log, "count ").last().unwrap();
    remove_tables(&bin, 6);
    let _ = std::fs::remove_dir_all(&bin);
    let (refused, runs_on) = lazy;
    assert_refused(&refused, &["userfaultfd", "--mode precopy"]);
    assert!(runs_on, "after the refusal it ran on here");
    assert!(o.status.success(), "{}\nagent: {err}", text(&o.stderr));
    assert_eq!(went_on.unwrap()[0], last + 1, "it went on there");
}

/// A parent holding 24 MiB of random bytes and three children it forked, each checking
/// the copy it shares with the parent every tick.
const SHARING: &str = r#"
import hashlib, os, time
data = bytearray(os.urandom(24 << 20))
h = hashlib.sha256(data).digest()
for k in range(3):
    if os.fork() == 0:
        n = 0
        while True:
            n += 1
            ok = hashlib.sha256(data).digest() == h
            print(f"child {k} tick {n} {'ok' if ok else 'DAMAGED'}", flush=True)
            time.sleep(0.1)
while True:
    time.sleep(1)
"#;

/// A python tree (`script`, whose processes print lines beginning with `who(k)` and a
/// tick number) migrated in `mode` to an agent on this host once each has ticked twice;
/// checks that each went on there from its last tick, none saying DAMAGED. Returns what mig
/// migrate printed.
fn python_tree_moves(name: &str, script: &str, who: &[String], mode: &str) -> String {
    let env = Env::new(name);
    let key = key(&env);
    let agent = Agent::start(&env, "agent", &key, None, &[]);
    let log = env.detach("tree", &["python3", "-c", script]);
    for w in who {
        wait_numbers(&log, w, 2);
    }
    let mut args = migrate_args("tree", &agent.addr, &key).to_vec();
    args.extend(["--mode", mode]);
    let o = env.run(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("4 process(es)"), "{out}");
    let there = agent.session_log("tree");
    for w in who {
        let last = *numbers(&log, w).last().unwrap();
        let after = wait_numbers(&there, w, 3);
        let logs = [&log, &there].map(|l| std::fs::read_to_string(l).unwrap_or_default());
        assert_eq!(
            after[0],
            last + 1,
            "{w}went on: {out}\nhere:\n{}\nthere:\n{}",
            logs[0],
            logs[1]
        );
    }
    let text = std::fs::read_to_string(&there).unwrap();
    assert!(!text.contains("DAMAGED"), "{text}");
    println!("{out}");
    out
}

#[test]
fn a_forked_tree_s_pages_go_once_and_every_process_has_them_there() {
    // Four processes, the same 24 MiB each (and much of python's own memory): the pages
    // go over the link once, the images there hold them all.
    let who: Vec<String> = (0..3).map(|k| format!("child {k} tick ")).collect();
    let out = python_tree_moves("migrate-same", SHARING, &who, "stop-and-copy");
    let (sent, image) = (kib_before(&out, "sent ("), kib_before(&out, "frozen)"));
    assert!(
        image > 4.0 * 24.0 * 1024.0,
        "every image holds the pages: {out}"
    );
    assert!(sent < image / 2.5, "the same pages went once: {out}");
}

/// Four processes sharing 32 MiB (MAP_SHARED|MAP_ANONYMOUS, kept by fork), each writing
/// its own share of the pages (each page holds its number and generation), punching one
/// out now and then (MADV_REMOVE: zeros again), and checking its share against the
/// generations it keeps in its own memory every tick.
const WRITING_SHARED: &str = r#"
import mmap, os, random, struct, time
PAGE = 4096
m = mmap.mmap(-1, 32 << 20)
def fill(i, gen):
    return struct.pack('<QQ', i, gen) * (PAGE // 16) if gen else bytes(PAGE)
kids = 3
for k in range(kids):
    if os.fork() == 0:
        break
else:
    k = kids
mine = range(k, len(m) // PAGE, kids + 1)
gen = {}
for i in mine:
    gen[i] = 1
    m[i * PAGE:(i + 1) * PAGE] = fill(i, 1)
for n in range(1, 100000):
    bad = sum(1 for i in mine if m[i * PAGE:(i + 1) * PAGE] != fill(i, gen[i]))
    os.write(1, f"p{k} {n} {'ok' if bad == 0 else f'DAMAGED {bad}'}\n".encode())
    for i in random.sample(mine, 64):
        gen[i] += 1
        m[i * PAGE:(i + 1) * PAGE] = fill(i, gen[i])
    i = random.choice(mine)
    m.madvise(mmap.MADV_REMOVE, i * PAGE, PAGE)
    gen[i] = 0
    time.sleep(0.05)
"#;

#[test]
fn shared_memory_that_every_process_writes_goes_ahead_in_precopy_and_comes_back_as_written() {
    // Only the process whose image stores the object sends it, and its write tracking does
    // not see the others' writes: its rounds send the object by hash, and the freeze
    // stores what changed since.
    writers_of_shared_memory_move("migrate-shared", "precopy", 12.0);
}

#[test]
fn shared_memory_that_every_process_writes_goes_ahead_of_a_lazy_migration_and_comes_back_as_written()
 {
    // A lazy migration fetches a process's own memory page by page after the session runs
    // there; its shared memory goes ahead as in pre-copy, and only what changed since the
    // last round in the freeze.
    let out = writers_of_shared_memory_move("migrate-shared-lazy", "lazy", 16.0);
    assert!(out.contains("post-copy"), "{out}");
}

/// WRITING_SHARED migrated in `mode`: its 32 MiB object goes before the freeze, which
/// holds less than `most` MiB.
fn writers_of_shared_memory_move(name: &str, mode: &str, most: f64) -> String {
    let who: Vec<String> = (0..4).map(|k| format!("p{k} ")).collect();
    let out = python_tree_moves(name, WRITING_SHARED, &who, mode);
    let before = kib_before(&out, "before the freeze") / 1024.0;
    let frozen = kib_before(&out, "frozen)") / 1024.0;
    assert!(before > 32.0, "the object went ahead: {out}");
    assert!(frozen < most, "not the whole object in the freeze: {out}");
    out
}
