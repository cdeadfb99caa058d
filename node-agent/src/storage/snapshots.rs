//! Snapshots and clones of volumes (decision 52): a `Volume` object with
//! a `spec.source` is made by the agent of the node that holds its
//! source's primary copy, in that node's pool, copy-on-write (the pool's
//! snapshot, or a volume cloned from the source), and recorded in its
//! status: its pool name ([`pool_name`]: `vol-` and the object's uid),
//! this node as its primary and only copy, `Ready`.
//!
//! [`plan`] says what to make here and which `vol-` pool volumes (of
//! snapshots, clones and standalone volumes) are no longer wanted here
//! (their object was deleted, or its copies are placed on other nodes);
//! [`make_and_drop`] does it. The volume watch loop
//! ([`super::standalone::run`]) calls it when the volumes change.
//!
//! A VM disk made from a volume (decision 64) is cloned by the same
//! storage call, by the VM's own volume reconciler ([`super::Volumes`]),
//! from the pool volume [`clone_source`] names.
//!
//! Invariants:
//! - a volume is made from its source only once: a pool volume already
//!   under its name is recorded as it is;
//! - only pool volumes named by [`pool_name`] are ever deleted here, and
//!   only when a complete set of the cluster's volumes has no object of
//!   that uid, or that object's placed copies do not name this node;
//! - a snapshot is crash-consistent: it is taken while the source's
//!   writer goes on, as a power cut would leave the disk.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use basalt_api::{
    AdminClient, ApiError, Condition, EnsureVolume, Object, ReplicaState, StorageClient,
    StorageVolume, Vm, Volume, VolumeReplica,
};
use uuid::Uuid;

const PREFIX: &str = "vol-";

/// The pool name of a snapshot, clone or standalone volume: `vol-` and
/// its object's uid ([`Volume::made_storage_name`]).
pub fn pool_name(volume: &Volume) -> String {
    Volume::made_storage_name(&volume.meta.uid)
}

/// Whether `name` is a name [`pool_name`] makes.
pub fn is_made_volume(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .is_some_and(|uid| Uuid::parse_str(uid).is_ok())
}

/// What to do in this node's pool.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Volumes to make here (or to record, when the pool has them), with
    /// their source's pool name.
    pub make: Vec<(Volume, String)>,
    /// Pool volumes made here whose object is gone.
    pub drop: Vec<String>,
}

/// The pool names of the volumes the disks of `vms` attach (decision 76).
pub fn attached_pool_names(vms: &[Vm]) -> BTreeSet<&str> {
    vms.iter()
        .flat_map(|vm| &vm.spec.disks)
        .filter_map(|d| d.attached_storage_name.as_deref())
        .collect()
}

/// `drop` without the pool volumes a disk of one of `vms` attaches
/// (decision 76): the VM's disk path keeps those wherever the volume's
/// status places its copies (a live migration's target holds one before
/// the volume names it). They are this loop's again once released.
pub fn keep_attached(drop: Vec<String>, vms: &[Vm]) -> Vec<String> {
    let attached = attached_pool_names(vms);
    drop.into_iter()
        .filter(|name| !attached.contains(name.as_str()))
        .collect()
}

/// The work of node `node`, from a complete list of the cluster's
/// `volumes` and its `pool`.
pub fn plan(node: &str, volumes: &[Volume], pool: &[StorageVolume]) -> Work {
    let by_name: BTreeMap<&str, &Volume> =
        volumes.iter().map(|v| (v.meta.name.as_str(), v)).collect();
    let mut work = Work::default();
    for volume in volumes {
        let Some(source) = &volume.spec.source else {
            continue;
        };
        if !volume.status.storage_name.is_empty() {
            continue;
        }
        let Some(from) = by_name.get(source.volume.as_str()) else {
            continue;
        };
        if from.status.primary_node == node && !from.status.storage_name.is_empty() {
            work.make
                .push((volume.clone(), from.status.storage_name.clone()));
        }
    }
    // A volume whose placed copies do not name this node (none made
    // yet: a snapshot being recorded) wants no copy here.
    let wanted: BTreeSet<String> = volumes
        .iter()
        .filter(|v| v.status.replicas.is_empty() || v.status.replica(node).is_some())
        .map(pool_name)
        .collect();
    work.drop = pool
        .iter()
        .filter(|v| is_made_volume(&v.name) && !wanted.contains(&v.name))
        .map(|v| v.name.clone())
        .collect();
    work
}

/// Where a VM disk made from volume `name` (decision 64) is cloned from
/// on node `node`, given that volume's object (`None`: it does not
/// exist): its pool name, when its primary copy is here and made.
pub fn clone_source(node: &str, name: &str, from: Option<&Volume>) -> CloneSource {
    match from {
        None => CloneSource::Gone(format!("volume {name:?} does not exist")),
        Some(v) if v.status.primary_node.is_empty() || v.status.storage_name.is_empty() => {
            CloneSource::NotYet(format!("volume {name:?} is on no node yet"))
        }
        Some(v) if v.status.primary_node != node => CloneSource::Elsewhere(format!(
            "volume {name:?} has its primary copy on node {:?}, not on {node:?}",
            v.status.primary_node
        )),
        Some(v) => CloneSource::Here(v.status.storage_name.clone()),
    }
}

/// What [`clone_source`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneSource {
    /// The source's pool volume in this node's pool.
    Here(String),
    /// The source is not made yet (a snapshot being taken): wait.
    NotYet(String),
    /// The source's primary copy is on another node: the clone cannot be
    /// made here.
    Elsewhere(String),
    /// The source does not exist.
    Gone(String),
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `volume` recorded as made on `node` (or, with `error`, as failed).
fn recorded(volume: &Volume, node: &str, error: Option<&str>) -> Volume {
    let mut done = volume.clone();
    let ready = match error {
        None => {
            done.status.storage_name = pool_name(volume);
            done.status.primary_node = node.to_owned();
            done.status.replicas = vec![VolumeReplica {
                node: node.to_owned(),
                state: ReplicaState::UpToDate,
                primary: true,
                ..VolumeReplica::default()
            }];
            Condition {
                kind: Condition::READY.into(),
                status: true,
                reason: "UpToDate".into(),
                message: format!("made on {node}"),
                last_transition_unix_ms: now_unix_ms(),
            }
        }
        Some(error) => Condition {
            kind: Condition::READY.into(),
            status: false,
            reason: "SourceFailed".into(),
            message: error.chars().take(512).collect(),
            last_transition_unix_ms: now_unix_ms(),
        },
    };
    done.status
        .conditions
        .retain(|c| c.kind != Condition::READY);
    done.status.conditions.push(ready);
    done
}

/// Makes `volume` from the pool volume `source` in `storage`'s pool,
/// unless `pool` has it already.
async fn make(
    storage: &StorageClient,
    volume: &Volume,
    source: &str,
    pool: &[StorageVolume],
) -> Result<(), ApiError> {
    let name = pool_name(volume);
    if pool.iter().any(|v| v.name == name) {
        return Ok(());
    }
    let snapshot = volume.spec.source.as_ref().is_some_and(|s| s.snapshot);
    if snapshot {
        storage.snapshot_volume(source, &name).await?;
    } else {
        let made = storage
            .ensure_volume(EnsureVolume {
                name: name.clone(),
                size_bytes: 0,
                source: Some(source.to_owned()),
            })
            .await?;
        if made.size_bytes < volume.spec.size_bytes {
            storage.resize_volume(&name, volume.spec.size_bytes).await?;
        }
    }
    Ok(())
}

/// Makes the snapshots and clones [`plan`] asks of node `node` and
/// records them, and drops the pool volumes it names, from a complete
/// set of the cluster's `volumes` and the node's `pool`. `failed` keeps
/// the makes that failed, with the error recorded (recorded once per
/// error). Returns whether everything succeeded.
pub async fn make_and_drop(
    node: &str,
    storage: &StorageClient,
    admin: &AdminClient,
    volumes: &[Volume],
    pool: &[StorageVolume],
    failed: &mut BTreeMap<String, String>,
) -> bool {
    let work = plan(node, volumes, pool);
    let mut ok = true;
    for (volume, source) in work.make {
        let error = make(storage, &volume, &source, pool)
            .await
            .err()
            .map(|e| e.to_string());
        ok &= error.is_none();
        if let Some(error) = &error
            && failed.get(&volume.meta.uid) == Some(error)
        {
            continue;
        }
        match admin
            .update(Object::Volume(recorded(&volume, node, error.as_deref())))
            .await
        {
            Ok(_) => match error {
                None => {
                    tracing::info!(volume = %volume.meta.name, %source, "made a volume from its source");
                    failed.remove(&volume.meta.uid);
                }
                Some(error) => {
                    tracing::warn!(volume = %volume.meta.name, %error, "making a volume from its source failed");
                    failed.insert(volume.meta.uid.clone(), error);
                }
            },
            Err(err) => {
                ok = false;
                tracing::debug!(volume = %volume.meta.name, error = %err, "recording a volume failed; will retry");
            }
        }
    }
    let drop = if work.drop.is_empty() {
        work.drop
    } else {
        match super::replicas::list_vms(admin).await {
            Ok(vms) => keep_attached(work.drop, &vms),
            Err(err) => {
                tracing::debug!(error = %err, "listing VMs before dropping volumes failed; will retry");
                return false;
            }
        }
    };
    for name in drop {
        match storage.delete_volume(&name).await {
            Ok(_) => {
                tracing::info!(volume = %name, "dropped a volume copy whose object is gone or placed elsewhere")
            }
            Err(err) => {
                ok = false;
                tracing::debug!(volume = %name, error = %err, "dropping a volume failed; will retry")
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use basalt_api::{Disk, ObjectMeta, VolumeSource, VolumeSpec, VolumeStatus};

    use super::*;

    #[test]
    fn a_volume_a_vm_attaches_is_never_dropped_here() {
        let attached = "vol-0b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d11";
        let free = "vol-0b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d12";
        let mut vm = Vm::default();
        vm.spec.disks = vec![
            Disk {
                name: "root".into(),
                ..Disk::default()
            },
            Disk {
                name: "data".into(),
                attach: Some("scratch".into()),
                attached_storage_name: Some(attached.into()),
                ..Disk::default()
            },
        ];
        let drop = vec![attached.to_owned(), free.to_owned()];
        assert_eq!(keep_attached(drop.clone(), &[vm]), [free]);
        assert_eq!(keep_attached(drop.clone(), &[]), drop);
    }

    fn volume(name: &str, uid: &str, source: Option<&str>, primary: &str, storage: &str) -> Volume {
        let mut meta = ObjectMeta::named(name);
        meta.uid = uid.into();
        Volume {
            meta,
            spec: VolumeSpec {
                size_bytes: 4096,
                replicas: 1,
                source: source.map(|s| VolumeSource {
                    volume: s.into(),
                    snapshot: true,
                }),
                ..VolumeSpec::default()
            },
            status: VolumeStatus {
                storage_name: storage.into(),
                primary_node: primary.into(),
                ..VolumeStatus::default()
            },
        }
    }

    const U1: &str = "0b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d11";
    const U2: &str = "1b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d12";
    const U3: &str = "2b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d13";

    #[test]
    fn a_disk_is_cloned_only_from_a_source_made_on_this_node() {
        let here = volume("golden", "u1", None, "a", "vol-u1");
        assert_eq!(
            clone_source("a", "golden", Some(&here)),
            CloneSource::Here("vol-u1".into())
        );
        assert!(matches!(
            clone_source("b", "golden", Some(&here)),
            CloneSource::Elsewhere(why) if why.contains("node \"a\"")
        ));
        let unmade = volume("snap", "u2", Some("golden"), "", "");
        assert!(matches!(
            clone_source("a", "snap", Some(&unmade)),
            CloneSource::NotYet(_)
        ));
        assert!(matches!(
            clone_source("a", "nope", None),
            CloneSource::Gone(_)
        ));
    }

    #[test]
    fn snapshots_are_made_on_the_sources_primary_node_and_dropped_with_their_object() {
        let volumes = vec![
            volume("db-root", U1, None, "a", "pool-db-root"),
            volume("snap", U2, Some("db-root"), "", ""),
            volume("unplaced", U3, Some("nowhere"), "", ""),
        ];
        let pool = vec![
            StorageVolume {
                name: format!("vol-{U3}"),
                ..StorageVolume::default()
            },
            StorageVolume {
                name: "vol-9b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d19".into(),
                ..StorageVolume::default()
            },
            StorageVolume {
                name: "vol-operator".into(),
                ..StorageVolume::default()
            },
        ];
        let work = plan("a", &volumes, &pool);
        assert_eq!(work.make.len(), 1);
        assert_eq!(work.make[0].0.meta.name, "snap");
        assert_eq!(work.make[0].1, "pool-db-root");
        // Only a made volume whose object is gone, never an operator's.
        assert_eq!(work.drop, ["vol-9b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d19"]);
        // Another node makes nothing.
        assert!(plan("b", &volumes, &[]).make.is_empty());

        let done = recorded(&work.make[0].0, "a", None);
        assert_eq!(done.status.storage_name, format!("vol-{U2}"));
        assert_eq!(done.status.replicas[0].node, "a");
        assert!(done.status.conditions[0].status);
        done.validate().unwrap();
        // A standalone volume's copy placed elsewhere goes; one placed
        // here, or not placed yet, stays.
        let mut elsewhere = volume("scratch", U3, None, "b", &format!("vol-{U3}"));
        elsewhere.status.replicas = vec![VolumeReplica {
            node: "b".into(),
            primary: true,
            ..VolumeReplica::default()
        }];
        let copy = [StorageVolume {
            name: format!("vol-{U3}"),
            ..StorageVolume::default()
        }];
        let listed = |v: &Volume| vec![v.clone()];
        assert_eq!(
            plan("a", &listed(&elsewhere), &copy).drop,
            [format!("vol-{U3}")]
        );
        assert!(plan("b", &listed(&elsewhere), &copy).drop.is_empty());
        elsewhere.status.replicas.clear();
        assert!(plan("a", &listed(&elsewhere), &copy).drop.is_empty());

        let failed = recorded(&work.make[0].0, "a", Some("no space"));
        assert!(failed.status.storage_name.is_empty());
        assert_eq!(failed.status.conditions[0].reason, "SourceFailed");
    }
}
