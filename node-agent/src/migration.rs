//! The agent's side of live migration: the target prepares, the source
//! copies, and both keep their reconciler's hands off the VM while it
//! moves. The control plane's controller (`basalt_control::migration`)
//! owns the other steps; its module doc draws the whole state machine.
//!
//! What this agent does, per [`Migration`] object it sees:
//!
//! - **target, `Preparing`**: pins the VM (below), prepares what the
//!   incoming guest needs, then writes `TargetReady`. libvirt creates the
//!   incoming domain and its tap (with the same name and MAC as on the
//!   source) when the copy starts; the VM's disks are NBD exports at the
//!   same address on every node.
//! - **source, `TargetReady`**: pins the VM, writes `Migrating`, then
//!   runs [`Compute::migrate`] peer to peer to the target's libvirtd
//!   (`qemu+tcp://<target host>/system`), reporting progress about once a
//!   second. When the copy has not converged within the spec's timeout it
//!   is aborted, or switched to post-copy when the spec allows. Success
//!   writes `Switching`, failure `Failed` (the guest still runs here).
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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use basalt_api::{
    AdminClient, ApiError, Kind, Migration, MigrationPhase, MigrationStatus, Object, Placement,
    WatchEvent,
};
use futures::StreamExt as _;
use tokio::sync::Notify;

use crate::compute::{Compute, ComputeError, MigrateRequest, MigrationControl, MigrationProgress};

/// How long a pass waits for the first list of migrations.
const FIRST_LIST_WAIT: Duration = Duration::from_secs(10);
/// How often the agent re-examines migrations without a change.
const RESCAN: Duration = Duration::from_secs(1);
/// How often a running copy's progress is written.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How many compare-and-swap conflicts a status write retries.
const CAS_RETRIES: usize = 10;

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
            Role::Source => here,
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
}

#[derive(Debug)]
struct Inner {
    node: String,
    prefix: String,
    state: Mutex<State>,
    listed: Condvar,
    /// Held by a reconcile pass, and by a worker adding a pin.
    gate: Mutex<()>,
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
    /// `prefix` + VM name.
    pub fn new(node: &str, prefix: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                node: node.to_owned(),
                prefix: prefix.to_owned(),
                state: Mutex::new(State::default()),
                listed: Condvar::new(),
                gate: Mutex::new(()),
            }),
        }
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
            for (vm, migration) in migrations.iter() {
                if let Some(pin) = derived_pin(&node, migration) {
                    pins.entry(vm.clone()).or_insert(pin);
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
                if !keep {
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
    /// migration failed or vanished for abort.
    fn apply(&self, changes: impl IntoIterator<Item = (String, Option<Migration>)>, reset: bool) {
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
        if reset {
            state.synced = true;
            self.inner.listed.notify_all();
        }
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
    agent.apply(listed, true);
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
    // The incoming domain's tap is created by libvirt with the source's
    // name and MAC; the VM's disks are NBD exports at the same address on
    // every node. Nothing else to attach before the copy.
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
    let abort = Arc::new(AtomicBool::new(false));
    agent.state().workers.insert(vm.clone(), abort.clone());
    let pin = Pin {
        uid: migration.meta.uid.clone(),
        role: Role::Source,
        epoch: migration.status.epoch,
    };
    pin_blocking(agent, &vm, pin).await;
    let started = transition(admin, migration, &[MigrationPhase::TargetReady], |status| {
        status.phase = MigrationPhase::Migrating;
        status.message = format!("copying to {}", status.target);
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
        bandwidth_mib_s: None,
    };
    let (agent, admin, compute, migration) = (
        agent.clone(),
        admin.clone(),
        compute.clone(),
        migration.clone(),
    );
    tokio::spawn(async move {
        copy(&admin, compute, &migration, &domain, request, abort).await;
        agent.state().workers.remove(&migration.spec.vm);
    });
    Ok(())
}

/// Runs the copy and reports it; ends with `Switching` or `Failed`.
async fn copy<C: Compute + 'static>(
    admin: &AdminClient,
    compute: Arc<C>,
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
                let report = transition(admin, migration, &[MigrationPhase::Migrating], |status| {
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
            transition(admin, migration, &[MigrationPhase::Migrating], |status| {
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
    agent
        .state()
        .workers
        .insert(vm.clone(), Arc::new(AtomicBool::new(false)));
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
        let agent = MigrationAgent::new("n1", "basalt-");
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
    fn a_failed_or_removed_migration_flags_its_copy_for_abort() {
        let agent = MigrationAgent::new("n1", "basalt-");
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
