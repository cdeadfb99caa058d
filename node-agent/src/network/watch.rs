//! Follows the control plane's objects that the datapath depends on —
//! nodes, networks, endpoints, VMs and policies — into one [`Snapshot`].
//!
//! A round lists every kind, replaces the snapshot whole (the full resync),
//! then watches every kind from the oldest list's resource version, skipping
//! the changes a kind's list already included. When the watch breaks it
//! lists again; when the version asked for is compacted (`OUT_OF_RANGE`)
//! that re-list is immediate. Every change pokes the datapath thread.

use std::sync::Arc;
use std::time::Duration;

use basalt_api::{AdminClient, ApiError, Kind, Object, WatchEvent};
use futures::StreamExt as _;

use super::Shared;
use super::plan::Snapshot;

/// The kinds the datapath is built from.
pub(crate) const KINDS: &[Kind] = &[
    Kind::Node,
    Kind::Network,
    Kind::Endpoint,
    Kind::Vm,
    Kind::Policy,
];

/// Follows the objects forever (until the task is aborted).
pub(crate) async fn follow(admin: AdminClient, shared: Arc<Shared>) {
    loop {
        match follow_once(&admin, &shared).await {
            Err(ApiError::OutOfRange { .. }) => {
                tracing::info!("network watch fell behind the compacted log; listing again");
                continue;
            }
            Err(err) => tracing::warn!(error = %err, "network watch broke; listing again"),
            Ok(()) => tracing::debug!("network watch ended; listing again"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn insert(snapshot: &mut Snapshot, object: Object) {
    match object {
        Object::Node(o) => drop(snapshot.nodes.insert(o.meta.name.clone(), o)),
        Object::Network(o) => drop(snapshot.networks.insert(o.meta.name.clone(), o)),
        Object::Endpoint(o) => drop(snapshot.endpoints.insert(o.meta.name.clone(), o)),
        Object::Vm(o) => drop(snapshot.vms.insert(o.meta.name.clone(), o)),
        Object::Policy(o) => drop(snapshot.policies.insert(o.meta.name.clone(), o)),
        _ => {}
    }
}

fn remove(snapshot: &mut Snapshot, object: &Object) {
    let name = object.name();
    match object.kind() {
        Kind::Node => drop(snapshot.nodes.remove(name)),
        Kind::Network => drop(snapshot.networks.remove(name)),
        Kind::Endpoint => drop(snapshot.endpoints.remove(name)),
        Kind::Vm => drop(snapshot.vms.remove(name)),
        Kind::Policy => drop(snapshot.policies.remove(name)),
        _ => {}
    }
}

async fn follow_once(admin: &AdminClient, shared: &Shared) -> Result<(), ApiError> {
    let mut fresh = Snapshot::default();
    let mut listed_at = Vec::with_capacity(KINDS.len());
    for &kind in KINDS {
        let list = admin.list(kind).await?;
        listed_at.push((kind, list.resource_version));
        for object in list.objects {
            insert(&mut fresh, object);
        }
    }
    let from = listed_at.iter().map(|(_, rv)| *rv).min().unwrap_or(0);
    shared.replace_snapshot(fresh);
    let mut events = admin.watch(None, from).await?;
    while let Some(event) = events.next().await {
        let event = event?;
        let Some(object) = event.object() else {
            continue;
        };
        let kind = object.kind();
        let Some((_, listed)) = listed_at.iter().find(|(k, _)| *k == kind) else {
            continue;
        };
        if event.resource_version() <= *listed {
            continue;
        }
        shared.update_snapshot(|snapshot| match event {
            WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. } => {
                insert(snapshot, object);
            }
            WatchEvent::Deleted { object, .. } => remove(snapshot, &object),
            WatchEvent::Bookmark { .. } => {}
        });
    }
    Ok(())
}
