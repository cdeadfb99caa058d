//! `basaltd lab`: a multi-node Basalt cluster on one machine.
//!
//! Every node is a network namespace on one bridge (`basalt-testkit`'s
//! harness, the same the end-to-end tests use) running what a real node
//! runs: a private libvirtd, `basaltd storage` serving the node's pool over
//! NBD, and `basaltd agent`; the first three nodes also run control-plane
//! members (the first bootstraps, the others join and are promoted
//! through their `member` objects).
//! The test guest is declared as a VM through the admin API; the control
//! plane places it, that node's agent defines and starts it, and its disk
//! is a Basalt volume that the agent creates through the node's storage
//! process (`--local-socket`). The agents drive the VM network (`--network`): the
//! VM's NIC is leased an address from the lab's network object, and the
//! guest takes it by DHCP from its node's datapath; the root namespace
//! routes the VM network through the VM's node, and the lab's `routes`
//! process keeps a /32 per VM via whichever node holds it (live migration,
//! HA), so the printed address works from the host wherever the VM goes.
//!
//! Invariants: everything `up` makes is named with the lab prefix
//! ([`LAB_PREFIX`]) and recorded in its state directory, so `down` removes
//! exactly that; `up` on a healthy lab changes nothing; the lab never
//! touches a test's objects, nor a test the lab's.

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use basalt_agent::vm_domain::{self, NBD_PORT};
use basalt_api::{
    AdminClient, Disk, JoinToken, JoinTokenSpec, KernelBoot, Kind, Nic, Object, ObjectMeta, Vm,
    VmSpec,
};
use basalt_api::{Endpoint, Network, NetworkSpec};
use basalt_testkit::guest::{self, GuestClient, GuestImage};
use basalt_testkit::libvirtd::Libvirtd;
use basalt_testkit::netns::Fabric;
use basalt_testkit::prefix::{LAB_PREFIX, Prefix};
use basalt_testkit::process::{Process, ProcessSpec};
use basalt_testkit::sweep;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

/// The lab's VM network, routed from the root namespace through node 1.
const VM_NETWORK: &str = "10.80.0.0/24";
/// The VXLAN identifier of the lab's VM network.
const VM_VNI: u32 = 80;
/// The lab VM's name (libvirt domain and NBD export).
const VM_NAME: &str = "lab-vm";
const VM_MEMORY_MIB: u64 = 256;
const VM_DISK_BYTES: u64 = 256 << 20;
/// Where each control-plane member listens, on its node's address.
const CONTROL_PORT: u16 = 7400;
/// Where each node's storage process takes replication links.
const REPLICA_PORT: u16 = 7789;
/// How many nodes run a control-plane member (the first ones).
const CONTROL_MEMBERS: usize = 3;
/// How long a TCG guest may take to answer (boots slow on a busy machine).
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
/// The state file `up` writes and `status`/`down` read.
const STATE_FILE: &str = "lab.json";

/// `basaltd lab ...`
#[derive(Debug, Args)]
pub struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Create the lab (or report it, if it is up and healthy) and start
    /// its VM.
    Up {
        /// Number of nodes (network namespaces with a libvirtd each).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=9))]
        nodes: u8,
        /// How the nodes' agents carry VM networks that do not choose a
        /// mode (their `--net-routing`): `overlay` or `native`.
        #[arg(long, default_value_t = basalt_sdn::Routing::Overlay)]
        net_routing: basalt_sdn::Routing,
    },
    /// Remove everything `up` created.
    Down,
    /// Show the lab's nodes and VM and whether they answer.
    Status,
    /// Keep the root namespace routed to every VM through the node that
    /// holds it (`up` starts it; it runs until `down`).
    #[command(hide = true)]
    Routes {
        /// A control-plane member's admin API, host:port (repeatable).
        #[arg(long = "server", required = true)]
        servers: Vec<String>,
    },
}

/// What `up` built, as `status` and `down` read it back.
#[derive(Debug, Serialize, Deserialize)]
struct LabState {
    nodes: Vec<NodeState>,
    vm: VmState,
}

#[derive(Debug, Serialize, Deserialize)]
struct NodeState {
    name: String,
    address: Ipv4Addr,
    libvirt_uri: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct VmState {
    name: String,
    /// The libvirt domain the agent made for it.
    domain: String,
    /// The control plane's admin API: every member's address,
    /// comma-separated, as `basalt --server` takes them.
    server: String,
    node: String,
    ip: Ipv4Addr,
    tap: String,
    disk: PathBuf,
    serial_log: PathBuf,
}

/// Runs one lab subcommand.
pub fn run(args: LabArgs) -> anyhow::Result<()> {
    ensure_root()?;
    match args.command {
        LabCommand::Up { nodes, net_routing } => up(nodes, net_routing),
        LabCommand::Down => down(),
        LabCommand::Routes { servers } => follow_routes(&servers),
        LabCommand::Status => {
            let Some(state) = read_state()? else {
                bail!("no lab is up (start one with `basaltd lab up`)");
            };
            let health = check(&state);
            print!("{}", describe(&state, &health));
            if !health.healthy() {
                bail!(
                    "the lab is not healthy; `basaltd lab down` then `basaltd lab up` rebuilds it"
                );
            }
            Ok(())
        }
    }
}

fn ensure_root() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the lab creates network namespaces and daemons: run it as root");
    }
    Ok(())
}

fn state_path() -> PathBuf {
    PathBuf::from(basalt_testkit::prefix::STATE_ROOT)
        .join(LAB_PREFIX)
        .join(STATE_FILE)
}

fn read_state() -> anyhow::Result<Option<LabState>> {
    let path = state_path();
    match fs::read_to_string(&path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

fn up(nodes: u8, net_routing: basalt_sdn::Routing) -> anyhow::Result<()> {
    let report = sweep::sweep_stale();
    tracing::debug!(?report, "swept stale test objects");
    if let Some(state) = read_state()? {
        let health = check(&state);
        if health.healthy() {
            if state.nodes.len() != usize::from(nodes) {
                bail!(
                    "a lab with {} nodes is up; `basaltd lab down` first to change it to {nodes}",
                    state.nodes.len()
                );
            }
            println!("the lab is already up\n");
            print!("{}", describe(&state, &health));
            return Ok(());
        }
        println!("the lab is partly up; rebuilding it");
    }
    // Whatever a crashed or half-finished `up` left goes first.
    sweep::tear_down(LAB_PREFIX).context("removing an earlier lab")?;
    remove_datapath_pins();
    let state = build(nodes, net_routing)?;
    let health = check(&state);
    print!("{}", describe(&state, &health));
    Ok(())
}

/// Builds the lab. On error, the handles' drops remove what was made.
fn build(nodes: u8, net_routing: basalt_sdn::Routing) -> anyhow::Result<LabState> {
    let prefix = Prefix::lab()?;
    let mut fabric = Fabric::new(&prefix).context("creating the lab's bridge")?;
    for i in 1..=nodes {
        fabric
            .add_node(&format!("n{i}"))
            .with_context(|| format!("creating node n{i}"))?;
    }
    let hosts = fabric.hosts();
    // The daemons start side by side: each takes seconds to answer.
    for node in fabric.nodes() {
        println!("node {}: {} (starting libvirtd)", node.name(), node.addr());
    }
    let daemons = std::thread::scope(|scope| {
        let starts: Vec<_> = fabric
            .nodes()
            .iter()
            .map(|node| {
                let (prefix, hosts) = (&prefix, &hosts);
                scope.spawn(move || {
                    Libvirtd::start(prefix, node, hosts)
                        .with_context(|| format!("starting libvirtd on {}", node.name()))
                })
            })
            .collect();
        starts
            .into_iter()
            .map(|start| {
                start
                    .join()
                    .unwrap_or_else(|_| bail!("a libvirtd start panicked"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    println!("building the test guest image");
    let image = GuestImage::build().context("building the test guest")?;
    let basaltd = own_binary()?;
    let mut processes = Vec::new();

    // Storage: a pool per node, served over NBD inside the node, where
    // every agent's QEMU looks for it; the agent makes the VM's volumes
    // through the storage-local socket.
    for node in fabric.nodes() {
        let pool = prefix.dir().join(format!("pool-{}.img", node.name()));
        let pool = pool.to_string_lossy().into_owned();
        run_basaltd(
            &basaltd,
            &["storage", "pool", "create", "--path", &pool, "--size", "1G"],
        )?;
        let spec = ProcessSpec::new(format!("storage-{}", node.name()), &basaltd)
            .args([
                "storage",
                "serve",
                "--pool",
                &pool,
                "--listen",
                &format!("127.0.0.1:{NBD_PORT}"),
                "--local-socket",
            ])
            .arg(storage_socket(&prefix, node.name()))
            // Primaries on other nodes replicate here (2-replica disks).
            .args([
                "--replica-listen",
                &format!("{}:{REPLICA_PORT}", node.addr()),
            ])
            .netns(node);
        let mut storage = Process::start(&prefix, spec).context("starting basaltd storage")?;
        storage.wait_for_tcp(
            ([127, 0, 0, 1], NBD_PORT).into(),
            Some(node),
            Duration::from_secs(30),
        )?;
        processes.push(storage);
    }

    // The control plane: a member on each of the first three nodes; the
    // first bootstraps, the others join through it and are promoted.
    let first = fabric.nodes()[0].clone();
    let server = format!("{}:{CONTROL_PORT}", first.addr());
    let members: Vec<_> = fabric
        .nodes()
        .iter()
        .take(CONTROL_MEMBERS)
        .cloned()
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The client's channel spawns its connection task on this runtime.
    let _entered = runtime.enter();
    let admin = AdminClient::connect_lazy(&server)?;
    for (i, node) in members.iter().enumerate() {
        let id = i + 1;
        let address = format!("{}:{CONTROL_PORT}", node.addr());
        println!("control-plane member {id} on {} at {address}", node.name());
        let mut spec = ProcessSpec::new(format!("control-{id}"), &basaltd)
            .args([
                "control",
                "--node-id",
                &id.to_string(),
                "--listen",
                &address,
            ])
            .arg("--data-dir")
            .arg(prefix.dir().join(format!("control-{id}")))
            .netns(node);
        spec = if id == 1 {
            spec.arg("--bootstrap")
        } else {
            spec.args(["--join", &server])
        };
        processes.push(
            Process::start(&prefix, spec)
                .with_context(|| format!("starting control-plane member {id}"))?,
        );
        runtime.block_on(wait_for(
            &format!("control-plane member {id} to be a voter"),
            || async { voters(&admin).await.contains(&(id as u64)) },
        ))?;
    }

    // Every member's address, for the agents, the lab's own clients and
    // the printed commands: losing one member strands none of them.
    let servers = members
        .iter()
        .map(|node| format!("{}:{CONTROL_PORT}", node.addr()))
        .collect::<Vec<_>>()
        .join(",");
    let admin = AdminClient::connect_lazy(&servers)?;

    // An agent per node, each with its own join token.
    for (node, libvirtd) in fabric.nodes().iter().zip(&daemons) {
        let token = JoinToken {
            meta: ObjectMeta::named(format!("join-{}", node.name())),
            spec: JoinTokenSpec {
                ttl_seconds: 600,
                max_uses: 1,
                revoked: false,
            },
            ..JoinToken::default()
        };
        let Object::Token(token) = runtime.block_on(admin.create(Object::Token(token)))? else {
            bail!("creating a join token returned another kind");
        };
        let secret = token
            .secret
            .context("the control plane returned no token secret")?;
        let spec = ProcessSpec::new(format!("agent-{}", node.name()), &basaltd)
            .args([
                "agent",
                "--node",
                node.name(),
                "--address",
                &format!("{}:7500", node.addr()),
            ])
            .args([
                "--server",
                &servers,
                "--libvirt-uri",
                &libvirtd.uri(),
                "--cpus",
                "2",
                "--memory-mib",
                "2048",
            ])
            .args([
                "--resync-ms",
                "1000",
                "--stop-grace-ms",
                "5000",
                "--network",
                "--storage-socket",
            ])
            .arg(storage_socket(&prefix, node.name()))
            .arg("--console-dir")
            .arg(prefix.log_dir())
            .args(["--net-routing", net_routing.as_str()])
            .env("BASALT_JOIN_TOKEN", secret.expose())
            .netns(node);
        processes.push(Process::start(&prefix, spec).context("starting basaltd agent")?);
    }
    let count = fabric.nodes().len();
    runtime.block_on(wait_for("every node to join", || async {
        admin
            .list(Kind::Node)
            .await
            .is_ok_and(|list| list.objects.len() == count)
    }))?;

    // The VM network: IPAM leases the VM's address from it, the agents'
    // datapaths carry it.
    let network = Network {
        meta: ObjectMeta::named("default"),
        spec: NetworkSpec {
            cidr: VM_NETWORK.into(),
            vni: VM_VNI,
            routing: None,
        },
    };
    runtime
        .block_on(admin.create(Object::Network(network)))
        .context("creating the lab's VM network")?;

    // The VM, declared through the API; the control plane places it.
    let vm = Vm {
        meta: ObjectMeta::named(VM_NAME),
        spec: VmSpec {
            cpus: 1,
            memory_mib: VM_MEMORY_MIB,
            running: true,
            disks: vec![Disk {
                name: "root".into(),
                size_bytes: VM_DISK_BYTES,
                image: None,
                // A copy on a second node: HA restarts the VM there.
                replicas: 2,
                source_volume: None,
                attach: None,
                attached_storage_name: None,
                added_at_epoch: None,
                protocol: Default::default(),
            }],
            nics: vec![Nic {
                network: "default".into(),
                mac: None,
                ip: None,
            }],
            kernel: Some(KernelBoot {
                kernel: image.kernel().to_string_lossy().into_owned(),
                initrd: image.initrd().to_string_lossy().into_owned(),
                cmdline: "console=ttyS0 basalt.dhcp=1".into(),
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
    };
    let Object::Vm(vm) = runtime.block_on(admin.create(Object::Vm(vm)))? else {
        bail!("creating the VM returned another kind");
    };
    let placed = runtime.block_on(async {
        let start = std::time::Instant::now();
        loop {
            if let Ok(Object::Placement(p)) = admin.get(Kind::Placement, VM_NAME).await {
                return Ok(p.node);
            }
            if start.elapsed() > BOOT_DEADLINE {
                bail!("timed out waiting for the VM to be placed");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })?;
    let node = fabric
        .node(&placed)
        .with_context(|| format!("the VM was placed on unknown node {placed:?}"))?
        .clone();
    let libvirtd = daemons
        .iter()
        .find(|d| d.node().name() == placed)
        .context("no libvirtd on the VM's node")?;
    println!("VM {VM_NAME} placed on {placed}; its agent starts it (TCG: this takes a while)");

    let tap = vm_domain::tap_name(vm_domain::vm_uuid(&vm.meta.uid), 0);
    let serial_log = prefix.log_dir().join(format!("{VM_NAME}.log"));
    let vm_ip = runtime
        .block_on(leased_address(&admin, &vm.meta.uid))
        .with_context(|| {
            format!(
                "the VM's NIC got no address; agent log:\n{}",
                log_tail(&prefix, &placed)
            )
        })?;
    println!(
        "IPAM leased {vm_ip} to {VM_NAME}; the guest takes it by DHCP from {placed}'s datapath"
    );
    route_vm_network(node.addr())?;
    let mut routes = ProcessSpec::new("routes", &basaltd).args(["lab", "routes"]);
    for member in &members {
        routes = routes.args(["--server", &format!("{}:{CONTROL_PORT}", member.addr())]);
    }
    processes.push(Process::start(&prefix, routes).context("starting the VM route follower")?);
    GuestClient::new(vm_ip)
        .wait_ready(BOOT_DEADLINE)
        .with_context(|| {
            format!(
                "the VM did not answer; its console:\n{}",
                guest::log_tail(&serial_log, 20)
            )
        })?;
    let _ = libvirtd;
    let disk = prefix.dir().join(format!("pool-{placed}.img"));
    let node = node.clone();

    let state = LabState {
        nodes: fabric
            .nodes()
            .iter()
            .zip(&daemons)
            .map(|(n, d)| NodeState {
                name: n.name().into(),
                address: n.addr(),
                libvirt_uri: d.uri(),
            })
            .collect(),
        vm: VmState {
            name: VM_NAME.into(),
            domain: format!("basalt-{VM_NAME}"),
            server: servers,
            node: node.name().into(),
            ip: vm_ip,
            tap,
            disk,
            serial_log,
        },
    };
    let path = state_path();
    fs::write(&path, serde_json::to_string_pretty(&state)?)
        .with_context(|| format!("writing {}", path.display()))?;
    // Everything stays up after this process exits; `down` removes it.
    for process in processes {
        process.detach();
    }
    daemons.into_iter().for_each(Libvirtd::detach);
    fabric.detach();
    Ok(state)
}

/// The storage-local API socket of node `node`'s storage process.
fn storage_socket(prefix: &Prefix, node: &str) -> PathBuf {
    prefix.dir().join(format!("storage-{node}.sock"))
}

/// Waits for the address IPAM leases to the first NIC of the VM with uid
/// `uid`, once the endpoint follows the VM's placement.
async fn leased_address(admin: &AdminClient, uid: &str) -> anyhow::Result<Ipv4Addr> {
    let start = std::time::Instant::now();
    loop {
        if let Ok(list) = admin.list(Kind::Endpoint).await {
            let leased = list.objects.into_iter().find_map(|o| match o {
                Object::Endpoint(Endpoint {
                    vm_uid,
                    nic: 0,
                    ip: Some(ip),
                    node,
                    release_at_unix_ms: 0,
                    ..
                }) if vm_uid == uid && !node.is_empty() => Some(ip),
                _ => None,
            });
            if let Some(ip) = leased {
                return Ok(ip);
            }
        }
        if start.elapsed() > BOOT_DEADLINE {
            bail!("timed out waiting for the VM's address lease");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Removes the lab nodes' pinned datapaths (bpffs outlives namespaces).
fn remove_datapath_pins() {
    for i in 1..=9 {
        if let Err(err) = basalt_sdn::loader::remove_pins(&format!("n{i}")) {
            tracing::warn!(node = i, error = %err, "could not remove a node's datapath pins");
        }
    }
}

/// `lab routes`: one /32 per VM in the root namespace via the node that
/// holds it, following endpoint moves (live migration, HA), so printed
/// addresses keep working wherever the VM goes. Runs until killed.
fn follow_routes(servers: &[String]) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let admins = servers
        .iter()
        .map(|s| AdminClient::connect_lazy(s).with_context(|| format!("admin API at {s}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let netlink = basalt_sdn::Netlink::new().context("netlink in the root namespace")?;
    runtime.block_on(basalt_agent::network::host_routes::follow(admins, netlink));
    bail!("stopped following the VMs' routes")
}

/// Routes the VM network from the root namespace through `via` (node 1),
/// for VMs the route follower has not routed yet. The route goes away with
/// the bridge when the lab is torn down (the follower's /32s too).
fn route_vm_network(via: Ipv4Addr) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(["route", "replace", VM_NETWORK, "via", &via.to_string()])
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip route replace {VM_NETWORK} via {via}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// This binary's path, for starting the lab's daemons. If a rebuild
/// replaced the file while `up` runs, the kernel names the old one
/// "PATH (deleted)": the new file at PATH is what to start.
fn own_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the basaltd binary")?;
    if exe.exists() {
        return Ok(exe);
    }
    let text = exe.to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(path) if std::path::Path::new(path).exists() => Ok(PathBuf::from(path)),
        _ => bail!("the basaltd binary {} is gone", exe.display()),
    }
}

/// Runs `basaltd ARGS` to completion; its stderr names any failure.
fn run_basaltd(basaltd: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(basaltd)
        .args(args)
        .output()
        .context("running basaltd")?;
    if !out.status.success() {
        bail!(
            "basaltd {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Polls `check` every 250 ms for up to [`BOOT_DEADLINE`].
/// The ids of the control plane's voting members (none while it does not
/// answer).
async fn voters(admin: &AdminClient) -> Vec<u64> {
    match admin.list(Kind::Member).await {
        Ok(list) => list
            .objects
            .iter()
            .filter_map(|o| match o {
                Object::Member(m) if m.voter => Some(m.id),
                _ => None,
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

async fn wait_for<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !check().await {
        if start.elapsed() > BOOT_DEADLINE {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// The end of node `node`'s agent log, for error messages.
fn log_tail(prefix: &Prefix, node: &str) -> String {
    Process::from_pid_file(prefix, &format!("agent-{node}")).map_or_else(
        |_| String::new(),
        |p| {
            let tail = p.log_tail(20);
            p.detach();
            tail
        },
    )
}

fn down() -> anyhow::Result<()> {
    let before = sweep::objects(LAB_PREFIX);
    let had_state = state_path().exists();
    sweep::tear_down(LAB_PREFIX).context("removing the lab")?;
    // bpffs outlives the namespaces: the agents' pins go too.
    remove_datapath_pins();
    let after = sweep::objects(LAB_PREFIX);
    if !after.is_empty() {
        bail!("could not remove all of the lab: left {after:?}");
    }
    if before.is_empty() && !had_state {
        println!("no lab was up");
    } else {
        println!(
            "lab removed: {} namespaces, {} links, {} processes",
            before.namespaces.len(),
            before.links.len(),
            before.processes.len()
        );
    }
    Ok(())
}

/// What answered when `check` looked.
#[derive(Debug)]
struct Health {
    libvirtd: Vec<bool>,
    /// Where the VM's domain runs (where `up` placed it when none does).
    vm_node: String,
    vm_state: Option<String>,
    vm_answers: bool,
}

impl Health {
    fn healthy(&self) -> bool {
        self.libvirtd.iter().all(|up| *up) && self.vm_answers
    }
}

fn check(state: &LabState) -> Health {
    let virsh = |uri: &str, args: &[&str]| {
        std::process::Command::new("virsh")
            .arg("-c")
            .arg(uri)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let libvirtd = state
        .nodes
        .iter()
        .map(|n| virsh(&n.libvirt_uri, &["version"]).is_some())
        .collect();
    // The VM runs where its domain runs: it may have moved since `up`
    // (a live migration, HA), so every node is asked, the one `up`
    // placed it on first.
    let mut domains: Vec<(String, String)> = state
        .nodes
        .iter()
        .filter_map(|n| {
            virsh(&n.libvirt_uri, &["domstate", &state.vm.domain])
                .map(|domstate| (n.name.clone(), domstate))
        })
        .collect();
    domains.sort_by_key(|(node, domstate)| (domstate != "running", *node != state.vm.node));
    let (vm_node, vm_state) = domains
        .into_iter()
        .next()
        .map_or((state.vm.node.clone(), None), |(node, domstate)| {
            (node, Some(domstate))
        });
    // A real round trip, not a bare connect: outside the lab's route the
    // host's uplink may accept any connection on the guest's behalf.
    let vm_answers = GuestClient::new(state.vm.ip)
        .echo("basalt-lab")
        .is_ok_and(|reply| reply == "basalt-lab");
    Health {
        libvirtd,
        vm_node,
        vm_state,
        vm_answers,
    }
}

fn describe(state: &LabState, health: &Health) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "NODE  ADDRESS        LIBVIRTD  URI");
    for (node, up) in state.nodes.iter().zip(&health.libvirtd) {
        let _ = writeln!(
            out,
            "{:<5} {:<14} {:<9} {}",
            node.name,
            node.address,
            if *up { "up" } else { "DOWN" },
            node.libvirt_uri
        );
    }
    let vm = &state.vm;
    let _ = writeln!(
        out,
        "\nVM {} on {}: {} (libvirt: {}; answers: {})",
        vm.name,
        health.vm_node,
        vm.ip,
        health.vm_state.as_deref().unwrap_or("unknown"),
        if health.vm_answers { "yes" } else { "NO" }
    );
    let uri = state
        .nodes
        .iter()
        .find(|n| n.name == health.vm_node)
        .map_or("", |n| n.libvirt_uri.as_str());
    let _ = writeln!(
        out,
        "  echo:       echo hello | busybox nc -w2 {} {}",
        vm.ip,
        guest::ECHO_PORT
    );
    let _ = writeln!(
        out,
        "  its disk:   busybox nc -w2 {} {}   (boot counter and data record)",
        vm.ip,
        guest::READ_PORT
    );
    let _ = writeln!(
        out,
        "  write disk: echo DATA | busybox nc -w2 {} {}",
        vm.ip,
        guest::WRITE_PORT
    );
    let _ = writeln!(out, "  console:    tail -f {}", vm.serial_log.display());
    let _ = writeln!(out, "  libvirt:    virsh -c {uri} dominfo {}", vm.domain);
    let _ = writeln!(
        out,
        "  cluster:    basalt --server {} list vms   (also: nodes, placements)",
        vm.server
    );
    let _ = writeln!(
        out,
        "\n`basaltd lab status` checks it; `basaltd lab down` removes it all."
    );
    out
}
