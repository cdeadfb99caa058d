//! `replication`: Basalt's NBD server on a volume replicated
//! synchronously (protocol C) to a peer over loopback, against the same
//! server with one replica, through fio's nbd engine with the same
//! options; then a resync after the peer was away. Protocols A and B
//! (acknowledged once in the send buffer / received by the peer) are
//! measured beside C, each on its own pair of pools, and reported as
//! ratios against C and against one replica.
//! `BASALT_REPLICATION_SYSTEMS` (comma-separated: `single`, `c`, `a`,
//! `b`, `log`) runs only some systems (default: all).
//!
//! Cases: 4 KiB random write at queue depth 1 and 32 (overwrites of a
//! fully written volume), with one replica, two, and two with the
//! persistent dirty log an attached primary keeps (a bit set before each
//! write to a chunk not written in the last second or two): without an
//! activity log (bits synced only with a FLUSH, unsafe across a power
//! loss), with the default activity log (256 hot 4 MiB extents: the whole
//! 256 MiB volume stays hot, so only the first write to each extent
//! syncs), and with an 8-extent one (most random writes leave the hot
//! set: one `fdatasync` each, the worst case). The
//! loopback round trip is measured with a 4 KiB TCP ping-pong. Resync: the peer is cut, 64 MiB of scattered
//! chunks are written, the peer returns; bytes sent and throughput are
//! reported.
//!
//! Goals (issue 4): queue-depth-1 write latency with 2 replicas ≤ 1.5×
//! single-replica + loopback round trip; resync bytes ≤ dirty bytes
//! rounded to the chunk.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use basalt_sds::backend::FileBackend;
use basalt_sds::nbd::Server;
use basalt_sds::pool::{Pool, PoolOptions, Volume};
use basalt_sds::replication::dirty_log::{DEFAULT_ACTIVITY_EXTENTS, DirtyLog, LogKey};
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::{
    Op, PeerState, Protocol, Replicator, ReplicatorConfig, StaticFencer, SyncOptions,
};

use super::Options;
use crate::report::{Better, Goal, Report};

const SIZE: u64 = 256 << 20;
const DIR: &str = "/var/tmp/basalt-bench-replication";
const RUNTIME_S: u64 = 10;
const RAMP_S: u64 = 2;
const CHUNK: u64 = 64 << 10;

fn pool(dir: &std::path::Path, name: &str) -> anyhow::Result<(Pool, Volume)> {
    let backend = FileBackend::create(&dir.join(name), SIZE + SIZE / 4)?;
    let pool = Pool::create(Arc::new(backend), &PoolOptions::default())?;
    pool.create_volume("vol", SIZE)?;
    let vol = pool.open_volume("vol")?;
    let block: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8 + 1).collect();
    for i in 0..SIZE / block.len() as u64 {
        vol.write(i * block.len() as u64, &block, false)?;
    }
    pool.flush()?;
    Ok((pool, vol))
}

/// Mean (µs) and p99 (µs) write latency and IOPS of fio against `port`.
fn fio(port: u16, depth: u32) -> anyhow::Result<(f64, f64, f64)> {
    let out = std::process::Command::new("fio")
        .args([
            "--name=bench",
            "--output-format=json",
            "--time_based",
            &format!("--runtime={RUNTIME_S}"),
            &format!("--ramp_time={RAMP_S}"),
            &format!("--size={SIZE}"),
            "--rw=randwrite",
            "--bs=4k",
            &format!("--iodepth={depth}"),
            "--randrepeat=0",
            "--norandommap",
            "--ioengine=nbd",
            &format!("--uri=nbd://127.0.0.1:{port}/vol"),
        ])
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .with_context(|| format!("fio output: {text}"))?;
    let w = &json["jobs"][0]["write"];
    Ok((
        w["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
        w["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
        w["iops"].as_f64().unwrap_or(0.0),
    ))
}

/// Mean loopback round trip (µs) of a 4 KiB message and a 24-byte answer,
/// the shape of one replicated write and its ack.
fn loopback_rtt() -> anyhow::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; 4096];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&[0u8; 24])?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let msg = vec![1u8; 4096];
    let mut ack = [0u8; 24];
    let n = 20_000;
    for _ in 0..1000 {
        c.write_all(&msg)?;
        c.read_exact(&mut ack)?;
    }
    let t = Instant::now();
    for _ in 0..n {
        c.write_all(&msg)?;
        c.read_exact(&mut ack)?;
    }
    let rtt = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    drop(c);
    let _ = echo.join();
    Ok(rtt)
}

/// A primary (with a dirty log of some hot extents, or none), replicated
/// to a peer of its own, served over NBD.
struct Logged {
    port: u16,
    repl: Replicator,
    _replica: ReplicaServer,
}

fn logged_server(
    dir: &std::path::Path,
    rt: &tokio::runtime::Runtime,
    tag: &str,
    extents: Option<usize>,
    protocol: Protocol,
) -> anyhow::Result<Logged> {
    let (pool_p, vol) = pool(dir, &format!("{tag}.img"))?;
    let (pool_r, _) = pool(dir, &format!("{tag}-replica.img"))?;
    let replica = ReplicaServer::start(pool_r, "127.0.0.1:0".parse()?, 0)?;
    let log = match extents {
        Some(extents) => {
            let mut log = DirtyLog::open(
                &dir.join(format!("{tag}.dirty")),
                &LogKey {
                    volume_uid: vol.uid(),
                    peer: &replica.addr().to_string(),
                    chunk_size: CHUNK as u32,
                },
                || 2,
            )?;
            log.set_activity_extents(extents)?;
            Some(log)
        }
        None => None,
    };
    let repl = Replicator::start_logged(
        vol,
        ReplicatorConfig {
            peer: replica.addr(),
            epoch: 1,
            generation: 2,
            chunk_size: CHUNK,
            retry: Duration::from_millis(20),
            protocol,
        },
        Arc::new(StaticFencer { allow: true }),
        SyncOptions::default(),
        log,
    )?;
    wait_connected(&repl)?;
    let port = serve(rt, Server::with_replication(pool_p, vec![repl.clone()]))?;
    Ok(Logged {
        port,
        repl,
        _replica: replica,
    })
}

fn serve(rt: &tokio::runtime::Runtime, server: Server) -> anyhow::Result<u16> {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    rt.spawn(server.serve_tcp(listener));
    Ok(port)
}

fn wait_connected(r: &Replicator) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while r.status().state != PeerState::Connected {
        ensure!(
            Instant::now() < deadline,
            "peer never in sync: {:?}",
            r.status()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

pub fn run(_opts: &Options) -> anyhow::Result<Report> {
    ensure!(
        std::process::Command::new("fio")
            .arg("--version")
            .output()
            .is_ok(),
        "fio is not installed (scripts/install-deps)"
    );
    let dir = PathBuf::from(DIR);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!("replication: preparing two {SIZE}-byte volumes in {DIR}");
    let (single_pool, _) = pool(&dir, "single.img")?;
    let (primary_pool, primary_vol) = pool(&dir, "primary.img")?;
    let (replica_pool, _) = pool(&dir, "replica.img")?;
    // The replica's book on disk: back after the cut, it is still in sync
    // with the primary's stream and gets only the dirty chunks.
    let book = dir.join("replica.epochs");
    let replica =
        ReplicaServer::start_persistent(replica_pool.clone(), "127.0.0.1:0".parse()?, 0, &book)?;
    let peer: SocketAddr = replica.addr();
    let cfg = ReplicatorConfig {
        peer,
        epoch: 1,
        generation: 1,
        chunk_size: CHUNK,
        retry: Duration::from_millis(20),
        protocol: Default::default(),
    };
    let repl = Replicator::start(
        primary_vol.clone(),
        cfg,
        Arc::new(StaticFencer { allow: true }),
    )?;
    wait_connected(&repl)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let wanted = std::env::var("BASALT_REPLICATION_SYSTEMS")
        .unwrap_or_else(|_| "single,c,a,b,log".into())
        .to_lowercase();
    let wants = |s: &str| wanted.split(',').any(|w| w.trim() == s);
    // Protocols A and B, each on its own pair of pools (no dirty log, as
    // the protocol C pair), then the same as C with a dirty log (as
    // attached primaries keep), with and without its activity log.
    let mut logged = Vec::new();
    for (system, key, protocol) in [
        ("2 replicas, protocol A", "a", Protocol::A),
        ("2 replicas, protocol B", "b", Protocol::B),
    ] {
        if wants(key) {
            logged.push((system, logged_server(&dir, &rt, key, None, protocol)?));
        }
    }
    for (system, extents) in [
        ("2 replicas + dirty log, no AL", 0usize),
        ("2 replicas + dirty log", DEFAULT_ACTIVITY_EXTENTS),
        ("2 replicas + dirty log, AL 8", 8),
    ] {
        if wants("log") {
            let tag = format!("logged-{extents}");
            let server = logged_server(&dir, &rt, &tag, Some(extents), Protocol::C)?;
            logged.push((system, server));
        }
    }
    let single_port = serve(&rt, Server::new(single_pool))?;
    let repl_port = serve(
        &rt,
        Server::with_replication(primary_pool, vec![repl.clone()]),
    )?;

    let mut report = Report::new("replication");
    let rtt = loopback_rtt()?;
    eprintln!("replication: loopback 4 KiB round trip {rtt:.1} us");
    report.row("loopback", "tcp 4k ping-pong", "mean round trip", "us", rtt);
    let mut qd1 = (0.0, 0.0, 0.0);
    for depth in [1u32, 32] {
        let case = format!("4k randwrite qd{depth}");
        let systems = [
            ("1 replica", single_port, "single"),
            ("2 replicas", repl_port, "c"),
        ]
        .into_iter()
        .filter(|(_, _, key)| wants(key))
        .map(|(s, p, _)| (s, p))
        .chain(logged.iter().map(|(s, l)| (*s, l.port)));
        let mut iops_of = std::collections::HashMap::new();
        for (system, port) in systems {
            let (mean, p99, iops) = fio(port, depth)?;
            eprintln!(
                "replication: {case:<18} {system:<11} {iops:>10.0} IOPS {mean:>8.1} us mean {p99:>8.1} us p99"
            );
            iops_of.insert(system, iops);
            report.row(&case, system, "iops", "IO/s", iops);
            report.row(&case, system, "mean latency", "us", mean);
            report.row(&case, system, "p99 latency", "us", p99);
            if depth == 1 {
                match system {
                    "1 replica" => qd1.0 = mean,
                    "2 replicas" => qd1.1 = mean,
                    "2 replicas + dirty log" => qd1.2 = mean,
                    _ => {}
                }
            }
        }
        for system in ["2 replicas, protocol A", "2 replicas, protocol B"] {
            let Some(&iops) = iops_of.get(system) else {
                continue;
            };
            for (base, name) in [
                ("2 replicas", "IOPS vs protocol C"),
                ("1 replica", "IOPS vs 1 replica"),
            ] {
                if let Some(&b) = iops_of.get(base).filter(|&&b| b > 0.0) {
                    eprintln!("replication: {case:<18} {system}: {:.2}x {name}", iops / b);
                    report.row(&case, system, name, "x", iops / b);
                }
            }
        }
    }
    if qd1.0 > 0.0 && qd1.1 > 0.0 {
        report.goal(Goal::new(
            "qd1 write latency, 2 replicas vs 1.5× single + loopback RTT (us)",
            1.5 * qd1.0 + rtt,
            qd1.1,
            Better::Lower,
        ));
    }
    if qd1.0 > 0.0 && qd1.2 > 0.0 {
        report.goal(Goal::new(
            "qd1 write latency, 2 replicas + dirty log vs 1.5× single + loopback RTT (us)",
            1.5 * qd1.0 + rtt,
            qd1.2,
            Better::Lower,
        ));
    }
    for (system, l) in &logged {
        eprintln!(
            "replication: {system}: {} activity-log slot writes (fdatasync each)",
            l.repl.activity_writes()
        );
    }

    // Resync: cut the peer, dirty 1024 scattered chunks, bring it back.
    replica.stop();
    drop(replica);
    let data = vec![7u8; 4096];
    let mut dirty = std::collections::BTreeSet::new();
    for i in 0..1024u64 {
        let chunk = i * 2 % (SIZE / CHUNK);
        let off = chunk * CHUNK + 4096;
        repl.submit(
            Op::Write {
                offset: off,
                data: &data,
                fua: false,
            },
            || primary_vol.write(off, &data, false),
        )?;
        dirty.insert(chunk);
    }
    let before = repl.status().resync_bytes;
    let t = Instant::now();
    let _replica = ReplicaServer::start_persistent(replica_pool, peer, 0, &book)?;
    wait_connected(&repl)?;
    let secs = t.elapsed().as_secs_f64();
    let bytes = repl.status().resync_bytes - before;
    let dirty_bytes = dirty.len() as u64 * CHUNK;
    let mib_s = bytes as f64 / (1 << 20) as f64 / secs;
    eprintln!(
        "replication: resync {bytes} bytes for {} dirty chunks in {secs:.3} s ({mib_s:.0} MiB/s, including reconnect)",
        dirty.len()
    );
    report.row("resync", "2 replicas", "bytes", "B", bytes as f64);
    report.row("resync", "2 replicas", "throughput", "MiB/s", mib_s);
    report.goal(Goal::new(
        "resync bytes vs dirty chunks × chunk size",
        dirty_bytes as f64,
        bytes as f64,
        Better::Lower,
    ));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}
