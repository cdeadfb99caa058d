//! Moving a standalone volume's copies to the nodes its spec names
//! (decision 80): `basalt volume move NAME --nodes b,c`.
//!
//! A placed standalone volume whose `spec.nodes` differs from where its
//! copies are (the status's copies, its primary first) is moved the way
//! DRBD's operators move a resource, without ever having fewer up-to-date
//! copies than before:
//!
//! 1. **Add** ([`plan`]): each named node without a copy gets an empty
//!    entry in the status, the epoch kept. Its agent makes an empty
//!    secondary, and the primary (attached with every copy's node as a
//!    peer) fills it with a full sync — the path a replaced copy takes
//!    (decision 65).
//! 2. **Switch**: once every named node's copy is up to date (the
//!    primary's report says so, the copy's own node says it holds it, no
//!    fence mark names it) and its node is ready, one compare-and-swap
//!    leaves exactly the named copies, the first the primary. When the
//!    primary changes, the epoch grows by one; the old primary's copy is
//!    refused writes from then on. The copies' states stay (each was up
//!    to date a moment ago) until the new primary reports. The copies dropped
//!    are deleted by their nodes' agents (the `vol-` collection).
//!
//! A node labelled [`basalt_api::Node::EVACUATE_LABEL`] (`basalt node
//! drain`) has its standalone volumes' copies moved off the same way
//! ([`plan_evacuations`]): the leader names, for each volume with a copy
//! there, a node the scheduler's replica choice picks instead, in the
//! volume's `spec.nodes`, and the move above does the rest.
//!
//! Invariants:
//! - a copy leaves the status only in the switch, when every named copy is
//!   up to date: the move never lowers the number of up-to-date copies;
//! - the epoch grows only when the primary moves;
//! - VM disks' volumes, snapshots and clones are never moved here (a VM's
//!   disks move with the VM);
//! - when the control plane itself moves copies (a failover or a
//!   replaced copy on a lost node, [`crate::volume_ha`]), the spec's nodes
//!   follow the status ([`follow_copies`]): a move is only ever what an
//!   operator asked.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use basalt_api::{Kind, Object, Placement, Volume, VolumeReplica};

use crate::admin::AdminService;
use crate::history::History;
use crate::scheduler;
use crate::state::{Command, State, set_condition};
use crate::volumes::{ready, stand_in};

/// Whether `volume` is a placed standalone volume (not a VM's disk, not
/// a snapshot or clone) whose spec names nodes other than where its
/// copies are, or another primary.
pub fn wants_move(volume: &Volume) -> bool {
    movable(volume) && !volume.spec.nodes.is_empty() && !volume.status.is_on(&volume.spec.nodes)
}

/// Sets `volume`'s `spec.nodes`, when it names any, to where its copies
/// are now (primary first): called on the control plane's own moves of
/// its copies, so they are not taken for an operator's move.
pub fn follow_copies(volume: &mut Volume) {
    if !volume.spec.nodes.is_empty() {
        volume.spec.nodes = volume.status.copy_nodes();
    }
}

/// Whether `volume` is a placed standalone volume (not a VM's disk, not
/// a snapshot or clone).
fn movable(volume: &Volume) -> bool {
    volume.spec.owner.is_none()
        && volume.spec.source.is_none()
        && !volume.status.storage_name.is_empty()
        && !volume.status.primary_node.is_empty()
}

/// The nodes that ask their standalone volumes' copies off them
/// ([`basalt_api::Node::EVACUATE_LABEL`]).
pub fn evacuating(state: &State) -> BTreeSet<String> {
    state
        .list(Kind::Node)
        .filter_map(|o| match o {
            Object::Node(n) if n.is_evacuating() => Some(n.meta.name.clone()),
            _ => None,
        })
        .collect()
}

/// The writes that name new nodes (`spec.nodes`) for every placed
/// standalone volume with a copy on an evacuating node (`evacuate`, see
/// [`evacuating`]): each such copy replaced by a node the scheduler's
/// replica choice picks (ready, not cordoned, with room), the copies that
/// stay first (the first of them the primary), so [`plan`] moves it off;
/// and, for each volume that cannot move now, why. A volume already moving
/// to nodes that are not evacuating is left to that move.
pub fn plan_evacuations(
    state: &State,
    evacuate: &BTreeSet<String>,
    seed: u64,
) -> (Vec<Command>, Vec<(String, String)>) {
    if evacuate.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let affected: Vec<&Volume> = standalone(state)
        .filter(|v| v.status.replicas.iter().any(|r| evacuate.contains(&r.node)))
        .filter(|v| !wants_move(v) || v.spec.nodes.iter().any(|n| evacuate.contains(n)))
        .collect();
    let (chosen, stuck) = choose_copies(state, &affected, evacuate, seed);
    let writes = chosen
        .into_iter()
        .map(|(volume, mut copies)| {
            let before = volume.status.copy_nodes();
            // Stable: the copies that stay keep their order, the first of
            // them (the primary, when it stays) first.
            copies.sort_by_key(|n| !before.contains(n));
            let mut moved = volume.clone();
            moved.spec.nodes = copies;
            Command::Update(Object::Volume(moved))
        })
        .collect();
    (writes, stuck)
}

/// Every placed standalone volume in `state` (see [`movable`]).
pub(crate) fn standalone(state: &State) -> impl Iterator<Item = &Volume> {
    state.list(Kind::Volume).filter_map(|o| match o {
        Object::Volume(v) if movable(v) => Some(v),
        _ => None,
    })
}

/// A volume and the nodes chosen for its copies.
pub(crate) type Chosen<'a> = (&'a Volume, Vec<String>);

/// For each of the standalone volumes `affected`, its copies' nodes
/// (primary first) with every node of `vacate` replaced by one the
/// scheduler's replica choice picks (seeded by `seed`; room counted for
/// every VM and placed standalone volume), the first copy not on a node
/// of `vacate` kept in its place as the one the scheduler builds around;
/// and, for each volume with a node that cannot be replaced now, why.
/// Volumes with nothing to replace are left out.
pub(crate) fn choose_copies<'a>(
    state: &State,
    affected: &[&'a Volume],
    vacate: &BTreeSet<String>,
    seed: u64,
) -> (Vec<Chosen<'a>>, Vec<(String, String)>) {
    if affected.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let (nodes, mut vms, mut placements) = crate::replica_moves::replica_inputs(state);
    let mut by_key: HashMap<String, &'a Volume> = HashMap::new();
    for volume in affected {
        by_key.insert(stand_in(volume).meta.name, *volume);
    }
    for volume in standalone(state) {
        let mut vm = stand_in(volume);
        let copies = volume.status.copy_nodes();
        // An affected volume's copies are all counted where they go, one
        // copy or more: its stand-in is a replicated one.
        if by_key.contains_key(&vm.meta.name) {
            for disk in &mut vm.spec.disks {
                disk.replicas = disk.replicas.max(2);
            }
        }
        // An affected volume stands for all its copies, around the first
        // that stays (none: every copy is to be replaced); the others as
        // they are, for the room they take.
        let (node, replica_nodes) = if by_key.contains_key(&vm.meta.name) {
            let stays = copies.iter().find(|n| !vacate.contains(*n)).cloned();
            (stays.unwrap_or_default(), copies)
        } else if copies.len() >= 2 {
            (volume.status.primary_node.clone(), copies)
        } else {
            (volume.status.primary_node.clone(), Vec::new())
        };
        placements.push(Placement {
            meta: basalt_api::ObjectMeta::named(vm.meta.name.clone()),
            vm: vm.meta.name.clone(),
            node,
            epoch: volume.status.epoch,
            replica_nodes,
        });
        vms.push(vm);
    }
    let plan = scheduler::plan_replacements(&nodes, &vms, &placements, vacate, seed);
    let chosen = plan
        .replaced
        .into_iter()
        .filter_map(|(key, copies)| by_key.get(&key).map(|v| (*v, copies)))
        .collect();
    let stuck = plan
        .unschedulable
        .into_iter()
        .filter_map(|(key, why)| by_key.get(&key).map(|v| (v.meta.name.clone(), why)))
        .collect();
    (chosen, stuck)
}

/// Whether node `name` is ready in `state`.
fn is_ready(state: &State, name: &str) -> bool {
    matches!(state.get(Kind::Node, name), Some(Object::Node(n)) if n.status.is_ready())
}

/// The next step of every move (see the module's doc), one write per
/// volume that can take one now.
pub fn plan(state: &State, now_unix_ms: u64) -> Vec<Command> {
    let mut writes = Vec::new();
    for object in state.list(Kind::Volume) {
        let Object::Volume(volume) = object else {
            continue;
        };
        if !wants_move(volume) {
            continue;
        }
        if let Some(moved) = step(state, volume, now_unix_ms) {
            writes.push(Command::Update(Object::Volume(moved)));
        }
    }
    writes
}

/// `volume` after the next step of its move, or `None` while it waits
/// (a named copy still syncing, a node not ready, a node that is gone).
fn step(state: &State, volume: &Volume, now_unix_ms: u64) -> Option<Volume> {
    let wanted = &volume.spec.nodes;
    // A named node removed since: nothing to move to until the spec
    // changes.
    if wanted.iter().any(|n| state.get(Kind::Node, n).is_none()) {
        return None;
    }
    let mut moved = volume.clone();
    let status = &mut moved.status;
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|n| status.replica(n).is_none())
        .collect();
    if !missing.is_empty() {
        for node in missing {
            status.replicas.push(VolumeReplica {
                node: node.clone(),
                ..VolumeReplica::default()
            });
        }
        status.replicas.sort_by(|a, b| a.node.cmp(&b.node));
    } else {
        let primary = &wanted[0];
        let all_in_sync = wanted.iter().all(|node| {
            is_ready(state, node)
                && status
                    .replica(node)
                    .is_some_and(|r| *node == status.primary_node || r.in_sync())
        });
        if !all_in_sync {
            return None;
        }
        status.replicas.retain(|r| wanted.contains(&r.node));
        // Every copy left is up to date as the old primary last reported;
        // the states stay until the new primary reports (it sends only
        // what differs from its last report: a copy that was alone and
        // up to date before and after sends nothing new).
        if *primary != status.primary_node {
            status.epoch += 1;
            status.primary_node.clone_from(primary);
        }
        for replica in &mut status.replicas {
            replica.primary = replica.node == *primary;
        }
    }
    let condition = ready(status, now_unix_ms);
    set_condition(&mut status.conditions, condition);
    Some(moved)
}

/// The leader's volume moves: each round, the evacuations' new nodes
/// first, then the next step of every move, one write per volume.
///
/// A round looks at the volumes only when something a move depends on
/// changed since the last look: a node, a volume (its spec or a copy's
/// report), a placement or a VM (the scheduler's load), from the change
/// history; also after a new term, when the history does not reach back,
/// after a write failed, and every [`crate::volumes::FULL_RESYNC`].
#[derive(Debug, Default)]
pub struct VolumeMoves {
    /// The term and applied index of the last look, when all its writes
    /// succeeded.
    synced: Option<(u64, u64)>,
    /// When the last look was.
    last_look: Option<Instant>,
}

/// What a move or an evacuation reads besides the clock.
const INPUTS: [Kind; 4] = [Kind::Node, Kind::Volume, Kind::Placement, Kind::Vm];

/// Whether nothing of [`INPUTS`] changed after `index` (`false` when the
/// history does not reach back that far).
fn unchanged_since(history: &History, index: u64) -> bool {
    INPUTS.iter().all(|kind| {
        history
            .since(index, Some(*kind), 1)
            .is_ok_and(|c| c.is_empty())
    })
}

impl VolumeMoves {
    /// One round, as the leader of `term`.
    pub async fn round(&mut self, admin: &AdminService, term: u64) {
        let (writes, applied) = {
            let machine = admin.shared().read();
            let applied = machine.applied_index();
            let due = self
                .last_look
                .is_none_or(|at| at.elapsed() >= crate::volumes::FULL_RESYNC);
            if !due
                && let Some((t, index)) = self.synced
                && t == term
                && (index == applied || unchanged_since(&machine.history, index))
            {
                self.synced = Some((term, applied));
                return;
            }
            let state = &machine.state;
            let evacuate = evacuating(state);
            let (evacuations, stuck) = plan_evacuations(state, &evacuate, term);
            for (volume, why) in stuck {
                tracing::debug!(%volume, %why, "a copy cannot leave an evacuating node yet");
            }
            let name = |c: &Command| match c {
                Command::Update(o) => Some(o.name().to_owned()),
                _ => None,
            };
            let named: BTreeSet<Option<String>> = evacuations.iter().map(name).collect();
            let moves = plan(state, crate::agent::now_unix_ms())
                .into_iter()
                .filter(|c| !named.contains(&name(c)));
            (
                evacuations.into_iter().chain(moves).collect::<Vec<_>>(),
                applied,
            )
        };
        self.last_look = Some(Instant::now());
        // Our own writes change volumes: the next round looks again, and
        // goes quiet once a look writes nothing.
        self.synced = writes.is_empty().then_some((term, applied));
        for command in writes {
            if let Err(err) = admin.write(command).await {
                tracing::debug!(error = %err, "writing a volume move failed; the next round tries again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{Node, ObjectMeta, ReplicaState, VolumeSpec, VolumeStatus};

    use super::*;

    #[test]
    fn a_round_looks_again_only_after_a_change_to_what_moves_read() {
        use basalt_api::{Image, ObjectMeta};

        use crate::history::Change;
        use crate::state::ChangeType;

        let change = |index: u64, object: Object| Change {
            index,
            change: ChangeType::Modified,
            object,
            previous: None,
        };
        let mut history = History::new(8, 10);
        history.push(change(
            11,
            Object::Image(Image {
                meta: ObjectMeta::named("debian"),
                ..Image::default()
            }),
        ));
        // Writes of other kinds (the raft bench's images) wake nothing.
        assert!(unchanged_since(&history, 10));
        history.push(change(12, ready_node("a")));
        assert!(!unchanged_since(&history, 10));
        assert!(!unchanged_since(&history, 11));
        assert!(unchanged_since(&history, 12));
        history.push(change(13, Object::Volume(volume("data", &["a"], &["a"]))));
        assert!(!unchanged_since(&history, 12));
        // A history that does not reach back: look.
        let mut short = History::new(1, 10);
        for index in 11..14 {
            short.push(change(index, ready_node("b")));
        }
        assert!(!unchanged_since(&short, 10));
    }

    fn ready_node(name: &str) -> Object {
        let mut node = Node {
            meta: ObjectMeta::named(name),
            ..Node::default()
        };
        node.status.conditions.push(basalt_api::Condition {
            kind: "Ready".into(),
            status: true,
            ..Default::default()
        });
        node.status.allocatable.storage_bytes = 64 << 20;
        node.status.replication_address = format!("{name}:7789");
        Object::Node(node)
    }

    /// Standalone volume `name` with copies on `nodes` (the first the
    /// primary) at epoch 3, each up to date, its spec naming `wanted`.
    fn volume(name: &str, nodes: &[&str], wanted: &[&str]) -> Volume {
        Volume {
            meta: ObjectMeta::named(name),
            spec: VolumeSpec {
                size_bytes: 1 << 20,
                replicas: u32::try_from(wanted.len()).unwrap(),
                nodes: wanted.iter().map(|n| (*n).to_owned()).collect(),
                ..VolumeSpec::default()
            },
            status: VolumeStatus {
                storage_name: format!("vol-{name}"),
                epoch: 3,
                primary_node: nodes[0].into(),
                replicas: nodes
                    .iter()
                    .map(|n| VolumeReplica {
                        node: (*n).into(),
                        primary: *n == nodes[0],
                        state: ReplicaState::UpToDate,
                        node_state: Some(ReplicaState::UpToDate),
                        ..VolumeReplica::default()
                    })
                    .collect(),
                ..VolumeStatus::default()
            },
        }
    }

    fn state_with(volumes: &[&Volume]) -> State {
        let mut state = State::default();
        let mut index = 0;
        for node in ["a", "b", "c", "d"] {
            index += 1;
            state
                .apply(index, Command::Create(ready_node(node)))
                .expect("node");
        }
        for v in volumes {
            index += 1;
            state
                .apply(index, Command::Create(Object::Volume((*v).clone())))
                .expect("volume");
        }
        state
    }

    fn moved(writes: &[Command], name: &str) -> Option<Volume> {
        writes.iter().find_map(|c| match c {
            Command::Update(Object::Volume(v)) if v.meta.name == name => Some(v.clone()),
            _ => None,
        })
    }

    fn copies(v: &Volume) -> Vec<(&str, bool)> {
        v.status
            .replicas
            .iter()
            .map(|r| (r.node.as_str(), r.primary))
            .collect()
    }

    #[test]
    fn a_one_copy_volume_gains_its_new_copy_then_switches_once_it_is_in_sync() {
        let one = volume("one", &["a"], &["b"]);
        let state = state_with(&[&one]);
        assert!(wants_move(&one));

        // 1. The new copy is added, the primary and epoch kept.
        let added = moved(&plan(&state, 1), "one").expect("a write");
        assert_eq!(copies(&added), [("a", true), ("b", false)]);
        assert_eq!(
            (added.status.primary_node.as_str(), added.status.epoch),
            ("a", 3)
        );
        assert_eq!(added.status.replicas[1].state, ReplicaState::Unknown);

        // Syncing, or held by its node but not reported in sync by the
        // primary: it waits.
        let mut syncing = added.clone();
        syncing.status.replicas[1].state = ReplicaState::Syncing;
        syncing.status.replicas[1].node_state = Some(ReplicaState::UpToDate);
        assert!(step(&state_with(&[]), &syncing, 1).is_none());
        let mut unheld = added.clone();
        unheld.status.replicas[1].state = ReplicaState::UpToDate;
        assert!(
            step(&state_with(&[]), &unheld, 1).is_none(),
            "its node must hold it"
        );

        // 2. In sync: the old copy goes, b is the primary one epoch later.
        let mut synced = unheld.clone();
        synced.status.replicas[1].node_state = Some(ReplicaState::UpToDate);
        let done = step(&state_with(&[]), &synced, 1).expect("the switch");
        assert_eq!(copies(&done), [("b", true)]);
        assert_eq!(
            (done.status.primary_node.as_str(), done.status.epoch),
            ("b", 4)
        );
        assert_eq!(done.status.replicas[0].state, ReplicaState::UpToDate);
        assert!(!wants_move(&done), "done");
    }

    #[test]
    fn copies_move_without_a_new_epoch_when_the_primary_stays() {
        let two = volume("two", &["a", "b"], &["a", "c"]);
        let state = state_with(&[&two]);
        let added = moved(&plan(&state, 1), "two").expect("a write");
        assert_eq!(copies(&added), [("a", true), ("b", false), ("c", false)]);
        let mut synced = added.clone();
        synced.status.replicas[2].state = ReplicaState::UpToDate;
        synced.status.replicas[2].node_state = Some(ReplicaState::UpToDate);
        let done = step(&state, &synced, 1).expect("the switch");
        assert_eq!(copies(&done), [("a", true), ("c", false)]);
        assert_eq!(done.status.epoch, 3, "the primary stayed: same epoch");
        assert_eq!(
            done.status.replicas[1].state,
            ReplicaState::UpToDate,
            "states kept"
        );

        // Only the primary changes: one write, one epoch more.
        let swap = volume("swap", &["a", "b"], &["b", "a"]);
        let done = step(&state, &swap, 1).expect("the switch");
        assert_eq!(copies(&done), [("a", false), ("b", true)]);
        assert_eq!(done.status.epoch, 4);
    }

    #[test]
    fn a_move_waits_for_a_marked_copy_or_a_node_not_ready_and_ignores_what_is_not_standalone() {
        let mut marked = volume("marked", &["a", "b"], &["b", "a"]);
        marked.status.replicas[1].outdated = true;
        let state = state_with(&[]);
        assert!(step(&state, &marked, 1).is_none(), "b is outdated");

        let mut state = state_with(&[]);
        let Some(Object::Node(mut c)) = state.get(Kind::Node, "c").cloned() else {
            panic!("node c");
        };
        c.status.conditions.clear();
        state
            .apply(100, Command::Update(Object::Node(c)))
            .expect("c not ready");
        let mut to_c = volume("to-c", &["a"], &["c"]);
        to_c.status.replicas.push(VolumeReplica {
            node: "c".into(),
            state: ReplicaState::UpToDate,
            node_state: Some(ReplicaState::UpToDate),
            ..VolumeReplica::default()
        });
        assert!(step(&state, &to_c, 1).is_none(), "c is not ready");
        let gone = volume("gone", &["a"], &["z"]);
        assert!(step(&state, &gone, 1).is_none(), "no node z");

        let mut disk = volume("disk", &["a"], &["b"]);
        disk.spec.owner = Some(basalt_api::VolumeOwner {
            vm: "web".into(),
            ..Default::default()
        });
        assert!(!wants_move(&disk));
        let mut clone = volume("clone", &["a"], &["b"]);
        clone.spec.source = Some(basalt_api::VolumeSource {
            volume: "golden".into(),
            snapshot: false,
        });
        assert!(!wants_move(&clone));
        assert!(!wants_move(&volume("here", &["b", "a"], &["b", "a"])));
        assert!(!wants_move(&volume(
            "order",
            &["b", "a", "c"],
            &["b", "c", "a"]
        )));
        assert!(!wants_move(&volume("unnamed", &["a"], &[])));
    }

    #[test]
    fn an_evacuating_node_has_its_copies_named_elsewhere_the_staying_copy_first() {
        let solo = volume("solo", &["a"], &[]);
        let pair = volume("pair", &["a", "b"], &[]);
        let elsewhere = volume("elsewhere", &["c"], &[]);
        // Already moving off a (to b): left to its move.
        let leaving = volume("leaving", &["a"], &["b"]);
        let mut state = state_with(&[&solo, &pair, &elsewhere, &leaving]);
        let mut index = 100;
        let mut label = |state: &mut State, name: &str, cordoned: bool| {
            let Some(Object::Node(mut n)) = state.get(Kind::Node, name).cloned() else {
                panic!("node {name}");
            };
            n.meta
                .labels
                .insert(basalt_api::Node::EVACUATE_LABEL.into(), "true".into());
            n.spec.cordoned = cordoned;
            index += 1;
            state
                .apply(index, Command::Update(Object::Node(n)))
                .expect("labelled");
        };
        assert!(
            plan_evacuations(&state, &evacuating(&state), 1)
                .0
                .is_empty()
        );
        label(&mut state, "a", true);
        // d is cordoned too: no target.
        let Some(Object::Node(mut d)) = state.get(Kind::Node, "d").cloned() else {
            panic!("node d");
        };
        d.spec.cordoned = true;
        state
            .apply(200, Command::Update(Object::Node(d)))
            .expect("d cordoned");
        let evacuate = evacuating(&state);
        assert_eq!(evacuate, BTreeSet::from(["a".to_owned()]));
        let (writes, stuck) = plan_evacuations(&state, &evacuate, 1);
        assert!(stuck.is_empty(), "{stuck:?}");
        let named = |name: &str| moved(&writes, name).map(|v| v.spec.nodes);
        // One copy: to b or c, whichever has more room (c holds one).
        assert_eq!(named("solo"), Some(vec!["b".to_owned()]));
        // Two: b stays, the primary now, and c replaces a.
        assert_eq!(named("pair"), Some(vec!["b".to_owned(), "c".to_owned()]));
        assert_eq!(named("elsewhere"), None);
        assert_eq!(named("leaving"), None);
        assert_eq!(writes.len(), 2);

        // Nowhere to go: stuck, saying why.
        label(&mut state, "b", true);
        label(&mut state, "c", false);
        let (writes, stuck) = plan_evacuations(&state, &evacuating(&state), 1);
        assert!(writes.is_empty(), "{writes:?}");
        assert!(
            stuck
                .iter()
                .any(|(v, why)| v == "solo" && why.contains("no node can take the copy")),
            "{stuck:?}"
        );
    }

    #[test]
    fn a_node_holding_a_volumes_only_copy_is_removed_only_by_force() {
        let solo = volume("solo", &["a"], &[]);
        let pair = volume("pair", &["b", "c"], &[]);
        let mut state = state_with(&[&solo, &pair]);
        let delete = |name: &str, force: bool| Command::Delete {
            kind: Kind::Node,
            name: name.into(),
            expected_resource_version: None,
            force,
        };
        match state.apply(50, delete("a", false)) {
            Err(crate::state::Refusal::FailedPrecondition { reason }) => assert!(
                reason.starts_with("node \"a\" holds the only copy of 1 volume(s): solo;"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        // Another copy elsewhere: removed (the copy is replaced later).
        state.apply(51, delete("b", false)).expect("b removed");
        state.apply(52, delete("a", true)).expect("forced");
    }

    #[test]
    fn the_spec_follows_the_control_planes_own_moves() {
        let mut failed_over = volume("v", &["b", "a"], &["a", "b"]);
        follow_copies(&mut failed_over);
        assert_eq!(failed_over.spec.nodes, ["b", "a"]);
        let mut unnamed = volume("u", &["b"], &[]);
        follow_copies(&mut unnamed);
        assert!(unnamed.spec.nodes.is_empty());
    }
}
