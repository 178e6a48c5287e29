//! Where the compiled C subjects are (built by build.rs from `examples/c/*.c`).

use std::path::PathBuf;

/// Path of the compiled C subject `name` (the file stem of `examples/c/NAME.c`).
pub fn c_program(name: &str) -> PathBuf {
    PathBuf::from(env!("MIG_C_EXAMPLES")).join(name)
}
