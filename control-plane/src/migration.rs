//! The migration controller: drives each [`Migration`] object through its
//! phases on the leader, choosing the target and moving the placement at
//! the end. The agents do the rest (see `basalt_agent::migration`).
//!
//! # The state machine, and who writes each step
//!
//! ```text
//!  Pending ──controller──▶ Preparing ──target agent──▶ TargetReady
//!     │                        │                            │
//!     │                        ▼                      source agent
//!     └──────────────▶ Failed ◀─────── Migrating ◀──────────┘
//!                        ▲                 │
//!                        │           source agent (libvirt said done)
//!                        │                 ▼
//!                        └──────────── Switching ──controller──▶ Succeeded
//! ```
//!
//! - **Pending → Preparing** (controller): the VM exists, runs and is
//!   placed; the target is `spec.target` or the scheduler's choice among
//!   the other nodes (same filters as a placement: ready, not cordoned,
//!   selector, anti-affinity, capacity). The status records the source,
//!   the target and the placement's epoch *now*: every later step checks
//!   that the placement is still exactly `(source, epoch)`.
//!   A VM with replicated disks goes only to a node whose copies are in
//!   sync ([`copy_lag`]): while the only possible target's copy is still
//!   filling (an evacuation's new copy, a lost copy's replacement, a copy
//!   back from being away) the migration stays pending and says so; a
//!   copy that cannot catch up by itself (fenced outdated, failed disk,
//!   split brain) fails it.
//! - **Preparing → TargetReady** (target agent): it has made sure its
//!   reconciler leaves the incoming domain alone, then says so.
//! - **TargetReady → Migrating** (source agent): it has stopped
//!   reconciling the VM, then starts the peer-to-peer copy.
//! - **Migrating → Switching** (source agent): libvirt reported success:
//!   the guest runs on the target and the source holds no copy.
//! - **Switching → Succeeded** (controller): one Raft entry (a batch,
//!   all or nothing) moves the placement to the target with `epoch + 1`,
//!   moves the VM's endpoints with it (the network fence, as HA does) and
//!   marks the migration succeeded. With the agents' datapath the
//!   target's agent has usually moved the endpoints already, on the
//!   guest's activation (to the target at `epoch + 1`, while the copy
//!   ends): those are left out of the batch, and none at a later epoch is
//!   ever moved back.
//! - **→ Failed**: the source agent when the copy fails or is aborted
//!   (the guest still runs on the source); the target agent when it cannot
//!   prepare; the controller when the request is impossible, the target
//!   has not prepared within [`PREPARE_TIMEOUT`], the placement changed
//!   under the migration (HA moved the VM) or the source or target node
//!   lost its `Ready` condition.
//!
//! # Why there are never two running copies
//!
//! - libvirt's peer-to-peer migration itself ends with one copy: on
//!   success the source QEMU is gone and its definition undefined, on
//!   failure the target's is.
//! - Agents stop reconciling a VM while it moves: the source from before
//!   it starts the copy until the placement has left it (so it never
//!   "restarts" a VM whose domain vanished because it moved), the target
//!   from before it says ready until the placement reaches it or the
//!   migration fails (so it never destroys the incoming domain, and
//!   destroys it as an unwanted domain once the migration has failed).
//! - Every write is a compare-and-swap: the source agent's `Switching`
//!   and the controller's `Failed` cannot both win; the placement moves
//!   only from `(source, epoch)`, so a VM that HA moved meanwhile is not
//!   moved again.
//! - The controller never fails a migration in `Migrating` on a timer
//!   (the source agent owns the pre-copy timeout and aborts by itself):
//!   a copy that libvirt completes is always followed by the move. It
//!   does fail it when the source or target node is lost; then the node
//!   fences (the agent destroys its guests, storage and network follow the
//!   epoch) and HA places the VM as for any lost node.

use std::collections::BTreeMap;
use std::time::Duration;

use basalt_api::{
    ApiError, Endpoint, Kind, Migration, MigrationPhase, Node, Object, Placement, ReplicaState, Vm,
    Volume,
};

use crate::admin::AdminService;
use crate::agent::now_unix_ms;
use crate::scheduler::{self, Overcommit};
use crate::state::Command;
use crate::volumes::DiskVolumes;

/// How long a target may take to prepare before the migration fails.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the controller decided for one migration, from the state alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now.
    Wait,
    /// Write this migration (a new phase or status).
    Update(Migration),
    /// Move the placement and the VM's endpoints and mark the migration
    /// succeeded, in one batch.
    Switch {
        /// The placement moved to the target with `epoch + 1`.
        placement: Placement,
        /// The VM's active endpoints, on the target with `epoch + 1`.
        endpoints: Vec<Endpoint>,
        /// The migration, succeeded.
        migration: Migration,
    },
    /// Remove a finished migration whose VM is gone.
    Delete(Migration),
}

/// The leader's migration controller. Holds nothing between rounds: the
/// state is the only truth, so a new leader carries on where the last
/// one stopped.
#[derive(Debug, Default)]
pub struct MigrationController {
    /// Migration → the last failure to write it, as last logged.
    logged: BTreeMap<String, String>,
}

impl MigrationController {
    /// A controller.
    pub fn new() -> Self {
        Self::default()
    }

    /// One round over every migration.
    pub async fn round(&mut self, admin: &AdminService, seed: u64) {
        let steps: Vec<Step> = {
            let machine = admin.shared().read();
            let state = &machine.state;
            if state.list(Kind::Migration).next().is_none() {
                return;
            }
            let nodes: Vec<Node> = state
                .list(Kind::Node)
                .filter_map(|o| Node::try_from(o.clone()).ok())
                .collect();
            let vms: Vec<Vm> = state
                .list(Kind::Vm)
                .filter_map(|o| Vm::try_from(o.clone()).ok())
                .collect();
            let placements: Vec<Placement> = state
                .list(Kind::Placement)
                .filter_map(|o| Placement::try_from(o.clone()).ok())
                .collect();
            let endpoints: Vec<Endpoint> = state
                .list(Kind::Endpoint)
                .filter_map(|o| Endpoint::try_from(o.clone()).ok())
                .collect();
            let volumes = crate::volumes::disk_volumes(state);
            let view = View {
                nodes: &nodes,
                vms: &vms,
                placements: &placements,
                endpoints: &endpoints,
                volumes: &volumes,
                now_unix_ms: now_unix_ms(),
                seed,
            };
            state
                .list(Kind::Migration)
                .filter_map(|o| match o {
                    Object::Migration(m) => Some(decide(m, &view)),
                    _ => None,
                })
                .filter(|step| *step != Step::Wait)
                .collect()
        };
        for step in steps {
            self.execute(admin, step).await;
        }
    }

    async fn execute(&mut self, admin: &AdminService, step: Step) {
        match step {
            Step::Wait => {}
            Step::Update(migration) => {
                let name = migration.meta.name.clone();
                let phase = migration.status.phase;
                let message = migration.status.message.clone();
                match admin
                    .write(Command::Update(Object::Migration(migration)))
                    .await
                {
                    Ok(_) => {
                        self.logged.remove(&name);
                        if phase == MigrationPhase::Failed {
                            tracing::warn!(vm = %name, %message, "migration failed");
                        } else {
                            tracing::info!(vm = %name, %phase, "migration advanced");
                        }
                    }
                    Err(err) => self.log_failure(&name, &err),
                }
            }
            Step::Switch {
                placement,
                endpoints,
                migration,
            } => {
                let name = migration.meta.name.clone();
                let (to, epoch) = (placement.node.clone(), placement.epoch);
                // One entry: the placement (compare-and-swap on its
                // version), the network fence and the verdict, or nothing
                // (the next round sees why).
                let mut batch = vec![Command::Update(Object::Placement(placement))];
                batch.extend(
                    endpoints
                        .into_iter()
                        .map(|e| Command::Update(Object::Endpoint(e))),
                );
                batch.push(Command::Update(Object::Migration(migration)));
                match admin.write(Command::Batch(batch)).await {
                    Ok(_) => {
                        self.logged.remove(&name);
                        tracing::info!(vm = %name, node = %to, epoch, "migration succeeded: placement and endpoints moved");
                    }
                    Err(err) => self.log_failure(&name, &err),
                }
            }
            Step::Delete(migration) => {
                let name = migration.meta.name.clone();
                if let Err(err) = admin
                    .write(Command::Delete {
                        kind: Kind::Migration,
                        name: name.clone(),
                        expected_resource_version: Some(migration.meta.resource_version),
                        force: false,
                    })
                    .await
                {
                    self.log_failure(&name, &err);
                }
            }
        }
    }

    fn log_failure(&mut self, name: &str, err: &ApiError) {
        let text = err.to_string();
        if self.logged.get(name) != Some(&text) {
            tracing::info!(vm = %name, error = %text, "writing a migration step failed; will retry");
            self.logged.insert(name.to_owned(), text);
        }
    }
}

/// What [`decide`] reads of the state.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// Every node.
    pub nodes: &'a [Node],
    /// Every VM.
    pub vms: &'a [Vm],
    /// Every placement.
    pub placements: &'a [Placement],
    /// Every endpoint.
    pub endpoints: &'a [Endpoint],
    /// The VM disks' volumes (their copies and how each stands).
    pub volumes: &'a DiskVolumes<'a>,
    /// The leader's clock.
    pub now_unix_ms: u64,
    /// The scheduler's tie-break seed.
    pub seed: u64,
}

impl View<'_> {
    fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|vm| vm.meta.name == name)
    }

    fn placement(&self, vm: &str) -> Option<&Placement> {
        self.placements.iter().find(|p| p.vm == vm)
    }

    fn ready(&self, node: &str) -> bool {
        self.nodes
            .iter()
            .any(|n| n.meta.name == node && n.status.is_ready())
    }

    fn disk_volume(&self, vm_uid: &str, disk: &str) -> Option<&Volume> {
        self.volumes.get(&(vm_uid, disk)).copied()
    }
}

/// Why a node's copies of a VM's replicated disks cannot take the guest
/// yet (see [`copy_lag`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lag {
    /// Still filling or reconnecting: worth waiting for.
    Filling(String),
    /// Cannot catch up by itself.
    Broken(String),
}

/// Whether `node`'s copies of `vm`'s replicated disks (placed as
/// `placement`) hold the data, as far as the state tells; `None` when they
/// do, or when `node` holds no copy (the scheduler then refuses it for
/// such a VM anyway). Nothing reported yet at the placement's epoch (just
/// after a move) says nothing either way and does not hold the guest back.
pub fn copy_lag(vm: &Vm, placement: &Placement, node: &str, view: &View<'_>) -> Option<Lag> {
    if !placement.replica_nodes.iter().any(|n| n == node) {
        return None;
    }
    // Replica nodes beyond what the disks ask were appended by a drain's
    // evacuation (decision 82): their copies fill until the old node is
    // dropped.
    let appended = placement
        .replica_nodes
        .get(vm.spec.replicas_wanted()..)
        .unwrap_or_default();
    if appended.iter().any(|n| n == node) {
        return Some(Lag::Filling(format!(
            "node {node:?}'s copies are still filling (a drain moves them there)"
        )));
    }
    if vm.status.is_outdated_on(node) {
        return Some(Lag::Broken(format!(
            "the storage fence marked node {node:?}'s copies outdated"
        )));
    }
    for disk in vm.spec.disks.iter().filter(|d| d.replicas >= 2) {
        let Some(volume) = view.disk_volume(&vm.meta.uid, &disk.name) else {
            continue;
        };
        if volume.status.epoch != placement.epoch || !volume.status.reported() {
            continue;
        }
        let Some(copy) = volume.status.replica(node) else {
            return Some(Lag::Filling(format!(
                "disk {}'s copy on {node:?} is not reported yet",
                disk.name
            )));
        };
        if copy.in_sync() {
            continue;
        }
        let state = copy.state.with_mark(copy.outdated);
        let why = match copy.node_state {
            // In sync by the primary, not by its own node: not heard
            // yet, or incomplete (a full sync or resync into it did not finish).
            own if state == ReplicaState::UpToDate => format!(
                "disk {}'s copy on {node:?} is up-to-date by the primary, {} by its own node",
                disk.name,
                own.map_or("not reported", ReplicaState::as_str)
            ),
            _ => format!("disk {}'s copy on {node:?} is {state}", disk.name),
        };
        return Some(match state {
            ReplicaState::Outdated | ReplicaState::DiskFailed | ReplicaState::SplitBrain => {
                Lag::Broken(why)
            }
            _ if copy.sync_total_bytes > 0 => Lag::Filling(format!(
                "{why} ({} of {} bytes sent)",
                copy.sync_done_bytes, copy.sync_total_bytes
            )),
            _ => Lag::Filling(why),
        });
    }
    None
}

/// The next step for `migration`, from the state alone (pure: every rule
/// is a unit test).
pub fn decide(migration: &Migration, view: &View<'_>) -> Step {
    let vm_name = migration.spec.vm.as_str();
    let status = &migration.status;
    let fail = |message: String| {
        let mut failed = migration.clone();
        failed.status.phase = MigrationPhase::Failed;
        failed.status.message = message;
        failed.status.finished_at_unix_ms = view.now_unix_ms;
        Step::Update(failed)
    };
    match status.phase {
        MigrationPhase::Succeeded | MigrationPhase::Failed => {
            if view.vm(vm_name).is_none() {
                Step::Delete(migration.clone())
            } else {
                Step::Wait
            }
        }
        MigrationPhase::Pending => {
            let Some(vm) = view.vm(vm_name) else {
                return fail(format!("no VM {vm_name:?}"));
            };
            if !vm.spec.running {
                return fail(format!("VM {vm_name:?} is not running"));
            }
            let Some(placement) = view.placement(vm_name) else {
                return fail(format!("VM {vm_name:?} is not placed on any node yet"));
            };
            let source = placement.node.clone();
            if !view.ready(&source) {
                return fail(format!("the VM's node {source:?} is not ready"));
            }
            // Stays pending, saying why, while a copy fills; until its
            // time to start runs out (counted from its creation).
            let started_by = migration.meta.created_at_unix_ms.saturating_add(
                u64::try_from(migration.spec.start_timeout().as_millis()).unwrap_or(u64::MAX),
            );
            let wait = |why: String| {
                // (A creation time of 0: not known, no deadline.)
                if migration.meta.created_at_unix_ms > 0 && view.now_unix_ms >= started_by {
                    return fail(format!(
                        "did not start within {} s of its request: still waiting for the target's copies: {why}",
                        migration.spec.start_timeout().as_secs()
                    ));
                }
                let message = format!("waiting for the target's copies: {why}");
                if migration.status.message == message {
                    return Step::Wait;
                }
                let mut waiting = migration.clone();
                waiting.status.message = message;
                Step::Update(waiting)
            };
            // The first filling copy among the nodes left out, on a ready
            // node: what the migration waits for when nothing else fits.
            let mut filling = None;
            let candidates: Vec<Node> = match &migration.spec.target {
                Some(target) if *target == source => {
                    return fail(format!("VM {vm_name:?} already runs on {target:?}"));
                }
                Some(target) => match view.nodes.iter().find(|n| n.meta.name == *target) {
                    Some(node) => match copy_lag(vm, placement, target, view) {
                        None => vec![node.clone()],
                        Some(Lag::Broken(why)) => {
                            return fail(format!(
                                "node {target:?} cannot take VM {vm_name:?}: {why}"
                            ));
                        }
                        Some(Lag::Filling(why)) if view.ready(target) => return wait(why),
                        Some(Lag::Filling(why)) => {
                            return fail(format!(
                                "node {target:?} is not ready and cannot take VM {vm_name:?}: {why}"
                            ));
                        }
                    },
                    None => return fail(format!("no node {target:?}")),
                },
                None => view
                    .nodes
                    .iter()
                    .filter(|n| n.meta.name != source)
                    .filter(|n| match copy_lag(vm, placement, &n.meta.name, view) {
                        None => true,
                        Some(Lag::Filling(why)) => {
                            if filling.is_none() && view.ready(&n.meta.name) {
                                filling = Some(why);
                            }
                            false
                        }
                        Some(Lag::Broken(_)) => false,
                    })
                    .cloned()
                    .collect(),
            };
            // The VM counts as unplaced; every other placement loads its
            // node as usual.
            let others: Vec<Placement> = view
                .placements
                .iter()
                .filter(|p| p.vm != vm_name)
                .cloned()
                .collect();
            // Only this VM is pending: the others count by their load.
            let loaded: Vec<Vm> = view
                .vms
                .iter()
                .filter(|v| v.meta.name == vm_name || others.iter().any(|p| p.vm == v.meta.name))
                .cloned()
                .collect();
            // A VM with replicated disks goes only where they are.
            let plan = scheduler::plan_with_moves(
                &candidates,
                &loaded,
                &others,
                std::slice::from_ref(placement),
                Overcommit::default(),
                view.seed,
            );
            let Some((_, target)) = plan.placements.into_iter().next() else {
                if let Some(why) = filling {
                    return wait(why);
                }
                let reason = plan
                    .unschedulable
                    .into_iter()
                    .next()
                    .map_or_else(|| "no other node".to_owned(), |(_, reason)| reason);
                return fail(format!("no target for VM {vm_name:?}: {reason}"));
            };
            let mut next = migration.clone();
            next.status = basalt_api::MigrationStatus {
                phase: MigrationPhase::Preparing,
                source,
                target,
                epoch: placement.epoch,
                message: "the target prepares".into(),
                started_at_unix_ms: view.now_unix_ms,
                ..basalt_api::MigrationStatus::default()
            };
            Step::Update(next)
        }
        MigrationPhase::Preparing
        | MigrationPhase::TargetReady
        | MigrationPhase::Migrating
        | MigrationPhase::Switching => {
            let placement = view.placement(vm_name);
            let unchanged =
                placement.is_some_and(|p| p.node == status.source && p.epoch == status.epoch);
            if !unchanged {
                return fail(format!(
                    "the VM's placement changed during the migration (now {})",
                    placement.map_or_else(
                        || "none".to_owned(),
                        |p| format!("{} epoch {}", p.node, p.epoch)
                    )
                ));
            }
            // The source went on without the target's copy (the storage
            // fence): switching over would run the VM on stale disks.
            if view
                .vm(vm_name)
                .is_some_and(|vm| vm.status.is_outdated_on(&status.target))
            {
                return fail(format!(
                    "the target {:?} holds an outdated copy of the VM's disks (its source lost it and went on without it)",
                    status.target
                ));
            }
            if status.phase == MigrationPhase::Switching {
                let Some(placement) = placement else {
                    return Step::Wait;
                };
                let moved = Placement {
                    node: status.target.clone(),
                    epoch: status.epoch + 1,
                    ..placement.clone()
                };
                let vm_uid = view.vm(vm_name).map(|vm| vm.meta.uid.as_str());
                let next = status.epoch + 1;
                // Endpoints the target's agent took over on activation are
                // already there: not written again (no conflict with the
                // take-over), and nothing at a later epoch is moved back.
                let endpoints = view
                    .endpoints
                    .iter()
                    .filter(|e| {
                        e.vm == vm_name
                            && e.release_at_unix_ms == 0
                            && Some(e.vm_uid.as_str()) == vm_uid
                            && (e.epoch < next || (e.epoch == next && e.node != status.target))
                    })
                    .map(|e| Endpoint {
                        node: status.target.clone(),
                        epoch: status.epoch + 1,
                        ..e.clone()
                    })
                    .collect();
                let mut done = migration.clone();
                done.status.phase = MigrationPhase::Succeeded;
                done.status.message = format!("runs on {}", status.target);
                done.status.finished_at_unix_ms = view.now_unix_ms;
                return Step::Switch {
                    placement: moved,
                    endpoints,
                    migration: done,
                };
            }
            for node in [&status.source, &status.target] {
                if !view.ready(node) {
                    return fail(format!("node {node:?} is not ready"));
                }
            }
            let prepare_deadline = status
                .started_at_unix_ms
                .saturating_add(PREPARE_TIMEOUT.as_millis() as u64);
            if status.phase == MigrationPhase::Preparing && view.now_unix_ms > prepare_deadline {
                return fail(format!(
                    "the target {:?} did not prepare within {} s",
                    status.target,
                    PREPARE_TIMEOUT.as_secs()
                ));
            }
            Step::Wait
        }
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{
        Condition, MigrationSpec, MigrationStatus, NodeStatus, ObjectMeta, Resources, VmSpec,
    };

    use super::*;

    fn node(name: &str, ready: bool) -> Node {
        Node {
            meta: ObjectMeta::named(name),
            status: NodeStatus {
                allocatable: Resources {
                    cpus: 4,
                    memory_mib: 4096,
                    storage_bytes: 0,
                },
                conditions: vec![Condition {
                    kind: Condition::READY.into(),
                    status: ready,
                    ..Condition::default()
                }],
                ..NodeStatus::default()
            },
            ..Node::default()
        }
    }

    fn endpoint(name: &str, vm: &str, vm_uid: &str, release_at_unix_ms: u64) -> Endpoint {
        Endpoint {
            meta: ObjectMeta::named(name),
            vm: vm.into(),
            vm_uid: vm_uid.into(),
            node: "n1".into(),
            epoch: 4,
            release_at_unix_ms,
            ..Endpoint::default()
        }
    }

    fn vm(name: &str, memory_mib: u64) -> Vm {
        let mut meta = ObjectMeta::named(name);
        meta.uid = format!("uid-{name}");
        Vm {
            meta,
            spec: VmSpec {
                cpus: 1,
                memory_mib,
                running: true,
                ..VmSpec::default()
            },
            ..Vm::default()
        }
    }

    fn placement(vm: &str, node: &str, epoch: u64) -> Placement {
        Placement {
            meta: ObjectMeta::named(vm),
            vm: vm.into(),
            node: node.into(),
            epoch,
            ..Placement::default()
        }
    }

    fn request(target: Option<&str>) -> Migration {
        Migration {
            meta: ObjectMeta::named("web"),
            spec: MigrationSpec {
                vm: "web".into(),
                target: target.map(Into::into),
                ..MigrationSpec::default()
            },
            status: MigrationStatus::default(),
        }
    }

    struct World {
        nodes: Vec<Node>,
        vms: Vec<Vm>,
        placements: Vec<Placement>,
        endpoints: Vec<Endpoint>,
        volumes: Vec<Volume>,
        now: u64,
    }

    impl World {
        fn new() -> Self {
            World {
                nodes: vec![node("n1", true), node("n2", true), node("n3", true)],
                vms: vec![vm("web", 512), vm("big", 3900)],
                placements: vec![placement("web", "n1", 4), placement("big", "n3", 1)],
                endpoints: vec![
                    endpoint("10-1-0-5", "web", "uid-web", 0),
                    endpoint("10-1-0-6", "web", "uid-old-web", 0),
                    endpoint("10-1-0-7", "web", "uid-web", 99),
                    endpoint("10-1-0-8", "big", "uid-big", 0),
                ],
                volumes: Vec::new(),
                now: 1_000_000,
            }
        }

        /// [`World::new`], `web` with a two-copy disk `root` (the copies'
        /// nodes are the test's to set).
        fn replicated() -> Self {
            let mut world = World::new();
            world.vms[0].spec.disks = vec![basalt_api::Disk {
                name: "root".into(),
                size_bytes: 1 << 20,
                replicas: 2,
                ..basalt_api::Disk::default()
            }];
            world
        }

        fn decide(&self, migration: &Migration) -> Step {
            decide(
                migration,
                &View {
                    nodes: &self.nodes,
                    vms: &self.vms,
                    placements: &self.placements,
                    endpoints: &self.endpoints,
                    volumes: &crate::volumes::by_disk(&self.volumes),
                    now_unix_ms: self.now,
                    seed: 7,
                },
            )
        }
    }

    fn updated(step: Step) -> Migration {
        match step {
            Step::Update(m) => m,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    fn failed_with(step: Step, words: &str) {
        let m = updated(step);
        assert_eq!(m.status.phase, MigrationPhase::Failed, "{m:?}");
        assert!(m.status.message.contains(words), "{:?}", m.status.message);
    }

    #[test]
    fn a_request_gets_a_fitting_target_other_than_the_source_and_the_epoch() {
        let world = World::new();
        // n3 is nearly full: the only fitting other node is n2.
        let m = updated(world.decide(&request(None)));
        assert_eq!(m.status.phase, MigrationPhase::Preparing);
        assert_eq!(
            (
                m.status.source.as_str(),
                m.status.target.as_str(),
                m.status.epoch
            ),
            ("n1", "n2", 4)
        );
        assert_eq!(m.status.started_at_unix_ms, world.now);
        let m = updated(world.decide(&request(Some("n3"))));
        assert_eq!(m.status.phase, MigrationPhase::Failed);
        assert!(m.status.message.contains("short of memory"), "{m:?}");
    }

    #[test]
    fn impossible_requests_fail_with_the_reason() {
        let mut world = World::new();
        failed_with(world.decide(&request(Some("n1"))), "already runs on");
        failed_with(world.decide(&request(Some("n9"))), "no node");
        world.nodes[1] = node("n2", false);
        failed_with(world.decide(&request(Some("n2"))), "not ready");
        world.vms[0].spec.running = false;
        failed_with(world.decide(&request(None)), "not running");
        world.vms.remove(0);
        failed_with(world.decide(&request(None)), "no VM");
    }

    #[test]
    fn a_copy_a_drain_is_filling_takes_no_guest() {
        let mut world = World::replicated();
        // Copies on n1 and n3, and one being filled on n2 (appended by an
        // evacuation of n3).
        world.nodes[2] = node("n3", true);
        world.vms[1].spec.memory_mib = 64;
        world.placements[0].replica_nodes = vec!["n1".into(), "n3".into(), "n2".into()];
        let m = updated(world.decide(&request(None)));
        assert_eq!(
            (m.status.phase, m.status.target.as_str()),
            (MigrationPhase::Preparing, "n3")
        );
        waits_for(world.decide(&request(Some("n2"))), "still filling");
        // Once n3 is dropped, n2 is an ordinary replica node.
        world.placements[0].replica_nodes = vec!["n1".into(), "n2".into()];
        let m = updated(world.decide(&request(Some("n2"))));
        assert_eq!(m.status.phase, MigrationPhase::Preparing, "{m:?}");
    }

    fn waits_for(step: Step, words: &str) {
        let m = updated(step);
        assert_eq!(m.status.phase, MigrationPhase::Pending, "{m:?}");
        assert!(m.status.message.contains(words), "{:?}", m.status.message);
    }

    /// `web`'s disk `root` with copies on n1 (primary) and n2, as the
    /// primary reported them at `epoch`.
    fn root_volume(epoch: u64, n2: ReplicaState) -> Volume {
        let copy = |node: &str, state: ReplicaState| basalt_api::VolumeReplica {
            node: node.into(),
            state,
            primary: node == "n1",
            node_state: Some(state),
            ..basalt_api::VolumeReplica::default()
        };
        Volume {
            meta: ObjectMeta::named("web-root"),
            spec: basalt_api::VolumeSpec {
                owner: Some(basalt_api::VolumeOwner {
                    vm: "web".into(),
                    vm_uid: "uid-web".into(),
                    disk: "root".into(),
                    ..basalt_api::VolumeOwner::default()
                }),
                ..basalt_api::VolumeSpec::default()
            },
            status: basalt_api::VolumeStatus {
                epoch,
                primary_node: "n1".into(),
                replicas: vec![copy("n1", ReplicaState::UpToDate), copy("n2", n2)],
                ..basalt_api::VolumeStatus::default()
            },
        }
    }

    #[test]
    fn a_copy_that_is_not_in_sync_takes_no_guest_and_the_migration_waits_for_a_filling_one() {
        let mut world = World::replicated();
        world.vms[1].spec.memory_mib = 64;
        // n2 took the copy of a lost node (decision 43): same epoch, its
        // copy is being filled.
        world.placements[0].replica_nodes = vec!["n1".into(), "n2".into()];
        let mut filling = root_volume(4, ReplicaState::Syncing);
        filling.status.replicas[1].sync_done_bytes = 1 << 19;
        filling.status.replicas[1].sync_total_bytes = 1 << 20;
        world.volumes = vec![filling];
        let waiting = updated(world.decide(&request(None)));
        waits_for(
            Step::Update(waiting.clone()),
            "disk root's copy on \"n2\" is syncing (524288 of 1048576 bytes sent)",
        );
        // Said once: the same decision again writes nothing.
        assert_eq!(world.decide(&waiting), Step::Wait);
        waits_for(world.decide(&request(Some("n2"))), "syncing");
        // Primary says up to date, the copy's node has not confirmed yet.
        world.volumes[0].status.replicas[1].state = ReplicaState::UpToDate;
        world.volumes[0].status.replicas[1].node_state = None;
        waits_for(
            world.decide(&request(None)),
            "up-to-date by the primary, not reported by its own node",
        );
        // Its own node holds it incomplete (decision 91): still filling.
        world.volumes[0].status.replicas[1].node_state = Some(ReplicaState::Syncing);
        waits_for(
            world.decide(&request(None)),
            "up-to-date by the primary, syncing by its own node",
        );
        // In sync: the migration goes on, from the same waiting object.
        world.volumes[0].status.replicas[1].node_state = Some(ReplicaState::UpToDate);
        let m = updated(world.decide(&waiting));
        assert_eq!(
            (m.status.phase, m.status.target.as_str()),
            (MigrationPhase::Preparing, "n2")
        );
        // Copies that cannot catch up by themselves fail the request.
        for state in [ReplicaState::DiskFailed, ReplicaState::SplitBrain] {
            world.volumes = vec![root_volume(4, state)];
            failed_with(world.decide(&request(Some("n2"))), state.as_str());
        }
        world.volumes = vec![root_volume(4, ReplicaState::UpToDate)];
        world.vms[0].status.outdated_replicas = vec!["n2".into()];
        failed_with(world.decide(&request(Some("n2"))), "fence marked");
        failed_with(world.decide(&request(None)), "no target");
        world.vms[0].status.outdated_replicas.clear();
        // Nothing reported at the placement's epoch yet (just moved), or a
        // report of an older epoch: no hold.
        world.volumes = vec![root_volume(3, ReplicaState::Away)];
        let m = updated(world.decide(&request(None)));
        assert_eq!(m.status.phase, MigrationPhase::Preparing, "{m:?}");
        world.volumes = vec![root_volume(4, ReplicaState::Unknown)];
        world.volumes[0].status.replicas[0].state = ReplicaState::Unknown;
        let m = updated(world.decide(&request(None)));
        assert_eq!(m.status.phase, MigrationPhase::Preparing, "{m:?}");
        // A filling copy on a node that is not ready is not waited for.
        world.volumes = vec![root_volume(4, ReplicaState::Syncing)];
        world.nodes[1] = node("n2", false);
        failed_with(world.decide(&request(Some("n2"))), "not ready");
        failed_with(world.decide(&request(None)), "no target");
    }

    #[test]
    fn a_migration_pending_past_its_time_to_start_fails_saying_what_it_waited_for() {
        let mut world = World::replicated();
        world.vms[1].spec.memory_mib = 64;
        world.placements[0].replica_nodes = vec!["n1".into(), "n2".into()];
        world.volumes = vec![root_volume(4, ReplicaState::Syncing)];
        let mut m = request(None);
        m.meta.created_at_unix_ms = world.now - 5_000;
        m.spec.start_timeout_seconds = 10;
        let waiting = updated(world.decide(&m));
        waits_for(Step::Update(waiting.clone()), "syncing");
        world.now += 4_999;
        assert_eq!(world.decide(&waiting), Step::Wait);
        world.now += 1;
        failed_with(
            world.decide(&waiting),
            "did not start within 10 s of its request: still waiting for the target's copies: disk root's copy on \"n2\" is syncing",
        );
        // The default: an hour.
        m.spec.start_timeout_seconds = 0;
        world.now = m.meta.created_at_unix_ms + 3_600_000 - 1;
        waits_for(world.decide(&m), "syncing");
        world.now += 1;
        failed_with(world.decide(&m), "within 3600 s");
        // Past its time but free to go: it goes.
        world.volumes = vec![root_volume(4, ReplicaState::UpToDate)];
        let m = updated(world.decide(&m));
        assert_eq!(m.status.phase, MigrationPhase::Preparing, "{m:?}");
    }

    fn in_phase(phase: MigrationPhase) -> Migration {
        let mut m = request(None);
        m.status = MigrationStatus {
            phase,
            source: "n1".into(),
            target: "n2".into(),
            epoch: 4,
            started_at_unix_ms: 1_000_000,
            ..MigrationStatus::default()
        };
        m
    }

    #[test]
    fn active_phases_wait_unless_the_placement_or_a_node_changed() {
        let mut world = World::new();
        for phase in [
            MigrationPhase::Preparing,
            MigrationPhase::TargetReady,
            MigrationPhase::Migrating,
        ] {
            assert_eq!(world.decide(&in_phase(phase)), Step::Wait, "{phase}");
        }
        // HA moved the VM meanwhile.
        world.placements[0] = placement("web", "n3", 5);
        failed_with(
            world.decide(&in_phase(MigrationPhase::Migrating)),
            "placement changed",
        );
        failed_with(
            world.decide(&in_phase(MigrationPhase::Switching)),
            "placement changed",
        );
        // The target node is lost.
        let mut world = World::new();
        world.nodes[1] = node("n2", false);
        failed_with(
            world.decide(&in_phase(MigrationPhase::Migrating)),
            "\"n2\" is not ready",
        );
    }

    #[test]
    fn a_target_that_never_prepares_fails_the_migration_but_a_long_copy_does_not() {
        let mut world = World::new();
        world.now += PREPARE_TIMEOUT.as_millis() as u64 + 1;
        failed_with(
            world.decide(&in_phase(MigrationPhase::Preparing)),
            "did not prepare",
        );
        assert_eq!(
            world.decide(&in_phase(MigrationPhase::TargetReady)),
            Step::Wait
        );
        world.now += 3_600_000;
        assert_eq!(
            world.decide(&in_phase(MigrationPhase::Migrating)),
            Step::Wait
        );
    }

    #[test]
    fn the_switch_moves_the_placement_with_the_next_epoch() {
        let world = World::new();
        match world.decide(&in_phase(MigrationPhase::Switching)) {
            Step::Switch {
                placement,
                endpoints,
                migration,
            } => {
                assert_eq!((placement.node.as_str(), placement.epoch), ("n2", 5));
                assert_eq!(placement.meta.name, "web");
                assert_eq!(migration.status.phase, MigrationPhase::Succeeded);
                // Only the VM's active endpoints (its uid, not released)
                // follow, fenced with the new epoch.
                let moved: Vec<_> = endpoints
                    .iter()
                    .map(|e| (e.meta.name.as_str(), e.node.as_str(), e.epoch))
                    .collect();
                assert_eq!(moved, [("10-1-0-5", "n2", 5)]);
            }
            other => panic!("expected the switch, got {other:?}"),
        }
    }

    #[test]
    fn the_switch_leaves_endpoints_taken_over_on_activation_as_they_are() {
        let mut world = World::new();
        // The target's agent moved the endpoint on activation.
        world.endpoints[0].node = "n2".into();
        world.endpoints[0].epoch = 5;
        match world.decide(&in_phase(MigrationPhase::Switching)) {
            Step::Switch {
                placement,
                endpoints,
                ..
            } => {
                assert_eq!((placement.node.as_str(), placement.epoch), ("n2", 5));
                assert!(endpoints.is_empty(), "{endpoints:?}");
            }
            other => panic!("expected the switch, got {other:?}"),
        }
        // Never moved back from a later epoch either.
        world.endpoints[0].node = "n3".into();
        world.endpoints[0].epoch = 6;
        match world.decide(&in_phase(MigrationPhase::Switching)) {
            Step::Switch { endpoints, .. } => assert!(endpoints.is_empty(), "{endpoints:?}"),
            other => panic!("expected the switch, got {other:?}"),
        }
    }

    #[test]
    fn finished_migrations_stay_until_their_vm_goes() {
        let mut world = World::new();
        assert_eq!(
            world.decide(&in_phase(MigrationPhase::Succeeded)),
            Step::Wait
        );
        world.vms.remove(0);
        assert!(matches!(
            world.decide(&in_phase(MigrationPhase::Failed)),
            Step::Delete(_)
        ));
    }
}
