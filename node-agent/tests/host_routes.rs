//! Host routes on real namespaces (root, CI): a "host" beside the nodes
//! reaches a VM address through the node that holds it, and still does
//! after the VM moves to another node and the plan follows; routes that
//! are not Basalt's are never touched.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use basalt_agent::network::host_routes::{self, Applied, ROUTE_PROTOCOL};
use basalt_sdn::Netlink;
use basalt_testkit::{Fabric, Node, Prefix};

const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 7);

fn sh(program: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// A "VM" with `VM_IP` behind `node`: a namespace whose `eth0` is a veth
/// to a tap in the node, routed there like the datapath routes a guest.
struct Guest {
    netns: String,
}

impl Guest {
    fn create(prefix: &Prefix, node: &Node, name: &str) -> Guest {
        let netns = format!("{}-{name}", prefix.name());
        let tap = format!("t{name}");
        assert!(sh("ip", &["netns", "add", &netns]).status.success());
        node.ip(&[
            "link", "add", &tap, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])
        .unwrap();
        node.ip(&["link", "set", &tap, "up"]).unwrap();
        node.ip(&["addr", "add", "169.254.1.1/32", "dev", &tap])
            .unwrap();
        node.ip(&["route", "add", &format!("{VM_IP}/32"), "dev", &tap])
            .unwrap();
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "set", "eth0", "up"],
            vec!["addr", "add", "10.88.0.7/32", "dev", "eth0"],
            vec![
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
                "onlink",
            ],
        ] {
            let mut all = vec!["-n", netns.as_str()];
            all.extend(args);
            let out = sh("ip", &all);
            assert!(out.status.success(), "ip {all:?}: {out:?}");
        }
        Guest { netns }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.netns]);
    }
}

fn pings(host: &Node) -> bool {
    // busybox's ping: the Debian image has no other.
    host.command("busybox")
        .args(["ping", "-c", "1", "-W", "2", &VM_IP.to_string()])
        .output()
        .expect("ping runs")
        .status
        .success()
}

fn basalt_routes(host: &Node) -> String {
    host.ip(&["route", "show", "proto", &ROUTE_PROTOCOL.to_string()])
        .unwrap()
}

#[test]
fn a_host_reaches_a_vm_through_its_holder_across_a_move() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prefix = Prefix::for_test().unwrap();
    let mut fabric = Fabric::new(&prefix).unwrap();
    let host = fabric.add_node("h").unwrap();
    let b = fabric.add_node("b").unwrap();
    let c = fabric.add_node("c").unwrap();
    // Someone else's route, which must survive every apply.
    host.ip(&["route", "add", "10.99.0.0/24", "via", &c.addr().to_string()])
        .unwrap();

    let netlink = host.run_in(|| Netlink::new().unwrap()).unwrap();
    let guest = Guest::create(&prefix, &b, "vm");
    assert!(!pings(&host), "no route yet");

    let on_b = BTreeMap::from([(VM_IP, b.addr())]);
    let applied = host_routes::apply(&netlink, &on_b).unwrap();
    assert_eq!(applied, Applied { set: 1, removed: 0 });
    assert!(pings(&host), "reached through b");
    assert_eq!(
        host_routes::apply(&netlink, &on_b).unwrap(),
        Applied::default(),
        "nothing to do twice"
    );

    // The VM moves to c (same address); the old holder no longer has it.
    drop(guest);
    let _guest = Guest::create(&prefix, &c, "vm2");
    assert!(!pings(&host), "the route still points at b");
    let on_c = BTreeMap::from([(VM_IP, c.addr())]);
    assert_eq!(
        host_routes::apply(&netlink, &on_c).unwrap(),
        Applied { set: 1, removed: 0 }
    );
    assert!(pings(&host), "reached through c after the move");
    assert!(basalt_routes(&host).contains(&format!("via {}", c.addr())));

    // Released: the route goes; the foreign one stays.
    assert_eq!(
        host_routes::apply(&netlink, &BTreeMap::new()).unwrap(),
        Applied { set: 0, removed: 1 }
    );
    assert!(basalt_routes(&host).trim().is_empty());
    assert!(
        host.ip(&["route", "show"])
            .unwrap()
            .contains("10.99.0.0/24")
    );
}
