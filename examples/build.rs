// Compiles every C subject in c/ into an executable in OUT_DIR (paths via src/lib.rs);
// NAME_static.c is linked statically.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let cc = cc::Build::new().get_compiler();
    println!("cargo:rerun-if-changed=c");
    for entry in std::fs::read_dir("c").unwrap() {
        let src = entry.unwrap().path();
        if src.extension().and_then(|e| e.to_str()) != Some("c") {
            continue;
        }
        let name = src.file_stem().unwrap().to_str().unwrap().to_string();
        let mut c = Command::new(cc.path());
        if name.ends_with("_static") {
            c.arg("-static");
        }
        let st = c
            .args(["-O2", "-g", "-Wall", "-Werror", "-pthread", "-o"])
            .arg(out.join(&name))
            .arg(&src)
            .status()
            .expect("running the C compiler");
        assert!(st.success(), "compiling {}", src.display());
    }
    println!("cargo:rustc-env=MIG_C_EXAMPLES={}", out.display());
}
