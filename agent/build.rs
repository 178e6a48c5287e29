// Builds the restorer (runtime/restorer/main.rs): a #![no_std] static-pie with flags of its
// own (panic=abort, no start files, no libc), which the workspace profile cannot give one
// crate. `mig` embeds it and runs it from a memfd.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from("../runtime/restorer/main.rs");
    println!("cargo:rerun-if-changed={}", src.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("migrestore");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let st = Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "bin",
            "--crate-name",
            "migrestore",
        ])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=pie",
            "-C",
            "debuginfo=0",
            "-C",
            "strip=symbols",
        ])
        .args([
            "-C",
            "link-arg=-static-pie",
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("running rustc for the restorer");
    assert!(st.success(), "building the restorer failed");
}
