//! The fabric: nodes reach each other over the bridge, each node is its own
//! namespace, and a dropped fabric leaves nothing behind. Needs root.

use std::fs;
use std::net::{Ipv4Addr, TcpListener};

use basalt_testkit::netns::{NODE_IFNAME, NetnsError};
use basalt_testkit::{Fabric, Node, Prefix, sweep};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("basalt_testkit=debug")
        .try_init();
}

/// `ping -c1 -W2` from inside `from` (busybox: iputils is not installed);
/// a few tries, the first may wait for ARP.
fn pings(from: &Node, to: Ipv4Addr) -> bool {
    (0..3).any(|_| {
        from.command("busybox")
            .args(["ping", "-c1", "-W2", &to.to_string()])
            .output()
            .is_ok_and(|out| out.status.success())
    })
}

fn root_ip_forward() -> String {
    fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default()
}

#[test]
fn nodes_ping_each_other_and_vanish_after_drop() {
    init_tracing();
    let forward_before = root_ip_forward();
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let a = fabric.add_node("a").expect("node a");
    let b = fabric.add_node("b").expect("node b");

    assert_eq!(a.netns(), format!("{}-a", prefix.name()));
    assert_eq!(
        a.netns_path(),
        std::path::Path::new("/run/netns").join(a.netns())
    );
    assert_eq!((a.index(), b.index()), (1, 2));
    let subnet = fabric.subnet().octets();
    assert_eq!(subnet[..2], [10, 201]);
    assert_eq!(a.addr().octets()[..3], subnet[..3]);
    assert_eq!(b.addr().octets()[3], 2);
    assert_eq!(fabric.gateway().octets()[3], 254);
    assert!(matches!(
        fabric.add_node("a"),
        Err(NetnsError::NodeExists { .. })
    ));

    assert!(pings(&a, b.addr()), "a cannot ping b");
    assert!(pings(&b, a.addr()), "b cannot ping a");
    assert!(pings(&a, fabric.gateway()), "a cannot ping the bridge");

    // Each node: eth0 with its address, lo up, forwarding on, no default
    // route; the root namespace's forwarding untouched.
    let addrs = a
        .ip(&["-o", "-4", "addr", "show", "dev", NODE_IFNAME])
        .expect("ip addr");
    assert!(addrs.contains(&format!("{}/24", a.addr())), "{addrs}");
    let lo = a.ip(&["-o", "link", "show", "lo"]).expect("ip link");
    assert!(lo.contains("UP"), "{lo}");
    let routes = a.ip(&["-4", "route", "show"]).expect("ip route");
    assert!(!routes.contains("default"), "{routes}");
    let forward = a
        .command("cat")
        .arg("/proc/sys/net/ipv4/ip_forward")
        .output()
        .expect("cat");
    assert_eq!(String::from_utf8_lossy(&forward.stdout).trim(), "1");
    assert_eq!(root_ip_forward(), forward_before);

    // run_in executes inside the namespace: only there is a's address local.
    let bound_inside = a
        .run_in(|| TcpListener::bind((a.addr(), 0)).is_ok())
        .expect("enter a");
    assert!(bound_inside);
    assert!(TcpListener::bind((a.addr(), 0)).is_err());

    // Handles can be rebuilt for the existing objects.
    let again = Fabric::reattach(&prefix).expect("reattach");
    assert_eq!(again.nodes(), fabric.nodes());
    assert_eq!(again.subnet(), fabric.subnet());
    again.detach();
    assert_eq!(Node::existing(&prefix, "b", 2).expect("existing b"), b);
    assert_eq!(fabric.ensure_node("b").expect("ensure b"), b);

    let before = sweep::objects(prefix.name());
    assert_eq!(before.namespaces.len(), 2, "{before:?}");
    assert_eq!(before.links.len(), 3, "{before:?}");

    drop(fabric);
    let after = sweep::objects(prefix.name());
    assert!(after.is_empty(), "left behind: {after:?}");
    assert!(matches!(
        Fabric::reattach(&prefix),
        Err(NetnsError::NoFabric { .. })
    ));
}

#[test]
fn parallel_fabrics_get_distinct_subnets() {
    init_tracing();
    let prefixes: Vec<Prefix> = (0..3)
        .map(|_| Prefix::for_test().expect("prefix"))
        .collect();
    let fabrics: Vec<Fabric> = std::thread::scope(|scope| {
        let threads: Vec<_> = prefixes
            .iter()
            .map(|p| scope.spawn(|| Fabric::new(p).expect("fabric")))
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    let mut subnets: Vec<Ipv4Addr> = fabrics.iter().map(Fabric::subnet).collect();
    subnets.sort();
    subnets.dedup();
    assert_eq!(subnets.len(), 3, "{subnets:?}");
}

#[test]
fn detached_fabric_outlives_its_handle_until_reattached_and_dropped() {
    init_tracing();
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let n1 = fabric.add_node("n1").expect("node");
    fabric.detach();

    assert!(n1.netns_path().exists());
    let mut fabric = Fabric::reattach(&prefix).expect("reattach");
    assert_eq!(fabric.nodes(), std::slice::from_ref(&n1));
    // The next node takes the next free host number.
    let n2 = fabric.add_node("n2").expect("node");
    assert_eq!(n2.index(), 2);
    assert!(pings(&n2, n1.addr()));

    drop(fabric);
    assert!(sweep::objects(prefix.name()).is_empty());
}
