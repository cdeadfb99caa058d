//! The install plan: a pure function of the answer file and what the
//! machine has (disks, network links, KVM). It says which disk is erased,
//! how it is partitioned, where the pool goes and every file the installed
//! node gets. `basalt-install plan` prints it; `basalt-install run`
//! carries it out (see [`crate::execute`]).
//!
//! Invariants: planning never touches the host; the install disk and the
//! pool disk differ and neither is the boot medium; every config file the
//! plan writes is one the daemon's own parser accepts (tested).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::answer::{AGENT_PORT, AnswerFile, CONTROL_PORT, Mode};
use crate::disks::{self, Disk, DiskError, GIB, human_size};

/// Space the system needs on the install disk, without a pool file.
pub const MIN_SYSTEM_GIB: u64 = 4;

/// Where the node's configuration lives on the installed system.
pub const CONFIG_DIR: &str = "/etc/basalt";

/// What the machine has, as far as the plan cares.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// Every block device.
    pub disks: Vec<Disk>,
    /// Network links; `None` when unknown (the interface is then chosen
    /// at install time).
    pub links: Option<Vec<Link>>,
    /// Disks that must not be chosen, with the reason (the boot medium).
    pub exclude: Vec<(PathBuf, String)>,
    /// Whether `/dev/kvm` exists (guests then use KVM).
    pub kvm: bool,
}

/// A network link, as `ip -json link` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Link {
    /// Its name.
    pub ifname: String,
    /// Its MAC address.
    #[serde(default)]
    pub address: Option<String>,
    /// `ether`, `loopback`, ...
    #[serde(default)]
    pub link_type: Option<String>,
    /// `UP`, `DOWN`, `UNKNOWN`, ...
    #[serde(default)]
    pub operstate: Option<String>,
}

impl Link {
    /// Reads `ip -json link show`.
    pub fn parse_ip_json(json: &str) -> Result<Vec<Link>, PlanError> {
        serde_json::from_str(json).map_err(|err| PlanError::Links {
            reason: err.to_string(),
        })
    }

    /// A physical-looking Ethernet link (not a bridge, veth or tap that
    /// virtualization software made).
    fn is_candidate(&self) -> bool {
        const VIRTUAL: &[&str] = &["veth", "virbr", "docker", "br-", "tap", "vnet", "bond"];
        self.link_type.as_deref() == Some("ether")
            && self.address.is_some()
            && !VIRTUAL.iter().any(|p| self.ifname.starts_with(p))
    }
}

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A disk filter chose nothing.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The install disk is too small.
    #[error("install_disk: {disk} is too small: the system needs {MIN_SYSTEM_GIB} GiB{}", if *.need > MIN_SYSTEM_GIB { format!(" plus storage.pool_file_gib ({} GiB)", .need - MIN_SYSTEM_GIB) } else { String::new() })]
    TooSmall {
        /// The disk.
        disk: String,
        /// What it needs.
        need: u64,
    },
    /// The link list did not parse.
    #[error("reading the network links (ip -json link): {reason}")]
    Links {
        /// What was wrong.
        reason: String,
    },
    /// No interface matches `network.interface`.
    #[error("network.interface: {reason}")]
    NoInterface {
        /// Which links exist.
        reason: String,
    },
}

/// One partition of the install disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its number (1-based).
    pub number: u32,
    /// Its GPT name.
    pub name: &'static str,
    /// Its GPT type GUID.
    pub type_guid: &'static str,
    /// Its size in MiB; `None` for the rest of the disk.
    pub size_mib: Option<u64>,
    /// The filesystem made on it, if any.
    pub filesystem: Option<Filesystem>,
    /// Where the installed system mounts it.
    pub mount: Option<&'static str>,
    /// Its device path, e.g. `/dev/vda3` or `/dev/nvme0n1p3`.
    pub device: PathBuf,
}

/// A filesystem the installer makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filesystem {
    /// FAT32, for the EFI system partition.
    Vfat,
    /// ext4, for the root filesystem.
    Ext4,
}

impl Filesystem {
    /// Its name in fstab and mkfs.
    pub fn name(self) -> &'static str {
        match self {
            Filesystem::Vfat => "vfat",
            Filesystem::Ext4 => "ext4",
        }
    }
}

/// Where the storage pool goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolPlan {
    /// A whole block device (erased).
    Device {
        /// The device.
        path: PathBuf,
        /// Its size.
        size_bytes: u64,
    },
    /// A sparse file on the root filesystem.
    File {
        /// The file on the installed system.
        path: PathBuf,
        /// Its size in GiB.
        size_gib: u64,
    },
}

impl PoolPlan {
    /// The pool's path on the installed system.
    pub fn path(&self) -> &Path {
        match self {
            PoolPlan::Device { path, .. } | PoolPlan::File { path, .. } => path,
        }
    }

    /// Its size in bytes.
    pub fn size_bytes(&self) -> u64 {
        match self {
            PoolPlan::Device { size_bytes, .. } => *size_bytes,
            PoolPlan::File { size_gib, .. } => size_gib * GIB,
        }
    }
}

/// How the installed system finds its network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceMatch {
    /// By name.
    Name(String),
    /// By MAC address.
    Mac(String),
    /// The first Ethernet link with a carrier, resolved to its MAC at
    /// install time (only in plans made without a link list).
    FirstEthernetAtInstall,
}

/// A file the installed node gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFile {
    /// Its absolute path on the installed system.
    pub path: PathBuf,
    /// Its permission bits.
    pub mode: u32,
    /// Its content.
    pub content: String,
}

/// Everything the install does, decided before anything is touched.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The disk that is erased and gets the system.
    pub install_disk: Disk,
    /// Its partitions, in order.
    pub partitions: Vec<Partition>,
    /// The storage pool.
    pub pool: PoolPlan,
    /// The network interface.
    pub interface: InterfaceMatch,
    /// The systemd units to enable.
    pub units: Vec<&'static str>,
    /// Files written onto the installed system.
    pub files: Vec<NodeFile>,
    /// What the installer does at the end.
    pub after_install: crate::answer::AfterInstall,
}

/// Path of a partition device: `/dev/vda` + 3 = `/dev/vda3`, and
/// `/dev/nvme0n1` + 3 = `/dev/nvme0n1p3` (a disk name ending in a digit
/// takes a `p`).
pub fn partition_device(disk: &Path, number: u32) -> PathBuf {
    let text = disk.to_string_lossy();
    if text.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{text}p{number}"))
    } else {
        PathBuf::from(format!("{text}{number}"))
    }
}

/// Makes the plan. `resolve` turns filter paths (maybe `/dev/disk/by-*`
/// links) into device paths.
pub fn plan(
    answers: &AnswerFile,
    inventory: &Inventory,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Plan, PlanError> {
    let install = disks::select(
        "install_disk",
        &answers.install_disk,
        &inventory.disks,
        &inventory.exclude,
        resolve,
    )?
    .clone();
    let storage = &answers.storage;
    let need = MIN_SYSTEM_GIB + storage.pool_file_gib.unwrap_or(0);
    if install.size_bytes < need * GIB {
        return Err(PlanError::TooSmall {
            disk: install.describe(),
            need,
        });
    }
    let pool = if let Some(device) = &storage.pool_device {
        let path = resolve(device.as_path());
        let size_bytes = inventory
            .disks
            .iter()
            .find(|d| d.path == path)
            .map_or(0, |d| d.size_bytes);
        if path == install.path {
            return Err(DiskError::NoMatch {
                field: "storage.pool_device".into(),
                passed_over: vec![(path, "is the install disk".into())],
            }
            .into());
        }
        PoolPlan::Device { path, size_bytes }
    } else if let Some(filter) = &storage.pool_disk {
        let mut exclude = inventory.exclude.clone();
        exclude.push((install.path.clone(), "the install disk".into()));
        let disk = disks::select(
            "storage.pool_disk",
            filter,
            &inventory.disks,
            &exclude,
            resolve,
        )?;
        PoolPlan::Device {
            path: disk.path.clone(),
            size_bytes: disk.size_bytes,
        }
    } else {
        PoolPlan::File {
            path: PathBuf::from("/var/lib/basalt/pool.img"),
            size_gib: storage.pool_file_gib.unwrap_or(1),
        }
    };
    let interface = choose_interface(answers, inventory.links.as_deref())?;

    let disk = &install.path;
    let partitions = vec![
        Partition {
            number: 1,
            name: "bios",
            type_guid: "21686148-6449-6E6F-744E-656564454649",
            size_mib: Some(1),
            filesystem: None,
            mount: None,
            device: partition_device(disk, 1),
        },
        Partition {
            number: 2,
            name: "efi",
            type_guid: "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            size_mib: Some(512),
            filesystem: Some(Filesystem::Vfat),
            mount: Some("/boot/efi"),
            device: partition_device(disk, 2),
        },
        Partition {
            number: 3,
            name: "basalt-root",
            type_guid: "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
            size_mib: None,
            filesystem: Some(Filesystem::Ext4),
            mount: Some("/"),
            device: partition_device(disk, 3),
        },
    ];
    let mut units = vec!["systemd-networkd.service", "ssh.service"];
    if control_member(answers) {
        units.push("basalt-control.service");
    }
    if answers.mode == Mode::Create {
        units.push("basalt-firstboot.service");
    }
    units.extend(["basalt-storage.service", "basalt-agent.service"]);
    let files = node_files(answers, &pool, &interface, inventory.kvm);
    Ok(Plan {
        install_disk: install,
        partitions,
        pool,
        interface,
        units,
        files,
        after_install: answers.after_install,
    })
}

fn choose_interface(
    answers: &AnswerFile,
    links: Option<&[Link]>,
) -> Result<InterfaceMatch, PlanError> {
    let selector = answers.network.interface.as_ref();
    if let Some(name) = selector.and_then(|s| s.name.as_ref()) {
        if let Some(links) = links
            && !links.iter().any(|l| l.ifname == name.as_str())
        {
            return Err(PlanError::NoInterface {
                reason: format!("no link named {name} (links: {})", names(links)),
            });
        }
        return Ok(InterfaceMatch::Name(name.to_string()));
    }
    if let Some(mac) = selector.and_then(|s| s.mac.as_ref()) {
        if let Some(links) = links
            && !links.iter().any(|l| {
                l.address.as_deref().map(str::to_ascii_lowercase).as_deref() == Some(mac.as_str())
            })
        {
            return Err(PlanError::NoInterface {
                reason: format!("no link with MAC {mac} (links: {})", names(links)),
            });
        }
        return Ok(InterfaceMatch::Mac(mac.to_string()));
    }
    let Some(links) = links else {
        return Ok(InterfaceMatch::FirstEthernetAtInstall);
    };
    let candidates: Vec<&Link> = links.iter().filter(|l| l.is_candidate()).collect();
    let chosen = candidates
        .iter()
        .find(|l| l.operstate.as_deref() == Some("UP"))
        .or_else(|| candidates.first())
        .ok_or_else(|| PlanError::NoInterface {
            reason: format!("no Ethernet link found (links: {})", names(links)),
        })?;
    Ok(InterfaceMatch::Mac(
        chosen
            .address
            .clone()
            .unwrap_or_default()
            .to_ascii_lowercase(),
    ))
}

fn names(links: &[Link]) -> String {
    if links.is_empty() {
        return "none".into();
    }
    links
        .iter()
        .map(|l| l.ifname.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether this node runs a control-plane member.
pub fn control_member(answers: &AnswerFile) -> bool {
    answers.mode == Mode::Create || answers.control_plane.member
}

/// The address others reach this node's control-plane member at.
fn advertise(answers: &AnswerFile) -> String {
    if answers.mode == Mode::Create
        && let Some(address) = &answers.control_plane.address
    {
        return address.to_string();
    }
    match answers.static_ip() {
        Some(ip) => format!("{ip}:{CONTROL_PORT}"),
        None => format!("{}:{CONTROL_PORT}", answers.node_name),
    }
}

/// The files the installed node gets: host name, network, SSH keys and
/// Basalt's configs (the templates in `deploy/etc/basalt/` filled in).
pub fn node_files(
    answers: &AnswerFile,
    pool: &PoolPlan,
    interface: &InterfaceMatch,
    kvm: bool,
) -> Vec<NodeFile> {
    let name = answers.node_name.as_str();
    let file = |path: &str, mode: u32, content: String| NodeFile {
        path: PathBuf::from(path),
        mode,
        content,
    };
    let mut files = vec![
        file("/etc/hostname", 0o644, format!("{name}\n")),
        file(
            "/etc/hosts",
            0o644,
            format!(
                "127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            ),
        ),
        file(
            "/etc/systemd/network/10-basalt.network",
            0o644,
            network_file(answers, interface),
        ),
    ];
    if !answers.ssh_authorized_keys.is_empty() {
        let keys: String = answers
            .ssh_authorized_keys
            .iter()
            .map(|k| format!("{k}\n"))
            .collect();
        files.push(file("/root/.ssh/authorized_keys", 0o600, keys));
    }

    let server = match (answers.mode, &answers.control_plane.address) {
        (Mode::Join, Some(address)) => address.to_string(),
        _ => advertise(answers),
    };
    if control_member(answers) {
        let mut toml = String::from("# Written by basalt-install from the answer file.\n");
        let node_id = answers.control_plane.node_id.unwrap_or(1);
        let _ = writeln!(toml, "node_id = {node_id}");
        let _ = writeln!(toml, "name = \"{name}\"");
        let _ = writeln!(toml, "listen = \"0.0.0.0:{CONTROL_PORT}\"");
        let _ = writeln!(toml, "advertise = \"{}\"", advertise(answers));
        let _ = writeln!(toml, "data_dir = \"/var/lib/basalt/control\"");
        match answers.mode {
            Mode::Create => toml.push_str("bootstrap = true\n"),
            Mode::Join => {
                let _ = writeln!(toml, "join = \"{server}\"");
            }
        }
        files.push(file("/etc/basalt/control.toml", 0o644, toml));
    }

    let address = match answers.static_ip() {
        Some(ip) => format!("{ip}:{AGENT_PORT}"),
        None => format!("{name}:{AGENT_PORT}"),
    };
    let mut agent = String::from("# Written by basalt-install from the answer file.\n");
    let _ = writeln!(agent, "BASALT_NODE={name}");
    let _ = writeln!(agent, "BASALT_ADDRESS={address}");
    let _ = writeln!(agent, "BASALT_SERVER={server}");
    let _ = writeln!(agent, "BASALT_LIBVIRT_URI=qemu:///system");
    let _ = writeln!(agent, "BASALT_ACCEL={}", if kvm { "kvm" } else { "tcg" });
    let _ = writeln!(agent, "BASALT_CONSOLE_DIR=/var/log/basalt/console");
    let _ = writeln!(
        agent,
        "BASALT_CREDENTIAL_FILE=/var/lib/basalt/agent/node-credential"
    );
    files.push(file("/etc/basalt/agent.env", 0o644, agent));
    if let Some(token) = &answers.control_plane.join_token {
        files.push(file(
            "/etc/basalt/join-token.env",
            0o600,
            format!("BASALT_JOIN_TOKEN={}\n", token.expose()),
        ));
    }

    let mut storage = String::from("# Written by basalt-install from the answer file.\n");
    let _ = writeln!(storage, "BASALT_POOL={}", pool.path().display());
    let _ = writeln!(storage, "BASALT_NBD_LISTEN=127.0.0.1:10809");
    files.push(file("/etc/basalt/storage.env", 0o644, storage));
    if let Some(hash) = &answers.root_password_hash {
        // Applied with `chpasswd -e`; never left on the disk.
        files.push(file(
            "/var/lib/basalt-install/root-password",
            0o600,
            format!("root:{hash}\n"),
        ));
    }
    files
}

fn network_file(answers: &AnswerFile, interface: &InterfaceMatch) -> String {
    let mut text = String::from("# Written by basalt-install from the answer file.\n[Match]\n");
    match interface {
        InterfaceMatch::Name(name) => {
            let _ = writeln!(text, "Name={name}");
        }
        InterfaceMatch::Mac(mac) => {
            let _ = writeln!(text, "MACAddress={mac}");
        }
        InterfaceMatch::FirstEthernetAtInstall => {
            text.push_str("MACAddress=@FIRST_ETHERNET_MAC@\n")
        }
    }
    text.push_str("\n[Network]\n");
    let net = &answers.network;
    if net.dhcp {
        text.push_str("DHCP=ipv4\n");
    }
    if let Some(address) = &net.address {
        let _ = writeln!(text, "Address={address}");
    }
    if let Some(gateway) = net.gateway {
        let _ = writeln!(text, "Gateway={gateway}");
    }
    for dns in &net.dns {
        let _ = writeln!(text, "DNS={dns}");
    }
    text
}

impl Plan {
    /// The `sfdisk` script that partitions the install disk.
    pub fn sfdisk_script(&self) -> String {
        let mut script = String::from("label: gpt\n");
        for p in &self.partitions {
            let size = p
                .size_mib
                .map(|s| format!("size={s}MiB, "))
                .unwrap_or_default();
            let _ = writeln!(script, "{size}type={}, name=\"{}\"", p.type_guid, p.name);
        }
        script
    }

    /// A human-readable account of the plan (what `basalt-install plan`
    /// prints).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "install disk: {} (erased)",
            self.install_disk.describe()
        );
        for p in &self.partitions {
            let _ = writeln!(
                out,
                "  {}  {:<12} {:>10}  {:<5} {}",
                p.device.display(),
                p.name,
                p.size_mib
                    .map_or("rest".to_owned(), |s| human_size(s << 20)),
                p.filesystem.map_or("-", Filesystem::name),
                p.mount.unwrap_or("")
            );
        }
        match &self.pool {
            PoolPlan::Device { path, size_bytes } => {
                let _ = writeln!(
                    out,
                    "storage pool: {} ({}, erased)",
                    path.display(),
                    human_size(*size_bytes)
                );
            }
            PoolPlan::File { path, size_gib } => {
                let _ = writeln!(
                    out,
                    "storage pool: file {} ({size_gib} GiB, sparse)",
                    path.display()
                );
            }
        }
        let interface = match &self.interface {
            InterfaceMatch::Name(name) => format!("named {name}"),
            InterfaceMatch::Mac(mac) => format!("with MAC {mac}"),
            InterfaceMatch::FirstEthernetAtInstall => {
                "the first Ethernet link, chosen at install time".into()
            }
        };
        let _ = writeln!(out, "network interface: {interface}");
        let _ = writeln!(out, "units enabled: {}", self.units.join(", "));
        let _ = writeln!(out, "after install: {:?}", self.after_install);
        out.push_str("sfdisk script:\n");
        for line in self.sfdisk_script().lines() {
            let _ = writeln!(out, "  {line}");
        }
        for f in &self.files {
            let _ = writeln!(out, "file {} (mode {:o}):", f.path.display(), f.mode);
            for line in f.content.lines() {
                if line.starts_with("BASALT_JOIN_TOKEN=") {
                    let _ = writeln!(out, "  BASALT_JOIN_TOKEN=(hidden)");
                } else if line.starts_with("root:") {
                    let _ = writeln!(out, "  root:(hash hidden)");
                } else {
                    let _ = writeln!(out, "  {line}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_follow_the_kernel() {
        assert_eq!(
            partition_device(Path::new("/dev/vda"), 3),
            Path::new("/dev/vda3")
        );
        assert_eq!(
            partition_device(Path::new("/dev/nvme0n1"), 1),
            Path::new("/dev/nvme0n1p1")
        );
        assert_eq!(
            partition_device(Path::new("/dev/mmcblk0"), 2),
            Path::new("/dev/mmcblk0p2")
        );
    }

    #[test]
    fn links_from_ip_json() {
        let json = r#"[{"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","operstate":"UNKNOWN"},
            {"ifindex":2,"ifname":"virbr0","link_type":"ether","address":"52:54:00:00:00:01","operstate":"UP"},
            {"ifindex":3,"ifname":"ens3","link_type":"ether","address":"52:54:00:AB:CD:EF","operstate":"DOWN"},
            {"ifindex":4,"ifname":"ens4","link_type":"ether","address":"52:54:00:12:34:56","operstate":"UP"}]"#;
        let links = Link::parse_ip_json(json).unwrap();
        let answers =
            AnswerFile::parse(include_str!("../tests/answers/good-create-static.yaml")).unwrap();
        let mut answers = answers;
        answers.network.interface = None;
        assert_eq!(
            choose_interface(&answers, Some(&links)).unwrap(),
            InterfaceMatch::Mac("52:54:00:12:34:56".into()),
            "the first Ethernet link with a carrier, never a bridge"
        );
        let down: Vec<Link> = links
            .iter()
            .filter(|l| l.ifname != "ens4")
            .cloned()
            .collect();
        assert_eq!(
            choose_interface(&answers, Some(&down)).unwrap(),
            InterfaceMatch::Mac("52:54:00:ab:cd:ef".into())
        );
        assert_eq!(
            choose_interface(&answers, None).unwrap(),
            InterfaceMatch::FirstEthernetAtInstall
        );
    }
}
