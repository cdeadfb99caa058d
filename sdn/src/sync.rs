//! Map synchronisation: compiles the desired [`crate::model`] into
//! the exact contents of the datapath's maps ([`MapState`], pure), diffs it
//! against what the maps hold, and writes only the difference through a
//! [`MapStore`] (the kernel's maps, or a fake in tests).
//!
//! Invariants:
//! - the first [`Datapath::apply`] (and the first after a failed write)
//!   reads the maps back and resyncs them in full; later ones write only
//!   what changed;
//! - writes are ordered so traffic never sees a state that denies more than
//!   both the old and the new one: additions and rule updates first,
//!   subjects (which switch enforcement on) after their rules, removals last
//!   and in the reverse order;
//! - an endpoint's selection flags (`EP_SEL_*`) only spare the programs the
//!   tracking and policy work for endpoints no policy selects; `subjects`
//!   stays the authority, so the order in which the two change never denies
//!   anything either state allows.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use crate::abi::{
    self, ACT_ALLOW, ACT_DENY, Config, DIR_EGRESS, DIR_INGRESS, EP_LOCAL, EP_SEL_EGRESS,
    EP_SEL_INGRESS, EndpointValue, IFACE_STANDBY, IfaceValue, MAX_RULES, PolicyCidrData,
    PolicyIdKey, RuleValue, RulesValue, SUBJ_EGRESS, SUBJ_INGRESS, SubjectValue, ip_key,
};
use crate::model::{self, Action, Cidr, Endpoint, ModelError, Network, Peer, Policy, Rule};

/// Everything the maps hold (except connection tracking, counters and
/// events, which the programs own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    /// `config[0]`.
    pub config: Config,
    /// `endpoints`: IPv4 (wire order) → endpoint.
    pub endpoints: BTreeMap<u32, EndpointValue>,
    /// `ifaces`: ifindex → iface.
    pub ifaces: BTreeMap<u32, IfaceValue>,
    /// `networks`: (prefix length, network address in wire order) → VNI.
    pub networks: BTreeMap<(u32, u32), u32>,
    /// `subjects`: identity → flags.
    pub subjects: BTreeMap<u32, SubjectValue>,
    /// `policy_cidr`: (prefix length, key data) → rules.
    pub policy_cidr: BTreeMap<(u32, PolicyCidrData), RulesValue>,
    /// `policy_id` → rules.
    pub policy_id: BTreeMap<PolicyIdKey, RulesValue>,
}

/// One write to the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Set `config[0]`.
    Config(Config),
    /// Insert or replace an endpoint.
    PutEndpoint(u32, EndpointValue),
    /// Remove an endpoint.
    DelEndpoint(u32),
    /// Insert or replace a tap's entry.
    PutIface(u32, IfaceValue),
    /// Remove a tap's entry.
    DelIface(u32),
    /// Insert or replace a network prefix.
    PutNetwork((u32, u32), u32),
    /// Remove a network prefix.
    DelNetwork((u32, u32)),
    /// Insert or replace a subject's enforcement flags.
    PutSubject(u32, SubjectValue),
    /// Stop enforcing policy on a subject.
    DelSubject(u32),
    /// Insert or replace CIDR rules.
    PutPolicyCidr((u32, PolicyCidrData), RulesValue),
    /// Remove CIDR rules.
    DelPolicyCidr((u32, PolicyCidrData)),
    /// Insert or replace identity rules.
    PutPolicyId(PolicyIdKey, RulesValue),
    /// Remove identity rules.
    DelPolicyId(PolicyIdKey),
}

/// The maps, as [`Datapath`] sees them: read everything, write one change.
pub trait MapStore {
    /// The store's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// What the maps hold now.
    fn read(&self) -> Result<MapState, Self::Error>;

    /// Applies one change.
    fn write(&mut self, change: &Change) -> Result<(), Self::Error>;
}

/// The desired state could not be compiled or written.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The desired state is inconsistent.
    #[error("invalid desired state")]
    Model(#[from] ModelError),
    /// More than [`MAX_RULES`] distinct rules apply to one subject, direction
    /// and peer.
    #[error("identity {subject}: more than {MAX_RULES} rules for peer {peer}")]
    TooManyRules {
        /// The selected identity.
        subject: u32,
        /// The peer, as text.
        peer: String,
    },
    /// Reading or writing the maps failed.
    #[error("map store")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A local tap (or the veth that plays one), as the maps need it: what
/// [`compile`]'s `tap` resolver answers for a name
/// ([`crate::Netlink::tap_link`] for the real one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapLink {
    /// Its ifindex.
    pub ifindex: u32,
    /// It is one end of a veth pair: the programs hand packets arriving on
    /// a TC ingress straight to the other end (`bpf_redirect_peer`),
    /// sparing a queue; a real tap gets them through its transmit.
    pub veth: bool,
}

impl From<u32> for TapLink {
    /// A tap that is no veth.
    fn from(ifindex: u32) -> TapLink {
        TapLink {
            ifindex,
            veth: false,
        }
    }
}

/// This node, as the datapath needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Underlay address (VXLAN source, `endpoint.node_addr` of local ones).
    pub addr: Ipv4Addr,
    /// The node's VXLAN device, 0 if none.
    pub vxlan_ifindex: u32,
    /// How packets for endpoints on other nodes leave this one, for
    /// networks that do not say ([`crate::Network::routing`]).
    pub routing: Routing,
}

/// How a node sends packets for endpoints on other nodes. Every node
/// receives both ways whatever its own setting (the uplink's program takes
/// unencapsulated packets, the VXLAN device encapsulated ones), so nodes
/// can change one at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Routing {
    /// Encapsulated in VXLAN (the network's VNI) to the owner node: works
    /// over any underlay that carries UDP between the nodes.
    #[default]
    Overlay,
    /// As they are, with the owner node's underlay address as the next hop
    /// (looked up in the node's FIB): no encapsulation. Needs an underlay
    /// that delivers a frame to that next hop whatever its IP destination:
    /// nodes on one L2 segment, or routers that route VM addresses to the
    /// nodes holding them.
    Native,
}

impl Routing {
    /// The name the agent's flag takes (`overlay`, `native`).
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::Overlay => "overlay",
            Routing::Native => "native",
        }
    }
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A routing mode's name was neither `overlay` nor `native`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("routing mode {0:?}: expected overlay or native")]
pub struct RoutingParseError(pub String);

impl std::str::FromStr for Routing {
    type Err = RoutingParseError;

    fn from_str(s: &str) -> Result<Routing, RoutingParseError> {
        match s {
            "overlay" => Ok(Routing::Overlay),
            "native" => Ok(Routing::Native),
            other => Err(RoutingParseError(other.to_owned())),
        }
    }
}

/// The map contents for a desired state, and what could not be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// What the maps should hold.
    pub state: MapState,
    /// Local endpoints whose tap does not exist (yet): left out of the
    /// maps, so traffic to them is dropped as `no-endpoint` until the tap
    /// appears and the next apply adds them.
    pub unready: Vec<Ipv4Addr>,
}

/// Compiles the desired state into map contents. `tap` resolves a local
/// tap's name; `standby` lists taps (name, endpoint IP) waiting for a guest.
pub fn compile(
    node: &NodeConfig,
    endpoints: &[Endpoint],
    networks: &[Network],
    policies: &[Policy],
    standby: &[(String, Ipv4Addr)],
    tap: &dyn Fn(&str) -> Option<TapLink>,
) -> Result<Compiled, SyncError> {
    model::validate(endpoints, networks, policies)?;
    let mut unready = Vec::new();
    let mut state = MapState {
        config: Config {
            gateway_mac: abi::GATEWAY_MAC,
            flags: match node.routing {
                Routing::Overlay => 0,
                Routing::Native => abi::CFG_NATIVE,
            },
            node_ip: ip_key(node.addr),
            vxlan_ifindex: node.vxlan_ifindex,
        },
        ..MapState::default()
    };
    let vni: HashMap<&str, u32> = networks.iter().map(|n| (n.name.as_str(), n.vni)).collect();
    let native: HashMap<&str, bool> = networks
        .iter()
        .map(|n| {
            let mode = n.routing.unwrap_or(node.routing);
            (n.name.as_str(), mode == Routing::Native)
        })
        .collect();
    for net in networks {
        state
            .networks
            .insert((u32::from(net.cidr.len), ip_key(net.cidr.addr)), net.vni);
    }
    for ep in endpoints {
        let local = ep.node_addr == node.addr;
        let mut value = EndpointValue {
            ifindex: 0,
            node_ip: ip_key(ep.node_addr),
            identity: ep.identity,
            vni: vni[ep.network.as_str()],
            mac: ep.mac,
            // Packets for it leave natively (its network's mode, else the
            // node's); only read for remote endpoints.
            flags: if native[ep.network.as_str()] {
                abi::EP_NATIVE
            } else {
                0
            },
        };
        if local {
            let Some(link) = tap(&ep.tap) else {
                unready.push(ep.ip);
                continue;
            };
            let index = link.ifindex;
            value.ifindex = index;
            value.flags |= EP_LOCAL;
            if link.veth {
                value.flags |= abi::EP_PEER;
            }
            state.ifaces.insert(
                index,
                IfaceValue {
                    ip: ip_key(ep.ip),
                    ..IfaceValue::default()
                },
            );
        }
        state.endpoints.insert(ip_key(ep.ip), value);
    }
    for (tap_name, ip) in standby {
        // A standby tap's endpoint is owned elsewhere until activation;
        // its frames are only reported, never forwarded.
        if let Some(index) = tap(tap_name).map(|l| l.ifindex) {
            state.ifaces.insert(
                index,
                IfaceValue {
                    ip: ip_key(*ip),
                    flags: IFACE_STANDBY,
                    ..IfaceValue::default()
                },
            );
        }
    }
    compile_policies(policies, &mut state)?;
    // The programs skip tracking lookups and policy for packets whose
    // endpoints no policy selects: tell them which are selected.
    for value in state.endpoints.values_mut() {
        let selected = state.subjects.get(&value.identity).map_or(0, |s| s.flags);
        if selected & SUBJ_INGRESS != 0 {
            value.flags |= EP_SEL_INGRESS;
        }
        if selected & SUBJ_EGRESS != 0 {
            value.flags |= EP_SEL_EGRESS;
        }
    }
    Ok(Compiled { state, unready })
}

fn compile_policies(policies: &[Policy], state: &mut MapState) -> Result<(), SyncError> {
    // (subject, direction) → peer → rules, before inheritance.
    let mut cidr_rules: BTreeMap<(u32, u8), BTreeMap<Cidr, Vec<RuleValue>>> = BTreeMap::new();
    let mut id_rules: BTreeMap<PolicyIdKey, Vec<RuleValue>> = BTreeMap::new();
    for policy in policies {
        for (dir, rules, flag) in [
            (DIR_INGRESS, &policy.ingress, SUBJ_INGRESS),
            (DIR_EGRESS, &policy.egress, SUBJ_EGRESS),
        ] {
            let Some(rules) = rules else { continue };
            for &subject in &policy.selector {
                state.subjects.entry(subject).or_default().flags |= flag;
                for rule in rules {
                    let value = rule_value(rule);
                    match rule.peer {
                        Peer::Cidr(cidr) => cidr_rules
                            .entry((subject, dir))
                            .or_default()
                            .entry(cidr)
                            .or_default()
                            .push(value),
                        Peer::Identity(peer) => id_rules
                            .entry(PolicyIdKey {
                                subject,
                                peer,
                                direction: dir,
                                pad: [0; 3],
                            })
                            .or_default()
                            .push(value),
                    }
                }
            }
        }
    }
    for ((subject, dir), by_cidr) in cidr_rules {
        // Longest-prefix match finds one entry: give each prefix the rules
        // of every prefix that covers it, so the match sees them all.
        let index: HashMap<(u8, u32), &Vec<RuleValue>> = by_cidr
            .iter()
            .map(|(c, r)| ((c.len, u32::from(c.addr)), r))
            .collect();
        for (cidr, own) in &by_cidr {
            let mut all = own.clone();
            for len in 0..cidr.len {
                let masked = u32::from(cidr.addr) & model::mask(len);
                if let Some(rules) = index.get(&(len, masked)) {
                    all.extend(rules.iter().copied());
                }
            }
            let value = rules_value(all).ok_or_else(|| SyncError::TooManyRules {
                subject,
                peer: cidr.to_string(),
            })?;
            let key = PolicyCidrData {
                subject,
                direction: dir,
                pad: [0; 3],
                peer: ip_key(cidr.addr),
            };
            state
                .policy_cidr
                .insert((64 + u32::from(cidr.len), key), value);
        }
    }
    for (key, rules) in id_rules {
        let value = rules_value(rules).ok_or_else(|| SyncError::TooManyRules {
            subject: key.subject,
            peer: format!("identity {}", key.peer),
        })?;
        state.policy_id.insert(key, value);
    }
    Ok(())
}

fn rule_value(rule: &Rule) -> RuleValue {
    RuleValue {
        proto: rule.protocol.number(),
        action: match rule.action {
            Action::Allow => ACT_ALLOW,
            Action::Deny => ACT_DENY,
        },
        port_lo: rule.ports.0,
        port_hi: rule.ports.1,
        pad: 0,
    }
}

/// Deduplicated, sorted rules; `None` if more than [`MAX_RULES`].
fn rules_value(mut rules: Vec<RuleValue>) -> Option<RulesValue> {
    rules.sort();
    rules.dedup();
    if rules.len() > MAX_RULES {
        return None;
    }
    let mut value = RulesValue {
        count: rules.len() as u32,
        ..RulesValue::default()
    };
    value.rule[..rules.len()].copy_from_slice(&rules);
    Some(value)
}

/// The changes that turn `old` into `new`, in a safe order (module doc).
pub fn diff(old: &MapState, new: &MapState) -> Vec<Change> {
    let mut out = Vec::new();
    if old.config != new.config {
        out.push(Change::Config(new.config));
    }
    puts(&old.networks, &new.networks, &mut out, Change::PutNetwork);
    puts(
        &old.endpoints,
        &new.endpoints,
        &mut out,
        Change::PutEndpoint,
    );
    // `activated` belongs to the program: it does not make an entry differ.
    for (k, v) in &new.ifaces {
        if old
            .ifaces
            .get(k)
            .is_none_or(|o| o.ip != v.ip || o.flags != v.flags)
        {
            out.push(Change::PutIface(*k, *v));
        }
    }
    puts(
        &old.policy_cidr,
        &new.policy_cidr,
        &mut out,
        Change::PutPolicyCidr,
    );
    puts(
        &old.policy_id,
        &new.policy_id,
        &mut out,
        Change::PutPolicyId,
    );
    puts(&old.subjects, &new.subjects, &mut out, Change::PutSubject);
    dels(&old.subjects, &new.subjects, &mut out, Change::DelSubject);
    dels(
        &old.policy_id,
        &new.policy_id,
        &mut out,
        Change::DelPolicyId,
    );
    dels(
        &old.policy_cidr,
        &new.policy_cidr,
        &mut out,
        Change::DelPolicyCidr,
    );
    dels(&old.ifaces, &new.ifaces, &mut out, Change::DelIface);
    dels(
        &old.endpoints,
        &new.endpoints,
        &mut out,
        Change::DelEndpoint,
    );
    dels(&old.networks, &new.networks, &mut out, Change::DelNetwork);
    out
}

fn puts<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    out: &mut Vec<Change>,
    make: fn(K, V) -> Change,
) {
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.push(make(*k, *v));
        }
    }
}

fn dels<K: Ord + Copy, V>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    out: &mut Vec<Change>,
    make: fn(K) -> Change,
) {
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(make(*k));
        }
    }
}

/// Keeps one node's maps equal to the desired state.
#[derive(Debug)]
pub struct Datapath<S: MapStore> {
    store: S,
    node: NodeConfig,
    /// What the maps hold, as far as this value knows; `None`: read them.
    known: Option<MapState>,
}

/// What one [`Datapath::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Whether the maps were read back first (full resync).
    pub resynced: bool,
    /// How many map writes it took.
    pub writes: usize,
    /// Local endpoints left out because their tap does not exist (see
    /// [`Compiled::unready`]); a later apply adds them.
    pub unready: Vec<Ipv4Addr>,
}

impl<S: MapStore> Datapath<S> {
    /// A datapath writing to `store` for `node`. Nothing is read or written
    /// until the first [`Datapath::apply`].
    pub fn new(store: S, node: NodeConfig) -> Datapath<S> {
        Datapath {
            store,
            node,
            known: None,
        }
    }

    /// The map store (e.g. to read counters from the real one).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The map store, mutably.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Changes this node's configuration (e.g. once its VXLAN device exists);
    /// takes effect at the next [`Datapath::apply`].
    pub fn set_node(&mut self, node: NodeConfig) {
        self.node = node;
    }

    /// Makes the maps hold exactly the desired state (see the module doc).
    pub fn apply(
        &mut self,
        endpoints: &[Endpoint],
        networks: &[Network],
        policies: &[Policy],
        standby: &[(String, Ipv4Addr)],
        tap: &dyn Fn(&str) -> Option<TapLink>,
    ) -> Result<ApplyReport, SyncError> {
        let Compiled {
            state: desired,
            unready,
        } = compile(&self.node, endpoints, networks, policies, standby, tap)?;
        let resynced = self.known.is_none();
        let known = match self.known.take() {
            Some(known) => known,
            None => self
                .store
                .read()
                .map_err(|e| SyncError::Store(Box::new(e)))?,
        };
        let changes = diff(&known, &desired);
        for change in &changes {
            // On failure `known` stays `None`: the next apply resyncs.
            self.store
                .write(change)
                .map_err(|e| SyncError::Store(Box::new(e)))?;
        }
        self.known = Some(desired);
        Ok(ApplyReport {
            resynced,
            writes: changes.len(),
            unready,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    /// An in-memory map store that can be told to fail.
    #[derive(Debug, Default)]
    struct FakeMaps {
        state: MapState,
        writes: Vec<Change>,
        fail_after: Option<usize>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("fake write failure")]
    struct FakeError;

    impl MapStore for FakeMaps {
        type Error = FakeError;

        fn read(&self) -> Result<MapState, FakeError> {
            Ok(self.state.clone())
        }

        fn write(&mut self, change: &Change) -> Result<(), FakeError> {
            if self.fail_after == Some(self.writes.len()) {
                return Err(FakeError);
            }
            self.writes.push(change.clone());
            let s = &mut self.state;
            match change.clone() {
                Change::Config(c) => s.config = c,
                Change::PutEndpoint(k, v) => drop(s.endpoints.insert(k, v)),
                Change::DelEndpoint(k) => drop(s.endpoints.remove(&k)),
                Change::PutIface(k, v) => drop(s.ifaces.insert(k, v)),
                Change::DelIface(k) => drop(s.ifaces.remove(&k)),
                Change::PutNetwork(k, v) => drop(s.networks.insert(k, v)),
                Change::DelNetwork(k) => drop(s.networks.remove(&k)),
                Change::PutSubject(k, v) => drop(s.subjects.insert(k, v)),
                Change::DelSubject(k) => drop(s.subjects.remove(&k)),
                Change::PutPolicyCidr(k, v) => drop(s.policy_cidr.insert(k, v)),
                Change::DelPolicyCidr(k) => drop(s.policy_cidr.remove(&k)),
                Change::PutPolicyId(k, v) => drop(s.policy_id.insert(k, v)),
                Change::DelPolicyId(k) => drop(s.policy_id.remove(&k)),
            }
            Ok(())
        }
    }

    const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

    fn node() -> NodeConfig {
        NodeConfig {
            addr: NODE,
            vxlan_ifindex: 9,
            routing: Routing::Overlay,
        }
    }

    fn nets() -> Vec<Network> {
        vec![Network {
            name: "blue".into(),
            vni: 100,
            cidr: "10.50.0.0/16".parse().unwrap(),
            routing: None,
        }]
    }

    fn ep(last: u8, node_addr: Ipv4Addr, identity: u32) -> Endpoint {
        Endpoint {
            ip: Ipv4Addr::new(10, 50, 0, last),
            mac: [2, 0, 0, 0, 0, last],
            network: "blue".into(),
            node_addr,
            identity,
            tap: format!("tap{last}"),
        }
    }

    fn taps(name: &str) -> Option<TapLink> {
        name.strip_prefix("tap")?
            .parse::<u32>()
            .ok()
            .map(|n| TapLink::from(n + 100))
    }

    fn allow(peer: Peer, protocol: Protocol, ports: (u16, u16)) -> Rule {
        Rule {
            action: Action::Allow,
            peer,
            protocol,
            ports,
        }
    }

    #[test]
    fn local_and_remote_endpoints_compile() {
        let state = compile(
            &node(),
            &[ep(1, NODE, 7), ep(2, OTHER, 8)],
            &nets(),
            &[],
            &[],
            &taps,
        )
        .unwrap()
        .state;
        let local = state.endpoints[&ip_key(Ipv4Addr::new(10, 50, 0, 1))];
        assert_eq!(
            (local.ifindex, local.flags, local.vni, local.identity),
            (101, EP_LOCAL, 100, 7)
        );
        let remote = state.endpoints[&ip_key(Ipv4Addr::new(10, 50, 0, 2))];
        assert_eq!(
            (remote.ifindex, remote.flags, remote.node_ip),
            (0, 0, ip_key(OTHER))
        );
        assert_eq!(state.ifaces.len(), 1);
        assert_eq!(state.ifaces[&101].ip, ip_key(Ipv4Addr::new(10, 50, 0, 1)));
        assert_eq!(state.config.vxlan_ifindex, 9);
        assert_eq!(
            state.networks[&(16, ip_key(Ipv4Addr::new(10, 50, 0, 0)))],
            100
        );
    }

    #[test]
    fn a_veth_tap_is_marked_for_peer_delivery() {
        let veths = |name: &str| {
            taps(name).map(|l| TapLink {
                veth: name == "tap1",
                ..l
            })
        };
        let state = compile(
            &node(),
            &[ep(1, NODE, 7), ep(3, NODE, 7), ep(2, OTHER, 8)],
            &nets(),
            &[],
            &[],
            &veths,
        )
        .unwrap()
        .state;
        let flags = |n| state.endpoints[&ip_key(Ipv4Addr::new(10, 50, 0, n))].flags;
        assert_eq!(flags(1), EP_LOCAL | crate::abi::EP_PEER);
        assert_eq!(flags(3), EP_LOCAL, "a real tap");
        assert_eq!(flags(2), 0, "remote");
    }

    #[test]
    fn routing_mode_is_a_config_flag() {
        let flags = |routing| {
            let node = NodeConfig { routing, ..node() };
            compile(&node, &[ep(2, OTHER, 8)], &nets(), &[], &[], &taps)
                .unwrap()
                .state
                .config
                .flags
        };
        assert_eq!(flags(Routing::Overlay), 0);
        assert_eq!(flags(Routing::Native), crate::abi::CFG_NATIVE);
        for mode in [Routing::Overlay, Routing::Native] {
            assert_eq!(mode.to_string().parse::<Routing>(), Ok(mode));
        }
        assert!("tunnel".parse::<Routing>().is_err());
    }

    #[test]
    fn each_network_routes_by_its_own_mode_or_the_nodes() {
        let mut networks = nets();
        networks.push(Network {
            name: "green".into(),
            vni: 200,
            cidr: "10.60.0.0/16".parse().unwrap(),
            routing: None,
        });
        let green = |last: u8| Endpoint {
            ip: Ipv4Addr::new(10, 60, 0, last),
            network: "green".into(),
            ..ep(last, OTHER, 8)
        };
        let mut native = |node_mode, blue_mode| {
            let node = NodeConfig {
                routing: node_mode,
                ..node()
            };
            networks[0].routing = blue_mode;
            let state = compile(
                &node,
                &[ep(2, OTHER, 8), green(3)],
                &networks,
                &[],
                &[],
                &taps,
            )
            .unwrap()
            .state;
            let native = |ip| state.endpoints[&ip_key(ip)].flags & crate::abi::EP_NATIVE != 0;
            (
                native(Ipv4Addr::new(10, 50, 0, 2)),
                native(Ipv4Addr::new(10, 60, 0, 3)),
            )
        };
        // (blue, green): blue says its mode, green follows the node.
        assert_eq!(native(Routing::Overlay, None), (false, false));
        assert_eq!(native(Routing::Native, None), (true, true));
        assert_eq!(
            native(Routing::Overlay, Some(Routing::Native)),
            (true, false)
        );
        assert_eq!(
            native(Routing::Native, Some(Routing::Overlay)),
            (false, true)
        );
    }

    #[test]
    fn endpoints_carry_their_identity_selection() {
        let policy = |name: &str, ingress, egress| Policy {
            name: name.into(),
            selector: [7].into(),
            ingress,
            egress,
        };
        let eps = [ep(1, NODE, 7), ep(2, OTHER, 7), ep(3, NODE, 8)];
        let flags = |policies: &[Policy]| -> Vec<u16> {
            let state = compile(&node(), &eps, &nets(), policies, &[], &taps)
                .unwrap()
                .state;
            (1..=3)
                .map(|n| state.endpoints[&ip_key(Ipv4Addr::new(10, 50, 0, n))].flags)
                .collect()
        };
        assert_eq!(flags(&[]), [EP_LOCAL, 0, EP_LOCAL]);
        assert_eq!(
            flags(&[policy("in", Some(vec![]), None)]),
            [EP_LOCAL | EP_SEL_INGRESS, EP_SEL_INGRESS, EP_LOCAL],
            "local and remote endpoints of the identity, and no other"
        );
        assert_eq!(
            flags(&[
                policy("in", Some(vec![]), None),
                policy("out", None, Some(vec![]))
            ]),
            [
                EP_LOCAL | EP_SEL_INGRESS | EP_SEL_EGRESS,
                EP_SEL_INGRESS | EP_SEL_EGRESS,
                EP_LOCAL
            ]
        );
    }

    #[test]
    fn a_missing_local_tap_leaves_only_that_endpoint_out() {
        let mut e = ep(1, NODE, 0);
        e.tap = "nosuch".into();
        let out = compile(&node(), &[e, ep(2, NODE, 0)], &nets(), &[], &[], &taps).unwrap();
        assert_eq!(out.unready, [Ipv4Addr::new(10, 50, 0, 1)]);
        assert_eq!(out.state.endpoints.len(), 1);
        assert_eq!(out.state.ifaces.len(), 1);
    }

    #[test]
    fn covering_prefixes_pass_their_rules_down() {
        let policy = Policy {
            name: "p".into(),
            selector: [7].into(),
            ingress: Some(vec![
                allow(
                    Peer::Cidr("10.0.0.0/8".parse().unwrap()),
                    Protocol::Tcp,
                    (80, 80),
                ),
                Rule {
                    action: Action::Deny,
                    peer: Peer::Cidr("10.1.0.0/16".parse().unwrap()),
                    protocol: Protocol::Any,
                    ports: (0, 65535),
                },
                allow(Peer::Identity(8), Protocol::Udp, (1000, 2000)),
            ]),
            egress: None,
        };
        let state = compile(&node(), &[], &nets(), &[policy], &[], &taps)
            .unwrap()
            .state;
        assert_eq!(state.subjects[&7].flags, SUBJ_INGRESS);
        let key = |cidr: &str| {
            let c: Cidr = cidr.parse().unwrap();
            (
                64 + u32::from(c.len),
                PolicyCidrData {
                    subject: 7,
                    direction: DIR_INGRESS,
                    pad: [0; 3],
                    peer: ip_key(c.addr),
                },
            )
        };
        assert_eq!(state.policy_cidr[&key("10.0.0.0/8")].count, 1);
        let inner = state.policy_cidr[&key("10.1.0.0/16")];
        assert_eq!(
            inner.count, 2,
            "the /16 carries the /8's allow and its own deny"
        );
        let id = state.policy_id.values().next().unwrap();
        assert_eq!(
            (id.count, id.rule[0].proto, id.rule[0].port_lo),
            (1, 17, 1000)
        );
    }

    #[test]
    fn too_many_rules_for_one_peer_are_refused() {
        let rules = (0..=MAX_RULES as u16)
            .map(|p| allow(Peer::Identity(1), Protocol::Tcp, (p, p)))
            .collect();
        let policy = Policy {
            name: "p".into(),
            selector: [7].into(),
            ingress: Some(rules),
            egress: None,
        };
        let err = compile(&node(), &[], &nets(), &[policy], &[], &taps).unwrap_err();
        assert!(
            matches!(err, SyncError::TooManyRules { subject: 7, .. }),
            "{err}"
        );
    }

    #[test]
    fn apply_resyncs_first_then_writes_only_changes() {
        let mut stale = MapState::default();
        stale.endpoints.insert(
            ip_key(Ipv4Addr::new(10, 50, 9, 9)),
            EndpointValue::default(),
        );
        let store = FakeMaps {
            state: stale,
            ..FakeMaps::default()
        };
        let mut dp = Datapath::new(store, node());
        let eps = vec![ep(1, NODE, 7), ep(2, OTHER, 8)];
        let first = dp.apply(&eps, &nets(), &[], &[], &taps).unwrap();
        assert!(first.resynced);
        assert!(
            dp.store()
                .writes
                .contains(&Change::DelEndpoint(ip_key(Ipv4Addr::new(10, 50, 9, 9))))
        );
        let expected = compile(&node(), &eps, &nets(), &[], &[], &taps)
            .unwrap()
            .state;
        assert_eq!(dp.store().state, expected);

        let again = dp.apply(&eps, &nets(), &[], &[], &taps).unwrap();
        assert_eq!(
            again,
            ApplyReport {
                resynced: false,
                writes: 0,
                unready: vec![]
            }
        );

        // The endpoint moves here: one endpoint write and its iface.
        let moved = vec![ep(1, NODE, 7), ep(2, NODE, 8)];
        let third = dp.apply(&moved, &nets(), &[], &[], &taps).unwrap();
        assert_eq!(third.writes, 2);
    }

    #[test]
    fn rules_are_written_before_enforcement_and_removed_after() {
        let mut dp = Datapath::new(FakeMaps::default(), node());
        let policy = Policy {
            name: "p".into(),
            selector: [7].into(),
            ingress: Some(vec![allow(Peer::Identity(8), Protocol::Tcp, (80, 80))]),
            egress: None,
        };
        dp.apply(&[], &nets(), std::slice::from_ref(&policy), &[], &taps)
            .unwrap();
        let writes = &dp.store().writes;
        let rule = writes
            .iter()
            .position(|c| matches!(c, Change::PutPolicyId(..)))
            .unwrap();
        let subj = writes
            .iter()
            .position(|c| matches!(c, Change::PutSubject(..)))
            .unwrap();
        assert!(rule < subj);

        dp.store_mut().writes.clear();
        dp.apply(&[], &nets(), &[], &[], &taps).unwrap();
        let writes = &dp.store().writes;
        let subj = writes
            .iter()
            .position(|c| matches!(c, Change::DelSubject(..)))
            .unwrap();
        let rule = writes
            .iter()
            .position(|c| matches!(c, Change::DelPolicyId(..)))
            .unwrap();
        assert!(subj < rule);
    }

    #[test]
    fn a_failed_write_forces_a_resync() {
        let store = FakeMaps {
            fail_after: Some(1),
            ..FakeMaps::default()
        };
        let mut dp = Datapath::new(store, node());
        let eps = vec![ep(1, NODE, 7), ep(2, OTHER, 8)];
        assert!(dp.apply(&eps, &nets(), &[], &[], &taps).is_err());
        dp.store_mut().fail_after = None;
        let report = dp.apply(&eps, &nets(), &[], &[], &taps).unwrap();
        assert!(report.resynced);
        assert_eq!(
            dp.store().state,
            compile(&node(), &eps, &nets(), &[], &[], &taps)
                .unwrap()
                .state
        );
    }
}
