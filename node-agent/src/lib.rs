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
//! The reconcilers land with the node-agent issue. What exists already is
//! [`compute::domain`]: the typed libvirt domain XML they will write.

pub mod compute;
pub mod migration;
pub mod network;
pub mod reconcile;
pub mod runtime;
pub mod storage;
pub mod vm_domain;
