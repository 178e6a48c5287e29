//! `mig checkpoint SESSION --out DIR [--stop]`: freeze every process of the session, write
//! one image per process and a session manifest, then let the session run on — or end it,
//! once the image is complete and synced. Any failure thaws every process and removes the
//! partial image: the session goes on as if nothing happened.

use crate::client::Client;
use crate::sessions::{self, Live};
use anyhow::{Context, Result, bail};
use migrt::image::{ImageWriter, Kind, SessionManifest, Tag};
use migrt::wire::{Request, Response};
use std::path::Path;
use std::time::Instant;

pub fn checkpoint(session: &str, out: &Path, stop: bool, ignore_unsupported: bool) -> Result<i32> {
    let rt = sessions::runtime_dir()?;
    let live = sessions::find(&rt, session)?;
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} exists and is not empty; choose a new directory for the image",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let t0 = Instant::now();
    let mut clients: Vec<(i32, i32, Client)> = Vec::new();
    let result = run(&live, out, stop, ignore_unsupported, &mut clients, t0);
    if result.is_err() {
        // Let everybody go, and leave no partial image behind.
        for (_, _, c) in &mut clients {
            let _ = c.call(&Request::Thaw);
        }
        let _ = std::fs::remove_dir_all(out);
    }
    result
}

fn run(
    live: &Live,
    out: &Path,
    stop: bool,
    ignore_unsupported: bool,
    clients: &mut Vec<(i32, i32, Client)>,
    t0: Instant,
) -> Result<i32> {
    // 1. Freeze all, so that what passes between them is consistent. A process that ends
    // before it is frozen ended before the checkpoint and is left out; one started
    // meanwhile is frozen too (frozen processes start none, so this settles).
    let gone = sessions::gone;
    let frozen_at = Instant::now();
    let mut threads = 0;
    loop {
        let newcomers: Vec<_> = live
            .processes()
            .into_iter()
            .filter(|p| !clients.iter().any(|c| c.0 == p.vpid))
            .collect();
        if newcomers.is_empty() {
            break;
        }
        for p in newcomers {
            let mut c = match Client::connect(&live.dir, p.vpid, p.pid, live.table.signal()) {
                Ok(c) => c,
                Err(_) if gone(p.pid) => continue,
                Err(e) => return Err(e),
            };
            match c.call(&Request::Freeze) {
                Ok(Response::Frozen { threads: n, .. }) => {
                    threads += n;
                    clients.push((p.vpid, p.parent_vpid, c));
                }
                Err(_) if gone(p.pid) => {}
                Ok(other) => bail!("process {}: unexpected answer {other:?}", p.vpid),
                Err(e) => return Err(e),
            }
        }
    }
    if clients.is_empty() {
        bail!("session {} has no live process", live.name());
    }
    // 2. Nothing the restore could not rebuild, unless told.
    let mut tables = Vec::new();
    for (vpid, _, c) in clients.iter_mut() {
        match c.call(&Request::Table { journal: false })? {
            Response::Table { table, .. } => tables.push(table),
            other => bail!("process {vpid}: unexpected answer {other:?}"),
        }
    }
    migrt::link::link_peers(&mut tables);
    let unsupported = migrt::support::unsupported(&tables);
    if !unsupported.is_empty() {
        let list: Vec<String> = unsupported.iter().map(|u| format!("  {u}")).collect();
        if !ignore_unsupported {
            bail!(
                "session {} holds what a restore cannot rebuild:\n{}\n(nothing was written; checkpoint anyway with --ignore-unsupported: after a restore these fds read as closed)",
                live.name(),
                list.join("\n")
            );
        }
        eprintln!(
            "mig: checkpoint: ignored, as asked (they read as closed after a restore):\n{}",
            list.join("\n")
        );
    }
    // 3. Write every image.
    let mut bytes = 0;
    let mut manifest = SessionManifest {
        name: live.name(),
        host: live.meta.host.clone(),
        taken: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        processes: Vec::new(),
    };
    for (vpid, parent, c) in clients.iter_mut() {
        let file = format!("proc-{vpid}.img");
        let path = out.join(&file);
        match c.call(&Request::Dump {
            path: path.display().to_string(),
            sync: stop,
        })? {
            Response::Dumped { bytes: b, .. } => bytes += b,
            other => bail!("process {vpid}: unexpected answer {other:?}"),
        }
        manifest.processes.push((*vpid, *parent, file));
    }
    let session_file = std::fs::File::create(out.join("session.img"))?;
    let mut w = ImageWriter::new(&session_file, Kind::Session)?;
    w.postcard(Tag::Meta, &manifest)?;
    bytes += w.written();
    w.finish()?;
    if stop {
        session_file.sync_all()?;
        std::fs::File::open(out)?.sync_all()?;
    }
    // 4. Run on, or end.
    let last = if stop { Request::Stop } else { Request::Thaw };
    for (vpid, _, c) in clients.iter_mut() {
        match c.call(&last)? {
            Response::Done => {}
            other => bail!("process {vpid}: unexpected answer {other:?}"),
        }
    }
    let frozen = frozen_at.elapsed();
    if stop {
        // Ended means gone: wait (briefly) until no process of the session is left.
        let t = Instant::now();
        while !live.processes().is_empty() && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    println!(
        "checkpoint of session {} to {}: {} process(es), {} thread(s), {} written, frozen {:.1} ms, total {:.1} ms{}",
        live.name(),
        out.display(),
        clients.len(),
        threads,
        human(bytes),
        frozen.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3,
        if stop { "; session ended" } else { "" }
    );
    Ok(0)
}

fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}
