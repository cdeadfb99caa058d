//! [`Volume`]: one replicated block device as the cluster sees it — its
//! size and copies ([`VolumeSpec`]), and where each copy is and how it
//! stands ([`VolumeStatus`], [`VolumeReplica`]).
//!
//! The control plane keeps one volume per VM disk ([`VolumeOwner`]): its
//! spec follows the disk's, its epoch, primary and replica nodes follow
//! the VM's placement, and each copy's `outdated` flag the storage fence's
//! marks in the VM's status. The agent of the primary's node reports how
//! each copy stands ([`VolumeReport`]), as its storage process sees it.
//!
//! Invariants (checked by [`Volume::validate`], errors name the field):
//! - a size is a positive multiple of [`DISK_SECTOR_BYTES`]; 1 to
//!   [`MAX_DISK_REPLICAS`] copies;
//! - at most one entry per node in `status.replicas`, and at most one
//!   primary among them;
//! - a resync's done bytes never exceed its total.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::meta::validate_conditions;
use super::{
    Condition, DISK_SECTOR_BYTES, MAX_DISK_REPLICAS, MAX_STORAGE_VOLUME_BYTES, MAX_VOLUME_NAME_LEN,
    ObjectMeta, validate,
};
use crate::{ApiError, ReplicationProtocol};

/// Longest error text a replica entry keeps.
pub const MAX_REPLICA_ERROR_LEN: usize = 1024;

/// A replicated block device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Volume {
    /// Name, labels and versions.
    pub meta: ObjectMeta,
    /// What it should be.
    pub spec: VolumeSpec,
    /// Where its copies are and how each stands.
    pub status: VolumeStatus,
}

/// The VM disk a volume is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeOwner {
    /// The VM's name.
    pub vm: String,
    /// The VM's uid: a VM created again under the same name owns new
    /// volumes.
    pub vm_uid: String,
    /// The disk's name in the VM's spec.
    pub disk: String,
    /// The volume existed before the VM and was attached as the disk
    /// (`Disk::attach`): released, not deleted, when the VM or the disk
    /// goes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub attached: bool,
}

/// What a volume should be.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeSpec {
    /// Size in bytes, a positive multiple of [`DISK_SECTOR_BYTES`]. It only
    /// grows.
    pub size_bytes: u64,
    /// Number of copies (1 to [`MAX_DISK_REPLICAS`]).
    pub replicas: u32,
    /// The image it was cloned from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The VM disk it is; `None` for a standalone volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<VolumeOwner>,
    /// What it is made from, for a snapshot or a clone: the agent of the
    /// node holding the source's primary copy makes it there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// When its primary acknowledges a write (C by default). Passed by
    /// each copy's agent when it attaches the copy.
    #[serde(skip_serializing_if = "ReplicationProtocol::is_c")]
    pub protocol: ReplicationProtocol,
    /// The nodes its copies are made on, one per copy, the first its
    /// primary (a standalone volume only; empty: the scheduler chooses).
    /// Read when the volume is first placed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

/// What a snapshot or a clone is made from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeSource {
    /// The volume (or snapshot) it is taken from.
    pub volume: String,
    /// A read-only point-in-time copy (`true`) or a writable clone.
    pub snapshot: bool,
}

/// How one copy stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Nothing reported yet, or the primary's storage process cannot be
    /// asked.
    #[default]
    Unknown,
    /// Holds every acknowledged write.
    UpToDate,
    /// Receiving the chunks it missed.
    Syncing,
    /// Not connected to the primary; the writes it misses are tracked.
    Away,
    /// Away, and recorded outdated by the storage fence: the primary went
    /// on without it; it is never made primary until in sync again.
    Outdated,
    /// Its backing store failed: detached.
    DiskFailed,
    /// Diverged from the primary; never resolved automatically.
    SplitBrain,
}

impl ReplicaState {
    /// The kebab-case name: "up-to-date", "syncing", "away", ...
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Unknown => "unknown",
            ReplicaState::UpToDate => "up-to-date",
            ReplicaState::Syncing => "syncing",
            ReplicaState::Away => "away",
            ReplicaState::Outdated => "outdated",
            ReplicaState::DiskFailed => "disk-failed",
            ReplicaState::SplitBrain => "split-brain",
        }
    }

    /// The state to show for a copy reported `self` whose fence mark is
    /// `outdated`: a marked copy that is not receiving or holding the data
    /// is [`ReplicaState::Outdated`]; a copy reported outdated but no
    /// longer marked is [`ReplicaState::Away`].
    pub fn with_mark(self, outdated: bool) -> ReplicaState {
        match (self, outdated) {
            (ReplicaState::Away | ReplicaState::Unknown, true) => ReplicaState::Outdated,
            (ReplicaState::Outdated, false) => ReplicaState::Away,
            (state, _) => state,
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One copy of a volume, on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeReplica {
    /// The node holding it.
    pub node: String,
    /// How it stands.
    pub state: ReplicaState,
    /// The node is the volume's primary.
    pub primary: bool,
    /// The storage fence recorded it outdated.
    pub outdated: bool,
    /// Bytes sent by the resync under way.
    pub sync_done_bytes: u64,
    /// Bytes the resync under way sends in all.
    pub sync_total_bytes: u64,
    /// Bytes it is known to miss.
    pub dirty_bytes: u64,
    /// The last error reported for it; empty when none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// How the copy's own node sees it (decision 61): `up-to-date` = in
    /// its pool with the disk attached, `syncing` = a full sync or resync into it
    /// started and did not finish (decisions 91, 93), `disk-failed`, or
    /// `unknown` = the node's storage process cannot be asked; `None`
    /// until its node reported. [`VolumeReplica::state`] stays the primary's view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_state: Option<ReplicaState>,
    /// What the copy's node last reported as wrong; empty when none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node_error: String,
    /// The volume's resource version just before [`Self::outdated`] was
    /// set (standalone volumes, decision 74): the primary's report clears
    /// the mark only if its agent had seen a later version of the volume
    /// before it read its storage process, so the in-sync state it reports
    /// was read after the mark. 0 for marks from before that rule.
    #[serde(skip_serializing_if = "is_zero")]
    pub outdated_after_version: u64,
}

impl VolumeReplica {
    /// Whether it holds every acknowledged write: up to date as the
    /// primary reports it and as its own node holds it, with no fence
    /// mark.
    pub fn in_sync(&self) -> bool {
        self.state == ReplicaState::UpToDate
            && self.node_state == Some(ReplicaState::UpToDate)
            && !self.outdated
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Where a volume's copies are and how each stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeStatus {
    /// Its name in each replica node's pool (also its NBD export name).
    pub storage_name: String,
    /// The epoch its primary writes with (the VM placement's).
    pub epoch: u64,
    /// The node writing it; empty while not placed.
    pub primary_node: String,
    /// One entry per node holding a copy, ordered by node.
    pub replicas: Vec<VolumeReplica>,
    /// Observed conditions, including [`Condition::READY`] (every copy up
    /// to date).
    pub conditions: Vec<Condition>,
}

impl VolumeStatus {
    /// The entry of `node`, if it holds a copy.
    pub fn replica(&self, node: &str) -> Option<&VolumeReplica> {
        self.replicas.iter().find(|r| r.node == node)
    }

    /// Whether the primary reported any copy at this epoch: before that
    /// every state is [`ReplicaState::Unknown`] and says nothing.
    pub fn reported(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| r.state != ReplicaState::Unknown)
    }

    /// Why `node`'s copy does not hold the volume's data yet, as far as
    /// the reports tell: by the primary's report, it is receiving a sync
    /// or it is new (not reported while the other copies are); or its own
    /// node holds it incomplete (a full sync or resync into it did not finish,
    /// whatever the primary last said). `None` when it is in sync, away
    /// (the storage fence decides whether an away copy missed writes), or
    /// when nothing was reported at this epoch and its node does not hold
    /// it incomplete.
    pub fn unfinished(&self, node: &str) -> Option<String> {
        let copy = self.replica(node);
        if self.reported() {
            match copy {
                None => return Some(format!("its copy on {node} is new")),
                Some(c) if c.state == ReplicaState::Syncing => {
                    return Some(format!(
                        "its copy on {node} is syncing ({} of {} bytes sent)",
                        c.sync_done_bytes, c.sync_total_bytes
                    ));
                }
                Some(c) if c.state == ReplicaState::Unknown => {
                    return Some(format!("its copy on {node} is new"));
                }
                Some(_) => {}
            }
        }
        copy.filter(|c| c.node_state == Some(ReplicaState::Syncing))
            .map(|_| {
                format!(
                    "its copy on {node} is incomplete: a full sync or resync into it did not finish"
                )
            })
    }

    /// The nodes of the copies, the primary's first, then by name.
    pub fn copy_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.replicas.iter().map(|r| r.node.clone()).collect();
        nodes.sort_by_key(|n| (*n != self.primary_node, n.clone()));
        nodes
    }

    /// Whether the copies are on `nodes` exactly, the first of them the
    /// primary (the others in any order): what a volume's `spec.nodes`
    /// asks, done.
    pub fn is_on(&self, nodes: &[String]) -> bool {
        let mut named = nodes.to_vec();
        if let Some(rest) = named.get_mut(1..) {
            rest.sort();
        }
        named == self.copy_nodes()
    }
}

/// The pool name of disk `disk` of the VM whose uid is `vm_uid`: a UUID
/// (version 5) derived from both, the same on every node, so a VM created
/// again under an old name never gets the old VM's data. The node agent
/// names the disk's volume so in its node's pool.
pub fn disk_storage_name(vm_uid: &str, disk: &str) -> String {
    let vm = Uuid::parse_str(vm_uid)
        .unwrap_or_else(|_| Uuid::new_v5(&Uuid::NAMESPACE_OID, vm_uid.as_bytes()));
    Uuid::new_v5(&vm, disk.as_bytes()).to_string()
}

impl Volume {
    /// A label by which an operator lets the control plane make one copy
    /// of a standalone volume its primary as it is, though the last
    /// primary's report had it outdated or filling, or its own node holds
    /// it incomplete (`basalt volume accept-copy`): `EPOCH/NODE`, good
    /// only while the volume is at `EPOCH`, so the move it allows spends
    /// it. The key is the VM's ([`crate::Vm::ACCEPT_COPY_LABEL`]).
    pub const ACCEPT_COPY_LABEL: &str = crate::Vm::ACCEPT_COPY_LABEL;

    /// A label the control plane sets on a standalone volume it moved
    /// onto an accepted copy: the volume's new epoch. The new primary's
    /// agent attaches its copy with force while it matches. The key is
    /// the placement's ([`crate::Placement::FORCED_COPY_LABEL`]).
    pub const FORCED_COPY_LABEL: &str = crate::Placement::FORCED_COPY_LABEL;

    /// The node whose copy the operator accepted as it is, while the
    /// volume is at `epoch` ([`Volume::ACCEPT_COPY_LABEL`]).
    pub fn accepted_copy(&self, epoch: u64) -> Option<&str> {
        self.meta.epoch_node_label(Self::ACCEPT_COPY_LABEL, epoch)
    }

    /// Whether the primary's node attaches its copy with force
    /// ([`Volume::FORCED_COPY_LABEL`] at the volume's epoch).
    pub fn forces_copy(&self) -> bool {
        self.meta
            .epoch_label_is(Self::FORCED_COPY_LABEL, self.status.epoch)
    }

    /// The pool name of a volume that is not a VM disk (a standalone
    /// volume, a snapshot, a clone) whose object's uid is `uid`: `vol-`
    /// and the uid, the same on every node holding a copy.
    pub fn made_storage_name(uid: &str) -> String {
        format!("vol-{uid}")
    }

    /// The name the control plane gives the volume of disk `disk` of VM
    /// `vm`: `VM-DISK` when that is a valid name (at most 63 characters).
    pub fn name_for_disk(vm: &str, disk: &str) -> Option<String> {
        let name = format!("{vm}-{disk}");
        validate::name("meta.name", &name).ok().map(|()| name)
    }

    /// Checks every field; errors name the field's path, e.g.
    /// `spec.size_bytes`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        let spec = &self.spec;
        if spec.size_bytes == 0
            || !spec.size_bytes.is_multiple_of(DISK_SECTOR_BYTES)
            || spec.size_bytes > MAX_STORAGE_VOLUME_BYTES
        {
            return Err(ApiError::invalid(
                "spec.size_bytes",
                format!(
                    "must be a positive multiple of {DISK_SECTOR_BYTES} of at most {MAX_STORAGE_VOLUME_BYTES}, got {}",
                    spec.size_bytes
                ),
            ));
        }
        if !(1..=MAX_DISK_REPLICAS).contains(&spec.replicas) {
            return Err(ApiError::invalid(
                "spec.replicas",
                format!("must be 1 to {MAX_DISK_REPLICAS}, got {}", spec.replicas),
            ));
        }
        if let Some(image) = &spec.image {
            validate::name("spec.image", image)?;
        }
        if let Some(source) = &spec.source {
            validate::name("spec.source.volume", &source.volume)?;
            if source.volume == self.meta.name {
                return Err(ApiError::invalid(
                    "spec.source.volume",
                    "a volume is not made from itself",
                ));
            }
            // A clone attached as a VM disk keeps its source (decision 76).
            if spec.owner.as_ref().is_some_and(|o| !o.attached) {
                return Err(ApiError::invalid(
                    "spec.source",
                    "a VM disk's volume is made by its VM, not from a source",
                ));
            }
            if spec.replicas != 1 {
                return Err(ApiError::invalid(
                    "spec.replicas",
                    "a snapshot or clone has one copy, on its source's node",
                ));
            }
        }
        for (i, node) in spec.nodes.iter().enumerate() {
            let at = format!("spec.nodes[{i}]");
            validate::name(&at, node)?;
            if spec.nodes[..i].contains(node) {
                return Err(ApiError::invalid(at, format!("{node:?} is listed twice")));
            }
        }
        if !spec.nodes.is_empty() {
            if spec.owner.is_some() || spec.source.is_some() {
                return Err(ApiError::invalid(
                    "spec.nodes",
                    "only a standalone volume made empty or from an image chooses its nodes (a VM's disk is where its VM is, a snapshot or clone where its source is)",
                ));
            }
            if spec.nodes.len() != spec.replicas as usize {
                return Err(ApiError::invalid(
                    "spec.nodes",
                    format!(
                        "names {} node(s) for {} cop(ies): one node per copy",
                        spec.nodes.len(),
                        spec.replicas
                    ),
                ));
            }
        }
        if let Some(owner) = &spec.owner {
            validate::name("spec.owner.vm", &owner.vm)?;
            validate::name("spec.owner.disk", &owner.disk)?;
            if owner.vm_uid.is_empty() || owner.vm_uid.len() > MAX_VOLUME_NAME_LEN {
                return Err(ApiError::invalid(
                    "spec.owner.vm_uid",
                    format!("must be 1 to {MAX_VOLUME_NAME_LEN} characters"),
                ));
            }
        }
        self.status.validate()
    }
}

impl VolumeStatus {
    fn validate(&self) -> Result<(), ApiError> {
        if self.storage_name.len() > MAX_VOLUME_NAME_LEN
            || self
                .storage_name
                .chars()
                .any(|c| c.is_control() || c == '/')
        {
            return Err(ApiError::invalid(
                "status.storage_name",
                format!("at most {MAX_VOLUME_NAME_LEN} characters, no '/' or control characters"),
            ));
        }
        if !self.primary_node.is_empty() {
            validate::name("status.primary_node", &self.primary_node)?;
        }
        for (i, replica) in self.replicas.iter().enumerate() {
            let at = format!("status.replicas[{i}]");
            validate::name(&format!("{at}.node"), &replica.node)?;
            if self.replicas[..i].iter().any(|r| r.node == replica.node) {
                return Err(ApiError::invalid(
                    format!("{at}.node"),
                    format!("{:?} is listed twice", replica.node),
                ));
            }
            if replica.primary && self.replicas[..i].iter().any(|r| r.primary) {
                return Err(ApiError::invalid(
                    format!("{at}.primary"),
                    "a volume has at most one primary",
                ));
            }
            replica.validate_progress(&at)?;
        }
        validate_conditions("status.conditions", &self.conditions)
    }
}

impl VolumeReplica {
    fn validate_progress(&self, at: &str) -> Result<(), ApiError> {
        if self.sync_done_bytes > self.sync_total_bytes {
            return Err(ApiError::invalid(
                format!("{at}.sync_done_bytes"),
                format!(
                    "{} is more than sync_total_bytes {}",
                    self.sync_done_bytes, self.sync_total_bytes
                ),
            ));
        }
        for (field, text) in [
            ("last_error", &self.last_error),
            ("node_error", &self.node_error),
        ] {
            if text.len() > MAX_REPLICA_ERROR_LEN {
                return Err(ApiError::invalid(
                    format!("{at}.{field}"),
                    format!("at most {MAX_REPLICA_ERROR_LEN} bytes"),
                ));
            }
        }
        Ok(())
    }
}

/// How one copy stands, as the primary's storage process sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// The peer's replication address (`host:port`); empty for the
    /// reporting node's own copy.
    pub address: String,
    /// How it stands.
    pub state: ReplicaState,
    /// Bytes sent by the resync under way.
    pub sync_done_bytes: u64,
    /// Bytes the resync under way sends in all.
    pub sync_total_bytes: u64,
    /// Bytes it is known to miss.
    pub dirty_bytes: u64,
    /// What went wrong, when something did.
    pub last_error: String,
}

/// The agent of a node holding a copy of a volume reports how the
/// copies stand, as its storage process sees them: the primary's node
/// every copy (its peers by replication address), any other copy's node
/// its own copy only. The control plane records it in the volume's
/// status when it changed anything (compare-and-swap), and refuses it
/// from a node that holds no copy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeReport {
    /// The reporting node.
    pub node: String,
    /// The volume's pool name ([`VolumeStatus::storage_name`]).
    pub storage_name: String,
    /// The reporting node's own copy.
    pub local: ReplicaReport,
    /// The peers the primary replicates to, by replication address.
    pub peers: Vec<ReplicaReport>,
    /// The newest resource version of the volume the reporting agent had
    /// seen before it read its storage process (0: none). Only a report
    /// newer than a standalone copy's [`VolumeReplica::outdated_after_version`]
    /// clears its mark.
    pub seen_version: u64,
}

impl VolumeReport {
    /// Checks every field; errors name it, e.g. `peers[0].address`.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate::name("node", &self.node)?;
        if self.storage_name.is_empty() || self.storage_name.len() > MAX_VOLUME_NAME_LEN {
            return Err(ApiError::invalid(
                "storage_name",
                format!("must be 1 to {MAX_VOLUME_NAME_LEN} characters"),
            ));
        }
        check_report("local", &self.local)?;
        if self.peers.len() > usize::try_from(MAX_DISK_REPLICAS).unwrap_or(usize::MAX) {
            return Err(ApiError::invalid(
                "peers",
                format!("at most {MAX_DISK_REPLICAS} peers"),
            ));
        }
        for (i, peer) in self.peers.iter().enumerate() {
            let at = format!("peers[{i}]");
            if peer.address.is_empty() {
                return Err(ApiError::missing(format!("{at}.address")));
            }
            validate::address(&format!("{at}.address"), &peer.address)?;
            check_report(&at, peer)?;
        }
        Ok(())
    }
}

fn check_report(at: &str, report: &ReplicaReport) -> Result<(), ApiError> {
    VolumeReplica {
        sync_done_bytes: report.sync_done_bytes,
        sync_total_bytes: report.sync_total_bytes,
        last_error: report.last_error.clone(),
        ..VolumeReplica::default()
    }
    .validate_progress(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> Volume {
        Volume {
            meta: ObjectMeta::named("web-root"),
            spec: VolumeSpec {
                size_bytes: 1 << 30,
                replicas: 2,
                image: Some("debian".into()),
                owner: Some(VolumeOwner {
                    vm: "web".into(),
                    vm_uid: "0b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d11".into(),
                    disk: "root".into(),
                    attached: false,
                }),
                source: None,
                protocol: ReplicationProtocol::B,
                nodes: Vec::new(),
            },
            status: VolumeStatus {
                storage_name: "5f0c".into(),
                epoch: 2,
                primary_node: "a".into(),
                replicas: vec![
                    VolumeReplica {
                        node: "a".into(),
                        primary: true,
                        state: ReplicaState::UpToDate,
                        ..VolumeReplica::default()
                    },
                    VolumeReplica {
                        node: "b".into(),
                        state: ReplicaState::Syncing,
                        sync_done_bytes: 5,
                        sync_total_bytes: 10,
                        ..VolumeReplica::default()
                    },
                ],
                conditions: Vec::new(),
            },
        }
    }

    fn field(v: &Volume) -> String {
        match v.validate() {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn volumes_validate_by_field() {
        volume().validate().unwrap();
        let mut v = volume();
        v.spec.size_bytes = 1000;
        assert_eq!(field(&v), "spec.size_bytes");
        let mut v = volume();
        v.spec.size_bytes = 0;
        assert_eq!(field(&v), "spec.size_bytes");
        let mut v = volume();
        v.spec.replicas = 0;
        assert_eq!(field(&v), "spec.replicas");
        let mut v = volume();
        v.spec.replicas = MAX_DISK_REPLICAS + 1;
        assert_eq!(field(&v), "spec.replicas");
        let mut v = volume();
        v.spec.owner.as_mut().unwrap().disk = "Root".into();
        assert_eq!(field(&v), "spec.owner.disk");
        let mut v = volume();
        v.spec.owner.as_mut().unwrap().vm_uid.clear();
        assert_eq!(field(&v), "spec.owner.vm_uid");
        let mut v = volume();
        v.status.replicas[1].node = "a".into();
        assert_eq!(field(&v), "status.replicas[1].node");
        let mut v = volume();
        v.status.replicas[1].primary = true;
        assert_eq!(field(&v), "status.replicas[1].primary");
        let mut v = volume();
        v.status.replicas[1].sync_done_bytes = 11;
        assert_eq!(field(&v), "status.replicas[1].sync_done_bytes");
        let mut v = volume();
        v.status.storage_name = "a/b".into();
        assert_eq!(field(&v), "status.storage_name");
        // Named nodes: a standalone volume's, one per copy, each once.
        let mut v = volume();
        v.spec.nodes = vec!["a".into(), "b".into(), "c".into()];
        assert_eq!(field(&v), "spec.nodes", "a VM disk's volume");
        v.spec.owner = None;
        v.spec.replicas = 3;
        v.validate().unwrap();
        v.spec.nodes.pop();
        assert_eq!(field(&v), "spec.nodes", "two nodes for three copies");
        v.spec.nodes = vec!["a".into(), "B".into(), "c".into()];
        assert_eq!(field(&v), "spec.nodes[1]");
        v.spec.nodes = vec!["a".into(), "b".into(), "a".into()];
        assert_eq!(field(&v), "spec.nodes[2]");
        let mut snap = volume();
        snap.spec.owner = None;
        snap.spec.replicas = 1;
        snap.spec.source = Some(VolumeSource {
            volume: "web-root".into(),
            snapshot: true,
        });
        assert_eq!(field(&snap), "spec.source.volume");
        snap.spec.source.as_mut().unwrap().volume = "db-root".into();
        snap.validate().unwrap();
        snap.spec.replicas = 2;
        assert_eq!(field(&snap), "spec.replicas");
        // A clone is some VM's disk only when attached (then it keeps its
        // source); a volume the VM made is made from no source.
        let mut clone = snap.clone();
        clone.spec.replicas = 1;
        clone.spec.source.as_mut().unwrap().snapshot = false;
        clone.spec.owner = volume().spec.owner;
        assert_eq!(field(&clone), "spec.source");
        clone.spec.owner.as_mut().unwrap().attached = true;
        clone.validate().unwrap();
    }

    #[test]
    fn disk_names_are_vm_dash_disk_when_they_fit() {
        assert_eq!(
            Volume::name_for_disk("web", "root").as_deref(),
            Some("web-root")
        );
        assert_eq!(Volume::name_for_disk(&"a".repeat(60), "root"), None);
        let uid = "0b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d11";
        assert_eq!(
            disk_storage_name(uid, "root"),
            disk_storage_name(uid, "root")
        );
        assert_ne!(
            disk_storage_name(uid, "root"),
            disk_storage_name(uid, "data")
        );
        assert_eq!(disk_storage_name(uid, "root").len(), 36);
    }

    #[test]
    fn fence_marks_turn_away_copies_outdated() {
        assert_eq!(ReplicaState::Away.with_mark(true), ReplicaState::Outdated);
        assert_eq!(
            ReplicaState::Unknown.with_mark(true),
            ReplicaState::Outdated
        );
        assert_eq!(ReplicaState::Syncing.with_mark(true), ReplicaState::Syncing);
        assert_eq!(ReplicaState::Outdated.with_mark(false), ReplicaState::Away);
        assert_eq!(
            ReplicaState::UpToDate.with_mark(false),
            ReplicaState::UpToDate
        );
    }

    #[test]
    fn a_copy_is_unfinished_while_it_syncs_or_is_new_next_to_reported_ones() {
        let copy = |node: &str, state: ReplicaState| VolumeReplica {
            node: node.into(),
            state,
            node_state: Some(state),
            ..VolumeReplica::default()
        };
        let mut status = VolumeStatus {
            replicas: vec![
                copy("a", ReplicaState::UpToDate),
                copy("b", ReplicaState::Syncing),
                copy("c", ReplicaState::Unknown),
                copy("d", ReplicaState::Away),
            ],
            ..VolumeStatus::default()
        };
        assert!(status.replicas[0].in_sync());
        assert!(!status.replicas[3].in_sync());
        assert_eq!(status.unfinished("a"), None);
        assert!(status.unfinished("b").unwrap().contains("syncing"));
        assert!(status.unfinished("c").unwrap().contains("new"));
        assert!(status.unfinished("e").unwrap().contains("new"));
        // Away: the fence decides; nothing reported: nothing known.
        assert_eq!(status.unfinished("d"), None);
        for r in &mut status.replicas {
            r.state = ReplicaState::Unknown;
            r.node_state = Some(ReplicaState::UpToDate);
        }
        assert!(!status.reported());
        assert_eq!(status.unfinished("b"), None);
        // Its own node holds it incomplete (a full sync into it did not
        // finish): unfinished whatever the primary last said, or if it
        // said nothing (it is gone).
        status.replicas[1].node_state = Some(ReplicaState::Syncing);
        assert!(status.unfinished("b").unwrap().contains("incomplete"));
        status.replicas[1].state = ReplicaState::UpToDate;
        assert!(status.unfinished("b").unwrap().contains("incomplete"));
        assert!(!status.replicas[1].in_sync());
        // Up to date by the primary, its node not heard: not in sync yet.
        let mut half = copy("a", ReplicaState::UpToDate);
        half.node_state = None;
        assert!(!half.in_sync());
    }

    #[test]
    fn reports_validate_by_field() {
        let report = VolumeReport {
            node: "a".into(),
            storage_name: "5f0c".into(),
            local: ReplicaReport {
                state: ReplicaState::UpToDate,
                ..ReplicaReport::default()
            },
            peers: vec![ReplicaReport {
                address: "10.0.0.2:7410".into(),
                state: ReplicaState::Away,
                ..ReplicaReport::default()
            }],
            seen_version: 0,
        };
        report.validate().unwrap();
        let mut bad = report.clone();
        bad.peers[0].address.clear();
        assert!(matches!(bad.validate(),
            Err(ApiError::InvalidArgument { field, .. }) if field == "peers[0].address"));
        let mut bad = report;
        bad.local.sync_done_bytes = 1;
        assert!(matches!(bad.validate(),
            Err(ApiError::InvalidArgument { field, .. }) if field == "local.sync_done_bytes"));
    }
}
