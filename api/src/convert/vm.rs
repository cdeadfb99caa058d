//! [`Vm`] ⇄ protobuf.

use super::{enum_value, parse_ip, required};
use crate::pb;
use crate::{
    ApiError, CloudInit, Disk, KernelBoot, Nic, NicAddress, PlacementRules, ReplicationProtocol,
    Vm, VmPhase, VmSpec, VmStatus,
};

impl From<Vm> for pb::Vm {
    fn from(vm: Vm) -> Self {
        Self {
            meta: Some(vm.meta.into()),
            spec: Some(vm.spec.into()),
            status: Some(vm.status.into()),
        }
    }
}

/// Requires `meta` and `spec`; an unset `status` is an empty one.
impl TryFrom<pb::Vm> for Vm {
    type Error = ApiError;

    fn try_from(vm: pb::Vm) -> Result<Self, ApiError> {
        let vm = Vm {
            meta: required(vm.meta, "vm.meta")?.into(),
            spec: required(vm.spec, "vm.spec")?.try_into()?,
            status: vm.status.unwrap_or_default().try_into()?,
        };
        vm.validate()?;
        Ok(vm)
    }
}

impl From<VmSpec> for pb::VmSpec {
    fn from(spec: VmSpec) -> Self {
        Self {
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            running: spec.running,
            disks: spec.disks.into_iter().map(Into::into).collect(),
            nics: spec
                .nics
                .into_iter()
                .map(|nic| pb::Nic {
                    network: nic.network,
                    mac: nic.mac,
                    ip: nic.ip.map(|ip| ip.to_string()),
                })
                .collect(),
            placement: Some(pb::PlacementRules {
                node_selector: spec.placement.node_selector,
                anti_affinity_group: spec.placement.anti_affinity_group,
            }),
            kernel: spec.kernel.map(|k| pb::KernelBoot {
                kernel: k.kernel,
                initrd: k.initrd,
                cmdline: k.cmdline,
            }),
            cloud_init: spec.cloud_init.map(|c| pb::CloudInit {
                user_data: c.user_data,
                network_config: c.network_config,
                ssh_authorized_keys: c.ssh_authorized_keys,
            }),
        }
    }
}

impl TryFrom<pb::VmSpec> for VmSpec {
    type Error = ApiError;

    fn try_from(spec: pb::VmSpec) -> Result<Self, ApiError> {
        let placement = spec.placement.unwrap_or_default();
        Ok(VmSpec {
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            running: spec.running,
            disks: spec
                .disks
                .into_iter()
                .enumerate()
                .map(|(i, disk)| disk_from_pb(i, disk))
                .collect::<Result<_, ApiError>>()?,
            nics: spec
                .nics
                .into_iter()
                .enumerate()
                .map(|(i, nic)| {
                    Ok(Nic {
                        network: nic.network,
                        mac: nic.mac,
                        ip: parse_ip(nic.ip, &format!("spec.nics[{i}].ip"))?,
                    })
                })
                .collect::<Result<_, ApiError>>()?,
            placement: PlacementRules {
                node_selector: placement.node_selector,
                anti_affinity_group: placement.anti_affinity_group,
            },
            kernel: spec.kernel.map(|k| KernelBoot {
                kernel: k.kernel,
                initrd: k.initrd,
                cmdline: k.cmdline,
            }),
            cloud_init: spec.cloud_init.map(|c| CloudInit {
                user_data: c.user_data,
                network_config: c.network_config,
                ssh_authorized_keys: c.ssh_authorized_keys,
            }),
        })
    }
}

impl From<Disk> for pb::Disk {
    fn from(disk: Disk) -> Self {
        Self {
            name: disk.name,
            size_bytes: disk.size_bytes,
            image: disk.image,
            replicas: disk.replicas,
            source_volume: disk.source_volume,
            protocol: disk.protocol.as_str().to_owned(),
            attach: disk.attach,
            attached_storage_name: disk.attached_storage_name,
            added_at_epoch: disk.added_at_epoch,
        }
    }
}

/// `spec.disks[i]` from the wire; a protocol other than A, B, C or empty
/// is `INVALID_ARGUMENT` naming `spec.disks[i].protocol`.
fn disk_from_pb(i: usize, disk: pb::Disk) -> Result<Disk, ApiError> {
    Ok(Disk {
        name: disk.name,
        size_bytes: disk.size_bytes,
        image: disk.image,
        replicas: disk.replicas,
        source_volume: disk.source_volume,
        protocol: ReplicationProtocol::parse(&format!("spec.disks[{i}].protocol"), &disk.protocol)?,
        attach: disk.attach,
        attached_storage_name: disk.attached_storage_name,
        added_at_epoch: disk.added_at_epoch,
    })
}

impl From<VmStatus> for pb::VmStatus {
    fn from(status: VmStatus) -> Self {
        Self {
            phase: pb::VmPhase::from(status.phase).into(),
            node: status.node,
            observed_generation: status.observed_generation,
            conditions: status.conditions.into_iter().map(Into::into).collect(),
            nic_addresses: status
                .nic_addresses
                .into_iter()
                .map(|address| pb::NicAddress {
                    index: address.index,
                    mac: address.mac,
                    ip: address.ip.map(|ip| ip.to_string()),
                })
                .collect(),
            outdated_replicas: status.outdated_replicas,
            plugged_volumes: status.plugged_volumes,
        }
    }
}

/// Shape only: the owner (a [`Vm`] or a status report) validates.
impl TryFrom<pb::VmStatus> for VmStatus {
    type Error = ApiError;

    fn try_from(status: pb::VmStatus) -> Result<Self, ApiError> {
        let phase: pb::VmPhase = enum_value(status.phase, "status.phase")?;
        Ok(VmStatus {
            phase: phase.into(),
            node: status.node,
            observed_generation: status.observed_generation,
            conditions: status.conditions.into_iter().map(Into::into).collect(),
            nic_addresses: status
                .nic_addresses
                .into_iter()
                .enumerate()
                .map(|(i, address)| {
                    Ok(NicAddress {
                        index: address.index,
                        mac: address.mac,
                        ip: parse_ip(address.ip, &format!("status.nic_addresses[{i}].ip"))?,
                    })
                })
                .collect::<Result<_, ApiError>>()?,
            outdated_replicas: status.outdated_replicas,
            plugged_volumes: status.plugged_volumes,
        })
    }
}

impl From<VmPhase> for pb::VmPhase {
    fn from(phase: VmPhase) -> Self {
        match phase {
            VmPhase::Pending => pb::VmPhase::Pending,
            VmPhase::Scheduled => pb::VmPhase::Scheduled,
            VmPhase::Starting => pb::VmPhase::Starting,
            VmPhase::Running => pb::VmPhase::Running,
            VmPhase::Stopping => pb::VmPhase::Stopping,
            VmPhase::Stopped => pb::VmPhase::Stopped,
            VmPhase::Migrating => pb::VmPhase::Migrating,
            VmPhase::Failed => pb::VmPhase::Failed,
        }
    }
}

/// `UNSPECIFIED` (what an unset field decodes to) is `Pending`.
impl From<pb::VmPhase> for VmPhase {
    fn from(phase: pb::VmPhase) -> Self {
        match phase {
            pb::VmPhase::Unspecified | pb::VmPhase::Pending => VmPhase::Pending,
            pb::VmPhase::Scheduled => VmPhase::Scheduled,
            pb::VmPhase::Starting => VmPhase::Starting,
            pb::VmPhase::Running => VmPhase::Running,
            pb::VmPhase::Stopping => VmPhase::Stopping,
            pb::VmPhase::Stopped => VmPhase::Stopped,
            pb::VmPhase::Migrating => VmPhase::Migrating,
            pb::VmPhase::Failed => VmPhase::Failed,
        }
    }
}
