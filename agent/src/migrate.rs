//! `mig migrate SESSION --to HOST[:PORT]`: the session moves to the agent on HOST.
//!
//! A transaction: the session is frozen, its images are streamed to the agent as they are
//! written (each process writes into a pipe that `mig` forwards; no image file on this
//! host), the agent restores it and says it runs — only then does the session end here.
//! If the agent refuses, fails, stalls or the link breaks at any point before that, the
//! session is thawed and goes on here, untouched.
//!
//! Mode stop-and-copy: the session stays frozen for the whole transfer. Mode precopy: its
//! memory is sent first while it runs — all of it, then round after round what it wrote
//! since (each process tracks its own writes, see shim/src/precopy.rs) — until a round is
//! small or stops shrinking; then it is frozen and only what was written since the last
//! round goes with the rest of the image. Mode lazy (post-copy): frozen, only what is not
//! anonymous private memory is sent (the rest stays in the frozen processes: their control
//! threads write only to a heap of their own, shim/src/ctlheap.rs, and `mig` reads it
//! from them); the agent restores it at once and its pager fetches the rest
//! through the link — what the app touches first, everything else in order — while the
//! session stays frozen here; it ends here once the agent says all is there. If the link
//! breaks before, the agent ends its copy and the session runs on here as it was frozen.
//!
//! With `--move-addr`, a service address moves along (netaddr.rs): off this host once the
//! session is frozen, before anything is read, and the session's TCP connections from it
//! to outside peers are handed over whole (migrt::tcprepair); on failure it comes back
//! before the session thaws.

use crate::client::Client;
use crate::frozen::{Frozen, human, manifest_bytes};
use crate::netaddr;
use crate::outgoing::{self, Sending, Shared, announce, finish, stream_to};
use crate::peer::{self, CHUNK, Msg};
use crate::sessions;
use anyhow::{Context, Result, bail};
use migrt::rounds::PageHashes;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Precopy,
    StopAndCopy,
    Lazy,
}

/// Pre-copy ends when a round sends less than this, after at most MAX_ROUNDS rounds, or
/// when a round is not clearly smaller than the one before.
const SMALL_ROUND: u64 = 1 << 20;
const MAX_ROUNDS: usize = 8;

pub struct MigrateArgs {
    pub session: String,
    pub to: String,
    pub mode: Mode,
    pub key: Option<std::path::PathBuf>,
    pub ignore_unsupported: bool,
    /// Addresses that move with the session (`--move-addr`): its TCP connections from them
    /// to peers outside are handed over whole.
    pub move_addr: Vec<std::net::Ipv4Addr>,
    /// `--map-...` arguments, passed to the restore on the target.
    pub restore_args: Vec<String>,
    pub timeout: Duration,
}

/// What pre-copy did before the freeze.
#[derive(Default)]
struct Rounds {
    clients: Vec<Sending>,
    count: usize,
    bytes: u64,
}

/// Connections to every process of the session, opened while it runs (what starts a
/// process's control thread is not part of the freeze).
fn connect_all(live: &sessions::Live, patience: Duration, rounds: &mut Rounds) -> Result<()> {
    let known: Vec<i32> = rounds.clients.iter().map(|c| c.vpid).collect();
    for p in live
        .processes()
        .into_iter()
        .filter(|p| !known.contains(&p.vpid))
    {
        match Client::connect(&live.dir, p.vpid, p.pid, live.table.signal()) {
            Ok(c) => {
                c.set_patience(patience)?;
                rounds.clients.push(Sending {
                    vpid: p.vpid,
                    pid: p.pid,
                    client: c,
                    files: Vec::new(),
                    hashes: None,
                    shared: None,
                });
            }
            Err(_) if sessions::gone(p.pid) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Pre-copy rounds while the session runs, until one is small or stops shrinking (of the
/// processes from index `from` on); of their shared memory only, unless `private`.
fn precopy(
    rounds: &mut Rounds,
    (link, announced): (&Shared, &mut u32),
    from: usize,
    private: bool,
) -> Result<()> {
    let progress = migrt::sys::isatty(2);
    let mut previous = u64::MAX;
    let mut buf = vec![0u8; migrt::rounds::RUN * migrt::image::PAGE];
    for r in 0..MAX_ROUNDS {
        let names: Vec<String> = rounds.clients[from..]
            .iter()
            .map(|p| format!("pages-{}-{r}.img", p.vpid))
            .collect();
        let first = announce(link, announced, names.clone())?;
        let (mut sent, mut ended) = (0, Vec::new());
        let pids = rounds.clients.iter().map(|p| p.pid);
        let skips = migrt::image::shared_stored_before_now(pids);
        for (k, p) in rounds.clients[from..].iter_mut().enumerate() {
            match p.round(
                link,
                (first + k as u32, &skips[from + k]),
                &mut buf,
                private,
            ) {
                Ok(n) => sent += n,
                // (A process that ended meanwhile — a short-lived child — is no error; its
                // round file is not in the image's list.)
                Err(_) if sessions::gone(p.pid) => ended.push(p.vpid),
                Err(e) => return Err(e),
            }
            p.files.push(names[k].clone());
        }
        rounds.clients.retain(|p| !ended.contains(&p.vpid));
        // The agent may still be storing what it was sent: waited for here, so that the
        // next round (or the freeze) covers only what was written since it is all there.
        sync(link)?;
        rounds.count += 1;
        rounds.bytes += sent;
        if progress {
            eprintln!(
                "\rmig migrate: pre-copy round {}: {} sent while it runs",
                r + 1,
                human(sent)
            );
        }
        if sent < SMALL_ROUND || sent > previous / 10 * 9 {
            break;
        }
        previous = sent;
    }
    Ok(())
}

/// Whether a process of the session maps shared anonymous memory (which its image would
/// store).
fn shares_memory(rounds: &Rounds) -> bool {
    rounds.clients.iter().any(|c| {
        let maps = migrt::procfs::all_mappings(&c.pid.to_string());
        maps.iter()
            .any(|m| migrt::image::shared_anonymous(&m.perms, &m.name.0))
    })
}

/// A process forked since the rounds began has none: a freeze that catches it stores all
/// of its memory (a child checking a big parent's memory: hundreds of MiB frozen). So
/// pre-copy freezes at a moment without such a process holding much, if one comes soon
/// (a short-lived child); one that lives on gets rounds of its own.
fn catch_up(
    live: &sessions::Live,
    rounds: &mut Rounds,
    (link, announced): (&Shared, &mut u32),
    patience: Duration,
) -> Result<()> {
    let late = |rounds: &Rounds| {
        live.processes().into_iter().any(|p| {
            !rounds.clients.iter().any(|c| c.vpid == p.vpid)
                && sessions::resident(p.pid) > SMALL_ROUND
        })
    };
    for _ in 0..3 {
        let mut waited = 0;
        while late(rounds) && waited < 40 {
            std::thread::sleep(Duration::from_millis(5));
            waited += 1;
        }
        if waited < 40 {
            return Ok(());
        }
        let from = rounds.clients.len();
        connect_all(live, patience, rounds)?;
        precopy(rounds, (link, &mut *announced), from, true)?;
    }
    Ok(())
}

/// Where pre-copy went by hash: each such process's memory, frozen now, compared with what
/// its rounds sent (its dump then stores only what differs).
fn compare(frozen: &mut Frozen, hashed: Vec<(i32, i32, PageHashes)>, buf: &mut [u8]) {
    for (vpid, pid, h) in hashed {
        let mut through = |addr, out: &mut [u8]| frozen.pages(vpid, addr, out);
        let mut reader = outgoing::Reader::new(pid, &mut through);
        let c = h.compare(buf, &mut |addr, out| reader.read(addr, out));
        frozen.compared.insert(vpid, c);
    }
}

/// Where pre-copy sent shared memory: what each process's image stores of it, frozen now,
/// compared with what its rounds sent of it (its dump then stores only what differs).
fn compare_shared(
    frozen: &mut Frozen,
    hashed: Vec<(i32, PageHashes)>,
    buf: &mut [u8],
) -> Result<()> {
    let (vpids, skips) = (frozen.vpids(), frozen.shared_skips());
    for (vpid, mut h) in hashed {
        let Some(k) = vpids.iter().position(|&v| v == vpid) else {
            continue;
        };
        let found = frozen.client(vpid)?.shared_memory(&skips[k])?;
        let mut through = |addr, out: &mut [u8]| frozen.pages(vpid, addr, out);
        let mut reader = outgoing::Reader::new(found.pid, &mut through);
        let read = &mut |addr, out: &mut [u8]| reader.read(addr, out);
        let c = h.compare_existing(&found.mappings, &found.resident, buf, read);
        frozen.compared_shared.insert(vpid, c);
    }
    Ok(())
}

/// Waits until the agent has stored everything sent so far.
fn sync(link: &Shared) -> Result<()> {
    let mut l = link.lock().unwrap_or_else(|p| p.into_inner());
    l.link.send(&Msg::Sync)?;
    match l
        .link
        .recv()
        .context("waiting for the agent to store a pre-copy round")?
    {
        Msg::Synced => Ok(()),
        Msg::Refused(why) => bail!("the agent refused: {why}"),
        other => bail!("the agent said {other:?}"),
    }
}

/// Streams every process's image and the manifest while the session is frozen; returns the
/// bytes of image. The addresses `moving` are taken off this host (into `moved`) before
/// anything is read: no packet reaches the connections handed over after that.
fn transfer(
    frozen: &mut Frozen,
    link: &Shared,
    announced: &mut u32,
    ignore_unsupported: bool,
    (moving, moved): (&[netaddr::Held], &mut netaddr::Changes),
) -> Result<u64> {
    let send =
        |m: &Msg| -> Result<()> { link.lock().unwrap_or_else(|p| p.into_inner()).link.send(m) };
    let ips: Vec<std::net::Ipv4Addr> = moving.iter().map(|h| h.ip).collect();
    let handed = frozen.check_supported(ignore_unsupported, &ips)?;
    for h in moving {
        moved.remove(h)?;
    }
    if handed > 0 {
        eprintln!("mig migrate: {handed} TCP connection(s) to the outside handed over");
    }
    let mut files: Vec<String> = frozen
        .vpids()
        .iter()
        .map(|&v| migrt::image::process_file(v))
        .collect();
    files.push("session.img".into());
    let base = announce(link, announced, files.clone())?;
    let mut forwarders = Vec::new();
    let dumped = frozen.dump(
        |vpid| {
            let file = migrt::image::process_file(vpid);
            let index = files
                .iter()
                .position(|f| *f == file)
                .context("a process that came meanwhile")?;
            // (The process gets the only end to write: its image is complete at the
            // agent, and read by the restore there, once it is written, while the
            // others are still being dumped.)
            let (into, forwarder) = stream_to(link, base + index as u32)?;
            forwarders.push(forwarder);
            Ok((file.clone(), file, into))
        },
        false,
    );
    // The forwarders end either way (their pipes close), and say why one failed first.
    let finished: Vec<Result<()>> = forwarders.into_iter().map(finish).collect();
    finished.into_iter().collect::<Result<()>>()?;
    let (mut bytes, manifest) = dumped?;
    let session = manifest_bytes(&manifest)?;
    bytes += session.len() as u64;
    let last = base + files.len() as u32 - 1;
    for piece in session.chunks(CHUNK).chain([&[][..]]) {
        send(&Msg::Chunk {
            file: last,
            data: piece.to_vec(),
        })?;
    }
    link.lock().unwrap_or_else(|p| p.into_inner()).bytes += session.len() as u64;
    Ok(bytes)
}

/// The addresses to move, as this host holds them; only root can move them.
fn moving_addresses(ips: &[std::net::Ipv4Addr]) -> Result<Vec<netaddr::Held>> {
    if !ips.is_empty() && migrt::sys::geteuid() != 0 {
        bail!(
            "--move-addr needs root: the address is moved, and TCP connections are handed over in repair mode (CAP_NET_ADMIN)"
        );
    }
    ips.iter()
        .map(|ip| {
            netaddr::find(*ip)?
                .with_context(|| format!("--move-addr {ip}: no interface of this host holds it"))
        })
        .collect()
}

/// The agent's answers once the image is sent: Running (the session runs there), and in a
/// lazy migration, before and after it, its requests for pages, answered from the frozen
/// session (each followed by the MAC so far), until Complete. Returns how long after the
/// freeze it ran there, and the bytes of pages sent for it.
fn answers(frozen: &mut Frozen, link: &Shared, lazy: bool) -> Result<(Duration, u64)> {
    let mut l = link.lock().unwrap_or_else(|p| p.into_inner());
    let progress = migrt::sys::isatty(2);
    let (mut bytes, mut shown, mut told) = (0u64, Instant::now(), Instant::now());
    let mut running = None;
    let mut buf = Vec::new();
    loop {
        let m = l.link.recv().with_context(|| match running {
            None => "waiting for the agent to restore the session",
            Some(_) => "the link broke during the post-copy (the agent ends the copy there)",
        })?;
        match m {
            Msg::Want {
                vpid,
                addr,
                len,
                ahead,
            } if lazy => {
                match frozen.sparse_pages(vpid, addr, len, &mut buf) {
                    Ok(n) => bytes += n as u64,
                    // (A guess past the end of its memory: nothing there.)
                    Err(_) if ahead => buf.clear(),
                    Err(e) => return Err(e),
                }
                let data = Vec::new();
                l.link
                    .send_with_data(&Msg::Pages { vpid, addr, data }, &buf)?;
                l.link.send_mac()?;
            }
            Msg::Waiting if lazy => {}
            Msg::Running { .. } if running.is_none() => {
                running = Some(frozen.at.elapsed());
                if !lazy {
                    break;
                }
            }
            Msg::Complete if running.is_some() => break,
            Msg::Refused(why) => bail!("the agent refused: {why}"),
            other => bail!("the agent said {other:?}"),
        }
        // (A frozen process thaws by itself when mig says nothing to it for a minute.)
        if told.elapsed() > Duration::from_secs(10) {
            frozen.keep_waiting()?;
            told = Instant::now();
        }
        if progress && shown.elapsed() > Duration::from_millis(200) {
            eprint!(
                "\rmig migrate: post-copy: {} fetched by the target",
                human(bytes)
            );
            shown = Instant::now();
        }
    }
    if progress && lazy {
        eprintln!();
    }
    l.bytes += bytes;
    Ok((running.unwrap_or_default(), bytes))
}

pub fn migrate(a: MigrateArgs) -> Result<i32> {
    let rt = sessions::runtime_dir()?;
    let live = sessions::find(&rt, &a.session)?;
    let key = peer::read_key(&peer::key_path(a.key.as_deref()))?;
    let moving = moving_addresses(&a.move_addr)?;
    let t0 = Instant::now();
    // The agent first: a refusal costs the session nothing.
    let mut link = peer::connect(&a.to, &key, a.timeout)?;
    link.send(&Msg::Incoming {
        name: live.name(),
        uid: migrt::sys::getuid(),
        restore_args: a.restore_args.clone(),
        moving: moving
            .iter()
            .map(|h| format!("{}/{}", h.ip, h.prefix))
            .collect(),
        lazy: a.mode == Mode::Lazy,
        resident: live.resident(),
    })?;
    match link.recv()? {
        Msg::Ready => {}
        Msg::Refused(why) => bail!("the agent at {} refused: {why}", a.to),
        other => bail!("the agent at {} said {other:?}", a.to),
    }
    // (Pages alike are common between processes — a forked tree's — and rare within one:
    // one process's pages are not compared, which would cost more than it saves.)
    let link: Shared = outgoing::Sender::shared(link, live.processes().len() > 1);

    // Any error below drops `frozen` (and the pre-copy connections), which thaws the
    // session here and ends its write tracking.
    let mut announced = 0;
    let mut rounds = Rounds::default();
    connect_all(&live, a.timeout, &mut rounds)?;
    match a.mode {
        Mode::Precopy => precopy(&mut rounds, (&link, &mut announced), 0, true)
            .and_then(|_| catch_up(&live, &mut rounds, (&link, &mut announced), a.timeout)),
        // Lazily, shared memory goes ahead (the target cannot fetch it page by page: a
        // fault in any process that maps it would have to be served).
        Mode::Lazy if shares_memory(&rounds) => {
            precopy(&mut rounds, (&link, &mut announced), 0, false)
        }
        Mode::Lazy | Mode::StopAndCopy => Ok(()),
    }
    .map_err(|e| e.context(format!("session {} runs on here", live.name())))?;
    let (count, before) = (rounds.count, rounds.bytes);
    let (mut open, mut files) = (Vec::new(), HashMap::new());
    let (mut hashed, mut shared) = (Vec::new(), Vec::new());
    for p in rounds.clients {
        open.push((p.vpid, p.client));
        files.insert(p.vpid, p.files);
        hashed.extend(p.hashes.map(|h| (p.vpid, p.pid, h)));
        shared.extend(p.shared.map(|h| (p.vpid, h)));
    }
    let walker = crate::walkhelp::Walker::new();
    // (The comparisons' buffer, written through now: 4 MiB of fresh memory cost ~2 ms of
    // page faults here, too much to spend frozen.)
    let mut buf = match hashed.is_empty() && shared.is_empty() {
        true => Vec::new(),
        false => vec![1u8; migrt::rounds::RUN * migrt::image::PAGE],
    };
    let mut frozen = Frozen::freeze_with(&live, open)?;
    let stopped = frozen.at.elapsed();
    frozen.rounds = files;
    frozen.walker = Some(walker);
    // Lazily, each process's dump keeps its anonymous memory here (in the frozen process
    // itself), to be fetched after the session runs on the target.
    // (After the rounds of its shared memory, if any: the restore takes what it keeps of
    // that from them, the rest from here.)
    if a.mode == Mode::Lazy {
        for v in frozen.vpids() {
            let files = frozen.rounds.entry(v).or_default();
            files.push(migrt::image::SOURCE_ROUND.into());
        }
    }
    compare(&mut frozen, hashed, &mut buf);
    compare_shared(&mut frozen, shared, &mut buf)
        .map_err(|e| e.context(format!("session {} runs on here", live.name())))?;
    // Dropped before `frozen` on failure: the addresses are back before the session thaws.
    let mut moved = netaddr::Changes::default();
    let sent = transfer(
        &mut frozen,
        &link,
        &mut announced,
        a.ignore_unsupported,
        (&moving, &mut moved),
    )
    .and_then(|bytes| {
        let mut l = link.lock().unwrap_or_else(|p| p.into_inner());
        // From here until the session has ended here, an interrupt must not leave it
        // running on both hosts (a frozen session left by a vanished mig thaws itself).
        migrt::sys::ignore_terminal_signals();
        l.link.send_mac()?;
        if migrt::sys::isatty(2) {
            eprintln!();
        }
        Ok((bytes, frozen.at.elapsed()))
    })
    // The agent restores; its word decides. (Lazily, the session runs there before all its
    // memory is: a failure then ends it there, and it runs on here as it was frozen.)
    .and_then(|sent| Ok((sent, answers(&mut frozen, &link, a.mode == Mode::Lazy)?)))
    .map_err(|e| e.context(format!("session {} runs on here", live.name())))?;
    let ((sent, imaged), (running, after)) = sent;
    // The addresses are the target's now.
    moved.keep();
    let (processes, threads) = (frozen.processes(), frozen.threads);
    let (bytes, sent) = (sent, link.lock().unwrap_or_else(|p| p.into_inner()).bytes);
    frozen.release(true)?;
    // (Lazily, the post-copy after the pre-copy figures: the summary reads the same in
    // every mode up to the rounds.)
    let post = match a.mode {
        Mode::Lazy => format!(
            ", post-copy: {} after it ran there, kept here {:.1} ms",
            human(after),
            (t0.elapsed() - running).as_secs_f64() * 1e3
        ),
        _ => String::new(),
    };
    println!(
        "migrated session {} to {}: {} process(es), {} thread(s), {} sent ({} before the freeze, {} frozen), frozen {:.1} ms, total {:.1} ms, {} pre-copy round(s){post}",
        live.name(),
        a.to,
        processes,
        threads,
        human(sent),
        human(before),
        human(bytes),
        running.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3,
        count,
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "the freeze: {:.1} ms stopping the session, {:.1} ms writing and sending its image, {:.1} ms until it ran there",
        ms(stopped),
        ms(imaged - stopped),
        ms(running.saturating_sub(imaged)),
    );
    Ok(0)
}
