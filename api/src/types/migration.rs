//! [`Migration`]: a request to move one running VM live to another node,
//! and the progress of that move.
//!
//! One per VM at a time: a migration is named after its VM. The user
//! writes the spec; the control plane's migration controller and the two
//! agents write the status, each only in the phases it owns (see
//! `basalt_control::migration` for the state machine).

use std::fmt;
use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use super::{ObjectMeta, validate};
use crate::ApiError;

/// How long pre-copy may run when the spec says 0.
pub const DEFAULT_MIGRATION_TIMEOUT_SECONDS: u32 = 120;
/// The longest pre-copy timeout accepted (a day).
pub const MAX_MIGRATION_TIMEOUT_SECONDS: u32 = 86_400;
/// How long a migration may stay pending when the spec says 0 (an hour).
pub const DEFAULT_MIGRATION_START_TIMEOUT_SECONDS: u32 = 3_600;
/// The longest time to start accepted (a week).
pub const MAX_MIGRATION_START_TIMEOUT_SECONDS: u32 = 7 * 86_400;
/// The most tracked flows a migration's status carries.
pub const MAX_MIGRATION_FLOWS: usize = 4096;

/// A live migration of one VM. See the module doc.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Migration {
    /// Name (the VM's) and versions.
    pub meta: ObjectMeta,
    /// What the user asked for.
    pub spec: MigrationSpec,
    /// What happened so far.
    pub status: MigrationStatus,
}

/// What the user asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationSpec {
    /// The VM to move.
    pub vm: String,
    /// The node to move it to; `None` lets the scheduler choose.
    pub target: Option<String>,
    /// Switch to post-copy when pre-copy has not converged within the
    /// timeout, instead of aborting.
    pub post_copy: bool,
    /// How long pre-copy may run, in seconds (0:
    /// [`DEFAULT_MIGRATION_TIMEOUT_SECONDS`]).
    pub timeout_seconds: u32,
    /// Cap on the copy's bandwidth in MiB/s (the guest's memory and any
    /// disk copied with it), passed to the hypervisor's migration; 0: no
    /// cap.
    pub bandwidth_mib_s: u32,
    /// How long the migration may stay pending (waiting for a target's
    /// disk copies to fill), in seconds from its creation, before it
    /// fails (0: [`DEFAULT_MIGRATION_START_TIMEOUT_SECONDS`]).
    pub start_timeout_seconds: u32,
}

impl MigrationSpec {
    /// The largest bandwidth cap accepted, MiB/s (1 TiB/s: beyond any
    /// link).
    pub const MAX_BANDWIDTH_MIB_S: u32 = 1 << 20;

    /// The pre-copy timeout with the default applied.
    pub fn timeout(&self) -> std::time::Duration {
        seconds_or(self.timeout_seconds, DEFAULT_MIGRATION_TIMEOUT_SECONDS)
    }

    /// How long the migration may stay pending, with the default applied.
    pub fn start_timeout(&self) -> std::time::Duration {
        seconds_or(
            self.start_timeout_seconds,
            DEFAULT_MIGRATION_START_TIMEOUT_SECONDS,
        )
    }
}

/// `seconds`, or `default` when it is 0.
fn seconds_or(seconds: u32, default: u32) -> std::time::Duration {
    let seconds = if seconds == 0 { default } else { seconds };
    std::time::Duration::from_secs(u64::from(seconds))
}

/// Where a migration is. The order is the order of a successful one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MigrationPhase {
    /// Requested; no target chosen yet.
    #[default]
    Pending,
    /// The target node is preparing to receive the VM.
    Preparing,
    /// The target is ready; the source may start copying.
    TargetReady,
    /// The source's hypervisor is copying the VM.
    Migrating,
    /// The VM runs on the target; the placement moves next.
    Switching,
    /// The VM runs on the target and is placed there.
    Succeeded,
    /// Aborted or refused: the VM stays where it was (see the message).
    Failed,
}

impl MigrationPhase {
    /// Whether the migration is over (succeeded or failed).
    pub fn is_terminal(self) -> bool {
        matches!(self, MigrationPhase::Succeeded | MigrationPhase::Failed)
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What the control plane and the agents report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationStatus {
    /// Where the migration is.
    pub phase: MigrationPhase,
    /// The node the VM ran on when the migration started.
    pub source: String,
    /// The node it moves to.
    pub target: String,
    /// The placement's epoch when the migration started; the move sets
    /// `epoch + 1`.
    pub epoch: u64,
    /// Why it failed, or what it does now.
    pub message: String,
    /// Bytes to copy in total, as the hypervisor last reported.
    pub data_total: u64,
    /// Bytes copied so far.
    pub data_processed: u64,
    /// Bytes still to copy.
    pub data_remaining: u64,
    /// The copy switched to post-copy.
    pub post_copy_active: bool,
    /// When the control plane accepted it (Unix ms; 0 while pending).
    pub started_at_unix_ms: u64,
    /// When it ended (Unix ms; 0 while running).
    pub finished_at_unix_ms: u64,
    /// The VM's open flows as the source's connection tracking holds them
    /// (written by the source while it copies, at most
    /// [`MAX_MIGRATION_FLOWS`]): the target seeds its own with them, so
    /// stateful policy keeps them open after the move.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flows: Vec<TrackedFlow>,
}

/// One connection-tracking entry: a flow as first seen (`source` started
/// it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackedFlow {
    /// Who sent the flow's first packet.
    pub source: SocketAddrV4,
    /// To whom.
    pub destination: SocketAddrV4,
    /// The IP protocol number (6 TCP, 17 UDP, 1 ICMP).
    pub protocol: u8,
}

impl Migration {
    /// A label a drain sets on the migrations it asks for: the drained
    /// node. `basalt node uncordon` cancels those that have not started.
    pub const DRAIN_LABEL: &str = "basalt.io/drain";

    /// The node whose drain asked for this migration
    /// ([`Migration::DRAIN_LABEL`]).
    pub fn drained_node(&self) -> Option<&str> {
        self.meta.labels.get(Self::DRAIN_LABEL).map(String::as_str)
    }

    /// Checks every field; errors name the field's path, e.g. `spec.vm`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        validate::name("spec.vm", &self.spec.vm)?;
        if self.meta.name != self.spec.vm {
            return Err(ApiError::invalid(
                "meta.name",
                format!("a migration is named after its VM ({:?})", self.spec.vm),
            ));
        }
        if let Some(target) = &self.spec.target {
            validate::name("spec.target", target)?;
        }
        if self.spec.timeout_seconds > MAX_MIGRATION_TIMEOUT_SECONDS {
            return Err(ApiError::invalid(
                "spec.timeout_seconds",
                format!("at most {MAX_MIGRATION_TIMEOUT_SECONDS}"),
            ));
        }
        if self.spec.start_timeout_seconds > MAX_MIGRATION_START_TIMEOUT_SECONDS {
            return Err(ApiError::invalid(
                "spec.start_timeout_seconds",
                format!("at most {MAX_MIGRATION_START_TIMEOUT_SECONDS} (0: the default)"),
            ));
        }
        if self.spec.bandwidth_mib_s > MigrationSpec::MAX_BANDWIDTH_MIB_S {
            return Err(ApiError::invalid(
                "spec.bandwidth_mib_s",
                format!(
                    "at most {} MiB/s (0: no cap)",
                    MigrationSpec::MAX_BANDWIDTH_MIB_S
                ),
            ));
        }
        for (field, node) in [
            ("status.source", &self.status.source),
            ("status.target", &self.status.target),
        ] {
            if !node.is_empty() {
                validate::name(field, node)?;
            }
        }
        if self.status.flows.len() > MAX_MIGRATION_FLOWS {
            return Err(ApiError::invalid(
                "status.flows",
                format!("at most {MAX_MIGRATION_FLOWS} flows"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration() -> Migration {
        Migration {
            meta: ObjectMeta::named("web"),
            spec: MigrationSpec {
                vm: "web".into(),
                target: Some("n2".into()),
                post_copy: false,
                timeout_seconds: 0,
                bandwidth_mib_s: 0,
                start_timeout_seconds: 0,
            },
            status: MigrationStatus::default(),
        }
    }

    #[test]
    fn fields_are_checked_by_name() {
        migration().validate().unwrap();
        let field = |m: Migration| match m.validate() {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        };
        let mut m = migration();
        m.meta.name = "other".into();
        assert_eq!(field(m), "meta.name");
        let mut m = migration();
        m.spec.target = Some("Not A Name".into());
        assert_eq!(field(m), "spec.target");
        let mut m = migration();
        m.spec.timeout_seconds = MAX_MIGRATION_TIMEOUT_SECONDS + 1;
        assert_eq!(field(m), "spec.timeout_seconds");
        let mut m = migration();
        m.spec.bandwidth_mib_s = MigrationSpec::MAX_BANDWIDTH_MIB_S + 1;
        assert_eq!(field(m), "spec.bandwidth_mib_s");
        let mut m = migration();
        m.spec.start_timeout_seconds = MAX_MIGRATION_START_TIMEOUT_SECONDS + 1;
        assert_eq!(field(m), "spec.start_timeout_seconds");
        assert_eq!(
            migration().spec.start_timeout(),
            std::time::Duration::from_secs(DEFAULT_MIGRATION_START_TIMEOUT_SECONDS.into())
        );
        let mut m = migration();
        m.spec.bandwidth_mib_s = 64;
        m.validate().unwrap();
        assert_eq!(
            migration().spec.timeout(),
            std::time::Duration::from_secs(u64::from(DEFAULT_MIGRATION_TIMEOUT_SECONDS))
        );
    }
}
