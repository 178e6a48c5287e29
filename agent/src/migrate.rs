//! `mig migrate SESSION --to HOST[:PORT]`: the session moves to the agent on HOST.
//!
//! A transaction: the session is frozen, its images are streamed to the agent as they are
//! written (each process writes into a pipe that `mig` forwards; no image file on this
//! host), the agent restores it and says it runs — only then does the session end here.
//! If the agent refuses, fails, stalls or the link breaks at any point before that, the
//! session is thawed and goes on here, untouched.
//!
//! Mode stop-and-copy: the session stays frozen for the whole transfer. (Pre-copy and lazy
//! modes, which shorten the freeze, are not there yet.)

use crate::frozen::{Frozen, human, manifest_bytes};
use crate::peer::{self, CHUNK, Link, Msg};
use crate::sessions;
use anyhow::{Context, Result, bail};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct MigrateArgs {
    pub session: String,
    pub to: String,
    pub mode: String,
    pub key: Option<std::path::PathBuf>,
    pub ignore_unsupported: bool,
    /// `--map-...` arguments, passed to the restore on the target.
    pub restore_args: Vec<String>,
    pub timeout: Duration,
}

/// The link, shared with the thread that forwards a process's image as it is written.
type Shared = Arc<Mutex<(Link, u64)>>;

fn forward(pipe: std::fs::File, file: u32, link: Shared) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        let mut pipe = pipe;
        let mut buf = vec![0u8; CHUNK];
        let progress = migrt::sys::isatty(2);
        let mut shown = Instant::now();
        loop {
            let n = pipe.read(&mut buf)?;
            let mut l = link.lock().unwrap_or_else(|p| p.into_inner());
            l.0.send(&Msg::Chunk {
                file,
                data: buf[..n].to_vec(),
            })?;
            l.1 += n as u64;
            if progress && shown.elapsed() > Duration::from_millis(200) {
                eprint!("\rmig migrate: {} sent", human(l.1));
                shown = Instant::now();
            }
            if n == 0 {
                return Ok(());
            }
        }
    })
}

/// Streams every process's image and the manifest while the session is frozen; returns the
/// bytes of image.
fn transfer(frozen: &mut Frozen, link: &Shared, ignore_unsupported: bool) -> Result<u64> {
    let send = |m: &Msg| -> Result<()> { link.lock().unwrap_or_else(|p| p.into_inner()).0.send(m) };
    frozen.check_supported(ignore_unsupported)?;
    let mut files: Vec<String> = frozen
        .vpids()
        .iter()
        .map(|v| format!("proc-{v}.img"))
        .collect();
    files.push("session.img".into());
    send(&Msg::Files(files.clone()))?;
    let me = std::process::id();
    let mut pending: Option<(std::fs::File, std::thread::JoinHandle<Result<()>>)> = None;
    let finish =
        |p: &mut Option<(std::fs::File, std::thread::JoinHandle<Result<()>>)>| -> Result<()> {
            if let Some((w, t)) = p.take() {
                drop(w); // the writer's end: the forwarder sees the end of the image
                t.join()
                    .map_err(|_| anyhow::anyhow!("the forwarding thread failed"))??;
            }
            Ok(())
        };
    let dumped = frozen.dump(
        |vpid| {
            finish(&mut pending)?;
            let file = format!("proc-{vpid}.img");
            let index = files
                .iter()
                .position(|f| *f == file)
                .context("a process that came meanwhile")?;
            let (r, w) = migrt::sys::pipe()?;
            migrt::sys::grow_pipe(&w, 1 << 20);
            use std::os::fd::AsRawFd;
            let path = format!("/proc/{me}/fd/{}", w.as_raw_fd());
            pending = Some((w, forward(r, index as u32, link.clone())));
            Ok((file, path))
        },
        false,
    );
    // The forwarder ends either way (its pipe closes), and says why it failed first.
    finish(&mut pending)?;
    let (mut bytes, manifest) = dumped?;
    let session = manifest_bytes(&manifest)?;
    bytes += session.len() as u64;
    let last = files.len() as u32 - 1;
    for piece in session.chunks(CHUNK).chain([&[][..]]) {
        send(&Msg::Chunk {
            file: last,
            data: piece.to_vec(),
        })?;
    }
    link.lock().unwrap_or_else(|p| p.into_inner()).1 += session.len() as u64;
    Ok(bytes)
}

pub fn migrate(a: MigrateArgs) -> Result<i32> {
    if a.mode != "stop-and-copy" {
        bail!(
            "--mode {}: only stop-and-copy is available yet (pre-copy and lazy migration are being built)",
            a.mode
        );
    }
    let rt = sessions::runtime_dir()?;
    let live = sessions::find(&rt, &a.session)?;
    let key = peer::read_key(&peer::key_path(a.key.as_deref()))?;
    let t0 = Instant::now();
    // The agent first: a refusal costs the session nothing.
    let mut link = peer::connect(&a.to, &key, a.timeout)?;
    link.send(&Msg::Incoming {
        name: live.name(),
        uid: migrt::sys::getuid(),
        restore_args: a.restore_args.clone(),
    })?;
    match link.recv()? {
        Msg::Ready => {}
        Msg::Refused(why) => bail!("the agent at {} refused: {why}", a.to),
        other => bail!("the agent at {} said {other:?}", a.to),
    }
    let link: Shared = Arc::new(Mutex::new((link, 0)));

    // Any error below drops `frozen`, which thaws the session here.
    let mut frozen = Frozen::freeze(&live)?;
    let sent = transfer(&mut frozen, &link, a.ignore_unsupported)
        .and_then(|bytes| {
            let mut l = link.lock().unwrap_or_else(|p| p.into_inner());
            // From here until the session has ended here, an interrupt must not leave it
            // running on both hosts (a frozen session left by a vanished mig thaws itself).
            migrt::sys::ignore_terminal_signals();
            l.0.send_mac()?;
            if migrt::sys::isatty(2) {
                eprintln!();
            }
            // The agent restores; its word decides.
            match l
                .0
                .recv()
                .context("waiting for the agent to restore the session")?
            {
                Msg::Running { .. } => Ok(bytes),
                Msg::Refused(why) => bail!("the agent refused: {why}"),
                other => bail!("the agent said {other:?}"),
            }
        })
        .map_err(|e| e.context(format!("session {} runs on here", live.name())))?;
    let (processes, threads) = (frozen.processes(), frozen.threads);
    let (bytes, sent) = (sent, link.lock().unwrap_or_else(|p| p.into_inner()).1);
    let frozen_for = frozen.release(true)?;
    println!(
        "migrated session {} to {}: {} process(es), {} thread(s), {} sent ({} of image), frozen {:.1} ms, total {:.1} ms, 0 pre-copy rounds (stop-and-copy)",
        live.name(),
        a.to,
        processes,
        threads,
        human(sent),
        human(bytes),
        frozen_for.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(0)
}
