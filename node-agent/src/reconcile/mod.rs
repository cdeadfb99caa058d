//! The compute reconciler: makes the hypervisor run what the control plane
//! placed on this node, and nothing else of Basalt's.
//!
//! Split as the rest of Basalt's control loops are: [`plan()`] is pure (what
//! is wanted, what is seen, what was last applied → a list of actions),
//! and [`Reconciler`] executes the plan through a [`Compute`] backend and
//! reports what it sees afterwards. It takes no input beyond the desired
//! state, so it can run periodically and on every trigger; running it
//! twice in a row does nothing the second time.
//!
//! Invariants:
//! - only domains whose name carries the agent's prefix are touched;
//!   anything else on the hypervisor is left alone;
//! - a fenced agent (no heartbeat acknowledged within the fencing window)
//!   destroys every running Basalt domain and starts none;
//! - a restarted agent adopts running domains: it never restarts a guest
//!   that already runs as wanted;
//! - domains in the hands-off set (VMs in the middle of a live migration,
//!   see [`crate::migration`]) and those the desired state keeps (VMs
//!   whose disks are not ready) are neither started, stopped, defined nor
//!   removed, unless the agent is fenced;
//! - actions on different domains run concurrently, at most
//!   [`CONCURRENT_DOMAINS`] domains at a time (a forced stop of a TCG guest
//!   takes seconds; deleting ten VMs one after another took ten times
//!   that); the actions on one domain run in the plan's order, one after
//!   another, so a domain is defined before it starts and destroyed before
//!   it is undefined. The plan names each domain in one group only, so two
//!   threads never act on the same domain;
//! - the domains no longer wanted are stopped and removed before any
//!   action on a wanted one: a guest never starts beside one that is
//!   going (they may share a disk: an attached volume released by one VM
//!   and attached by the next).

pub mod plan;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use crate::compute::domain::DomainSpec;
use crate::compute::{Compute, ComputeError, PowerState};
pub use plan::{Action, Desired, DesiredVm, Plan, plan};

/// How many domains a pass acts on at once. libvirtd serves at most five
/// calls of one connection at a time by default (`max_client_requests`)
/// and queues the rest: the long call, a forced stop, gets a connection
/// of its own (see the libvirt backend), the short ones share one.
pub const CONCURRENT_DOMAINS: usize = 10;

/// What the reconciler saw of one wanted VM after a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmObservation {
    /// The domain name.
    pub name: String,
    /// Its state, `None` when it is not defined.
    pub state: Option<PowerState>,
    /// The first error of the pass for this VM, if any.
    pub error: Option<String>,
    /// The NBD exports of the disks the running guest has (empty when it
    /// is not running, or they could not be read).
    pub disks: Vec<String>,
}

/// The outcome of one pass.
#[derive(Debug, Clone, Default)]
pub struct Pass {
    /// The actions executed, in order, with their errors.
    pub executed: Vec<(Action, Option<String>)>,
    /// One entry per wanted VM.
    pub vms: Vec<VmObservation>,
}

/// Drives one hypervisor towards the desired state. See the module doc.
#[derive(Debug)]
pub struct Reconciler<C> {
    compute: C,
    /// Domain names start with this: how the reconciler tells its own
    /// domains from others on the same hypervisor.
    prefix: String,
    /// How long a graceful stop may take before the domain is destroyed.
    grace: Duration,
    /// The spec last defined per domain, in this process's lifetime.
    applied: BTreeMap<String, DomainSpec>,
    /// Domains to leave alone (moving VMs), unless fenced.
    hands_off: BTreeSet<String>,
}

impl<C: Compute> Reconciler<C> {
    /// A reconciler of the domains named `prefix*` on `compute`.
    pub fn new(compute: C, prefix: impl Into<String>, grace: Duration) -> Self {
        Self {
            compute,
            prefix: prefix.into(),
            grace,
            applied: BTreeMap::new(),
            hands_off: BTreeSet::new(),
        }
    }

    /// The domains the next passes leave alone (VMs moving live), until
    /// set again; ignored while fenced.
    pub fn set_hands_off(&mut self, domains: BTreeSet<String>) {
        self.hands_off = domains;
    }

    /// The backend.
    pub fn compute(&self) -> &C {
        &self.compute
    }

    /// The domain name for a VM called `vm`.
    pub fn domain_name(&self, vm: &str) -> String {
        format!("{}{vm}", self.prefix)
    }

    /// One pass: observe, plan, execute, observe again.
    pub fn reconcile(&mut self, desired: &Desired) -> Result<Pass, ComputeError> {
        let observed = self.compute.list()?;
        let prefix = self.prefix.clone();
        let hands_off = if desired.fenced {
            BTreeSet::new()
        } else {
            self.hands_off.union(&desired.kept).cloned().collect()
        };
        let mut desired = desired.clone();
        desired.vms.retain(|vm| !hands_off.contains(&vm.spec.name));
        let desired = &desired;
        let plan = plan(desired, &observed, &self.applied, |name| {
            name.starts_with(&prefix) && !hands_off.contains(name)
        });
        let mut pass = Pass::default();
        let mut errors: BTreeMap<String, String> = plan.conflicts.into_iter().collect();
        // Unwanted domains go first, all of them, before anything starts:
        // a VM deleted here and another created on the same disk (an
        // attached volume released and attached again, decision 76) never
        // run at once on this node.
        let wanted: BTreeSet<&str> = desired.vms.iter().map(|vm| vm.spec.name.as_str()).collect();
        let (removals, rest): (Vec<Action>, Vec<Action>) = plan
            .actions
            .into_iter()
            .partition(|action| !wanted.contains(action.domain()));
        let mut executed = self.execute_all(removals);
        executed.extend(self.execute_all(rest));
        for (action, result) in executed {
            if let Err(err) = &result {
                tracing::warn!(domain = action.domain(), action = action.verb(), error = %err, "reconcile action failed");
                errors
                    .entry(action.domain().to_owned())
                    .or_insert_with(|| err.to_string());
            }
            match (&action, &result) {
                (Action::Define(spec), Ok(())) => {
                    self.applied.insert(spec.name.clone(), (**spec).clone());
                }
                (Action::Undefine(name), Ok(())) => {
                    self.applied.remove(name);
                }
                _ => {}
            }
            pass.executed
                .push((action, result.err().map(|e| e.to_string())));
        }
        for vm in &desired.vms {
            let name = &vm.spec.name;
            let state = self.compute.status(name)?.map(|s| s.state);
            // What the guest has, for the release of a disk it let go of.
            let disks = match state {
                Some(s) if s.is_active() => match self.compute.disks(name) {
                    Ok(disks) => disks.into_iter().map(|d| d.export_name).collect(),
                    Err(err) => {
                        errors
                            .entry(name.clone())
                            .or_insert_with(|| err.to_string());
                        Vec::new()
                    }
                },
                _ => Vec::new(),
            };
            pass.vms.push(VmObservation {
                name: name.clone(),
                state,
                error: errors.get(name).cloned(),
                disks,
            });
        }
        Ok(pass)
    }

    /// Runs `actions`: one group per domain (in plan order within it),
    /// up to [`CONCURRENT_DOMAINS`] groups at a time. Returns every action
    /// with its result, in the plan's order.
    fn execute_all(&self, actions: Vec<Action>) -> Vec<(Action, Result<(), ComputeError>)> {
        // Group by domain, remembering each action's place in the plan.
        let mut groups: Vec<Vec<(usize, Action)>> = Vec::new();
        let mut group_of: BTreeMap<String, usize> = BTreeMap::new();
        let total = actions.len();
        for (index, action) in actions.into_iter().enumerate() {
            let group = *group_of
                .entry(action.domain().to_owned())
                .or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
            groups[group].push((index, action));
        }
        let workers = groups.len().min(CONCURRENT_DOMAINS);
        let queue = Mutex::new(groups.into_iter().collect::<VecDeque<_>>());
        let done = Mutex::new(Vec::with_capacity(total));
        let run_groups = || {
            loop {
                let next = queue
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .pop_front();
                let Some(group) = next else {
                    return;
                };
                for (index, action) in group {
                    let result = self.execute(&action);
                    done.lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push((index, action, result));
                }
            }
        };
        if workers <= 1 {
            run_groups();
        } else {
            std::thread::scope(|scope| {
                for _ in 0..workers {
                    scope.spawn(run_groups);
                }
            });
        }
        let mut done = done
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        done.sort_by_key(|(index, _, _)| *index);
        done.into_iter()
            .map(|(_, action, result)| (action, result))
            .collect()
    }

    /// One action on the backend (called from several threads at once,
    /// never for the same domain).
    fn execute(&self, action: &Action) -> Result<(), ComputeError> {
        match action {
            Action::Define(spec) => self.compute.define(spec),
            Action::Start(name) => self.compute.start(name),
            Action::Stop(name) => self.compute.stop(name, self.grace).map(drop),
            Action::Destroy(name) => self.compute.destroy(name),
            Action::Undefine(name) => self.compute.undefine(name),
        }
    }
}

#[cfg(test)]
mod tests;
