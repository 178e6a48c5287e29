//! Checkpoints of real programs: the whole session frozen consistently, its image written
//! and verifiable, the session running on intact afterwards (or ended with --stop), and a
//! failed checkpoint leaving the session untouched with no partial image.

mod common;
use common::*;
use migrt::image::{self, PageMap, ProcessMeta, Region, SessionManifest, Tag, ThreadState};
use std::path::Path;

const ROOT: i32 = VPID_BASE as i32 + 1;

/// The last count the counter printed.
fn last_count(log: &Path) -> u64 {
    numbers(log, "count ").last().copied().unwrap_or(0)
}

fn wait_count_above(log: &Path, n: u64) -> u64 {
    let t = std::time::Instant::now();
    loop {
        let c = last_count(log);
        if c > n {
            return c;
        }
        assert!(
            t.elapsed().as_secs() < 15,
            "the counter stopped at {c}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn checkpoint(env: &Env, session: &str, out: &Path, stop: bool) -> String {
    let mut args = vec!["checkpoint", session, "--out", out.to_str().unwrap()];
    if stop {
        args.push("--stop");
    }
    let o = env.run(&args);
    assert!(o.status.success(), "mig checkpoint: {}", text(&o.stderr));
    text(&o.stdout)
}

/// What a process image holds, verified section by section.
struct ProcImage {
    meta: ProcessMeta,
    threads: Vec<ThreadState>,
    regions: Vec<Region>,
    pages: u64,
    data: Vec<Vec<u8>>,
}

fn read_proc_image(path: &Path) -> ProcImage {
    let (kind, sections) = image::read_all(path).unwrap();
    assert_eq!(kind, image::Kind::Process);
    let mut img = ProcImage {
        meta: Default::default(),
        threads: vec![],
        regions: vec![],
        pages: 0,
        data: vec![],
    };
    for s in &sections {
        match s.tag {
            Tag::Meta => img.meta = s.decode(path).unwrap(),
            Tag::Threads => img.threads = s.decode(path).unwrap(),
            Tag::Regions => img.regions = s.decode(path).unwrap(),
            Tag::PageMap => img.pages += s.decode::<PageMap>(path).unwrap().present_count(),
            Tag::PageData => img.data.push(s.payload.clone()),
            _ => {}
        }
    }
    img
}

#[test]
fn checkpoint_writes_a_verifiable_image_and_the_program_runs_on() {
    let env = Env::new("ckpt");
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "20", "32"]);
    let before = wait_count_above(&log, 3);
    let out = env.root.join("img");
    let summary = checkpoint(&env, "cnt", &out, false);
    assert!(
        summary.contains("1 process(es), 1 thread(s)") && summary.contains("frozen"),
        "{summary}"
    );
    // The counter goes on, its 32 MiB verified on every tick by itself.
    let after = wait_count_above(&log, before + 5);
    assert!(after > before + 5);
    assert!(!std::fs::read_to_string(&log).unwrap().contains("damaged"));
    let img = read_proc_image(&out.join(format!("proc-{}.img", VPID_BASE + 1)));
    assert_eq!(img.meta.vpid, ROOT);
    assert!(
        img.meta.exe.to_string().ends_with("counter"),
        "{:?}",
        img.meta.exe
    );
    assert_eq!(img.threads.len(), 1);
    assert_eq!(img.threads[0].vtid, ROOT);
    assert!(img.threads[0].ucontext.len() >= 900 && img.threads[0].fpstate.len() >= 512);
    assert!(
        img.regions
            .iter()
            .any(|r| r.name.0 == b"[stack]" && r.stored)
    );
    assert!(
        img.regions
            .iter()
            .any(|r| r.name.0 == b"[vdso]" && !r.stored),
        "the vDSO is the new host's"
    );
    assert!(
        img.pages >= 32 * 256,
        "the 32 MiB block is stored: {} pages",
        img.pages
    );
    // The counter's pattern (after its page's number and generation, 16 bytes, byte j of
    // each of its pages is j plus a per-page value) is in the page data, every page of the
    // block.
    let patterned = img
        .data
        .iter()
        .flat_map(|d| d[d.len() % 4096..].chunks_exact(4096)) // (after the alignment)
        // (malloc's block starts 16 bytes into a page: so do the counter's pages)
        .map(|p| &p[16 + 16..])
        .filter(|p| {
            p.iter()
                .enumerate()
                .all(|(j, &b)| b == p[0].wrapping_add(j as u8))
        })
        .count();
    assert!(patterned >= 32 * 256, "{patterned} pages of the pattern");
    let (_, s) = image::read_all(&out.join("session.img")).unwrap();
    let m: SessionManifest = s[0].decode(&out).unwrap();
    assert_eq!(m.name, "cnt");
    assert_eq!(m.processes, vec![(ROOT, 0, format!("proc-{ROOT}.img"))]);
    env.stop("cnt");
}

#[test]
fn a_whole_tree_with_threads_is_frozen_together() {
    let env = Env::new("tree");
    let py = "import threading, time\nfor _ in range(3): threading.Thread(target=lambda: [time.sleep(0.01) for _ in iter(int, 1)], daemon=True).start()\ntime.sleep(60)";
    env.detach(
        "tree",
        &["sh", "-c", &format!("sleep 60 & python3 -c '{py}' & wait")],
    );
    env.wait_processes("tree", "3 processes", |p| {
        p.len() == 3 && p.iter().any(|x| x["threads"] == 4)
    });
    let out = env.root.join("img");
    let summary = checkpoint(&env, "tree", &out, false);
    assert!(summary.contains("3 process(es), 6 thread(s)"), "{summary}");
    let (_, s) = image::read_all(&out.join("session.img")).unwrap();
    let m: SessionManifest = s[0].decode(&out).unwrap();
    assert_eq!(m.processes.len(), 3);
    for (vpid, parent, file) in &m.processes {
        let img = read_proc_image(&out.join(file));
        assert_eq!(img.meta.vpid, *vpid);
        if *vpid != ROOT {
            assert_eq!(*parent, ROOT);
        }
        assert!(img.threads.iter().all(|t| is_vpid(t.vtid as i64)));
    }
    assert_eq!(env.processes("tree").len(), 3, "all run on");
    env.stop("tree");
}

#[test]
fn checkpoint_with_stop_ends_the_session_once_the_image_is_complete() {
    let env = Env::new("stop");
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "20", "4"]);
    wait_count_above(&log, 2);
    let out = env.root.join("img");
    let summary = checkpoint(&env, "cnt", &out, true);
    assert!(summary.contains("session ended"), "{summary}");
    env.wait_processes("cnt", "the session to end", |p| p.is_empty());
    let c = last_count(&log);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(last_count(&log), c, "nothing runs after --stop");
    read_proc_image(&out.join(format!("proc-{}.img", VPID_BASE + 1)));
}

#[test]
fn ten_checkpoints_in_a_row_leave_the_program_intact() {
    let env = Env::new("ten");
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "50", "8"]);
    let mut last = wait_count_above(&log, 1);
    for i in 0..10 {
        checkpoint(&env, "cnt", &env.root.join(format!("img{i}")), false);
        last = wait_count_above(&log, last);
    }
    assert!(!std::fs::read_to_string(&log).unwrap().contains("damaged"));
    env.stop("cnt");
}

#[test]
fn bad_requests_are_refused_and_lose_nothing() {
    let env = Env::new("badck");
    let o = env.run(&[
        "checkpoint",
        "nosuch",
        "--out",
        env.root.join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("no live session"),
        "{}",
        text(&o.stderr)
    );
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "20", "1"]);
    wait_count_above(&log, 1);
    let used = env.scratch("used");
    std::fs::write(used.join("keep"), "mine").unwrap();
    let o = env.run(&["checkpoint", "cnt", "--out", used.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("not empty"), "{}", text(&o.stderr));
    assert_eq!(std::fs::read_to_string(used.join("keep")).unwrap(), "mine");
    env.stop("cnt");
}

#[test]
fn a_checkpoint_that_fails_midway_leaves_the_session_running_and_no_partial_image() {
    if !is_root() {
        println!("SKIP: needs root to mount a small tmpfs (a disk that fills up)");
        return;
    }
    let env = Env::new("full");
    let disk = env.scratch("disk");
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(&disk);
    let log = env.detach("cnt", &[c_program("counter").to_str().unwrap(), "20", "16"]);
    let before = wait_count_above(&log, 1);
    let out = disk.join("img");
    let o = env.run(&["checkpoint", "cnt", "--out", out.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a 16 MiB image cannot fit in 2 MiB"
    );
    assert!(
        text(&o.stderr).contains("No space left"),
        "{}",
        text(&o.stderr)
    );
    assert!(!out.exists(), "the partial image is removed");
    wait_count_above(&log, before + 3);
    // And the next checkpoint, to a disk with room, works.
    checkpoint(&env, "cnt", &env.root.join("img"), false);
    assert!(!std::fs::read_to_string(&log).unwrap().contains("damaged"));
    env.stop("cnt");
}

#[test]
fn programs_caught_in_the_middle_of_exec_are_not_lost() {
    // A shell that runs a new program every few milliseconds: checkpoints catch some
    // process between exec and the new image's start, which must wait rather than die.
    let env = Env::new("exec");
    let script = "i=0; while true; do i=$((i+1)); echo \"run $i $(/bin/echo out$i)\"; done";
    let log = env.detach("execs", &["bash", "-c", script]);
    wait_numbers(&log, "run ", 3);
    for i in 0..20 {
        checkpoint(&env, "execs", &env.root.join(format!("img{i}")), false);
    }
    let before = numbers(&log, "run ").len();
    wait_numbers(&log, "run ", before + 3);
    let text = std::fs::read_to_string(&log).unwrap();
    let runs: Vec<&str> = text.lines().filter(|l| l.starts_with("run ")).collect();
    for l in &runs[..runs.len() - 1] {
        let n = l.split(' ').nth(1).unwrap();
        assert!(
            l.ends_with(&format!(" out{n}")),
            "a command's output went missing: {l:?}"
        );
    }
    env.stop("execs");
}

/// Every 50 ms the subject forks a child that lives 2 s and first says how many sockets it
/// holds (the app itself opens none).
const FORKS_OFTEN: &str = r#"
import os, sys, time
n = 0
while True:
    n += 1
    if os.fork() == 0:
        socks = 0
        for f in os.listdir('/proc/self/fd'):
            try:
                socks += os.readlink('/proc/self/fd/' + f).startswith('socket:')
            except OSError:
                pass
        print(f'child {n} sockets {socks}', flush=True)
        time.sleep(2)
        os._exit(0)
    while os.waitpid(-1, os.WNOHANG)[0] > 0:
        pass
    time.sleep(0.05)
"#;

#[test]
fn children_forked_while_mig_talks_to_their_parent_hold_none_of_its_connection() {
    // mig's connection to a process is the shim's: a child forked while it is open must
    // not inherit it (found in a lazy migration: such a child could not be checkpointed).
    let env = Env::new("forkconn");
    let log = env.detach("fk", &["python3", "-c", FORKS_OFTEN]);
    wait_numbers(&log, "child ", 2);
    env.table("fk", false); // starts the root's control thread
    let ctl = env.rt.join("sessions/fk/ctl").join(ROOT.to_string());
    let conn = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
    let before = numbers(&log, "child ").len();
    wait_numbers(&log, "child ", before + 6);
    drop(conn); // (the control thread serves one connection at a time)
    let out = env.scratch("img");
    let o = env.run(&["checkpoint", "fk", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "mig checkpoint: {}", text(&o.stderr));
    let text = std::fs::read_to_string(&log).unwrap();
    let held: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("child ") && !l.ends_with(" sockets 0"))
        .collect();
    assert!(held.is_empty(), "children holding sockets: {held:?}");
    env.stop("fk");
}
