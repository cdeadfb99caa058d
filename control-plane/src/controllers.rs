//! The leader's controllers: node leases (mark a node not ready when its
//! lease runs out), HA (move a lost node's VMs elsewhere with a new
//! epoch), placement (give every running VM without a placement one),
//! replacement replicas (a lost replica node's copies go to another node
//! after a delay) and IPAM (see [`crate::ipam`]).
//! Each round is a reconciler: it reads the state, decides with the pure
//! scheduler, and writes by compare-and-swap; it runs on the leader only,
//! periodically and after changes.
//!
//! Invariants:
//! - a VM has at most one placement (named after it), so it is never
//!   placed on two nodes; moving it is one compare-and-swap that sets the
//!   new node and `epoch + 1` together, so nothing can observe the new
//!   node with the old epoch; new placements are created many to a Raft
//!   entry, each entry applied whole or not at all, and an existing
//!   placement refuses the create, so batching never places a VM twice;
//! - a lost node's VMs move only after its `Ready` condition is false in
//!   the committed state (the fence) and `nodes.ha_after_ms` passed since
//!   its last acknowledged heartbeat (or since this leader's election);
//!   the VMs of a removed node (its object deleted with `--force`) move
//!   once `nodes.ha_after_ms` passed since this leader first saw them
//!   there — by then the node's agent, refused a lease, has stopped them;
//! - a moved placement's endpoints get the new node and epoch in the same
//!   Raft entry ([`Command::Batch`]): the network fence moves with the
//!   compute one, never after it;
//! - an evicted VM (its placement labelled [`Placement::EVICT_LABEL`]: drain,
//!   decommission) moves only after its node reported it `Stopped` (a
//!   cold move); the source node is never the target;
//! - a VM with replicated disks moves (HA, drain) only onto another of its
//!   placement's `replica_nodes`, which stay as they are; with none ready
//!   it stays where it is, reported unschedulable with the reason;
//! - a replica node of a VM lost for `nodes.replica_replace_after_ms`
//!   (or removed: at once) is replaced by another node in the
//!   placement's `replica_nodes` ([`scheduler::plan_replacements`]) by
//!   compare-and-swap that keeps the node and epoch: the primary stays, so
//!   the volumes' epoch stays; the VM's own node is never replaced here;
//!   an outdated mark on the replaced node is dropped in the same entry;
//! - a late heartbeat from a lost node renews nothing (see [`crate::leases`]);
//! - a VM the scheduler holds off (no node fits, or the one node its
//!   disk's source pins it to cannot take it) has `Ready` false,
//!   `Unschedulable`, with the scheduler's reason in its status, written
//!   by compare-and-swap only when the reason changes (at most once per
//!   VM every 10 s), so a status its node reported meanwhile is never
//!   overwritten with a stale one; a held-off VM stopped while it waits
//!   loses that condition.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_api::{
    ApiError, Condition, Endpoint, Kind, Node, Object, ObjectMeta, Placement, Vm, VmPhase,
};
use futures::StreamExt as _;
use openraft::ServerState;

use crate::admin::{AdminService, stamp};
use crate::agent::{Leases, node_views, now_unix_ms};
use crate::config::NodeTuning;
use crate::ipam::IpamController;
use crate::leases::NodeView;
use crate::migration::MigrationController;
use crate::scheduler::{self, Overcommit};
use crate::state::{Command, set_condition};
use crate::volume_ha::StandaloneHa;
use crate::volume_moves::VolumeMoves;
use crate::volumes::VolumeController;

/// The smallest pause between two rounds (so a burst of writes does not
/// make the controllers rescan the state after every one).
const MIN_GAP: Duration = Duration::from_millis(50);
/// The reason of a VM's `Ready` condition while no node can take it.
const UNSCHEDULABLE: &str = "Unschedulable";
/// How long a waiting VM's recorded reason stands before another one
/// replaces it.
const REASON_REFRESH: Duration = Duration::from_secs(10);
/// New placements per Raft entry: a 10 000-VM plan is 40 entries.
const PLACEMENT_BATCH: usize = 256;
/// Entries of new placements proposed at once (group commit shares their
/// fsyncs).
const BATCHES_IN_FLIGHT: usize = 4;

/// The controllers of one member; they act only while it leads.
#[derive(Debug)]
pub struct Controllers {
    admin: AdminService,
    leases: Arc<Leases>,
    tuning: NodeTuning,
    ipam: IpamController,
    migrations: MigrationController,
    volumes: VolumeController,
    /// Standalone volumes on lost nodes (decision 65).
    standalone_ha: StandaloneHa,
    /// Standalone volumes' copies moved where their spec names, and off
    /// evacuating nodes (decisions 80, 81).
    volume_moves: VolumeMoves,
    /// VM → why it could not be placed, as last logged.
    unschedulable: HashMap<String, String>,
    /// VM → when this leader last wrote why it waits (kept for
    /// [`REASON_REFRESH`]).
    held: HashMap<String, Instant>,
    /// Removed node → when this leader first saw placements still on it.
    gone: HashMap<String, Instant>,
    /// The term `gone` belongs to (a new leader counts afresh).
    gone_term: u64,
    /// VM → why a lost replica node of it could not be replaced, as last
    /// logged.
    unreplaced: HashMap<String, String>,
    /// VM → why a copy of it cannot leave an evacuating node yet, as last
    /// logged.
    unevacuated: HashMap<String, String>,
    /// The term and applied index the lease table was last brought in
    /// line with the state at; later rounds look only at the nodes that
    /// changed since (from the watch history).
    leases_synced: Option<(u64, u64)>,
}

impl Controllers {
    /// The controllers on `admin`'s member.
    pub fn new(
        admin: AdminService,
        leases: Arc<Leases>,
        tuning: NodeTuning,
        ipam: IpamController,
    ) -> Self {
        Self {
            admin,
            leases,
            tuning,
            ipam,
            migrations: MigrationController::new(),
            volumes: VolumeController::new(),
            standalone_ha: StandaloneHa::new(),
            volume_moves: VolumeMoves::default(),
            unschedulable: HashMap::new(),
            held: HashMap::new(),
            gone: HashMap::new(),
            gone_term: 0,
            unreplaced: HashMap::new(),
            unevacuated: HashMap::new(),
            leases_synced: None,
        }
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(u64::from(self.tuning.lease_seconds))
    }

    /// Runs rounds until the state machine's channel closes.
    pub async fn run(mut self) {
        let mut applied = self.admin.shared().subscribe();
        let period = Duration::from_millis(self.tuning.controller_period_ms);
        loop {
            let (state, term) = {
                let metrics = self.admin.raft().server_metrics();
                let m = metrics.borrow();
                (m.state, m.vote.leader_id().term)
            };
            if state == ServerState::Leader {
                self.round(term).await;
            }
            tokio::time::sleep(MIN_GAP).await;
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(period) => {}
            }
        }
    }

    /// One round of every controller, as the leader of `term`.
    pub async fn round(&mut self, term: u64) {
        self.expire_leases(term).await;
        self.place(term).await;
        self.release_holds().await;
        self.replace_replicas(term).await;
        self.evacuate_replicas(term).await;
        self.ipam.round(&self.admin).await;
        self.migrations.round(&self.admin, term).await;
        self.volumes.round(&self.admin, term).await;
        self.standalone_ha
            .round(&self.admin, &self.leases, &self.tuning, term)
            .await;
        self.volume_moves.round(&self.admin, term).await;
    }

    /// VMs that were held off but no longer ask to run (stopped while
    /// they waited) lose their `Unschedulable` condition: nothing waits
    /// for a node any more, and no node reports them to replace it.
    async fn release_holds(&mut self) {
        let released = {
            let machine = self.admin.shared().read();
            released_holds(&machine.state)
        };
        for vm in write_statuses(&self.admin, released).await {
            tracing::info!(%vm, "a VM that was held off no longer asks to run");
            self.held.remove(&vm);
        }
    }

    /// Marks each node whose lease ran out not ready; then its lease is
    /// gone and it counts as lost.
    async fn expire_leases(&mut self, term: u64) {
        let now = Instant::now();
        let lease = self.lease();
        let expired = {
            let machine = self.admin.shared().read();
            let state = &machine.state;
            let synced = self.leases_synced;
            let applied = machine.applied_index();
            let expired = self.leases.with_term(term, state, lease, |table| {
                // Only the nodes changed since the last round; every node
                // after a new term, or when the history does not reach
                // back (a snapshot replaced the state).
                let changed = match synced {
                    Some((t, index)) if t == term => machine
                        .history
                        .since(index, Some(Kind::Node), usize::MAX)
                        .ok(),
                    _ => None,
                };
                match changed {
                    Some(changes) => {
                        let names: BTreeSet<&str> =
                            changes.iter().map(|c| c.object.name()).collect();
                        for name in names {
                            let view = node_view(state, name);
                            table.sync_node(name, view.as_ref(), now, lease);
                        }
                    }
                    None => table.sync(&node_views(state), now, lease),
                }
                table.expire(now)
            });
            self.leases_synced = Some((term, applied));
            expired
        };
        for (name, uid) in expired {
            let node = {
                let machine = self.admin.shared().read();
                match machine.state.get(Kind::Node, &name) {
                    Some(Object::Node(node)) if node.meta.uid == uid && node.status.is_ready() => {
                        Some(node.clone())
                    }
                    _ => None,
                }
            };
            let fenced = match node {
                None => true,
                Some(mut node) => {
                    set_condition(
                        &mut node.status.conditions,
                        Condition {
                            kind: Condition::READY.into(),
                            status: false,
                            reason: "LeaseExpired".into(),
                            message: format!("no heartbeat acknowledged for {} s", lease.as_secs()),
                            last_transition_unix_ms: now_unix_ms(),
                        },
                    );
                    match self.admin.write(Command::Update(Object::Node(node))).await {
                        Ok(_) => {
                            tracing::warn!(node = %name, "lease expired: node marked not ready");
                            true
                        }
                        Err(err) => {
                            tracing::info!(node = %name, error = %err, "marking a node not ready failed; will retry");
                            false
                        }
                    }
                }
            };
            if fenced {
                let machine = self.admin.shared().read();
                self.leases.with_term(term, &machine.state, lease, |table| {
                    table.fenced(&name, &uid)
                });
            }
        }
    }

    /// HA and placement in one plan: the VMs of nodes lost for longer than
    /// `ha_after_ms`, and running VMs without a placement, are planned onto
    /// ready nodes; moved placements get `epoch + 1`, new ones epoch 1.
    /// Placements of deleted VMs are removed.
    async fn place(&mut self, term: u64) {
        let now = Instant::now();
        let ha_after = Duration::from_millis(self.tuning.ha_after_ms);
        let lease = self.lease();
        let (nodes, vms, kept, moving, orphans, endpoints, pins, accepted) = {
            let machine = self.admin.shared().read();
            let state = &machine.state;
            // The lost nodes are the table's (a few), not a scan of every
            // node; each is checked against the state.
            let evacuate: BTreeSet<String> = self.leases.with_term(term, state, lease, |table| {
                table
                    .lost()
                    .filter(|(_, since)| now.duration_since(*since) >= ha_after)
                    .filter(|(name, _)| {
                        matches!(state.get(Kind::Node, name), Some(Object::Node(n)) if !n.status.is_ready())
                    })
                    .map(|(name, _)| name.to_owned())
                    .collect()
            });
            // Placements on removed nodes move `ha_after` after this
            // leader first saw them.
            if self.gone_term != term {
                self.gone.clear();
                self.gone_term = term;
            }
            let missing: BTreeSet<String> = state
                .list(Kind::Placement)
                .filter_map(|o| match o {
                    Object::Placement(p) if state.get(Kind::Node, &p.node).is_none() => {
                        Some(p.node.clone())
                    }
                    _ => None,
                })
                .collect();
            self.gone.retain(|node, _| missing.contains(node));
            let mut evacuate = evacuate;
            for node in missing {
                let since = *self.gone.entry(node.clone()).or_insert(now);
                if now.duration_since(since) >= ha_after {
                    evacuate.insert(node);
                }
            }
            // Evicted VMs that their node reported stopped move now.
            let evicted: BTreeSet<String> = state
                .list(Kind::Placement)
                .filter_map(|o| match o {
                    Object::Placement(p) if p.is_evicting() && stopped_on(state, p) => {
                        Some(p.vm.clone())
                    }
                    _ => None,
                })
                .collect();
            // Most rounds have nothing to do: find out before copying
            // every node.
            let placed_vms: BTreeSet<&str> = state
                .list(Kind::Placement)
                .filter_map(|o| match o {
                    Object::Placement(p) => Some(p.vm.as_str()),
                    _ => None,
                })
                .collect();
            let unplaced = state.list(Kind::Vm).any(|o| {
                matches!(o, Object::Vm(vm) if vm.spec.running && !placed_vms.contains(vm.meta.name.as_str()))
            });
            let orphaned = placed_vms
                .iter()
                .any(|vm| state.get(Kind::Vm, vm).is_none());
            let stranded = state
                .list(Kind::Placement)
                .any(|o| matches!(o, Object::Placement(p) if evacuate.contains(&p.node)));
            if !unplaced && !orphaned && !stranded && evicted.is_empty() {
                return;
            }
            // A node VMs are evicted from is no target for them.
            let sources: BTreeSet<&str> = state
                .list(Kind::Placement)
                .filter_map(|o| match o {
                    Object::Placement(p) if evicted.contains(&p.vm) => Some(p.node.as_str()),
                    _ => None,
                })
                .collect();
            let nodes: Vec<Node> = state
                .list(Kind::Node)
                .filter_map(|o| Node::try_from(o.clone()).ok())
                .map(|mut n| {
                    if sources.contains(n.meta.name.as_str()) {
                        n.spec.cordoned = true;
                    }
                    n
                })
                .collect();
            let all_vms: BTreeMap<&str, &Vm> = state
                .list(Kind::Vm)
                .filter_map(|o| match o {
                    Object::Vm(vm) => Some((vm.meta.name.as_str(), vm)),
                    _ => None,
                })
                .collect();
            let mut kept = Vec::new();
            let mut moving = BTreeMap::new();
            let mut orphans = Vec::new();
            for object in state.list(Kind::Placement) {
                let Object::Placement(p) = object else {
                    continue;
                };
                if !all_vms.contains_key(p.vm.as_str()) {
                    orphans.push(p.clone());
                } else if evacuate.contains(&p.node) || evicted.contains(&p.vm) {
                    moving.insert(p.vm.clone(), p.clone());
                } else {
                    kept.push(p.clone());
                }
            }
            let placed: BTreeSet<&str> = kept.iter().map(|p| p.vm.as_str()).collect();
            // The node whose copies the operator accepted, per VM that
            // moves, with the VM when the fence marked those copies
            // outdated (the move clears the mark it overrides).
            let accepted: BTreeMap<String, (String, Option<Vm>)> = moving
                .values()
                .filter_map(|p: &Placement| {
                    let vm = all_vms.get(p.vm.as_str())?;
                    let node = vm.accepted_copy(p.epoch)?;
                    let marked = vm.status.is_outdated_on(node).then(|| (*vm).clone());
                    Some((p.vm.clone(), (node.to_owned(), marked)))
                })
                .collect();
            // The disks' volumes, for the VMs that move.
            let disk_volumes = if moving.is_empty() {
                crate::volumes::DiskVolumes::new()
            } else {
                crate::volumes::disk_volumes(state)
            };
            let vms: Vec<Vm> = all_vms
                .values()
                .filter(|vm| {
                    placed.contains(vm.meta.name.as_str())
                        || moving.contains_key(&vm.meta.name)
                        || vm.spec.running
                })
                .map(|vm| {
                    let mut view = scheduler::planning_view(vm);
                    if let Some(current) = moving.get(&vm.meta.name) {
                        // A copy still filling (a lost copy's replacement,
                        // a resync) would give the guest half a disk: the
                        // planner reads it as outdated (decision 84).
                        for node in unfinished_copies(vm, current, &disk_volumes) {
                            if !view.status.is_outdated_on(&node) {
                                view.status.outdated_replicas.push(node);
                            }
                        }
                        // Copies the operator accepted as they are count
                        // as neither unfinished nor outdated, even if the
                        // fence marked them (their fill marks them so,
                        // decision 91).
                        if let Some((node, _)) = accepted.get(&vm.meta.name) {
                            view.status.outdated_replicas.retain(|n| n != node);
                        }
                    }
                    view
                })
                .collect();
            // First placements of VMs with disks cloned from volumes, or
            // that are volumes, go where the volumes are (decisions 64
            // and 76).
            let pins = crate::disk_sources::pins(
                state,
                vms.iter().filter(|vm| {
                    !placed.contains(vm.meta.name.as_str()) && !moving.contains_key(&vm.meta.name)
                }),
            );
            // The active endpoints of the VMs that move, to fence with them.
            let mut endpoints: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
            for object in state.list(Kind::Endpoint) {
                if let Object::Endpoint(e) = object
                    && e.release_at_unix_ms == 0
                    && moving.contains_key(&e.vm)
                    && all_vms
                        .get(e.vm.as_str())
                        .is_some_and(|vm| vm.meta.uid == e.vm_uid)
                {
                    endpoints.entry(e.vm.clone()).or_default().push(e.clone());
                }
            }
            (nodes, vms, kept, moving, orphans, endpoints, pins, accepted)
        };

        for orphan in orphans {
            let name = orphan.meta.name.clone();
            match self
                .admin
                .write(Command::Delete {
                    kind: Kind::Placement,
                    name: name.clone(),
                    expected_resource_version: Some(orphan.meta.resource_version),
                    force: false,
                })
                .await
            {
                Ok(_) => tracing::info!(vm = %name, "removed the placement of a deleted VM"),
                Err(err) => {
                    tracing::debug!(vm = %name, error = %err, "removing an orphaned placement failed; will retry")
                }
            }
        }

        let pending = vms.len().saturating_sub(kept.len());
        if pending == 0 {
            return;
        }
        let moves: Vec<Placement> = moving.values().cloned().collect();
        let plan = scheduler::plan_pinned(
            &nodes,
            &vms,
            &kept,
            &moves,
            &pins,
            Overcommit::default(),
            term,
        );
        let mut creates = Vec::new();
        for (vm, node) in &plan.placements {
            let result = match moving.get(vm) {
                Some(current) => {
                    let mut moved = Placement {
                        node: node.clone(),
                        epoch: current.epoch + 1,
                        ..current.clone()
                    };
                    moved.meta.labels.remove(Placement::EVICT_LABEL);
                    moved.meta.labels.remove(Placement::FORCED_COPY_LABEL);
                    let mut batch = Vec::new();
                    if let Some((accepted_node, marked)) = accepted.get(vm)
                        && accepted_node == node
                    {
                        // Onto the copies the operator accepted: their
                        // node attaches them with force, and the fence's
                        // mark on them goes with the move (decision 91).
                        moved
                            .meta
                            .labels
                            .insert(Placement::FORCED_COPY_LABEL.into(), moved.epoch.to_string());
                        if let Some(marked) = marked {
                            let mut cleared = marked.clone();
                            cleared.status.outdated_replicas.retain(|n| n != node);
                            batch.push(Command::Update(Object::Vm(cleared)));
                        }
                    }
                    batch.push(Command::Update(Object::Placement(moved)));
                    for endpoint in endpoints.get(vm).into_iter().flatten() {
                        let mut fenced = endpoint.clone();
                        fenced.node = node.clone();
                        fenced.epoch = current.epoch + 1;
                        batch.push(Command::Update(Object::Endpoint(fenced)));
                    }
                    let done = self.admin.write(Command::Batch(batch)).await;
                    if done.is_ok() {
                        tracing::warn!(%vm, from = %current.node, to = %node, epoch = current.epoch + 1, evicted = current.is_evicting(), "moved a VM off its node");
                    }
                    done
                }
                None => {
                    creates.push(Placement {
                        meta: ObjectMeta::named(vm.clone()),
                        vm: vm.clone(),
                        node: node.clone(),
                        // Past an attached volume's epoch (decision 76).
                        epoch: pins.get(vm).map_or(1, |p| p.epoch.max(1)),
                        replica_nodes: plan.replica_nodes.get(vm).cloned().unwrap_or_default(),
                    });
                    continue;
                }
            };
            match result {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => {
                    self.unschedulable.remove(vm);
                }
                Err(err) => {
                    tracing::info!(%vm, %node, error = %err, "writing a placement failed; will retry");
                }
            }
        }
        for vm in create_placements(&self.admin, creates).await {
            self.unschedulable.remove(&vm);
        }
        let now = Instant::now();
        self.held
            .retain(|_, at| now.duration_since(*at) < REASON_REFRESH);
        let held = {
            let machine = self.admin.shared().read();
            held_off(
                &machine.state,
                &plan.unschedulable,
                |vm| self.held.contains_key(vm),
                now_unix_ms(),
            )
        };
        for vm in write_statuses(&self.admin, held).await {
            self.held.insert(vm, now);
        }
        for (vm, reason) in plan.unschedulable {
            if self.unschedulable.get(&vm) != Some(&reason) {
                tracing::warn!(%vm, %reason, "no node fits the VM");
                self.unschedulable.insert(vm, reason);
            }
        }
    }
}

impl Controllers {
    /// Replacement replicas: a placement whose replica nodes name a node
    /// lost for `nodes.replica_replace_after_ms` (not ready since its last
    /// acknowledged heartbeat, or since this leader's election), or
    /// removed (decommissioned, at once: decision 51), gets another node in its
    /// place, chosen by [`scheduler::plan_replacements`], written by
    /// compare-and-swap with the same node and epoch: the primary does
    /// not move, so the volumes' epoch does not change (decisions 36, 43).
    /// The new node's agent attaches an empty secondary at that epoch;
    /// the primary's agent attaches the new peer and its full sync fills
    /// it. VMs with a live migration under way are left for later.
    async fn replace_replicas(&mut self, term: u64) {
        let now = Instant::now();
        let after = Duration::from_millis(self.tuning.replica_replace_after_ms);
        let lease = self.lease();
        let (nodes, vms, placements, lost) = {
            let machine = self.admin.shared().read();
            let state = &machine.state;
            if self.gone_term != term {
                self.gone.clear();
                self.gone_term = term;
            }
            // Replica nodes other than the VM's own: the copies that can
            // be replaced.
            let holders: BTreeSet<&str> = state
                .list(Kind::Placement)
                .filter_map(|o| match o {
                    Object::Placement(p) => Some(p),
                    _ => None,
                })
                .flat_map(|p| {
                    p.replica_nodes
                        .iter()
                        .filter(move |n| **n != p.node)
                        .map(String::as_str)
                })
                .collect();
            // A removed node (decommissioned: its object deleted) is not
            // coming back: its copies are replaced at once (decision 51).
            let mut lost: BTreeSet<String> = holders
                .iter()
                .filter(|n| state.get(Kind::Node, n).is_none())
                .map(|n| (*n).to_owned())
                .collect();
            let unready: Vec<&str> = holders
                .iter()
                .copied()
                .filter(|n| {
                    matches!(state.get(Kind::Node, n), Some(Object::Node(node)) if !node.status.is_ready())
                })
                .collect();
            if !unready.is_empty() {
                self.leases.with_term(term, state, lease, |table| {
                    for node in unready {
                        if table
                            .lost_since(node)
                            .is_some_and(|since| now.duration_since(since) >= after)
                        {
                            lost.insert(node.to_owned());
                        }
                    }
                });
            }
            if lost.is_empty() {
                self.unreplaced.clear();
                return;
            }
            let migrating: BTreeSet<&str> = state
                .list(Kind::Migration)
                .filter_map(|o| match o {
                    Object::Migration(m) if !m.status.phase.is_terminal() => {
                        Some(m.spec.vm.as_str())
                    }
                    _ => None,
                })
                .collect();
            let (nodes, vms, mut placements) = crate::replica_moves::replica_inputs(state);
            placements.retain(|p| !migrating.contains(p.vm.as_str()));
            (nodes, vms, placements, lost)
        };
        let plan = scheduler::plan_replacements(&nodes, &vms, &placements, &lost, term);
        let by_vm: HashMap<&str, &Placement> =
            placements.iter().map(|p| (p.vm.as_str(), p)).collect();
        for (vm, replicas) in plan.replaced {
            let Some(current) = by_vm.get(vm.as_str()) else {
                continue;
            };
            self.write_replica_nodes(current, replicas, "replaced lost replica nodes")
                .await;
        }
        let reasons: HashMap<String, String> = plan.unschedulable.into_iter().collect();
        for (vm, reason) in &reasons {
            if self.unreplaced.get(vm) != Some(reason) {
                tracing::warn!(%vm, %reason, "a lost replica cannot be replaced yet");
            }
        }
        self.unreplaced = reasons;
    }
}

impl Controllers {
    /// Writes `replicas` as `current`'s replica nodes, by compare-and-swap
    /// with the same node and epoch; an outdated mark (decision 44) on a
    /// node that leaves goes with it, in the same entry (that node holds
    /// no copy any more, so the primary's agent would never clear it).
    /// Logs `what` once written; a failure is retried by the next round.
    async fn write_replica_nodes(&self, current: &Placement, replicas: Vec<String>, what: &str) {
        let vm = current.vm.as_str();
        let updated = Placement {
            replica_nodes: replicas.clone(),
            ..current.clone()
        };
        let mut batch = vec![Command::Update(Object::Placement(updated))];
        let dropped: Vec<&String> = current
            .replica_nodes
            .iter()
            .filter(|n| !replicas.contains(n))
            .collect();
        let marked = {
            let machine = self.admin.shared().read();
            match machine.state.get(Kind::Vm, vm) {
                Some(Object::Vm(v))
                    if v.status
                        .outdated_replicas
                        .iter()
                        .any(|n| dropped.contains(&n)) =>
                {
                    Some(v.clone())
                }
                _ => None,
            }
        };
        if let Some(mut marked) = marked {
            marked
                .status
                .outdated_replicas
                .retain(|n| !dropped.contains(&n));
            batch.push(Command::Update(Object::Vm(marked)));
        }
        let command = if batch.len() == 1 {
            batch.remove(0)
        } else {
            Command::Batch(batch)
        };
        match self.admin.write(command).await {
            Ok(_) => {
                tracing::warn!(%vm, from = ?current.replica_nodes, to = ?replicas, epoch = current.epoch, "{what}");
            }
            Err(err) => {
                tracing::info!(%vm, error = %err, "writing replica nodes failed; will retry");
            }
        }
    }

    /// The copies of VMs' replicated disks on nodes labelled
    /// [`Node::EVACUATE_LABEL`] (`basalt node drain`): a new node added,
    /// then, once it is in sync, the evacuating node dropped
    /// ([`crate::replica_moves`], decision 82).
    async fn evacuate_replicas(&mut self, term: u64) {
        let plan = {
            let machine = self.admin.shared().read();
            let evacuate = crate::volume_moves::evacuating(&machine.state);
            crate::replica_moves::plan(&machine.state, &evacuate, term)
        };
        for (current, replicas) in &plan.moves {
            let what = if replicas.len() > current.replica_nodes.len() {
                "added a replica node in place of an evacuating one"
            } else {
                "dropped an evacuating replica node"
            };
            self.write_replica_nodes(current, replicas.clone(), what)
                .await;
        }
        let reasons: HashMap<String, String> = plan.stuck.into_iter().collect();
        for (vm, reason) in &reasons {
            if self.unevacuated.get(vm) != Some(reason) {
                tracing::info!(%vm, %reason, "a copy cannot leave an evacuating node yet");
            }
        }
        self.unevacuated = reasons;
    }
}

/// Writes new placements (epoch 1), [`PLACEMENT_BATCH`] to a Raft entry
/// and [`BATCHES_IN_FLIGHT`] entries at a time, so a large plan costs a
/// few log entries and fsyncs instead of one per VM. A batch is applied
/// whole or not at all; a refused one (a placement that exists already, a
/// VM deleted meanwhile) is written again one placement at a time, so one
/// conflict holds back no other VM. Returns the VMs that have a placement
/// now (written, or found existing: placed by an earlier write).
async fn create_placements(admin: &AdminService, creates: Vec<Placement>) -> Vec<String> {
    let batches: Vec<Vec<Placement>> = creates
        .chunks(PLACEMENT_BATCH)
        .map(<[Placement]>::to_vec)
        .collect();
    let written: Vec<Vec<String>> = futures::stream::iter(batches)
        .map(|batch| create_batch(admin, batch))
        .buffer_unordered(BATCHES_IN_FLIGHT)
        .collect()
        .await;
    written.into_iter().flatten().collect()
}

/// One batch of [`create_placements`].
async fn create_batch(admin: &AdminService, batch: Vec<Placement>) -> Vec<String> {
    // Stamped here: the proposer stamps only a top-level create.
    let commands = batch
        .iter()
        .map(|p| stamp(Command::Create(Object::Placement(p.clone()))))
        .collect();
    if batch.len() > 1 {
        match admin.write(Command::Batch(commands)).await {
            Ok(_) => {
                for p in &batch {
                    tracing::info!(vm = %p.vm, node = %p.node, "placed a VM");
                }
                return batch.into_iter().map(|p| p.vm).collect();
            }
            Err(err) => {
                tracing::debug!(count = batch.len(), error = %err, "a batch of placements was refused; writing them one by one");
            }
        }
    }
    let mut placed = Vec::new();
    for p in batch {
        match admin
            .write(Command::Create(Object::Placement(p.clone())))
            .await
        {
            Ok(_) => {
                tracing::info!(vm = %p.vm, node = %p.node, "placed a VM");
                placed.push(p.vm);
            }
            Err(ApiError::AlreadyExists { .. }) => placed.push(p.vm),
            Err(err) => {
                tracing::info!(vm = %p.vm, node = %p.node, error = %err, "writing a placement failed; will retry");
            }
        }
    }
    placed
}

/// The VMs of `unschedulable` (the scheduler's VM → why no node fits)
/// whose status does not say so yet, with `Ready` false, reason
/// `Unschedulable` and that reason as the message, as a standalone volume
/// no node can take shows it: what `basalt vm get` tells an operator
/// while the VM waits. A VM whose status already says `Unschedulable`
/// with another message (the scheduler's counts change as nodes come and
/// go) gets the new one unless `recent` says its reason was written
/// lately, so waiting VMs cost at most one write each per
/// [`REASON_REFRESH`]. The VM's node replaces the condition with its own
/// when it reports the VM.
fn held_off(
    state: &crate::state::State,
    unschedulable: &[(String, String)],
    recent: impl Fn(&str) -> bool,
    now_unix_ms: u64,
) -> Vec<Vm> {
    unschedulable
        .iter()
        .filter_map(|(name, reason)| {
            let Some(Object::Vm(vm)) = state.get(Kind::Vm, name) else {
                return None;
            };
            let said = vm
                .status
                .conditions
                .iter()
                .find(|c| c.kind == Condition::READY && !c.status && c.reason == UNSCHEDULABLE);
            if said.is_some_and(|c| c.message == *reason || recent(name)) {
                return None;
            }
            let mut held = vm.clone();
            set_condition(
                &mut held.status.conditions,
                Condition {
                    kind: Condition::READY.into(),
                    status: false,
                    reason: UNSCHEDULABLE.into(),
                    message: reason.clone(),
                    last_transition_unix_ms: now_unix_ms,
                },
            );
            Some(held)
        })
        .collect()
}

/// The VMs whose status says `Unschedulable` but which no longer ask to
/// run and have no placement, without that condition (see
/// [`Controllers::release_holds`]).
fn released_holds(state: &crate::state::State) -> Vec<Vm> {
    let held = |vm: &Vm| {
        vm.status
            .conditions
            .iter()
            .any(|c| c.kind == Condition::READY && !c.status && c.reason == UNSCHEDULABLE)
    };
    state
        .list(Kind::Vm)
        .filter_map(|o| match o {
            Object::Vm(vm)
                if !vm.spec.running
                    && held(vm)
                    && state.get(Kind::Placement, &vm.meta.name).is_none() =>
            {
                let mut released = vm.clone();
                released
                    .status
                    .conditions
                    .retain(|c| !(c.kind == Condition::READY && c.reason == UNSCHEDULABLE));
                Some(released)
            }
            _ => None,
        })
        .collect()
}

/// Writes `vms` (their statuses changed) by compare-and-swap,
/// [`PLACEMENT_BATCH`] to a Raft entry; returns the names of those
/// written. A refused entry (a VM changed meanwhile) is decided again at
/// the next round.
async fn write_statuses(admin: &AdminService, vms: Vec<Vm>) -> Vec<String> {
    let mut written = Vec::new();
    for chunk in vms.chunks(PLACEMENT_BATCH) {
        let mut batch: Vec<Command> = chunk
            .iter()
            .map(|vm| Command::Update(Object::Vm(vm.clone())))
            .collect();
        let command = if batch.len() == 1 {
            batch.remove(0)
        } else {
            Command::Batch(batch)
        };
        match admin.write(command).await {
            Ok(_) => written.extend(chunk.iter().map(|vm| vm.meta.name.clone())),
            Err(err) => {
                tracing::debug!(count = chunk.len(), error = %err, "recording why VMs wait failed; will retry");
            }
        }
    }
    written
}

/// What the state says about node `name` now, for the lease table
/// (`None`: there is no such node).
fn node_view(state: &crate::state::State, name: &str) -> Option<NodeView> {
    match state.get(Kind::Node, name) {
        Some(Object::Node(node)) => Some(NodeView {
            name: node.meta.name.clone(),
            uid: node.meta.uid.clone(),
            ready: node.status.is_ready(),
        }),
        _ => None,
    }
}

/// Whether the VM of placement `p` was reported stopped (or failed) by
/// the node it is placed on, or does not want to run at all and never
/// reported running there: then moving it cannot run it twice.
fn stopped_on(state: &crate::state::State, p: &Placement) -> bool {
    let Some(Object::Vm(vm)) = state.get(Kind::Vm, &p.vm) else {
        return false;
    };
    // A status from before the latest spec change (e.g. a start) proves
    // nothing about what runs now.
    let current = vm.status.observed_generation >= vm.meta.generation;
    let reported_here = current && vm.status.node.as_deref() == Some(p.node.as_str());
    match vm.status.phase {
        VmPhase::Stopped | VmPhase::Failed => reported_here,
        VmPhase::Pending | VmPhase::Scheduled => vm.status.node.is_none() && !vm.spec.running,
        _ => false,
    }
}

/// The replica nodes of `placement` (of `vm`) whose copy of some
/// replicated disk does not hold the data yet, by the disks' volumes as
/// the primary last reported them at the placement's epoch
/// ([`basalt_api::VolumeStatus::unfinished`]). The caller lets the copies
/// an operator accepted ([`Vm::accepted_copy`]) count as finished.
fn unfinished_copies(
    vm: &Vm,
    placement: &Placement,
    volumes: &crate::volumes::DiskVolumes<'_>,
) -> Vec<String> {
    let volumes: Vec<&basalt_api::Volume> = vm
        .spec
        .disks
        .iter()
        .filter(|d| d.replicas >= 2)
        .filter_map(|d| {
            volumes
                .get(&(vm.meta.uid.as_str(), d.name.as_str()))
                .copied()
        })
        .filter(|v| v.status.epoch == placement.epoch)
        .collect();
    placement
        .replica_nodes
        .iter()
        .filter(|node| volumes.iter().any(|v| v.status.unfinished(node).is_some()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use basalt_api::VmSpec;

    use super::*;
    use crate::state::State;

    fn state_with(vm: &str) -> State {
        let mut state = State::default();
        let vm = Vm {
            meta: ObjectMeta::named(vm),
            spec: VmSpec {
                cpus: 1,
                memory_mib: 128,
                running: true,
                ..VmSpec::default()
            },
            ..Vm::default()
        };
        state
            .apply(1, Command::Create(Object::Vm(vm)))
            .expect("create the vm");
        state
    }

    fn why(vm: &Vm) -> Option<(bool, &str, &str)> {
        vm.status
            .conditions
            .iter()
            .find(|c| c.kind == Condition::READY)
            .map(|c| (c.status, c.reason.as_str(), c.message.as_str()))
    }

    #[test]
    fn a_vm_no_node_takes_says_why_once_and_again_when_the_reason_changes_after_a_while() {
        let mut state = state_with("big");
        let full = [("big".to_owned(), "no node has 3072 MiB free".to_owned())];
        let never = |_: &str| false;
        let held = held_off(&state, &full, never, 1000);
        assert_eq!(held.len(), 1);
        assert_eq!(
            why(&held[0]),
            Some((false, "Unschedulable", "no node has 3072 MiB free"))
        );
        // Compare-and-swap on the version read: written as is.
        let version = held[0].meta.resource_version;
        assert_eq!(version, 1);
        state
            .apply(2, Command::Update(Object::Vm(held[0].clone())))
            .expect("record it");
        // Said already: nothing to write.
        assert!(held_off(&state, &full, never, 2000).is_empty());
        // Another reason: written again, the transition time kept.
        let pinned = [(
            "big".to_owned(),
            "disk \"root\" is a clone of volume \"golden\", whose primary copy is on node \"a\", which cannot take it".to_owned(),
        )];
        // Written lately: the new reason waits for the refresh.
        assert!(held_off(&state, &pinned, |vm: &str| vm == "big", 2500).is_empty());
        let again = held_off(&state, &pinned, never, 3000);
        assert_eq!(again.len(), 1);
        let (status, reason, message) = why(&again[0]).expect("a Ready condition");
        assert!(!status && reason == "Unschedulable" && message.contains("node \"a\""));
        assert_eq!(again[0].status.conditions[0].last_transition_unix_ms, 1000);
        // A VM that is gone, or not named, gets nothing.
        let gone = [("ghost".to_owned(), "no node".to_owned())];
        assert!(held_off(&state, &gone, never, 4000).is_empty());
        assert!(held_off(&state, &[], never, 4000).is_empty());
    }

    #[test]
    fn a_held_off_vm_that_is_stopped_loses_its_unschedulable_condition() {
        let mut state = state_with("big");
        let full = [("big".to_owned(), "no node has 3072 MiB free".to_owned())];
        let held = held_off(&state, &full, |_: &str| false, 1000);
        state
            .apply(2, Command::Update(Object::Vm(held[0].clone())))
            .expect("record it");
        // Still asking to run: the condition stands.
        assert!(released_holds(&state).is_empty());
        let Some(Object::Vm(mut vm)) = state.get(Kind::Vm, "big").cloned() else {
            panic!("the vm")
        };
        vm.spec.running = false;
        state
            .apply(3, Command::Update(Object::Vm(vm)))
            .expect("stop it");
        let released = released_holds(&state);
        assert_eq!(released.len(), 1);
        assert_eq!(why(&released[0]), None, "the condition is gone");
        state
            .apply(4, Command::Update(Object::Vm(released[0].clone())))
            .expect("write it");
        assert!(released_holds(&state).is_empty(), "written once");
    }
}
