//! `basalt vm migrate` as a user meets it without a cluster: its flags, and
//! a clear failure (no panic) when the control plane is unreachable. The
//! end-to-end migration is `daemon/tests/migration.rs`, which runs this
//! binary.

use std::process::Command;

const BASALT: &str = env!("CARGO_BIN_EXE_basalt");

#[test]
fn migrate_documents_its_flags() {
    let out = Command::new(BASALT)
        .args(["vm", "migrate", "--help"])
        .output()
        .expect("run basalt");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--to", "--wait", "--post-copy", "--timeout-seconds"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn migrate_without_a_control_plane_fails_with_a_message() {
    let out = Command::new(BASALT)
        .args([
            "--server",
            "127.0.0.1:1",
            "vm",
            "migrate",
            "web",
            "--to",
            "n2",
        ])
        .output()
        .expect("run basalt");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("basalt: error:"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
