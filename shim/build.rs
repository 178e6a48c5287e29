// The exec functions that take a variable argument list (execl, execlp, execle) cannot be
// defined in stable Rust; a few lines of C collect their arguments and call the Rust
// wrappers of execv/execvp/execve.
fn main() {
    println!("cargo:rerun-if-changed=src/interpose/variadic.c");
    cc::Build::new()
        .file("src/interpose/variadic.c")
        .flag("-fvisibility=default")
        .compile("migshim_variadic");
    // Keep the functions a fork child runs (section .text.hot.migshim_fork) together, so
    // the child faults in one page of the shim's text rather than one per function.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,keep-text-section-prefix");
}
