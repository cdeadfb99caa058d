//! Typed libvirt domain XML for Basalt's guests.
//!
//! A [`DomainSpec`] says what a guest is (memory, vCPUs, direct kernel
//! boot, NBD disks, tap NICs, a serial log file); [`DomainSpec::to_xml`]
//! validates it and writes the domain XML through quick-xml's serde
//! serializer, so every value is escaped by the writer and never pasted
//! into a string by hand.
//!
//! Invariants of the XML written:
//! - disks are `type='network'` NBD sources opened by QEMU itself, raw,
//!   `cache='none'`, on virtio: the NBD server may be shared by a
//!   migration's source and target, so no host page cache sits in between;
//!   writable disks say `discard='unmap'`: a zeroing write may leave a hole
//!   (QEMU sends NBD WRITE_ZEROES without NO_HOLE), so the thin pool stays
//!   thin — a guest's TRIM frees chunks, and a disk copied by a live
//!   migration's storage mirror is as sparse on the target as on the
//!   source instead of zero-filled;
//! - a cloud-init seed, when there is one, is a read-only IDE CD-ROM
//!   (`hdc`) on an NBD source the same way: every guest kernel has a
//!   driver for it, and cloud-init finds it by its `cidata` label;
//! - a guest without direct kernel boot boots from its first disk
//!   (`<boot dev='hd'/>`);
//! - NICs are `type='ethernet'` with a fixed tap name, the same on every
//!   node so a migrated guest keeps its ARP entries: either the agent's
//!   network reconciler made the tap before the domain starts
//!   (`managed='no'`: libvirt uses it as it is and leaves it), or libvirt
//!   creates it (and removes it when the domain stops);
//! - the serial console goes to a file, which is also the `<console>`;
//! - power-off and crash destroy the domain, reboot restarts it: a guest's
//!   lifecycle is the agent's decision, not libvirt's.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;
use uuid::Uuid;

/// The longest interface name the kernel accepts (`IFNAMSIZ - 1`).
pub const MAX_TAP_NAME: usize = 15;

/// A domain spec could not be turned into XML.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// A field of the spec holds a value libvirt (or the kernel) would
    /// reject, or one that cannot be written as XML.
    #[error("domain spec field `{field}` is invalid: {reason}")]
    Invalid {
        /// The field, as a path into the spec (e.g. `nics[0].tap`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The XML writer failed.
    #[error("could not write the domain XML")]
    Serialize {
        /// The writer's error.
        #[source]
        source: quick_xml::SeError,
    },
    /// The hypervisor's description of a domain could not be read.
    #[error("could not read the domain XML the hypervisor gave")]
    Parse {
        /// The reader's error.
        #[source]
        source: quick_xml::DeError,
    },
}

/// How QEMU runs the guest's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Software emulation (libvirt `type='qemu'`): works everywhere, slow.
    #[default]
    Tcg,
    /// Hardware virtualization (libvirt `type='kvm'`).
    Kvm,
}

impl Accel {
    fn domain_type(self) -> &'static str {
        match self {
            Accel::Tcg => "qemu",
            Accel::Kvm => "kvm",
        }
    }
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Direct kernel boot: QEMU loads the kernel and initrd from host files.
    Kernel {
        /// Absolute path of the kernel image on the host.
        kernel: PathBuf,
        /// Absolute path of the initramfs on the host.
        initrd: PathBuf,
        /// The kernel command line.
        cmdline: String,
    },
    /// The firmware boots the first disk (its boot loader).
    Disk,
}

/// A disk served over NBD, opened by QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdDisk {
    /// The guest device name (`vda`, `vdb`, ...); also decides the order.
    pub target_dev: String,
    /// The NBD server's host name or address.
    pub host: String,
    /// The NBD server's TCP port.
    pub port: u16,
    /// The export name on that server.
    pub export_name: String,
}

/// A read-only CD-ROM served over NBD, opened by QEMU: the cloud-init
/// NoCloud seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdCdrom {
    /// The NBD server's host name or address.
    pub host: String,
    /// The NBD server's TCP port.
    pub port: u16,
    /// The export name on that server.
    pub export_name: String,
}

/// The guest device name of the seed CD-ROM: the secondary IDE master.
pub const SEED_TARGET_DEV: &str = "hdc";

/// A NIC backed by a host tap device with this name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthernetNic {
    /// The tap's name on the host (at most [`MAX_TAP_NAME`] bytes).
    pub tap: String,
    /// The guest-side MAC address.
    pub mac: MacAddr,
    /// The tap exists before the domain starts (the agent's network
    /// reconciler made and wired it): libvirt uses it as it is
    /// (`managed='no'`) and leaves it when the domain stops. `false`:
    /// libvirt creates the tap and removes it with the domain.
    pub precreated: bool,
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether the address is multicast (lowest bit of the first octet),
    /// which no NIC may use as its own.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A string was not a MAC address of the form `52:54:00:12:34:56`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a MAC address (six colon-separated hex octets)")]
pub struct MacAddrParseError {
    /// The rejected input.
    pub input: String,
}

impl FromStr for MacAddr {
    type Err = MacAddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacAddrParseError {
            input: s.to_owned(),
        };
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(octets))
    }
}

/// Everything libvirt needs to define one Basalt guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// The domain name, unique on the libvirtd.
    pub name: String,
    /// The domain UUID, stable across nodes (migration keeps it).
    pub uuid: Uuid,
    /// Software emulation or KVM.
    pub accel: Accel,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// A named CPU model (`qemu64`, `Haswell`, ...) that every node can
    /// provide, so the guest can migrate; `None` leaves QEMU's default.
    pub cpu_model: Option<String>,
    /// How the guest boots.
    pub boot: Boot,
    /// Disks, in the order given.
    pub disks: Vec<NbdDisk>,
    /// The cloud-init seed, a read-only CD-ROM ([`SEED_TARGET_DEV`]).
    pub seed: Option<NbdCdrom>,
    /// NICs, in the order given (the first is the guest's `eth0`).
    pub nics: Vec<EthernetNic>,
    /// Host file the serial console (`ttyS0`) is written to.
    pub serial_log: PathBuf,
}

/// Largest memory size accepted, 16 TiB in MiB: guards against unit mixups.
const MAX_MEMORY_MIB: u64 = 16 << 20;
/// QEMU's `pc` machine's vCPU limit.
const MAX_VCPUS: u32 = 255;

impl DomainSpec {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), DomainError> {
        check_text("name", &self.name)?;
        if self.name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.name.contains('/') {
            return Err(invalid("name", "must not contain '/'"));
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_MEMORY_MIB {
            return Err(invalid(
                "memory_mib",
                format!("{} is not in 1..={MAX_MEMORY_MIB}", self.memory_mib),
            ));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                format!("{} is not in 1..={MAX_VCPUS}", self.vcpus),
            ));
        }
        if let Some(model) = &self.cpu_model {
            check_text("cpu_model", model)?;
            if model.trim().is_empty() {
                return Err(invalid("cpu_model", "must not be empty when set"));
            }
        }
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                check_path("boot.kernel", kernel)?;
                check_path("boot.initrd", initrd)?;
                check_text("boot.cmdline", cmdline)?;
            }
            Boot::Disk => {
                if self.disks.is_empty() {
                    return Err(invalid("boot", "booting from a disk needs a disk"));
                }
            }
        }
        if let Some(seed) = &self.seed {
            check_nbd(
                "seed.host",
                "seed.port",
                "seed.export_name",
                &seed.host,
                seed.port,
                &seed.export_name,
            )?;
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let field = |f: &str| format!("disks[{i}].{f}");
            check_disk(disk, &field)?;
            if self.disks[..i]
                .iter()
                .any(|d| d.target_dev == disk.target_dev)
            {
                return Err(invalid(
                    &field("target_dev"),
                    format!("{:?} is used by an earlier disk", disk.target_dev),
                ));
            }
        }
        for (i, nic) in self.nics.iter().enumerate() {
            let field = |f: &str| format!("nics[{i}].{f}");
            check_tap_name(&field("tap"), &nic.tap)?;
            if self.nics[..i].iter().any(|n| n.tap == nic.tap) {
                return Err(invalid(
                    &field("tap"),
                    format!("{:?} is used by an earlier NIC", nic.tap),
                ));
            }
            if nic.mac.is_multicast() {
                return Err(invalid(
                    &field("mac"),
                    format!("{} is a multicast address", nic.mac),
                ));
            }
            if nic.mac.0 == [0; 6] {
                return Err(invalid(&field("mac"), "must not be all zeros"));
            }
        }
        check_path("serial_log", &self.serial_log)?;
        Ok(())
    }

    /// Validates the spec and writes it as libvirt domain XML.
    pub fn to_xml(&self) -> Result<String, DomainError> {
        self.validate()?;
        let xml = xml::Domain::from_spec(self);
        let mut out = String::new();
        let mut ser = quick_xml::se::Serializer::new(&mut out);
        ser.indent(' ', 2);
        xml.serialize(ser)
            .map_err(|source| DomainError::Serialize { source })?;
        out.push('\n');
        Ok(out)
    }
}

/// The libvirt `<disk>` element of one writable virtio disk alone: what a
/// live attach or detach sends.
pub fn disk_xml(disk: &NbdDisk) -> Result<String, DomainError> {
    check_disk(disk, &str::to_owned)?;
    let mut out = String::new();
    let ser = quick_xml::se::Serializer::with_root(&mut out, Some("disk"))
        .map_err(|source| DomainError::Serialize { source })?;
    xml::Disk::virtio(disk)
        .serialize(ser)
        .map_err(|source| DomainError::Serialize { source })?;
    Ok(out)
}

/// The writable NBD disks of a domain as the hypervisor describes it
/// (libvirt's XML of a running domain), in its order. The seed CD-ROM and
/// anything that is not an NBD disk are left out.
pub fn live_disks(xml: &str) -> Result<Vec<NbdDisk>, DomainError> {
    let domain: xml::LiveDomain =
        quick_xml::de::from_str(xml).map_err(|source| DomainError::Parse { source })?;
    Ok(domain
        .devices
        .disk
        .into_iter()
        .filter(|d| d.device == "disk")
        .filter_map(|d| {
            let source = d.source.filter(|s| s.protocol == "nbd")?;
            let host = source.host?;
            Some(NbdDisk {
                target_dev: d.target?.dev,
                host: host.name,
                port: host.port,
                export_name: source.name,
            })
        })
        .collect())
}

/// What to change in a running domain so that its disks are the spec's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskChanges {
    /// Disks to plug in, each under a device name no live disk holds.
    pub attach: Vec<NbdDisk>,
    /// Live disks to unplug.
    pub detach: Vec<NbdDisk>,
}

/// The disks to plug into and out of a running domain whose disks are
/// `live` so that it has `wanted`'s. A disk is known by its source (host,
/// port, export), not its device name: names follow the disks' places in
/// the spec, so removing one renames those after it at the next boot, but
/// a running guest keeps the names it has. A new disk takes its spec's
/// device name when no live disk holds it, otherwise the first free one.
pub fn disk_changes(live: &[NbdDisk], wanted: &[NbdDisk]) -> DiskChanges {
    let same = |a: &NbdDisk, b: &NbdDisk| {
        (a.host.as_str(), a.port, a.export_name.as_str())
            == (b.host.as_str(), b.port, b.export_name.as_str())
    };
    let detach: Vec<NbdDisk> = live
        .iter()
        .filter(|l| !wanted.iter().any(|w| same(l, w)))
        .cloned()
        .collect();
    // Names held live stay taken until the guest lets go of them.
    let mut taken: Vec<String> = live.iter().map(|l| l.target_dev.clone()).collect();
    let mut attach = Vec::new();
    for w in wanted.iter().filter(|w| !live.iter().any(|l| same(l, w))) {
        let name = if taken.contains(&w.target_dev) {
            (b'a'..=b'z')
                .map(|c| format!("vd{}", char::from(c)))
                .find(|n| !taken.contains(n))
        } else {
            Some(w.target_dev.clone())
        };
        let Some(name) = name else {
            continue;
        };
        taken.push(name.clone());
        attach.push(NbdDisk {
            target_dev: name,
            ..w.clone()
        });
    }
    DiskChanges { attach, detach }
}

fn invalid(field: &str, reason: impl Into<String>) -> DomainError {
    DomainError::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Rejects characters XML 1.0 cannot carry (and that no libvirt field
/// needs): control characters other than tab.
fn check_text(field: &str, value: &str) -> Result<(), DomainError> {
    match value.chars().find(|c| c.is_control() && *c != '\t') {
        Some(c) => Err(invalid(
            field,
            format!("contains the control character {c:?}"),
        )),
        None => Ok(()),
    }
}

/// A disk: a virtio device name and an NBD source; `field` names a field
/// of the disk.
fn check_disk(disk: &NbdDisk, field: &dyn Fn(&str) -> String) -> Result<(), DomainError> {
    if !is_virtio_disk_name(&disk.target_dev) {
        return Err(invalid(
            &field("target_dev"),
            format!(
                "{:?} is not a virtio disk name (vda, vdb, ...)",
                disk.target_dev
            ),
        ));
    }
    check_nbd(
        &field("host"),
        &field("port"),
        &field("export_name"),
        &disk.host,
        disk.port,
        &disk.export_name,
    )
}

/// An NBD source: a host, a port and an export name, all set.
fn check_nbd(
    host_field: &str,
    port_field: &str,
    export_field: &str,
    host: &str,
    port: u16,
    export_name: &str,
) -> Result<(), DomainError> {
    check_text(host_field, host)?;
    if host.is_empty() {
        return Err(invalid(host_field, "must not be empty"));
    }
    if port == 0 {
        return Err(invalid(port_field, "must not be 0"));
    }
    check_text(export_field, export_name)?;
    if export_name.is_empty() {
        return Err(invalid(export_field, "must not be empty"));
    }
    Ok(())
}

fn check_path(field: &str, path: &Path) -> Result<(), DomainError> {
    let Some(text) = path.to_str() else {
        return Err(invalid(field, format!("{} is not UTF-8", path.display())));
    };
    check_text(field, text)?;
    if !path.is_absolute() {
        return Err(invalid(field, format!("{text:?} is not an absolute path")));
    }
    Ok(())
}

fn check_tap_name(field: &str, name: &str) -> Result<(), DomainError> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.len() > MAX_TAP_NAME {
        return Err(invalid(
            field,
            format!("{name:?} is longer than {MAX_TAP_NAME} bytes"),
        ));
    }
    if name == "." || name == ".." {
        return Err(invalid(field, format!("{name:?} is not a device name")));
    }
    // The kernel rejects '/', ':' and whitespace; libvirt reads '%' as a
    // name template.
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | ':' | '%') || c.is_whitespace() || c.is_control())
    {
        return Err(invalid(field, format!("{name:?} contains {c:?}")));
    }
    Ok(())
}

fn is_virtio_disk_name(name: &str) -> bool {
    name.strip_prefix("vd")
        .is_some_and(|s| (1..=2).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase()))
}

/// The XML document's shape, one struct per element. Attributes are
/// `@`-renamed fields, element text is `$text`; serde does the writing and
/// the escaping.
mod xml {
    #[cfg(test)]
    use serde::Deserialize;
    use serde::Serialize;

    use super::{Boot, DomainSpec};

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    #[serde(rename = "domain")]
    pub(super) struct Domain {
        #[serde(rename = "@type")]
        pub kind: String,
        pub name: String,
        pub uuid: String,
        pub memory: Memory,
        pub vcpu: u32,
        pub os: Os,
        pub features: Features,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        pub cpu: Option<Cpu>,
        pub clock: Clock,
        pub on_poweroff: String,
        pub on_reboot: String,
        pub on_crash: String,
        pub devices: Devices,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Memory {
        #[serde(rename = "@unit")]
        pub unit: String,
        #[serde(rename = "$text")]
        pub value: u64,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Os {
        #[serde(rename = "type")]
        pub kind: OsType,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        pub kernel: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        pub initrd: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        pub cmdline: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        pub boot: Option<BootDev>,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct BootDev {
        #[serde(rename = "@dev")]
        pub dev: String,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct OsType {
        #[serde(rename = "@arch")]
        pub arch: String,
        #[serde(rename = "@machine")]
        pub machine: String,
        #[serde(rename = "$text")]
        pub value: String,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Features {
        pub acpi: Empty,
    }

    /// An element with neither attributes nor content, e.g. `<acpi/>`.
    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Empty {}

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Cpu {
        #[serde(rename = "@mode")]
        pub mode: String,
        #[serde(rename = "@match")]
        pub match_: String,
        pub model: CpuModel,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct CpuModel {
        #[serde(rename = "@fallback")]
        pub fallback: String,
        #[serde(rename = "$text")]
        pub name: String,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Clock {
        #[serde(rename = "@offset")]
        pub offset: String,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Devices {
        #[serde(default)]
        pub disk: Vec<Disk>,
        #[serde(default)]
        pub interface: Vec<Interface>,
        pub serial: Serial,
        pub console: Console,
        pub memballoon: Model,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Disk {
        #[serde(rename = "@type")]
        pub kind: String,
        #[serde(rename = "@device")]
        pub device: String,
        pub driver: DiskDriver,
        pub source: NbdSource,
        pub target: DiskTarget,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        pub readonly: Option<Empty>,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct DiskDriver {
        #[serde(rename = "@name")]
        pub name: String,
        #[serde(rename = "@type")]
        pub format: String,
        #[serde(rename = "@cache")]
        pub cache: String,
        #[serde(rename = "@discard", skip_serializing_if = "Option::is_none", default)]
        pub discard: Option<String>,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct NbdSource {
        #[serde(rename = "@protocol")]
        pub protocol: String,
        #[serde(rename = "@name")]
        pub name: String,
        pub host: NbdHost,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct NbdHost {
        #[serde(rename = "@name")]
        pub name: String,
        #[serde(rename = "@port")]
        pub port: u16,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct DiskTarget {
        #[serde(rename = "@dev")]
        pub dev: String,
        #[serde(rename = "@bus")]
        pub bus: String,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Interface {
        #[serde(rename = "@type")]
        pub kind: String,
        pub mac: Mac,
        pub target: TapTarget,
        pub model: Model,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Mac {
        #[serde(rename = "@address")]
        pub address: String,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct TapTarget {
        #[serde(rename = "@dev")]
        pub dev: String,
        #[serde(rename = "@managed", skip_serializing_if = "Option::is_none")]
        pub managed: Option<String>,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Model {
        #[serde(rename = "@model", skip_serializing_if = "Option::is_none", default)]
        pub model: Option<String>,
        #[serde(rename = "@type", skip_serializing_if = "Option::is_none", default)]
        pub kind: Option<String>,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Serial {
        #[serde(rename = "@type")]
        pub kind: String,
        pub source: FileSource,
        pub target: SerialTarget,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct Console {
        #[serde(rename = "@type")]
        pub kind: String,
        pub source: FileSource,
        pub target: ConsoleTarget,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct FileSource {
        #[serde(rename = "@path")]
        pub path: String,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct SerialTarget {
        #[serde(rename = "@port")]
        pub port: u32,
    }

    #[derive(Debug, Serialize)]
    #[cfg_attr(test, derive(Deserialize))]
    pub(super) struct ConsoleTarget {
        #[serde(rename = "@type")]
        pub kind: String,
        #[serde(rename = "@port")]
        pub port: u32,
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    /// A validated path as XML text (validation checked it is UTF-8).
    fn path(p: &std::path::Path) -> String {
        p.to_string_lossy().into_owned()
    }

    fn nbd_disk(device: &str, name: &str, host: &str, port: u16, dev: &str, bus: &str) -> Disk {
        let read_only = device == "cdrom";
        Disk {
            kind: s("network"),
            device: s(device),
            driver: DiskDriver {
                name: s("qemu"),
                format: s("raw"),
                cache: s("none"),
                discard: (!read_only).then(|| s("unmap")),
            },
            source: NbdSource {
                protocol: s("nbd"),
                name: s(name),
                host: NbdHost {
                    name: s(host),
                    port,
                },
            },
            target: DiskTarget {
                dev: s(dev),
                bus: s(bus),
            },
            readonly: read_only.then_some(Empty {}),
        }
    }

    impl Disk {
        /// A guest's writable virtio disk.
        pub(super) fn virtio(d: &super::NbdDisk) -> Disk {
            nbd_disk(
                "disk",
                &d.export_name,
                &d.host,
                d.port,
                &d.target_dev,
                "virtio",
            )
        }
    }

    /// What [`super::live_disks`] reads of a running domain's XML: every
    /// `<disk>`, with whatever libvirt added (aliases, addresses) ignored.
    #[derive(Debug, serde::Deserialize)]
    pub(super) struct LiveDomain {
        #[serde(default)]
        pub devices: LiveDevices,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    pub(super) struct LiveDevices {
        #[serde(default)]
        pub disk: Vec<LiveDisk>,
    }

    #[derive(Debug, serde::Deserialize)]
    pub(super) struct LiveDisk {
        #[serde(rename = "@device", default)]
        pub device: String,
        pub source: Option<LiveSource>,
        pub target: Option<LiveTarget>,
    }

    #[derive(Debug, serde::Deserialize)]
    pub(super) struct LiveSource {
        #[serde(rename = "@protocol", default)]
        pub protocol: String,
        #[serde(rename = "@name", default)]
        pub name: String,
        pub host: Option<LiveHost>,
    }

    #[derive(Debug, serde::Deserialize)]
    pub(super) struct LiveHost {
        #[serde(rename = "@name", default)]
        pub name: String,
        #[serde(rename = "@port", default)]
        pub port: u16,
    }

    #[derive(Debug, serde::Deserialize)]
    pub(super) struct LiveTarget {
        #[serde(rename = "@dev", default)]
        pub dev: String,
    }

    impl Domain {
        /// Maps a spec that passed [`DomainSpec::validate`].
        pub(super) fn from_spec(spec: &DomainSpec) -> Domain {
            let os_type = OsType {
                arch: s("x86_64"),
                machine: s("pc"),
                value: s("hvm"),
            };
            let os = match &spec.boot {
                Boot::Kernel {
                    kernel,
                    initrd,
                    cmdline,
                } => Os {
                    kind: os_type,
                    kernel: Some(path(kernel)),
                    initrd: Some(path(initrd)),
                    cmdline: Some(cmdline.clone()),
                    boot: None,
                },
                Boot::Disk => Os {
                    kind: os_type,
                    kernel: None,
                    initrd: None,
                    cmdline: None,
                    boot: Some(BootDev { dev: s("hd") }),
                },
            };
            let mut disks: Vec<Disk> = spec.disks.iter().map(Disk::virtio).collect();
            if let Some(seed) = &spec.seed {
                disks.push(nbd_disk(
                    "cdrom",
                    &seed.export_name,
                    &seed.host,
                    seed.port,
                    super::SEED_TARGET_DEV,
                    "ide",
                ));
            }
            let log = path(&spec.serial_log);
            Domain {
                kind: s(spec.accel.domain_type()),
                name: spec.name.clone(),
                uuid: spec.uuid.hyphenated().to_string(),
                memory: Memory {
                    unit: s("MiB"),
                    value: spec.memory_mib,
                },
                vcpu: spec.vcpus,
                os,
                features: Features { acpi: Empty {} },
                cpu: spec.cpu_model.as_ref().map(|name| Cpu {
                    mode: s("custom"),
                    match_: s("exact"),
                    model: CpuModel {
                        fallback: s("forbid"),
                        name: name.clone(),
                    },
                }),
                clock: Clock { offset: s("utc") },
                on_poweroff: s("destroy"),
                on_reboot: s("restart"),
                on_crash: s("destroy"),
                devices: Devices {
                    disk: disks,
                    interface: spec
                        .nics
                        .iter()
                        .map(|n| Interface {
                            kind: s("ethernet"),
                            mac: Mac {
                                address: n.mac.to_string(),
                            },
                            target: TapTarget {
                                dev: n.tap.clone(),
                                managed: n.precreated.then(|| s("no")),
                            },
                            model: Model {
                                model: None,
                                kind: Some(s("virtio")),
                            },
                        })
                        .collect(),
                    serial: Serial {
                        kind: s("file"),
                        source: FileSource { path: log.clone() },
                        target: SerialTarget { port: 0 },
                    },
                    console: Console {
                        kind: s("file"),
                        source: FileSource { path: log },
                        target: ConsoleTarget {
                            kind: s("serial"),
                            port: 0,
                        },
                    },
                    // No balloon: memory is fixed, and one device fewer
                    // to emulate under TCG.
                    memballoon: Model {
                        model: Some(s("none")),
                        kind: None,
                    },
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "vm-1".to_owned(),
            uuid: Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
            accel: Accel::Tcg,
            memory_mib: 256,
            vcpus: 1,
            cpu_model: None,
            boot: Boot::Kernel {
                kernel: PathBuf::from("/boot/vmlinuz"),
                initrd: PathBuf::from("/var/tmp/initramfs.cpio"),
                cmdline: "console=ttyS0 basalt.ip=10.80.0.10".to_owned(),
            },
            disks: vec![NbdDisk {
                target_dev: "vda".to_owned(),
                host: "127.0.0.1".to_owned(),
                port: 10809,
                export_name: "vol-1".to_owned(),
            }],
            seed: None,
            nics: vec![EthernetNic {
                tap: "bt1234t0".to_owned(),
                mac: "52:54:00:ab:cd:ef".parse().unwrap(),
                precreated: false,
            }],
            serial_log: PathBuf::from("/run/basalt/vm-1.log"),
        }
    }

    fn parse(xml: &str) -> xml::Domain {
        quick_xml::de::from_str(xml).unwrap_or_else(|e| panic!("{e}\n{xml}"))
    }

    #[test]
    fn writes_the_documented_elements() {
        let text = spec().to_xml().unwrap();
        let d = parse(&text);
        assert_eq!(d.kind, "qemu");
        assert_eq!(d.name, "vm-1");
        assert_eq!(d.uuid, "12345678-9abc-def0-1234-56789abcdef0");
        assert_eq!((d.memory.unit.as_str(), d.memory.value), ("MiB", 256));
        assert_eq!(d.vcpu, 1);
        assert_eq!(d.os.kind.arch, "x86_64");
        assert_eq!(d.os.kind.machine, "pc");
        assert_eq!(d.os.kind.value, "hvm");
        assert_eq!(d.os.kernel.as_deref(), Some("/boot/vmlinuz"));
        assert_eq!(d.os.initrd.as_deref(), Some("/var/tmp/initramfs.cpio"));
        assert_eq!(
            d.os.cmdline.as_deref(),
            Some("console=ttyS0 basalt.ip=10.80.0.10")
        );
        assert!(d.os.boot.is_none(), "direct kernel boot names no device");
        assert!(d.cpu.is_none());
        assert_eq!(d.on_poweroff, "destroy");
        assert_eq!(d.on_reboot, "restart");
        assert_eq!(d.on_crash, "destroy");

        let [disk] = &d.devices.disk[..] else {
            panic!("one disk expected: {text}");
        };
        assert_eq!(
            (disk.kind.as_str(), disk.device.as_str()),
            ("network", "disk")
        );
        assert_eq!(
            (
                disk.driver.name.as_str(),
                disk.driver.format.as_str(),
                disk.driver.cache.as_str()
            ),
            ("qemu", "raw", "none")
        );
        assert_eq!(
            disk.driver.discard.as_deref(),
            Some("unmap"),
            "zeroes and TRIM may leave holes in the thin pool"
        );
        assert_eq!(disk.source.protocol, "nbd");
        assert_eq!(disk.source.name, "vol-1");
        assert_eq!(disk.source.host.name, "127.0.0.1");
        assert_eq!(disk.source.host.port, 10809);
        assert_eq!(
            (disk.target.dev.as_str(), disk.target.bus.as_str()),
            ("vda", "virtio")
        );

        let [nic] = &d.devices.interface[..] else {
            panic!("one NIC expected: {text}");
        };
        assert_eq!(nic.kind, "ethernet");
        assert_eq!(nic.mac.address, "52:54:00:ab:cd:ef");
        assert_eq!(nic.target.dev, "bt1234t0");
        assert_eq!(nic.target.managed, None);
        assert_eq!(nic.model.kind.as_deref(), Some("virtio"));

        assert_eq!(d.devices.serial.kind, "file");
        assert_eq!(d.devices.serial.source.path, "/run/basalt/vm-1.log");
        assert_eq!(d.devices.console.target.kind, "serial");
        assert_eq!(d.devices.memballoon.model.as_deref(), Some("none"));

        // Attribute-level spot checks on the text itself.
        assert!(text.starts_with("<domain type=\"qemu\">"), "{text}");
        assert!(text.contains("<acpi/>"), "{text}");
        assert!(
            text.contains("<target dev=\"vda\" bus=\"virtio\"/>"),
            "{text}"
        );
    }

    #[test]
    fn the_seed_is_a_read_only_cdrom_after_the_disks() {
        let mut s = spec();
        s.seed = Some(NbdCdrom {
            host: "127.0.0.1".to_owned(),
            port: 10809,
            export_name: "seed-1".to_owned(),
        });
        let text = s.to_xml().unwrap();
        let d = parse(&text);
        let [disk, seed] = &d.devices.disk[..] else {
            panic!("a disk and the seed expected: {text}");
        };
        assert_eq!(disk.device, "disk");
        assert!(disk.readonly.is_none(), "{text}");
        assert_eq!(
            (seed.kind.as_str(), seed.device.as_str()),
            ("network", "cdrom")
        );
        assert_eq!(seed.source.protocol, "nbd");
        assert_eq!(seed.source.name, "seed-1");
        assert_eq!(
            (seed.source.host.name.as_str(), seed.source.host.port),
            ("127.0.0.1", 10809)
        );
        assert_eq!(
            (seed.target.dev.as_str(), seed.target.bus.as_str()),
            ("hdc", "ide")
        );
        assert!(seed.readonly.is_some(), "{text}");
        assert!(
            seed.driver.discard.is_none(),
            "a read-only seed never discards"
        );
        assert!(text.contains("<readonly/>"), "{text}");

        s.seed.as_mut().unwrap().export_name = String::new();
        assert_eq!(invalid_field(&s), "seed.export_name");
        s.seed.as_mut().unwrap().export_name = "seed-1".to_owned();
        s.seed.as_mut().unwrap().port = 0;
        assert_eq!(invalid_field(&s), "seed.port");
    }

    #[test]
    fn without_a_kernel_the_first_disk_boots() {
        let mut s = spec();
        s.boot = Boot::Disk;
        let text = s.to_xml().unwrap();
        let d = parse(&text);
        assert_eq!(d.os.boot.as_ref().map(|b| b.dev.as_str()), Some("hd"));
        assert!(d.os.kernel.is_none() && d.os.initrd.is_none() && d.os.cmdline.is_none());
        assert!(!text.contains("<kernel"), "{text}");
        assert!(text.contains("<boot dev=\"hd\"/>"), "{text}");
        assert_eq!(d.devices.disk[0].target.dev, "vda");

        s.disks.clear();
        assert_eq!(invalid_field(&s), "boot");
    }

    #[test]
    fn kvm_and_cpu_model_are_selectable() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        s.cpu_model = Some("qemu64".to_owned());
        let d = parse(&s.to_xml().unwrap());
        assert_eq!(d.kind, "kvm");
        let cpu = d.cpu.expect("a <cpu> element");
        assert_eq!(
            (cpu.mode.as_str(), cpu.match_.as_str()),
            ("custom", "exact")
        );
        assert_eq!(cpu.model.name, "qemu64");
    }

    #[test]
    fn no_disks_and_several_nics() {
        let mut s = spec();
        s.disks.clear();
        s.nics.push(EthernetNic {
            tap: "bt1234t1".to_owned(),
            mac: "52:54:00:ab:cd:f0".parse().unwrap(),
            precreated: true,
        });
        let d = parse(&s.to_xml().unwrap());
        assert!(d.devices.disk.is_empty());
        let taps: Vec<_> = d
            .devices
            .interface
            .iter()
            .map(|i| i.target.dev.as_str())
            .collect();
        assert_eq!(taps, ["bt1234t0", "bt1234t1"]);
        let managed: Vec<_> = d
            .devices
            .interface
            .iter()
            .map(|i| i.target.managed.as_deref())
            .collect();
        assert_eq!(managed, [None, Some("no")]);
    }

    #[test]
    fn odd_values_are_escaped_and_read_back_unchanged() {
        let mut s = spec();
        s.name = "a<b>&'\"c".to_owned();
        let cmdline = r#"console=ttyS0 x="<&>" y='1' </cmdline><evil/>"#;
        s.boot = Boot::Kernel {
            kernel: PathBuf::from("/boot/k & <k>"),
            initrd: PathBuf::from("/tmp/i\"'"),
            cmdline: cmdline.to_owned(),
        };
        s.disks[0].export_name = "vol\"/><x a='".to_owned();
        s.serial_log = PathBuf::from("/tmp/log's & \"more\"");
        let text = s.to_xml().unwrap();
        assert!(!text.contains("<evil/>"), "{text}");
        assert!(!text.contains("<b>"), "{text}");
        let d = parse(&text);
        assert_eq!(d.name, "a<b>&'\"c");
        assert_eq!(d.os.cmdline.as_deref(), Some(cmdline));
        assert_eq!(d.os.kernel.as_deref(), Some("/boot/k & <k>"));
        assert_eq!(d.os.initrd.as_deref(), Some("/tmp/i\"'"));
        assert_eq!(d.devices.disk[0].source.name, "vol\"/><x a='");
        assert_eq!(d.devices.console.source.path, "/tmp/log's & \"more\"");
    }

    fn invalid_field(s: &DomainSpec) -> String {
        match s.to_xml() {
            Err(DomainError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = spec();
        s.nics[0].tap = "a-very-long-tap-name".to_owned();
        assert_eq!(invalid_field(&s), "nics[0].tap");

        let mut s = spec();
        s.memory_mib = 0;
        assert_eq!(invalid_field(&s), "memory_mib");

        let mut s = spec();
        s.vcpus = 0;
        assert_eq!(invalid_field(&s), "vcpus");

        let mut s = spec();
        s.name = String::new();
        assert_eq!(invalid_field(&s), "name");

        let mut s = spec();
        s.disks[0].target_dev = "sda".to_owned();
        assert_eq!(invalid_field(&s), "disks[0].target_dev");

        let mut s = spec();
        s.disks.push(s.disks[0].clone());
        assert_eq!(invalid_field(&s), "disks[1].target_dev");

        let mut s = spec();
        s.disks[0].port = 0;
        assert_eq!(invalid_field(&s), "disks[0].port");

        let mut s = spec();
        s.nics[0].mac = "01:00:5e:00:00:01".parse().unwrap();
        assert_eq!(invalid_field(&s), "nics[0].mac");

        let mut s = spec();
        s.nics[0].tap = "tap 0".to_owned();
        assert_eq!(invalid_field(&s), "nics[0].tap");

        let mut s = spec();
        s.serial_log = PathBuf::from("relative.log");
        assert_eq!(invalid_field(&s), "serial_log");

        let mut s = spec();
        s.boot = Boot::Kernel {
            kernel: PathBuf::from("/boot/vmlinuz"),
            initrd: PathBuf::from("/i"),
            cmdline: "console=ttyS0\0".to_owned(),
        };
        assert_eq!(invalid_field(&s), "boot.cmdline");

        let err = {
            let mut s = spec();
            s.nics[0].tap = "sixteen-chars-xx".to_owned();
            s.to_xml().unwrap_err().to_string()
        };
        assert!(err.contains("nics[0].tap") && err.contains("15"), "{err}");
    }

    #[test]
    fn mac_addresses_parse_and_print() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "5254.00ab.cdef",
            "52:54:00:ab:cd:g0",
            "2:54:00:ab:cd:ef0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
    }

    fn nbd(dev: &str, export: &str) -> NbdDisk {
        NbdDisk {
            target_dev: dev.to_owned(),
            host: "127.0.0.1".to_owned(),
            port: 10809,
            export_name: export.to_owned(),
        }
    }

    #[test]
    fn live_disks_read_libvirts_description_and_skip_the_seed() {
        // The shape libvirt gives for a running domain: aliases, addresses
        // and driver attributes it adds, the seed CD-ROM, a non-NBD disk.
        let xml = r#"<domain type='qemu' id='3'>
  <name>b-vm</name>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none' discard='unmap'/>
      <source protocol='nbd' name='root' index='2'>
        <host name='127.0.0.1' port='10809'/>
      </source>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/x.img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='network' device='cdrom'>
      <source protocol='nbd' name='seed'><host name='127.0.0.1' port='10809'/></source>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <controller type='usb' index='0'/>
    <serial type='file'><source path='/dev/null'/><target port='0'/></serial>
  </devices>
</domain>"#;
        assert_eq!(live_disks(xml).unwrap(), vec![nbd("vda", "root")]);
        // What this module writes reads back the same.
        let mut s = spec();
        s.disks = vec![nbd("vda", "root"), nbd("vdb", "data")];
        assert_eq!(live_disks(&s.to_xml().unwrap()).unwrap(), s.disks);
        let err = live_disks("<domain><devices><disk>").unwrap_err();
        assert!(matches!(err, DomainError::Parse { .. }), "{err}");
    }

    #[test]
    fn a_disk_alone_is_the_same_element_as_in_the_domain() {
        let disk = nbd("vdb", "data");
        let xml = disk_xml(&disk).unwrap();
        assert!(
            xml.starts_with("<disk type=\"network\" device=\"disk\">"),
            "{xml}"
        );
        let wrapped = format!("<domain><devices>{xml}</devices></domain>");
        assert_eq!(live_disks(&wrapped).unwrap(), vec![disk.clone()]);
        let bad = NbdDisk {
            target_dev: "sda".to_owned(),
            ..disk.clone()
        };
        assert!(
            disk_xml(&bad)
                .unwrap_err()
                .to_string()
                .contains("target_dev")
        );
        let bad = NbdDisk {
            export_name: String::new(),
            ..disk
        };
        assert!(
            disk_xml(&bad)
                .unwrap_err()
                .to_string()
                .contains("export_name")
        );
    }

    #[test]
    fn disk_changes_follow_sources_not_device_names() {
        let (root, data, logs) = (nbd("vda", "root"), nbd("vdb", "data"), nbd("vdc", "logs"));
        let one = std::slice::from_ref(&root);
        assert_eq!(disk_changes(one, one), DiskChanges::default());
        // Added: under its spec's name.
        assert_eq!(
            disk_changes(one, &[root.clone(), data.clone()]),
            DiskChanges {
                attach: vec![data.clone()],
                detach: vec![]
            }
        );
        // Dropped: the spec renames the one after it, which stays as it runs.
        let changes = disk_changes(&[root.clone(), data.clone()], &[nbd("vda", "data")]);
        assert_eq!(
            changes,
            DiskChanges {
                attach: vec![],
                detach: vec![root.clone()]
            }
        );
        // Added under a name a live disk holds: the first free one.
        let changes = disk_changes(
            &[root.clone(), nbd("vdb", "logs")],
            &[root.clone(), data.clone(), logs.clone()],
        );
        assert_eq!(changes.attach, vec![nbd("vdc", "data")]);
        assert!(changes.detach.is_empty());
        // Another server or port is another disk.
        let moved = NbdDisk {
            port: 10810,
            ..root.clone()
        };
        assert_eq!(
            disk_changes(one, std::slice::from_ref(&moved)),
            DiskChanges {
                attach: vec![NbdDisk {
                    target_dev: "vdb".to_owned(),
                    ..moved
                }],
                detach: vec![root]
            }
        );
    }
}
