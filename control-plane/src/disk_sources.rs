//! VM disks made from volumes (decision 64): a disk with `source_volume`
//! is a copy-on-write clone of that volume (standalone, snapshot or
//! clone), made by the agent of the node holding the source's primary
//! copy, in that node's pool — the same storage clone `basalt volume
//! clone` uses. This module holds the control plane's part:
//!
//! - [`complete`], on apply of a new VM: a disk of size 0 takes its
//!   source's size;
//! - [`check`], on apply: a new VM's source volumes exist
//!   (`FAILED_PRECONDITION` naming the disk's field) and are no larger
//!   than their disks (`INVALID_ARGUMENT` on the size); an update neither
//!   adds a disk from a volume nor changes a disk's source (the clone is
//!   made once, at the VM's first placement);
//! - [`pins`]: the node each VM placed for the first time must go to (the
//!   scheduler's hard filter, [`crate::scheduler::Pin`]).
//!
//! Invariants:
//! - all three are pure functions of the state, so every member applies
//!   the same VM;
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

/// Fills in, for a VM being created, the size of each disk made from a
/// volume that leaves it 0: the source's size. A missing source is left
/// for [`check`] to refuse.
pub fn complete(state: &State, object: &mut Object) {
    let Object::Vm(vm) = object else {
        return;
    };
    for disk in &mut vm.spec.disks {
        if disk.size_bytes == 0
            && let Some(from) = disk.source_volume.as_deref().and_then(|n| source(state, n))
        {
            disk.size_bytes = from.spec.size_bytes;
        }
    }
}

/// The rules for disks made from volumes, on apply of `vm` (`current`:
/// the VM it replaces, for an update). See the module's doc.
pub fn check(state: &State, vm: &Vm, current: Option<&Vm>) -> Result<(), Refusal> {
    for (i, disk) in vm.spec.disks.iter().enumerate() {
        let Some(name) = &disk.source_volume else {
            continue;
        };
        let field = format!("spec.disks[{i}]");
        if let Some(current) = current {
            let before = current.spec.disks.iter().find(|d| d.name == disk.name);
            if before.and_then(|d| d.source_volume.as_ref()) != Some(name) {
                return Err(Refusal::Invalid {
                    field: format!("{field}.source_volume"),
                    reason: format!(
                        "disk {:?} cannot become a clone of volume {name:?}: a disk is made from a volume only when its VM is created",
                        disk.name
                    ),
                });
            }
            continue;
        }
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
    }
    Ok(())
}

/// Why `disk` goes where its source's primary copy is.
fn why(disk: &Disk, name: &str, from: Option<&Volume>) -> (Option<String>, String) {
    let clone = format!("disk {:?} is a clone of volume {name:?}", disk.name);
    match from {
        None => (None, format!("{clone}, which does not exist")),
        Some(v) if v.status.primary_node.is_empty() || v.status.storage_name.is_empty() => {
            (None, format!("{clone}, which is on no node yet"))
        }
        Some(v) => {
            let node = v.status.primary_node.clone();
            let why = format!("{clone}, whose primary copy is on node {node:?}");
            (Some(node), why)
        }
    }
}

/// The pins of `vms` (VMs without a placement: their first one) that
/// have disks made from volumes: the node holding the sources' primary
/// copies. Sources on no node yet (a snapshot being made), gone, or on
/// different nodes leave the VM pinned nowhere, with the reason.
pub fn pins<'a>(state: &State, vms: impl IntoIterator<Item = &'a Vm>) -> Pins {
    let mut pins = BTreeMap::new();
    for vm in vms {
        let mut pin: Option<Pin> = None;
        for disk in &vm.spec.disks {
            let Some(name) = &disk.source_volume else {
                continue;
            };
            let (node, why) = why(disk, name, source(state, name));
            pin = match pin {
                None => Some(Pin { node, why }),
                Some(first) if first.node.is_none() => Some(first),
                Some(_) if node.is_none() => Some(Pin { node: None, why }),
                Some(first) if node == first.node => Some(first),
                Some(first) => Some(Pin {
                    node: None,
                    why: format!(
                        "{}; {why}: one VM's disks are cloned on one node",
                        first.why
                    ),
                }),
            };
        }
        if let Some(pin) = pin {
            pins.insert(vm.meta.name.clone(), pin);
        }
    }
    pins
}

#[cfg(test)]
mod tests {
    use basalt_api::{ObjectMeta, VolumeSpec, VolumeStatus};

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
            ("split", "one VM's disks are cloned on one node"),
        ] {
            assert_eq!(pins[vm].node, None, "{vm}");
            assert!(pins[vm].why.contains(says), "{vm}: {:?}", pins[vm]);
        }
    }
}
