//! The policy matrix on real interfaces (root, CI): allowed until a policy
//! selects an endpoint, then denied by default; allow by identity, by CIDR,
//! by protocol and port range; deny over allow; egress; replies pass by
//! connection tracking; every change takes effect without re-attaching.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

use basalt_sdn::abi::DropReason;
use basalt_sdn::{Action, Peer, Policy, Protocol, Rule};
use basalt_testkit::{Fabric, Prefix};
use common::{NodeDatapath, Vm, echo_on, init_logs};

const CLIENT: u32 = 10;
const SERVER: u32 = 20;
const OTHER: u32 = 30;

fn rule(action: Action, peer: Peer, protocol: Protocol, ports: (u16, u16)) -> Rule {
    Rule {
        action,
        peer,
        protocol,
        ports,
    }
}

fn ingress(name: &str, subject: u32, rules: Vec<Rule>) -> Policy {
    Policy {
        name: name.into(),
        selector: BTreeSet::from([subject]),
        ingress: Some(rules),
        egress: None,
    }
}

#[test]
fn policy_matrix() {
    init_logs();
    let prefix = Prefix::for_test().unwrap();
    let mut fabric = Fabric::new(&prefix).unwrap();
    let node = fabric.add_node("a").unwrap();
    let ips = [1, 2, 3].map(|n| Ipv4Addr::new(10, 77, 0, n));
    let client = Vm::create(&prefix, &node, 1, ips[0]);
    let server = Vm::create(&prefix, &node, 2, ips[1]);
    let other = Vm::create(&prefix, &node, 3, ips[2]);
    let mut dp = NodeDatapath::start(&node, &[&client, &server, &other], false);
    let eps = [
        client.endpoint(node.addr(), CLIENT),
        server.endpoint(node.addr(), SERVER),
        other.endpoint(node.addr(), OTHER),
    ];
    for vm in [&client, &server, &other] {
        vm.start_echo(7000);
        vm.start_echo(8000);
    }
    let srv = |port| SocketAddr::from((ips[1], port));

    // Default allow.
    dp.apply(&eps, &[]);
    assert!(client.reaches(srv(7000)));
    assert!(other.reaches(srv(8000)));
    // A flow opened while nothing selects either side: the programs track
    // it by its SYN alone.
    let mut open = client.tcp_connect(srv(7000)).unwrap();
    echo_on(&mut open, 1_000).unwrap();

    // Selected for ingress with no rules: default deny.
    let before = dp.drops(DropReason::Policy);
    dp.apply(&eps, &[ingress("lockdown", SERVER, vec![])]);
    assert!(!client.reaches(srv(7000)));
    assert!(!other.reaches(srv(7000)));
    assert!(dp.drops(DropReason::Policy) > before, "denials are counted");
    // ...yet the flow opened before the policy goes on.
    echo_on(&mut open, 100_000).expect("an established flow outlives a new policy");
    drop(open);
    // Egress of the server is not covered: it still reaches out.
    assert!(server.reaches(SocketAddr::from((ips[0], 7000))));

    // Allow by identity, protocol and port range.
    let by_identity = rule(
        Action::Allow,
        Peer::Identity(CLIENT),
        Protocol::Tcp,
        (7000, 7999),
    );
    dp.apply(&eps, &[ingress("clients", SERVER, vec![by_identity])]);
    assert!(client.reaches(srv(7000)));
    assert!(!client.reaches(srv(8000)), "port outside the range");
    assert!(!other.reaches(srv(7000)), "identity not allowed");
    assert_eq!(
        client.udp_echo(ips[0], srv(7000), b"udp"),
        None,
        "protocol not allowed"
    );

    // Allow by CIDR (any protocol, any port).
    let by_cidr = rule(
        Action::Allow,
        Peer::Cidr("10.77.0.3/32".parse().unwrap()),
        Protocol::Any,
        (0, 65535),
    );
    dp.apply(
        &eps,
        &[ingress("clients", SERVER, vec![by_identity, by_cidr])],
    );
    assert!(other.reaches(srv(8000)));
    assert!(other.udp_echo(ips[2], srv(7000), b"udp").is_some());

    // Deny beats allow: a covering /24 denies TCP 8000, from another policy.
    let deny = rule(
        Action::Deny,
        Peer::Cidr("10.77.0.0/24".parse().unwrap()),
        Protocol::Tcp,
        (8000, 8000),
    );
    let policies = [
        ingress("clients", SERVER, vec![by_identity, by_cidr]),
        ingress("no-8000", SERVER, vec![deny]),
    ];
    dp.apply(&eps, &policies);
    assert!(!other.reaches(srv(8000)), "deny over the /32 allow");
    assert!(other.reaches(srv(7000)));
    assert!(client.reaches(srv(7000)));

    // Egress: the client may only reach the server's 7000.
    let egress = Policy {
        name: "client-out".into(),
        selector: BTreeSet::from([CLIENT]),
        ingress: None,
        egress: Some(vec![rule(
            Action::Allow,
            Peer::Cidr("10.77.0.2/32".parse().unwrap()),
            Protocol::Tcp,
            (7000, 7000),
        )]),
    };
    dp.apply(&eps, std::slice::from_ref(&egress));
    assert!(client.reaches(srv(7000)));
    assert!(!client.reaches(SocketAddr::from((ips[2], 7000))));
    assert!(
        other.reaches(SocketAddr::from((ips[0], 7000))),
        "ingress of the client is open"
    );

    // Replies pass: the client accepts nothing new, yet its own
    // connections get their answers.
    let closed = ingress("client-closed", CLIENT, vec![]);
    dp.apply(&eps, &[closed]);
    assert!(client.reaches(srv(8000)));
    assert!(!server.reaches(SocketAddr::from((ips[0], 7000))));

    // Back to no policy: everything flows again.
    dp.apply(&eps, &[]);
    assert!(server.reaches(SocketAddr::from((ips[0], 7000))));
    assert!(other.reaches(srv(8000)));
}
