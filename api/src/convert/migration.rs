//! [`Migration`] ⇄ protobuf.

use std::net::SocketAddrV4;

use super::{enum_value, required};
use crate::pb;
use crate::{ApiError, Migration, MigrationPhase, MigrationSpec, MigrationStatus, TrackedFlow};

impl From<Migration> for pb::Migration {
    fn from(migration: Migration) -> Self {
        let Migration { meta, spec, status } = migration;
        Self {
            meta: Some(meta.into()),
            spec: Some(pb::MigrationSpec {
                vm: spec.vm,
                target: spec.target.unwrap_or_default(),
                post_copy: spec.post_copy,
                timeout_seconds: spec.timeout_seconds,
                bandwidth_mib_s: spec.bandwidth_mib_s,
                start_timeout_seconds: spec.start_timeout_seconds,
            }),
            status: Some(pb::MigrationStatus {
                phase: pb::MigrationPhase::from(status.phase).into(),
                source: status.source,
                target: status.target,
                epoch: status.epoch,
                message: status.message,
                data_total: status.data_total,
                data_processed: status.data_processed,
                data_remaining: status.data_remaining,
                post_copy_active: status.post_copy_active,
                started_at_unix_ms: status.started_at_unix_ms,
                finished_at_unix_ms: status.finished_at_unix_ms,
                flows: status.flows.into_iter().map(Into::into).collect(),
            }),
        }
    }
}

impl From<TrackedFlow> for pb::TrackedFlow {
    fn from(flow: TrackedFlow) -> Self {
        Self {
            source_ip: flow.source.ip().to_string(),
            source_port: flow.source.port().into(),
            destination_ip: flow.destination.ip().to_string(),
            destination_port: flow.destination.port().into(),
            protocol: flow.protocol.into(),
        }
    }
}

/// `flow`, the `index`th of `status.flows`, checked field by field.
fn tracked_flow(flow: pb::TrackedFlow, index: usize) -> Result<TrackedFlow, ApiError> {
    let field = |name: &str| format!("status.flows[{index}].{name}");
    let ip = |text: &str, name: &str| {
        text.parse::<std::net::Ipv4Addr>()
            .map_err(|_| ApiError::invalid(field(name), format!("{text:?} is not an IPv4 address")))
    };
    let port = |value: u32, name: &str| {
        u16::try_from(value).map_err(|_| ApiError::invalid(field(name), "at most 65535"))
    };
    Ok(TrackedFlow {
        source: SocketAddrV4::new(
            ip(&flow.source_ip, "source_ip")?,
            port(flow.source_port, "source_port")?,
        ),
        destination: SocketAddrV4::new(
            ip(&flow.destination_ip, "destination_ip")?,
            port(flow.destination_port, "destination_port")?,
        ),
        protocol: u8::try_from(flow.protocol)
            .map_err(|_| ApiError::invalid(field("protocol"), "at most 255"))?,
    })
}

impl TryFrom<pb::Migration> for Migration {
    type Error = ApiError;

    fn try_from(migration: pb::Migration) -> Result<Self, ApiError> {
        let spec = required(migration.spec, "migration.spec")?;
        let status = migration.status.unwrap_or_default();
        let phase: pb::MigrationPhase = enum_value(status.phase, "status.phase")?;
        let migration = Migration {
            meta: required(migration.meta, "migration.meta")?.into(),
            spec: MigrationSpec {
                vm: spec.vm,
                target: Some(spec.target).filter(|t| !t.is_empty()),
                post_copy: spec.post_copy,
                timeout_seconds: spec.timeout_seconds,
                bandwidth_mib_s: spec.bandwidth_mib_s,
                start_timeout_seconds: spec.start_timeout_seconds,
            },
            status: MigrationStatus {
                phase: phase.into(),
                source: status.source,
                target: status.target,
                epoch: status.epoch,
                message: status.message,
                data_total: status.data_total,
                data_processed: status.data_processed,
                data_remaining: status.data_remaining,
                post_copy_active: status.post_copy_active,
                started_at_unix_ms: status.started_at_unix_ms,
                finished_at_unix_ms: status.finished_at_unix_ms,
                flows: status
                    .flows
                    .into_iter()
                    .enumerate()
                    .map(|(i, flow)| tracked_flow(flow, i))
                    .collect::<Result<_, _>>()?,
            },
        };
        migration.validate()?;
        Ok(migration)
    }
}

impl From<MigrationPhase> for pb::MigrationPhase {
    fn from(phase: MigrationPhase) -> Self {
        match phase {
            MigrationPhase::Pending => pb::MigrationPhase::Pending,
            MigrationPhase::Preparing => pb::MigrationPhase::Preparing,
            MigrationPhase::TargetReady => pb::MigrationPhase::TargetReady,
            MigrationPhase::Migrating => pb::MigrationPhase::Migrating,
            MigrationPhase::Switching => pb::MigrationPhase::Switching,
            MigrationPhase::Succeeded => pb::MigrationPhase::Succeeded,
            MigrationPhase::Failed => pb::MigrationPhase::Failed,
        }
    }
}

impl From<pb::MigrationPhase> for MigrationPhase {
    fn from(phase: pb::MigrationPhase) -> Self {
        match phase {
            pb::MigrationPhase::Unspecified | pb::MigrationPhase::Pending => {
                MigrationPhase::Pending
            }
            pb::MigrationPhase::Preparing => MigrationPhase::Preparing,
            pb::MigrationPhase::TargetReady => MigrationPhase::TargetReady,
            pb::MigrationPhase::Migrating => MigrationPhase::Migrating,
            pb::MigrationPhase::Switching => MigrationPhase::Switching,
            pb::MigrationPhase::Succeeded => MigrationPhase::Succeeded,
            pb::MigrationPhase::Failed => MigrationPhase::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ObjectMeta;

    #[test]
    fn a_migration_round_trips() {
        let migration = Migration {
            meta: ObjectMeta::named("web"),
            spec: MigrationSpec {
                vm: "web".into(),
                target: None,
                post_copy: true,
                timeout_seconds: 30,
                bandwidth_mib_s: 64,
                start_timeout_seconds: 600,
            },
            status: MigrationStatus {
                phase: MigrationPhase::Migrating,
                source: "n1".into(),
                target: "n2".into(),
                epoch: 3,
                data_remaining: 1 << 20,
                flows: vec![TrackedFlow {
                    source: "10.77.0.3:40312".parse().unwrap(),
                    destination: "10.77.0.10:9".parse().unwrap(),
                    protocol: 6,
                }],
                ..MigrationStatus::default()
            },
        };
        let wire = pb::Migration::from(migration.clone());
        assert_eq!(Migration::try_from(wire).unwrap(), migration);

        let mut bad = pb::Migration::from(migration.clone());
        if let Some(status) = &mut bad.status {
            status.flows[0].destination_port = 70_000;
        }
        assert!(matches!(
            Migration::try_from(bad),
            Err(ApiError::InvalidArgument { field, .. }) if field == "status.flows[0].destination_port"
        ));

        let mut bad = pb::Migration::from(migration);
        if let Some(status) = &mut bad.status {
            status.phase = 99;
        }
        assert!(matches!(
            Migration::try_from(bad),
            Err(ApiError::InvalidArgument { field, .. }) if field == "status.phase"
        ));
    }
}
