//! The agent's network reconciler: drives this node's `basalt-sdn`
//! datapath from the control plane.
//!
//! Three parts:
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
//!   removes the taps of VMs no longer placed here, and reports
//!   activations (a migrated guest's first frame on a standby tap).
//!
//! The compute reconciler calls [`NetworkAgent::prepare_taps`] before each
//! pass, so every placed VM's tap exists before its domain starts (the
//! domain uses the tap as it is, `managed='no'`). Live migration calls
//! [`NetworkAgent::prepare_incoming`] on the target, waits for an
//! [`Activation`] from [`NetworkAgent::activations`], then
//! [`take_over_endpoint`] moves the endpoint to this node.
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
pub mod plan;
pub mod policy;
pub mod watch;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use basalt_api::{AdminClient, ApiError, Endpoint, Kind, Object, Vm};
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
}

impl NetworkConfig {
    /// Defaults for node `node`: uplink `eth0`, VXLAN device `basalt-vx`,
    /// no DNS, resync every 10 s.
    pub fn new(node: impl Into<String>) -> NetworkConfig {
        NetworkConfig {
            node: node.into(),
            uplink: "eth0".into(),
            vxlan: "basalt-vx".into(),
            dns: Vec::new(),
            resync: Duration::from_secs(10),
        }
    }
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
    /// Uids of VMs this node prepares to receive.
    pub incoming: BTreeSet<String>,
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
    /// Returns the taps. Blocking (a few ioctls).
    pub fn prepare_incoming(&self, vm: &Vm) -> Vec<String> {
        let uuid = crate::vm_domain::vm_uuid(&vm.meta.uid);
        let taps: Vec<String> = (0..vm.spec.nics.len())
            .map(|i| crate::vm_domain::tap_name(uuid, i))
            .collect();
        let uid = vm.meta.uid.clone();
        self.shared.poke(|state| {
            for tap in &taps {
                if let Err(err) = datapath::create_tap(tap) {
                    tracing::warn!(tap, error = %err, "could not create the standby tap");
                }
            }
            state.incoming.insert(uid);
            if let Some(requested) = state.requested.as_mut() {
                requested.extend(taps.iter().cloned());
            }
        });
        taps
    }

    /// Ends a migration to this node (done or aborted): the VM's taps are
    /// standby no more; they stay while the VM is placed here and are
    /// removed otherwise.
    pub fn finish_incoming(&self, vm_uid: &str) {
        self.shared.poke(|state| {
            state.incoming.remove(vm_uid);
        });
    }

    /// Activations seen on this node's standby taps, from now on.
    pub fn activations(&self) -> broadcast::Receiver<Activation> {
        self.shared.activations.subscribe()
    }
}

/// Live migration, on the target once an [`Activation`] is seen: makes
/// `node` the owner of the endpoint named `endpoint` at placement `epoch`,
/// by compare-and-swap on the endpoint's resource version (retried while
/// another writer races). Every node's maps follow from its watch; the
/// IPAM controller keeps the endpoint there once the placement says so.
/// An endpoint already owned by `node` at `epoch` or later is left alone.
pub async fn take_over_endpoint(
    admin: &AdminClient,
    endpoint: &str,
    node: &str,
    epoch: u64,
) -> Result<Endpoint, ApiError> {
    loop {
        let Object::Endpoint(mut current) = admin.get(Kind::Endpoint, endpoint).await? else {
            return Err(ApiError::invalid("kind", "not an endpoint"));
        };
        if current.node == node && current.epoch >= epoch {
            return Ok(current);
        }
        current.node = node.to_owned();
        current.epoch = current.epoch.max(epoch);
        match admin.update(Object::Endpoint(current)).await {
            Ok(Object::Endpoint(updated)) => return Ok(updated),
            Ok(_) => return Err(ApiError::invalid("kind", "not an endpoint")),
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => return Err(err),
        }
    }
}
