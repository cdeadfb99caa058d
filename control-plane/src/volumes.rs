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
//! - The agent of a volume's primary node reports how the copies stand, as
//!   its storage process sees them ([`record_report`], behind the agent
//!   service's `ReportVolume`): the report is merged into the status
//!   ([`apply_report`]) and written only when it changed something.
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
//! - a report is recorded only from the volume's primary node, and copies'
//!   reported states are dropped when the epoch changes (a new primary
//!   reports afresh);
//! - a volume's size never shrinks; the name of a VM disk's volume is
//!   `VM-DISK` (or, when that is taken or too long, its pool name).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use basalt_api::{
    ApiError, Condition, Disk, Kind, Object, ObjectMeta, Placement, ReplicaReport, ReplicaState,
    Vm, Volume, VolumeOwner, VolumeReplica, VolumeReport, VolumeSpec, VolumeStatus,
    disk_storage_name,
};
use futures::StreamExt as _;

use crate::admin::AdminService;
use crate::agent::now_unix_ms;
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
    /// Each write, with the VM it is for.
    pub writes: Vec<(String, Command)>,
    /// VMs whose new volume waits for a name being freed this round.
    pub deferred: Vec<String>,
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
    for object in state.list(Kind::Volume) {
        if let Object::Volume(volume) = object
            && let Some(owner) = &volume.spec.owner
            && concerned(&owner.vm)
        {
            owned.insert((owner.vm_uid.clone(), owner.disk.clone()), volume);
        }
    }
    let vms: Vec<&Vm> = match only {
        Some(names) => names
            .iter()
            .filter_map(|name| match state.get(Kind::Vm, name) {
                Some(Object::Vm(vm)) => Some(vm),
                _ => None,
            })
            .collect(),
        None => state
            .list(Kind::Vm)
            .filter_map(|o| match o {
                Object::Vm(vm) => Some(vm),
                _ => None,
            })
            .collect(),
    };
    let mut wanted = Vec::new();
    for vm in vms {
        let placement = match state.get(Kind::Placement, &vm.meta.name) {
            Some(Object::Placement(p)) => Some(p),
            _ => None,
        };
        for disk in &vm.spec.disks {
            let existing = owned.remove(&(vm.meta.uid.clone(), disk.name.clone()));
            wanted.push((
                vm,
                desired(vm, disk, placement, existing, now_unix_ms),
                existing,
            ));
        }
    }
    let mut plan = Plan::default();
    // Whatever is left belongs to a VM that is gone (or was created again).
    let freed: BTreeSet<&str> = owned.values().map(|v| v.meta.name.as_str()).collect();
    for volume in owned.values() {
        let vm = volume.spec.owner.as_ref().map(|o| o.vm.clone());
        plan.writes.push((
            vm.unwrap_or_default(),
            Command::Delete {
                kind: Kind::Volume,
                name: volume.meta.name.clone(),
                expected_resource_version: Some(volume.meta.resource_version),
                force: false,
            },
        ));
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
        storage_name: disk_storage_name(&vm.meta.uid, &disk.name),
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
    Volume {
        meta: existing.map(|e| e.meta.clone()).unwrap_or_default(),
        spec: VolumeSpec {
            size_bytes,
            replicas: disk.replicas,
            image: disk.image.clone(),
            owner: Some(VolumeOwner {
                vm: vm.meta.name.clone(),
                vm_uid: vm.meta.uid.clone(),
                disk: disk.name.clone(),
            }),
            source: None,
        },
        status,
    }
}

/// The volume's `Ready` condition: every copy up to date.
fn ready(status: &VolumeStatus, now_unix_ms: u64) -> Condition {
    let lagging: Vec<String> = status
        .replicas
        .iter()
        .filter(|r| r.state != ReplicaState::UpToDate)
        .map(|r| match r.state {
            ReplicaState::Syncing if r.sync_total_bytes > 0 => format!(
                "{} syncing {}%",
                r.node,
                r.sync_done_bytes * 100 / r.sync_total_bytes
            ),
            state => format!("{} {state}", r.node),
        })
        .collect();
    let (ok, reason, message) = if status.primary_node.is_empty() {
        (false, "NotPlaced", "no node writes it yet".to_owned())
    } else if status.replicas.is_empty() {
        (false, "NoCopies", "no node holds a copy".to_owned())
    } else if lagging.is_empty() {
        (
            true,
            "UpToDate",
            format!(
                "{} of {} copies up to date",
                status.replicas.len(),
                status.replicas.len()
            ),
        )
    } else {
        let states: Vec<ReplicaState> = status
            .replicas
            .iter()
            .filter(|r| r.state != ReplicaState::UpToDate)
            .map(|r| r.state)
            .collect();
        let reason = if states.iter().all(|s| *s == ReplicaState::Unknown) {
            "NotReported"
        } else if states
            .iter()
            .all(|s| matches!(s, ReplicaState::Syncing | ReplicaState::Unknown))
        {
            "Syncing"
        } else {
            "Degraded"
        };
        (false, reason, lagging.join(", "))
    };
    Condition {
        kind: Condition::READY.into(),
        status: ok,
        reason: reason.into(),
        message,
        last_transition_unix_ms: now_unix_ms,
    }
}

/// `volume` with `report` (from its primary node) merged in: the
/// primary's own copy from `report.local`, each other copy from the peer
/// whose replication address is its node's (`addresses`: address → node);
/// a copy the primary does not replicate to is away. Fence marks stay the
/// control plane's.
pub fn apply_report(
    volume: &Volume,
    report: &VolumeReport,
    addresses: &BTreeMap<String, String>,
    now_unix_ms: u64,
) -> Volume {
    let mut updated = volume.clone();
    for replica in &mut updated.status.replicas {
        let seen: Option<&ReplicaReport> = if replica.node == report.node {
            Some(&report.local)
        } else {
            report
                .peers
                .iter()
                .find(|p| addresses.get(&p.address) == Some(&replica.node))
        };
        match seen {
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
                replica.last_error = format!(
                    "the primary on {} does not replicate to this node",
                    report.node
                );
            }
        }
        replica.state = replica.state.with_mark(replica.outdated);
    }
    let status = &mut updated.status;
    let condition = ready(status, now_unix_ms);
    set_condition(&mut status.conditions, condition);
    updated
}

/// Records `report` in the status of the volume whose pool name it names,
/// when it changes anything (compare-and-swap, retried on conflict).
/// `NOT_FOUND` when no volume has that pool name; `FAILED_PRECONDITION`
/// when the reporting node is not the volume's primary.
pub async fn record_report(admin: &AdminService, report: &VolumeReport) -> Result<bool, ApiError> {
    for _ in 0..REPORT_RETRIES {
        let updated = {
            let machine = admin.shared().read();
            let state = &machine.state;
            let volume = state
                .list(Kind::Volume)
                .find_map(|o| match o {
                    Object::Volume(v) if v.status.storage_name == report.storage_name => Some(v),
                    _ => None,
                })
                .ok_or_else(|| ApiError::NotFound {
                    kind: Kind::Volume,
                    name: report.storage_name.clone(),
                })?;
            if volume.status.primary_node != report.node {
                return Err(ApiError::FailedPrecondition {
                    reason: format!(
                        "node: {:?} is not the primary of volume {:?} (its primary is {:?})",
                        report.node, volume.meta.name, volume.status.primary_node
                    ),
                });
            }
            let addresses: BTreeMap<String, String> = state
                .list(Kind::Node)
                .filter_map(|o| match o {
                    Object::Node(n) if !n.status.replication_address.is_empty() => {
                        Some((n.status.replication_address.clone(), n.meta.name.clone()))
                    }
                    _ => None,
                })
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
            Some(owner) => match state.get(Kind::Vm, &owner.vm) {
                Some(Object::Vm(vm)) if vm.meta.uid == owner.vm_uid => Ok(()),
                _ => Err(Refusal::FailedPrecondition {
                    reason: format!(
                        "spec.owner.vm: vm {:?} with uid {:?} does not exist",
                        owner.vm, owner.vm_uid
                    ),
                }),
            },
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Refuses, on apply, to delete volume `name` while it is a disk of an
/// existing VM (`FAILED_PRECONDITION` naming the VM and the disk): the
/// controller would only make it again; it goes with the VM or the disk.
pub fn check_delete(state: &State, name: &str) -> Result<(), Refusal> {
    let Some(Object::Volume(volume)) = state.get(Kind::Volume, name) else {
        return Ok(());
    };
    let Some(owner) = &volume.spec.owner else {
        return Ok(());
    };
    match state.get(Kind::Vm, &owner.vm) {
        Some(Object::Vm(vm))
            if vm.meta.uid == owner.vm_uid
                && vm.spec.disks.iter().any(|d| d.name == owner.disk) =>
        {
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
}

impl VolumeController {
    /// A controller that starts with a full round.
    pub fn new() -> Self {
        Self::default()
    }

    /// One round, as the leader of `term`.
    pub async fn round(&mut self, admin: &AdminService, term: u64) {
        let (plan, applied) = {
            let machine = admin.shared().read();
            let applied = machine.applied_index();
            let full_due = self.last_full.is_none_or(|at| at.elapsed() >= FULL_RESYNC);
            let only = match self.synced {
                Some((t, index)) if t == term && !full_due => {
                    if index == applied && self.retry.is_empty() {
                        return;
                    }
                    let mut names = std::mem::take(&mut self.retry);
                    let mut complete = true;
                    for kind in [Kind::Vm, Kind::Placement, Kind::Volume] {
                        match machine.history.since(index, Some(kind), usize::MAX) {
                            Ok(changes) => {
                                names
                                    .extend(changes.iter().filter_map(|c| concerned_vm(&c.object)));
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
            }
            (plan(&machine.state, only.as_ref(), now_unix_ms()), applied)
        };
        self.synced = Some((term, applied));
        self.retry.extend(plan.deferred);
        let results: Vec<(String, Result<Object, ApiError>)> = futures::stream::iter(plan.writes)
            .map(|(vm, command)| async move { (vm, admin.write(command).await) })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        for (vm, result) in results {
            match result {
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(%vm, error = %err, "writing a volume failed; will retry");
                    self.retry.insert(vm);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{Node, VmStatus};

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

    #[test]
    fn a_vm_gets_one_volume_per_disk_following_its_placement_and_loses_them_with_it() {
        let mut state = State::default();
        let mut index = 0;
        create(
            &mut state,
            &mut index,
            vm("web", "u1", &[("root", 1 << 20, 2), ("scratch", 4096, 1)]),
        );
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

        index += 1;
        state
            .apply(
                index,
                Command::Delete {
                    kind: Kind::Vm,
                    name: "web".into(),
                    expected_resource_version: None,
                    force: false,
                },
            )
            .unwrap();
        let plan = run(&mut state, &mut index);
        assert_eq!(plan.writes.len(), 2);
        assert_eq!(state.list(Kind::Volume).count(), 0);
    }

    #[test]
    fn a_vm_created_again_gets_new_volumes_under_the_same_name_once_the_old_are_gone() {
        let mut state = State::default();
        let mut index = 0;
        create(
            &mut state,
            &mut index,
            vm("web", "u1", &[("root", 4096, 1)]),
        );
        run(&mut state, &mut index);
        let old = volume(&state, "web-root");
        index += 1;
        state
            .apply(
                index,
                Command::Delete {
                    kind: Kind::Vm,
                    name: "web".into(),
                    expected_resource_version: None,
                    force: false,
                },
            )
            .unwrap();
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
        let mut state = State::default();
        let mut index = 0;
        create(
            &mut state,
            &mut index,
            Object::Volume(Volume {
                meta: ObjectMeta::named("a-b-c"),
                spec: VolumeSpec {
                    size_bytes: 4096,
                    replicas: 1,
                    ..VolumeSpec::default()
                },
                ..Volume::default()
            }),
        );
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
        let mut state = State::default();
        let mut index = 0;
        create(
            &mut state,
            &mut index,
            vm("db", "u1", &[("root", 1 << 20, 3)]),
        );
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

    #[test]
    fn disks_and_volumes_never_shrink() {
        let mut state = State::default();
        let mut index = 0;
        create(
            &mut state,
            &mut index,
            vm("web", "u1", &[("root", 8192, 1)]),
        );
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
