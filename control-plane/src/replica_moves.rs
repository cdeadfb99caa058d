//! A VM's replicated disks' copies moved off an evacuating node (decision
//! 82): what `basalt node drain` asks of a node besides moving its VMs.
//!
//! A placement whose `replica_nodes` name a node labelled
//! [`basalt_api::Node::EVACUATE_LABEL`], once the VM itself runs elsewhere
//! (the drain moves it first, among its replica nodes), is moved in two
//! compare-and-swap writes, the epoch kept (the primary does not move):
//!
//! 1. **Add** ([`plan`]): a node the scheduler's replica choice picks
//!    ([`scheduler::plan_replacements`], with the evacuating nodes as the
//!    ones to replace) is appended to `replica_nodes`. Its agent makes an
//!    empty secondary of every replicated disk, and the primary, attached
//!    with it as a peer, fills it with a full sync.
//! 2. **Drop**: once every replicated disk's copy on every node that stays
//!    is up to date (the primary's report and the copy's own node say so,
//!    no fence mark on the volume or the VM), the evacuating nodes leave
//!    `replica_nodes`. The primary lets that peer go (no fence: it is
//!    retired, not lost) and the node's agent deletes its copies.
//!
//! Invariants:
//! - a copy leaves only when every other copy is up to date: the VM never
//!   has fewer up-to-date copies than before the drain;
//! - a VM on an evacuating node, or migrating, is left alone;
//! - the placement's node and epoch never change here.

use std::collections::{BTreeMap, BTreeSet};

use basalt_api::{Kind, Node, Object, Placement, Vm, VolumeReplica};

use crate::scheduler;
use crate::state::State;
use crate::volumes::DiskVolumes;

/// What [`plan`] asks for: new `replica_nodes` for some placements, and
/// why others cannot move yet.
#[derive(Debug, Default)]
pub struct Plan {
    /// Placement (as it is now) → its new `replica_nodes`.
    pub moves: Vec<(Placement, Vec<String>)>,
    /// VM → why a copy of it cannot leave an evacuating node yet.
    pub stuck: Vec<(String, String)>,
}

/// The next step (see the module's doc) for every placement with a copy
/// on a node of `evacuate`; `seed` seeds the scheduler's ties.
pub fn plan(state: &State, evacuate: &BTreeSet<String>, seed: u64) -> Plan {
    let mut out = Plan::default();
    if evacuate.is_empty() {
        return out;
    }
    let migrating: BTreeSet<&str> = state
        .list(Kind::Migration)
        .filter_map(|o| match o {
            Object::Migration(m) if !m.status.phase.is_terminal() => Some(m.spec.vm.as_str()),
            _ => None,
        })
        .collect();
    let volumes = crate::volumes::disk_volumes(state);
    let mut to_add: BTreeSet<String> = BTreeSet::new();
    for object in state.list(Kind::Placement) {
        let Object::Placement(p) = object else {
            continue;
        };
        if evacuate.contains(&p.node)
            || migrating.contains(p.vm.as_str())
            || !p.replica_nodes.iter().any(|n| evacuate.contains(n))
        {
            continue;
        }
        let Some(Object::Vm(vm)) = state.get(Kind::Vm, &p.vm) else {
            continue;
        };
        let staying: Vec<String> = p
            .replica_nodes
            .iter()
            .filter(|n| !evacuate.contains(*n))
            .cloned()
            .collect();
        if staying.len() < vm.spec.replicas_wanted() {
            to_add.insert(p.vm.clone());
            continue;
        }
        match lagging(vm, &staying, &volumes) {
            None => out.moves.push((p.clone(), staying)),
            Some(why) => out.stuck.push((p.vm.clone(), why)),
        }
    }
    if to_add.is_empty() {
        return out;
    }
    let (nodes, vms, placements) = replica_inputs(state);
    let by_vm: BTreeMap<&str, &Placement> = placements.iter().map(|p| (p.vm.as_str(), p)).collect();
    let chosen = scheduler::plan_replacements(&nodes, &vms, &placements, evacuate, seed);
    for (vm, replicas) in chosen.replaced {
        let Some(current) = by_vm.get(vm.as_str()).filter(|_| to_add.contains(&vm)) else {
            continue;
        };
        let mut wider = current.replica_nodes.clone();
        wider.extend(
            replicas
                .into_iter()
                .filter(|n| !current.replica_nodes.contains(n)),
        );
        out.moves.push(((*current).clone(), wider));
    }
    out.stuck.extend(
        chosen
            .unschedulable
            .into_iter()
            .filter(|(vm, _)| to_add.contains(vm)),
    );
    out
}

/// What a replica plan reads of `state`: every node, every VM as the
/// planners read it ([`scheduler::planning_view`]) and every placement.
pub fn replica_inputs(state: &State) -> (Vec<Node>, Vec<Vm>, Vec<Placement>) {
    let nodes = state
        .list(Kind::Node)
        .filter_map(|o| Node::try_from(o.clone()).ok())
        .collect();
    let vms = state
        .list(Kind::Vm)
        .filter_map(|o| match o {
            Object::Vm(vm) => Some(scheduler::planning_view(vm)),
            _ => None,
        })
        .collect();
    let placements = state
        .list(Kind::Placement)
        .filter_map(|o| match o {
            Object::Placement(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    (nodes, vms, placements)
}

/// Why `vm`'s replicated disks are not all up to date on `nodes` yet
/// (their volumes in `volumes`, by VM uid and disk name); `None` when
/// they are.
fn lagging(vm: &Vm, nodes: &[String], volumes: &DiskVolumes<'_>) -> Option<String> {
    for disk in vm.spec.disks.iter().filter(|d| d.replicas >= 2) {
        let Some(volume) = volumes.get(&(vm.meta.uid.as_str(), disk.name.as_str())) else {
            return Some(format!("disk {}'s volume is not recorded yet", disk.name));
        };
        for node in nodes {
            if !volume
                .status
                .replica(node)
                .is_some_and(VolumeReplica::in_sync)
                || vm.status.is_outdated_on(node)
            {
                return Some(format!(
                    "disk {}'s copy on {node} is not up to date yet",
                    disk.name
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use basalt_api::{
        Condition, Disk, ObjectMeta, ReplicaState, Volume, VolumeOwner, VolumeSpec, VolumeStatus,
    };

    use super::*;
    use crate::state::Command;

    fn node(name: &str, evacuating: bool) -> Object {
        let mut node = Node {
            meta: ObjectMeta::named(name),
            ..Node::default()
        };
        node.status.conditions.push(Condition {
            kind: Condition::READY.into(),
            status: true,
            ..Condition::default()
        });
        node.status.allocatable.storage_bytes = 64 << 20;
        node.status.replication_address = format!("{name}:7789");
        if evacuating {
            node.meta
                .labels
                .insert(Node::EVACUATE_LABEL.into(), "true".into());
            node.spec.cordoned = true;
        }
        Object::Node(node)
    }

    /// The state: nodes a (evacuating), b, c and d; VM `db` with a
    /// 2-copy disk on `on` with replica nodes `replicas`, its volume's
    /// copies as `copies` (node, up to date).
    fn state(on: &str, replicas: &[&str], copies: &[(&str, bool)]) -> State {
        let mut state = State::default();
        let mut index = 0;
        let mut apply = |state: &mut State, command| {
            index += 1;
            state.apply(index, command).expect("applied");
        };
        for (name, evacuating) in [("a", true), ("b", false), ("c", false), ("d", false)] {
            apply(&mut state, Command::Create(node(name, evacuating)));
        }
        let mut vm = Vm {
            meta: ObjectMeta::named("db"),
            ..Vm::default()
        };
        vm.meta.uid = "u-db".into();
        vm.spec.cpus = 1;
        vm.spec.memory_mib = 64;
        vm.spec.disks = vec![Disk {
            name: "root".into(),
            size_bytes: 1 << 20,
            replicas: 2,
            ..Disk::default()
        }];
        apply(&mut state, Command::Create(Object::Vm(vm)));
        apply(
            &mut state,
            Command::Create(Object::Placement(Placement {
                meta: ObjectMeta::named("db"),
                vm: "db".into(),
                node: on.into(),
                epoch: 2,
                replica_nodes: replicas.iter().map(|n| (*n).to_owned()).collect(),
            })),
        );
        let volume = Volume {
            meta: ObjectMeta::named("db-root"),
            spec: VolumeSpec {
                size_bytes: 1 << 20,
                replicas: 2,
                owner: Some(VolumeOwner {
                    vm: "db".into(),
                    vm_uid: "u-db".into(),
                    disk: "root".into(),
                    attached: false,
                }),
                ..VolumeSpec::default()
            },
            status: VolumeStatus {
                storage_name: "u-db-root".into(),
                epoch: 2,
                primary_node: on.into(),
                replicas: copies
                    .iter()
                    .map(|(n, up)| {
                        let state = if *up {
                            ReplicaState::UpToDate
                        } else {
                            ReplicaState::Syncing
                        };
                        VolumeReplica {
                            node: (*n).into(),
                            primary: *n == on,
                            state,
                            node_state: Some(state),
                            ..VolumeReplica::default()
                        }
                    })
                    .collect(),
                ..VolumeStatus::default()
            },
        };
        apply(&mut state, Command::Create(Object::Volume(volume)));
        state
    }

    fn evacuate() -> BTreeSet<String> {
        BTreeSet::from(["a".to_owned()])
    }

    #[test]
    fn a_copy_on_an_evacuating_node_gets_a_new_one_first_and_goes_once_it_is_in_sync() {
        // The VM still on a: left for the drain to move first.
        let on_a = state("a", &["a", "b"], &[("a", true), ("b", true)]);
        let plan = plan(&on_a, &evacuate(), 1);
        assert!(plan.moves.is_empty() && plan.stuck.is_empty(), "{plan:?}");

        // On b, a copy on a: a third node is added (c or d), a kept.
        let added = super::plan(
            &state("b", &["a", "b"], &[("a", true), ("b", true)]),
            &evacuate(),
            1,
        );
        let [(placement, wider)] = added.moves.as_slice() else {
            panic!("one move: {added:?}");
        };
        assert_eq!(placement.replica_nodes, ["a", "b"]);
        assert_eq!(wider.len(), 3);
        assert_eq!(wider[..2], ["a".to_owned(), "b".to_owned()]);
        assert!(["c", "d"].contains(&wider[2].as_str()), "{wider:?}");

        // Added, still syncing: it waits, saying so.
        let syncing = state(
            "b",
            &["a", "b", "c"],
            &[("a", true), ("b", true), ("c", false)],
        );
        let waiting = super::plan(&syncing, &evacuate(), 1);
        assert!(waiting.moves.is_empty(), "{waiting:?}");
        assert!(
            waiting.stuck[0].1.contains("copy on c is not up to date"),
            "{waiting:?}"
        );

        // In sync: a leaves, b and c stay, node and epoch kept.
        let synced = state(
            "b",
            &["a", "b", "c"],
            &[("a", true), ("b", true), ("c", true)],
        );
        let done = super::plan(&synced, &evacuate(), 1);
        let [(placement, narrower)] = done.moves.as_slice() else {
            panic!("one move: {done:?}");
        };
        assert_eq!(narrower, &["b".to_owned(), "c".to_owned()]);
        assert_eq!((placement.node.as_str(), placement.epoch), ("b", 2));

        // Nothing evacuating: nothing to do.
        assert!(super::plan(&synced, &BTreeSet::new(), 1).moves.is_empty());
    }
}
