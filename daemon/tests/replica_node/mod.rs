//! What the agent-level replica tests share: namespace nodes running
//! `basaltd storage serve` (NBD where QEMU looks, the storage-local API
//! for the agent, replication on the node's address) and `basaltd agent`,
//! a VM `db` placed on `a` with its 2-replica disk on `a` and `b`, and
//! patterns written and read through a node's NBD export.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use basalt_agent::storage::disk_volume;
use basalt_api::{
    AdminClient, Disk, KernelBoot, Kind, Object, ObjectMeta, Placement, ReplicaPeerState,
    StorageClient, Vm, VmSpec,
};
use basalt_testkit::nbd_client::NbdClient;
use basalt_testkit::{Node, Prefix, Process, ProcessSpec, wait};

use crate::common::BASALTD;

/// Where every node's storage process serves NBD, inside its namespace.
pub const NBD: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10809);
/// The replication port on each node's address.
pub const REPLICA_PORT: u16 = 7789;
/// The size of `db`'s disk.
pub const DISK_BYTES: u64 = 16 << 20;
/// Where the tests' patterns go (past the test guest's two records).
pub const PATTERN_AT: u64 = 1 << 20;
const PATTERN_BLOCKS: u64 = 64;

/// Pattern `seed`: 64 blocks of 4 KiB, each starting with its number and
/// filled with a byte that depends on the number and the seed.
pub fn pattern(seed: u8) -> Vec<u8> {
    (0..PATTERN_BLOCKS)
        .flat_map(|i| {
            let mut block = vec![((i + u64::from(seed)) % 251) as u8 + 1; 4096];
            block[..8].copy_from_slice(&i.to_le_bytes());
            block
        })
        .collect()
}

/// Writes pattern `seed` at `at` through `node`'s NBD export `export`,
/// then flushes.
pub fn write_pattern(node: &Node, export: &str, at: u64, seed: u8) {
    let export = export.to_owned();
    node.run_in(move || {
        let mut client = NbdClient::connect(NBD, &export).expect("nbd");
        client.write(at, &pattern(seed)).expect("write the pattern");
        client.flush().expect("flush");
    })
    .expect("run in the node");
}

/// Reads `len` bytes at `offset` of `export` from the NBD server inside
/// `node`.
pub fn read_export(node: &Node, export: &str, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let export = export.to_owned();
    node.run_in(move || {
        let mut client = NbdClient::connect(NBD, &export)?;
        let mut buf = vec![0u8; len];
        client.read(offset, &mut buf)?;
        Ok(buf)
    })
    .map_err(std::io::Error::other)?
}

/// Whether `node`'s export of `volume` refuses an NBD write (as a
/// secondary's does).
pub fn refuses_writes(node: &Node, volume: &str) -> bool {
    let volume = volume.to_owned();
    node.run_in(move || {
        let mut client = NbdClient::connect(NBD, &volume).expect("nbd");
        client.write(0, &[7u8; 4096]).is_err()
    })
    .expect("run in the node")
}

/// Creates a 256 MiB pool for `node` and starts its storage process with
/// replication on the node's address; returns it, listening, and the
/// path of its storage-local socket.
pub fn start_storage(prefix: &Prefix, node: &Node) -> (Process, PathBuf) {
    let pool = prefix.dir().join(format!("pool-{}.img", node.name()));
    let out = Command::new(BASALTD)
        .args(["storage", "pool", "create", "--size", "256M", "--path"])
        .arg(&pool)
        .output()
        .expect("basaltd runs");
    assert!(out.status.success(), "{out:?}");
    let socket = prefix.dir().join(format!("storage-{}.sock", node.name()));
    let spec = ProcessSpec::new(format!("storage-{}", node.name()), BASALTD)
        .args(["storage", "serve", "--listen", &NBD.to_string(), "--pool"])
        .arg(&pool)
        .arg("--local-socket")
        .arg(&socket)
        .args([
            "--replica-listen",
            &format!("{}:{REPLICA_PORT}", node.addr()),
        ])
        .env("RUST_LOG", "info")
        .netns(node)
        .cwd(prefix.dir());
    let mut storage = Process::start(prefix, spec).expect("storage");
    storage
        .wait_for_tcp(NBD, Some(node), Duration::from_secs(30))
        .expect("storage listening");
    (storage, socket)
}

/// `basaltd agent` for `node`, joining `server` with `secret`, using the
/// storage process at `socket`; the caller adds its compute flags.
pub fn agent_spec(node: &Node, server: &str, secret: &str, socket: &Path) -> ProcessSpec {
    ProcessSpec::new(format!("agent-{}", node.name()), BASALTD)
        .args(["agent", "--node", node.name(), "--server", server])
        .args(["--address", &format!("{}:7500", node.addr())])
        .args(["--resync-ms", "500", "--cpus", "2", "--memory-mib", "2048"])
        .arg("--storage-socket")
        .arg(socket)
        .env("BASALT_JOIN_TOKEN", secret)
        .env("RUST_LOG", "info")
        .netns(node)
}

/// Waits until `nodes` nodes have joined and published their replication
/// addresses.
pub async fn wait_joined(admin: &AdminClient, nodes: usize, deadline: Duration, logs: &[&Process]) {
    wait::until(
        "the nodes joined and published their replication addresses",
        deadline,
        logs,
        || async {
            let Ok(list) = admin.list(Kind::Node).await else {
                return false;
            };
            list.objects.len() == nodes
                && list.objects.iter().all(
                    |o| matches!(o, Object::Node(n) if !n.status.replication_address.is_empty()),
                )
        },
    )
    .await;
}

/// Creates VM `db`, stopped and booting `kernel`, with a 2-replica disk
/// `root`, and places it on `a` with its replicas on `a` and `b` (a
/// stopped VM is left to the test by the scheduler; the agents attach its
/// volumes all the same). Returns the disk's volume name.
pub async fn create_db_on_a_and_b(admin: &AdminClient, kernel: KernelBoot) -> String {
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
                source_volume: None,
                protocol: Default::default(),
            }],
            kernel: Some(kernel),
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
    disk_volume(&stored.meta.uid, "root")
}

/// How `volume`'s replica in `client`'s storage process sees its link to
/// `peer` (its first link when `None`): state and dirty chunks.
pub async fn peer_state(
    client: &StorageClient,
    volume: &str,
    peer: Option<&str>,
) -> Option<(ReplicaPeerState, u64)> {
    client.status().await.ok().and_then(|s| {
        s.replicas
            .into_iter()
            .find(|r| r.volume == volume && peer.is_none_or(|p| r.peer == p))
            .map(|r| (r.state, r.dirty_chunks))
    })
}
