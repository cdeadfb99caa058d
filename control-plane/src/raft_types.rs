//! The openraft type configuration: what a log entry carries and what
//! applying it answers.

use std::io::Cursor;

use crate::state::{Command, Outcome};

openraft::declare_raft_types!(
    /// Basalt's Raft types: entries carry a [`Command`], applying one
    /// answers an [`Outcome`], members are `u64` ids with their address,
    /// snapshots are the serialized state in memory.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle of a member.
pub type Raft = openraft::Raft<TypeConfig>;
/// A member's id.
pub type NodeId = u64;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// The membership a state machine last applied.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
/// A storage failure, as openraft wants it.
pub type StorageError = openraft::StorageError<NodeId>;
/// The metrics openraft updates only when the vote, the role, the leader
/// or the membership change (not on every log entry).
pub type ServerMetrics = openraft::metrics::RaftServerMetrics<NodeId, openraft::BasicNode>;
