//! A full-screen program on the user's terminal (issue #4, terminals): less inside a tmux
//! pane is checkpointed and stopped, restored from the shell in the same pane, and shows
//! the same screen, in the same modes, going on from the same place.

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap();
        text(&o.stdout)
    }

    fn keys(&self, keys: &str) {
        self.cmd(&["send-keys", keys]);
    }

    fn line(&self, line: &str) {
        self.cmd(&["send-keys", line, "Enter"]);
    }

    fn screen(&self) -> String {
        self.cmd(&["capture-pane", "-p"])
    }

    /// Waits until the screen satisfies `pred`; returns it.
    fn wait(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let t = Instant::now();
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "waiting for {what}; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.cmd(&["kill-server"]);
    }
}

/// A shell in a fresh tmux pane (80×24) with this test's runtime directory, and a file of
/// 500 numbered lines; None (after saying why) without tmux or `program`.
fn pane(env: &Env, program: &str) -> Option<(Tmux, std::path::PathBuf)> {
    for p in ["tmux", program] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            println!("SKIP: {p} not installed (.ci/run installs it)");
            return None;
        }
    }
    let file = env.root.join("file.txt");
    let text_lines: String = (1..=500).map(|i| format!("line number {i}\n")).collect();
    std::fs::write(&file, text_lines).unwrap();
    let tmux = Tmux {
        socket: format!("migtest-{}-{program}", std::process::id()),
    };
    let shell = format!(
        "env MIGSHIM_RUNTIME_DIR={} PS1='PROMPT$ ' TERM=screen bash --norc --noprofile",
        env.rt.display()
    );
    tmux.cmd(&["new-session", "-d", "-x", "80", "-y", "24", &shell]);
    tmux.wait("the shell", |s| s.contains("PROMPT$"));
    Some((tmux, file))
}

/// Stops `session` into an image and restores it from the shell in the same pane.
fn stop_and_restore_in_pane(env: &Env, tmux: &Tmux, session: &str) {
    let img = env.root.join("img");
    stop_into(env, session, &img);
    tmux.wait("the shell again", |s| s.contains("PROMPT$"));
    tmux.line(&format!(
        "{} restore {}",
        mig_bin().display(),
        img.display()
    ));
}

#[test]
fn less_in_tmux_shows_the_same_screen_after_restore_and_goes_on() {
    let env = Env::new("less");
    let Some((tmux, file)) = pane(&env, "less") else {
        return;
    };
    let mig = mig_bin().display().to_string();
    tmux.line(&format!(
        "{mig} run --name pager -- less {}",
        file.display()
    ));
    tmux.wait("less", |s| s.starts_with("line number 1\n"));
    tmux.keys("j");
    tmux.keys("j");
    let before = tmux.wait("two lines down", |s| s.starts_with("line number 3\n"));
    stop_and_restore_in_pane(&env, &tmux, "pager");
    let after = tmux.wait("less's screen again", |s| s == before);
    assert_eq!(after, before);
    // Its modes are back (keys act at once, unechoed) and it goes on from line 3.
    tmux.keys("j");
    tmux.wait("one more line down", |s| s.starts_with("line number 4\n"));
    tmux.keys("q");
    tmux.wait("the shell after less", |s| {
        s.lines().filter(|l| l.starts_with("PROMPT$")).count() >= 1 && !s.contains("line number 4")
    });
}

#[test]
fn vim_in_tmux_comes_back_with_its_screen_cursor_and_timers() {
    // vim starts glibc-style SIGEV_THREAD timers (its search time-outs): they must freeze
    // and come back with their ids, or vim complains on the next search.
    let env = Env::new("vim");
    let Some((tmux, file)) = pane(&env, "vim") else {
        return;
    };
    let mig = mig_bin().display().to_string();
    tmux.line(&format!(
        "{mig} run --name editor -- vim -u NONE -N -n {}",
        file.display()
    ));
    tmux.wait("vim", |s| s.starts_with("line number 1\n"));
    tmux.keys("jjj");
    std::thread::sleep(Duration::from_millis(300));
    let before = tmux.screen();
    let body = |s: &str| s.lines().take(23).map(String::from).collect::<Vec<_>>();
    stop_and_restore_in_pane(&env, &tmux, "editor");
    let after = tmux.wait("vim's text again", |s| body(s) == body(&before));
    assert_eq!(body(&after), body(&before));
    // The cursor is still on line 4: dd deletes it.
    tmux.keys("dd");
    tmux.wait("line 4 deleted", |s| {
        s.starts_with("line number 1\nline number 2\nline number 3\nline number 5\n")
    });
    tmux.line("/number 40");
    let s = tmux.wait("the search", |s| s.contains("line number 40"));
    assert!(!s.contains("E12"), "no timer errors: {s}");
    tmux.line(":q!");
    tmux.wait("the shell after vim", |s| {
        s.contains("PROMPT$") && !s.contains("line number 40")
    });
}

#[test]
fn a_session_that_owns_a_pseudo_terminal_comes_back_with_it() {
    // script(1) makes a pty pair: bash runs on the slave (its controlling terminal), script
    // copies the master's output to its log.
    let env = Env::new("pty");
    let inner = "i=0; while true; i=$((i+1)); do c=no; (exec </dev/tty) 2>/dev/null && c=yes; echo \"tick $i ctty=$c $(tty)\"; sleep 0.05; done";
    let log = env.detach(
        "pty",
        &[
            "script",
            "-qfec",
            // Not the last command: the shell script starts stays, as the session leader
            // whose children had the terminal only by being born after it took it.
            &format!("bash -c '{inner}'; exit $?"),
            "/dev/null",
        ],
    );
    let before = wait_numbers(&log, "tick ", 3);
    let text_before = std::fs::read_to_string(&log).unwrap();
    assert!(text_before.contains("ctty=yes /dev/pts/"), "{text_before}");
    let img = env.root.join("img");
    stop_into(&env, "pty", &img);
    let last = *numbers(&log, "tick ").last().unwrap();
    assert!(last >= *before.last().unwrap());
    let rlog = restore_detached(&env, &img, "restored.log");
    let after = wait_numbers(&rlog, "tick ", 3);
    assert_eq!(after[0], last + 1, "it went on: {after:?}");
    let text_after = std::fs::read_to_string(&rlog).unwrap();
    assert!(
        text_after.lines().all(|l| l.contains("ctty=yes /dev/pts/")),
        "bash has its terminal, as its controlling terminal, after the restore:\n{text_after}"
    );
    env.stop("pty");
}
