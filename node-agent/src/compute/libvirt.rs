//! [`LibvirtCompute`]: the real hypervisor, through the `virt` crate.
//!
//! One connection per instance, opened lazily and reopened after a failure
//! (libvirtd may restart under a running agent; its domains keep running
//! because QEMU outlives libvirtd). Calls share it without holding a lock
//! (libvirt connections are thread-safe; each call holds its own
//! reference), so the reconciler's concurrent actions on different
//! domains overlap in libvirtd. Domains are defined persistently so an
//! agent restart finds and adopts them.
//!
//! A migration runs on two connections of its own (one blocked in
//! `virDomainMigrateToURI3`, one polling the job and aborting it or
//! switching it to post-copy), so the shared connection stays free for
//! the reconciler while a guest moves. The only FFI calls libvirt's
//! safe wrapper lacks (abort a job, start post-copy) are in
//! `abort_job` and `start_post_copy`.

use std::time::Duration;

use std::sync::{Mutex, MutexGuard};

use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

use crate::compute::domain::{self, DomainSpec};
use crate::compute::{
    Compute, ComputeError, DomainStatus, MigrateRequest, MigrationControl, MigrationProgress,
    PowerState,
};

/// How often a running migration's progress is read.
const MIGRATION_POLL: Duration = Duration::from_millis(200);

/// A libvirtd reached at one URI (`qemu:///system`,
/// `qemu+tcp://10.0.0.1/system`, ...).
#[derive(Debug)]
pub struct LibvirtCompute {
    uri: String,
    conn: Mutex<Option<Connect>>,
}

impl LibvirtCompute {
    /// A backend for the libvirtd at `uri`; connects on first use.
    pub fn new(uri: impl Into<String>) -> Self {
        // libvirt prints every error to stderr by default; ours are
        // returned as values and logged (or not) by the caller.
        virt::error::clear_error_callback();
        Self {
            uri: uri.into(),
            conn: Mutex::new(None),
        }
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn lock(&self) -> MutexGuard<'_, Option<Connect>> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the connection, opening it if needed; after a failure
    /// that may be a lost connection, drops it so the next call reconnects.
    ///
    /// The lock is held only to open or share the connection, never
    /// during the call: libvirt connections are thread-safe, so calls from
    /// several threads (the reconciler acting on several domains at once)
    /// run side by side instead of one after another.
    fn with_conn<T>(
        &self,
        operation: &'static str,
        name: &str,
        f: impl FnOnce(&Connect) -> Result<T, virt::error::Error>,
    ) -> Result<T, ComputeError> {
        let mut conn = {
            let mut guard = self.lock();
            if guard.is_none() {
                let conn = Connect::open(Some(&self.uri))
                    .map_err(|err| hypervisor(operation, name, &err))?;
                *guard = Some(conn);
            }
            let Some(conn) = guard.as_ref() else {
                return Err(ComputeError::Hypervisor {
                    operation,
                    name: name.to_owned(),
                    message: "no connection".to_owned(),
                });
            };
            share(conn).map_err(|err| hypervisor(operation, name, &err))?
        };
        let used = conn.as_ptr();
        let result = f(&conn);
        // Our reference only: the shared one stays open.
        let _ = conn.close();
        if let Err(err) = &result
            && is_connection_error(err)
        {
            let mut guard = self.lock();
            // Only if it is still the connection that failed (another
            // thread may have replaced it already).
            if guard.as_ref().is_some_and(|c| c.as_ptr() == used)
                && let Some(mut stale) = guard.take()
            {
                let _ = stale.close();
            }
        }
        result.map_err(|err| hypervisor(operation, name, &err))
    }

    /// Looks `name` up; `Ok(None)` when libvirt has no such domain.
    fn lookup(conn: &Connect, name: &str) -> Result<Option<Domain>, virt::error::Error> {
        match Domain::lookup_by_name(conn, name) {
            Ok(domain) => Ok(Some(domain)),
            Err(err) if err.code() == ErrorNumber::NoDomain => Ok(None),
            Err(err) => Err(err),
        }
    }

    fn domain_op(
        &self,
        operation: &'static str,
        name: &str,
        f: impl FnOnce(&Domain) -> Result<(), virt::error::Error>,
    ) -> Result<(), ComputeError> {
        let found = self.with_conn(operation, name, |conn| {
            let Some(domain) = Self::lookup(conn, name)? else {
                return Ok(false);
            };
            f(&domain)?;
            Ok(true)
        })?;
        if found {
            Ok(())
        } else {
            Err(ComputeError::NotDefined {
                name: name.to_owned(),
            })
        }
    }
}

/// Another reference to `conn`, released by its own `close()`: the
/// connection lives until every holder has closed it, so a thread that
/// drops a failed connection never pulls it from under another's call.
impl LibvirtCompute {
    /// Plugs `spec`'s disks that the running domain (described by `live`)
    /// lacks into it, and unplugs those it has that `spec` no longer
    /// names ([`domain::disk_changes`]). Live only: the persistent
    /// definition is `spec` already. An unplug asks the guest to let go
    /// of the device; libvirt returns before the guest has.
    fn plug_disks(&self, spec: &DomainSpec, live: &str) -> Result<(), ComputeError> {
        let spec_error = |source| ComputeError::Spec {
            name: spec.name.clone(),
            source,
        };
        let live = domain::live_disks(live).map_err(spec_error)?;
        let changes = domain::disk_changes(&live, &spec.disks);
        let flags = sys::VIR_DOMAIN_AFFECT_LIVE;
        for disk in &changes.detach {
            let xml = domain::disk_xml(disk).map_err(spec_error)?;
            tracing::info!(domain = %spec.name, dev = %disk.target_dev, export = %disk.export_name, "unplugging a disk");
            self.domain_op("detach disk", &spec.name, |d| {
                d.detach_device_flags(&xml, flags).map(drop)
            })?;
        }
        for disk in &changes.attach {
            let xml = domain::disk_xml(disk).map_err(spec_error)?;
            tracing::info!(domain = %spec.name, dev = %disk.target_dev, export = %disk.export_name, "plugging in a disk");
            self.domain_op("attach disk", &spec.name, |d| {
                d.attach_device_flags(&xml, flags).map(drop)
            })?;
        }
        Ok(())
    }
}

fn share(conn: &Connect) -> Result<Connect, virt::error::Error> {
    // SAFETY: `conn` is an open connection (its holder has not closed
    // it), so its pointer is valid; virConnectRef only counts a reference.
    let ret = unsafe { sys::virConnectRef(conn.as_ptr()) };
    if ret == -1 {
        return Err(virt::error::Error::last_error());
    }
    // SAFETY: the pointer is valid and the reference just taken belongs
    // to the returned value, which releases it with `close()`.
    Ok(unsafe { Connect::from_ptr(conn.as_ptr()) })
}

/// Aborts the domain's current job (a migration).
fn abort_job(domain: &Domain) -> Result<(), virt::error::Error> {
    // SAFETY: `domain.as_ptr()` is a valid domain pointer for as long as
    // `domain` lives, which outlasts this call; libvirt does not keep it.
    let ret = unsafe { sys::virDomainAbortJob(domain.as_ptr()) };
    if ret == -1 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// Switches the domain's running migration to post-copy.
fn start_post_copy(domain: &Domain) -> Result<(), virt::error::Error> {
    // SAFETY: as in `abort_job`: a valid pointer for the call's duration,
    // and flags 0 is the only defined value.
    let ret = unsafe { sys::virDomainMigrateStartPostCopy(domain.as_ptr(), 0) };
    if ret == -1 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// The migration job's progress, `None` when no job runs (yet).
fn job_progress(domain: &Domain) -> Option<MigrationProgress> {
    let info = domain.get_job_info().ok()?;
    if info.r#type == sys::VIR_DOMAIN_JOB_NONE as i32 {
        return None;
    }
    Some(MigrationProgress {
        data_total: info.data_total.unwrap_or(0),
        data_processed: info.data_processed.unwrap_or(0),
        data_remaining: info.data_remaining.unwrap_or(0),
        post_copy: false,
    })
}

fn hypervisor(operation: &'static str, name: &str, err: &virt::error::Error) -> ComputeError {
    ComputeError::Hypervisor {
        operation,
        name: name.to_owned(),
        message: err.message().to_owned(),
    }
}

fn is_connection_error(err: &virt::error::Error) -> bool {
    matches!(
        err.code(),
        ErrorNumber::SystemError
            | ErrorNumber::Rpc
            | ErrorNumber::NoConnect
            | ErrorNumber::InvalidConn
    )
}

fn power_state(state: sys::virDomainState) -> PowerState {
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => PowerState::Running,
        sys::VIR_DOMAIN_PAUSED => PowerState::Paused,
        sys::VIR_DOMAIN_SHUTDOWN => PowerState::ShuttingDown,
        sys::VIR_DOMAIN_SHUTOFF => PowerState::ShutOff,
        sys::VIR_DOMAIN_CRASHED => PowerState::Crashed,
        _ => PowerState::Other,
    }
}

fn status_of(domain: &Domain) -> Result<DomainStatus, virt::error::Error> {
    let (state, _reason) = domain.get_state()?;
    Ok(DomainStatus {
        name: domain.get_name()?,
        uuid: domain.get_uuid()?,
        state: power_state(state),
    })
}

impl Compute for LibvirtCompute {
    fn define(&self, spec: &DomainSpec) -> Result<(), ComputeError> {
        let xml = spec.to_xml().map_err(|source| ComputeError::Spec {
            name: spec.name.clone(),
            source,
        })?;
        let existing: Option<Uuid> = self.with_conn("define", &spec.name, |conn| {
            Self::lookup(conn, &spec.name)?
                .map(|d| d.get_uuid())
                .transpose()
        })?;
        if let Some(existing) = existing
            && existing != spec.uuid
        {
            return Err(ComputeError::UuidMismatch {
                name: spec.name.clone(),
                existing,
                wanted: spec.uuid,
            });
        }
        // Defining an existing domain with the same UUID updates it; a
        // running domain keeps its live configuration until restarted,
        // but for its disks, plugged in and out below.
        let live = self.with_conn("define", &spec.name, |conn| {
            let domain = Domain::define_xml(conn, &xml)?;
            if domain.is_active()? {
                domain.get_xml_desc(0).map(Some)
            } else {
                Ok(None)
            }
        })?;
        match live {
            Some(live) => self.plug_disks(spec, &live),
            None => Ok(()),
        }
    }

    fn start(&self, name: &str) -> Result<(), ComputeError> {
        self.domain_op("start", name, |domain| {
            if domain.is_active()? {
                return Ok(());
            }
            domain.create().map(drop)
        })
    }

    fn shutdown(&self, name: &str) -> Result<(), ComputeError> {
        self.domain_op("shutdown", name, |domain| {
            if !domain.is_active()? {
                return Ok(());
            }
            domain.shutdown().map(drop)
        })
    }

    fn destroy(&self, name: &str) -> Result<(), ComputeError> {
        // A forced stop holds libvirtd until QEMU has exited (seconds for
        // a TCG guest): on a connection of its own, several run side by
        // side instead of queueing behind libvirtd's per-connection limit
        // (`max_client_requests`, 5 by default) and the shared
        // connection's short calls.
        let mut conn =
            Connect::open(Some(&self.uri)).map_err(|err| hypervisor("destroy", name, &err))?;
        let result = (|| {
            let Some(domain) = Self::lookup(&conn, name)? else {
                return Ok(false);
            };
            if !domain.is_active()? {
                return Ok(true);
            }
            match domain.destroy() {
                // It stopped by itself between the check and the call.
                Err(err) if err.code() == ErrorNumber::OperationInvalid => Ok(true),
                Err(err) => Err(err),
                Ok(()) => Ok(true),
            }
        })();
        let _ = conn.close();
        match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(ComputeError::NotDefined {
                name: name.to_owned(),
            }),
            Err(err) => Err(hypervisor("destroy", name, &err)),
        }
    }

    fn undefine(&self, name: &str) -> Result<(), ComputeError> {
        match self.domain_op("undefine", name, Domain::undefine) {
            Err(ComputeError::NotDefined { .. }) => Ok(()),
            other => other,
        }
    }

    fn status(&self, name: &str) -> Result<Option<DomainStatus>, ComputeError> {
        self.with_conn("status", name, |conn| {
            Self::lookup(conn, name)?
                .as_ref()
                .map(status_of)
                .transpose()
        })
    }

    fn disks(&self, name: &str) -> Result<Vec<domain::NbdDisk>, ComputeError> {
        let xml = self
            .with_conn("disks", name, |conn| {
                Self::lookup(conn, name)?
                    .map(|d| d.get_xml_desc(0))
                    .transpose()
            })?
            .ok_or_else(|| ComputeError::NotDefined {
                name: name.to_owned(),
            })?;
        domain::live_disks(&xml).map_err(|source| ComputeError::Spec {
            name: name.to_owned(),
            source,
        })
    }

    fn list(&self) -> Result<Vec<DomainStatus>, ComputeError> {
        self.with_conn("list", "", |conn| {
            conn.list_all_domains(0)?.iter().map(status_of).collect()
        })
    }

    fn migrate(
        &self,
        name: &str,
        request: &MigrateRequest,
        watch: &mut dyn FnMut(&MigrationProgress) -> MigrationControl,
    ) -> Result<(), ComputeError> {
        let err = |err: &virt::error::Error| hypervisor("migrate", name, err);
        // The monitor's connection: also checks that the domain runs here
        // before anything starts.
        let mut monitor = Connect::open(Some(&self.uri)).map_err(|e| err(&e))?;
        let result = (|| {
            let Some(domain) = Self::lookup(&monitor, name).map_err(|e| err(&e))? else {
                return Err(ComputeError::NotDefined {
                    name: name.to_owned(),
                });
            };
            if !domain.is_active().map_err(|e| err(&e))? {
                return Err(ComputeError::Hypervisor {
                    operation: "migrate",
                    name: name.to_owned(),
                    message: "the domain is not running".to_owned(),
                });
            }
            let mut flags = sys::VIR_MIGRATE_LIVE
                | sys::VIR_MIGRATE_PEER2PEER
                | sys::VIR_MIGRATE_PERSIST_DEST
                | sys::VIR_MIGRATE_UNDEFINE_SOURCE
                | sys::VIR_MIGRATE_AUTO_CONVERGE
                | sys::VIR_MIGRATE_ABORT_ON_ERROR;
            if request.allow_post_copy {
                flags |= sys::VIR_MIGRATE_POSTCOPY;
            }
            if !request.copy_disks.is_empty() {
                // Storage migration of exactly these disks (the NBD
                // mirror into the target QEMU's own NBD server); the
                // others are shared.
                flags |= sys::VIR_MIGRATE_NON_SHARED_DISK;
            }
            let params = virt::domain::MigrateParameters {
                bandwidth: request.bandwidth_mib_s,
                migrate_disks: request.copy_disks.clone(),
                ..Default::default()
            };
            let (uri, target, domain_name) = (
                self.uri.clone(),
                request.target_uri.clone(),
                name.to_owned(),
            );
            // The blocking call, on its own connection and thread.
            let copier = std::thread::Builder::new()
                .name(format!("migrate-{name}"))
                .spawn(move || -> Result<(), virt::error::Error> {
                    let mut conn = Connect::open(Some(&uri))?;
                    let result = Domain::lookup_by_name(&conn, &domain_name)
                        .and_then(|d| d.migrate_to_uri3(Some(&target), params, flags));
                    let _ = conn.close();
                    result
                })
                .map_err(|e| ComputeError::Hypervisor {
                    operation: "migrate",
                    name: name.to_owned(),
                    message: format!("could not start the migration thread: {e}"),
                })?;
            let mut progress = MigrationProgress::default();
            let mut abort_requested = false;
            while !copier.is_finished() {
                std::thread::sleep(MIGRATION_POLL);
                if let Some(now) = job_progress(&domain) {
                    progress = MigrationProgress {
                        post_copy: progress.post_copy,
                        ..now
                    };
                }
                match watch(&progress) {
                    MigrationControl::Continue => {}
                    MigrationControl::Abort => {
                        // Refused in some phases (before QEMU copies):
                        // asked again on the next tick until it takes.
                        if abort_job(&domain).is_ok() {
                            abort_requested = true;
                        }
                    }
                    MigrationControl::PostCopy => {
                        if request.allow_post_copy
                            && !progress.post_copy
                            && start_post_copy(&domain).is_ok()
                        {
                            progress.post_copy = true;
                        }
                    }
                }
            }
            match copier.join() {
                Ok(Ok(())) => {
                    // The last report; the answer no longer matters.
                    let _ = watch(&MigrationProgress {
                        data_remaining: 0,
                        ..progress
                    });
                    Ok(())
                }
                Ok(Err(_)) if abort_requested => Err(ComputeError::MigrationAborted {
                    name: name.to_owned(),
                }),
                Ok(Err(e)) => Err(err(&e)),
                Err(_) => Err(ComputeError::Hypervisor {
                    operation: "migrate",
                    name: name.to_owned(),
                    message: "the migration thread panicked".to_owned(),
                }),
            }
        })();
        let _ = monitor.close();
        result
    }
}
