//! Compiles the C TC programs of `ebpf/` with `clang -target bpf` into
//! `$OUT_DIR/datapath.o`, which `basalt-sdn` embeds.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let src_dir = manifest.join("../ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("datapath.o");
    for file in ["datapath.c", "basalt.h"] {
        println!("cargo:rerun-if-changed={}", src_dir.join(file).display());
    }
    let clang = env::var("BASALT_CLANG").unwrap_or_else(|_| "clang".to_owned());
    // The multiarch include directory holds asm/ headers that linux/ headers use.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_owned());
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args([
            "-O2", "-g", "-mcpu=v3", "-target", "bpf", "-Wall", "-Werror",
        ])
        .arg(multiarch)
        .arg("-c")
        .arg(src_dir.join("datapath.c"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("could not run {clang} (install clang and libbpf-dev): {e}"));
    assert!(
        status.success(),
        "{clang} failed to compile ebpf/datapath.c"
    );
}
