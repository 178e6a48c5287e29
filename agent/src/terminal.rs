//! A restored session on `mig restore`'s terminal: the process that had its terminal in
//! the foreground finds its modes again (raw, no echo, ...), and a full-screen program
//! redraws. Its controlling terminal is `mig restore`'s already (the restored processes
//! join mig restore's process group and session unless they led their own), so keys and
//! job control go to it.

use crate::restore::ProcImage;
use migrt::image::TtyState;

/// The terminal state to bring back: the foreground process's, else the first one's.
fn saved(images: &[ProcImage]) -> Option<&TtyState> {
    let ttys = || images.iter().filter_map(|i| i.meta.tty.as_ref());
    ttys().find(|t| t.foreground).or_else(|| ttys().next())
}

/// Before the restored processes run: their terminal modes on ours (when ours is one).
pub fn restore_modes(images: &[ProcImage]) {
    if let Some(t) = saved(images).filter(|_| migrt::sys::isatty(0))
        && let Err(e) = migrt::sys::set_termios(0, &t.termios)
    {
        eprintln!("mig: restore: the terminal modes could not be restored ({e})");
    }
}

/// Once they run: a full-screen program repaints on SIGWINCH only when the size changed,
/// so the window is made one row smaller and then right again (each change signals the
/// foreground group).
pub fn redraw(images: &[ProcImage]) {
    if saved(images).is_none_or(|t| !t.foreground) || !migrt::sys::isatty(0) {
        return;
    }
    let Some((rows, cols)) = migrt::sys::window_size(0).filter(|s| s.0 > 1) else {
        return;
    };
    migrt::sys::set_window_size(0, rows - 1, cols);
    std::thread::sleep(std::time::Duration::from_millis(50));
    migrt::sys::set_window_size(0, rows, cols);
}
