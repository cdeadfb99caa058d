//! [`Placement`] ⇄ protobuf.

use super::required;
use crate::pb;
use crate::{ApiError, Placement};

impl From<Placement> for pb::Placement {
    fn from(placement: Placement) -> Self {
        Self {
            meta: Some(placement.meta.into()),
            vm: placement.vm,
            node: placement.node,
            epoch: placement.epoch,
            replica_nodes: placement.replica_nodes,
        }
    }
}

impl TryFrom<pb::Placement> for Placement {
    type Error = ApiError;

    fn try_from(placement: pb::Placement) -> Result<Self, ApiError> {
        let placement = Placement {
            meta: required(placement.meta, "placement.meta")?.into(),
            vm: placement.vm,
            node: placement.node,
            epoch: placement.epoch,
            replica_nodes: placement.replica_nodes,
        };
        placement.validate()?;
        Ok(placement)
    }
}
