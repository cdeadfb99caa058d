//! The storage fence through the control plane (DESIGN.md, Leases and
//! fencing): a real `basaltd control`, two fake agents heartbeating, two
//! real `basaltd storage serve` processes holding a VM's 2-replica disk,
//! and the agent's fencer task (`basalt_agent::storage::fencer`) of the
//! primary's node, in process.
//!
//! - the control plane refuses a mark from a deposed primary (an older
//!   epoch) or from a node the VM is not placed on;
//! - the secondary's copy is recorded outdated before the primary fills
//!   it, and cleared once it is in sync;
//! - the primary, cut off from its peer and from the control plane,
//!   acknowledges no write; once the control plane is back and has
//!   recorded the peer outdated (in the VM's status), the write is
//!   acknowledged;
//! - the peer returns and resyncs: the mark is cleared; lost again, it is
//!   recorded again;
//! - the primary's node is then lost: HA does not move the VM onto the
//!   outdated node (its only other replica node): the VM waits, and the
//!   controller says why.

mod fake_agent;

mod common;
mod storage_cli;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_agent::storage::StorageConfig;
use basalt_agent::storage::disk_volume;
use basalt_api::{
    AdminClient, AgentClient, ApiError, AttachVolume, EnsureVolume, Kind, Object, Placement,
    ReplicaMark, ReplicaPeerState, Resources, TokenSecret, VolumeRole,
};
use basalt_testkit::{Prefix, wait};
use fake_agent::{publish, ready, replicated_vm};
use storage_cli::{LocalStorage as Storage, free_addr};

const DEADLINE: Duration = Duration::from_secs(60);
/// Short leases so node loss takes seconds.
const CONFIG: &str = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 2000\ncontroller_period_ms = 100\n";

impl Storage {
    fn restart(&mut self) {
        // The old socket file stays; wait for the new one to answer.
        self.process.restart().expect("restart storage");
        self.process
            .wait_for_tcp(self.nbd, None, Duration::from_secs(30))
            .expect("NBD listening again");
    }

    /// `qemu-io` running one command on this node's export of `volume`.
    fn qemu_io(&self, volume: &str, command: &str) -> Child {
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                &format!("nbd://{}/{volume}", self.nbd),
                "-c",
                command,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io runs")
    }

    /// Runs `command` to its end; whether it succeeded, and its output.
    fn run(&self, volume: &str, command: &str) -> (bool, String) {
        let out = self
            .qemu_io(volume, command)
            .wait_with_output()
            .expect("qemu-io ends");
        outcome(&out)
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} log:\n{}",
                self.process.name(),
                self.process.log_tail(60)
            );
        }
    }
}

fn outcome(out: &std::process::Output) -> (bool, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed =
        !out.status.success() || text.contains("failed") || text.contains("Pattern verification");
    (!failed, text)
}

/// Whether `child` is still running after `wait`; kills nothing.
fn still_running(child: &mut Child, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if child.try_wait().expect("try_wait").is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

async fn placement(admin: &AdminClient) -> Option<Placement> {
    match admin.get(Kind::Placement, "db").await {
        Ok(Object::Placement(p)) => Some(p),
        _ => None,
    }
}

async fn outdated(admin: &AdminClient) -> Option<Vec<String>> {
    match admin.get(Kind::Vm, "db").await {
        Ok(Object::Vm(vm)) => Some(vm.status.outdated_replicas),
        _ => None,
    }
}

async fn link_state(storage: &Storage, volume: &str) -> Option<ReplicaPeerState> {
    let status = storage.api.status().await.ok()?;
    status
        .replicas
        .into_iter()
        .find(|p| p.volume == volume)
        .map(|p| p.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_goes_on_without_its_peer_only_once_the_control_plane_recorded_it_outdated() {
    let prefix = Prefix::for_test().expect("prefix");
    let address = free_addr().to_string();
    let (mut member, admin) =
        common::start_control(&prefix, &address, None, DEADLINE, Some(CONFIG)).await;
    let agent = AgentClient::connect_lazy(&address).expect("agent client");

    let secret = TokenSecret::new(common::join_token(&admin, "join", 2).await);
    let mut stops = std::collections::HashMap::new();
    let mut credentials = std::collections::HashMap::new();
    for name in ["a", "b"] {
        let (stop, registered) = fake_agent::join(&agent, &secret, name, 4096).await;
        stops.insert(name.to_owned(), stop);
        credentials.insert(name.to_owned(), registered.node_credential);
    }
    let vm = replicated_vm("db", 64 << 20, 2);
    let Object::Vm(vm) = admin.create(Object::Vm(vm)).await.expect("create db") else {
        panic!("a VM comes back")
    };
    wait::until("db is placed", DEADLINE, &[&member], || async {
        placement(&admin).await.is_some()
    })
    .await;

    // Move it once (HA), so an older epoch exists: x was its node at
    // epoch 1, y is at epoch 2. x comes back (registers again) as the
    // holder of the secondary.
    let first = placement(&admin).await.expect("placed");
    let x = first.node.clone();
    let y = first
        .replica_nodes
        .iter()
        .find(|n| **n != x)
        .expect("another replica node")
        .clone();
    stops[&x].store(true, Ordering::Relaxed);
    wait::until(
        "db moves to its other replica node",
        DEADLINE,
        &[&member],
        || async {
            placement(&admin)
                .await
                .is_some_and(|p| p.node == y && p.epoch == 2)
        },
    )
    .await;
    let again = agent
        .register(basalt_api::Registration {
            token: Default::default(),
            node_name: x.clone(),
            address: "127.0.0.1:7500".into(),
            capacity: Resources {
                cpus: 4,
                memory_mib: 4096,
                storage_bytes: 0,
            },
            node_credential: credentials[&x].clone(),
        })
        .await
        .expect("x registers again");
    let stop_x = Arc::new(AtomicBool::new(false));
    fake_agent::heartbeats(
        agent.clone(),
        x.clone(),
        again.node_uid,
        Arc::clone(&stop_x),
    );
    wait::until("x is ready again", DEADLINE, &[&member], || async {
        ready(&admin, &x).await
    })
    .await;

    // (3) Marks from a deposed primary (older epoch) or from a node the
    // VM is not placed on are refused, and change nothing.
    let mark = |node: &str, replica: &str, epoch| ReplicaMark {
        node: node.into(),
        vm: "db".into(),
        replica_node: replica.into(),
        epoch,
        outdated: true,
    };
    for (m, field) in [(mark(&y, &x, 1), "epoch:"), (mark(&x, &y, 1), "node:")] {
        match agent.mark_replica(m.clone()).await {
            Err(ApiError::FailedPrecondition { reason }) => {
                assert!(reason.starts_with(field), "{m:?}: {reason}")
            }
            other => panic!("{m:?} was not refused: {other:?}"),
        }
    }
    assert_eq!(outdated(&admin).await, Some(Vec::new()));

    // The disk: y's storage holds the primary at epoch 2, x's the
    // secondary; both publish their replication addresses.
    let volume = disk_volume(&vm.meta.uid, "root");
    let sy = Storage::start(&prefix, "storage-y", &[]);
    let mut sx = Storage::start(&prefix, "storage-x", &[]);
    publish(&admin, &y, &sy.repl.to_string()).await;
    publish(&admin, &x, &sx.repl.to_string()).await;
    for s in [&sy, &sx] {
        s.api
            .ensure_volume(EnsureVolume {
                name: volume.clone(),
                size_bytes: 64 << 20,
                source: None,
            })
            .await
            .expect("volume");
    }
    sx.api
        .attach_volume(AttachVolume {
            name: volume.clone(),
            role: VolumeRole::Secondary,
            epoch: 2,
            peers: Vec::new(),
            allow_outdate: false,
            protocol: None,
            force: false,
        })
        .await
        .expect("secondary");
    // y's agent fencer, answering y's storage process (no placement
    // watch here: it learns of marks from its own answers and its resync).
    let fencer = tokio::spawn(basalt_agent::storage::fencer::run(
        y.clone(),
        StorageConfig {
            socket: sy.socket.clone(),
        },
        admin.clone(),
        agent.clone(),
        basalt_agent::storage::replicas::NodePlacements::new(&y),
        basalt_agent::storage::seen::SeenVolumes::default(),
    ));
    wait::until(
        "y's storage has its fencer watching",
        DEADLINE,
        &[&sy.process],
        || async {
            sy.process
                .logs()
                .contains("an agent watches fence requests")
        },
    )
    .await;

    sy.api
        .attach_volume(AttachVolume {
            name: volume.clone(),
            role: VolumeRole::Primary,
            epoch: 2,
            peers: vec![sx.repl.to_string()],
            allow_outdate: false,
            protocol: None,
            force: false,
        })
        .await
        .expect("primary");
    wait::until(
        "the primary is in sync with x",
        DEADLINE,
        &[&sy.process],
        || async { link_state(&sy, &volume).await == Some(ReplicaPeerState::Connected) },
    )
    .await;
    // x's copy was recorded outdated while it was filled (a half-filled
    // copy is never made primary), and cleared once in sync.
    wait::until(
        "x's filled copy is no longer outdated",
        DEADLINE,
        &[&member],
        || async { outdated(&admin).await == Some(Vec::new()) },
    )
    .await;
    assert!(
        member.logs().contains("replica recorded outdated"),
        "x's copy was filled without being recorded outdated first\n{}",
        member.log_tail(30)
    );
    let (ok, text) = sy.run(&volume, "write -P 0x11 0 64k");
    assert!(ok, "write with both replicas: {text}");
    let asked = sy
        .process
        .logs()
        .matches("asking the node agent to outdate")
        .count();
    // (1) y is cut off from its peer and from the control plane: no write
    // is acknowledged.
    member.kill9().expect("kill the control plane");
    sx.process.kill9().expect("kill x's storage");
    let mut w1 = sy.qemu_io(&volume, "write -P 0x22 1M 64k");
    assert!(
        still_running(&mut w1, Duration::from_secs(4)),
        "a write was acknowledged with the peer and the control plane gone: {:?}",
        w1.wait_with_output().map(|o| outcome(&o))
    );
    assert!(
        sy.process
            .logs()
            .matches("asking the node agent to outdate")
            .count()
            > asked,
        "{}",
        sy.process.log_tail(30)
    );
    assert!(
        still_running(&mut w1, Duration::from_millis(10)),
        "acknowledged"
    );

    // (2) The control plane is back: it records x outdated, then the
    // write is acknowledged.
    member.restart().expect("restart the control plane");
    let deadline = Instant::now() + DEADLINE;
    while still_running(&mut w1, Duration::from_millis(100)) {
        assert!(
            Instant::now() < deadline,
            "the write never resumed\n{}\n{}",
            member.log_tail(40),
            sy.process.log_tail(40)
        );
    }
    let (ok, text) = outcome(&w1.wait_with_output().expect("qemu-io output"));
    assert!(ok, "the suspended write failed: {text}");
    assert_eq!(
        outdated(&admin).await,
        Some(vec![x.clone()]),
        "acknowledged before the control plane recorded x outdated"
    );
    let (ok, text) = sy.run(&volume, "read -P 0x22 1M 64k");
    assert!(ok, "{text}");

    // x returns and resyncs: the mark is cleared, and x has the write.
    sx.restart();
    wait::until(
        "x's copy is in sync and no longer outdated",
        DEADLINE,
        &[&member, &sy.process],
        || async { outdated(&admin).await == Some(Vec::new()) },
    )
    .await;
    let (ok, text) = sx.run(&volume, "read -P 0x22 1M 64k");
    assert!(ok, "x misses the write it was outdated for: {text}");

    // Lost again: recorded again before the next write is acknowledged.
    sx.process.kill9().expect("kill x's storage again");
    let (ok, text) = sy.run(&volume, "write -P 0x33 2M 64k");
    assert!(ok, "{text}");
    assert_eq!(outdated(&admin).await, Some(vec![x.clone()]));

    // y's node is lost: its only other replica node is outdated, so the
    // VM stays where it is, and the controller says why.
    stops[&y].store(true, Ordering::Relaxed);
    fencer.abort();
    wait::until(
        "the controller says db has nowhere to go",
        DEADLINE,
        &[&member],
        || async {
            member
                .logs()
                .contains("holding an outdated or unfinished replica of its disks")
        },
    )
    .await;
    assert!(!ready(&admin, &y).await, "y's loss was noticed");
    let p = placement(&admin).await.expect("placed");
    assert_eq!(
        (p.node.as_str(), p.epoch),
        (y.as_str(), 2),
        "moved onto an outdated copy"
    );
    stop_x.store(true, Ordering::Relaxed);
}
