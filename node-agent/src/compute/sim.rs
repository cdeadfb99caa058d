//! [`SimCompute`]: an in-memory hypervisor for fast tests and scale runs.
//!
//! It keeps definitions and power states in a map and changes state only
//! when told: `shutdown` moves a domain to
//! [`PowerState::ShuttingDown`] and a test decides whether the guest
//! complies ([`SimCompute::complete_shutdown`]) or hangs; a test can also
//! crash a domain or make the next call of an operation fail. So a
//! reconciler test steps through every state deterministically.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::compute::domain::DomainSpec;
use crate::compute::{Compute, ComputeError, DomainStatus, PowerState};

/// One simulated domain.
#[derive(Debug, Clone)]
struct SimDomain {
    spec: DomainSpec,
    state: PowerState,
    /// How many times it was started (boots).
    starts: u64,
}

#[derive(Debug, Default)]
struct State {
    domains: BTreeMap<String, SimDomain>,
    /// Operations that fail once, by name.
    fail_next: Vec<&'static str>,
}

/// An in-memory hypervisor. See the module doc.
#[derive(Debug, Default)]
pub struct SimCompute {
    state: Mutex<State>,
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
        let mut state = self.lock();
        Self::check_fault(&mut state, operation, name)?;
        let domain = state
            .domains
            .get_mut(name)
            .ok_or_else(|| ComputeError::NotDefined {
                name: name.to_owned(),
            })?;
        Ok(f(domain))
    }
}

impl Compute for SimCompute {
    fn define(&self, spec: &DomainSpec) -> Result<(), ComputeError> {
        spec.validate().map_err(|source| ComputeError::Spec {
            name: spec.name.clone(),
            source,
        })?;
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
                Ok(())
            }
            None => {
                let domain = SimDomain {
                    spec: spec.clone(),
                    state: PowerState::ShutOff,
                    starts: 0,
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::compute::conformance;

    #[test]
    fn passes_the_conformance_suite() {
        let sim = SimCompute::new();
        // The simulated guest never answers ACPI by itself: the suite's
        // graceful stop must fall back to a forced one.
        conformance::run(&sim, conformance::spec("sim-a"), Duration::from_millis(300));
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
