//! [`SimCompute`]: an in-memory hypervisor for fast tests and scale runs.
//!
//! It keeps definitions and power states in a map and changes state only
//! when told: `shutdown` moves a domain to
//! [`PowerState::ShuttingDown`] and a test decides whether the guest
//! complies ([`SimCompute::complete_shutdown`]) or hangs; a test can also
//! crash a domain or make the next call of an operation fail. So a
//! reconciler test steps through every state deterministically.
//!
//! Migration: hypervisors are linked by URI ([`SimCompute::link`]); a
//! migration copies the guest's memory in steps (all of it per step, or
//! the request's bandwidth per step), reporting progress after each, and
//! moves the domain to the peer when nothing is left. A guest marked
//! [`SimCompute::never_converge`] dirties memory as fast as it is copied,
//! so only an abort or post-copy ends its migration.
//!
//! Latency: [`SimCompute::set_call_latency`] makes every state-changing call
//! (define, start, shutdown, destroy, undefine) take that long, outside
//! the lock, as a real hypervisor's calls do; the simulator counts how many
//! such calls overlap ([`SimCompute::max_overlapping_calls`]), so a test can
//! prove that a caller runs them concurrently.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::compute::domain::{self, DomainSpec, NbdDisk};
use crate::compute::{
    Compute, ComputeError, DomainStatus, MigrateRequest, MigrationControl, MigrationProgress,
    PowerState,
};

/// One simulated domain.
#[derive(Debug, Clone)]
struct SimDomain {
    spec: DomainSpec,
    state: PowerState,
    /// How many times it was started (boots).
    starts: u64,
    /// The disks the running guest has: the spec's at its start, then
    /// plugged in and out by definitions while it runs.
    live_disks: Vec<NbdDisk>,
}

#[derive(Debug, Default)]
struct State {
    domains: BTreeMap<String, SimDomain>,
    /// Operations that fail once, by name.
    fail_next: Vec<&'static str>,
    /// Hypervisors a migration can reach, by URI.
    peers: BTreeMap<String, Weak<SimCompute>>,
    /// Guests whose migration never converges by itself.
    never_converge: BTreeSet<String>,
    /// Guests whose every migration fails at once.
    refuse_migration: BTreeSet<String>,
    /// The most domains that were ever active at once.
    most_active: usize,
}

/// An in-memory hypervisor. See the module doc.
#[derive(Debug, Default)]
pub struct SimCompute {
    state: Mutex<State>,
    /// How long each state-changing call takes.
    latency: Mutex<Duration>,
    /// State-changing calls under way now.
    in_flight: AtomicUsize,
    /// The most that were ever under way at once.
    max_in_flight: AtomicUsize,
}

/// One state-changing call under way; counted until dropped.
struct InFlight<'a>(&'a SimCompute);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SimCompute {
    /// An empty hypervisor.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every
        // update is one assignment), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes every later state-changing call take `latency` (slept
    /// outside the lock, so calls from several threads overlap).
    pub fn set_call_latency(&self, latency: Duration) {
        *self
            .latency
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = latency;
    }

    /// The most state-changing calls that were ever under way at once.
    pub fn max_overlapping_calls(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Counts a state-changing call and takes the configured latency; the
    /// call is counted until the returned guard drops.
    fn call(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let latency = *self
            .latency
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
        InFlight(self)
    }

    /// Makes the next call of `operation` (`define`, `start`, `shutdown`,
    /// `destroy`, `undefine`) fail with a hypervisor error.
    pub fn fail_next(&self, operation: &'static str) {
        self.lock().fail_next.push(operation);
    }

    /// The guest obeys a pending shutdown: a shutting-down domain stops.
    pub fn complete_shutdown(&self, name: &str) {
        if let Some(domain) = self.lock().domains.get_mut(name)
            && domain.state == PowerState::ShuttingDown
        {
            domain.state = PowerState::ShutOff;
        }
    }

    /// Lets migrations from this hypervisor reach `peer` at `uri`.
    pub fn link(&self, uri: impl Into<String>, peer: &Arc<SimCompute>) {
        self.lock().peers.insert(uri.into(), Arc::downgrade(peer));
    }

    /// The guest `name` dirties memory as fast as a migration copies it.
    pub fn never_converge(&self, name: &str) {
        self.lock().never_converge.insert(name.to_owned());
    }

    /// Every migration of the guest `name` fails at once (the guest
    /// keeps running here), as when the target cannot be reached.
    pub fn refuse_migration(&self, name: &str) {
        self.lock().refuse_migration.insert(name.to_owned());
    }

    /// The guest crashes.
    pub fn crash(&self, name: &str) {
        if let Some(domain) = self.lock().domains.get_mut(name) {
            domain.state = PowerState::Crashed;
        }
    }

    /// How many times `name` was started.
    pub fn starts(&self, name: &str) -> u64 {
        self.lock().domains.get(name).map_or(0, |d| d.starts)
    }

    /// The most domains that were ever active at once (counted after
    /// each call on a domain).
    pub fn most_active(&self) -> usize {
        self.lock().most_active
    }

    /// The disks the guest `name` has while it runs (empty when it is not
    /// defined).
    pub fn live_disks(&self, name: &str) -> Vec<NbdDisk> {
        self.lock()
            .domains
            .get(name)
            .map(|d| d.live_disks.clone())
            .unwrap_or_default()
    }

    /// The definition of `name`, as last defined.
    pub fn spec(&self, name: &str) -> Option<DomainSpec> {
        self.lock().domains.get(name).map(|d| d.spec.clone())
    }

    fn check_fault(
        state: &mut State,
        operation: &'static str,
        name: &str,
    ) -> Result<(), ComputeError> {
        if let Some(i) = state.fail_next.iter().position(|op| *op == operation) {
            state.fail_next.remove(i);
            return Err(ComputeError::Hypervisor {
                operation,
                name: name.to_owned(),
                message: "injected failure".to_owned(),
            });
        }
        Ok(())
    }

    fn with_domain<T>(
        &self,
        operation: &'static str,
        name: &str,
        f: impl FnOnce(&mut SimDomain) -> T,
    ) -> Result<T, ComputeError> {
        let _call = self.call();
        let mut state = self.lock();
        Self::check_fault(&mut state, operation, name)?;
        let domain = state
            .domains
            .get_mut(name)
            .ok_or_else(|| ComputeError::NotDefined {
                name: name.to_owned(),
            })?;
        let result = f(domain);
        // Counted under the lock of the call that may have started one.
        let active = state
            .domains
            .values()
            .filter(|d| d.state.is_active())
            .count();
        state.most_active = state.most_active.max(active);
        Ok(result)
    }
}

impl Compute for SimCompute {
    fn define(&self, spec: &DomainSpec) -> Result<(), ComputeError> {
        spec.validate().map_err(|source| ComputeError::Spec {
            name: spec.name.clone(),
            source,
        })?;
        let _call = self.call();
        let mut state = self.lock();
        Self::check_fault(&mut state, "define", &spec.name)?;
        match state.domains.get_mut(&spec.name) {
            Some(existing) if existing.spec.uuid != spec.uuid => Err(ComputeError::UuidMismatch {
                name: spec.name.clone(),
                existing: existing.spec.uuid,
                wanted: spec.uuid,
            }),
            Some(existing) => {
                existing.spec = spec.clone();
                if existing.state.is_active() {
                    let changes = domain::disk_changes(&existing.live_disks, &spec.disks);
                    existing.live_disks.retain(|d| !changes.detach.contains(d));
                    existing.live_disks.extend(changes.attach);
                }
                Ok(())
            }
            None => {
                let domain = SimDomain {
                    spec: spec.clone(),
                    state: PowerState::ShutOff,
                    starts: 0,
                    live_disks: Vec::new(),
                };
                state.domains.insert(spec.name.clone(), domain);
                Ok(())
            }
        }
    }

    fn start(&self, name: &str) -> Result<(), ComputeError> {
        self.with_domain("start", name, |d| {
            if !d.state.is_active() {
                d.state = PowerState::Running;
                d.starts += 1;
                d.live_disks.clone_from(&d.spec.disks);
            }
        })
    }

    fn shutdown(&self, name: &str) -> Result<(), ComputeError> {
        self.with_domain("shutdown", name, |d| {
            if d.state == PowerState::Running {
                d.state = PowerState::ShuttingDown;
            }
        })
    }

    fn destroy(&self, name: &str) -> Result<(), ComputeError> {
        self.with_domain("destroy", name, |d| {
            if d.state.is_active() {
                d.state = PowerState::ShutOff;
            }
        })
    }

    fn undefine(&self, name: &str) -> Result<(), ComputeError> {
        let _call = self.call();
        let mut state = self.lock();
        Self::check_fault(&mut state, "undefine", name)?;
        match state.domains.get(name) {
            Some(d) if d.state.is_active() => Err(ComputeError::Hypervisor {
                operation: "undefine",
                name: name.to_owned(),
                message: "domain is running".to_owned(),
            }),
            _ => {
                state.domains.remove(name);
                Ok(())
            }
        }
    }

    fn status(&self, name: &str) -> Result<Option<DomainStatus>, ComputeError> {
        Ok(self.lock().domains.get(name).map(|d| DomainStatus {
            name: name.to_owned(),
            uuid: d.spec.uuid,
            state: d.state,
        }))
    }

    fn disks(&self, name: &str) -> Result<Vec<NbdDisk>, ComputeError> {
        match self.lock().domains.get(name) {
            Some(d) if d.state.is_active() => Ok(d.live_disks.clone()),
            Some(d) => Ok(d.spec.disks.clone()),
            None => Err(ComputeError::NotDefined {
                name: name.to_owned(),
            }),
        }
    }

    fn list(&self) -> Result<Vec<DomainStatus>, ComputeError> {
        Ok(self
            .lock()
            .domains
            .iter()
            .map(|(name, d)| DomainStatus {
                name: name.clone(),
                uuid: d.spec.uuid,
                state: d.state,
            })
            .collect())
    }

    fn migrate(
        &self,
        name: &str,
        request: &MigrateRequest,
        watch: &mut dyn FnMut(&MigrationProgress) -> MigrationControl,
    ) -> Result<(), ComputeError> {
        let failed = |message: &str| ComputeError::Hypervisor {
            operation: "migrate",
            name: name.to_owned(),
            message: message.to_owned(),
        };
        let (peer, memory, converges) = {
            let mut state = self.lock();
            Self::check_fault(&mut state, "migrate", name)?;
            let domain = state
                .domains
                .get(name)
                .ok_or_else(|| ComputeError::NotDefined {
                    name: name.to_owned(),
                })?;
            if !domain.state.is_active() {
                return Err(failed("the domain is not running"));
            }
            if state.refuse_migration.contains(name) {
                return Err(failed("refused (the simulator was told to)"));
            }
            let memory = domain.spec.memory_mib << 20;
            let peer = state
                .peers
                .get(&request.target_uri)
                .and_then(Weak::upgrade)
                .ok_or_else(|| failed(&format!("cannot connect to {}", request.target_uri)))?;
            (peer, memory, !state.never_converge.contains(name))
        };
        let step = request.bandwidth_mib_s.map_or(memory, |b| (b << 20).max(1));
        let mut progress = MigrationProgress {
            data_total: memory,
            data_processed: 0,
            data_remaining: memory,
            post_copy: false,
        };
        while progress.data_remaining > 0 && !progress.post_copy {
            std::thread::sleep(std::time::Duration::from_millis(1));
            let copied = step.min(progress.data_remaining);
            progress.data_processed += copied;
            if converges {
                progress.data_remaining -= copied;
            } else {
                progress.data_total += copied;
            }
            match watch(&progress) {
                MigrationControl::Continue => {}
                MigrationControl::Abort => {
                    return Err(ComputeError::MigrationAborted {
                        name: name.to_owned(),
                    });
                }
                MigrationControl::PostCopy if request.allow_post_copy => progress.post_copy = true,
                MigrationControl::PostCopy => {}
            }
        }
        // The last report (what a real hypervisor shows at the end).
        let _ = watch(&progress);
        // The switchover: the target takes the domain, the source lets go.
        let Some(domain) = self.lock().domains.get(name).cloned() else {
            return Err(failed("the domain vanished during the migration"));
        };
        {
            let mut target = peer.lock();
            if target.domains.contains_key(name) {
                return Err(failed("a domain of that name exists on the target"));
            }
            target.domains.insert(
                name.to_owned(),
                SimDomain {
                    state: PowerState::Running,
                    ..domain
                },
            );
        }
        self.lock().domains.remove(name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::compute::{MigrateRequest, MigrationControl, conformance};

    #[test]
    fn passes_the_conformance_suite() {
        let sim = SimCompute::new();
        // The simulated guest never answers ACPI by itself: the suite's
        // graceful stop must fall back to a forced one.
        conformance::run(&sim, conformance::spec("sim-a"), Duration::from_millis(300));
    }

    #[test]
    fn passes_the_disk_plugging_suite() {
        let disk = |export: &str| crate::compute::domain::NbdDisk {
            target_dev: "vda".to_owned(),
            host: "127.0.0.1".to_owned(),
            port: 10809,
            export_name: export.to_owned(),
        };
        conformance::run_disk_plugging(
            &SimCompute::new(),
            conformance::spec("sim-p"),
            [disk("root"), disk("data")],
            &|| {},
            Duration::from_millis(300),
        );
    }

    #[test]
    fn passes_the_migration_suite() {
        let a = Arc::new(SimCompute::new());
        let b = Arc::new(SimCompute::new());
        a.link("sim://b", &b);
        b.link("sim://a", &a);
        conformance::run_migration(
            conformance::Peer {
                compute: &*a,
                uri: "sim://a",
            },
            conformance::Peer {
                compute: &*b,
                uri: "sim://b",
            },
            conformance::spec("sim-m"),
        );
    }

    #[test]
    fn a_migration_that_never_converges_ends_only_by_abort_or_post_copy() {
        let a = Arc::new(SimCompute::new());
        let b = Arc::new(SimCompute::new());
        a.link("sim://b", &b);
        let spec = conformance::spec("sim-n");
        a.define(&spec).unwrap();
        a.start("sim-n").unwrap();
        a.never_converge("sim-n");
        let request = MigrateRequest {
            target_uri: "sim://b".into(),
            allow_post_copy: false,
            bandwidth_mib_s: Some(8),
            copy_disks: Vec::new(),
        };
        let mut ticks = 0;
        let result = a.migrate("sim-n", &request, &mut |p| {
            ticks += 1;
            assert!(p.data_remaining > 0, "it never converges");
            if ticks == 50 {
                MigrationControl::Abort
            } else {
                MigrationControl::Continue
            }
        });
        assert!(matches!(result, Err(ComputeError::MigrationAborted { .. })));
        assert_eq!(
            a.status("sim-n").unwrap().unwrap().state,
            PowerState::Running
        );
        // Post-copy refused unless allowed: still copying, then aborted.
        let mut ticks = 0;
        let result = a.migrate("sim-n", &request, &mut |_| {
            ticks += 1;
            if ticks < 5 {
                MigrationControl::PostCopy
            } else {
                MigrationControl::Abort
            }
        });
        assert!(matches!(result, Err(ComputeError::MigrationAborted { .. })));
        a.migrate(
            "sim-n",
            &MigrateRequest {
                allow_post_copy: true,
                ..request
            },
            &mut |_| MigrationControl::PostCopy,
        )
        .unwrap();
        assert_eq!(
            b.status("sim-n").unwrap().unwrap().state,
            PowerState::Running
        );
        assert!(a.status("sim-n").unwrap().is_none());
    }

    #[test]
    fn a_graceful_stop_waits_for_the_guest() {
        let sim = std::sync::Arc::new(SimCompute::new());
        let spec = conformance::spec("sim-b");
        sim.define(&spec).unwrap();
        sim.start("sim-b").unwrap();
        let guest = {
            let sim = sim.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                sim.complete_shutdown("sim-b");
            })
        };
        assert!(
            sim.stop("sim-b", Duration::from_secs(10)).unwrap(),
            "the guest stopped by itself"
        );
        guest.join().unwrap();
        assert_eq!(
            sim.status("sim-b").unwrap().unwrap().state,
            PowerState::ShutOff
        );
    }

    #[test]
    fn injected_failures_fail_once() {
        let sim = SimCompute::new();
        let spec = conformance::spec("sim-c");
        sim.define(&spec).unwrap();
        sim.fail_next("start");
        assert!(matches!(
            sim.start("sim-c"),
            Err(ComputeError::Hypervisor {
                operation: "start",
                ..
            })
        ));
        sim.start("sim-c").unwrap();
        assert_eq!(sim.starts("sim-c"), 1);
        sim.crash("sim-c");
        assert_eq!(
            sim.status("sim-c").unwrap().unwrap().state,
            PowerState::Crashed
        );
    }
}
