//! The pure half of the reconciler: from what is wanted, what the
//! hypervisor shows and what this agent last defined, the actions to take.
//! No I/O; every rule is a unit test in `tests.rs`.

use std::collections::{BTreeMap, BTreeSet};

use crate::compute::DomainStatus;
use crate::compute::domain::DomainSpec;

/// One VM the control plane placed on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVm {
    /// How to define it (its name is the domain name).
    pub spec: DomainSpec,
    /// Whether it should run.
    pub running: bool,
}

/// Everything wanted of this node's hypervisor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// The VMs placed here.
    pub vms: Vec<DesiredVm>,
    /// The agent has lost its lease: stop everything, start nothing.
    pub fenced: bool,
    /// Domains left as they are this pass, neither defined, started,
    /// stopped nor removed: VMs placed here whose disks are not ready (a
    /// disk added while the guest runs, still being made). Ignored while
    /// fenced.
    pub kept: BTreeSet<String>,
}

/// One step for the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Define or redefine the domain.
    Define(Box<DomainSpec>),
    /// Start it.
    Start(String),
    /// Stop it: gracefully, then forcibly.
    Stop(String),
    /// Stop it at once.
    Destroy(String),
    /// Remove its definition.
    Undefine(String),
}

impl Action {
    /// The domain the action is about.
    pub fn domain(&self) -> &str {
        match self {
            Action::Define(spec) => &spec.name,
            Action::Start(n) | Action::Stop(n) | Action::Destroy(n) | Action::Undefine(n) => n,
        }
    }

    /// A word for logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Define(_) => "define",
            Action::Start(_) => "start",
            Action::Stop(_) => "stop",
            Action::Destroy(_) => "destroy",
            Action::Undefine(_) => "undefine",
        }
    }
}

/// What [`plan`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The actions, in the order to take them.
    pub actions: Vec<Action>,
    /// Wanted domains that cannot be reconciled, with why (e.g. a domain
    /// of that name with another UUID).
    pub conflicts: Vec<(String, String)>,
}

/// Plans one pass. `applied` is the spec this agent last defined per
/// domain (empty after a restart: every wanted domain is then redefined
/// once, which changes nothing for a running guest); `managed` says which
/// observed domains are Basalt's.
pub fn plan(
    desired: &Desired,
    observed: &[DomainStatus],
    applied: &BTreeMap<String, DomainSpec>,
    managed: impl Fn(&str) -> bool,
) -> Plan {
    let mut out = Plan::default();
    let seen: BTreeMap<&str, &DomainStatus> =
        observed.iter().map(|d| (d.name.as_str(), d)).collect();
    let wanted: BTreeSet<&str> = desired.vms.iter().map(|vm| vm.spec.name.as_str()).collect();

    if desired.fenced {
        // The fence: no Basalt guest may keep running on a node that may
        // already be replaced. Destroy, not a graceful stop: waiting for a
        // guest is time another node may already be running it in.
        for domain in observed
            .iter()
            .filter(|d| managed(&d.name) && d.state.is_active())
        {
            out.actions.push(Action::Destroy(domain.name.clone()));
        }
        return out;
    }

    for vm in &desired.vms {
        let name = vm.spec.name.as_str();
        let current = seen.get(name);
        if let Some(current) = current
            && current.uuid != vm.spec.uuid
        {
            out.conflicts.push((
                name.to_owned(),
                format!(
                    "a domain {name} exists with UUID {}, not {}",
                    current.uuid, vm.spec.uuid
                ),
            ));
            continue;
        }
        if current.is_none() || applied.get(name) != Some(&vm.spec) {
            out.actions.push(Action::Define(Box::new(vm.spec.clone())));
        }
        let active = current.is_some_and(|c| c.state.is_active());
        match (vm.running, active) {
            (true, false) => out.actions.push(Action::Start(name.to_owned())),
            (false, true) => out.actions.push(Action::Stop(name.to_owned())),
            // A paused guest (e.g. storage suspended) is left to resume.
            _ => {}
        }
    }

    for domain in observed
        .iter()
        .filter(|d| managed(&d.name) && !wanted.contains(d.name.as_str()))
    {
        if domain.state.is_active() {
            out.actions.push(Action::Destroy(domain.name.clone()));
        }
        out.actions.push(Action::Undefine(domain.name.clone()));
    }
    out
}
