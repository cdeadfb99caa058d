//! [`Node`] ⇄ protobuf.

use super::required;
use crate::pb;
use crate::{ApiError, Node, NodeSpec, NodeStatus, Resources};

impl From<Node> for pb::Node {
    fn from(node: Node) -> Self {
        Self {
            meta: Some(node.meta.into()),
            spec: Some(pb::NodeSpec {
                address: node.spec.address,
                cordoned: node.spec.cordoned,
            }),
            status: Some(pb::NodeStatus {
                capacity: Some(node.status.capacity.into()),
                allocatable: Some(node.status.allocatable.into()),
                conditions: node.status.conditions.into_iter().map(Into::into).collect(),
                last_heartbeat_unix_ms: node.status.last_heartbeat_unix_ms,
                credential_sha256: node.status.credential_sha256,
                replication_address: node.status.replication_address,
            }),
        }
    }
}

/// Requires `meta` and `spec`; an unset `status` is an empty one.
impl TryFrom<pb::Node> for Node {
    type Error = ApiError;

    fn try_from(node: pb::Node) -> Result<Self, ApiError> {
        let spec = required(node.spec, "node.spec")?;
        let status = node.status.unwrap_or_default();
        let node = Node {
            meta: required(node.meta, "node.meta")?.into(),
            spec: NodeSpec {
                address: spec.address,
                cordoned: spec.cordoned,
            },
            status: NodeStatus {
                capacity: status.capacity.map(Into::into).unwrap_or_default(),
                allocatable: status.allocatable.map(Into::into).unwrap_or_default(),
                conditions: status.conditions.into_iter().map(Into::into).collect(),
                last_heartbeat_unix_ms: status.last_heartbeat_unix_ms,
                credential_sha256: status.credential_sha256,
                replication_address: status.replication_address,
            },
        };
        node.validate()?;
        Ok(node)
    }
}

impl From<Resources> for pb::Resources {
    fn from(resources: Resources) -> Self {
        Self {
            cpus: resources.cpus,
            memory_mib: resources.memory_mib,
            storage_bytes: resources.storage_bytes,
        }
    }
}

impl From<pb::Resources> for Resources {
    fn from(resources: pb::Resources) -> Self {
        Self {
            cpus: resources.cpus,
            memory_mib: resources.memory_mib,
            storage_bytes: resources.storage_bytes,
        }
    }
}
