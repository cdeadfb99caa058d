//! [`ObjectMeta`], carried by every stored object, and [`Condition`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::validate;
use crate::ApiError;

/// Identity and versioning of a stored object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectMeta {
    /// Unique within its kind; a DNS label.
    pub name: String,
    /// Assigned by the control plane on create; never reused.
    pub uid: String,
    /// Free-form labels; node selectors match against node labels.
    pub labels: BTreeMap<String, String>,
    /// Raft log index of the object's last change: the compare-and-swap token.
    pub resource_version: u64,
    /// Bumped on every spec change, not on status changes.
    pub generation: u64,
    /// When the object was first stored (Unix milliseconds).
    pub created_at_unix_ms: u64,
}

impl ObjectMeta {
    /// Metadata for a new object: just a name.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Checks the name and the labels.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate::name("meta.name", &self.name)?;
        validate::labels("meta.labels", &self.labels)
    }

    /// The node an operator's label `key` (`EPOCH/NODE`, e.g.
    /// [`crate::Vm::ACCEPT_COPY_LABEL`]) names, when its epoch is
    /// `epoch`.
    pub fn epoch_node_label(&self, key: &str, epoch: u64) -> Option<&str> {
        let (at, node) = self.labels.get(key)?.split_once('/')?;
        (at.parse::<u64>().ok()? == epoch && !node.is_empty()).then_some(node)
    }

    /// Whether label `key` (an epoch, e.g.
    /// [`crate::Placement::FORCED_COPY_LABEL`]) holds `epoch`.
    pub fn epoch_label_is(&self, key: &str, epoch: u64) -> bool {
        self.labels
            .get(key)
            .is_some_and(|v| v.parse::<u64>().ok() == Some(epoch))
    }
}

/// One observed aspect of an object's state, e.g. `Ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Condition {
    /// What the condition is about, e.g. [`Condition::READY`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether it holds.
    pub status: bool,
    /// Machine-readable CamelCase reason for the last transition.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// When `status` last changed (Unix milliseconds).
    pub last_transition_unix_ms: u64,
}

impl Condition {
    /// The condition type a node or VM reports when it is ready.
    pub const READY: &str = "Ready";

    /// Checks the type and the reason. `field` is the condition's path.
    pub fn validate(&self, field: &str) -> Result<(), ApiError> {
        validate::identifier(&format!("{field}.type"), &self.kind)?;
        if !self.reason.is_empty() {
            validate::identifier(&format!("{field}.reason"), &self.reason)?;
        }
        Ok(())
    }
}

/// Checks a list of conditions at `field`: each valid, no type twice.
pub(crate) fn validate_conditions(field: &str, conditions: &[Condition]) -> Result<(), ApiError> {
    for (i, condition) in conditions.iter().enumerate() {
        let at = format!("{field}[{i}]");
        condition.validate(&at)?;
        if conditions[..i].iter().any(|c| c.kind == condition.kind) {
            return Err(ApiError::invalid(
                format!("{at}.type"),
                format!("condition {:?} appears twice", condition.kind),
            ));
        }
    }
    Ok(())
}

/// Finds the condition of type `kind`.
pub(crate) fn find_condition<'a>(conditions: &'a [Condition], kind: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.kind == kind)
}
