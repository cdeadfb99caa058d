//! `basaltd net`: operator views of a node's eBPF datapath, read from its
//! pinned maps (nothing is loaded, attached or changed).

use anyhow::Context as _;
use basalt_sdn::abi::{EP_LOCAL, EP_NATIVE, IFACE_STANDBY, SUBJ_EGRESS, SUBJ_INGRESS, ip_from_key};
use basalt_sdn::loader;
use clap::{Args, Subcommand};

/// `basaltd net ...`
#[derive(Debug, Args)]
pub struct NetArgs {
    #[command(subcommand)]
    command: NetCommand,
}

#[derive(Debug, Subcommand)]
enum NetCommand {
    /// Links, endpoints, taps, policy subjects, flows and drop counters.
    Status {
        /// The node whose pins to read (`/sys/fs/bpf/basalt/<node>/`).
        #[arg(long)]
        node: String,
    },
}

pub fn run(args: NetArgs) -> anyhow::Result<()> {
    match args.command {
        NetCommand::Status { node } => status(&node),
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How each network (by VNI) reaches its endpoints on other nodes, as the
/// endpoints map says (`EP_NATIVE` is set per remote endpoint from its
/// network's mode, else the node's): `native`, `overlay`, or that this
/// node holds none of its endpoints elsewhere yet.
fn network_routes(
    endpoints: &std::collections::BTreeMap<std::net::Ipv4Addr, basalt_sdn::abi::EndpointValue>,
) -> std::collections::BTreeMap<u32, String> {
    let mut by_vni: std::collections::BTreeMap<u32, (usize, usize)> = Default::default();
    for ep in endpoints.values() {
        let (native, overlay) = by_vni.entry(ep.vni).or_default();
        if ep.flags & EP_LOCAL != 0 {
            continue;
        }
        if ep.flags & EP_NATIVE != 0 {
            *native += 1;
        } else {
            *overlay += 1;
        }
    }
    by_vni
        .into_iter()
        .map(|(vni, counts)| {
            let line = match counts {
                (0, 0) => "no endpoint on another node".to_owned(),
                (n, 0) => format!("native ({n} endpoints on other nodes)"),
                (0, n) => format!("overlay ({n} endpoints on other nodes)"),
                (a, b) => format!("mixed: {a} native, {b} overlay (a mode change in flight)"),
            };
            (vni, line)
        })
        .collect()
}

fn status(node: &str) -> anyhow::Result<()> {
    let s = loader::status(node).with_context(|| {
        format!(
            "reading the datapath of node {node} under {}",
            loader::pin_dir(node).display()
        )
    })?;
    println!("links: {}", s.links.join(", "));
    println!("endpoints ({}):", s.endpoints.len());
    for (ip, ep) in &s.endpoints {
        let place = if ep.flags & EP_LOCAL != 0 {
            format!("local ifindex {}", ep.ifindex)
        } else {
            format!("on {}", ip_from_key(ep.node_ip))
        };
        println!(
            "  {ip:<15} {} identity {:<6} vni {:<8} {place}",
            mac(ep.mac),
            ep.identity,
            ep.vni
        );
    }
    println!("taps ({}):", s.ifaces.len());
    for (index, iface) in &s.ifaces {
        let standby = if iface.flags & IFACE_STANDBY != 0 {
            if iface.activated != 0 {
                " standby (activated)"
            } else {
                " standby"
            }
        } else {
            ""
        };
        println!("  ifindex {index:<6} {}{standby}", ip_from_key(iface.ip));
    }
    println!("policy subjects ({}):", s.subjects.len());
    for (identity, flags) in &s.subjects {
        let mut dirs = Vec::new();
        if flags & SUBJ_INGRESS != 0 {
            dirs.push("ingress");
        }
        if flags & SUBJ_EGRESS != 0 {
            dirs.push("egress");
        }
        println!("  identity {identity:<6} {}", dirs.join("+"));
    }
    println!("routing: {} (node default)", s.routing);
    for (vni, line) in network_routes(&s.endpoints) {
        println!("  vni {vni:<8} {line}");
    }
    println!("tracked flows: {}", s.conntrack);
    for (state, count) in &s.tcp_states {
        println!(
            "  tcp {:<12} {count}",
            basalt_sdn::abi::tcp_state_name(*state)
        );
    }
    println!("drops:");
    for (reason, count) in &s.drops {
        println!("  {:<16} {count}", reason.name());
    }
    Ok(())
}
