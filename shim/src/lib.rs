//! libmigshim.so — preloaded into every process of a migshim session.
//!
//! At load it joins the session (finds or takes its virtual pid in the session's shared
//! process table), starts its hidden control thread, and from then on answers the app's
//! pid/tid questions with virtual ids and journals every call that makes, changes or drops
//! a resource. Without a session (`MIGSHIM_SESSION` unset or unusable) every wrapper passes
//! straight through to libc.

mod control;
mod creds;
mod ctlheap;
mod dump;
mod interpose;
mod precopy;
mod reconcile;
mod restart;
mod state;
mod zombies;

/// The shim's own allocations: libc's malloc, but the control thread's own region for its
/// (ctlheap.rs).
#[global_allocator]
static ALLOC: ctlheap::ShimAlloc = ctlheap::ShimAlloc;

/// Runs when the dynamic loader maps the library, before the app's `main`.
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

/// Runs at normal process exit (return from main, exit()).
#[used]
#[unsafe(link_section = ".fini_array")]
static FINI: extern "C" fn() = fini;

extern "C" fn init() {
    state::init();
}

extern "C" fn fini() {
    state::leave();
}
