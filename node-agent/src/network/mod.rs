//! The agent's network reconciler: drives this node's `basalt-sdn`
//! datapath from the control plane.
//!
//! Its parts (and [`host_routes`], which routes a host that is not a node
//! to every VM through its holder):
//! - [`watch`] lists then watches nodes, networks, endpoints, VMs and
//!   policies through the admin API into one snapshot;
//! - [`policy`] turns policy objects (selectors by VM labels) into the
//!   datapath's (selectors by label identity);
//! - [`plan`] turns the snapshot into what this node's datapath must hold
//!   (pure, tested without a kernel);
//! - [`datapath`] is the executor: a thread that loads the programs (maps
//!   and links pinned per node, so an agent restart keeps traffic
//!   flowing), brings up the node's VXLAN device, creates, wires and
//!   attaches each VM NIC's tap, serves DHCP on it with the leased address,
//!   keeps the maps equal to the plan, installs the node's SNAT table,
//!   removes the taps of VMs no longer placed here, sweeps expired
//!   connection-tracking entries, and reports activations (a migrated
//!   guest's first frame on a standby tap).
//!
//! The compute reconciler calls [`NetworkAgent::prepare_taps`] before each
//! pass, so every placed VM's tap exists before its domain starts (the
//! domain uses the tap as it is, `managed='no'`). Live migration (the
//! target's side, `crate::migration`) calls
//! [`NetworkAgent::prepare_incoming`] before it says ready (the incoming
//! domain opens the same tap names, so they must exist and wait in
//! standby), waits for an [`Activation`] from
//! [`NetworkAgent::activations`], then [`NetworkAgent::claim`]s the
//! endpoint (this node's maps point at the local tap at once, without
//! waiting for the control plane) and [`take_over_endpoint`] moves the
//! endpoint object to this node, so every other node's maps follow from
//! its watch. [`NetworkAgent::finish_incoming`] ends it.
//!
//! Invariants:
//! - the agent process runs in the node's network namespace: every link,
//!   tap and socket here is the node's;
//! - nothing is removed before the first full list and the compute
//!   reconciler's first report of its placed VMs: a restarted agent never
//!   tears down what still runs;
//! - only taps named as [`crate::vm_domain::tap_name`] names them are ever
//!   removed.

pub mod datapath;
pub mod host_routes;
pub mod plan;
pub mod policy;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use basalt_api::{
    AdminClient, ApiError, Endpoint, Kind, MAX_MIGRATION_FLOWS, Object, TrackedFlow, Vm,
};
use tokio::sync::broadcast;

use self::plan::Snapshot;
use crate::reconcile::Desired;

/// How this node's networking is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// This node's name: its node object, and its pin directory
    /// (`/sys/fs/bpf/basalt/<node>/`).
    pub node: String,
    /// The interface to the other nodes and the outside (VXLAN underlay,
    /// source NAT).
    pub uplink: String,
    /// The node's collect-metadata VXLAN device.
    pub vxlan: String,
    /// DNS servers handed to guests by DHCP.
    pub dns: Vec<Ipv4Addr>,
    /// Re-apply everything at least this often.
    pub resync: Duration,
    /// How long idle connection-tracking entries live.
    pub conntrack: basalt_sdn::conntrack::Timeouts,
    /// How often connection tracking is swept for expired entries.
    pub conntrack_sweep: Duration,
    /// How this node sends packets for VMs on other nodes: over the VXLAN
    /// overlay, or natively (unencapsulated, to the owner node's underlay
    /// address). Every node receives both.
    pub routing: basalt_sdn::Routing,
}

impl NetworkConfig {
    /// Defaults for node `node`: uplink `eth0`, VXLAN device `basalt-vx`,
    /// no DNS, resync every 10 s, the kernel's connection-tracking
    /// timeouts, swept every 10 s, routing over the overlay.
    pub fn new(node: impl Into<String>) -> NetworkConfig {
        NetworkConfig {
            node: node.into(),
            uplink: "eth0".into(),
            vxlan: "basalt-vx".into(),
            dns: Vec::new(),
            resync: Duration::from_secs(10),
            conntrack: basalt_sdn::conntrack::Timeouts::default(),
            conntrack_sweep: Duration::from_secs(10),
            routing: basalt_sdn::Routing::Overlay,
        }
    }
}

/// A standby tap for an incoming VM could not be made.
#[derive(Debug, thiserror::Error)]
#[error("could not create standby tap {tap}")]
pub struct StandbyTapError {
    /// The tap.
    pub tap: String,
    /// Why.
    #[source]
    pub source: basalt_sdn::tap::TapError,
}

/// A migrated guest spoke on a standby tap: its new home is this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// The standby tap.
    pub tap: String,
    /// The endpoint's address.
    pub ip: Ipv4Addr,
    /// The endpoint object's name (see [`Endpoint::name_for`]).
    pub endpoint: String,
}

/// What the watch, the agent's runtime and the datapath thread share.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    activations: broadcast::Sender<Activation>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// What the watch has seen; `None` before the first full list.
    pub snapshot: Option<Snapshot>,
    /// Taps of the VMs the compute reconciler runs here; `None` before its
    /// first pass.
    pub requested: Option<BTreeSet<String>>,
    /// The VMs this node prepares to receive, by uid, with their standby
    /// taps: never removed as unused while the VM is incoming, whatever
    /// the watch has shown yet (a restarted target's first passes may
    /// plan before its endpoints are listed).
    pub incoming: BTreeMap<String, Vec<String>>,
    /// Endpoints this node has claimed on an activation: name → (VM uid,
    /// epoch). The plan treats such an endpoint as this node's while the
    /// watched object's epoch is below the claim's (the take-over has not
    /// come back through the watch yet); a claim the watch has caught up
    /// with is dropped.
    pub claims: BTreeMap<String, (String, u64)>,
    /// Taps the last pass wired, attached and wrote into the maps (local
    /// or standby).
    pub ready: BTreeSet<String>,
    /// Asked of the datapath thread: the tracked flows of these
    /// addresses, answered on the channel.
    pub exports: Vec<(Vec<Ipv4Addr>, std::sync::mpsc::Sender<Vec<TrackedFlow>>)>,
    /// Flows the datapath thread adds to connection tracking.
    pub imports: Vec<TrackedFlow>,
    /// Something changed since the last pass.
    pub dirty: bool,
    /// The datapath thread should end.
    pub stop: bool,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn poke(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.lock();
        change(&mut state);
        state.dirty = true;
        self.wake.notify_all();
    }

    /// Changes the state and wakes the datapath thread without a pass.
    fn nudge(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.lock();
        change(&mut state);
        self.wake.notify_all();
    }

    pub(crate) fn replace_snapshot(&self, snapshot: Snapshot) {
        self.poke(|state| state.snapshot = Some(snapshot));
    }

    pub(crate) fn update_snapshot(&self, change: impl FnOnce(&mut Snapshot)) {
        self.poke(|state| {
            if let Some(snapshot) = state.snapshot.as_mut() {
                change(snapshot);
            }
        });
    }

    /// Waits until poked or `timeout`; returns the state, locked.
    pub(crate) fn wait(&self, timeout: Duration) -> MutexGuard<'_, State> {
        let state = self.lock();
        if state.dirty || state.stop {
            return state;
        }
        self.wake
            .wait_timeout(state, timeout)
            .map_or_else(|poisoned| poisoned.into_inner().0, |(guard, _)| guard)
    }

    pub(crate) fn activated(&self, activation: Activation) {
        // No receiver is fine: nobody migrates to this node right now.
        let _ = self.activations.send(activation);
    }
}

/// The running network reconciler of this node. Cloning shares it; the
/// datapath thread and the watch stop when the last clone is dropped
/// (the datapath itself — pinned maps and links — stays).
#[derive(Debug, Clone)]
pub struct NetworkAgent {
    shared: Arc<Shared>,
    _guard: Arc<StopGuard>,
}

#[derive(Debug)]
struct StopGuard {
    shared: Arc<Shared>,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.watch.abort();
        self.shared.poke(|state| state.stop = true);
    }
}

impl NetworkAgent {
    /// Starts the watch (on the current tokio runtime) and the datapath
    /// thread.
    pub fn start(config: NetworkConfig, admin: AdminClient) -> NetworkAgent {
        let (activations, _) = broadcast::channel(64);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            activations,
        });
        let watch = tokio::spawn(watch::follow(admin, shared.clone()));
        datapath::spawn(config, shared.clone());
        NetworkAgent {
            shared: shared.clone(),
            _guard: Arc::new(StopGuard { shared, watch }),
        }
    }

    /// Makes sure the taps of the domains `desired` runs exist, before the
    /// compute reconciler starts them, and records them as this node's:
    /// taps of VMs missing from a later call are removed. Blocking (a few
    /// ioctls); call it from the compute pass's blocking thread.
    pub fn prepare_taps(&self, desired: &Desired) {
        let taps: BTreeSet<String> = desired
            .vms
            .iter()
            .flat_map(|vm| vm.spec.nics.iter().map(|nic| nic.tap.clone()))
            .collect();
        // Under the lock: the datapath thread removes unrequested taps
        // under it too, so it never sees a tap made here but not yet
        // recorded.
        self.shared.poke(|state| {
            for tap in &taps {
                if let Err(err) = datapath::create_tap(tap) {
                    tracing::warn!(tap, error = %err, "could not create the tap");
                }
            }
            state.requested = Some(taps);
        });
    }

    /// Live migration, on the target before the migration starts: creates
    /// the taps of `vm`'s NICs in *standby* (attached, wired, but the
    /// endpoint still owned by the source, so nothing is forwarded to or
    /// from them). The guest's first frame on such a tap (QEMU's announce
    /// at resume) is reported once on [`NetworkAgent::activations`].
    /// Returns the taps (named as the domain names them, so the incoming
    /// domain opens these). Blocking (a few ioctls).
    pub fn prepare_incoming(&self, vm: &Vm) -> Result<Vec<String>, StandbyTapError> {
        let uuid = crate::vm_domain::vm_uuid(&vm.meta.uid);
        let taps: Vec<String> = (0..vm.spec.nics.len())
            .map(|i| crate::vm_domain::tap_name(uuid, i))
            .collect();
        let uid = vm.meta.uid.clone();
        let mut failed = None;
        self.shared.poke(|state| {
            for tap in &taps {
                if let Err(source) = datapath::create_tap(tap) {
                    failed.get_or_insert(StandbyTapError {
                        tap: tap.clone(),
                        source,
                    });
                }
            }
            state.incoming.insert(uid, taps.clone());
            if let Some(requested) = state.requested.as_mut() {
                requested.extend(taps.iter().cloned());
            }
        });
        match failed {
            Some(err) => Err(err),
            None => Ok(taps),
        }
    }

    /// Whether every tap of `taps` is wired, attached and in the maps
    /// (standby or local) as of the last pass: an activation on it will be
    /// seen.
    pub fn taps_ready(&self, taps: &[String]) -> bool {
        let state = self.shared.lock();
        taps.iter().all(|tap| state.ready.contains(tap))
    }

    /// Live migration, on the target at activation: this node's datapath
    /// treats the endpoint named `endpoint` (of the VM with uid `vm_uid`)
    /// as its own from the next pass on (started at once), as long as the
    /// watched object's epoch is below `epoch` — the guest runs here now,
    /// whatever the control plane has not yet said. Call
    /// [`take_over_endpoint`] next, so the other nodes follow.
    pub fn claim(&self, endpoint: &str, vm_uid: &str, epoch: u64) {
        self.shared.poke(|state| {
            state
                .claims
                .insert(endpoint.to_owned(), (vm_uid.to_owned(), epoch));
        });
    }

    /// Ends a migration to this node: the VM's taps are standby no more;
    /// they stay while the VM is placed (or its endpoint owned) here and
    /// are removed otherwise. When the migration `failed`, the VM's claims
    /// go too (the endpoint follows its placement back to the source);
    /// otherwise they stay until the watch has caught up with them.
    pub fn finish_incoming(&self, vm_uid: &str, failed: bool) {
        self.shared.poke(|state| {
            state.incoming.remove(vm_uid);
            if failed {
                state.claims.retain(|_, (uid, _)| uid != vm_uid);
            }
        });
    }

    /// Live migration, on the source: the open flows of VM `vm` (by name)
    /// as this node's connection tracking holds them — those to or from
    /// its leased addresses, at most [`MAX_MIGRATION_FLOWS`]. Empty when
    /// the VM or its endpoints are unknown here or the datapath is not
    /// loaded. Blocking: asks the datapath thread, waits at most 2 s.
    pub fn export_flows(&self, vm: &str) -> Vec<TrackedFlow> {
        let ips: Vec<Ipv4Addr> = {
            let state = self.shared.lock();
            let Some(snapshot) = state.snapshot.as_ref() else {
                return Vec::new();
            };
            let Some(uid) = snapshot.vms.get(vm).map(|v| v.meta.uid.clone()) else {
                return Vec::new();
            };
            snapshot
                .endpoints
                .values()
                .filter(|e| e.vm_uid == uid && e.release_at_unix_ms == 0)
                .filter_map(|e| e.ip)
                .collect()
        };
        if ips.is_empty() {
            return Vec::new();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.shared.nudge(|state| state.exports.push((ips, tx)));
        let mut flows = rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
        flows.sort();
        flows.dedup();
        flows.truncate(MAX_MIGRATION_FLOWS);
        flows
    }

    /// Live migration, on the target: adds `flows` to this node's
    /// connection tracking (a flow already tracked here is kept as it is),
    /// so the incoming VM's open flows pass a policy that selects it as
    /// they did on the source. Returns at once; the datapath thread writes
    /// them within its next poll.
    pub fn import_flows(&self, flows: &[TrackedFlow]) {
        if flows.is_empty() {
            return;
        }
        self.shared
            .nudge(|state| state.imports.extend_from_slice(flows));
    }

    /// Activations seen on this node's standby taps, from now on.
    pub fn activations(&self) -> broadcast::Receiver<Activation> {
        self.shared.activations.subscribe()
    }
}

/// What [`take_over_endpoint`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOver {
    /// The endpoint is `node`'s at the epoch asked for (moved now, or
    /// already).
    Owned(Endpoint),
    /// The endpoint is at a later epoch than asked for: someone moved it
    /// since (HA, another migration); it is left alone.
    Superseded(Endpoint),
}

/// Live migration, on the target once an [`Activation`] is seen: makes
/// `node` the owner of the endpoint named `endpoint` at `epoch` (the
/// migration's placement epoch + 1, what the controller's switchover
/// writes), by compare-and-swap on the endpoint's resource version
/// (retried while another writer races). Every node's maps follow from
/// its watch; the IPAM controller leaves an endpoint so taken over alone
/// while its migration is under way, and the switchover finds it already
/// moved. An endpoint already owned by `node` at `epoch` is left as it
/// is; one at a later epoch is never taken back.
pub async fn take_over_endpoint(
    admin: &AdminClient,
    endpoint: &str,
    node: &str,
    epoch: u64,
) -> Result<TakeOver, ApiError> {
    loop {
        let Object::Endpoint(mut current) = admin.get(Kind::Endpoint, endpoint).await? else {
            return Err(ApiError::invalid("kind", "not an endpoint"));
        };
        if current.epoch > epoch {
            return Ok(TakeOver::Superseded(current));
        }
        if current.node == node && current.epoch == epoch {
            return Ok(TakeOver::Owned(current));
        }
        current.node = node.to_owned();
        current.epoch = epoch;
        match admin.update(Object::Endpoint(current)).await {
            Ok(Object::Endpoint(updated)) => return Ok(TakeOver::Owned(updated)),
            Ok(_) => return Err(ApiError::invalid("kind", "not an endpoint")),
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => return Err(err),
        }
    }
}
