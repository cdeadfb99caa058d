//! [`Vm`]: a virtual machine, as the user declared it and as agents observed it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::meta::{find_condition, validate_conditions};
use super::{Condition, ObjectMeta, validate};
use crate::{ApiError, ReplicationProtocol};

/// The smallest memory a VM may have, in MiB.
pub const MIN_VM_MEMORY_MIB: u64 = 16;
/// The most replicas a disk may have.
pub const MAX_DISK_REPLICAS: u32 = 5;
/// Disk sizes are whole sectors of this many bytes.
pub const DISK_SECTOR_BYTES: u64 = 512;

/// A virtual machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Vm {
    /// Name, labels and versions.
    pub meta: ObjectMeta,
    /// What the user declares.
    pub spec: VmSpec,
    /// What the agents and controllers observed.
    pub status: VmStatus,
}

/// What the user declares about a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmSpec {
    /// Virtual CPUs (at least 1).
    pub cpus: u32,
    /// Memory in MiB (at least [`MIN_VM_MEMORY_MIB`]).
    pub memory_mib: u64,
    /// Desired power state.
    pub running: bool,
    /// Disks, in boot order.
    pub disks: Vec<Disk>,
    /// Network interfaces, in PCI order.
    pub nics: Vec<Nic>,
    /// Where the VM may run.
    pub placement: PlacementRules,
    /// Direct kernel boot; the first disk boots when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelBoot>,
    /// A cloud-init NoCloud seed for the guest; none when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
}

/// The most bytes `user_data` (and `network_config`) may hold.
pub const MAX_CLOUD_INIT_DOCUMENT_BYTES: usize = 64 << 10;
/// The most SSH keys a cloud-init section may carry.
pub const MAX_SSH_KEYS: usize = 64;
/// The longest SSH public key line accepted (an 16 kbit RSA key fits).
pub const MAX_SSH_KEY_BYTES: usize = 16 << 10;

/// What a guest's cloud-init reads from its NoCloud seed (a small ISO 9660
/// volume labelled `cidata`, attached read-only). The seed's `meta-data`
/// always says `instance-id` = the VM's uid and `local-hostname` = its
/// name; the rest comes from here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudInit {
    /// The seed's `user-data`, as is (`#cloud-config`, a `#!` script,
    /// ...); when empty, a `#cloud-config` that installs
    /// `ssh_authorized_keys` is written instead.
    pub user_data: String,
    /// The seed's `network-config` (cloud-init's network config, v1 or
    /// v2); the file is left out when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
    /// OpenSSH public key lines (`ssh-ed25519 AAAA... comment`) for the
    /// default user, given in `meta-data` as `public-keys`.
    pub ssh_authorized_keys: Vec<String>,
}

/// The SSH key types cloud-init's guests accept in `authorized_keys`.
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

impl CloudInit {
    fn validate(&self) -> Result<(), ApiError> {
        document("spec.cloud_init.user_data", &self.user_data)?;
        if let Some(config) = &self.network_config {
            document("spec.cloud_init.network_config", config)?;
            if config.trim().is_empty() {
                return Err(ApiError::invalid(
                    "spec.cloud_init.network_config",
                    "must not be empty when set",
                ));
            }
        }
        if self.ssh_authorized_keys.len() > MAX_SSH_KEYS {
            return Err(ApiError::invalid(
                "spec.cloud_init.ssh_authorized_keys",
                format!("at most {MAX_SSH_KEYS} keys"),
            ));
        }
        for (i, key) in self.ssh_authorized_keys.iter().enumerate() {
            if let Err(reason) = check_ssh_key(key) {
                return Err(ApiError::invalid(
                    format!("spec.cloud_init.ssh_authorized_keys[{i}]"),
                    reason,
                ));
            }
        }
        Ok(())
    }
}

/// A seed file's text: at most [`MAX_CLOUD_INIT_DOCUMENT_BYTES`], no NUL.
fn document(field: &str, text: &str) -> Result<(), ApiError> {
    if text.len() > MAX_CLOUD_INIT_DOCUMENT_BYTES {
        return Err(ApiError::invalid(
            field,
            format!(
                "is {} bytes, more than {MAX_CLOUD_INIT_DOCUMENT_BYTES}",
                text.len()
            ),
        ));
    }
    if text.contains('\0') {
        return Err(ApiError::invalid(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// Checks an OpenSSH public key line: `TYPE BASE64 [COMMENT]`, one line,
/// a known type, and a key blob that decodes and names the same type.
fn check_ssh_key(line: &str) -> Result<(), String> {
    if line.len() > MAX_SSH_KEY_BYTES {
        return Err(format!("longer than {MAX_SSH_KEY_BYTES} bytes"));
    }
    if line.contains(['\n', '\r', '\0']) {
        return Err("must be one line".into());
    }
    let not_a_key = || {
        let shown: String = line.chars().take(40).collect();
        format!("{shown:?} is not an SSH public key line like \"ssh-ed25519 AAAA... comment\"")
    };
    let mut parts = line.split_ascii_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(not_a_key());
    };
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "{}; key type {kind:?} is not one of {}",
            not_a_key(),
            SSH_KEY_TYPES.join(", ")
        ));
    }
    let Some(bytes) = decode_base64(blob) else {
        return Err(format!("{}: its key is not base64", not_a_key()));
    };
    // The blob starts with the type as an SSH string (u32 length + bytes).
    let named = bytes
        .get(..4)
        .map(|len| u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize)
        .and_then(|len| bytes.get(4..4 + len));
    if named != Some(kind.as_bytes()) {
        return Err(format!("{}: its key blob is not a {kind} key", not_a_key()));
    }
    Ok(())
}

/// Standard base64 with padding, as OpenSSH writes keys.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let value = |b: u8| -> Option<u32> {
        Some(match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let last = bytes.len() / 4 - 1;
    for (i, quad) in bytes.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|b| **b == b'=').count();
        if pad > 2 || (pad > 0 && i != last) {
            return None;
        }
        let mut n = 0u32;
        for &b in &quad[..4 - pad] {
            n = (n << 6) | value(b)?;
        }
        n <<= 6 * pad as u32;
        let [_, a, b, c] = n.to_be_bytes();
        out.extend_from_slice(&[a, b, c][..3 - pad]);
    }
    Some(out)
}

/// A kernel (and initrd) that every node has at the same path, booted
/// directly: how the test guest and appliance-style VMs start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelBoot {
    /// Absolute path of the kernel image.
    pub kernel: String,
    /// Absolute path of the initrd; none when empty.
    pub initrd: String,
    /// The kernel command line.
    pub cmdline: String,
}

impl KernelBoot {
    fn validate(&self) -> Result<(), ApiError> {
        if !self.kernel.starts_with('/') {
            return Err(ApiError::invalid(
                "spec.kernel.kernel",
                "must be an absolute path",
            ));
        }
        if !self.initrd.is_empty() && !self.initrd.starts_with('/') {
            return Err(ApiError::invalid(
                "spec.kernel.initrd",
                "must be an absolute path or empty",
            ));
        }
        if self.cmdline.len() > 4096 || self.cmdline.contains(['\0', '\n']) {
            return Err(ApiError::invalid(
                "spec.kernel.cmdline",
                "must be one line of at most 4096 bytes",
            ));
        }
        Ok(())
    }
}

/// A VM disk: a replicated volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Disk {
    /// Unique within the VM; a DNS label.
    pub name: String,
    /// Size in bytes, a multiple of [`DISK_SECTOR_BYTES`].
    pub size_bytes: u64,
    /// Image to clone the disk from; an empty disk when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Number of replicas (1 to [`MAX_DISK_REPLICAS`]).
    pub replicas: u32,
    /// The volume (standalone, snapshot or clone) the disk is a
    /// copy-on-write clone of, made in the pool of the node holding that
    /// volume's primary copy, where the VM is then placed. Exclusive with
    /// `image`; a `size_bytes` of 0 takes the source's size. Only when the
    /// VM is created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_volume: Option<String>,
    /// When the disk's primary acknowledges a write (C by default): copied
    /// into the disk's volume, whose every copy's agent attaches with it.
    #[serde(skip_serializing_if = "ReplicationProtocol::is_c")]
    pub protocol: ReplicationProtocol,
    /// An existing volume (standalone or a clone, not a snapshot, on no
    /// other VM) that *is* the disk: the VM is placed on its primary copy's
    /// node with its copies' nodes as its replica nodes, and the volume
    /// outlives the VM (released, not deleted). Exclusive with `image` and
    /// `source_volume`; `size_bytes` and `replicas` of 0 take the volume's.
    /// Only when the VM is created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
    /// Set by the control plane when the VM is created: the pool name of
    /// the attached volume, which the nodes use for the disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached_storage_name: Option<String>,
    /// Set by the control plane when an update adds the disk to a VM
    /// already placed: the placement's epoch then. The VM's node makes the
    /// disk's volume at that epoch (not only at the first); at a later one
    /// a missing volume has its data elsewhere and is not made afresh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_at_epoch: Option<u64>,
}

/// A VM network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Nic {
    /// Name of the network it is attached to.
    pub network: String,
    /// A unicast MAC, "aa:bb:cc:dd:ee:ff"; generated when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// A static address request; leased from the network when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
}

/// Where a VM may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementRules {
    /// Only nodes whose labels contain all these pairs qualify.
    pub node_selector: BTreeMap<String, String>,
    /// VMs of one group run on distinct nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anti_affinity_group: Option<String>,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmPhase {
    /// Stored, not yet placed.
    #[default]
    Pending,
    /// Placed on a node that has not started it yet.
    Scheduled,
    /// Its node is preparing volumes, NICs and the domain.
    Starting,
    /// The guest runs.
    Running,
    /// Shutting down.
    Stopping,
    /// Defined but not running.
    Stopped,
    /// Moving to another node.
    Migrating,
    /// Could not be run; see the conditions.
    Failed,
}

impl fmt::Display for VmPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What the agents and controllers observed about a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmStatus {
    /// Where the VM is in its life.
    pub phase: VmPhase,
    /// The node it is placed on, when placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The spec generation this status describes.
    pub observed_generation: u64,
    /// Observed conditions, including [`Condition::READY`].
    pub conditions: Vec<Condition>,
    /// The addresses the NICs were given.
    pub nic_addresses: Vec<NicAddress>,
    /// Replica nodes whose copy of the VM's replicated disks missed
    /// acknowledged writes: its primary went on without them, after the
    /// control plane recorded them here (the storage fence). The VM is
    /// never moved onto one of them until its primary reports the copy in
    /// sync again. Written by the control plane only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outdated_replicas: Vec<String>,
    /// The pool names of the disks the running guest has, as its node's
    /// hypervisor shows them (empty while it is not running): a disk
    /// removed from the spec stays listed until the guest let go of it.
    /// Written by the VM's node.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugged_volumes: Vec<String>,
}

impl VmStatus {
    /// Whether the VM reports a true `Ready` condition.
    pub fn is_ready(&self) -> bool {
        find_condition(&self.conditions, Condition::READY).is_some_and(|c| c.status)
    }

    /// Whether the VM's copy on `node` is recorded outdated.
    pub fn is_outdated_on(&self, node: &str) -> bool {
        self.outdated_replicas.iter().any(|n| n == node)
    }
}

/// The address a NIC was given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NicAddress {
    /// Index of the NIC in `spec.nics`.
    pub index: u32,
    /// Its MAC.
    pub mac: String,
    /// Its leased address, once leased.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
}

impl Vm {
    /// A label by which an operator lets the control plane start the VM
    /// on one replica node's disk copies as they are, though the primary's
    /// last report had them still filling (what DRBD's `primary --force`
    /// does): `EPOCH/NODE`, good only while the VM's placement is at
    /// `EPOCH`, so it is spent by the move it allows
    /// (`basalt vm accept-copy`).
    pub const ACCEPT_COPY_LABEL: &str = "basalt.io/accept-copy";

    /// The node whose copies the operator accepted as they are, for the
    /// placement at `epoch` ([`Vm::ACCEPT_COPY_LABEL`]).
    pub fn accepted_copy(&self, epoch: u64) -> Option<&str> {
        self.meta.epoch_node_label(Self::ACCEPT_COPY_LABEL, epoch)
    }

    /// Checks every field; errors name the field's path, e.g. `spec.memory_mib`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        self.spec.validate()?;
        self.status.validate(Some(self.spec.nics.len()))
    }
}

impl VmSpec {
    /// How many copies of its replicated disks the VM asks for: the
    /// largest `replicas` over its disks, or 0 when no disk asks for 2 or
    /// more (its disks are then local volumes of the node it runs on).
    pub fn replicas_wanted(&self) -> usize {
        let most = self.disks.iter().map(|d| d.replicas).max().unwrap_or(0);
        if most >= 2 {
            usize::try_from(most).unwrap_or(usize::MAX)
        } else {
            0
        }
    }

    fn validate(&self) -> Result<(), ApiError> {
        if self.cpus < 1 {
            return Err(ApiError::invalid("spec.cpus", "must be at least 1"));
        }
        if self.memory_mib < MIN_VM_MEMORY_MIB {
            return Err(ApiError::invalid(
                "spec.memory_mib",
                format!("must be at least {MIN_VM_MEMORY_MIB}"),
            ));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let at = format!("spec.disks[{i}]");
            disk.validate(&at)?;
            if self.disks[..i].iter().any(|d| d.name == disk.name) {
                return Err(ApiError::invalid(
                    format!("{at}.name"),
                    format!("disk {:?} appears twice", disk.name),
                ));
            }
        }
        for (i, nic) in self.nics.iter().enumerate() {
            nic.validate(&format!("spec.nics[{i}]"))?;
        }
        validate::labels(
            "spec.placement.node_selector",
            &self.placement.node_selector,
        )?;
        if let Some(group) = &self.placement.anti_affinity_group {
            validate::name("spec.placement.anti_affinity_group", group)?;
        }
        if let Some(kernel) = &self.kernel {
            kernel.validate()?;
        }
        if let Some(cloud_init) = &self.cloud_init {
            cloud_init.validate()?;
        }
        Ok(())
    }
}

impl Disk {
    /// The name of this disk's volume in the pools of the nodes holding
    /// it: the attached volume's, or one derived from the VM's uid and the
    /// disk's name ([`crate::disk_storage_name`]).
    pub fn storage_name(&self, vm_uid: &str) -> String {
        match &self.attached_storage_name {
            Some(name) if !name.is_empty() => name.clone(),
            _ => crate::disk_storage_name(vm_uid, &self.name),
        }
    }

    fn validate(&self, field: &str) -> Result<(), ApiError> {
        validate::name(&format!("{field}.name"), &self.name)?;
        // A disk made from a volume, or that is one, may leave its size to
        // the volume's.
        let sized = self.size_bytes > 0 || self.source_volume.is_some() || self.attach.is_some();
        if !sized || !self.size_bytes.is_multiple_of(DISK_SECTOR_BYTES) {
            return Err(ApiError::invalid(
                format!("{field}.size_bytes"),
                format!("must be a positive multiple of {DISK_SECTOR_BYTES}"),
            ));
        }
        if let Some(image) = &self.image {
            validate::name(&format!("{field}.image"), image)?;
        }
        if let Some(volume) = &self.source_volume {
            validate::name(&format!("{field}.source_volume"), volume)?;
            if self.image.is_some() {
                return Err(ApiError::invalid(
                    format!("{field}.source_volume"),
                    "a disk is made from an image or from a volume, not both",
                ));
            }
        }
        if let Some(volume) = &self.attach {
            validate::name(&format!("{field}.attach"), volume)?;
            if self.image.is_some() || self.source_volume.is_some() {
                return Err(ApiError::invalid(
                    format!("{field}.attach"),
                    "an attached volume is the disk: it is not made from an image or a volume",
                ));
            }
        } else if self.attached_storage_name.is_some() {
            return Err(ApiError::invalid(
                format!("{field}.attached_storage_name"),
                "set by the control plane, only for a disk that attaches a volume",
            ));
        }
        // An attached volume's disk may leave its copies to the volume's.
        let copies_left = self.attach.is_some() && self.replicas == 0;
        if !copies_left && !(1..=MAX_DISK_REPLICAS).contains(&self.replicas) {
            return Err(ApiError::invalid(
                format!("{field}.replicas"),
                format!("must be 1 to {MAX_DISK_REPLICAS}"),
            ));
        }
        Ok(())
    }
}

impl Nic {
    /// The MAC of NIC `index` of the VM with uid `vm_uid` when its spec
    /// names none: QEMU's prefix `52:54:00` and three bytes of the VM's
    /// UUID (its uid when that is a UUID, else a name-based one), the
    /// index in the last byte's high bits so a VM's NICs never collide.
    /// The one value for the domain's NIC, the endpoint object and the
    /// datapath; stable for the VM's life, on every node.
    pub fn default_mac(vm_uid: &str, index: usize) -> [u8; 6] {
        let uuid = uuid::Uuid::parse_str(vm_uid)
            .unwrap_or_else(|_| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, vm_uid.as_bytes()));
        let b = uuid.as_bytes();
        let last = b[15] ^ ((index as u8) << 5);
        [0x52, 0x54, 0x00, b[13], b[14], last]
    }

    fn validate(&self, field: &str) -> Result<(), ApiError> {
        validate::name(&format!("{field}.network"), &self.network)?;
        if let Some(mac) = &self.mac {
            validate_mac(&format!("{field}.mac"), mac)?;
        }
        Ok(())
    }
}

impl VmStatus {
    /// Checks every field; NIC indexes against `nics` NICs when given.
    pub(crate) fn validate(&self, nics: Option<usize>) -> Result<(), ApiError> {
        if let Some(node) = &self.node {
            validate::name("status.node", node)?;
        }
        validate_conditions("status.conditions", &self.conditions)?;
        for (i, address) in self.nic_addresses.iter().enumerate() {
            let at = format!("status.nic_addresses[{i}]");
            if let Some(nics) = nics
                && address.index as usize >= nics
            {
                return Err(ApiError::invalid(
                    format!("{at}.index"),
                    format!("the VM has {nics} NICs"),
                ));
            }
            validate_mac(&format!("{at}.mac"), &address.mac)?;
        }
        for (i, node) in self.outdated_replicas.iter().enumerate() {
            validate::name(&format!("status.outdated_replicas[{i}]"), node)?;
        }
        for (i, name) in self.plugged_volumes.iter().enumerate() {
            crate::types::storage::validate_volume_name(
                &format!("status.plugged_volumes[{i}]"),
                name,
            )?;
        }
        Ok(())
    }
}

/// Checks a unicast MAC written as six lowercase hex pairs joined by ':'.
fn validate_mac(field: &str, mac: &str) -> Result<(), ApiError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets.iter().all(|o| {
            o.len() == 2
                && o.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if !well_formed {
        return Err(ApiError::invalid(
            field,
            format!("{mac:?} is not a MAC like \"52:54:00:12:34:56\""),
        ));
    }
    let first = u8::from_str_radix(octets[0], 16).unwrap_or(1);
    if first & 1 == 1 {
        return Err(ApiError::invalid(
            field,
            format!("{mac:?} is a multicast MAC"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accepted_copy_holds_for_its_epoch_only() {
        let mut vm = Vm {
            meta: ObjectMeta::named("db"),
            ..Vm::default()
        };
        assert_eq!(vm.accepted_copy(5), None);
        for (value, at5) in [
            ("5/n4", Some("n4")),
            ("4/n4", None),
            ("5/", None),
            ("n4", None),
            ("x/n4", None),
        ] {
            vm.meta
                .labels
                .insert(Vm::ACCEPT_COPY_LABEL.into(), value.into());
            assert_eq!(vm.accepted_copy(5), at5, "{value}");
        }
        vm.meta
            .labels
            .insert(Vm::ACCEPT_COPY_LABEL.into(), "5/n4".into());
        vm.meta.validate().unwrap();
    }

    #[test]
    fn a_forced_copy_holds_for_its_placement_epoch_only() {
        let mut placement = crate::Placement {
            meta: ObjectMeta::named("db"),
            vm: "db".into(),
            node: "n4".into(),
            epoch: 6,
            replica_nodes: vec!["n1".into(), "n4".into()],
        };
        assert!(!placement.forces_copy());
        for (value, forces) in [("6", true), ("5", false), ("x", false), ("", false)] {
            placement
                .meta
                .labels
                .insert(crate::Placement::FORCED_COPY_LABEL.into(), value.into());
            assert_eq!(placement.forces_copy(), forces, "{value}");
        }
        // Carried along by a later move, it no longer matches.
        placement
            .meta
            .labels
            .insert(crate::Placement::FORCED_COPY_LABEL.into(), "6".into());
        placement.epoch = 7;
        assert!(!placement.forces_copy());
    }

    fn vm() -> Vm {
        Vm {
            meta: ObjectMeta::named("web-1"),
            spec: VmSpec {
                cpus: 2,
                memory_mib: 512,
                running: true,
                disks: vec![Disk {
                    name: "root".into(),
                    size_bytes: 1 << 30,
                    image: Some("debian-12".into()),
                    replicas: 2,
                    source_volume: None,
                    attach: None,
                    attached_storage_name: None,
                    added_at_epoch: None,
                    protocol: Default::default(),
                }],
                nics: vec![Nic {
                    network: "default".into(),
                    mac: Some("52:54:00:12:34:56".into()),
                    ip: Some("10.1.0.5".parse().unwrap()),
                }],
                placement: PlacementRules::default(),
                kernel: Some(KernelBoot {
                    kernel: "/boot/vmlinuz".into(),
                    initrd: "/boot/initrd.img".into(),
                    cmdline: "console=ttyS0".into(),
                }),
                cloud_init: Some(CloudInit {
                    user_data: "#cloud-config\npackages: [nginx]\n".into(),
                    network_config: None,
                    ssh_authorized_keys: vec![ED25519.into()],
                }),
            },
            status: VmStatus::default(),
        }
    }

    /// A real key made by `ssh-keygen -t ed25519`.
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEdlJ2DMaM8vSRNI8QO9fsnhdbxgZaBeCtgvmzRo7xYh ops@example";

    fn field_of(vm: &Vm) -> String {
        match vm.validate() {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_good_vm_validates() {
        assert_eq!(vm().validate(), Ok(()));
        let mut v = vm();
        v.spec.cloud_init = Some(CloudInit {
            user_data: String::new(),
            network_config: Some("version: 2\n".into()),
            ssh_authorized_keys: vec![
                ED25519.into(),
                "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCiv/quOC4W2UZLNmpWGNYo7JVU7yjlBwNfBl68m+lpsVZiWiY7JCaGFom+fVP6ky5MrRPp/M/WFdfdGGyeNyhhd7ElAu8C59oaTXrwWLpI8yumcWQTHO5YPqZyPpseYWZqclied4yw765G0J8FOA10pBRX/oRGpleSQcLokD7lGQ==".into(),
            ],
        });
        assert_eq!(v.validate(), Ok(()));
    }

    #[test]
    fn base64_decodes_as_openssh_writes_it() {
        assert_eq!(decode_base64("AAAAC3Nz").unwrap(), b"\0\0\0\x0bss");
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert_eq!(decode_base64("YWI=").unwrap(), b"ab");
        assert_eq!(decode_base64("YQ==YQ=="), None);
        assert_eq!(decode_base64("YQ="), None);
        assert_eq!(decode_base64("Y!=="), None);
    }

    #[test]
    fn each_rule_names_its_field() {
        let mut v = vm();
        v.meta.name = "Web".into();
        assert_eq!(field_of(&v), "meta.name");

        let mut v = vm();
        v.spec.cpus = 0;
        assert_eq!(field_of(&v), "spec.cpus");

        let mut v = vm();
        v.spec.memory_mib = 15;
        assert_eq!(field_of(&v), "spec.memory_mib");

        let mut v = vm();
        v.spec.disks[0].size_bytes = 1000;
        assert_eq!(field_of(&v), "spec.disks[0].size_bytes");

        let mut v = vm();
        v.spec.disks[0].replicas = 0;
        assert_eq!(field_of(&v), "spec.disks[0].replicas");

        let mut v = vm();
        v.spec.disks.push(v.spec.disks[0].clone());
        assert_eq!(field_of(&v), "spec.disks[1].name");

        // A disk from a volume: exclusive with an image, may leave its
        // size to the source's, names a valid volume.
        let mut v = vm();
        v.spec.disks[0].source_volume = Some("golden".into());
        assert_eq!(field_of(&v), "spec.disks[0].source_volume");
        v.spec.disks[0].image = None;
        v.spec.disks[0].size_bytes = 0;
        v.validate().expect("a clone of a volume may take its size");
        v.spec.disks[0].source_volume = Some("Golden!".into());
        assert_eq!(field_of(&v), "spec.disks[0].source_volume");
        let mut v = vm();
        v.spec.disks[0].size_bytes = 0;
        assert_eq!(field_of(&v), "spec.disks[0].size_bytes");

        // An attached volume: exclusive with an image or a source, may
        // leave size and copies to the volume, names a valid volume; its
        // pool name is the control plane's to set.
        let mut v = vm();
        v.spec.disks[0].attach = Some("scratch".into());
        assert_eq!(field_of(&v), "spec.disks[0].attach");
        v.spec.disks[0].image = None;
        v.spec.disks[0].size_bytes = 0;
        v.spec.disks[0].replicas = 0;
        v.validate()
            .expect("an attached volume may take its size and copies");
        v.spec.disks[0].source_volume = Some("golden".into());
        assert_eq!(field_of(&v), "spec.disks[0].attach");
        v.spec.disks[0].source_volume = None;
        v.spec.disks[0].attach = Some("Scratch!".into());
        assert_eq!(field_of(&v), "spec.disks[0].attach");
        let mut v = vm();
        v.spec.disks[0].attached_storage_name = Some("vol-x".into());
        assert_eq!(field_of(&v), "spec.disks[0].attached_storage_name");

        let mut v = vm();
        v.spec.nics[0].mac = Some("53:54:00:12:34:56".into());
        assert_eq!(field_of(&v), "spec.nics[0].mac");

        let mut v = vm();
        v.spec.nics[0].mac = Some("52:54:00:12:34".into());
        assert_eq!(field_of(&v), "spec.nics[0].mac");

        let mut v = vm();
        v.spec.placement.anti_affinity_group = Some(String::new());
        assert_eq!(field_of(&v), "spec.placement.anti_affinity_group");

        let mut v = vm();
        v.spec.kernel.as_mut().unwrap().kernel = "vmlinuz".into();
        assert_eq!(field_of(&v), "spec.kernel.kernel");

        let mut v = vm();
        v.spec.kernel.as_mut().unwrap().initrd = "initrd.img".into();
        assert_eq!(field_of(&v), "spec.kernel.initrd");

        let mut v = vm();
        v.spec.kernel.as_mut().unwrap().cmdline = "a\nb".into();
        assert_eq!(field_of(&v), "spec.kernel.cmdline");

        let mut v = vm();
        v.spec.cloud_init.as_mut().unwrap().user_data = "#".repeat(64 * 1024 + 1);
        assert_eq!(field_of(&v), "spec.cloud_init.user_data");

        let mut v = vm();
        v.spec.cloud_init.as_mut().unwrap().network_config = Some(" ".into());
        assert_eq!(field_of(&v), "spec.cloud_init.network_config");

        for bad in [
            "ssh-ed25519",
            "not-a-type AAAAC3NzaC1lZDI1NTE5AAAAIEdlJ2DMaM8vSRNI8QO9fsnhdbxgZaBeCtgvmzRo7xYh",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEdlJ2DMaM8vSRNI8QO9fsnhdbxgZaBeCtgvmzRo7xY",
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIEdlJ2DMaM8vSRNI8QO9fsnhdbxgZaBeCtgvmzRo7xYh",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEdlJ2DMaM8vSRNI8QO9fsnhdbxgZaBeCtgvmzRo7xYh\nx",
            "-----BEGIN OPENSSH PRIVATE KEY-----",
        ] {
            let mut v = vm();
            let keys = &mut v.spec.cloud_init.as_mut().unwrap().ssh_authorized_keys;
            keys.push(bad.into());
            assert_eq!(
                field_of(&v),
                "spec.cloud_init.ssh_authorized_keys[1]",
                "{bad:?}"
            );
        }

        let mut v = vm();
        v.status.nic_addresses.push(NicAddress {
            index: 1,
            mac: "52:54:00:12:34:56".into(),
            ip: None,
        });
        assert_eq!(field_of(&v), "status.nic_addresses[0].index");
    }
}
