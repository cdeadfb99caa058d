//! Disaster recovery of the control plane, with real `basaltd control`
//! processes: a backup read through a follower; a dead member replaced
//! (its `member` object deleted, a new member joined and promoted); lost
//! quorum recovered by forcing a one-member cluster from the survivor's
//! data directory (no acknowledged write lost, writes work again, the old
//! data kept aside); and a backup restored into a new one-member cluster
//! (exactly the backed-up objects, versions continuing above the
//! backup's).

use basalt_testkit::wait;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use basalt_api::{AdminClient, ApiError, Kind, Node, Object, ObjectMeta};
use basalt_testkit::{Prefix, Process, ProcessSpec};
use futures::StreamExt as _;

const BASALTD: &str = env!("CARGO_BIN_EXE_basaltd");
const DEADLINE: Duration = Duration::from_secs(60);

struct Member {
    address: String,
    data: PathBuf,
    process: Process,
}

/// Starts member `id` on `data`: bootstraps, joins `seed`, or (neither)
/// starts from what the directory holds.
fn start_member(prefix: &Prefix, id: u64, address: &str, data: &Path, mode: Mode<'_>) -> Member {
    let mut spec = ProcessSpec::new(format!("control-{id}"), BASALTD)
        .args(["control", "--node-id", &id.to_string(), "--listen", address])
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "info");
    spec = match mode {
        Mode::Bootstrap => spec.arg("--bootstrap"),
        Mode::Join(seed) => spec.args(["--join", seed]),
        Mode::Existing => spec,
    };
    Member {
        address: address.to_owned(),
        data: data.to_owned(),
        process: Process::start(prefix, spec).expect("start basaltd control"),
    }
}

enum Mode<'a> {
    Bootstrap,
    Join(&'a str),
    Existing,
}

fn node(name: &str) -> Object {
    let mut node = Node {
        meta: ObjectMeta::named(name),
        ..Node::default()
    };
    node.spec.address = "10.0.0.1:7500".into();
    Object::Node(node)
}

async fn voter_ids(client: &AdminClient) -> BTreeSet<u64> {
    match client.list(Kind::Member).await {
        Ok(list) => list
            .objects
            .iter()
            .filter_map(|o| match o {
                Object::Member(m) if m.voter => Some(m.id),
                _ => None,
            })
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

async fn node_names(client: &AdminClient) -> BTreeSet<String> {
    client
        .list(Kind::Node)
        .await
        .expect("list nodes")
        .objects
        .iter()
        .map(|o| o.name().to_owned())
        .collect()
}

/// Runs `basaltd control ARGS…`, which must succeed; returns its stdout.
fn tool(args: &[&str]) -> String {
    let output = Command::new(BASALTD)
        .arg("control")
        .args(args)
        .output()
        .expect("run basaltd control");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "basaltd control {args:?} failed:\n{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_replace_force_new_cluster_and_restore() {
    let prefix = Prefix::for_test().expect("prefix");
    let dir = |name: &str| prefix.dir().join(name);
    let addr = || format!("127.0.0.1:{}", basalt_testkit::free_port());

    let first = start_member(&prefix, 1, &addr(), &dir("m1"), Mode::Bootstrap);
    let seed = first.address.clone();
    let client = AdminClient::connect_lazy(&seed).expect("client");
    wait::until("member 1 leads", DEADLINE, &[], || async {
        voter_ids(&client).await == BTreeSet::from([1])
    })
    .await;
    let mut members = vec![first];
    for id in [2, 3] {
        let member = start_member(
            &prefix,
            id,
            &addr(),
            &dir(&format!("m{id}")),
            Mode::Join(&seed),
        );
        members.push(member);
        wait::until(
            &format!("member {id} is a voter"),
            DEADLINE,
            &[],
            || async { voter_ids(&client).await.contains(&id) },
        )
        .await;
    }
    for i in 0..20 {
        client
            .create(node(&format!("before-{i}")))
            .await
            .expect("write");
    }

    // A backup, read through a follower; then more writes it must not hold.
    let backup_file = dir("state.backup");
    let out = tool(&[
        "backup",
        "--server",
        &members[1].address,
        "--out",
        path(&backup_file),
    ]);
    assert!(out.contains("backed up"), "{out}");
    for i in 0..5 {
        client
            .create(node(&format!("after-{i}")))
            .await
            .expect("write");
    }

    // Replace a dead member: kill member 3, delete its member object, join
    // member 4; the cluster is three voters again and takes writes.
    members[2].process.kill9().expect("kill member 3");
    client
        .delete(Kind::Member, "member-3", None)
        .await
        .expect("delete member-3");
    wait::until(
        "member 3 is out of the membership",
        DEADLINE,
        &[],
        || async { !voter_ids(&client).await.contains(&3) },
    )
    .await;
    let fourth = start_member(&prefix, 4, &addr(), &dir("m4"), Mode::Join(&seed));
    wait::until("member 4 is a voter", DEADLINE, &[], || async {
        voter_ids(&client).await == BTreeSet::from([1, 2, 4])
    })
    .await;
    members.push(fourth);
    let written = client
        .create(node("with-four"))
        .await
        .expect("a write with the new member");
    // Forcing keeps what the survivor holds: wait until member 4 has it
    // (a watch is served by the member itself).
    let local = AdminClient::connect_lazy(&members[3].address).expect("client");
    let mut events = local
        .watch(Some(Kind::Node), written.meta().resource_version - 1)
        .await
        .expect("watch member 4");
    let seen = tokio::time::timeout(DEADLINE, events.next())
        .await
        .expect("member 4 applies the write");
    assert!(seen.is_some_and(|e| e.is_ok()));

    // Lose quorum for good: members 1 and 2 die; member 4 alone cannot
    // take a write.
    members[0].process.kill9().expect("kill member 1");
    members[1].process.kill9().expect("kill member 2");
    let survivor = AdminClient::connect_lazy(&members[3].address).expect("client");
    assert!(
        survivor.create(node("no-quorum")).await.is_err(),
        "a lone member of three took a write"
    );
    members[3].process.kill9().expect("stop the survivor");
    let out = tool(&[
        "force-new-cluster",
        "--data-dir",
        path(&members[3].data),
        "--node-id",
        "4",
    ]);
    assert!(out.contains("one-member cluster"), "{out}");
    let kept: Vec<_> = std::fs::read_dir(prefix.dir())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("m4.before-force-new-cluster-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the original data is kept aside");
    members[3]
        .process
        .restart()
        .expect("start the survivor again");
    wait::until("the forced member takes writes", DEADLINE, &[], || async {
        survivor.create(node("forced")).await.is_ok()
    })
    .await;
    let names = node_names(&survivor).await;
    for i in 0..20 {
        assert!(names.contains(&format!("before-{i}")), "lost before-{i}");
    }
    for i in 0..5 {
        assert!(names.contains(&format!("after-{i}")), "lost after-{i}");
    }
    assert!(names.contains("with-four"), "lost an acknowledged write");
    assert!(
        !names.contains("no-quorum"),
        "an unacknowledged write appeared"
    );
    wait::until(
        "the forced cluster has one voter: member 4",
        DEADLINE,
        &[],
        || async { voter_ids(&survivor).await == BTreeSet::from([4]) },
    )
    .await;

    // Restore the backup into a new one-member cluster.
    let restored_addr = addr();
    let out = tool(&[
        "restore",
        "--in",
        path(&backup_file),
        "--data-dir",
        path(&dir("m9")),
        "--node-id",
        "9",
        "--listen",
        &restored_addr,
    ]);
    assert!(out.contains("restored"), "{out}");
    // Restoring over existing data is refused.
    let refused = Command::new(BASALTD)
        .args([
            "control",
            "restore",
            "--in",
            path(&backup_file),
            "--data-dir",
        ])
        .arg(dir("m9"))
        .args(["--node-id", "9", "--listen", &restored_addr])
        .output()
        .expect("run restore");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already holds"));

    let _restored = start_member(&prefix, 9, &restored_addr, &dir("m9"), Mode::Existing);
    let restored = AdminClient::connect_lazy(&restored_addr).expect("client");
    wait::until("the restored member leads", DEADLINE, &[], || async {
        voter_ids(&restored).await == BTreeSet::from([9])
    })
    .await;
    let names = node_names(&restored).await;
    let expected: BTreeSet<String> = (0..20).map(|i| format!("before-{i}")).collect();
    assert_eq!(names, expected, "exactly the backed-up nodes");
    let backup: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&backup_file).expect("read backup")).expect("json");
    let version = backup["resource_version"]
        .as_u64()
        .expect("resource_version");
    let created = restored.create(node("new")).await.expect("a write");
    assert!(
        created.meta().resource_version > version,
        "new versions continue above the backup's ({} ≤ {version})",
        created.meta().resource_version
    );
    // Compare-and-swap on a restored object with its stored version works.
    let Object::Node(mut before) = restored.get(Kind::Node, "before-0").await.expect("get") else {
        panic!("not a node")
    };
    before.spec.cordoned = true;
    restored
        .update(Object::Node(before.clone()))
        .await
        .expect("CAS with the restored version");
    assert!(matches!(
        restored.update(Object::Node(before)).await,
        Err(ApiError::Aborted { .. })
    ));
}
