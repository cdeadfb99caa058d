//! `basalt node drain` moves running VMs live, against a real `basaltd
//! control` and three agents with simulated hypervisors linked to each
//! other (the agents run in this process, so a migration can reach its
//! target's hypervisor; each agent has its own loopback address, which
//! names its hypervisor):
//!
//! - a running VM moves by a migration that succeeds, carrying the
//!   drain's `--bandwidth-mib`; watched from the start, its status never
//!   says `Stopped` or `Stopping`, and its guest was booted once (the
//!   simulated domain carries its boot count along);
//! - a stopped VM moves cold (eviction), with `epoch + 1`;
//! - a running VM whose migration fails (the source's hypervisor refuses
//!   it) moves cold instead and runs on its new node;
//! - drain again is a no-op; a migration already under way (asked with
//!   `basalt vm migrate`) is followed, not asked again (same object uid).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use basalt_agent::compute::Compute as _;
use basalt_agent::compute::domain::Accel;
use basalt_agent::compute::sim::SimCompute;
use basalt_agent::runtime::{self, AgentConfig};
use basalt_agent::vm_domain::DomainPolicy;
use basalt_api::{AdminClient, Kind, MigrationPhase, Object, Resources, VmPhase, WatchEvent};
use basalt_testkit::Prefix;
use futures::StreamExt as _;

use common::{KERNEL, join_token, ok, placement, vm, wait_until};

const DOMAIN_PREFIX: &str = "drain-";
const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn address(node: &str) -> String {
    let i = NODES.iter().position(|n| *n == node).expect("a known node");
    format!("127.0.0.{}:7501", 11 + i)
}

/// Starts the three agents in this process, their hypervisors linked by
/// the URI each agent's migration code derives from its target's address.
async fn start_agents(
    prefix: &Prefix,
    server: &str,
    admin: &AdminClient,
) -> (
    BTreeMap<String, Arc<SimCompute>>,
    Vec<tokio::sync::oneshot::Sender<()>>,
) {
    let sims: BTreeMap<String, Arc<SimCompute>> = NODES
        .iter()
        .map(|n| ((*n).to_owned(), Arc::new(SimCompute::new())))
        .collect();
    for (from, sim) in &sims {
        for (to, peer) in &sims {
            if from != to {
                sim.link(basalt_agent::migration::target_uri(&address(to)), peer);
            }
        }
    }
    let mut stops = Vec::new();
    for node in NODES {
        let config = AgentConfig {
            node: node.to_owned(),
            address: address(node),
            server: server.to_owned(),
            token: join_token(admin, node).await,
            credential_file: None,
            capacity: Resources {
                cpus: 4,
                memory_mib: 4096,
                storage_bytes: 0,
            },
            policy: DomainPolicy {
                prefix: DOMAIN_PREFIX.to_owned(),
                accel: Accel::Tcg,
                cpu_model: Some("qemu64".to_owned()),
                agent_taps: false,
            },
            console_dir: prefix.dir().join(format!("console-{node}")),
            fence_after: std::time::Duration::from_millis(1500),
            resync: std::time::Duration::from_millis(300),
            stop_grace: std::time::Duration::from_millis(200),
            network: None,
            storage: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let compute = sims[node].clone();
        tokio::spawn(async move {
            if let Err(err) = runtime::run(config, compute, async {
                let _ = stopped.await;
            })
            .await
            {
                panic!("agent {node}: {err}");
            }
        });
        stops.push(stop);
    }
    common::wait_ready_nodes(admin, NODES.len()).await;
    (sims, stops)
}

/// Runs `basalt` off the async workers (the agents share them).
async fn basalt(server: &str, args: &[&str]) -> String {
    let server = server.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&server, &args)
    })
    .await
    .expect("basalt ran")
}

/// Creates running VMs `names` on `node` (the other nodes cordoned
/// meanwhile).
async fn create_on(server: &str, admin: &AdminClient, node: &str, names: &[&str]) {
    let others: Vec<&str> = NODES.iter().copied().filter(|n| *n != node).collect();
    for other in &others {
        basalt(server, &["node", "cordon", other]).await;
    }
    basalt(server, &["node", "uncordon", node]).await;
    for name in names {
        let mut args = vec!["vm", "create", name, "--cpus", "1", "--memory", "64"];
        args.extend(KERNEL);
        args.extend(["--wait", "--timeout", "60s"]);
        basalt(server, &args).await;
        assert_eq!(placement(admin, name).await.expect("placed").node, node);
    }
    for other in &others {
        basalt(server, &["node", "uncordon", other]).await;
    }
}

/// Every phase each VM's status went through, from a watch.
type Phases = Arc<Mutex<BTreeMap<String, Vec<VmPhase>>>>;

async fn watch_phases(admin: &AdminClient) -> Phases {
    let from = admin.list(Kind::Vm).await.expect("list").resource_version;
    let mut events = admin.watch(Some(Kind::Vm), from).await.expect("watch");
    let phases: Phases = Arc::default();
    let seen = phases.clone();
    tokio::spawn(async move {
        while let Some(Ok(event)) = events.next().await {
            if let WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. } = event
                && let Object::Vm(vm) = object
            {
                let mut seen = seen.lock().expect("phases");
                let list = seen.entry(vm.meta.name.clone()).or_default();
                if list.last() != Some(&vm.status.phase) {
                    list.push(vm.status.phase);
                }
            }
        }
    });
    phases
}

async fn migration_of(admin: &AdminClient, vm: &str) -> basalt_api::Migration {
    match admin.get(Kind::Migration, vm).await {
        Ok(Object::Migration(m)) => m,
        other => panic!("migration/{vm}: {other:?}"),
    }
}

async fn runs_on(admin: &AdminClient, name: &str, node: &str, phase: VmPhase) {
    wait_until(&format!("{name} is {phase} on {node}"), || async {
        vm(admin, name)
            .await
            .is_some_and(|v| v.status.phase == phase && v.status.node.as_deref() == Some(node))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_running_vms_live_and_the_rest_cold() {
    // The agents' logs, shown when the test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let prefix = Prefix::for_test().expect("prefix");
    let (_member, server, admin) = common::start_control(&prefix).await;
    let (sims, _stops) = start_agents(&prefix, &server, &admin).await;

    create_on(&server, &admin, "n1", &["cold", "flaky", "live"]).await;
    basalt(
        &server,
        &["vm", "stop", "cold", "--wait", "--timeout", "60s"],
    )
    .await;
    sims["n1"].refuse_migration(&format!("{DOMAIN_PREFIX}flaky"));
    let before: BTreeMap<String, u64> = {
        let mut epochs = BTreeMap::new();
        for name in ["cold", "flaky", "live"] {
            epochs.insert(
                name.to_owned(),
                placement(&admin, name).await.expect("placed").epoch,
            );
        }
        epochs
    };
    let phases = watch_phases(&admin).await;

    let out = basalt(
        &server,
        &[
            "node",
            "drain",
            "n1",
            "--wait",
            "--parallel",
            "2",
            "--timeout",
            "60s",
            "--bandwidth-mib",
            "64",
        ],
    )
    .await;
    assert!(out.contains("node/n1 drained"), "{out}");
    assert!(out.contains("vm/live: moved live to"), "{out}");
    assert!(out.contains("vm/cold: not running"), "{out}");
    assert!(out.contains("vm/flaky: live migration failed"), "{out}");

    // The running VM moved live: a migration that succeeded, from n1.
    let m = migration_of(&admin, "live").await;
    assert_eq!(m.status.phase, MigrationPhase::Succeeded, "{m:?}");
    assert_eq!(m.status.source, "n1");
    assert_eq!(
        m.spec.bandwidth_mib_s, 64,
        "the drain's --bandwidth-mib is on its migration"
    );
    let to = placement(&admin, "live").await.expect("placed");
    assert_eq!(to.node, m.status.target);
    assert_eq!(to.epoch, before["live"] + 1);
    runs_on(&admin, "live", &to.node, VmPhase::Running).await;
    let domain = format!("{DOMAIN_PREFIX}live");
    assert_eq!(
        sims[&to.node].starts(&domain),
        1,
        "the guest was booted once"
    );
    assert!(sims["n1"].status(&domain).expect("status").is_none());

    // The stopped VM moved cold, and stays stopped there.
    let cold = placement(&admin, "cold").await.expect("placed");
    assert_ne!(cold.node, "n1");
    assert_eq!(cold.epoch, before["cold"] + 1);
    assert!(!cold.is_evicting());
    runs_on(&admin, "cold", &cold.node, VmPhase::Stopped).await;

    // The refused migration failed; the VM moved cold and runs again.
    let m = migration_of(&admin, "flaky").await;
    assert_eq!(m.status.phase, MigrationPhase::Failed, "{m:?}");
    let flaky = placement(&admin, "flaky").await.expect("placed");
    assert_ne!(flaky.node, "n1");
    assert_eq!(flaky.epoch, before["flaky"] + 1);
    runs_on(&admin, "flaky", &flaky.node, VmPhase::Running).await;

    // Watched all along: the live move never stopped the VM; the cold
    // one did (so the watch saw what it had to).
    let seen = phases.lock().expect("phases").clone();
    let live = seen.get("live").cloned().unwrap_or_default();
    assert!(
        !live
            .iter()
            .any(|p| matches!(p, VmPhase::Stopped | VmPhase::Stopping)),
        "live went through {live:?}"
    );
    let flaky_seen = seen.get("flaky").cloned().unwrap_or_default();
    assert!(
        flaky_seen.contains(&VmPhase::Stopped),
        "the cold fallback stops the VM: {flaky_seen:?}"
    );

    // Again: nothing left to move.
    let out = basalt(&server, &["node", "drain", "n1", "--wait"]).await;
    assert!(
        out.contains("moving 0 VM(s)") && out.contains("drained"),
        "{out}"
    );

    // A migration under way is followed, not asked again: a guest that
    // never converges, moved with post-copy after 3 s of pre-copy.
    create_on(&server, &admin, "n2", &["slow"]).await;
    sims["n2"].never_converge(&format!("{DOMAIN_PREFIX}slow"));
    basalt(
        &server,
        &[
            "vm",
            "migrate",
            "slow",
            "--post-copy",
            "--timeout-seconds",
            "3",
        ],
    )
    .await;
    let asked = migration_of(&admin, "slow").await.meta.uid;
    let out = basalt(
        &server,
        &["node", "drain", "n2", "--wait", "--timeout", "60s"],
    )
    .await;
    assert!(out.contains("vm/slow: moved live to"), "{out}");
    let m = migration_of(&admin, "slow").await;
    assert_eq!(m.meta.uid, asked, "drain asked again:\n{out}");
    assert_eq!(m.status.phase, MigrationPhase::Succeeded);
    assert!(
        m.status.post_copy_active,
        "the one asked for (post-copy) did the move: {m:?}"
    );
    assert_ne!(placement(&admin, "slow").await.expect("placed").node, "n2");
}
