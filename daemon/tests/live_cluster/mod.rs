//! What the end-to-end tests of live moves on real libvirt share: a
//! control plane on namespace node `cp`, and on every other node a private
//! libvirtd, `basaltd storage serve --replica-listen` and `basaltd agent
//! --network --storage-socket` (libvirt compute, TCG); `cp` reaches each
//! VM through the node that holds it (`basaltd lab routes`). Also the
//! probes those tests hold against a guest while it moves: echoes every
//! 200 ms ([`Prober`]) and one TCP connection to its numbered stream read
//! all along ([`HeldStream`]), and what they look at on each node
//! (domains, taps, pools, storage links).
//!
//! Every agent keeps its node credential in a file under the test's
//! directory, so a test can kill one with SIGKILL and start it again
//! without a second join token.

#![allow(dead_code)] // each test uses its own subset

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_agent::network::datapath::is_vm_tap;
use basalt_api::{
    AdminClient, ApiError, Endpoint, Kind, Network, NetworkSpec, Object, ObjectMeta, Placement,
    ReplicaPeerState, StorageClient, Vm,
};
use basalt_testkit::guest::GuestClient;
use basalt_testkit::guest::client::NumberStream;
use basalt_testkit::nbd_client::NbdClient;
use basalt_testkit::{Fabric, Libvirtd, Node, Prefix, Process, ProcessSpec, wait};

pub use crate::common::basalt;
use crate::common::{self, BASALTD};

/// A TCG guest on a loaded machine boots slowly: generous, not tight.
pub const DEADLINE: Duration = Duration::from_secs(240);
/// The control plane's port on `cp`.
pub const CONTROL_PORT: u16 = 7400;
/// The replication port on each node's address.
pub const REPLICA_PORT: u16 = 7789;
/// Where every node's storage process serves NBD, inside its namespace.
pub const NBD: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10809);
/// Quick controllers, and a released address held only briefly.
pub const CONFIG: &str = "[nodes]\ncontroller_period_ms = 200\n[ipam]\nrelease_grace_ms = 1000\n";

/// Exit status, stdout and stderr of a command, for assertions.
pub fn text(out: &Output) -> String {
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
        .args(["storage", "pool", "create", "--size", "512M", "--path"])
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

/// Removes the nodes' pinned datapaths when the test ends.
struct Pins(Vec<String>);

impl Drop for Pins {
    fn drop(&mut self) {
        for node in &self.0 {
            let _ = basalt_sdn::loader::remove_pins(node);
        }
    }
}

/// The running cluster. Fields drop in order: daemons first, namespaces
/// last.
pub struct LiveCluster {
    /// `basaltd lab routes` on `cp`.
    pub routes: Process,
    /// One agent per node, in the order of [`LiveCluster::nodes`].
    pub agents: Vec<Process>,
    /// The control plane on `cp`.
    pub control: Process,
    /// Its admin API.
    pub admin: AdminClient,
    /// `cp:port`, for the CLI.
    pub server: String,
    /// The storage-local API of each node's storage process.
    pub clients: Vec<StorageClient>,
    /// One storage process per node.
    pub storages: Vec<Process>,
    /// One libvirtd per node.
    pub libvirtds: Vec<Libvirtd>,
    /// What the agents name their domains: prefix + VM name.
    pub domain_prefix: String,
    _pins: Pins,
    /// The node running the control plane and the route follower.
    pub cp: Node,
    /// The libvirt nodes.
    pub nodes: Vec<Node>,
    _fabric: Fabric,
}

impl LiveCluster {
    /// Starts the nodes `names` and `cp`; returns once every node has
    /// joined and published its replication address. Each agent has a
    /// join token good for one registration (a removed node cannot join
    /// again) and restarts with its stored credential.
    pub async fn start(prefix: &Prefix, names: &[&str]) -> LiveCluster {
        let dir = prefix.dir().to_path_buf();
        let mut fabric = Fabric::new(prefix).expect("fabric");
        let nodes: Vec<Node> = names
            .iter()
            .map(|n| fabric.add_node(n).expect("node"))
            .collect();
        let cp = fabric.add_node("cp").expect("node cp");
        // Node names are the namespaces' (unique per test): they name the pins.
        let pins = Pins(nodes.iter().map(|n| n.netns().to_owned()).collect());
        let hosts = fabric.hosts();
        let libvirtds: Vec<Libvirtd> = std::thread::scope(|s| {
            let started: Vec<_> = nodes
                .iter()
                .map(|n| s.spawn(|| Libvirtd::start(prefix, n, &hosts).expect("libvirtd")))
                .collect();
            started
                .into_iter()
                .map(|t| t.join().expect("libvirtd thread"))
                .collect()
        });
        let sockets: Vec<PathBuf> = nodes
            .iter()
            .map(|n| dir.join(format!("storage-{}.sock", n.name())))
            .collect();
        let mut storages: Vec<Process> = nodes
            .iter()
            .zip(&sockets)
            .map(|(n, socket)| {
                let pool = create_pool(&dir, n.name());
                Process::start(prefix, storage_spec(prefix, n, &pool, socket)).expect("storage")
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
            common::start_control(prefix, &server, Some(&cp), DEADLINE, Some(CONFIG)).await;
        let domain_prefix = format!("{}-", prefix.name());
        let mut agents = Vec::new();
        for ((node, libvirtd), socket) in nodes.iter().zip(&libvirtds).zip(&sockets) {
            // One single-use token per node: a removed node cannot join
            // again; a restarted agent uses its stored credential.
            let secret = common::join_token(&admin, &format!("join-{}", node.name()), 1).await;
            let agent = Process::start(
                prefix,
                ProcessSpec::new(format!("agent-{}", node.name()), BASALTD)
                    .args(["agent", "--node", node.netns(), "--server", &server])
                    .args(["--address", &format!("{}:7500", node.addr())])
                    .args(["--libvirt-uri", &libvirtd.uri()])
                    .args(["--network", "--domain-prefix", &domain_prefix])
                    .args(["--resync-ms", "500", "--stop-grace-ms", "1000"])
                    .args(["--cpus", "2", "--memory-mib", "2048"])
                    .arg("--storage-socket")
                    .arg(socket)
                    .arg("--credential-file")
                    .arg(dir.join(format!("credential-{}", node.name())))
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
            prefix,
            ProcessSpec::new("routes", BASALTD)
                .args(["lab", "routes", "--server", &server])
                .env("RUST_LOG", "info")
                .netns(&cp),
        )
        .expect("route follower");
        let cluster = LiveCluster {
            routes,
            agents,
            control,
            admin,
            server,
            clients,
            storages,
            libvirtds,
            domain_prefix,
            _pins: pins,
            cp,
            nodes,
            _fabric: fabric,
        };
        let count = names.len();
        wait::until(
            "every node joined and published its replication address",
            DEADLINE,
            &cluster.processes(),
            || async {
                let Ok(list) = cluster.admin.list(Kind::Node).await else {
                    return false;
                };
                list.objects.len() == count
                    && list.objects.iter().all(
                        |o| matches!(o, Object::Node(n) if !n.status.replication_address.is_empty()),
                    )
            },
        )
        .await;
        cluster
    }

    /// The daemons a wait watches (their logs are shown when it fails).
    pub fn processes(&self) -> Vec<&Process> {
        let mut all: Vec<&Process> = vec![&self.control, &self.routes];
        all.extend(self.agents.iter());
        all
    }

    /// Creates the network `default` (10.78.0.0/16).
    pub async fn default_network(&self) {
        self.admin
            .create(Object::Network(Network {
                meta: ObjectMeta::named("default"),
                spec: NetworkSpec {
                    cidr: "10.78.0.0/16".into(),
                    vni: 4278,
                    routing: None,
                },
            }))
            .await
            .expect("the network");
    }

    /// Creates `vm` (stopped), places it on node `on` with its disks on
    /// `replica_nodes` (indexes into [`LiveCluster::nodes`]), then sets it
    /// running. Returns the stored VM.
    pub async fn create_vm(&self, vm: Vm, on: usize, replica_nodes: &[usize]) -> Vm {
        let name = vm.meta.name.clone();
        let Object::Vm(stored) = self.admin.create(Object::Vm(vm)).await.expect("vm") else {
            panic!("a vm")
        };
        self.admin
            .create(Object::Placement(Placement {
                meta: ObjectMeta::named(&name),
                vm: name.clone(),
                node: self.nodes[on].netns().into(),
                epoch: 1,
                replica_nodes: replica_nodes
                    .iter()
                    .map(|i| self.nodes[*i].netns().to_owned())
                    .collect(),
            }))
            .await
            .expect("placement");
        loop {
            let Some(mut current) = get_vm(&self.admin, &name).await else {
                panic!("the vm is gone")
            };
            current.spec.running = true;
            match self.admin.update(Object::Vm(current)).await {
                Ok(_) => break,
                Err(ApiError::Aborted { .. }) => continue,
                Err(err) => panic!("run the vm: {err}"),
            }
        }
        stored
    }

    /// The index of node `netns` in [`LiveCluster::nodes`].
    pub fn index_of(&self, netns: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.netns() == netns)
            .unwrap_or_else(|| panic!("no node {netns}"))
    }

    /// Waits until the guest answers at `ip` from `cp`.
    pub async fn wait_guest(&self, prefix: &Prefix, vm: &str, ip: Ipv4Addr) {
        let cp = self.cp.clone();
        let ready = tokio::task::spawn_blocking(move || {
            GuestClient::in_node(ip, Some(&cp)).wait_ready(DEADLINE)
        })
        .await
        .expect("join");
        ready.unwrap_or_else(|err| {
            panic!(
                "the guest does not answer at {ip} from cp: {err}\n{}",
                basalt_testkit::guest::log_tail(&prefix.log_dir().join(format!("{vm}.log")), 30)
            )
        });
    }

    /// Writes `data` as the guest's disk record from `cp`, then reads the
    /// record back.
    pub async fn write(
        &self,
        ip: Ipv4Addr,
        data: &'static str,
    ) -> Result<basalt_testkit::guest::DiskRecord, basalt_testkit::guest::client::ClientError> {
        let cp = self.cp.clone();
        tokio::task::spawn_blocking(move || {
            let client = GuestClient::in_node(ip, Some(&cp));
            client.write_disk(data)?;
            client.read_disk()
        })
        .await
        .expect("join")
    }
}

/// The whole of export `export` (`bytes` long) as the NBD server inside
/// `node` serves it.
pub fn read_all(node: &Node, export: &str, bytes: u64) -> std::io::Result<Vec<u8>> {
    let export = export.to_owned();
    node.run_in(move || {
        let mut client = NbdClient::connect(NBD, &export)?;
        let mut data = vec![0u8; bytes as usize];
        for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
            client.read(i as u64 * (1 << 20), chunk)?;
        }
        Ok(data)
    })
    .map_err(std::io::Error::other)?
}

/// Whether the nodes' copies of `volume` (`bytes` long) are the same bytes.
pub fn copies_match(nodes: &[&Node], volume: &str, bytes: u64) -> Result<(), String> {
    let first =
        read_all(nodes[0], volume, bytes).map_err(|e| format!("{}: {e}", nodes[0].name()))?;
    for node in &nodes[1..] {
        let copy = read_all(node, volume, bytes).map_err(|e| format!("{}: {e}", node.name()))?;
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

/// The placement of `vm`, if any.
pub async fn placement(admin: &AdminClient, vm: &str) -> Option<Placement> {
    match admin.get(Kind::Placement, vm).await {
        Ok(Object::Placement(p)) => Some(p),
        _ => None,
    }
}

/// VM `name`, if it exists.
pub async fn get_vm(admin: &AdminClient, name: &str) -> Option<Vm> {
    match admin.get(Kind::Vm, name).await {
        Ok(Object::Vm(vm)) => Some(vm),
        _ => None,
    }
}

/// The leased, placed endpoint of `vm`'s first NIC.
pub async fn endpoint_of(admin: &AdminClient, vm: &str) -> Option<Endpoint> {
    let list = admin.list(Kind::Endpoint).await.ok()?;
    list.objects.into_iter().find_map(|o| match o {
        Object::Endpoint(e) if e.vm == vm && !e.node.is_empty() && e.release_at_unix_ms == 0 => {
            Some(e)
        }
        _ => None,
    })
}

/// How many objects of `kind` the control plane holds.
pub async fn count(admin: &AdminClient, kind: Kind) -> Option<usize> {
    admin.list(kind).await.ok().map(|l| l.objects.len())
}

/// `volume`'s links from a primary, by peer address: state and dirty
/// chunks.
pub async fn links(storage: &StorageClient, volume: &str) -> Vec<(String, ReplicaPeerState, u64)> {
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
pub async fn in_sync(storage: &StorageClient, volume: &str, peers: usize) -> bool {
    let links = links(storage, volume).await;
    links.len() == peers
        && links
            .iter()
            .all(|(_, state, dirty)| *state == ReplicaPeerState::Connected && *dirty == 0)
}

/// The names of the volumes in a node's pool.
pub async fn volume_names(storage: &StorageClient) -> Option<Vec<String>> {
    storage
        .list_volumes()
        .await
        .ok()
        .map(|v| v.into_iter().map(|v| v.name).collect())
}

/// The VM taps in `node`'s namespace.
pub fn vm_taps(node: &Node) -> Vec<String> {
    node.ip(&["-o", "link", "show"])
        .expect("ip link")
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| is_vm_tap(name))
        .collect()
}

/// Every domain `libvirtd` holds, running or not.
pub fn domains(libvirtd: &Libvirtd) -> Vec<String> {
    libvirtd
        .virsh(&["list", "--all", "--name"])
        .expect("virsh list")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `virsh domstate` of `domain`, or `undefined`.
pub fn domain_state(libvirtd: &Libvirtd, domain: &str) -> String {
    libvirtd
        .virsh(&["domstate", domain])
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "undefined".into())
}

/// Echoes the guest from `cp` every 200 ms on its own thread until
/// stopped; keeps the longest run without an answer.
pub struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Duration)>>,
}

impl Prober {
    /// Starts probing `ip` from inside `cp`.
    pub fn start(ip: Ipv4Addr, cp: &Node) -> Prober {
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
    pub fn finish(mut self) -> (usize, Duration) {
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

/// What a [`HeldStream`] saw.
#[derive(Debug)]
pub struct StreamReport {
    /// Every number read, in order.
    pub numbers: Vec<u64>,
    /// The longest wait between two numbers.
    pub longest_pause: Duration,
    /// How the connection ended before it was stopped: a reset, a close
    /// by the guest, or a silence longer than the reader's limit.
    pub broken: Option<String>,
}

/// One TCP connection to the guest's numbered stream, opened from `cp`
/// and read on its own thread for as long as it is held: the proof that a
/// connection survives a move (no reset, no number lost or repeated).
pub struct HeldStream {
    stop: Arc<AtomicBool>,
    read: Arc<Mutex<usize>>,
    thread: Option<std::thread::JoinHandle<StreamReport>>,
}

impl HeldStream {
    /// Opens the connection from inside `cp`; the reader gives up after
    /// `silence` without a number (which [`StreamReport::broken`] says).
    pub fn open(ip: Ipv4Addr, cp: &Node, silence: Duration) -> HeldStream {
        let stream = GuestClient::in_node(ip, Some(cp))
            .open_stream()
            .expect("open the guest's numbered stream");
        HeldStream::hold(stream, silence)
    }

    /// Reads `stream` (any numbered connection to the guest, e.g. its
    /// memory dirtier's) on its own thread, as [`HeldStream::open`] does.
    pub fn hold(mut stream: NumberStream, silence: Duration) -> HeldStream {
        let stop = Arc::new(AtomicBool::new(false));
        let read = Arc::new(Mutex::new(0));
        let thread = {
            let (stop, read) = (stop.clone(), read.clone());
            std::thread::spawn(move || {
                let mut numbers = Vec::new();
                let mut longest_pause = Duration::ZERO;
                let mut last = Instant::now();
                let broken = loop {
                    if stop.load(Ordering::SeqCst) {
                        break None;
                    }
                    match stream.next_number(Duration::from_millis(500)) {
                        Ok(Some(n)) => {
                            numbers.push(n);
                            *read.lock().expect("count") = numbers.len();
                            longest_pause = longest_pause.max(last.elapsed());
                            last = Instant::now();
                        }
                        Ok(None) if last.elapsed() > silence => {
                            break Some(format!("nothing for {:?}", last.elapsed()));
                        }
                        Ok(None) => {}
                        Err(err) => break Some(err.to_string()),
                    }
                };
                StreamReport {
                    numbers,
                    longest_pause: longest_pause.max(if broken.is_some() {
                        last.elapsed()
                    } else {
                        Duration::ZERO
                    }),
                    broken,
                }
            })
        };
        HeldStream {
            stop,
            read,
            thread: Some(thread),
        }
    }

    /// How many numbers were read so far.
    pub fn read(&self) -> usize {
        *self.read.lock().expect("count")
    }

    /// Waits until `more` numbers beyond those read now have come, within
    /// `timeout`; false if they did not (at once if the reader gave up).
    pub fn wait_more(&self, more: usize, timeout: Duration) -> bool {
        let target = self.read() + more;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.read() >= target {
                return true;
            }
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                // The reader gave up (see `finish`): nothing more comes.
                return self.read() >= target;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Stops reading; returns what was seen.
    pub fn finish(mut self) -> StreamReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the stream reader panicked")
    }

    /// Stops reading and asserts the connection held: not broken, every
    /// number one more than the one before, no pause over `max_pause`.
    pub fn finish_intact(self, what: &str, max_pause: Duration) -> StreamReport {
        let report = self.finish();
        assert!(
            report.broken.is_none(),
            "{what}: the connection broke after {} numbers: {:?}",
            report.numbers.len(),
            report.broken
        );
        if let Err((i, prev, found)) = basalt_testkit::guest::check_consecutive(&report.numbers) {
            panic!("{what}: number {i} of the stream is {found} after {prev}");
        }
        assert!(
            report.longest_pause <= max_pause,
            "{what}: the stream paused {:?} (limit {max_pause:?})",
            report.longest_pause
        );
        report
    }
}

impl Drop for HeldStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
