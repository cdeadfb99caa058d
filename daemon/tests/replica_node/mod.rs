//! What the agent-level replica tests share: namespace nodes running
//! `basaltd storage serve` (NBD where QEMU looks, the storage-local API
//! for the agent, replication on the node's address) and `basaltd agent`,
//! a VM `db` placed on `a` with its 2-replica disk on `a` and `b`, and
//! patterns written and read through a node's NBD export; and the
//! bring-up the cluster-level volume tests share ([`SimCluster`]): nodes
//! with a storage process and a simulated-compute agent each, joined to a
//! one-member control plane.
//!
//! Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

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
use basalt_testkit::{Fabric, Node, Prefix, Process, ProcessSpec, wait};

use crate::common::{self, BASALTD};

/// Where every node's storage process serves NBD, inside its namespace.
pub const NBD: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10809);
/// [`SHORT_LEASES`], and a lost node's copies replaced after 3 s.
pub const SHORT_LEASES_QUICK_REPLACE: &str = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 3000\ncontroller_period_ms = 200\nreplica_replace_after_ms = 3000\n";

/// VM `db`'s placement (`None` while it has none or it cannot be read).
pub async fn db_placement(admin: &AdminClient) -> Option<Placement> {
    match admin.get(Kind::Placement, "db").await {
        Ok(Object::Placement(p)) => Some(p),
        _ => None,
    }
}

/// The replication port on each node's address.
pub const REPLICA_PORT: u16 = 7789;
/// The control plane's port on node `cp`'s address.
pub const CONTROL_PORT: u16 = 7400;
/// A control-plane configuration with short node leases and controller
/// rounds, so a lost node or a new object is acted on within seconds.
pub const SHORT_LEASES: &str = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 3000\ncontroller_period_ms = 200\n";
/// The size of `db`'s disk.
pub const DISK_BYTES: u64 = 16 << 20;
/// Where the tests' patterns go (past the test guest's two records).
pub const PATTERN_AT: u64 = 1 << 20;
const PATTERN_BLOCKS: u64 = 64;

/// The processes whose logs a wait prints: the control plane, then every
/// member's agent and storage process.
pub fn every<'a>(control: &'a Process, members: &'a [Member]) -> Vec<&'a Process> {
    let mut all = vec![control];
    all.extend(members.iter().flat_map(|m| [&m.agent, &m.storage]));
    all
}

/// Whether `socket`'s pool holds a volume named `name`; `None` while its
/// storage process cannot be asked.
pub async fn in_pool(socket: &Path, name: &str) -> Option<bool> {
    let storage = StorageClient::connect_unix(socket).ok()?;
    let pool = storage.list_volumes().await.ok()?;
    Some(pool.iter().any(|v| v.name == name))
}

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

/// Writes `bytes` of 0x5a through `node`'s export of `volume`, 1 MiB at
/// a time, then flushes.
pub fn fill(node: &Node, volume: &str, bytes: usize) {
    let export = volume.to_owned();
    node.run_in(move || {
        let mut client = NbdClient::connect(NBD, &export).expect("nbd");
        let chunk = vec![0x5a_u8; 1 << 20];
        for at in (0..bytes).step_by(chunk.len()) {
            client.write(at as u64, &chunk).expect("write");
        }
        client.flush().expect("flush");
    })
    .expect("run in the node");
}

/// Whether `storage`'s pool holds `volume` incomplete (decision 91);
/// `None` while it cannot be asked or has no such volume.
pub async fn incomplete(storage: &StorageClient, volume: &str) -> Option<bool> {
    let volumes = storage.list_volumes().await.ok()?;
    volumes
        .iter()
        .find(|v| v.name == volume)
        .map(|v| v.incomplete)
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
    start_storage_with(prefix, node, &[])
}

/// [`start_storage`] with `extra` flags for `basaltd storage serve`.
pub fn start_storage_with(prefix: &Prefix, node: &Node, extra: &[&str]) -> (Process, PathBuf) {
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
        .args(extra)
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

/// A one-member control plane and, on each replica node, a storage
/// process and a simulated-compute agent joined to it
/// ([`start_replica_nodes`]); per node in the order given.
pub struct ReplicaNodes {
    /// `basaltd storage serve` per node.
    pub storages: Vec<Process>,
    /// Their storage-local sockets.
    pub sockets: Vec<PathBuf>,
    /// `basaltd control`.
    pub control: Process,
    /// A client of it.
    pub admin: AdminClient,
    /// `basaltd agent --compute sim` per node.
    pub agents: Vec<Process>,
    /// The control plane's address.
    pub server: String,
}

/// Starts a storage process (with `storage_flags`) on each of `nodes`, a
/// control plane with `config` on `cp`, and a simulated-compute agent per
/// node, and waits until every node joined and published its
/// replication address.
pub async fn start_replica_nodes(
    prefix: &Prefix,
    nodes: &[&Node],
    cp: &Node,
    config: &str,
    storage_flags: &[&str],
    deadline: Duration,
) -> ReplicaNodes {
    let (storages, sockets): (Vec<Process>, Vec<PathBuf>) = nodes
        .iter()
        .map(|node| start_storage_with(prefix, node, storage_flags))
        .unzip();
    let server = format!("{}:{CONTROL_PORT}", cp.addr());
    let (control, admin) =
        common::start_control(prefix, &server, Some(cp), deadline, Some(config)).await;
    let secret = common::join_token(&admin, "join", nodes.len() as u32).await;
    let agents: Vec<Process> = nodes
        .iter()
        .zip(&sockets)
        .map(|(node, socket)| {
            Process::start(
                prefix,
                agent_spec(node, &server, &secret, socket).args(["--compute", "sim"]),
            )
            .expect("agent")
        })
        .collect();
    {
        let logs: Vec<&Process> = storages.iter().chain(&agents).chain([&control]).collect();
        wait_joined(&admin, nodes.len(), deadline, &logs).await;
    }
    ReplicaNodes {
        storages,
        sockets,
        control,
        admin,
        agents,
        server,
    }
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
                attach: None,
                attached_storage_name: None,
                added_at_epoch: None,
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

/// One node of a [`SimCluster`]: its storage process (with the path of
/// its storage-local socket) and its agent. Processes drop before the
/// node.
pub struct Member {
    /// `basaltd storage serve` ([`start_storage`]).
    pub storage: Process,
    /// `basaltd agent --compute sim` ([`agent_spec`]).
    pub agent: Process,
    /// The storage process's storage-local socket.
    pub socket: PathBuf,
    /// The namespace node.
    pub node: Node,
}

/// Namespace nodes, each running a storage process and `basaltd agent
/// --compute sim` (the simulated hypervisor never opens a disk: tests
/// write volumes over NBD as a guest would), joined to a one-member
/// control plane on namespace node `cp` at [`CONTROL_PORT`]. Fields drop
/// in order: the processes, then the fabric, then the test's directory.
pub struct SimCluster {
    /// The nodes, in the order they were named.
    pub members: Vec<Member>,
    /// `basaltd control`.
    pub control: Process,
    /// A client of the control plane.
    pub admin: AdminClient,
    /// The control plane's address.
    pub server: String,
    /// The fabric the nodes live on.
    pub fabric: Fabric,
    /// The test's prefix and directory.
    pub prefix: Prefix,
}

impl SimCluster {
    /// Nodes `names` (then `cp`), a storage process on each, the control
    /// plane with `config` (TOML), then an agent on each with a join
    /// token good for twice the nodes (a node brought back registers
    /// again); returns once every node joined and published its
    /// replication address, within `deadline` for each wait.
    pub async fn start(names: &[&str], config: &str, deadline: Duration) -> SimCluster {
        Self::start_with(names, config, deadline, &[]).await
    }

    /// [`SimCluster::start`] with `extra` flags for every node's
    /// `basaltd storage serve`.
    pub async fn start_with(
        names: &[&str],
        config: &str,
        deadline: Duration,
        extra: &[&str],
    ) -> SimCluster {
        let prefix = Prefix::for_test().expect("prefix");
        let mut fabric = Fabric::new(&prefix).expect("fabric");
        let nodes: Vec<Node> = names
            .iter()
            .map(|n| fabric.add_node(n).expect("node"))
            .collect();
        let cp = fabric.add_node("cp").expect("node cp");
        let storages: Vec<(Process, PathBuf)> = nodes
            .iter()
            .map(|node| start_storage_with(&prefix, node, extra))
            .collect();
        let server = format!("{}:{CONTROL_PORT}", cp.addr());
        let (control, admin) =
            common::start_control(&prefix, &server, Some(&cp), deadline, Some(config)).await;
        let uses = u32::try_from(2 * names.len()).expect("a few nodes");
        let secret = common::join_token(&admin, "join", uses).await;
        let members: Vec<Member> = nodes
            .into_iter()
            .zip(storages)
            .map(|(node, (storage, socket))| {
                let agent = Process::start(
                    &prefix,
                    agent_spec(&node, &server, &secret, &socket).args(["--compute", "sim"]),
                )
                .expect("agent");
                Member {
                    storage,
                    agent,
                    socket,
                    node,
                }
            })
            .collect();
        let cluster = SimCluster {
            members,
            control,
            admin,
            server,
            fabric,
            prefix,
        };
        wait_joined(&cluster.admin, names.len(), deadline, &cluster.logs()).await;
        cluster
    }

    /// The member on node `name`.
    pub fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.node.name() == name)
            .unwrap_or_else(|| panic!("no node {name} in the cluster"))
    }

    /// The member on node `name`, to kill or restart its processes.
    pub fn member_mut(&mut self, name: &str) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.node.name() == name)
            .unwrap_or_else(|| panic!("no node {name} in the cluster"))
    }

    /// The control plane, a client of it, its address and the nodes,
    /// borrowed apart: a test kills and restarts one node's processes
    /// while it reads the others'.
    pub fn parts(&mut self) -> (&Process, &AdminClient, &str, &mut [Member]) {
        (&self.control, &self.admin, &self.server, &mut self.members)
    }

    /// Every process, for the logs a failed wait shows: the control
    /// plane, then each node's agent and storage process.
    pub fn logs(&self) -> Vec<&Process> {
        every(&self.control, &self.members)
    }
}
