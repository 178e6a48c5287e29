//! `mig checkpoint SESSION --out DIR [--stop]`: freeze every process of the session, write
//! one image per process and a session manifest, then let the session run on — or end it,
//! once the image is complete and synced. Any failure thaws every process and removes the
//! partial image: the session goes on as if nothing happened.

use crate::frozen::{Frozen, human, manifest_bytes};
use crate::sessions;
use anyhow::{Context, Result, bail};
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
    let result = (|| -> Result<i32> {
        // Any error below drops `frozen`, which thaws every process.
        let mut frozen = Frozen::freeze(&live)?;
        frozen.check_supported(ignore_unsupported, &[])?;
        let (mut bytes, manifest) = frozen.dump(
            |vpid| {
                let file = migrt::image::process_file(vpid);
                let path = out.join(&file);
                let created = std::fs::File::create(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                Ok((file, path.display().to_string(), created))
            },
            stop,
        )?;
        let session = manifest_bytes(&manifest)?;
        bytes += session.len() as u64;
        std::fs::write(out.join("session.img"), &session)?;
        if stop {
            std::fs::File::open(out.join("session.img"))?.sync_all()?;
            std::fs::File::open(out)?.sync_all()?;
        }
        let (processes, threads) = (frozen.processes(), frozen.threads);
        let frozen_for = frozen.release(stop)?;
        println!(
            "checkpoint of session {} to {}: {} process(es), {} thread(s), {} written, frozen {:.1} ms, total {:.1} ms{}",
            live.name(),
            out.display(),
            processes,
            threads,
            human(bytes),
            frozen_for.as_secs_f64() * 1e3,
            t0.elapsed().as_secs_f64() * 1e3,
            if stop { "; session ended" } else { "" }
        );
        Ok(0)
    })();
    if result.is_err() {
        // No partial image is left behind.
        let _ = std::fs::remove_dir_all(out);
    }
    result
}
