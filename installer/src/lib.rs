//! `basalt-installer`: Basalt's unattended installer.
//!
//! An operator describes a node in an answer file ([`answer`]): create or
//! join a cluster, its name, network, which disk gets the system (chosen by
//! a filter, [`disks`]), where the storage pool goes, the control plane's
//! address and join token, SSH keys. The installer first validates the file
//! (every error names the field), then makes a [`plan()`] from the file and
//! what the machine has — a pure function, printed by `basalt-install
//! plan` — and only then [`execute`]s it on the live ISO: partitions the
//! disk, copies the system, installs the Basalt package, writes the node's
//! configs and units, and installs GRUB for BIOS and UEFI. The answer file
//! comes from the kernel command line, a partition labelled `BASALT-ANS`,
//! the ISO itself, or text-mode questions ([`source`]).
//!
//! Invariants: nothing touches a disk before the answer file validated and
//! the plan was made; the plan never chooses the boot medium.

pub mod answer;
pub mod disks;
pub mod execute;
pub mod plan;
pub mod source;

pub use answer::{AnswerError, AnswerFile, FieldError};
pub use plan::{Inventory, Plan, plan};
