//! migbench — per-call cost of the shim: each operation timed natively and under the shim
//! (`mig run`), medians of several runs, printed as a Markdown table with ratios.
//!
//!   cargo build --release && target/release/migbench [--runs 5]
//!   cargo build --release && target/release/migbench --checkpoint [--runs 5] [--dir DIR]
//!   cargo build --release && target/release/migbench --migrate [--runs 5] [--dir DIR] [--netns] [--link-rate RATE] [--only MODE[/MiB|/tree|/shm]]...
//!
//! `--checkpoint`: checkpoint time, freeze time, image size and restore time (until the
//! process runs again) of 64 MiB and 1 GiB sessions (the C counter subject), beside a
//! plain memcpy and a file write of the same size measured in the same run, in the same
//! directory.
//!
//! `migbench --worker` is the measured program: it times each operation in batches and
//! prints JSON (nanoseconds per operation, the median batch).

use serde_json::{Value, json};
use std::ffi::CString;
use std::process::Command;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// ns per call of `f`, median of `batches` batches of `n` calls.
fn time(n: usize, batches: usize, mut f: impl FnMut()) -> f64 {
    let v = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    median(v)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

// SAFETY (whole worker): plain libc calls on fds and processes this program owns.
fn worker() {
    let path = CString::new(format!("/tmp/migbench-{}", std::process::id())).unwrap();
    let mut out = serde_json::Map::new();
    out.insert(
        "getpid".into(),
        json!(time(1_000_000, 7, || unsafe {
            std::hint::black_box(libc::getpid());
        })),
    );
    out.insert(
        "open+close".into(),
        json!(time(50_000, 7, || unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CREAT, 0o644);
            libc::close(fd);
        })),
    );
    out.insert(
        "socket+close".into(),
        json!(time(50_000, 7, || unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            libc::close(fd);
        })),
    );
    let mut p = [0; 2];
    unsafe { libc::pipe(p.as_mut_ptr()) };
    let mut b = [0u8; 1];
    out.insert(
        "pipe write+read".into(),
        json!(time(200_000, 7, || unsafe {
            libc::write(p[1], b.as_ptr().cast(), 1);
            libc::read(p[0], b.as_mut_ptr().cast(), 1);
        })),
    );
    out.insert(
        "fork+wait".into(),
        json!(time(300, 7, || unsafe {
            let c = libc::fork();
            if c == 0 {
                libc::_exit(0);
            }
            libc::waitpid(c, std::ptr::null_mut(), 0);
        })),
    );
    // A child that starts a thread (under the shim, its control thread starts then too).
    out.insert(
        "fork+wait, the child starting a thread".into(),
        json!(time(50, 5, || unsafe {
            let c = libc::fork();
            if c == 0 {
                std::thread::spawn(|| ()).join().unwrap();
                libc::_exit(0);
            }
            libc::waitpid(c, std::ptr::null_mut(), 0);
        })),
    );
    // A long-running server's: a thread per request, after 50,000 requests.
    let start_join = || std::thread::spawn(|| ()).join().unwrap();
    (0..50_000).for_each(|_| start_join());
    out.insert(
        "thread start+join after 50,000".into(),
        json!(time(2_000, 7, start_join)),
    );
    out.insert(
        "exec /bin/true".into(),
        json!(time(60, 5, || {
            Command::new("/bin/true").status().unwrap();
        })),
    );
    let before = rss_kib();
    for _ in 0..1_000_000 {
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
            libc::close(fd);
        }
    }
    out.insert(
        "rss growth after 1M open/close (KiB)".into(),
        json!(rss_kib().saturating_sub(before)),
    );
    unsafe { libc::unlink(path.as_ptr()) };
    println!("{}", Value::Object(out));
}

fn run_once(exe: &std::path::Path, shim: bool) -> Value {
    let mut c = if shim {
        let mig = exe.with_file_name("mig");
        let mut c = Command::new(mig);
        c.args(["run", "--"]).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    let out = c.arg("--worker").output().expect("running the worker");
    assert!(
        out.status.success(),
        "worker failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(s.lines().last().unwrap_or("{}")).expect("worker output")
}

/// The counter subject, from the examples' build (OUT_DIR, recorded at compile time).
fn counter() -> std::path::PathBuf {
    migshim_examples::c_program("counter")
}

/// `prog`, run inside network namespace `ns` if given.
fn in_ns(ns: Option<&str>, prog: &std::path::Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(prog);
            c
        }
        None => Command::new(prog),
    }
}

/// Starts the counter subject with `mib` MiB as session "bench" (in namespace `ns`) and
/// waits for its first count; returns its log.
fn start_counter(
    (mig, ns): (&std::path::Path, Option<&str>),
    rt: &std::path::Path,
    base: &std::path::Path,
    mib: usize,
    writes_mib_per_s: u32,
) -> std::path::PathBuf {
    let log = base.join("migbench-counter.log");
    let args = [&mib.to_string(), &writes_mib_per_s.to_string()];
    start_session(
        (mig, ns),
        rt,
        &log,
        &counter(),
        &["2", args[0], args[1]],
        "count 1 ",
    );
    log
}

/// Runs `prog ARGS` as session "bench" (in namespace `ns`), its output into `log`, and waits
/// until the log shows `first`.
fn start_session(
    (mig, ns): (&std::path::Path, Option<&str>),
    rt: &std::path::Path,
    log: &std::path::Path,
    prog: &std::path::Path,
    args: &[&str],
    first: &str,
) {
    let st = in_ns(ns, mig)
        .env("MIGSHIM_RUNTIME_DIR", rt)
        .args(["run", "--detach", "--name", "bench", "--log"])
        .arg(log)
        .arg("--")
        .arg(prog)
        .args(args)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(first)
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// What `--migrate` moves: the counter with this many MiB, or a python3 tree of 9
/// processes (a parent printing ticks and 8 forked children; ~10 MiB each, mostly python's
/// many small mappings: a real program's shape, unlike the counter's one big region), or a
/// python3 tree of 5 sharing 64 MiB of memory (as postgres's buffers: the children each
/// write a byte of it every 10 ms).
#[derive(Clone, Copy)]
enum Subject {
    Counter(usize),
    Tree,
    Shared,
}

const SHARED: &str = "import mmap, os, random, sys, time
m = mmap.mmap(-1, 64 << 20)
for at in range(0, len(m), 1 << 16):
    m[at:at + (1 << 16)] = random.randbytes(1 << 16)
for i in range(int(sys.argv[1])):
    if os.fork() == 0:
        while True:
            m[random.randrange(len(m))] = 1; time.sleep(0.01)
c = 0
while True:
    c += 1; print('tick', c, flush=True); time.sleep(0.05)
";

const TREE: &str = "import os, sys, time
for i in range(int(sys.argv[1])):
    if os.fork() == 0:
        while True: time.sleep(0.01)
c = 0
while True:
    c += 1; print('tick', c, flush=True); time.sleep(0.05)
";

impl Subject {
    /// As `--only` names it (after "MODE/").
    fn key(self) -> String {
        match self {
            Subject::Counter(mib) => mib.to_string(),
            Subject::Tree => "tree".into(),
            Subject::Shared => "shm".into(),
        }
    }

    fn label(self) -> String {
        match self {
            Subject::Counter(mib) => format!("{mib} MiB"),
            Subject::Tree => "python tree, 9 processes".into(),
            Subject::Shared => "python tree, 5 processes sharing 64 MiB".into(),
        }
    }

    /// Starts it as session "bench", writing 10 MiB/s (the counter) or ticking (the tree).
    fn start(
        self,
        on: (&std::path::Path, Option<&str>),
        rt: &std::path::Path,
        base: &std::path::Path,
    ) {
        match self {
            Subject::Counter(mib) => drop(start_counter(on, rt, base, mib, 10)),
            Subject::Tree | Subject::Shared => {
                let (text, children) = match self {
                    Subject::Shared => (SHARED, "4"),
                    _ => (TREE, "8"),
                };
                let script = base.join(self.script());
                std::fs::write(&script, text).unwrap();
                let log = base.join("migbench-tree.log");
                let _ = std::fs::remove_file(&log);
                let py = std::path::Path::new("python3");
                start_session(
                    on,
                    rt,
                    &log,
                    py,
                    &[script.to_str().unwrap(), children],
                    "tick 1\n",
                );
            }
        }
    }

    /// A python subject's script file.
    fn script(self) -> &'static str {
        match self {
            Subject::Shared => "migbench-shm.py",
            _ => "migbench-tree.py",
        }
    }

    /// Ends the subject (the counter of any size if given size 0).
    fn stop(self) {
        let pattern = match self {
            Subject::Counter(0) => "counter 2 ".into(),
            Subject::Counter(mib) => format!("counter 2 {mib}"),
            Subject::Tree | Subject::Shared => self.script().into(),
        };
        let _ = Command::new("pkill").args(["-f", &pattern]).output();
    }
}

/// One checkpoint of a running session; (total ms, frozen ms, bytes) from mig's summary.
fn checkpoint_once(
    mig: &std::path::Path,
    rt: &std::path::Path,
    dir: &std::path::Path,
) -> (f64, f64, f64) {
    let _ = std::fs::remove_dir_all(dir);
    let out = Command::new(mig)
        .env("MIGSHIM_RUNTIME_DIR", rt)
        .args(["checkpoint", "bench", "--out"])
        .arg(dir)
        .output()
        .expect("mig checkpoint");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let num_before = |tag: &str| -> f64 {
        let i = s.find(tag).unwrap();
        s[..i].split_whitespace().last().unwrap().parse().unwrap()
    };
    let bytes = std::fs::metadata(dir.join("proc-4200001.img"))
        .map(|m| m.len() as f64)
        .unwrap_or(0.0);
    let _ = std::fs::remove_dir_all(dir);
    (
        num_before(" ms,"),
        {
            let i = s.find("frozen ").unwrap() + 7;
            s[i..].split_whitespace().next().unwrap().parse().unwrap()
        },
        bytes,
    )
}

fn checkpoint_bench(runs: usize, base: &std::path::Path) {
    let exe = std::env::current_exe().unwrap();
    let mig = exe.with_file_name("mig");
    let rt = base.join("migbench-rt");
    println!(
        "| session | checkpoint (total) | frozen | image | GB/s | restore (running again) | lazy restore | memcpy | file write |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for mib in [64usize, 1024] {
        let log = start_counter((&mig, None), &rt, base, mib, 0);
        let dir = base.join("migbench-img");
        let (mut total, mut frozen, mut size) = (vec![], vec![], 0.0);
        for _ in 0..runs {
            let (t, f, b) = checkpoint_once(&mig, &rt, &dir);
            total.push(t);
            frozen.push(f);
            size = b;
        }
        // Restore: stop the session into an image, then time `mig restore --detach` (it
        // returns once the process runs again), a few times from the same image.
        let img = base.join("migbench-stop");
        let _ = std::fs::remove_dir_all(&img);
        let out = Command::new(&mig)
            .env("MIGSHIM_RUNTIME_DIR", &rt)
            .args(["checkpoint", "bench", "--stop", "--out"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let restore = |more: &[&str]| {
            median(
                (0..runs)
                    .map(|_| {
                        let t = Instant::now();
                        let out = Command::new(&mig)
                            .env("MIGSHIM_RUNTIME_DIR", &rt)
                            .args(["restore", "--detach", "--log"])
                            .arg(&log)
                            .arg(&img)
                            .args(more)
                            .output()
                            .unwrap();
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        assert!(
                            out.status.success(),
                            "{}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        let _ = Command::new("pkill")
                            .args(["-f", &format!("counter 2 {mib}")])
                            .output();
                        while Command::new(&mig)
                            .env("MIGSHIM_RUNTIME_DIR", &rt)
                            .args(["ps"])
                            .output()
                            .map(|o| String::from_utf8_lossy(&o.stdout).contains("bench"))
                            .unwrap_or(false)
                        {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        ms
                    })
                    .collect(),
            )
        };
        let (eager, lazy) = (restore(&[]), restore(&["--lazy"]));
        let _ = std::fs::remove_dir_all(&img);
        // The same amount of memory copied, and written to a file in the same directory.
        let n = mib << 20;
        let src = vec![7u8; n];
        let mut dst = vec![0u8; n];
        let memcpy = median(
            (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    dst.copy_from_slice(std::hint::black_box(&src));
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        );
        std::hint::black_box(&dst);
        let f = base.join("migbench-write");
        let write = median(
            (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    std::fs::write(&f, &src).unwrap();
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    let _ = std::fs::remove_file(&f);
                    ms
                })
                .collect(),
        );
        let (t, fr) = (median(total), median(frozen));
        println!(
            "| {mib} MiB | {t:.1} ms | {fr:.1} ms | {:.1} MiB | {:.2} | {eager:.1} ms | {lazy:.1} ms | {memcpy:.1} ms | {write:.1} ms |",
            size / (1u64 << 20) as f64,
            size / (t / 1e3) / 1e9
        );
    }
    println!(
        "\n(median of {runs} checkpoints per size; image in {})",
        base.display()
    );
    clear(&mig, &rt);
}

/// A number in mig's summary: the word before `tag` (e.g. "frozen 12.3 ms" → before " ms").
fn summary_ms(s: &str, after: &str) -> f64 {
    let i = s.find(after).unwrap() + after.len();
    s[i..].split_whitespace().next().unwrap().parse().unwrap()
}

/// The size at the start of `s` ("95.9 MiB ..."), in MiB.
fn summary_mib(s: &str) -> f64 {
    let mut w = s.split_whitespace();
    let n: f64 = w.next().unwrap().parse().unwrap();
    n * match w.next().unwrap() {
        "GiB" => 1024.0,
        "KiB" => 1.0 / 1024.0,
        _ => 1.0,
    }
}

/// What the receiving end of a reference transfer does with the bytes.
#[derive(Clone, Copy, PartialEq)]
enum Receiver {
    /// Reads them into one reused buffer.
    Discards,
    /// Keeps them all, in memory it maps for them (as a target host must: a session's
    /// gibibyte has to land in memory the target did not use before).
    Keeps,
    /// Keeps them, and both ends run a keyed BLAKE3 over them, as `mig` and the agent run
    /// the stream's MAC: the least a migration checked end to end does.
    KeepsChecked,
}

/// Time to send `n` bytes over TCP (1 MiB writes), in ms: over loopback, or (`hosts`) from
/// network namespace `hosts[0]` to `hosts[1]` over the benchmark's veth pair.
fn transfer_ms(n: usize, how: Receiver, hosts: Option<[&'static str; 2]>) -> f64 {
    use std::io::{Read, Write};
    let checked = how == Receiver::KeepsChecked;
    let mac = || blake3::Hasher::new_keyed(&[7; 32]);
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        enter(hosts.map(|h| h[1]));
        let ip = hosts.map_or("127.0.0.1", |_| "10.78.0.2");
        let l = std::net::TcpListener::bind((ip, 0)).unwrap();
        tx.send(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![
            0u8;
            if how == Receiver::Discards {
                1 << 20
            } else {
                n
            }
        ];
        let (mut at, mut h) = (0, mac());
        loop {
            let end = (at + (1 << 20)).min(buf.len());
            match s.read(&mut buf[at..end]).unwrap() {
                0 => break,
                k if checked => {
                    h.update(&buf[at..at + k]);
                    at += k
                }
                k => at = if how == Receiver::Keeps { at + k } else { 0 },
            }
        }
        h.finalize()
    });
    let addr = rx.recv().unwrap();
    let t = Instant::now();
    let sender = std::thread::spawn(move || {
        enter(hosts.map(|h| h[0]));
        let chunk = vec![1u8; 1 << 20];
        let (mut s, mut h) = (std::net::TcpStream::connect(addr).unwrap(), mac());
        for _ in 0..n / chunk.len() {
            if checked {
                h.update(&chunk);
            }
            s.write_all(&chunk).unwrap();
        }
        h.finalize()
    });
    let sent = sender.join().unwrap();
    assert!(
        reader.join().unwrap() == sent,
        "the checked transfer came damaged"
    );
    t.elapsed().as_secs_f64() * 1e3
}

/// Moves this thread into network namespace `ns` (one `ip netns add` made), if given.
fn enter(ns: Option<&str>) {
    use std::os::fd::AsRawFd;
    if let Some(ns) = ns {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: a plain system call on an fd held open for it; it changes only the
        // calling thread's network namespace (the sockets it makes after).
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    }
}

/// Two network namespaces joined by a veth pair (10.78.0.1 and .2), removed when dropped;
/// with a rate (`--link-rate`, as tc writes it: `10gbit`), each end sends at most that.
struct TwoHosts;

const HOSTS: [&str; 2] = ["migbench-a", "migbench-b"];

impl TwoHosts {
    fn new(rate: Option<&str>) -> TwoHosts {
        drop(TwoHosts); // (leftovers of an interrupted run)
        let [a, b] = HOSTS;
        // (A token bucket: the burst is what may go at once, above a jiffy's worth.)
        let shape = match rate {
            Some(r) => format!(
                " && ip netns exec {a} tc qdisc add dev veth0 root tbf rate {r} burst 16mb latency 50ms \
                 && ip netns exec {b} tc qdisc add dev veth0 root tbf rate {r} burst 16mb latency 50ms"
            ),
            None => String::new(),
        };
        let script = format!(
            "ip netns add {a} && ip netns add {b} && \
             ip link add veth0 netns {a} type veth peer name veth0 netns {b} && \
             ip -n {a} addr add 10.78.0.1/24 dev veth0 && ip -n {b} addr add 10.78.0.2/24 dev veth0 && \
             ip -n {a} link set veth0 up && ip -n {b} link set veth0 up && \
             ip -n {a} link set lo up && ip -n {b} link set lo up{shape}"
        );
        let o = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(
            o.status.success(),
            "--netns needs root and iproute2 (--link-rate: tc's tbf): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        TwoHosts
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in HOSTS {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// `--migrate`: a session writing 10 MiB/s of its memory migrated to an agent on this host
/// (`--netns`: from one network namespace to another, over a veth pair limited to `rate`
/// if given), per mode and size: freeze and total time, bytes sent and pre-copy rounds
/// (lazy: how long the source served pages after the session ran on the target), beside
/// transfers of the session's size between the same ends (Receiver): plain, into fresh
/// memory, and into fresh memory checked by a MAC at both ends.
/// `only`: the rows to run ("MODE" or "MODE/MiB", e.g. `lazy/1024`), all when empty.
fn migrate_bench(
    runs: usize,
    base: &std::path::Path,
    (netns, rate): (bool, Option<&str>),
    only: &[&str],
) {
    let hosts = netns.then(|| TwoHosts::new(rate));
    let (src, dst) = match hosts {
        Some(_) => (Some(HOSTS[0]), Some(HOSTS[1])),
        None => (None, None),
    };
    let mig = std::env::current_exe().unwrap().with_file_name("mig");
    let (rt, state, key) = (
        base.join("migbench-src"),
        base.join("migbench-agent"),
        base.join("migbench.key"),
    );
    std::fs::write(&key, "migbench's agent key, 32 bytes long").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let to = format!("{}:{port}", if netns { "10.78.0.2" } else { "127.0.0.1" });
    let agent = in_ns(dst, &mig)
        .args(["agent", "--listen", &to, "--key"])
        .arg(&key)
        .arg("--state-dir")
        .arg(&state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // (Ended however the benchmark ends: a failed run leaves nothing running.)
    let _leftovers = Leftovers {
        agent,
        mig: mig.clone(),
        dirs: [rt.clone(), state.join("run")],
        state: state.clone(),
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    println!(
        "| mode | session | frozen | (stopping / image / restore there) | total | sent (frozen) | rounds / post-copy | loopback transfer of the session | total ÷ loopback | loopback into fresh memory | total ÷ that | the same, MAC'd at both ends | total ÷ that |"
    );
    println!(
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let rows = ["stop-and-copy", "precopy", "lazy"]
        .into_iter()
        .flat_map(|mode| {
            [
                Subject::Counter(64),
                Subject::Counter(1024),
                Subject::Tree,
                Subject::Shared,
            ]
            .map(|s| (mode, s))
        });
    for (mode, subject) in rows.filter(|(mode, s)| {
        only.is_empty()
            || only.contains(mode)
            || only.contains(&format!("{mode}/{}", s.key()).as_str())
    }) {
        let (mut frozen, mut total, mut sent) = (vec![], vec![], String::new());
        // Pre-copy rounds, or (post-copy) ms the source was kept after the session ran on.
        let (mut rounds, mut post) = (vec![], false);
        // The reference transfers, per Receiver.
        let mut wire: [Vec<f64>; 3] = Default::default();
        let mut parts: [Vec<f64>; 3] = Default::default();
        for _ in 0..runs {
            subject.start((&mig, src), &rt, base);
            // (Writing for a moment first, as a running server would.)
            std::thread::sleep(std::time::Duration::from_millis(500));
            let out = in_ns(src, &mig)
                .env("MIGSHIM_RUNTIME_DIR", &rt)
                .args(["migrate", "bench", "--mode", mode, "--to", &to, "--key"])
                .arg(&key)
                .output()
                .unwrap();
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            frozen.push(summary_ms(&s, "frozen "));
            for (p, after) in parts
                .iter_mut()
                .zip(["the freeze: ", " session, ", " image, "])
            {
                p.push(summary_ms(&s, after));
            }
            total.push(summary_ms(&s, "total "));
            let sent_part = &s[s.find("thread(s), ").unwrap() + 11..];
            let frozen_part = sent_part[sent_part.find("the freeze, ").unwrap() + 12..]
                .split(" frozen")
                .next()
                .unwrap();
            sent = format!(
                "{} ({frozen_part})",
                sent_part.split(" sent").next().unwrap()
            );
            // "N pre-copy round(s)", lazily followed by "post-copy: X after it ran there,
            // kept here Y ms".
            let tail = s.rsplit("total ").next().unwrap();
            post = tail.contains("kept here ");
            rounds.push(match tail.find("kept here ") {
                Some(i) => summary_ms(&tail[i..], "kept here "),
                None => tail
                    .split(", ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap(),
            });
            subject.stop();
            // Gone from the agent too before the next run.
            while Command::new(&mig)
                .env("MIGSHIM_RUNTIME_DIR", state.join("run"))
                .arg("ps")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("bench"))
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            // (The tree's size: what was sent of it.)
            let size = match subject {
                Subject::Counter(mib) => mib << 20,
                Subject::Tree | Subject::Shared => {
                    (summary_mib(sent_part) * (1 << 20) as f64) as usize
                }
            };
            let ends = hosts.as_ref().map(|_| HOSTS);
            for (w, how) in
                wire.iter_mut()
                    .zip([Receiver::Discards, Receiver::Keeps, Receiver::KeepsChecked])
            {
                w.push(transfer_ms(size, how, ends));
            }
        }
        let (f, t) = (median(frozen), median(total));
        let [stop, image, there] = parts.map(median);
        let rounds = match (post, median(rounds)) {
            (true, ms) => format!("{ms:.1} ms"),
            (false, n) => format!("{n}"),
        };
        let refs: String = wire
            .map(median)
            .iter()
            .map(|w| format!(" {w:.1} ms | {:.2} |", t / w))
            .collect();
        println!(
            "| {mode} | {} | {f:.1} ms | {stop:.1} / {image:.1} / {there:.1} ms | {t:.1} ms | {sent} | {rounds} |{refs}",
            subject.label(),
        );
    }
    println!(
        "\n(median of {runs} migrations per row, agent at {to}{})",
        match (netns, rate) {
            (true, Some(r)) => format!(
                ", in another network namespace; the reference transfers between the same namespaces, over the same veth pair limited to {r}"
            ),
            (true, None) => ", in another network namespace; the reference transfers between the same namespaces, over the same veth pair".into(),
            _ => String::new(),
        }
    );
}

/// What a migration benchmark leaves: its agent, the subject (wherever it runs), the
/// runtime directories and the agent's state; ended and removed when dropped.
struct Leftovers {
    agent: std::process::Child,
    mig: std::path::PathBuf,
    dirs: [std::path::PathBuf; 2],
    state: std::path::PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        for s in [Subject::Counter(0), Subject::Tree, Subject::Shared] {
            s.stop();
        }
        for d in &self.dirs {
            clear(&self.mig, d);
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Removes runtime directory `rt`, its ended sessions cleared away by `mig ps` first (their
/// tables may live in /dev/shm).
fn clear(mig: &std::path::Path, rt: &std::path::Path) {
    let _ = Command::new(mig)
        .env("MIGSHIM_RUNTIME_DIR", rt)
        .arg("ps")
        .output();
    let _ = std::fs::remove_dir_all(rt);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--worker") {
        return worker();
    }
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(5);
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    if args.iter().any(|a| a == "--checkpoint") {
        return checkpoint_bench(runs, &dir);
    }
    if args.iter().any(|a| a == "--migrate") {
        let only: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "--only")
            .map(|w| w[1].as_str())
            .collect();
        let rate = args
            .iter()
            .position(|a| a == "--link-rate")
            .and_then(|i| args.get(i + 1))
            .map(String::as_str);
        let netns = rate.is_some() || args.iter().any(|a| a == "--netns");
        return migrate_bench(runs, &dir, (netns, rate), &only);
    }
    let exe = std::env::current_exe().unwrap();
    let mut native = Vec::new();
    let mut shim = Vec::new();
    for i in 0..runs {
        eprintln!("run {}/{runs}", i + 1);
        native.push(run_once(&exe, false));
        shim.push(run_once(&exe, true));
    }
    let keys: Vec<String> = native[0].as_object().unwrap().keys().cloned().collect();
    println!("| operation | native | under the shim | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    for k in keys {
        let m = |v: &[Value]| median(v.iter().map(|r| r[&k].as_f64().unwrap()).collect());
        let (n, s) = (m(&native), m(&shim));
        let unit = if k.contains("KiB") { " KiB" } else { " ns" };
        let ratio = if k.contains("KiB") {
            format!("+{:.0} KiB", s - n)
        } else {
            format!("{:.2}×", s / n)
        };
        let fmt = |x: f64| {
            if x >= 100.0 {
                format!("{x:.0}{unit}")
            } else {
                format!("{x:.1}{unit}")
            }
        };
        println!("| {k} | {} | {} | {ratio} |", fmt(n), fmt(s));
    }
    println!("\n(median of {runs} runs; each run's figure is the median of its batches)");
}
