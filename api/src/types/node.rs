//! [`Node`]: a cluster member that runs storage, network and compute.

use serde::{Deserialize, Serialize};

use super::meta::{find_condition, validate_conditions};
use super::{Condition, ObjectMeta, validate};
use crate::ApiError;

/// A cluster member. Created by the agent's registration; `status` is
/// kept by the control plane from heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Node {
    /// Name, labels (matched by VM node selectors) and versions.
    pub meta: ObjectMeta,
    /// What the operator declares.
    pub spec: NodeSpec,
    /// What the control plane observed.
    pub status: NodeStatus,
}

/// What the operator declares about a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSpec {
    /// Where the node's agent is reachable ("host:port").
    pub address: String,
    /// A cordoned node keeps its VMs but gets no new placements.
    pub cordoned: bool,
}

/// An amount of CPU, memory and storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    /// Logical CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Storage-pool bytes.
    pub storage_bytes: u64,
}

impl Resources {
    /// Whether every amount in `other` fits in `self`.
    pub fn fits(&self, other: &Resources) -> bool {
        other.cpus <= self.cpus
            && other.memory_mib <= self.memory_mib
            && other.storage_bytes <= self.storage_bytes
    }
}

/// What the control plane observed about a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeStatus {
    /// What the hardware has.
    pub capacity: Resources,
    /// What is left for VMs after the node's own reservations.
    pub allocatable: Resources,
    /// Observed conditions, including [`Condition::READY`].
    pub conditions: Vec<Condition>,
    /// When the last heartbeat was acknowledged (Unix milliseconds).
    pub last_heartbeat_unix_ms: u64,
    /// Hex SHA-256 of the node credential issued at the node's last
    /// registration with a join token; set by the control plane only.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub credential_sha256: String,
    /// Where this node's storage process accepts replication links from
    /// primaries (`host:port`); written by the node's agent, empty when
    /// the node takes no replicas.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub replication_address: String,
}

impl NodeStatus {
    /// Whether the node reports a true `Ready` condition.
    pub fn is_ready(&self) -> bool {
        find_condition(&self.conditions, Condition::READY).is_some_and(|c| c.status)
    }
}

impl Node {
    /// A label on a node asking the control plane to move the copies of
    /// its standalone volumes to other nodes (`basalt node drain` sets it,
    /// `basalt node uncordon` clears it): each is moved as `basalt volume
    /// move` does, a copy added elsewhere and filled before this one goes.
    pub const EVACUATE_LABEL: &str = "basalt.io/evacuate";

    /// Whether the node asks its standalone volumes' copies off it
    /// ([`Node::EVACUATE_LABEL`]).
    pub fn is_evacuating(&self) -> bool {
        self.meta
            .labels
            .get(Self::EVACUATE_LABEL)
            .is_some_and(|v| v == "true")
    }

    /// Checks every field; errors name the field's path, e.g. `spec.address`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        validate::address("spec.address", &self.spec.address)?;
        if !self.status.replication_address.is_empty() {
            validate::address(
                "status.replication_address",
                &self.status.replication_address,
            )?;
        }
        if !self.status.capacity.fits(&self.status.allocatable) {
            return Err(ApiError::invalid(
                "status.allocatable",
                "must not exceed status.capacity",
            ));
        }
        validate_conditions("status.conditions", &self.status.conditions)
    }
}
