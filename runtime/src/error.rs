//! The runtime's error type: every variant says what failed and on which resource.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// (The io error is part of the message, not a separate cause, so that error chains
    /// do not print it twice.)
    #[error("{what} {path}: {err}")]
    Io {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("{path}: not a migshim session table (bad magic or version {version})")]
    BadSessionTable { path: PathBuf, version: u32 },
    #[error("session table full: {0} slots used; start a new session")]
    TableFull(usize),
    #[error(
        "invalid session name {0:?}: use 1-32 characters from A-Z a-z 0-9 . _ -, not starting with '.'"
    )]
    BadName(String),
    #[error("image {path}: {what}")]
    Image { path: PathBuf, what: String },
    #[error("wire: {0}")]
    Wire(String),
    /// The other end closed the connection (or reset it): before a frame began, or while
    /// one was being sent.
    #[error("wire: the other end closed the connection")]
    Closed,
    #[error("encoding: {0}")]
    Encode(#[from] postcard::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            err,
        }
    }
}
