//! Storage-local types ⇄ protobuf.

use super::enum_value;
use crate::pb;
use crate::types::validate_volume_name;
use crate::{
    ApiError, AttachVolume, DiskState, EnsureVolume, FenceAnswer, FenceRequest,
    MAX_LISTED_OUT_OF_SYNC, PeerVerify, ReplicaPeer, ReplicaPeerState, ReplicationProtocol,
    StorageStatus, StorageVolume, VerifyVolume, VolumeAttachment, VolumeExport, VolumeRole,
    VolumeVerify,
};

impl From<VerifyVolume> for pb::VerifyVolumeRequest {
    fn from(r: VerifyVolume) -> Self {
        Self {
            name: r.name,
            repair: r.repair,
            rate_bytes: r.rate_bytes,
        }
    }
}

impl TryFrom<pb::VerifyVolumeRequest> for VerifyVolume {
    type Error = ApiError;

    fn try_from(r: pb::VerifyVolumeRequest) -> Result<Self, ApiError> {
        validate_volume_name("name", &r.name)?;
        Ok(Self {
            name: r.name,
            repair: r.repair,
            rate_bytes: r.rate_bytes,
        })
    }
}

impl From<PeerVerify> for pb::PeerVerify {
    fn from(p: PeerVerify) -> Self {
        let mut listed = p.out_of_sync_chunks;
        listed.truncate(MAX_LISTED_OUT_OF_SYNC);
        Self {
            peer: p.peer,
            error: p.error.unwrap_or_default(),
            checked_chunks: p.checked_chunks,
            out_of_sync: p.out_of_sync,
            out_of_sync_chunks: listed,
            repaired: p.repaired,
        }
    }
}

impl From<pb::PeerVerify> for PeerVerify {
    fn from(p: pb::PeerVerify) -> Self {
        Self {
            peer: p.peer,
            error: Some(p.error).filter(|e| !e.is_empty()),
            checked_chunks: p.checked_chunks,
            out_of_sync: p.out_of_sync,
            out_of_sync_chunks: p.out_of_sync_chunks,
            repaired: p.repaired,
        }
    }
}

impl From<VolumeVerify> for pb::VolumeVerify {
    fn from(v: VolumeVerify) -> Self {
        Self {
            name: v.name,
            chunk_size: v.chunk_size,
            peers: v.peers.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::VolumeVerify> for VolumeVerify {
    fn from(v: pb::VolumeVerify) -> Self {
        Self {
            name: v.name,
            chunk_size: v.chunk_size,
            peers: v.peers.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<FenceRequest> for pb::FenceRequest {
    fn from(r: FenceRequest) -> Self {
        Self {
            id: r.id,
            volume: r.volume,
            peer: r.peer,
            epoch: r.epoch,
        }
    }
}

impl TryFrom<pb::FenceRequest> for FenceRequest {
    type Error = ApiError;

    fn try_from(r: pb::FenceRequest) -> Result<Self, ApiError> {
        let request = Self {
            id: r.id,
            volume: r.volume,
            peer: r.peer,
            epoch: r.epoch,
        };
        request.validate()?;
        Ok(request)
    }
}

impl From<FenceAnswer> for pb::AnswerFenceRequest {
    fn from(a: FenceAnswer) -> Self {
        Self {
            id: a.id,
            outdated: a.outdated,
            reason: a.reason,
        }
    }
}

impl From<pb::AnswerFenceRequest> for FenceAnswer {
    fn from(a: pb::AnswerFenceRequest) -> Self {
        Self {
            id: a.id,
            outdated: a.outdated,
            reason: a.reason,
        }
    }
}

impl From<StorageVolume> for pb::StorageVolume {
    fn from(v: StorageVolume) -> Self {
        Self {
            name: v.name,
            uid: v.uid,
            size_bytes: v.size_bytes,
            allocated_bytes: v.allocated_bytes,
            read_only: v.read_only,
            created_unix: v.created_unix,
            incomplete: v.incomplete,
        }
    }
}

impl TryFrom<pb::StorageVolume> for StorageVolume {
    type Error = ApiError;

    fn try_from(v: pb::StorageVolume) -> Result<Self, ApiError> {
        crate::types::validate_volume_name("volume.name", &v.name)?;
        Ok(Self {
            name: v.name,
            uid: v.uid,
            size_bytes: v.size_bytes,
            allocated_bytes: v.allocated_bytes,
            read_only: v.read_only,
            created_unix: v.created_unix,
            incomplete: v.incomplete,
        })
    }
}

impl From<EnsureVolume> for pb::EnsureVolumeRequest {
    fn from(e: EnsureVolume) -> Self {
        Self {
            name: e.name,
            size_bytes: e.size_bytes,
            source: e.source,
        }
    }
}

impl TryFrom<pb::EnsureVolumeRequest> for EnsureVolume {
    type Error = ApiError;

    fn try_from(e: pb::EnsureVolumeRequest) -> Result<Self, ApiError> {
        let e = Self {
            name: e.name,
            size_bytes: e.size_bytes,
            source: e.source,
        };
        e.validate()?;
        Ok(e)
    }
}

impl From<VolumeExport> for pb::VolumeExport {
    fn from(e: VolumeExport) -> Self {
        Self {
            host: e.host,
            port: u32::from(e.port),
            export_name: e.export_name,
            unix_socket: e.unix_socket,
        }
    }
}

impl TryFrom<pb::VolumeExport> for VolumeExport {
    type Error = ApiError;

    fn try_from(e: pb::VolumeExport) -> Result<Self, ApiError> {
        let port = u16::try_from(e.port)
            .map_err(|_| ApiError::invalid("export.port", format!("{} is not a port", e.port)))?;
        if e.host.is_empty() {
            return Err(ApiError::missing("export.host"));
        }
        crate::types::validate_volume_name("export.export_name", &e.export_name)?;
        Ok(Self {
            host: e.host,
            port,
            export_name: e.export_name,
            unix_socket: e.unix_socket,
        })
    }
}

impl From<ReplicaPeerState> for pb::ReplicaPeerState {
    fn from(s: ReplicaPeerState) -> Self {
        match s {
            ReplicaPeerState::Connected => Self::Connected,
            ReplicaPeerState::Resyncing => Self::Resyncing,
            ReplicaPeerState::Away => Self::Away,
            ReplicaPeerState::Deposed => Self::Deposed,
            ReplicaPeerState::SplitBrain => Self::SplitBrain,
            ReplicaPeerState::DiskFailed => Self::DiskFailed,
        }
    }
}

impl From<ReplicaPeer> for pb::ReplicaPeer {
    fn from(p: ReplicaPeer) -> Self {
        Self {
            volume: p.volume,
            peer: p.peer,
            state: pb::ReplicaPeerState::from(p.state).into(),
            dirty_chunks: p.dirty_chunks,
            resync_bytes: p.resync_bytes,
            acked_frames: p.acked_frames,
        }
    }
}

impl TryFrom<pb::ReplicaPeer> for ReplicaPeer {
    type Error = ApiError;

    fn try_from(p: pb::ReplicaPeer) -> Result<Self, ApiError> {
        let state = match enum_value::<pb::ReplicaPeerState>(p.state, "replica.state")? {
            pb::ReplicaPeerState::Connected => ReplicaPeerState::Connected,
            pb::ReplicaPeerState::Resyncing => ReplicaPeerState::Resyncing,
            pb::ReplicaPeerState::Unspecified | pb::ReplicaPeerState::Away => {
                ReplicaPeerState::Away
            }
            pb::ReplicaPeerState::Deposed => ReplicaPeerState::Deposed,
            pb::ReplicaPeerState::SplitBrain => ReplicaPeerState::SplitBrain,
            pb::ReplicaPeerState::DiskFailed => ReplicaPeerState::DiskFailed,
        };
        Ok(Self {
            volume: p.volume,
            peer: p.peer,
            state,
            dirty_chunks: p.dirty_chunks,
            resync_bytes: p.resync_bytes,
            acked_frames: p.acked_frames,
        })
    }
}

impl From<StorageStatus> for pb::StorageStatus {
    fn from(s: StorageStatus) -> Self {
        Self {
            pool_uid: s.pool_uid,
            chunk_size: s.chunk_size,
            data_chunks: s.data_chunks,
            free_chunks: s.free_chunks,
            virtual_bytes: s.virtual_bytes,
            virtual_limit: s.virtual_limit,
            volumes: s.volumes,
            suspended_writers: s.suspended_writers,
            replicas: s.replicas.into_iter().map(Into::into).collect(),
            nbd_address: s.nbd_address,
            replication_address: s.replication_address,
            disk_state: match s.disk_state {
                DiskState::Attached => pb::DiskState::Attached,
                DiskState::Failed => pb::DiskState::Failed,
            }
            .into(),
            disk_error: s.disk_error,
        }
    }
}

impl TryFrom<pb::StorageStatus> for StorageStatus {
    type Error = ApiError;

    fn try_from(s: pb::StorageStatus) -> Result<Self, ApiError> {
        Ok(Self {
            pool_uid: s.pool_uid,
            chunk_size: s.chunk_size,
            data_chunks: s.data_chunks,
            free_chunks: s.free_chunks,
            virtual_bytes: s.virtual_bytes,
            virtual_limit: s.virtual_limit,
            volumes: s.volumes,
            suspended_writers: s.suspended_writers,
            replicas: s
                .replicas
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            nbd_address: s.nbd_address,
            replication_address: s.replication_address,
            disk_state: match enum_value::<pb::DiskState>(s.disk_state, "disk_state")? {
                pb::DiskState::Unspecified | pb::DiskState::Attached => DiskState::Attached,
                pb::DiskState::Failed => DiskState::Failed,
            },
            disk_error: s.disk_error,
        })
    }
}

impl From<VolumeRole> for pb::VolumeRole {
    fn from(r: VolumeRole) -> Self {
        match r {
            VolumeRole::Standalone => Self::Standalone,
            VolumeRole::Secondary => Self::Secondary,
            VolumeRole::Primary => Self::Primary,
        }
    }
}

/// A role field; unspecified is an error naming `field`.
fn volume_role(value: i32, field: &str) -> Result<VolumeRole, ApiError> {
    match enum_value::<pb::VolumeRole>(value, field)? {
        pb::VolumeRole::Unspecified => Err(ApiError::missing(field)),
        pb::VolumeRole::Standalone => Ok(VolumeRole::Standalone),
        pb::VolumeRole::Secondary => Ok(VolumeRole::Secondary),
        pb::VolumeRole::Primary => Ok(VolumeRole::Primary),
    }
}

impl From<ReplicationProtocol> for pb::ReplicationProtocol {
    fn from(p: ReplicationProtocol) -> Self {
        match p {
            ReplicationProtocol::A => Self::A,
            ReplicationProtocol::B => Self::B,
            ReplicationProtocol::C => Self::C,
        }
    }
}

impl pb::SetReplicationProtocolRequest {
    /// The protocol asked for (unspecified: C); an unknown value is an
    /// error naming the field.
    pub(crate) fn checked_protocol(&self) -> Result<ReplicationProtocol, ApiError> {
        replication_protocol(self.protocol, "protocol")
    }
}

/// A protocol field; unspecified is C, an unknown value an error naming
/// `field`.
fn replication_protocol(value: i32, field: &str) -> Result<ReplicationProtocol, ApiError> {
    Ok(match enum_value::<pb::ReplicationProtocol>(value, field)? {
        pb::ReplicationProtocol::A => ReplicationProtocol::A,
        pb::ReplicationProtocol::B => ReplicationProtocol::B,
        pb::ReplicationProtocol::Unspecified | pb::ReplicationProtocol::C => ReplicationProtocol::C,
    })
}

impl From<AttachVolume> for pb::AttachVolumeRequest {
    fn from(a: AttachVolume) -> Self {
        Self {
            name: a.name,
            role: pb::VolumeRole::from(a.role).into(),
            epoch: a.epoch,
            peers: a.peers,
            allow_outdate: a.allow_outdate,
            protocol: a
                .protocol
                .map_or(pb::ReplicationProtocol::Unspecified, Into::into)
                .into(),
            force: a.force,
        }
    }
}

impl TryFrom<pb::AttachVolumeRequest> for AttachVolume {
    type Error = ApiError;

    fn try_from(a: pb::AttachVolumeRequest) -> Result<Self, ApiError> {
        let a = Self {
            name: a.name,
            role: volume_role(a.role, "role")?,
            epoch: a.epoch,
            peers: a.peers,
            allow_outdate: a.allow_outdate,
            protocol: match enum_value::<pb::ReplicationProtocol>(a.protocol, "protocol")? {
                pb::ReplicationProtocol::Unspecified => None,
                pb::ReplicationProtocol::A => Some(ReplicationProtocol::A),
                pb::ReplicationProtocol::B => Some(ReplicationProtocol::B),
                pb::ReplicationProtocol::C => Some(ReplicationProtocol::C),
            },
            force: a.force,
        };
        a.validate()?;
        Ok(a)
    }
}

impl From<VolumeAttachment> for pb::VolumeAttachment {
    fn from(a: VolumeAttachment) -> Self {
        Self {
            name: a.name,
            role: pb::VolumeRole::from(a.role).into(),
            epoch: a.epoch,
            peers: a.peers.into_iter().map(Into::into).collect(),
            protocol: pb::ReplicationProtocol::from(a.protocol).into(),
        }
    }
}

impl TryFrom<pb::VolumeAttachment> for VolumeAttachment {
    type Error = ApiError;

    fn try_from(a: pb::VolumeAttachment) -> Result<Self, ApiError> {
        crate::types::validate_volume_name("attachment.name", &a.name)?;
        Ok(Self {
            name: a.name,
            role: volume_role(a.role, "attachment.role")?,
            epoch: a.epoch,
            peers: a
                .peers
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            protocol: replication_protocol(a.protocol, "attachment.protocol")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_types_round_trip() {
        let status = StorageStatus {
            pool_uid: "u".into(),
            chunk_size: 65536,
            replication_address: "10.0.0.1:7800".into(),
            volumes: 2,
            disk_state: DiskState::Failed,
            disk_error: "injected".into(),
            replicas: vec![
                ReplicaPeer {
                    volume: "v".into(),
                    peer: "10.0.0.2:7800".into(),
                    state: ReplicaPeerState::Resyncing,
                    dirty_chunks: 3,
                    ..ReplicaPeer::default()
                },
                ReplicaPeer {
                    volume: "v".into(),
                    peer: "10.0.0.3:7800".into(),
                    state: ReplicaPeerState::SplitBrain,
                    ..ReplicaPeer::default()
                },
            ],
            ..StorageStatus::default()
        };
        let back = StorageStatus::try_from(pb::StorageStatus::from(status.clone())).unwrap();
        assert_eq!(back, status);
        let verify = VolumeVerify {
            name: "v".into(),
            chunk_size: 65536,
            peers: vec![
                PeerVerify {
                    peer: "10.0.0.2:7800".into(),
                    checked_chunks: 256,
                    out_of_sync: 2,
                    out_of_sync_chunks: vec![3, 77],
                    repaired: 2,
                    ..PeerVerify::default()
                },
                PeerVerify {
                    peer: "10.0.0.3:7800".into(),
                    error: Some("away".into()),
                    ..PeerVerify::default()
                },
            ],
        };
        assert_eq!(
            VolumeVerify::from(pb::VolumeVerify::from(verify.clone())),
            verify
        );
        assert!(
            VerifyVolume::try_from(pb::VerifyVolumeRequest {
                name: String::new(),
                ..Default::default()
            })
            .is_err()
        );
        let attach = AttachVolume {
            name: "vol".into(),
            role: VolumeRole::Primary,
            epoch: 4,
            peers: vec!["10.0.0.2:7800".into()],
            allow_outdate: true,
            protocol: None,
            force: true,
        };
        assert_eq!(
            AttachVolume::try_from(pb::AttachVolumeRequest::from(attach.clone())).unwrap(),
            attach
        );
        for p in [
            ReplicationProtocol::A,
            ReplicationProtocol::B,
            ReplicationProtocol::C,
        ] {
            let with = AttachVolume {
                protocol: Some(p),
                ..attach.clone()
            };
            assert_eq!(
                AttachVolume::try_from(pb::AttachVolumeRequest::from(with.clone())).unwrap(),
                with
            );
        }
        let unknown = pb::AttachVolumeRequest {
            protocol: 9,
            ..pb::AttachVolumeRequest::from(attach.clone())
        };
        assert!(matches!(
            AttachVolume::try_from(unknown),
            Err(ApiError::InvalidArgument { field, .. }) if field == "protocol"
        ));
        for p in [
            ReplicationProtocol::A,
            ReplicationProtocol::B,
            ReplicationProtocol::C,
        ] {
            let code: i32 = pb::ReplicationProtocol::from(p).into();
            assert_eq!(replication_protocol(code, "protocol").unwrap(), p);
        }
        assert_eq!(
            replication_protocol(0, "protocol").unwrap(),
            ReplicationProtocol::C
        );
        match replication_protocol(9, "protocol") {
            Err(e) => assert!(e.to_string().contains("protocol"), "{e}"),
            Ok(p) => panic!("protocol 9 accepted: {p:?}"),
        }
        let unspecified = pb::AttachVolumeRequest {
            role: pb::VolumeRole::Unspecified.into(),
            ..pb::AttachVolumeRequest::from(attach.clone())
        };
        assert!(matches!(
            AttachVolume::try_from(unspecified),
            Err(ApiError::InvalidArgument { field, .. }) if field == "role"
        ));
        let bad_peer = pb::AttachVolumeRequest {
            peers: vec!["nowhere".into()],
            ..pb::AttachVolumeRequest::from(attach)
        };
        assert!(matches!(
            AttachVolume::try_from(bad_peer),
            Err(ApiError::InvalidArgument { field, .. }) if field == "peers[0]"
        ));
        let attached = VolumeAttachment {
            name: "vol".into(),
            role: VolumeRole::Secondary,
            epoch: 4,
            peers: status.replicas.clone(),
            protocol: ReplicationProtocol::B,
        };
        assert_eq!(
            VolumeAttachment::try_from(pb::VolumeAttachment::from(attached.clone())).unwrap(),
            attached
        );
        let export = VolumeExport {
            host: "127.0.0.1".into(),
            port: 10809,
            export_name: "vol".into(),
            unix_socket: None,
        };
        assert_eq!(
            VolumeExport::try_from(pb::VolumeExport::from(export.clone())).unwrap(),
            export
        );
        assert_eq!(export.uri(), "nbd://127.0.0.1:10809/vol");
        let bad = pb::VolumeExport {
            port: 70000,
            ..pb::VolumeExport::from(export)
        };
        assert!(matches!(
            VolumeExport::try_from(bad),
            Err(ApiError::InvalidArgument { field, .. }) if field == "export.port"
        ));
    }
}
