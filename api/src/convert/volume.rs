//! [`Volume`] and [`VolumeReport`] ⇄ protobuf.

use super::{enum_value, required};
use crate::pb;
use crate::{
    ApiError, ReplicaReport, ReplicaState, ReplicationProtocol, Volume, VolumeOwner, VolumeReplica,
    VolumeReport, VolumeSource, VolumeSpec, VolumeStatus,
};

fn state_to_pb(state: ReplicaState) -> i32 {
    match state {
        ReplicaState::Unknown => pb::ReplicaState::Unknown,
        ReplicaState::UpToDate => pb::ReplicaState::UpToDate,
        ReplicaState::Syncing => pb::ReplicaState::Syncing,
        ReplicaState::Away => pb::ReplicaState::Away,
        ReplicaState::Outdated => pb::ReplicaState::Outdated,
        ReplicaState::DiskFailed => pb::ReplicaState::DiskFailed,
        ReplicaState::SplitBrain => pb::ReplicaState::SplitBrain,
    }
    .into()
}

fn state_from_pb(value: i32, field: &str) -> Result<ReplicaState, ApiError> {
    Ok(match enum_value::<pb::ReplicaState>(value, field)? {
        pb::ReplicaState::Unspecified | pb::ReplicaState::Unknown => ReplicaState::Unknown,
        pb::ReplicaState::UpToDate => ReplicaState::UpToDate,
        pb::ReplicaState::Syncing => ReplicaState::Syncing,
        pb::ReplicaState::Away => ReplicaState::Away,
        pb::ReplicaState::Outdated => ReplicaState::Outdated,
        pb::ReplicaState::DiskFailed => ReplicaState::DiskFailed,
        pb::ReplicaState::SplitBrain => ReplicaState::SplitBrain,
    })
}

impl From<Volume> for pb::Volume {
    fn from(volume: Volume) -> Self {
        let spec = volume.spec;
        let status = volume.status;
        Self {
            meta: Some(volume.meta.into()),
            spec: Some(pb::VolumeSpec {
                size_bytes: spec.size_bytes,
                replicas: spec.replicas,
                image: spec.image,
                owner: spec.owner.map(|o| pb::VolumeOwner {
                    vm: o.vm,
                    vm_uid: o.vm_uid,
                    disk: o.disk,
                    attached: o.attached,
                }),
                source: spec.source.map(|s| pb::VolumeSource {
                    volume: s.volume,
                    snapshot: s.snapshot,
                }),
                protocol: spec.protocol.as_str().to_owned(),
                nodes: spec.nodes,
            }),
            status: Some(pb::VolumeStatus {
                storage_name: status.storage_name,
                epoch: status.epoch,
                primary_node: status.primary_node,
                replicas: status
                    .replicas
                    .into_iter()
                    .map(|r| pb::VolumeReplica {
                        node: r.node,
                        state: state_to_pb(r.state),
                        primary: r.primary,
                        outdated: r.outdated,
                        sync_done_bytes: r.sync_done_bytes,
                        sync_total_bytes: r.sync_total_bytes,
                        dirty_bytes: r.dirty_bytes,
                        last_error: r.last_error,
                        node_state: r
                            .node_state
                            .map_or(pb::ReplicaState::Unspecified.into(), state_to_pb),
                        node_error: r.node_error,
                        outdated_after_version: r.outdated_after_version,
                    })
                    .collect(),
                conditions: status.conditions.into_iter().map(Into::into).collect(),
            }),
        }
    }
}

impl TryFrom<pb::Volume> for Volume {
    type Error = ApiError;

    fn try_from(volume: pb::Volume) -> Result<Self, ApiError> {
        let spec = required(volume.spec, "volume.spec")?;
        let status = volume.status.unwrap_or_default();
        let replicas = status
            .replicas
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                Ok(VolumeReplica {
                    node: r.node,
                    state: state_from_pb(r.state, &format!("status.replicas[{i}].state"))?,
                    primary: r.primary,
                    outdated: r.outdated,
                    sync_done_bytes: r.sync_done_bytes,
                    sync_total_bytes: r.sync_total_bytes,
                    dirty_bytes: r.dirty_bytes,
                    last_error: r.last_error,
                    node_state: match r.node_state {
                        0 => None,
                        state => Some(state_from_pb(
                            state,
                            &format!("status.replicas[{i}].node_state"),
                        )?),
                    },
                    node_error: r.node_error,
                    outdated_after_version: r.outdated_after_version,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        let volume = Volume {
            meta: required(volume.meta, "volume.meta")?.into(),
            spec: VolumeSpec {
                size_bytes: spec.size_bytes,
                replicas: spec.replicas,
                image: spec.image,
                owner: spec.owner.map(|o| VolumeOwner {
                    vm: o.vm,
                    vm_uid: o.vm_uid,
                    disk: o.disk,
                    attached: o.attached,
                }),
                source: spec.source.map(|s| VolumeSource {
                    volume: s.volume,
                    snapshot: s.snapshot,
                }),
                protocol: ReplicationProtocol::parse("spec.protocol", &spec.protocol)?,
                nodes: spec.nodes,
            },
            status: VolumeStatus {
                storage_name: status.storage_name,
                epoch: status.epoch,
                primary_node: status.primary_node,
                replicas,
                conditions: status.conditions.into_iter().map(Into::into).collect(),
            },
        };
        volume.validate()?;
        Ok(volume)
    }
}

fn report_to_pb(report: ReplicaReport) -> pb::ReplicaReport {
    pb::ReplicaReport {
        address: report.address,
        state: state_to_pb(report.state),
        sync_done_bytes: report.sync_done_bytes,
        sync_total_bytes: report.sync_total_bytes,
        dirty_bytes: report.dirty_bytes,
        last_error: report.last_error,
    }
}

fn report_from_pb(report: pb::ReplicaReport, at: &str) -> Result<ReplicaReport, ApiError> {
    Ok(ReplicaReport {
        address: report.address,
        state: state_from_pb(report.state, &format!("{at}.state"))?,
        sync_done_bytes: report.sync_done_bytes,
        sync_total_bytes: report.sync_total_bytes,
        dirty_bytes: report.dirty_bytes,
        last_error: report.last_error,
    })
}

impl From<VolumeReport> for pb::ReportVolumeRequest {
    fn from(report: VolumeReport) -> Self {
        Self {
            node: report.node,
            storage_name: report.storage_name,
            local: Some(report_to_pb(report.local)),
            peers: report.peers.into_iter().map(report_to_pb).collect(),
            seen_version: report.seen_version,
        }
    }
}

impl TryFrom<pb::ReportVolumeRequest> for VolumeReport {
    type Error = ApiError;

    fn try_from(request: pb::ReportVolumeRequest) -> Result<Self, ApiError> {
        let report = VolumeReport {
            node: request.node,
            storage_name: request.storage_name,
            local: report_from_pb(required(request.local, "local")?, "local")?,
            peers: request
                .peers
                .into_iter()
                .enumerate()
                .map(|(i, p)| report_from_pb(p, &format!("peers[{i}]")))
                .collect::<Result<_, _>>()?,
            seen_version: request.seen_version,
        };
        report.validate()?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ObjectMeta;

    #[test]
    fn volumes_round_trip_and_bad_states_name_their_field() {
        let volume = Volume {
            meta: ObjectMeta::named("web-root"),
            spec: VolumeSpec {
                size_bytes: 1 << 20,
                replicas: 2,
                image: None,
                owner: Some(VolumeOwner {
                    vm: "web".into(),
                    vm_uid: "u1".into(),
                    disk: "root".into(),
                    attached: true,
                }),
                source: None,
                protocol: ReplicationProtocol::A,
                nodes: Vec::new(),
            },
            status: VolumeStatus {
                storage_name: "x".into(),
                epoch: 3,
                primary_node: "a".into(),
                replicas: vec![
                    VolumeReplica {
                        node: "a".into(),
                        state: ReplicaState::UpToDate,
                        primary: true,
                        ..VolumeReplica::default()
                    },
                    VolumeReplica {
                        node: "b".into(),
                        state: ReplicaState::Outdated,
                        outdated: true,
                        dirty_bytes: 4096,
                        last_error: "gone".into(),
                        node_state: Some(ReplicaState::UpToDate),
                        outdated_after_version: 41,
                        ..VolumeReplica::default()
                    },
                ],
                conditions: Vec::new(),
            },
        };
        let back = Volume::try_from(pb::Volume::from(volume.clone())).unwrap();
        assert_eq!(back, volume);
        let mut named = volume.clone();
        named.spec.owner = None;
        named.spec.nodes = vec!["b".into(), "a".into()];
        assert_eq!(
            Volume::try_from(pb::Volume::from(named.clone())).unwrap(),
            named
        );
        let mut wire = pb::Volume::from(volume);
        wire.status.as_mut().unwrap().replicas[1].state = 99;
        assert!(matches!(
            Volume::try_from(wire),
            Err(ApiError::InvalidArgument { field, .. }) if field == "status.replicas[1].state"
        ));
        let mut wire = pb::Volume::from(back);
        assert_eq!(wire.spec.as_ref().unwrap().protocol, "A");
        wire.spec.as_mut().unwrap().protocol = "D".into();
        assert!(matches!(
            Volume::try_from(wire.clone()),
            Err(ApiError::InvalidArgument { field, .. }) if field == "spec.protocol"
        ));
        wire.spec.as_mut().unwrap().protocol = String::new();
        let unset = Volume::try_from(wire).unwrap();
        assert_eq!(unset.spec.protocol, ReplicationProtocol::C);
    }

    #[test]
    fn reports_round_trip() {
        let report = VolumeReport {
            node: "a".into(),
            storage_name: "x".into(),
            local: ReplicaReport {
                state: ReplicaState::UpToDate,
                ..ReplicaReport::default()
            },
            peers: vec![ReplicaReport {
                address: "127.0.0.1:7410".into(),
                state: ReplicaState::Syncing,
                sync_done_bytes: 1,
                sync_total_bytes: 2,
                ..ReplicaReport::default()
            }],
            seen_version: 17,
        };
        let back = VolumeReport::try_from(pb::ReportVolumeRequest::from(report.clone())).unwrap();
        assert_eq!(back, report);
        let mut wire = pb::ReportVolumeRequest::from(report);
        wire.local = None;
        assert!(matches!(
            VolumeReport::try_from(wire),
            Err(ApiError::InvalidArgument { field, .. }) if field == "local"
        ));
    }
}
