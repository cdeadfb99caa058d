//! A real tap (root, CI): a frame written into a `/dev/net/tun` tap as a
//! guest would send it meets the program on the tap's host side; the
//! gateway's ARP reply comes back out of the tap, crafted by the program.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use basalt_sdn::abi::{DropReason, GATEWAY_IP, GATEWAY_MAC};
use basalt_sdn::tap::Tap;
use basalt_sdn::{Datapath, Endpoint, Hook, Loader, Netlink, NodeConfig, loader};
use basalt_testkit::{Fabric, Prefix};
use common::{init_logs, network};

const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x0a, 0x4d, 9, 9];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 9);

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// The first ARP frame read from the tap within `wait`.
fn next_arp(tap: &mut Tap, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let frame = tap.recv(left).unwrap()?;
        if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] {
            return Some(frame);
        }
    }
    None
}

#[test]
fn gateway_arp_is_answered_through_a_real_tap() {
    init_logs();
    let prefix = Prefix::for_test().unwrap();
    let mut fabric = Fabric::new(&prefix).unwrap();
    let node = fabric.add_node("a").unwrap();
    let node2 = node.clone();
    let (mut tap, dp) = node
        .run_in(move || {
            let tap = Tap::open("vmtap9").expect("tap");
            let netlink = Netlink::new().unwrap();
            netlink.wire_tap("vmtap9", GUEST_IP).unwrap();
            let mut loader = Loader::load(node2.netns()).unwrap();
            loader.attach("vmtap9", Hook::Tap).unwrap();
            let mut dp = Datapath::new(
                loader,
                NodeConfig {
                    addr: node2.addr(),
                    vxlan_ifindex: 0,
                    routing: basalt_sdn::Routing::Overlay,
                },
            );
            let ep = Endpoint {
                ip: GUEST_IP,
                mac: GUEST_MAC,
                network: network().name,
                node_addr: node2.addr(),
                identity: 0,
                tap: "vmtap9".into(),
            };
            dp.apply(&[ep], &[network()], &[], &[], &|n| netlink.tap_link(n).ok())
                .unwrap();
            (tap, dp)
        })
        .unwrap();

    tap.send(&arp_request(GATEWAY_IP)).unwrap();
    let reply = next_arp(&mut tap, Duration::from_secs(3)).expect("gateway ARP reply");
    assert_eq!(&reply[0..6], &GUEST_MAC, "to the guest");
    assert_eq!(&reply[6..12], &GATEWAY_MAC, "from the gateway");
    assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&reply[22..28], &GATEWAY_MAC);
    assert_eq!(&reply[28..32], &GATEWAY_IP.octets());
    assert_eq!(&reply[32..38], &GUEST_MAC);
    assert_eq!(&reply[38..42], &GUEST_IP.octets());

    let before = dp.store().drop_counts().unwrap()[&DropReason::ArpNotGateway];
    tap.send(&arp_request(Ipv4Addr::new(10, 77, 9, 1))).unwrap();
    assert_eq!(next_arp(&mut tap, Duration::from_millis(500)), None);
    assert!(dp.store().drop_counts().unwrap()[&DropReason::ArpNotGateway] > before);

    drop(dp);
    drop(tap);
    loader::remove_pins(node.netns()).unwrap();
}
