//! The messages of the agent service: registration, heartbeats, status reports.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Resources, TokenSecret, VmStatus, validate};
use crate::ApiError;

/// A node agent asking to join the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// A join token's secret; may be empty when `node_credential` is set.
    pub token: TokenSecret,
    /// The node's name; a DNS label.
    pub node_name: String,
    /// Where the agent is reachable ("host:port").
    pub address: String,
    /// What the node's hardware has.
    pub capacity: Resources,
    /// The credential an earlier registration of this node returned: it
    /// registers the node again without a join token.
    pub node_credential: Option<TokenSecret>,
}

impl Registration {
    /// Checks every field; errors name it, e.g. `node_name`.
    pub fn validate(&self) -> Result<(), ApiError> {
        let no_credential = self
            .node_credential
            .as_ref()
            .is_none_or(|c| c.expose().is_empty());
        if self.token.expose().is_empty() && no_credential {
            return Err(ApiError::invalid(
                "token",
                "must not be empty without a node_credential",
            ));
        }
        validate::name("node_name", &self.node_name)?;
        validate::address("address", &self.address)
    }
}

/// The control plane's answer to a [`Registration`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The node's uid; heartbeats carry it.
    pub node_uid: String,
    /// How long a lease lasts after an acknowledged heartbeat (whole seconds).
    pub lease: Duration,
    /// How often to heartbeat (whole milliseconds).
    pub heartbeat_interval: Duration,
    /// A new node credential, issued when the node registered with a join
    /// token; `None` when it registered with its credential (still valid).
    pub node_credential: Option<TokenSecret>,
}

/// A node agent's periodic proof of life.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node's name.
    pub node: String,
    /// The uid [`Registered`] gave; a heartbeat from a replaced node is refused.
    pub node_uid: String,
    /// What is left for VMs now, when the agent knows it.
    pub allocatable: Option<Resources>,
}

impl Heartbeat {
    /// Checks every field; errors name it, e.g. `node`.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate::name("node", &self.node)?;
        if self.node_uid.is_empty() {
            return Err(ApiError::invalid("node_uid", "must not be empty"));
        }
        Ok(())
    }
}

/// The control plane's answer to a [`Heartbeat`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// When the node's lease ends unless renewed (Unix milliseconds).
    pub lease_expires_at_unix_ms: u64,
    /// False when the control plane did not renew the lease (e.g. it is not
    /// the leader yet); the agent keeps its fencing timer running.
    pub acknowledged: bool,
}

/// What a node agent observed about one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The reporting node.
    pub node: String,
    /// The VM's name.
    pub vm: String,
    /// The VM's observed status.
    pub status: VmStatus,
}

impl StatusReport {
    /// Checks every field; NIC indexes are checked against the VM's spec by
    /// the control plane, which has the spec.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate::name("node", &self.node)?;
        validate::name("vm", &self.vm)?;
        self.status.validate(None)
    }
}

/// The agent of a VM's node (the primary of its replicated disks) asks the
/// control plane to record the copy on `replica_node` outdated (the
/// primary lost it and goes on without it) or in sync again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMark {
    /// The asking node: the VM's node.
    pub node: String,
    /// The VM.
    pub vm: String,
    /// The node whose copy is marked.
    pub replica_node: String,
    /// The asking primary's epoch (the placement's).
    pub epoch: u64,
    /// Outdated (true) or in sync again (false).
    pub outdated: bool,
}

impl ReplicaMark {
    /// Checks every field; errors name it, e.g. `replica_node`.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate::name("node", &self.node)?;
        validate::name("vm", &self.vm)?;
        validate::name("replica_node", &self.replica_node)?;
        if self.replica_node == self.node {
            return Err(ApiError::invalid(
                "replica_node",
                "the asking node marks another node's copy, not its own",
            ));
        }
        if self.epoch == 0 {
            return Err(ApiError::invalid("epoch", "a primary's epoch is 1 or more"));
        }
        Ok(())
    }
}
