//! The control thread's own heap. Every allocation the shim's Rust code makes goes through
//! this module's global allocator: on the control thread it comes from a region of its
//! own, elsewhere from libc's malloc, as before.
//!
//! Why: a lazy migration reads the frozen app's memory after its dump, while the session
//! runs on the target. Only the control thread runs here then, and with libc's malloc it
//! would write into the app's heap (its arena's chunks and bins) — pages the target may
//! fetch afterwards, which would no longer be the ones its image was made with. With its
//! own region, which the dump stores whole (`contains`), the app's memory stays as it was
//! dumped, and the pages are read from the frozen process itself: no snapshot (a fork of a
//! 1 GiB process copied its page tables in 16 ms, all of it inside the freeze).
//!
//! The region is reserved once (address space only) and made usable in steps as it is
//! needed; dlmalloc manages it. Memory is never given back. When the region is full, the
//! control thread's allocations go to libc's malloc again, and `spilled` says so (the dump
//! then takes a snapshot as before).
//!
//! After a fork (or a restore), the child's control thread starts a new generation above
//! what the parent had used: the parent's allocator may have been in the middle of an
//! operation when the fork copied it. What the old generation allocated is never freed.

use dlmalloc::{Allocator, Dlmalloc};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};

/// Address space reserved for the region.
const RESERVE: usize = 256 << 20;
/// Made usable this much at a time.
const STEP: usize = 2 << 20;

/// The region's start (0 until first used), the end of what is usable, and where the
/// current generation starts.
static BASE: AtomicUsize = AtomicUsize::new(0);
static USABLE: AtomicUsize = AtomicUsize::new(0);
static GENERATION: AtomicUsize = AtomicUsize::new(0);
/// A control thread's allocation went to libc's malloc (the region was full).
static SPILLED: AtomicBool = AtomicBool::new(false);
/// A block libc's malloc gave the control thread: where libc's own allocations for it
/// (opendir's, for one) go — its arena.
static LIBC_ARENA: AtomicUsize = AtomicUsize::new(0);

/// A spin lock (not a mutex: a fork child must be able to take it over whatever state the
/// parent's threads left it in).
static LOCKED: AtomicBool = AtomicBool::new(false);
static mut HEAP: Dlmalloc<Region> = Dlmalloc::new_with_allocator(Region);

thread_local! {
    static CONTROL: Cell<bool> = const { Cell::new(false) };
    static RESTARTING: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as the control thread: its allocations come from the region.
/// Notes where libc's malloc puts what libc allocates for it.
pub fn enter() {
    CONTROL.with(|c| c.set(true));
    // SAFETY: a block allocated and freed at once; only its address is kept.
    unsafe {
        let p = libc::malloc(64);
        LIBC_ARENA.store(p as usize, Relaxed);
        libc::free(p);
    }
}

/// The restart path (`on` from before its first allocation, after `start_again`, to its
/// end): its allocations come from the region, as the control thread's do, and what it
/// frees of libc's malloc (the old process's blocks it replaces) is left where it is. With
/// libc's malloc it would walk the app's heap, whose pages a lazy restore has not filled in
/// yet: each page it touched waited for the pager (~50 per python process).
pub fn restarting(on: bool) {
    CONTROL.with(|c| c.set(on));
    RESTARTING.with(|c| c.set(on));
}

/// Whether `start..end` holds the arena libc's malloc serves the control thread from.
pub fn holds_libc_arena(start: u64, end: u64) -> bool {
    (start..end).contains(&(LIBC_ARENA.load(Relaxed) as u64))
}

/// Whether `addr` lies in the region.
pub fn contains(addr: u64) -> bool {
    let base = BASE.load(Acquire) as u64;
    base != 0 && (base..base + RESERVE as u64).contains(&addr)
}

/// Whether a control thread's allocation went elsewhere (since the last fork or restore).
pub fn spilled() -> bool {
    SPILLED.load(Relaxed)
}

/// In a fork child or a restored process: a new generation above the memory used so far
/// (allocation-free).
pub fn start_again() {
    if BASE.load(Relaxed) == 0 {
        return;
    }
    GENERATION.store(USABLE.load(Relaxed), Relaxed);
    SPILLED.store(false, Relaxed);
    // SAFETY: no other thread runs the allocator now (a fork child has one thread; a
    // restored process has not started its control thread yet); the old state is dropped
    // without being looked at.
    unsafe { std::ptr::addr_of_mut!(HEAP).write(Dlmalloc::new_with_allocator(Region)) };
    LOCKED.store(false, Release);
}

fn with_heap<T>(f: impl FnOnce(&mut Dlmalloc<Region>) -> T) -> T {
    while LOCKED
        .compare_exchange_weak(false, true, Acquire, Relaxed)
        .is_err()
    {
        std::hint::spin_loop();
    }
    // SAFETY: the lock is held: no other reference to HEAP exists.
    let r = f(unsafe { &mut *std::ptr::addr_of_mut!(HEAP) });
    LOCKED.store(false, Release);
    r
}

/// Whether `p` was allocated by the current generation (older ones are never freed).
fn current(p: *mut u8) -> bool {
    p as usize >= GENERATION.load(Relaxed).max(BASE.load(Relaxed))
}

/// The region, handed to dlmalloc in pieces (never taken back).
struct Region;

// SAFETY: alloc returns fresh, zeroed, page-aligned memory of the size it says, or null;
// nothing is ever remapped, split or freed.
unsafe impl Allocator for Region {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let none = (std::ptr::null_mut(), 0, 0);
        let mut base = BASE.load(Acquire);
        if base == 0 {
            // SAFETY: a fresh reservation of address space, inaccessible until made usable.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    RESERVE,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return none;
            }
            base = p as usize;
            USABLE.store(base, Relaxed);
            GENERATION.store(base, Relaxed);
            BASE.store(base, Release);
        }
        let at = USABLE.load(Relaxed);
        let len = size.div_ceil(STEP) * STEP;
        if at + len > base + RESERVE {
            return none;
        }
        // SAFETY: within the reservation, past everything handed out so far.
        let ok = unsafe {
            libc::mprotect(
                at as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
            ) == 0
        };
        if !ok {
            return none;
        }
        USABLE.store(at + len, Relaxed);
        (at as *mut u8, len, 0)
    }
    fn remap(&self, _: *mut u8, _: usize, _: usize, _: bool) -> *mut u8 {
        std::ptr::null_mut()
    }
    fn free_part(&self, _: *mut u8, _: usize, _: usize) -> bool {
        false
    }
    fn free(&self, _: *mut u8, _: usize) -> bool {
        false
    }
    fn can_release_part(&self, _: u32) -> bool {
        false
    }
    fn allocates_zeros(&self) -> bool {
        true
    }
    fn page_size(&self) -> usize {
        4096
    }
}

/// The shim's allocator: the region on the control thread, libc's malloc elsewhere; memory
/// goes back where it came from, whichever thread gives it back.
pub struct ShimAlloc;

fn on_control_thread() -> bool {
    CONTROL.try_with(Cell::get).unwrap_or(false)
}

/// A block from the region on the control thread (unless it is full), else from libc.
///
/// # Safety
/// Both closures allocate as GlobalAlloc::alloc would for one layout.
unsafe fn either(
    region: impl FnOnce(&mut Dlmalloc<Region>) -> *mut u8,
    libc: impl FnOnce() -> *mut u8,
) -> *mut u8 {
    if on_control_thread() {
        let p = with_heap(region);
        if !p.is_null() {
            return p;
        }
        SPILLED.store(true, Relaxed);
    }
    libc()
}

// SAFETY: each block is allocated and freed by one allocator (told apart by its address),
// with the layout it was asked with.
unsafe impl GlobalAlloc for ShimAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded as asked.
        unsafe { either(|h| h.malloc(l.size(), l.align()), || System.alloc(l)) }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded as asked.
        unsafe { either(|h| h.calloc(l.size(), l.align()), || System.alloc_zeroed(l)) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        match contains(p as u64) {
            // SAFETY: allocated by this heap's current generation with this layout.
            true if current(p) => with_heap(|h| unsafe { h.free(p, l.size(), l.align()) }),
            true => {}
            false if RESTARTING.try_with(Cell::get).unwrap_or(false) => {}
            // SAFETY: allocated by libc's malloc.
            false => unsafe { System.dealloc(p, l) },
        }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        if !contains(p as u64) {
            // SAFETY: allocated by libc's malloc with this layout.
            return unsafe { System.realloc(p, l, size) };
        }
        if current(p) {
            // SAFETY: allocated by this heap's current generation with this layout.
            let q = with_heap(|h| unsafe { h.realloc(p, l.size(), l.align(), size) });
            if !q.is_null() {
                return q;
            }
        }
        // An older generation's block (or the region is full): copied into a new one.
        // SAFETY: a layout of the new size and the old alignment, as GlobalAlloc promises.
        let q = unsafe { self.alloc(Layout::from_size_align_unchecked(size, l.align())) };
        if !q.is_null() {
            // SAFETY: both blocks hold at least min(old, new) bytes and do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(p, q, l.size().min(size)) };
            // SAFETY: as dealloc above.
            unsafe { self.dealloc(p, l) };
        }
        q
    }
}
