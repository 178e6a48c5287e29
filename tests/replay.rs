//! Replaying the namespace on restore (issue #4): every kind of fd comes back in its state,
//! real servers answer again, rebinding policies move paths and ports, and what cannot be
//! rebuilt makes the checkpoint refuse unless told to ignore it.

mod common;
use common::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The objects subject's verdict after DIR/go appears: its "ok"/"FAIL" lines.
fn objects_verdict(dir: &Path, log: &Path) -> String {
    std::fs::write(dir.join("go"), "").unwrap();
    let out = wait_for_text(log, "checked ");
    // (One check needs root: a TCP send queue is read in repair mode.)
    let checks = if is_root() { 43 } else { 42 };
    assert!(
        out.contains(&format!("checked {checks} failed 0")),
        "some objects did not come back:\n{out}"
    );
    out
}

fn start_objects(env: &Env) -> std::path::PathBuf {
    let dir = env.scratch("objects");
    let log = env.detach(
        "obj",
        &[
            c_program("objects").to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
    );
    wait_for_text(&log, "ready");
    dir
}

#[test]
fn every_kind_of_fd_comes_back_in_its_state() {
    let env = Env::new("objects");
    let dir = start_objects(&env);
    let img = env.root.join("img");
    stop_into(&env, "obj", &img);
    let log = restore_detached(&env, &img, "restored.log");
    let out = objects_verdict(&dir, &log);
    assert!(!out.contains("ready"), "it went on, it did not start again");
}

#[test]
fn every_kind_of_fd_comes_back_after_three_cycles_in_a_row() {
    // What a restore made (reopened files, made-anew sockets, ptys, SysV segments attached
    // again, locks taken again) must itself checkpoint right.
    let env = Env::new("objects-cycles");
    let dir = start_objects(&env);
    let mut log = PathBuf::new();
    for i in 0..3 {
        let img = env.root.join(format!("img{i}"));
        stop_into(&env, "obj", &img);
        log = restore_detached(&env, &img, &format!("restored{i}.log"));
    }
    objects_verdict(&dir, &log);
}

#[test]
fn every_kind_of_fd_comes_back_inside_a_fresh_pid_namespace() {
    if !is_root() {
        println!("SKIP: needs root for a PID namespace (unshare -p)");
        return;
    }
    let env = Env::new("objects-ns");
    let dir = start_objects(&env);
    let img = env.root.join("img");
    stop_into(&env, "obj", &img);
    let log = env.root.join("ns.log");
    // The restore runs in the namespace; the test checks from outside.
    let script = format!(
        "{mig} restore {img} --detach --log {log} >/dev/null && while [ ! -e {dir}/done ]; do sleep 0.05; done",
        mig = mig_bin().display(),
        img = img.display(),
        log = log.display(),
        dir = dir.display(),
    );
    let mut c = std::process::Command::new("unshare");
    c.args(["-p", "-f", "--mount-proc", "sh", "-c", &script])
        .env("MIGSHIM_RUNTIME_DIR", &env.rt);
    let ns = c.spawn().unwrap();
    wait_for_text(&log, "");
    let verdict = std::panic::catch_unwind(|| objects_verdict(&dir, &log));
    std::fs::write(dir.join("done"), "").unwrap();
    let o = ns.wait_with_output().unwrap();
    assert!(o.status.success());
    verdict.unwrap();
}

/// A TCP server outside the session, for the subject to connect to.
fn outside_listener() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
fn an_fd_that_cannot_be_rebuilt_makes_the_checkpoint_refuse_unless_ignored() {
    let env = Env::new("unsupported");
    let (listener, port) = outside_listener();
    let script = format!(
        "import socket, time\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         print('fd', s.fileno(), flush=True)\n\
         i = 0\n\
         while True:\n    i += 1\n    print('tick', i, flush=True)\n    time.sleep(0.05)\n"
    );
    let log = env.detach("py", &["python3", "-c", &script]);
    let (_peer, _) = listener.accept().unwrap();
    let out = wait_for_text(&log, "tick 2");
    let fd: i32 = out
        .lines()
        .find_map(|l| l.strip_prefix("fd ")?.parse().ok())
        .unwrap();
    let img = env.root.join("img");
    let o = env.run(&["checkpoint", "py", "--out", img.to_str().unwrap(), "--stop"]);
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "checkpoint accepted an outside TCP connection"
    );
    assert!(
        err.contains(&format!("fd {fd} (socket)"))
            && err.contains("TCP connection")
            && err.contains("--ignore-unsupported"),
        "the refusal names the fd, its kind and the way out: {err}"
    );
    assert!(!img.exists(), "a refused checkpoint leaves no image");
    let before = wait_for_text(&log, "tick").lines().count();
    let again = wait_for_text(&log, &format!("tick {}", before + 3));
    assert!(
        again.contains("tick"),
        "the session runs on after the refusal"
    );

    let o = env.run(&[
        "checkpoint",
        "py",
        "--out",
        img.to_str().unwrap(),
        "--stop",
        "--ignore-unsupported",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    env.wait_processes("py", "the session to end", |p| p.is_empty());
    let last = *numbers(&log, "tick ").iter().max().unwrap();
    let (rlog, o) = try_restore_detached(&env, &img, "restored.log", &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains(&format!("fd {fd} (socket)"))
            && text(&o.stderr).contains("reads as closed"),
        "the restore reports the stand-in: {}",
        text(&o.stderr)
    );
    let out = wait_for_text(&rlog, &format!("tick {}", last + 3));
    assert!(
        out.contains(&format!("tick {}", last + 1)),
        "it went on where it stopped: {out}"
    );
    env.stop("py");
}

/// GET `path` over HTTP/1.0 from 127.0.0.1:port; the whole answer.
fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn wait_http(port: u16, path: &str) -> String {
    let t = std::time::Instant::now();
    loop {
        match http_get(port, path) {
            Ok(a) if a.starts_with("HTTP/1.0 200") => return a,
            other => assert!(
                t.elapsed().as_secs() < 15,
                "no answer on port {port}: {other:?}"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn python_http_server_answers_before_and_after_and_moves_port_with_map_port() {
    let env = Env::new("http");
    let site = env.scratch("site");
    std::fs::write(site.join("hello.txt"), "hello from the session\n").unwrap();
    let (old, new) = (free_port(), free_port());
    env.detach(
        "web",
        &[
            "python3",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            site.to_str().unwrap(),
            &old.to_string(),
        ],
    );
    assert!(wait_http(old, "/hello.txt").ends_with("hello from the session\n"));
    let img = env.root.join("img");
    stop_into(&env, "web", &img);
    assert!(http_get(old, "/hello.txt").is_err(), "the original is gone");
    let map = format!("{old}={new}");
    restore_detached_with(&env, &img, "restored.log", &["--map-port", &map]);
    assert!(wait_http(new, "/hello.txt").ends_with("hello from the session\n"));
    assert!(
        http_get(old, "/hello.txt").is_err(),
        "it listens on the new port only"
    );
    // mig table says how it came back and what it is bound to now.
    let o = env.run(&["table", "web"]);
    let table = text(&o.stdout);
    assert!(
        table.contains(&format!("--map-port {map}")) && table.contains(&format!("127.0.0.1:{new}")),
        "{table}"
    );
    env.stop("web");
}

#[test]
fn a_file_moved_elsewhere_is_found_again_through_map_path() {
    let env = Env::new("mappath");
    let old = env.scratch("old");
    let lines: String = (1..=5000).map(|i| format!("{i}\n")).collect();
    std::fs::write(old.join("data"), lines).unwrap();
    let script = format!(
        "exec 3< {}/data; while read -u 3 l; do echo \"got $l\"; sleep 0.02; done",
        old.display()
    );
    let log = env.detach("reader", &["bash", "-c", &script]);
    wait_for_text(&log, "got 5\n");
    let img = env.root.join("img");
    stop_into(&env, "reader", &img);
    let last = *numbers(&log, "got ").iter().max().unwrap();
    let new = env.root.join("new");
    std::fs::rename(&old, &new).unwrap();

    let (_, o) = try_restore_detached(&env, &img, "restored.log", &[]);
    assert!(!o.status.success(), "restored without the file");
    assert!(
        text(&o.stderr).contains("old/data"),
        "the error names the file: {}",
        text(&o.stderr)
    );

    let map = format!("{}={}", old.display(), new.display());
    let rlog = restore_detached_with(&env, &img, "restored.log", &["--map-path", &map]);
    wait_for_text(&rlog, &format!("got {}\n", last + 3));
    let first = numbers(&rlog, "got ")[0];
    assert_eq!(
        first,
        last + 1,
        "it read on from its offset in the moved file"
    );
    env.stop("reader");
}

#[test]
fn redis_server_keeps_its_keys_and_answers_redis_cli() {
    if !have("redis-server") || !have("redis-cli") {
        println!(
            "SKIP: redis-server/redis-cli not installed (apt install redis-server; .ci/run does)"
        );
        return;
    }
    let env = Env::new("redis");
    let port = free_port().to_string();
    let data = env.scratch("redis");
    let server = redis_server(&port, &data);
    env.detach(
        "redis",
        &server.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let cli = |args: &[&str]| -> String {
        let o = std::process::Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .unwrap();
        text(&o.stdout).trim().to_string()
    };
    let t = std::time::Instant::now();
    while cli(&["ping"]) != "PONG" {
        assert!(t.elapsed().as_secs() < 15, "redis did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for i in 0..1000 {
        cli(&["set", &format!("key{i}"), &format!("value{i}")]);
        if i % 100 == 0 {
            cli(&["rpush", "list", &i.to_string()]);
        }
    }
    let img = env.root.join("img");
    stop_into(&env, "redis", &img);
    assert_ne!(cli(&["ping"]), "PONG", "the original is gone");
    restore_detached(&env, &img, "restored.log");
    let t = std::time::Instant::now();
    while cli(&["ping"]) != "PONG" {
        assert!(
            t.elapsed().as_secs() < 15,
            "the restored redis does not answer"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(cli(&["dbsize"]), "1001");
    assert_eq!(cli(&["get", "key777"]), "value777");
    assert_eq!(cli(&["lrange", "list", "0", "-1"]).lines().count(), 10);
    assert_eq!(cli(&["set", "after", "yes"]), "OK");
    assert_eq!(cli(&["get", "after"]), "yes");
    env.stop("redis");
}
