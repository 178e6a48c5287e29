//! A user's session migrated to an agent running as root: restored as that user, where
//! their own `mig` finds it, with no capability left over from the restore.

mod common;
use common::agents::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// nobody's account (uid, gid): the user whose session moves.
const NOBODY: u32 = 65534;

/// Where the agent keeps a user's sessions: where their own mig looks when they set nothing.
fn runtime_dir_of(uid: u32) -> PathBuf {
    let login = PathBuf::from(format!("/run/user/{uid}"));
    match login.is_dir() {
        true => login.join("migshim"),
        false => PathBuf::from(format!("/tmp/migshim-{uid}")),
    }
}

/// What runs a command as nobody inside namespace `ns`.
fn as_nobody_in(ns: &str) -> [&str; 9] {
    let user = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    [
        "ip", "netns", "exec", ns, "setpriv", user[0], user[1], user[2], user[3],
    ]
}

/// `mig ARGS` as nobody inside namespace `ns` (`rt`: its runtime directory, None: the
/// default).
fn mig_as_nobody(env: &Env, ns: &str, rt: Option<&Path>, args: &[&str]) -> std::process::Output {
    let inside = as_nobody_in(ns);
    let mut c = Command::new(inside[0]);
    c.args(&inside[1..])
        .arg(mig_bin())
        .args(args)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("MIGSHIM_RUNTIME_DIR");
    if let Some(rt) = rt {
        c.env("MIGSHIM_RUNTIME_DIR", rt);
    }
    env.output(c)
}

/// The processes of session `name` in nobody's default runtime directory, killed when
/// dropped (a failed test leaves nothing running as nobody).
struct Theirs<'a>(&'a Env, &'a str, String);

impl Theirs<'_> {
    fn pids(&self) -> Vec<i32> {
        let o = mig_as_nobody(self.0, self.1, None, &["ps", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == self.2.as_str())
            .flat_map(|s| s["processes"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["pid"].as_i64().map(|p| p as i32))
            .collect()
    }
}

impl Drop for Theirs<'_> {
    fn drop(&mut self) {
        let pids = self.pids();
        for &pid in &pids {
            // SAFETY: kill takes plain values.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        wait_gone(&pids);
        // (Listing clears the ended session away, its table in /dev/shm with it.)
        self.pids();
        let _ = std::fs::remove_file(their_log(&self.2));
    }
}

/// The log of nobody's session `name` restored by the agent.
fn their_log(name: &str) -> PathBuf {
    runtime_dir_of(NOBODY)
        .join("logs")
        .join(format!("{name}.log"))
}

/// A capability set line of /proc/PID/status ("CapEff:" ...), as a number.
fn caps(pid: i32, which: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(which))
        .unwrap_or_else(|| panic!("{which} in {status}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

fn a_session_of_nobody_moves(tag: &str, mode: &str) {
    let env = Env::new(&format!("owners-{mode}"));
    let Some((hosts, agent, key)) = two_hosts(&env, tag) else {
        return;
    };
    // nobody's own files: the key (a copy), the source's runtime directory, the log.
    let home = env.scratch("nobody");
    let their_key = home.join("key");
    std::fs::copy(&key, &their_key).unwrap();
    for p in [&home, &their_key] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let (rt, log) = (home.join("rt"), home.join("cnt.log"));
    let name = format!("u{}{tag}", std::process::id());
    let here = &hosts.names[0];
    let theirs = Theirs(&env, &hosts.names[1], name.clone());
    let cnt = c_program("counter");
    let o = mig_as_nobody(
        &env,
        here,
        Some(&rt),
        &[
            "run",
            "--detach",
            "--name",
            &name,
            "--log",
            log.to_str().unwrap(),
            "--",
            cnt.to_str().unwrap(),
            "40",
            "64",
            "8",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_numbers(&log, "count ", 3);

    let mut args = migrate_args(&name, &agent.addr, &their_key).to_vec();
    args.extend(["--mode", mode]);
    let o = mig_as_nobody(&env, here, Some(&rt), &args);
    let agent_log = std::fs::read_to_string(env.root.join("agent.log")).unwrap_or_default();
    assert!(
        o.status.success(),
        "{}\nagent: {agent_log}",
        text(&o.stderr)
    );

    // It runs there as nobody, counting on, and nobody's own `mig` sees it.
    let target_log = their_log(&name);
    assert_went_on(&log, &target_log);
    let pids = theirs.pids();
    assert_eq!(pids.len(), 1, "nobody's mig ps lists it there");
    assert_eq!(uids_of(pids[0] as i64), [NOBODY; 4]);
    for set in ["CapEff:", "CapPrm:", "CapAmb:"] {
        assert_eq!(
            caps(pids[0], set),
            0,
            "{set}: nothing lent to the restore is left"
        );
    }
    // nobody asking the agent from here sees it.
    let o = mig_as_nobody(
        &env,
        here,
        Some(&rt),
        &[
            "ps",
            "--host",
            &agent.addr,
            "--key",
            their_key.to_str().unwrap(),
        ],
    );
    assert!(
        text(&o.stdout).contains(&name),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    // Theirs to command: nobody checkpoints it there.
    let img = home.join("img");
    let o = mig_as_nobody(
        &env,
        &hosts.names[1],
        None,
        &["checkpoint", &name, "--out", img.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    counts_on_undamaged(&target_log, 2);
}

#[test]
fn a_user_s_session_migrates_to_a_root_agent_and_runs_there_as_that_user() {
    a_session_of_nobody_moves("o", "precopy");
}

#[test]
fn a_user_s_session_migrates_lazily_to_a_root_agent_and_runs_there_as_that_user() {
    a_session_of_nobody_moves("p", "lazy");
}

#[test]
fn an_agent_of_another_user_refuses_a_session_that_then_runs_on_here() {
    let env = Env::new("owners-refused");
    let Some((hosts, _, key)) = two_hosts(&env, "r") else {
        return;
    };
    // An agent run by nobody, beside root's.
    let state = env.scratch("nobody-agent");
    let their_key = env.root.join("their-key");
    std::fs::copy(&key, &their_key).unwrap();
    for p in [&state, &their_key] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let ns = hosts.names[1].as_str();
    let inside = as_nobody_in(ns);
    let agent = Agent::spawn(
        &env,
        ("nobody-agent", &their_key),
        &inside,
        "10.77.0.2",
        &[],
        &[],
    );
    let log = counter_in(&env, &hosts.names[0], "16", "1");
    wait_numbers(&log, "count ", 3);
    let o = mig_in(
        &env,
        &hosts.names[0],
        &migrate_args("cnt", &agent.addr, &key),
    );
    assert_refused(
        &o,
        &["belongs to uid 0", "restores only its own user's sessions"],
    );
    counts_on_undamaged(&log, 2);
}
