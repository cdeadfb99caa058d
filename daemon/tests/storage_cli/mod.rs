//! What the storage process's end-to-end tests share: running `basaltd`
//! subcommands, free loopback ports, and `basaltd storage serve` started
//! and listening, the logs they write, and checks with `qemu-io` and
//! `qemu-img` on their exports.
//!
//! Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use basalt_api::StorageClient;
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
///
/// The port is below the kernel's ephemeral range (32768 and up by
/// default), so no outgoing connection's source port and no other
/// `bind(0)` takes it between this check and the child process binding
/// it (the "address already in use" seen when a port from `bind(0)` was
/// handed to a child); it is picked at random and checked free.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mixed = seed
            .wrapping_add(n.wrapping_mul(2_654_435_761))
            .rotate_left(7);
        let port = u16::try_from(LOW + mixed % SPAN).expect("below 32768");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
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

/// `p`'s log from byte `from` on, without terminal colour escapes.
pub fn plain_logs(p: &Process, from: usize) -> String {
    let logs = p.logs();
    let mut out = String::new();
    let mut chars = logs.get(from..).unwrap_or("").chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits up to `timeout` for a line containing `needle` in `p`'s log
/// after byte `from`; returns the first such line (without colours).
pub fn wait_log(p: &Process, from: usize, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let logs = plain_logs(p, from);
        if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{} never logged {needle:?}:\n{}",
            p.name(),
            p.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The number after `name=` in a log line.
pub fn field(line: &str, name: &str) -> u64 {
    let key = format!("{name}=");
    let at = line
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {line}"))
        + key.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {line}"))
}

/// `qemu-img ARGS`, which must succeed (the message names `what`).
pub fn qemu_img(what: &str, args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "{what}: qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of volume `vol` on two exports: identical contents.
pub fn assert_same(a: SocketAddr, b: SocketAddr) {
    let (a, b) = (format!("nbd://{a}/vol"), format!("nbd://{b}/vol"));
    qemu_img(
        "the copies differ",
        &["compare", "-f", "raw", "-F", "raw", &a, &b],
    );
}

/// `qemu-io` on volume `vol` of the export (read-only when asked);
/// whether every command succeeded, and the output.
pub fn qemu_io(nbd: SocketAddr, read_only: bool, command: &str) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    if read_only {
        cmd.arg("-r");
    }
    let out = cmd
        .args(["-f", "raw", &format!("nbd://{nbd}/vol"), "-c", command])
        .output()
        .expect("qemu-io runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed =
        !out.status.success() || text.contains("failed") || text.contains("Pattern verification");
    (!failed, text)
}

/// Whether `program` is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One `basaltd storage serve` on loopback with its own 256 MiB pool:
/// NBD, replica listener and local socket, as a node agent drives it.
pub struct LocalStorage {
    /// The storage process.
    pub process: Process,
    /// Its NBD address.
    pub nbd: SocketAddr,
    /// Its replica listener.
    pub repl: SocketAddr,
    /// Its local API socket.
    pub socket: PathBuf,
    /// A client of its local API.
    pub api: StorageClient,
    /// Its pool's path.
    pub pool: PathBuf,
}

impl LocalStorage {
    /// Creates the pool `NAME.img` and starts the process (plus `extra`
    /// flags); returns once NBD listens and the local socket exists.
    pub fn start(prefix: &Prefix, name: &str, extra: &[&str]) -> LocalStorage {
        let pool = prefix.dir().join(format!("{name}.img"));
        let out = Command::new(BASALTD)
            .args(["storage", "pool", "create", "--size", "256M", "--path"])
            .arg(&pool)
            .output()
            .expect("basaltd runs");
        assert!(out.status.success(), "{out:?}");
        let (nbd, repl) = (free_addr(), free_addr());
        let socket = prefix.dir().join(format!("{name}.sock"));
        let spec = ProcessSpec::new(name, BASALTD)
            .args(["storage", "serve", "--listen", &nbd.to_string()])
            .args(["--replica-listen", &repl.to_string()])
            .arg("--pool")
            .arg(&pool)
            .arg("--local-socket")
            .arg(&socket)
            .args(extra)
            .env("RUST_LOG", "info");
        let mut process = Process::start(prefix, spec).expect("start storage");
        process
            .wait_for_tcp(nbd, None, Duration::from_secs(30))
            .expect("NBD listening");
        wait_socket(&socket, &process);
        let api = StorageClient::connect_unix(&socket).expect("client");
        LocalStorage {
            process,
            nbd,
            repl,
            socket,
            api,
            pool,
        }
    }

    /// Where the process keeps its volumes' attachments
    /// (`POOL.attachments`).
    pub fn attachments_file(&self) -> PathBuf {
        attachments_file(&self.pool)
    }
}

/// The attachments file of the pool at `pool` (`POOL.attachments`).
pub fn attachments_file(pool: &Path) -> PathBuf {
    let mut file = pool.as_os_str().to_owned();
    file.push(".attachments");
    PathBuf::from(file)
}

/// Waits up to 30 s for `process` to create its local socket.
pub fn wait_socket(socket: &Path, process: &Process) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no local socket: {}",
            process.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
