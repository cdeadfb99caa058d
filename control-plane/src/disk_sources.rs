//! VM disks made from volumes (decision 64), and volumes attached as VM
//! disks (decision 76).
//!
//! - A disk with `source_volume` is a copy-on-write clone of that volume
//!   (standalone, snapshot or clone), made by the agent of the node
//!   holding the source's primary copy, in that node's pool — the same
//!   storage clone `basalt volume clone` uses.
//! - A disk with `attach` *is* an existing volume (standalone or a clone,
//!   not a snapshot): the VM's first placement goes to the volume's
//!   primary node, its replica nodes are the volume's copies' nodes and its
//!   epoch is past the volume's, and the nodes use the volume's pool name
//!   for the disk (`attached_storage_name`, filled in here). The volume
//!   controller then keeps the volume as the disk's, and releases it (a
//!   standalone volume again) when the VM goes, or the disk goes and the
//!   guest has let go of it (decision 78).
//!
//! This module holds the control plane's part:
//!
//! - [`complete`], on apply of a new VM or of the disks an update adds:
//!   a disk of size 0 takes its source's or attached volume's size, an
//!   attached volume's disk of 0 replicas its copies, and
//!   `attached_storage_name` is set;
//! - [`check`], on apply: a new VM's source volumes exist
//!   (`FAILED_PRECONDITION` naming the disk's field) and are no larger
//!   than their disks (`INVALID_ARGUMENT` on the size); an attached volume
//!   exists, is placed, is no snapshot, is no other VM's disk and matches
//!   the disk's copies; an update adds no clone and changes no disk's
//!   source or attachment (the clone is made once, at the VM's first
//!   placement), but may add a disk attaching a volume — to a VM already
//!   placed only when the volume is where the VM's disks are, at an epoch
//!   no later than the VM's (decision 78: the VM does not move for it);
//! - [`keep_recorded`], on apply of an update: the recorded pool name of
//!   a disk that still attaches the same volume, and the epoch each disk
//!   was added at, are kept;
//! - [`pins`]: where each VM placed for the first time must go (the
//!   scheduler's hard filter, [`crate::scheduler::Pin`]).
//!
//! Invariants:
//! - all three are pure functions of the state, so every member applies
//!   the same VM;
//! - a volume is attached to at most one VM: a VM attaching a volume that
//!   a VM already owns or attaches is refused in the same apply that would
//!   store it;
//! - a VM already placed is never pinned: once its disk exists it moves
//!   like any other VM, and deleting its source changes nothing for it.

use std::collections::BTreeMap;

use basalt_api::{Disk, Kind, Object, Vm, Volume};

use crate::scheduler::{Pin, Pins};
use crate::state::{Refusal, State};

/// The volume named `name`, when there is one.
fn source<'a>(state: &'a State, name: &str) -> Option<&'a Volume> {
    match state.get(Kind::Volume, name) {
        Some(Object::Volume(volume)) => Some(volume),
        _ => None,
    }
}

/// The VM (other than `except`) one of whose disks attaches volume
/// `name`, with that disk's name.
pub fn attached_by<'a>(state: &'a State, name: &str, except: &str) -> Option<(&'a Vm, &'a str)> {
    state.list(Kind::Vm).find_map(|o| match o {
        Object::Vm(vm) if vm.meta.name != except => vm
            .spec
            .disks
            .iter()
            .find(|d| d.attach.as_deref() == Some(name))
            .map(|d| (vm, d.name.as_str())),
        _ => None,
    })
}

/// Fills in, for a VM being created (`current` `None`) or the disks an
/// update adds to one, what those disks leave to the volumes they are
/// made from or are: a size of 0 takes the volume's size, an attached
/// volume's disk of 0 replicas its copies, and an attached volume's pool
/// name is recorded. A missing volume is left for [`check`] to refuse.
/// Each disk an update adds to a placed VM records the placement's epoch
/// (`added_at_epoch`): the epoch at which its node makes it.
pub fn complete(state: &State, object: &mut Object, current: Option<&Object>) {
    let Object::Vm(vm) = object else {
        return;
    };
    let before = match current {
        Some(Object::Vm(before)) => Some(before),
        _ => None,
    };
    // A disk an update adds to a placed VM is made at the placement's
    // epoch then; a new VM's disks at its first placement.
    let added_at = match (before, state.get(Kind::Placement, &vm.meta.name)) {
        (Some(_), Some(Object::Placement(p))) => Some(p.epoch),
        _ => None,
    };
    let is_new =
        |disk: &Disk| before.is_none_or(|b| !b.spec.disks.iter().any(|d| d.name == disk.name));
    for disk in vm.spec.disks.iter_mut().filter(|d| is_new(d)) {
        disk.added_at_epoch = added_at;
        let from = disk
            .source_volume
            .as_deref()
            .or(disk.attach.as_deref())
            .and_then(|n| source(state, n));
        let Some(from) = from else {
            continue;
        };
        if disk.size_bytes == 0 {
            disk.size_bytes = from.spec.size_bytes;
        }
        if disk.attach.is_some() {
            if disk.replicas == 0 {
                disk.replicas = from.spec.replicas;
            }
            disk.attached_storage_name =
                Some(from.status.storage_name.clone()).filter(|n| !n.is_empty());
        }
    }
}

/// Keeps, on an update of a VM, what the control plane recorded on each
/// disk the VM had: the epoch it was added at, and the pool name of a disk
/// that still attaches the same volume. The fields are the control
/// plane's, so a client that sends them empty (or different) leaves them
/// as they are. A disk whose attachment changes keeps no pool name;
/// [`check`] refuses it. A disk the update adds gets its fields from
/// [`complete`].
pub fn keep_recorded(current: &Vm, update: &mut Vm) {
    for disk in &mut update.spec.disks {
        let Some(before) = current.spec.disks.iter().find(|d| d.name == disk.name) else {
            continue;
        };
        disk.added_at_epoch = before.added_at_epoch;
        if before.attach.is_some() && before.attach == disk.attach {
            disk.attached_storage_name
                .clone_from(&before.attached_storage_name);
        }
    }
}

/// The rules for disks made from volumes or attaching them, on apply of
/// `vm` (`current`: the VM it replaces, for an update). See the module's
/// doc.
pub fn check(state: &State, vm: &Vm, current: Option<&Vm>) -> Result<(), Refusal> {
    for (i, disk) in vm.spec.disks.iter().enumerate() {
        let field = format!("spec.disks[{i}]");
        match current {
            Some(current) => check_unchanged(state, vm, current, i, disk, &field)?,
            None => check_new(state, vm, i, disk, &field)?,
        }
    }
    Ok(())
}

/// On an update: disk `i` of `vm` (at `field`) is cloned from what it was
/// when its VM was created, and attaches what it did; a disk the update
/// adds may attach a volume ([`check_attach`], and where the VM is placed
/// [`check_attach_placed`]).
fn check_unchanged(
    state: &State,
    vm: &Vm,
    current: &Vm,
    i: usize,
    disk: &Disk,
    field: &str,
) -> Result<(), Refusal> {
    let before = current.spec.disks.iter().find(|d| d.name == disk.name);
    match (before, &disk.attach) {
        (None, Some(name)) => {
            check_attach(state, vm, i, disk, name)?;
            check_attach_placed(state, vm, field, name)?;
        }
        (None, None) => check_added_placed(state, vm, disk, field)?,
        (Some(b), attach) if b.attach.as_ref() != attach.as_ref() => {
            return Err(Refusal::Invalid {
                field: format!("{field}.attach"),
                reason: format!(
                    "disk {:?}: what a disk attaches cannot change; remove the disk and add another",
                    disk.name
                ),
            });
        }
        _ => {}
    }
    match &disk.source_volume {
        Some(name) if before.and_then(|d| d.source_volume.as_ref()) != Some(name) => {
            Err(Refusal::Invalid {
                field: format!("{field}.source_volume"),
                reason: format!(
                    "disk {:?} cannot become a clone of volume {name:?}: a disk is made from a volume only when its VM is created",
                    disk.name
                ),
            })
        }
        _ => Ok(()),
    }
}

/// On a create: disk `i` of `vm` (at `field`) attaches a volume that can
/// be it, and is cloned from one that exists and is no larger.
fn check_new(state: &State, vm: &Vm, i: usize, disk: &Disk, field: &str) -> Result<(), Refusal> {
    if let Some(name) = &disk.attach {
        check_attach(state, vm, i, disk, name)?;
    }
    let Some(name) = &disk.source_volume else {
        return Ok(());
    };
    let Some(from) = source(state, name) else {
        return Err(Refusal::FailedPrecondition {
            reason: format!("{field}.source_volume: volume {name:?} does not exist"),
        });
    };
    if disk.size_bytes < from.spec.size_bytes {
        return Err(Refusal::Invalid {
            field: format!("{field}.size_bytes"),
            reason: format!(
                "volume {name:?} is {} bytes; a disk made from it is at least as large (asked {})",
                from.spec.size_bytes, disk.size_bytes
            ),
        });
    }
    Ok(())
}

/// The rules for disk `i` of new VM `vm`, which attaches volume `name`.
fn check_attach(state: &State, vm: &Vm, i: usize, disk: &Disk, name: &str) -> Result<(), Refusal> {
    let field = format!("spec.disks[{i}]");
    let refuse = |why: String| Refusal::FailedPrecondition {
        reason: format!("{field}.attach: volume {name:?} {why}"),
    };
    let Some(volume) = source(state, name) else {
        return Err(refuse("does not exist".into()));
    };
    if volume.spec.source.as_ref().is_some_and(|s| s.snapshot) {
        return Err(Refusal::Invalid {
            field: format!("{field}.attach"),
            reason: format!(
                "volume {name:?} is a snapshot, which is read-only: attach a clone of it"
            ),
        });
    }
    if let Some((other, other_disk)) = attached_by(state, name, &vm.meta.name) {
        return Err(refuse(format!(
            "is attached as disk {other_disk:?} of vm {:?}",
            other.meta.name
        )));
    }
    if let Some(owner) = &volume.spec.owner {
        return Err(refuse(format!(
            "is disk {:?} of vm {:?}",
            owner.disk, owner.vm
        )));
    }
    if vm
        .spec
        .disks
        .iter()
        .filter(|d| d.attach.as_deref() == Some(name))
        .count()
        > 1
    {
        return Err(Refusal::Invalid {
            field: format!("{field}.attach"),
            reason: format!("volume {name:?} is attached by more than one disk of the VM"),
        });
    }
    if !on_a_node(volume) {
        return Err(refuse("is on no node yet".into()));
    }
    if disk.size_bytes < volume.spec.size_bytes {
        return Err(Refusal::Invalid {
            field: format!("{field}.size_bytes"),
            reason: format!(
                "volume {name:?} is {} bytes; the disk it is is at least as large (asked {})",
                volume.spec.size_bytes, disk.size_bytes
            ),
        });
    }
    let copies = volume.spec.replicas;
    if disk.replicas != copies {
        return Err(Refusal::Invalid {
            field: format!("{field}.replicas"),
            reason: format!(
                "volume {name:?} has {copies} cop(ies); the disk it is has as many (asked {})",
                disk.replicas
            ),
        });
    }
    // A VM's replicated disks share its replica nodes: the attached
    // volume's copies.
    if copies >= 2
        && let Some((j, other)) = vm
            .spec
            .disks
            .iter()
            .enumerate()
            .find(|(_, d)| d.replicas >= 2 && d.replicas != copies)
    {
        return Err(Refusal::Invalid {
            field: format!("spec.disks[{j}].replicas"),
            reason: format!(
                "disk {:?} asks {} replicas; the VM's replicated disks share the nodes of attached volume {name:?}, which has {copies}",
                other.name, other.replicas
            ),
        });
    }
    Ok(())
}

/// The rules for a volume `name` attached by a disk added to VM `vm`
/// (at `field`) once the VM is placed: the VM does not move for it, so
/// the volume must already be where the VM's disks are — its primary copy
/// on the VM's node, its copies on the VM's replica nodes — at an epoch
/// no later than the VM's (the copies refuse an older one), with every
/// copy in place and none outdated, and the VM not moving. A VM not yet
/// placed goes where the volume is at its first placement ([`pins`]).
fn check_attach_placed(state: &State, vm: &Vm, field: &str, name: &str) -> Result<(), Refusal> {
    let Some(Object::Placement(placement)) = state.get(Kind::Placement, &vm.meta.name) else {
        return Ok(());
    };
    let Some(volume) = source(state, name) else {
        return Ok(());
    };
    let refuse = |why: String| {
        Err(Refusal::FailedPrecondition {
            reason: format!("{field}.attach: volume {name:?} {why}"),
        })
    };
    if migrating(state, vm) {
        return refuse(format!(
            "cannot be attached while vm {:?} is migrating: attach it once the move is over",
            vm.meta.name
        ));
    }
    let v = &volume.status;
    if v.primary_node != placement.node {
        return refuse(format!(
            "has its primary copy on node {:?} and vm {:?} runs on node {:?}: attach a volume whose primary copy is on the VM's node (a clone of one of its disks is)",
            v.primary_node, vm.meta.name, placement.node
        ));
    }
    if let Some(short) = short_of_copies(volume) {
        return refuse(format!("{short}: attach it once the lost copy is replaced"));
    }
    if volume.spec.replicas >= 2 {
        let copies = replica_nodes(volume);
        let mut wanted = placement.replica_nodes.clone();
        wanted.sort();
        if copies != wanted {
            return refuse(format!(
                "has copies on nodes {copies:?} and vm {:?}'s replicated disks are on nodes {wanted:?}: they must be the same nodes",
                vm.meta.name
            ));
        }
    }
    if let Some(node) = outdated_copies(volume).first() {
        return refuse(format!(
            "has an outdated copy on node {node:?}: attach it once its primary has resynced it"
        ));
    }
    if v.epoch > placement.epoch {
        return refuse(format!(
            "is at epoch {}, past vm {:?}'s {}: its copies would refuse the VM's writes",
            v.epoch, vm.meta.name, placement.epoch
        ));
    }
    Ok(())
}

/// Whether a migration of `vm` is under way.
fn migrating(state: &State, vm: &Vm) -> bool {
    state.list(Kind::Migration).any(|o| {
        matches!(o, Object::Migration(m) if m.spec.vm == vm.meta.name && !m.status.phase.is_terminal())
    })
}

/// The rules for a disk of the VM's own (not attaching a volume) that an
/// update adds to `vm` (at `field`) once it is placed: its node makes it
/// at the placement's epoch, so not while the VM moves (the target would
/// wait at the next epoch for a volume its source holds); and a
/// replicated one goes on the VM's replica nodes, so it asks as many
/// copies as there are.
fn check_added_placed(state: &State, vm: &Vm, disk: &Disk, field: &str) -> Result<(), Refusal> {
    let Some(Object::Placement(placement)) = state.get(Kind::Placement, &vm.meta.name) else {
        return Ok(());
    };
    if migrating(state, vm) {
        return Err(Refusal::FailedPrecondition {
            reason: format!(
                "{field}: disk {:?} cannot be added while vm {:?} is migrating: add it once the move is over",
                disk.name, vm.meta.name
            ),
        });
    }
    let nodes = placement.replica_nodes.len();
    if disk.replicas >= 2 && nodes != disk.replicas as usize {
        let has = if nodes == 0 {
            "has no replica nodes (its disks have one copy each)".to_owned()
        } else {
            format!("has {nodes} replica nodes ({:?})", placement.replica_nodes)
        };
        return Err(Refusal::FailedPrecondition {
            reason: format!(
                "{field}.replicas: disk {:?} asks {} copies and vm {:?}, placed on node {:?}, {has}: a disk added to a placed VM has 1 copy or one on each of its replica nodes",
                disk.name, disk.replicas, vm.meta.name, placement.node
            ),
        });
    }
    Ok(())
}

/// Whether volume `v` has a primary copy on a node, under its pool name.
fn on_a_node(v: &Volume) -> bool {
    !v.status.primary_node.is_empty() && !v.status.storage_name.is_empty()
}

/// The volume `what` (a disk's clone source or attached volume) follows,
/// or, when it is missing or on no node yet, a pin to nowhere saying so.
fn placed<'a>(what: &str, volume: Option<&'a Volume>) -> Result<&'a Volume, Pin> {
    let nowhere = |why: &str| Pin {
        why: format!("{what}, which {why}"),
        ..Pin::default()
    };
    match volume {
        None => Err(nowhere("does not exist")),
        Some(v) if !on_a_node(v) => Err(nowhere("is on no node yet")),
        Some(v) => Ok(v),
    }
}

/// The pin of a disk cloned from volume `name`: its primary copy's node.
fn clone_pin(disk: &Disk, name: &str, from: Option<&Volume>) -> Pin {
    let clone = format!("disk {:?} is a clone of volume {name:?}", disk.name);
    match placed(&clone, from) {
        Err(nowhere) => nowhere,
        Ok(v) => Pin {
            why: format!(
                "{clone}, whose primary copy is on node {:?}",
                v.status.primary_node
            ),
            node: Some(v.status.primary_node.clone()),
            ..Pin::default()
        },
    }
}

/// The pin of a disk attaching volume `name`: its primary copy's node,
/// its copies' nodes when it has two or more, an epoch past its own.
fn attach_pin(disk: &Disk, name: &str, volume: Option<&Volume>) -> Pin {
    let attached = format!("disk {:?} is volume {name:?}", disk.name);
    let v = match placed(&attached, volume) {
        Err(nowhere) => return nowhere,
        Ok(v) => v,
    };
    let nowhere = |why: String| Pin {
        why: format!("{attached}, {why}"),
        ..Pin::default()
    };
    // A lost copy being replaced: the VM's replica nodes are all its
    // copies' nodes.
    if let Some(short) = short_of_copies(v) {
        return nowhere(format!("which {short}"));
    }
    // The VM's status would not carry the mark: it waits until the primary
    // has the copy back in sync (decision 74).
    let outdated = outdated_copies(v);
    if !outdated.is_empty() {
        return nowhere(format!(
            "whose copy on node(s) {outdated:?} is outdated until its primary resyncs it"
        ));
    }
    let node = v.status.primary_node.clone();
    Pin {
        why: format!("{attached}, whose primary copy is on node {node:?}"),
        node: Some(node),
        replica_nodes: if v.spec.replicas >= 2 {
            replica_nodes(v)
        } else {
            Vec::new()
        },
        epoch: v.status.epoch + 1,
    }
}

/// "has N of its M copies" when volume `v` lacks some (a lost one being
/// replaced).
fn short_of_copies(v: &Volume) -> Option<String> {
    (v.status.replicas.len() != v.spec.replicas as usize).then(|| {
        format!(
            "has {} of its {} copies",
            v.status.replicas.len(),
            v.spec.replicas
        )
    })
}

/// The nodes of volume `v`'s copies marked outdated.
fn outdated_copies(v: &Volume) -> Vec<&str> {
    v.status
        .replicas
        .iter()
        .filter(|r| r.outdated)
        .map(|r| r.node.as_str())
        .collect()
}

/// The nodes of volume `v`'s copies, sorted: a VM's replica nodes when it
/// attaches `v`.
fn replica_nodes(v: &Volume) -> Vec<String> {
    let mut nodes: Vec<String> = v.status.replicas.iter().map(|r| r.node.clone()).collect();
    nodes.sort();
    nodes
}

/// The pins of `vms` (VMs without a placement: their first one) that
/// have disks made from volumes or attaching them: the node holding the
/// volumes' primary copies (and an attached volume's copies' nodes and
/// epoch). Volumes on no node yet (a snapshot being made), gone, or on
/// different nodes leave the VM pinned nowhere, with the reason.
pub fn pins<'a>(state: &State, vms: impl IntoIterator<Item = &'a Vm>) -> Pins {
    let mut pins = BTreeMap::new();
    for vm in vms {
        let mut pin: Option<Pin> = None;
        for disk in &vm.spec.disks {
            let next = match (&disk.source_volume, &disk.attach) {
                (Some(name), _) => clone_pin(disk, name, source(state, name)),
                (None, Some(name)) => attach_pin(disk, name, source(state, name)),
                (None, None) => continue,
            };
            pin = Some(match pin {
                None => next,
                Some(first) => merge(first, next),
            });
        }
        if let Some(pin) = pin {
            pins.insert(vm.meta.name.clone(), pin);
        }
    }
    pins
}

/// Two disks' pins as one: the same node, and the same copies' nodes where
/// both name some; else pinned nowhere, saying why.
fn merge(first: Pin, next: Pin) -> Pin {
    if first.node.is_none() {
        return first;
    }
    if next.node.is_none() {
        return next;
    }
    let copies_agree = first.replica_nodes.is_empty()
        || next.replica_nodes.is_empty()
        || first.replica_nodes == next.replica_nodes;
    if next.node != first.node || !copies_agree {
        return Pin {
            why: format!(
                "{}; {}: one VM's disks from or of volumes are on one node",
                first.why, next.why
            ),
            ..Pin::default()
        };
    }
    Pin {
        replica_nodes: if first.replica_nodes.is_empty() {
            next.replica_nodes
        } else {
            first.replica_nodes
        },
        epoch: first.epoch.max(next.epoch),
        ..first
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{ObjectMeta, VmPhase, VolumeSpec, VolumeStatus};

    use super::*;
    use crate::state::Command;

    fn volume(name: &str, size_bytes: u64, primary: &str) -> Object {
        Object::Volume(Volume {
            meta: ObjectMeta::named(name),
            spec: VolumeSpec {
                size_bytes,
                replicas: 1,
                ..VolumeSpec::default()
            },
            status: VolumeStatus {
                storage_name: if primary.is_empty() {
                    String::new()
                } else {
                    format!("vol-{name}")
                },
                primary_node: primary.into(),
                ..VolumeStatus::default()
            },
        })
    }

    fn vm(name: &str, disks: &[(&str, u64, Option<&str>)]) -> Vm {
        let mut vm = Vm {
            meta: ObjectMeta::named(name),
            ..Vm::default()
        };
        vm.spec.cpus = 1;
        vm.spec.memory_mib = 128;
        vm.spec.disks = disks
            .iter()
            .map(|(disk, size_bytes, from)| Disk {
                name: (*disk).into(),
                size_bytes: *size_bytes,
                image: None,
                replicas: 1,
                source_volume: from.map(str::to_owned),
                attach: None,
                attached_storage_name: None,
                added_at_epoch: None,
                protocol: Default::default(),
            })
            .collect();
        vm
    }

    fn state() -> (State, u64) {
        let mut state = State::default();
        let mut index = 0;
        for object in [
            volume("golden", 16 << 20, "a"),
            volume("other", 8 << 20, "b"),
            volume("fresh", 8 << 20, ""),
        ] {
            index += 1;
            state.apply(index, Command::Create(object)).expect("volume");
        }
        (state, index)
    }

    fn refusal(state: &mut State, index: u64, command: Command) -> Refusal {
        state.apply(index, command).expect_err("refused")
    }

    #[test]
    fn a_new_vm_takes_its_sources_size_and_names_a_bad_source_or_size() {
        let (mut state, mut index) = state();
        index += 1;
        let applied = state
            .apply(
                index,
                Command::Create(Object::Vm(vm("web", &[("root", 0, Some("golden"))]))),
            )
            .expect("created");
        let Object::Vm(web) = &applied.changes[0].object else {
            panic!("a vm");
        };
        assert_eq!(web.spec.disks[0].size_bytes, 16 << 20);

        let missing = vm("db", &[("data", 0, None), ("root", 0, Some("nope"))]);
        match refusal(&mut state, index + 1, Command::Create(Object::Vm(missing))) {
            Refusal::FailedPrecondition { reason } => assert!(
                reason.starts_with("spec.disks[1].source_volume: volume \"nope\""),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        let small = vm("db", &[("root", 8 << 20, Some("golden"))]);
        match refusal(&mut state, index + 1, Command::Create(Object::Vm(small))) {
            Refusal::Invalid { field, .. } => assert_eq!(field, "spec.disks[0].size_bytes"),
            other => panic!("{other:?}"),
        }
        let bigger = vm("db", &[("root", 32 << 20, Some("golden"))]);
        state
            .apply(index + 1, Command::Create(Object::Vm(bigger)))
            .expect("a larger clone");

        // An update keeps each disk's source as created, adds none.
        let mut changed = web.clone();
        changed.spec.disks[0].source_volume = Some("other".into());
        match refusal(&mut state, index + 2, Command::Update(Object::Vm(changed))) {
            Refusal::Invalid { field, .. } => assert_eq!(field, "spec.disks[0].source_volume"),
            other => panic!("{other:?}"),
        }
        let mut added = web.clone();
        added
            .spec
            .disks
            .push(vm("x", &[("data", 8 << 20, Some("other"))]).spec.disks[0].clone());
        match refusal(&mut state, index + 2, Command::Update(Object::Vm(added))) {
            Refusal::Invalid { field, .. } => assert_eq!(field, "spec.disks[1].source_volume"),
            other => panic!("{other:?}"),
        }
        let mut grown = web.clone();
        grown.spec.disks[0].size_bytes = 32 << 20;
        state
            .apply(index + 2, Command::Update(Object::Vm(grown)))
            .expect("a clone grows like any disk");
    }

    #[test]
    fn pins_name_the_sources_primary_node_or_why_there_is_none() {
        let (state, _) = state();
        let vms = [
            vm("plain", &[("root", 1 << 20, None)]),
            vm(
                "web",
                &[("root", 0, Some("golden")), ("data", 1 << 20, None)],
            ),
            vm("wait", &[("root", 0, Some("fresh"))]),
            vm("gone", &[("root", 0, Some("nope"))]),
            vm(
                "split",
                &[("a", 0, Some("golden")), ("b", 0, Some("other"))],
            ),
            vm(
                "same",
                &[("a", 0, Some("golden")), ("b", 0, Some("golden"))],
            ),
        ];
        let pins = pins(&state, &vms);
        assert!(!pins.contains_key("plain"));
        assert_eq!(pins["web"].node.as_deref(), Some("a"));
        assert!(
            pins["web"]
                .why
                .contains("volume \"golden\", whose primary copy is on node \"a\""),
            "{:?}",
            pins["web"]
        );
        assert_eq!(pins["same"].node.as_deref(), Some("a"));
        for (vm, says) in [
            ("wait", "on no node yet"),
            ("gone", "does not exist"),
            ("split", "one VM's disks from or of volumes are on one node"),
        ] {
            assert_eq!(pins[vm].node, None, "{vm}");
            assert!(pins[vm].why.contains(says), "{vm}: {:?}", pins[vm]);
        }
    }

    /// A standalone volume `name` of `copies` copies on `nodes` (the first
    /// its primary) at epoch `epoch`.
    fn placed(name: &str, copies: u32, nodes: &[&str], epoch: u64) -> Object {
        let Object::Volume(mut v) = volume(name, 16 << 20, nodes[0]) else {
            unreachable!()
        };
        v.spec.replicas = copies;
        v.status.epoch = epoch;
        v.status.replicas = nodes
            .iter()
            .map(|n| basalt_api::VolumeReplica {
                node: (*n).into(),
                primary: *n == nodes[0],
                ..Default::default()
            })
            .collect();
        Object::Volume(v)
    }

    /// VM `name` whose disk `data` attaches `volume` (size and replicas
    /// left to it), beside the disks `others` (name, replicas).
    fn attaching(name: &str, volume: &str, others: &[(&str, u32)]) -> Vm {
        let mut vm = vm(name, &[]);
        vm.spec.disks.push(Disk {
            name: "data".into(),
            attach: Some(volume.into()),
            ..Disk::default()
        });
        for (disk, replicas) in others {
            vm.spec.disks.push(Disk {
                name: (*disk).into(),
                size_bytes: 1 << 20,
                replicas: *replicas,
                ..Disk::default()
            });
        }
        vm
    }

    fn attach_state() -> (State, u64) {
        let (mut state, mut index) = state();
        let Object::Volume(mut snap) = volume("snap", 16 << 20, "a") else {
            unreachable!()
        };
        snap.spec.source = Some(basalt_api::VolumeSource {
            volume: "golden".into(),
            snapshot: true,
        });
        let Object::Volume(mut stale) = placed("stale", 2, &["a", "b"], 2) else {
            unreachable!()
        };
        stale.status.replicas[1].outdated = true;
        let Object::Volume(mut short) = placed("short", 2, &["a", "b"], 2) else {
            unreachable!()
        };
        short.status.replicas.pop();
        for object in [
            placed("scratch", 2, &["b", "c"], 3),
            placed("single", 1, &["a"], 1),
            Object::Volume(snap),
            Object::Volume(stale),
            Object::Volume(short),
        ] {
            index += 1;
            state.apply(index, Command::Create(object)).expect("volume");
        }
        (state, index)
    }

    /// What an attached volume fills in of its disk: size, copies, pool name.
    fn filled(disk: &Disk) -> (u64, u32, Option<&str>) {
        (
            disk.size_bytes,
            disk.replicas,
            disk.attached_storage_name.as_deref(),
        )
    }

    #[test]
    fn an_attached_volume_fills_in_the_disk_and_is_refused_when_it_cannot_be_the_disk() {
        let (mut state, mut index) = attach_state();
        index += 1;
        let applied = state
            .apply(
                index,
                Command::Create(Object::Vm(attaching("web", "scratch", &[]))),
            )
            .expect("created");
        let Object::Vm(web) = &applied.changes[0].object else {
            panic!("a vm");
        };
        let disk = &web.spec.disks[0];
        assert_eq!(filled(disk), (16 << 20, 2, Some("vol-scratch")));
        assert_eq!(disk.storage_name(&web.meta.uid), "vol-scratch");

        let invalid = |r: Refusal| match r {
            Refusal::Invalid { field, reason } => format!("{field}: {reason}"),
            other => panic!("{other:?}"),
        };
        let failed = |r: Refusal| match r {
            Refusal::FailedPrecondition { reason } => reason,
            other => panic!("{other:?}"),
        };
        let mut create = |vm: Vm| refusal(&mut state, index + 1, Command::Create(Object::Vm(vm)));
        let says = failed(create(attaching("db", "scratch", &[])));
        assert!(says.starts_with("spec.disks[0].attach: volume \"scratch\" is attached as disk \"data\" of vm \"web\""), "{says}");
        let says = failed(create(attaching("db", "nope", &[])));
        assert!(says.contains("\"nope\" does not exist"), "{says}");
        let says = failed(create(attaching("db", "fresh", &[])));
        assert!(says.contains("on no node yet"), "{says}");
        let says = invalid(create(attaching("db", "snap", &[])));
        assert!(
            says.starts_with("spec.disks[0].attach: ") && says.contains("snapshot"),
            "{says}"
        );
        let mut one = attaching("db", "single", &[]);
        one.spec.disks[0].replicas = 2;
        let says = invalid(create(one));
        assert!(says.starts_with("spec.disks[0].replicas: "), "{says}");
        let mut small = attaching("db", "single", &[]);
        small.spec.disks[0].size_bytes = 1 << 20;
        let says = invalid(create(small));
        assert!(says.starts_with("spec.disks[0].size_bytes: "), "{says}");
        // Replicated disks share the attached volume's nodes.
        let three = attaching("db", "scratch", &[("root", 3)]);
        let (mut fresh, at) = attach_state();
        let says = invalid(refusal(
            &mut fresh,
            at + 1,
            Command::Create(Object::Vm(three)),
        ));
        assert!(says.starts_with("spec.disks[1].replicas: "), "{says}");
        let mut twice = attaching("db", "single", &[]);
        twice.spec.disks.push(twice.spec.disks[0].clone());
        twice.spec.disks[1].name = "again".into();
        let says = invalid(refusal(
            &mut fresh,
            at + 1,
            Command::Create(Object::Vm(twice)),
        ));
        assert!(says.contains("more than one disk"), "{says}");

        // While attached, the volume is not deleted; an update keeps what
        // a disk attaches.
        match refusal(
            &mut state,
            index + 1,
            Command::Delete {
                kind: Kind::Volume,
                name: "scratch".into(),
                expected_resource_version: None,
                force: false,
            },
        ) {
            Refusal::FailedPrecondition { reason } => {
                assert!(
                    reason.contains("attached as disk \"data\" of vm \"web\""),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        let mut moved = web.clone();
        moved.spec.disks[0].attach = Some("single".into());
        let says = invalid(refusal(
            &mut state,
            index + 1,
            Command::Update(Object::Vm(moved)),
        ));
        assert!(says.starts_with("spec.disks[0].attach: "), "{says}");
        let mut grown = web.clone();
        grown.spec.disks[0].size_bytes = 32 << 20;
        // The pool name is the control plane's: an update that leaves it
        // out (or names another) keeps the recorded one.
        grown.spec.disks[0].attached_storage_name = None;
        state
            .apply(index + 1, Command::Update(Object::Vm(grown)))
            .expect("an attached disk grows like any disk");
        let mut renamed = match state.get(Kind::Vm, "web") {
            Some(Object::Vm(vm)) => vm.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            renamed.spec.disks[0].attached_storage_name, web.spec.disks[0].attached_storage_name,
            "kept through an update without it"
        );
        assert!(renamed.spec.disks[0].attached_storage_name.is_some());
        renamed.spec.disks[0].attached_storage_name = Some("vol-elsewhere".into());
        state
            .apply(index + 2, Command::Update(Object::Vm(renamed)))
            .expect("a different pool name is overwritten, not refused");
        match state.get(Kind::Vm, "web") {
            Some(Object::Vm(vm)) => assert_eq!(
                vm.spec.disks[0].attached_storage_name,
                web.spec.disks[0].attached_storage_name
            ),
            other => panic!("{other:?}"),
        }

        // Removing the attached disk is allowed whatever the VM does: the
        // volume is released only once its guest let go of it (the volume
        // controller's hold, decision 78).
        let mut removed = match state.get(Kind::Vm, "web") {
            Some(Object::Vm(vm)) => vm.clone(),
            other => panic!("{other:?}"),
        };
        removed.spec.running = true;
        removed.status.phase = VmPhase::Running;
        removed.spec.disks.retain(|d| d.name != "data");
        state
            .apply(index + 3, Command::Update(Object::Vm(removed)))
            .expect("a running VM's attached disk is removed");
    }

    /// Applies `command` at the next index.
    fn next(state: &mut State, index: &mut u64, command: Command) -> Result<Object, Refusal> {
        *index += 1;
        state
            .apply(*index, command)
            .map(|applied| applied.changes[0].object.clone())
    }

    /// VM `name` with disk `root` of `replicas` copies, placed on `node`
    /// (replica nodes `copies`) at `epoch` unless `node` is empty.
    fn running(
        state: &mut State,
        index: &mut u64,
        (name, replicas): (&str, u32),
        (node, copies, epoch): (&str, &[&str], u64),
    ) -> Vm {
        let mut vm = vm(name, &[("root", 1 << 20, None)]);
        vm.spec.disks[0].replicas = replicas;
        vm.spec.running = true;
        let Ok(Object::Vm(vm)) = next(state, index, Command::Create(Object::Vm(vm))) else {
            panic!("vm {name}");
        };
        if !node.is_empty() {
            next(
                state,
                index,
                Command::Create(placement(name, node, copies, epoch)),
            )
            .expect("placement");
        }
        vm
    }

    fn placement(vm: &str, node: &str, copies: &[&str], epoch: u64) -> Object {
        Object::Placement(basalt_api::Placement {
            meta: ObjectMeta::named(vm),
            vm: vm.into(),
            node: node.into(),
            epoch,
            replica_nodes: copies.iter().map(|n| (*n).to_owned()).collect(),
        })
    }

    /// `vm` with a disk `data` attaching `volume` added.
    fn with_attached(vm: &Vm, volume: &str) -> Command {
        let mut vm = vm.clone();
        vm.spec
            .disks
            .push(attaching("x", volume, &[]).spec.disks[0].clone());
        Command::Update(Object::Vm(vm))
    }

    /// [`attach_state`] with nodes a, b and c.
    fn with_nodes() -> (State, u64) {
        let (mut state, mut index) = attach_state();
        for node in ["a", "b", "c"] {
            let node = basalt_api::Node {
                meta: ObjectMeta::named(node),
                ..Default::default()
            };
            next(&mut state, &mut index, Command::Create(Object::Node(node))).expect("node");
        }
        (state, index)
    }

    #[test]
    fn a_disk_added_to_a_vm_attaches_a_volume_where_the_vm_is() {
        let (mut state, mut index) = with_nodes();
        let i = &mut index;
        next(&mut state, i, Command::Create(placed("solo", 1, &["a"], 2))).expect("volume");
        let failed = |r: Result<Object, Refusal>| match r {
            Err(Refusal::FailedPrecondition { reason }) => reason,
            other => panic!("{other:?}"),
        };

        // Not placed yet: it goes where the volume is at its first
        // placement; the disk is filled in as at a create.
        let web = running(&mut state, i, ("web", 1), ("", &[], 0));
        let Ok(Object::Vm(web)) = next(&mut state, i, with_attached(&web, "single")) else {
            panic!("attached to a VM not placed yet");
        };
        assert_eq!(
            filled(&web.spec.disks[1]),
            (16 << 20, 1, Some("vol-single"))
        );

        // Placed: the volume must be where the VM is.
        let db = running(&mut state, i, ("db", 1), ("b", &[], 1));
        let says = failed(next(&mut state, i, with_attached(&db, "solo")));
        assert!(
            says.starts_with("spec.disks[1].attach: volume \"solo\" has its primary copy on node \"a\" and vm \"db\" runs on node \"b\""),
            "{says}"
        );
        let app = running(&mut state, i, ("app", 1), ("a", &[], 1));
        let says = failed(next(&mut state, i, with_attached(&app, "solo")));
        assert!(
            says.contains("is at epoch 2, past vm \"app\"'s 1"),
            "{says}"
        );
        let Some(Object::Placement(p)) = state.get(Kind::Placement, "app").cloned() else {
            panic!("placement");
        };
        let mut moved = p.clone();
        moved.epoch = 2;
        next(&mut state, i, Command::Update(Object::Placement(moved))).expect("epoch 2");
        let Ok(Object::Vm(app)) = next(&mut state, i, with_attached(&app, "solo")) else {
            panic!("attached to a running VM on its node at its epoch");
        };
        assert_eq!(app.spec.disks[1].attach.as_deref(), Some("solo"));

        // Replicated: the copies' nodes are the VM's replica nodes, all
        // there, none outdated.
        let rep = running(&mut state, i, ("rep", 2), ("b", &["c", "b"], 3));
        next(&mut state, i, with_attached(&rep, "scratch")).expect("same nodes, same epoch");
        let wide = running(&mut state, i, ("wide", 2), ("a", &["a", "c"], 5));
        let says = failed(next(&mut state, i, with_attached(&wide, "stale")));
        assert!(
            says.contains("copies on nodes [\"a\", \"b\"] and vm \"wide\"'s replicated disks are on nodes [\"a\", \"c\"]"),
            "{says}"
        );
        let old = running(&mut state, i, ("old", 2), ("a", &["a", "b"], 5));
        let says = failed(next(&mut state, i, with_attached(&old, "stale")));
        assert!(says.contains("outdated copy on node \"b\""), "{says}");
        let says = failed(next(&mut state, i, with_attached(&old, "short")));
        assert!(says.contains("has 1 of its 2 copies"), "{says}");
        // Another VM's volume stays refused.
        let says = failed(next(&mut state, i, with_attached(&old, "single")));
        assert!(
            says.contains("attached as disk \"data\" of vm \"web\""),
            "{says}"
        );
    }

    #[test]
    fn a_disk_of_its_own_added_to_a_placed_vm_records_the_epoch_it_is_made_at() {
        let (mut state, mut index) = with_nodes();
        let i = &mut index;
        let failed = |r: Result<Object, Refusal>| match r {
            Err(Refusal::FailedPrecondition { reason }) => reason,
            other => panic!("{other:?}"),
        };
        let with_own = |vm: &Vm, name: &str, replicas: u32| {
            let mut vm = vm.clone();
            let mut disk = super::tests::vm("x", &[(name, 1 << 20, None)]).spec.disks[0].clone();
            disk.replicas = replicas;
            // The client's value is not taken.
            disk.added_at_epoch = Some(99);
            vm.spec.disks.push(disk);
            Command::Update(Object::Vm(vm))
        };

        // A new VM's disks, and one added before it is placed, are made at
        // its first placement.
        let mut fresh = vm("fresh", &[("root", 1 << 20, None)]);
        fresh.spec.disks[0].added_at_epoch = Some(7);
        let Ok(Object::Vm(fresh)) = next(&mut state, i, Command::Create(Object::Vm(fresh))) else {
            panic!("created");
        };
        assert_eq!(fresh.spec.disks[0].added_at_epoch, None);
        let Ok(Object::Vm(fresh)) = next(&mut state, i, with_own(&fresh, "data", 1)) else {
            panic!("added before placement");
        };
        assert_eq!(fresh.spec.disks[1].added_at_epoch, None);

        // Placed at epoch 3: the disk added records 3, and keeps it through
        // later updates whatever the client sends.
        let moved = running(&mut state, i, ("moved", 1), ("a", &[], 3));
        let Ok(Object::Vm(moved)) = next(&mut state, i, with_own(&moved, "data", 1)) else {
            panic!("added to a placed VM");
        };
        let epochs = |vm: &Vm| {
            vm.spec
                .disks
                .iter()
                .map(|d| d.added_at_epoch)
                .collect::<Vec<_>>()
        };
        assert_eq!(epochs(&moved), [None, Some(3)]);
        let mut edited = moved.clone();
        edited.spec.disks[1].added_at_epoch = None;
        edited.spec.disks[0].added_at_epoch = Some(5);
        edited.spec.disks[1].size_bytes = 2 << 20;
        let Ok(Object::Vm(edited)) = next(&mut state, i, Command::Update(Object::Vm(edited)))
        else {
            panic!("grown");
        };
        assert_eq!(epochs(&edited), [None, Some(3)]);

        // A replicated disk goes on the VM's replica nodes: as many copies
        // as there are nodes, and none on a VM without replica nodes.
        let says = failed(next(&mut state, i, with_own(&edited, "more", 2)));
        assert!(
            says.starts_with("spec.disks[2].replicas: disk \"more\" asks 2 copies and vm \"moved\", placed on node \"a\", has no replica nodes"),
            "{says}"
        );
        let rep = running(&mut state, i, ("rep", 2), ("b", &["b", "c"], 2));
        let says = failed(next(&mut state, i, with_own(&rep, "more", 3)));
        assert!(says.contains("has 2 replica nodes"), "{says}");
        let Ok(Object::Vm(rep)) = next(&mut state, i, with_own(&rep, "more", 2)) else {
            panic!("a replicated disk on the VM's replica nodes");
        };
        assert_eq!(epochs(&rep), [None, Some(2)]);

        // Not while the VM moves: its target would wait for it at the next
        // epoch.
        let migration = basalt_api::Migration {
            meta: ObjectMeta::named("rep"),
            spec: basalt_api::MigrationSpec {
                vm: "rep".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        next(&mut state, i, Command::Create(Object::Migration(migration))).expect("migration");
        let says = failed(next(&mut state, i, with_own(&rep, "late", 1)));
        assert!(
            says.contains("disk \"late\" cannot be added while vm \"rep\" is migrating"),
            "{says}"
        );
    }

    #[test]
    fn an_attached_volume_pins_the_node_its_copies_and_an_epoch_past_its_own() {
        let (state, _) = attach_state();
        let vms = [
            attaching("web", "scratch", &[]),
            attaching("one", "single", &[("root", 1)]),
            attaching("wait", "fresh", &[]),
            attaching("fenced", "stale", &[]),
            attaching("short", "short", &[]),
            {
                let mut both = attaching("both", "scratch", &[]);
                both.spec
                    .disks
                    .push(vm("x", &[("root", 0, Some("other"))]).spec.disks[0].clone());
                both
            },
            {
                let mut split = attaching("split", "scratch", &[]);
                split
                    .spec
                    .disks
                    .push(vm("x", &[("root", 0, Some("golden"))]).spec.disks[0].clone());
                split
            },
        ];
        let pins = pins(&state, &vms);
        assert_eq!(
            pins["web"],
            Pin {
                node: Some("b".into()),
                why: "disk \"data\" is volume \"scratch\", whose primary copy is on node \"b\""
                    .into(),
                replica_nodes: vec!["b".into(), "c".into()],
                epoch: 4,
            }
        );
        assert_eq!(pins["one"].node.as_deref(), Some("a"));
        assert!(
            pins["one"].replica_nodes.is_empty(),
            "one copy: the scheduler's choice"
        );
        assert_eq!(pins["one"].epoch, 2);
        assert_eq!(pins["wait"].node, None);
        assert_eq!(pins["short"].node, None);
        assert!(
            pins["short"].why.contains("has 1 of its 2 copies"),
            "{:?}",
            pins["short"]
        );
        assert_eq!(pins["fenced"].node, None);
        assert!(
            pins["fenced"]
                .why
                .contains("copy on node(s) [\"b\"] is outdated"),
            "{:?}",
            pins["fenced"]
        );
        // A clone from a volume on the same node joins the attached pin.
        assert_eq!(pins["both"].node.as_deref(), Some("b"));
        assert_eq!(pins["both"].replica_nodes, ["b", "c"]);
        assert_eq!(pins["both"].epoch, 4);
        assert_eq!(pins["split"].node, None);
        assert!(
            pins["split"].why.contains("on one node"),
            "{:?}",
            pins["split"]
        );
    }
}
