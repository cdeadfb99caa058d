//! The Basalt node agent: one per node. It joins the cluster with a token,
//! renews its lease, watches its placements and reconciles volumes (through
//! the node's storage process), NICs (`basalt-sdn`) and libvirt domains,
//! then reports status.
//!
//! Invariants:
//! - reconcilers are idempotent and take no input: they run periodically
//!   and on a trigger, and compare desired with observed state;
//! - an agent that has had no heartbeat acknowledged for the fencing window
//!   stops its VMs; an agent restart adopts running domains instead of
//!   restarting them.
//!
//! Map: [`runtime`] joins, keeps the lease and runs the passes;
//! [`reconcile`] plans domains from placements for a [`compute`] backend
//! (libvirt, or simulated) using [`vm_domain`]'s typed XML; [`storage`]
//! makes the disks volumes of the node's pool; [`network`] drives the eBPF
//! datapath; [`migration`] is the agent's side of live migration;
//! [`credential`] keeps the node credential across restarts.

pub mod compute;
pub mod credential;
pub mod migration;
pub mod network;
pub mod reconcile;
pub mod runtime;
pub mod storage;
pub mod vm_domain;
