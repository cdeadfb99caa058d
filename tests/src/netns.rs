//! The test network: one bridge in the root namespace and one network
//! namespace per "node", each joined to the bridge by a veth pair.
//!
//! Layout for prefix `bt3fa2` with subnet `10.201.X.0/24`:
//!
//! - bridge `bt3fa2br` in the root namespace, address `10.201.X.254/24`;
//! - node `a` (the first): namespace `bt3fa2-a`, root-side veth `bt3fa2v1`
//!   enslaved to the bridge, inner end `eth0` with `10.201.X.1/24`, `lo`
//!   up, IPv4 forwarding on inside the namespace, no default route.
//!
//! Invariants:
//! - every object is named after the [`Prefix`], so [`crate::sweep`] can
//!   find what a killed test left;
//! - the `/24` is claimed with a file in the claims directory that names
//!   the prefix (created atomically, so parallel tests never share a
//!   subnet); a sweep releases the claims of dead prefixes;
//! - forwarding in the root namespace is never touched: nothing routed
//!   between nodes leaves the machine;
//! - a [`Fabric`] removes what it made when dropped, unless
//!   [`Fabric::detach`]ed (the lab), in which case [`crate::sweep::tear_down`]
//!   removes it.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;

use crate::cmd::{self, CommandError};
use crate::prefix::{Prefix, PrefixError};
use crate::sweep;

/// First two octets of every fabric subnet: fabrics are `10.201.X.0/24`.
pub const SUBNET_BASE: [u8; 2] = [10, 201];

/// Host part of the bridge's (root namespace's) address in every subnet.
pub const GATEWAY_HOST: u8 = 254;

/// Highest host number a node can get (the gateway takes 254).
const MAX_NODES: u8 = 253;

/// Name of the inner veth end in every node.
pub const NODE_IFNAME: &str = "eth0";

/// A fabric or node could not be created, found or entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A node name must be 1–24 characters of `[a-z0-9-]`.
    #[error("invalid node name {name:?} (want 1-24 characters of [a-z0-9-])")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// An interface name derived from the prefix is invalid.
    #[error("could not name an interface")]
    IfName {
        /// Why.
        #[source]
        source: PrefixError,
    },
    /// Every `10.201.X.0/24` is claimed or in use.
    #[error("no free /24 in {}.{}.0.0/16", SUBNET_BASE[0], SUBNET_BASE[1])]
    NoSubnet,
    /// Writing the subnet claim file failed.
    #[error("could not claim a subnet at {path}")]
    Claim {
        /// The claim file (or its temporary twin).
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating or configuring the bridge failed.
    #[error("could not set up bridge {bridge}")]
    Bridge {
        /// The bridge's name.
        bridge: String,
        /// The failed command.
        #[source]
        source: CommandError,
    },
    /// Creating or configuring a node's namespace or veth failed.
    #[error("could not set up node namespace {netns}")]
    Node {
        /// The namespace's name.
        netns: String,
        /// The failed command.
        #[source]
        source: CommandError,
    },
    /// `add_node` was given the name of an existing node.
    #[error("node namespace {netns} already exists")]
    NodeExists {
        /// The namespace's name.
        netns: String,
    },
    /// All host numbers 1..=253 are taken.
    #[error("the fabric already has {MAX_NODES} nodes")]
    Full,
    /// `reattach`: the prefix has no claimed subnet or no bridge.
    #[error("prefix {prefix} has no fabric (no subnet claim, or no bridge)")]
    NoFabric {
        /// The prefix.
        prefix: String,
    },
    /// `existing`/`reattach`: the node's namespace does not exist, or its
    /// `eth0` has no address in the fabric's subnet.
    #[error("node namespace {netns} does not exist or is not set up")]
    NoNode {
        /// The namespace's name.
        netns: String,
    },
    /// Opening or entering a node's namespace failed.
    #[error("could not enter network namespace {netns}")]
    Enter {
        /// The namespace's name.
        netns: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// One node of a fabric: a named network namespace with `eth0` on the
/// fabric's subnet. A cheap, clonable handle; the [`Fabric`] owns the
/// objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    name: String,
    netns: String,
    index: u8,
    addr: Ipv4Addr,
    veth: String,
}

impl Node {
    /// A handle for a node that already exists (made by an earlier process,
    /// e.g. `basaltd lab up`): `index` is its host number in the prefix's
    /// subnet. Checks that the namespace exists and its `eth0` has that
    /// address; changes nothing.
    pub fn existing(prefix: &Prefix, name: &str, index: u8) -> Result<Node, NetnsError> {
        check_node_name(name)?;
        let third = find_claim(prefix.name()).ok_or_else(|| NetnsError::NoFabric {
            prefix: prefix.name().to_owned(),
        })?;
        let node = Node::new(prefix, name, index, third)?;
        if node_index(&node.netns, third) != Some(index) {
            return Err(NetnsError::NoNode { netns: node.netns });
        }
        Ok(node)
    }

    fn new(prefix: &Prefix, name: &str, index: u8, third: u8) -> Result<Node, NetnsError> {
        let veth = prefix
            .ifname(&format!("v{index}"))
            .map_err(|source| NetnsError::IfName { source })?;
        Ok(Node {
            name: name.to_owned(),
            netns: format!("{}-{name}", prefix.name()),
            index,
            addr: host_addr(third, index),
            veth,
        })
    }

    /// The node's short name, as given to [`Fabric::add_node`] (also the
    /// hostname its libvirtd reports).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network namespace's name, `<prefix>-<name>`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Where the namespace is mounted, `/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(sweep::NETNS_DIR).join(&self.netns)
    }

    /// The node's host number in the subnet (1, 2, ...).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The address of the node's `eth0`.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The root-namespace end of the node's veth (a bridge port).
    pub fn veth(&self) -> &str {
        &self.veth
    }

    /// A command that runs `program` inside the node's network namespace,
    /// through `nsenter --net=`: unlike `ip netns exec` it leaves `/sys`
    /// (and `/sys/fs/bpf`) as they are. Add arguments as usual.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a fresh thread that has entered the node's network
    /// namespace (`setns`), and returns its result. Sockets `f` opens live
    /// in the namespace; the calling thread is untouched. A panic in `f` is
    /// resumed on the caller. Fails only if the namespace cannot be entered (e.g. it was deleted).
    pub fn run_in<F, T>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let enter_err = |source| NetnsError::Enter {
            netns: self.netns.clone(),
            source,
        };
        let file = File::open(self.netns_path()).map_err(enter_err)?;
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|errno| enter_err(io::Error::from(errno)))?;
                Ok(f())
            });
            match thread.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `ip ARGS...` inside the node's namespace (`ip -n`); returns its
    /// stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, CommandError> {
        let mut all = vec!["-n", self.netns.as_str()];
        all.extend_from_slice(args);
        cmd::ip(&all)
    }
}

/// A bridge, its `/24` and the nodes joined to it. See the module doc.
#[derive(Debug)]
pub struct Fabric {
    prefix: Prefix,
    bridge: String,
    third: u8,
    nodes: Vec<Node>,
    detached: bool,
}

impl Fabric {
    /// Claims a free `10.201.X.0/24` for `prefix` and creates the bridge
    /// `<prefix>br` with address `.254/24`, up. No nodes yet.
    pub fn new(prefix: &Prefix) -> Result<Fabric, NetnsError> {
        let bridge = prefix
            .ifname("br")
            .map_err(|source| NetnsError::IfName { source })?;
        let third = claim_subnet(prefix)?;
        // From here on, dropping `fabric` undoes what was done.
        let fabric = Fabric {
            prefix: prefix.clone(),
            bridge,
            third,
            nodes: Vec::new(),
            detached: false,
        };
        let gateway = format!("{}/24", fabric.gateway());
        let br = fabric.bridge.as_str();
        let bridge_err = |source| NetnsError::Bridge {
            bridge: br.to_owned(),
            source,
        };
        cmd::ip(&["link", "add", br, "type", "bridge"]).map_err(bridge_err)?;
        cmd::ip(&["addr", "add", &gateway, "dev", br]).map_err(bridge_err)?;
        cmd::ip(&["link", "set", br, "up"]).map_err(bridge_err)?;
        tracing::debug!(prefix = %prefix.name(), bridge = br, subnet = %fabric.subnet(), "fabric created");
        Ok(fabric)
    }

    /// Rebuilds the handle of an existing fabric (made by an earlier
    /// process): finds the prefix's subnet claim, checks the bridge, and
    /// lists the nodes from their namespaces. The handle owns the objects
    /// again: dropping it removes them unless it is [`Fabric::detach`]ed.
    pub fn reattach(prefix: &Prefix) -> Result<Fabric, NetnsError> {
        let no_fabric = || NetnsError::NoFabric {
            prefix: prefix.name().to_owned(),
        };
        let third = find_claim(prefix.name()).ok_or_else(no_fabric)?;
        let bridge = prefix
            .ifname("br")
            .map_err(|source| NetnsError::IfName { source })?;
        if !Path::new("/sys/class/net").join(&bridge).exists() {
            return Err(no_fabric());
        }
        let mut nodes = Vec::new();
        let ns_prefix = format!("{}-", prefix.name());
        for netns in sweep::list_netns() {
            let Some(name) = netns.strip_prefix(&ns_prefix) else {
                continue;
            };
            let index = node_index(&netns, third).ok_or_else(|| NetnsError::NoNode {
                netns: netns.clone(),
            })?;
            nodes.push(Node::new(prefix, name, index, third)?);
        }
        nodes.sort_by_key(|n| n.index);
        Ok(Fabric {
            prefix: prefix.clone(),
            bridge,
            third,
            nodes,
            detached: false,
        })
    }

    /// Adds node `name`: namespace `<prefix>-<name>`, a veth into the
    /// bridge, `eth0` with the next free host number, `lo` up, forwarding
    /// on inside. Fails if the namespace exists already.
    pub fn add_node(&mut self, name: &str) -> Result<Node, NetnsError> {
        check_node_name(name)?;
        let index = (1..=MAX_NODES)
            .find(|i| self.nodes.iter().all(|n| n.index != *i))
            .ok_or(NetnsError::Full)?;
        let node = Node::new(&self.prefix, name, index, self.third)?;
        if node.netns_path().exists() {
            return Err(NetnsError::NodeExists { netns: node.netns });
        }
        match self.set_up_node(&node) {
            Ok(()) => {
                tracing::debug!(netns = %node.netns, addr = %node.addr, "node added");
                self.nodes.push(node.clone());
                Ok(node)
            }
            Err(source) => {
                remove_node(&node);
                Err(NetnsError::Node {
                    netns: node.netns,
                    source,
                })
            }
        }
    }

    /// [`Fabric::add_node`], or the existing node of that name: what an
    /// idempotent `lab up` wants.
    pub fn ensure_node(&mut self, name: &str) -> Result<Node, NetnsError> {
        match self.node(name) {
            Some(node) => Ok(node.clone()),
            None => self.add_node(name),
        }
    }

    fn set_up_node(&self, node: &Node) -> Result<(), CommandError> {
        let ns = node.netns.as_str();
        let veth = node.veth.as_str();
        let addr = format!("{}/24", node.addr);
        cmd::ip(&["netns", "add", ns])?;
        cmd::ip(&[
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            NODE_IFNAME,
            "netns",
            ns,
        ])?;
        cmd::ip(&["link", "set", veth, "master", &self.bridge, "up"])?;
        node.ip(&["addr", "add", &addr, "dev", NODE_IFNAME])?;
        node.ip(&["link", "set", NODE_IFNAME, "up"])?;
        node.ip(&["link", "set", "lo", "up"])?;
        // /proc/sys/net follows the writer's namespace; nsenter keeps /sys.
        cmd::run(
            node.command("sh")
                .args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]),
        )?;
        Ok(())
    }

    /// The nodes, by host number.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node called `name`, if any.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// `(name, address)` of every node: what a private `/etc/hosts` lists
    /// (see [`crate::libvirtd::Libvirtd::start`]).
    pub fn hosts(&self) -> Vec<(String, Ipv4Addr)> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.addr))
            .collect()
    }

    /// The bridge's name, `<prefix>br`.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The subnet's network address (`10.201.X.0`); the prefix length is 24.
    pub fn subnet(&self) -> Ipv4Addr {
        host_addr(self.third, 0)
    }

    /// The bridge's address, `10.201.X.254`: how the root namespace reaches
    /// the nodes.
    pub fn gateway(&self) -> Ipv4Addr {
        host_addr(self.third, GATEWAY_HOST)
    }

    /// The prefix the fabric is named after.
    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    /// Lets the fabric outlive this handle (the lab): dropping it no longer
    /// removes anything; [`crate::sweep::tear_down`] does, and
    /// [`Fabric::reattach`] gets a handle back.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        for node in &self.nodes {
            remove_node(node);
        }
        sweep::delete_link(&self.bridge);
        if let Some(path) = claim_path_of(self.prefix.name(), self.third) {
            sweep::remove_file_logged(&path);
        }
        tracing::debug!(prefix = %self.prefix.name(), "fabric removed");
    }
}

/// Deletes a node's veth (which also removes `eth0`) and namespace.
fn remove_node(node: &Node) {
    sweep::delete_link(&node.veth);
    sweep::delete_netns(&node.netns);
}

fn check_node_name(name: &str) -> Result<(), NetnsError> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NetnsError::InvalidName {
            name: name.to_owned(),
        })
    }
}

fn host_addr(third: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(SUBNET_BASE[0], SUBNET_BASE[1], third, host)
}

/// The claim file for `10.201.<third>.0/24`.
fn claim_path(third: u8) -> PathBuf {
    sweep::claims_dir().join(format!(
        "{}.{}.{third}.0_24",
        SUBNET_BASE[0], SUBNET_BASE[1]
    ))
}

/// The third octet from a claim file's name.
fn parse_claim_name(name: &str) -> Option<u8> {
    let rest = name.strip_prefix(&format!("{}.{}.", SUBNET_BASE[0], SUBNET_BASE[1]))?;
    rest.strip_suffix(".0_24")?.parse().ok()
}

/// The claim path of `third`, if it is still claimed by `prefix`.
fn claim_path_of(prefix: &str, third: u8) -> Option<PathBuf> {
    let path = claim_path(third);
    let owner = fs::read_to_string(&path).ok()?;
    (owner.trim() == prefix).then_some(path)
}

/// The third octet of the subnet claimed by `prefix`, if any.
fn find_claim(prefix: &str) -> Option<u8> {
    let entries = fs::read_dir(sweep::claims_dir()).ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| parse_claim_name(&n))
        .find(|third| claim_path_of(prefix, *third).is_some())
}

/// Claims a free `/24` for `prefix`: the claim file appears atomically
/// with its content (written aside, then hard-linked; `link` fails if the
/// name is taken), so a concurrent sweep never sees an empty claim.
fn claim_subnet(prefix: &Prefix) -> Result<u8, NetnsError> {
    let dir = sweep::claims_dir();
    fs::create_dir_all(&dir).map_err(|source| NetnsError::Claim {
        path: dir.clone(),
        source,
    })?;
    let staged = prefix.dir().join("subnet-claim");
    let stage = || -> io::Result<()> {
        let mut file = File::create(&staged)?;
        writeln!(file, "{}", prefix.name())?;
        file.sync_all()
    };
    stage().map_err(|source| NetnsError::Claim {
        path: staged.clone(),
        source,
    })?;
    let in_use = addresses_in_use();
    // Start at a point derived from the prefix so parallel tests rarely
    // race for the same file.
    let start = prefix
        .name()
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let result = (0..=255u32)
        .map(|i| ((start + i) % 256) as u8)
        .filter(|third| !in_use.contains(third))
        .find_map(|third| {
            let path = claim_path(third);
            match fs::hard_link(&staged, &path) {
                Ok(()) => Some(Ok(third)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
                Err(source) => Some(Err(NetnsError::Claim { path, source })),
            }
        })
        .unwrap_or(Err(NetnsError::NoSubnet));
    sweep::remove_file_logged(&staged);
    result
}

/// Third octets of `10.201.X.*` addresses already on root-namespace links
/// (made by something that is not a claim holder, e.g. by hand).
fn addresses_in_use() -> Vec<u8> {
    let out = cmd::ip(&["-o", "-4", "addr", "show"]).unwrap_or_default();
    out.split_whitespace()
        .filter_map(|word| parse_subnet_addr(word, None))
        .collect()
}

/// `"10.201.X.N/24"` → `X` (if `want_third` is `None`) or `N` (if the
/// address is in `10.201.<want_third>.0/24`).
fn parse_subnet_addr(word: &str, want_third: Option<u8>) -> Option<u8> {
    let (addr, _len) = word.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let [a, b, third, host] = addr.octets();
    if [a, b] != SUBNET_BASE {
        return None;
    }
    match want_third {
        None => Some(third),
        Some(want) if want == third => Some(host),
        Some(_) => None,
    }
}

/// The host number of `eth0` in namespace `netns`, if it is on the subnet.
fn node_index(netns: &str, third: u8) -> Option<u8> {
    let out = cmd::ip(&["-n", netns, "-o", "-4", "addr", "show", "dev", NODE_IFNAME]).ok()?;
    out.split_whitespace()
        .find_map(|word| parse_subnet_addr(word, Some(third)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_names_round_trip() {
        let path = claim_path(42);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert_eq!(name, "10.201.42.0_24");
        assert_eq!(parse_claim_name(name), Some(42));
        assert_eq!(parse_claim_name("10.201.300.0_24"), None);
        assert_eq!(parse_claim_name("10.202.4.0_24"), None);
    }

    #[test]
    fn subnet_addresses_are_parsed() {
        assert_eq!(parse_subnet_addr("10.201.7.3/24", None), Some(7));
        assert_eq!(parse_subnet_addr("10.201.7.3/24", Some(7)), Some(3));
        assert_eq!(parse_subnet_addr("10.201.7.3/24", Some(8)), None);
        assert_eq!(parse_subnet_addr("10.1.7.3/24", None), None);
        assert_eq!(parse_subnet_addr("eth0", None), None);
    }

    #[test]
    fn node_names_are_checked() {
        assert!(check_node_name("node-1").is_ok());
        assert!(check_node_name("").is_err());
        assert!(check_node_name("Node").is_err());
        assert!(check_node_name("a/b").is_err());
        assert!(check_node_name(&"a".repeat(25)).is_err());
    }
}
