//! The executor of the network reconciler: one thread that owns this
//! node's loaded programs, rtnetlink connection and DHCP servers, and makes
//! the host match the [`plan`] on every change and every
//! resync period.
//!
//! A pass, in order (each step idempotent, failures logged and retried on
//! the next pass):
//! 1. load the programs (reusing the node's pinned maps and links), bring
//!    up the VXLAN device and attach `from_overlay` to it, and
//!    `from_uplink` to the uplink (required with native routing);
//! 2. for every local and standby NIC: create the tap if missing, give it
//!    the gateway's MAC and address (and, once local, the route to the
//!    guest's /32), attach `from_vm`;
//! 3. write the maps ([`basalt_sdn::Datapath::apply`]: a full read-back on
//!    the first pass, only differences after);
//! 4. serve DHCP on every local tap with its lease (restarted when the
//!    lease changes, stopped when the NIC goes);
//! 5. install the node's nftables table (SNAT on the uplink) when the
//!    networks change;
//! 6. remove Basalt taps that no VM placed or arriving here uses;
//! 7. keep the next hop towards every other node resolved (a managed
//!    neighbour entry, [`Netlink::keep_resolved`]; checked again every
//!    30 s): native routing's receive side drops frames
//!    whose sender it cannot tell (`no-neighbour`), so the MAC must be
//!    known before a peer's first packet, not learnt from it.
//!
//! Between passes it drains the programs' event ring every 100 ms and
//! turns activations into [`Activation`]s, and carries live migrations'
//! flows (it reads the connection-tracking entries of a leaving VM's
//! addresses and writes those of an arriving one). A second thread sweeps
//! connection tracking for expired entries every `conntrack_sweep`
//! ([`NetworkConfig::conntrack`] says how long each kind may idle).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_api::TrackedFlow;
use basalt_sdn::abi::{CtKey, EVENT_ACTIVATION, ip_from_key, ip_key};
use basalt_sdn::dhcp::{DhcpServer, GUEST_MTU, Lease};
use basalt_sdn::loader::Loader;
use basalt_sdn::netlink::Netlink;
use basalt_sdn::nftables::{self, NodeRules};
use basalt_sdn::tap::{Tap, TapError};
use basalt_sdn::{Datapath, Hook, NodeConfig, Routing};

use super::plan::{self, LocalNic, NetPlan};
use super::{Activation, NetworkConfig, Shared};

/// Every Basalt tap's name starts with this (see
/// [`crate::vm_domain::tap_name`]).
pub const TAP_PREFIX: &str = "vm";

/// How long DHCP leases last (guests renew at half).
const LEASE_SECS: u32 = 3600;

/// How often the event ring is drained.
const EVENT_POLL: Duration = Duration::from_millis(100);

/// Creates the persistent tap `name` if it does not exist (the guest's
/// hypervisor opens it later).
pub fn create_tap(name: &str) -> Result<(), TapError> {
    if basalt_sdn::tap::exists(name) {
        return Ok(());
    }
    let tap = Tap::open(name)?;
    tap.set_persistent(true)
}

/// Whether `name` is a tap the agent made for a VM NIC: `vm`, 8 hex
/// digits, `-`, the NIC index.
pub fn is_vm_tap(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(TAP_PREFIX) else {
        return false;
    };
    let Some((hex, index)) = rest.split_once('-') else {
        return false;
    };
    hex.len() == 8
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
}

pub(crate) fn spawn(config: NetworkConfig, shared: Arc<Shared>) {
    let sweeper = {
        let (config, shared) = (config.clone(), shared.clone());
        std::thread::Builder::new()
            .name("net-conntrack".into())
            .spawn(move || sweep_conntrack(&config, &shared))
    };
    if let Err(err) = sweeper {
        tracing::error!(error = %err, "could not start the connection-tracking sweeper; entries only leave by LRU eviction");
    }
    let spawned = std::thread::Builder::new()
        .name("net-datapath".into())
        .spawn(move || {
            let mut host = Host::new(config);
            host.run(&shared);
        });
    if let Err(err) = spawned {
        tracing::error!(error = %err, "could not start the datapath thread; this node has no VM networking");
    }
}

/// Sweeps this node's pinned connection-tracking map every
/// `conntrack_sweep` until the agent stops: on a thread of its own, so a
/// long sweep never holds up activations or passes. Before the datapath
/// is loaded there is nothing to sweep (logged at debug).
fn sweep_conntrack(config: &NetworkConfig, shared: &Shared) {
    loop {
        let deadline = Instant::now() + config.conntrack_sweep;
        while Instant::now() < deadline {
            if shared.lock().stop {
                return;
            }
            std::thread::sleep(EVENT_POLL.min(config.conntrack_sweep));
        }
        match basalt_sdn::loader::expire_pinned_conntrack(&config.node, &config.conntrack) {
            Ok(sweep) if sweep.expired > 0 => tracing::debug!(
                expired = sweep.expired,
                tracked = sweep.seen - sweep.expired,
                "connection tracking swept"
            ),
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(error = %error_chain(&err), "no connection tracking to sweep")
            }
        }
    }
}

/// The host side, as the thread holds it.
struct Host {
    config: NetworkConfig,
    netlink: Option<Netlink>,
    datapath: Option<Datapath<Loader>>,
    vxlan_ifindex: u32,
    /// Taps wired and attached: the address they were wired for (`None`:
    /// standby, no route yet) and the ifindex (a tap made anew is wired
    /// anew).
    wired: BTreeMap<String, (Option<Ipv4Addr>, u32)>,
    /// DHCP servers by tap, with the lease and the ifindex they serve.
    dhcp: BTreeMap<String, (Lease, u32, DhcpServer)>,
    /// The networks the node's nftables table was written for.
    nft: Option<Vec<basalt_sdn::Cidr>>,
    /// Local or standby taps by ifindex, for activations.
    by_ifindex: BTreeMap<u32, LocalNic>,
    /// Peer node address → the next hop kept resolved towards it, and
    /// when that was last checked.
    resolved: BTreeMap<Ipv4Addr, Ipv4Addr>,
    resolved_at: Option<Instant>,
    /// `from_uplink` is attached to the uplink.
    uplink_attached: bool,
}

/// How often the managed neighbour entries of the peers' next hops are
/// checked again (someone may have flushed them, a route may have moved).
const NEIGHBOUR_RECHECK: Duration = Duration::from_secs(30);

impl Host {
    fn new(config: NetworkConfig) -> Host {
        Host {
            config,
            netlink: None,
            datapath: None,
            vxlan_ifindex: 0,
            wired: BTreeMap::new(),
            dhcp: BTreeMap::new(),
            nft: None,
            by_ifindex: BTreeMap::new(),
            resolved: BTreeMap::new(),
            resolved_at: None,
            uplink_attached: false,
        }
    }

    /// Step 7 of a pass: a managed neighbour entry for the next hop towards
    /// every peer, and none left for peers that are gone (unless another
    /// peer shares the hop). A failure is logged, not retried before the
    /// next check: a peer without a route cannot be helped here.
    fn keep_peers_resolved(&mut self, peers: &BTreeSet<Ipv4Addr>) {
        let Some(netlink) = self.netlink.as_ref() else {
            return;
        };
        if self
            .resolved_at
            .is_some_and(|t| t.elapsed() >= NEIGHBOUR_RECHECK)
        {
            self.resolved.clear();
        }
        if self.resolved.is_empty() {
            self.resolved_at = Some(Instant::now());
        }
        let gone: Vec<Ipv4Addr> = self
            .resolved
            .keys()
            .filter(|p| !peers.contains(p))
            .copied()
            .collect();
        for peer in gone {
            let Some(hop) = self.resolved.remove(&peer) else {
                continue;
            };
            if self.resolved.values().any(|h| *h == hop) {
                continue;
            }
            if let Err(err) = netlink.forget_resolved(hop) {
                tracing::debug!(%hop, error = %error_chain(&err), "could not remove a managed neighbour");
            }
        }
        for peer in peers {
            if self.resolved.contains_key(peer) {
                continue;
            }
            match netlink.keep_resolved(*peer) {
                Ok(hop) => {
                    self.resolved.insert(*peer, hop);
                }
                Err(err) => {
                    // Counted as done until the next check, so a peer
                    // without a route is not asked about on every pass.
                    self.resolved.insert(*peer, *peer);
                    tracing::warn!(%peer, error = %error_chain(&err),
                        "cannot keep the next hop towards a peer node resolved; its native packets drop as no-neighbour until it is");
                }
            }
        }
    }

    fn run(&mut self, shared: &Shared) {
        let mut last_pass: Option<Instant> = None;
        loop {
            let (snapshot, incoming, claims) = {
                let mut state = shared.wait(EVENT_POLL);
                if state.stop {
                    return;
                }
                let exports = std::mem::take(&mut state.exports);
                let imports = std::mem::take(&mut state.imports);
                if !(exports.is_empty() && imports.is_empty()) {
                    drop(state);
                    self.carry_flows(exports, &imports);
                    state = shared.lock();
                }
                let due = last_pass.is_none_or(|t| t.elapsed() >= self.config.resync);
                if !(state.dirty || due) || state.snapshot.is_none() {
                    drop(state);
                    self.drain_events(shared);
                    continue;
                }
                state.dirty = false;
                let snapshot = state.snapshot.clone().unwrap_or_default();
                // A claim the watch has caught up with (or gone past) has
                // done its job.
                state.claims.retain(|name, (_, epoch)| {
                    snapshot
                        .endpoints
                        .get(name)
                        .is_some_and(|e| e.epoch < *epoch)
                });
                let claims: BTreeMap<String, u64> = state
                    .claims
                    .iter()
                    .map(|(name, (_, epoch))| (name.clone(), *epoch))
                    .collect();
                (snapshot, state.incoming.keys().cloned().collect(), claims)
            };
            let plan = plan::plan(&snapshot, &self.config.node, &incoming, &claims);
            for (what, why) in &plan.problems {
                tracing::debug!(what, why, "not in the datapath");
            }
            if let Err(err) = self.pass(&plan, shared) {
                tracing::warn!(error = %err, "network pass failed; retrying");
                // Retry soon, not only at the next change.
                shared.lock().dirty = true;
                std::thread::sleep(Duration::from_secs(1));
            }
            last_pass = Some(Instant::now());
            self.drain_events(shared);
        }
    }

    /// Loads the programs and the VXLAN device once.
    fn ensure_loaded(&mut self, node_addr: Ipv4Addr) -> Result<(), String> {
        if self.netlink.is_none() {
            self.netlink = Some(Netlink::new().map_err(|e| format!("netlink: {e}"))?);
            if let Err(err) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
                tracing::warn!(error = %err, "could not turn IPv4 forwarding on; VM egress will not leave the node");
            }
        }
        let Some(netlink) = self.netlink.as_ref() else {
            return Err("no netlink connection".into());
        };
        if self.datapath.is_none() {
            let mut loader = Loader::load(&self.config.node).map_err(|e| error_chain(&e))?;
            let vxlan = netlink
                .ensure_vxlan(&self.config.vxlan, 1500)
                .map_err(|e| format!("vxlan device: {}", error_chain(&e)))?;
            loader
                .attach(&self.config.vxlan, Hook::Overlay)
                .map_err(|e| error_chain(&e))?;
            // The overlay's fast path, and native routing's receive side:
            // over the overlay, the VXLAN device still delivers everything
            // without it; a node that sends natively needs it (its peers
            // send natively too, and only this program applies policy to
            // what they send).
            self.uplink_attached = false;
            if let Err(err) = loader.attach(&self.config.uplink, Hook::Uplink) {
                if self.config.routing == Routing::Native {
                    return Err(format!(
                        "native routing needs the uplink's program on {}: {}",
                        self.config.uplink,
                        error_chain(&err)
                    ));
                }
                tracing::warn!(uplink = %self.config.uplink, error = %error_chain(&err),
                    "no overlay fast path on the uplink, and unencapsulated packets from native-routing nodes go to VMs without ingress policy");
            } else {
                self.uplink_attached = true;
            }
            self.vxlan_ifindex = vxlan;
            self.datapath = Some(Datapath::new(
                loader,
                NodeConfig {
                    addr: node_addr,
                    vxlan_ifindex: vxlan,
                    routing: self.config.routing,
                },
            ));
            // Whatever was attached before this loader is re-checked.
            self.wired.clear();
            tracing::info!(node = %self.config.node, "datapath loaded");
        }
        if let Some(dp) = self.datapath.as_mut() {
            dp.set_node(NodeConfig {
                addr: node_addr,
                vxlan_ifindex: self.vxlan_ifindex,
                routing: self.config.routing,
            });
        }
        Ok(())
    }

    fn pass(&mut self, plan: &NetPlan, shared: &Shared) -> Result<(), String> {
        let Some(node_addr) = plan.node_addr else {
            return Err(format!(
                "node {} has no IPv4 address in its node object yet",
                self.config.node
            ));
        };
        self.ensure_loaded(node_addr)?;
        let (Some(netlink), Some(dp)) = (self.netlink.as_ref(), self.datapath.as_mut()) else {
            return Err("datapath not loaded".into());
        };
        // A network routed natively needs the uplink's program on every
        // node: it alone takes (and applies ingress policy to) what peers
        // send that way.
        if !self.uplink_attached
            && let Some(net) = plan
                .networks
                .iter()
                .find(|n| n.routing == Some(Routing::Native))
        {
            dp.store_mut()
                .attach(&self.config.uplink, Hook::Uplink)
                .map_err(|e| {
                    format!(
                        "network {} is routed natively and needs the uplink's program on {}: {}",
                        net.name,
                        self.config.uplink,
                        error_chain(&e)
                    )
                })?;
            self.uplink_attached = true;
        }

        // Taps: create, wire, attach.
        let mut problems = Vec::new();
        let nics = plan
            .local
            .iter()
            .map(|n| (n, true))
            .chain(plan.standby.iter().map(|n| (n, false)));
        for (nic, local) in nics {
            let route = local.then_some(nic.ip);
            let index = netlink.index(&nic.tap).ok();
            if index.is_some_and(|i| self.wired.get(&nic.tap) == Some(&(route, i))) {
                continue;
            }
            let wired = create_tap(&nic.tap)
                .map_err(|e| error_chain(&e))
                .and_then(|()| netlink.index(&nic.tap).map_err(|e| error_chain(&e)))
                .and_then(|index| {
                    match route {
                        Some(ip) => netlink.wire_tap(&nic.tap, ip).map_err(|e| error_chain(&e)),
                        None => netlink
                            .configure(&nic.tap, Some(basalt_sdn::abi::GATEWAY_MAC), None)
                            .and_then(|()| {
                                netlink.add_address(&nic.tap, basalt_sdn::abi::GATEWAY_IP, 32)
                            })
                            .map_err(|e| error_chain(&e)),
                    }
                    .map(|()| index)
                })
                .and_then(|index| {
                    dp.store_mut()
                        .attach(&nic.tap, Hook::Tap)
                        .map(|()| index)
                        .map_err(|e| error_chain(&e))
                });
            match wired {
                Ok(index) => {
                    self.wired.insert(nic.tap.clone(), (route, index));
                }
                Err(err) => problems.push(format!("tap {}: {err}", nic.tap)),
            }
        }

        // Maps.
        let standby: Vec<(String, Ipv4Addr)> =
            plan.standby.iter().map(|n| (n.tap.clone(), n.ip)).collect();
        let report = dp
            .apply(
                &plan.endpoints,
                &plan.networks,
                &plan.policies,
                &standby,
                &|name| netlink.tap_link(name).ok(),
            )
            .map_err(|e| error_chain(&e))?;
        if report.writes > 0 {
            tracing::debug!(
                writes = report.writes,
                resynced = report.resynced,
                "maps updated"
            );
        }
        self.by_ifindex = plan
            .local
            .iter()
            .chain(&plan.standby)
            .filter_map(|n| netlink.index(&n.tap).ok().map(|i| (i, n.clone())))
            .collect();
        let ready: BTreeSet<String> = plan
            .local
            .iter()
            .chain(&plan.standby)
            .filter(|n| {
                let index = self.wired.get(&n.tap).map(|(_, index)| *index);
                index.is_some() && netlink.index(&n.tap).ok() == index
            })
            .map(|n| n.tap.clone())
            .collect();
        shared.lock().ready = ready;

        // DHCP on local taps.
        let wanted: BTreeMap<&str, (Lease, u32)> = plan
            .local
            .iter()
            .filter_map(|n| {
                let (_, index) = self.wired.get(&n.tap)?;
                let lease = Lease {
                    mac: n.mac,
                    ip: n.ip,
                    dns: self.config.dns.clone(),
                    mtu: GUEST_MTU,
                    lease_secs: LEASE_SECS,
                };
                Some((n.tap.as_str(), (lease, *index)))
            })
            .collect();
        self.dhcp.retain(|tap, (lease, index, _)| {
            wanted.get(tap.as_str()) == Some(&(lease.clone(), *index))
        });
        for (tap, (lease, index)) in wanted {
            if self.dhcp.contains_key(tap) {
                continue;
            }
            match DhcpServer::start(tap, lease.clone()) {
                Ok(server) => {
                    self.dhcp.insert(tap.to_owned(), (lease, index, server));
                }
                Err(err) => problems.push(format!("dhcp on {tap}: {}", error_chain(&err))),
            }
        }

        // SNAT and guards.
        let cidrs: Vec<basalt_sdn::Cidr> = plan.networks.iter().map(|n| n.cidr).collect();
        if self.nft.as_ref() != Some(&cidrs) {
            let rules = NodeRules {
                uplink: self.config.uplink.clone(),
                tap_prefix: TAP_PREFIX.into(),
                networks: cidrs.clone(),
            };
            match nftables::apply(&rules) {
                Ok(()) => self.nft = Some(cidrs),
                Err(err) => problems.push(format!("nftables: {}", error_chain(&err))),
            }
        }

        // Taps nobody uses any more. Decided and done under the state
        // lock, so a tap the compute reconciler makes meanwhile is kept.
        let state = shared.lock();
        if let Some(requested) = &state.requested {
            let keep: BTreeSet<&str> = plan
                .local
                .iter()
                .chain(&plan.standby)
                .map(|n| n.tap.as_str())
                .chain(requested.iter().map(String::as_str))
                .chain(state.incoming.values().flatten().map(String::as_str))
                .collect();
            let names = netlink.link_names().map_err(|e| error_chain(&e))?;
            for name in names
                .iter()
                .filter(|n| is_vm_tap(n) && !keep.contains(n.as_str()))
            {
                self.dhcp.remove(name);
                self.wired.remove(name);
                let removed = dp
                    .store_mut()
                    .detach(name)
                    .map_err(|e| error_chain(&e))
                    .and_then(|()| netlink.delete(name).map_err(|e| error_chain(&e)));
                match removed {
                    Ok(()) => tracing::info!(tap = %name, "removed the tap of a VM no longer here"),
                    Err(err) => problems.push(format!("removing tap {name}: {err}")),
                }
            }
        }
        drop(state);
        self.keep_peers_resolved(&plan.peers);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Answers flow exports and writes flow imports (live migration's
    /// connection tracking, see [`super::NetworkAgent::export_flows`]).
    fn carry_flows(
        &mut self,
        exports: Vec<(Vec<Ipv4Addr>, std::sync::mpsc::Sender<Vec<TrackedFlow>>)>,
        imports: &[TrackedFlow],
    ) {
        let Some(dp) = self.datapath.as_mut() else {
            // Nothing tracked here yet: empty answers (dropping the
            // senders), nothing to write into.
            if !imports.is_empty() {
                tracing::warn!(
                    flows = imports.len(),
                    "datapath not loaded: carried flows dropped"
                );
            }
            return;
        };
        for (ips, answer) in exports {
            let flows: Vec<TrackedFlow> = ips
                .iter()
                .flat_map(|ip| dp.store().conntrack_of(*ip))
                .map(|(key, _)| flow_of(&key))
                .collect();
            let _ = answer.send(flows);
        }
        if !imports.is_empty() {
            let entries: Vec<CtKey> = imports.iter().map(key_of).collect();
            match dp.store_mut().import_conntrack(&entries) {
                Ok(()) => tracing::debug!(flows = entries.len(), "carried flows tracked"),
                Err(err) => {
                    tracing::warn!(error = %error_chain(&err), "could not write carried flows")
                }
            }
        }
    }

    fn drain_events(&mut self, shared: &Shared) {
        let Some(dp) = self.datapath.as_mut() else {
            return;
        };
        for event in dp.store_mut().drain_events() {
            if event.kind != EVENT_ACTIVATION {
                continue;
            }
            let ip = self
                .by_ifindex
                .get(&event.ifindex)
                .map_or_else(|| ip_from_key(event.saddr), |n| n.ip);
            let tap = self
                .by_ifindex
                .get(&event.ifindex)
                .map(|n| n.tap.clone())
                .unwrap_or_default();
            tracing::info!(%tap, %ip, "activation: a guest spoke on its standby tap");
            shared.activated(Activation {
                tap,
                ip,
                endpoint: basalt_api::Endpoint::name_for(ip),
            });
        }
    }
}

/// A connection-tracking key as the control plane carries it.
fn flow_of(key: &CtKey) -> TrackedFlow {
    TrackedFlow {
        source: SocketAddrV4::new(ip_from_key(key.saddr), key.sport),
        destination: SocketAddrV4::new(ip_from_key(key.daddr), key.dport),
        protocol: key.proto,
    }
}

/// The connection-tracking key of a carried flow.
fn key_of(flow: &TrackedFlow) -> CtKey {
    CtKey {
        saddr: ip_key(*flow.source.ip()),
        daddr: ip_key(*flow.destination.ip()),
        sport: flow.source.port(),
        dport: flow.destination.port(),
        proto: flow.protocol,
        pad: [0; 3],
    }
}

/// An error and its sources, on one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carried_flows_keep_their_connection_tracking_key() {
        let flow = TrackedFlow {
            source: "10.77.0.3:40312".parse().unwrap(),
            destination: "10.77.0.10:9".parse().unwrap(),
            protocol: 6,
        };
        let key = key_of(&flow);
        assert_eq!(key.saddr, ip_key(Ipv4Addr::new(10, 77, 0, 3)));
        assert_eq!((key.sport, key.dport, key.proto), (40312, 9, 6));
        assert_eq!(flow_of(&key), flow);
    }

    #[test]
    fn only_basalt_taps_are_candidates_for_removal() {
        assert!(is_vm_tap("vm5f0c6a3e-0"));
        assert!(is_vm_tap("vm5f0c6a3e-12"));
        assert!(!is_vm_tap("vm5f0c6a3e"));
        assert!(!is_vm_tap("vmxyz-0"));
        assert!(!is_vm_tap("vm5f0c6a3e-x"));
        assert!(!is_vm_tap("eth0"));
        assert!(!is_vm_tap("basalt-vx"));
    }
}
