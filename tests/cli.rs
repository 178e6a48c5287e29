//! The CLI's promises: clear errors that lose nothing, names, static programs, and a shim
//! that never harms the program when it cannot do its job.

mod common;
use common::*;

#[test]
fn unknown_session_and_bad_names_are_clear_errors() {
    let env = Env::new("errors");
    let out = env.run(&["table", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no live session named \"nosuch\""),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["run", "--name", "bad/name", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("invalid session name"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn names_are_unique_among_live_sessions() {
    let env = Env::new("names");
    env.detach("web", &["sleep", "60"]);
    let out = env.run(&["run", "--detach", "--name", "web", "--", "sleep", "60"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already running"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        env.processes("web").len(),
        1,
        "the running session is untouched"
    );
    // Generated names are numbers, the smallest free one first.
    let a = text(&env.run(&["run", "--detach", "--", "sleep", "60"]).stdout);
    let b = text(&env.run(&["run", "--detach", "--", "sleep", "60"]).stdout);
    assert_eq!((a.trim(), b.trim()), ("1", "2"));
    // Once a session has ended, its name is free again.
    env.stop("web");
    env.detach("web", &["sleep", "60"]);
    for s in ["web", "1", "2"] {
        env.stop(s);
    }
}

#[test]
fn static_programs_are_refused_unless_allowed() {
    let env = Env::new("static");
    let prog = c_program("hello_static");
    let out = env.mig().args(["run", "--"]).arg(&prog).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("statically linked"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).is_empty(), "it did not run");
    let out = env
        .mig()
        .args(["run", "--allow-static", "--"])
        .arg(&prog)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("hello from a static program"));
}

#[test]
fn detached_session_output_goes_to_its_log() {
    let env = Env::new("log");
    let log = env.detach(
        "talk",
        &["sh", "-c", "echo said-this; echo and-that >&2; sleep 60"],
    );
    let t = wait_for_text(&log, "and-that");
    assert!(t.contains("said-this"), "{t}");
    env.stop("talk");
}

#[test]
fn shim_without_a_session_warns_once_and_stays_out_of_the_way() {
    let lib = shim_lib();
    let out = std::process::Command::new("sh")
        .args(["-c", "echo $$; sh -c 'echo child'"])
        .env("LD_PRELOAD", &lib)
        .env_remove("MIGSHIM_SESSION")
        .env_remove("MIGSHIM_WARNED")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    let pid: i64 = stdout.lines().next().unwrap().parse().unwrap();
    assert!(!is_vpid(pid), "no session: real pids");
    assert!(stdout.contains("child"));
    let err = text(&out.stderr);
    assert_eq!(
        err.matches("migshim:").count(),
        1,
        "one warning for the whole tree: {err}"
    );

    // A session directory that is not usable: the program still runs, with one warning.
    let out = std::process::Command::new("sh")
        .args(["-c", "echo fine"])
        .env("LD_PRELOAD", &lib)
        .env("MIGSHIM_SESSION", "/nonexistent/session")
        .env_remove("MIGSHIM_WARNED")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), "fine");
    assert!(
        text(&out.stderr).contains("session unusable"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn mig_finds_a_missing_shim_clearly() {
    let env = Env::new("nolib");
    let out = env
        .mig()
        .env("MIGSHIM_LIB", "/nonexistent/libmigshim.so")
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("MIGSHIM_LIB=/nonexistent/libmigshim.so is not a file"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_demo_runs_a_session_checkpoints_restores_and_migrates_it() {
    let env = Env::new("demo");
    let o = env.run(&["demo"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    for step in [
        "it goes on where it stopped",
        "migrated session",
        "it counts on there, from where it was",
        "done.",
    ] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }
    assert!(
        env.ps().as_array().unwrap().is_empty(),
        "the demo leaves no session behind"
    );
}
