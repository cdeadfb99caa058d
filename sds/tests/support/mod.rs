//! A pool on a temporary file served by Basalt's NBD server on a loopback
//! TCP port and a Unix socket, for tests that drive it with real clients.

#![allow(dead_code, reason = "each test file uses part of the harness")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use basalt_sds::backend::FileBackend;
use basalt_sds::nbd::Server;
use basalt_sds::pool::{Pool, PoolOptions};

pub const MIB: u64 = 1 << 20;

/// A running server over a fresh pool.
pub struct TestServer {
    pub pool: Pool,
    pub port: u16,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

impl TestServer {
    /// A `pool_size` pool with `volumes` created, served.
    pub fn start(pool_size: u64, volumes: &[(&str, u64)]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend =
            FileBackend::create(&dir.path().join("pool.img"), pool_size).expect("pool file");
        let pool = Pool::create(Arc::new(backend), &PoolOptions::default()).expect("pool");
        for (name, size) in volumes {
            pool.create_volume(name, *size).expect("volume");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let socket = dir.path().join("nbd.sock");
        let server = Server::new(pool.clone());
        let (port, unix) = rt.block_on(async {
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = tcp.local_addr().expect("addr").port();
            let unix = Server::bind_unix(&socket).expect("unix socket");
            (port, (tcp, unix))
        });
        let (tcp, unix_listener) = unix;
        rt.spawn(server.clone().serve_tcp(tcp));
        rt.spawn(server.serve_unix(unix_listener));
        let _ = port;
        TestServer {
            pool,
            port,
            socket,
            dir,
            _rt: rt,
        }
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Whether a program is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs a command, returning its output; panics with the output if it
/// failed.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command and returns its exit code.
pub fn status(program: &str, args: &[&str]) -> i32 {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
        .status
        .code()
        .unwrap_or(-1)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A raw file of `size` bytes: random data in the first 4 MiB, a
/// pattern at 8 MiB, the rest sparse.
pub fn sample_image(path: &Path, size: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let mut data = vec![0u8; (4 * MIB) as usize];
    fill_random(&mut data, 0x1234_5678_9abc_def1);
    f.write_all(&data).expect("write image");
    f.seek(SeekFrom::Start(8 * MIB)).expect("seek");
    f.write_all(&vec![0x5a; MIB as usize]).expect("write image");
}

/// Whether the real NBD clients are installed; tests skip (loudly)
/// without them.
pub fn clients_present(programs: &[&str]) -> bool {
    let missing: Vec<_> = programs.iter().filter(|p| !have(p)).collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!("skipping: {missing:?} not installed (scripts/install-deps installs them)");
    false
}

/// A raw file of `size` bytes of pseudo-random data (no zero blocks, so
/// copies of it are all data writes).
pub fn random_image(path: &Path, size: u64) {
    let mut data = vec![0u8; size as usize];
    fill_random(&mut data, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(path, data).expect("write image");
}

/// Fills `data` (a multiple of 8 bytes) with xorshift output from `seed`.
fn fill_random(data: &mut [u8], seed: u64) {
    let mut x = seed;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
}
