//! The pure half of the network reconciler: from what the control plane
//! says (nodes, networks, endpoints, VMs) to what this node's datapath
//! must hold — the `basalt-sdn` model, the local NICs to wire and serve
//! DHCP on, and the standby taps of incoming VMs. No I/O.
//!
//! Invariants:
//! - an endpoint is in the model only if it is leased (not released), has
//!   an owner node whose underlay address is known, and its network
//!   exists: everything else is dropped as `no-endpoint` by the programs;
//! - a NIC is local when its endpoint's node is this node; its tap and MAC
//!   are exactly those [`crate::vm_domain`] gives the domain, so the guest
//!   the domain starts is the one the maps and the DHCP lease expect;
//! - a standby tap whose endpoint this node already owns is local, never
//!   standby (activation has happened);
//! - an endpoint this node has claimed (an activation here, the take-over
//!   not yet back through the watch) is this node's while the object's
//!   epoch is below the claim's; a later epoch always wins.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use basalt_api::{Endpoint, Network, Node, Vm};
use basalt_sdn::model;

use crate::vm_domain::{derived_mac, tap_name, vm_uuid};

/// What the watch has seen of the cluster, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Node objects.
    pub nodes: BTreeMap<String, Node>,
    /// Network objects.
    pub networks: BTreeMap<String, Network>,
    /// Endpoint objects (leases).
    pub endpoints: BTreeMap<String, Endpoint>,
    /// VM objects (their NICs' MACs and labels).
    pub vms: BTreeMap<String, Vm>,
    /// Policy objects.
    pub policies: BTreeMap<String, basalt_api::Policy>,
}

/// One VM NIC this node serves (a placed VM's NIC, or an incoming one's).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalNic {
    /// The tap (as [`crate::vm_domain::tap_name`] names it).
    pub tap: String,
    /// The leased address.
    pub ip: Ipv4Addr,
    /// The guest's MAC (as the domain has it).
    pub mac: [u8; 6],
    /// The owning VM's name.
    pub vm: String,
}

/// What this node's datapath must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPlan {
    /// This node's underlay address; `None` until its node object names one.
    pub node_addr: Option<Ipv4Addr>,
    /// Every other node's underlay address (their next hops are kept
    /// resolved: native routing's receive side tells senders by MAC).
    pub peers: BTreeSet<Ipv4Addr>,
    /// Every network.
    pub networks: Vec<model::Network>,
    /// Every routable endpoint, local or not.
    pub endpoints: Vec<model::Endpoint>,
    /// Policies, compiled to identities.
    pub policies: Vec<model::Policy>,
    /// NICs whose endpoint this node owns.
    pub local: Vec<LocalNic>,
    /// Taps of incoming VMs, waiting for their guest (their endpoint is
    /// still owned elsewhere).
    pub standby: Vec<LocalNic>,
    /// What could not be planned (object → why), for logs.
    pub problems: BTreeMap<String, String>,
}

/// The underlay IPv4 address in a node's `spec.address` (`host:port`, or a
/// bare address).
pub fn node_address(node: &Node) -> Option<Ipv4Addr> {
    let text = node.spec.address.as_str();
    let host = text.rsplit_once(':').map_or(text, |(host, _)| host);
    host.parse().ok()
}

/// The MAC the domain gives NIC `index` of `vm` (its spec's, else the one
/// derived from its uid), `None` if the VM has no such NIC or a bad MAC.
pub fn guest_mac(vm: &Vm, index: usize) -> Option<[u8; 6]> {
    let nic = vm.spec.nics.get(index)?;
    match &nic.mac {
        Some(text) => parse_mac(text),
        None => Some(derived_mac(vm_uuid(&vm.meta.uid), index).0),
    }
}

/// "aa:bb:cc:dd:ee:ff" → bytes.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut out {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Plans the datapath of node `me`. `incoming` lists the VM uids this node
/// is preparing to receive by live migration; `claims` the endpoints (by
/// name) it has claimed on an activation, with the epoch of the claim.
pub fn plan(
    snapshot: &Snapshot,
    me: &str,
    incoming: &BTreeSet<String>,
    claims: &BTreeMap<String, u64>,
) -> NetPlan {
    let node_addr = snapshot.nodes.get(me).and_then(node_address);
    let mut out = NetPlan {
        node_addr,
        peers: snapshot
            .nodes
            .iter()
            .filter(|(name, _)| name.as_str() != me)
            .filter_map(|(_, node)| node_address(node))
            .filter(|addr| Some(*addr) != node_addr)
            .collect(),
        ..NetPlan::default()
    };
    for network in snapshot.networks.values() {
        match network.spec.cidr.parse::<model::Cidr>() {
            Ok(cidr) => out.networks.push(model::Network {
                name: network.meta.name.clone(),
                vni: network.spec.vni,
                cidr,
                routing: network.spec.routing.map(|r| match r {
                    basalt_api::NetworkRouting::Overlay => basalt_sdn::Routing::Overlay,
                    basalt_api::NetworkRouting::Native => basalt_sdn::Routing::Native,
                }),
            }),
            Err(err) => {
                out.problems
                    .insert(format!("network/{}", network.meta.name), err);
            }
        }
    }
    let known: BTreeSet<&str> = out.networks.iter().map(|n| n.name.as_str()).collect();
    let vms_by_uid: BTreeMap<&str, &Vm> = snapshot
        .vms
        .values()
        .map(|vm| (vm.meta.uid.as_str(), vm))
        .collect();
    for endpoint in snapshot.endpoints.values() {
        let Some(ip) = endpoint.ip else { continue };
        if endpoint.release_at_unix_ms != 0 || !known.contains(endpoint.network.as_str()) {
            continue;
        }
        let problem = |why: &str| (format!("endpoint/{}", endpoint.meta.name), why.to_owned());
        let vm = vms_by_uid.get(endpoint.vm_uid.as_str());
        let tap = tap_name(vm_uuid(&endpoint.vm_uid), endpoint.nic as usize);
        // The MAC the domain uses; the lease's only when the VM is gone.
        let mac = vm
            .and_then(|vm| guest_mac(vm, endpoint.nic as usize))
            .or_else(|| parse_mac(&endpoint.mac));
        let Some(mac) = mac else {
            let (k, v) = problem("no usable MAC");
            out.problems.insert(k, v);
            continue;
        };
        let nic = LocalNic {
            tap: tap.clone(),
            ip,
            mac,
            vm: endpoint.vm.clone(),
        };
        let claimed = claims
            .get(&endpoint.meta.name)
            .is_some_and(|&epoch| epoch > endpoint.epoch);
        let owner = if claimed { me } else { endpoint.node.as_str() };
        if owner.is_empty() {
            // Unplaced: only an incoming VM's standby tap may wait for it.
            if incoming.contains(&endpoint.vm_uid) {
                out.standby.push(nic);
            }
            continue;
        }
        let Some(node_addr) = snapshot.nodes.get(owner).and_then(node_address) else {
            let (k, v) = problem("its node has no known address");
            out.problems.insert(k, v);
            continue;
        };
        out.endpoints.push(model::Endpoint {
            ip,
            mac,
            network: endpoint.network.clone(),
            node_addr,
            identity: endpoint.identity,
            tap,
        });
        if owner == me {
            out.local.push(nic);
        } else if incoming.contains(&endpoint.vm_uid) {
            out.standby.push(nic);
        }
    }
    let leased = snapshot
        .endpoints
        .values()
        .filter(|e| e.ip.is_some() && e.release_at_unix_ms == 0);
    let identities = super::policy::identities(leased, &vms_by_uid);
    let (policies, problems) = super::policy::compile(&snapshot.policies, &identities);
    out.policies = policies;
    out.problems.extend(problems);
    out.local.sort();
    out.standby.sort();
    out
}

#[cfg(test)]
mod tests {
    use basalt_api::{Nic, NodeSpec, ObjectMeta, VmSpec};

    use super::*;

    fn node(name: &str, address: &str) -> Node {
        Node {
            meta: ObjectMeta::named(name),
            spec: NodeSpec {
                address: address.into(),
                cordoned: false,
            },
            ..Node::default()
        }
    }

    fn vm(name: &str, uid: &str, mac: Option<&str>) -> Vm {
        let mut meta = ObjectMeta::named(name);
        meta.uid = uid.into();
        Vm {
            meta,
            spec: VmSpec {
                cpus: 1,
                memory_mib: 128,
                nics: vec![Nic {
                    network: "blue".into(),
                    mac: mac.map(Into::into),
                    ip: None,
                }],
                ..VmSpec::default()
            },
            ..Vm::default()
        }
    }

    fn endpoint(ip: [u8; 4], vm: &Vm, node: &str) -> Endpoint {
        let ip = Ipv4Addr::from(ip);
        Endpoint {
            meta: ObjectMeta::named(Endpoint::name_for(ip)),
            network: "blue".into(),
            ip: Some(ip),
            mac: "02:11:22:33:44:55".into(),
            vm: vm.meta.name.clone(),
            vm_uid: vm.meta.uid.clone(),
            nic: 0,
            node: node.into(),
            epoch: 1,
            identity: 9,
            release_at_unix_ms: 0,
        }
    }

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        s.nodes.insert("a".into(), node("a", "10.0.0.1:7500"));
        s.nodes.insert("b".into(), node("b", "10.0.0.2"));
        s.networks.insert(
            "blue".into(),
            Network {
                meta: ObjectMeta::named("blue"),
                spec: basalt_api::NetworkSpec {
                    cidr: "10.77.0.0/16".into(),
                    vni: 42,
                    routing: None,
                },
            },
        );
        let web = vm("web", "5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b", None);
        let db = vm("db", "uid-db", Some("52:54:00:aa:bb:cc"));
        for (ep, vm) in [
            (endpoint([10, 77, 0, 1], &web, "a"), web),
            (endpoint([10, 77, 0, 2], &db, "b"), db),
        ] {
            s.endpoints.insert(ep.meta.name.clone(), ep);
            s.vms.insert(vm.meta.name.clone(), vm);
        }
        s
    }

    #[test]
    fn local_nics_get_the_domains_tap_and_mac() {
        let s = snapshot();
        let p = plan(&s, "a", &BTreeSet::new(), &BTreeMap::new());
        assert_eq!(p.node_addr, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            p.peers,
            BTreeSet::from([Ipv4Addr::new(10, 0, 0, 2)]),
            "every other node"
        );
        assert_eq!(p.endpoints.len(), 2);
        assert_eq!(p.local.len(), 1);
        let web = &s.vms["web"];
        let spec = crate::vm_domain::domain_spec(
            &{
                let mut v = web.clone();
                v.spec.kernel = Some(basalt_api::KernelBoot {
                    kernel: "/k".into(),
                    initrd: String::new(),
                    cmdline: String::new(),
                });
                v
            },
            &crate::vm_domain::DomainPolicy {
                prefix: "b-".into(),
                accel: crate::compute::domain::Accel::Tcg,
                cpu_model: None,
                agent_taps: true,
            },
            std::path::Path::new("/tmp"),
        )
        .unwrap();
        assert_eq!(p.local[0].tap, spec.nics[0].tap);
        assert_eq!(p.local[0].mac, spec.nics[0].mac.0);
        assert_eq!(p.local[0].ip, Ipv4Addr::new(10, 77, 0, 1));
        let db = p
            .endpoints
            .iter()
            .find(|e| e.ip == Ipv4Addr::new(10, 77, 0, 2))
            .unwrap();
        assert_eq!(db.node_addr, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(db.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert_eq!(db.identity, 9);
        model::validate(&p.endpoints, &p.networks, &[]).unwrap();
    }

    #[test]
    fn released_unplaced_and_unroutable_endpoints_are_left_out() {
        let mut s = snapshot();
        s.endpoints.get_mut("10-77-0-1").unwrap().release_at_unix_ms = 5;
        s.endpoints.get_mut("10-77-0-2").unwrap().node = "gone".into();
        let p = plan(&s, "a", &BTreeSet::new(), &BTreeMap::new());
        assert!(p.endpoints.is_empty() && p.local.is_empty());
        assert!(p.problems.contains_key("endpoint/10-77-0-2"), "{p:?}");
    }

    #[test]
    fn an_incoming_vm_waits_in_standby_until_this_node_owns_it() {
        let mut s = snapshot();
        let incoming = BTreeSet::from(["uid-db".to_owned()]);
        let p = plan(&s, "a", &incoming, &BTreeMap::new());
        assert_eq!(p.standby.len(), 1);
        assert_eq!(p.standby[0].ip, Ipv4Addr::new(10, 77, 0, 2));
        s.endpoints.get_mut("10-77-0-2").unwrap().node = "a".into();
        let p = plan(&s, "a", &incoming, &BTreeMap::new());
        assert!(p.standby.is_empty());
        assert_eq!(p.local.len(), 2);
    }

    #[test]
    fn a_claim_makes_the_endpoint_local_until_the_watch_catches_up() {
        let mut s = snapshot();
        let incoming = BTreeSet::from(["uid-db".to_owned()]);
        // The guest spoke here: claimed at the next epoch, the object
        // still names b at epoch 1.
        let claims = BTreeMap::from([("10-77-0-2".to_owned(), 2)]);
        let p = plan(&s, "a", &incoming, &claims);
        assert!(p.standby.is_empty());
        assert_eq!(p.local.len(), 2);
        let db = p
            .endpoints
            .iter()
            .find(|e| e.ip == Ipv4Addr::new(10, 77, 0, 2))
            .unwrap();
        assert_eq!(db.node_addr, Ipv4Addr::new(10, 0, 0, 1), "forwarded here");
        // The take-over came back: the object says the same.
        let ep = s.endpoints.get_mut("10-77-0-2").unwrap();
        ep.node = "a".into();
        ep.epoch = 2;
        assert_eq!(plan(&s, "a", &incoming, &claims).local.len(), 2);
        // A later move (epoch 3, to b) beats the claim.
        let ep = s.endpoints.get_mut("10-77-0-2").unwrap();
        ep.node = "b".into();
        ep.epoch = 3;
        let p = plan(&s, "a", &BTreeSet::new(), &claims);
        assert_eq!(p.local.len(), 1);
        assert!(
            p.endpoints
                .iter()
                .any(|e| e.ip == Ipv4Addr::new(10, 77, 0, 2)
                    && e.node_addr == Ipv4Addr::new(10, 0, 0, 2))
        );
    }

    #[test]
    fn addresses_and_macs_parse() {
        assert_eq!(
            node_address(&node("x", "10.1.2.3:7500")),
            Some(Ipv4Addr::new(10, 1, 2, 3))
        );
        assert_eq!(node_address(&node("x", "host:7500")), None);
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0a:0b"), None);
    }
}
