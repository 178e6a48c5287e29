//! Agents and hosts for the migration tests: a `mig agent` of a test's own, network
//! namespaces joined on one segment, and the checks a migrated session must pass.

use super::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A `mig agent` of its own (its runtime directory under `state`), killed when dropped.
pub struct Agent {
    pub child: Child,
    pub addr: String,
    pub state: PathBuf,
}

impl Agent {
    /// `netns`: run it inside that network namespace (`ip netns exec`).
    pub fn start(
        env: &Env,
        name: &str,
        key: &Path,
        netns: Option<(&str, &str)>,
        more: &[&str],
    ) -> Agent {
        Self::start_with(env, name, key, netns, more, &[])
    }

    /// The same, with environment variables `vars` (for it and what it runs).
    pub fn start_with(
        env: &Env,
        name: &str,
        key: &Path,
        netns: Option<(&str, &str)>,
        more: &[&str],
        vars: &[(&str, &str)],
    ) -> Agent {
        let inside: &[&str] = match netns {
            Some((ns, _)) => &["ip", "netns", "exec", ns],
            None => &[],
        };
        Self::spawn(
            env,
            (name, key),
            inside,
            netns.map_or("127.0.0.1", |n| n.1),
            more,
            vars,
        )
    }

    /// On host `ns` (address `ip`), in an IPC namespace of its own as on another machine:
    /// System V keys the session holds on the source are free there.
    pub fn start_apart(env: &Env, name: &str, key: &Path, (ns, ip): (&str, &str)) -> Agent {
        let inside = ["ip", "netns", "exec", ns, "unshare", "--ipc"];
        Self::spawn(env, (name, key), &inside, ip, &[], &[])
    }

    /// `mig agent` on `ip` run through the command `inside` (none: here).
    pub fn spawn(
        env: &Env,
        (name, key): (&str, &Path),
        inside: &[&str],
        ip: &str,
        more: &[&str],
        vars: &[(&str, &str)],
    ) -> Agent {
        let state = env.root.join(name);
        // (In a namespace of its own any port is free.)
        let port = free_port();
        let addr = format!("{ip}:{port}");
        let log = std::fs::File::create(env.root.join(format!("{name}.log"))).unwrap();
        let mut c = match inside.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(mig_bin());
                c
            }
            None => Command::new(mig_bin()),
        };
        c.args(["agent", "--listen", &addr, "--key"])
            .arg(key)
            .arg("--state-dir")
            .arg(&state)
            .args(more)
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = c.spawn().unwrap();
        let agent = Agent { child, addr, state };
        wait_for_text(&env.root.join(format!("{name}.log")), "listening on");
        agent
    }

    /// The log of a session restored by this agent.
    pub fn session_log(&self, name: &str) -> PathBuf {
        self.state.join("run/logs").join(format!("{name}.log"))
    }

    /// The pids of the processes of the sessions this agent restored.
    pub fn restored_pids(&self) -> Vec<i32> {
        let o = self.mig().args(["ps", "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["processes"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["pid"].as_i64().map(|p| p as i32))
            .collect()
    }

    pub fn mig(&self) -> Command {
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

/// Waits (up to 15 s) until none of `pids` lives: a copy of the session that must not run.
pub fn wait_gone(pids: &[i32]) {
    let t = std::time::Instant::now();
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(15),
            "the copy there lives on: {pids:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub fn key(env: &Env) -> PathBuf {
    let k = env.root.join("key");
    std::fs::write(&k, "a shared key for the tests, 32+ bytes").unwrap();
    k
}

/// `mig migrate SESSION --to TO --key KEY`'s arguments.
pub fn migrate_args<'a>(session: &'a str, to: &'a str, key: &'a Path) -> [&'a str; 6] {
    [
        "migrate",
        session,
        "--to",
        to,
        "--key",
        key.to_str().unwrap(),
    ]
}

pub fn migrate(env: &Env, session: &str, to: &str, key: &Path) -> std::process::Output {
    env.run(&migrate_args(session, to, key))
}

/// Whether part of an image (8 MiB or more) has reached `agent`'s state directory.
pub fn arrived(agent: &Agent) -> bool {
    std::fs::read_dir(agent.state.join("incoming"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        // (In memory, the file is a link to the agent's memfd.)
        .any(|f| std::fs::metadata(f.path()).is_ok_and(|m| m.len() > 8 << 20))
}

/// Counts on the target from where it stopped here, its memory verified each tick.
pub fn assert_went_on(source_log: &Path, target_log: &Path) {
    let last = *numbers(source_log, "count ").last().unwrap();
    let after = wait_numbers(target_log, "count ", 3);
    assert_eq!(after[0], last + 1, "it went on from {last}: {after:?}");
    let text = std::fs::read_to_string(target_log).unwrap();
    assert!(!text.contains("damaged"), "{text}");
}

/// A subject printing "tick N" (and "BAD ..." on damage) went on at the target from the
/// tick after its last here, `n` ticks, undamaged; returns the target's log.
pub fn assert_ticked_on(source_log: &Path, target_log: &Path, n: usize) -> String {
    let last = *numbers(source_log, "tick ").last().unwrap();
    let after = wait_numbers(target_log, "tick ", n);
    assert_eq!(after[0], last + 1, "it went on from {last}: {after:?}");
    let text = std::fs::read_to_string(target_log).unwrap();
    assert!(!text.contains("BAD"), "{text}");
    text
}

/// A migration that failed, saying each of `needles`.
pub fn assert_refused(o: &std::process::Output, needles: &[&str]) {
    assert!(!o.status.success(), "the migration cannot have succeeded");
    let err = text(&o.stderr);
    assert!(
        needles.iter().all(|n| err.contains(n)),
        "{needles:?} in: {err}"
    );
}

/// The counter of `log` counts `n` more, its memory intact.
pub fn counts_on_undamaged(log: &Path, n: usize) {
    let before = numbers(log, "count ").len();
    wait_numbers(log, "count ", before + n);
    assert!(!std::fs::read_to_string(log).unwrap().contains("damaged"));
}

/// The figure before `what` in a summary like "(1.5 MiB before the freeze, 20.0 KiB frozen)",
/// in KiB.
pub fn kib_before(summary: &str, what: &str) -> f64 {
    let head = &summary[..summary
        .find(what)
        .unwrap_or_else(|| panic!("{what:?} in {summary}"))];
    let mut words = head.split([' ', '(', ',']).filter(|w| !w.is_empty()).rev();
    let unit = words.next().unwrap();
    let n: f64 = words.next().unwrap().parse().unwrap();
    n * match unit {
        "GiB" => 1024.0 * 1024.0,
        "MiB" => 1024.0,
        _ => 1.0,
    }
}

/// Network namespaces ("hosts") on one Ethernet segment: each joined by a veth pair to a
/// bridge in a namespace of its own; host i is 10.77.0.(i+1)/24. Removed when dropped.
pub struct Hosts {
    pub names: Vec<String>,
    /// Each host's interface, in the same order.
    pub links: Vec<String>,
    pub switch: String,
}

impl Hosts {
    pub fn new(tag: &str, n: usize) -> Hosts {
        let id = std::process::id() % 10000;
        let switch = format!("mig{id}{tag}s");
        let letters = ["a", "b", "c"];
        let names: Vec<String> = (0..n)
            .map(|i| format!("mig{id}{tag}{}", letters[i]))
            .collect();
        let links: Vec<String> = (0..n)
            .map(|i| format!("v{id}{tag}{}", letters[i]))
            .collect();
        let mut script = format!(
            "ip netns add {switch} && ip -n {switch} link add br0 type bridge && ip -n {switch} link set br0 up"
        );
        for (i, (ns, link)) in names.iter().zip(&links).enumerate() {
            let port = format!("s{id}{tag}{}", letters[i]);
            script += &format!(
                " && ip netns add {ns} && ip link add {link} netns {ns} type veth peer name {port} netns {switch} && \
                 ip -n {switch} link set {port} master br0 && ip -n {switch} link set {port} up && \
                 ip -n {ns} addr add 10.77.0.{}/24 dev {link} && ip -n {ns} link set {link} up && ip -n {ns} link set lo up",
                i + 1
            );
        }
        let hosts = Hosts {
            names,
            links,
            switch,
        };
        let o = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(o.status.success(), "{script}: {}", text(&o.stderr));
        hosts
    }

    /// `ip -n HOST ARGS...` (must succeed); its output.
    pub fn ip(&self, host: usize, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["-n", &self.names[host]])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "ip {args:?}: {}", text(&o.stderr));
        text(&o.stdout)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in self.names.iter().chain([&self.switch]) {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// `mig ARGS` inside network namespace `ns` with this test's runtime directory.
pub fn mig_in(env: &Env, ns: &str, args: &[&str]) -> std::process::Output {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(mig_bin())
        .args(args)
        .env("MIGSHIM_RUNTIME_DIR", &env.rt);
    env.output(c)
}

/// `mig run --detach --name NAME --log LOG -- CMD...` inside namespace `ns`.
pub fn run_in(env: &Env, ns: &str, name: &str, log: &Path, cmd: &[&str]) {
    let l = log.to_str().unwrap();
    let mut args = vec!["run", "--detach", "--name", name, "--log", l, "--"];
    args.extend_from_slice(cmd);
    let o = mig_in(env, ns, &args);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

/// The counter subject with `mib` MiB (writing `writes` MiB/s of it) as session "cnt"
/// inside namespace `ns`; its log.
pub fn counter_in(env: &Env, ns: &str, mib: &str, writes: &str) -> PathBuf {
    let log = env.root.join("cnt.log");
    let cnt = c_program("counter");
    run_in(
        env,
        ns,
        "cnt",
        &log,
        &[cnt.to_str().unwrap(), "40", mib, writes],
    );
    log
}

/// `mig migrate SESSION --to TO --key KEY MORE...` inside namespace `ns`, which must
/// succeed; its summary.
pub fn migrate_in(
    env: &Env,
    ns: &str,
    session: &str,
    to: &str,
    key: &Path,
    more: &[&str],
) -> String {
    let mut args = migrate_args(session, to, key).to_vec();
    args.extend_from_slice(more);
    let o = mig_in(env, ns, &args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    text(&o.stdout)
}

/// Root, iproute2, two namespaces and an agent in the second: (hosts, agent, key); None
/// (after saying why) without root.
pub fn two_hosts(env: &Env, tag: &str) -> Option<(Hosts, Agent, PathBuf)> {
    hosts(env, tag, 2, &[])
}

/// `n` hosts, an agent (with `more` arguments) on the second.
pub fn hosts(env: &Env, tag: &str, n: usize, more: &[&str]) -> Option<(Hosts, Agent, PathBuf)> {
    if !is_root() || Command::new("ip").arg("-V").output().is_err() {
        println!("SKIP: needs root and iproute2 for network namespaces");
        return None;
    }
    let key = key(env);
    let hosts = Hosts::new(tag, n);
    let agent = Agent::start(
        env,
        "agent",
        &key,
        Some((&hosts.names[1], "10.77.0.2")),
        more,
    );
    Some((hosts, agent, key))
}
