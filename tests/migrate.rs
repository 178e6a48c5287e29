//! Migration through agents (issue #5): a session moves to an agent and goes on there; a
//! wrong key, a refusing agent or one that dies mid-transfer leave it running here, intact.
//! Between network namespaces when root.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `mig agent` of its own (its runtime directory under `state`), killed when dropped.
struct Agent {
    child: Child,
    addr: String,
    state: PathBuf,
}

impl Agent {
    /// `netns`: run it inside that network namespace (`ip netns exec`).
    fn start(
        env: &Env,
        name: &str,
        key: &Path,
        netns: Option<(&str, &str)>,
        more: &[&str],
    ) -> Agent {
        let state = env.root.join(name);
        let ip = netns.map_or("127.0.0.1", |n| n.1);
        // A port nobody holds (in a namespace of its own any port is free).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("{ip}:{port}");
        let log = std::fs::File::create(env.root.join(format!("{name}.log"))).unwrap();
        let mut c = match netns {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(mig_bin());
                c
            }
            None => Command::new(mig_bin()),
        };
        c.args(["agent", "--listen", &addr, "--key"])
            .arg(key)
            .arg("--state-dir")
            .arg(&state)
            .args(more)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = c.spawn().unwrap();
        let agent = Agent { child, addr, state };
        wait_for_text(&env.root.join(format!("{name}.log")), "listening on");
        agent
    }

    /// The log of a session restored by this agent.
    fn session_log(&self, name: &str) -> PathBuf {
        self.state.join("run/logs").join(format!("{name}.log"))
    }

    fn mig(&self) -> Command {
        let mut c = Command::new(mig_bin());
        c.env("MIGSHIM_RUNTIME_DIR", self.state.join("run"));
        c
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The sessions it restored, then itself.
        let _ = self.mig().args(["ps", "--json"]).output().map(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            for s in v.as_array().into_iter().flatten() {
                for p in s["processes"].as_array().into_iter().flatten() {
                    if let Some(pid) = p["pid"].as_i64() {
                        // SAFETY: kill takes plain values.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
            }
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key(env: &Env) -> PathBuf {
    let k = env.root.join("key");
    std::fs::write(&k, "a shared key for the tests, 32+ bytes").unwrap();
    k
}

fn migrate(env: &Env, session: &str, to: &str, key: &Path) -> std::process::Output {
    env.run(&[
        "migrate",
        session,
        "--to",
        to,
        "--key",
        key.to_str().unwrap(),
    ])
}

/// Counts on the target from where it stopped here, its memory verified each tick.
fn assert_went_on(source_log: &Path, target_log: &Path) {
    let last = *numbers(source_log, "count ").last().unwrap();
    let after = wait_numbers(target_log, "count ", 3);
    assert_eq!(after[0], last + 1, "it went on from {last}: {after:?}");
    let text = std::fs::read_to_string(target_log).unwrap();
    assert!(!text.contains("damaged"), "{text}");
}

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

/// The session runs on here, counting, after a failed migration.
fn assert_runs_on_here(env: &Env, log: &Path) {
    let before = numbers(log, "count ").len();
    wait_numbers(log, "count ", before + 3);
    assert_eq!(env.processes("cnt").len(), 1);
    assert!(!std::fs::read_to_string(log).unwrap().contains("damaged"));
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
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("limit") && text(&o.stderr).contains("runs on here"),
        "{}",
        text(&o.stderr)
    );
    assert_runs_on_here(&env, &log);
    env.stop("cnt");
}

#[test]
fn an_agent_that_dies_mid_transfer_leaves_the_session_running_here() {
    let env = Env::new("migrate-dies");
    let key = key(&env);
    let mut agent = Agent::start(&env, "agent", &key, None, &[]);
    let log = env.detach(
        "cnt",
        &[c_program("counter").to_str().unwrap(), "40", "1024"],
    );
    wait_numbers(&log, "count ", 2);
    let mut c = env.mig();
    c.args([
        "migrate",
        "cnt",
        "--to",
        &agent.addr,
        "--key",
        key.to_str().unwrap(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let m = c.spawn().unwrap();
    // Kill the agent once part of the image has arrived.
    let t = Instant::now();
    let arrived = || {
        std::fs::read_dir(agent.state.join("incoming"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .any(|f| f.metadata().is_ok_and(|m| m.len() > 8 << 20))
    };
    while !arrived() {
        assert!(t.elapsed() < Duration::from_secs(30), "nothing arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    agent.child.kill().unwrap();
    let o = m.wait_with_output().unwrap();
    assert!(!o.status.success(), "the migration cannot have succeeded");
    assert!(text(&o.stderr).contains("mig"), "{}", text(&o.stderr));
    assert_runs_on_here(&env, &log);
    env.stop("cnt");
}

/// Two network namespaces joined by a veth pair, removed when dropped.
struct Hosts {
    names: [String; 2],
}

impl Hosts {
    fn new(tag: &str) -> Hosts {
        let id = std::process::id() % 10000;
        let names = [format!("mig{id}{tag}a"), format!("mig{id}{tag}b")];
        let sh = |c: &str| {
            let o = Command::new("sh").args(["-c", c]).output().unwrap();
            assert!(o.status.success(), "{c}: {}", text(&o.stderr));
        };
        let (a, b) = (&names[0], &names[1]);
        let (va, vb) = (format!("v{id}{tag}a"), format!("v{id}{tag}b"));
        sh(&format!(
            "ip netns add {a} && ip netns add {b} && ip link add {va} netns {a} type veth peer name {vb} netns {b} && \
             ip -n {a} addr add 10.77.0.1/24 dev {va} && ip -n {b} addr add 10.77.0.2/24 dev {vb} && \
             ip -n {a} link set {va} up && ip -n {b} link set {vb} up && ip -n {a} link set lo up && ip -n {b} link set lo up"
        ));
        Hosts { names }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn a_session_migrates_between_network_namespaces() {
    if !is_root() || Command::new("ip").arg("-V").output().is_err() {
        println!("SKIP: needs root and iproute2 for network namespaces");
        return;
    }
    let env = Env::new("migrate-ns");
    let key = key(&env);
    let hosts = Hosts::new("m");
    let agent = Agent::start(
        &env,
        "agent",
        &key,
        Some((&hosts.names[1], "10.77.0.2")),
        &[],
    );
    // The session runs in the first namespace (host A).
    let log = env.root.join("cnt.log");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &hosts.names[0]])
        .arg(mig_bin())
        .args(["run", "--detach", "--name", "cnt", "--log"])
        .arg(&log)
        .arg("--")
        .arg(c_program("counter"))
        .args(["40", "64"])
        .env("MIGSHIM_RUNTIME_DIR", &env.rt);
    assert!(env.output(c).status.success());
    wait_numbers(&log, "count ", 3);
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &hosts.names[0]])
        .arg(mig_bin())
        .args(["migrate", "cnt", "--to", &agent.addr, "--key"])
        .arg(&key)
        .env("MIGSHIM_RUNTIME_DIR", &env.rt);
    let o = env.output(c);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_went_on(&log, &agent.session_log("cnt"));
    assert!(env.processes("cnt").is_empty());
}
