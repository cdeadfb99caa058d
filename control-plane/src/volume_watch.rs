//! Each node's volume watch (decision 65): the agent service's
//! `WatchVolumes` streams a node only the volumes that are its own, so a
//! report written for one volume reaches the agents of its copies' nodes,
//! not every agent in the cluster.
//!
//! A node's volumes ([`is_nodes`]) are those whose status names it — its
//! primary, or one of its copies — and the snapshots and clones not made
//! yet of a volume whose primary it is (it makes them). A change to a
//! volume ([`volume_event`]) is ADDED on the streams of the nodes it comes
//! to concern, MODIFIED on those it still concerns and DELETED on those it
//! stops concerning (carrying the volume as it is now), so their agents
//! drop their copies; a deleted volume is DELETED where it concerned.
//!
//! Invariants:
//! - a node's stream, from a listing or a version, holds every volume of
//!   the node and nothing else, as the agent's drop logic needs (a `vol-`
//!   pool volume whose object is not in the set is deleted);
//! - a pending snapshot or clone is judged by its source's primary as the
//!   state holds it when the change is sent: one asked while its source's
//!   primary moves reaches the new primary's node at its next change or
//!   listing.

use std::sync::Arc;

use basalt_api::{ApiError, Kind, Object, Volume, WatchEvent, WatchStream};
use futures::StreamExt as _;

use crate::admin::changes;
use crate::agent::node_event;
use crate::history::Change;
use crate::state::State;
use crate::store::Shared;

/// Whether `volume` is node `node`'s (see the module's doc), with `state`
/// for a pending snapshot's or clone's source.
pub fn is_nodes(node: &str, volume: &Volume, state: &State) -> bool {
    let status = &volume.status;
    if status.primary_node == node || status.replica(node).is_some() {
        return true;
    }
    match &volume.spec.source {
        Some(source) if status.storage_name.is_empty() => matches!(
            state.get(Kind::Volume, &source.volume),
            Some(Object::Volume(from)) if from.status.primary_node == node
        ),
        _ => false,
    }
}

/// The event node `node`'s volume stream shows for `change`, if any (see
/// the module's doc; the agent service's `node_event` with [`is_nodes`]).
pub fn volume_event(node: &str, change: Change, state: &State) -> Option<WatchEvent<Volume>> {
    node_event(change, |v: &Volume| is_nodes(node, v, state))
}

/// Node `node`'s volume stream from `from_resource_version` (0: its
/// volumes as they are, a bookmark, then every later change), read from
/// `shared`'s state and change history.
pub(crate) fn watch(
    shared: Arc<Shared>,
    node: String,
    from_resource_version: u64,
) -> Result<WatchStream<Volume>, ApiError> {
    let (initial, from) = if from_resource_version != 0 {
        (Vec::new(), from_resource_version)
    } else {
        let machine = shared.read();
        let applied = machine.applied_index();
        let initial: Vec<Result<WatchEvent<Volume>, ApiError>> = machine
            .state
            .list(Kind::Volume)
            .filter_map(|object| match object {
                Object::Volume(v) if is_nodes(&node, v, &machine.state) => {
                    Some(Ok(WatchEvent::Added {
                        object: v.clone(),
                        resource_version: v.meta.resource_version,
                    }))
                }
                _ => None,
            })
            .chain(std::iter::once(Ok(WatchEvent::Bookmark {
                resource_version: applied,
            })))
            .collect();
        (initial, applied)
    };
    let reader = Arc::clone(&shared);
    let events = changes(shared, Some(Kind::Volume), Some(from))?.filter_map(move |change| {
        let event = match change {
            Ok(change) => {
                let machine = reader.read();
                volume_event(&node, change, &machine.state).map(Ok)
            }
            Err(err) => Some(Err(err)),
        };
        std::future::ready(event)
    });
    Ok(Box::pin(futures::stream::iter(initial).chain(events)))
}

#[cfg(test)]
mod tests {
    use basalt_api::{ObjectMeta, VolumeReplica, VolumeSource, VolumeSpec};

    use super::*;
    use crate::state::{ChangeType, Command};

    fn placed(name: &str, primary: &str, copies: &[&str]) -> Volume {
        let mut volume = Volume {
            meta: ObjectMeta::named(name),
            spec: VolumeSpec {
                size_bytes: 1 << 20,
                replicas: u32::try_from(copies.len()).unwrap(),
                ..VolumeSpec::default()
            },
            ..Volume::default()
        };
        volume.status.storage_name = format!("vol-{name}");
        volume.status.primary_node = primary.into();
        volume.status.epoch = 1;
        volume.status.replicas = copies
            .iter()
            .map(|n| VolumeReplica {
                node: (*n).into(),
                primary: *n == primary,
                ..VolumeReplica::default()
            })
            .collect();
        volume
    }

    fn change(change: ChangeType, now: &Volume, before: Option<&Volume>) -> Change {
        Change {
            index: 7,
            change,
            object: Object::Volume(now.clone()),
            previous: before.map(|v| Object::Volume(v.clone())),
        }
    }

    fn kind(event: Option<WatchEvent<Volume>>) -> &'static str {
        match event {
            None => "none",
            Some(WatchEvent::Added { .. }) => "added",
            Some(WatchEvent::Modified { .. }) => "modified",
            Some(WatchEvent::Deleted { .. }) => "deleted",
            Some(WatchEvent::Bookmark { .. }) => "bookmark",
        }
    }

    #[test]
    fn a_node_sees_only_the_volumes_it_holds_and_those_it_stops_holding() {
        let state = State::default();
        let on_ab = placed("scratch", "a", &["a", "b"]);
        let added = change(ChangeType::Added, &on_ab, None);
        assert_eq!(kind(volume_event("a", added.clone(), &state)), "added");
        assert_eq!(kind(volume_event("b", added.clone(), &state)), "added");
        assert_eq!(kind(volume_event("c", added, &state)), "none");
        // A report's write: the holders see it, nobody else.
        let mut reported = on_ab.clone();
        reported.status.replicas[1].dirty_bytes = 4096;
        let modified = change(ChangeType::Modified, &reported, Some(&on_ab));
        assert_eq!(
            kind(volume_event("b", modified.clone(), &state)),
            "modified"
        );
        assert_eq!(kind(volume_event("c", modified, &state)), "none");
        // b's copy replaced by c's: b sees it leave, c arrive.
        let on_ac = placed("scratch", "a", &["a", "c"]);
        let replaced = change(ChangeType::Modified, &on_ac, Some(&on_ab));
        assert_eq!(kind(volume_event("b", replaced.clone(), &state)), "deleted");
        assert_eq!(kind(volume_event("c", replaced.clone(), &state)), "added");
        assert_eq!(kind(volume_event("a", replaced, &state)), "modified");
        let deleted = change(ChangeType::Deleted, &on_ac, None);
        assert_eq!(kind(volume_event("c", deleted.clone(), &state)), "deleted");
        assert_eq!(kind(volume_event("b", deleted, &state)), "none");
        // Not placed yet: nobody's.
        let unplaced = Volume {
            meta: ObjectMeta::named("new"),
            ..Volume::default()
        };
        let added = change(ChangeType::Added, &unplaced, None);
        assert_eq!(kind(volume_event("a", added, &state)), "none");
    }

    #[test]
    fn a_pending_snapshot_goes_to_its_sources_primary_node() {
        let mut state = State::default();
        let mut source = placed("golden", "a", &["a", "b"]);
        source.meta.uid = "u1".into();
        state
            .apply(1, Command::Create(Object::Volume(source)))
            .unwrap();
        let snapshot = Volume {
            meta: ObjectMeta::named("golden-snap"),
            spec: VolumeSpec {
                size_bytes: 1 << 20,
                replicas: 1,
                source: Some(VolumeSource {
                    volume: "golden".into(),
                    snapshot: true,
                }),
                ..VolumeSpec::default()
            },
            ..Volume::default()
        };
        let added = change(ChangeType::Added, &snapshot, None);
        assert_eq!(kind(volume_event("a", added.clone(), &state)), "added");
        assert_eq!(kind(volume_event("b", added, &state)), "none");
        // Made on a: a's own copy from then on.
        let made = placed("golden-snap", "a", &["a"]);
        let recorded = change(ChangeType::Modified, &made, Some(&snapshot));
        assert_eq!(
            kind(volume_event("a", recorded.clone(), &state)),
            "modified"
        );
        assert_eq!(kind(volume_event("b", recorded, &state)), "none");
    }
}
