//! Decommissioning a node under a running VM, end to end (root, libvirt,
//! TCG, Basalt's datapath and storage): a control plane on namespace node
//! `cp`, and on nodes `a`, `b` and `c` a private libvirtd, `basaltd
//! storage serve --replica-listen` and `basaltd agent --network
//! --storage-socket` (libvirt compute). The test guest runs on `a` from a
//! disk replicated to all three nodes, with a cloud-init seed and a NIC
//! whose address it takes by DHCP; `cp` reaches it through the node that
//! holds it (`basaltd lab routes`, the lab's route follower).
//!
//! - **Three replicas**: `a`'s primary ships to both secondaries; after
//!   the guest's writes all three copies are byte for byte the same.
//! - **Drain**: `basalt node drain a --wait` moves the VM live (the
//!   guest never reboots: its disk's boot counter stays 1) to `b` or `c`,
//!   seed and all (the target made the seed volume before the copy, and
//!   the running domain reads it there); it answers at the same address
//!   from its new node, and `a` keeps no domain and no tap.
//! - **A secondary lost**: the storage process of the other secondary is
//!   killed with SIGKILL: the guest keeps writing (the control plane
//!   records that copy outdated), and once the process is back the copy
//!   resyncs, the mark is cleared, and the three copies match again.
//! - **Remove, then delete everything**: `basalt node remove a` (no VM
//!   left there), then the VM and its network are deleted: no domain on
//!   any libvirtd, no VM tap in any node's namespace, no volume of the VM
//!   (disk or seed) in any node's pool — the removed node's too, whose
//!   agent still runs, fenced for good since its removal — and no
//!   placement, migration or endpoint (the IP lease) in the control
//!   plane.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_agent::network::datapath::is_vm_tap;
use basalt_agent::storage::disk_volume;
use basalt_agent::storage::seed::seed_volume;
use basalt_api::{
    AdminClient, ApiError, CloudInit, Disk, Endpoint, KernelBoot, Kind, MigrationPhase, Network,
    NetworkSpec, Nic, Object, ObjectMeta, Placement, ReplicaPeerState, StorageClient, Vm, VmPhase,
    VmSpec,
};
use basalt_testkit::guest::{GuestClient, GuestImage};
use basalt_testkit::nbd_client::NbdClient;
use basalt_testkit::{Fabric, Libvirtd, Node, Prefix, Process, ProcessSpec, wait};

use common::BASALTD;

/// A TCG guest on a loaded machine boots slowly: generous, not tight.
const DEADLINE: Duration = Duration::from_secs(240);
const CONTROL_PORT: u16 = 7400;
const REPLICA_PORT: u16 = 7789;
const NBD: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10809);
const DISK_BYTES: u64 = 16 << 20;
/// The longest the guest may go unanswered from `cp` while it moves live:
/// far above a switchover and its route change (about a second), below a
/// stop and a boot under TCG on a loaded machine.
const MAX_SILENCE: Duration = Duration::from_secs(20);
/// Quick controllers, and a released address held only briefly.
const CONFIG: &str = "[nodes]\ncontroller_period_ms = 200\n[ipam]\nrelease_grace_ms = 1000\n";
const USER_DATA: &str =
    "#cloud-config\nruncmd:\n  - [sh, -c, \"echo decommission-seed > /run/seed\"]\n";

fn basalt_cli() -> PathBuf {
    let path = PathBuf::from(BASALTD).with_file_name("basalt");
    assert!(
        path.is_file(),
        "the basalt CLI is not built at {} (cargo build -p basalt)",
        path.display()
    );
    path
}

/// Runs the `basalt` CLI against `server` off the async threads.
async fn basalt(server: &str, args: &[&str]) -> Output {
    let mut command = Command::new(basalt_cli());
    command.args(["--server", server]).args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run basalt"))
        .await
        .expect("join")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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

/// The whole of export `export` as the NBD server inside `node` serves it.
fn read_all(node: &Node, export: &str) -> std::io::Result<Vec<u8>> {
    let export = export.to_owned();
    node.run_in(move || {
        let mut client = NbdClient::connect(NBD, &export)?;
        let mut data = vec![0u8; DISK_BYTES as usize];
        for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
            client.read(i as u64 * (1 << 20), chunk)?;
        }
        Ok(data)
    })
    .map_err(std::io::Error::other)?
}

/// Whether the three nodes' copies of `volume` are the same bytes.
fn copies_match(nodes: &[&Node], volume: &str) -> Result<(), String> {
    let first = read_all(nodes[0], volume).map_err(|e| format!("{}: {e}", nodes[0].name()))?;
    for node in &nodes[1..] {
        let copy = read_all(node, volume).map_err(|e| format!("{}: {e}", node.name()))?;
        if copy != first {
            let at = copy.iter().zip(&first).position(|(a, b)| a != b);
            return Err(format!(
                "{}'s copy differs from {}'s at byte {at:?}",
                node.name(),
                nodes[0].name()
            ));
        }
    }
    Ok(())
}

async fn placement(admin: &AdminClient, vm: &str) -> Option<Placement> {
    match admin.get(Kind::Placement, vm).await {
        Ok(Object::Placement(p)) => Some(p),
        _ => None,
    }
}

async fn get_vm(admin: &AdminClient, name: &str) -> Option<Vm> {
    match admin.get(Kind::Vm, name).await {
        Ok(Object::Vm(vm)) => Some(vm),
        _ => None,
    }
}

/// The leased, placed endpoint of `vm`'s first NIC.
async fn endpoint_of(admin: &AdminClient, vm: &str) -> Option<Endpoint> {
    let list = admin.list(Kind::Endpoint).await.ok()?;
    list.objects.into_iter().find_map(|o| match o {
        Object::Endpoint(e) if e.vm == vm && !e.node.is_empty() && e.release_at_unix_ms == 0 => {
            Some(e)
        }
        _ => None,
    })
}

/// How many objects of `kind` the control plane holds.
async fn count(admin: &AdminClient, kind: Kind) -> Option<usize> {
    admin.list(kind).await.ok().map(|l| l.objects.len())
}

/// `volume`'s links from a primary, by peer address: state and dirty
/// chunks.
async fn links(storage: &StorageClient, volume: &str) -> Vec<(String, ReplicaPeerState, u64)> {
    storage
        .status()
        .await
        .map(|s| {
            s.replicas
                .into_iter()
                .filter(|r| r.volume == volume)
                .map(|r| (r.peer, r.state, r.dirty_chunks))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every link of `volume` from the primary is connected with
/// nothing dirty, and there are `peers` of them.
async fn in_sync(storage: &StorageClient, volume: &str, peers: usize) -> bool {
    let links = links(storage, volume).await;
    links.len() == peers
        && links
            .iter()
            .all(|(_, state, dirty)| *state == ReplicaPeerState::Connected && *dirty == 0)
}

async fn volume_names(storage: &StorageClient) -> Option<Vec<String>> {
    storage
        .list_volumes()
        .await
        .ok()
        .map(|v| v.into_iter().map(|v| v.name).collect())
}

fn vm_taps(node: &Node) -> Vec<String> {
    node.ip(&["-o", "link", "show"])
        .expect("ip link")
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| is_vm_tap(name))
        .collect()
}

fn domains(libvirtd: &Libvirtd) -> Vec<String> {
    libvirtd
        .virsh(&["list", "--all", "--name"])
        .expect("virsh list")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn domain_state(libvirtd: &Libvirtd, domain: &str) -> String {
    libvirtd
        .virsh(&["domstate", domain])
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "undefined".into())
}

/// Echoes the guest from `cp` every 200 ms on its own thread until
/// stopped; keeps the longest run without an answer.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Duration)>>,
}

impl Prober {
    fn start(ip: Ipv4Addr, cp: &Node) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let cp = cp.clone();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut answers, mut last, mut gap) = (0, Instant::now(), Duration::ZERO);
                while !stop.load(Ordering::SeqCst) {
                    if GuestClient::in_node(ip, Some(&cp)).echo("probe").is_ok() {
                        answers += 1;
                        last = Instant::now();
                    }
                    gap = gap.max(last.elapsed());
                    std::thread::sleep(Duration::from_millis(200));
                }
                (answers, gap)
            })
        };
        Prober {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; returns how many probes were answered and the longest time
    /// without an answer.
    fn finish(mut self) -> (usize, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the prober panicked")
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Removes the nodes' pinned datapaths when the test ends.
struct Pins(Vec<String>);

impl Drop for Pins {
    fn drop(&mut self) {
        for node in &self.0 {
            let _ = basalt_sdn::loader::remove_pins(node);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_drained_live_removed_and_nothing_is_left() {
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
    let nodes = [a.clone(), b.clone(), c.clone()];
    // Node names are the namespaces' (unique per test): they name the pins.
    let _pins = Pins(nodes.iter().map(|n| n.netns().to_owned()).collect());
    let hosts = fabric.hosts();
    let libvirtds: Vec<Libvirtd> = std::thread::scope(|s| {
        let started: Vec<_> = nodes
            .iter()
            .map(|n| s.spawn(|| Libvirtd::start(&prefix, n, &hosts).expect("libvirtd")))
            .collect();
        started
            .into_iter()
            .map(|t| t.join().expect("libvirtd thread"))
            .collect()
    });
    let image = GuestImage::build().expect("guest image");

    let sockets: Vec<PathBuf> = nodes
        .iter()
        .map(|n| dir.join(format!("storage-{}.sock", n.name())))
        .collect();
    let mut storages: Vec<Process> = nodes
        .iter()
        .zip(&sockets)
        .map(|(n, socket)| {
            let pool = create_pool(&dir, n.name());
            Process::start(&prefix, storage_spec(&prefix, n, &pool, socket)).expect("storage")
        })
        .collect();
    for (storage, n) in storages.iter_mut().zip(&nodes) {
        storage
            .wait_for_tcp(NBD, Some(n), Duration::from_secs(30))
            .expect("storage listening");
    }
    let clients: Vec<StorageClient> = sockets
        .iter()
        .map(|s| StorageClient::connect_unix(s).expect("storage client"))
        .collect();

    let server = format!("{}:{CONTROL_PORT}", cp.addr());
    let (control, admin) =
        common::start_control(&prefix, &server, Some(&cp), DEADLINE, Some(CONFIG)).await;
    let domain_prefix = format!("{}-", prefix.name());
    let mut agents = Vec::new();
    for ((node, libvirtd), socket) in nodes.iter().zip(&libvirtds).zip(&sockets) {
        // One single-use token per node: a removed node cannot join again.
        let secret = common::join_token(&admin, &format!("join-{}", node.name()), 1).await;
        let agent = Process::start(
            &prefix,
            ProcessSpec::new(format!("agent-{}", node.name()), BASALTD)
                .args(["agent", "--node", node.netns(), "--server", &server])
                .args(["--address", &format!("{}:7500", node.addr())])
                .args(["--libvirt-uri", &libvirtd.uri()])
                .args(["--network", "--domain-prefix", &domain_prefix])
                .args(["--resync-ms", "500", "--stop-grace-ms", "1000"])
                .args(["--cpus", "2", "--memory-mib", "2048"])
                .arg("--storage-socket")
                .arg(socket)
                .arg("--console-dir")
                .arg(prefix.log_dir())
                .env("BASALT_JOIN_TOKEN", &secret)
                .env("RUST_LOG", "info")
                .netns(node),
        )
        .expect("agent");
        agents.push(agent);
    }
    // The route follower: cp reaches each VM through the node holding it.
    let routes = Process::start(
        &prefix,
        ProcessSpec::new("routes", BASALTD)
            .args(["lab", "routes", "--server", &server])
            .env("RUST_LOG", "info")
            .netns(&cp),
    )
    .expect("route follower");
    let everything = || {
        let mut all: Vec<&Process> = vec![&control, &routes];
        all.extend(agents.iter());
        all
    };
    wait::until(
        "three nodes joined and published their replication addresses",
        DEADLINE,
        &everything(),
        || async {
            let Ok(list) = admin.list(Kind::Node).await else {
                return false;
            };
            list.objects.len() == 3
                && list.objects.iter().all(
                    |o| matches!(o, Object::Node(n) if !n.status.replication_address.is_empty()),
                )
        },
    )
    .await;
    admin
        .create(Object::Network(Network {
            meta: ObjectMeta::named("default"),
            spec: NetworkSpec {
                cidr: "10.78.0.0/16".into(),
                vni: 4278,
            },
        }))
        .await
        .expect("the network");

    // The VM, stopped, placed on a with its disk on a, b and c; then run.
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
                replicas: 3,
            }],
            kernel: Some(KernelBoot {
                kernel: image.kernel().to_string_lossy().into_owned(),
                initrd: image.initrd().to_string_lossy().into_owned(),
                cmdline: "console=ttyS0 basalt.dhcp=1".into(),
            }),
            nics: vec![Nic {
                network: "default".into(),
                mac: None,
                ip: None,
            }],
            cloud_init: Some(CloudInit {
                user_data: USER_DATA.into(),
                network_config: None,
                ssh_authorized_keys: Vec::new(),
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
            node: a.netns().into(),
            epoch: 1,
            replica_nodes: nodes.iter().map(|n| n.netns().to_owned()).collect(),
        }))
        .await
        .expect("placement on a");
    loop {
        let Some(mut current) = get_vm(&admin, "db").await else {
            panic!("the vm is gone")
        };
        current.spec.running = true;
        match admin.update(Object::Vm(current)).await {
            Ok(_) => break,
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => panic!("run the vm: {err}"),
        }
    }
    let volume = disk_volume(&stored.meta.uid, "root");
    let seed = seed_volume(&stored).expect("a seed");
    let domain = format!("{domain_prefix}db");

    // Three replicas: a's primary in sync with both secondaries.
    wait::until(
        "a's primary is in sync with b's and c's copies",
        DEADLINE,
        &everything(),
        || async { in_sync(&clients[0], &volume, 2).await },
    )
    .await;
    wait::until("the domain runs on a", DEADLINE, &everything(), || async {
        domain_state(&libvirtds[0], &domain) == "running"
    })
    .await;
    wait::until("the NIC is leased", DEADLINE, &everything(), || async {
        endpoint_of(&admin, "db").await.is_some()
    })
    .await;
    let leased = endpoint_of(&admin, "db").await.expect("the endpoint");
    let ip = leased.ip.expect("the leased address");
    let guest = {
        let cp = cp.clone();
        tokio::task::spawn_blocking(move || {
            GuestClient::in_node(ip, Some(&cp)).wait_ready(DEADLINE)
        })
        .await
        .expect("join")
    };
    guest.unwrap_or_else(|err| {
        panic!(
            "the guest does not answer at {ip} from cp: {err}\n{}",
            basalt_testkit::guest::log_tail(&prefix.log_dir().join("db.log"), 30)
        )
    });
    let write = |data: &'static str| {
        let cp = cp.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let client = GuestClient::in_node(ip, Some(&cp));
                client.write_disk(data)?;
                client.read_disk()
            })
            .await
            .expect("join")
        }
    };
    let record = write("before-drain").await.expect("the guest writes");
    assert_eq!((record.boots, record.data.as_str()), (1, "before-drain"));
    {
        let (nodes, volume) = (nodes.clone(), volume.clone());
        tokio::task::spawn_blocking(move || {
            copies_match(&[&nodes[0], &nodes[1], &nodes[2]], &volume)
        })
        .await
        .expect("join")
        .expect("three copies after the first writes");
    }
    assert!(
        volume_names(&clients[0])
            .await
            .is_some_and(|v| v.contains(&seed)),
        "a holds the seed"
    );

    // Drain a: the VM moves live, answering all along.
    let prober = Prober::start(ip, &cp);
    let out = basalt(
        &server,
        &["node", "drain", a.netns(), "--wait", "--timeout", "300s"],
    )
    .await;
    let (answered, gap) = prober.finish();
    assert!(
        out.status.success() && text(&out).contains("moved live"),
        "drain: {}",
        text(&out)
    );
    eprintln!("drain: {answered} probes answered, longest silence {gap:?}");
    // A cold move would be silent for a whole stop and boot (and the
    // guest's boot counter below would say 2).
    assert!(
        answered > 0 && gap < MAX_SILENCE,
        "the VM did not keep answering through the drain: {answered} answers, {gap:?} silent"
    );
    let moved = placement(&admin, "db").await.expect("placed");
    assert_eq!(moved.epoch, 2, "one move, one epoch: {moved:?}");
    let t = nodes
        .iter()
        .position(|n| n.netns() == moved.node)
        .filter(|i| *i != 0)
        .unwrap_or_else(|| panic!("moved to {}", moved.node));
    let s = 3 - t; // the other secondary (b = 1, c = 2)
    let Ok(Object::Migration(m)) = admin.get(Kind::Migration, "db").await else {
        panic!("the drain's migration is kept")
    };
    assert_eq!(m.status.phase, MigrationPhase::Succeeded, "{m:?}");
    assert_eq!(domain_state(&libvirtds[t], &domain), "running");
    wait::until(
        "a keeps no domain and no tap",
        DEADLINE,
        &everything(),
        || async { domains(&libvirtds[0]).is_empty() && vm_taps(&a).is_empty() },
    )
    .await;
    // The seed came along: the target made it before the copy, and the
    // running domain reads its CD-ROM from the target's pool.
    assert!(
        volume_names(&clients[t])
            .await
            .is_some_and(|v| v.contains(&seed)),
        "the target holds the seed"
    );
    let xml = libvirtds[t]
        .virsh(&["dumpxml", &domain])
        .expect("dumpxml on the target");
    assert!(
        xml.split("<disk ")
            .any(|d| d.contains("device='cdrom'") && d.contains(&format!("name='{seed}'"))),
        "the migrated domain has no seed CD-ROM:\n{xml}"
    );
    wait::until(
        "the VM reports running on its new node",
        DEADLINE,
        &everything(),
        || async {
            get_vm(&admin, "db").await.is_some_and(|v| {
                v.status.phase == VmPhase::Running
                    && v.status.node.as_deref() == Some(moved.node.as_str())
            })
        },
    )
    .await;
    // Live, not cold: the same boot, the same address.
    let record = write("after-drain")
        .await
        .expect("the guest writes after the drain");
    assert_eq!(
        (record.boots, record.data.as_str()),
        (1, "after-drain"),
        "the guest rebooted during the drain"
    );
    assert_eq!(
        endpoint_of(&admin, "db").await.and_then(|e| e.ip),
        Some(ip),
        "the address stays"
    );
    wait::until(
        "the new primary is in sync with both other copies",
        DEADLINE,
        &everything(),
        || async { in_sync(&clients[t], &volume, 2).await },
    )
    .await;
    {
        let (nodes, volume) = (nodes.clone(), volume.clone());
        tokio::task::spawn_blocking(move || {
            copies_match(&[&nodes[t], &nodes[0], &nodes[s]], &volume)
        })
        .await
        .expect("join")
        .expect("three copies after the drain");
    }

    // The other secondary's storage process dies: the guest keeps
    // writing once the control plane has that copy recorded outdated.
    storages[s].kill9().expect("kill -9 a secondary's storage");
    let lost = nodes[s].netns().to_owned();
    wait::until(
        "the guest writes with one copy lost",
        DEADLINE,
        &everything(),
        || async {
            write("one-copy-lost")
                .await
                .is_ok_and(|r| r.data == "one-copy-lost" && r.boots == 1)
        },
    )
    .await;
    let marked = get_vm(&admin, "db").await.expect("vm");
    assert_eq!(
        marked.status.outdated_replicas,
        [lost],
        "the lost copy is recorded outdated"
    );
    storages[s]
        .restart()
        .expect("restart the secondary's storage");
    storages[s]
        .wait_for_tcp(NBD, Some(&nodes[s]), Duration::from_secs(30))
        .expect("storage listening again");
    wait::until(
        "the lost copy resyncs and its mark is cleared",
        DEADLINE,
        &everything(),
        || async {
            in_sync(&clients[t], &volume, 2).await
                && get_vm(&admin, "db")
                    .await
                    .is_some_and(|v| v.status.outdated_replicas.is_empty())
        },
    )
    .await;
    {
        let (nodes, volume) = (nodes.clone(), volume.clone());
        tokio::task::spawn_blocking(move || {
            copies_match(&[&nodes[t], &nodes[0], &nodes[s]], &volume)
        })
        .await
        .expect("join")
        .expect("three copies after the resync");
    }

    // Remove a (nothing runs there), then delete the VM and its network.
    let out = basalt(&server, &["node", "remove", a.netns()]).await;
    assert!(
        out.status.success() && text(&out).contains("removed"),
        "remove: {}",
        text(&out)
    );
    // The removed node's agent keeps running, fenced for good (its token
    // is spent); its pool still holds a copy of the VM's disk.
    wait::until(
        "the removed node's agent has fenced itself",
        DEADLINE,
        &everything(),
        || async { agents[0].log_tail(50).contains("fencing window") },
    )
    .await;
    assert!(
        volume_names(&clients[0])
            .await
            .is_some_and(|v| v.contains(&volume)),
        "the removed node holds its copy until the VM is deleted"
    );
    let out = basalt(
        &server,
        &["vm", "delete", "db", "--wait", "--timeout", "120s"],
    )
    .await;
    assert!(out.status.success(), "delete: {}", text(&out));
    wait::until(
        "the VM's address is released",
        DEADLINE,
        &everything(),
        || async { count(&admin, Kind::Endpoint).await == Some(0) },
    )
    .await;
    admin
        .delete(Kind::Network, "default", None)
        .await
        .expect("delete the network");

    // Nothing is left, on any node, in any pool, in the control plane.
    wait::until(
        "no domain, tap or volume of the VM is left on any node",
        DEADLINE,
        &everything(),
        || async {
            for (i, node) in nodes.iter().enumerate() {
                if !domains(&libvirtds[i]).is_empty() || !vm_taps(node).is_empty() {
                    return false;
                }
                match volume_names(&clients[i]).await {
                    Some(names) if !names.contains(&volume) && !names.contains(&seed) => {}
                    _ => return false,
                }
            }
            true
        },
    )
    .await;
    for kind in [Kind::Vm, Kind::Placement, Kind::Migration, Kind::Endpoint] {
        wait::until(
            &format!("no {kind:?} object is left"),
            DEADLINE,
            &everything(),
            || async { count(&admin, kind).await == Some(0) },
        )
        .await;
    }
    let left: Vec<String> = admin
        .list(Kind::Node)
        .await
        .expect("nodes")
        .objects
        .into_iter()
        .map(|o| o.name().to_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n == a.netns()) && left.len() == 2,
        "a stays removed: {left:?}"
    );
}
