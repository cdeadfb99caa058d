//! Standalone volumes made from an image (decision 64): the agent of the
//! volume's primary node fills its copy the way a VM disk from an image
//! is filled — the image imported once into this node's pool
//! ([`Importer`]), the copy a copy-on-write clone of that import — before
//! the copy is held ([`super::standalone`]); the other copies are made
//! empty and filled by the primary's full initial sync, as for any
//! standalone volume.
//!
//! Invariants:
//! - a copy is cloned from its image only when this node is its primary
//!   and the pool has no volume under its pool name: an existing copy is
//!   never replaced, so an image deleted or changed later changes nothing;
//! - until the clone exists the copy is not held at all ([`fill`] names
//!   it waiting), so the primary never starts empty and syncs that out.

use std::collections::BTreeSet;

use basalt_api::{AdminClient, ApiError, EnsureVolume, Kind, Object, StorageClient, Volume};

use super::image::{Importer, image_volume};

/// Whether `volume` is a standalone volume from an image whose primary
/// copy `node` holds, not yet in `pool` (the pool's volume names).
pub fn to_fill(node: &str, volume: &Volume, pool: &BTreeSet<&str>) -> Option<String> {
    let image = volume.spec.image.clone()?;
    let status = &volume.status;
    let fill = volume.spec.owner.is_none()
        && volume.spec.source.is_none()
        && !status.storage_name.is_empty()
        && status.primary_node == node
        && !pool.contains(status.storage_name.as_str());
    fill.then_some(image)
}

/// What a [`fill`] pass left.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filled {
    /// Pool names of copies still waiting for their image (importing,
    /// failed, or the image missing): not to be held yet.
    pub waiting: BTreeSet<String>,
}

/// Clones, in this node's pool, every copy [`to_fill`] names from its
/// image, importing the image first when the pool lacks it. Copies whose
/// image is not in yet (or cannot be) are returned waiting, with the
/// reason logged once per change in `reasons` (pool name → reason).
pub async fn fill(
    node: &str,
    storage: &StorageClient,
    admin: &AdminClient,
    importer: &Importer,
    volumes: &[Volume],
    pool: &BTreeSet<&str>,
    reasons: &mut std::collections::BTreeMap<String, String>,
) -> Filled {
    let mut filled = Filled::default();
    for volume in volumes {
        let Some(image) = to_fill(node, volume, pool) else {
            continue;
        };
        let name = volume.status.storage_name.clone();
        match clone_from(storage, admin, importer, volume, &image).await {
            Ok(()) => {
                reasons.remove(&name);
                tracing::info!(volume = %volume.meta.name, %image, pool = %name, "made a standalone volume from its image");
            }
            Err(reason) => {
                if reasons.get(&name) != Some(&reason) {
                    tracing::info!(volume = %volume.meta.name, %image, %reason, "a standalone volume waits for its image");
                    reasons.insert(name.clone(), reason);
                }
                filled.waiting.insert(name);
            }
        }
    }
    reasons.retain(|name, _| filled.waiting.contains(name));
    filled
}

/// Clones `volume`'s copy from image `image` once the image is in the
/// pool; otherwise why not.
async fn clone_from(
    storage: &StorageClient,
    admin: &AdminClient,
    importer: &Importer,
    volume: &Volume,
    image: &str,
) -> Result<(), String> {
    let image = match admin.get(Kind::Image, image).await {
        Ok(Object::Image(image)) => image,
        Ok(_) => return Err("the control plane returned another kind".into()),
        Err(ApiError::NotFound { .. }) => return Err(format!("image {image:?} does not exist")),
        Err(err) => return Err(format!("cannot read image {image:?}: {err}")),
    };
    importer.ensure(&image).await?;
    let made = storage
        .ensure_volume(EnsureVolume {
            name: volume.status.storage_name.clone(),
            size_bytes: volume.spec.size_bytes,
            source: Some(image_volume(&image.meta.uid)),
        })
        .await
        .map_err(|e| format!("cloning image {:?}: {e}", image.meta.name))?;
    if made.size_bytes < volume.spec.size_bytes {
        storage
            .resize_volume(&made.name, volume.spec.size_bytes)
            .await
            .map_err(|e| format!("growing the clone of image {:?}: {e}", image.meta.name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use basalt_api::{ObjectMeta, VolumeOwner, VolumeSource, VolumeSpec, VolumeStatus};

    use super::*;

    fn volume(image: Option<&str>, primary: &str) -> Volume {
        Volume {
            meta: ObjectMeta::named("disk"),
            spec: VolumeSpec {
                size_bytes: 1 << 20,
                replicas: 2,
                image: image.map(str::to_owned),
                ..VolumeSpec::default()
            },
            status: VolumeStatus {
                storage_name: "vol-u1".into(),
                primary_node: primary.into(),
                ..VolumeStatus::default()
            },
        }
    }

    #[test]
    fn only_the_primary_fills_a_missing_copy_of_a_standalone_volume_from_its_image() {
        let empty = BTreeSet::new();
        assert_eq!(
            to_fill("a", &volume(Some("debian"), "a"), &empty).as_deref(),
            Some("debian")
        );
        // Another node's copy is filled by the full sync.
        assert_eq!(to_fill("b", &volume(Some("debian"), "a"), &empty), None);
        // A copy in the pool already is never made again.
        let held = BTreeSet::from(["vol-u1"]);
        assert_eq!(to_fill("a", &volume(Some("debian"), "a"), &held), None);
        // Not from an image, not placed, a VM disk, a clone: not here.
        assert_eq!(to_fill("a", &volume(None, "a"), &empty), None);
        let mut unplaced = volume(Some("debian"), "");
        unplaced.status.storage_name.clear();
        assert_eq!(to_fill("a", &unplaced, &empty), None);
        let mut disk = volume(Some("debian"), "a");
        disk.spec.owner = Some(VolumeOwner::default());
        assert_eq!(to_fill("a", &disk, &empty), None);
        let mut clone = volume(Some("debian"), "a");
        clone.spec.source = Some(VolumeSource::default());
        assert_eq!(to_fill("a", &clone, &empty), None);
    }
}
