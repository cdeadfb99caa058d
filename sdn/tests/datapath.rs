//! The eBPF datapath on real interfaces (root, CI): two "VMs" on one node
//! talk through the TC programs; the gateway's ARP is answered and nothing
//! else's; spoofed frames are dropped and counted; a loader restart keeps
//! established flows.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use basalt_sdn::abi::{self, DropReason, EVENT_DROP};
use basalt_sdn::loader;
use basalt_sdn::nftables::{self, NodeRules};
use basalt_testkit::{Fabric, Prefix};
use common::{NodeDatapath, Vm, echo_on, init_logs, mac_str};

const VM1: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const VM2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

#[test]
fn same_node_traffic_gateway_arp_and_antispoofing() {
    init_logs();
    let prefix = Prefix::for_test().unwrap();
    let mut fabric = Fabric::new(&prefix).unwrap();
    let node = fabric.add_node("a").unwrap();
    let vm1 = Vm::create(&prefix, &node, 1, VM1);
    let vm2 = Vm::create(&prefix, &node, 2, VM2);
    let mut dp = NodeDatapath::start(&node, &[&vm1, &vm2], false);
    let eps = [vm1.endpoint(node.addr(), 0), vm2.endpoint(node.addr(), 0)];
    let report = dp.apply(&eps, &[]);
    assert!(report.resynced && report.writes > 0);
    vm2.start_echo(7000);
    let echo = SocketAddr::from((VM2, 7000));

    // TCP and UDP through the programs.
    vm1.tcp_echo(echo, 200_000).expect("tcp between VMs");
    let udp = vm1.udp_echo(VM1, echo, b"hello over udp");
    assert_eq!(udp.as_deref(), Some(&b"hello over udp"[..]));
    assert!(
        dp.loader().conntrack_len() >= 2,
        "the program tracked the flows (traffic went through it, not the node's stack)"
    );

    // The gateway answered ARP with its fixed MAC...
    let neigh = vm1.ip(&["neigh", "show", "169.254.1.1", "dev", "eth0"]);
    assert!(
        neigh.contains(&mac_str(abi::GATEWAY_MAC)),
        "neighbour entry: {neigh}"
    );
    // ...and nobody answers for anything else, not even a real VM.
    let before = dp.drops(DropReason::ArpNotGateway);
    let arping = vm1
        .command("busybox")
        .args([
            "arping",
            "-c",
            "2",
            "-w",
            "2",
            "-I",
            "eth0",
            &VM2.to_string(),
        ])
        .output()
        .unwrap();
    assert!(!arping.status.success(), "ARP for a VM was answered");
    assert!(dp.drops(DropReason::ArpNotGateway) > before);

    // A spoofed source IP is dropped, counted and reported.
    dp.loader().drain_events();
    let before = dp.drops(DropReason::SpoofIp);
    let spoofed = Ipv4Addr::new(10, 77, 0, 99);
    vm1.ip(&["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"]);
    assert_eq!(vm1.udp_echo(spoofed, echo, b"spoofed ip"), None);
    assert!(dp.drops(DropReason::SpoofIp) > before);
    let events = dp.loader().drain_events();
    assert!(
        events.iter().any(|e| e.kind == EVENT_DROP
            && e.reason == DropReason::SpoofIp as u32
            && e.saddr == abi::ip_key(spoofed)),
        "drop event for the spoofed source: {events:?}"
    );
    vm1.ip(&["addr", "del", &format!("{spoofed}/32"), "dev", "eth0"]);

    // A spoofed source MAC is dropped and counted.
    let before = dp.drops(DropReason::SpoofMac);
    vm1.ip(&["link", "set", "eth0", "address", "02:00:0a:4d:63:63"]);
    assert_eq!(vm1.udp_echo(VM1, echo, b"spoofed mac"), None);
    assert!(dp.drops(DropReason::SpoofMac) > before);
    vm1.ip(&["link", "set", "eth0", "address", &mac_str(vm1.mac)]);
    assert!(vm1.udp_echo(VM1, echo, b"back to normal").is_some());

    // What `basaltd net status` shows, read from the pins alone.
    let status = loader::status(node.netns()).unwrap();
    assert_eq!(status.links, ["vmtap1", "vmtap2"]);
    assert_eq!(status.endpoints.len(), 2);
    assert_eq!(status.ifaces.len(), 2);
    assert!(status.conntrack >= 2);
    assert!(status.drops[&DropReason::SpoofMac] > 0 && status.drops[&DropReason::SpoofIp] > 0);
}

#[test]
fn loader_restart_keeps_established_flows() {
    init_logs();
    let prefix = Prefix::for_test().unwrap();
    let mut fabric = Fabric::new(&prefix).unwrap();
    let node = fabric.add_node("a").unwrap();
    let vm1 = Vm::create(&prefix, &node, 1, VM1);
    let vm2 = Vm::create(&prefix, &node, 2, VM2);
    let mut dp = NodeDatapath::start(&node, &[&vm1, &vm2], false);
    let eps = [vm1.endpoint(node.addr(), 0), vm2.endpoint(node.addr(), 0)];
    dp.apply(&eps, &[]);
    vm2.start_echo(7000);

    let mut conn = vm1.tcp_connect(SocketAddr::from((VM2, 7000))).unwrap();
    echo_on(&mut conn, 10_000).unwrap();
    let flows = dp.loader().conntrack_len();
    assert!(flows >= 1, "the opening SYN recorded the flow");

    dp.restart(&[&vm1, &vm2]);
    // The maps were kept: the resync finds nothing to change, and the
    // connection-tracking entries are still there.
    let report = dp.apply(&eps, &[]);
    assert!(report.resynced);
    assert_eq!(report.writes, 0, "pinned maps kept their contents");
    assert!(dp.loader().conntrack_len() >= flows);
    // ...through the reloaded programs: the kernel counts their runs while
    // statistics are on.
    let stats = loader::enable_stats().expect("BPF_ENABLE_STATS");
    let runs = |dp: &mut NodeDatapath| -> u64 {
        let stats = dp.loader().program_stats().unwrap();
        stats.iter().map(|(_, _, count)| count).sum()
    };
    let before = runs(&mut dp);
    echo_on(&mut conn, 10_000).expect("the established flow survives the restart");
    assert!(
        runs(&mut dp) >= before + 2,
        "the data went through from_vm both ways"
    );
    drop(stats);

    // With the node's guards, a tap without its program does not turn into
    // a path around it: the node's own routing refuses guest-to-guest.
    let rules = NodeRules {
        uplink: "eth0".into(),
        tap_prefix: "vmtap".into(),
        networks: vec![common::network().cidr],
    };
    node.run_in(|| nftables::apply(&rules)).unwrap().unwrap();
    dp.loader().detach(&vm1.tap).unwrap();
    // The kernel frees a link whose last reference went in a work queue:
    // the program may run a moment longer.
    let blocked = (0..10).any(|_| {
        let reached = vm1.reaches(SocketAddr::from((VM2, 7000)));
        if reached {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        !reached
    });
    assert!(
        blocked,
        "guest-to-guest around a missing program is refused"
    );
}
