//! A three-member control plane as separate `basaltd control` processes on
//! loopback: writes through any member, CAS and validation errors, kill -9
//! of the leader under a steady write load (a new leader, no acknowledged
//! write lost), a restarted member that lagged past the log catching up
//! by snapshot, watches and their compaction, and bad peer payloads.

use basalt_testkit::wait;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_api::{
    AdminClient, ApiError, Kind, Node, Object, ObjectMeta, Placement, RaftClient, WatchEvent,
};
use basalt_testkit::linearizability::{Operation, RegisterOp, check_register};
use basalt_testkit::{Prefix, Process, ProcessSpec};
use futures::StreamExt as _;

const BASALTD: &str = env!("CARGO_BIN_EXE_basaltd");
const DEADLINE: Duration = Duration::from_secs(60);

struct Member {
    id: u64,
    address: String,
    process: Process,
}

fn start_member(prefix: &Prefix, config: &Path, id: u64, seed: Option<&str>) -> Member {
    let address = format!("127.0.0.1:{}", basalt_testkit::free_port());
    let data = prefix.dir().join(format!("control-{id}"));
    let mut spec = ProcessSpec::new(format!("control-{id}"), BASALTD)
        .args(["--log-format", "json", "control", "--config"])
        .arg(config)
        .args([
            "--node-id",
            &id.to_string(),
            "--listen",
            &address,
            "--data-dir",
        ])
        .arg(&data)
        .env("RUST_LOG", "info");
    spec = match seed {
        None => spec.arg("--bootstrap"),
        Some(seed) => spec.args(["--join", seed]),
    };
    let process = Process::start(prefix, spec).expect("start basaltd control");
    Member {
        id,
        address,
        process,
    }
}

fn node(name: &str) -> Object {
    let mut node = Node {
        meta: ObjectMeta::named(name),
        ..Node::default()
    };
    node.spec.address = "10.0.0.1:7500".into();
    Object::Node(node)
}

/// The leader with the highest term any member has logged.
fn current_leader(members: &[Member]) -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64)> = None;
    for member in members {
        for line in member.process.logs().lines() {
            let Ok(json) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let fields = &json["fields"];
            if fields["message"] != "leader changed" {
                continue;
            }
            let (Some(term), Some(leader)) =
                (fields["term"].as_u64(), fields["leader_id"].as_u64())
            else {
                continue;
            };
            if best.is_none_or(|(t, _)| term > t) {
                best = Some((term, leader));
            }
        }
    }
    best
}

/// The ids of the members a list marks as leader.
async fn leaders(client: &AdminClient) -> Vec<u64> {
    client
        .list(Kind::Member)
        .await
        .expect("list members")
        .objects
        .iter()
        .filter_map(|o| match o {
            Object::Member(m) if m.leader => Some(m.id),
            _ => None,
        })
        .collect()
}

async fn voters(client: &AdminClient) -> usize {
    match client.list(Kind::Member).await {
        Ok(list) => list
            .objects
            .iter()
            .filter(|o| matches!(o, Object::Member(m) if m.voter))
            .count(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_keep_every_acknowledged_write_through_leader_loss() {
    let prefix = Prefix::for_test().expect("prefix");
    let config = prefix.dir().join("control.toml");
    std::fs::write(
        &config,
        "[raft]\nsnapshot_threshold = 50\nlogs_to_keep = 0\nwatch_history = 100\n",
    )
    .expect("config");

    let first = start_member(&prefix, &config, 1, None);
    let seed = first.address.clone();
    let mut members = vec![
        first,
        start_member(&prefix, &config, 2, Some(&seed)),
        start_member(&prefix, &config, 3, Some(&seed)),
    ];
    let clients: Vec<AdminClient> = members
        .iter()
        .map(|m| AdminClient::connect_lazy(&m.address).expect("client"))
        .collect();
    wait::until("three voters", DEADLINE, &[], || async {
        voters(&clients[0]).await == 3
    })
    .await;

    // Writes and reads through a follower, CAS and validation.
    let (_, leader) = current_leader(&members).expect("a leader is logged");
    let follower = members
        .iter()
        .position(|m| m.id != leader)
        .expect("a follower");
    let client = &clients[follower];
    assert_eq!(
        leaders(client).await,
        vec![leader],
        "a member list (here through a follower) marks the logged leader, and only it"
    );
    let created = client
        .create(node("cas"))
        .await
        .expect("create via a follower");
    assert!(created.meta().resource_version > 0 && created.meta().generation == 1);
    assert!(!created.meta().uid.is_empty());
    let mut stale = created.clone();
    let mut fresh = created.clone();
    if let Object::Node(n) = &mut fresh {
        n.spec.cordoned = true;
    }
    let updated = client.update(fresh).await.expect("CAS update");
    assert_eq!(
        updated.meta().generation,
        2,
        "a spec change bumps the generation"
    );
    if let Object::Node(n) = &mut stale {
        n.spec.address = "10.0.0.2:7500".into();
    }
    match client.update(stale).await {
        Err(ApiError::Aborted { expected, actual }) => {
            assert_eq!(
                (expected, actual),
                (
                    created.meta().resource_version,
                    updated.meta().resource_version
                )
            );
        }
        other => panic!("a stale update must be ABORTED, got {other:?}"),
    }
    match client.create(node("Bad_Name")).await {
        Err(ApiError::InvalidArgument { field, .. }) => assert_eq!(field, "meta.name"),
        other => panic!("a bad name must be INVALID_ARGUMENT, got {other:?}"),
    }
    let mut bad_address = node("bad-address");
    if let Object::Node(n) = &mut bad_address {
        n.spec.address = "not an address".into();
    }
    match client.create(bad_address).await {
        Err(ApiError::InvalidArgument { field, .. }) => assert_eq!(field, "spec.address"),
        other => panic!("a bad address must be INVALID_ARGUMENT, got {other:?}"),
    }
    let placement = Object::Placement(Placement {
        meta: ObjectMeta::named("ghost"),
        vm: "ghost".into(),
        node: "cas".into(),
        epoch: 1,
        ..Placement::default()
    });
    assert!(
        matches!(
            client.create(placement).await,
            Err(ApiError::FailedPrecondition { .. })
        ),
        "a placement of a missing VM is refused"
    );
    assert!(matches!(
        client.delete(Kind::Node, "cas", Some(1)).await,
        Err(ApiError::Aborted { .. })
    ));
    assert!(matches!(
        client.get(Kind::Node, "nope").await,
        Err(ApiError::NotFound { .. })
    ));
    // A peer's garbage never reaches openraft.
    let raft = RaftClient::connect(&members[follower].address)
        .await
        .expect("raft client");
    match raft.append_entries(b"{not json".to_vec()).await {
        Err(ApiError::InvalidArgument { field, .. }) => assert_eq!(field, "payload"),
        other => panic!("garbage must be INVALID_ARGUMENT, got {other:?}"),
    }

    // A watch through the follower sees a change made through another member.
    let list = client.list(Kind::Node).await.expect("list");
    let mut watch = client
        .watch(Some(Kind::Node), list.resource_version)
        .await
        .expect("watch");
    let other = (follower + 1) % 3;
    clients[other]
        .create(node("watched"))
        .await
        .expect("create");
    let event = tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("an event in time");
    match event {
        Some(Ok(WatchEvent::Added { object, .. })) => assert_eq!(object.name(), "watched"),
        other => panic!("expected ADDED watched, got {other:?}"),
    }

    // Kill -9 the leader under a steady write load from four clients,
    // while three more read and write one register (the label `v` of node
    // `reg`) for the linearizability check.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut register = node("reg");
    register.meta_mut().labels.insert("v".into(), "0".into());
    let call = Instant::now();
    clients[0]
        .create(register)
        .await
        .expect("create the register");
    let history = Arc::new(Mutex::new(vec![Operation {
        op: RegisterOp::Write(0),
        call,
        ret: Some(Instant::now()),
    }]));
    let mut writers = Vec::new();
    for worker in 0..3u64 {
        let (clients, history, stop) = (clients.clone(), Arc::clone(&history), Arc::clone(&stop));
        writers.push(tokio::spawn(register_worker(
            worker, clients, history, stop,
        )));
    }
    for writer in 0..4usize {
        let (clients, acked, stop) = (clients.clone(), Arc::clone(&acked), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let mut seq = 0;
            let mut target = writer;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{writer}-{seq}");
                loop {
                    let attempt = tokio::time::timeout(
                        Duration::from_secs(5),
                        clients[target % 3].create(node(&name)),
                    )
                    .await;
                    match attempt {
                        Ok(Ok(_)) | Ok(Err(ApiError::AlreadyExists { .. })) => break,
                        _ if stop.load(Ordering::Relaxed) => return,
                        _ => {
                            target += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                acked.lock().unwrap().push(name);
                seq += 1;
            }
        }));
    }
    wait::until("writes flow", DEADLINE, &[], || async {
        acked.lock().unwrap().len() >= 40
    })
    .await;
    let (old_term, leader) = current_leader(&members).expect("leader");
    let victim = members
        .iter()
        .position(|m| m.id == leader)
        .expect("leader process");
    members[victim].process.kill9().expect("kill -9 the leader");
    let acked_at_kill = acked.lock().unwrap().len();
    wait::until(
        "writes resume under a new leader",
        DEADLINE,
        &[],
        || async { acked.lock().unwrap().len() >= acked_at_kill + 40 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }
    let history = history.lock().unwrap().clone();
    let writes = history
        .iter()
        .filter(|o| matches!(o.op, RegisterOp::Write(_)))
        .count();
    assert!(
        writes > 5 && history.len() > 20,
        "too short a register history: {history:?}"
    );
    check_register(&history).expect("the register history is linearizable");
    let (new_term, new_leader) = current_leader(&members).expect("leader");
    assert!(
        new_term > old_term && new_leader != leader,
        "a new leader is elected"
    );

    let survivor = &clients[(victim + 1) % 3];
    assert_eq!(
        leaders(survivor).await,
        vec![new_leader],
        "the new leader is marked"
    );
    let stored: BTreeSet<String> = survivor
        .list(Kind::Node)
        .await
        .expect("list after failover")
        .objects
        .iter()
        .map(|o| o.name().to_owned())
        .collect();
    let acked = acked.lock().unwrap().clone();
    let lost: Vec<&String> = acked.iter().filter(|n| !stored.contains(*n)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // Push the log well past the snapshot threshold while the old leader is
    // down, so it can only catch up from a snapshot.
    for i in 0..150 {
        survivor
            .create(node(&format!("lag-{i}")))
            .await
            .expect("write while one is down");
    }
    // A watch from a version the history no longer holds must re-list.
    match survivor.watch(None, 1).await {
        Err(ApiError::OutOfRange { requested, oldest }) => assert!(requested < oldest),
        Ok(mut events) => match events.next().await {
            Some(Err(ApiError::OutOfRange { .. })) => {}
            other => panic!("a compacted watch must be OUT_OF_RANGE, got {other:?}"),
        },
        Err(other) => panic!("a compacted watch must be OUT_OF_RANGE, got {other:?}"),
    }

    members[victim]
        .process
        .restart()
        .expect("restart the old leader");
    let restarted = AdminClient::connect_lazy(&members[victim].address).expect("client");
    wait::until(
        "the restarted member installs a snapshot",
        DEADLINE,
        &[],
        || async {
            members[victim]
                .process
                .logs()
                .contains("installed a snapshot")
        },
    )
    .await;
    // Its own watch (served from its local state) must see a write made
    // through another member. A watch opened while it still installs
    // snapshots ends with OUT_OF_RANGE (it skipped history): open another.
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        assert!(
            started.elapsed() < DEADLINE,
            "the restarted member never caught up"
        );
        attempt += 1;
        let Ok(mut watch) = restarted.watch(Some(Kind::Node), 0).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let name = format!("after-restart-{attempt}");
        let last = survivor.create(node(&name)).await.expect("write");
        let seen = tokio::time::timeout(DEADLINE, async {
            while let Some(event) = watch.next().await {
                match event {
                    Ok(WatchEvent::Added {
                        object,
                        resource_version,
                    }) if object.name() == name => return Some(resource_version),
                    Ok(_) => {}
                    Err(ApiError::OutOfRange { .. }) => return None,
                    Err(err) => panic!("watch on the restarted member failed: {err}"),
                }
            }
            None
        })
        .await
        .expect("the restarted member applies new writes in time");
        if let Some(version) = seen {
            assert_eq!(version, last.meta().resource_version);
            break;
        }
    }
    let listed = restarted
        .list(Kind::Node)
        .await
        .expect("list via the restarted member");
    assert!(listed.objects.len() >= acked.len() + 150);
}

fn register_value(object: &Object) -> Option<u64> {
    object.meta().labels.get("v")?.parse().ok()
}

/// Reads (even workers) or writes (odd: get, then CAS update) the register
/// through rotating members until `stop`, recording each operation with a
/// known outcome, and each write whose outcome is unknown as open-ended.
async fn register_worker(
    worker: u64,
    clients: Vec<AdminClient>,
    history: Arc<Mutex<Vec<Operation>>>,
    stop: Arc<AtomicBool>,
) {
    let timeout = Duration::from_secs(3);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let client = &clients[((worker + seq) % 3) as usize];
        let call = Instant::now();
        let read = tokio::time::timeout(timeout, client.get(Kind::Node, "reg")).await;
        let Ok(Ok(current)) = read else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if worker.is_multiple_of(2) {
            history.lock().unwrap().push(Operation {
                op: RegisterOp::Read(register_value(&current)),
                call,
                ret: Some(Instant::now()),
            });
            continue;
        }
        let value = worker * 1_000_000 + seq;
        let mut next = current.clone();
        next.meta_mut().labels.insert("v".into(), value.to_string());
        let call = Instant::now();
        let written = tokio::time::timeout(timeout, client.update(next)).await;
        let ret = match written {
            Ok(Ok(_)) => Some(Instant::now()),
            // Refused: it had no effect, so it is not part of the history.
            Ok(Err(ApiError::Aborted { .. } | ApiError::InvalidArgument { .. })) => continue,
            // Unknown: it may take effect at any time, or never.
            _ => None,
        };
        history.lock().unwrap().push(Operation {
            op: RegisterOp::Write(value),
            call,
            ret,
        });
    }
}

#[test]
fn bad_configuration_is_refused_naming_file_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "node_id = 1\nlisten_address = \"127.0.0.1:1\"\n").expect("write");
    let output = std::process::Command::new(BASALTD)
        .args(["control", "--config"])
        .arg(&file)
        .output()
        .expect("run basaltd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("bad.toml") && stderr.contains("listen_address"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let output = std::process::Command::new(BASALTD)
        .args(["control", "--node-id", "0", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run basaltd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("invalid node_id"), "{stderr}");
}
