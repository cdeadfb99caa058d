//! A node's eBPF datapath as its pinned maps hold it, for the failure
//! messages of the tests that move VMs between nodes.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use basalt_sdn::abi::{ip_from_key, ip_key, tcp_state_name};
use basalt_sdn::loader;

/// What node `node`'s pinned datapath holds about `ip`: its endpoint
/// entry, the policy subjects, and every tracked flow to or from it (for a
/// failure's message).
pub fn dump(node: &str, ip: Ipv4Addr) -> String {
    let mut out = format!("datapath of {node}:\n");
    match loader::status(node) {
        Ok(s) => {
            let _ = writeln!(out, "  endpoint {ip}: {:?}", s.endpoints.get(&ip));
            let _ = writeln!(out, "  subjects: {:?}", s.subjects);
            let _ = writeln!(out, "  drops: {:?}", s.drops);
        }
        Err(err) => {
            let _ = writeln!(out, "  status: {err}");
        }
    }
    let key = ip_key(ip);
    match loader::pinned_conntrack(node) {
        Ok(flows) => {
            for (k, v) in flows
                .iter()
                .filter(|(k, _)| k.saddr == key || k.daddr == key)
            {
                let _ = writeln!(
                    out,
                    "  flow {}:{} - {}:{} proto {} state {} flags {:#x} packets {}",
                    ip_from_key(k.saddr),
                    k.sport,
                    ip_from_key(k.daddr),
                    k.dport,
                    k.proto,
                    tcp_state_name(v.tcp_state),
                    v.flags,
                    v.packets
                );
            }
        }
        Err(err) => {
            let _ = writeln!(out, "  conntrack: {err}");
        }
    }
    out
}
