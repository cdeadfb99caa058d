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
    /// A full sync into this copy did not finish: refused as a primary or
    /// standalone unless attached with [`AttachVolume::force`].
    #[serde(default)]
    pub incomplete: bool,
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
    /// The peer is a primary of the volume that diverged from this one:
    /// reported, never resolved automatically.
    SplitBrain,
    /// The peer's backing store failed: detached, treated as away.
    DiskFailed,
}

/// The node's backing store, as its storage process sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    /// In use.
    #[default]
    Attached,
    /// An I/O error detached it: primaries go on diskless on their peers,
    /// secondaries refuse their primaries.
    Failed,
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
    /// Where this process accepts primaries' replication connections
    /// (`host:port`); empty when it does not.
    pub replication_address: String,
    /// The backing store's state.
    pub disk_state: DiskState,
    /// Why it was detached (empty while attached).
    pub disk_error: String,
}

/// Most peers one primary replicates to (3 replicas in all).
pub const MAX_REPLICA_PEERS: usize = 2;

/// What a volume is to replication on one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeRole {
    /// Writable by NBD clients, not replicated (every volume never
    /// attached behaves so towards NBD clients).
    #[default]
    Standalone,
    /// Receives a primary's writes; NBD clients may read it, their writes
    /// are refused (EPERM).
    Secondary,
    /// Writable; every change is shipped to each peer (protocol C).
    Primary,
}

/// When a primary acknowledges a write to its NBD clients (DRBD's
/// protocols; FLUSH and FUA wait for every peer under all three).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationProtocol {
    /// Once written locally and handed to every peer's send buffer.
    A,
    /// Once written locally and received by every peer.
    B,
    /// Once written locally and applied by every peer.
    #[default]
    C,
}

impl ReplicationProtocol {
    /// Its letter: `A`, `B` or `C` (the cluster API's and the CLI's form).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationProtocol::A => "A",
            ReplicationProtocol::B => "B",
            ReplicationProtocol::C => "C",
        }
    }

    /// Whether it is C, the default (the cluster objects' JSON leaves it
    /// out then).
    pub fn is_c(&self) -> bool {
        *self == ReplicationProtocol::C
    }

    /// Parses a cluster API `field`: `A`, `B` or `C` (either case); empty
    /// is C; anything else is `INVALID_ARGUMENT` naming `field`.
    pub fn parse(field: &str, value: &str) -> Result<Self, ApiError> {
        match value {
            "" | "C" | "c" => Ok(ReplicationProtocol::C),
            "A" | "a" => Ok(ReplicationProtocol::A),
            "B" | "b" => Ok(ReplicationProtocol::B),
            other => Err(ApiError::invalid(
                field,
                format!("unknown replication protocol {other:?} (A, B or C)"),
            )),
        }
    }
}

impl std::fmt::Display for ReplicationProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sets a volume's replication role on this node (idempotent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachVolume {
    /// An existing volume of the pool.
    pub name: String,
    /// Its role.
    pub role: VolumeRole,
    /// Primary: its epoch (required); secondary: the oldest epoch it
    /// accepts from a primary.
    pub epoch: u64,
    /// Primary only: the other replicas' replication addresses
    /// (`host:port`), at most [`MAX_REPLICA_PEERS`].
    pub peers: Vec<String>,
    /// Primary only (ignored otherwise): on losing a peer, go on and track
    /// the chunks it misses instead of suspending writes until it is back.
    pub allow_outdate: bool,
    /// When a primary acknowledges writes, kept with the attachment;
    /// `None` keeps the attachment's (C for a volume never attached).
    pub protocol: Option<ReplicationProtocol>,
    /// Primary or standalone: accept an incomplete copy
    /// ([`StorageVolume::incomplete`]) as it is.
    pub force: bool,
}

/// A volume's replication role as attached, with a primary's peers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAttachment {
    /// The volume.
    pub name: String,
    /// Its role.
    pub role: VolumeRole,
    /// The attachment's epoch.
    pub epoch: u64,
    /// A primary's peers and how each stands.
    pub peers: Vec<ReplicaPeer>,
    /// The attachment's replication protocol.
    pub protocol: ReplicationProtocol,
}

/// Most out-of-sync chunk indexes one [`PeerVerify`] lists.
pub const MAX_LISTED_OUT_OF_SYNC: usize = 1024;

/// Online verify of a volume that is a primary on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyVolume {
    /// The volume.
    pub name: String,
    /// Send the chunks that differ again at once (otherwise they are
    /// marked dirty and sent by the next resync).
    pub repair: bool,
    /// Most bytes per second read on each side (0: the storage process's
    /// sync rate).
    pub rate_bytes: u64,
}

/// What online verify found on one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerVerify {
    /// The peer's replication address.
    pub peer: String,
    /// Why the comparison did not run to the end (`None`: it did).
    pub error: Option<String>,
    /// Chunks compared.
    pub checked_chunks: u64,
    /// Chunks that differ.
    pub out_of_sync: u64,
    /// Their indexes, the first [`MAX_LISTED_OUT_OF_SYNC`].
    pub out_of_sync_chunks: Vec<u64>,
    /// Of those, chunks sent again.
    pub repaired: u64,
}

/// Online verify's result for one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeVerify {
    /// The volume.
    pub name: String,
    /// Bytes per compared chunk.
    pub chunk_size: u32,
    /// Each peer's result.
    pub peers: Vec<PeerVerify>,
}

/// A primary that lost a peer asks its node's agent to have the control
/// plane record the peer outdated (the storage fence), streamed by the
/// storage process's `WatchFences`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRequest {
    /// Names the question in the [`FenceAnswer`].
    pub id: u64,
    /// The volume (the pool's name).
    pub volume: String,
    /// The lost peer's replication address (`host:port`).
    pub peer: String,
    /// The asking primary's epoch.
    pub epoch: u64,
}

impl FenceRequest {
    /// Checks every field: a volume name, a `host:port` peer, an epoch.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_volume_name("volume", &self.volume)?;
        validate_host_port("peer", &self.peer)?;
        if self.epoch == 0 {
            return Err(ApiError::invalid("epoch", "a primary's epoch is 1 or more"));
        }
        Ok(())
    }
}

/// The agent's answer to a [`FenceRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceAnswer {
    /// The request's id.
    pub id: u64,
    /// True: the control plane recorded the peer outdated, writes go on
    /// without it. False: refused, writes stay suspended.
    pub outdated: bool,
    /// Why, when refused.
    pub reason: String,
}

/// Checks a replication address: `host:port`, a non-empty host (an IPv6
/// address in brackets) and a port from 1 to 65535.
pub(crate) fn validate_host_port(field: &str, addr: &str) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::invalid(field, format!("{addr:?} is not host:port ({why})"));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("the port must be 1 to 65535")),
    }
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
    };
    if !host_ok {
        return Err(bad("the host is not an address or DNS name"));
    }
    Ok(())
}

impl AttachVolume {
    /// Checks every field: a primary needs an epoch; peers only on a
    /// primary, each `host:port`, no duplicates, at most
    /// [`MAX_REPLICA_PEERS`].
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_volume_name("name", &self.name)?;
        match self.role {
            VolumeRole::Primary => {
                if self.epoch == 0 {
                    return Err(ApiError::invalid(
                        "epoch",
                        "a primary needs an epoch (1 or more)",
                    ));
                }
                if self.peers.len() > MAX_REPLICA_PEERS {
                    return Err(ApiError::invalid(
                        "peers",
                        format!(
                            "{} peers: a primary replicates to at most {MAX_REPLICA_PEERS}",
                            self.peers.len()
                        ),
                    ));
                }
                for (i, peer) in self.peers.iter().enumerate() {
                    validate_host_port(&format!("peers[{i}]"), peer)?;
                    if self.peers[..i].contains(peer) {
                        return Err(ApiError::invalid(
                            format!("peers[{i}]"),
                            format!("{peer:?} is listed twice"),
                        ));
                    }
                }
            }
            VolumeRole::Secondary | VolumeRole::Standalone => {
                if !self.peers.is_empty() {
                    return Err(ApiError::invalid(
                        "peers",
                        "only a primary has peers (a secondary is written by its primaries)",
                    ));
                }
            }
        }
        Ok(())
    }
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

    fn attach_field(a: &AttachVolume) -> String {
        match a.validate() {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("{a:?}: {other:?}"),
        }
    }

    #[test]
    fn protocols_parse_by_letter_and_name_their_field() {
        for p in [
            ReplicationProtocol::A,
            ReplicationProtocol::B,
            ReplicationProtocol::C,
        ] {
            assert_eq!(ReplicationProtocol::parse("f", p.as_str()).unwrap(), p);
            let lower = p.as_str().to_ascii_lowercase();
            assert_eq!(ReplicationProtocol::parse("f", &lower).unwrap(), p);
        }
        assert_eq!(
            ReplicationProtocol::parse("f", "").unwrap(),
            ReplicationProtocol::C
        );
        for bad in ["D", "AB", " A", "protocol-c"] {
            match ReplicationProtocol::parse("spec.protocol", bad) {
                Err(ApiError::InvalidArgument { field, .. }) => assert_eq!(field, "spec.protocol"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn attach_requests_name_their_bad_field() {
        let primary = AttachVolume {
            name: "vm-1.root".into(),
            role: VolumeRole::Primary,
            epoch: 3,
            peers: vec!["10.0.0.2:7800".into(), "[fd00::2]:7800".into()],
            allow_outdate: false,
            protocol: Some(ReplicationProtocol::A),
            force: false,
        };
        primary.validate().unwrap();
        AttachVolume {
            peers: vec!["node-b.lab:7800".into()],
            ..primary.clone()
        }
        .validate()
        .unwrap();
        // A primary with no peers is a writable, fenced, unreplicated volume.
        AttachVolume {
            peers: vec![],
            ..primary.clone()
        }
        .validate()
        .unwrap();
        let secondary = AttachVolume {
            role: VolumeRole::Secondary,
            peers: vec![],
            epoch: 0,
            ..primary.clone()
        };
        secondary.validate().unwrap();
        let cases = [
            (
                AttachVolume {
                    epoch: 0,
                    ..primary.clone()
                },
                "epoch",
            ),
            (
                AttachVolume {
                    name: "a/b".into(),
                    ..primary.clone()
                },
                "name",
            ),
            (
                AttachVolume {
                    peers: vec!["10.0.0.2".into()],
                    ..primary.clone()
                },
                "peers[0]",
            ),
            (
                AttachVolume {
                    peers: vec!["10.0.0.2:7800".into(), "10.0.0.3:0".into()],
                    ..primary.clone()
                },
                "peers[1]",
            ),
            (
                AttachVolume {
                    peers: vec![":7800".into()],
                    ..primary.clone()
                },
                "peers[0]",
            ),
            (
                AttachVolume {
                    peers: vec!["fd00::2:7800".into()],
                    ..primary.clone()
                },
                "peers[0]",
            ),
            (
                AttachVolume {
                    peers: vec!["a:1".into(), "a:1".into()],
                    ..primary.clone()
                },
                "peers[1]",
            ),
            (
                AttachVolume {
                    peers: vec!["a:1".into(), "b:1".into(), "c:1".into()],
                    ..primary.clone()
                },
                "peers",
            ),
            (
                AttachVolume {
                    peers: vec!["a:1".into()],
                    ..secondary.clone()
                },
                "peers",
            ),
        ];
        for (request, field) in cases {
            assert_eq!(attach_field(&request), field, "{request:?}");
        }
    }
}
