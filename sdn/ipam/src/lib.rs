//! IP address management for VM networks: a pure library (no host
//! dependencies, no clock: callers pass the time in).
//!
//! - [`Cidr`]: an IPv4 network, parsed from `a.b.c.d/len`;
//! - [`Pool`]: the addresses of one network, leased by [`Owner`] (a VM's
//!   uid and NIC index, so an address follows the VM, not a node), with
//!   static requests, reservations (network, broadcast, gateway) and a
//!   grace period after release;
//! - [`Registry`]: the pools of every network; networks never overlap.
//!
//! Invariants:
//! - an address is leased to at most one owner, and an owner holds at most
//!   one address per pool;
//! - a reserved address is never leased; every lease lies inside the CIDR;
//! - a released address stays held (and reclaimable by its owner) until
//!   its grace period ends, so a late packet never reaches a new VM.

mod cidr;
mod pool;
mod registry;

pub use cidr::Cidr;
pub use pool::{Lease, LeaseState, Owner, Pool};
pub use registry::Registry;

use std::net::Ipv4Addr;

/// Why an IPAM operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// Text that is not `a.b.c.d/len` with len 0–32.
    #[error("{text:?} is not an IPv4 CIDR (a.b.c.d/len): {reason}")]
    InvalidCidr {
        /// The rejected text.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// An address outside the pool's network.
    #[error("{ip} is outside {cidr}")]
    OutOfRange {
        /// The address.
        ip: Ipv4Addr,
        /// The pool's network.
        cidr: Cidr,
    },
    /// A reserved address (network, broadcast, gateway, or reserved by hand).
    #[error("{ip} is reserved in {cidr}")]
    Reserved {
        /// The address.
        ip: Ipv4Addr,
        /// The pool's network.
        cidr: Cidr,
    },
    /// The address is leased to (or held for) another owner.
    #[error("{ip} is already leased to {owner}")]
    InUse {
        /// The address.
        ip: Ipv4Addr,
        /// Who holds it.
        owner: Owner,
    },
    /// The owner already holds a different address than the one requested.
    #[error("{owner} already holds {held}, not the requested {requested}")]
    OwnerHoldsOther {
        /// The owner.
        owner: Owner,
        /// What it holds.
        held: Ipv4Addr,
        /// What it asked for.
        requested: Ipv4Addr,
    },
    /// Every address of the pool is leased, held or reserved.
    #[error("network {cidr} is exhausted: {leased} addresses leased or held, {reserved} reserved")]
    Exhausted {
        /// The pool's network.
        cidr: Cidr,
        /// Leased or held in grace.
        leased: usize,
        /// Reserved.
        reserved: usize,
    },
    /// A network's CIDR overlaps another network's.
    #[error("network {network:?} ({cidr}) overlaps network {other:?} ({other_cidr})")]
    Overlap {
        /// The network being added.
        network: String,
        /// Its CIDR.
        cidr: Cidr,
        /// The network it overlaps.
        other: String,
        /// That network's CIDR.
        other_cidr: Cidr,
    },
    /// A network of that name is already registered.
    #[error("network {0:?} is already registered")]
    DuplicateNetwork(String),
    /// No network of that name.
    #[error("no network {0:?}")]
    UnknownNetwork(String),
}
