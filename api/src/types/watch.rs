//! [`WatchEvent`]: one change on a watch stream.

use serde::{Deserialize, Serialize};

use super::Object;

/// One change on a watch stream: of any [`Object`] on the admin watch, of
/// a [`Placement`](super::Placement) on an agent's placement watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "UPPERCASE")]
pub enum WatchEvent<T = Object> {
    /// The object was created.
    Added {
        /// The object as created.
        object: T,
        /// The change's resource version.
        resource_version: u64,
    },
    /// The object was updated.
    Modified {
        /// The object after the update.
        object: T,
        /// The change's resource version.
        resource_version: u64,
    },
    /// The object was deleted.
    Deleted {
        /// The object as it was when deleted.
        object: T,
        /// The change's resource version.
        resource_version: u64,
    },
    /// No change: the stream is current up to `resource_version`; resume a
    /// broken watch from here.
    Bookmark {
        /// The version the stream has caught up to.
        resource_version: u64,
    },
}

impl<T> WatchEvent<T> {
    /// The change's resource version (for a bookmark, the version caught up to).
    pub fn resource_version(&self) -> u64 {
        match self {
            WatchEvent::Added {
                resource_version, ..
            }
            | WatchEvent::Modified {
                resource_version, ..
            }
            | WatchEvent::Deleted {
                resource_version, ..
            }
            | WatchEvent::Bookmark { resource_version } => *resource_version,
        }
    }

    /// The changed object; `None` for a bookmark.
    pub fn object(&self) -> Option<&T> {
        match self {
            WatchEvent::Added { object, .. }
            | WatchEvent::Modified { object, .. }
            | WatchEvent::Deleted { object, .. } => Some(object),
            WatchEvent::Bookmark { .. } => None,
        }
    }
}
