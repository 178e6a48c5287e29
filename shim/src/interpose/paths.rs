//! `/proc/<vpid>/...` paths name the real process behind the virtual pid; `/proc/self`
//! read as a link answers the virtual pid.

use super::process::{to_real, to_virtual};
use crate::state::shim;
use libc::{c_char, c_int, ssize_t};
use migrt::sessiontable::is_virtual;
use std::ffi::{CStr, CString};

/// The path with a virtual pid after /proc/ replaced by the real one; None when unchanged.
pub fn translate(path: *const c_char) -> Option<CString> {
    const PROC: &[u8] = b"/proc/";
    if path.is_null() || shim().is_none() {
        return None;
    }
    // SAFETY: the caller passes a NUL-terminated path (libc's own contract); the loop stops
    // at the first byte that differs, so it never reads past the NUL.
    let is_proc = PROC
        .iter()
        .enumerate()
        .all(|(i, &b)| unsafe { *path.add(i) as u8 == b });
    if !is_proc {
        return None;
    }
    // SAFETY: as above.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
    let rest = bytes.strip_prefix(b"/proc/")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || !matches!(rest.get(digits), None | Some(b'/')) {
        return None;
    }
    let id: i32 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    if !is_virtual(id) {
        return None;
    }
    let mut out = format!("/proc/{}", to_real(id)).into_bytes();
    out.extend_from_slice(&rest[digits..]);
    CString::new(out).ok()
}

/// Declares a wrapper that only rewrites its path argument.
macro_rules! with_proc_path {
    ($name:ident($($pre:ident: $pt:ty,)* @path $(, $post:ident: $qt:ty)*) -> $r:ty) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($pre: $pt,)* path: *const c_char $(, $post: $qt)*) -> $r {
            let t = translate(path);
            let p = t.as_ref().map_or(path, |c| c.as_ptr());
            real!($name: fn($($pt,)* *const c_char $(, $qt)*) -> $r)($($pre,)* p $(, $post)*)
        }
    };
}

type Stat = *mut libc::stat64;

with_proc_path!(stat(@path, buf: Stat) -> c_int);
with_proc_path!(stat64(@path, buf: Stat) -> c_int);
with_proc_path!(lstat(@path, buf: Stat) -> c_int);
with_proc_path!(lstat64(@path, buf: Stat) -> c_int);
with_proc_path!(fstatat(dirfd: c_int, @path, buf: Stat, flags: c_int) -> c_int);
with_proc_path!(fstatat64(dirfd: c_int, @path, buf: Stat, flags: c_int) -> c_int);
with_proc_path!(__xstat(ver: c_int, @path, buf: Stat) -> c_int);
with_proc_path!(__xstat64(ver: c_int, @path, buf: Stat) -> c_int);
with_proc_path!(__lxstat(ver: c_int, @path, buf: Stat) -> c_int);
with_proc_path!(__lxstat64(ver: c_int, @path, buf: Stat) -> c_int);
with_proc_path!(statx(dirfd: c_int, @path, flags: c_int, mask: libc::c_uint, buf: *mut libc::statx) -> c_int);
with_proc_path!(access(@path, mode: c_int) -> c_int);
with_proc_path!(faccessat(dirfd: c_int, @path, mode: c_int, flags: c_int) -> c_int);
with_proc_path!(chdir(@path) -> c_int);

/// readlink("/proc/self") answers the virtual pid; /proc/<vpid>/... paths are rewritten.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlink(path: *const c_char, buf: *mut c_char, size: usize) -> ssize_t {
    readlinkat(libc::AT_FDCWD, path, buf, size)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlinkat(
    dirfd: c_int,
    path: *const c_char,
    buf: *mut c_char,
    size: usize,
) -> ssize_t {
    let t = translate(path);
    let p = t.as_ref().map_or(path, |c| c.as_ptr());
    let n = real!(readlinkat: fn(c_int, *const c_char, *mut c_char, usize) -> ssize_t)(
        dirfd, p, buf, size,
    );
    if n <= 0
        || shim().is_none()
        || path.is_null()
        || CStr::from_ptr(path).to_bytes() != b"/proc/self"
    {
        return n;
    }
    // The link's target is the real pid in decimal; the caller's buffer gets the virtual one.
    let got = std::slice::from_raw_parts(buf.cast::<u8>(), n as usize);
    let Some(real) = std::str::from_utf8(got)
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
    else {
        return n;
    };
    let v = to_virtual(real).to_string();
    let len = v.len().min(size);
    std::ptr::copy_nonoverlapping(v.as_ptr(), buf.cast::<u8>(), len);
    len as ssize_t
}
