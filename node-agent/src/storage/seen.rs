//! The newest version of each volume object this agent has seen, by pool
//! name (decision 74), shared by the loops that learn versions (the volume
//! watch, the fencer's own marks) and the replica reports that carry them.
//!
//! A standalone volume's outdated mark records the volume's version just
//! before it was set; the control plane clears it on a primary's in-sync
//! report only when the report's version is newer. The reporter takes the
//! versions *before* it reads its storage process, so a report carrying a
//! version at or past the mark's was read after the mark: a report read
//! before the link broke (and recorded after the fence's mark) carries an
//! older version and clears nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use basalt_api::Volume;

/// What the agent knows of one volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Its newest resource version seen.
    pub version: u64,
    /// At that version, a copy carried an outdated mark.
    pub marked: bool,
}

/// Pool name → [`Seen`], shared by clones.
#[derive(Debug, Clone, Default)]
pub struct SeenVolumes(Arc<Mutex<BTreeMap<String, Seen>>>);

impl SeenVolumes {
    /// Records `volume` as seen, unless a newer version of it already was.
    pub fn record(&self, volume: &Volume) {
        let name = &volume.status.storage_name;
        if name.is_empty() {
            return;
        }
        let now = Seen {
            version: volume.meta.resource_version,
            marked: volume.status.replicas.iter().any(|r| r.outdated),
        };
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(name.clone()).or_default();
        if now.version >= entry.version {
            *entry = now;
        }
    }

    /// Forgets the volume of pool name `name` (its object is gone, or no
    /// longer names this node).
    pub fn forget(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// Everything known now.
    pub fn snapshot(&self) -> BTreeMap<String, Seen> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{ObjectMeta, VolumeReplica, VolumeStatus};

    use super::*;

    fn volume(version: u64, outdated: bool) -> Volume {
        Volume {
            meta: ObjectMeta {
                resource_version: version,
                ..ObjectMeta::named("data")
            },
            status: VolumeStatus {
                storage_name: "vol-1".into(),
                replicas: vec![VolumeReplica {
                    node: "b".into(),
                    outdated,
                    ..VolumeReplica::default()
                }],
                ..VolumeStatus::default()
            },
            ..Volume::default()
        }
    }

    #[test]
    fn only_newer_versions_replace_what_was_seen() {
        let seen = SeenVolumes::default();
        seen.record(&volume(7, true));
        seen.record(&volume(5, false));
        let now = seen.snapshot()["vol-1"];
        assert_eq!(
            now,
            Seen {
                version: 7,
                marked: true
            }
        );
        seen.clone().record(&volume(9, false));
        assert_eq!(
            seen.snapshot()["vol-1"],
            Seen {
                version: 9,
                marked: false
            }
        );
        seen.forget("vol-1");
        assert!(seen.snapshot().is_empty());
        // No pool name yet (not placed): nothing to key it by.
        let mut unplaced = volume(3, false);
        unplaced.status.storage_name.clear();
        seen.record(&unplaced);
        assert!(seen.snapshot().is_empty());
    }
}
