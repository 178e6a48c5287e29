//! migrt — everything of migshim that is not tied to being preloaded: the state-table model
//! and its journal records, the session's shared process table, reading `/proc`, socket
//! diagnostics and the wire protocol between `mig` and the shim.

pub mod dirty;
pub mod error;
pub mod fdmap;
pub mod image;
pub mod journal;
pub mod link;
pub mod paths;
pub mod procfs;
pub mod rebind;
pub mod record;
pub mod rounds;
pub mod sessiontable;
pub mod sharing;
pub mod sockaddr;
pub mod sockdiag;
pub mod sockstate;
pub mod support;
pub mod sys;
pub mod table;
pub mod tcprepair;
pub mod wire;

pub use error::{Error, Result};
