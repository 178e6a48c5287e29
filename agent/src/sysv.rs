//! System V shared memory for a restore: each segment the session had attached is made
//! anew (same key, size and mode), filled with the pages the first image that has it
//! stored, and attached again by every process at its old address (shim/src/restart.rs).
//! The app keeps its old ids: the session directory's `sysv` file says which old id is
//! which new one, and the shim translates.

use crate::restore::{ProcImage, region_pages};
use anyhow::{Context, Result};
use migrt::image::Region;
use std::collections::HashMap;

/// A mapping of a System V segment (its inode is the segment's id).
pub fn is_sysv(r: &Region) -> bool {
    r.name.0.starts_with(b"/SYSV")
}

/// Makes the segments; returns the kernel id at the checkpoint → (the app's id, new id), and
/// writes the app's id → new id table into `session_dir` for the shim.
pub fn make(
    images: &[ProcImage],
    session_dir: &std::path::Path,
) -> Result<HashMap<i32, (i32, i32)>> {
    let mut ids = HashMap::new();
    for img in images {
        for seg in &img.meta.sysv {
            if ids.contains_key(&seg.id) {
                continue;
            }
            let new = migrt::sys::sysv_create(seg.key, seg.size, seg.mode).with_context(|| {
                format!(
                    "making System V shared memory (key {}, {} bytes) again: is the original session still running?",
                    seg.key, seg.size
                )
            })?;
            let region = images.iter().find_map(|i| {
                i.regions
                    .iter()
                    .find(|r| is_sysv(r) && r.inode == seg.id as u64)
                    .map(|r| (i, r))
            });
            if let Some((i, r)) = region {
                let mut result = Ok(());
                migrt::sys::sysv_fill(new, seg.size, |mem| {
                    result = region_pages(i, r, |at, page| {
                        if let Some(dst) = mem.get_mut(at as usize..at as usize + page.len()) {
                            dst.copy_from_slice(page);
                        }
                        Ok(())
                    });
                })?;
                result?;
            }
            ids.insert(seg.id, (seg.app_id, new));
        }
    }
    let table: String = ids
        .values()
        .map(|(app, new)| format!("{app} {new}\n"))
        .collect();
    // (None: no file, which reads as empty; made on a disk file system it can wait for
    // the journal in the middle of the freeze.)
    if !table.is_empty() {
        std::fs::write(session_dir.join("sysv"), table)?;
    }
    Ok(ids)
}

/// A process's attachments for its restart: (address, new id, flags: 1 read-only, 2 marked
/// for removal).
pub fn attachments(img: &ProcImage, ids: &HashMap<i32, (i32, i32)>) -> Vec<[u64; 3]> {
    img.regions
        .iter()
        .filter(|r| is_sysv(r))
        .filter_map(|r| {
            let (_, new) = *ids.get(&(r.inode as i32))?;
            let dest = img
                .meta
                .sysv
                .iter()
                .any(|s| s.id == r.inode as i32 && s.mode & 0o1000 != 0);
            let flags = (!r.perms.contains('w')) as u64 | (dest as u64) << 1;
            Some([r.start, new as u64, flags])
        })
        .collect()
}

/// After a failed restore: the segments it made go again.
pub fn remove_made(session_dir: &std::path::Path) {
    let table = std::fs::read_to_string(session_dir.join("sysv")).unwrap_or_default();
    for new in table
        .lines()
        .filter_map(|l| l.split_once(' ')?.1.parse().ok())
    {
        migrt::sys::sysv_remove(new);
    }
}
