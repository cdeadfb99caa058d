//! The Basalt control plane: the cluster's desired state, replicated with
//! Raft (openraft + RocksDB), served over gRPC to the admin CLI and the node
//! agents, and the controllers that act on it (scheduler, placement, IPAM,
//! volumes, HA and migration).
//!
//! Invariants (see `../shared/DESIGN.md` and `docs/decisions.md`):
//! - every state change is a Raft log entry; Get and List are linearizable
//!   by default, Watch is not;
//! - updates are compare-and-swap on `resource_version`;
//! - a VM is placed on at most one node, and a lost node's VMs are placed
//!   elsewhere only after the fence (new epochs) is committed;
//! - heartbeats are not Raft writes: the leader keeps lease expiries in
//!   memory and restarts every timer when it is elected.
//!
//! The Raft store and services land with the control-plane issue; this
//! crate holds their place in the workspace until then.
