//! The volume reconciler: for every disk of every VM placed on this node,
//! a volume exists in the node's pool and is exported over NBD before the
//! domain is defined; volumes of VMs that no longer exist are removed.
//!
//! The agent talks to its node's storage process (`basaltd storage serve
//! --local-socket`) through [`StorageClient`]; the storage process owns
//! the pool and the NBD server and outlives agent restarts, so nothing
//! here can cut a running VM's disk.
//!
//! Volume names (= NBD export names, see [`disk_volume`]) derive from the
//! VM's uid and the disk's name, so they are the same on every node — a
//! VM's domain XML needs no rewrite when it moves — and a VM created again
//! under an old name never gets the old VM's data.
//!
//! A disk with `image: NAME` is a copy-on-write clone of the image's
//! snapshot in this pool, which [`image::Importer`] makes once per node;
//! one with `source_volume: NAME` a clone of that volume's pool volume,
//! whose primary copy is on this node (decision 64).
//! A VM with a cloud-init section gets its NoCloud seed volume
//! ([`seed`]) made here too.
//!
//! Invariants:
//! - replicated disks ([`replicas`]): a VM placed here has them attached
//!   primary at its placement's epoch before its domain is defined; this
//!   node holds the secondaries of the VMs whose placements list it among
//!   their replica nodes;
//! - a disk volume is created only for a VM's first placement (epoch 1):
//!   a VM that moved here (epoch above 1) without its volume here is
//!   refused rather than started on a fresh, empty disk;
//! - [`Volumes::ensure_vm_at`] is idempotent: an existing volume is kept as
//!   it is (a disk never shrinks, a clone is never made again);
//! - garbage collection ([`garbage`]) removes only volumes whose names
//!   Basalt derives (a UUID: a VM disk; `img-<uuid>`: an image) and whose
//!   VM or image is not in a complete, successful list of the cluster's
//!   VMs and images (nor being imported), or that are replicated disks'
//!   copies the VM's placement no longer gives this node
//!   ([`stale_copies`]: a lost node that was replaced, back again). A VM
//!   that merely moved to another node keeps its volume here until the
//!   VM is deleted; operators' volumes with other names are never
//!   touched.

pub mod fencer;
pub mod from_image;
pub mod image;
pub mod replicas;
pub mod report;
pub mod seed;
pub mod seen;
pub mod snapshots;
pub mod standalone;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_api::{
    AdminClient, ApiError, EnsureVolume, Image, Kind, Migration, Object, Placement, StorageClient,
    StorageVolume, Vm,
};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::vm_domain::NBD_PORT;
use image::{Importer, image_volume, is_image_volume};

/// How often volumes of deleted VMs are looked for.
pub const GC_INTERVAL: Duration = Duration::from_secs(10);

/// Where this node's storage process listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// The storage-local API's Unix socket.
    pub socket: PathBuf,
}

/// A VM's volumes could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The storage process did not answer: keep what runs, retry later.
    #[error("the node's storage process is unreachable")]
    Unavailable(#[source] ApiError),
    /// A disk's volume is on its way (e.g. its image is being imported).
    #[error("disk {disk}: {reason}")]
    NotReady {
        /// The disk's name.
        disk: String,
        /// What it waits for.
        reason: String,
    },
    /// A disk's volume cannot be made as declared.
    #[error("disk {disk}")]
    Failed {
        /// The disk's name.
        disk: String,
        /// The storage process's or the cluster's answer.
        #[source]
        source: ApiError,
    },
    /// The VM ran on another node before (its placement's epoch is not
    /// the first) and this node has no volume for the disk: a fresh one
    /// would silently replace its data.
    #[error(
        "disk {disk}: the VM ran elsewhere before (placement epoch {epoch}) and its volume is not on this node; refusing to start it on a fresh disk"
    )]
    Elsewhere {
        /// The disk's name.
        disk: String,
        /// The placement's epoch.
        epoch: u64,
    },
    /// The storage process exports the volume somewhere QEMU does not look.
    #[error("disk {disk}: exported as {found}, the domain expects {expected}")]
    ExportMismatch {
        /// The disk's name.
        disk: String,
        /// Where the storage process exports it.
        found: String,
        /// Where the domain will look.
        expected: String,
    },
}

impl VolumeError {
    /// Retrying may help without any change to the VM.
    pub fn is_transient(&self) -> bool {
        matches!(self, VolumeError::Unavailable(_))
    }

    /// The volume is on its way (an image import): the VM waits, it has
    /// not failed.
    pub fn is_pending(&self) -> bool {
        matches!(self, VolumeError::NotReady { .. })
    }
}

fn classify(disk: &str, err: ApiError) -> VolumeError {
    match err {
        ApiError::Unavailable { .. } => VolumeError::Unavailable(err),
        source => VolumeError::Failed {
            disk: disk.to_owned(),
            source,
        },
    }
}

/// The volume (and NBD export) name of disk `disk` of the VM whose uid is
/// `vm_uid`, unless the disk attaches a volume ([`basalt_api::Disk::storage_name`]
/// covers both): a UUID derived from both, the same on every node.
pub fn disk_volume(vm_uid: &str, disk: &str) -> String {
    basalt_api::disk_storage_name(vm_uid, disk)
}

/// Whether `name` is a name [`disk_volume`] makes.
pub fn is_disk_volume(name: &str) -> bool {
    name.len() == 36 && Uuid::parse_str(name).is_ok()
}

/// Pool volumes that Basalt made and that belong to no VM of `vms` nor to
/// an image of `images` (complete lists of the cluster's) nor to an import
/// running for an image uid in `importing`, plus the copies in `stale`
/// (from [`stale_copies`]): the ones to delete. A stale copy goes whatever
/// its name, so an attached volume's (`vol-`, decision 76) goes too; an
/// attached volume this node still holds, or one released, is never
/// garbage here (the standalone loop drops those copies).
pub fn garbage(
    pool: &[StorageVolume],
    vms: &[Vm],
    images: &[Image],
    importing: &[String],
    stale: &BTreeSet<String>,
) -> Vec<String> {
    let mut wanted: BTreeSet<String> = vms
        .iter()
        .flat_map(|vm| vm.spec.disks.iter().map(|d| d.storage_name(&vm.meta.uid)))
        .collect();
    wanted.extend(vms.iter().filter_map(seed::seed_volume));
    wanted.extend(images.iter().map(|i| image_volume(&i.meta.uid)));
    for uid in importing {
        wanted.insert(image_volume(uid));
        wanted.insert(image::staging_volume(uid));
    }
    wanted.retain(|name| !stale.contains(name));
    pool.iter()
        .filter(|v| {
            (is_disk_volume(&v.name)
                || is_image_volume(&v.name)
                || seed::is_seed_volume(&v.name)
                || stale.contains(&v.name))
                && !wanted.contains(&v.name)
        })
        .map(|v| v.name.clone())
        .collect()
}

/// The replicated disks of existing VMs whose copy node `node` no longer
/// holds: the VM's placement (in `placements`, by VM name) lists replica
/// nodes and `node` is neither among them nor the VM's node, and no
/// migration of the VM that is still under way names `node`. A node that
/// was lost and replaced (decision 43) or removed finds its old, outdated
/// copies here when it comes back; the VM's data lives on in the copies
/// the placement names. A VM without a placement, or one whose placement
/// lists no replica nodes, has no stale copy: its disks are kept until it
/// is deleted.
pub fn stale_copies(
    node: &str,
    vms: &[Vm],
    placements: &BTreeMap<String, Placement>,
    migrations: &[Migration],
) -> BTreeSet<String> {
    vms.iter()
        .filter(|vm| {
            placements.get(&vm.meta.name).is_some_and(|placement| {
                !placement.replica_nodes.is_empty() && !replicas::names_node(placement, node)
            }) && !migrations.iter().any(|m| {
                m.spec.vm == vm.meta.name
                    && !m.status.phase.is_terminal()
                    && (m.status.source == node
                        || m.status.target == node
                        || m.spec.target.as_deref() == Some(node))
            })
        })
        .flat_map(|vm| {
            vm.spec
                .disks
                .iter()
                .filter(|d| replicas::is_replicated(d))
                .map(|d| d.storage_name(&vm.meta.uid))
        })
        .collect()
}

/// The agent's side of the node's storage. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Volumes {
    node: String,
    storage: StorageClient,
    admin: AdminClient,
    importer: Importer,
    last_gc: Arc<Mutex<Option<Instant>>>,
}

impl Volumes {
    /// Volumes of node `node` through the storage process at
    /// `config.socket`; `admin` reads images, reports their import and
    /// lists the cluster's VMs for garbage collection.
    pub fn new(
        node: &str,
        config: &StorageConfig,
        admin: AdminClient,
    ) -> Result<Volumes, ApiError> {
        let storage = StorageClient::connect_unix(&config.socket)?;
        Ok(Volumes {
            node: node.to_owned(),
            importer: Importer::new(node.to_owned(), storage.clone(), admin.clone()),
            storage,
            admin,
            last_gc: Arc::new(Mutex::new(None)),
        })
    }

    /// The storage client.
    pub fn storage(&self) -> &StorageClient {
        &self.storage
    }

    /// [`Volumes::ensure_vm_at`] for a VM's first placement (epoch 1).
    pub async fn ensure_vm(&self, vm: &Vm) -> Result<(), VolumeError> {
        self.ensure_vm_at(vm, 1).await
    }

    /// Makes every disk of `vm` a volume exported where its domain looks.
    /// `epoch` is the VM's placement epoch here: above 1 the VM ran on
    /// another node before, and a missing volume is not created (its data
    /// is elsewhere) but refused with [`VolumeError::Elsewhere`] — unless
    /// the disk was added at this epoch (`added_at_epoch`), when this node
    /// is where it is made.
    pub async fn ensure_vm_at(&self, vm: &Vm, epoch: u64) -> Result<(), VolumeError> {
        for disk in &vm.spec.disks {
            let name = disk.storage_name(&vm.meta.uid);
            // An existing volume is kept as it is: its image is not even
            // looked up (a VM keeps running when its image is deleted).
            let exists = match self.storage.export_address(&name).await {
                Ok(_) => true,
                Err(ApiError::FailedPrecondition { .. }) => false,
                Err(e) => return Err(classify(&disk.name, e)),
            };
            // A disk is made at the VM's first placement, or at the epoch
            // an update added it at; missing later, its data is elsewhere.
            let made_at = disk.added_at_epoch.unwrap_or(1).max(1);
            if !exists && epoch > made_at {
                return Err(VolumeError::Elsewhere {
                    disk: disk.name.clone(),
                    epoch,
                });
            }
            let source = match (&disk.image, &disk.source_volume) {
                (Some(image), _) if !exists => Some(self.image_source(&disk.name, image).await?),
                (None, Some(volume)) if !exists => {
                    Some(self.volume_source(&disk.name, volume).await?)
                }
                _ => None,
            };
            let request = EnsureVolume {
                name: name.clone(),
                size_bytes: disk.size_bytes,
                source,
            };
            let volume = self
                .storage
                .ensure_volume(request)
                .await
                .map_err(|e| classify(&disk.name, e))?;
            if volume.size_bytes < disk.size_bytes {
                // The spec grew the disk: grow the volume (online).
                self.storage
                    .resize_volume(&name, disk.size_bytes)
                    .await
                    .map_err(|e| classify(&disk.name, e))?;
            }
            let export = self
                .storage
                .export_address(&name)
                .await
                .map_err(|e| classify(&disk.name, e))?;
            if export.port != NBD_PORT || export.export_name != name {
                return Err(VolumeError::ExportMismatch {
                    disk: disk.name.clone(),
                    found: export.uri(),
                    expected: format!("port {NBD_PORT}, export {name}"),
                });
            }
        }
        self.ensure_seed(vm).await
    }

    /// Makes `vm`'s cloud-init seed volume ([`seed::ensure`]) unless it
    /// exists or the VM has none. The seed derives from the spec alone: it
    /// is made on whichever node the VM runs or moves to, whatever its
    /// epoch.
    pub async fn ensure_seed(&self, vm: &Vm) -> Result<(), VolumeError> {
        seed::ensure(&self.storage, vm)
            .await
            .map_err(|err| match err {
                seed::SeedError::Unavailable(err) => VolumeError::Unavailable(err),
                err => VolumeError::Failed {
                    disk: "cloud-init seed".into(),
                    source: ApiError::Internal {
                        reason: err.describe(),
                    },
                },
            })?;
        Ok(())
    }

    /// The snapshot a disk from `image` clones, once the image is in the
    /// pool. An existing disk volume never asks: a VM keeps running when
    /// its image is deleted.
    async fn image_source(&self, disk: &str, image: &str) -> Result<String, VolumeError> {
        let image = match self.admin.get(Kind::Image, image).await {
            Ok(Object::Image(image)) => image,
            Ok(_) => {
                return Err(VolumeError::Failed {
                    disk: disk.to_owned(),
                    source: ApiError::Internal {
                        reason: "the control plane returned another kind".into(),
                    },
                });
            }
            Err(err @ ApiError::Unavailable { .. }) => return Err(VolumeError::Unavailable(err)),
            Err(source) => {
                return Err(VolumeError::Failed {
                    disk: disk.to_owned(),
                    source,
                });
            }
        };
        match self.importer.ensure(&image).await {
            Ok(()) => Ok(image_volume(&image.meta.uid)),
            Err(reason) => Err(VolumeError::NotReady {
                disk: disk.to_owned(),
                reason,
            }),
        }
    }

    /// The pool volume a disk made from volume `volume` clones (decision
    /// 64): the source's, which must have its primary copy on this node
    /// (the scheduler placed the VM here for it). An existing disk volume
    /// never asks: the source may go once the clone is made.
    async fn volume_source(&self, disk: &str, volume: &str) -> Result<String, VolumeError> {
        let from = match self.admin.get(Kind::Volume, volume).await {
            Ok(Object::Volume(from)) => Some(from),
            Ok(_) => {
                return Err(VolumeError::Failed {
                    disk: disk.to_owned(),
                    source: ApiError::Internal {
                        reason: "the control plane returned another kind".into(),
                    },
                });
            }
            Err(ApiError::NotFound { .. }) => None,
            Err(err @ ApiError::Unavailable { .. }) => return Err(VolumeError::Unavailable(err)),
            Err(source) => {
                return Err(VolumeError::Failed {
                    disk: disk.to_owned(),
                    source,
                });
            }
        };
        let failed = |reason: String| VolumeError::Failed {
            disk: disk.to_owned(),
            source: ApiError::FailedPrecondition { reason },
        };
        match snapshots::clone_source(&self.node, volume, from.as_ref()) {
            snapshots::CloneSource::Here(pool_name) => Ok(pool_name),
            snapshots::CloneSource::NotYet(reason) => Err(VolumeError::NotReady {
                disk: disk.to_owned(),
                reason,
            }),
            snapshots::CloneSource::Elsewhere(reason) | snapshots::CloneSource::Gone(reason) => {
                Err(failed(reason))
            }
        }
    }

    /// At most every [`GC_INTERVAL`]: deletes the volumes of VMs that no
    /// longer exist, and the copies this node no longer holds
    /// ([`stale_copies`]). Returns the names deleted. Does nothing when the
    /// cluster's VMs, images, placements or migrations cannot be listed.
    pub async fn collect_garbage(&self) -> Vec<String> {
        {
            let mut last = self.last_gc.lock().await;
            if last.is_some_and(|t| t.elapsed() < GC_INTERVAL) {
                return Vec::new();
            }
            *last = Some(Instant::now());
        }
        // Placements and migrations are listed before the VMs: a VM
        // created in between has no placement here, so none of its copies
        // is stale.
        let listed = async {
            let placements: BTreeMap<String, Placement> =
                replicas::list_of(&self.admin, Kind::Placement, |o| {
                    Placement::try_from(o).ok().map(|p| (p.vm.clone(), p))
                })
                .await?;
            let migrations: Vec<Migration> =
                replicas::list_of(&self.admin, Kind::Migration, |o| o.try_into().ok()).await?;
            let vms = replicas::list_vms(&self.admin).await?;
            let images: Vec<Image> =
                replicas::list_of(&self.admin, Kind::Image, |o| o.try_into().ok()).await?;
            Ok::<_, ApiError>((placements, migrations, vms, images))
        };
        let (placements, migrations, vms, images) = match listed.await {
            Ok(listed) => listed,
            Err(err) => {
                tracing::debug!(error = %err, "cannot list the cluster's VMs, images, placements and migrations; no volume collection this time");
                return Vec::new();
            }
        };
        let stale = stale_copies(&self.node, &vms, &placements, &migrations);
        let importing = self.importer.running();
        let pool = match self.storage.list_volumes().await {
            Ok(pool) => pool,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list the pool's volumes");
                return Vec::new();
            }
        };
        let mut deleted = Vec::new();
        for name in garbage(&pool, &vms, &images, &importing, &stale) {
            match self.storage.delete_volume(&name).await {
                Ok(_) => {
                    if stale.contains(&name) {
                        tracing::info!(volume = %name, "deleted a copy this node no longer holds");
                    } else {
                        tracing::info!(volume = %name, "deleted the volume of a deleted VM or image");
                    }
                    deleted.push(name);
                }
                Err(err) => {
                    tracing::warn!(volume = %name, error = %err, "deleting a volume failed")
                }
            }
        }
        deleted
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{Disk, MigrationPhase, ObjectMeta, VmSpec};

    use super::*;

    fn vm(name: &str, uid: &str, disks: &[&str]) -> Vm {
        let mut meta = ObjectMeta::named(name);
        meta.uid = uid.into();
        Vm {
            meta,
            spec: VmSpec {
                disks: disks
                    .iter()
                    .map(|d| Disk {
                        name: (*d).into(),
                        size_bytes: 1 << 20,
                        image: None,
                        replicas: 1,
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

    fn volume(name: &str) -> StorageVolume {
        StorageVolume {
            name: name.into(),
            ..StorageVolume::default()
        }
    }

    #[test]
    fn disk_volumes_are_stable_distinct_and_valid_names() {
        let uid = "5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b";
        let root = disk_volume(uid, "root");
        assert_eq!(root, disk_volume(uid, "root"), "the same on every node");
        assert_ne!(root, disk_volume(uid, "data"));
        assert_ne!(
            root,
            disk_volume("6f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b", "root"),
            "a new VM of the same name gets new volumes"
        );
        assert!(is_disk_volume(&root));
        assert!(root.len() <= basalt_api::MAX_VOLUME_NAME_LEN);
        assert!(!is_disk_volume("lab-vm-root"));
    }

    #[test]
    fn garbage_is_what_no_vm_owns_and_basalt_made() {
        let a = vm("a", "uid-a", &["root", "data"]);
        let b = vm("b", "uid-b", &["root"]);
        let pool = [
            volume(&disk_volume("uid-a", "root")),
            volume(&disk_volume("uid-a", "data")),
            volume(&disk_volume("uid-b", "root")),
            volume("operator-volume"),
        ];
        assert!(garbage(&pool, &[a.clone(), b.clone()], &[], &[], &kept()).is_empty());
        // b deleted: only its disk goes.
        assert_eq!(
            garbage(&pool, std::slice::from_ref(&a), &[], &[], &kept()),
            [disk_volume("uid-b", "root")]
        );
        // a's data disk removed from its spec: that volume goes too.
        let a_root_only = vm("a", "uid-a", &["root"]);
        let mut gone = garbage(&pool, &[a_root_only, b], &[], &[], &kept());
        gone.sort();
        assert_eq!(gone, [disk_volume("uid-a", "data")]);
        // Nothing placed anywhere: every Basalt disk goes, never the
        // operator's volume.
        assert_eq!(garbage(&pool, &[], &[], &[], &kept()).len(), 3);
    }

    #[test]
    fn image_volumes_go_with_their_image_unless_an_import_runs() {
        let mut tiny = Image::default();
        tiny.meta.uid = "5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b".into();
        let other = "6f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b".to_owned();
        let pool = [
            volume(&image_volume(&tiny.meta.uid)),
            volume(&image_volume(&other)),
            volume(&image::staging_volume(&other)),
        ];
        let mut gone = garbage(&pool, &[], std::slice::from_ref(&tiny), &[], &kept());
        gone.sort();
        assert_eq!(gone, [image_volume(&other), image::staging_volume(&other)]);
        assert!(garbage(&pool, &[], &[tiny], std::slice::from_ref(&other), &kept()).is_empty());
    }

    /// No stale copies.
    fn kept() -> BTreeSet<String> {
        BTreeSet::new()
    }

    fn replicated(name: &str, uid: &str) -> Vm {
        let mut vm = vm(name, uid, &["root", "scratch"]);
        vm.spec.disks[0].replicas = 2;
        vm
    }

    fn placed(vm: &str, node: &str, replicas: &[&str]) -> (String, Placement) {
        let placement = Placement {
            meta: ObjectMeta::named(vm),
            vm: vm.into(),
            node: node.into(),
            epoch: 1,
            replica_nodes: replicas.iter().map(|n| (*n).into()).collect(),
        };
        (vm.into(), placement)
    }

    #[test]
    fn a_replaced_copy_is_stale_and_goes_unless_a_migration_names_the_node() {
        let db = replicated("db", "uid-db");
        let placements = BTreeMap::from([placed("db", "a", &["a", "c"])]);
        // b was replaced by c: its copy of the replicated disk is stale,
        // the VM's non-replicated disk is not its concern.
        let stale = stale_copies("b", std::slice::from_ref(&db), &placements, &[]);
        assert_eq!(stale, BTreeSet::from([disk_volume("uid-db", "root")]));
        let pool = [
            volume(&disk_volume("uid-db", "root")),
            volume(&disk_volume("uid-db", "scratch")),
        ];
        assert_eq!(
            garbage(&pool, std::slice::from_ref(&db), &[], &[], &stale),
            [disk_volume("uid-db", "root")]
        );
        // The nodes the placement names keep theirs.
        for node in ["a", "c"] {
            assert!(stale_copies(node, std::slice::from_ref(&db), &placements, &[]).is_empty());
        }
        // A migration under way that names b (here as its target) keeps
        // b's copy; once it ended, the copy is stale again.
        let mut migration = Migration::default();
        migration.spec.vm = "db".into();
        migration.spec.target = Some("b".into());
        migration.status.phase = MigrationPhase::Preparing;
        assert!(
            stale_copies(
                "b",
                std::slice::from_ref(&db),
                &placements,
                std::slice::from_ref(&migration)
            )
            .is_empty()
        );
        migration.status.phase = MigrationPhase::Failed;
        assert_eq!(
            stale_copies("b", std::slice::from_ref(&db), &placements, &[migration]).len(),
            1
        );
        // No placement, or one without replica nodes: nothing is stale.
        assert!(stale_copies("b", std::slice::from_ref(&db), &BTreeMap::new(), &[]).is_empty());
        let unreplicated = BTreeMap::from([placed("db", "a", &[])]);
        assert!(stale_copies("b", &[db], &unreplicated, &[]).is_empty());
    }

    #[test]
    fn a_stale_copy_of_an_attached_volume_goes_and_a_held_one_stays() {
        let mut db = replicated("db", "uid-db");
        db.spec.disks[0].attach = Some("scratch".into());
        db.spec.disks[0].attached_storage_name = Some("vol-scratch".into());
        let placements = BTreeMap::from([placed("db", "a", &["a", "c"])]);
        let pool = [volume("vol-scratch"), volume("vol-other")];
        // b's copy was replaced by c's: it goes, by its attached name.
        let stale = stale_copies("b", std::slice::from_ref(&db), &placements, &[]);
        assert_eq!(stale, BTreeSet::from(["vol-scratch".to_owned()]));
        assert_eq!(
            garbage(&pool, std::slice::from_ref(&db), &[], &[], &stale),
            ["vol-scratch"]
        );
        // c holds one: kept, and so is every other standalone volume.
        let held = stale_copies("c", std::slice::from_ref(&db), &placements, &[]);
        assert!(garbage(&pool, std::slice::from_ref(&db), &[], &[], &held).is_empty());
        // Released (the VM gone): not this collector's.
        assert!(garbage(&pool, &[], &[], &[], &kept()).is_empty());
    }
}
