//! [`ObjectMeta`] and [`Condition`] ⇄ protobuf.

use crate::pb;
use crate::{Condition, ObjectMeta};

impl From<ObjectMeta> for pb::ObjectMeta {
    fn from(meta: ObjectMeta) -> Self {
        Self {
            name: meta.name,
            uid: meta.uid,
            labels: meta.labels,
            resource_version: meta.resource_version,
            generation: meta.generation,
            created_at_unix_ms: meta.created_at_unix_ms,
        }
    }
}

/// Shape only: the owning object's `validate` checks the values.
impl From<pb::ObjectMeta> for ObjectMeta {
    fn from(meta: pb::ObjectMeta) -> Self {
        Self {
            name: meta.name,
            uid: meta.uid,
            labels: meta.labels,
            resource_version: meta.resource_version,
            generation: meta.generation,
            created_at_unix_ms: meta.created_at_unix_ms,
        }
    }
}

impl From<Condition> for pb::Condition {
    fn from(condition: Condition) -> Self {
        Self {
            r#type: condition.kind,
            status: condition.status,
            reason: condition.reason,
            message: condition.message,
            last_transition_unix_ms: condition.last_transition_unix_ms,
        }
    }
}

impl From<pb::Condition> for Condition {
    fn from(condition: pb::Condition) -> Self {
        Self {
            kind: condition.r#type,
            status: condition.status,
            reason: condition.reason,
            message: condition.message,
            last_transition_unix_ms: condition.last_transition_unix_ms,
        }
    }
}
