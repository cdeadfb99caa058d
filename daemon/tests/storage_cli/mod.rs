//! What the storage process's end-to-end tests share: running `basaltd`
//! subcommands, free loopback ports, and `basaltd storage serve` started
//! and listening.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Output};
use std::time::Duration;

use basalt_testkit::Prefix;
use basalt_testkit::process::{Process, ProcessSpec};

const BASALTD: &str = env!("CARGO_BIN_EXE_basaltd");

/// Whether the test runs as root (the storage tests skip otherwise).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `basaltd ARGS`.
pub fn run(args: &[&str]) -> Output {
    Command::new(BASALTD)
        .args(args)
        .output()
        .expect("run basaltd")
}

/// Runs `basaltd ARGS`, which must succeed; returns its standard output.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "basaltd {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loopback address with a port nobody listens on.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, basalt_testkit::free_port()))
}

/// Starts `basaltd storage serve` on `pool` with NBD on `nbd` (plus
/// `extra` flags) and waits until it listens.
pub fn serve(
    prefix: &Prefix,
    name: &str,
    pool: &str,
    nbd: SocketAddr,
    extra: &[String],
) -> Process {
    let mut args = vec![
        "storage".to_owned(),
        "serve".into(),
        "--pool".into(),
        pool.into(),
        "--listen".into(),
        nbd.to_string(),
    ];
    args.extend_from_slice(extra);
    let spec = ProcessSpec::new(name, BASALTD)
        .args(args)
        .env("RUST_LOG", "info");
    let mut p = Process::start(prefix, spec).expect("start basaltd storage serve");
    p.wait_for_tcp(nbd, None, Duration::from_secs(30))
        .expect("NBD listening");
    p
}

/// Creates pools `a.img` and `b.img` of `pool_size` under the test's
/// directory, each holding volume `vol` of `volume_size`; returns their
/// paths.
pub fn two_pools(prefix: &Prefix, pool_size: &str, volume_size: &str) -> (String, String) {
    let [a, b] = ["a.img", "b.img"].map(|name| {
        let path = prefix.dir().join(name).to_str().expect("path").to_owned();
        ok(&[
            "storage", "pool", "create", "--path", &path, "--size", pool_size,
        ]);
        ok(&[
            "storage",
            "volume",
            "create",
            "--pool",
            &path,
            "vol",
            "--size",
            volume_size,
        ]);
        path
    });
    (a, b)
}
