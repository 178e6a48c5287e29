//! `mig image DIR`: what a checkpoint image holds (verified first): per process its meta,
//! threads, its fds and what the image carries for them, and every region with how many of
//! its pages are stored.

use anyhow::{Result, bail};
use migrt::image::{self, PageMap, ProcessMeta, Region, SessionManifest, Tag, ThreadState};
use std::path::Path;

pub fn inspect(dir: &Path) -> Result<i32> {
    let session = dir.join("session.img");
    let (kind, sections) = image::read_all(&session)?;
    let manifest: SessionManifest = match (kind, sections.first()) {
        (image::Kind::Session, Some(s)) if s.tag == Tag::Meta => s.decode(&session)?,
        _ => bail!("{}: not a session image", session.display()),
    };
    println!(
        "session {} from {} ({} processes)",
        manifest.name,
        manifest.host,
        manifest.processes.len()
    );
    for (vpid, parent, file) in &manifest.processes {
        let path = dir.join(file);
        let (_, sections) = image::read_verified_metadata(&path, false)?;
        let (mut meta, mut threads, mut regions) = (
            ProcessMeta::default(),
            Vec::<ThreadState>::new(),
            Vec::<Region>::new(),
        );
        let mut table = migrt::table::ProcessTable::default();
        let mut carried: Vec<String> = Vec::new();
        let mut maps: Vec<PageMap> = Vec::new();
        for s in &sections {
            match s.tag {
                Tag::Meta => meta = s.decode(&path)?,
                Tag::Threads => threads = s.decode(&path)?,
                Tag::Regions => regions = s.decode(&path)?,
                Tag::PageMap => maps.push(s.decode(&path)?),
                Tag::Table => table = s.decode::<(_, migrt::table::Folded)>(&path)?.0,
                Tag::Sockets => {
                    let st: Vec<migrt::sockstate::SocketState> = s.decode(&path)?;
                    let unread: usize = st.iter().flat_map(|s| &s.unread).map(|m| m.0.len()).sum();
                    carried.push(format!("{} socket(s), {unread} unread byte(s)", st.len()));
                }
                Tag::Pipes => {
                    let p: Vec<(u64, migrt::record::Bytes)> = s.decode(&path)?;
                    let n: usize = p.iter().map(|(_, b)| b.0.len()).sum();
                    carried.push(format!("{} pipe(s), {n} unread byte(s)", p.len()));
                }
                Tag::Contents => {
                    let c: Vec<(u64, migrt::record::Bytes)> = s.decode(&path)?;
                    let n: usize = c.iter().map(|(_, b)| b.0.len()).sum();
                    carried.push(format!(
                        "{} memfd/deleted file/FIFO content(s), {n} byte(s)",
                        c.len()
                    ));
                }
                Tag::Ptys => {
                    let p: Vec<migrt::image::PtyState> = s.decode(&path)?;
                    carried.push(format!("{} pseudo-terminal(s)", p.len()));
                }
                Tag::Precopied => {
                    let p: migrt::image::Precopied = s.decode(&path)?;
                    let kept: u64 = p.kept.iter().map(|(a, b)| b - a).sum();
                    carried.push(format!(
                        "{} KiB of memory kept from {} pre-copy round(s) ({})",
                        kept / 1024,
                        p.rounds.len(),
                        p.rounds.join(", ")
                    ));
                }
                _ => {}
            }
        }
        let cmd: Vec<String> = meta.command.iter().map(|c| c.to_string()).collect();
        println!("\nprocess {vpid} (parent {parent}): {}", cmd.join(" "));
        println!(
            "  threads: {}",
            threads
                .iter()
                .map(|t| t.vtid.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let listeners = migrt::support::listeners([&table]);
        for f in &table.fds {
            println!("  {}", crate::show::describe(f, &listeners));
        }
        if !meta.sysv.is_empty() {
            carried.push(format!("{} System V segment(s)", meta.sysv.len()));
        }
        if !carried.is_empty() {
            println!("  carried: {}", carried.join("; "));
        }
        for r in &regions {
            let n: u64 = maps
                .iter()
                .map(|m| {
                    (0..m.count)
                        .filter(|&i| {
                            m.is_present(i) && (r.start..r.end).contains(&(m.start + i * 4096))
                        })
                        .count() as u64
                })
                .sum();
            println!(
                "  {:x}-{:x} {} {:>8} KiB {:>7} pages stored  {}",
                r.start,
                r.end,
                r.perms,
                (r.end - r.start) / 1024,
                n,
                r.name
            );
        }
    }
    Ok(0)
}
