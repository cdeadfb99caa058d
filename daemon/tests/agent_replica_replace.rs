//! A lost replica is replaced on a third node and filled by a full sync
//! (decision 43), with real storage processes (root, namespaces): a
//! control plane on namespace node `cp` with a short
//! `nodes.replica_replace_after_ms`, and on nodes `a`, `b` and `c`
//! `basaltd storage serve --replica-listen` and `basaltd agent --compute
//! sim` (the simulated hypervisor never opens the disk; the test writes
//! it over NBD as a guest would).
//!
//! The VM's disk has 2 replicas on `a` (its node, primary) and `b`
//! (secondary). A pattern written through `a`'s export is on `b`. Then
//! `b`'s agent and storage process are killed with SIGKILL: once its
//! lease ran out and the delay passed, the placement names `c` in `b`'s
//! place with the same node and epoch; `c`'s agent attaches an empty
//! secondary, `a`'s agent gives its primary `c` as the peer instead of
//! `b`, and the primary's full sync fills `c`: the pattern is read back
//! from `c`'s export, `c` refuses NBD writes (a secondary), and a write
//! acknowledged by `a` afterwards is on `c` at once (protocol C).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use basalt_agent::storage::disk_volume;
use basalt_api::{
    AdminClient, Disk, JoinToken, KernelBoot, Kind, Object, ObjectMeta, Placement,
    ReplicaPeerState, StorageClient, Vm, VmSpec,
};
use basalt_testkit::nbd_client::NbdClient;
use basalt_testkit::{Fabric, Node, Prefix, Process, ProcessSpec, wait};

const BASALTD: &str = env!("CARGO_BIN_EXE_basaltd");
const DEADLINE: Duration = Duration::from_secs(120);
const CONTROL_PORT: u16 = 7400;
const REPLICA_PORT: u16 = 7789;
const NBD: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10809);
/// Short leases and a short delay so the replacement takes seconds.
const CONFIG: &str = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 3000\ncontroller_period_ms = 200\nreplica_replace_after_ms = 3000\n";
const DISK_BYTES: u64 = 16 << 20;
const PATTERN_AT: u64 = 1 << 20;
const PATTERN_BLOCKS: u64 = 64;

/// 4 KiB block `i` of pattern `seed`: its number, then a fill byte.
fn pattern_block(seed: u8, i: u64) -> Vec<u8> {
    let mut block = vec![((i + u64::from(seed)) % 251) as u8 + 1; 4096];
    block[..8].copy_from_slice(&i.to_le_bytes());
    block
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PATTERN_BLOCKS)
        .flat_map(|i| pattern_block(seed, i))
        .collect()
}

/// Writes pattern `seed` at `at` through `node`'s NBD export, flushed.
fn write_pattern(node: &Node, export: &str, at: u64, seed: u8) {
    let export = export.to_owned();
    node.run_in(move || {
        let mut client = NbdClient::connect(NBD, &export).expect("nbd");
        for i in 0..PATTERN_BLOCKS {
            client
                .write(at + i * 4096, &pattern_block(seed, i))
                .expect("write the pattern");
        }
        client.flush().expect("flush");
    })
    .expect("run in the node");
}

/// Reads `len` bytes at `offset` of `export` from the NBD server inside
/// `node`.
fn read_export(node: &Node, export: &str, offset: u64, len: usize) -> Vec<u8> {
    let export = export.to_owned();
    node.run_in(move || {
        let mut client = NbdClient::connect(NBD, &export).expect("nbd");
        let mut buf = vec![0u8; len];
        client.read(offset, &mut buf).expect("read");
        buf
    })
    .expect("run in the node")
}

fn create_pool(dir: &Path, node: &str) -> PathBuf {
    let pool = dir.join(format!("pool-{node}.img"));
    let out = Command::new(BASALTD)
        .args(["storage", "pool", "create", "--size", "256M", "--path"])
        .arg(&pool)
        .output()
        .expect("basaltd runs");
    assert!(out.status.success(), "{out:?}");
    pool
}

fn storage_spec(prefix: &Prefix, node: &Node, pool: &Path, socket: &Path) -> ProcessSpec {
    ProcessSpec::new(format!("storage-{}", node.name()), BASALTD)
        .args(["storage", "serve", "--listen", &NBD.to_string(), "--pool"])
        .arg(pool)
        .arg("--local-socket")
        .arg(socket)
        .args([
            "--replica-listen",
            &format!("{}:{REPLICA_PORT}", node.addr()),
        ])
        .env("RUST_LOG", "info")
        .netns(node)
        .cwd(prefix.dir())
}

/// How `volume`'s primary on `client`'s process sees its peer at `peer`.
async fn peer_state(
    client: &StorageClient,
    volume: &str,
    peer: &str,
) -> Option<(ReplicaPeerState, u64)> {
    client.status().await.ok().and_then(|s| {
        s.replicas
            .into_iter()
            .find(|r| r.volume == volume && r.peer == peer)
            .map(|r| (r.state, r.dirty_chunks))
    })
}

async fn placement(admin: &AdminClient) -> Option<Placement> {
    match admin.get(Kind::Placement, "db").await {
        Ok(Object::Placement(p)) => Some(p),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replica_is_replaced_on_a_third_node_and_fully_synced() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let dir = prefix.dir().to_path_buf();
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let a = fabric.add_node("a").expect("node a");
    let b = fabric.add_node("b").expect("node b");
    let c = fabric.add_node("c").expect("node c");
    let cp = fabric.add_node("cp").expect("node cp");

    let mut storages = Vec::new();
    let mut sockets = Vec::new();
    for node in [&a, &b, &c] {
        let pool = create_pool(&dir, node.name());
        let socket = dir.join(format!("storage-{}.sock", node.name()));
        let mut storage =
            Process::start(&prefix, storage_spec(&prefix, node, &pool, &socket)).expect("storage");
        storage
            .wait_for_tcp(NBD, Some(node), Duration::from_secs(30))
            .expect("storage listening");
        storages.push(storage);
        sockets.push(socket);
    }

    let config = dir.join("control.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let server = format!("{}:{CONTROL_PORT}", cp.addr());
    let control = Process::start(
        &prefix,
        ProcessSpec::new("control", BASALTD)
            .args([
                "control",
                "--node-id",
                "1",
                "--bootstrap",
                "--listen",
                &server,
            ])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("control"))
            .env("RUST_LOG", "info")
            .netns(&cp),
    )
    .expect("control plane");
    let admin = AdminClient::connect_lazy(&server).expect("admin client");
    wait::until(
        "the control plane answers",
        DEADLINE,
        &[&control],
        || async { admin.list(Kind::Node).await.is_ok() },
    )
    .await;
    let mut token = JoinToken {
        meta: ObjectMeta::named("join"),
        ..JoinToken::default()
    };
    token.spec.ttl_seconds = 600;
    token.spec.max_uses = 3;
    let Ok(Object::Token(token)) = admin.create(Object::Token(token)).await else {
        panic!("create the join token")
    };
    let secret = token.secret.expect("the secret").expose().to_owned();
    let mut agents: Vec<Process> = [&a, &b, &c]
        .into_iter()
        .zip(&sockets)
        .map(|(node, socket)| {
            Process::start(
                &prefix,
                ProcessSpec::new(format!("agent-{}", node.name()), BASALTD)
                    .args(["agent", "--node", node.name(), "--server", &server])
                    .args(["--address", &format!("{}:7500", node.addr())])
                    .args(["--compute", "sim", "--resync-ms", "500"])
                    .args(["--cpus", "2", "--memory-mib", "2048"])
                    .arg("--storage-socket")
                    .arg(socket)
                    .env("BASALT_JOIN_TOKEN", &secret)
                    .env("RUST_LOG", "info")
                    .netns(node),
            )
            .expect("agent")
        })
        .collect();
    {
        let logs: Vec<&Process> = storages.iter().chain(&agents).chain([&control]).collect();
        wait::until(
            "three nodes joined and published their replication addresses",
            DEADLINE,
            &logs,
            || async {
                let Ok(list) = admin.list(Kind::Node).await else {
                    return false;
                };
                list.objects.len() == 3
                    && list.objects.iter().all(|o| {
                        matches!(o, Object::Node(n) if !n.status.replication_address.is_empty())
                    })
            },
        )
        .await;
    }

    // The VM, placed on a with replicas on a and b by the test (stopped,
    // so the scheduler leaves it to the test; the agents attach its
    // volumes all the same).
    let vm = Vm {
        meta: ObjectMeta::named("db"),
        spec: VmSpec {
            cpus: 1,
            memory_mib: 128,
            running: false,
            disks: vec![Disk {
                name: "root".into(),
                size_bytes: DISK_BYTES,
                image: None,
                replicas: 2,
            }],
            // The simulated hypervisor never opens these.
            kernel: Some(KernelBoot {
                kernel: "/boot/vmlinuz".into(),
                initrd: String::new(),
                cmdline: "console=ttyS0".into(),
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
    };
    let Object::Vm(stored) = admin.create(Object::Vm(vm)).await.expect("vm") else {
        panic!("a vm")
    };
    admin
        .create(Object::Placement(Placement {
            meta: ObjectMeta::named("db"),
            vm: "db".into(),
            node: "a".into(),
            epoch: 1,
            replica_nodes: vec!["a".into(), "b".into()],
        }))
        .await
        .expect("placement on a");
    let volume = disk_volume(&stored.meta.uid, "root");
    let storage_a = StorageClient::connect_unix(&sockets[0]).expect("storage a client");
    let (b_peer, c_peer) = (
        format!("{}:{REPLICA_PORT}", b.addr()),
        format!("{}:{REPLICA_PORT}", c.addr()),
    );
    {
        let logs: Vec<&Process> = storages.iter().chain(&agents).chain([&control]).collect();
        wait::until(
            "a's primary replicates to b's secondary, in sync",
            DEADLINE,
            &logs,
            || async {
                peer_state(&storage_a, &volume, &b_peer).await
                    == Some((ReplicaPeerState::Connected, 0))
            },
        )
        .await;
    }
    write_pattern(&a, &volume, PATTERN_AT, 1);
    assert!(
        read_export(&b, &volume, PATTERN_AT, pattern(1).len()) == pattern(1),
        "b's replica does not hold the pattern"
    );

    // b is lost: its agent and storage process die.
    agents[1].kill9().expect("kill b's agent");
    storages[1].kill9().expect("kill b's storage");
    {
        let logs: Vec<&Process> = [&storages[0], &storages[2], &agents[0], &agents[2], &control]
            .into_iter()
            .collect();
        wait::until(
            "the placement names c instead of b",
            DEADLINE,
            &logs,
            || async {
                placement(&admin)
                    .await
                    .is_some_and(|p| !p.holds_replica("b"))
            },
        )
        .await;
        let replaced = placement(&admin).await.expect("placed");
        assert_eq!(replaced.replica_nodes, ["a", "c"], "{replaced:?}");
        assert_eq!((replaced.node.as_str(), replaced.epoch), ("a", 1));

        wait::until(
            "a's primary has synced c fully and dropped b",
            DEADLINE,
            &logs,
            || async {
                peer_state(&storage_a, &volume, &c_peer).await
                    == Some((ReplicaPeerState::Connected, 0))
                    && peer_state(&storage_a, &volume, &b_peer).await.is_none()
            },
        )
        .await;
    }
    assert!(
        read_export(&c, &volume, PATTERN_AT, pattern(1).len()) == pattern(1),
        "c's new replica does not hold what was written before it existed"
    );
    // c's copy is a secondary: it refuses writers.
    {
        let volume = volume.clone();
        let refused = c
            .run_in(move || {
                let mut client = NbdClient::connect(NBD, &volume).expect("nbd on c");
                client.write(0, &[7u8; 4096]).is_err()
            })
            .expect("run in c");
        assert!(refused, "c's secondary took an NBD write");
    }
    // A write acknowledged by a now is on c (protocol C).
    write_pattern(&a, &volume, PATTERN_AT + (1 << 20), 2);
    assert!(
        read_export(&c, &volume, PATTERN_AT + (1 << 20), pattern(2).len()) == pattern(2),
        "a write acknowledged after the replacement is missing on c"
    );
}
