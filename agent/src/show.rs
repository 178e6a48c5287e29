//! What `mig ps` and `mig table` print: a table for people, JSON for programs.

use crate::sessions::Live;
use migrt::table::{FdEntry, Object, PipeEnd, ProcessTable};
use migrt::wire::JournalView;
use serde_json::{Value, json};

/// `mig ps`'s output: the table, or JSON.
pub fn ps(sessions: &[Live], json: bool) -> anyhow::Result<String> {
    Ok(if json {
        serde_json::to_string_pretty(&ps_json(sessions))? + "\n"
    } else {
        ps_text(sessions)
    })
}

pub fn ps_text(sessions: &[Live]) -> String {
    let mut out = format!(
        "{:<12} {:<14} {:>8} {:>8} {:>8} {:>4} {:<5} {}\n",
        "SESSION", "HOST", "VPID", "PID", "PARENT", "THR", "STATE", "COMMAND"
    );
    for s in sessions {
        for p in s.processes() {
            let parent = if p.parent_vpid == 0 {
                "-".to_string()
            } else {
                p.parent_vpid.to_string()
            };
            out += &format!(
                "{:<12} {:<14} {:>8} {:>8} {:>8} {:>4} {:<5} {}\n",
                s.name(),
                s.meta.host,
                p.vpid,
                p.pid,
                parent,
                p.threads,
                p.state,
                p.command.replace(['\n', '\t'], " ")
            );
        }
    }
    out
}

pub fn ps_json(sessions: &[Live]) -> Value {
    Value::Array(
        sessions
            .iter()
            .map(|s| {
                json!({
                    "name": s.name(),
                    "host": s.meta.host,
                    "created": s.meta.created,
                    "command": s.meta.command,
                    "processes": s.processes(),
                })
            })
            .collect(),
    )
}

fn domain_name(d: i32) -> String {
    match d {
        libc::AF_UNIX => "unix".into(),
        libc::AF_INET => "tcp4/udp4".into(),
        libc::AF_INET6 => "inet6".into(),
        libc::AF_NETLINK => "netlink".into(),
        d => format!("family {d}"),
    }
}

fn sock_type(domain: i32, ty: i32) -> String {
    let t = ty & 0xf;
    match (domain, t) {
        (libc::AF_INET, libc::SOCK_STREAM) => "tcp".into(),
        (libc::AF_INET, libc::SOCK_DGRAM) => "udp".into(),
        (libc::AF_INET6, libc::SOCK_STREAM) => "tcp6".into(),
        (libc::AF_INET6, libc::SOCK_DGRAM) => "udp6".into(),
        (d, libc::SOCK_STREAM) => format!("{} stream", domain_name(d)),
        (d, libc::SOCK_DGRAM) => format!("{} dgram", domain_name(d)),
        (d, libc::SOCK_SEQPACKET) => format!("{} seqpacket", domain_name(d)),
        (d, t) => format!("{} type {t}", domain_name(d)),
    }
}

fn access(flags: i32) -> &'static str {
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "r",
        libc::O_WRONLY => "w",
        _ => "rw",
    }
}

/// One line for one fd.
pub fn describe(f: &FdEntry, listeners: &[&migrt::table::SocketInfo]) -> String {
    let mut extra = Vec::new();
    if f.flags & libc::O_APPEND != 0 {
        extra.push("append");
    }
    if f.flags & libc::O_NONBLOCK != 0 {
        extra.push("nonblock");
    }
    if f.cloexec {
        extra.push("cloexec");
    }
    if !f.journaled {
        extra.push("not-journaled");
    }
    let what = match &f.object {
        Object::File {
            path,
            opened_as,
            offset,
            size,
            deleted,
            ..
        } => {
            let mut s = format!("{path} offset {offset} size {size}");
            if *deleted {
                s += " (deleted)";
            }
            if let Some(a) = opened_as {
                s += &format!(" (opened as {a})");
            }
            s
        }
        Object::Directory { path, offset, .. } => format!("{path} position {offset}"),
        Object::Device { path, tty, .. } => format!("{path}{}", if *tty { " (tty)" } else { "" }),
        Object::Fifo { path, end, .. } => format!("{path} {}", end_name(*end)),
        Object::Pipe { id, end, .. } => format!("#{id} {} end", end_name(*end)),
        Object::Socket(s) => {
            let mut out = format!("#{} {}", s.id, sock_type(s.domain, s.ty));
            if s.listening {
                out += " listening";
            }
            if let Some(l) = &s.local {
                out += &format!(" local {l}");
            }
            if let Some(p) = &s.peer {
                out += &format!(" peer {p}");
            }
            use migrt::support::SocketRole;
            match (&s.peer_link, migrt::support::socket_role(s, listeners)) {
                (Some(l), _) => out += &format!(" <-> #{} (vpid {} fd {})", l.id, l.vpid, l.fd),
                (None, SocketRole::Pending(l)) => out += &format!(" (not accepted yet by #{l})"),
                (None, SocketRole::External(_)) => out += " (peer outside the session)",
                _ => {}
            }
            out
        }
        Object::Epoll { interest } => {
            let l: Vec<String> = interest
                .iter()
                .map(|i| format!("fd {} events {:#x} data {:#x}", i.fd, i.events, i.data))
                .collect();
            format!("[{}]", l.join(", "))
        }
        Object::EventFd { count, semaphore } => {
            format!(
                "count {count}{}",
                if *semaphore { " semaphore" } else { "" }
            )
        }
        Object::TimerFd {
            clockid,
            value_ns,
            interval_ns,
            ticks,
        } => format!(
            "clock {clockid} next in {:.3} s every {:.3} s, {ticks} unread ticks",
            *value_ns as f64 / 1e9,
            *interval_ns as f64 / 1e9
        ),
        Object::SignalFd { mask } => format!("mask {mask:#x}"),
        Object::Inotify { watches } => {
            let l: Vec<String> = watches
                .iter()
                .map(|w| {
                    let p = w.path.as_ref().map_or("?".to_string(), |p| p.to_string());
                    format!("wd {} {p} mask {:#x}", w.wd, w.mask)
                })
                .collect();
            format!("[{}]", l.join(", "))
        }
        Object::MemFd { name, size, .. } => format!("{name} size {size}"),
        Object::PtyMaster { index } => match index {
            Some(i) => format!("/dev/pts/{i}"),
            None => "?".into(),
        },
        Object::Other { link } => link.to_string(),
    };
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(" [{}]", extra.join(","))
    };
    format!(
        "fd {:<4} {:<10} {:<2} {what}{extra}",
        f.fd,
        f.object.kind(),
        access(f.flags)
    )
}

fn end_name(e: PipeEnd) -> &'static str {
    match e {
        PipeEnd::Read => "read",
        PipeEnd::Write => "write",
    }
}

pub fn table_text(session: &Live, tables: &[(ProcessTable, Option<JournalView>)]) -> String {
    let listeners = migrt::support::listeners(tables.iter().map(|(t, _)| t));
    let mut out = format!("session {} on {}\n", session.name(), session.meta.host);
    if let Some(r) = restored(session) {
        out += &format!("restored {r}\n");
    }
    for (t, j) in tables {
        let cmd: Vec<String> = t.command.iter().map(|a| a.to_string()).collect();
        let parent = if t.parent_vpid == 0 {
            "-".into()
        } else {
            t.parent_vpid.to_string()
        };
        out += &format!(
            "\nprocess {} (pid {}) parent {} pgid {} sid {}: {}\n",
            t.vpid,
            t.real_pid,
            parent,
            t.pgid,
            t.sid,
            cmd.join(" ")
        );
        let threads: Vec<String> = t
            .threads
            .iter()
            .map(|th| format!("{}={}", th.vtid, th.tid))
            .collect();
        out += &format!("  threads (vtid=tid): {}\n", threads.join(" "));
        for f in &t.fds {
            out += &format!("  {}\n", describe(f, &listeners));
        }
        out += &format!("  file mappings: {}\n", t.mappings.len());
        for n in &t.notes {
            out += &format!("  note: {n}\n");
        }
        if let Some(j) = j {
            out += &format!(
                "  journal: {} records appended; the last {}:\n",
                j.appended,
                j.recent.len()
            );
            for r in &j.recent {
                out += &format!("    {r:?}\n");
            }
        }
    }
    out
}

/// `{"File": {...}}` → `{"kind": "file", ...}` for every fd's object.
pub fn table_json(session: &Live, tables: &[(ProcessTable, Option<JournalView>)]) -> Value {
    let procs: Vec<Value> = tables
        .iter()
        .map(|(t, j)| {
            let mut v = serde_json::to_value(t).unwrap_or(Value::Null);
            if let Some(fds) = v.get_mut("fds").and_then(Value::as_array_mut) {
                for (fv, f) in fds.iter_mut().zip(&t.fds) {
                    let flat = match fv
                        .get("object")
                        .and_then(Value::as_object)
                        .and_then(|o| o.values().next())
                    {
                        Some(Value::Object(inner)) => {
                            let mut m = inner.clone();
                            m.insert("kind".into(), json!(f.object.kind()));
                            Value::Object(m)
                        }
                        _ => json!({ "kind": f.object.kind() }),
                    };
                    fv["object"] = flat;
                }
            }
            if let Some(j) = j {
                v["journal"] = serde_json::to_value(j).unwrap_or(Value::Null);
            }
            v
        })
        .collect();
    json!({
        "session": session.name(),
        "host": session.meta.host,
        "restored": restored(session),
        "processes": procs
    })
}

/// How a restored session came back (written by `mig restore`): from which image, and
/// the rebinding rules it was given. The fds listed are what each resource is bound to now.
fn restored(session: &Live) -> Option<String> {
    let t = std::fs::read_to_string(session.dir.0.join("restored")).ok()?;
    Some(t.trim().to_string())
}
