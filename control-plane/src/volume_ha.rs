//! Standalone volumes on lost nodes (decision 65): a volume whose
//! primary's node is lost gets a new primary, and a copy on a node lost
//! for longer than the replacement delay is replaced on another node —
//! what HA and replacement replicas (decisions 36 and 43) do for VM disks,
//! done on the volume's own status, since no placement stands behind a
//! standalone volume.
//!
//! - **Primary moves** ([`plan_failovers`]): once the primary's node is
//!   fenced (its `Ready` false committed) and `nodes.ha_after_ms` passed
//!   since its last acknowledged heartbeat (or this leader's election),
//!   the volume gets, in one compare-and-swap, `epoch + 1`, a surviving
//!   copy as its primary, and the lost copy marked outdated. The new
//!   primary is a copy the old primary last reported up to date, not
//!   marked outdated, whose node is ready; none: the volume waits (its
//!   writers were on the lost node anyway) and every round tries again.
//!   The new primary's agent attaches its copy primary at the new epoch;
//!   the storage layer refuses the old primary's writes once a replica has
//!   seen the newer epoch, and its node's agent, when back, attaches it
//!   secondary at that epoch, so the new primary resyncs it.
//! - **Lost copies are replaced** ([`plan_replacements`]): a copy (not
//!   the primary's: that one moves first) whose node is lost for
//!   `nodes.replica_replace_after_ms` — the delay VM disks use — or whose
//!   node object is gone, is dropped from the status and a node chosen by
//!   the scheduler's replica choice ([`crate::scheduler::plan_replacements`], fed
//!   the VMs, their placements and every placed standalone volume as a
//!   stand-in, so pool room counts them all) gets an empty entry in its
//!   place; that node's agent makes an empty secondary and the primary's
//!   full sync fills it. The dropped node's agent deletes its copy when
//!   it comes back (the `vol-` collection of decision 61).
//!
//! Invariants:
//! - at every committed state a volume names one primary, and the entry
//!   flagged primary is that node's: the move is one write;
//! - the epoch grows only when the primary moves; a replacement keeps it;
//! - a copy is promoted only if the last primary's report called it up to
//!   date and no fence mark names it;
//! - VM disks' volumes, snapshots and clones are never touched here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use basalt_api::{Kind, Object, ReplicaState, Volume, VolumeReplica};

use crate::admin::AdminService;
use crate::agent::{Leases, now_unix_ms};
use crate::config::NodeTuning;
use crate::state::{Command, State, set_condition};
use crate::volume_moves::{self, follow_copies, standalone};
use crate::volumes::ready;

/// Whether node `name` is ready in `state`.
fn is_ready(state: &State, name: &str) -> bool {
    matches!(state.get(Kind::Node, name), Some(Object::Node(n)) if n.status.is_ready())
}

/// The writes that move the primary of every standalone volume whose
/// primary's node is in `lost` (fenced, lost long enough) to a surviving
/// up-to-date copy, with `epoch + 1` and the lost copy marked outdated;
/// and, for each volume that has none, why.
pub fn plan_failovers(
    state: &State,
    lost: &BTreeSet<String>,
    now_unix_ms: u64,
) -> (Vec<Command>, Vec<(String, String)>) {
    let mut writes = Vec::new();
    let mut stuck = Vec::new();
    for volume in standalone(state) {
        let old = &volume.status.primary_node;
        if !lost.contains(old) {
            continue;
        }
        let alive = |r: &&VolumeReplica| {
            r.node != *old && !lost.contains(&r.node) && is_ready(state, &r.node)
        };
        let mut candidates: Vec<&VolumeReplica> = volume
            .status
            .replicas
            .iter()
            .filter(alive)
            .filter(|r| {
                !r.outdated
                    && r.state == ReplicaState::UpToDate
                    // Its own node holds it incomplete (decision 91): its
                    // storage would refuse to make it the primary.
                    && r.node_state != Some(ReplicaState::Syncing)
            })
            .collect();
        // A copy its own node also says it holds comes first; then by name.
        candidates.sort_by_key(|r| (r.node_state != Some(ReplicaState::UpToDate), &r.node));
        // None: the copy an operator accepted as it is at this epoch, if
        // it is alive (decision 94); its node attaches it with force.
        let accepted = volume
            .accepted_copy(volume.status.epoch)
            .and_then(|node| volume.status.replica(node))
            .filter(|r| alive(r));
        let chosen = match candidates.first() {
            Some(r) => Some((r.node.clone(), false)),
            None => accepted.map(|r| (r.node.clone(), true)),
        };
        let Some((new, forced)) = chosen else {
            let why = if volume.status.replicas.len() < 2 {
                "its only copy is on the lost node".to_owned()
            } else {
                let others: Vec<String> = volume
                    .status
                    .replicas
                    .iter()
                    .filter(|r| r.node != *old)
                    .map(|r| {
                        let mark = if r.outdated { ", outdated" } else { "" };
                        let ready = if is_ready(state, &r.node) {
                            ""
                        } else {
                            ", node not ready"
                        };
                        format!("{} {}{mark}{ready}", r.node, r.state)
                    })
                    .collect();
                format!(
                    "no up-to-date copy on a ready node to promote ({}); `basalt volume accept-copy {} --node NODE` takes one as it is",
                    others.join(", "),
                    volume.meta.name
                )
            };
            stuck.push((volume.meta.name.clone(), why));
            continue;
        };
        let mut moved = volume.clone();
        let before = moved.meta.resource_version;
        let status = &mut moved.status;
        status.epoch += 1;
        status.primary_node.clone_from(&new);
        if forced {
            moved.meta.labels.insert(
                Volume::FORCED_COPY_LABEL.to_owned(),
                status.epoch.to_string(),
            );
        }
        for replica in &mut status.replicas {
            replica.primary = replica.node == new;
            if replica.node == *old {
                replica.outdated = true;
                replica.outdated_after_version = before;
            }
            if forced && replica.node == new {
                // Taken as it is: what it missed is lost, not owed to it.
                replica.outdated = false;
                replica.outdated_after_version = 0;
            }
            // The new primary reports every copy afresh.
            replica.state = ReplicaState::Unknown.with_mark(replica.outdated);
            replica.sync_done_bytes = 0;
            replica.sync_total_bytes = 0;
            replica.dirty_bytes = 0;
            replica.last_error.clear();
        }
        let condition = ready(status, now_unix_ms);
        set_condition(&mut status.conditions, condition);
        follow_copies(&mut moved);
        writes.push(Command::Update(Object::Volume(moved)));
    }
    (writes, stuck)
}

/// The writes that replace every copy of a standalone volume on a node in
/// `lost` (other than its primary's) by a copy on a node the scheduler's
/// replica choice picks (seeded by `seed`): the lost entry dropped, an
/// empty one for the new node, the epoch kept; and, for each volume whose
/// lost copy cannot be replaced now, why.
pub fn plan_replacements(
    state: &State,
    lost: &BTreeSet<String>,
    seed: u64,
    now_unix_ms: u64,
) -> (Vec<Command>, Vec<(String, String)>) {
    let affected: Vec<&Volume> = standalone(state)
        .filter(|v| {
            v.status.replicas.len() >= 2
                && !lost.contains(&v.status.primary_node)
                && v.status.replicas.iter().any(|r| lost.contains(&r.node))
        })
        .collect();
    let (chosen, stuck) = volume_moves::choose_copies(state, &affected, lost, seed);
    let mut writes = Vec::new();
    for (volume, copies) in chosen {
        let mut replaced = volume.clone();
        let mut replicas: Vec<VolumeReplica> = copies
            .iter()
            .filter(|node| !lost.contains(*node))
            .map(|node| {
                volume
                    .status
                    .replica(node)
                    .cloned()
                    .unwrap_or_else(|| VolumeReplica {
                        node: node.clone(),
                        ..VolumeReplica::default()
                    })
            })
            .collect();
        replicas.sort_by(|a, b| a.node.cmp(&b.node));
        if replicas == volume.status.replicas {
            continue;
        }
        replaced.status.replicas = replicas;
        let condition = ready(&replaced.status, now_unix_ms);
        set_condition(&mut replaced.status.conditions, condition);
        follow_copies(&mut replaced);
        writes.push(Command::Update(Object::Volume(replaced)));
    }
    (writes, stuck)
}

/// The leader's standalone-volume HA: see the module's doc. Keeps only
/// what it last logged.
#[derive(Debug, Default)]
pub struct StandaloneHa {
    /// Volume → why its primary cannot move or its lost copy cannot be
    /// replaced, as last logged.
    stuck: BTreeMap<String, String>,
}

impl StandaloneHa {
    /// A controller with nothing logged.
    pub fn new() -> Self {
        Self::default()
    }

    /// One round, as the leader of `term`: moves the primaries off nodes
    /// lost for `tuning.ha_after_ms`, then replaces copies on nodes lost
    /// for `tuning.replica_replace_after_ms` (or removed).
    pub async fn round(
        &mut self,
        admin: &AdminService,
        leases: &Leases,
        tuning: &NodeTuning,
        term: u64,
    ) {
        let now = Instant::now();
        let lease = Duration::from_secs(u64::from(tuning.lease_seconds));
        let ha_after = Duration::from_millis(tuning.ha_after_ms);
        let replace_after = Duration::from_millis(tuning.replica_replace_after_ms);
        let (failovers, replacements, mut stuck) = {
            let machine = admin.shared().read();
            let state = &machine.state;
            // The nodes holding copies that are not ready, or gone: most
            // rounds find none and stop here.
            let mut holders: BTreeSet<&str> = BTreeSet::new();
            for volume in standalone(state) {
                for replica in &volume.status.replicas {
                    if !is_ready(state, &replica.node) {
                        holders.insert(replica.node.as_str());
                    }
                }
            }
            if holders.is_empty() {
                self.stuck.clear();
                return;
            }
            let mut fail: BTreeSet<String> = BTreeSet::new();
            let mut replace: BTreeSet<String> = BTreeSet::new();
            leases.with_term(term, state, lease, |table| {
                for node in &holders {
                    if state.get(Kind::Node, node).is_none() {
                        // Removed (decommissioned): not coming back.
                        fail.insert((*node).to_owned());
                        replace.insert((*node).to_owned());
                        continue;
                    }
                    if let Some(since) = table.lost_since(node) {
                        let lost_for = now.duration_since(since);
                        if lost_for >= ha_after {
                            fail.insert((*node).to_owned());
                        }
                        if lost_for >= replace_after {
                            replace.insert((*node).to_owned());
                        }
                    }
                }
            });
            let unix_now = now_unix_ms();
            let (failovers, mut stuck) = plan_failovers(state, &fail, unix_now);
            let (replacements, unreplaced) = if replace.is_empty() {
                (Vec::new(), Vec::new())
            } else {
                plan_replacements(state, &replace, term, unix_now)
            };
            stuck.extend(unreplaced);
            (failovers, replacements, stuck)
        };
        for command in failovers {
            let Command::Update(Object::Volume(v)) = &command else {
                continue;
            };
            let (name, primary, epoch) = (
                v.meta.name.clone(),
                v.status.primary_node.clone(),
                v.status.epoch,
            );
            match admin.write(command).await {
                Ok(_) => {
                    tracing::warn!(volume = %name, to = %primary, epoch, "moved a standalone volume's primary off a lost node");
                }
                Err(err) => {
                    tracing::info!(volume = %name, error = %err, "moving a standalone volume's primary failed; will retry");
                }
            }
        }
        for command in replacements {
            let Command::Update(Object::Volume(v)) = &command else {
                continue;
            };
            let name = v.meta.name.clone();
            let copies: Vec<String> = v.status.replicas.iter().map(|r| r.node.clone()).collect();
            match admin.write(command).await {
                Ok(_) => {
                    tracing::warn!(volume = %name, ?copies, "replaced a standalone volume's lost copy");
                }
                Err(err) => {
                    tracing::info!(volume = %name, error = %err, "replacing a standalone volume's lost copy failed; will retry");
                }
            }
        }
        let stuck: BTreeMap<String, String> = stuck.drain(..).collect();
        for (volume, why) in &stuck {
            if self.stuck.get(volume) != Some(why) {
                tracing::warn!(%volume, reason = %why, "a standalone volume on a lost node waits");
            }
        }
        self.stuck = stuck;
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{Condition, Node, ObjectMeta, ReplicaReport, VolumeReport, VolumeSpec};

    use super::*;
    use crate::volumes::{apply_report, place_standalone};

    fn apply(state: &mut State, index: &mut u64, command: Command) {
        *index += 1;
        state.apply(*index, command).unwrap();
    }

    fn node(name: &str, ready: bool) -> Object {
        let mut node = Node {
            meta: ObjectMeta::named(name),
            ..Node::default()
        };
        node.status.allocatable.cpus = 4;
        node.status.allocatable.memory_mib = 4096;
        node.status.allocatable.storage_bytes = 64 << 20;
        node.status.replication_address = format!("{name}:7789");
        node.status.conditions.push(Condition {
            kind: Condition::READY.into(),
            status: ready,
            ..Condition::default()
        });
        Object::Node(node)
    }

    fn volume(state: &State, name: &str) -> Volume {
        match state.get(Kind::Volume, name) {
            Some(Object::Volume(v)) => v.clone(),
            other => panic!("no volume {name}: {other:?}"),
        }
    }

    /// Nodes `names`, ready, and a 2-copy standalone volume `scratch`
    /// placed on two of them; returns the state, the last index, and the
    /// volume's primary and secondary.
    fn placed(names: &[&str]) -> (State, u64, String, String) {
        let mut state = State::default();
        let mut index = 0;
        for name in names {
            apply(&mut state, &mut index, Command::Create(node(name, true)));
        }
        let mut meta = ObjectMeta::named("scratch");
        meta.uid = "u1".into();
        let scratch = Volume {
            meta,
            spec: VolumeSpec {
                size_bytes: 1 << 20,
                replicas: 2,
                ..VolumeSpec::default()
            },
            ..Volume::default()
        };
        apply(
            &mut state,
            &mut index,
            Command::Create(Object::Volume(scratch)),
        );
        for command in place_standalone(&state, 1, 1) {
            apply(&mut state, &mut index, command);
        }
        let v = volume(&state, "scratch");
        let primary = v.status.primary_node.clone();
        let secondary = v
            .status
            .replicas
            .iter()
            .find(|r| !r.primary)
            .map(|r| r.node.clone())
            .unwrap();
        (state, index, primary, secondary)
    }

    /// The primary's report: its copy and every peer up to date.
    fn all_up(state: &State) -> Volume {
        let v = volume(state, "scratch");
        apply_report(&v, &primary_report(&v), &addresses(&v), 2)
    }

    /// `v`'s primary reporting every copy up to date, read after its agent
    /// saw `v`.
    fn primary_report(v: &Volume) -> VolumeReport {
        let up = ReplicaReport {
            state: ReplicaState::UpToDate,
            ..ReplicaReport::default()
        };
        VolumeReport {
            node: v.status.primary_node.clone(),
            storage_name: v.status.storage_name.clone(),
            local: up.clone(),
            peers: v
                .status
                .replicas
                .iter()
                .filter(|r| !r.primary)
                .map(|r| ReplicaReport {
                    address: format!("{}:7789", r.node),
                    ..up.clone()
                })
                .collect(),
            // Read after the agent saw the volume as it is now.
            seen_version: v.meta.resource_version,
        }
    }

    /// Replication address → node, for `v`'s copies.
    fn addresses(v: &Volume) -> BTreeMap<String, String> {
        v.status
            .replicas
            .iter()
            .map(|r| (format!("{}:7789", r.node), r.node.clone()))
            .collect()
    }

    fn set_ready(state: &mut State, index: &mut u64, name: &str, ready: bool) {
        let Some(Object::Node(mut n)) = state.get(Kind::Node, name).cloned() else {
            panic!("no node {name}")
        };
        n.status.conditions[0].status = ready;
        apply(state, index, Command::Update(Object::Node(n)));
    }

    fn lost(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_lost_primary_moves_to_an_up_to_date_copy_with_a_new_epoch() {
        let (mut state, mut index, primary, secondary) = placed(&["a", "b"]);
        // Not reported up to date yet: nothing to promote.
        set_ready(&mut state, &mut index, &primary, false);
        let (writes, stuck) = plan_failovers(&state, &lost(&[&primary]), 3);
        assert!(writes.is_empty());
        assert!(stuck[0].1.contains("no up-to-date copy"), "{stuck:?}");
        // Reported up to date: promoted, the old copy marked outdated.
        let mut reported = all_up(&state);
        // Its nodes named (decision 80): they follow the failover.
        reported.spec.nodes = vec![primary.clone(), secondary.clone()];
        // Unless its own node holds it incomplete (a cut full sync).
        let mut half = reported.clone();
        for r in &mut half.status.replicas {
            if r.node == secondary {
                r.node_state = Some(ReplicaState::Syncing);
            }
        }
        apply(
            &mut state,
            &mut index,
            Command::Update(Object::Volume(half)),
        );
        let (writes, stuck) = plan_failovers(&state, &lost(&[&primary]), 3);
        assert!(writes.is_empty(), "promoted an incomplete copy");
        assert!(stuck[0].1.contains("no up-to-date copy"), "{stuck:?}");
        reported.meta.resource_version = volume(&state, "scratch").meta.resource_version;
        apply(
            &mut state,
            &mut index,
            Command::Update(Object::Volume(reported)),
        );
        // A primary not lost (yet) stays.
        assert!(plan_failovers(&state, &lost(&[]), 3).0.is_empty());
        let (writes, stuck) = plan_failovers(&state, &lost(&[&primary]), 3);
        assert!(stuck.is_empty(), "{stuck:?}");
        let before_move = volume(&state, "scratch").meta.resource_version;
        for command in writes {
            apply(&mut state, &mut index, command);
        }
        let moved = volume(&state, "scratch");
        assert_eq!(moved.status.epoch, 2);
        assert_eq!(moved.status.primary_node, secondary);
        let primaries: Vec<&str> = moved
            .status
            .replicas
            .iter()
            .filter(|r| r.primary)
            .map(|r| r.node.as_str())
            .collect();
        assert_eq!(primaries, [secondary.as_str()]);
        assert_eq!(moved.spec.nodes, [secondary.clone(), primary.clone()]);
        assert!(
            !crate::volume_moves::wants_move(&moved),
            "no move back to the lost node"
        );
        let old = moved.status.replica(&primary).unwrap();
        assert!(old.outdated);
        assert_eq!(old.state, ReplicaState::Outdated);
        assert!(!moved.status.conditions[0].status);
        // Moved once: the new primary is not lost, nothing more.
        assert_eq!(plan_failovers(&state, &lost(&[&primary]), 4).0.len(), 0);

        // The mark records the version it was made over.
        assert_eq!(old.outdated_after_version, before_move);
        assert!(before_move < moved.meta.resource_version);
        // The old copy is back. A report of the new primary read before the
        // move (its agent had seen no later version) calls the old copy in
        // sync: it clears nothing (decision 74).
        set_ready(&mut state, &mut index, &primary, true);
        let v = volume(&state, "scratch");
        let stale_report = VolumeReport {
            seen_version: before_move,
            ..primary_report(&v)
        };
        let stale = apply_report(&v, &stale_report, &addresses(&v), 2);
        let old = stale.status.replica(&primary).unwrap();
        assert!(old.outdated, "{stale:?}");
        assert_eq!(old.outdated_after_version, before_move);
        // One read after the move does: the mark goes.
        let synced = all_up(&state);
        let old = synced.status.replica(&primary).unwrap();
        assert!(!old.outdated, "{synced:?}");
        assert_eq!(old.outdated_after_version, 0);
        assert_eq!(old.state, ReplicaState::UpToDate);
        assert!(synced.status.conditions[0].status);
        // ...but only in sync clears it: away keeps it.
        let v = volume(&state, "scratch");
        let report = VolumeReport {
            node: secondary.clone(),
            storage_name: v.status.storage_name.clone(),
            local: ReplicaReport {
                state: ReplicaState::UpToDate,
                ..ReplicaReport::default()
            },
            peers: vec![ReplicaReport {
                address: format!("{primary}:7789"),
                state: ReplicaState::Away,
                ..ReplicaReport::default()
            }],
            seen_version: v.meta.resource_version,
        };
        let addresses = BTreeMap::from([(format!("{primary}:7789"), primary.clone())]);
        let away = apply_report(&v, &report, &addresses, 5);
        assert_eq!(
            away.status.replica(&primary).map(|r| (r.outdated, r.state)),
            Some((true, ReplicaState::Outdated))
        );
    }

    #[test]
    fn an_outdated_or_unready_copy_is_never_promoted() {
        let (mut state, mut index, primary, secondary) = placed(&["a", "b"]);
        let mut reported = all_up(&state);
        reported
            .status
            .replicas
            .iter_mut()
            .filter(|r| r.node == secondary)
            .for_each(|r| r.outdated = true);
        apply(
            &mut state,
            &mut index,
            Command::Update(Object::Volume(reported)),
        );
        set_ready(&mut state, &mut index, &primary, false);
        let (writes, stuck) = plan_failovers(&state, &lost(&[&primary]), 3);
        assert!(writes.is_empty());
        assert!(stuck[0].1.contains("outdated"), "{stuck:?}");
        // Both nodes lost: nothing either.
        let (mut state, mut index, primary, secondary) = placed(&["a", "b"]);
        let reported = all_up(&state);
        apply(
            &mut state,
            &mut index,
            Command::Update(Object::Volume(reported)),
        );
        set_ready(&mut state, &mut index, &secondary, false);
        let (writes, _) = plan_failovers(&state, &lost(&[&primary, &secondary]), 3);
        assert!(writes.is_empty());
    }

    #[test]
    fn an_accepted_copy_is_promoted_as_it_is_at_its_epoch_only() {
        let (mut state, mut index, primary, secondary) = placed(&["a", "b"]);
        let mut reported = all_up(&state);
        for r in &mut reported.status.replicas {
            if r.node == secondary {
                r.outdated = true;
                r.outdated_after_version = 1;
                r.node_state = Some(ReplicaState::Syncing);
            }
        }
        apply(
            &mut state,
            &mut index,
            Command::Update(Object::Volume(reported)),
        );
        set_ready(&mut state, &mut index, &primary, false);
        let lost = lost(&[&primary]);
        let (writes, stuck) = plan_failovers(&state, &lost, 3);
        assert!(writes.is_empty());
        assert!(stuck[0].1.contains("accept-copy scratch"), "{stuck:?}");
        // Accepted at another epoch, or the lost node: nothing.
        for value in [format!("0/{secondary}"), format!("1/{primary}")] {
            let mut labelled = volume(&state, "scratch");
            labelled
                .meta
                .labels
                .insert(Volume::ACCEPT_COPY_LABEL.into(), value);
            let mut tried = state.clone();
            let mut at = index;
            apply(
                &mut tried,
                &mut at,
                Command::Update(Object::Volume(labelled)),
            );
            assert!(plan_failovers(&tried, &lost, 3).0.is_empty());
        }
        let mut labelled = volume(&state, "scratch");
        labelled
            .meta
            .labels
            .insert(Volume::ACCEPT_COPY_LABEL.into(), format!("1/{secondary}"));
        apply(
            &mut state,
            &mut index,
            Command::Update(Object::Volume(labelled)),
        );
        let (writes, stuck) = plan_failovers(&state, &lost, 3);
        assert!(stuck.is_empty(), "{stuck:?}");
        let [Command::Update(Object::Volume(moved))] = writes.as_slice() else {
            panic!("{writes:?}")
        };
        assert_eq!(
            (moved.status.epoch, moved.status.primary_node.as_str()),
            (2, secondary.as_str())
        );
        assert!(moved.forces_copy(), "{:?}", moved.meta.labels);
        assert_eq!(moved.accepted_copy(2), None, "the move spends the label");
        let taken = moved.status.replica(&secondary).unwrap();
        assert!(!taken.outdated && taken.outdated_after_version == 0);
        assert!(moved.status.replica(&primary).unwrap().outdated);
        // A later epoch does not force.
        let mut later = moved.clone();
        later.status.epoch = 3;
        assert!(!later.forces_copy());
    }

    #[test]
    fn a_lost_copy_is_replaced_on_another_node_at_the_same_epoch() {
        let (mut state, mut index, primary, secondary) = placed(&["a", "b", "c"]);
        let third = ["a", "b", "c"]
            .into_iter()
            .find(|n| *n != primary && *n != secondary)
            .unwrap()
            .to_owned();
        let reported = all_up(&state);
        apply(
            &mut state,
            &mut index,
            Command::Update(Object::Volume(reported)),
        );
        set_ready(&mut state, &mut index, &secondary, false);
        let (writes, stuck) = plan_replacements(&state, &lost(&[&secondary]), 1, 3);
        assert!(stuck.is_empty(), "{stuck:?}");
        assert_eq!(writes.len(), 1);
        for command in writes {
            apply(&mut state, &mut index, command);
        }
        let v = volume(&state, "scratch");
        assert_eq!(v.status.epoch, 1);
        assert_eq!(v.status.primary_node, primary);
        let mut expected = vec![primary.clone(), third.clone()];
        expected.sort();
        let nodes: Vec<String> = v.status.replicas.iter().map(|r| r.node.clone()).collect();
        assert_eq!(nodes, expected);
        let new = v.status.replica(&third).unwrap();
        assert_eq!((new.primary, new.state), (false, ReplicaState::Unknown));
        // The primary's copy keeps what it had.
        assert_eq!(
            v.status.replica(&primary).unwrap().state,
            ReplicaState::UpToDate
        );
        assert!(
            plan_replacements(&state, &lost(&[&secondary]), 1, 4)
                .0
                .is_empty()
        );

        // A lost primary is never replaced here (it moves first), and no
        // node to take a copy: the reason.
        let (mut state, mut index, primary, secondary) = placed(&["a", "b"]);
        set_ready(&mut state, &mut index, &primary, false);
        assert!(
            plan_replacements(&state, &lost(&[&primary]), 1, 3)
                .0
                .is_empty()
        );
        set_ready(&mut state, &mut index, &primary, true);
        set_ready(&mut state, &mut index, &secondary, false);
        let (writes, stuck) = plan_replacements(&state, &lost(&[&secondary]), 1, 3);
        assert!(writes.is_empty());
        assert_eq!(stuck.len(), 1, "{stuck:?}");
    }
}
