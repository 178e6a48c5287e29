//! Descriptors under the shim: `mig table` describes every fd kind a real program holds
//! (kind, path, offset, counters, peer links), inherited objects keep one identity across
//! processes, and the journal stays flat.

mod common;
use common::*;
use serde_json::Value;

/// The fds of process `vpid` in a `mig table --json` answer, by fd number.
fn fds_of(table: &Value, vpid: i64) -> std::collections::BTreeMap<i64, Value> {
    table["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["vpid"] == vpid)
        .unwrap_or_else(|| panic!("no process {vpid} in {table}"))["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["fd"].as_i64().unwrap(), f.clone()))
        .collect()
}

#[test]
fn table_describes_every_fd_kind() {
    let env = Env::new("fdkinds");
    let dir = env.scratch("files");
    let log = env.detach(
        "fk",
        &[
            c_program("fdkinds").to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
    );
    let said = wait_for_text(&log, "ready");
    let table = env.table("fk", false);
    let fds = fds_of(&table, VPID_BASE + 1);
    let mut checked = 0;
    for line in said.lines().filter(|l| l.starts_with("fd ")) {
        let mut words = line.split_whitespace().skip(1);
        let fd: i64 = words.next().unwrap().parse().unwrap();
        let kind = words.next().unwrap();
        let f = fds
            .get(&fd)
            .unwrap_or_else(|| panic!("fd {fd} missing from the table ({line})"));
        let o = &f["object"];
        assert_eq!(o["kind"], kind, "{line}: {f}");
        assert_eq!(
            f["journaled"], true,
            "{line}: every fd was made through a wrapper"
        );
        for kv in words {
            let (k, v) = kv.split_once('=').unwrap();
            let num = v.parse::<i64>().ok();
            match k {
                "path" | "name" => assert_eq!(o[k], v, "{line}: {f}"),
                "local" => assert_eq!(
                    o["local"]["Path"]
                        .as_str()
                        .or(o["local"]["Abstract"].as_str())
                        .map(|p| if v.starts_with('@') {
                            format!("@{p}")
                        } else {
                            p.to_string()
                        }),
                    Some(v.to_string()),
                    "{line}: {f}"
                ),
                "offset" | "size" | "count" | "interval_ns" | "mask" | "domain" => {
                    assert_eq!(o[k].as_i64(), num, "{line}: {f}")
                }
                "deleted" | "listening" | "tty" => assert_eq!(o[k], v == "1", "{line}: {f}"),
                "append" => assert_ne!(
                    f["flags"].as_i64().unwrap() & libc::O_APPEND as i64,
                    0,
                    "{line}: {f}"
                ),
                "cloexec" => assert_eq!(f["cloexec"], true, "{line}: {f}"),
                "end" => assert_eq!(o["end"].as_str().unwrap().to_lowercase(), v, "{line}: {f}"),
                "type" => assert_eq!(o["ty"].as_i64().unwrap() & 0xf, num.unwrap(), "{line}: {f}"),
                "port" => assert_eq!(o["local"]["V4"]["port"].as_i64(), num, "{line}: {f}"),
                "same_as" => assert_eq!(o["path"], fds[&num.unwrap()]["object"]["path"], "{line}"),
                "pipe_of" => assert_eq!(
                    o["id"],
                    fds[&num.unwrap()]["object"]["id"],
                    "{line}: both ends, one pipe"
                ),
                "peer_fd" => {
                    let link = &o["peer_link"];
                    assert_eq!(link["fd"].as_i64(), num, "{line}: {f}");
                    assert_eq!(link["vpid"].as_i64(), Some(VPID_BASE + 1));
                    assert_eq!(
                        link["id"],
                        fds[&num.unwrap()]["object"]["id"],
                        "{line}: the link names the peer's id"
                    );
                }
                "interest_fd" | "interest_data" => {
                    let i = &o["interest"][0];
                    let key = if k == "interest_fd" { "fd" } else { "data" };
                    assert_eq!(i[key].as_i64(), num, "{line}: {f}");
                }
                "watch_path" => assert_eq!(o["watches"][0]["path"], v, "{line}: {f}"),
                other => panic!("test does not know {other}"),
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} properties checked");
    // Socket ids are unique in the session.
    let mut ids: Vec<i64> = fds
        .values()
        .filter(|f| f["object"]["kind"] == "socket")
        .map(|f| f["object"]["id"].as_i64().unwrap())
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n);
    assert!(ids.iter().all(|&i| i > 0));
    // The file mapping is listed.
    let maps = table["processes"][0]["mappings"].as_array().unwrap();
    let data = dir.join("data.txt");
    assert!(
        maps.iter().any(|m| m["path"] == data.to_str().unwrap()),
        "mapping of {}",
        data.display()
    );
    // The text form says the same things.
    let txt = text(&env.run(&["table", "fk"]).stdout);
    assert!(
        txt.contains("eventfd") && txt.contains("count 5") && txt.contains("listening"),
        "{txt}"
    );
    env.stop("fk");
}

#[test]
fn inherited_objects_keep_one_identity_across_processes() {
    let env = Env::new("shared");
    let script = r#"
import os, socket, time
a, b = socket.socketpair()
r, w = os.pipe()
if os.fork() == 0:
    a.close(); os.close(w)
    print("child", os.getpid(), b.fileno(), r, flush=True)
    time.sleep(60); os._exit(0)
b.close(); os.close(r)
print("parent", os.getpid(), a.fileno(), w, flush=True)
time.sleep(60)
"#;
    let log = env.detach("sh", &["python3", "-c", script]);
    // Both lines whole before their numbers are read (the message says what came if not).
    let t = std::time::Instant::now();
    let said = loop {
        let s = std::fs::read_to_string(&log).unwrap_or_default();
        let whole = |who: &str| {
            s.split_inclusive('\n')
                .any(|l| l.starts_with(who) && l.ends_with('\n'))
        };
        if whole("parent ") && whole("child ") {
            break s;
        }
        assert!(
            t.elapsed().as_secs() < 15,
            "the two lines did not come: {s:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let get = |who: &str| -> Vec<i64> {
        said.lines()
            .find(|l| l.starts_with(who))
            .unwrap_or_else(|| panic!("no {who:?} line in {said:?}"))
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect()
    };
    let (p, c) = (get("parent"), get("child"));
    let t = env.table("sh", false);
    let (pf, cf) = (fds_of(&t, p[0]), fds_of(&t, c[0]));
    let (ps, cs) = (&pf[&p[1]]["object"], &cf[&c[1]]["object"]);
    assert_eq!(
        ps["peer_link"]["vpid"].as_i64(),
        Some(c[0]),
        "parent's end links to the child: {ps}"
    );
    assert_eq!(ps["peer_link"]["fd"].as_i64(), Some(c[1]));
    assert_eq!(cs["peer_link"]["id"], ps["id"], "{cs}");
    assert_eq!(
        pf[&p[2]]["object"]["id"], cf[&c[2]]["object"]["id"],
        "one pipe, one id in both processes"
    );
    assert_eq!(pf[&p[2]]["object"]["end"], "Write");
    assert_eq!(cf[&c[2]]["object"]["end"], "Read");
    env.stop("sh");
}

#[test]
fn journal_stays_flat_over_a_million_open_close() {
    let env = Env::new("flat");
    let f = env.scratch("f").join("x");
    let log = env.detach(
        "oc",
        &[
            c_program("openclose").to_str().unwrap(),
            f.to_str().unwrap(),
            "1000000",
        ],
    );
    wait_for_text(&log, "done");
    let t = env.table("oc", true);
    let p = &t["processes"][0];
    let j = &p["journal"];
    assert!(j["appended"].as_u64().unwrap() >= 2_000_000, "{j}");
    let recent = j["recent"].as_array().unwrap();
    assert!(
        recent.len() < 20_000,
        "the journal is folded as it goes: {} records kept",
        recent.len()
    );
    assert!(
        recent
            .iter()
            .rev()
            .take(4)
            .any(|r| r.get("Close").is_some()),
        "the newest records are there"
    );
    let pid = p["real_pid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        rss_kb < 16 * 1024,
        "resident memory after 1M open/close: {rss_kb} KiB"
    );
    assert!(
        !p["fds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|fd| fd["object"]["path"] == f.to_str().unwrap()),
        "closed fds are gone"
    );
    env.stop("oc");
}

#[test]
fn offsets_come_from_the_kernel_and_inherited_fds_are_listed() {
    // read() is not interposed: the offset after it is the kernel's. fds the session
    // inherited from outside (its stdio) were seen by no wrapper and are listed as such.
    let env = Env::new("inherit");
    let f = env.scratch("i").join("inherited.txt");
    std::fs::write(&f, "abcdef").unwrap();
    let script = format!(
        "exec 5<{}; read -n 3 x <&5 2>/dev/null || dd bs=1 count=3 <&5 >/dev/null 2>&1; exec sleep 60",
        f.display()
    );
    env.detach("in", &["bash", "-c", &script]);
    env.wait_processes("in", "sleep", |p| {
        p.len() == 1 && p[0]["command"].as_str().unwrap().starts_with("sleep")
    });
    let t = env.table("in", false);
    let fds = fds_of(&t, VPID_BASE + 1);
    let fd5 = &fds[&5];
    assert_eq!(fd5["object"]["kind"], "file");
    assert_eq!(
        fd5["object"]["offset"], 3,
        "the offset is read from the kernel: {fd5}"
    );
    assert_eq!(fd5["journaled"], true, "{fd5}");
    assert_eq!(
        fds[&1]["journaled"], false,
        "stdout came from outside: {}",
        fds[&1]
    );
    env.stop("in");
}

#[test]
fn what_the_shim_itself_does_is_not_journaled_as_the_app_s() {
    // A checkpoint's control thread reads /proc and writes the image; a restore's restart
    // path reads files and places the objects it is handed. None of that is the app's: its
    // journal holds its own three calls throughout, and after the restore every fd it
    // opened is still described by them. (Once, any nested call marked the thread as
    // outside the shim: the control thread journaled its /proc reads, and the restart
    // path's placing of fd 3 replaced its description with "a dup of an unknown fd".)
    let env = Env::new("ownwork");
    let dir = env.scratch("d");
    let log = env.detach(
        "ow",
        &[
            mig_bin().to_str().unwrap(),
            "counter",
            "--dir",
            dir.to_str().unwrap(),
        ],
    );
    wait_for_text(&log, "count 2");
    let app_calls = |t: &Value| -> Vec<String> {
        let p = &t["processes"][0];
        p["journal"]["recent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_object().unwrap().keys().next().unwrap().clone())
            .collect()
    };
    let own = ["Open", "SocketPair", "Pipe"];
    assert_eq!(app_calls(&env.table("ow", true)), own);
    let img = env.root.join("img");
    ok(
        &env,
        &[
            "checkpoint",
            "ow",
            "--out",
            env.root.join("img1").to_str().unwrap(),
        ],
    );
    let t = env.table("ow", true);
    assert_eq!(
        app_calls(&t),
        own,
        "after a checkpoint: {}",
        t["processes"][0]["journal"]
    );
    stop_into(&env, "ow", &img);
    let log = restore_detached(&env, &img, "ow");
    wait_for_text(&log, "count");
    let t = env.table("ow", true);
    assert_eq!(
        app_calls(&t),
        own,
        "after the restore: {}",
        t["processes"][0]["journal"]
    );
    let fds = fds_of(&t, VPID_BASE + 1);
    for fd in 3..=7 {
        assert_eq!(
            fds[&fd]["journaled"], true,
            "fd {fd} after the restore: {}",
            fds[&fd]
        );
    }
    assert!(
        t["processes"][0]["notes"].as_array().unwrap().is_empty(),
        "{}",
        t["processes"][0]["notes"]
    );
    env.stop("ow");
}
