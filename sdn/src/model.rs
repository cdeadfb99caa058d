//! What the datapath is asked to do, in plain Rust: endpoints, networks and
//! policies as the control plane hands them to a node, independent of how
//! the maps encode them.
//!
//! Invariants checked by [`validate`]: network CIDRs are canonical (no host
//! bits) and do not overlap; VNIs are unique and 24-bit; each endpoint's IP
//! is unique and lies in its network; port ranges are ordered.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The network address (host bits zero once [`Cidr::new`] accepted it).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

impl Cidr {
    /// A prefix; `None` if `len > 32` or `addr` has host bits set.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Cidr> {
        if len > 32 || u32::from(addr) & !mask(len) != 0 {
            return None;
        }
        Some(Cidr { addr, len })
    }

    /// The single address `addr/32`.
    pub fn host(addr: Ipv4Addr) -> Cidr {
        Cidr { addr, len: 32 }
    }

    /// Whether `ip` lies in the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.addr)
    }

    /// Whether `other` lies entirely in this prefix.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    /// Whether the two prefixes share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.covers(other) || other.covers(self)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?}: bad IPv4 address"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| format!("{s:?}: bad prefix length"))?;
        Cidr::new(addr, len).ok_or_else(|| format!("{s:?}: not a canonical IPv4 prefix"))
    }
}

/// The netmask of a prefix length (`len` ≤ 32).
pub(crate) fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

/// A VM network: its own VNI and a CIDR that overlaps no other network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Unique name.
    pub name: String,
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    /// The addresses leased to its endpoints.
    pub cidr: Cidr,
    /// How nodes carry its packets between them; `None`: each node's own
    /// default ([`crate::NodeConfig::routing`]).
    pub routing: Option<crate::Routing>,
}

/// A VM NIC's address, wherever the VM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The leased address (a /32 in the guest).
    pub ip: Ipv4Addr,
    /// The guest NIC's MAC.
    pub mac: [u8; 6],
    /// The network's name.
    pub network: String,
    /// The owner node's underlay address.
    pub node_addr: Ipv4Addr,
    /// Label identity (0 = none).
    pub identity: u32,
    /// The tap's name on its owner node.
    pub tap: String,
}

/// The IP protocol a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// Any protocol (ports then match only when 0..=65535).
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
}

impl Protocol {
    /// The IP protocol number (0 for any).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Any => 0,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Let matching traffic through.
    Allow,
    /// Drop matching traffic, whatever else allows it.
    Deny,
}

/// Who is on the other side of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Any address in a prefix (inside or outside the VM networks).
    Cidr(Cidr),
    /// Endpoints with a label identity.
    Identity(u32),
}

/// One rule of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// Allow or deny.
    pub action: Action,
    /// The other side.
    pub peer: Peer,
    /// Protocol matched.
    pub protocol: Protocol,
    /// Destination ports matched (inclusive); `(0, 65535)` for all.
    pub ports: (u16, u16),
}

/// A policy: the identities it selects, and for each direction it covers,
/// what is allowed or denied. A selected endpoint's direction is denied by
/// default once any policy covers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Unique name.
    pub name: String,
    /// Identities of the endpoints it selects.
    pub selector: BTreeSet<u32>,
    /// Rules for traffic to the selected endpoints; `None`: ingress is not
    /// covered by this policy.
    pub ingress: Option<Vec<Rule>>,
    /// Rules for traffic from the selected endpoints; `None`: not covered.
    pub egress: Option<Vec<Rule>>,
}

/// The desired state is inconsistent; nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Two networks share a name, a VNI, or addresses.
    #[error("network {name}: {problem}")]
    Network {
        /// The network.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// An endpoint is inconsistent.
    #[error("endpoint {ip}: {problem}")]
    Endpoint {
        /// The endpoint's address.
        ip: Ipv4Addr,
        /// What is wrong.
        problem: String,
    },
    /// A policy is inconsistent.
    #[error("policy {name}: {problem}")]
    Policy {
        /// The policy.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// Checks the invariants of the module doc.
pub fn validate(
    endpoints: &[Endpoint],
    networks: &[Network],
    policies: &[Policy],
) -> Result<(), ModelError> {
    let mut by_name: BTreeMap<&str, &Network> = BTreeMap::new();
    let mut vnis = BTreeSet::new();
    for net in networks {
        let bad = |problem: String| ModelError::Network {
            name: net.name.clone(),
            problem,
        };
        if net.vni == 0 || net.vni >= 1 << 24 {
            return Err(bad(format!("vni {} is not in 1..2^24", net.vni)));
        }
        if !vnis.insert(net.vni) {
            return Err(bad(format!("vni {} is used twice", net.vni)));
        }
        if let Some(other) = by_name.values().find(|o| o.cidr.overlaps(&net.cidr)) {
            return Err(bad(format!(
                "cidr {} overlaps network {}",
                net.cidr, other.name
            )));
        }
        if by_name.insert(&net.name, net).is_some() {
            return Err(bad("name is used twice".to_owned()));
        }
    }
    let mut ips = BTreeSet::new();
    for ep in endpoints {
        let bad = |problem: String| ModelError::Endpoint { ip: ep.ip, problem };
        let net = by_name
            .get(ep.network.as_str())
            .ok_or_else(|| bad(format!("unknown network {:?}", ep.network)))?;
        if !net.cidr.contains(ep.ip) {
            return Err(bad(format!("not in network {} ({})", net.name, net.cidr)));
        }
        if !ips.insert(ep.ip) {
            return Err(bad("address is leased twice".to_owned()));
        }
        if ep.mac[0] & 1 != 0 {
            return Err(bad("mac is a multicast address".to_owned()));
        }
    }
    let mut names = BTreeSet::new();
    for policy in policies {
        let bad = |problem: String| ModelError::Policy {
            name: policy.name.clone(),
            problem,
        };
        if !names.insert(&policy.name) {
            return Err(bad("name is used twice".to_owned()));
        }
        let rules = policy.ingress.iter().chain(policy.egress.iter()).flatten();
        for rule in rules {
            if rule.ports.0 > rule.ports.1 {
                return Err(bad(format!(
                    "port range {}-{} is reversed",
                    rule.ports.0, rule.ports.1
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, vni: u32, cidr: &str) -> Network {
        Network {
            name: name.into(),
            vni,
            cidr: cidr.parse().unwrap(),
            routing: None,
        }
    }

    #[test]
    fn cidrs_parse_and_cover() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!c.contains(Ipv4Addr::new(10, 2, 0, 0)));
        assert!(c.covers(&"10.1.4.0/24".parse().unwrap()));
        assert!(!c.covers(&"10.0.0.0/8".parse().unwrap()));
        assert!("10.1.0.1/16".parse::<Cidr>().is_err());
        assert!("10.1.0.0/33".parse::<Cidr>().is_err());
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().len, 0);
    }

    #[test]
    fn overlapping_networks_are_refused() {
        let err = validate(
            &[],
            &[net("a", 1, "10.0.0.0/16"), net("b", 2, "10.0.1.0/24")],
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(err, ModelError::Network { ref name, .. } if name == "b"),
            "{err}"
        );
        assert!(
            validate(
                &[],
                &[net("a", 1, "10.0.0.0/24"), net("b", 1, "10.1.0.0/24")],
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn endpoints_must_lie_in_their_network() {
        let ep = Endpoint {
            ip: Ipv4Addr::new(10, 9, 0, 1),
            mac: [2, 0, 0, 0, 0, 1],
            network: "a".into(),
            node_addr: Ipv4Addr::new(192, 0, 2, 1),
            identity: 0,
            tap: "t".into(),
        };
        assert!(
            validate(
                std::slice::from_ref(&ep),
                &[net("a", 1, "10.0.0.0/16")],
                &[]
            )
            .is_err()
        );
        assert!(validate(&[ep], &[net("a", 1, "10.9.0.0/16")], &[]).is_ok());
    }
}
