//! Volumes that are not VM disks, on this node (decisions 52 and 61):
//! the copies of standalone volumes the control plane placed here, and
//! the snapshots and clones made here ([`super::snapshots`]), followed by
//! a watch on the cluster's volumes rather than by listing them.
//!
//! A standalone volume placed by the control plane lists its copies'
//! nodes in its status, its primary among them, with an epoch and its
//! pool name (`vol-` and its uid). The agent of each of those nodes makes
//! its copy ([`held`]): an empty pool volume of the volume's size,
//! attached, when the volume has two or more copies, primary (on the
//! primary's node, naming the other copies' nodes' replication addresses
//! as peers) or secondary, at the volume's epoch, so the primary's full
//! initial sync fills the secondaries; with one copy, standalone (plain
//! local writes) — the same storage calls as a VM
//! disk's copies ([`super::replicas`]). A volume made from an image has
//! its primary copy cloned from the image first ([`super::from_image`]).
//!
//! [`run`] follows this node's volume watch (`Agent.WatchVolumes`,
//! decision 65: the control plane sends only the volumes whose status
//! names this node, and the snapshots and clones to make of those whose
//! primary is here; one that stops naming it arrives deleted), acts only
//! once the stream's first listing is complete (its bookmark), and then
//! when what this node holds or makes changed ([`Held`]'s inputs, not the
//! copies' reported states), when something failed (every [`RETRY`]) and
//! every [`RESYNC`] (a storage process that lost an attachment). A broken
//! watch starts again with a fresh listing.
//!
//! A standalone primary that loses a peer goes on only once the control
//! plane recorded that peer's copy outdated on the volume's status
//! (`outdate`, asked by the storage fencer, decision 65): the control
//! plane may make another copy primary when the primary's node is lost,
//! and never one marked outdated.
//!
//! Invariants:
//! - a copy is recorded outdated only by the volume's primary at its
//!   epoch, by compare-and-swap on the volume: a mark and a move of the
//!   primary never both succeed on the same version;
//! - every mark records the volume's version it was made over, and the
//!   control plane clears it only on a report this agent read after
//!   seeing a later version ([`super::seen`], decision 74): never on one
//!   read before the link broke;
//! - only pool volumes named `vol-` + a uid are ever dropped here: when
//!   the complete, watched set of this node's volumes has no object of
//!   that uid, or the object's placed copies no longer name this node.

use std::collections::BTreeMap;
use std::time::Duration;

use basalt_api::{
    AdminClient, AgentClient, ApiError, AttachVolume, FenceRequest, Kind, Node, Object, Placement,
    StorageClient, Volume, VolumeRole, WatchEvent,
};
use futures::StreamExt as _;

use super::StorageConfig;
use super::replicas::{ensure_copy, list_of, peers};
use super::seen::SeenVolumes;
use super::snapshots;

/// How often everything held here is attached again, whatever changed.
pub const RESYNC: Duration = Duration::from_secs(30);
/// How soon a failed step is tried again.
pub const RETRY: Duration = Duration::from_secs(2);

/// The copy of a standalone volume this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The volume's object name.
    pub volume: String,
    /// Its pool name.
    pub storage_name: String,
    /// Its size.
    pub size_bytes: u64,
    /// Its replication role: primary (peers filled in from the nodes) or
    /// secondary with two or more copies, standalone with one.
    pub attach: AttachVolume,
    /// The other copies' nodes, for a primary's peers.
    pub peer_nodes: Vec<String>,
}

/// What `node` holds of the standalone `volume`: `None` when it is a VM
/// disk, a snapshot or clone, not placed, or not placed here.
pub fn held(node: &str, volume: &Volume) -> Option<Held> {
    let status = &volume.status;
    if volume.spec.owner.is_some()
        || volume.spec.source.is_some()
        || status.storage_name.is_empty()
        || status.replica(node).is_none()
    {
        return None;
    }
    let replicated = status.replicas.len() >= 2;
    let primary = status.primary_node == node;
    // One copy: no replication role. Attached standalone all the same, so
    // a copy that was a secondary (the target of a move, decision 80)
    // takes writes once it is the only one.
    let attach = AttachVolume {
        name: status.storage_name.clone(),
        role: match (replicated, primary) {
            (false, _) => VolumeRole::Standalone,
            (true, true) => VolumeRole::Primary,
            (true, false) => VolumeRole::Secondary,
        },
        epoch: status.epoch,
        protocol: Some(volume.spec.protocol),
        // Moved onto a copy an operator accepted as it is (decision 94):
        // taken even if its storage holds it incomplete.
        force: primary && volume.forces_copy(),
        ..AttachVolume::default()
    };
    let peer_nodes = if primary && replicated {
        status
            .replicas
            .iter()
            .filter(|r| r.node != node)
            .map(|r| r.node.clone())
            .collect()
    } else {
        Vec::new()
    };
    Some(Held {
        volume: volume.meta.name.clone(),
        storage_name: status.storage_name.clone(),
        size_bytes: volume.spec.size_bytes,
        attach,
        peer_nodes,
    })
}

/// Has the control plane record outdated the copy of standalone volume
/// `request.volume` (its pool name) on the node publishing replication
/// address `request.peer`, for this node `node` as the volume's primary at
/// `request.epoch` (the storage fencer's question, decision 65): a
/// compare-and-swap of the volume, retried on conflict. Returns that
/// node; `FAILED_PRECONDITION` when this node is not the primary at that
/// epoch or no other copy's node publishes the address.
pub(super) async fn outdate(
    node: &str,
    request: &FenceRequest,
    admin: &AdminClient,
    seen: &SeenVolumes,
) -> Result<String, ApiError> {
    let refuse = |reason: String| ApiError::FailedPrecondition { reason };
    for _ in 0..OUTDATE_TRIES {
        let list = admin.list(Kind::Volume).await?;
        let mut volume = list
            .objects
            .into_iter()
            .find_map(|o| match o {
                Object::Volume(v) if v.status.storage_name == request.volume => Some(v),
                _ => None,
            })
            .ok_or_else(|| refuse(format!("no volume has pool name {}", request.volume)))?;
        // A VM's disk's copies are marked in the VM's status, which the
        // volume only mirrors (an attached volume, decision 76).
        if let Some(owner) = &volume.spec.owner {
            return Err(refuse(format!(
                "volume {} is disk {} of vm {}: its copies are fenced through the VM",
                volume.meta.name, owner.disk, owner.vm
            )));
        }
        let status = &volume.status;
        if status.primary_node != node || status.epoch != request.epoch {
            return Err(refuse(format!(
                "volume {} has its primary on {} at epoch {}, not on {node} at epoch {}",
                volume.meta.name, status.primary_node, status.epoch, request.epoch
            )));
        }
        let nodes: BTreeMap<String, Node> = list_of(admin, Kind::Node, |o| match o {
            Object::Node(n) => Some((n.meta.name.clone(), n)),
            _ => None,
        })
        .await?;
        let copy = status
            .replicas
            .iter()
            .filter(|r| r.node != node)
            .find(|r| {
                nodes.get(&r.node).is_some_and(|n| {
                    super::fencer::same_address(&n.status.replication_address, &request.peer)
                })
            })
            .map(|r| r.node.clone())
            .ok_or_else(|| {
                refuse(format!(
                    "no other copy's node of volume {} publishes replication address {}",
                    volume.meta.name, request.peer
                ))
            })?;
        let before = volume.meta.resource_version;
        let Some(replica) = volume.status.replicas.iter_mut().find(|r| r.node == copy) else {
            continue;
        };
        // Written even when already marked: only a report read after this
        // answer may clear the mark (decision 74), and a report read before
        // this link broke may be on its way.
        replica.outdated = true;
        replica.outdated_after_version = before;
        match admin.update(Object::Volume(volume)).await {
            Ok(Object::Volume(marked)) => {
                // This agent's next reports carry the mark's version.
                seen.record(&marked);
                return Ok(copy);
            }
            Ok(_) => return Ok(copy),
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => return Err(err),
        }
    }
    Err(ApiError::Unavailable {
        reason: format!(
            "volume {} kept changing; its copy not recorded outdated after {OUTDATE_TRIES} tries",
            request.volume
        ),
    })
}

/// How often [`outdate`] retries a compare-and-swap conflict.
const OUTDATE_TRIES: usize = 8;

/// What a pass acts on, for every volume that is not a VM disk: when it
/// equals the last successful pass's, nothing is done.
fn inputs(volumes: &BTreeMap<String, Volume>) -> Vec<(String, Volume)> {
    volumes
        .values()
        .filter(|v| v.spec.owner.is_none())
        .map(|v| {
            let mut shape = v.clone();
            shape.meta.resource_version = 0;
            shape.status.conditions.clear();
            for replica in &mut shape.status.replicas {
                *replica = basalt_api::VolumeReplica {
                    node: replica.node.clone(),
                    primary: replica.primary,
                    ..basalt_api::VolumeReplica::default()
                };
            }
            (v.meta.uid.clone(), shape)
        })
        .collect()
}

/// Makes (or re-attaches) `held` in `storage`'s pool; a primary's peers
/// are the replication addresses of the other copies' nodes (`nodes`).
async fn ensure_held(
    node: &str,
    storage: &StorageClient,
    held: &Held,
    nodes: &BTreeMap<String, Node>,
) -> Result<(), String> {
    let mut attach = held.attach.clone();
    if attach.role == VolumeRole::Primary {
        let mut replica_nodes = vec![node.to_owned()];
        replica_nodes.extend(held.peer_nodes.iter().cloned());
        let placement = Placement {
            node: node.to_owned(),
            epoch: attach.epoch,
            replica_nodes,
            ..Placement::default()
        };
        attach.peers = peers(node, &placement, nodes)?;
    }
    ensure_copy(storage, &held.storage_name, held.size_bytes, Some(&attach))
        .await
        .map_err(|e| e.to_string())
}

/// What the loop keeps between passes.
#[derive(Debug, Default)]
struct Memory {
    /// The inputs of the last pass that did everything it had to.
    done: Option<Vec<(String, Volume)>>,
    /// Snapshots and clones whose making failed, with the error recorded.
    failed: BTreeMap<String, String>,
    /// What failed in the last pass, by volume (logged once per error).
    failing: BTreeMap<String, String>,
    /// Imports images for standalone volumes made from one (decision 64).
    importer: Option<super::image::Importer>,
    /// Why copies wait for their image, by pool name (logged once).
    waiting: BTreeMap<String, String>,
}

/// One pass over the watched `volumes`: snapshots and clones to make
/// here, standalone copies held here, and `vol-` pool volumes to drop.
/// Returns whether everything succeeded.
async fn pass(
    node: &str,
    storage: &StorageClient,
    admin: &AdminClient,
    volumes: &BTreeMap<String, Volume>,
    memory: &mut Memory,
) -> bool {
    let list: Vec<Volume> = volumes.values().cloned().collect();
    let pool = match storage.list_volumes().await {
        Ok(pool) => pool,
        Err(err) => {
            tracing::debug!(error = %err, "listing the pool failed; will retry");
            return false;
        }
    };
    let mut ok =
        snapshots::make_and_drop(node, storage, admin, &list, &pool, &mut memory.failed).await;
    // Copies made from an image are cloned from it before they are held.
    let waiting = match &memory.importer {
        Some(importer) => {
            let names = pool.iter().map(|v| v.name.as_str()).collect();
            let filled = super::from_image::fill(
                node,
                storage,
                admin,
                importer,
                &list,
                &names,
                &mut memory.waiting,
            )
            .await;
            filled.waiting
        }
        None => Default::default(),
    };
    ok &= waiting.is_empty();
    let held: Vec<Held> = list
        .iter()
        .filter_map(|v| held(node, v))
        .filter(|h| !waiting.contains(&h.storage_name))
        .collect();
    let nodes: BTreeMap<String, Node> = if held.iter().any(|h| !h.peer_nodes.is_empty()) {
        match list_of(admin, Kind::Node, |o| match o {
            Object::Node(n) => Some((n.meta.name.clone(), n)),
            _ => None,
        })
        .await
        {
            Ok(nodes) => nodes,
            Err(err) => {
                tracing::debug!(error = %err, "listing the nodes failed; will retry");
                return false;
            }
        }
    } else {
        BTreeMap::new()
    };
    let mut failing = BTreeMap::new();
    for copy in &held {
        match ensure_held(node, storage, copy, &nodes).await {
            Ok(()) => {
                if memory.failing.contains_key(&copy.volume) || memory.done.is_none() {
                    tracing::debug!(volume = %copy.volume, pool = %copy.storage_name, "holding a copy of a standalone volume");
                }
            }
            Err(error) => {
                if memory.failing.get(&copy.volume) != Some(&error) {
                    tracing::warn!(volume = %copy.volume, %error, "cannot hold a copy of a standalone volume; retrying");
                }
                failing.insert(copy.volume.clone(), error);
                ok = false;
            }
        }
    }
    memory.failing = failing;
    ok
}

/// Follows this node's volume watch until it breaks, running a pass
/// (once the first listing is complete) whenever what this node holds may
/// have changed.
async fn follow(
    node: &str,
    storage: &StorageClient,
    admin: &AdminClient,
    agent: &AgentClient,
    memory: &mut Memory,
    seen: &SeenVolumes,
) -> Result<(), ApiError> {
    let mut events = agent.watch_volumes(node, 0).await?;
    let mut volumes: BTreeMap<String, Volume> = BTreeMap::new();
    // The listing, up to its bookmark: the drop logic needs every volume.
    loop {
        match events.next().await {
            None => return Ok(()),
            Some(Err(err)) => return Err(err),
            Some(Ok(WatchEvent::Bookmark { .. })) => break,
            Some(Ok(event)) => apply(&mut volumes, event, seen),
        }
    }
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A fresh list: act on it whatever was done before.
    memory.done = None;
    loop {
        let now = inputs(&volumes);
        if memory.done.as_ref() != Some(&now) {
            let ok = pass(node, storage, admin, &volumes, memory).await;
            memory.done = ok.then_some(now);
        }
        tokio::select! {
            event = events.next() => match event {
                None => return Ok(()),
                Some(Err(err)) => return Err(err),
                Some(Ok(event)) => apply(&mut volumes, event, seen),
            },
            _ = resync.tick() => memory.done = None,
            _ = retry.tick(), if memory.done.is_none() => {}
        }
    }
}

/// `event` of this node's volume watch applied to `volumes`, and to what
/// the agent has `seen`.
fn apply(volumes: &mut BTreeMap<String, Volume>, event: WatchEvent<Volume>, seen: &SeenVolumes) {
    match event {
        WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. } => {
            seen.record(&object);
            volumes.insert(object.meta.name.clone(), object);
        }
        WatchEvent::Deleted { object, .. } => {
            seen.forget(&object.status.storage_name);
            volumes.remove(&object.meta.name);
        }
        WatchEvent::Bookmark { .. } => {}
    }
}

/// Holds this node's copies of standalone volumes and makes and drops its
/// snapshots and clones until aborted (see the module's doc).
/// What the watch shows is recorded in `seen`, for the replica reports.
pub async fn run(
    node: String,
    config: StorageConfig,
    admin: AdminClient,
    agent: AgentClient,
    seen: SeenVolumes,
) {
    let storage = match StorageClient::connect_unix(&config.socket) {
        Ok(storage) => storage,
        Err(err) => {
            tracing::error!(error = %err, "no storage client: no standalone volumes, snapshots or clones here");
            return;
        }
    };
    let mut memory = Memory {
        importer: Some(super::image::Importer::new(
            node.clone(),
            storage.clone(),
            admin.clone(),
        )),
        ..Memory::default()
    };
    loop {
        if let Err(err) = follow(&node, &storage, &admin, &agent, &mut memory, &seen).await {
            tracing::debug!(error = %err, "the volume watch broke; listing again");
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{ObjectMeta, VolumeReplica, VolumeSpec, VolumeStatus};

    use super::*;

    fn placed(nodes: &[&str], primary: &str) -> Volume {
        let mut meta = ObjectMeta::named("scratch");
        meta.uid = "0b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d11".into();
        Volume {
            meta,
            spec: VolumeSpec {
                size_bytes: 1 << 20,
                replicas: u32::try_from(nodes.len()).unwrap(),
                ..VolumeSpec::default()
            },
            status: VolumeStatus {
                storage_name: "vol-0b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d11".into(),
                epoch: 1,
                primary_node: primary.into(),
                replicas: nodes
                    .iter()
                    .map(|n| VolumeReplica {
                        node: (*n).into(),
                        primary: *n == primary,
                        ..VolumeReplica::default()
                    })
                    .collect(),
                ..VolumeStatus::default()
            },
        }
    }

    #[test]
    fn each_copy_node_holds_its_copy_primary_or_secondary() {
        let volume = placed(&["a", "b"], "a");
        let on_a = held("a", &volume).expect("a holds a copy");
        let attach = &on_a.attach;
        assert_eq!(attach.role, VolumeRole::Primary);
        assert_eq!(attach.epoch, 1);
        assert!(!attach.allow_outdate, "the fencer asks the control plane");
        assert_eq!(on_a.peer_nodes, ["b"]);
        let on_b = held("b", &volume).expect("b holds a copy");
        let attach = &on_b.attach;
        assert_eq!(attach.role, VolumeRole::Secondary);
        assert!(!attach.allow_outdate);
        assert!(on_b.peer_nodes.is_empty());
        assert!(held("c", &volume).is_none());
        // One copy: a plain pool volume, no replication role.
        let single = held("a", &placed(&["a"], "a")).unwrap();
        let attach = &single.attach;
        assert_eq!((attach.role, attach.epoch), (VolumeRole::Standalone, 1));
        assert!(single.peer_nodes.is_empty());
        assert!(!attach.force);
        // Moved onto an accepted copy: its primary attaches with force,
        // at that epoch only.
        let mut forced = placed(&["a", "b"], "b");
        forced.status.epoch = 2;
        forced
            .meta
            .labels
            .insert(Volume::FORCED_COPY_LABEL.into(), "2".into());
        assert!(held("b", &forced).unwrap().attach.force);
        assert!(!held("a", &forced).unwrap().attach.force);
        forced.status.epoch = 3;
        assert!(!held("b", &forced).unwrap().attach.force);
        // Not placed yet, or a VM disk: nothing.
        let mut unplaced = volume.clone();
        unplaced.status = VolumeStatus::default();
        assert!(held("a", &unplaced).is_none());
    }

    #[test]
    fn reported_states_do_not_wake_a_pass_but_placement_and_size_do() {
        let volume = placed(&["a", "b"], "a");
        let before = inputs(&BTreeMap::from([("scratch".to_owned(), volume.clone())]));
        let mut reported = volume.clone();
        reported.meta.resource_version = 9;
        reported.status.replicas[1].state = basalt_api::ReplicaState::UpToDate;
        reported.status.replicas[1].dirty_bytes = 4096;
        let after = inputs(&BTreeMap::from([("scratch".to_owned(), reported)]));
        assert_eq!(before, after);
        let mut grown = volume;
        grown.spec.size_bytes *= 2;
        let after = inputs(&BTreeMap::from([("scratch".to_owned(), grown)]));
        assert_ne!(before, after);
    }
}
