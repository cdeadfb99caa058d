//! [`Placement`]: the scheduler's decision of which node runs a VM.

use serde::{Deserialize, Serialize};

use super::{ObjectMeta, validate};
use crate::ApiError;

/// Which node runs a VM. Written by the scheduler with compare-and-swap;
/// the agent on `node` runs `vm`. Named after the VM: one per VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Placement {
    /// Name and versions.
    pub meta: ObjectMeta,
    /// Name of the placed VM.
    pub vm: String,
    /// Name of the node that runs it.
    pub node: String,
    /// Fencing epoch: grows every time the VM moves; data paths reject
    /// writes that carry an older one. It is also the epoch of the VM's
    /// replicated volumes: it grows exactly when the primary moves.
    pub epoch: u64,
    /// The nodes holding a replica of the VM's replicated disks (disks
    /// with `replicas` of 2 or more), `node` among them; chosen at the
    /// first placement and kept when the VM moves, which it may only do
    /// onto one of these nodes. Empty when the VM has no replicated disk.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replica_nodes: Vec<String>,
}

impl Placement {
    /// A label on a placement asking its node to stop the VM so the
    /// control plane can move it elsewhere (a cold move: drain,
    /// decommission). The node's agent keeps the domain stopped while the
    /// label is set; once the VM reports `Stopped` there, the control plane
    /// rewrites the placement to another node with `epoch + 1` and without
    /// the label.
    pub const EVICT_LABEL: &str = "basalt.io/evict";

    /// Whether the placement asks its node to stop the VM for a move
    /// ([`Placement::EVICT_LABEL`]).
    pub fn is_evicting(&self) -> bool {
        self.meta
            .labels
            .get(Self::EVICT_LABEL)
            .is_some_and(|v| v == "true")
    }

    /// A label the control plane sets on a placement it moved onto copies
    /// an operator accepted as they are ([`crate::Vm::ACCEPT_COPY_LABEL`]):
    /// the placement's new epoch. The node's agent then attaches those
    /// copies as primaries with force, which a copy whose fill did not
    /// finish needs. A later move leaves the old value behind, which no
    /// longer matches the epoch.
    pub const FORCED_COPY_LABEL: &str = "basalt.io/forced-copy";

    /// Whether the node may start the VM on its copies as they are
    /// ([`Placement::FORCED_COPY_LABEL`] at this placement's epoch).
    pub fn forces_copy(&self) -> bool {
        self.meta
            .epoch_label_is(Self::FORCED_COPY_LABEL, self.epoch)
    }

    /// Whether the VM's disks have replicas on `node` (as primary or
    /// secondary).
    pub fn holds_replica(&self, node: &str) -> bool {
        self.replica_nodes.iter().any(|n| n == node)
    }

    /// Checks every field; errors name the field's path, e.g. `node`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        validate::name("vm", &self.vm)?;
        validate::name("node", &self.node)?;
        for (i, replica) in self.replica_nodes.iter().enumerate() {
            let field = format!("replica_nodes[{i}]");
            validate::name(&field, replica)?;
            if self.replica_nodes[..i].contains(replica) {
                return Err(ApiError::invalid(
                    field,
                    format!("{replica:?} is listed twice"),
                ));
            }
        }
        if !self.replica_nodes.is_empty() && !self.holds_replica(&self.node) {
            return Err(ApiError::invalid(
                "replica_nodes",
                format!("must include the placement's node {:?}", self.node),
            ));
        }
        // One placement per VM, named after it: a second one for the same
        // VM cannot exist, so a VM is never placed on two nodes.
        if self.meta.name != self.vm {
            return Err(ApiError::invalid(
                "meta.name",
                format!("a placement is named after its VM ({:?})", self.vm),
            ));
        }
        Ok(())
    }
}
