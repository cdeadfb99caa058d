//! Basalt's software-defined storage, run as its own process per node
//! (`basaltd storage`): a thin-provisioned pool, DRBD-style synchronous
//! replication with epoch fencing, and an NBD server that QEMU reads its
//! disks from.
//!
//! Invariants:
//! - a write acknowledged to a client is on every up-to-date replica
//!   (protocol C); after `kill -9` every acknowledged write is readable;
//! - a replica rejects writes that carry an epoch older than the newest it
//!   has seen;
//! - no input from a client or a peer can panic the process or damage a
//!   volume.
//!
//! The pool, replication and NBD server land with the storage issue; this
//! crate holds their place in the workspace until then.
