//! migbench — per-call cost of the shim: each operation timed natively and under the shim
//! (`mig run`), medians of several runs, printed as a Markdown table with ratios.
//!
//!   cargo build --release && target/release/migbench [--runs 5]
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
    out.insert("getpid".into(), json!(time(1_000_000, 7, || unsafe {
        std::hint::black_box(libc::getpid());
    })));
    out.insert("open+close".into(), json!(time(50_000, 7, || unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CREAT, 0o644);
        libc::close(fd);
    })));
    out.insert("socket+close".into(), json!(time(50_000, 7, || unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        libc::close(fd);
    })));
    let mut p = [0; 2];
    unsafe { libc::pipe(p.as_mut_ptr()) };
    let mut b = [0u8; 1];
    out.insert("pipe write+read".into(), json!(time(200_000, 7, || unsafe {
        libc::write(p[1], b.as_ptr().cast(), 1);
        libc::read(p[0], b.as_mut_ptr().cast(), 1);
    })));
    out.insert("fork+wait".into(), json!(time(300, 7, || unsafe {
        let c = libc::fork();
        if c == 0 {
            libc::_exit(0);
        }
        libc::waitpid(c, std::ptr::null_mut(), 0);
    })));
    out.insert("exec /bin/true".into(), json!(time(60, 5, || {
        Command::new("/bin/true").status().unwrap();
    })));
    let before = rss_kib();
    for _ in 0..1_000_000 {
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
            libc::close(fd);
        }
    }
    out.insert("rss growth after 1M open/close (KiB)".into(), json!(rss_kib().saturating_sub(before)));
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
    assert!(out.status.success(), "worker failed: {}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(s.lines().last().unwrap_or("{}")).expect("worker output")
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
        let ratio = if k.contains("KiB") { format!("+{:.0} KiB", s - n) } else { format!("{:.2}×", s / n) };
        let fmt = |x: f64| if x >= 100.0 { format!("{x:.0}{unit}") } else { format!("{x:.1}{unit}") };
        println!("| {k} | {} | {} | {ratio} |", fmt(n), fmt(s));
    }
    println!("\n(median of {runs} runs; each run's figure is the median of its batches)");
}
