//! Replicated VM disks on this node: the secondaries this node holds for
//! VMs placed elsewhere, and the primary role of the disks of VMs placed
//! here (decision 36).
//!
//! A VM whose placement names `replica_nodes` has each replicated disk
//! (`replicas` ≥ 2) as a volume of the same derived name
//! ([`super::disk_volume`], or an attached volume's own, decision 76) in the pool of every one of those nodes:
//!
//! - on the placement's node the volume is attached **primary** with the
//!   placement's epoch and the other replica nodes' replication addresses
//!   as peers ([`Volumes::ensure_placed`], before the domain is defined);
//! - on every other replica node it is an empty volume of the disk's size
//!   (the primary's full initial sync fills it) attached **secondary** with
//!   the same epoch ([`run`]) — except on the target of a
//!   live migration under way, where it is a second **primary** with the
//!   same epoch naming the source (dual primary) until the switchover
//!   moves the placement (epoch + 1) and the source turns secondary. The
//!   target's prepare step makes that attach itself, synchronously,
//!   before it says `TargetReady` ([`Volumes::prepare_incoming`], the
//!   same attach as the loop's), so a resumed guest never finds its disk
//!   still secondary; the loop keeps it so afterwards.
//!
//! [`run`] acts on change: the agent's placement watch, which streams the
//! placements naming this node — its VMs and those it holds copies of —
//! into [`NodePlacements`], and the migration agent's watch of migrations
//! ([`MigrationAgent::subscribe`]). Neither lists anything: the VMs of
//! those placements are read once per placement version, and nodes only
//! while a migration comes here. Every [`REPLICA_RESYNC`] it lists
//! placements, VMs, migrations and nodes anyway and attaches every copy
//! again, a safety net for whatever no watch shows (a VM's grown disk, a
//! storage process that lost an attachment, a control plane whose
//! placement stream leaves replica nodes out).
//!
//! The placement's epoch grows exactly when the primary moves, so a moved
//! VM's new primary outranks the old one: the storage processes refuse
//! the old primary's frames and an attach with an older epoch.
//!
//! A replica node the control plane replaces (decision 43: lost for its
//! delay, the placement names another node in its slot, same epoch)
//! needs nothing more here: the new node's loop finds itself among the
//! replica nodes and attaches an empty secondary, and the primary's next
//! [`Volumes::ensure_placed`] attaches with the new peer list, so its
//! storage process drops the lost peer and fully syncs the new one.
//!
//! Invariants:
//! - a secondary is never promoted here except by a placement that puts
//!   the VM on this node (with its epoch); a placement's own node never
//!   attaches its volumes secondary;
//! - a primary never goes on without a peer on its own (`allow_outdate` is
//!   never set): its writes wait until the peer is back, or until this
//!   agent's fencer ([`super::fencer`]) had the control plane record the
//!   peer's copy outdated — so a copy that missed writes is known, and
//!   never made primary;
//! - a replica volume is an existing VM's volume, so garbage collection
//!   ([`super::garbage`]) keeps it until the VM is deleted;
//! - the loop publishes this node's replication address (from its storage
//!   process) on its node object, where primaries on other nodes read it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use basalt_api::{
    AdminClient, ApiError, AttachVolume, Disk, EnsureVolume, Kind, Migration, MigrationPhase, Node,
    Object, Placement, StorageClient, Vm, VolumeRole,
};
use tokio::sync::watch;

use super::{StorageConfig, VolumeError, Volumes, classify};
use crate::migration::MigrationAgent;

/// How often the secondaries and the published address are reconciled
/// from full lists of the cluster, whatever the watches showed.
pub const REPLICA_RESYNC: Duration = Duration::from_secs(30);
/// How often a copy that could not be attached (or an address not yet
/// published) is tried again.
pub const REPLICA_RETRY: Duration = Duration::from_secs(1);

/// Whether `placement` names node `node`: the VM runs there, or the node
/// is one of its replica nodes.
pub fn names_node(placement: &Placement, node: &str) -> bool {
    placement.node == node || placement.holds_replica(node)
}

/// The placements that name this node ([`names_node`]), by VM, as the
/// agent's placement watch keeps them; `None` until first listed. The
/// runtime writes it, the replicas' loop ([`run`]) and the fencer
/// ([`super::fencer`]) wake on its changes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NodePlacements {
    node: String,
    placements: Arc<watch::Sender<Option<BTreeMap<String, Placement>>>>,
}

impl NodePlacements {
    /// Nothing listed yet, for node `node`.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            placements: Arc::new(watch::Sender::new(None)),
        }
    }

    /// Replaces everything with a fresh list (placements that do not name
    /// the node are left out).
    pub fn replace(&self, listed: impl IntoIterator<Item = Placement>) {
        let named: BTreeMap<String, Placement> = listed
            .into_iter()
            .filter(|p| names_node(p, &self.node))
            .map(|p| (p.vm.clone(), p))
            .collect();
        self.placements.send_replace(Some(named));
    }

    /// Records a watched placement: kept while it names the node, dropped
    /// otherwise.
    pub fn upsert(&self, placement: Placement) {
        self.placements.send_if_modified(|current| {
            let map = current.get_or_insert_with(BTreeMap::new);
            if names_node(&placement, &self.node) {
                let changed = map.get(&placement.vm) != Some(&placement);
                map.insert(placement.vm.clone(), placement);
                changed
            } else {
                map.remove(&placement.vm).is_some()
            }
        });
    }

    /// Drops `vm`'s placement (deleted).
    pub fn remove(&self, vm: &str) {
        self.placements
            .send_if_modified(|current| current.as_mut().is_some_and(|m| m.remove(vm).is_some()));
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Option<BTreeMap<String, Placement>>> {
        self.placements.subscribe()
    }
}

/// Whether `disk` is replicated when its VM has replica nodes.
pub fn is_replicated(disk: &Disk) -> bool {
    disk.replicas >= 2
}

/// One volume attachment this node should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The VM.
    pub vm: String,
    /// The disk's name in the VM's spec.
    pub disk: String,
    /// Size of the disk (a new secondary is made this large).
    pub size_bytes: u64,
    /// The attachment: volume name, role, epoch, peers.
    pub attach: AttachVolume,
}

/// The peers of a primary on `node` for `placement`: the replication
/// addresses of the other replica nodes (a node gone from the cluster, or
/// not ready and never published, is left out: writes go on without it
/// only through the fencer). `Err` names a ready peer node that has not
/// published its address yet.
pub fn peers(
    node: &str,
    placement: &Placement,
    nodes: &BTreeMap<String, Node>,
) -> Result<Vec<String>, String> {
    let mut addresses = Vec::new();
    for peer in placement.replica_nodes.iter().filter(|n| *n != node) {
        match nodes.get(peer) {
            Some(n) if n.status.is_ready() => {
                if n.status.replication_address.is_empty() {
                    return Err(format!(
                        "replica node {peer} has not published its replication address"
                    ));
                }
                addresses.push(n.status.replication_address.clone());
            }
            // Not ready: the primary asks the fencer once it finds the
            // peer gone, and its missed chunks are resynced on return.
            Some(n) if !n.status.replication_address.is_empty() => {
                addresses.push(n.status.replication_address.clone());
            }
            Some(_) | None => {}
        }
    }
    Ok(addresses)
}

/// Whether node `node` is the target of a live migration of `placement`'s
/// VM that is under way from the placement as it stands (same source and
/// epoch): its copies are then a second primary until the switchover.
fn migrating_here(node: &str, placement: &Placement, migrations: &[Migration]) -> bool {
    migrations.iter().any(|m| {
        m.spec.vm == placement.vm
            && m.status.target == node
            && m.status.source == placement.node
            && m.status.epoch == placement.epoch
            && matches!(
                m.status.phase,
                MigrationPhase::Preparing
                    | MigrationPhase::TargetReady
                    | MigrationPhase::Migrating
                    | MigrationPhase::Switching
            )
    })
}

/// The copies node `node` holds for VMs placed elsewhere: every replicated
/// disk of every VM whose placement lists `node` among its replica nodes
/// but runs it on another node — a secondary at the placement's epoch, or,
/// while a live migration to `node` is under way, a second primary at the
/// same epoch naming the other replica nodes (the source among them), so
/// the guest writes from here the moment it resumes. A ready replica node
/// that has not published its address leaves the migration target a
/// secondary until it has.
pub fn secondaries(
    node: &str,
    placements: &[Placement],
    vms: &[Vm],
    migrations: &[Migration],
    nodes: &BTreeMap<String, Node>,
) -> Vec<Wanted> {
    let by_name: BTreeMap<&str, &Vm> = vms.iter().map(|v| (v.meta.name.as_str(), v)).collect();
    let mut wanted = Vec::new();
    for placement in placements {
        if placement.node == node || !placement.holds_replica(node) {
            continue;
        }
        let Some(vm) = by_name.get(placement.vm.as_str()) else {
            continue;
        };
        let dual = if migrating_here(node, placement, migrations) {
            peers(node, placement, nodes).ok()
        } else {
            None
        };
        wanted.extend(copies(vm, placement, dual.as_ref()));
    }
    wanted
}

/// The copies of `vm`'s replicated disks at `placement`'s epoch: second
/// primaries with `dual`'s peers when given, secondaries otherwise.
fn copies(vm: &Vm, placement: &Placement, dual: Option<&Vec<String>>) -> Vec<Wanted> {
    vm.spec
        .disks
        .iter()
        .filter(|d| is_replicated(d))
        .map(|disk| {
            let name = disk.storage_name(&vm.meta.uid);
            let attach = match dual {
                Some(peers) => AttachVolume {
                    name,
                    role: VolumeRole::Primary,
                    epoch: placement.epoch,
                    peers: peers.clone(),
                    allow_outdate: false,
                    protocol: Some(disk.protocol),
                    force: false,
                },
                None => AttachVolume {
                    name,
                    role: VolumeRole::Secondary,
                    epoch: placement.epoch,
                    peers: Vec::new(),
                    allow_outdate: false,
                    protocol: Some(disk.protocol),
                    force: false,
                },
            };
            Wanted {
                vm: vm.meta.name.clone(),
                disk: disk.name.clone(),
                size_bytes: disk.size_bytes,
                attach,
            }
        })
        .collect()
}

/// What node `node`, the target of live migration `migration`, must have
/// attached before it says `TargetReady`: every replicated disk of `vm`
/// a second primary at the migration's epoch naming the other replica
/// nodes, the source among them — exactly the copies [`secondaries`] asks
/// for while the migration is under way. Empty for a VM without replica
/// nodes or replicated disks. `Err` says what to wait for: the placement
/// no longer matches the migration (it moved on; the controller fails the
/// migration), or a ready peer has not published its replication address.
/// A target outside the replica nodes is [`Volumes::prepare_incoming`]'s
/// refusal, not a wait.
pub fn incoming(
    node: &str,
    placement: &Placement,
    vm: &Vm,
    migration: &Migration,
    nodes: &BTreeMap<String, Node>,
) -> Result<Vec<Wanted>, String> {
    if placement.replica_nodes.is_empty() || !vm.spec.disks.iter().any(is_replicated) {
        return Ok(Vec::new());
    }
    if !migrating_here(node, placement, std::slice::from_ref(migration)) {
        return Err(format!(
            "the placement (node {}, epoch {}) is not the one migration {} moves from (node {}, epoch {}) to this node in {:?}",
            placement.node,
            placement.epoch,
            migration.meta.name,
            migration.status.source,
            migration.status.epoch,
            migration.status.phase,
        ));
    }
    let dual = peers(node, placement, nodes)?;
    Ok(copies(vm, placement, Some(&dual)))
}

impl Volumes {
    /// [`Volumes::ensure_vm_at`] for the VM's placement here, then, when
    /// the placement names replica nodes, every replicated disk attached
    /// primary with the placement's epoch and its peers. A peer that is
    /// ready but has not published where it takes replicas makes the VM
    /// wait ([`VolumeError::NotReady`]); an epoch older than the pool has
    /// seen (the VM moved on) fails it.
    pub async fn ensure_placed(&self, vm: &Vm, placement: &Placement) -> Result<(), VolumeError> {
        self.ensure_vm_at(vm, placement.epoch).await?;
        if placement.replica_nodes.is_empty() {
            return Ok(());
        }
        let replicated: Vec<&Disk> = vm.spec.disks.iter().filter(|d| is_replicated(d)).collect();
        let Some(first) = replicated.first() else {
            return Ok(());
        };
        let nodes = match list_nodes(&self.admin).await {
            Ok(nodes) => nodes,
            Err(err @ ApiError::Unavailable { .. }) => return Err(VolumeError::Unavailable(err)),
            Err(source) => {
                return Err(VolumeError::Failed {
                    disk: first.name.clone(),
                    source,
                });
            }
        };
        let peers =
            peers(&self.node, placement, &nodes).map_err(|reason| VolumeError::NotReady {
                disk: first.name.clone(),
                reason,
            })?;
        for disk in replicated {
            let request = AttachVolume {
                name: disk.storage_name(&vm.meta.uid),
                role: VolumeRole::Primary,
                epoch: placement.epoch,
                peers: peers.clone(),
                allow_outdate: false,
                protocol: Some(disk.protocol),
                // A copy whose fill did not finish is refused as a primary
                // unless the operator accepted it (decision 91).
                force: placement.forces_copy(),
            };
            self.storage
                .attach_volume(request)
                .await
                .map_err(|e| classify(&disk.name, e))?;
        }
        Ok(())
    }

    /// Readies this node's storage for `vm` arriving by live migration
    /// `migration` from `placement`'s node, before the target says
    /// `TargetReady`: the cloud-init seed volume ([`Volumes::ensure_seed`]),
    /// and every replicated disk attached a second primary at the
    /// migration's epoch with the source as a peer ([`incoming`]), through
    /// the same step the secondaries' loop takes ([`run`]), so
    /// the guest's writes are accepted here the moment it resumes.
    /// [`VolumeError::NotReady`] asks to wait (see [`incoming`]); a target
    /// outside the replica nodes, or an attach the storage process refuses,
    /// is [`VolumeError::Failed`] naming the disk.
    pub async fn prepare_incoming(
        &self,
        vm: &Vm,
        placement: &Placement,
        migration: &Migration,
    ) -> Result<(), VolumeError> {
        self.ensure_seed(vm).await?;
        let Some(first) = vm.spec.disks.iter().find(|d| is_replicated(d)) else {
            return Ok(());
        };
        if placement.replica_nodes.is_empty() {
            return Ok(());
        }
        if !placement.holds_replica(&self.node) {
            return Err(VolumeError::Failed {
                disk: first.name.clone(),
                source: ApiError::FailedPrecondition {
                    reason: format!(
                        "node {} holds no replica of it (replica nodes: {})",
                        self.node,
                        placement.replica_nodes.join(", ")
                    ),
                },
            });
        }
        let nodes = match list_nodes(&self.admin).await {
            Ok(nodes) => nodes,
            Err(err @ ApiError::Unavailable { .. }) => return Err(VolumeError::Unavailable(err)),
            Err(source) => {
                return Err(VolumeError::Failed {
                    disk: first.name.clone(),
                    source,
                });
            }
        };
        let wanted = incoming(&self.node, placement, vm, migration, &nodes).map_err(|reason| {
            VolumeError::NotReady {
                disk: first.name.clone(),
                reason,
            }
        })?;
        for wanted in &wanted {
            ensure_secondary(&self.storage, wanted)
                .await
                .map_err(|e| classify(&wanted.disk, e))?;
        }
        Ok(())
    }
}

/// The objects of `kind`, as `pick` types them (others are skipped).
pub(super) async fn list_of<T, C: FromIterator<T>>(
    admin: &AdminClient,
    kind: Kind,
    pick: impl FnMut(Object) -> Option<T>,
) -> Result<C, ApiError> {
    Ok(admin
        .list(kind)
        .await?
        .objects
        .into_iter()
        .filter_map(pick)
        .collect())
}

/// Every node, by name.
pub(super) async fn list_nodes(admin: &AdminClient) -> Result<BTreeMap<String, Node>, ApiError> {
    list_of(admin, Kind::Node, |o| match o {
        Object::Node(n) => Some((n.meta.name.clone(), n)),
        _ => None,
    })
    .await
}

/// Every VM.
pub(super) async fn list_vms(admin: &AdminClient) -> Result<Vec<Vm>, ApiError> {
    list_of(admin, Kind::Vm, |o| o.try_into().ok()).await
}

/// The copies wanted, with the migrations of their VMs (uid, target,
/// phase) they were decided on.
type Decided = (Vec<Wanted>, Vec<(String, String, MigrationPhase)>);

/// What the secondaries' loop remembers between wake-ups.
#[derive(Debug, Default)]
struct Cache {
    /// VMs this node holds copies of, with the version of the placement
    /// they were read for.
    vms: BTreeMap<String, (u64, Vm)>,
    /// What was last attached (or tried), and the migrations it followed.
    last: Option<Decided>,
}

/// The copies node `node` should hold, from the watched placements
/// naming it, the VMs read once per placement version, the migration
/// agent's migrations, and the nodes (listed only while a migration comes
/// here). `None` while the placements have not been listed yet.
async fn watched(
    node: &str,
    placements: &watch::Receiver<Option<BTreeMap<String, Placement>>>,
    migrations: &MigrationAgent,
    admin: &AdminClient,
    cache: &mut Cache,
) -> Result<Option<Decided>, ApiError> {
    let Some(named) = placements.borrow().clone() else {
        return Ok(None);
    };
    let held: Vec<Placement> = named
        .into_values()
        .filter(|p| p.node != node && p.holds_replica(node))
        .collect();
    cache.vms.retain(|vm, _| held.iter().any(|p| p.vm == *vm));
    for placement in &held {
        let version = placement.meta.resource_version;
        if cache.vms.get(&placement.vm).map(|(v, _)| *v) == Some(version) {
            continue;
        }
        match admin.get(Kind::Vm, &placement.vm).await {
            Ok(Object::Vm(vm)) => {
                cache.vms.insert(placement.vm.clone(), (version, vm));
            }
            Ok(_) | Err(ApiError::NotFound { .. }) => {
                cache.vms.remove(&placement.vm);
            }
            Err(err) => return Err(err),
        }
    }
    let moving: Vec<Migration> = held
        .iter()
        .filter_map(|p| migrations.migration(&p.vm))
        .collect();
    let nodes = if held.iter().any(|p| migrating_here(node, p, &moving)) {
        list_nodes(admin).await?
    } else {
        BTreeMap::new()
    };
    let vms: Vec<Vm> = cache.vms.values().map(|(_, vm)| vm.clone()).collect();
    let phases = moving
        .iter()
        .map(|m| (m.meta.uid.clone(), m.status.target.clone(), m.status.phase))
        .collect();
    Ok(Some((
        secondaries(node, &held, &vms, &moving, &nodes),
        phases,
    )))
}

/// The copies node `node` should hold, from full lists of the cluster
/// (the resync).
async fn listed(node: &str, admin: &AdminClient) -> Result<Vec<Wanted>, ApiError> {
    let placements: Vec<_> = list_of(admin, Kind::Placement, |o| match o {
        Object::Placement(p) => Some(p),
        _ => None,
    })
    .await?;
    let vms = list_vms(admin).await?;
    let migrations: Vec<_> = list_of(admin, Kind::Migration, |o| match o {
        Object::Migration(m) => Some(m),
        _ => None,
    })
    .await?;
    let nodes = list_nodes(admin).await?;
    Ok(secondaries(node, &placements, &vms, &migrations, &nodes))
}

/// The secondaries' loop of node `node`: makes and attaches the copies
/// [`secondaries`] asks for whenever the placements naming this node
/// (`placements`, kept by the agent's placement watch) or the migrations
/// (`migrations`) change, from what those watches hold; every
/// [`REPLICA_RESYNC`] from full lists, attaching every copy again and
/// publishing the storage process's replication address on the node
/// object. A copy that failed, or an address not yet published, is tried
/// again every [`REPLICA_RETRY`]. Runs until aborted; every failure is
/// logged and retried.
pub async fn run(
    node: String,
    config: StorageConfig,
    admin: AdminClient,
    placements: NodePlacements,
    migrations: MigrationAgent,
) {
    let storage = match StorageClient::connect_unix(&config.socket) {
        Ok(storage) => storage,
        Err(err) => {
            tracing::error!(error = %err, "no storage client: this node holds no replicas");
            return;
        }
    };
    let mut named = placements.subscribe();
    let mut moved = migrations.subscribe();
    let mut resync = tokio::time::interval(REPLICA_RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = tokio::time::interval(REPLICA_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: BTreeMap<String, String> = BTreeMap::new();
    let mut published = false;
    let mut cache = Cache::default();
    loop {
        let full = tokio::select! {
            _ = resync.tick() => true,
            changed = named.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            changed = moved.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            _ = retry.tick(), if !published || !failing.is_empty() => false,
        };
        if full || !published {
            match publish_address(&node, &storage, &admin).await {
                Ok(()) => published = true,
                Err(err) => {
                    published = false;
                    tracing::debug!(error = %err, "publishing the replication address failed; retrying");
                }
            }
        }
        let wanted = if full {
            match listed(&node, &admin).await {
                Ok(wanted) => {
                    // Read every VM again at the next change.
                    cache = Cache::default();
                    wanted
                }
                Err(err) => {
                    tracing::debug!(error = %err, "cannot list placements, VMs, migrations and nodes; secondaries unchanged");
                    continue;
                }
            }
        } else {
            match watched(&node, &named, &migrations, &admin, &mut cache).await {
                Ok(Some((wanted, phases))) => {
                    let seen = Some((wanted.clone(), phases));
                    if failing.is_empty() && cache.last == seen {
                        // Nothing this node holds changed (another
                        // migration's progress, a placement's status).
                        continue;
                    }
                    cache.last = seen;
                    wanted
                }
                Ok(None) => continue,
                Err(err) => {
                    tracing::debug!(error = %err, "cannot read the VMs this node holds copies of; retrying");
                    failing.insert(String::new(), err.to_string());
                    continue;
                }
            }
        };
        failing.remove("");
        failing.retain(|volume, _| wanted.iter().any(|w| w.attach.name == *volume));
        for wanted in wanted {
            let key = wanted.attach.name.clone();
            match ensure_secondary(&storage, &wanted).await {
                Ok(()) => {
                    if failing.remove(&key).is_some() {
                        tracing::info!(vm = %wanted.vm, disk = %wanted.disk, epoch = wanted.attach.epoch, "secondary attached");
                    }
                }
                Err(err) => {
                    let text = err.to_string();
                    if failing.get(&key) != Some(&text) {
                        tracing::warn!(vm = %wanted.vm, disk = %wanted.disk, error = %text, "cannot hold the secondary; retrying");
                        failing.insert(key, text);
                    }
                }
            }
        }
    }
}

/// Makes the copy's volume (empty, the disk's size, unless it exists;
/// grown when the disk grew) and attaches it as wanted: a secondary, or a
/// migration target's second primary (also from
/// [`Volumes::prepare_incoming`]).
async fn ensure_secondary(storage: &StorageClient, wanted: &Wanted) -> Result<(), ApiError> {
    ensure_copy(
        storage,
        &wanted.attach.name,
        wanted.size_bytes,
        Some(&wanted.attach),
    )
    .await
}

/// Makes pool volume `name` (empty, `size_bytes`, unless it exists; grown
/// when smaller) and attaches it as `attach` says, when given (a copy
/// that is not replicated keeps the pool's standalone role). Also the
/// standalone volumes' copies ([`super::standalone`]).
pub(super) async fn ensure_copy(
    storage: &StorageClient,
    name: &str,
    size_bytes: u64,
    attach: Option<&AttachVolume>,
) -> Result<(), ApiError> {
    let volume = storage
        .ensure_volume(EnsureVolume {
            name: name.to_owned(),
            size_bytes,
            source: None,
        })
        .await?;
    if volume.size_bytes < size_bytes {
        storage.resize_volume(name, size_bytes).await?;
    }
    if let Some(attach) = attach {
        storage.attach_volume(attach.clone()).await?;
    }
    Ok(())
}

/// Writes the storage process's replication address on node `node`'s
/// object when it differs (compare-and-swap; the next round retries).
async fn publish_address(
    node: &str,
    storage: &StorageClient,
    admin: &AdminClient,
) -> Result<(), ApiError> {
    let address = storage.status().await?.replication_address;
    if address.is_empty() {
        return Ok(());
    }
    let Object::Node(mut current) = admin.get(Kind::Node, node).await? else {
        return Ok(());
    };
    if current.status.replication_address == address {
        return Ok(());
    }
    current.status.replication_address = address.clone();
    admin.update(Object::Node(current)).await?;
    tracing::info!(%address, "published this node's replication address");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::disk_volume;
    use basalt_api::{Condition, ObjectMeta, VmSpec};

    use super::*;

    fn vm(name: &str, disks: &[(&str, u32)]) -> Vm {
        let mut meta = ObjectMeta::named(name);
        meta.uid = format!("5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a{:02x}", name.len());
        Vm {
            meta,
            spec: VmSpec {
                disks: disks
                    .iter()
                    .map(|(d, replicas)| Disk {
                        name: (*d).into(),
                        size_bytes: 1 << 20,
                        image: None,
                        replicas: *replicas,
                        source_volume: None,
                        attach: None,
                        attached_storage_name: None,
                        added_at_epoch: None,
                        protocol: Default::default(),
                    })
                    .collect(),
                ..VmSpec::default()
            },
            ..Vm::default()
        }
    }

    fn placement(vm: &str, node: &str, epoch: u64, replicas: &[&str]) -> Placement {
        Placement {
            meta: ObjectMeta::named(vm),
            vm: vm.into(),
            node: node.into(),
            epoch,
            replica_nodes: replicas.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    fn node(name: &str, ready: bool, address: &str) -> (String, Node) {
        let mut n = Node {
            meta: ObjectMeta::named(name),
            ..Node::default()
        };
        n.status.replication_address = address.into();
        n.status.conditions.push(Condition {
            kind: Condition::READY.into(),
            status: ready,
            ..Condition::default()
        });
        (name.to_owned(), n)
    }

    #[test]
    fn node_placements_keep_what_names_the_node_and_wake_on_changes() {
        let named = NodePlacements::new("b");
        let mut seen = named.subscribe();
        assert!(seen.borrow_and_update().is_none(), "nothing listed yet");
        named.replace([
            placement("db", "a", 1, &["a", "b"]),
            placement("web", "b", 1, &[]),
            placement("other", "a", 1, &["a", "c"]),
        ]);
        assert!(seen.has_changed().unwrap());
        let vms = |seen: &mut watch::Receiver<Option<BTreeMap<String, Placement>>>| {
            seen.borrow_and_update()
                .as_ref()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(vms(&mut seen), ["db", "web"]);
        // The same placement again wakes nobody.
        named.upsert(placement("db", "a", 1, &["a", "b"]));
        assert!(!seen.has_changed().unwrap());
        // db moves to c: b keeps its copy, and sees the new epoch.
        named.upsert(placement("db", "c", 2, &["a", "b", "c"]));
        assert!(seen.has_changed().unwrap());
        assert_eq!(
            seen.borrow_and_update().as_ref().unwrap()["db"].epoch,
            2,
            "the copy follows the new epoch"
        );
        // b replaced in db's replica nodes: dropped.
        named.upsert(placement("db", "c", 2, &["a", "c"]));
        assert_eq!(vms(&mut seen), ["web"]);
        named.remove("web");
        assert!(seen.has_changed().unwrap());
        assert!(vms(&mut seen).is_empty());
        named.remove("web");
        assert!(
            !seen.has_changed().unwrap(),
            "removing nothing wakes nobody"
        );
    }

    #[test]
    fn secondaries_are_the_replicated_disks_of_vms_placed_elsewhere() {
        let vms = [
            vm("db", &[("root", 2), ("scratch", 1)]),
            vm("web", &[("root", 2)]),
            vm("local", &[("root", 1)]),
        ];
        let placements = [
            placement("db", "a", 3, &["a", "b"]),
            placement("web", "b", 1, &["b", "c"]),
            placement("local", "a", 1, &[]),
        ];
        let none = BTreeMap::new();
        let on_b = secondaries("b", &placements, &vms, &[], &none);
        assert_eq!(on_b.len(), 1, "{on_b:?}");
        assert_eq!(on_b[0].vm, "db");
        assert_eq!(on_b[0].disk, "root", "the unreplicated disk stays on a");
        assert_eq!(on_b[0].attach.role, VolumeRole::Secondary);
        assert_eq!(on_b[0].attach.epoch, 3, "the placement's epoch");
        assert_eq!(on_b[0].attach.name, disk_volume(&vms[0].meta.uid, "root"));
        // a runs db: its own node is never a secondary of it.
        assert!(secondaries("a", &placements, &vms, &[], &none).is_empty());
        let on_c = secondaries("c", &placements, &vms, &[], &none);
        assert_eq!(on_c.len(), 1);
        assert_eq!(on_c[0].vm, "web");
        // After a move to b (epoch + 1), a holds the secondary.
        let moved = [placement("db", "b", 4, &["a", "b"])];
        let on_a = secondaries("a", &moved, &vms, &[], &none);
        assert_eq!(on_a.len(), 1);
        assert_eq!(on_a[0].attach.epoch, 4);
        assert!(secondaries("b", &moved, &vms, &[], &none).is_empty());
    }

    #[test]
    fn a_live_migration_target_is_a_second_primary_until_the_switchover() {
        let vms = [vm("db", &[("root", 2)])];
        let placements = [placement("db", "a", 3, &["a", "b"])];
        let nodes: BTreeMap<_, _> = [
            node("a", true, "10.0.0.1:7789"),
            node("b", true, "10.0.0.2:7789"),
        ]
        .into_iter()
        .collect();
        let mut migration = Migration::default();
        migration.spec.vm = "db".into();
        migration.status.source = "a".into();
        migration.status.target = "b".into();
        migration.status.epoch = 3;
        migration.status.phase = MigrationPhase::TargetReady;
        let on_b = secondaries(
            "b",
            &placements,
            &vms,
            std::slice::from_ref(&migration),
            &nodes,
        );
        assert_eq!(on_b[0].attach.role, VolumeRole::Primary);
        assert_eq!(on_b[0].attach.epoch, 3, "the same epoch as the source");
        assert_eq!(on_b[0].attach.peers, ["10.0.0.1:7789"], "naming the source");
        // Failed, or from another epoch: a secondary again.
        for (phase, epoch) in [(MigrationPhase::Failed, 3), (MigrationPhase::Migrating, 2)] {
            let mut other = migration.clone();
            other.status.phase = phase;
            other.status.epoch = epoch;
            let on_b = secondaries("b", &placements, &vms, &[other], &nodes);
            assert_eq!(
                on_b[0].attach.role,
                VolumeRole::Secondary,
                "{phase:?} at {epoch}"
            );
        }
    }

    #[test]
    fn an_incoming_vm_needs_its_replicated_disks_primary_at_the_migrations_epoch() {
        let vms = [vm("db", &[("root", 2), ("scratch", 1), ("logs", 2)])];
        let from = placement("db", "a", 3, &["a", "b"]);
        let nodes: BTreeMap<_, _> = [
            node("a", true, "10.0.0.1:7789"),
            node("b", true, "10.0.0.2:7789"),
        ]
        .into_iter()
        .collect();
        let mut migration = Migration {
            meta: ObjectMeta::named("db"),
            ..Migration::default()
        };
        migration.spec.vm = "db".into();
        migration.status.source = "a".into();
        migration.status.target = "b".into();
        migration.status.epoch = 3;
        migration.status.phase = MigrationPhase::Preparing;
        let wanted = incoming("b", &from, &vms[0], &migration, &nodes).expect("ready");
        let disks: Vec<&str> = wanted.iter().map(|w| w.disk.as_str()).collect();
        assert_eq!(disks, ["root", "logs"], "only the replicated disks");
        for w in &wanted {
            assert_eq!(w.attach.role, VolumeRole::Primary, "{w:?}");
            assert_eq!(w.attach.epoch, 3, "the migration's epoch: {w:?}");
            assert_eq!(w.attach.peers, ["10.0.0.1:7789"], "the source: {w:?}");
            assert!(
                !w.attach.allow_outdate,
                "a ready source: writes wait for it"
            );
            assert_eq!(w.attach.name, disk_volume(&vms[0].meta.uid, &w.disk));
        }
        // The very attachments the secondaries' loop keeps meanwhile.
        assert_eq!(
            wanted,
            secondaries(
                "b",
                std::slice::from_ref(&from),
                &vms,
                std::slice::from_ref(&migration),
                &nodes
            )
        );
        // The source has not published its address: wait, never a
        // secondary said ready.
        let unpublished: BTreeMap<_, _> = [node("a", true, ""), node("b", true, "10.0.0.2:7789")]
            .into_iter()
            .collect();
        let err = incoming("b", &from, &vms[0], &migration, &unpublished).unwrap_err();
        assert!(err.contains("replica node a"), "{err}");
        // The placement moved on (HA: another epoch): wait for the
        // controller to fail the migration, attach nothing.
        let moved = placement("db", "a", 4, &["a", "b"]);
        let err = incoming("b", &moved, &vms[0], &migration, &nodes).unwrap_err();
        assert!(err.contains("epoch 4"), "{err}");
        // No replica nodes, or no replicated disk: nothing to attach.
        let plain = placement("db", "a", 3, &[]);
        assert_eq!(
            incoming("b", &plain, &vms[0], &migration, &nodes),
            Ok(Vec::new())
        );
        let local = vm("db", &[("root", 1)]);
        assert_eq!(
            incoming("b", &from, &local, &migration, &nodes),
            Ok(Vec::new())
        );
    }

    #[test]
    fn a_primary_waits_for_a_ready_peer_and_keeps_a_fenced_one() {
        let p = placement("db", "a", 2, &["a", "b"]);
        let nodes: BTreeMap<_, _> = [
            node("a", true, "10.0.0.1:7789"),
            node("b", true, "10.0.0.2:7789"),
        ]
        .into_iter()
        .collect();
        assert_eq!(peers("a", &p, &nodes), Ok(vec!["10.0.0.2:7789".to_owned()]));
        // b is ready but has not said where it takes replicas: wait.
        let nodes: BTreeMap<_, _> = [node("a", true, ""), node("b", true, "")]
            .into_iter()
            .collect();
        assert!(
            peers("a", &p, &nodes)
                .unwrap_err()
                .contains("replica node b")
        );
        // b lost its lease (recorded not ready): still a peer; the
        // primary goes on without it only through the fencer.
        let nodes: BTreeMap<_, _> = [node("a", true, ""), node("b", false, "10.0.0.2:7789")]
            .into_iter()
            .collect();
        assert_eq!(peers("a", &p, &nodes), Ok(vec!["10.0.0.2:7789".to_owned()]));
        // b removed from the cluster.
        let nodes: BTreeMap<_, _> = [node("a", true, "")].into_iter().collect();
        assert_eq!(peers("a", &p, &nodes), Ok(Vec::new()));
    }
}
