//! DHCP and egress (root, CI): a guest with no address runs busybox
//! `udhcpc` and gets its leased /32, the gateway, DNS and MTU from the
//! tap's DHCP server; then it reaches an address outside the VM networks
//! (a namespace playing "the outside") through source NAT on the node's
//! uplink, and the outside sees the node's address, not the guest's; the
//! node's own services are out of the guest's reach.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use basalt_sdn::dhcp::{DhcpServer, GUEST_MTU, Lease};
use basalt_sdn::nftables::{self, NodeRules};
use basalt_testkit::{Fabric, Prefix};
use common::{NodeDatapath, Vm, init_logs, network, spawn_in};

const SCRIPT: &str = r#"#!/bin/sh
# udhcpc hook: record what the server said, then configure like a guest.
case "$1" in
  bound|renew)
    env > "$OUT"
    ip addr add "$ip/$mask" dev "$interface"
    ip link set dev "$interface" mtu "$mtu"
    ip route add "$router" dev "$interface" scope link
    ip route add default via "$router" dev "$interface"
    ;;
esac
exit 0
"#;

/// Starts, in the outside namespace, a TCP server that answers each
/// connection with the peer address it saw.
fn start_whoami(path: &std::path::PathBuf, port: u16) {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(path, move || {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind whoami");
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

fn whoami(vm: &Vm, to: SocketAddr) -> Option<String> {
    vm.run_in(|| {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_millis(1500)).ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let mut out = String::new();
        conn.read_to_string(&mut out).ok()?;
        Some(out)
    })
}

#[test]
fn dhcp_then_egress_through_snat() {
    init_logs();
    let prefix = Prefix::for_test().unwrap();
    let mut fabric = Fabric::new(&prefix).unwrap();
    let node = fabric.add_node("a").unwrap();
    let outside = fabric.add_node("out").unwrap();
    let leased = Ipv4Addr::new(10, 77, 0, 5);
    let vm = Vm::create_bare(&prefix, &node, 1, leased);
    let mut dp = NodeDatapath::start(&node, &[&vm], false);
    dp.apply(&[vm.endpoint(node.addr(), 0)], &[]);

    let lease = Lease {
        mac: vm.mac,
        ip: leased,
        dns: vec![Ipv4Addr::new(10, 77, 255, 53)],
        mtu: GUEST_MTU,
        lease_secs: 3600,
    };
    let tap = vm.tap.clone();
    let _dhcp = node
        .run_in(move || DhcpServer::start(&tap, lease))
        .unwrap()
        .expect("dhcp server");

    let script = prefix.dir().join("udhcpc.sh");
    std::fs::write(&script, SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let record = prefix.dir().join("udhcpc.env");
    let out = vm
        .command("busybox")
        .env("OUT", &record)
        .args([
            "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-O", "mtu", "-s",
        ])
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "udhcpc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = std::fs::read_to_string(&record).expect("udhcpc ran the script");
    for expected in [
        "ip=10.77.0.5",
        "mask=32",
        "router=169.254.1.1",
        "dns=10.77.255.53",
        "mtu=1450",
    ] {
        assert!(
            env.lines().any(|l| l == expected),
            "{expected} missing from:\n{env}"
        );
    }
    let addrs = vm.ip(&["-4", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains("10.77.0.5/32") && addrs.contains("mtu 1450"),
        "{addrs}"
    );

    // The outside has no route to the VM network: without SNAT, no answer.
    start_whoami(&outside.netns_path(), 9000);
    let target = SocketAddr::from((outside.addr(), 9000));
    assert_eq!(
        whoami(&vm, target),
        None,
        "reached the outside without SNAT"
    );

    // Before the node's rules, a guest could reach the node's own services.
    start_whoami(&node.netns_path(), 9100);
    let node_service = SocketAddr::from((node.addr(), 9100));
    assert_eq!(whoami(&vm, node_service), Some(leased.to_string()));

    let rules = NodeRules {
        uplink: "eth0".into(),
        tap_prefix: "vmtap".into(),
        networks: vec![network().cidr],
    };
    node.run_in(|| nftables::apply(&rules))
        .unwrap()
        .expect("nftables");
    let seen = whoami(&vm, target).expect("egress through SNAT");
    assert_eq!(
        seen,
        node.addr().to_string(),
        "the outside sees the node's address"
    );
    assert_eq!(
        whoami(&vm, node_service),
        None,
        "the node's services are guarded"
    );
}
