//! Where sessions live on a host: one directory per user (mode 0700, so only the owning uid
//! can reach the control sockets inside), one sub-directory per live session.
//!
//! ```text
//! $MIGSHIM_RUNTIME_DIR | $XDG_RUNTIME_DIR/migshim | /tmp/migshim-<uid>
//!   sessions/<name>/procs          shared process table (sessiontable.rs)
//!   sessions/<name>/session.json   who started it, when, on which host
//!   sessions/<name>/ctl/<vpid>     control socket of each shim process
//!   logs/<name>.log                output of a detached session
//! ```

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Environment variable naming the session directory; set by `mig run`, read by the shim.
pub const ENV_SESSION: &str = "MIGSHIM_SESSION";
/// Overrides the runtime directory (tests use it to stay apart from each other).
pub const ENV_RUNTIME_DIR: &str = "MIGSHIM_RUNTIME_DIR";

pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(ENV_RUNTIME_DIR).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        if d.is_dir() {
            return d.join("migshim");
        }
    }
    shared_tmp_runtime_dir(crate::sys::getuid())
}

/// User `uid`'s runtime directory where nothing else names one.
pub fn shared_tmp_runtime_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/migshim-{uid}"))
}

/// Creates `dir` (and parents) with mode 0700 and checks that it is ours and private.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("creating directory", dir, e))?;
    let md = std::fs::metadata(dir).map_err(|e| Error::io("reading", dir, e))?;
    if md.uid() != crate::sys::getuid() {
        return Err(Error::io(
            "directory is owned by another user:",
            dir,
            std::io::Error::from_raw_os_error(libc::EPERM),
        ));
    }
    if md.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("making private", dir, e))?;
    }
    Ok(())
}

pub fn sessions_dir(rt: &Path) -> PathBuf {
    rt.join("sessions")
}

pub fn logs_dir(rt: &Path) -> PathBuf {
    rt.join("logs")
}

/// A session's directory and the files in it.
#[derive(Debug, Clone)]
pub struct SessionDir(pub PathBuf);

impl SessionDir {
    pub fn new(rt: &Path, name: &str) -> Self {
        SessionDir(sessions_dir(rt).join(name))
    }
    pub fn name(&self) -> String {
        self.0
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
    pub fn procs(&self) -> PathBuf {
        self.0.join("procs")
    }
    /// Removes the session's directory and its table.
    pub fn remove(&self) {
        crate::sessiontable::SessionTable::remove(&self.procs());
        let _ = std::fs::remove_dir_all(&self.0);
    }
    pub fn meta(&self) -> PathBuf {
        self.0.join("session.json")
    }
    pub fn ctl_dir(&self) -> PathBuf {
        self.0.join("ctl")
    }
    pub fn ctl(&self, vpid: i32) -> PathBuf {
        self.ctl_dir().join(vpid.to_string())
    }
    /// The abstract socket name (without its leading NUL) a process listens on when it
    /// cannot make its socket in `ctl_dir`: it changed to a user who may not write there.
    /// Anyone on the host's network namespace could take such a name first, so mig checks
    /// that the process at the other end is the one it asked.
    pub fn ctl_abstract(&self, vpid: i32) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let mut name = b"migshim".to_vec();
        name.extend(self.ctl(vpid).as_os_str().as_bytes());
        name.truncate(107);
        name
    }
}

pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("web-1.a_b").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
