//! Volumes: the control plane's record of every VM disk as a [`Volume`]
//! object — the operator's view of a replicated disk, and the home of each
//! copy's state (decision 52).
//!
//! - The volume controller ([`VolumeController`], on the leader, a round
//!   after every change) keeps one volume per VM disk: created for a new
//!   VM's disks, its spec following the disk's (size, copies, image), its
//!   status following the VM's placement (epoch, primary node, replica
//!   nodes) and the storage fence's marks in the VM's status (each copy's
//!   `outdated`), and deleted with the VM. [`plan`] decides, purely; the
//!   round writes by compare-and-swap.
//! - The same controller places standalone volumes (decision 61,
//!   [`place_standalone`]): the scheduler's replica-node choice picks
//!   their nodes, the first the primary, at epoch 1; the agents of those
//!   nodes make the copies.
//! - The agent of every node holding a copy reports how the copies stand,
//!   as its storage process sees them ([`record_report`], behind the
//!   agent service's `ReportVolume`): the report is merged into the
//!   status ([`apply_report`]: the primary's view of every copy, each
//!   node's view of its own) and written only when it changed something.
//! - [`check`] refuses, on apply, a VM update that shrinks a disk and a
//!   volume update that shrinks a volume (`INVALID_ARGUMENT` naming the
//!   field), and a volume created for a VM that does not exist or from a
//!   source volume that does not exist;
//!   [`check_delete`] refuses to delete a volume that is a disk of a VM
//!   that still has it (the volume goes with the VM or the disk).
//!
//! Invariants:
//! - the fencing path does not read volumes: placements (`replica_nodes`)
//!   and the VM's `outdated_replicas` stay the source of truth for the
//!   scheduler and the storage fence; a volume mirrors them;
//! - a copy's sync state is set only by the primary's report (a copy's
//!   own node adds its view of it), a report from a node holding no copy
//!   is refused, and copies' reported states are dropped when the epoch
//!   changes (a new primary reports afresh);
//! - a volume's size never shrinks; the name of a VM disk's volume is
//!   `VM-DISK` (or, when that is taken or too long, its pool name).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use basalt_api::{
    ApiError, Condition, Disk, Kind, Node, Object, ObjectMeta, Placement, ReplicaReport,
    ReplicaState, Vm, VmPhase, Volume, VolumeOwner, VolumeReplica, VolumeReport, VolumeSpec,
    VolumeStatus,
};
use futures::StreamExt as _;

use crate::admin::AdminService;
use crate::agent::now_unix_ms;
use crate::scheduler::{self, Overcommit};
use crate::state::{Command, Refusal, State, set_condition};

/// How often the controller compares every VM with its volumes, whatever
/// the change history showed.
pub const FULL_RESYNC: Duration = Duration::from_secs(60);
/// Volume writes in flight at once (the proposer batches them into
/// shared Raft entries).
const WRITES_IN_FLIGHT: usize = 64;
/// How often a report retries a compare-and-swap conflict.
const REPORT_RETRIES: usize = 8;

/// What the controller should write, and the VMs it left for a later
/// round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Each write, with the VM it is for (empty for a standalone
    /// volume's placement).
    pub writes: Vec<(String, Command)>,
    /// VMs whose new volume waits for a name being freed this round.
    pub deferred: Vec<String>,
}

/// The object as a volume, when it is one.
fn as_volume(object: &Object) -> Option<&Volume> {
    match object {
        Object::Volume(v) => Some(v),
        _ => None,
    }
}

/// VM disks' volumes, by (VM uid, disk name): how a VM's disk finds its
/// volume. Volumes that are no VM's disk are left out.
pub type DiskVolumes<'a> = HashMap<(&'a str, &'a str), &'a Volume>;

/// [`DiskVolumes`] of `volumes`.
pub fn by_disk<'a>(volumes: impl IntoIterator<Item = &'a Volume>) -> DiskVolumes<'a> {
    volumes
        .into_iter()
        .filter_map(|v| {
            let owner = v.spec.owner.as_ref()?;
            Some(((owner.vm_uid.as_str(), owner.disk.as_str()), v))
        })
        .collect()
}

/// [`DiskVolumes`] of every volume in `state`.
pub fn disk_volumes(state: &State) -> DiskVolumes<'_> {
    by_disk(state.list(Kind::Volume).filter_map(as_volume))
}

/// The object as a VM, when it is one.
fn as_vm(object: &Object) -> Option<&Vm> {
    match object {
        Object::Vm(vm) => Some(vm),
        _ => None,
    }
}

/// The object as a placement, when it is one.
fn as_placement(object: &Object) -> Option<&Placement> {
    match object {
        Object::Placement(p) => Some(p),
        _ => None,
    }
}

/// The object as a node, when it is one.
fn as_node(object: &Object) -> Option<&Node> {
    match object {
        Object::Node(n) => Some(n),
        _ => None,
    }
}

/// The VM an object's change concerns, for the controller.
fn concerned_vm(object: &Object) -> Option<String> {
    match object {
        Object::Vm(vm) => Some(vm.meta.name.clone()),
        Object::Placement(p) => Some(p.vm.clone()),
        Object::Volume(v) => v.spec.owner.as_ref().map(|o| o.vm.clone()),
        _ => None,
    }
}

/// The writes that bring the volumes of the VMs named in `only` (every VM
/// when `None`) in line with their disks, placements and fence marks, at
/// `now_unix_ms`.
pub fn plan(state: &State, only: Option<&BTreeSet<String>>, now_unix_ms: u64) -> Plan {
    let concerned = |vm: &str| only.is_none_or(|names| names.contains(vm));
    let mut owned: BTreeMap<(String, String), &Volume> = BTreeMap::new();
    for volume in state.list(Kind::Volume).filter_map(as_volume) {
        if let Some(owner) = &volume.spec.owner
            && concerned(&owner.vm)
        {
            owned.insert((owner.vm_uid.clone(), owner.disk.clone()), volume);
        }
    }
    let vms: Vec<&Vm> = match only {
        Some(names) => names
            .iter()
            .filter_map(|name| state.get(Kind::Vm, name).and_then(as_vm))
            .collect(),
        None => state.list(Kind::Vm).filter_map(as_vm).collect(),
    };
    let mut wanted = Vec::new();
    for vm in vms {
        let placement = state
            .get(Kind::Placement, &vm.meta.name)
            .and_then(as_placement);
        for disk in &vm.spec.disks {
            let mut existing = owned.remove(&(vm.meta.uid.clone(), disk.name.clone()));
            // A volume the disk attaches becomes the disk's once the VM is
            // placed (where the volume is, decision 76); until then it
            // stays as it is, standalone.
            if existing.is_none()
                && let Some(name) = &disk.attach
            {
                match state.get(Kind::Volume, name).and_then(as_volume) {
                    Some(v) if v.spec.owner.is_none() && placement.is_some() => existing = Some(v),
                    _ => continue,
                }
            }
            wanted.push((
                vm,
                desired(vm, disk, placement, existing, now_unix_ms),
                existing,
            ));
        }
    }
    let mut plan = Plan::default();
    // Whatever is left belongs to a VM that is gone (or was created again)
    // or to a disk that left its VM: deleted, or, when it was attached,
    // released (standalone again, where its copies are).
    let attached = |v: &Volume| v.spec.owner.as_ref().is_some_and(|o| o.attached);
    let freed: BTreeSet<&str> = owned
        .values()
        .filter(|v| !attached(v))
        .map(|v| v.meta.name.as_str())
        .collect();
    for volume in owned.values() {
        let vm = volume.spec.owner.as_ref().map(|o| o.vm.clone());
        // A disk removed from a VM that still runs: released only once
        // its guest let go of it (decision 78).
        if attached(volume)
            && let Some(holder) = holding_vm(state, volume)
        {
            tracing::debug!(volume = %volume.meta.name, vm = %holder.meta.name, "attached volume waits for its guest to let go");
            continue;
        }
        let write = if attached(volume) {
            let mut released = (*volume).clone();
            released.spec.owner = None;
            Command::Update(Object::Volume(released))
        } else {
            Command::Delete {
                kind: Kind::Volume,
                name: volume.meta.name.clone(),
                expected_resource_version: Some(volume.meta.resource_version),
                force: false,
            }
        };
        plan.writes.push((vm.unwrap_or_default(), write));
    }
    for (vm, mut volume, existing) in wanted {
        match existing {
            Some(existing) if *existing == volume => {}
            Some(_) => plan.writes.push((
                vm.meta.name.clone(),
                Command::Update(Object::Volume(volume)),
            )),
            None => {
                let disk = volume.spec.owner.as_ref().map(|o| o.disk.clone());
                let name = Volume::name_for_disk(&vm.meta.name, disk.as_deref().unwrap_or(""));
                let name = match name {
                    Some(name) if freed.contains(name.as_str()) => {
                        plan.deferred.push(vm.meta.name.clone());
                        continue;
                    }
                    Some(name) if state.get(Kind::Volume, &name).is_none() => name,
                    _ => volume.status.storage_name.clone(),
                };
                volume.meta = ObjectMeta::named(name);
                plan.writes.push((
                    vm.meta.name.clone(),
                    Command::Create(Object::Volume(volume)),
                ));
            }
        }
    }
    plan
}

/// The VM that may still have attached volume `volume` plugged in
/// although its disk left the VM's spec: the VM (same uid) exists, is not
/// stopped, and its node has not reported, for its current spec, a
/// running guest without the volume (`status.plugged_volumes`).
fn holding_vm<'a>(state: &'a State, volume: &Volume) -> Option<&'a Vm> {
    let owner = volume.spec.owner.as_ref()?;
    let vm = owner_vm(state, owner)?;
    let stopped = !vm.spec.running
        && matches!(
            vm.status.phase,
            VmPhase::Pending | VmPhase::Scheduled | VmPhase::Stopped | VmPhase::Failed
        );
    let let_go = vm.status.observed_generation >= vm.meta.generation
        && vm.status.phase == VmPhase::Running
        && !vm
            .status
            .plugged_volumes
            .contains(&volume.status.storage_name);
    (!stopped && !let_go).then_some(vm)
}

/// The first node `volume` asks for (`spec.nodes`) that does not exist,
/// with its index.
fn missing_node<'a>(state: &State, volume: &'a Volume) -> Option<(usize, &'a str)> {
    volume
        .spec
        .nodes
        .iter()
        .enumerate()
        .find(|(_, n)| state.get(Kind::Node, n).is_none())
        .map(|(i, n)| (i, n.as_str()))
}

/// Whether `volume` is a standalone volume (no VM disk, not made from a
/// source) that no node holds yet: the controller places it.
fn unplaced_standalone(volume: &Volume) -> bool {
    volume.spec.owner.is_none() && volume.spec.source.is_none() && volume.status.replicas.is_empty()
}

/// The scheduler's stand-in for a volume that is not a VM disk: a VM of
/// no CPU or memory with one disk of the volume's size and copies, named
/// so no VM can be (`volume/NAME`).
pub(crate) fn stand_in(volume: &Volume) -> Vm {
    let mut vm = Vm {
        meta: ObjectMeta::named(format!("volume/{}", volume.meta.name)),
        ..Vm::default()
    };
    vm.spec.disks = vec![Disk {
        name: "volume".into(),
        size_bytes: volume.spec.size_bytes,
        image: None,
        replicas: volume.spec.replicas,
        source_volume: None,
        attach: None,
        attached_storage_name: None,
        added_at_epoch: None,
        protocol: Default::default(),
    }];
    vm
}

/// The writes that place the standalone volumes no node holds yet
/// (decision 61): the scheduler's replica-node choice
/// ([`scheduler::plan`]), fed the VMs, their placements and the volumes
/// already placed (so their bytes count against each node's pool), picks
/// the nodes, unless the volume names them (`spec.nodes`, the operator's
/// choice, taken as it is); the first is the primary. Each placed volume gets its pool
/// name ([`Volume::made_storage_name`]), epoch 1, its primary and one entry per
/// copy; one that no node can take gets `Ready` false, `Unschedulable`,
/// with the scheduler's reason (written only when that changes).
pub fn place_standalone(state: &State, seed: u64, now_unix_ms: u64) -> Vec<Command> {
    let pending: Vec<&Volume> = state
        .list(Kind::Volume)
        .filter_map(as_volume)
        .filter(|v| unplaced_standalone(v))
        .collect();
    if pending.is_empty() {
        return Vec::new();
    }
    let nodes: Vec<Node> = state
        .list(Kind::Node)
        .filter_map(as_node)
        .cloned()
        .collect();
    let mut vms: Vec<Vm> = state
        .list(Kind::Vm)
        .filter_map(as_vm)
        .map(scheduler::planning_view)
        .collect();
    let mut placements: Vec<Placement> = state
        .list(Kind::Placement)
        .filter_map(as_placement)
        .cloned()
        .collect();
    for v in state.list(Kind::Volume).filter_map(as_volume) {
        if v.spec.owner.is_none() && !v.status.primary_node.is_empty() {
            let vm = stand_in(v);
            let replicated = v.status.replicas.len() >= 2;
            placements.push(Placement {
                meta: ObjectMeta::named(vm.meta.name.clone()),
                vm: vm.meta.name.clone(),
                node: v.status.primary_node.clone(),
                epoch: v.status.epoch,
                replica_nodes: if replicated {
                    v.status.replicas.iter().map(|r| r.node.clone()).collect()
                } else {
                    Vec::new()
                },
            });
            vms.push(vm);
        }
    }
    // Volumes that name their nodes are not the scheduler's to place.
    vms.extend(
        pending
            .iter()
            .filter(|v| v.spec.nodes.is_empty())
            .map(|v| stand_in(v)),
    );
    let plan = scheduler::plan(&nodes, &vms, &placements, Overcommit::default(), seed);
    let mut writes = Vec::new();
    for volume in pending {
        let key = stand_in(volume).meta.name;
        let mut placed = volume.clone();
        let missing = missing_node(state, volume).map(|(_, node)| node);
        let chosen = match (volume.spec.nodes.first(), missing) {
            (Some(node), None) => Some((node.clone(), volume.spec.nodes.clone())),
            (Some(_), Some(_)) => None,
            (None, _) => plan
                .placements
                .iter()
                .find(|(vm, _)| *vm == key)
                .map(|(_, node)| {
                    let copies = plan
                        .replica_nodes
                        .get(&key)
                        .cloned()
                        .unwrap_or_else(|| vec![node.clone()]);
                    (node.clone(), copies)
                }),
        };
        if let Some((node, mut copies)) = chosen {
            let node = &node;
            copies.sort();
            placed.status.storage_name = Volume::made_storage_name(&volume.meta.uid);
            placed.status.epoch = 1;
            placed.status.primary_node = node.clone();
            placed.status.replicas = copies
                .into_iter()
                .map(|copy| VolumeReplica {
                    primary: copy == *node,
                    node: copy,
                    ..VolumeReplica::default()
                })
                .collect();
            let condition = ready(&placed.status, now_unix_ms);
            set_condition(&mut placed.status.conditions, condition);
        } else {
            let reason = match missing {
                Some(node) => format!("node {node:?} named in spec.nodes does not exist"),
                None => plan
                    .unschedulable
                    .iter()
                    .find(|(vm, _)| *vm == key)
                    .map_or_else(|| "no node fits".to_owned(), |(_, why)| why.clone()),
            };
            let unchanged = volume.status.conditions.iter().any(|c| {
                c.kind == Condition::READY && c.reason == "Unschedulable" && c.message == reason
            });
            if unchanged {
                continue;
            }
            set_condition(
                &mut placed.status.conditions,
                Condition {
                    kind: Condition::READY.into(),
                    status: false,
                    reason: "Unschedulable".into(),
                    message: reason,
                    last_transition_unix_ms: now_unix_ms,
                },
            );
        }
        writes.push(Command::Update(Object::Volume(placed)));
    }
    writes
}

/// The volume of `vm`'s disk `disk` as it should be, keeping what
/// `existing` has that the control plane does not decide (its name and
/// versions, and the copies' reported states while the epoch stays).
fn desired(
    vm: &Vm,
    disk: &Disk,
    placement: Option<&Placement>,
    existing: Option<&Volume>,
    now_unix_ms: u64,
) -> Volume {
    let (epoch, primary) = placement.map_or((0, String::new()), |p| (p.epoch, p.node.clone()));
    let mut nodes: Vec<String> = match placement {
        Some(p) if disk.replicas >= 2 && !p.replica_nodes.is_empty() => p.replica_nodes.clone(),
        Some(p) => vec![p.node.clone()],
        None => existing
            .map(|e| e.status.replicas.iter().map(|r| r.node.clone()).collect())
            .unwrap_or_default(),
    };
    nodes.sort();
    let same_epoch = existing.is_some_and(|e| e.status.epoch == epoch);
    let replicas = nodes
        .into_iter()
        .map(|node| {
            let kept = existing
                .filter(|_| same_epoch)
                .and_then(|e| e.status.replica(&node).cloned());
            let mut replica = kept.unwrap_or_else(|| VolumeReplica {
                node: node.clone(),
                ..VolumeReplica::default()
            });
            replica.primary = !primary.is_empty() && node == primary;
            replica.outdated = !replica.primary && vm.status.is_outdated_on(&node);
            replica.state = replica.state.with_mark(replica.outdated);
            replica
        })
        .collect();
    let mut status = VolumeStatus {
        storage_name: disk.storage_name(&vm.meta.uid),
        epoch,
        primary_node: primary,
        replicas,
        conditions: existing
            .map(|e| e.status.conditions.clone())
            .unwrap_or_default(),
    };
    let condition = ready(&status, now_unix_ms);
    set_condition(&mut status.conditions, condition);
    let size_bytes = existing.map_or(disk.size_bytes, |e| e.spec.size_bytes.max(disk.size_bytes));
    // An attached volume keeps what it was made from, for when it is
    // released.
    let attached = disk.attach.is_some();
    let (image, source) = match existing {
        Some(e) if attached => (e.spec.image.clone(), e.spec.source.clone()),
        _ => (disk.image.clone(), None),
    };
    Volume {
        meta: existing.map(|e| e.meta.clone()).unwrap_or_default(),
        spec: VolumeSpec {
            size_bytes,
            replicas: disk.replicas,
            image,
            owner: Some(VolumeOwner {
                vm: vm.meta.name.clone(),
                vm_uid: vm.meta.uid.clone(),
                disk: disk.name.clone(),
                attached,
            }),
            source,
            protocol: disk.protocol,
            // A VM's disk is where its VM is.
            nodes: Vec::new(),
        },
        status,
    }
}

/// The volume's `Ready` condition: every copy up to date.
pub(crate) fn ready(status: &VolumeStatus, now_unix_ms: u64) -> Condition {
    let lagging: Vec<&VolumeReplica> = status
        .replicas
        .iter()
        .filter(|r| r.state != ReplicaState::UpToDate)
        .collect();
    let copies = status.replicas.len();
    let (ok, reason, message) = if status.primary_node.is_empty() {
        (false, "NotPlaced", "no node writes it yet".to_owned())
    } else if copies == 0 {
        (false, "NoCopies", "no node holds a copy".to_owned())
    } else if lagging.is_empty() {
        (
            true,
            "UpToDate",
            format!("{copies} of {copies} copies up to date"),
        )
    } else {
        let reason = if lagging.iter().all(|r| r.state == ReplicaState::Unknown) {
            "NotReported"
        } else if lagging
            .iter()
            .all(|r| matches!(r.state, ReplicaState::Syncing | ReplicaState::Unknown))
        {
            "Syncing"
        } else {
            "Degraded"
        };
        let message: Vec<String> = lagging
            .iter()
            .map(|r| match r.state {
                ReplicaState::Syncing if r.sync_total_bytes > 0 => format!(
                    "{} syncing {}%",
                    r.node,
                    r.sync_done_bytes * 100 / r.sync_total_bytes
                ),
                state => format!("{} {state}", r.node),
            })
            .collect();
        (false, reason, message.join(", "))
    };
    Condition {
        kind: Condition::READY.into(),
        status: ok,
        reason: reason.into(),
        message,
        last_transition_unix_ms: now_unix_ms,
    }
}

/// `volume` with `report` merged in. Every report sets its node's own
/// view of its copy (`node_state`, `node_error`). A report from the
/// primary's node also sets every copy's `state`: its own copy from
/// `report.local`, each other copy from the peer whose replication
/// address is its node's (`addresses`: address → node); a copy the
/// primary does not replicate to is away. When the primary cannot tell
/// (it reports a copy unknown) and that copy's own node last said it
/// holds it, the state the primary last reported stays, with the
/// primary's error. A copy whose own node reports its disk failed is
/// `disk-failed`. Fence marks stay the control plane's.
pub fn apply_report(
    volume: &Volume,
    report: &VolumeReport,
    addresses: &BTreeMap<String, String>,
    now_unix_ms: u64,
) -> Volume {
    let from_primary = report.node == volume.status.primary_node;
    let standalone = volume.spec.owner.is_none();
    let mut updated = volume.clone();
    for replica in &mut updated.status.replicas {
        let own = replica.node == report.node;
        if own {
            replica.node_state = Some(report.local.state);
            replica.node_error.clone_from(&report.local.last_error);
        }
        if from_primary {
            let seen = if own {
                Some(&report.local)
            } else {
                report
                    .peers
                    .iter()
                    .find(|p| addresses.get(&p.address) == Some(&replica.node))
            };
            let in_sync = !own && seen.is_some_and(|s| s.state == ReplicaState::UpToDate);
            merge_primary_view(replica, seen, &report.node);
            // A standalone volume's fence marks are the control plane's
            // own (decision 65): a copy its primary reports in sync again
            // is no longer outdated, if the report was read after the mark
            // was made (decision 74): a report read before the link broke,
            // recorded after the fence's mark, must not clear it.
            if standalone && in_sync && report.seen_version > replica.outdated_after_version {
                replica.outdated = false;
                replica.outdated_after_version = 0;
            }
        } else if own && report.local.state == ReplicaState::DiskFailed {
            replica.state = ReplicaState::DiskFailed;
            replica.last_error.clone_from(&report.local.last_error);
        }
        replica.state = replica.state.with_mark(replica.outdated);
    }
    let status = &mut updated.status;
    let condition = ready(status, now_unix_ms);
    set_condition(&mut status.conditions, condition);
    updated
}

/// `replica` as the primary on `primary` sees it (`seen`; `None`: the
/// primary does not replicate to it). See [`apply_report`].
fn merge_primary_view(replica: &mut VolumeReplica, seen: Option<&ReplicaReport>, primary: &str) {
    match seen {
        Some(seen)
            if seen.state == ReplicaState::Unknown
                && replica.node_state == Some(ReplicaState::UpToDate)
                && replica.state != ReplicaState::Unknown =>
        {
            replica.last_error = format!(
                "{}; as the primary last reported, and held by its node",
                seen.last_error
            );
        }
        Some(seen) => {
            replica.state = seen.state;
            replica.sync_done_bytes = seen.sync_done_bytes;
            replica.sync_total_bytes = seen.sync_total_bytes;
            replica.dirty_bytes = seen.dirty_bytes;
            replica.last_error.clone_from(&seen.last_error);
        }
        None => {
            replica.state = ReplicaState::Away;
            replica.sync_done_bytes = 0;
            replica.sync_total_bytes = 0;
            replica.last_error =
                format!("the primary on {primary} does not replicate to this node");
        }
    }
    if replica.node_state == Some(ReplicaState::DiskFailed) {
        replica.state = ReplicaState::DiskFailed;
        replica.last_error.clone_from(&replica.node_error);
    }
}

/// Records `report` in the status of the volume whose pool name it names,
/// when it changes anything (compare-and-swap, retried on conflict).
/// `NOT_FOUND` when no volume has that pool name; `FAILED_PRECONDITION`
/// when the reporting node holds no copy of it.
pub async fn record_report(admin: &AdminService, report: &VolumeReport) -> Result<bool, ApiError> {
    for _ in 0..REPORT_RETRIES {
        let updated = {
            let machine = admin.shared().read();
            let state = &machine.state;
            let volume = state
                .list(Kind::Volume)
                .filter_map(as_volume)
                .find(|v| v.status.storage_name == report.storage_name)
                .ok_or_else(|| ApiError::NotFound {
                    kind: Kind::Volume,
                    name: report.storage_name.clone(),
                })?;
            if volume.status.primary_node != report.node
                && volume.status.replica(&report.node).is_none()
            {
                return Err(ApiError::FailedPrecondition {
                    reason: format!(
                        "node: {:?} holds no copy of volume {:?} (its primary is {:?})",
                        report.node, volume.meta.name, volume.status.primary_node
                    ),
                });
            }
            let addresses: BTreeMap<String, String> = state
                .list(Kind::Node)
                .filter_map(as_node)
                .filter(|n| !n.status.replication_address.is_empty())
                .map(|n| (n.status.replication_address.clone(), n.meta.name.clone()))
                .collect();
            let updated = apply_report(volume, report, &addresses, now_unix_ms());
            if updated == *volume {
                return Ok(false);
            }
            updated
        };
        match admin.write(Command::Update(Object::Volume(updated))).await {
            Ok(_) => return Ok(true),
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => return Err(err),
        }
    }
    Err(ApiError::Unavailable {
        reason: format!(
            "volume {:?} kept changing; report not recorded after {REPORT_RETRIES} tries",
            report.storage_name
        ),
    })
}

/// The rules on apply for VMs and volumes against the stored state
/// (`current`: the object being replaced, for an update): a disk or a
/// volume never shrinks; a new VM disk's volume names an existing VM.
pub fn check(state: &State, object: &Object, current: Option<&Object>) -> Result<(), Refusal> {
    match (object, current) {
        (Object::Vm(vm), Some(Object::Vm(current))) => {
            for (i, disk) in vm.spec.disks.iter().enumerate() {
                if let Some(old) = current.spec.disks.iter().find(|d| d.name == disk.name)
                    && disk.size_bytes < old.size_bytes
                {
                    return Err(Refusal::Invalid {
                        field: format!("spec.disks[{i}].size_bytes"),
                        reason: format!(
                            "disk {:?} is {} bytes; a disk only grows (asked {})",
                            disk.name, old.size_bytes, disk.size_bytes
                        ),
                    });
                }
            }
            Ok(())
        }
        (Object::Volume(volume), Some(Object::Volume(current))) => {
            // Cleared when a VM adopts the volume; set or changed, the
            // volume's copies move there (decision 80; what may name its
            // nodes is checked with the object's fields).
            if volume.spec.nodes != current.spec.nodes
                && let Some((i, node)) = missing_node(state, volume)
            {
                return Err(Refusal::FailedPrecondition {
                    reason: format!("spec.nodes[{i}]: node {node:?} does not exist"),
                });
            }
            if volume.spec.size_bytes < current.spec.size_bytes {
                return Err(Refusal::Invalid {
                    field: "spec.size_bytes".into(),
                    reason: format!(
                        "the volume is {} bytes; a volume only grows (asked {})",
                        current.spec.size_bytes, volume.spec.size_bytes
                    ),
                });
            }
            Ok(())
        }
        (Object::Volume(volume), None) if volume.spec.source.is_some() => {
            let source = volume.spec.source.as_ref().map(|s| s.volume.as_str());
            match source.and_then(|name| state.get(Kind::Volume, name)) {
                Some(_) => Ok(()),
                None => Err(Refusal::FailedPrecondition {
                    reason: format!(
                        "spec.source.volume: volume {:?} does not exist",
                        source.unwrap_or_default()
                    ),
                }),
            }
        }
        (Object::Volume(volume), None) => match &volume.spec.owner {
            Some(owner) => match owner_vm(state, owner) {
                Some(_) => Ok(()),
                None => Err(Refusal::FailedPrecondition {
                    reason: format!(
                        "spec.owner.vm: vm {:?} with uid {:?} does not exist",
                        owner.vm, owner.vm_uid
                    ),
                }),
            },
            None => {
                if let Some((i, node)) = missing_node(state, volume) {
                    return Err(Refusal::FailedPrecondition {
                        reason: format!("spec.nodes[{i}]: node {node:?} does not exist"),
                    });
                }
                // Filled from the image by its primary's agent (decision 64).
                match volume
                    .spec
                    .image
                    .as_ref()
                    .map(|i| (i, state.get(Kind::Image, i)))
                {
                    Some((image, None)) => Err(Refusal::FailedPrecondition {
                        reason: format!("spec.image: image {image:?} does not exist"),
                    }),
                    // Its size is known once a node imported it.
                    Some((image, Some(Object::Image(known))))
                        if known.status.size_bytes > volume.spec.size_bytes =>
                    {
                        Err(Refusal::Invalid {
                            field: "spec.size_bytes".into(),
                            reason: format!(
                                "image {image:?} is {} bytes; a volume made from it is at least as large (asked {})",
                                known.status.size_bytes, volume.spec.size_bytes
                            ),
                        })
                    }
                    _ => Ok(()),
                }
            }
        },
        _ => Ok(()),
    }
}

/// Refuses, on apply, to delete volume `name` while it is a disk of an
/// existing VM (`FAILED_PRECONDITION` naming the VM and the disk): the
/// controller would only make it again; it goes with the VM or the disk.
pub fn check_delete(state: &State, name: &str) -> Result<(), Refusal> {
    if let Some((vm, disk)) = crate::disk_sources::attached_by(state, name, "") {
        return Err(Refusal::FailedPrecondition {
            reason: format!(
                "volume {name:?} is attached as disk {disk:?} of vm {:?}: it is released when the VM or the disk goes",
                vm.meta.name
            ),
        });
    }
    let Some(owner) = state
        .get(Kind::Volume, name)
        .and_then(as_volume)
        .and_then(|v| v.spec.owner.as_ref())
    else {
        return Ok(());
    };
    match owner_vm(state, owner) {
        Some(vm) if vm.spec.disks.iter().any(|d| d.name == owner.disk) => {
            Err(Refusal::FailedPrecondition {
                reason: format!(
                    "volume {name:?} is disk {:?} of vm {:?}: it is deleted with the VM or when the disk leaves its spec",
                    owner.disk, owner.vm
                ),
            })
        }
        _ => Ok(()),
    }
}

/// The VM `owner` names, when it exists with that uid (not a VM created
/// again under the name).
fn owner_vm<'a>(state: &'a State, owner: &VolumeOwner) -> Option<&'a Vm> {
    state
        .get(Kind::Vm, &owner.vm)
        .and_then(as_vm)
        .filter(|vm| vm.meta.uid == owner.vm_uid)
}

/// The volume controller of the leader: see the module's doc. Rounds look
/// only at the VMs whose VM, placement or volumes changed since the last
/// one (from the change history), and at every VM after a new term, when
/// the history does not reach back, and every [`FULL_RESYNC`].
#[derive(Debug, Default)]
pub struct VolumeController {
    /// The term and applied index the last round read the state at.
    synced: Option<(u64, u64)>,
    /// VMs whose writes failed or were deferred: looked at again.
    retry: BTreeSet<String>,
    /// When every VM was last looked at.
    last_full: Option<Instant>,
    /// A standalone volume's placement failed to be written: placed again.
    standalone_retry: bool,
}

impl VolumeController {
    /// A controller that starts with a full round.
    pub fn new() -> Self {
        Self::default()
    }

    /// One round, as the leader of `term`.
    pub async fn round(&mut self, admin: &AdminService, term: u64) {
        let (mut plan, applied) = {
            let machine = admin.shared().read();
            let applied = machine.applied_index();
            let full_due = self.last_full.is_none_or(|at| at.elapsed() >= FULL_RESYNC);
            let mut standalone = std::mem::take(&mut self.standalone_retry);
            let only = match self.synced {
                Some((t, index)) if t == term && !full_due => {
                    if index == applied && self.retry.is_empty() && !standalone {
                        return;
                    }
                    let mut names = std::mem::take(&mut self.retry);
                    let mut complete = true;
                    for kind in [Kind::Vm, Kind::Placement, Kind::Volume, Kind::Node] {
                        match machine.history.since(index, Some(kind), usize::MAX) {
                            Ok(changes) => {
                                names
                                    .extend(changes.iter().filter_map(|c| concerned_vm(&c.object)));
                                // A new standalone volume, or a node that
                                // may take one now.
                                standalone |= changes.iter().any(|c| match &c.object {
                                    Object::Volume(v) => unplaced_standalone(v),
                                    Object::Node(_) => true,
                                    _ => false,
                                });
                            }
                            Err(_) => complete = false,
                        }
                    }
                    complete.then_some(names)
                }
                _ => None,
            };
            if only.is_none() {
                self.retry.clear();
                self.last_full = Some(Instant::now());
                standalone = true;
            }
            let now = now_unix_ms();
            let mut plan = plan(&machine.state, only.as_ref(), now);
            if standalone {
                let placed = place_standalone(&machine.state, term, now);
                plan.writes
                    .extend(placed.into_iter().map(|command| (String::new(), command)));
            }
            (plan, applied)
        };
        self.synced = Some((term, applied));
        self.retry.extend(std::mem::take(&mut plan.deferred));
        let results: Vec<(String, Result<Object, ApiError>)> = futures::stream::iter(plan.writes)
            .map(|(vm, command)| async move { (vm, admin.write(command).await) })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        for (vm, result) in results {
            if let Err(err) = result {
                tracing::debug!(%vm, error = %err, "writing a volume failed; will retry");
                if vm.is_empty() {
                    self.standalone_retry = true;
                } else {
                    self.retry.insert(vm);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{Node, ReplicationProtocol, VmStatus, disk_storage_name};

    use super::*;

    fn vm(name: &str, uid: &str, disks: &[(&str, u64, u32)]) -> Object {
        let mut vm = Vm {
            meta: ObjectMeta::named(name),
            ..Vm::default()
        };
        vm.meta.uid = uid.into();
        vm.spec.cpus = 1;
        vm.spec.memory_mib = 64;
        vm.spec.disks = disks
            .iter()
            .map(|(n, size, replicas)| Disk {
                name: (*n).into(),
                size_bytes: *size,
                image: None,
                replicas: *replicas,
                source_volume: None,
                attach: None,
                attached_storage_name: None,
                added_at_epoch: None,
                protocol: Default::default(),
            })
            .collect();
        Object::Vm(vm)
    }

    fn placement(vm: &str, node: &str, epoch: u64, replicas: &[&str]) -> Object {
        Object::Placement(Placement {
            meta: ObjectMeta::named(vm),
            vm: vm.into(),
            node: node.into(),
            epoch,
            replica_nodes: replicas.iter().map(|n| (*n).to_owned()).collect(),
        })
    }

    /// Applies the plan's writes to `state` (as Raft would, one index each).
    fn run(state: &mut State, index: &mut u64) -> Plan {
        let plan = plan(state, None, 1);
        for (_, command) in &plan.writes {
            *index += 1;
            state.apply(*index, command.clone()).unwrap();
        }
        plan
    }

    fn volume(state: &State, name: &str) -> Volume {
        match state.get(Kind::Volume, name) {
            Some(Object::Volume(v)) => v.clone(),
            other => panic!("no volume {name}: {other:?}"),
        }
    }

    fn create(state: &mut State, index: &mut u64, object: Object) {
        *index += 1;
        state.apply(*index, Command::Create(object)).unwrap();
    }

    /// A state holding `objects`, and the index the last was applied at.
    fn state_with(objects: impl IntoIterator<Item = Object>) -> (State, u64) {
        let mut state = State::default();
        let mut index = 0;
        for object in objects {
            create(&mut state, &mut index, object);
        }
        (state, index)
    }

    fn delete_vm(state: &mut State, index: &mut u64, name: &str) {
        *index += 1;
        let command = Command::Delete {
            kind: Kind::Vm,
            name: name.into(),
            expected_resource_version: None,
            force: false,
        };
        state.apply(*index, command).unwrap();
    }

    #[test]
    fn an_attached_volume_becomes_the_disks_once_placed_and_is_released_with_its_vm() {
        let Object::Volume(mut scratch) = standalone("scratch", "s1", 1 << 20, 2) else {
            unreachable!()
        };
        scratch.status = VolumeStatus {
            storage_name: "vol-s1".into(),
            epoch: 2,
            primary_node: "a".into(),
            replicas: ["a", "b"]
                .iter()
                .map(|n| VolumeReplica {
                    node: (*n).into(),
                    primary: *n == "a",
                    ..VolumeReplica::default()
                })
                .collect(),
            ..VolumeStatus::default()
        };
        let (mut state, mut index) = state_with([
            ready_node("a", 1 << 30),
            ready_node("b", 1 << 30),
            Object::Volume(scratch.clone()),
        ]);
        let Object::Vm(mut web) = vm("web", "u1", &[]) else {
            unreachable!()
        };
        web.spec.disks.push(Disk {
            name: "data".into(),
            attach: Some("scratch".into()),
            ..Disk::default()
        });
        create(&mut state, &mut index, Object::Vm(web));
        // Not placed yet: the volume stays as it is (its status pins the VM).
        assert!(run(&mut state, &mut index).writes.is_empty());
        let waiting = volume(&state, "scratch");
        assert_eq!(
            (waiting.spec, waiting.status),
            (scratch.spec, scratch.status)
        );

        create(
            &mut state,
            &mut index,
            placement("web", "a", 3, &["a", "b"]),
        );
        assert_eq!(run(&mut state, &mut index).writes.len(), 1);
        let adopted = volume(&state, "scratch");
        assert_eq!(adopted.meta.uid, "s1", "the same volume");
        assert_eq!(
            adopted.spec.owner,
            Some(VolumeOwner {
                vm: "web".into(),
                vm_uid: "u1".into(),
                disk: "data".into(),
                attached: true,
            })
        );
        assert_eq!(adopted.status.storage_name, "vol-s1", "its own pool name");
        assert_eq!(
            (adopted.status.epoch, adopted.status.primary_node.as_str()),
            (3, "a"),
            "the placement's"
        );
        let nodes: Vec<&str> = adopted
            .status
            .replicas
            .iter()
            .map(|r| r.node.as_str())
            .collect();
        assert_eq!(nodes, ["a", "b"]);
        assert!(run(&mut state, &mut index).writes.is_empty());
        // What clients read back is valid; a clone keeps its source while
        // attached (clients validate what they read).
        adopted.validate().expect("an adopted volume validates");
        let mut clone = adopted.clone();
        clone.spec.replicas = 1;
        clone.spec.source = Some(basalt_api::VolumeSource {
            volume: "golden".into(),
            snapshot: false,
        });
        clone.status.replicas.truncate(1);
        clone.validate().expect("an attached clone validates");

        // The disk leaves the spec of the running VM: held until its node
        // reports, for that spec, a running guest without it.
        let get_web = |state: &State| match state.get(Kind::Vm, "web") {
            Some(Object::Vm(vm)) => vm.clone(),
            other => panic!("{other:?}"),
        };
        let report = |state: &mut State, index: &mut u64, generation: u64, plugged: &[&str]| {
            let mut vm = get_web(state);
            vm.spec.running = true;
            vm.status.phase = VmPhase::Running;
            vm.status.observed_generation = generation;
            vm.status.plugged_volumes = plugged.iter().map(|p| (*p).to_owned()).collect();
            *index += 1;
            state
                .apply(*index, Command::Update(Object::Vm(vm)))
                .unwrap();
        };
        report(&mut state, &mut index, 1, &["vol-s1"]);
        let mut without = get_web(&state);
        without.spec.disks.clear();
        index += 1;
        state
            .apply(index, Command::Update(Object::Vm(without)))
            .expect("removed from a running VM");
        let generation = get_web(&state).meta.generation;
        assert!(run(&mut state, &mut index).writes.is_empty(), "held");
        // A report of the spec before (without the disk gone) holds it...
        report(&mut state, &mut index, generation - 1, &[]);
        assert!(
            run(&mut state, &mut index).writes.is_empty(),
            "an older spec's report"
        );
        // ...as does the guest still having it.
        report(&mut state, &mut index, generation, &["vol-s1"]);
        assert!(
            run(&mut state, &mut index).writes.is_empty(),
            "still plugged in"
        );
        assert!(volume(&state, "scratch").spec.owner.is_some());
        report(&mut state, &mut index, generation, &[]);
        assert_eq!(
            run(&mut state, &mut index).writes.len(),
            1,
            "let go: released"
        );
        let released = volume(&state, "scratch");
        assert_eq!(released.spec.owner, None);
        assert_eq!(released.status, adopted.status);

        // Attached again, then the VM goes: the volume stays, standalone
        // again, where it was.
        let mut again = get_web(&state);
        again.spec.disks.push(Disk {
            name: "data".into(),
            attach: Some("scratch".into()),
            ..Disk::default()
        });
        index += 1;
        state
            .apply(index, Command::Update(Object::Vm(again)))
            .expect("attached again");
        assert_eq!(run(&mut state, &mut index).writes.len(), 1);
        assert!(volume(&state, "scratch").spec.owner.is_some());
        delete_vm(&mut state, &mut index, "web");
        let plan = run(&mut state, &mut index);
        assert!(
            matches!(&plan.writes[..], [(_, Command::Update(Object::Volume(_)))]),
            "{plan:?}"
        );
        let released = volume(&state, "scratch");
        released.validate().expect("a released volume validates");
        assert_eq!(released.spec.owner, None);
        assert_eq!(released.status, adopted.status);
        assert!(run(&mut state, &mut index).writes.is_empty());
    }

    #[test]
    fn a_vm_gets_one_volume_per_disk_following_its_placement_and_loses_them_with_it() {
        let (mut state, mut index) = state_with([vm(
            "web",
            "u1",
            &[("root", 1 << 20, 2), ("scratch", 4096, 1)],
        )]);
        let plan = run(&mut state, &mut index);
        assert_eq!(plan.writes.len(), 2);
        let root = volume(&state, "web-root");
        assert_eq!(root.spec.size_bytes, 1 << 20);
        assert_eq!(root.spec.replicas, 2);
        assert_eq!(root.status.storage_name, disk_storage_name("u1", "root"));
        assert!(root.status.replicas.is_empty());
        assert_eq!(root.status.conditions[0].reason, "NotPlaced");
        // Nothing changed: nothing to write.
        assert!(run(&mut state, &mut index).writes.is_empty());

        for node in ["a", "b"] {
            create(
                &mut state,
                &mut index,
                Object::Node(Node {
                    meta: ObjectMeta::named(node),
                    ..Node::default()
                }),
            );
        }
        create(
            &mut state,
            &mut index,
            placement("web", "a", 1, &["a", "b"]),
        );
        run(&mut state, &mut index);
        let root = volume(&state, "web-root");
        assert_eq!(root.status.primary_node, "a");
        assert_eq!(root.status.epoch, 1);
        let nodes: Vec<(&str, bool, ReplicaState)> = root
            .status
            .replicas
            .iter()
            .map(|r| (r.node.as_str(), r.primary, r.state))
            .collect();
        assert_eq!(
            nodes,
            [
                ("a", true, ReplicaState::Unknown),
                ("b", false, ReplicaState::Unknown)
            ]
        );
        // The unreplicated disk lives on the VM's node only.
        let scratch = volume(&state, "web-scratch");
        assert_eq!(scratch.status.replicas.len(), 1);
        assert_eq!(scratch.status.replicas[0].node, "a");

        // The fence's mark shows as an outdated copy.
        let Some(Object::Vm(mut web)) = state.get(Kind::Vm, "web").cloned() else {
            panic!()
        };
        web.status = VmStatus {
            outdated_replicas: vec!["b".into()],
            ..web.status
        };
        index += 1;
        state
            .apply(index, Command::Update(Object::Vm(web)))
            .unwrap();
        run(&mut state, &mut index);
        let b = volume(&state, "web-root")
            .status
            .replica("b")
            .cloned()
            .unwrap();
        assert!(b.outdated);
        assert_eq!(b.state, ReplicaState::Outdated);

        // A disk's protocol is its volume's: every copy's agent attaches
        // with it.
        assert_eq!(
            volume(&state, "web-root").spec.protocol,
            ReplicationProtocol::C
        );
        let Some(Object::Vm(mut web)) = state.get(Kind::Vm, "web").cloned() else {
            panic!()
        };
        web.spec.disks[0].protocol = ReplicationProtocol::B;
        index += 1;
        state
            .apply(index, Command::Update(Object::Vm(web)))
            .unwrap();
        run(&mut state, &mut index);
        assert_eq!(
            volume(&state, "web-root").spec.protocol,
            ReplicationProtocol::B
        );
        assert_eq!(
            volume(&state, "web-scratch").spec.protocol,
            ReplicationProtocol::C
        );

        delete_vm(&mut state, &mut index, "web");
        let plan = run(&mut state, &mut index);
        assert_eq!(plan.writes.len(), 2);
        assert_eq!(state.list(Kind::Volume).count(), 0);
    }

    #[test]
    fn a_vm_created_again_gets_new_volumes_under_the_same_name_once_the_old_are_gone() {
        let (mut state, mut index) = state_with([vm("web", "u1", &[("root", 4096, 1)])]);
        run(&mut state, &mut index);
        let old = volume(&state, "web-root");
        delete_vm(&mut state, &mut index, "web");
        create(
            &mut state,
            &mut index,
            vm("web", "u2", &[("root", 4096, 1)]),
        );
        let plan = run(&mut state, &mut index);
        assert_eq!(plan.deferred, ["web"]);
        assert!(state.get(Kind::Volume, "web-root").is_none());
        run(&mut state, &mut index);
        let new = volume(&state, "web-root");
        assert_ne!(new.status.storage_name, old.status.storage_name);
        assert_eq!(new.spec.owner.unwrap().vm_uid, "u2");
    }

    #[test]
    fn a_name_too_long_or_taken_falls_back_to_the_pool_name() {
        let (mut state, mut index) = state_with([Object::Volume(Volume {
            meta: ObjectMeta::named("a-b-c"),
            spec: VolumeSpec {
                size_bytes: 4096,
                replicas: 1,
                ..VolumeSpec::default()
            },
            ..Volume::default()
        })]);
        create(&mut state, &mut index, vm("a-b", "u1", &[("c", 4096, 1)]));
        let long = "x".repeat(60);
        create(
            &mut state,
            &mut index,
            vm(&long, "u2", &[("root", 4096, 1)]),
        );
        run(&mut state, &mut index);
        volume(&state, &disk_storage_name("u1", "c"));
        volume(&state, &disk_storage_name("u2", "root"));
        // The standalone volume is left alone.
        assert!(volume(&state, "a-b-c").spec.owner.is_none());
    }

    #[test]
    fn reports_merge_by_node_and_keep_the_fence_marks() {
        let (mut state, mut index) = state_with([vm("db", "u1", &[("root", 1 << 20, 3)])]);
        for node in ["a", "b", "c"] {
            let mut n = Node {
                meta: ObjectMeta::named(node),
                ..Node::default()
            };
            n.status.replication_address = format!("{node}:7410");
            create(&mut state, &mut index, Object::Node(n));
        }
        create(
            &mut state,
            &mut index,
            placement("db", "a", 1, &["a", "b", "c"]),
        );
        run(&mut state, &mut index);
        let mut root = volume(&state, "db-root");
        root.status.replicas[2].outdated = true;
        let addresses: BTreeMap<String, String> = ["a", "b", "c"]
            .iter()
            .map(|n| (format!("{n}:7410"), (*n).to_owned()))
            .collect();
        let report = VolumeReport {
            node: "a".into(),
            storage_name: root.status.storage_name.clone(),
            local: ReplicaReport {
                state: ReplicaState::UpToDate,
                ..ReplicaReport::default()
            },
            peers: vec![
                ReplicaReport {
                    address: "b:7410".into(),
                    state: ReplicaState::Syncing,
                    sync_done_bytes: 1 << 19,
                    sync_total_bytes: 1 << 20,
                    dirty_bytes: 1 << 19,
                    ..ReplicaReport::default()
                },
                ReplicaReport {
                    address: "c:7410".into(),
                    state: ReplicaState::Away,
                    dirty_bytes: 8192,
                    ..ReplicaReport::default()
                },
            ],
            seen_version: 0,
        };
        let merged = apply_report(&root, &report, &addresses, 5);
        let states: Vec<ReplicaState> = merged.status.replicas.iter().map(|r| r.state).collect();
        assert_eq!(
            states,
            [
                ReplicaState::UpToDate,
                ReplicaState::Syncing,
                ReplicaState::Outdated
            ]
        );
        assert_eq!(merged.status.replicas[1].sync_done_bytes, 1 << 19);
        let ready = &merged.status.conditions[0];
        assert!(!ready.status);
        assert_eq!(ready.reason, "Degraded");
        assert!(ready.message.contains("b syncing 50%"), "{}", ready.message);
        // The same report again changes nothing.
        assert_eq!(apply_report(&merged, &report, &addresses, 9), merged);
        // A peer the primary does not replicate to is away.
        let mut fewer = report.clone();
        fewer.peers.truncate(1);
        let merged = apply_report(&root, &fewer, &addresses, 5);
        assert_eq!(merged.status.replicas[2].state, ReplicaState::Outdated);
        assert!(
            merged.status.replicas[2]
                .last_error
                .contains("does not replicate")
        );
        // All up to date: ready.
        let mut good = report;
        for p in &mut good.peers {
            *p = ReplicaReport {
                address: p.address.clone(),
                state: ReplicaState::UpToDate,
                ..ReplicaReport::default()
            };
        }
        let mut clean = root.clone();
        clean.status.replicas[2].outdated = false;
        let merged = apply_report(&clean, &good, &addresses, 5);
        assert!(merged.status.conditions[0].status);
    }

    fn standalone(name: &str, uid: &str, size_bytes: u64, copies: u32) -> Object {
        let mut meta = ObjectMeta::named(name);
        meta.uid = uid.into();
        Object::Volume(Volume {
            meta,
            spec: VolumeSpec {
                size_bytes,
                replicas: copies,
                ..VolumeSpec::default()
            },
            ..Volume::default()
        })
    }

    fn ready_node(name: &str, storage_bytes: u64) -> Object {
        let mut node = Node {
            meta: ObjectMeta::named(name),
            ..Node::default()
        };
        node.status.allocatable.cpus = 4;
        node.status.allocatable.memory_mib = 4096;
        node.status.allocatable.storage_bytes = storage_bytes;
        node.status.conditions.push(Condition {
            kind: Condition::READY.into(),
            status: true,
            ..Condition::default()
        });
        Object::Node(node)
    }

    /// Places the standalone volumes, applying the writes.
    fn place(state: &mut State, index: &mut u64, now: u64) {
        for command in place_standalone(state, 1, now) {
            *index += 1;
            state.apply(*index, command).unwrap();
        }
    }

    #[test]
    fn a_standalone_volume_naming_its_nodes_is_placed_there() {
        let (mut state, mut index) = state_with([]);
        for (node, room) in [("a", 10 << 20), ("b", 10 << 20), ("c", 1 << 20)] {
            create(&mut state, &mut index, ready_node(node, room));
        }
        let named = |name: &str, uid: &str, nodes: &[&str]| {
            let Object::Volume(mut v) = standalone(name, uid, 2 << 20, 2) else {
                unreachable!()
            };
            v.spec.nodes = nodes.iter().map(|n| (*n).to_owned()).collect();
            Object::Volume(v)
        };
        // Taken as asked, the first the primary, even where the scheduler
        // would not put it (c is too small for 2 MiB).
        create(&mut state, &mut index, named("here", "u1", &["c", "a"]));
        place(&mut state, &mut index, 5);
        let here = volume(&state, "here");
        let copies: Vec<&str> = here
            .status
            .replicas
            .iter()
            .map(|r| r.node.as_str())
            .collect();
        assert_eq!(copies, ["a", "c"]);
        assert_eq!(
            (here.status.primary_node.as_str(), here.status.epoch),
            ("c", 1)
        );
        // A node that does not exist is refused when the volume is made...
        index += 1;
        assert!(matches!(
            state.apply(index, Command::Create(named("nowhere", "u2", &["a", "z"]))),
            Err(Refusal::FailedPrecondition { reason }) if reason == "spec.nodes[1]: node \"z\" does not exist"
        ));
        // ...and one gone since holds it, saying which.
        create(&mut state, &mut index, named("later", "u3", &["b", "a"]));
        index += 1;
        state
            .apply(
                index,
                Command::Delete {
                    kind: Kind::Node,
                    name: "b".into(),
                    expected_resource_version: None,
                    force: false,
                },
            )
            .expect("node b removed");
        place(&mut state, &mut index, 6);
        let later = volume(&state, "later");
        assert!(later.status.replicas.is_empty());
        assert!(
            later.status.conditions[0]
                .message
                .contains("node \"b\" named in spec.nodes does not exist"),
            "{:?}",
            later.status.conditions
        );
        // An update may move them (decision 80), onto nodes that exist.
        let mut moved = here.clone();
        moved.spec.nodes = vec!["a".into(), "b".into()];
        index += 1;
        assert!(matches!(
            state.apply(index, Command::Update(Object::Volume(moved))),
            Err(Refusal::FailedPrecondition { reason }) if reason == "spec.nodes[1]: node \"b\" does not exist"
        ));
    }

    #[test]
    fn standalone_volumes_are_placed_by_the_schedulers_choice_with_room_counted() {
        let (mut state, mut index) = state_with([standalone("big", "u1", 6 << 20, 2)]);
        // No node: unschedulable, with the scheduler's reason, once.
        assert_eq!(place_standalone(&state, 1, 5).len(), 1);
        place(&mut state, &mut index, 5);
        let big = volume(&state, "big");
        assert!(big.status.replicas.is_empty());
        let ready = &big.status.conditions[0];
        assert_eq!(ready.reason, "Unschedulable");
        assert!(
            ready.message.contains("2 replicas asked"),
            "{}",
            ready.message
        );
        assert!(
            place_standalone(&state, 1, 6).is_empty(),
            "the same reason again"
        );

        for (node, room) in [("a", 10 << 20), ("b", 10 << 20), ("c", 4 << 20)] {
            create(&mut state, &mut index, ready_node(node, room));
        }
        place(&mut state, &mut index, 7);
        let big = volume(&state, "big");
        let nodes: Vec<&str> = big
            .status
            .replicas
            .iter()
            .map(|r| r.node.as_str())
            .collect();
        assert_eq!(nodes, ["a", "b"], "c has no room for 6 MiB");
        assert_eq!(big.status.epoch, 1);
        assert_eq!(big.status.storage_name, "vol-u1");
        assert_eq!(
            big.status.replicas.iter().filter(|r| r.primary).count(),
            1,
            "{big:?}"
        );
        assert_eq!(
            big.status
                .replica(&big.status.primary_node)
                .map(|r| r.primary),
            Some(true)
        );
        assert_eq!(big.status.conditions[0].reason, "NotReported");
        // Placed: left alone.
        assert!(place_standalone(&state, 1, 8).is_empty());

        // a and b now hold 6 MiB each: a second 6 MiB volume of one copy
        // fits only on... none but a or b's remaining 4 MiB, or c's 4
        // MiB: nowhere.
        create(&mut state, &mut index, standalone("more", "u2", 6 << 20, 1));
        place(&mut state, &mut index, 9);
        let more = volume(&state, "more");
        assert!(more.status.replicas.is_empty(), "{more:?}");
        assert_eq!(more.status.conditions[0].reason, "Unschedulable");
        // A small one goes anywhere, alone.
        create(
            &mut state,
            &mut index,
            standalone("small", "u3", 1 << 20, 1),
        );
        place(&mut state, &mut index, 10);
        let small = volume(&state, "small");
        assert_eq!(small.status.replicas.len(), 1);
        assert!(small.status.replicas[0].primary);
        // A VM disk's volume is never placed here.
        create(
            &mut state,
            &mut index,
            vm("web", "u4", &[("root", 4096, 1)]),
        );
        run(&mut state, &mut index);
        assert!(place_standalone(&state, 1, 11).is_empty());
        // A standalone volume from an image needs the image (decision 64).
        let Object::Volume(mut imaged) = standalone("imaged", "u5", 4096, 1) else {
            panic!()
        };
        imaged.spec.image = Some("tiny".into());
        index += 1;
        assert!(matches!(
            state.apply(index, Command::Create(Object::Volume(imaged.clone()))),
            Err(Refusal::FailedPrecondition { reason }) if reason.starts_with("spec.image: image \"tiny\"")
        ));
        let mut tiny = basalt_api::Image {
            meta: ObjectMeta::named("tiny"),
            ..basalt_api::Image::default()
        };
        tiny.status.size_bytes = 8192;
        create(&mut state, &mut index, Object::Image(tiny));
        index += 1;
        assert!(matches!(
            state.apply(index, Command::Create(Object::Volume(imaged.clone()))),
            Err(Refusal::Invalid { field, .. }) if field == "spec.size_bytes"
        ));
        imaged.spec.size_bytes = 8192;
        create(&mut state, &mut index, Object::Volume(imaged));
    }

    #[test]
    fn every_copys_node_reports_its_own_copy_and_the_primarys_view_wins() {
        let mut state = State::default();
        let mut index = 0;
        for node in ["a", "b"] {
            create(&mut state, &mut index, ready_node(node, 0));
        }
        create(
            &mut state,
            &mut index,
            standalone("scratch", "u1", 1 << 20, 2),
        );
        place(&mut state, &mut index, 1);
        let placed = volume(&state, "scratch");
        let primary = placed.status.primary_node.clone();
        let secondary = if primary == "a" { "b" } else { "a" };
        let addresses: BTreeMap<String, String> =
            [("10.0.0.9:7789".to_owned(), secondary.to_owned())]
                .into_iter()
                .collect();
        let up = ReplicaReport {
            state: ReplicaState::UpToDate,
            ..ReplicaReport::default()
        };
        let from_primary = VolumeReport {
            node: primary.clone(),
            storage_name: "vol-u1".into(),
            local: up.clone(),
            peers: vec![ReplicaReport {
                address: "10.0.0.9:7789".into(),
                ..up.clone()
            }],
            seen_version: 0,
        };
        let from_secondary = VolumeReport {
            node: secondary.to_owned(),
            storage_name: "vol-u1".into(),
            local: up.clone(),
            peers: Vec::new(),
            seen_version: 0,
        };
        let merged = apply_report(&placed, &from_primary, &addresses, 2);
        let merged = apply_report(&merged, &from_secondary, &addresses, 3);
        let copy = merged.status.replica(secondary).unwrap();
        assert_eq!(copy.state, ReplicaState::UpToDate);
        assert_eq!(copy.node_state, Some(ReplicaState::UpToDate));
        assert!(merged.status.conditions[0].status);
        // The same reports again change nothing.
        assert_eq!(
            apply_report(&merged, &from_secondary, &addresses, 4),
            merged
        );

        // The primary's storage process cannot be asked: its copy is
        // unknown, the secondary's keeps the state the primary last
        // reported, since its own node holds it.
        let unknown = ReplicaReport {
            state: ReplicaState::Unknown,
            last_error: "the node's storage process cannot be asked".into(),
            ..ReplicaReport::default()
        };
        let lost = VolumeReport {
            local: unknown.clone(),
            peers: vec![ReplicaReport {
                address: "10.0.0.9:7789".into(),
                ..unknown.clone()
            }],
            ..from_primary.clone()
        };
        let after = apply_report(&merged, &lost, &addresses, 5);
        assert_eq!(
            after.status.replica(&primary).unwrap().state,
            ReplicaState::Unknown
        );
        let copy = after.status.replica(secondary).unwrap();
        assert_eq!(copy.state, ReplicaState::UpToDate);
        assert!(copy.last_error.contains("cannot be asked"), "{copy:?}");
        // Without its node's own report, it would be unknown too.
        let blind = apply_report(&placed, &from_primary, &addresses, 2);
        let blind = apply_report(&blind, &lost, &addresses, 5);
        assert_eq!(
            blind.status.replica(secondary).unwrap().state,
            ReplicaState::Unknown
        );

        // The secondary's node says its disk failed: shown at once.
        let failed = VolumeReport {
            local: ReplicaReport {
                state: ReplicaState::DiskFailed,
                last_error: "EIO".into(),
                ..ReplicaReport::default()
            },
            ..from_secondary.clone()
        };
        let after = apply_report(&merged, &failed, &addresses, 6);
        let copy = after.status.replica(secondary).unwrap();
        assert_eq!(
            (copy.state, copy.last_error.as_str()),
            (ReplicaState::DiskFailed, "EIO")
        );
        // A secondary's report never sets another copy.
        assert_eq!(
            after.status.replica(&primary),
            merged.status.replica(&primary)
        );
    }

    #[test]
    fn disks_and_volumes_never_shrink() {
        let (mut state, mut index) = state_with([vm("web", "u1", &[("root", 8192, 1)])]);
        run(&mut state, &mut index);
        let Some(Object::Vm(mut web)) = state.get(Kind::Vm, "web").cloned() else {
            panic!()
        };
        web.spec.disks[0].size_bytes = 4096;
        index += 1;
        assert!(matches!(
            state.apply(index, Command::Update(Object::Vm(web.clone()))),
            Err(Refusal::Invalid { field, .. }) if field == "spec.disks[0].size_bytes"
        ));
        web.spec.disks[0].size_bytes = 16384;
        state
            .apply(index, Command::Update(Object::Vm(web)))
            .unwrap();
        run(&mut state, &mut index);
        let mut root = volume(&state, "web-root");
        assert_eq!(root.spec.size_bytes, 16384);
        root.spec.size_bytes = 8192;
        index += 1;
        assert!(matches!(
            state.apply(index, Command::Update(Object::Volume(root))),
            Err(Refusal::Invalid { field, .. }) if field == "spec.size_bytes"
        ));
        // A VM disk's volume is not deleted on its own.
        index += 1;
        assert!(matches!(
            state.apply(index, Command::Delete {
                kind: Kind::Volume,
                name: "web-root".into(),
                expected_resource_version: None,
                force: false,
            }),
            Err(Refusal::FailedPrecondition { reason }) if reason.contains("disk \"root\" of vm \"web\"")
        ));
        // A VM disk's volume names an existing VM.
        let orphan = Volume {
            meta: ObjectMeta::named("orphan"),
            spec: VolumeSpec {
                size_bytes: 4096,
                replicas: 1,
                owner: Some(VolumeOwner {
                    vm: "nope".into(),
                    vm_uid: "u9".into(),
                    disk: "root".into(),
                    attached: false,
                }),
                ..VolumeSpec::default()
            },
            ..Volume::default()
        };
        assert!(matches!(
            state.apply(index, Command::Create(Object::Volume(orphan))),
            Err(Refusal::FailedPrecondition { reason }) if reason.starts_with("spec.owner.vm")
        ));
    }
}
