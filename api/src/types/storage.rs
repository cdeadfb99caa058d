//! The storage-local service's types: a node's pool and its volumes, as
//! the agent sees them through the node's storage process.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// Largest volume the contract accepts (the pool's own limit: 1 PiB).
pub const MAX_STORAGE_VOLUME_BYTES: u64 = 1 << 50;
/// Longest volume name (the pool's limit).
pub const MAX_VOLUME_NAME_LEN: usize = 64;

/// One volume of a node's pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageVolume {
    /// Unique in the pool; also its NBD export name.
    pub name: String,
    /// The pool's uid for it.
    pub uid: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// Bytes of data chunks mapped.
    pub allocated_bytes: u64,
    /// Snapshots are read-only.
    pub read_only: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// Creates a volume unless it exists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnsureVolume {
    /// The volume's name.
    pub name: String,
    /// Size of a new volume; with a source, 0 means the source's size and
    /// a larger size grows the clone.
    pub size_bytes: u64,
    /// A volume or snapshot to clone; an empty volume when `None`.
    pub source: Option<String>,
}

/// Where an NBD client opens a volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeExport {
    /// TCP host of the NBD server, as seen inside the node.
    pub host: String,
    /// Its TCP port.
    pub port: u16,
    /// The NBD export name.
    pub export_name: String,
    /// The server's Unix socket, when it has one.
    pub unix_socket: Option<String>,
}

impl VolumeExport {
    /// The export as an NBD URI (`nbd://host:port/name`), for `qemu-img`
    /// and libnbd tools.
    pub fn uri(&self) -> String {
        format!("nbd://{}:{}/{}", self.host, self.port, self.export_name)
    }
}

/// How a primary's replication to one peer stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaPeerState {
    /// Connected and in sync.
    Connected,
    /// Connected, sending the chunks the peer missed.
    Resyncing,
    /// Not connected: writes are tracked as dirty chunks.
    #[default]
    Away,
    /// The peer saw a newer epoch: this primary acknowledges no write.
    Deposed,
}

/// A volume this process replicates to a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaPeer {
    /// The volume.
    pub volume: String,
    /// The peer's replication address.
    pub peer: String,
    /// How it stands.
    pub state: ReplicaPeerState,
    /// Chunks the peer is missing.
    pub dirty_chunks: u64,
    /// Bytes sent by resyncs so far.
    pub resync_bytes: u64,
    /// Frames the peer acknowledged.
    pub acked_frames: u64,
}

/// A node's pool, as its storage process reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageStatus {
    /// The pool's uid.
    pub pool_uid: String,
    /// Bytes per data chunk.
    pub chunk_size: u32,
    /// Data chunks in the pool.
    pub data_chunks: u64,
    /// Of which free.
    pub free_chunks: u64,
    /// Sum of volume sizes.
    pub virtual_bytes: u64,
    /// What over-provisioning allows.
    pub virtual_limit: u64,
    /// Number of volumes (snapshots included).
    pub volumes: u32,
    /// Writers waiting for space.
    pub suspended_writers: u32,
    /// Replicated volumes and their peers.
    pub replicas: Vec<ReplicaPeer>,
    /// Where the NBD server listens, inside the node.
    pub nbd_address: String,
}

/// Checks a pool volume name: 1 to 64 of `[A-Za-z0-9._-]`, starting with a
/// letter or digit.
pub(crate) fn validate_volume_name(field: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_VOLUME_NAME_LEN {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_VOLUME_NAME_LEN} characters"),
        ));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if !ok {
        return Err(ApiError::invalid(
            field,
            format!("{name:?} may hold only [A-Za-z0-9._-] and must start with a letter or digit"),
        ));
    }
    Ok(())
}

/// Checks a volume size: a multiple of 512 up to 1 PiB; 0 only when
/// `zero_ok`.
pub(crate) fn validate_volume_size(field: &str, size: u64, zero_ok: bool) -> Result<(), ApiError> {
    if (size == 0 && !zero_ok) || !size.is_multiple_of(512) || size > MAX_STORAGE_VOLUME_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("{size} is not a positive multiple of 512 up to 1 PiB"),
        ));
    }
    Ok(())
}

impl EnsureVolume {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_volume_name("name", &self.name)?;
        validate_volume_size("size_bytes", self.size_bytes, self.source.is_some())?;
        if let Some(source) = &self.source {
            validate_volume_name("source", source)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_requests_name_their_bad_field() {
        let good = EnsureVolume {
            name: "vm-1.root".into(),
            size_bytes: 1 << 20,
            source: None,
        };
        good.validate().unwrap();
        let field = |e: EnsureVolume| match e.validate() {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(EnsureVolume {
                name: "-x".into(),
                ..good.clone()
            }),
            "name"
        );
        assert_eq!(
            field(EnsureVolume {
                size_bytes: 0,
                ..good.clone()
            }),
            "size_bytes"
        );
        assert_eq!(
            field(EnsureVolume {
                size_bytes: 1000,
                ..good.clone()
            }),
            "size_bytes"
        );
        assert_eq!(
            field(EnsureVolume {
                source: Some("a/b".into()),
                ..good.clone()
            }),
            "source"
        );
        // A clone may take its source's size.
        EnsureVolume {
            size_bytes: 0,
            source: Some("img".into()),
            ..good
        }
        .validate()
        .unwrap();
    }
}
