//! The aya loader: loads `ebpf/datapath.c` (built by `build.rs`), pins its
//! maps and TCX links under one directory per node, attaches the programs,
//! and is the real [`MapStore`].
//!
//! Layout: `/sys/fs/bpf/basalt/<node>/maps/<map>` and
//! `/sys/fs/bpf/basalt/<node>/links/<ifname>`.
//!
//! Invariants:
//! - maps are pinned by name, so a new loader (an agent restart) reuses the
//!   very maps the running programs use: state survives, nothing is lost;
//! - links are pinned, so they outlive the loader; a new loader replaces the
//!   program of an existing link atomically (`bpf_link_update`), and traffic
//!   never meets an interface without a program;
//! - bpffs is mounted at `/sys/fs/bpf` if it is not yet.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfError, EbpfLoader};

use crate::abi::{
    CT_CLOSING, Config, CtKey, CtValue, DropReason, EndpointValue, EventRecord, IfaceValue,
    PolicyCidrData, PolicyIdKey, RulesValue, SubjectValue,
};
use crate::conntrack::{Timeouts, now_ns};
use crate::sync::{Change, MapState, MapStore};

/// What one connection-tracking sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Entries looked at.
    pub seen: usize,
    /// Entries removed as expired.
    pub expired: usize,
}

/// The size of `struct ct_value` before entries aged (created, packets).
const OLD_CT_VALUE_SIZE: u32 = 16;

/// A conntrack map pinned by an older datapath whose entries have another
/// layout cannot serve the new programs: its flows are read (when the
/// layout is the one before aging), its pin removed so the load makes a
/// new map, and the flows returned to be written into it.
fn take_old_conntrack(pin: &Path) -> Result<Vec<CtKey>, LoaderError> {
    let Ok(info) = aya::maps::MapInfo::from_pin(pin) else {
        // Not pinned yet: a first load.
        return Ok(Vec::new());
    };
    if info.value_size() as usize == size_of::<CtValue>() {
        return Ok(Vec::new());
    }
    let mut keys = Vec::new();
    if info.value_size() == OLD_CT_VALUE_SIZE {
        let old = MapData::from_pin(pin)
            .and_then(aya::maps::Map::from_map_data)
            .map_err(map_err("conntrack"))?;
        let old: HashMap<_, CtKey, [u8; OLD_CT_VALUE_SIZE as usize]> =
            HashMap::try_from(old).map_err(map_err("conntrack"))?;
        keys = old.keys().filter_map(Result::ok).collect();
    }
    tracing::info!(
        value_size = info.value_size(),
        flows = keys.len(),
        "replacing a conntrack map of an older layout"
    );
    std::fs::remove_file(pin).map_err(|source| LoaderError::PinDir {
        path: pin.to_owned(),
        source,
    })?;
    Ok(keys)
}

/// A drop-counter array pinned by an older datapath with fewer reasons
/// cannot count the new ones (a lookup past its end finds nothing): its
/// pin is removed so the load makes one of the right size. The counts
/// start again from zero.
fn drop_short_drops(pin: &Path) -> Result<(), LoaderError> {
    let Ok(info) = aya::maps::MapInfo::from_pin(pin) else {
        return Ok(());
    };
    if info.max_entries() == DropReason::COUNT {
        return Ok(());
    }
    tracing::info!(
        entries = info.max_entries(),
        "replacing a drop-counter map with another number of reasons"
    );
    std::fs::remove_file(pin).map_err(|source| LoaderError::PinDir {
        path: pin.to_owned(),
        source,
    })
}

/// The compiled programs.
static DATAPATH_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath.o"));

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Which program an interface gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A VM tap (or the veth that plays one): `from_vm` on ingress.
    Tap,
    /// The node's VXLAN device: `from_overlay` on ingress.
    Overlay,
    /// The node's underlay interface: `from_uplink` on ingress, the
    /// overlay's fast path (single packets without TCP data decapsulated
    /// and delivered at once; everything else passes on untouched).
    Uplink,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::Tap => "from_vm",
            Hook::Overlay => "from_overlay",
            Hook::Uplink => "from_uplink",
        }
    }
}

/// The datapath could not be loaded, attached, read or written.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// bpffs is not mounted and could not be.
    #[error("could not mount bpffs at {BPFFS}")]
    Bpffs(#[source] io::Error),
    /// A pin directory could not be made or cleaned.
    #[error("could not prepare pin directory {path}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The object could not be loaded (or its pinned maps reused).
    #[error("could not load the datapath object")]
    Load(#[source] Box<EbpfError>),
    /// A program is missing or failed verification.
    #[error("could not load program {name}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map is missing or has the wrong shape.
    #[error("map {name}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        #[source]
        source: Box<MapError>,
    },
    /// Attaching to an interface failed.
    #[error("could not attach {program} to {ifname}")]
    Attach {
        /// The interface.
        ifname: String,
        /// The program.
        program: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The kernel refused to turn BPF statistics on.
    #[error("could not enable BPF run-time statistics")]
    Stats(#[source] io::Error),
    /// Removing a link's pin failed.
    #[error("could not detach {ifname}")]
    Detach {
        /// The interface.
        ifname: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> LoaderError {
    move |source| LoaderError::Map {
        name,
        source: Box::new(source),
    }
}

/// The loaded datapath of one node.
pub struct Loader {
    ebpf: Ebpf,
    dir: PathBuf,
    config: Array<MapData, Config>,
    endpoints: HashMap<MapData, u32, EndpointValue>,
    ifaces: HashMap<MapData, u32, IfaceValue>,
    networks: LpmTrie<MapData, u32, u32>,
    subjects: HashMap<MapData, u32, SubjectValue>,
    policy_cidr: LpmTrie<MapData, PolicyCidrData, RulesValue>,
    policy_id: HashMap<MapData, PolicyIdKey, RulesValue>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    drops: PerCpuArray<MapData, u64>,
    events: RingBuf<MapData>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The pin directory of `node`.
pub fn pin_dir(node: &str) -> PathBuf {
    Path::new(BPFFS).join("basalt").join(node)
}

/// Mounts bpffs at [`BPFFS`] unless it is there.
pub fn ensure_bpffs() -> Result<(), LoaderError> {
    if nix::sys::statfs::statfs(BPFFS)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
    {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| LoaderError::Bpffs(io::Error::from(e)))
}

/// Turns the kernel's BPF run-time statistics on (what
/// [`Loader::program_stats`] reads) for as long as the returned descriptor
/// is open. They cost two clock reads per program run: measure with them,
/// never leave them on.
pub fn enable_stats() -> Result<std::os::fd::OwnedFd, LoaderError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| LoaderError::Stats(e.io_error))
}

/// Removes a node's pins: its links detach, its maps go once no program
/// uses them. What a node's teardown (or a test's cleanup) calls.
pub fn remove_pins(node: &str) -> Result<(), LoaderError> {
    let path = pin_dir(node);
    match std::fs::remove_dir_all(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LoaderError::PinDir { path, source }),
    }
}

impl Loader {
    /// Loads the programs for `node`, reusing its pinned maps if any.
    pub fn load(node: &str) -> Result<Loader, LoaderError> {
        ensure_bpffs()?;
        let dir = pin_dir(node);
        for sub in ["maps", "links"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(|source| LoaderError::PinDir { path, source })?;
        }
        let carried = take_old_conntrack(&dir.join("maps").join("conntrack"))?;
        drop_short_drops(&dir.join("maps").join("drops"))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir.join("maps"))
            .load(DATAPATH_OBJ)
            .map_err(|e| LoaderError::Load(Box::new(e)))?;
        for hook in [Hook::Tap, Hook::Overlay, Hook::Uplink] {
            let name = hook.program();
            let prog_err = |source| LoaderError::Program {
                name,
                source: Box::new(source),
            };
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(ProgramError::UnexpectedProgramType)
                .and_then(TryInto::try_into)
                .map_err(prog_err)?;
            prog.load().map_err(prog_err)?;
        }
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(LoaderError::Map {
                name,
                source: Box::new(MapError::InvalidName {
                    name: name.to_owned(),
                }),
            })
        };
        let config = Array::try_from(take("config")?).map_err(map_err("config"))?;
        let endpoints = HashMap::try_from(take("endpoints")?).map_err(map_err("endpoints"))?;
        let ifaces = HashMap::try_from(take("ifaces")?).map_err(map_err("ifaces"))?;
        let networks = LpmTrie::try_from(take("networks")?).map_err(map_err("networks"))?;
        let subjects = HashMap::try_from(take("subjects")?).map_err(map_err("subjects"))?;
        let policy_cidr =
            LpmTrie::try_from(take("policy_cidr")?).map_err(map_err("policy_cidr"))?;
        let policy_id = HashMap::try_from(take("policy_id")?).map_err(map_err("policy_id"))?;
        let conntrack = HashMap::try_from(take("conntrack")?).map_err(map_err("conntrack"))?;
        let drops = PerCpuArray::try_from(take("drops")?).map_err(map_err("drops"))?;
        let events = RingBuf::try_from(take("events")?).map_err(map_err("events"))?;
        tracing::debug!(node, dir = %dir.display(), "datapath loaded");
        let mut loader = Loader {
            ebpf,
            dir,
            config,
            endpoints,
            ifaces,
            networks,
            subjects,
            policy_cidr,
            policy_id,
            conntrack,
            drops,
            events,
        };
        if !carried.is_empty() {
            loader.import_conntrack(&carried)?;
            tracing::info!(
                node,
                flows = carried.len(),
                "connection tracking carried over to the new entry layout"
            );
        }
        Ok(loader)
    }

    /// The node's pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn link_pin(&self, ifname: &str) -> PathBuf {
        self.dir.join("links").join(ifname)
    }

    /// Attaches `hook`'s program to `ifname`'s TCX ingress (in the calling
    /// thread's network namespace) and pins the link. If a link is pinned
    /// for that name already, its program is replaced atomically instead;
    /// a stale pin (its interface gone) is replaced by a fresh link.
    pub fn attach(&mut self, ifname: &str, hook: Hook) -> Result<(), LoaderError> {
        let program = hook.program();
        let attach_err = |source: Box<dyn std::error::Error + Send + Sync>| LoaderError::Attach {
            ifname: ifname.to_owned(),
            program,
            source,
        };
        let pin = self.link_pin(ifname);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .ok_or(ProgramError::UnexpectedProgramType)
            .and_then(TryInto::try_into)
            .map_err(|e| attach_err(Box::new(e)))?;
        match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let replaced = SchedClassifierLink::try_from(FdLink::from(old))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                    .and_then(|link| prog.attach_to_link(link).map_err(|e| Box::new(e) as _));
                match replaced {
                    Ok(id) => {
                        // The pin keeps the link; dropping our handle is fine.
                        let link = prog.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
                        drop(link);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::debug!(ifname, error = %e, "stale link pin, attaching afresh");
                        std::fs::remove_file(&pin).map_err(|e| attach_err(Box::new(e)))?;
                    }
                }
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(attach_err(Box::new(e))),
        }
        let id = prog
            .attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| attach_err(Box::new(e)))?;
        let link = prog.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
        let fd_link = FdLink::try_from(link).map_err(|e| attach_err(Box::new(e)))?;
        fd_link.pin(&pin).map_err(|e| attach_err(Box::new(e)))?;
        tracing::debug!(ifname, program, "attached");
        Ok(())
    }

    /// Detaches whatever this node pinned on `ifname` (a no-op if nothing).
    /// The kernel frees the link from a work queue once its last
    /// reference goes: the program may still see packets for a moment.
    pub fn detach(&mut self, ifname: &str) -> Result<(), LoaderError> {
        match std::fs::remove_file(self.link_pin(ifname)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LoaderError::Detach {
                ifname: ifname.to_owned(),
                source,
            }),
        }
    }

    /// Kernel run statistics of the loaded programs: `(program, total run
    /// time in ns, runs)`. The kernel counts only while
    /// `kernel.bpf_stats_enabled` is 1 or [`enable_stats`] holds them on.
    pub fn program_stats(&self) -> Result<Vec<(&'static str, u64, u64)>, LoaderError> {
        let mut out = Vec::new();
        for hook in [Hook::Tap, Hook::Overlay, Hook::Uplink] {
            let name = hook.program();
            let prog_err = |source| LoaderError::Program {
                name,
                source: Box::new(source),
            };
            let prog: &SchedClassifier = self
                .ebpf
                .program(name)
                .ok_or(ProgramError::UnexpectedProgramType)
                .and_then(TryInto::try_into)
                .map_err(prog_err)?;
            let info = prog.info().map_err(prog_err)?;
            out.push((name, info.run_time().as_nanos() as u64, info.run_count()));
        }
        Ok(out)
    }

    /// Drop counters, summed over CPUs, by reason (zero counts included).
    pub fn drop_counts(&self) -> Result<BTreeMap<DropReason, u64>, LoaderError> {
        let mut out = BTreeMap::new();
        for reason in DropReason::ALL {
            let per_cpu = self
                .drops
                .get(&(reason as u32), 0)
                .map_err(map_err("drops"))?;
            out.insert(reason, per_cpu.iter().sum());
        }
        Ok(out)
    }

    /// The events queued since the last call (drops, activations).
    pub fn drain_events(&mut self) -> Vec<EventRecord> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(event) = EventRecord::parse(&item) {
                out.push(event);
            }
        }
        out
    }

    /// How many flows connection tracking holds.
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    /// The tracked flows to or from `ip` that are not closing: what moves
    /// with an endpoint, so that stateful policy keeps its open flows on
    /// the new node.
    pub fn conntrack_of(&self, ip: std::net::Ipv4Addr) -> Vec<(CtKey, CtValue)> {
        let key = crate::abi::ip_key(ip);
        self.conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| (k.saddr == key || k.daddr == key) && v.flags & CT_CLOSING == 0)
            .collect()
    }

    /// Adds flows known elsewhere (another node's
    /// [`Loader::conntrack_of`], or an older map) as answered flows seen
    /// now, so each gets its full established timeout here; entries
    /// already known here are kept as they are. Keys are put in the
    /// programs' order first ([`CtKey::canonical`]): an older map kept a
    /// flow as its first packet carried it.
    pub fn import_conntrack(&mut self, keys: &[CtKey]) -> Result<(), LoaderError> {
        let now = now_ns();
        for k in keys {
            let value = CtValue::established(k.proto, now);
            match self.conntrack.insert(k.canonical(), value, BPF_NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(map_err("conntrack")(e)),
            }
        }
        Ok(())
    }

    /// The tracked flows, with their entries.
    pub fn conntrack_entries(&self) -> Vec<(CtKey, CtValue)> {
        self.conntrack.iter().filter_map(Result::ok).collect()
    }

    /// One sweep of connection tracking: removes every entry idle for
    /// longer than its timeout. An entry found expired is taken out of
    /// the map and read in one step, and put back if a packet refreshed
    /// it since the walk saw it (see `sweep`).
    pub fn expire_conntrack(&mut self, timeouts: &Timeouts) -> Result<Sweep, LoaderError> {
        sweep(&mut self.conntrack, timeouts, now_ns)
    }

    /// Packets counted over every tracked flow: proof that traffic goes
    /// through the programs.
    pub fn conntrack_packets(&self) -> u64 {
        self.conntrack
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v.packets)
            .sum()
    }
}

/// What a node's pinned datapath holds, read without loading anything:
/// what `basaltd net status` prints.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Interfaces with a pinned link.
    pub links: Vec<String>,
    /// Endpoints: address → entry.
    pub endpoints: BTreeMap<std::net::Ipv4Addr, EndpointValue>,
    /// Local taps: ifindex → entry.
    pub ifaces: BTreeMap<u32, IfaceValue>,
    /// Identities a policy selects, with their `SUBJ_*` flags.
    pub subjects: BTreeMap<u32, u32>,
    /// Tracked flows.
    pub conntrack: usize,
    /// Tracked TCP flows by state (`CT_TCP_*`).
    pub tcp_states: BTreeMap<u8, usize>,
    /// How the node sends to endpoints on other nodes (from its config).
    pub routing: crate::Routing,
    /// Drops by reason.
    pub drops: BTreeMap<DropReason, u64>,
}

/// Reads `node`'s pinned maps (see [`Status`]).
pub fn status(node: &str) -> Result<Status, LoaderError> {
    let dir = pin_dir(node);
    let open = |name: &'static str| {
        MapData::from_pin(dir.join("maps").join(name))
            .and_then(aya::maps::Map::from_map_data)
            .map_err(map_err(name))
    };
    let mut out = Status::default();
    let links = std::fs::read_dir(dir.join("links")).map_err(|source| LoaderError::PinDir {
        path: dir.join("links"),
        source,
    })?;
    out.links = links
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.links.sort();
    let endpoints: HashMap<_, u32, EndpointValue> =
        HashMap::try_from(open("endpoints")?).map_err(map_err("endpoints"))?;
    for item in endpoints.iter() {
        let (k, v) = item.map_err(map_err("endpoints"))?;
        out.endpoints.insert(crate::abi::ip_from_key(k), v);
    }
    let ifaces: HashMap<_, u32, IfaceValue> =
        HashMap::try_from(open("ifaces")?).map_err(map_err("ifaces"))?;
    for item in ifaces.iter() {
        let (k, v) = item.map_err(map_err("ifaces"))?;
        out.ifaces.insert(k, v);
    }
    let subjects: HashMap<_, u32, SubjectValue> =
        HashMap::try_from(open("subjects")?).map_err(map_err("subjects"))?;
    for item in subjects.iter() {
        let (k, v) = item.map_err(map_err("subjects"))?;
        out.subjects.insert(k, v.flags);
    }
    let conntrack: HashMap<_, CtKey, CtValue> =
        HashMap::try_from(open("conntrack")?).map_err(map_err("conntrack"))?;
    for (k, v) in conntrack.iter().filter_map(Result::ok) {
        out.conntrack += 1;
        if k.proto == 6 {
            *out.tcp_states.entry(v.tcp_state).or_default() += 1;
        }
    }
    let config: Array<_, Config> = Array::try_from(open("config")?).map_err(map_err("config"))?;
    if config.get(&0, 0).map_err(map_err("config"))?.flags & crate::abi::CFG_NATIVE != 0 {
        out.routing = crate::Routing::Native;
    }
    let drops: PerCpuArray<_, u64> =
        PerCpuArray::try_from(open("drops")?).map_err(map_err("drops"))?;
    for reason in DropReason::ALL {
        let per_cpu = drops.get(&(reason as u32), 0).map_err(map_err("drops"))?;
        out.drops.insert(reason, per_cpu.iter().sum());
    }
    Ok(out)
}

fn open_pinned_conntrack(node: &str) -> Result<HashMap<MapData, CtKey, CtValue>, LoaderError> {
    let map = MapData::from_pin(pin_dir(node).join("maps").join("conntrack"))
        .and_then(aya::maps::Map::from_map_data)
        .map_err(map_err("conntrack"))?;
    HashMap::try_from(map).map_err(map_err("conntrack"))
}

/// The tracked flows in `node`'s pinned conntrack map, read without
/// loading anything.
pub fn pinned_conntrack(node: &str) -> Result<Vec<(CtKey, CtValue)>, LoaderError> {
    let conntrack = open_pinned_conntrack(node)?;
    Ok(conntrack.iter().filter_map(Result::ok).collect())
}

/// [`Loader::expire_conntrack`] on `node`'s pinned map, without a
/// loader: a thread of its own can sweep while another one holds the
/// loader (a sweep of a full map takes a fraction of a second).
pub fn expire_pinned_conntrack(node: &str, timeouts: &Timeouts) -> Result<Sweep, LoaderError> {
    sweep(&mut open_pinned_conntrack(node)?, timeouts, now_ns)
}

/// What a sweep needs of a connection-tracking table: the real map
/// ([`HashMap`] over the pinned map), or a test's.
pub(crate) trait CtTable {
    /// Every entry (those the programs' LRU removes mid-walk are skipped).
    fn entries(&self) -> Vec<(CtKey, CtValue)>;
    /// Removes `key`'s entry and returns it as it was at its removal, in
    /// one step; `None` if there was none.
    fn take(&mut self, key: &CtKey) -> Result<Option<CtValue>, LoaderError>;
    /// Puts back an entry [`CtTable::take`] removed, unless the programs
    /// have made a new one for the flow since (theirs is newer).
    fn restore(&mut self, key: &CtKey, value: &CtValue) -> Result<(), LoaderError>;
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM`.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The part of `union bpf_attr` the map element commands read.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

impl CtTable for HashMap<MapData, CtKey, CtValue> {
    fn entries(&self) -> Vec<(CtKey, CtValue)> {
        self.iter().filter_map(Result::ok).collect()
    }

    fn take(&mut self, key: &CtKey) -> Result<Option<CtValue>, LoaderError> {
        use aya::maps::IterableMap as _;
        use std::os::fd::{AsFd as _, AsRawFd as _};

        let mut value = CtValue::default();
        let fd = self.map().fd().as_fd().as_raw_fd();
        let attr = MapElemAttr {
            map_fd: u32::try_from(fd).unwrap_or(u32::MAX),
            pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value: std::ptr::from_mut(&mut value) as u64,
            flags: 0,
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix for the map element
        // commands (the kernel reads `size_of::<MapElemAttr>()` bytes of
        // it); `key` and `value` point at live values of exactly the
        // map's key and value sizes (`CtKey`/`CtValue`, checked against
        // the C structs), and `fd` is this map's open descriptor.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_ELEM,
                std::ptr::from_ref(&attr),
                size_of::<MapElemAttr>(),
            )
        };
        if rc == 0 {
            return Ok(Some(value));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        Err(LoaderError::Map {
            name: "conntrack",
            source: Box::new(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_and_delete_elem",
                io_error: err,
            })),
        })
    }

    fn restore(&mut self, key: &CtKey, value: &CtValue) -> Result<(), LoaderError> {
        match self.insert(key, value, BPF_NOEXIST) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            Err(e) => Err(map_err("conntrack")(e)),
        }
    }
}

/// One sweep of `table`: every entry idle past its timeout at `now()` is
/// removed. The walk only nominates entries; each is then taken out and
/// read in one step ([`CtTable::take`]), so the value judged is exactly
/// the one removed, and put back if a packet refreshed it after the walk.
/// (Reading it again and then deleting it left a window in which a
/// packet's refresh was deleted with the entry.) A packet that comes
/// while its entry is out finds none: the programs make a new one, which
/// the put-back then leaves as it is; a flow under policy is judged anew
/// for that one packet.
pub(crate) fn sweep(
    table: &mut impl CtTable,
    timeouts: &Timeouts,
    now: impl Fn() -> u64,
) -> Result<Sweep, LoaderError> {
    let at = now();
    let mut out = Sweep::default();
    let mut stale = Vec::new();
    for (k, v) in table.entries() {
        out.seen += 1;
        if timeouts.expired(&k, &v, at) {
            stale.push(k);
        }
    }
    for k in stale {
        let Some(v) = table.take(&k)? else {
            continue;
        };
        if timeouts.expired(&k, &v, now()) {
            out.expired += 1;
        } else {
            table.restore(&k, &v)?;
        }
    }
    Ok(out)
}

impl MapStore for Loader {
    type Error = LoaderError;

    fn read(&self) -> Result<MapState, LoaderError> {
        let mut state = MapState {
            config: self.config.get(&0, 0).map_err(map_err("config"))?,
            ..MapState::default()
        };
        for item in self.endpoints.iter() {
            let (k, v) = item.map_err(map_err("endpoints"))?;
            state.endpoints.insert(k, v);
        }
        for item in self.ifaces.iter() {
            let (k, v) = item.map_err(map_err("ifaces"))?;
            state.ifaces.insert(k, v);
        }
        for item in self.networks.iter() {
            let (k, v) = item.map_err(map_err("networks"))?;
            state.networks.insert((k.prefix_len(), k.data()), v);
        }
        for item in self.subjects.iter() {
            let (k, v) = item.map_err(map_err("subjects"))?;
            state.subjects.insert(k, v);
        }
        for item in self.policy_cidr.iter() {
            let (k, v) = item.map_err(map_err("policy_cidr"))?;
            state.policy_cidr.insert((k.prefix_len(), k.data()), v);
        }
        for item in self.policy_id.iter() {
            let (k, v) = item.map_err(map_err("policy_id"))?;
            state.policy_id.insert(k, v);
        }
        Ok(state)
    }

    fn write(&mut self, change: &Change) -> Result<(), LoaderError> {
        match change {
            Change::Config(c) => self.config.set(0, c, 0).map_err(map_err("config")),
            Change::PutEndpoint(k, v) => {
                self.endpoints.insert(k, v, 0).map_err(map_err("endpoints"))
            }
            Change::DelEndpoint(k) => {
                ignore_missing(self.endpoints.remove(k)).map_err(map_err("endpoints"))
            }
            Change::PutIface(k, v) => self.ifaces.insert(k, v, 0).map_err(map_err("ifaces")),
            Change::DelIface(k) => ignore_missing(self.ifaces.remove(k)).map_err(map_err("ifaces")),
            Change::PutNetwork((len, addr), v) => self
                .networks
                .insert(&Key::new(*len, *addr), v, 0)
                .map_err(map_err("networks")),
            Change::DelNetwork((len, addr)) => {
                ignore_missing(self.networks.remove(&Key::new(*len, *addr)))
                    .map_err(map_err("networks"))
            }
            Change::PutSubject(k, v) => self.subjects.insert(k, v, 0).map_err(map_err("subjects")),
            Change::DelSubject(k) => {
                ignore_missing(self.subjects.remove(k)).map_err(map_err("subjects"))
            }
            Change::PutPolicyCidr((len, data), v) => self
                .policy_cidr
                .insert(&Key::new(*len, *data), v, 0)
                .map_err(map_err("policy_cidr")),
            Change::DelPolicyCidr((len, data)) => {
                ignore_missing(self.policy_cidr.remove(&Key::new(*len, *data)))
                    .map_err(map_err("policy_cidr"))
            }
            Change::PutPolicyId(k, v) => {
                self.policy_id.insert(k, v, 0).map_err(map_err("policy_id"))
            }
            Change::DelPolicyId(k) => {
                ignore_missing(self.policy_id.remove(k)).map_err(map_err("policy_id"))
            }
        }
    }
}

/// Removing an absent key is what a removal wants anyway.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flow's identity in the test table.
    type Id = (u32, u32, u16, u16, u8);
    type Entries = BTreeMap<Id, (CtKey, CtValue)>;

    /// A table in memory; `on_take` runs right before each take, as a
    /// packet racing the sweep would.
    struct Table {
        entries: Entries,
        on_take: Box<dyn FnMut(&mut Entries)>,
    }

    fn id(k: &CtKey) -> Id {
        (k.saddr, k.daddr, k.sport, k.dport, k.proto)
    }

    impl CtTable for Table {
        fn entries(&self) -> Vec<(CtKey, CtValue)> {
            self.entries.values().copied().collect()
        }
        fn take(&mut self, key: &CtKey) -> Result<Option<CtValue>, LoaderError> {
            (self.on_take)(&mut self.entries);
            Ok(self.entries.remove(&id(key)).map(|(_, v)| v))
        }
        fn restore(&mut self, key: &CtKey, value: &CtValue) -> Result<(), LoaderError> {
            self.entries.entry(id(key)).or_insert((*key, *value));
            Ok(())
        }
    }

    fn flow(port: u16, last_seen_ns: u64) -> (CtKey, CtValue) {
        let key = CtKey {
            saddr: 1,
            daddr: 2,
            sport: port,
            dport: 53,
            proto: 17,
            pad: [0; 3],
        };
        let value = CtValue {
            last_seen_ns,
            ..CtValue::default()
        };
        (key, value)
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_packet_between_the_walk_and_the_removal_keeps_its_entry() {
        let timeouts: Timeouts = "udp=2".parse().unwrap();
        let now = 100 * SEC;
        let (racing, idle, fresh) = (flow(1, 90 * SEC), flow(2, 90 * SEC), flow(3, 99 * SEC));
        let mut table = Table {
            entries: [racing, idle, fresh]
                .into_iter()
                .map(|(k, v)| (id(&k), (k, v)))
                .collect(),
            // The racing flow sends a packet after the walk nominated it.
            on_take: Box::new(move |entries| {
                if let Some((_, v)) = entries.get_mut(&id(&racing.0)) {
                    v.last_seen_ns = now;
                }
            }),
        };
        let sweep = sweep(&mut table, &timeouts, || now).unwrap();
        assert_eq!(
            sweep,
            Sweep {
                seen: 3,
                expired: 1
            }
        );
        let left: Vec<u16> = table.entries.values().map(|(k, _)| k.sport).collect();
        assert_eq!(left, [1, 3], "the idle flow went, the refreshed one stayed");
        assert_eq!(table.entries[&id(&racing.0)].1.last_seen_ns, now);
    }
}
