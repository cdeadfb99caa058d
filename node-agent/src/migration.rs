//! The agent's side of live migration: the target prepares, the source
//! copies, and both keep their reconciler's hands off the VM while it
//! moves. The control plane's controller (`basalt_control::migration`)
//! owns the other steps; its module doc draws the whole state machine.
//!
//! What this agent does, per [`Migration`] object it sees:
//!
//! - **target, `Preparing`**: pins the VM (below), prepares what the
//!   incoming guest needs, then writes `TargetReady`. The VM's disks are
//!   NBD exports at the same address on every node. With the node's
//!   storage ([`MigrationAgent::set_volumes`]) the VM's storage is ready
//!   first ([`Volumes::prepare_incoming`]): its cloud-init seed volume
//!   exists here, and every replicated disk is attached a second primary
//!   at the migration's epoch with the source as a peer (dual primary),
//!   so the guest's first write here is accepted. A disk the storage
//!   process refuses fails the migration naming the disk; a wait (the
//!   storage process unreachable, a peer's address not yet published)
//!   is retried on the next rescan, within the controller's deadline for
//!   preparing. With the agent's
//!   network (`--network`) the domain's NICs are precreated taps
//!   (`managed='no'`) whose names are the same on every node, so the
//!   incoming domain opens this node's taps as they are: they are made in
//!   *standby* first ([`NetworkAgent::prepare_incoming`]: wired and
//!   attached, the endpoint still the source's) and the agent waits until
//!   the datapath has them. Without it libvirt creates the tap.
//! - **target, from `TargetReady` until the migration ends**: the
//!   *activation* — the guest's first frame on a standby tap, QEMU's
//!   announce when the guest resumes here — moves the VM's endpoints: this
//!   node's datapath treats them as local at once
//!   ([`NetworkAgent::claim`]), and each endpoint object moves to this node
//!   at the placement's epoch + 1 by compare-and-swap
//!   ([`take_over_endpoint`]), so every node's maps follow from their
//!   watch, long before the controller's switchover (which then finds
//!   them moved). An aborted copy never resumes the guest here, so the
//!   endpoints stay on the source. The migration's end (any outcome) ends
//!   the standby ([`NetworkAgent::finish_incoming`]); an agent restarted
//!   mid-copy takes the standby up again from the migration object, before
//!   its first reconcile pass names the taps the node keeps (the pass makes
//!   its placed VMs' taps only once the migrations are listed), so the taps
//!   of a guest still arriving are never removed as unused.
//! - **source, `TargetReady`**: pins the VM, writes `Migrating`, then
//!   runs [`Compute::migrate`] peer to peer to the target's libvirtd
//!   (`qemu+tcp://<target host>/system`), reporting progress about once a
//!   second. When the copy has not converged within the spec's timeout it
//!   is aborted, or switched to post-copy when the spec allows. Success
//!   writes `Switching`, failure `Failed` (the guest still runs here).
//!   With the agent's network, `Migrating`, every progress report and
//!   `Switching` also carry the VM's open flows (this node's
//!   connection-tracking entries to or from its addresses,
//!   [`NetworkAgent::export_flows`]); the target tracks them as they come
//!   ([`NetworkAgent::import_flows`]), before and after the activation, so
//!   a policy that selects the VM keeps its established flows open there.
//!   A flow opened within the last report interval before the guest's
//!   pause is tracked on the target only from `Switching` on; until then
//!   its packets are judged as a new flow's.
//! - **source, `Migrating` with no copy running** (this agent restarted
//!   mid-copy): libvirtd carries on without it, so the agent waits. The
//!   domain disappearing means the copy succeeded (a migrated domain is
//!   undefined on the source, a crashed one is not); still running after
//!   the timeout means the copy is over or stuck: `Failed`, and the guest
//!   stays here.
//!
//! # Pins: the reconciler's hands off a moving VM
//!
//! A VM is *pinned* on this node while the reconciler must neither start,
//! stop, define nor remove its domain. A pass's hands-off set is computed
//! under a gate that a worker also takes to add a pin, from the same
//! placement snapshot the pass uses, so a pin added before a step is
//! honoured by every later pass, and a pin is only dropped on the
//! evidence that pass acts on:
//!
//! - the **source** pins before it writes `Migrating` (so it never
//!   restarts a guest whose domain vanished because it moved), and keeps
//!   the pin while a copy runs, and then until the migration failed or the
//!   placement has left this node;
//! - the **target** pins before it writes `TargetReady` (so it never
//!   destroys the incoming domain as unwanted), and keeps the pin until
//!   the migration failed (its reconciler then removes any leftover) or
//!   the placement reached this node with the new epoch (its reconciler
//!   then adopts the running domain);
//! - after a restart, pins are derived from the migration objects by the
//!   same rules, before the first pass (a pass waits for the first list);
//! - a fenced agent ignores pins: the fence destroys every guest, moving
//!   or not, and that fails the migration.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use basalt_api::{
    AdminClient, ApiError, Kind, Migration, MigrationPhase, MigrationStatus, Object, Placement,
    TrackedFlow, WatchEvent,
};
use futures::StreamExt as _;
use tokio::sync::Notify;

use crate::compute::{Compute, ComputeError, MigrateRequest, MigrationControl, MigrationProgress};
use crate::network::{NetworkAgent, TakeOver, take_over_endpoint};
use crate::storage::Volumes;

/// How long a pass waits for the first list of migrations.
const FIRST_LIST_WAIT: Duration = Duration::from_secs(10);
/// How often the agent re-examines migrations without a change.
const RESCAN: Duration = Duration::from_secs(1);
/// How often a running copy's progress is written.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How many compare-and-swap conflicts a status write retries.
const CAS_RETRIES: usize = 10;
/// How long the target waits for its datapath to hold the standby taps
/// before it says ready anyway (the switchover still moves the endpoints).
const STANDBY_WAIT: Duration = Duration::from_secs(20);
/// How long after a migration ended its single-copy disks' old copies are
/// looked for again (see [`clean_single_copies`]).
const CLEAN_WINDOW: Duration = Duration::from_secs(30);
/// How often an incoming VM's watcher looks at its migration's phase.
const INCOMING_POLL: Duration = Duration::from_millis(200);

/// The libvirt URI a source's libvirtd uses to reach the target node,
/// from the node's registered address (`host:port`, `[v6]:port` or a
/// bare host): `qemu+tcp://<host>/system`.
pub fn target_uri(node_address: &str) -> String {
    let host = if let Some(rest) = node_address.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match node_address.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
            _ => node_address,
        }
    };
    if host.contains(':') {
        format!("qemu+tcp://[{host}]/system")
    } else {
        format!("qemu+tcp://{host}/system")
    }
}

/// Which end of a migration this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The VM runs here and moves away.
    Source,
    /// The VM moves here.
    Target,
}

/// Why the reconciler leaves one VM alone. See the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The migration's uid.
    pub uid: String,
    /// This node's end.
    pub role: Role,
    /// The placement's epoch when the migration started.
    pub epoch: u64,
}

/// The pin a migration object implies for `node`, if any (how pins are
/// recovered after a restart).
pub fn derived_pin(node: &str, migration: &Migration) -> Option<Pin> {
    let status = &migration.status;
    use MigrationPhase::*;
    let role = if status.source == node && matches!(status.phase, Migrating | Switching | Succeeded)
    {
        Role::Source
    } else if status.target == node
        && matches!(
            status.phase,
            TargetReady | Migrating | Switching | Succeeded
        )
    {
        Role::Target
    } else {
        return None;
    };
    Some(Pin {
        uid: migration.meta.uid.clone(),
        role,
        epoch: status.epoch,
    })
}

/// Whether `pin` still holds, given the migration object of its VM (if
/// any), the VM's placement in the pass's snapshot, and whether a copy
/// (or recovery) runs here for it.
pub fn keep_pin(
    node: &str,
    pin: &Pin,
    migration: Option<&Migration>,
    placement: Option<&Placement>,
    working: bool,
) -> bool {
    if working {
        return true;
    }
    let Some(migration) = migration.filter(|m| m.meta.uid == pin.uid) else {
        return false;
    };
    let here = placement.is_some_and(|p| p.node == node);
    match migration.status.phase {
        MigrationPhase::Failed => false,
        MigrationPhase::Switching | MigrationPhase::Succeeded => match pin.role {
            // A placement that came back later (HA, a migration back)
            // has a newer epoch: the VM is this node's to run again.
            Role::Source => here && placement.is_some_and(|p| p.epoch == pin.epoch),
            Role::Target => !(here && placement.is_some_and(|p| p.epoch > pin.epoch)),
        },
        MigrationPhase::Pending
        | MigrationPhase::Preparing
        | MigrationPhase::TargetReady
        | MigrationPhase::Migrating => true,
    }
}

#[derive(Debug, Default)]
struct State {
    /// The first list has arrived.
    synced: bool,
    /// Every migration, by VM name.
    migrations: BTreeMap<String, Migration>,
    /// VM name → pin.
    pins: BTreeMap<String, Pin>,
    /// VM name → abort flag, while a copy or recovery runs here.
    workers: BTreeMap<String, Arc<AtomicBool>>,
    /// Uids of migrations this node has said `TargetReady` for.
    prepared: BTreeSet<String>,
    /// Uids of migrations to this node whose standby taps are up and
    /// watched for the activation.
    incoming: BTreeSet<String>,
    /// Uids of ended migrations naming this node whose single-copy disks
    /// were cleaned up here.
    cleaned: BTreeSet<String>,
}

#[derive(Debug)]
struct Inner {
    node: String,
    prefix: String,
    state: Mutex<State>,
    listed: Condvar,
    /// Held by a reconcile pass, and by a worker adding a pin.
    gate: Mutex<()>,
    /// This node's datapath, when the agent drives it.
    network: Option<NetworkAgent>,
    /// This node's storage, when the agent manages VM disks.
    volumes: OnceLock<Volumes>,
    /// Bumped at every list or watched change of the migrations, so other
    /// tasks (the replicas' loop) act on changes without listing.
    changes: tokio::sync::watch::Sender<u64>,
}

/// This agent's migration state, shared by the migration task and the
/// reconcile loop. See the module doc.
#[derive(Debug, Clone)]
pub struct MigrationAgent {
    inner: Arc<Inner>,
}

/// A pass could not learn which VMs are moving.
#[derive(Debug, thiserror::Error)]
#[error("live migrations not listed yet after {waited:?}; pass skipped")]
pub struct NotListed {
    /// How long the pass waited.
    pub waited: Duration,
}

fn unpoison<T>(result: std::sync::LockResult<T>) -> T {
    result.unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MigrationAgent {
    /// The migration state of node `node`, whose domains are named
    /// `prefix` + VM name; `network` is the node's datapath when the agent
    /// drives it (standby taps and the endpoint move on activation).
    pub fn new(node: &str, prefix: &str, network: Option<NetworkAgent>) -> Self {
        Self {
            inner: Arc::new(Inner {
                node: node.to_owned(),
                prefix: prefix.to_owned(),
                state: Mutex::new(State::default()),
                listed: Condvar::new(),
                gate: Mutex::new(()),
                network,
                volumes: OnceLock::new(),
                changes: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// A receiver that sees a change whenever the migrations were listed
    /// again or one of them changed (any migration in the cluster).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The migration of `vm` as last listed or watched, if any.
    pub fn migration(&self, vm: &str) -> Option<Migration> {
        self.state().migrations.get(vm).cloned()
    }

    /// Gives the target's prepare step this node's storage: an incoming
    /// VM's seed and replicated disks are then readied before
    /// `TargetReady` (see the module doc). Set once; a later call is
    /// ignored.
    pub fn set_volumes(&self, volumes: Volumes) {
        let _ = self.inner.volumes.set(volumes);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        unpoison(self.inner.state.lock())
    }

    fn domain(&self, vm: &str) -> String {
        format!("{}{vm}", self.inner.prefix)
    }

    /// Runs one reconcile pass `pass` with the domain names the
    /// reconciler must leave alone, computed from `placements` (the
    /// pass's snapshot of this node's placements, by VM). Blocking: call
    /// it from the pass's thread. A fenced pass leaves nothing alone.
    pub fn during_pass<T>(
        &self,
        placements: &BTreeMap<String, Placement>,
        fenced: bool,
        pass: impl FnOnce(BTreeSet<String>) -> Result<T, ComputeError>,
    ) -> Result<T, ComputeError> {
        let _gate = unpoison(self.inner.gate.lock());
        if fenced {
            return pass(BTreeSet::new());
        }
        let hands_off = {
            let mut state = self.state();
            if !state.synced {
                let started = Instant::now();
                state = unpoison(self.inner.listed.wait_timeout_while(
                    state,
                    FIRST_LIST_WAIT,
                    |s| !s.synced,
                ))
                .0;
                if !state.synced {
                    return Err(ComputeError::Hypervisor {
                        operation: "reconcile",
                        name: String::new(),
                        message: NotListed {
                            waited: started.elapsed(),
                        }
                        .to_string(),
                    });
                }
            }
            let node = self.inner.node.clone();
            let State {
                migrations,
                pins,
                workers,
                ..
            } = &mut *state;
            // Pins derived again here from ended migrations (kept until
            // replaced) usually go in the same pass: only the end of a pin
            // that held is worth a line in the log.
            let mut derived = BTreeSet::new();
            for (vm, migration) in migrations.iter() {
                if let Some(pin) = derived_pin(&node, migration)
                    && let std::collections::btree_map::Entry::Vacant(slot) = pins.entry(vm.clone())
                {
                    slot.insert(pin);
                    derived.insert(vm.clone());
                }
            }
            pins.retain(|vm, pin| {
                let keep = keep_pin(
                    &node,
                    pin,
                    migrations.get(vm),
                    placements.get(vm),
                    workers.contains_key(vm),
                );
                if !keep && !derived.contains(vm) {
                    tracing::info!(%vm, role = ?pin.role, "migration over: the reconciler takes the VM back");
                }
                keep
            });
            pins.keys().map(|vm| self.domain(vm)).collect()
        };
        pass(hands_off)
    }

    /// Pins `vm` (blocking: waits for a running pass to end).
    fn pin(&self, vm: &str, pin: Pin) {
        let _gate = unpoison(self.inner.gate.lock());
        self.state().pins.insert(vm.to_owned(), pin);
    }

    /// Records the migrations listed or watched, flags the copies whose
    /// migration failed or vanished for abort; a list (`reset`) also lets
    /// passes run ([`MigrationAgent::mark_synced`]).
    fn apply(&self, changes: impl IntoIterator<Item = (String, Option<Migration>)>, reset: bool) {
        self.record(changes, reset);
        if reset {
            self.mark_synced();
        }
    }

    /// Lets passes run: the migrations have been listed (and the standby
    /// of those coming here taken up again), so pins can be derived.
    fn mark_synced(&self) {
        let mut state = self.state();
        if !state.synced {
            state.synced = true;
            self.inner.listed.notify_all();
        }
    }

    /// [`MigrationAgent::apply`] without letting passes run.
    fn record(&self, changes: impl IntoIterator<Item = (String, Option<Migration>)>, reset: bool) {
        let mut state = self.state();
        if reset {
            state.migrations.clear();
        }
        for (vm, migration) in changes {
            match migration {
                Some(m) => state.migrations.insert(vm, m),
                None => state.migrations.remove(&vm),
            };
        }
        let State {
            migrations,
            workers,
            ..
        } = &mut *state;
        for (vm, abort) in workers.iter() {
            let over = migrations
                .get(vm)
                .is_none_or(|m| m.status.phase == MigrationPhase::Failed);
            if over && !abort.swap(true, Ordering::SeqCst) {
                tracing::warn!(%vm, "the migration was failed or removed: aborting the copy");
            }
        }
        drop(state);
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Follows the migration objects and acts on those that concern this
/// node, until aborted. `trigger` wakes the reconcile loop after a change.
pub async fn run<C: Compute + 'static>(
    agent: MigrationAgent,
    admin: AdminClient,
    compute: Arc<C>,
    trigger: Arc<Notify>,
) {
    loop {
        if let Err(err) = follow(&agent, &admin, &compute, &trigger).await {
            tracing::warn!(error = %err, "migration watch broke; listing again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow<C: Compute + 'static>(
    agent: &MigrationAgent,
    admin: &AdminClient,
    compute: &Arc<C>,
    trigger: &Notify,
) -> Result<(), ApiError> {
    let list = admin.list(Kind::Migration).await?;
    let listed = list.objects.into_iter().filter_map(|o| match o {
        Object::Migration(m) => Some((m.spec.vm.clone(), Some(m))),
        _ => None,
    });
    agent.record(listed, true);
    // Before the first pass: a restarted target's standby taps are this
    // node's datapath's again before the pass names the taps it keeps, so
    // the taps of a guest still arriving are never removed as unused.
    resume_incoming(agent, admin).await;
    agent.mark_synced();
    trigger.notify_one();
    drive(agent, admin, compute).await;
    let mut events = admin
        .watch(Some(Kind::Migration), list.resource_version)
        .await?;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = tokio::time::sleep(RESCAN) => {
                drive(agent, admin, compute).await;
                continue;
            }
        };
        let Some(event) = event else {
            return Ok(());
        };
        let change = match event? {
            WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. } => {
                match object {
                    Object::Migration(m) => (m.spec.vm.clone(), Some(m)),
                    _ => continue,
                }
            }
            WatchEvent::Deleted { object, .. } => match object {
                Object::Migration(m) => (m.spec.vm.clone(), None),
                _ => continue,
            },
            WatchEvent::Bookmark { .. } => continue,
        };
        agent.apply([change], false);
        trigger.notify_one();
        drive(agent, admin, compute).await;
    }
}

/// Takes this node's next step in every migration that waits for it.
async fn drive<C: Compute + 'static>(
    agent: &MigrationAgent,
    admin: &AdminClient,
    compute: &Arc<C>,
) {
    let node = agent.inner.node.clone();
    let todo: Vec<Migration> = {
        let state = agent.state();
        state
            .migrations
            .values()
            .filter(|m| !state.workers.contains_key(&m.spec.vm))
            .filter(|m| match m.status.phase {
                MigrationPhase::Preparing => {
                    m.status.target == node && !state.prepared.contains(&m.meta.uid)
                }
                MigrationPhase::TargetReady | MigrationPhase::Migrating => m.status.source == node,
                _ => false,
            })
            .cloned()
            .collect()
    };
    resume_incoming(agent, admin).await;
    if let Some(volumes) = agent.inner.volumes.get() {
        let ended: Vec<Migration> = {
            let state = agent.state();
            state
                .migrations
                .values()
                .filter(|m| {
                    m.status.phase.is_terminal()
                        && (m.status.source == node || m.status.target == node)
                        && !state.cleaned.contains(&m.meta.uid)
                })
                .cloned()
                .collect()
        };
        for migration in ended {
            // Again every rescan for a while: a reconcile pass whose
            // placements still showed the VM here may have made its disk
            // again just after it was deleted.
            let settled = now_unix_ms()
                > migration
                    .status
                    .finished_at_unix_ms
                    .saturating_add(CLEAN_WINDOW.as_millis() as u64);
            if clean_single_copies(volumes, admin, &node, &migration.spec.vm).await && settled {
                agent.state().cleaned.insert(migration.meta.uid.clone());
            }
        }
    }
    for migration in todo {
        let result = match migration.status.phase {
            MigrationPhase::Preparing => prepare(agent, admin, &migration).await,
            MigrationPhase::TargetReady => start_copy(agent, admin, compute, &migration).await,
            _ => {
                start_recovery(agent, admin, compute, &migration);
                Ok(())
            }
        };
        if let Err(err) = result {
            tracing::warn!(vm = %migration.spec.vm, error = %err, "migration step failed; will retry");
        }
    }
}

/// A target whose agent restarted mid-copy takes the standby up again:
/// the incoming VM's taps are made (or kept) and watched for the
/// activation, without waiting for the datapath to hold them.
async fn resume_incoming(agent: &MigrationAgent, admin: &AdminClient) {
    if agent.inner.network.is_none() {
        return;
    }
    let node = agent.inner.node.as_str();
    let resume: Vec<Migration> = {
        let state = agent.state();
        state
            .migrations
            .values()
            .filter(|m| {
                m.status.target == node
                    && matches!(
                        m.status.phase,
                        MigrationPhase::TargetReady
                            | MigrationPhase::Migrating
                            | MigrationPhase::Switching
                    )
                    && !state.incoming.contains(&m.meta.uid)
            })
            .cloned()
            .collect()
    };
    for migration in resume {
        if let Err(err) = start_incoming(agent, admin, &migration, false).await {
            tracing::warn!(vm = %migration.spec.vm, error = %err, "could not take the standby up again; the switchover will move the endpoints");
        }
    }
}

/// The target's step: pin, prepare, say ready.
async fn prepare(
    agent: &MigrationAgent,
    admin: &AdminClient,
    migration: &Migration,
) -> Result<(), ApiError> {
    let vm = migration.spec.vm.clone();
    let pin = Pin {
        uid: migration.meta.uid.clone(),
        role: Role::Target,
        epoch: migration.status.epoch,
    };
    pin_blocking(agent, &vm, pin).await;
    // The VM's storage: its seed, its replicated disks a second primary.
    if let Some(volumes) = agent.inner.volumes.get() {
        match prepare_storage(volumes, admin, migration).await {
            Ok(()) => {}
            Err(StorageStep::Wait(reason)) => {
                tracing::info!(%vm, %reason, "the VM's storage is not ready here yet; retrying");
                return Ok(());
            }
            Err(StorageStep::Refused(reason)) => {
                let message = format!("the target could not prepare the VM's storage: {reason}");
                tracing::warn!(%vm, %message, "preparing failed");
                fail(admin, migration, &message).await?;
                return Ok(());
            }
        }
    }
    // The VM's disks are NBD exports at the same address on every node.
    // Its NICs: the standby taps the incoming domain will open (without
    // the agent's network, libvirt makes them).
    if let Err(err) = start_incoming(agent, admin, migration, true).await {
        let message = format!("the target could not prepare the VM's network: {err}");
        tracing::warn!(%vm, %message, "preparing failed");
        fail(admin, migration, &message).await?;
        return Ok(());
    }
    let moved = transition(admin, migration, &[MigrationPhase::Preparing], |status| {
        status.phase = MigrationPhase::TargetReady;
        status.message = "the target is ready".into();
    })
    .await?;
    if moved {
        tracing::info!(%vm, source = %migration.status.source, "ready to receive the VM");
    }
    agent.state().prepared.insert(migration.meta.uid.clone());
    Ok(())
}

/// How the target's storage step ended short of ready.
#[derive(Debug)]
enum StorageStep {
    /// Not yet: try again on the next rescan.
    Wait(String),
    /// Never: the migration fails with this reason.
    Refused(String),
}

/// Reads the incoming VM and its placement and readies this node's
/// storage for it ([`Volumes::prepare_incoming`]).
async fn prepare_storage(
    volumes: &Volumes,
    admin: &AdminClient,
    migration: &Migration,
) -> Result<(), StorageStep> {
    let vm_name = &migration.spec.vm;
    let read = |kind: Kind, err: ApiError| match err {
        ApiError::NotFound { .. } => {
            StorageStep::Refused(format!("{kind} {vm_name} does not exist"))
        }
        err => StorageStep::Wait(format!("reading {kind} {vm_name}: {}", error_chain(&err))),
    };
    let vm = match admin.get(Kind::Vm, vm_name).await {
        Ok(Object::Vm(vm)) => vm,
        Ok(_) => {
            return Err(StorageStep::Wait(
                "the control plane returned another kind".into(),
            ));
        }
        Err(err) => return Err(read(Kind::Vm, err)),
    };
    let placement = match admin.get(Kind::Placement, vm_name).await {
        Ok(Object::Placement(p)) => p,
        Ok(_) => {
            return Err(StorageStep::Wait(
                "the control plane returned another kind".into(),
            ));
        }
        Err(err) => return Err(read(Kind::Placement, err)),
    };
    prepare_single_copies(volumes, &vm).await?;
    volumes
        .prepare_incoming(&vm, &placement, migration)
        .await
        .map_err(|err| {
            let reason = error_chain(&err);
            if err.is_transient() || err.is_pending() {
                StorageStep::Wait(reason)
            } else {
                StorageStep::Refused(reason)
            }
        })
}

/// The VM's disks with a single copy, with their guest devices: they
/// live in one node's pool only, so a live move copies their contents
/// (the hypervisor's storage migration) into a fresh volume on the target.
pub fn single_copy_disks(vm: &basalt_api::Vm) -> Vec<(&basalt_api::Disk, String)> {
    vm.spec
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !crate::storage::replicas::is_replicated(d))
        .filter_map(|(i, d)| Some((d, crate::vm_domain::disk_dev(i)?)))
        .collect()
}

/// The target's step for disks with a single copy: a fresh, empty volume
/// of the disk's size, which the incoming QEMU opens at the same NBD
/// address and the source's hypervisor fills. A volume of that name left
/// here by an earlier stay is not the VM's disk (the running guest's is on
/// the source): it is replaced.
async fn prepare_single_copies(volumes: &Volumes, vm: &basalt_api::Vm) -> Result<(), StorageStep> {
    let storage = volumes.storage();
    for (disk, _) in single_copy_disks(vm) {
        let name = disk.storage_name(&vm.meta.uid);
        let failed = |step: &str, err: ApiError| {
            let reason = format!(
                "{step} volume {name} for disk {:?}: {}",
                disk.name,
                error_chain(&err)
            );
            match err {
                ApiError::Unavailable { .. } => StorageStep::Wait(reason),
                _ => StorageStep::Refused(reason),
            }
        };
        storage
            .delete_volume(&name)
            .await
            .map_err(|e| failed("removing an old", e))?;
        storage
            .ensure_volume(basalt_api::EnsureVolume {
                name: name.clone(),
                size_bytes: disk.size_bytes,
                source: None,
            })
            .await
            .map_err(|e| failed("making the", e))?;
    }
    Ok(())
}

/// After a migration naming this node ended, deletes this node's copies of
/// the VM's single-copy disks if the VM is placed elsewhere: the source's
/// after a move (the disk now lives on the target), the target's after a
/// failed one (a partial copy). Nothing while the VM is placed here or
/// when it cannot be read. Idempotent: called again every rescan for
/// [`CLEAN_WINDOW`] after the end, since a reconcile pass that had not yet
/// seen the placement leave may make the volume again once. True when
/// there is nothing (more) to do.
async fn clean_single_copies(
    volumes: &Volumes,
    admin: &AdminClient,
    node: &str,
    vm_name: &str,
) -> bool {
    let vm = match admin.get(Kind::Vm, vm_name).await {
        Ok(Object::Vm(vm)) => vm,
        Err(ApiError::NotFound { .. }) => return true,
        _ => return false,
    };
    let placed_here = match admin.get(Kind::Placement, vm_name).await {
        Ok(Object::Placement(p)) => p.node == node,
        Err(ApiError::NotFound { .. }) => return true,
        _ => return false,
    };
    if placed_here {
        return true;
    }
    let mut done = true;
    for (disk, _) in single_copy_disks(&vm) {
        let name = disk.storage_name(&vm.meta.uid);
        match volumes.storage().delete_volume(&name).await {
            Ok(true) => {
                tracing::info!(vm = %vm_name, volume = %name, "deleted this node's copy of a single-copy disk: the VM runs elsewhere");
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(vm = %vm_name, volume = %name, error = %err, "could not delete a single-copy disk's old copy; retrying");
                done = false;
            }
        }
    }
    done
}

/// Why the target could not prepare an incoming VM's network.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The VM object could not be read.
    #[error("could not read VM {vm:?}")]
    Vm {
        /// The VM's name.
        vm: String,
        /// Why.
        #[source]
        source: ApiError,
    },
    /// A standby tap could not be made.
    #[error(transparent)]
    Tap(#[from] crate::network::StandbyTapError),
    /// The blocking task making the taps panicked.
    #[error("making the standby taps of VM {vm:?} panicked")]
    Panicked {
        /// The VM's name.
        vm: String,
    },
}

/// The target's network side of an incoming VM (a no-op without the
/// agent's network, or when already done): makes its taps in standby,
/// waits (bounded) until the datapath holds them — before returning when
/// `wait_in_datapath` (the target says ready only then), else in the
/// background — and watches for the activation until the migration ends.
/// See the module doc.
async fn start_incoming(
    agent: &MigrationAgent,
    admin: &AdminClient,
    migration: &Migration,
    wait_in_datapath: bool,
) -> Result<(), IncomingError> {
    let Some(network) = agent.inner.network.clone() else {
        return Ok(());
    };
    if agent.state().incoming.contains(&migration.meta.uid) {
        return Ok(());
    }
    let name = migration.spec.vm.clone();
    let vm = match admin.get(Kind::Vm, &name).await {
        Ok(Object::Vm(vm)) => vm,
        Ok(_) => {
            return Err(IncomingError::Vm {
                vm: name,
                source: ApiError::invalid("kind", "not a VM"),
            });
        }
        Err(source) => return Err(IncomingError::Vm { vm: name, source }),
    };
    // Subscribed before the taps exist: no activation can be missed.
    let activations = network.activations();
    let made = {
        let (network, vm) = (network.clone(), vm.clone());
        tokio::task::spawn_blocking(move || network.prepare_incoming(&vm)).await
    };
    let taps = match made {
        Ok(Ok(taps)) => taps,
        Ok(Err(err)) => {
            network.finish_incoming(&vm.meta.uid, true);
            return Err(err.into());
        }
        Err(_) => {
            network.finish_incoming(&vm.meta.uid, true);
            return Err(IncomingError::Panicked { vm: name });
        }
    };
    if wait_in_datapath {
        wait_standby(&network, &name, &taps).await;
    }
    agent.state().incoming.insert(migration.meta.uid.clone());
    let (agent, admin, migration) = (agent.clone(), admin.clone(), migration.clone());
    tokio::spawn(async move {
        if !wait_in_datapath {
            wait_standby(&network, &migration.spec.vm, &taps).await;
        }
        watch_incoming(
            &agent,
            &admin,
            &network,
            &migration,
            &vm,
            &taps,
            activations,
        )
        .await;
    });
    Ok(())
}

/// Waits (at most [`STANDBY_WAIT`]) until the datapath holds `taps`.
async fn wait_standby(network: &NetworkAgent, vm: &str, taps: &[String]) {
    let started = Instant::now();
    while !network.taps_ready(taps) {
        if started.elapsed() > STANDBY_WAIT {
            tracing::warn!(%vm, ?taps, "the standby taps are not in the datapath yet; an activation may go unseen");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(%vm, ?taps, "standby taps ready for the incoming guest");
}

/// How a migration to this node stands, for its incoming watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Incoming {
    /// Still under way.
    Running,
    /// Succeeded: the placement follows.
    Succeeded,
    /// Failed, removed or replaced by another migration.
    Over,
}

/// How the migration stands now, and the flows its source has carried.
fn incoming_now(agent: &MigrationAgent, migration: &Migration) -> (Incoming, Vec<TrackedFlow>) {
    let state = agent.state();
    match state.migrations.get(&migration.spec.vm) {
        Some(m) if m.meta.uid == migration.meta.uid => {
            let phase = match m.status.phase {
                MigrationPhase::Succeeded => Incoming::Succeeded,
                MigrationPhase::Failed => Incoming::Over,
                _ => Incoming::Running,
            };
            (phase, m.status.flows.clone())
        }
        _ => (Incoming::Over, Vec::new()),
    }
}

/// The open flows of VM `vm` on this node, to carry to a migration's
/// target; `None` without the agent's network (the status keeps what it
/// has).
async fn flows_of(network: Option<&NetworkAgent>, vm: &str) -> Option<Vec<TrackedFlow>> {
    let (network, vm) = (network?.clone(), vm.to_owned());
    tokio::task::spawn_blocking(move || network.export_flows(&vm))
        .await
        .ok()
}

/// Waits for the incoming guest's activation (then moves its endpoints
/// here) and for the migration's end (then ends the standby).
async fn watch_incoming(
    agent: &MigrationAgent,
    admin: &AdminClient,
    network: &NetworkAgent,
    migration: &Migration,
    vm: &basalt_api::Vm,
    taps: &[String],
    mut activations: tokio::sync::broadcast::Receiver<crate::network::Activation>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let name = migration.spec.vm.as_str();
    let mut activated = false;
    let mut carried: BTreeSet<TrackedFlow> = BTreeSet::new();
    let outcome = loop {
        let (phase, flows) = incoming_now(agent, migration);
        // The VM's open flows, as the source reports them while it
        // copies: tracked here before the guest resumes, so a policy that
        // selects it keeps them open.
        let new: Vec<TrackedFlow> = flows
            .into_iter()
            .filter(|flow| carried.insert(*flow))
            .collect();
        if !new.is_empty() {
            tracing::debug!(vm = %name, flows = new.len(), "tracking the incoming VM's open flows");
            network.import_flows(&new);
        }
        // Succeeded without an activation seen (the fallback) is fine too:
        // the controller's switchover has moved the endpoints.
        if phase != Incoming::Running {
            break phase;
        }
        tokio::select! {
            event = activations.recv(), if !activated => match event {
                Ok(activation) if taps.contains(&activation.tap) => {
                    activated = true;
                    tracing::info!(vm = %name, tap = %activation.tap, "activation: the guest runs here; moving its endpoints");
                    take_over(agent, admin, network, migration, vm, &activation.endpoint).await;
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(vm = %name, missed, "activations were missed; the switchover moves the endpoints if this one was");
                }
                Err(RecvError::Closed) => activated = true,
            },
            () = tokio::time::sleep(INCOMING_POLL) => {}
        }
    };
    let failed = outcome == Incoming::Over;
    network.finish_incoming(&vm.meta.uid, failed);
    agent.state().incoming.remove(&migration.meta.uid);
    tracing::info!(vm = %name, failed, activated, "the incoming migration ended; standby over");
}

/// Moves the VM's endpoints to this node at the migration's epoch + 1:
/// `first` (the activated NIC's) at once in this node's datapath, then
/// every one of the VM's endpoints in the datapath and in the control
/// plane.
async fn take_over(
    agent: &MigrationAgent,
    admin: &AdminClient,
    network: &NetworkAgent,
    migration: &Migration,
    vm: &basalt_api::Vm,
    first: &str,
) {
    let node = agent.inner.node.as_str();
    let epoch = migration.status.epoch + 1;
    let uid = vm.meta.uid.as_str();
    network.claim(first, uid, epoch);
    let names: Vec<String> = match admin.list(Kind::Endpoint).await {
        Ok(list) => list
            .objects
            .into_iter()
            .filter_map(|o| match o {
                Object::Endpoint(e) if e.vm_uid == uid && e.release_at_unix_ms == 0 => {
                    Some(e.meta.name)
                }
                _ => None,
            })
            .collect(),
        Err(err) => {
            tracing::warn!(vm = %vm.meta.name, error = %err, "could not list the VM's endpoints; moving the activated one only");
            vec![first.to_owned()]
        }
    };
    for name in &names {
        network.claim(name, uid, epoch);
    }
    for name in names {
        match take_over_endpoint(admin, &name, node, epoch).await {
            Ok(TakeOver::Owned(_)) => {
                tracing::info!(vm = %vm.meta.name, endpoint = %name, epoch, "endpoint moved here on activation");
            }
            Ok(TakeOver::Superseded(e)) => {
                tracing::warn!(vm = %vm.meta.name, endpoint = %name, node = %e.node, epoch = e.epoch, "the endpoint moved on since; left alone");
            }
            Err(err) => {
                tracing::warn!(vm = %vm.meta.name, endpoint = %name, error = %err, "could not move the endpoint; the switchover will");
            }
        }
    }
}

async fn pin_blocking(agent: &MigrationAgent, vm: &str, pin: Pin) {
    let (agent, vm) = (agent.clone(), vm.to_owned());
    if let Err(err) = tokio::task::spawn_blocking(move || agent.pin(&vm, pin)).await {
        tracing::error!(error = %err, "pinning a VM panicked");
    }
}

/// The source's step: pin, say `Migrating`, copy in the background.
async fn start_copy<C: Compute + 'static>(
    agent: &MigrationAgent,
    admin: &AdminClient,
    compute: &Arc<C>,
    migration: &Migration,
) -> Result<(), ApiError> {
    let vm = migration.spec.vm.clone();
    let domain = agent.domain(&vm);
    let target = match admin.get(Kind::Node, &migration.status.target).await? {
        Object::Node(node) => target_uri(&node.spec.address),
        _ => return Ok(()),
    };
    // Disks with a single copy travel with the guest (storage migration
    // into the fresh volume the target made).
    let copy_disks: Vec<String> = match admin.get(Kind::Vm, &vm).await? {
        Object::Vm(v) => single_copy_disks(&v)
            .into_iter()
            .map(|(_, dev)| dev)
            .collect(),
        _ => return Ok(()),
    };
    let abort = Arc::new(AtomicBool::new(false));
    agent.state().workers.insert(vm.clone(), abort.clone());
    let pin = Pin {
        uid: migration.meta.uid.clone(),
        role: Role::Source,
        epoch: migration.status.epoch,
    };
    pin_blocking(agent, &vm, pin).await;
    let flows = flows_of(agent.inner.network.as_ref(), &vm).await;
    let started = transition(admin, migration, &[MigrationPhase::TargetReady], |status| {
        status.phase = MigrationPhase::Migrating;
        status.message = format!("copying to {}", status.target);
        if let Some(flows) = &flows {
            status.flows.clone_from(flows);
        }
    })
    .await;
    match started {
        Ok(true) => {}
        other => {
            // Someone else moved it on (failed it); the pin goes with the
            // next pass's rules.
            agent.state().workers.remove(&vm);
            return other.map(drop);
        }
    }
    tracing::info!(%vm, target = %migration.status.target, uri = %target, "live migration starts");
    let request = MigrateRequest {
        target_uri: target,
        allow_post_copy: migration.spec.post_copy,
        bandwidth_mib_s: (migration.spec.bandwidth_mib_s > 0)
            .then(|| u64::from(migration.spec.bandwidth_mib_s)),
        copy_disks,
    };
    let (agent, admin, compute, migration) = (
        agent.clone(),
        admin.clone(),
        compute.clone(),
        migration.clone(),
    );
    tokio::spawn(async move {
        let network = agent.inner.network.clone();
        copy(
            &admin, compute, network, &migration, &domain, request, abort,
        )
        .await;
        agent.state().workers.remove(&migration.spec.vm);
    });
    Ok(())
}

/// Runs the copy and reports it (with the VM's open flows, carried to the
/// target); ends with `Switching` or `Failed`.
async fn copy<C: Compute + 'static>(
    admin: &AdminClient,
    compute: Arc<C>,
    network: Option<NetworkAgent>,
    migration: &Migration,
    domain: &str,
    request: MigrateRequest,
    abort: Arc<AtomicBool>,
) {
    let vm = migration.spec.vm.clone();
    let timeout = migration.spec.timeout();
    let post_copy = migration.spec.post_copy;
    let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(MigrationProgress::default());
    let timed_out = Arc::new(AtomicBool::new(false));
    let copier = {
        let (domain, timed_out) = (domain.to_owned(), timed_out.clone());
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            compute.migrate(&domain, &request, &mut |progress| {
                progress_tx.send_replace(*progress);
                if abort.load(Ordering::SeqCst) {
                    return MigrationControl::Abort;
                }
                if started.elapsed() > timeout && !progress.post_copy {
                    timed_out.store(true, Ordering::SeqCst);
                    return if post_copy {
                        MigrationControl::PostCopy
                    } else {
                        MigrationControl::Abort
                    };
                }
                MigrationControl::Continue
            })
        })
    };
    tokio::pin!(copier);
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            result = &mut copier => break result,
            _ = ticker.tick() => {
                if !progress_rx.has_changed().unwrap_or(false) {
                    continue;
                }
                let p = *progress_rx.borrow_and_update();
                let flows = flows_of(network.as_ref(), &vm).await;
                let report = transition(admin, migration, &[MigrationPhase::Migrating], |status| {
                    if let Some(flows) = &flows {
                        status.flows.clone_from(flows);
                    }
                    status.data_total = p.data_total;
                    status.data_processed = p.data_processed;
                    status.data_remaining = p.data_remaining;
                    status.post_copy_active = p.post_copy;
                    if p.post_copy {
                        status.message = format!("post-copy to {}", status.target);
                    }
                })
                .await;
                if let Err(err) = report {
                    tracing::debug!(%vm, error = %err, "progress report failed");
                }
            }
        }
    };
    let last = *progress_rx.borrow();
    let outcome = match result {
        Ok(Ok(())) => {
            tracing::info!(%vm, target = %migration.status.target, "live migration copied; the VM runs on the target");
            // The last word on the flows: those opened since the last
            // progress report, up to the guest's pause.
            let flows = flows_of(network.as_ref(), &vm).await;
            transition(admin, migration, &[MigrationPhase::Migrating], |status| {
                if let Some(flows) = &flows {
                    status.flows.clone_from(flows);
                }
                status.phase = MigrationPhase::Switching;
                status.message = format!("runs on {}; the placement moves next", status.target);
                status.data_total = last.data_total;
                status.data_processed = last.data_total;
                status.data_remaining = 0;
                status.post_copy_active = last.post_copy;
            })
            .await
        }
        Ok(Err(err)) => {
            let message = if timed_out.load(Ordering::SeqCst) {
                format!(
                    "did not converge within {} s: aborted; the VM stays on {}",
                    timeout.as_secs(),
                    migration.status.source
                )
            } else {
                format!(
                    "{}; the VM stays on {}",
                    error_chain(&err),
                    migration.status.source
                )
            };
            tracing::warn!(%vm, %message, "live migration failed");
            fail(admin, migration, &message).await
        }
        Err(err) => {
            tracing::error!(%vm, error = %err, "the migration thread panicked");
            fail(admin, migration, "the copy panicked").await
        }
    };
    if let Err(err) = outcome {
        // The object is left in `Migrating`: a later scan recovers it
        // from what the hypervisor shows.
        tracing::warn!(%vm, error = %err, "could not record the migration's end");
    }
}

async fn fail(admin: &AdminClient, migration: &Migration, message: &str) -> Result<bool, ApiError> {
    transition(
        admin,
        migration,
        &[
            MigrationPhase::Preparing,
            MigrationPhase::TargetReady,
            MigrationPhase::Migrating,
        ],
        |status| {
            status.phase = MigrationPhase::Failed;
            status.message = message.to_owned();
            status.finished_at_unix_ms = now_unix_ms();
        },
    )
    .await
}

/// A source that restarted mid-copy: wait for libvirt's verdict (see the
/// module doc).
fn start_recovery<C: Compute + 'static>(
    agent: &MigrationAgent,
    admin: &AdminClient,
    compute: &Arc<C>,
    migration: &Migration,
) {
    let vm = migration.spec.vm.clone();
    let abort = Arc::new(AtomicBool::new(false));
    agent.state().workers.insert(vm.clone(), abort.clone());
    tracing::warn!(%vm, "a copy was under way when this agent started: waiting for libvirt's verdict");
    let (agent, admin, compute, migration) = (
        agent.clone(),
        admin.clone(),
        compute.clone(),
        migration.clone(),
    );
    tokio::spawn(async move {
        let domain = agent.domain(&vm);
        let deadline = Instant::now() + migration.spec.timeout() + Duration::from_secs(30);
        let outcome = loop {
            // The migration ended meanwhile (failed or removed): nothing
            // to recover. Also how a copy that failed just before this
            // agent's watch said so ends here: its worker was gone while
            // the object still read `Migrating`, and a recovery kept the
            // VM pinned until the deadline.
            if abort.load(Ordering::SeqCst) {
                break Ok(false);
            }
            let status = {
                let (compute, domain) = (compute.clone(), domain.clone());
                tokio::task::spawn_blocking(move || compute.status(&domain)).await
            };
            match status {
                Ok(Ok(None)) => {
                    break transition(&admin, &migration, &[MigrationPhase::Migrating], |s| {
                        s.phase = MigrationPhase::Switching;
                        s.message = format!("runs on {}; the placement moves next", s.target);
                        s.data_remaining = 0;
                    })
                    .await;
                }
                Ok(Ok(Some(_))) if Instant::now() > deadline => {
                    break fail(
                        &admin,
                        &migration,
                        &format!(
                            "the copy was interrupted by an agent restart; the VM stays on {}",
                            migration.status.source
                        ),
                    )
                    .await;
                }
                Ok(Ok(Some(_))) => {}
                Ok(Err(err)) => tracing::debug!(%vm, error = %err, "status failed during recovery"),
                Err(err) => tracing::error!(%vm, error = %err, "status panicked during recovery"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        if let Err(err) = outcome {
            tracing::warn!(%vm, error = %err, "could not record the recovered migration");
        }
        agent.state().workers.remove(&vm);
    });
}

/// Rewrites `migration`'s status with `change` if it is still the same
/// migration in one of the phases `from` (re-reading after each
/// compare-and-swap conflict). `Ok(false)`: it is not (anymore).
async fn transition(
    admin: &AdminClient,
    migration: &Migration,
    from: &[MigrationPhase],
    change: impl Fn(&mut MigrationStatus),
) -> Result<bool, ApiError> {
    for _ in 0..CAS_RETRIES {
        let current = match admin.get(Kind::Migration, &migration.meta.name).await {
            Ok(Object::Migration(m)) => m,
            Ok(_) | Err(ApiError::NotFound { .. }) => return Ok(false),
            Err(err) => return Err(err),
        };
        if current.meta.uid != migration.meta.uid || !from.contains(&current.status.phase) {
            return Ok(false);
        }
        let mut next = current;
        change(&mut next.status);
        match admin.update(Object::Migration(next)).await {
            Ok(_) => return Ok(true),
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => return Err(err),
        }
    }
    Err(ApiError::Unavailable {
        reason: format!(
            "migration {}: {CAS_RETRIES} conflicting writes in a row",
            migration.meta.name
        ),
    })
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use basalt_api::{MigrationSpec, ObjectMeta};

    use super::*;

    #[test]
    fn the_target_uri_is_the_nodes_host() {
        assert_eq!(target_uri("10.0.0.2:7500"), "qemu+tcp://10.0.0.2/system");
        assert_eq!(target_uri("10.0.0.2"), "qemu+tcp://10.0.0.2/system");
        assert_eq!(target_uri("node-2:7500"), "qemu+tcp://node-2/system");
        assert_eq!(target_uri("[fd00::2]:7500"), "qemu+tcp://[fd00::2]/system");
        assert_eq!(target_uri("fd00::2"), "qemu+tcp://[fd00::2]/system");
    }

    fn migration(phase: MigrationPhase) -> Migration {
        let mut meta = ObjectMeta::named("web");
        meta.uid = "m-1".into();
        Migration {
            meta,
            spec: MigrationSpec {
                vm: "web".into(),
                ..MigrationSpec::default()
            },
            status: MigrationStatus {
                phase,
                source: "n1".into(),
                target: "n2".into(),
                epoch: 4,
                ..MigrationStatus::default()
            },
        }
    }

    fn placement(node: &str, epoch: u64) -> Placement {
        Placement {
            meta: ObjectMeta::named("web"),
            vm: "web".into(),
            node: node.into(),
            epoch,
            ..Placement::default()
        }
    }

    fn pin(role: Role) -> Pin {
        Pin {
            uid: "m-1".into(),
            role,
            epoch: 4,
        }
    }

    #[test]
    fn the_source_keeps_its_hands_off_until_the_placement_leaves_or_the_migration_fails() {
        let source = pin(Role::Source);
        let here = placement("n1", 4);
        let moved = placement("n2", 5);
        for phase in [
            MigrationPhase::TargetReady,
            MigrationPhase::Migrating,
            MigrationPhase::Switching,
            MigrationPhase::Succeeded,
        ] {
            let m = migration(phase);
            assert!(
                keep_pin("n1", &source, Some(&m), Some(&here), false),
                "{phase}"
            );
        }
        let done = migration(MigrationPhase::Succeeded);
        assert!(!keep_pin("n1", &source, Some(&done), Some(&moved), false));
        assert!(!keep_pin("n1", &source, Some(&done), None, false));
        // The VM came back later (HA off the target, epoch 6): it is this
        // node's to run again, though the old migration object is kept.
        let back = placement("n1", 6);
        assert!(!keep_pin("n1", &source, Some(&done), Some(&back), false));
        let failed = migration(MigrationPhase::Failed);
        assert!(!keep_pin("n1", &source, Some(&failed), Some(&here), false));
        // A copy still running keeps it whatever the object says.
        assert!(keep_pin("n1", &source, Some(&failed), Some(&here), true));
        assert!(keep_pin("n1", &source, None, Some(&here), true));
        // Another migration of the same VM (a new uid) is not this pin's.
        let mut other = migration(MigrationPhase::Migrating);
        other.meta.uid = "m-2".into();
        assert!(!keep_pin("n1", &source, Some(&other), Some(&here), false));
    }

    #[test]
    fn the_target_keeps_its_hands_off_until_the_placement_arrives_with_the_new_epoch() {
        let target = pin(Role::Target);
        let away = placement("n1", 4);
        let arrived = placement("n2", 5);
        for phase in [
            MigrationPhase::TargetReady,
            MigrationPhase::Migrating,
            MigrationPhase::Switching,
            MigrationPhase::Succeeded,
        ] {
            let m = migration(phase);
            assert!(
                keep_pin("n2", &target, Some(&m), Some(&away), false),
                "{phase}"
            );
            assert!(keep_pin("n2", &target, Some(&m), None, false), "{phase}");
        }
        let done = migration(MigrationPhase::Succeeded);
        assert!(!keep_pin("n2", &target, Some(&done), Some(&arrived), false));
        // An old placement on this node (epoch not newer) does not count.
        assert!(keep_pin(
            "n2",
            &target,
            Some(&done),
            Some(&placement("n2", 4)),
            false
        ));
        let failed = migration(MigrationPhase::Failed);
        assert!(!keep_pin("n2", &target, Some(&failed), Some(&away), false));
        assert!(!keep_pin("n2", &target, None, Some(&away), false));
    }

    #[test]
    fn pins_are_derived_from_the_objects_after_a_restart() {
        assert_eq!(
            derived_pin("n1", &migration(MigrationPhase::Preparing)),
            None
        );
        assert_eq!(
            derived_pin("n1", &migration(MigrationPhase::TargetReady)),
            None
        );
        assert_eq!(
            derived_pin("n1", &migration(MigrationPhase::Migrating)).map(|p| p.role),
            Some(Role::Source)
        );
        assert_eq!(
            derived_pin("n2", &migration(MigrationPhase::TargetReady)).map(|p| p.role),
            Some(Role::Target)
        );
        assert_eq!(
            derived_pin("n2", &migration(MigrationPhase::Preparing)),
            None
        );
        assert_eq!(
            derived_pin("n3", &migration(MigrationPhase::Migrating)),
            None
        );
        assert_eq!(derived_pin("n1", &migration(MigrationPhase::Failed)), None);
    }

    #[test]
    fn a_pass_leaves_pinned_domains_alone_and_a_fenced_one_nothing() {
        let agent = MigrationAgent::new("n1", "basalt-", None);
        agent.apply(
            [("web".to_owned(), Some(migration(MigrationPhase::Migrating)))],
            true,
        );
        let placements: BTreeMap<String, Placement> =
            [("web".to_owned(), placement("n1", 4))].into();
        let hands_off = agent
            .during_pass(&placements, false, Ok::<_, ComputeError>)
            .unwrap();
        assert_eq!(hands_off, BTreeSet::from(["basalt-web".to_owned()]));
        let fenced = agent
            .during_pass(&placements, true, Ok::<_, ComputeError>)
            .unwrap();
        assert!(fenced.is_empty());
        // The migration failed: the reconciler takes the VM back.
        agent.apply(
            [("web".to_owned(), Some(migration(MigrationPhase::Failed)))],
            false,
        );
        let hands_off = agent
            .during_pass(&placements, false, Ok::<_, ComputeError>)
            .unwrap();
        assert!(hands_off.is_empty());
    }

    #[test]
    fn disks_with_a_single_copy_travel_by_their_guest_device() {
        let disk = |name: &str, replicas: u32| basalt_api::Disk {
            name: name.into(),
            size_bytes: 1 << 20,
            image: None,
            replicas,
            source_volume: None,
            attach: None,
            attached_storage_name: None,
            added_at_epoch: None,
            protocol: Default::default(),
        };
        let mut vm = basalt_api::Vm::default();
        assert!(single_copy_disks(&vm).is_empty(), "no disk");
        vm.spec.disks = vec![disk("root", 2), disk("data", 3)];
        assert!(single_copy_disks(&vm).is_empty(), "every disk replicated");
        vm.spec.disks.push(disk("scratch", 1));
        vm.spec.disks.push(disk("old", 0));
        let copied: Vec<(String, String)> = single_copy_disks(&vm)
            .into_iter()
            .map(|(d, dev)| (d.name.clone(), dev))
            .collect();
        assert_eq!(
            copied,
            [
                ("scratch".to_owned(), "vdc".to_owned()),
                ("old".to_owned(), "vdd".to_owned())
            ]
        );
    }

    #[test]
    fn a_failed_or_removed_migration_flags_its_copy_for_abort() {
        let agent = MigrationAgent::new("n1", "basalt-", None);
        agent.apply(
            [("web".to_owned(), Some(migration(MigrationPhase::Migrating)))],
            true,
        );
        let abort = Arc::new(AtomicBool::new(false));
        agent.state().workers.insert("web".into(), abort.clone());
        agent.apply(
            [("web".to_owned(), Some(migration(MigrationPhase::Migrating)))],
            false,
        );
        assert!(!abort.load(Ordering::SeqCst));
        agent.apply([("web".to_owned(), None)], false);
        assert!(abort.load(Ordering::SeqCst));
    }
}
