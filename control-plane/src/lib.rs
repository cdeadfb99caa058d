//! The Basalt control plane: the cluster's desired state, replicated with
//! Raft (openraft + RocksDB), served over gRPC to the admin CLI and the node
//! agents, and the controllers that act on it.
//!
//! Layout:
//! - [`state`]: the objects and the pure rules for applying a command;
//! - [`store`]: RocksDB log, vote and state machine, with group commit;
//! - [`network`]: Raft messages over basalt-api's Raft service;
//! - [`admin`]: the admin service (forwarding, linearizable reads, watch);
//! - [`agent`]: the agent service (registration with join tokens,
//!   heartbeats, placement watches, status reports); [`tokens`]: join-token
//!   secrets; [`leases`]: the leader's in-memory node leases;
//! - [`members`]: the membership reconciler;
//! - [`scheduler`]: the placement planner and its executor;
//!   [`disk_sources`]: VM disks cloned from volumes (their pins);
//! - [`controllers`]: the leader's lease, HA and placement controllers;
//!   [`migration`]: the live-migration controller;
//!   [`ipam`]: the IPAM controller (a lease per VM NIC, as endpoints);
//!   [`volumes`]: a volume object per VM disk, and the replicas' states
//!   the agents report; [`volume_ha`]: standalone volumes on lost nodes
//!   (primary moved, lost copies replaced); [`volume_moves`]: standalone
//!   volumes' copies moved to the nodes an operator names;
//!   [`volume_watch`]: each node's volume watch; [`replica_moves`]: VM
//!   disks' copies moved off an evacuating node;
//! - [`config`], [`server`]: one member's configuration and its run loop;
//! - [`recovery`]: backups, restoring one into a new cluster, and forcing
//!   a new cluster from a survivor's data directory.
//!
//! Invariants (see `../shared/DESIGN.md` and `docs/decisions.md`):
//! - every state change is a Raft log entry, acknowledged only once it is
//!   fsynced on a quorum and applied; Get and List are linearizable (read
//!   index on the leader), Watch is not;
//! - an object's `resource_version` is the log index of its last change,
//!   and updates are compare-and-swap on it;
//! - nothing a client or peer sends can panic a member: every payload is
//!   decoded and checked first, and errors name the field.

pub mod admin;
pub mod agent;
pub mod config;
pub mod controllers;
pub mod disk_sources;
pub mod history;
pub mod ipam;
pub mod leases;
pub mod members;
pub mod migration;
pub mod network;
pub mod proposer;
pub mod raft_types;
pub mod recovery;
pub mod replica_moves;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod store;
pub mod tokens;
pub mod volume_ha;
pub mod volume_moves;
pub mod volume_watch;
pub mod volumes;

pub use config::{ConfigError, ControlConfig, IpamTuning, NodeTuning, RaftTuning};
pub use server::{RunError, run};
