//! The agent service's messages ⇄ protobuf.

use std::time::Duration;

use super::required;
use crate::pb;
use crate::{
    ApiError, Heartbeat, HeartbeatAck, Registered, Registration, ReplicaMark, StatusReport,
    TokenSecret,
};

impl From<Registration> for pb::RegisterRequest {
    fn from(registration: Registration) -> Self {
        Self {
            token: registration.token.expose().to_owned(),
            node_name: registration.node_name,
            address: registration.address,
            capacity: Some(registration.capacity.into()),
            node_credential: registration
                .node_credential
                .map(|c| c.expose().to_owned())
                .unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::RegisterRequest> for Registration {
    type Error = ApiError;

    fn try_from(request: pb::RegisterRequest) -> Result<Self, ApiError> {
        let registration = Registration {
            token: TokenSecret::new(request.token),
            node_name: request.node_name,
            address: request.address,
            capacity: required(request.capacity, "capacity")?.into(),
            node_credential: (!request.node_credential.is_empty())
                .then(|| TokenSecret::new(request.node_credential)),
        };
        registration.validate()?;
        Ok(registration)
    }
}

/// Durations go on the wire in whole seconds (lease) and milliseconds
/// (interval), saturating at `u32::MAX`.
impl From<Registered> for pb::RegisterResponse {
    fn from(registered: Registered) -> Self {
        Self {
            node_uid: registered.node_uid,
            lease_seconds: saturate(registered.lease.as_secs()),
            heartbeat_interval_ms: saturate(registered.heartbeat_interval.as_millis()),
            node_credential: registered
                .node_credential
                .map(|c| c.expose().to_owned())
                .unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::RegisterResponse> for Registered {
    type Error = ApiError;

    fn try_from(response: pb::RegisterResponse) -> Result<Self, ApiError> {
        if response.node_uid.is_empty() {
            return Err(ApiError::missing("node_uid"));
        }
        if response.lease_seconds == 0 {
            return Err(ApiError::invalid("lease_seconds", "must be at least 1"));
        }
        if response.heartbeat_interval_ms == 0 {
            return Err(ApiError::invalid(
                "heartbeat_interval_ms",
                "must be at least 1",
            ));
        }
        Ok(Registered {
            node_uid: response.node_uid,
            lease: Duration::from_secs(response.lease_seconds.into()),
            heartbeat_interval: Duration::from_millis(response.heartbeat_interval_ms.into()),
            node_credential: (!response.node_credential.is_empty())
                .then(|| TokenSecret::new(response.node_credential)),
        })
    }
}

fn saturate(value: impl TryInto<u32>) -> u32 {
    value.try_into().unwrap_or(u32::MAX)
}

impl From<Heartbeat> for pb::HeartbeatRequest {
    fn from(heartbeat: Heartbeat) -> Self {
        Self {
            node: heartbeat.node,
            node_uid: heartbeat.node_uid,
            allocatable: heartbeat.allocatable.map(Into::into),
        }
    }
}

impl TryFrom<pb::HeartbeatRequest> for Heartbeat {
    type Error = ApiError;

    fn try_from(request: pb::HeartbeatRequest) -> Result<Self, ApiError> {
        let heartbeat = Heartbeat {
            node: request.node,
            node_uid: request.node_uid,
            allocatable: request.allocatable.map(Into::into),
        };
        heartbeat.validate()?;
        Ok(heartbeat)
    }
}

impl From<HeartbeatAck> for pb::HeartbeatResponse {
    fn from(ack: HeartbeatAck) -> Self {
        Self {
            lease_expires_at_unix_ms: ack.lease_expires_at_unix_ms,
            acknowledged: ack.acknowledged,
        }
    }
}

impl From<pb::HeartbeatResponse> for HeartbeatAck {
    fn from(response: pb::HeartbeatResponse) -> Self {
        Self {
            lease_expires_at_unix_ms: response.lease_expires_at_unix_ms,
            acknowledged: response.acknowledged,
        }
    }
}

impl From<StatusReport> for pb::ReportStatusRequest {
    fn from(report: StatusReport) -> Self {
        Self {
            node: report.node,
            vm: report.vm,
            status: Some(report.status.into()),
        }
    }
}

impl TryFrom<pb::ReportStatusRequest> for StatusReport {
    type Error = ApiError;

    fn try_from(request: pb::ReportStatusRequest) -> Result<Self, ApiError> {
        let report = StatusReport {
            node: request.node,
            vm: request.vm,
            status: required(request.status, "status")?.try_into()?,
        };
        report.validate()?;
        Ok(report)
    }
}

impl From<ReplicaMark> for pb::MarkReplicaRequest {
    fn from(mark: ReplicaMark) -> Self {
        Self {
            node: mark.node,
            vm: mark.vm,
            replica_node: mark.replica_node,
            epoch: mark.epoch,
            outdated: mark.outdated,
        }
    }
}

impl TryFrom<pb::MarkReplicaRequest> for ReplicaMark {
    type Error = ApiError;

    fn try_from(request: pb::MarkReplicaRequest) -> Result<Self, ApiError> {
        let mark = Self {
            node: request.node,
            vm: request.vm,
            replica_node: request.replica_node,
            epoch: request.epoch,
            outdated: request.outdated,
        };
        mark.validate()?;
        Ok(mark)
    }
}
