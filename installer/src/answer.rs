//! The answer file: what an unattended install needs to know, as YAML.
//!
//! Invariants: a file that [`AnswerFile::parse`] accepts has no unknown
//! field, every value has the right form (addresses, device paths, keys),
//! and the rules between fields hold (a join node has a control-plane
//! address and a token, a static address has its gateway in its subnet, the
//! pool is not the install disk, ...). Every error names the field's path,
//! e.g. `network.address: not an IPv4 CIDR`. Parsing touches nothing on
//! the host: it runs before any disk is looked at.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Port of the control plane's admin, agent and Raft API.
pub const CONTROL_PORT: u16 = 7400;
/// Port this node advertises for the agent.
pub const AGENT_PORT: u16 = 7500;

/// A whole answer file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerFile {
    /// `create` starts a new cluster on this node; `join` adds the node to
    /// an existing one.
    pub mode: Mode,
    /// The node's name and host name: a DNS label.
    pub node_name: NodeName,
    /// How the node reaches the network.
    pub network: Network,
    /// Which disk the system goes on (erased).
    pub install_disk: DiskFilter,
    /// Where the node's storage pool lives.
    pub storage: Storage,
    /// The control plane: where it is, the join token, membership.
    #[serde(default)]
    pub control_plane: ControlPlane,
    /// Public keys allowed to log in as root over SSH.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<SshKey>,
    /// A crypt(3) hash for root's console password; without it root has
    /// no password (console login refused).
    #[serde(default)]
    pub root_password_hash: Option<PasswordHash>,
    /// What the installer does when it is done.
    #[serde(default)]
    pub after_install: AfterInstall,
}

/// Whether the node starts a cluster or joins one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Bootstrap a new cluster: this node runs its first control-plane
    /// member and an agent.
    Create,
    /// Join an existing cluster with a join token.
    Join,
}

/// What happens after a successful install.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterInstall {
    /// Reboot into the installed system.
    #[default]
    Reboot,
    /// Power off (for image builds and tests).
    Poweroff,
}

/// The node's network: DHCP or a static address, on one interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Which interface; the first Ethernet interface with a link when unset.
    #[serde(default)]
    pub interface: Option<InterfaceSelector>,
    /// Configure the interface with DHCP.
    #[serde(default)]
    pub dhcp: bool,
    /// A static address with its prefix length, e.g. `10.0.0.11/24`.
    #[serde(default)]
    pub address: Option<Ipv4Cidr>,
    /// The default gateway (inside `address`'s subnet).
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
}

/// Picks one network interface, by name or by MAC address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSelector {
    /// The kernel's name for it, e.g. `eno1`.
    #[serde(default)]
    pub name: Option<InterfaceName>,
    /// Its MAC address, e.g. `52:54:00:12:34:56`.
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

/// Chooses a disk: every condition set must hold; among the disks that
/// match, `prefer` picks one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFilter {
    /// The device path, e.g. `/dev/sda` or `/dev/disk/by-id/...`.
    #[serde(default)]
    pub path: Option<DevicePath>,
    /// A pattern for the disk's model (`*` any run of characters, `?` one).
    #[serde(default)]
    pub model: Option<Pattern>,
    /// A pattern for the disk's serial number.
    #[serde(default)]
    pub serial: Option<Pattern>,
    /// At least this many GiB.
    #[serde(default)]
    pub min_size_gib: Option<u64>,
    /// At most this many GiB.
    #[serde(default)]
    pub max_size_gib: Option<u64>,
    /// Which of several matching disks.
    #[serde(default)]
    pub prefer: Prefer,
}

/// Which of several matching disks a filter picks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    /// The smallest (ties: the first by path).
    #[default]
    Smallest,
    /// The largest (ties: the first by path).
    Largest,
}

/// Where the storage pool lives: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// A whole block device given by path (erased).
    #[serde(default)]
    pub pool_device: Option<DevicePath>,
    /// A whole disk chosen by a filter (erased; never the install disk).
    #[serde(default)]
    pub pool_disk: Option<DiskFilter>,
    /// A sparse file of this many GiB on the root filesystem.
    #[serde(default)]
    pub pool_file_gib: Option<u64>,
}

/// The control plane as this node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    /// `join`: a control-plane member's `host:port`. `create`: the address
    /// others reach this node's member at (default: the static address and
    /// port 7400; required with DHCP).
    #[serde(default)]
    pub address: Option<HostPort>,
    /// `join` only: the token from `basalt token create`.
    #[serde(default)]
    pub join_token: Option<JoinToken>,
    /// `join` only: this node also becomes a control-plane member.
    #[serde(default)]
    pub member: bool,
    /// `join` with `member: true`: the member's Raft id (2 or more; unique).
    #[serde(default)]
    pub node_id: Option<u64>,
}

/// One problem in an answer file, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, e.g. `network.address` or `ssh_authorized_keys[1]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Why an answer file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The file could not be read.
    #[error("reading answer file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file has one or more invalid fields.
    #[error("{}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// Every problem found (parsing stops at the first form error;
        /// the rules between fields are all checked).
        errors: Vec<FieldError>,
    },
}

impl AnswerError {
    /// The field errors (empty for a read error).
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            Self::Invalid { errors } => errors,
            Self::Read { .. } => &[],
        }
    }
}

impl AnswerFile {
    /// Reads and checks the answer file at `path`.
    pub fn load(path: &Path) -> Result<Self, AnswerError> {
        let text = std::fs::read_to_string(path).map_err(|source| AnswerError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks an answer file's text.
    pub fn parse(text: &str) -> Result<Self, AnswerError> {
        let deserializer = serde_norway::Deserializer::from_str(text);
        let answers: Self = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let field = match err.path().to_string() {
                path if path == "." || path.is_empty() => "answer file".to_owned(),
                path => path,
            };
            AnswerError::Invalid {
                errors: vec![FieldError {
                    field,
                    reason: serde_reason(err.inner()),
                }],
            }
        })?;
        let errors = answers.check();
        if errors.is_empty() {
            Ok(answers)
        } else {
            Err(AnswerError::Invalid { errors })
        }
    }

    /// The rules between fields; every violation, in file order.
    pub fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut fail = |field: &str, reason: String| {
            errors.push(FieldError {
                field: field.to_owned(),
                reason,
            });
        };

        // network
        let net = &self.network;
        if let Some(selector) = &net.interface
            && selector.name.is_some() == selector.mac.is_some()
        {
            fail("network.interface", "set exactly one of name or mac".into());
        }
        match (net.dhcp, &net.address) {
            (false, None) => fail(
                "network",
                "set `dhcp: true` or a static `address` (e.g. 10.0.0.11/24)".into(),
            ),
            (true, Some(_)) => fail(
                "network.address",
                "not allowed with `dhcp: true` (choose one)".into(),
            ),
            _ => {}
        }
        if net.dhcp {
            if net.gateway.is_some() {
                fail("network.gateway", "not allowed with `dhcp: true`".into());
            }
            if !net.dns.is_empty() {
                fail("network.dns", "not allowed with `dhcp: true`".into());
            }
        }
        if let Some(cidr) = &net.address {
            if let Some(reason) = cidr.host_problem() {
                fail("network.address", reason);
            }
            if let Some(gateway) = net.gateway {
                if !cidr.contains(gateway) {
                    fail(
                        "network.gateway",
                        format!("{gateway} is outside the subnet {}", cidr.network()),
                    );
                } else if gateway == cidr.addr {
                    fail("network.gateway", "is the node's own address".into());
                }
            }
        }

        // disks
        check_filter("install_disk", &self.install_disk, &mut fail);
        let storage = &self.storage;
        let set = [
            storage.pool_device.is_some(),
            storage.pool_disk.is_some(),
            storage.pool_file_gib.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            fail(
                "storage",
                "set exactly one of pool_device, pool_disk or pool_file_gib".into(),
            );
        }
        if let (Some(device), Some(install)) = (&storage.pool_device, &self.install_disk.path)
            && device == install
        {
            fail(
                "storage.pool_device",
                format!("{device} is also the install disk"),
            );
        }
        if let Some(filter) = &storage.pool_disk {
            check_filter("storage.pool_disk", filter, &mut fail);
            if filter.path.is_some() && filter.path == self.install_disk.path {
                fail(
                    "storage.pool_disk.path",
                    "is also the install disk's path".into(),
                );
            }
        }
        if storage.pool_file_gib == Some(0) {
            fail("storage.pool_file_gib", "must be at least 1".into());
        }

        // control plane
        let cp = &self.control_plane;
        match self.mode {
            Mode::Create => {
                if cp.join_token.is_some() {
                    fail(
                        "control_plane.join_token",
                        "only for `mode: join` (a create node makes its own)".into(),
                    );
                }
                if cp.member {
                    fail(
                        "control_plane.member",
                        "only for `mode: join` (a create node is always the first member)".into(),
                    );
                }
                if cp.node_id.is_some() {
                    fail(
                        "control_plane.node_id",
                        "only for `mode: join` (the first member is 1)".into(),
                    );
                }
                if cp.address.is_none() && net.address.is_none() {
                    fail(
                        "control_plane.address",
                        "required for `mode: create` with DHCP: where other nodes reach this one (host:port)"
                            .into(),
                    );
                }
            }
            Mode::Join => {
                if cp.address.is_none() {
                    fail(
                        "control_plane.address",
                        "required for `mode: join`: a control-plane member's host:port".into(),
                    );
                }
                if cp.join_token.is_none() {
                    fail(
                        "control_plane.join_token",
                        "required for `mode: join` (`basalt token create` prints one)".into(),
                    );
                }
                if cp.member && net.address.is_none() {
                    fail(
                        "control_plane.member",
                        "needs a static network.address (other members must reach this one at a fixed address)"
                            .into(),
                    );
                }
                match (cp.member, cp.node_id) {
                    (true, None) => fail(
                        "control_plane.node_id",
                        "required with `member: true` (2 or more, unique in the cluster)".into(),
                    ),
                    (true, Some(id)) if id < 2 => fail(
                        "control_plane.node_id",
                        format!("must be 2 or more (1 is the create node), got {id}"),
                    ),
                    (false, Some(_)) => {
                        fail("control_plane.node_id", "only with `member: true`".into())
                    }
                    _ => {}
                }
            }
        }
        errors
    }

    /// The IPv4 address other nodes reach this node at, when it is known
    /// before boot (a static address).
    pub fn static_ip(&self) -> Option<Ipv4Addr> {
        self.network.address.as_ref().map(|cidr| cidr.addr)
    }
}

fn check_filter(field: &str, filter: &DiskFilter, fail: &mut impl FnMut(&str, String)) {
    if let (Some(min), Some(max)) = (filter.min_size_gib, filter.max_size_gib)
        && max < min
    {
        fail(
            &format!("{field}.max_size_gib"),
            format!("{max} is below min_size_gib ({min})"),
        );
    }
}

/// serde's message without the position suffix's noise, keeping the line.
fn serde_reason(err: &serde_norway::Error) -> String {
    let text = err.to_string();
    // serde_norway prefixes its own path guess ("a.b: ..."); ours is exact.
    match text.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') => rest.to_owned(),
        _ => text,
    }
}

/// Implements `Deserialize` and `Serialize` through `FromStr` and `Display`.
macro_rules! string_form {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
    };
}

/// A DNS label: 1–63 lowercase letters, digits and '-', not at the ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeName(String);

impl NodeName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 63 {
            return Err(format!("{s:?} must be 1 to 63 characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            || s.starts_with('-')
            || s.ends_with('-')
        {
            return Err(format!(
                "{s:?} is not a DNS label (lowercase letters, digits and '-', not at the ends)"
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_form!(NodeName);

/// An IPv4 address with a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// The prefix length, 0–32.
    pub prefix: u8,
}

impl Ipv4Cidr {
    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The subnet, e.g. `10.0.0.0/24`.
    pub fn network(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix: self.prefix,
        }
    }

    /// Whether `ip` is inside this subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// Why the address cannot be a host's, if it cannot.
    fn host_problem(&self) -> Option<String> {
        if self.prefix == 0 {
            return Some("a /0 prefix is not a subnet".into());
        }
        if self.prefix < 31 {
            let host = u32::from(self.addr) & !self.mask();
            if host == 0 {
                return Some(format!("{} is the subnet's network address", self.addr));
            }
            if host == !self.mask() {
                return Some(format!("{} is the subnet's broadcast address", self.addr));
            }
        }
        if self.addr.is_unspecified() || self.addr.is_multicast() || self.addr.is_loopback() {
            return Some(format!("{} cannot be a host address", self.addr));
        }
        None
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("not an IPv4 CIDR (like 10.0.0.11/24): {s:?}");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
string_form!(Ipv4Cidr);

/// A network interface name as the kernel accepts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceName(String);

impl InterfaceName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for InterfaceName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty()
            || s.len() > 15
            || s == "."
            || s == ".."
            || s.bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
        {
            return Err(format!(
                "{s:?} is not an interface name (1-15 characters, no '/', ':' or spaces)"
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_form!(InterfaceName);

/// A MAC address, kept in lowercase `aa:bb:cc:dd:ee:ff` form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacAddr(String);

impl MacAddr {
    /// The address in lowercase.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6
            || parts
                .iter()
                .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!("not a MAC address (like 52:54:00:12:34:56): {s:?}"));
        }
        Ok(Self(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_form!(MacAddr);

/// An absolute path under `/dev/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePath(PathBuf);

impl DevicePath {
    /// The path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl FromStr for DevicePath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with("/dev/") || s.len() == 5 || s.contains("/../") || s.ends_with("/..") {
            return Err(format!(
                "not a device path (like /dev/sda or /dev/disk/by-id/...): {s:?}"
            ));
        }
        Ok(Self(PathBuf::from(s)))
    }
}

impl fmt::Display for DevicePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.display())
    }
}
string_form!(DevicePath);

/// A shell-style pattern: `*` matches any run of characters, `?` one;
/// everything else matches itself (case-sensitive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        let pattern: Vec<char> = self.0.chars().collect();
        let text: Vec<char> = text.chars().collect();
        // Iterative wildcard matching with one backtrack point.
        let (mut p, mut t) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
                p += 1;
                t += 1;
            } else if p < pattern.len() && pattern[p] == '*' {
                star = Some((p, t));
                p += 1;
            } else if let Some((sp, st)) = star {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        pattern[p..].iter().all(|c| *c == '*')
    }
}

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an empty pattern matches nothing; leave the field out instead".into());
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_form!(Pattern);

/// `host:port`, with a non-empty host and a port number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// The host name or address (IPv6 in brackets).
    pub host: String,
    /// The port.
    pub port: u16,
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("not host:port (like 10.0.0.11:7400): {s:?}");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let bracketed = host.starts_with('[') && host.ends_with(']');
        if host.is_empty()
            || port == 0
            || (!bracketed && host.contains(':'))
            || host.bytes().any(|b| b.is_ascii_whitespace() || b == b'/')
        {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}
string_form!(HostPort);

/// A join token, `NAME.SECRET`; `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(String);

impl JoinToken {
    /// The whole token, secret included.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.0.split_once('.').map_or("?", |(name, _)| name);
        write!(f, "JoinToken({name}.***)")
    }
}

impl FromStr for JoinToken {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = "not a join token (NAME.SECRET, as `basalt token create` prints it)";
        let Some((name, secret)) = s.split_once('.') else {
            return Err(bad.into());
        };
        if name.is_empty()
            || secret.is_empty()
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(bad.into());
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_form!(JoinToken);

/// An OpenSSH public key line: a known type, a base64 blob, a comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshKey(String);

impl SshKey {
    /// The key line.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SshKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const TYPES: &[&str] = &[
            "ssh-ed25519",
            "ssh-rsa",
            "ecdsa-sha2-nistp256",
            "ecdsa-sha2-nistp384",
            "ecdsa-sha2-nistp521",
            "sk-ssh-ed25519@openssh.com",
            "sk-ecdsa-sha2-nistp256@openssh.com",
        ];
        let s = s.trim();
        let mut words = s.split_whitespace();
        let kind = words.next().unwrap_or_default();
        if !TYPES.contains(&kind) {
            return Err(format!(
                "not an SSH public key: type {kind:?} is none of {}",
                TYPES.join(", ")
            ));
        }
        let blob = words.next().unwrap_or_default();
        if blob.len() < 16
            || !blob
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
        {
            return Err("not an SSH public key: the key data is not base64".into());
        }
        if s.contains('\n') {
            return Err("one key per list item".into());
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for SshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_form!(SshKey);

/// A crypt(3) password hash (`$id$...`), as `mkpasswd` prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

impl PasswordHash {
    /// The hash.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(***)")
    }
}

impl FromStr for PasswordHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('$')
            || s.matches('$').count() < 3
            || s.bytes().any(|b| b == b':' || b.is_ascii_whitespace())
        {
            return Err(
                "not a crypt(3) hash (like the output of `mkpasswd -m yescrypt`); never a plain password"
                    .into(),
            );
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_form!(PasswordHash);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_a_shell() {
        let p: Pattern = "QEMU*DISK?".parse().unwrap();
        assert!(p.matches("QEMU HARDDISK1"));
        assert!(!p.matches("QEMU HARDDISK"));
        assert!(!p.matches("XQEMU HARDDISK1"));
        let any: Pattern = "*".parse().unwrap();
        assert!(any.matches(""));
        let exact: Pattern = "S123".parse().unwrap();
        assert!(exact.matches("S123") && !exact.matches("S1234"));
        let mid: Pattern = "a*b*c".parse().unwrap();
        assert!(mid.matches("aXXbYYc") && mid.matches("abc") && !mid.matches("acb"));
    }

    #[test]
    fn cidr_subnets() {
        let c: Ipv4Cidr = "10.0.0.11/24".parse().unwrap();
        assert!(c.contains("10.0.0.1".parse().unwrap()));
        assert!(!c.contains("10.0.1.1".parse().unwrap()));
        assert_eq!(c.network().to_string(), "10.0.0.0/24");
        assert!(
            "10.0.0.0/24"
                .parse::<Ipv4Cidr>()
                .unwrap()
                .host_problem()
                .is_some()
        );
        assert!(
            "10.0.0.255/24"
                .parse::<Ipv4Cidr>()
                .unwrap()
                .host_problem()
                .is_some()
        );
        assert!("10.0.0.1/33".parse::<Ipv4Cidr>().is_err());
        assert!("10.0.0.1".parse::<Ipv4Cidr>().is_err());
        let p2p: Ipv4Cidr = "10.0.0.0/31".parse().unwrap();
        assert!(p2p.host_problem().is_none());
    }

    #[test]
    fn host_ports() {
        assert!("n1:7400".parse::<HostPort>().is_ok());
        assert!("[fd00::1]:7400".parse::<HostPort>().is_ok());
        assert!("fd00::1:7400".parse::<HostPort>().is_err());
        assert!(":7400".parse::<HostPort>().is_err());
        assert!("n1:0".parse::<HostPort>().is_err());
        assert!("n1".parse::<HostPort>().is_err());
    }

    #[test]
    fn token_debug_hides_the_secret() {
        let token: JoinToken = "join-n2.s3cr3t".parse().unwrap();
        assert_eq!(format!("{token:?}"), "JoinToken(join-n2.***)");
        assert!("nodot".parse::<JoinToken>().is_err());
    }
}
