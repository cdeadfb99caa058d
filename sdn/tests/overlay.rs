//! Cross-node traffic (root, CI), each test in both routing modes: two
//! nodes on a fabric, a VM on each. Over the overlay, the source node's
//! program sets the tunnel key and redirects to its collect-metadata VXLAN
//! device, and the target node's overlay program (or the uplink's fast
//! path) checks ownership and policy and delivers. With native routing
//! the source node sends the packet as it is to the owner node's underlay
//! address, and the target's uplink program checks the sending node,
//! applies policy with the source's identity from the endpoints map and
//! delivers.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

use basalt_sdn::abi::{DropReason, EP_NATIVE, EP_PEER, EVENT_ACTIVATION};
use basalt_sdn::{Action, Endpoint, Network, Peer, Policy, Protocol, Routing, Rule, loader};
use basalt_testkit::{Fabric, Node, Prefix};
use common::{NodeDatapath, Vm, echo_on, init_logs};

#[test]
fn tcp_and_udp_between_nodes_over_the_overlay() {
    tcp_and_udp_between_nodes(Routing::Overlay);
}

#[test]
fn tcp_and_udp_between_nodes_with_native_routing() {
    tcp_and_udp_between_nodes(Routing::Native);
}

#[test]
fn endpoint_moves_on_activation_and_flows_continue_over_the_overlay() {
    endpoint_moves_on_activation_and_flows_continue(Routing::Overlay);
}

#[test]
fn endpoint_moves_on_activation_and_flows_continue_with_native_routing() {
    endpoint_moves_on_activation_and_flows_continue(Routing::Native);
}

/// Two networks on the same two nodes, one native, one following the
/// nodes' default (the overlay): each network's packets leave as its mode
/// says, side by side.
#[test]
fn two_networks_in_different_modes_share_the_nodes() {
    init_logs();
    let prefix = Prefix::for_test().unwrap();
    let mut fabric = Fabric::new(&prefix).unwrap();
    let a = fabric.add_node("a").unwrap();
    let b = fabric.add_node("b").unwrap();
    let blue = Network {
        routing: Some(Routing::Native),
        ..common::network()
    };
    let green = Network {
        name: "green".into(),
        vni: 4343,
        cidr: "10.78.0.0/16".parse().unwrap(),
        routing: None,
    };
    let (ip1, ip2) = (Ipv4Addr::new(10, 77, 1, 1), Ipv4Addr::new(10, 77, 2, 1));
    let (ip3, ip4) = (Ipv4Addr::new(10, 78, 1, 1), Ipv4Addr::new(10, 78, 2, 1));
    let vm1 = Vm::create(&prefix, &a, 1, ip1);
    let vm2 = Vm::create(&prefix, &b, 2, ip2);
    let vm3 = Vm::create(&prefix, &a, 3, ip3);
    let vm4 = Vm::create(&prefix, &b, 4, ip4);
    let mut dp_a = NodeDatapath::start_routed(&a, &[&vm1, &vm3], Some(Routing::Overlay));
    let mut dp_b = NodeDatapath::start_routed(&b, &[&vm2, &vm4], Some(Routing::Overlay));
    let on_green = |ep: Endpoint| Endpoint {
        network: "green".into(),
        ..ep
    };
    let eps = [
        vm1.endpoint(a.addr(), 1),
        vm2.endpoint(b.addr(), 2),
        on_green(vm3.endpoint(a.addr(), 3)),
        on_green(vm4.endpoint(b.addr(), 4)),
    ];
    let networks = [blue, green];
    dp_a.apply_networks(&eps, &networks, &[]);
    dp_b.apply_networks(&eps, &networks, &[]);
    // What the agent does for every peer node.
    keep_resolved(&a, &b);
    keep_resolved(&b, &a);
    vm2.start_echo(7000);
    vm4.start_echo(7000);
    let status = loader::status(a.netns()).unwrap();
    assert_eq!(status.routing, Routing::Overlay, "the nodes' default");
    assert_eq!(status.endpoints[&ip2].flags & EP_NATIVE, EP_NATIVE, "blue");
    assert_eq!(status.endpoints[&ip4].flags & EP_NATIVE, 0, "green");

    let stats = loader::enable_stats().expect("BPF_ENABLE_STATS");
    let overlay_runs = |dp: &mut NodeDatapath| -> u64 {
        let stats = dp.loader().program_stats().unwrap();
        stats
            .iter()
            .find(|(p, _, _)| *p == "from_overlay")
            .unwrap()
            .2
    };
    let before = overlay_runs(&mut dp_b);
    vm1.tcp_echo(SocketAddr::from((ip2, 7000)), 200_000)
        .expect("blue between the nodes");
    assert_eq!(
        overlay_runs(&mut dp_b),
        before,
        "the native network encapsulates nothing"
    );
    vm3.tcp_echo(SocketAddr::from((ip4, 7000)), 200_000)
        .expect("green between the nodes");
    assert!(
        overlay_runs(&mut dp_b) > before,
        "the other network goes over the overlay"
    );
    // And both ways.
    vm1.start_echo(7001);
    vm3.start_echo(7001);
    vm2.tcp_echo(SocketAddr::from((ip1, 7001)), 10_000)
        .expect("blue back");
    vm4.tcp_echo(SocketAddr::from((ip3, 7001)), 10_000)
        .expect("green back");
    drop(stats);
    for dp in [&mut dp_a, &mut dp_b] {
        assert_eq!(dp.drops(DropReason::NoNeighbour), 0);
    }
}

/// Node `from` resolves `to`'s underlay address (a datagram makes it ask).
fn resolve(from: &Node, to: &Node) {
    let addr = to.addr();
    for _ in 0..20 {
        from.run_in(move || {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            let _ = socket.send_to(b"resolve", (addr, 9));
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let neigh = from
            .ip(&["neigh", "show", &addr.to_string(), "dev", "eth0"])
            .unwrap();
        if neigh.contains("lladdr") {
            return;
        }
    }
    panic!("{} did not resolve {}", from.name(), to.name());
}

fn tcp_and_udp_between_nodes(routing: Routing) {
    init_logs();
    let prefix = Prefix::for_test().unwrap();
    let mut fabric = Fabric::new(&prefix).unwrap();
    let a = fabric.add_node("a").unwrap();
    let b = fabric.add_node("b").unwrap();
    let c = fabric.add_node("c").unwrap();
    let ip1 = Ipv4Addr::new(10, 77, 1, 1);
    let ip2 = Ipv4Addr::new(10, 77, 2, 1);
    let vm1 = Vm::create(&prefix, &a, 1, ip1);
    let vm2 = Vm::create(&prefix, &b, 2, ip2);
    let mut dp_a = NodeDatapath::start_routed(&a, &[&vm1], Some(routing));
    let mut dp_b = NodeDatapath::start_routed(&b, &[&vm2], Some(routing));
    let eps = [vm1.endpoint(a.addr(), 1), vm2.endpoint(b.addr(), 2)];
    dp_a.apply(&eps, &[]);
    dp_b.apply(&eps, &[]);
    vm2.start_echo(7000);
    vm1.start_echo(7000);
    let to_vm2 = SocketAddr::from((ip2, 7000));
    // The "taps" here are veths: delivery hands packets to the other end.
    let status = loader::status(b.netns()).unwrap();
    assert_eq!(status.endpoints[&ip2].flags & EP_PEER, EP_PEER);
    assert_eq!(status.endpoints[&ip1].flags & EP_PEER, 0, "remote");
    assert_eq!(status.routing, routing);

    let stats = loader::enable_stats().expect("BPF_ENABLE_STATS");
    let runs = |dp: &mut NodeDatapath, program: &str| -> u64 {
        let stats = dp.loader().program_stats().unwrap();
        stats.iter().find(|(p, _, _)| *p == program).unwrap().2
    };
    let (overlay, uplink) = (
        runs(&mut dp_b, "from_overlay"),
        runs(&mut dp_b, "from_uplink"),
    );
    vm1.tcp_echo(to_vm2, 500_000).expect("tcp between nodes");
    vm2.tcp_echo(SocketAddr::from((ip1, 7000)), 10_000)
        .expect("and back");
    assert_eq!(
        vm1.udp_echo(ip1, to_vm2, b"between nodes").as_deref(),
        Some(&b"between nodes"[..])
    );
    assert!(
        dp_b.loader().conntrack_len() >= 2,
        "node b's programs tracked the flows"
    );
    match routing {
        Routing::Overlay => {
            // The fast path: single packets without TCP data are
            // decapsulated on the uplink and never reach the VXLAN device;
            // TCP data does.
            let (overlay, uplink) = (
                runs(&mut dp_b, "from_overlay"),
                runs(&mut dp_b, "from_uplink"),
            );
            for _ in 0..3 {
                assert!(vm1.udp_echo(ip1, to_vm2, b"fast").is_some());
            }
            assert!(runs(&mut dp_b, "from_uplink") >= uplink + 3);
            assert_eq!(
                runs(&mut dp_b, "from_overlay"),
                overlay,
                "UDP took the uplink's fast path"
            );
            vm1.tcp_echo(to_vm2, 100_000).expect("tcp data");
            assert!(
                runs(&mut dp_b, "from_overlay") > overlay,
                "TCP data went through the VXLAN device"
            );
        }
        Routing::Native => {
            assert_eq!(
                runs(&mut dp_b, "from_overlay"),
                overlay,
                "nothing was encapsulated"
            );
            assert!(runs(&mut dp_b, "from_uplink") > uplink);
        }
    }
    drop(stats);

    // Ingress policy applies on the receiving node, by the sender's
    // identity: allowing identity 1 lets VM1 in, allowing only identity
    // 3 does not, and an empty ingress locks it down.
    let allow_from = |identity| Policy {
        name: "from".into(),
        selector: BTreeSet::from([2]),
        ingress: Some(vec![Rule {
            action: Action::Allow,
            peer: Peer::Identity(identity),
            protocol: Protocol::Tcp,
            ports: (7000, 7000),
        }]),
        egress: None,
    };
    dp_b.apply(&eps, &[allow_from(1)]);
    assert!(vm1.reaches(to_vm2), "allowed by identity");
    let before = dp_b.drops(DropReason::Policy);
    dp_b.apply(&eps, &[allow_from(3)]);
    assert!(!vm1.reaches(to_vm2), "another identity's allow");
    assert!(dp_b.drops(DropReason::Policy) > before);
    let before = dp_b.drops(DropReason::Policy);
    let lockdown = Policy {
        name: "lockdown".into(),
        selector: BTreeSet::from([2]),
        ingress: Some(vec![]),
        egress: None,
    };
    dp_b.apply(&eps, std::slice::from_ref(&lockdown));
    assert!(!vm1.reaches(to_vm2));
    assert!(dp_b.drops(DropReason::Policy) > before);
    dp_b.apply(&eps, &[]);
    assert!(vm1.reaches(to_vm2));

    // Packets from a node that does not own their source are refused:
    // node b now believes VM1 lives on node c.
    let eps_on_c = [vm1.endpoint(c.addr(), 1), vm2.endpoint(b.addr(), 2)];
    if routing == Routing::Native {
        // Natively, b tells c's frames by the MAC of its next hop towards
        // c, which it has not resolved yet: it cannot tell them from a's,
        // and does not let them in.
        assert!(!neighbour_known(&b, &c), "b has not resolved c yet");
        let before = dp_b.drops(DropReason::NoNeighbour);
        dp_b.apply(&eps_on_c, &[]);
        assert!(!vm1.reaches(to_vm2), "an unresolved owner lets nothing in");
        assert!(dp_b.drops(DropReason::NoNeighbour) > before);
        // What the agent does for every peer node: a managed entry,
        // resolved by the kernel at once.
        keep_resolved(&b, &c);
    } else {
        resolve(&b, &c);
    }
    let before = dp_b.drops(DropReason::NotOwner);
    dp_b.apply(&eps_on_c, &[]);
    assert!(!vm1.reaches(to_vm2));
    assert!(dp_b.drops(DropReason::NotOwner) > before);

    if routing == Routing::Native {
        // The real owner while b has forgotten it (its entry deleted; a
        // still has b's, so nothing makes b ask): its packets drop, counted,
        // until b keeps a resolved again; then the flow passes.
        dp_b.apply(&eps, &[]);
        b.ip(&["neigh", "del", &a.addr().to_string(), "dev", "eth0"])
            .unwrap();
        // The programs' next-hop cache trusts a matching entry for half a
        // second.
        std::thread::sleep(std::time::Duration::from_millis(700));
        let before = dp_b.drops(DropReason::NoNeighbour);
        assert!(
            !vm1.reaches(to_vm2),
            "not told from others while unresolved"
        );
        assert!(dp_b.drops(DropReason::NoNeighbour) > before);
        keep_resolved(&b, &a);
        assert!(vm1.reaches(to_vm2), "the owner's flow passes once resolved");
    }
}

/// Whether `from` has a resolved neighbour entry for `to`'s address.
fn neighbour_known(from: &Node, to: &Node) -> bool {
    from.ip(&["neigh", "show", &to.addr().to_string(), "dev", "eth0"])
        .unwrap()
        .contains("lladdr")
}

/// Node `from` keeps `to`'s address resolved as the agent does (a managed
/// neighbour entry), and waits until it is.
fn keep_resolved(from: &Node, to: &Node) {
    let addr = to.addr();
    let hop = from
        .run_in(move || basalt_sdn::Netlink::new().unwrap().keep_resolved(addr))
        .unwrap()
        .unwrap();
    assert_eq!(hop, addr, "on-link: the node itself is the next hop");
    for _ in 0..50 {
        if neighbour_known(from, to) {
            let shown = from
                .ip(&["-d", "neigh", "show", &addr.to_string(), "dev", "eth0"])
                .unwrap();
            assert!(shown.contains("managed"), "{shown}");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{} did not resolve {}", from.name(), to.name());
}

fn endpoint_moves_on_activation_and_flows_continue(routing: Routing) {
    init_logs();
    let prefix = Prefix::for_test().unwrap();
    let mut fabric = Fabric::new(&prefix).unwrap();
    let a = fabric.add_node("a").unwrap();
    let b = fabric.add_node("b").unwrap();
    let peer_ip = Ipv4Addr::new(10, 77, 3, 1);
    let mover_ip = Ipv4Addr::new(10, 77, 3, 2);
    let peer = Vm::create(&prefix, &b, 3, peer_ip);
    let mover = Vm::create(&prefix, &b, 2, mover_ip);
    let mut dp_a = NodeDatapath::start_routed(&a, &[], Some(routing));
    let mut dp_b = NodeDatapath::start_routed(&b, &[&peer, &mover], Some(routing));
    let before = [peer.endpoint(b.addr(), 3), mover.endpoint(b.addr(), 2)];
    // Stateful policy: the mover may start nothing; its replies pass only
    // because connection tracking knows the flows.
    let closed = [Policy {
        name: "mover-egress-closed".into(),
        selector: BTreeSet::from([2]),
        ingress: None,
        egress: Some(vec![]),
    }];
    dp_a.apply(&before, &closed);
    dp_b.apply(&before, &closed);
    mover.start_echo(7000);

    // The peer holds one connection to the mover, same node at first.
    let mut conn = peer
        .tcp_connect(SocketAddr::from((mover_ip, 7000)))
        .unwrap();
    echo_on(&mut conn, 10_000).unwrap();

    // "Migration": the source detaches the tap, the guest's NIC reappears
    // on node a, whose tap waits in standby.
    dp_b.loader().detach(&mover.tap).unwrap();
    let a_ns = a.netns().to_owned();
    b.ip(&["link", "set", &mover.tap, "netns", &a_ns]).unwrap();
    dp_a.attach_tap(&mover);
    let standby = [(mover.tap.clone(), mover_ip)];
    dp_a.apply_standby(&before, &closed, &standby);
    dp_a.loader().drain_events();

    // The guest's first frames on the standby tap: one activation event;
    // the gateway's ARP is answered (the guest's cache lost it here, as
    // when its link went down with the move), anything else is dropped
    // until the endpoint moves.
    let standby_drops = dp_a.drops(DropReason::Standby);
    mover.ip(&["neigh", "flush", "dev", "eth0"]);
    for _ in 0..2 {
        mover.run_in(|| {
            let socket = std::net::UdpSocket::bind((mover_ip, 0)).unwrap();
            let _ = socket.send_to(b"early", (peer_ip, 9));
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let neigh = mover.ip(&["neigh", "show", "169.254.1.1", "dev", "eth0"]);
    assert!(
        neigh.contains("02:ba:5a:17:00:01") && !neigh.contains("FAILED"),
        "the gateway's ARP is answered on a standby tap: {neigh:?}"
    );
    let activations: Vec<_> = dp_a
        .loader()
        .drain_events()
        .into_iter()
        .filter(|e| e.kind == EVENT_ACTIVATION)
        .collect();
    let tap_index = dp_a.netlink.index(&mover.tap).unwrap();
    assert_eq!(
        activations.len(),
        1,
        "exactly one activation: {activations:?}"
    );
    assert_eq!(
        (activations[0].smac, activations[0].ifindex),
        (mover.mac, tap_index)
    );
    assert!(dp_a.drops(DropReason::Standby) >= 2);
    assert!(standby_drops < dp_a.drops(DropReason::Standby));

    // The agent moves the endpoint, with its tracked flows; every node
    // applies it.
    let flows = dp_b.loader().conntrack_of(mover_ip);
    assert!(!flows.is_empty());
    let keys: Vec<_> = flows.iter().map(|(k, _)| *k).collect();
    dp_a.loader().import_conntrack(&keys).unwrap();
    let after = [peer.endpoint(b.addr(), 3), mover.endpoint(a.addr(), 2)];
    let policy_drops = dp_a.drops(DropReason::Policy);
    dp_a.apply(&after, &closed);
    dp_b.apply(&after, &closed);

    // The same connection continues, now between the nodes; with the
    // mover's egress closed, only tracked flows pass on the new node.
    echo_on(&mut conn, 10_000).expect("the connection survives the move");
    assert!(
        dp_a.loader().conntrack_packets() > 0,
        "node a's programs carry the flow"
    );
    assert_eq!(dp_a.drops(DropReason::Policy), policy_drops);
}
