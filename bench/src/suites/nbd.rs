//! `nbd`: Basalt's NBD server (one replica, thin pool, fully allocated
//! volume) against `qemu-nbd` and nbdkit's file plugin serving a raw file
//! on the same filesystem, nbdkit `null` (the protocol ceiling) and the
//! local file with O_DIRECT (the disk limit), all measured with the same
//! fio options through fio's nbd engine (libaio for the local file).
//!
//! Cases: 4 KiB random write and read at queue depth 1 and 32, 1 MiB
//! sequential write and read at queue depth 8. Every server writes through
//! the page cache (their defaults), and every data set is written in full
//! before the runs, so all cases measure overwrites.
//!
//! Goals (issue 4): queue depth 1 IOPS ≥ 1.0× the better reference server
//! and latency ≤ local + nbdkit-null + 15 µs; queue depth 32 and
//! sequential ≥ 1.2× the better reference server.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use basalt_sds::backend::FileBackend;
use basalt_sds::nbd::Server;
use basalt_sds::pool::{DEFAULT_CHUNK_SIZE, Pool, PoolOptions};

use super::Options;
use crate::report::{Better, Goal, Report};

const SIZE: u64 = 1 << 30;
const DIR: &str = "/var/tmp/basalt-bench-nbd";
const RUNTIME_S: u64 = 10;
const RAMP_S: u64 = 2;

const BASALT: &str = "basalt";
const QEMU_NBD: &str = "qemu-nbd";
const NBDKIT_FILE: &str = "nbdkit-file";
const NBDKIT_NULL: &str = "nbdkit-null";
const LOCAL: &str = "local-odirect";

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
}

const CASES: &[Case] = &[
    Case {
        name: "4k randwrite qd1",
        rw: "randwrite",
        bs: "4k",
        depth: 1,
    },
    Case {
        name: "4k randread qd1",
        rw: "randread",
        bs: "4k",
        depth: 1,
    },
    Case {
        name: "4k randwrite qd32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
    },
    Case {
        name: "4k randread qd32",
        rw: "randread",
        bs: "4k",
        depth: 32,
    },
    Case {
        name: "1M write qd8",
        rw: "write",
        bs: "1M",
        depth: 8,
    },
    Case {
        name: "1M read qd8",
        rw: "read",
        bs: "1M",
        depth: 8,
    },
];

/// One fio result.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    iops: f64,
    mib_s: f64,
    lat_us: f64,
    p99_us: f64,
}

/// A server process killed on drop.
struct Child2(Child);

impl Drop for Child2 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(
            Instant::now() < deadline,
            "server on port {port} never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn spawn(program: &str, args: &[&str]) -> anyhow::Result<Child2> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    Ok(Child2(child))
}

/// Fills `path` (a raw file of `SIZE` bytes) with non-zero data.
/// Writes the raw file the other servers serve in pieces of the pool's
/// chunk size, as Basalt's pool is filled (one write per chunk): the
/// page cache then holds both files in folios of one size. A file filled
/// in bigger writes is held in bigger folios, and every 4 KiB write into
/// one walks all of its blocks (ext4), which made the reference servers'
/// small writes several times slower than the same server's on a file
/// filled like the pool (decision 96).
fn fill_file(path: &Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path)?;
    let block = pattern_block();
    let piece = DEFAULT_CHUNK_SIZE as usize;
    for _ in 0..SIZE / block.len() as u64 {
        for part in block.chunks(piece) {
            f.write_all(part)?;
        }
    }
    f.sync_all()?;
    Ok(())
}

fn pattern_block() -> Vec<u8> {
    (0..(1 << 20)).map(|i: u32| (i % 251) as u8 + 1).collect()
}

fn fio(case: &Case, target: &[String]) -> anyhow::Result<Measured> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bench",
        "--output-format=json",
        "--time_based",
        &format!("--runtime={RUNTIME_S}"),
        &format!("--ramp_time={RAMP_S}"),
        &format!("--size={SIZE}"),
        &format!("--rw={}", case.rw),
        &format!("--bs={}", case.bs),
        &format!("--iodepth={}", case.depth),
        "--randrepeat=0",
        "--norandommap",
    ]);
    cmd.args(target);
    // BASALT_NBD_FIO_EXTRA="--numjobs=2 --group_reporting" adds options to
    // every run (the same for every system), to look at the client's
    // ceiling.
    if let Ok(extra) = std::env::var("BASALT_NBD_FIO_EXTRA") {
        cmd.args(extra.split_whitespace());
    }
    let out = cmd.output().context("running fio")?;
    if !out.status.success() {
        bail!(
            "fio {:?} failed: {}",
            target,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The nbd engine prints a line before the JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .with_context(|| format!("fio output: {text}"))?;
    let job = &json["jobs"][0];
    let side = if case.rw.contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    Ok(Measured {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        mib_s: side["bw"].as_f64().unwrap_or(0.0) / 1024.0,
        lat_us: side["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
        p99_us: side["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
    })
}

fn nbd_target(port: u16, export: &str) -> Vec<String> {
    vec![
        "--ioengine=nbd".to_owned(),
        format!("--uri=nbd://127.0.0.1:{port}/{export}"),
    ]
}

pub fn run(_opts: &Options) -> anyhow::Result<Report> {
    for tool in ["fio", "qemu-nbd", "nbdkit"] {
        ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} is not installed (scripts/install-deps)"
        );
    }
    let dir = PathBuf::from(DIR);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let raw = dir.join("raw.img");
    let pool_path = dir.join("pool.img");
    eprintln!("nbd: preparing a {SIZE}-byte raw file and a Basalt pool in {DIR}");
    fill_file(&raw)?;

    // Basalt, in this process: a pool with one fully written volume.
    let backend = FileBackend::create(&pool_path, SIZE + SIZE / 8)?;
    let pool = Pool::create(Arc::new(backend), &PoolOptions::default())?;
    pool.create_volume("vol", SIZE)?;
    let vol = pool.open_volume("vol")?;
    let block = pattern_block();
    for i in 0..SIZE / block.len() as u64 {
        vol.write(i * block.len() as u64, &block, false)?;
    }
    pool.flush()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let basalt_port = free_port()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", basalt_port)))?;
    rt.spawn(Server::new(pool.clone()).serve_tcp(listener));

    let raw_s = raw.to_str().context("path")?.to_owned();
    let mut report = Report::new("nbd");
    let mut results: Vec<(&'static str, &'static str, Measured)> = Vec::new();
    // BASALT_NBD_SYSTEMS=basalt,nbdkit-file limits a run to some systems.
    let only = std::env::var("BASALT_NBD_SYSTEMS").ok();
    let systems: Vec<&'static str> = [BASALT, QEMU_NBD, NBDKIT_FILE, NBDKIT_NULL, LOCAL]
        .into_iter()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x == *s))
        })
        .collect();
    // BASALT_NBD_CASES="4k randread qd32,1M read qd8" limits a run to some
    // cases (for profiling one of them).
    let only_cases = std::env::var("BASALT_NBD_CASES").ok();
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| {
            only_cases
                .as_deref()
                .is_none_or(|o| o.split(',').any(|x| x.trim() == c.name))
        })
        .collect();
    for &case in &cases {
        for &system in &systems {
            let port = free_port()?;
            let ps = port.to_string();
            let (_server, target) = match system {
                BASALT => (None, nbd_target(basalt_port, "vol")),
                QEMU_NBD => {
                    let c = spawn(
                        "qemu-nbd",
                        &[
                            "-f",
                            "raw",
                            "-t",
                            "-e",
                            "8",
                            "-x",
                            "vol",
                            "-b",
                            "127.0.0.1",
                            "-p",
                            &ps,
                            &raw_s,
                        ],
                    )?;
                    wait_port(port)?;
                    (Some(c), nbd_target(port, "vol"))
                }
                NBDKIT_FILE => {
                    let file = format!("file={raw_s}");
                    let c = spawn(
                        "nbdkit",
                        &["-f", "-i", "127.0.0.1", "-p", &ps, "file", &file],
                    )?;
                    wait_port(port)?;
                    (Some(c), nbd_target(port, ""))
                }
                NBDKIT_NULL => {
                    let size = format!("size={SIZE}");
                    let c = spawn(
                        "nbdkit",
                        &["-f", "-i", "127.0.0.1", "-p", &ps, "null", &size],
                    )?;
                    wait_port(port)?;
                    (Some(c), nbd_target(port, ""))
                }
                _ => (
                    None,
                    vec![
                        "--ioengine=libaio".to_owned(),
                        "--direct=1".to_owned(),
                        format!("--filename={raw_s}"),
                    ],
                ),
            };
            // Every system starts with no dirty page of the one before:
            // the kernel writing those back during a run (and a write to
            // a page under writeback waiting for it) would cost whoever
            // runs next.
            nix::unistd::sync();
            let m =
                fio(case, &target).with_context(|| format!("{} against {system}", case.name))?;
            eprintln!(
                "nbd: {:<18} {:<14} {:>10.0} IOPS {:>8.1} MiB/s {:>8.1} us mean {:>8.1} us p99",
                case.name, system, m.iops, m.mib_s, m.lat_us, m.p99_us
            );
            report.row(case.name, system, "iops", "IO/s", m.iops);
            report.row(case.name, system, "bandwidth", "MiB/s", m.mib_s);
            report.row(case.name, system, "mean latency", "us", m.lat_us);
            report.row(case.name, system, "p99 latency", "us", m.p99_us);
            results.push((case.name, system, m));
        }
    }
    let get = |case: &str, system: &str| {
        results
            .iter()
            .find(|(c, s, _)| *c == case && *s == system)
            .map(|r| r.2)
            .unwrap_or_default()
    };
    for &case in &cases {
        let better = get(case.name, QEMU_NBD)
            .iops
            .max(get(case.name, NBDKIT_FILE).iops);
        let factor = if case.depth == 1 { 1.0 } else { 1.2 };
        report.goal(Goal::new(
            format!("{} IOPS vs {factor}× better reference", case.name),
            better * factor,
            get(case.name, BASALT).iops,
            Better::Higher,
        ));
        if case.depth == 1 {
            let ceiling = get(case.name, LOCAL).lat_us + get(case.name, NBDKIT_NULL).lat_us + 15.0;
            report.goal(Goal::new(
                format!("{} mean latency vs local + null + 15 us", case.name),
                ceiling,
                get(case.name, BASALT).lat_us,
                Better::Lower,
            ));
        }
    }
    pool.verify()?;
    rt.shutdown_background();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}
