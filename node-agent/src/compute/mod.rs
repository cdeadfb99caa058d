//! Compute: what the agent asks the hypervisor to run.
//!
//! [`domain`] turns a typed, validated [`domain::DomainSpec`] into libvirt
//! domain XML. The spec is the whole contract with libvirt: volumes reach
//! the guest as NBD disks that QEMU opens itself (the host kernel has no
//! NBD client), NICs are pre-named taps (`<interface type='ethernet'>`)
//! that `basalt-sdn` wires up, and the console goes to a file the agent can
//! read back.
//!
//! [`Compute`] is the narrow interface the reconciler drives, with two
//! implementations: [`libvirt::LibvirtCompute`] (real: the `virt` crate on
//! a libvirtd) and [`sim::SimCompute`] (in memory, for fast tests and
//! scale runs, with state changes that a test can step by hand). Both pass
//! the one suite in [`conformance`].
//!
//! Invariants: every operation is idempotent where the reconciler needs it
//! to be (defining an identical spec again, destroying a stopped domain,
//! undefining a missing one); a domain is known by name, and its UUID
//! stays the same across redefinitions.
//!
//! Live migration ([`Compute::migrate`]) is peer to peer: the source's
//! hypervisor talks to the target's by itself. When it returns `Ok` the
//! guest runs on the target and its definition has moved there (the
//! source keeps none); when it returns an error the guest still runs on
//! the source and the target keeps nothing — one running copy either way.

pub mod conformance;
pub mod domain;
pub mod libvirt;
pub mod sim;

use std::time::Duration;

use uuid::Uuid;

use crate::compute::domain::DomainSpec;

/// What a hypervisor says a domain is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    /// Running (or blocked on I/O, which is running for our purposes).
    Running,
    /// Paused: by an operator, during migration, or while storage is
    /// suspended.
    Paused,
    /// Shutting down after a graceful request.
    ShuttingDown,
    /// Defined but not running.
    ShutOff,
    /// Stopped by a crash.
    Crashed,
    /// Anything else the hypervisor reports (no state, PM-suspended).
    Other,
}

impl PowerState {
    /// Whether QEMU is running for this domain (it holds its disks).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            PowerState::Running | PowerState::Paused | PowerState::ShuttingDown
        )
    }
}

/// A domain as the hypervisor lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainStatus {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: Uuid,
    /// What it is doing.
    pub state: PowerState,
}

/// Where and how to move a running domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateRequest {
    /// The target hypervisor, as the source's hypervisor reaches it
    /// (`qemu+tcp://10.0.0.2/system`).
    pub target_uri: String,
    /// Enable post-copy, so that the watcher may switch to it
    /// ([`MigrationControl::PostCopy`]).
    pub allow_post_copy: bool,
    /// Cap the copy's bandwidth (MiB/s); `None` for no cap.
    pub bandwidth_mib_s: Option<u64>,
    /// Disks (by target device, `vdb`) whose contents the hypervisor
    /// copies too, into the disk of the same device the target's domain
    /// opens (an empty volume there); the others are shared (the same NBD
    /// export on both nodes).
    pub copy_disks: Vec<String>,
}

/// How far a migration is, as the hypervisor reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationProgress {
    /// Bytes to copy in total (grows as the guest dirties memory).
    pub data_total: u64,
    /// Bytes copied.
    pub data_processed: u64,
    /// Bytes still to copy.
    pub data_remaining: u64,
    /// Post-copy has started: the guest runs on the target.
    pub post_copy: bool,
}

/// What the watcher of a migration wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationControl {
    /// Keep copying.
    Continue,
    /// Abort: the guest stays on the source.
    Abort,
    /// Switch to post-copy (only when the request allowed it).
    PostCopy,
}

/// A compute operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The spec could not be turned into a domain definition.
    #[error("domain {name}: invalid spec")]
    Spec {
        /// The domain.
        name: String,
        /// Why.
        #[source]
        source: domain::DomainError,
    },
    /// No domain of that name is defined.
    #[error("domain {name} is not defined")]
    NotDefined {
        /// The domain.
        name: String,
    },
    /// A domain of that name exists with another UUID: it is not ours to
    /// replace.
    #[error("domain {name} exists with UUID {existing}, not {wanted}")]
    UuidMismatch {
        /// The domain.
        name: String,
        /// The UUID it has.
        existing: Uuid,
        /// The UUID the spec asks for.
        wanted: Uuid,
    },
    /// A migration was aborted on request; the guest stays on the source.
    #[error("migration of domain {name} aborted")]
    MigrationAborted {
        /// The domain.
        name: String,
    },
    /// The hypervisor refused or failed an operation.
    #[error("{operation} of domain {name}: {message}")]
    Hypervisor {
        /// What was asked (`define`, `start`, ...).
        operation: &'static str,
        /// The domain (empty for connection-wide calls).
        name: String,
        /// The hypervisor's message.
        message: String,
    },
}

/// The hypervisor operations the agent's reconciler needs. Blocking calls
/// (libvirt's API is synchronous): async callers run them on a blocking
/// thread.
pub trait Compute: Send + Sync {
    /// Defines the domain, or redefines it if its definition differs.
    /// A running domain keeps running; the new definition applies at its
    /// next start, but for its disks: those the spec adds are plugged in
    /// at once and those it drops are unplugged (the guest is asked to let
    /// go; [`domain::disk_changes`] says which).
    fn define(&self, spec: &DomainSpec) -> Result<(), ComputeError>;
    /// The NBD disks domain `name` has: the running guest's, or its
    /// definition's while it is stopped.
    fn disks(&self, name: &str) -> Result<Vec<domain::NbdDisk>, ComputeError>;
    /// Starts a defined domain; starting a running one is not an error.
    fn start(&self, name: &str) -> Result<(), ComputeError>;
    /// Asks the guest to shut down (ACPI); returns at once.
    fn shutdown(&self, name: &str) -> Result<(), ComputeError>;
    /// Stops the domain at once (QEMU killed); stopping a stopped one is
    /// not an error.
    fn destroy(&self, name: &str) -> Result<(), ComputeError>;
    /// Removes the definition (the domain must be stopped first); removing
    /// a missing one is not an error.
    fn undefine(&self, name: &str) -> Result<(), ComputeError>;
    /// The domain's status, `None` when no domain of that name exists.
    fn status(&self, name: &str) -> Result<Option<DomainStatus>, ComputeError>;
    /// Every domain the hypervisor knows, running or not.
    fn list(&self) -> Result<Vec<DomainStatus>, ComputeError>;
    /// Moves the running domain `name` live to `request.target_uri`,
    /// peer to peer, with auto-converge (and post-copy enabled when
    /// asked). Blocks until it is over; calls `watch` with the progress
    /// every few hundred milliseconds and obeys its answer (and once more
    /// at the end of a successful copy, ignoring the answer). `Ok`: the
    /// guest runs on the target, which holds its persistent definition,
    /// and the source holds nothing. An error: the guest still runs on
    /// the source and the target holds nothing
    /// ([`ComputeError::MigrationAborted`] when `watch` asked for it).
    fn migrate(
        &self,
        name: &str,
        request: &MigrateRequest,
        watch: &mut dyn FnMut(&MigrationProgress) -> MigrationControl,
    ) -> Result<(), ComputeError>;

    /// Graceful then forced stop: asks the guest to shut down, waits up to
    /// `grace` for it to stop, then destroys it. Returns whether the guest
    /// stopped by itself.
    fn stop(&self, name: &str, grace: Duration) -> Result<bool, ComputeError> {
        match self.status(name)? {
            None => {
                return Err(ComputeError::NotDefined {
                    name: name.to_owned(),
                });
            }
            Some(status) if !status.state.is_active() => return Ok(true),
            Some(_) => {}
        }
        self.shutdown(name)?;
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if self.status(name)?.is_none_or(|s| !s.state.is_active()) {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.destroy(name)?;
        Ok(false)
    }
}

/// A shared backend is a backend (the agent's loops and tests share one).
impl<T: Compute + ?Sized> Compute for std::sync::Arc<T> {
    fn define(&self, spec: &DomainSpec) -> Result<(), ComputeError> {
        (**self).define(spec)
    }
    fn start(&self, name: &str) -> Result<(), ComputeError> {
        (**self).start(name)
    }
    fn shutdown(&self, name: &str) -> Result<(), ComputeError> {
        (**self).shutdown(name)
    }
    fn destroy(&self, name: &str) -> Result<(), ComputeError> {
        (**self).destroy(name)
    }
    fn undefine(&self, name: &str) -> Result<(), ComputeError> {
        (**self).undefine(name)
    }
    fn status(&self, name: &str) -> Result<Option<DomainStatus>, ComputeError> {
        (**self).status(name)
    }
    fn disks(&self, name: &str) -> Result<Vec<domain::NbdDisk>, ComputeError> {
        (**self).disks(name)
    }
    fn list(&self) -> Result<Vec<DomainStatus>, ComputeError> {
        (**self).list()
    }
    fn migrate(
        &self,
        name: &str,
        request: &MigrateRequest,
        watch: &mut dyn FnMut(&MigrationProgress) -> MigrationControl,
    ) -> Result<(), ComputeError> {
        (**self).migrate(name, request, watch)
    }
    fn stop(&self, name: &str, grace: Duration) -> Result<bool, ComputeError> {
        (**self).stop(name, grace)
    }
}
