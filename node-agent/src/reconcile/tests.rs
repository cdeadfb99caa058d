//! The reconciler on the simulated hypervisor: every rule, idempotence,
//! adoption after a restart, the fence, and a seeded random walk.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::compute::conformance;
use crate::compute::domain::NbdDisk;
use crate::compute::sim::SimCompute;

const PREFIX: &str = "basalt-";
const GRACE: Duration = Duration::from_millis(50);

fn vm(name: &str, running: bool) -> DesiredVm {
    DesiredVm {
        spec: conformance::spec(&format!("{PREFIX}{name}")),
        running,
    }
}

fn desired(vms: &[&DesiredVm]) -> Desired {
    Desired {
        vms: vms.iter().map(|vm| (*vm).clone()).collect(),
        fenced: false,
        kept: BTreeSet::new(),
    }
}

fn reconciler() -> Reconciler<SimCompute> {
    Reconciler::new(SimCompute::new(), PREFIX, GRACE)
}

fn state(r: &Reconciler<SimCompute>, name: &str) -> Option<PowerState> {
    r.compute().status(name).unwrap().map(|s| s.state)
}

fn verbs(pass: &Pass) -> Vec<String> {
    pass.executed
        .iter()
        .map(|(a, _)| format!("{} {}", a.verb(), a.domain()))
        .collect()
}

#[test]
fn a_placed_vm_is_defined_and_started_once() {
    let mut r = reconciler();
    let a = vm("a", true);
    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert_eq!(verbs(&pass), ["define basalt-a", "start basalt-a"]);
    assert_eq!(pass.vms[0].state, Some(PowerState::Running));
    // Idempotent: nothing to do the second time.
    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert!(pass.executed.is_empty(), "{:?}", verbs(&pass));
    assert_eq!(r.compute().starts("basalt-a"), 1);
}

#[test]
fn a_domain_no_longer_wanted_is_gone_before_another_starts() {
    let mut r = reconciler();
    let (a, stopped) = (vm("a", true), vm("b", false));
    let running = DesiredVm {
        running: true,
        ..stopped.clone()
    };
    r.reconcile(&desired(&[&a, &stopped])).unwrap();
    assert_eq!(r.compute().most_active(), 1);
    for _ in 0..3 {
        // a is deleted and b told to run in the same pass: were both
        // groups run at once, b's start could land before a's destroy.
        r.compute().set_call_latency(Duration::from_millis(30));
        let pass = r.reconcile(&desired(&[&running])).unwrap();
        assert_eq!(
            verbs(&pass),
            ["destroy basalt-a", "undefine basalt-a", "start basalt-b"]
        );
        assert!(pass.executed.iter().all(|(_, err)| err.is_none()));
        assert_eq!(r.compute().most_active(), 1, "a and b ran at once");
        // Again, from a running a and a stopped b (stopped first).
        r.compute().set_call_latency(Duration::ZERO);
        r.reconcile(&desired(&[&stopped])).unwrap();
        r.reconcile(&desired(&[&a, &stopped])).unwrap();
    }
    assert_eq!(state(&r, "basalt-a"), Some(PowerState::Running));
}

#[test]
fn a_changed_spec_is_redefined_without_a_restart() {
    let mut r = reconciler();
    let mut a = vm("a", true);
    r.reconcile(&desired(&[&a])).unwrap();
    a.spec.memory_mib = 128;
    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert_eq!(verbs(&pass), ["define basalt-a"]);
    assert_eq!(r.compute().spec("basalt-a").unwrap().memory_mib, 128);
    assert_eq!(r.compute().starts("basalt-a"), 1);
}

#[test]
fn a_disk_added_to_a_running_guest_is_plugged_in_and_a_dropped_one_unplugged() {
    let mut r = reconciler();
    let disk = |dev: &str, export: &str| NbdDisk {
        target_dev: dev.to_owned(),
        host: "127.0.0.1".to_owned(),
        port: 10809,
        export_name: export.to_owned(),
    };
    let mut a = vm("a", true);
    a.spec.disks = vec![disk("vda", "root")];
    r.reconcile(&desired(&[&a])).unwrap();
    a.spec.disks.push(disk("vdb", "data"));
    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert_eq!(verbs(&pass), ["define basalt-a"]);
    assert_eq!(r.compute().live_disks("basalt-a"), a.spec.disks);
    assert_eq!(pass.vms[0].disks, ["root", "data"], "what the guest has");
    a.spec.disks.remove(0);
    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert_eq!(r.compute().live_disks("basalt-a"), [disk("vdb", "data")]);
    assert_eq!(pass.vms[0].disks, ["data"]);
    a.running = false;
    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert!(pass.vms[0].disks.is_empty(), "a stopped guest has none");
    assert_eq!(r.compute().starts("basalt-a"), 1, "never restarted");
}

#[test]
fn a_kept_domain_is_left_as_it_is_unless_fenced() {
    let mut r = reconciler();
    let (a, b) = (vm("a", true), vm("b", false));
    r.reconcile(&desired(&[&a, &b])).unwrap();
    // Neither is in the wanted list (their disks are not ready): kept,
    // a runs on and b is not removed.
    let keep = Desired {
        kept: BTreeSet::from(["basalt-a".to_owned(), "basalt-b".to_owned()]),
        ..desired(&[])
    };
    let pass = r.reconcile(&keep).unwrap();
    assert!(pass.executed.is_empty(), "{:?}", verbs(&pass));
    assert_eq!(state(&r, "basalt-a"), Some(PowerState::Running));
    assert_eq!(state(&r, "basalt-b"), Some(PowerState::ShutOff));
    // Unkept and unwanted: removed.
    let pass = r.reconcile(&desired(&[])).unwrap();
    assert_eq!(
        verbs(&pass),
        ["destroy basalt-a", "undefine basalt-a", "undefine basalt-b"]
    );
    // The fence overrides keeping.
    r.reconcile(&desired(&[&a])).unwrap();
    let fenced = Desired {
        fenced: true,
        ..keep
    };
    let pass = r.reconcile(&fenced).unwrap();
    assert_eq!(verbs(&pass), ["destroy basalt-a"]);
}

#[test]
fn stop_is_graceful_first_and_forced_when_the_guest_ignores_it() {
    let mut r = reconciler();
    let a = vm("a", true);
    r.reconcile(&desired(&[&a])).unwrap();
    let stopped = vm("a", false);
    let stopped = DesiredVm {
        spec: a.spec.clone(),
        ..stopped
    };
    // The simulated guest never answers the ACPI request: forced after GRACE.
    let pass = r.reconcile(&desired(&[&stopped])).unwrap();
    assert_eq!(verbs(&pass), ["stop basalt-a"]);
    assert_eq!(state(&r, "basalt-a"), Some(PowerState::ShutOff));
}

#[test]
fn a_crashed_guest_is_started_again() {
    let mut r = reconciler();
    let a = vm("a", true);
    r.reconcile(&desired(&[&a])).unwrap();
    r.compute().crash("basalt-a");
    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert_eq!(verbs(&pass), ["start basalt-a"]);
    assert_eq!(r.compute().starts("basalt-a"), 2);
}

#[test]
fn a_vm_no_longer_placed_here_is_destroyed_and_undefined_and_others_are_left_alone() {
    let mut r = reconciler();
    let (a, b) = (vm("a", true), vm("b", true));
    r.reconcile(&desired(&[&a, &b])).unwrap();
    // A domain that is not Basalt's, running on the same hypervisor.
    let foreign = conformance::spec("someone-elses");
    r.compute().define(&foreign).unwrap();
    r.compute().start("someone-elses").unwrap();

    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert_eq!(verbs(&pass), ["destroy basalt-b", "undefine basalt-b"]);
    assert_eq!(state(&r, "basalt-b"), None);
    assert_eq!(state(&r, "someone-elses"), Some(PowerState::Running));
}

#[test]
fn a_restarted_agent_adopts_running_domains() {
    let sim = std::sync::Arc::new(SimCompute::new());
    let a = vm("a", true);
    {
        let mut first = Reconciler::new(sim.clone(), PREFIX, GRACE);
        first.reconcile(&desired(&[&a])).unwrap();
    }
    let mut second = Reconciler::new(sim.clone(), PREFIX, GRACE);
    let pass = second.reconcile(&desired(&[&a])).unwrap();
    // It redefines once (it cannot know what was defined before) but
    // never restarts the running guest.
    assert_eq!(verbs(&pass), ["define basalt-a"]);
    assert_eq!(sim.starts("basalt-a"), 1);
    assert!(
        second
            .reconcile(&desired(&[&a]))
            .unwrap()
            .executed
            .is_empty()
    );
}

#[test]
fn a_fenced_agent_destroys_every_basalt_domain_and_starts_none() {
    let mut r = reconciler();
    let (a, b) = (vm("a", true), vm("b", true));
    r.reconcile(&desired(&[&a, &b])).unwrap();
    let foreign = conformance::spec("someone-elses");
    r.compute().define(&foreign).unwrap();
    r.compute().start("someone-elses").unwrap();
    let c = vm("c", true);

    let fenced = Desired {
        fenced: true,
        ..desired(&[&a, &b, &c])
    };
    let pass = r.reconcile(&fenced).unwrap();
    assert_eq!(verbs(&pass), ["destroy basalt-a", "destroy basalt-b"]);
    assert!(!state(&r, "basalt-a").unwrap().is_active());
    assert_eq!(
        state(&r, "basalt-c"),
        None,
        "nothing new starts while fenced"
    );
    assert_eq!(state(&r, "someone-elses"), Some(PowerState::Running));
}

#[test]
fn a_name_taken_by_another_uuid_is_a_conflict_not_a_replacement() {
    let mut r = reconciler();
    let a = vm("a", true);
    let mut other = a.spec.clone();
    other.uuid = uuid::Uuid::new_v4();
    r.compute().define(&other).unwrap();
    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert!(pass.executed.is_empty());
    assert!(
        pass.vms[0].error.as_deref().unwrap_or("").contains("UUID"),
        "{:?}",
        pass.vms
    );
    assert_eq!(
        r.compute().status("basalt-a").unwrap().unwrap().uuid,
        other.uuid
    );
}

#[test]
fn a_failed_action_is_reported_and_retried_next_pass() {
    let mut r = reconciler();
    let a = vm("a", true);
    r.compute().fail_next("start");
    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert!(
        pass.vms[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("injected"),
        "{:?}",
        pass.vms
    );
    assert_eq!(pass.vms[0].state, Some(PowerState::ShutOff));
    let pass = r.reconcile(&desired(&[&a])).unwrap();
    assert_eq!(verbs(&pass), ["start basalt-a"]);
    assert_eq!(
        pass.vms[0],
        VmObservation {
            name: "basalt-a".into(),
            state: Some(PowerState::Running),
            error: None,
            disks: Vec::new(),
        }
    );
}

/// Ten domains, each call taking `LATENCY`: the pass acts on several at
/// once (the simulator saw calls overlap), never on more than
/// [`CONCURRENT_DOMAINS`], and still takes every action, in the plan's
/// order per domain.
const LATENCY: Duration = Duration::from_millis(40);

fn ten() -> Vec<DesiredVm> {
    (0..10).map(|i| vm(&format!("m{i}"), true)).collect()
}

#[test]
fn many_domains_are_started_concurrently_and_none_is_skipped() {
    let mut r = reconciler();
    r.compute().set_call_latency(LATENCY);
    let vms = ten();
    let wanted: Vec<&DesiredVm> = vms.iter().collect();
    let pass = r.reconcile(&desired(&wanted)).unwrap();
    assert_eq!(pass.executed.len(), 20, "{:?}", verbs(&pass));
    assert!(pass.executed.iter().all(|(_, err)| err.is_none()));
    for vm in &vms {
        let name = &vm.spec.name;
        // Per domain: defined, then started — in the reported order too.
        let mine: Vec<&str> = pass
            .executed
            .iter()
            .filter(|(a, _)| a.domain() == name)
            .map(|(a, _)| a.verb())
            .collect();
        assert_eq!(mine, ["define", "start"], "{name}");
        assert_eq!(r.compute().starts(name), 1, "{name}");
        assert_eq!(state(&r, name), Some(PowerState::Running), "{name}");
    }
    let overlap = r.compute().max_overlapping_calls();
    assert!(
        (2..=CONCURRENT_DOMAINS).contains(&overlap),
        "at most {CONCURRENT_DOMAINS} and more than one domain at a time, saw {overlap}"
    );
    // Idempotent: the next pass has nothing to do.
    assert!(r.reconcile(&desired(&wanted)).unwrap().executed.is_empty());
}

#[test]
fn many_unplaced_domains_are_removed_concurrently_and_none_is_skipped() {
    let mut r = reconciler();
    let vms = ten();
    let wanted: Vec<&DesiredVm> = vms.iter().collect();
    r.reconcile(&desired(&wanted)).unwrap();
    r.compute().set_call_latency(LATENCY);
    // One of them is moving live: left alone while the rest go.
    let pinned = vms[3].spec.name.clone();
    r.set_hands_off(BTreeSet::from([pinned.clone()]));
    let started = std::time::Instant::now();
    let pass = r.reconcile(&desired(&[])).unwrap();
    let took = started.elapsed();
    assert!(pass.executed.iter().all(|(_, err)| err.is_none()));
    for vm in &vms {
        let name = &vm.spec.name;
        let mine: Vec<&str> = pass
            .executed
            .iter()
            .filter(|(a, _)| a.domain() == name)
            .map(|(a, _)| a.verb())
            .collect();
        if *name == pinned {
            assert!(mine.is_empty(), "the pinned domain was touched: {mine:?}");
            assert_eq!(state(&r, name), Some(PowerState::Running));
        } else {
            // Destroyed before undefined (an undefine of a running domain
            // fails in the simulator, so the order is checked twice).
            assert_eq!(mine, ["destroy", "undefine"], "{name}");
            assert_eq!(state(&r, name), None, "{name}");
        }
    }
    let overlap = r.compute().max_overlapping_calls();
    assert!(
        (2..=CONCURRENT_DOMAINS).contains(&overlap),
        "saw {overlap} overlapping calls"
    );
    // 18 calls of 40 ms one after another would take 720 ms.
    assert!(took < LATENCY * 18, "took {took:?}");
}

#[test]
fn a_fenced_agent_destroys_many_domains_concurrently() {
    let mut r = reconciler();
    let vms = ten();
    let wanted: Vec<&DesiredVm> = vms.iter().collect();
    r.reconcile(&desired(&wanted)).unwrap();
    r.compute().set_call_latency(LATENCY);
    // The fence overrides pins.
    r.set_hands_off(BTreeSet::from([vms[0].spec.name.clone()]));
    let fenced = Desired {
        fenced: true,
        ..desired(&wanted)
    };
    let pass = r.reconcile(&fenced).unwrap();
    assert_eq!(pass.executed.len(), 10);
    for vm in &vms {
        assert!(
            !state(&r, &vm.spec.name).unwrap().is_active(),
            "{} still runs",
            vm.spec.name
        );
    }
    assert!(r.compute().max_overlapping_calls() >= 2);
}

/// What can happen between two passes.
#[derive(Debug, Clone)]
enum Event {
    Want { vm: u8, running: bool },
    Unplace { vm: u8 },
    Crash { vm: u8 },
    GuestShutsDown { vm: u8 },
    Fence(bool),
    AgentRestart,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (0..4u8, any::<bool>()).prop_map(|(vm, running)| Event::Want { vm, running }),
        (0..4u8).prop_map(|vm| Event::Unplace { vm }),
        (0..4u8).prop_map(|vm| Event::Crash { vm }),
        (0..4u8).prop_map(|vm| Event::GuestShutsDown { vm }),
        any::<bool>().prop_map(Event::Fence),
        Just(Event::AgentRestart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// After any sequence of events, one pass makes the hypervisor match
    /// what is wanted: wanted-running VMs run (unless fenced), wanted-stopped
    /// ones do not, unplaced ones are gone, a fenced node runs nothing; and
    /// a second pass has nothing left to do.
    #[test]
    fn one_pass_converges(events in proptest::collection::vec(event(), 1..30)) {
        let sim = std::sync::Arc::new(SimCompute::new());
        let specs: Vec<_> = (0..4).map(|i| conformance::spec(&format!("{PREFIX}vm{i}"))).collect();
        let mut wanted: BTreeMap<u8, bool> = BTreeMap::new();
        let mut fenced = false;
        let mut r = Reconciler::new(sim.clone(), PREFIX, Duration::ZERO);
        for event in events {
            match event {
                Event::Want { vm, running } => { wanted.insert(vm, running); }
                Event::Unplace { vm } => { wanted.remove(&vm); }
                Event::Crash { vm } => sim.crash(&specs[vm as usize].name),
                Event::GuestShutsDown { vm } => sim.complete_shutdown(&specs[vm as usize].name),
                Event::Fence(f) => fenced = f,
                Event::AgentRestart => r = Reconciler::new(sim.clone(), PREFIX, Duration::ZERO),
            }
            let d = Desired {
                vms: wanted.iter().map(|(vm, running)| DesiredVm { spec: specs[*vm as usize].clone(), running: *running }).collect(),
                fenced,
                kept: BTreeSet::new(),
            };
            r.reconcile(&d).unwrap();
            for (i, spec) in specs.iter().enumerate() {
                let state = sim.status(&spec.name).unwrap().map(|s| s.state);
                let active = state.is_some_and(PowerState::is_active);
                match wanted.get(&(i as u8)) {
                    _ if fenced => prop_assert!(!active, "{} runs on a fenced node", spec.name),
                    Some(true) => prop_assert_eq!(state, Some(PowerState::Running)),
                    Some(false) => prop_assert!(!active, "{} should be stopped", spec.name),
                    None => prop_assert_eq!(state, None),
                }
            }
            if !fenced {
                let again = r.reconcile(&d).unwrap();
                prop_assert!(again.executed.is_empty(), "second pass did {:?}", verbs(&again));
            }
        }
    }
}
