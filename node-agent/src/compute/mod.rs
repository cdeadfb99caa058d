//! Compute: what the agent asks libvirt to run.
//!
//! [`domain`] turns a typed, validated [`domain::DomainSpec`] into libvirt
//! domain XML. The spec is the whole contract with libvirt: volumes reach
//! the guest as NBD disks that QEMU opens itself (the host kernel has no
//! NBD client), NICs are pre-named taps (`<interface type='ethernet'>`)
//! that `basalt-sdn` wires up, and the console goes to a file the agent can
//! read back.

pub mod domain;
