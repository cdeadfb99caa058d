//! `datapath`: traffic between two "VMs" on two nodes, through Basalt's
//! eBPF datapath (TC programs, policy maps) over the VXLAN overlay and with
//! native routing (no encapsulation), against plain kernel routing between
//! the same nodes with the same number of nftables rules, at 0, 100, 1 000
//! and 10 000 rules. Basalt's two modes use the same VMs and maps: the
//! nodes' routing setting is switched before each of their runs.
//!
//! Per case and system (`--runs N`, 3 by default: the median of N
//! runs, the systems' order rotating from run to run, so a busy spell of
//! the machine does not land on one side only): TCP throughput (iperf3, 5 s), small-packet rate
//! (iperf3 UDP, 64-byte datagrams, receiver's packets/s), request/response
//! latency (1-byte ping-pong over one TCP connection, p50/p99), and for
//! Basalt the programs' cost per packet from the kernel's BPF statistics
//! (`run_time_ns / run_cnt`). Statistics are on only for a separate pass
//! of the same traffic after the measured runs: the clock reads they add
//! to every program run would otherwise tax Basalt's figures alone.
//!
//! Both systems get the same topology: a veth per "VM" (MTU 1450 inside,
//! what Basalt's DHCP hands out to leave room for VXLAN), the same two
//! node namespaces and the same bridge between them.
//!
//! Rules never match the measured traffic (as in a real ruleset, they are
//! about others): for Basalt, /32 deny rules in the receiving VM's ingress
//! policy plus one identity allow; for the peer, as many rules in the
//! receiving node's forward chain ahead of the accept.
//!
//! Goals (issue 5): Basalt ≥ 1.0× the plain path's throughput at 0 rules;
//! Basalt at 10 000 rules within 10 % of its own 0-rule throughput (each
//! for both modes).
//! `BASALT_DATAPATH_RULES=0,100` measures only those rule counts (the
//! goals whose cases are missing are left out).

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use basalt_sdn::loader::{self, Loader};
use basalt_sdn::{
    Action, Cidr, Datapath, Endpoint, Hook, Netlink, Network, NodeConfig, Peer, Policy, Protocol,
    Routing, Rule,
};
use basalt_testkit::{Fabric, Node, Prefix};

use super::Options;
use crate::report::{Better, Goal, Report};
use crate::stats::Samples;

const RULE_COUNTS: [usize; 4] = [0, 100, 1_000, 10_000];
const IPERF_SECS: &str = "5";
const RR_ROUNDS: usize = 5_000;
const BASALT: &str = "basalt (eBPF + VXLAN)";
const BASALT_NATIVE: &str = "basalt (eBPF, native routing)";
const PEER: &str = "kernel routing + nftables";
/// The systems measured, in the order of the first run.
const SYSTEMS: [System; 3] = [
    System::Basalt(Routing::Overlay),
    System::Basalt(Routing::Native),
    System::Peer,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Basalt(Routing),
    Peer,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Basalt(Routing::Overlay) => BASALT,
            System::Basalt(Routing::Native) => BASALT_NATIVE,
            System::Peer => PEER,
        }
    }
}
const VM_IDENTITY: [u32; 2] = [101, 102];

/// One "VM": a namespace whose `eth0` is the peer of `tap` in a node.
pub(super) struct Vm {
    pub(super) netns: String,
    pub(super) ip: Ipv4Addr,
    pub(super) mac: [u8; 6],
    pub(super) tap: String,
}

impl Vm {
    pub(super) fn create(
        prefix: &Prefix,
        node: &Node,
        name: &str,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> anyhow::Result<Vm> {
        let vm = Vm {
            netns: format!("{}-{name}", prefix.name()),
            ip,
            mac,
            tap: format!("t{name}"),
        };
        let ns = vm.netns.as_str();
        sh(Command::new("ip").args(["netns", "add", ns]))?;
        vm.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        vm.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        node.ip(&[
            "link", "add", &vm.tap, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        let mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        vm.exec(&["ip", "link", "set", "lo", "up"])?;
        vm.exec(&[
            "ip", "link", "set", "eth0", "address", &mac, "mtu", "1450", "up",
        ])?;
        vm.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        vm.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
            "onlink",
        ])?;
        Ok(vm)
    }

    pub(super) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]);
        cmd
    }

    pub(super) fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        sh(self.command(args[0]).args(&args[1..]))
    }

    pub(super) fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    pub(super) fn endpoint(&self, node: &Node, identity: u32) -> Endpoint {
        Endpoint {
            ip: self.ip,
            mac: self.mac,
            network: "bench".into(),
            node_addr: node.addr(),
            identity,
            tap: self.tap.clone(),
        }
    }
}

pub(super) fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread inside the namespace at `path`.
pub(super) fn in_netns<T: Send>(path: &PathBuf, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns")?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// One node's Basalt datapath, loaded inside its namespace.
pub(super) struct NodeDp {
    pub(super) node: Node,
    pub(super) netlink: Netlink,
    pub(super) dp: Datapath<Loader>,
    vxlan: u32,
}

impl NodeDp {
    /// Loads the datapath in `node` with `vms`' taps, sending over the
    /// overlay.
    pub(super) fn start(node: &Node, vms: &[&Vm]) -> anyhow::Result<NodeDp> {
        NodeDp::start_routed(node, vms, Routing::Overlay)
    }

    /// Loads the datapath in `node` with `vms`' taps, reaching the other
    /// nodes as `routing` says.
    pub(super) fn start_routed(
        node: &Node,
        vms: &[&Vm],
        routing: Routing,
    ) -> anyhow::Result<NodeDp> {
        let node2 = node.clone();
        node.run_in(move || -> anyhow::Result<NodeDp> {
            let netlink = Netlink::new()?;
            let vx = netlink.ensure_vxlan("basalt-vx", 1500)?;
            let mut loader = Loader::load(node2.netns())?;
            for vm in vms {
                netlink.wire_tap(&vm.tap, vm.ip)?;
                loader.attach(&vm.tap, Hook::Tap)?;
            }
            loader.attach("basalt-vx", Hook::Overlay)?;
            loader.attach("eth0", Hook::Uplink)?;
            let dp = Datapath::new(
                loader,
                NodeConfig {
                    addr: node2.addr(),
                    vxlan_ifindex: vx,
                    routing,
                },
            );
            Ok(NodeDp {
                node: node2,
                netlink,
                dp,
                vxlan: vx,
            })
        })?
    }

    /// Keeps the next hop towards each of `peers` resolved from this node
    /// (managed neighbour entries), as the agent does for every other
    /// node: native receive drops what it cannot tell.
    pub(super) fn keep_resolved(&self, peers: &[&Node]) -> anyhow::Result<()> {
        for peer in peers {
            self.netlink
                .keep_resolved(peer.addr())
                .with_context(|| format!("keeping {} resolved", peer.name()))?;
        }
        Ok(())
    }

    /// Switches how the node reaches the others (takes effect with the
    /// next apply).
    pub(super) fn set_routing(&mut self, routing: Routing) {
        self.dp.set_node(NodeConfig {
            addr: self.node.addr(),
            vxlan_ifindex: self.vxlan,
            routing,
        });
    }

    pub(super) fn apply(&mut self, eps: &[Endpoint], policies: &[Policy]) -> anyhow::Result<()> {
        self.apply_standby(eps, policies, &[])
    }

    pub(super) fn apply_standby(
        &mut self,
        eps: &[Endpoint],
        policies: &[Policy],
        standby: &[(String, Ipv4Addr)],
    ) -> anyhow::Result<()> {
        let net = Network {
            name: "bench".into(),
            vni: 77,
            cidr: "10.77.0.0/16".parse().expect("constant cidr"),
            routing: None,
        };
        let netlink = &self.netlink;
        self.dp.apply(eps, &[net], policies, standby, &|n| {
            netlink.tap_link(n).ok()
        })?;
        Ok(())
    }

    /// Wires and attaches a tap that appeared in the node (a VM arriving).
    pub(super) fn attach_tap(&mut self, vm: &Vm) -> anyhow::Result<()> {
        let node = self.node.clone();
        node.run_in(|| -> anyhow::Result<()> {
            self.netlink.wire_tap(&vm.tap, vm.ip)?;
            self.dp.store_mut().attach(&vm.tap, Hook::Tap)?;
            Ok(())
        })?
    }
}

impl Drop for NodeDp {
    fn drop(&mut self) {
        let _ = loader::remove_pins(self.node.netns());
    }
}

/// `n` ingress deny rules that never match, plus an allow for the client.
fn basalt_policy(n: usize) -> Vec<Policy> {
    if n == 0 {
        return Vec::new();
    }
    let mut rules: Vec<Rule> = (0..n)
        .map(|i| Rule {
            action: Action::Deny,
            peer: Peer::Cidr(Cidr::host(Ipv4Addr::new(
                192,
                168,
                (i / 250) as u8,
                (i % 250) as u8 + 1,
            ))),
            protocol: Protocol::Tcp,
            ports: (9, 9),
        })
        .collect();
    rules.push(Rule {
        action: Action::Allow,
        peer: Peer::Identity(VM_IDENTITY[0]),
        protocol: Protocol::Any,
        ports: (0, 65535),
    });
    vec![Policy {
        name: "bench".into(),
        selector: BTreeSet::from([VM_IDENTITY[1]]),
        ingress: Some(rules),
        egress: None,
    }]
}

/// The peer's forward chain with `n` rules that never match.
fn nft_ruleset(n: usize) -> String {
    let mut s = String::from(
        "add table inet benchpeer\ndelete table inet benchpeer\ntable inet benchpeer {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n",
    );
    for i in 0..n {
        s.push_str(&format!(
            "  ip saddr 192.168.{}.{} tcp dport 9 drop\n",
            i / 250,
            i % 250 + 1
        ));
    }
    s.push_str("  accept\n }\n}\n");
    s
}

fn nft_apply(node: &Node, rules: &str) -> anyhow::Result<()> {
    let mut child = node
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iperf_server(vm: &Vm) -> anyhow::Result<Server> {
    let child = vm
        .command("iperf3")
        .args(["-s", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(Server(child))
}

fn iperf_json(client: &Vm, server: Ipv4Addr, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = client
        .command("iperf3")
        .args([
            "-c",
            &server.to_string(),
            "-p",
            "5201",
            "-J",
            "-t",
            IPERF_SECS,
        ])
        .args(extra)
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(err) = json.get("error") {
        bail!("iperf3: {err}");
    }
    Ok(json)
}

fn tcp_gbps(client: &Vm, server: Ipv4Addr) -> anyhow::Result<f64> {
    let json = iperf_json(client, server, &[])?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 TCP result")?;
    Ok(bps / 1e9)
}

fn udp_kpps(client: &Vm, server: Ipv4Addr) -> anyhow::Result<f64> {
    let json = iperf_json(client, server, &["-u", "-l", "64", "-b", "0"])?;
    let sum = &json["end"]["sum"];
    let packets = sum["packets"].as_f64().context("iperf3 UDP packets")?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let secs = sum["seconds"].as_f64().context("iperf3 UDP seconds")?;
    Ok((packets - lost) / secs / 1e3)
}

/// 1-byte ping-pong over one TCP connection: round-trip samples.
fn request_response(client: &Vm, server: &Vm) -> anyhow::Result<Samples> {
    let addr = SocketAddr::from((server.ip, 7007));
    let (tx, rx) = std::sync::mpsc::channel();
    let path = server.path();
    let srv = std::thread::spawn(move || -> anyhow::Result<()> {
        in_netns(&path, || -> anyhow::Result<()> {
            let listener = TcpListener::bind(addr)?;
            tx.send(()).ok();
            let (mut conn, _) = listener.accept()?;
            conn.set_nodelay(true)?;
            let mut b = [0u8; 1];
            while conn.read_exact(&mut b).is_ok() {
                conn.write_all(&b)?;
            }
            Ok(())
        })?
    });
    rx.recv_timeout(Duration::from_secs(5))
        .context("rr server start")?;
    let samples = in_netns(&client.path(), || -> anyhow::Result<Samples> {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        conn.set_nodelay(true)?;
        let mut samples = Samples::new();
        let mut b = [1u8; 1];
        for _ in 0..RR_ROUNDS {
            let t = Instant::now();
            conn.write_all(&b)?;
            conn.read_exact(&mut b)?;
            samples.record(t.elapsed());
        }
        Ok(samples)
    })??;
    srv.join()
        .map_err(|_| anyhow::anyhow!("rr server panicked"))??;
    Ok(samples)
}

/// Per-packet program cost (ns) over everything since `before`.
fn bpf_ns_per_packet(
    nodes: &[&NodeDp],
    before: u64,
    before_cnt: u64,
) -> anyhow::Result<(u64, u64, f64)> {
    let (mut ns, mut cnt) = (0, 0);
    for n in nodes {
        for (_, t, c) in n.dp.store().program_stats()? {
            ns += t;
            cnt += c;
        }
    }
    let per = if cnt > before_cnt {
        (ns - before) as f64 / (cnt - before_cnt) as f64
    } else {
        f64::NAN
    };
    Ok((ns, cnt, per))
}

/// The median of `runs` measurements of each of [`SYSTEMS`], the order
/// rotating from run to run.
fn alternate(
    runs: usize,
    mut measure: impl FnMut(System) -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<f64>> {
    let mut all = vec![Vec::new(); SYSTEMS.len()];
    for i in 0..runs {
        for k in 0..SYSTEMS.len() {
            let at = (i + k) % SYSTEMS.len();
            all[at].push(measure(SYSTEMS[at])?);
        }
    }
    Ok(all.iter_mut().map(|v| median(v)).collect())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let runs = opts.runs.unwrap_or(3);
    ensure!(runs > 0, "--runs must be at least 1");
    ensure!(
        nix::unistd::geteuid().is_root(),
        "datapath needs root (namespaces, bpf)"
    );
    let prefix = Prefix::for_test()?;
    let mut fabric = Fabric::new(&prefix)?;
    let a = fabric.add_node("a")?;
    let b = fabric.add_node("b")?;

    // Basalt's VMs, one per node, over the overlay.
    let v1 = Vm::create(
        &prefix,
        &a,
        "v1",
        Ipv4Addr::new(10, 77, 1, 1),
        [2, 0, 0, 0x77, 1, 1],
    )?;
    let v2 = Vm::create(
        &prefix,
        &b,
        "v2",
        Ipv4Addr::new(10, 77, 2, 1),
        [2, 0, 0, 0x77, 2, 1],
    )?;
    let mut dp_a = NodeDp::start(&a, &[&v1])?;
    let mut dp_b = NodeDp::start(&b, &[&v2])?;
    dp_a.keep_resolved(&[&b])?;
    dp_b.keep_resolved(&[&a])?;
    let eps = [
        v1.endpoint(&a, VM_IDENTITY[0]),
        v2.endpoint(&b, VM_IDENTITY[1]),
    ];

    // The peer's VMs, routed by the kernel between the same nodes.
    let p1 = Vm::create(
        &prefix,
        &a,
        "p1",
        Ipv4Addr::new(10, 78, 1, 1),
        [2, 0, 0, 0x78, 1, 1],
    )?;
    let p2 = Vm::create(
        &prefix,
        &b,
        "p2",
        Ipv4Addr::new(10, 78, 2, 1),
        [2, 0, 0, 0x78, 2, 1],
    )?;
    for (node, vm, other, other_node) in [(&a, &p1, &p2, &b), (&b, &p2, &p1, &a)] {
        node.ip(&["link", "set", &vm.tap, "up"])?;
        node.ip(&["addr", "add", "169.254.1.1/32", "dev", &vm.tap])?;
        node.ip(&["route", "add", &format!("{}/32", vm.ip), "dev", &vm.tap])?;
        node.ip(&[
            "route",
            "add",
            &format!("{}/32", other.ip),
            "via",
            &other_node.addr().to_string(),
        ])?;
    }

    measure(runs, &mut dp_a, &mut dp_b, &eps, &b, [&v1, &v2], [&p1, &p2])
}

/// Basalt's per-packet program cost over one more pass of the measured
/// traffic (TCP, UDP, request/response), with the kernel's BPF run-time
/// statistics on for that pass only.
fn program_cost(nodes: &[&NodeDp], client: &Vm, server: &Vm) -> anyhow::Result<f64> {
    let stats = loader::enable_stats()?;
    let (t0, c0, _) = bpf_ns_per_packet(nodes, 0, 0)?;
    tcp_gbps(client, server.ip)?;
    udp_kpps(client, server.ip)?;
    request_response(client, server)?;
    let (_, _, per_packet) = bpf_ns_per_packet(nodes, t0, c0)?;
    drop(stats);
    Ok(per_packet)
}

/// Basalt's two nodes with the endpoints and the policies of the case.
struct Basalt<'a> {
    nodes: [&'a mut NodeDp; 2],
    eps: &'a [Endpoint],
    policies: Vec<Policy>,
    routing: Option<Routing>,
}

impl Basalt<'_> {
    /// Applies the case's policies with both nodes in `routing` mode.
    fn set(&mut self, routing: Routing) -> anyhow::Result<()> {
        if self.routing == Some(routing) {
            return Ok(());
        }
        for node in self.nodes.iter_mut() {
            node.set_routing(routing);
            node.apply(self.eps, &self.policies)?;
        }
        self.routing = Some(routing);
        Ok(())
    }

    fn set_policies(&mut self, policies: Vec<Policy>) -> anyhow::Result<()> {
        self.policies = policies;
        for node in self.nodes.iter_mut() {
            node.apply(self.eps, &self.policies)?;
        }
        Ok(())
    }
}

fn measure(
    runs: usize,
    dp_a: &mut NodeDp,
    dp_b: &mut NodeDp,
    eps: &[Endpoint],
    b: &Node,
    basalt: [&Vm; 2],
    peer: [&Vm; 2],
) -> anyhow::Result<Report> {
    let mut report = Report::new("datapath");
    let _s1 = iperf_server(basalt[1])?;
    let _s2 = iperf_server(peer[1])?;
    let mut tcp = std::collections::BTreeMap::new();
    let mut sys = Basalt {
        nodes: [dp_a, dp_b],
        eps,
        policies: Vec::new(),
        routing: None,
    };
    for rules in rule_counts()? {
        let case = format!("{rules} rules");
        sys.set_policies(basalt_policy(rules))?;
        nft_apply(b, &nft_ruleset(rules))?;

        let mut vms = |system: System| -> anyhow::Result<[&Vm; 2]> {
            match system {
                System::Basalt(routing) => {
                    sys.set(routing)?;
                    Ok(basalt)
                }
                System::Peer => Ok(peer),
            }
        };
        let gbps = alternate(runs, |system| {
            let [c, s] = vms(system)?;
            tcp_gbps(c, s.ip)
        })?;
        let kpps = alternate(runs, |system| {
            let [c, s] = vms(system)?;
            udp_kpps(c, s.ip)
        })?;
        let mut rr = Vec::new();
        for system in SYSTEMS {
            let [c, s] = vms(system)?;
            rr.push(request_response(c, s)?);
        }
        let mut cost = Vec::new();
        for system in SYSTEMS {
            if let System::Basalt(routing) = system {
                sys.set(routing)?;
                let nodes = [&*sys.nodes[0], &*sys.nodes[1]];
                cost.push((system, program_cost(&nodes, basalt[0], basalt[1])?));
            }
        }

        for (k, system) in SYSTEMS.iter().enumerate() {
            let name = system.name();
            report.row(&case, name, "tcp throughput", "Gbit/s", gbps[k]);
            report.row(&case, name, "udp 64B rate", "kpps", kpps[k]);
            report.row(&case, name, "rr latency p50", "ms", rr[k].quantile_ms(0.5));
            report.row(&case, name, "rr latency p99", "ms", rr[k].quantile_ms(0.99));
        }
        for (system, per_packet) in cost {
            report.row(
                &case,
                system.name(),
                "program cost per packet",
                "ns",
                per_packet,
            );
        }
        tcp.insert(rules, gbps);
    }
    let peer_at = SYSTEMS.len() - 1;
    if let Some(at0) = tcp.get(&0) {
        for (k, system) in SYSTEMS.iter().enumerate().take(peer_at) {
            report.goal(Goal::new(
                format!(
                    "{} tcp throughput at 0 rules vs plain (Gbit/s)",
                    system.name()
                ),
                at0[peer_at],
                at0[k],
                Better::Higher,
            ));
            if let Some(at10k) = tcp.get(&10_000) {
                report.goal(Goal::new(
                    format!(
                        "{} tcp throughput at 10000 rules vs own 0-rule (Gbit/s)",
                        system.name()
                    ),
                    at0[k] * 0.9,
                    at10k[k],
                    Better::Higher,
                ));
            }
        }
    }
    Ok(report)
}

/// The rule counts to measure: `BASALT_DATAPATH_RULES` (comma-separated)
/// or all of [`RULE_COUNTS`].
fn rule_counts() -> anyhow::Result<Vec<usize>> {
    let Ok(list) = std::env::var("BASALT_DATAPATH_RULES") else {
        return Ok(RULE_COUNTS.to_vec());
    };
    list.split(',')
        .map(|n| {
            n.trim()
                .parse()
                .with_context(|| format!("BASALT_DATAPATH_RULES: {n:?} is not a rule count"))
        })
        .collect()
}
