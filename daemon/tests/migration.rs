//! Live migration end to end, on Basalt's own datapath (root, libvirt,
//! TCG): a control plane and three agents running `--network` on namespace
//! nodes n1, n2 (libvirt compute, each on its node's private libvirtd) and
//! n3 (simulated compute). The test guest runs on n1 and takes its
//! IPAM-leased address by DHCP; a peer VM placed on n3 — a namespace whose
//! NIC is relayed frame by frame to its tap on n3, as QEMU would — holds
//! one TCP connection to the guest's numbered stream through the eBPF
//! datapath and the VXLAN overlay. `basalt vm migrate web --to n2 --wait`
//! moves the guest, then a second migration brings it back to n1. After
//! each move:
//! - the connection is still the same one: no reset, every number in
//!   order, no pause longer than 5 s — although a policy that selects the
//!   VM (nothing in or out) was applied after the connection opened: the
//!   VM's connection-tracking entries moved with it, so the established
//!   flow passes on the new node while new connections are refused there;
//! - the VM runs on its new node only, and its placement moved with the
//!   next epoch;
//! - its endpoint names the new node at that epoch, and was written
//!   *before* the placement moved: the target's agent moved it on the
//!   guest's activation (its first frame on the standby tap), and the
//!   controller's switchover did not write it again.
//!
//! A third migration, which the target refuses (its migration ports
//! reset), fails and leaves the VM, its placement and its endpoint on the
//! source, the stream flowing and no standby tap on the target. Once the
//! policy is deleted the VM answers a new connection at the same address.
//!
//! Last, n1 is lost (its agent and libvirtd killed with SIGKILL, its link
//! cut; n3 cordoned): HA restarts the VM on n2 at a newer epoch, its
//! endpoint fenced over with the same address and MAC, and the new boot
//! answers the peer there.
//! The CLI is the workspace's `basalt` binary, next to `basaltd` (the
//! `basalt` package's own tests make `cargo test` build it).

mod common;
mod datapath;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_agent::vm_domain::{derived_mac, tap_name, vm_uuid};
use basalt_api::{
    AdminClient, Endpoint, KernelBoot, Kind, MigrationPhase, Network, NetworkSpec, Nic, Object,
    ObjectMeta, Placement, Policy, PolicySpec, Vm, VmPhase, VmSpec,
};
use basalt_sdn::tap::Tap;
use basalt_testkit::guest::{self, GuestClient, GuestImage, check_consecutive};
use basalt_testkit::{Fabric, Libvirtd, Node, Prefix, Process, ProcessSpec, wait};

use common::BASALTD;

/// A TCG guest under a loaded machine boots slowly: generous, not tight.
const DEADLINE: Duration = Duration::from_secs(180);
const CONTROL_PORT: u16 = 7400;
/// The longest pause the peer's stream may see across a move: far above
/// a switchover on activation (well under a second), far below one that
/// waits for the control plane's verdict and TCP's backed-off retries.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Node leases of a few seconds, so losing n1 takes seconds.
const SHORT_LEASES: &str = "[nodes]\nlease_seconds = 3\nheartbeat_interval_ms = 300\nha_after_ms = 3000\ncontroller_period_ms = 200\n";

/// udhcpc's event script: the lease as a /32 behind the on-link router.
const DHCP_SCRIPT: &str = "#!/bin/sh
case \"$1\" in
bound|renew)
    ip addr replace \"$ip/32\" dev \"$interface\"
    ip route replace \"$router\" dev \"$interface\"
    ip route replace default via \"$router\" dev \"$interface\"
    ;;
esac
";

use common::basalt_cli;

fn domain_state(libvirtd: &Libvirtd, domain: &str) -> String {
    libvirtd
        .virsh(&["domstate", domain])
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "undefined".into())
}

async fn placement(admin: &AdminClient, vm: &str) -> Option<Placement> {
    match admin.get(Kind::Placement, vm).await {
        Ok(Object::Placement(p)) => Some(p),
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

fn has_link(node: &Node, name: &str) -> bool {
    node.ip(&["link", "show", "dev", name]).is_ok()
}

/// Makes `node` refuse (`on`) or accept again TCP connections to its
/// libvirt migration ports, where an incoming QEMU listens for the copy:
/// a migration to it then fails at once.
fn refuse_migrations(node: &Node, on: bool) {
    let script = if on {
        "table inet migration-refused {
            chain input {
                type filter hook input priority -10;
                tcp dport 49152-49215 reject with tcp reset
            }
        }"
    } else {
        "delete table inet migration-refused"
    };
    let mut child = node
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run nft");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), script.as_bytes())
        .expect("write the nft script");
    assert!(child.wait().expect("nft").success(), "nft: {script}");
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

/// The peer VM's NIC: the tap `vnic0` inside the peer's namespace, relayed
/// frame by frame to the VM's tap on its node (what QEMU does with a
/// guest's NIC). Stops relaying when dropped.
struct Relay {
    _frames: basalt_sdn::tap::Relay,
}

impl Relay {
    const NIC: &str = "vnic0";

    fn start(node: &Node, tap: &str, peer: &Node, mac: [u8; 6]) -> Relay {
        let tap = tap.to_owned();
        let node_side = node
            .run_in(move || Tap::open(&tap).expect("open the node's tap"))
            .expect("enter the node");
        let guest_side = peer
            .run_in(|| Tap::open(Relay::NIC).expect("the peer's NIC"))
            .expect("enter the peer");
        let mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        peer.ip(&[
            "link",
            "set",
            Relay::NIC,
            "address",
            &mac,
            "mtu",
            "1450",
            "up",
        ])
        .expect("bring the peer's NIC up");
        Relay {
            _frames: basalt_sdn::tap::Relay::start(&node_side, &guest_side)
                .expect("relay the peer's NIC"),
        }
    }

    /// Runs udhcpc on the peer's NIC; returns the address it bound.
    fn dhcp(peer: &Node, script: &Path) -> Ipv4Addr {
        let out = peer
            .command("busybox")
            .args(["udhcpc", "-i", Relay::NIC, "-f", "-q", "-n"])
            .args(["-t", "20", "-T", "1", "-s"])
            .arg(script)
            .output()
            .expect("run udhcpc");
        assert!(
            out.status.success(),
            "udhcpc in the peer: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let shown = peer
            .ip(&["-4", "-o", "addr", "show", "dev", Relay::NIC])
            .expect("the peer's address");
        shown
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address on the peer's NIC: {shown}"))
    }
}

/// Reads the guest's numbered stream on its own thread until told to
/// stop; keeps every number (with when it came) and the first error.
struct StreamReader {
    stop: Arc<AtomicBool>,
    numbers: Arc<std::sync::Mutex<Vec<(u64, Instant)>>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl StreamReader {
    fn start(guest_ip: Ipv4Addr, peer: &Node) -> StreamReader {
        let mut stream = GuestClient::in_node(guest_ip, Some(peer))
            .open_stream()
            .expect("open the numbered stream");
        let stop = Arc::new(AtomicBool::new(false));
        let numbers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let thread = {
            let (stop, numbers) = (stop.clone(), numbers.clone());
            std::thread::spawn(move || {
                let mut idle = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    match stream.next_number(Duration::from_millis(500)) {
                        Ok(Some(n)) => {
                            numbers
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((n, Instant::now()));
                            idle = Instant::now();
                        }
                        // Nothing for a while (a switchover) is fine; a
                        // closed or reset connection is not.
                        Ok(None) if idle.elapsed() < Duration::from_secs(60) => {}
                        Ok(None) => return Err("the stream stalled for 60 s or closed".into()),
                        Err(err) => return Err(format!("the stream broke: {err}")),
                    }
                }
                Ok(())
            })
        };
        StreamReader {
            stop,
            numbers,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.numbers.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn finish(mut self) -> Vec<(u64, Instant)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => panic!("{err}"),
                Err(_) => panic!("the stream reader panicked"),
            }
        }
        std::mem::take(&mut *self.numbers.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Creates `vm` stopped, places it on `node` by hand at epoch 1 (so the
/// scheduler does not pick a node first), then tells it to run. Returns
/// the stored VM.
async fn create_placed(admin: &AdminClient, vm: Vm, node: &str) -> Vm {
    let name = vm.meta.name.clone();
    let Object::Vm(stored) = admin.create(Object::Vm(vm)).await.expect("vm") else {
        panic!("a vm")
    };
    admin
        .create(Object::Placement(Placement {
            meta: ObjectMeta::named(&name),
            vm: name.clone(),
            node: node.to_owned(),
            epoch: 1,
            ..Placement::default()
        }))
        .await
        .expect("placement");
    // Controllers write the VM's status meanwhile: re-read on a conflict.
    loop {
        let Ok(Object::Vm(mut current)) = admin.get(Kind::Vm, &name).await else {
            panic!("the vm is gone")
        };
        current.spec.running = true;
        match admin.update(Object::Vm(current)).await {
            Ok(_) => break,
            Err(basalt_api::ApiError::Aborted { .. }) => continue,
            Err(err) => panic!("run the vm: {err}"),
        }
    }
    stored
}

/// Everything one move needs to look at.
struct World<'a> {
    admin: &'a AdminClient,
    cli: &'a Path,
    server: &'a str,
    domain: &'a str,
    guest_ip: Ipv4Addr,
    peer: &'a Node,
    logs: &'a [&'a Process],
}

impl World<'_> {
    /// Migrates the guest from `from` to `to` while `reader` reads its
    /// stream, and checks everything the module doc lists but the stream's
    /// order (checked once at the end).
    async fn migrate(
        &self,
        reader: &StreamReader,
        (from, from_libvirtd): (&str, &Libvirtd),
        (to, to_libvirtd): (&str, &Libvirtd),
    ) {
        let before = placement(self.admin, "web").await.expect("placed");
        assert_eq!(before.node, from);
        let migrate = {
            let (cli, server, to) = (self.cli.to_owned(), self.server.to_owned(), to.to_owned());
            tokio::task::spawn_blocking(move || {
                Command::new(cli)
                    .args(["--server", &server, "vm", "migrate", "web", "--to", &to])
                    .arg("--wait")
                    .output()
                    .expect("run basalt vm migrate")
            })
            .await
            .expect("join")
        };
        let stdout = String::from_utf8_lossy(&migrate.stdout);
        let stderr = String::from_utf8_lossy(&migrate.stderr);
        let tails = || {
            self.logs
                .iter()
                .map(|p| format!("--- {} ---\n{}", p.name(), p.log_tail(40)))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert!(
            migrate.status.success() && stdout.contains("Succeeded"),
            "basalt vm migrate to {to} failed:\n{stdout}\n{stderr}\n{}",
            tails()
        );
        let Ok(Object::Migration(m)) = self.admin.get(Kind::Migration, "web").await else {
            panic!("the migration object is kept")
        };
        assert_eq!(
            (
                m.status.phase,
                m.status.source.as_str(),
                m.status.target.as_str()
            ),
            (MigrationPhase::Succeeded, from, to)
        );

        // The placement moved with the next epoch; so did the endpoint,
        // ahead of it: written at an earlier log index than the
        // switchover's batch, which left it alone.
        let after = placement(self.admin, "web").await.expect("placed");
        assert_eq!((after.node.as_str(), after.epoch), (to, before.epoch + 1));
        let endpoint = endpoint_of(self.admin, "web").await.expect("the endpoint");
        assert_eq!(endpoint.ip, Some(self.guest_ip), "the address stays");
        assert_eq!(
            (endpoint.node.as_str(), endpoint.epoch),
            (to, after.epoch),
            "the endpoint names the new node at the new epoch"
        );
        assert!(
            endpoint.meta.resource_version < after.meta.resource_version,
            "the endpoint moved on activation, before the switchover \
             (endpoint at version {}, placement at {}):\n{}",
            endpoint.meta.resource_version,
            after.meta.resource_version,
            tails()
        );

        // The connection carries on from the new node.
        let moved_at = reader.count();
        wait::until(
            "the stream flows after the move",
            DEADLINE,
            self.logs,
            || async { reader.count() >= moved_at + 20 },
        )
        .await;
        // The target's agent owns the VM now: it reports it running there.
        wait::until(
            "the target reports the VM running",
            DEADLINE,
            self.logs,
            || async {
                matches!(self.admin.get(Kind::Vm, "web").await,
                Ok(Object::Vm(vm)) if vm.status.phase == VmPhase::Running
                    && vm.status.node.as_deref() == Some(to))
            },
        )
        .await;
        // Several reconcile passes later the source has not brought it
        // back.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(domain_state(from_libvirtd, self.domain), "undefined");
        assert_eq!(domain_state(to_libvirtd, self.domain), "running");
        // The policy holds on the new node: new connections are refused
        // (while the established one flows).
        if self.echoes().await {
            panic!(
                "a new connection passed the policy on {to}\n{}\n{}",
                datapath::dump(to, self.guest_ip),
                tails()
            );
        }
    }

    /// Whether the guest answers a new connection from the peer.
    async fn echoes(&self) -> bool {
        let (ip, peer) = (self.guest_ip, self.peer.clone());
        tokio::task::spawn_blocking(move || {
            GuestClient::in_node(ip, Some(&peer))
                .echo("hello")
                .is_ok_and(|answer| answer.trim() == "hello")
        })
        .await
        .expect("join")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_live_there_and_back_its_endpoint_moving_on_activation() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cli = basalt_cli();
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let n1 = fabric.add_node("n1").expect("node n1");
    let n2 = fabric.add_node("n2").expect("node n2");
    let n3 = fabric.add_node("n3").expect("node n3");
    // The peer VM's own namespace: its only way to the guest is its NIC.
    let peer = fabric.add_node("peer").expect("the peer's namespace");
    let nodes = [n1.clone(), n2.clone(), n3.clone()];
    // Node names are the namespaces' (unique per test): they name the pins.
    let _pins = Pins(nodes.iter().map(|n| n.netns().to_owned()).collect());
    let hosts = fabric.hosts();
    let (mut l1, l2) = std::thread::scope(|s| {
        let l1 = s.spawn(|| Libvirtd::start(&prefix, &n1, &hosts).expect("libvirtd n1"));
        let l2 = s.spawn(|| Libvirtd::start(&prefix, &n2, &hosts).expect("libvirtd n2"));
        (l1.join().expect("n1"), l2.join().expect("n2"))
    });
    let image = GuestImage::build().expect("guest image");

    let server = format!("{}:{CONTROL_PORT}", n3.addr());
    let (control, admin) =
        common::start_control(&prefix, &server, Some(&n3), DEADLINE, Some(SHORT_LEASES)).await;
    let secret = common::join_token(&admin, "join", 3).await;

    let domain_prefix = format!("{}-", prefix.name());
    let agent = |node: &Node, compute: &[&str]| {
        Process::start(
            &prefix,
            ProcessSpec::new(format!("agent-{}", node.name()), BASALTD)
                .args(["agent", "--node", node.netns(), "--server", &server])
                .args(["--address", &format!("{}:7500", node.addr())])
                .args(compute)
                .args(["--network", "--domain-prefix", &domain_prefix])
                .args(["--resync-ms", "500", "--stop-grace-ms", "1000"])
                .arg("--console-dir")
                .arg(prefix.log_dir())
                .env("BASALT_JOIN_TOKEN", &secret)
                .netns(node),
        )
        .expect("agent")
    };
    let mut a1 = agent(&n1, &["--libvirt-uri", &l1.uri()]);
    let a2 = agent(&n2, &["--libvirt-uri", &l2.uri()]);
    let a3 = agent(&n3, &["--compute", "sim"]);
    let logs = [&control, &a1, &a2, &a3];
    wait::until("the three nodes have joined", DEADLINE, &logs, || async {
        let nodes = admin.list(Kind::Node).await.map(|l| l.objects.len());
        nodes.is_ok_and(|n| n == 3)
    })
    .await;
    admin
        .create(Object::Network(Network {
            meta: ObjectMeta::named("default"),
            spec: NetworkSpec {
                cidr: "10.77.0.0/16".into(),
                vni: 4277,
                routing: None,
            },
        }))
        .await
        .expect("the network");

    // The guest on n1, its address by DHCP; the peer on n3.
    let mut web_meta = ObjectMeta::named("web");
    web_meta.labels.insert("app".into(), "web".into());
    let web = Vm {
        meta: web_meta,
        spec: VmSpec {
            cpus: 1,
            memory_mib: 128,
            running: false,
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
            ..VmSpec::default()
        },
        ..Vm::default()
    };
    let web = create_placed(&admin, web.clone(), n1.netns()).await;
    let mut peer_vm = web.clone();
    peer_vm.meta = ObjectMeta::named("peer");
    peer_vm.spec.kernel = Some(KernelBoot {
        kernel: "/boot/vmlinuz".into(),
        initrd: String::new(),
        cmdline: String::new(),
    });
    let peer_vm = create_placed(&admin, peer_vm, n3.netns()).await;
    let domain = format!("{domain_prefix}web");
    wait::until("the domain runs on n1", DEADLINE, &logs, || async {
        domain_state(&l1, &domain) == "running"
    })
    .await;
    wait::until("both NICs are leased", DEADLINE, &logs, || async {
        endpoint_of(&admin, "web").await.is_some() && endpoint_of(&admin, "peer").await.is_some()
    })
    .await;
    let guest_ip = endpoint_of(&admin, "web")
        .await
        .and_then(|e| e.ip)
        .expect("the guest's lease");

    let peer_tap = tap_name(vm_uuid(&peer_vm.meta.uid), 0);
    wait::until(
        "n3's agent made the peer's tap",
        DEADLINE,
        &logs,
        || async { has_link(&n3, &peer_tap) },
    )
    .await;
    let _relay = Relay::start(
        &n3,
        &peer_tap,
        &peer,
        derived_mac(vm_uuid(&peer_vm.meta.uid), 0).0,
    );
    let script = prefix.dir().join("udhcpc.sh");
    std::fs::write(&script, DHCP_SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let peer_ip = {
        let (peer, script) = (peer.clone(), script.clone());
        tokio::task::spawn_blocking(move || Relay::dhcp(&peer, &script))
            .await
            .expect("join")
    };
    assert_eq!(
        Some(peer_ip),
        endpoint_of(&admin, "peer").await.and_then(|e| e.ip),
        "DHCP hands the peer the address IPAM leased"
    );
    {
        let peer = peer.clone();
        tokio::task::spawn_blocking(move || {
            GuestClient::in_node(guest_ip, Some(&peer)).wait_ready(DEADLINE)
        })
        .await
        .expect("join")
        .unwrap_or_else(|err| {
            panic!(
                "the guest does not answer at its leased address {guest_ip}: {err}\n{}",
                guest::log_tail(&prefix.log_dir().join("web.log"), 30)
            )
        });
    }

    let reader = StreamReader::start(guest_ip, &peer);
    wait::until("the stream flows", DEADLINE, &logs, || async {
        reader.count() >= 5
    })
    .await;

    let world = World {
        admin: &admin,
        cli: &cli,
        server: &server,
        domain: &domain,
        guest_ip,
        peer: &peer,
        logs: &logs,
    };
    assert!(world.echoes().await, "no policy yet: new connections pass");
    // Isolate the VM: nothing in, nothing out. The open stream is
    // tracked; new connections are refused from now on. (Both directions:
    // with egress open, the guest's own next packet would start a new
    // tracked flow on the target, and the stream would pass there without
    // the carried entries.)
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    admin
        .create(Object::Policy(Policy {
            meta: ObjectMeta::named("web-isolated"),
            spec: PolicySpec {
                selector: labels,
                ingress: Some(Vec::new()),
                egress: Some(Vec::new()),
            },
        }))
        .await
        .expect("the policy");
    wait::until(
        "the policy refuses new connections",
        DEADLINE,
        &logs,
        || async { !world.echoes().await },
    )
    .await;

    world
        .migrate(&reader, (n1.netns(), &l1), (n2.netns(), &l2))
        .await;
    world
        .migrate(&reader, (n2.netns(), &l2), (n1.netns(), &l1))
        .await;
    assert_eq!(
        placement(&admin, "web").await.map(|p| p.epoch),
        Some(3),
        "two moves, two epochs"
    );

    // A migration that fails — the target refuses the copy — leaves the
    // VM, its placement and its endpoint where they were: the guest never
    // resumed on the target, so nothing was activated there.
    refuse_migrations(&n2, true);
    let (placed, leased) = (
        placement(&admin, "web").await.expect("placed"),
        endpoint_of(&admin, "web").await.expect("the endpoint"),
    );
    let refused = {
        let (cli, server, to) = (cli.clone(), server.clone(), n2.netns().to_owned());
        tokio::task::spawn_blocking(move || {
            Command::new(cli)
                .args(["--server", &server, "vm", "migrate", "web", "--to", &to])
                .arg("--wait")
                .output()
                .expect("run basalt vm migrate")
        })
        .await
        .expect("join")
    };
    refuse_migrations(&n2, false);
    assert!(
        !refused.status.success(),
        "a migration the target refused succeeded: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    let Ok(Object::Migration(m)) = admin.get(Kind::Migration, "web").await else {
        panic!("the migration object is kept")
    };
    assert_eq!(m.status.phase, MigrationPhase::Failed, "{m:?}");
    eprintln!("the refused migration: {}", m.status.message);
    let at = reader.count();
    wait::until(
        "the stream flows after the failed move",
        DEADLINE,
        &logs,
        || async { reader.count() >= at + 20 },
    )
    .await;
    assert_eq!(
        placement(&admin, "web").await,
        Some(placed),
        "placement kept"
    );
    assert_eq!(
        endpoint_of(&admin, "web").await,
        Some(leased),
        "the endpoint stays on the source, never written"
    );
    assert_eq!(domain_state(&l1, &domain), "running");
    assert_eq!(domain_state(&l2, &domain), "undefined");
    let web_tap = tap_name(vm_uuid(&web.meta.uid), 0);
    wait::until(
        "the target removed its standby tap",
        DEADLINE,
        &logs,
        || async { !has_link(&n2, &web_tap) },
    )
    .await;

    // Without the policy the VM answers new connections at the same
    // address, from where it is now.
    admin
        .delete(Kind::Policy, "web-isolated", None)
        .await
        .expect("delete the policy");
    wait::until("new connections pass again", DEADLINE, &logs, || async {
        world.echoes().await
    })
    .await;

    // One connection all along: every number in order, never reset, and
    // no pause longer than MAX_PAUSE.
    let received = reader.finish();
    let numbers: Vec<u64> = received.iter().map(|(n, _)| *n).collect();
    if let Err((at, before, found)) = check_consecutive(&numbers) {
        panic!("the stream skipped or repeated at {at}: {before} then {found}");
    }
    let gap = received
        .windows(2)
        .map(|w| w[1].1.duration_since(w[0].1))
        .max()
        .unwrap_or_default();
    eprintln!("longest pause in the stream across the migrations: {gap:?}");
    assert!(
        gap <= MAX_PAUSE,
        "the stream paused {gap:?} (more than {MAX_PAUSE:?})"
    );

    // Node loss: n1's agent and libvirtd die with SIGKILL (the guest's
    // QEMU lives on there, cut off) and n1's link goes down. n3 (simulated
    // compute) is cordoned, so HA restarts the VM on n2 once n1's lease
    // is gone: a new boot, the endpoint fenced over to n2 at a newer
    // epoch with the same address, which the guest takes again by DHCP
    // and answers the peer at.
    let lost = endpoint_of(&admin, "web").await.expect("the endpoint");
    let placed = placement(&admin, "web").await.expect("placed");
    assert_eq!(lost.node, n1.netns());
    let cordon = Command::new(&cli)
        .args(["--server", &server, "node", "cordon", n3.netns()])
        .output()
        .expect("run basalt node cordon");
    assert!(cordon.status.success(), "cordon n3: {cordon:?}");
    a1.kill9().expect("kill -9 n1's agent");
    l1.process_mut()
        .expect("libvirtd n1 runs")
        .kill9()
        .expect("kill -9 n1's libvirtd");
    let cut = Command::new("ip")
        .args(["link", "set", n1.veth(), "down"])
        .status()
        .expect("ip");
    assert!(cut.success(), "cut n1's link");
    let logs = [&control, &a2, &a3];
    wait::until("HA places the VM on n2", DEADLINE, &logs, || async {
        placement(&admin, "web")
            .await
            .is_some_and(|p| p.node == n2.netns())
    })
    .await;
    let moved = placement(&admin, "web").await.expect("placed");
    assert!(moved.epoch > placed.epoch, "{placed:?} -> {moved:?}");
    wait::until("the domain runs on n2", DEADLINE, &logs, || async {
        domain_state(&l2, &domain) == "running"
    })
    .await;
    wait::until(
        "the endpoint is fenced over to n2",
        DEADLINE,
        &logs,
        || async {
            endpoint_of(&admin, "web")
                .await
                .is_some_and(|e| e.node == n2.netns() && e.epoch > lost.epoch)
        },
    )
    .await;
    let after = endpoint_of(&admin, "web").await.expect("the endpoint");
    assert_eq!(
        (after.ip, &after.mac),
        (lost.ip, &lost.mac),
        "the VM keeps its address and MAC across the node's loss"
    );
    let world = World {
        admin: &admin,
        cli: &cli,
        server: &server,
        domain: &domain,
        guest_ip,
        peer: &peer,
        logs: &logs,
    };
    wait::until(
        "the guest answers at its address from n2",
        DEADLINE,
        &logs,
        || async { world.echoes().await },
    )
    .await;
}
