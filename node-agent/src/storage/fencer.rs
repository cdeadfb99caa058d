//! The storage fencer: answers this node's storage process when one of
//! its primaries lost a peer and asks to go on without it (DRBD's
//! fence-peer), by having the control plane record the peer's copy
//! outdated; and has the mark cleared once the peer is in sync again.
//!
//! The storage process streams its questions (`WatchFences`: volume, lost
//! peer's replication address, the primary's epoch). For each, the agent
//! finds the VM whose replicated disk the volume is and which is placed
//! on this node, and the replica node that publishes that address, and
//! asks the control plane ([`AgentClient::mark_replica`]) to record that
//! node's copy outdated at that epoch. The control plane commits it only
//! for the VM's node at the placement's epoch while the node holds its
//! lease; the storage process goes on only on that yes. Every failure
//! (the control plane unreachable, this node fenced or deposed, a volume
//! or address not recognised) answers no: the primary's writes stay
//! suspended and it asks again a second later.
//!
//! A VM placed here that has a copy marked outdated gets the mark cleared
//! once the storage process reports every replicated disk's link to that
//! node in sync (connected, not resyncing), checked every
//! [`CLEAR_PERIOD`] while such VMs are known. The fencer learns of them
//! without listing: from its own yes answers, and from the agent's
//! placement watch ([`NodePlacements`]: a VM that arrives here, or whose
//! placement changes, is read once). Every [`MARK_RESYNC`] it lists the
//! VMs anyway, a safety net for marks it could not see coming.
//!
//! Invariants:
//! - questions and clears are handled one at a time, in one task: a
//!   clear is decided from a status read after every earlier answer was
//!   given, so a clear never undoes a mark whose yes the storage process
//!   acts on (its link to the peer has not been live since it asked; see
//!   `basalt_sds::replication`);
//! - the agent never answers yes without the control plane's commit.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use basalt_api::{
    AdminClient, AgentClient, ApiError, FenceAnswer, FenceRequest, Kind, Node, Object, Placement,
    ReplicaMark, ReplicaPeer, ReplicaPeerState, StorageClient, Vm,
};
use futures::StreamExt as _;

use super::StorageConfig;
use super::replicas::{NodePlacements, is_replicated, list_nodes, list_of, list_vms};
use super::seen::SeenVolumes;

/// How often copies marked outdated are checked for being in sync again,
/// while the fencer knows of any.
pub const CLEAR_PERIOD: Duration = Duration::from_secs(1);
/// How often every VM is listed for marks the fencer has not seen coming.
pub const MARK_RESYNC: Duration = Duration::from_secs(30);
/// How long one call to the control plane may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait before watching the storage process again.
const REWATCH: Duration = Duration::from_secs(1);

/// What a fence request is about, in the control plane's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The VM whose replicated disk the volume is.
    pub vm: String,
    /// The node whose copy the primary lost.
    pub replica_node: String,
}

/// Whether a node's published replication address is `peer` (as the
/// storage process names it: a resolved `ip:port`).
pub(super) fn same_address(published: &str, peer: &str) -> bool {
    if published == peer {
        return true;
    }
    match (
        published.parse::<std::net::SocketAddr>(),
        peer.parse::<std::net::SocketAddr>(),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The VM and replica node `request` is about: the VM placed on `node`
/// one of whose replicated disks is `request.volume`, and the other
/// replica node of that VM that publishes `request.peer`. `Err` says why
/// the request is not one this node's agent may ask for.
pub fn resolve(
    node: &str,
    request: &FenceRequest,
    vms: &[Vm],
    placements: &[Placement],
    nodes: &BTreeMap<String, Node>,
) -> Result<Fence, String> {
    let vm = vms
        .iter()
        .find(|vm| {
            vm.spec
                .disks
                .iter()
                .any(|d| is_replicated(d) && d.storage_name(&vm.meta.uid) == request.volume)
        })
        .ok_or_else(|| format!("volume {} is no VM's replicated disk", request.volume))?;
    let name = &vm.meta.name;
    let placement = placements
        .iter()
        .find(|p| p.vm == *name)
        .ok_or_else(|| format!("vm {name} is not placed"))?;
    if placement.node != node {
        return Err(format!(
            "vm {name} is placed on {}, not on this node {node}",
            placement.node
        ));
    }
    let replica_node = placement
        .replica_nodes
        .iter()
        .filter(|n| *n != node)
        .find(|n| {
            nodes
                .get(*n)
                .is_some_and(|n| same_address(&n.status.replication_address, &request.peer))
        })
        .ok_or_else(|| {
            format!(
                "no other replica node of vm {name} ({}) publishes replication address {}",
                placement.replica_nodes.join(", "),
                request.peer
            )
        })?;
    Ok(Fence {
        vm: name.clone(),
        replica_node: replica_node.clone(),
    })
}

/// The marks to clear: for every VM placed on `node` with copies marked
/// outdated, each such copy whose links from every replicated disk here
/// are connected (in sync) in `links` — `(vm, replica node, epoch)`.
pub fn in_sync(
    node: &str,
    vms: &[Vm],
    placements: &[Placement],
    nodes: &BTreeMap<String, Node>,
    links: &[ReplicaPeer],
) -> Vec<(String, String, u64)> {
    let mut clear = Vec::new();
    for vm in vms
        .iter()
        .filter(|vm| !vm.status.outdated_replicas.is_empty())
    {
        let Some(placement) = placements
            .iter()
            .find(|p| p.vm == vm.meta.name && p.node == node)
        else {
            continue;
        };
        let volumes: Vec<String> = vm
            .spec
            .disks
            .iter()
            .filter(|d| is_replicated(d))
            .map(|d| d.storage_name(&vm.meta.uid))
            .collect();
        for outdated in &vm.status.outdated_replicas {
            let address = nodes
                .get(outdated)
                .map(|n| n.status.replication_address.as_str())
                .unwrap_or_default();
            let synced = !address.is_empty()
                && !volumes.is_empty()
                && volumes.iter().all(|volume| {
                    links.iter().any(|l| {
                        l.volume == *volume
                            && same_address(address, &l.peer)
                            && l.state == ReplicaPeerState::Connected
                    })
                });
            if synced && *outdated != node && placement.holds_replica(outdated) {
                clear.push((vm.meta.name.clone(), outdated.clone(), placement.epoch));
            }
        }
    }
    clear
}

/// Every placement and node (the VMs are read first, on their own).
async fn placements_and_nodes(
    admin: &AdminClient,
) -> Result<(Vec<Placement>, BTreeMap<String, Node>), ApiError> {
    let placements = list_of(admin, Kind::Placement, |o| o.try_into().ok()).await?;
    Ok((placements, list_nodes(admin).await?))
}

async fn within<T>(
    call: impl Future<Output = Result<T, ApiError>>,
    what: &str,
) -> Result<T, ApiError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::Unavailable {
                reason: format!("{what}: no answer within {CALL_TIMEOUT:?}"),
            })
        })
}

/// Has the control plane record the copy `request` is about outdated;
/// `Err` is the refusal's reason.
async fn outdate(
    node: &str,
    request: &FenceRequest,
    admin: &AdminClient,
    agent: &AgentClient,
    seen: &SeenVolumes,
) -> Result<Fence, String> {
    let vms = within(list_vms(admin), "listing the VMs")
        .await
        .map_err(|e| format!("cannot read the cluster: {e}"))?;
    // A standalone volume's copy is marked on the volume (decision 65);
    // one attached as a VM's disk goes through the VM like every VM disk
    // (decision 76).
    if super::snapshots::is_made_volume(&request.volume)
        && !super::snapshots::attached_pool_names(&vms).contains(request.volume.as_str())
    {
        let replica_node = within(
            super::standalone::outdate(node, request, admin, seen),
            "recording the copy outdated",
        )
        .await
        .map_err(|e| format!("the control plane did not record it: {e}"))?;
        return Ok(Fence {
            vm: String::new(),
            replica_node,
        });
    }
    let (placements, nodes) = within(placements_and_nodes(admin), "listing the cluster")
        .await
        .map_err(|e| format!("cannot read the cluster: {e}"))?;
    let fence = resolve(node, request, &vms, &placements, &nodes)?;
    let mark = ReplicaMark {
        node: node.to_owned(),
        vm: fence.vm.clone(),
        replica_node: fence.replica_node.clone(),
        epoch: request.epoch,
        outdated: true,
    };
    within(agent.mark_replica(mark), "recording the replica outdated")
        .await
        .map_err(|e| format!("the control plane did not record it: {e}"))?;
    Ok(fence)
}

/// One question: asks the control plane and answers the storage process.
/// Returns the VM whose copy was recorded outdated, on a yes.
async fn answer(
    node: &str,
    request: FenceRequest,
    storage: &StorageClient,
    admin: &AdminClient,
    agent: &AgentClient,
    seen: &SeenVolumes,
) -> Option<String> {
    let mut marked = None;
    let answer = match outdate(node, &request, admin, agent, seen).await {
        Ok(fence) => {
            tracing::warn!(volume = %request.volume, vm = %fence.vm, replica_node = %fence.replica_node, epoch = request.epoch, "peer recorded outdated: its primary goes on without it");
            // A standalone volume's mark (no VM) is cleared by the
            // control plane itself, from a report of the primary read
            // after the mark (decision 74).
            marked = (!fence.vm.is_empty()).then_some(fence.vm);
            FenceAnswer {
                id: request.id,
                outdated: true,
                reason: String::new(),
            }
        }
        Err(reason) => {
            tracing::warn!(volume = %request.volume, peer = %request.peer, epoch = request.epoch, %reason, "fence refused: the primary's writes stay suspended");
            FenceAnswer {
                id: request.id,
                outdated: false,
                reason,
            }
        }
    };
    match storage.answer_fence(answer).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!(
                id = request.id,
                "the fence answer came too late; the primary asks again"
            )
        }
        Err(err) => tracing::debug!(error = %err, "answering the storage process failed"),
    }
    marked
}

/// Clears the marks of the `marked` VMs' copies that are in sync again,
/// and forgets the VMs that no longer need this node to (no mark left,
/// placed elsewhere, deleted).
async fn clear_in_sync(
    node: &str,
    marked: &mut BTreeSet<String>,
    storage: &StorageClient,
    admin: &AdminClient,
    agent: &AgentClient,
) -> Result<(), ApiError> {
    let mut vms = Vec::new();
    let mut placements = Vec::new();
    for name in marked.clone() {
        let vm = match admin.get(Kind::Vm, &name).await {
            Ok(Object::Vm(vm)) if !vm.status.outdated_replicas.is_empty() => vm,
            Ok(_) | Err(ApiError::NotFound { .. }) => {
                marked.remove(&name);
                continue;
            }
            Err(err) => return Err(err),
        };
        match admin.get(Kind::Placement, &name).await {
            Ok(Object::Placement(p)) if p.node == node => placements.push(p),
            Ok(_) | Err(ApiError::NotFound { .. }) => {
                // Its new node's agent clears what it finds.
                marked.remove(&name);
                continue;
            }
            Err(err) => return Err(err),
        }
        vms.push(vm);
    }
    if vms.is_empty() {
        return Ok(());
    }
    let nodes = list_nodes(admin).await?;
    // Read after the cluster: a link seen connected here was connected
    // after every answer already given.
    let links = storage.status().await?.replicas;
    for (vm, replica_node, epoch) in in_sync(node, &vms, &placements, &nodes, &links) {
        let mark = ReplicaMark {
            node: node.to_owned(),
            vm: vm.clone(),
            replica_node: replica_node.clone(),
            epoch,
            outdated: false,
        };
        match within(agent.mark_replica(mark), "clearing a replica mark").await {
            Ok(()) => {
                tracing::info!(%vm, %replica_node, epoch, "replica in sync again: outdated mark cleared")
            }
            Err(err) => {
                tracing::debug!(%vm, %replica_node, error = %err, "clearing the outdated mark failed; retrying")
            }
        }
    }
    Ok(())
}

/// The VMs placed on `node` whose copies carry marks, from a list of
/// every VM and placement.
async fn marked_by_list(node: &str, admin: &AdminClient) -> Result<BTreeSet<String>, ApiError> {
    let vms = list_vms(admin).await?;
    let placements: Vec<Placement> = list_of(admin, Kind::Placement, |o| o.try_into().ok()).await?;
    Ok(vms
        .into_iter()
        .filter(|vm| !vm.status.outdated_replicas.is_empty())
        .filter(|vm| {
            placements
                .iter()
                .any(|p| p.vm == vm.meta.name && p.node == node)
        })
        .map(|vm| vm.meta.name)
        .collect())
}

/// The VMs placed on `node` (with replica nodes) whose placement is new
/// or changed since `seen` (VM → placement version, updated here) and
/// whose copies carry marks: each read once.
async fn marked_by_watch(
    node: &str,
    placements: &BTreeMap<String, Placement>,
    seen: &mut BTreeMap<String, u64>,
    admin: &AdminClient,
) -> Result<BTreeSet<String>, ApiError> {
    let here: Vec<&Placement> = placements
        .values()
        .filter(|p| p.node == node && !p.replica_nodes.is_empty())
        .collect();
    seen.retain(|vm, _| here.iter().any(|p| p.vm == *vm));
    let mut marked = BTreeSet::new();
    for placement in here {
        let version = placement.meta.resource_version;
        if seen.get(&placement.vm) == Some(&version) {
            continue;
        }
        match admin.get(Kind::Vm, &placement.vm).await {
            Ok(Object::Vm(vm)) if !vm.status.outdated_replicas.is_empty() => {
                marked.insert(vm.meta.name);
            }
            Ok(_) | Err(ApiError::NotFound { .. }) => {}
            Err(err) => return Err(err),
        }
        seen.insert(placement.vm.clone(), version);
    }
    Ok(marked)
}

/// The fencer of node `node`: watches its storage process's fence
/// requests and answers each, and clears marks of copies in sync again
/// (see the module doc for how it learns of them; `placements` is the
/// agent's watch of the placements naming this node), until aborted.
/// Every failure is logged and retried.
pub async fn run(
    node: String,
    config: StorageConfig,
    admin: AdminClient,
    agent: AgentClient,
    placements: NodePlacements,
    versions: SeenVolumes,
) {
    let storage = match StorageClient::connect_unix(&config.socket) {
        Ok(storage) => storage,
        Err(err) => {
            tracing::error!(error = %err, "no storage client: no fence requests are answered");
            return;
        }
    };
    let mut named = placements.subscribe();
    let mut ticker = tokio::time::interval(CLEAR_PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync = tokio::time::interval(MARK_RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // VMs placed here with copies marked outdated, and the placement
    // versions already looked at.
    let mut marked: BTreeSet<String> = BTreeSet::new();
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut requests = None;
    let mut warned = false;
    loop {
        if requests.is_none() {
            match storage.watch_fences().await {
                Ok(stream) => {
                    tracing::info!("watching the storage process's fence requests");
                    warned = false;
                    requests = Some(stream);
                }
                Err(err) => {
                    if !warned {
                        tracing::warn!(error = %err, "cannot watch fence requests; retrying");
                        warned = true;
                    }
                    tokio::time::sleep(REWATCH).await;
                    continue;
                }
            }
        }
        let Some(stream) = requests.as_mut() else {
            continue;
        };
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(request)) => {
                    if let Some(vm) = answer(&node, request, &storage, &admin, &agent, &versions).await {
                        marked.insert(vm);
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "the fence request stream failed; watching again");
                    requests = None;
                }
                None => {
                    tracing::warn!("the fence request stream ended; watching again");
                    requests = None;
                }
            },
            _ = ticker.tick(), if !marked.is_empty() => {
                if let Err(err) = clear_in_sync(&node, &mut marked, &storage, &admin, &agent).await {
                    tracing::debug!(error = %err, "checking outdated replicas failed; retrying");
                }
            }
            changed = named.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = named.borrow_and_update().clone();
                if let Some(current) = current {
                    match marked_by_watch(&node, &current, &mut seen, &admin).await {
                        Ok(found) => marked.extend(found),
                        Err(err) => {
                            // Looked at again at the next change or resync.
                            seen.clear();
                            tracing::debug!(error = %err, "reading VMs placed here failed");
                        }
                    }
                }
            }
            _ = resync.tick() => match marked_by_list(&node, &admin).await {
                Ok(found) => marked.extend(found),
                Err(err) => tracing::debug!(error = %err, "listing VMs for outdated marks failed; retrying"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::disk_volume;
    use basalt_api::{Disk, ObjectMeta, VmSpec};

    use super::*;

    fn vm(name: &str, outdated: &[&str]) -> Vm {
        let mut meta = ObjectMeta::named(name);
        meta.uid = format!("7a1c0d2e-1b4f-4c3a-9e8d-5f6a7b8c9d{:02x}", name.len());
        let mut vm = Vm {
            meta,
            spec: VmSpec {
                disks: vec![
                    Disk {
                        name: "root".into(),
                        size_bytes: 1 << 20,
                        image: None,
                        replicas: 2,
                        source_volume: None,
                        attach: None,
                        attached_storage_name: None,
                        added_at_epoch: None,
                        protocol: Default::default(),
                    },
                    Disk {
                        name: "scratch".into(),
                        size_bytes: 1 << 20,
                        image: None,
                        replicas: 1,
                        source_volume: None,
                        attach: None,
                        attached_storage_name: None,
                        added_at_epoch: None,
                        protocol: Default::default(),
                    },
                ],
                ..VmSpec::default()
            },
            ..Vm::default()
        };
        vm.status.outdated_replicas = outdated.iter().map(|n| (*n).to_owned()).collect();
        vm
    }

    fn placement(vm: &str, node: &str, epoch: u64) -> Placement {
        Placement {
            meta: ObjectMeta::named(vm),
            vm: vm.into(),
            node: node.into(),
            epoch,
            replica_nodes: vec!["a".into(), "b".into()],
        }
    }

    fn nodes() -> BTreeMap<String, Node> {
        [("a", "10.0.0.1:7789"), ("b", "10.0.0.2:7789"), ("c", "")]
            .into_iter()
            .map(|(name, address)| {
                let mut n = Node {
                    meta: ObjectMeta::named(name),
                    ..Node::default()
                };
                n.status.replication_address = address.into();
                (name.to_owned(), n)
            })
            .collect()
    }

    fn request(volume: String, peer: &str) -> FenceRequest {
        FenceRequest {
            id: 1,
            volume,
            peer: peer.into(),
            epoch: 3,
        }
    }

    #[test]
    fn a_request_names_a_vm_placed_here_and_the_replica_node_behind_the_address() {
        let vms = [vm("db", &[])];
        let root = disk_volume(&vms[0].meta.uid, "root");
        let placements = [placement("db", "a", 3)];
        let nodes = nodes();
        assert_eq!(
            resolve(
                "a",
                &request(root.clone(), "10.0.0.2:7789"),
                &vms,
                &placements,
                &nodes
            ),
            Ok(Fence {
                vm: "db".into(),
                replica_node: "b".into()
            })
        );
        // Not placed here (b holds the secondary): never asked for.
        let err = resolve(
            "b",
            &request(root.clone(), "10.0.0.1:7789"),
            &vms,
            &placements,
            &nodes,
        )
        .unwrap_err();
        assert!(err.contains("placed on a"), "{err}");
        // An address no other replica node publishes, or this node's own.
        for peer in ["10.0.0.9:7789", "10.0.0.1:7789"] {
            let err =
                resolve("a", &request(root.clone(), peer), &vms, &placements, &nodes).unwrap_err();
            assert!(err.contains("publishes"), "{peer}: {err}");
        }
        // An unreplicated disk, or no VM's volume at all.
        let scratch = disk_volume(&vms[0].meta.uid, "scratch");
        for volume in [scratch, "img-x".to_owned()] {
            let err = resolve(
                "a",
                &request(volume, "10.0.0.2:7789"),
                &vms,
                &placements,
                &nodes,
            )
            .unwrap_err();
            assert!(err.contains("no VM's replicated disk"), "{err}");
        }
    }

    #[test]
    fn a_mark_is_cleared_only_once_every_link_to_that_node_is_in_sync() {
        let vms = [vm("db", &["b"]), vm("web", &[])];
        let root = disk_volume(&vms[0].meta.uid, "root");
        let placements = [placement("db", "a", 3), placement("web", "a", 1)];
        let nodes = nodes();
        let link = |state| ReplicaPeer {
            volume: root.clone(),
            peer: "10.0.0.2:7789".into(),
            state,
            ..ReplicaPeer::default()
        };
        for state in [
            ReplicaPeerState::Away,
            ReplicaPeerState::Resyncing,
            ReplicaPeerState::Deposed,
        ] {
            assert!(
                in_sync("a", &vms, &placements, &nodes, &[link(state)]).is_empty(),
                "{state:?}"
            );
        }
        assert!(in_sync("a", &vms, &placements, &nodes, &[]).is_empty());
        assert_eq!(
            in_sync(
                "a",
                &vms,
                &placements,
                &nodes,
                &[link(ReplicaPeerState::Connected)]
            ),
            [("db".to_owned(), "b".to_owned(), 3)]
        );
        // Only the VM's node clears.
        assert!(
            in_sync(
                "b",
                &vms,
                &placements,
                &nodes,
                &[link(ReplicaPeerState::Connected)]
            )
            .is_empty()
        );
    }
}
