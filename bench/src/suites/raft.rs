//! `raft`: replicated writes through Basalt's control plane against etcd.
//!
//! Both systems run three members on loopback with their default
//! durability (every acknowledged write fsynced on a quorum; Basalt by
//! group commit, etcd by its WAL). 1, 16 and 64 concurrent clients each
//! write new keys with 256-byte values for a fixed time, spread round-robin
//! over the three members, over gRPC (one HTTP/2 channel per member, shared
//! by the clients): Basalt through its admin API (`create` of an image
//! object whose four labels hold 4 × 64 bytes), etcd through `KV/Put` (messages
//! declared here by hand from etcd's public wire format). Reported:
//! writes/s, p50 and p99 latency, and Basalt's ratio to etcd.
//!
//! Needs release builds of `basaltd` next to this binary
//! (`cargo build --release -p basaltd -p basalt-bench`) and Debian's
//! `etcd-server` (scripts/install-deps). Settings: `BASALT_RAFT_SECONDS`
//! (per case, default 10), `BASALT_RAFT_DIR` (default
//! `/var/tmp/basalt-bench-raft`), `BASALT_BENCH_MEMBER_LOG` (the members'
//! `RUST_LOG`, default `warn`), `BASALT_RAFT_CLIENTS` (the client counts,
//! comma-separated, default `1,16,64`; e.g. `64` alone for profiling),
//! `BASALT_RAFT_KIND` (`image`, the default, or `node`),
//! `BASALT_RAFT_SYSTEMS` (`basalt,etcd` by default; one of them alone for
//! profiling), `BASALT_RAFT_MEMBER` (1 to 3: every write to that member
//! instead of spread over the three, to see what forwarding costs),
//! `BASALT_RAFT_CONFIG` (a config file every Basalt member
//! is started with, e.g. `[raft]` settings to compare).
//!
//! Images are plain stored data, as etcd's keys are: no controller on the
//! leader looks at them. Node objects (what the suite wrote before) also
//! go through the leader's lease controller, which looks at each changed
//! node once (decision 46; it used to scan every node on each round);
//! `BASALT_RAFT_KIND=node` measures that.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use basalt_api::{AdminClient, Image, ImageFormat, ImageSpec, Kind, Node, Object, ObjectMeta};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use super::Options;
use crate::report::{Better, Goal, Report};
use crate::stats::Samples;

const CLIENTS: [usize; 3] = [1, 16, 64];
const VALUE_BYTES: usize = 256;
const BASALT: &str = "basalt";
const ETCD: &str = "etcd";

/// etcd's `PutRequest` (etcdserverpb): key = 1, value = 2.
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// etcd's `PutResponse`; its fields are not needed (prost skips them).
#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

/// Child processes killed when dropped.
pub(super) struct Members(pub(super) Vec<Child>);

impl Drop for Members {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(super) fn spawn(program: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(program)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("BASALT_BENCH_MEMBER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// The measured outcome of one case.
#[derive(Debug)]
struct Measured {
    writes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs `clients` writers for `seconds`, each calling `write(client, seq)`.
async fn drive<F, Fut>(clients: usize, seconds: Duration, write: F) -> anyhow::Result<Measured>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let write = Arc::new(write);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (write, stop) = (Arc::clone(&write), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                write(client, seq).await?;
                latencies.push(start.elapsed());
                seq += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(seconds).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Samples::new();
    for task in tasks {
        for latency in task.await?? {
            all.record(latency);
        }
    }
    let count = all.len();
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Measured {
        writes_per_s: count as f64 / elapsed,
        p50_ms: all.quantile_ms(0.5),
        p99_ms: all.quantile_ms(0.99),
    })
}

fn labels() -> std::collections::BTreeMap<String, String> {
    (0..VALUE_BYTES / 64)
        .map(|i| (format!("v{i}"), "x".repeat(63)))
        .collect()
}

/// Three Basalt members started on loopback and formed into one cluster.
pub(super) struct Started {
    /// The member processes, by id - 1.
    pub(super) members: Members,
    /// A client of each member, by id - 1.
    pub(super) clients: Vec<AdminClient>,
    /// Each member's command line (a member restarts with the same one).
    pub(super) args: Vec<Vec<String>>,
}

/// Starts three Basalt members in `dir` and waits until all three vote.
pub(super) async fn start_basalt(dir: &Path, basaltd: &Path) -> anyhow::Result<Started> {
    let mut members = Members(Vec::new());
    let mut addresses = Vec::new();
    let mut all_args = Vec::new();
    for id in 1..=3u64 {
        let address = format!("127.0.0.1:{}", free_port()?);
        let mut args: Vec<String> = [
            "control",
            "--node-id",
            &id.to_string(),
            "--listen",
            &address,
            "--data-dir",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.push(dir.join(format!("basalt-{id}")).display().to_string());
        if let Some(config) = std::env::var_os("BASALT_RAFT_CONFIG") {
            args.push("--config".into());
            args.push(config.to_string_lossy().into_owned());
        }
        match addresses.first() {
            None => args.push("--bootstrap".into()),
            Some(seed) => args.extend(["--join".to_owned(), String::clone(seed)]),
        }
        members.0.push(spawn(
            basaltd,
            &args,
            &dir.join(format!("basalt-{id}.log")),
        )?);
        addresses.push(address);
        all_args.push(args);
    }
    let clients: Vec<AdminClient> = addresses
        .iter()
        .map(|a| AdminClient::connect_lazy(a))
        .collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let voters = match clients[0].list(Kind::Member).await {
            Ok(list) => list
                .objects
                .iter()
                .filter(|o| matches!(o, Object::Member(m) if m.voter))
                .count(),
            Err(_) => 0,
        };
        if voters == 3 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the Basalt members did not form a 3-voter cluster in 60 s (logs in {})",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Started {
        members,
        clients,
        args: all_args,
    })
}

async fn start_etcd(dir: &Path) -> anyhow::Result<(Members, Vec<Channel>)> {
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Members(Vec::new());
    for (i, (client, peer)) in ports.iter().enumerate() {
        let args: Vec<String> = vec![
            "--name".into(),
            format!("e{i}"),
            "--data-dir".into(),
            dir.join(format!("etcd-{i}")).display().to_string(),
            "--listen-client-urls".into(),
            format!("http://127.0.0.1:{client}"),
            "--advertise-client-urls".into(),
            format!("http://127.0.0.1:{client}"),
            "--listen-peer-urls".into(),
            format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://127.0.0.1:{peer}"),
            "--initial-cluster".into(),
            cluster.clone(),
            "--initial-cluster-state".into(),
            "new".into(),
            "--initial-cluster-token".into(),
            "basalt-bench".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        members.0.push(spawn(
            Path::new("etcd"),
            &args,
            &dir.join(format!("etcd-{i}.log")),
        )?);
    }
    let mut channels = Vec::new();
    for (client, _) in &ports {
        channels.push(Channel::from_shared(format!("http://127.0.0.1:{client}"))?.connect_lazy());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while etcd_put(&channels[0], b"ready".to_vec(), vec![0; 8])
        .await
        .is_err()
    {
        ensure!(
            Instant::now() < deadline,
            "etcd did not accept a write in 60 s (logs in {})",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((members, channels))
}

async fn etcd_put(channel: &Channel, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<()> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.context("etcd channel")?;
    let codec = tonic_prost::ProstCodec::<PutRequest, PutResponse>::default();
    grpc.unary(
        tonic::Request::new(PutRequest { key, value }),
        PathAndQuery::from_static("/etcdserverpb.KV/Put"),
        codec,
    )
    .await
    .context("etcd put")?;
    Ok(())
}

pub fn run(_opts: &Options) -> anyhow::Result<Report> {
    ensure!(
        Command::new("etcd").arg("--version").output().is_ok(),
        "etcd is not installed (scripts/install-deps: etcd-server)"
    );
    let basaltd = std::env::current_exe()?.with_file_name("basaltd");
    if !basaltd.is_file() {
        bail!(
            "no basaltd at {}: cargo build --release -p basaltd -p basalt-bench",
            basaltd.display()
        );
    }
    let seconds = Duration::from_secs(
        std::env::var("BASALT_RAFT_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    let dir = PathBuf::from(
        std::env::var("BASALT_RAFT_DIR").unwrap_or_else(|_| "/var/tmp/basalt-bench-raft".into()),
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let counts: Vec<usize> = match std::env::var("BASALT_RAFT_CLIENTS") {
        Ok(list) => list
            .split(',')
            .map(|n| n.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .context("BASALT_RAFT_CLIENTS: comma-separated client counts")?,
        Err(_) => CLIENTS.to_vec(),
    };
    ensure!(
        !counts.is_empty() && !counts.contains(&0),
        "BASALT_RAFT_CLIENTS: at least one count, each at least 1"
    );
    let nodes = match std::env::var("BASALT_RAFT_KIND").as_deref() {
        Err(_) | Ok("image") => false,
        Ok("node") => true,
        Ok(other) => bail!("BASALT_RAFT_KIND: image or node, not {other:?}"),
    };
    // BASALT_RAFT_MEMBER=N sends every write to member N (1 to 3) instead
    // of spreading them, to see what forwarding costs (for profiling).
    let only: Option<usize> = match std::env::var("BASALT_RAFT_MEMBER") {
        Ok(n) => {
            let n: usize = n.parse().context("BASALT_RAFT_MEMBER: 1, 2 or 3")?;
            ensure!(
                (1..=3).contains(&n),
                "BASALT_RAFT_MEMBER: 1, 2 or 3, not {n}"
            );
            Some(n - 1)
        }
        Err(_) => None,
    };
    let pick = move |client: usize, seq: u64, members: usize| {
        only.unwrap_or((client + seq as usize) % members)
    };
    let systems = std::env::var("BASALT_RAFT_SYSTEMS").unwrap_or_else(|_| "basalt,etcd".into());
    let systems: Vec<&str> = systems.split(',').map(str::trim).collect();
    ensure!(
        !systems.is_empty() && systems.iter().all(|s| [BASALT, ETCD].contains(s)),
        "BASALT_RAFT_SYSTEMS: basalt, etcd or both, comma-separated"
    );
    let mut results: Vec<(usize, &str, Measured)> = Vec::new();
    runtime.block_on(async {
        if !systems.contains(&BASALT) {
            return anyhow::Ok(());
        }
        eprintln!("raft: starting 3 Basalt members in {}", dir.display());
        let Started {
            members: basalt_members,
            clients: admins,
            ..
        } = start_basalt(&dir, &basaltd).await?;
        let admins = Arc::new(admins);
        for &clients in &counts {
            let admins = Arc::clone(&admins);
            let labels = labels();
            let measured = drive(clients, seconds, move |client, seq| {
                let admin = admins[pick(client, seq, admins.len())].clone();
                let mut meta = ObjectMeta::named(format!("k{clients}-{client}-{seq}"));
                meta.labels = labels.clone();
                let object = if nodes {
                    let mut node = Node {
                        meta,
                        ..Node::default()
                    };
                    node.spec.address = "127.0.0.1:1".into();
                    Object::Node(node)
                } else {
                    Object::Image(Image {
                        meta,
                        spec: ImageSpec {
                            source: "/var/lib/basalt/images/bench.raw".into(),
                            format: ImageFormat::Raw,
                        },
                        ..Image::default()
                    })
                };
                async move {
                    admin.create(object).await?;
                    Ok(())
                }
            })
            .await?;
            eprintln!("raft: basalt, {clients} clients: {measured:?}");
            results.push((clients, BASALT, measured));
        }
        drop(basalt_members);
        anyhow::Ok(())
    })?;
    runtime.block_on(async {
        if !systems.contains(&ETCD) {
            return anyhow::Ok(());
        }
        eprintln!("raft: starting 3 etcd members in {}", dir.display());
        let (etcd_members, channels) = start_etcd(&dir).await?;
        let channels = Arc::new(channels);
        for &clients in &counts {
            let channels = Arc::clone(&channels);
            let measured = drive(clients, seconds, move |client, seq| {
                let channel = channels[pick(client, seq, channels.len())].clone();
                let key = format!("k{clients}-{client}-{seq}").into_bytes();
                async move { etcd_put(&channel, key, vec![b'x'; VALUE_BYTES]).await }
            })
            .await?;
            eprintln!("raft: etcd, {clients} clients: {measured:?}");
            results.push((clients, ETCD, measured));
        }
        drop(etcd_members);
        anyhow::Ok(())
    })?;

    let mut report = Report::new("raft");
    for (clients, system, m) in &results {
        let case = format!("{clients} clients");
        report.row(&case, system, "writes", "writes/s", m.writes_per_s);
        report.row(&case, system, "p50 latency", "ms", m.p50_ms);
        report.row(&case, system, "p99 latency", "ms", m.p99_ms);
    }
    let find = |clients: usize, system: &str| {
        results
            .iter()
            .find(|(c, s, _)| *c == clients && *s == system)
            .map(|(_, _, m)| m)
    };
    for &clients in &counts {
        if let (Some(b), Some(e)) = (find(clients, BASALT), find(clients, ETCD)) {
            eprintln!(
                "raft: {clients} clients: Basalt/etcd writes/s {:.2}x, p99 {:.2}x",
                b.writes_per_s / e.writes_per_s,
                b.p99_ms / e.p99_ms
            );
        }
    }
    if let (Some(b), Some(e)) = (find(64, BASALT), find(64, ETCD)) {
        report.goal(Goal::new(
            "64 clients: writes/s ≥ 1.5× etcd",
            1.5 * e.writes_per_s,
            b.writes_per_s,
            Better::Higher,
        ));
        report.goal(Goal::new(
            "64 clients: p99 ms ≤ etcd",
            e.p99_ms,
            b.p99_ms,
            Better::Lower,
        ));
    }
    Ok(report)
}
