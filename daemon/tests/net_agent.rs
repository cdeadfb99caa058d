//! The agents drive VM networking end to end (root, CI): a control plane
//! and two agents (`basaltd agent --network`, simulated compute) on two
//! namespace nodes. The control plane places two VMs on different nodes
//! and leases their NICs' addresses; each agent creates, wires and
//! attaches its VM's tap, serves DHCP and keeps the maps in step. A
//! "guest" here is a namespace whose `eth0` is a tap relayed frame by
//! frame to the node's tap (what QEMU does): it takes its address by DHCP
//! and talks to the other guest through the VXLAN overlay, or with native
//! routing (the test runs in both modes, `--net-routing`). Then an agent
//! is killed (established flows keep flowing on the pinned datapath) and
//! restarted (it adopts the pins), policies (selectors by VM labels)
//! block and allow new flows as they are applied, changed and deleted —
//! map writes only, nothing re-attached — and a VM's deletion removes its
//! tap. A guest reaches an address outside the VM networks (a namespace
//! playing the outside) through its node's source NAT: the outside sees
//! the node's address and its answer comes back. The agents sweep
//! connection tracking with a short UDP timeout: an idle UDP exchange's
//! entries go, the established TCP flow's stay.

mod common;

use basalt_testkit::wait;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_agent::vm_domain::{derived_mac, tap_name, vm_uuid};
use basalt_api::{
    AdminClient, Endpoint, KernelBoot, Kind, Nic, Object, ObjectMeta, PlacementRules, Policy,
    PolicyAction, PolicyProtocol, PolicyRule, PolicySpec, Vm, VmSpec,
};
use basalt_sdn::tap::Tap;
use basalt_testkit::{Fabric, Node, Prefix, Process, ProcessSpec};
use nix::sched::CloneFlags;

use common::BASALTD;
const DEADLINE: Duration = Duration::from_secs(60);
const CONTROL_PORT: u16 = 7400;

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

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread inside the namespace at `path`.
fn in_netns<T: Send>(path: &PathBuf, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A guest: a namespace whose `eth0` is a tap, relayed to the VM's tap on
/// its node. Removes its namespace when dropped.
struct Guest {
    netns: String,
    relay: Option<basalt_sdn::tap::Relay>,
}

impl Guest {
    fn start(prefix: &Prefix, n: u8, node: &Node, tap: &str, mac: [u8; 6]) -> Guest {
        let netns = format!("{}-g{n}", prefix.name());
        run(Command::new("ip").args(["netns", "add", &netns]));
        let mut guest = Guest { netns, relay: None };
        let tap_name = tap.to_owned();
        let node_side = node
            .run_in(move || Tap::open(&tap_name).expect("open the node's tap"))
            .expect("enter node");
        let guest_side = in_netns(&guest.path(), || Tap::open("eth0").expect("guest tap"));
        let mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        guest.ip(&["link", "set", "lo", "up"]);
        guest.ip(&["link", "set", "eth0", "address", &mac, "mtu", "1450", "up"]);
        guest.relay = Some(
            basalt_sdn::tap::Relay::start(&node_side, &guest_side).expect("relay the guest's NIC"),
        );
        guest
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.netns).args(args))
    }

    /// Runs udhcpc in the guest; returns the address it bound.
    fn dhcp(&self, script: &std::path::Path) -> Ipv4Addr {
        run(Command::new("ip")
            .args(["netns", "exec", &self.netns, "busybox", "udhcpc"])
            .args(["-i", "eth0", "-f", "-q", "-n", "-t", "20", "-T", "1", "-s"])
            .arg(script));
        let out = self.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
        let addr = out
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("no address on the guest's eth0: {out}"));
        addr.parse().unwrap()
    }

    /// Serves TCP echo on `port`.
    fn echo_server(&self, port: u16) {
        let file = File::open(self.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
            tx.send(()).unwrap();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        rx.recv().unwrap();
    }

    /// Opens a TCP connection from inside the guest.
    fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        in_netns(&self.path(), || {
            TcpStream::connect_timeout(&to, Duration::from_secs(3))
        })
    }
}

impl Guest {
    /// Serves UDP echo on `port`.
    fn udp_echo_server(&self, port: u16) {
        let file = File::open(self.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        });
        rx.recv().unwrap();
    }
}

/// Serves, in `node`, a TCP service that answers each connection with the
/// peer address it saw.
fn whoami_server(node: &Node, port: u16) {
    let file = File::open(node.netns_path()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
        tx.send(()).unwrap();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let peer = conn
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let _ = conn.write_all(peer.as_bytes());
        }
    });
    rx.recv().unwrap();
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.relay.take();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Writes and reads back `len` bytes.
fn echo(conn: &mut TcpStream, len: usize) -> Result<(), String> {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    conn.write_all(&data).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; len];
    conn.read_exact(&mut back)
        .map_err(|e| format!("read: {e}"))?;
    if back != data {
        return Err("echoed bytes differ".into());
    }
    Ok(())
}

/// Polls until a new TCP flow from `guest` to `to` succeeds (`want`) or
/// fails (`!want`), for at most 10 s.
async fn reaches_until(guest: &Guest, to: SocketAddr, want: bool, what: &str) {
    let start = Instant::now();
    loop {
        let reached = in_netns(&guest.path(), || {
            let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_millis(700)) else {
                return false;
            };
            echo(&mut c, 100).is_ok()
        });
        if reached == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: still {reached}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
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

fn vm(name: &str, app: &str) -> Vm {
    let mut meta = ObjectMeta::named(name);
    meta.labels.insert("app".into(), app.into());
    Vm {
        meta,
        spec: VmSpec {
            cpus: 1,
            memory_mib: 128,
            running: true,
            nics: vec![Nic {
                network: "blue".into(),
                mac: None,
                ip: None,
            }],
            placement: PlacementRules {
                anti_affinity_group: Some("net".into()),
                ..PlacementRules::default()
            },
            kernel: Some(KernelBoot {
                kernel: "/boot/vmlinuz".into(),
                initrd: "/boot/initrd.img".into(),
                cmdline: String::new(),
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
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

/// Packets the node's VXLAN device has received.
fn vxlan_rx_packets(node: &Node) -> u64 {
    run(Command::new("ip").args([
        "netns",
        "exec",
        node.netns(),
        "cat",
        "/sys/class/net/basalt-vx/statistics/rx_packets",
    ]))
    .trim()
    .parse()
    .expect("rx_packets is a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_lease_wire_and_route_vm_nics_across_nodes_over_the_overlay() {
    agents_lease_wire_and_route_vm_nics_across_nodes("overlay", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_lease_wire_and_route_vm_nics_across_nodes_with_native_routing() {
    agents_lease_wire_and_route_vm_nics_across_nodes("native", None).await;
}

/// The network chooses its mode (`basalt network create --routing
/// native`) on nodes whose default is the overlay: its packets go natively.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_routed_natively_on_overlay_nodes() {
    agents_lease_wire_and_route_vm_nics_across_nodes("overlay", Some("native")).await;
}

/// The basalt CLI beside basaltd.
use common::basalt_cli;

/// `node_routing` is the agents' `--net-routing`; the network is created
/// with `basalt network create`, with `--routing` when `network_routing`
/// says one. Packets go as the network says, else as the nodes do.
async fn agents_lease_wire_and_route_vm_nics_across_nodes(
    node_routing: &str,
    network_routing: Option<&str>,
) {
    let routing = network_routing.unwrap_or(node_routing);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let a = fabric.add_node("a").expect("node a");
    let b = fabric.add_node("b").expect("node b");
    // Node names are the namespaces' (unique per test): they name the pins.
    let nodes = [a.clone(), b.clone()];
    let _pins = Pins(nodes.iter().map(|n| n.netns().to_owned()).collect());

    let server = format!("{}:{CONTROL_PORT}", a.addr());
    let (control, admin) = common::start_control(&prefix, &server, Some(&a), DEADLINE, None).await;

    let mut agents = Vec::new();
    for node in &nodes {
        let secret = common::join_token(&admin, &format!("join-{}", node.name()), 1).await;
        let agent = Process::start(
            &prefix,
            ProcessSpec::new(format!("agent-{}", node.name()), BASALTD)
                .args(["agent", "--node", node.netns(), "--address"])
                .arg(format!("{}:7500", node.addr()))
                .args(["--server", &server, "--compute", "sim", "--network"])
                .args(["--resync-ms", "500", "--console-dir"])
                .arg(prefix.log_dir())
                .args(["--net-conntrack-timeouts", "udp=2,udp-stream=2"])
                .args(["--net-conntrack-sweep-ms", "300"])
                .args(["--net-routing", node_routing])
                .env("BASALT_JOIN_TOKEN", &secret)
                .env("RUST_LOG", "info,basalt_agent=debug")
                .netns(node),
        )
        .expect("agent");
        agents.push(agent);
    }
    let logs: Vec<&Process> = std::iter::once(&control).chain(&agents).collect();
    wait::until("both nodes joined", DEADLINE, &logs, || async {
        admin
            .list(Kind::Node)
            .await
            .is_ok_and(|l| l.objects.len() == 2)
    })
    .await;

    let mut create = Command::new(basalt_cli());
    create
        .args(["--server", &server, "network", "create", "blue"])
        .args(["--cidr", "10.77.0.0/16", "--vni", "4242"]);
    if let Some(mode) = network_routing {
        create.args(["--routing", mode]);
    }
    let out = run(&mut create);
    assert!(out.contains("network/blue created"), "{out}");
    let Object::Network(network) = admin.get(Kind::Network, "blue").await.expect("network") else {
        panic!("a network")
    };
    assert_eq!(
        network.spec.routing.map(|r| r.as_str()),
        network_routing,
        "the network keeps the mode it was given, or none"
    );
    let listed = run(Command::new(basalt_cli()).args(["--server", &server, "network", "list"]));
    assert!(
        listed.contains(network_routing.unwrap_or("node default")),
        "{listed}"
    );
    // A mode that does not exist is refused, naming the flag.
    let bad = Command::new(basalt_cli())
        .args(["--server", &server, "network", "create", "red"])
        .args([
            "--cidr",
            "10.78.0.0/16",
            "--vni",
            "4243",
            "--routing",
            "vxlan",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--routing"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let mut created = Vec::new();
    for (name, app) in [("vm1", "web"), ("vm2", "db")] {
        let Object::Vm(v) = admin.create(Object::Vm(vm(name, app))).await.expect("vm") else {
            panic!("a vm")
        };
        created.push(v);
    }
    wait::until(
        "both NICs are leased and placed",
        DEADLINE,
        &logs,
        || async {
            endpoint_of(&admin, "vm1").await.is_some() && endpoint_of(&admin, "vm2").await.is_some()
        },
    )
    .await;
    let ep1 = endpoint_of(&admin, "vm1").await.unwrap();
    let ep2 = endpoint_of(&admin, "vm2").await.unwrap();
    assert_ne!(ep1.node, ep2.node, "anti-affinity spreads the VMs");
    let node_of = |ep: &Endpoint| {
        nodes
            .iter()
            .find(|n| n.netns() == ep.node)
            .unwrap_or_else(|| panic!("endpoint on unknown node {}", ep.node))
            .clone()
    };
    let (node1, node2) = (node_of(&ep1), node_of(&ep2));
    let taps: Vec<String> = created
        .iter()
        .map(|v| tap_name(vm_uuid(&v.meta.uid), 0))
        .collect();
    // Taps are made by the compute pass, the VXLAN device by the datapath
    // thread: wait for both.
    wait::until(
        "each agent made its VM's tap and its VXLAN device",
        DEADLINE,
        &logs,
        || async {
            has_link(&node1, &taps[0])
                && has_link(&node2, &taps[1])
                && has_link(&node1, "basalt-vx")
                && has_link(&node2, "basalt-vx")
        },
    )
    .await;
    assert!(
        !has_link(&node1, &taps[1]) && !has_link(&node2, &taps[0]),
        "a tap exists only where its VM is placed"
    );
    assert!(has_link(&node1, "basalt-vx") && has_link(&node2, "basalt-vx"));

    let script = prefix.dir().join("udhcpc.sh");
    std::fs::write(&script, DHCP_SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mac = |v: &Vm| derived_mac(vm_uuid(&v.meta.uid), 0).0;
    let g1 = Guest::start(&prefix, 1, &node1, &taps[0], mac(&created[0]));
    let g2 = Guest::start(&prefix, 2, &node2, &taps[1], mac(&created[1]));
    let (ip1, ip2) = (g1.dhcp(&script), g2.dhcp(&script));
    assert_eq!(Some(ip1), ep1.ip, "DHCP hands out the address IPAM leased");
    assert_eq!(Some(ip2), ep2.ip, "DHCP hands out the address IPAM leased");

    // Between the nodes, both ways.
    let vxlan_rx = vxlan_rx_packets(&node2);
    g2.echo_server(7000);
    g1.echo_server(7000);
    let to2 = SocketAddr::from((ip2, 7000));
    let mut conn = None;
    for _ in 0..20 {
        if let Ok(c) = g1.connect(to2) {
            conn = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut conn = conn.expect("guest 1 connects to guest 2 across nodes");
    echo(&mut conn, 200_000).expect("tcp echo between the nodes");
    let mut back = g2.connect(SocketAddr::from((ip1, 7000))).expect("and back");
    echo(&mut back, 1000).expect("echo back");
    // Each agent keeps its peer's address resolved (a managed neighbour
    // entry), so native receive can tell the peer's frames from the first.
    for (node, peer) in [(&node1, &node2), (&node2, &node1)] {
        let shown = node
            .ip(&[
                "-d",
                "neigh",
                "show",
                &peer.addr().to_string(),
                "dev",
                "eth0",
            ])
            .unwrap();
        assert!(
            shown.contains("managed") && shown.contains("lladdr"),
            "{}: {shown}",
            node.name()
        );
    }
    if routing == "native" {
        assert_eq!(
            vxlan_rx_packets(&node2),
            vxlan_rx,
            "native routing encapsulates nothing"
        );
    } else {
        assert!(vxlan_rx_packets(&node2) > vxlan_rx, "over the overlay");
    }
    // The operator's view shows the mode and the open flows' TCP state.
    let status = run(Command::new(BASALTD).args(["net", "status", "--node", node2.netns()]));
    assert!(
        status.contains(&format!("routing: {node_routing} (node default)")),
        "basaltd net status: {status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.trim_start().starts_with("vni 4242") && l.contains(&format!(" {routing} ("))),
        "basaltd net status shows the network's own mode ({routing}): {status}"
    );
    assert!(
        status.contains("tcp ESTABLISHED"),
        "basaltd net status: {status}"
    );

    // Egress: the outside has no route to the VM network; the guest
    // reaches it through its node's source NAT, and the outside's answer
    // (the address it saw) comes back.
    let outside = fabric.add_node("out").expect("outside");
    whoami_server(&outside, 9000);
    let seen = in_netns(&g1.path(), || {
        let to = SocketAddr::from((outside.addr(), 9000));
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect to the outside: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut seen = String::new();
        conn.read_to_string(&mut seen)
            .map_err(|e| format!("read the outside's answer: {e}"))?;
        Ok::<_, String>(seen)
    })
    .expect("egress through the node's source NAT");
    assert_eq!(
        seen,
        node1.addr().to_string(),
        "the outside sees the node's address, not the guest's"
    );

    // Connection tracking ages in the agents: a UDP exchange's entries go
    // once idle past the 2 s UDP timeout; the TCP flows (5 days) stay.
    g2.udp_echo_server(7001);
    let answer = in_netns(&g1.path(), || {
        let socket = UdpSocket::bind((ip1, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        for _ in 0..5 {
            socket.send_to(b"ping", (ip2, 7001)).unwrap();
            let mut buf = [0u8; 64];
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    });
    assert_eq!(answer.as_deref(), Some(&b"ping"[..]), "UDP across nodes");
    let udp_tracked = |node: &Node| {
        basalt_sdn::loader::pinned_conntrack(node.netns())
            .expect("read the node's conntrack map")
            .iter()
            .filter(|(k, _)| k.proto == 17 && (k.dport == 7001 || k.sport == 7001))
            .count()
    };
    assert!(udp_tracked(&node1) > 0, "the exchange is tracked on node 1");
    let start = Instant::now();
    while udp_tracked(&node1) + udp_tracked(&node2) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "idle UDP entries were never swept"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    echo(&mut conn, 1000).expect("the established flow is still tracked and flowing");

    // The agent of guest 1's node dies: the pinned datapath keeps the flow.
    let i1 = nodes
        .iter()
        .position(|n| n.netns() == node1.netns())
        .unwrap();
    agents[i1].kill9().expect("kill the agent");
    echo(&mut conn, 50_000).expect("the flow survives the agent");
    agents[i1].restart().expect("restart the agent");
    tokio::time::sleep(Duration::from_secs(2)).await;
    echo(&mut conn, 50_000).expect("and its restart");
    let mut fresh = g1.connect(to2).expect("new flows after the restart");
    echo(&mut fresh, 1000).unwrap();

    // Policies: the db VM's ingress, selected by labels.
    let labels = |app: &str| std::collections::BTreeMap::from([("app".to_owned(), app.to_owned())]);
    let mut policy = Policy {
        meta: ObjectMeta::named("db-ingress"),
        spec: PolicySpec {
            selector: labels("db"),
            ingress: Some(Vec::new()),
            egress: None,
        },
    };
    let Object::Policy(stored) = admin
        .create(Object::Policy(policy.clone()))
        .await
        .expect("create the policy")
    else {
        panic!("a policy")
    };
    reaches_until(&g1, to2, false, "a policy with no rule denies new flows").await;
    echo(&mut conn, 1000).expect("an established flow is not re-checked");
    // Allow the web VMs on the echo port.
    policy.meta.resource_version = stored.meta.resource_version;
    policy.spec.ingress = Some(vec![PolicyRule {
        selector: Some(labels("web")),
        protocol: PolicyProtocol::Tcp,
        ports: Some("7000".into()),
        ..PolicyRule::default()
    }]);
    let Object::Policy(stored) = admin
        .update(Object::Policy(policy.clone()))
        .await
        .expect("allow web")
    else {
        panic!("a policy")
    };
    reaches_until(&g1, to2, true, "web is allowed by its labels").await;
    // A deny by address beats the allow.
    policy.meta.resource_version = stored.meta.resource_version;
    policy.spec.ingress.as_mut().unwrap().push(PolicyRule {
        action: PolicyAction::Deny,
        cidr: Some(format!("{ip1}/32")),
        ..PolicyRule::default()
    });
    admin
        .update(Object::Policy(policy))
        .await
        .expect("deny guest 1");
    reaches_until(&g1, to2, false, "deny beats allow").await;
    admin
        .delete(Kind::Policy, "db-ingress", None)
        .await
        .expect("delete the policy");
    reaches_until(&g1, to2, true, "no policy, no enforcement").await;

    // Deleting a VM releases its lease and removes its tap.
    drop(g2);
    admin
        .delete(Kind::Vm, "vm2", None)
        .await
        .expect("delete vm2");
    let logs: Vec<&Process> = std::iter::once(&control).chain(&agents).collect();
    wait::until("the deleted VM's tap is gone", DEADLINE, &logs, || async {
        !has_link(&node2, &taps[1])
    })
    .await;
    assert!(has_link(&node1, &taps[0]), "the other VM keeps its tap");
}
