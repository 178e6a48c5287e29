//! System V shared memory ids, kept across a restore. A restored segment is a new kernel
//! object with a new id; the app keeps the id it was given. `mig restore` writes which old
//! id is which new one (the session directory's `sysv` file) and each restored process
//! loads it; these wrappers translate. Ids the kernel hands out afterwards pass unchanged.

use libc::{c_int, c_void};
use std::sync::RwLock;

/// (the app's id, the kernel's id)
static IDS: RwLock<Vec<(c_int, c_int)>> = RwLock::new(Vec::new());

/// Takes the id table of a restored session (lines "old new").
pub fn load_ids(text: &str) {
    let ids = text
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(' ')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    *IDS.write().unwrap_or_else(|p| p.into_inner()) = ids;
}

fn real(id: c_int) -> c_int {
    IDS.read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(old, _)| *old == id)
        .map_or(id, |(_, new)| *new)
}

/// The id the app knows kernel segment `id` by (as noted; the kernel's own otherwise).
pub fn app_id(id: c_int) -> c_int {
    IDS.read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(_, new)| *new == id)
        .map_or(id, |(old, _)| *old)
}

/// The id the app gets for kernel id `id`: the old id of a restored segment; the kernel's
/// own for a new one — unless that number is an old id the app already holds for another
/// segment, then a number of the shim's (noted, so that it translates back).
fn id_for_app(id: c_int) -> c_int {
    let known = app_id(id);
    let mut ids = IDS.write().unwrap_or_else(|p| p.into_inner());
    if known != id || !ids.iter().any(|(old, _)| *old == id) {
        return known;
    }
    let mut v = id | 0x4000_0000;
    while ids.iter().any(|(old, _)| *old == v) {
        v += 1;
    }
    ids.push((v, id));
    v
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn shmget(key: libc::key_t, size: libc::size_t, flags: c_int) -> c_int {
    let r = real!(shmget: fn(libc::key_t, libc::size_t, c_int) -> c_int)(key, size, flags);
    if r < 0 { r } else { id_for_app(r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn shmat(id: c_int, addr: *const c_void, flags: c_int) -> *mut c_void {
    real!(shmat: fn(c_int, *const c_void, c_int) -> *mut c_void)(real(id), addr, flags)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn shmctl(id: c_int, cmd: c_int, buf: *mut libc::shmid_ds) -> c_int {
    let r = real!(shmctl: fn(c_int, c_int, *mut libc::shmid_ds) -> c_int)(real(id), cmd, buf);
    // SHM_STAT and SHM_STAT_ANY (13, 15) answer with an id: as the app knows it.
    const SHM_STAT: c_int = 13;
    const SHM_STAT_ANY: c_int = 15;
    if r > 0 && (cmd == SHM_STAT || cmd == SHM_STAT_ANY) {
        id_for_app(r)
    } else {
        r
    }
}
