//! Standalone volumes placed on nodes (decision 61), with real storage
//! processes (root, namespaces): a control plane on namespace node `cp`,
//! and on nodes `a` and `b` `basaltd storage serve --replica-listen` and
//! `basaltd agent --compute sim`.
//!
//! `basalt volume create scratch --size 16M --copies 2`: the control
//! plane places it on both nodes (one primary, epoch 1, pool name
//! `vol-UID`), each node's agent makes its copy in its pool, and the
//! volume shows both copies `up-to-date`, each also reported by its own
//! node; a pattern written through the primary's NBD export is read back
//! from the secondary's copy. A snapshot of it is made on the primary's
//! node. The primary's storage process is killed: its copy turns
//! `unknown` while the secondary's still shows `up-to-date` (its own node
//! reports it held). With the storage process back, `basalt volume
//! delete` removes both copies from both pools.

mod common;
mod replica_node;
mod volume_cli;

use std::time::Duration;

use basalt_api::{ReplicaState, Volume};
use basalt_testkit::wait;

use replica_node::{
    PATTERN_AT, SHORT_LEASES, SimCluster, in_pool, pattern, read_export, write_pattern,
};
use volume_cli::{basalt, cli_volume, states, text};

const DEADLINE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_volume_is_placed_on_its_nodes_reported_by_each_and_deleted_from_both() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut cluster = SimCluster::start(&["a", "b"], SHORT_LEASES, DEADLINE).await;
    let server = cluster.server.as_str();

    let out = basalt(
        server,
        &[
            "volume", "create", "scratch", "--size", "16M", "--copies", "2",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let up = vec![
        ("a".to_owned(), ReplicaState::UpToDate),
        ("b".to_owned(), ReplicaState::UpToDate),
    ];
    let reported_by_both = |v: &Volume| {
        states(v) == up
            && v.status
                .replicas
                .iter()
                .all(|r| r.node_state == Some(ReplicaState::UpToDate))
    };
    {
        let logs = cluster.logs();
        wait::until(
            "both copies up to date, each reported by its own node",
            DEADLINE,
            &logs,
            || async {
                cli_volume(server, "scratch")
                    .await
                    .is_some_and(|v| reported_by_both(&v))
            },
        )
        .await;
    }
    let volume = cli_volume(server, "scratch").await.expect("scratch");
    let pool_name = volume.status.storage_name.clone();
    assert_eq!(pool_name, format!("vol-{}", volume.meta.uid));
    assert_eq!(volume.status.epoch, 1);
    let primary = volume.status.primary_node.clone();
    let primaries: Vec<&str> = volume
        .status
        .replicas
        .iter()
        .filter(|r| r.primary)
        .map(|r| r.node.as_str())
        .collect();
    assert_eq!(primaries, [primary.as_str()]);
    assert!(volume.status.conditions[0].status, "{volume:?}");
    for socket in [&cluster.members[0].socket, &cluster.members[1].socket] {
        assert_eq!(
            in_pool(socket, &pool_name).await,
            Some(true),
            "{}",
            socket.display()
        );
    }
    let (p_index, s_index) = if primary == "a" { (0, 1) } else { (1, 0) };
    let (p, s) = (
        &cluster.members[p_index].node,
        &cluster.members[s_index].node,
    );
    // Replicated: written through the primary, held by the secondary.
    write_pattern(p, &pool_name, PATTERN_AT, 5);
    assert_eq!(
        read_export(s, &pool_name, PATTERN_AT, pattern(5).len()).expect("read the secondary"),
        pattern(5),
        "the secondary's copy misses the primary's write"
    );

    // A snapshot of it is made on the primary's node, from the watch.
    let out = basalt(server, &["volume", "snapshot", "scratch", "scratch-snap"]).await;
    assert!(out.status.success(), "{}", text(&out));
    wait::until(
        "the snapshot is made on the primary's node",
        DEADLINE,
        &[
            &cluster.control,
            &cluster.members[0].agent,
            &cluster.members[1].agent,
        ],
        || async {
            cli_volume(server, "scratch-snap").await.is_some_and(|v| {
                v.status.primary_node == primary && !v.status.storage_name.is_empty()
            })
        },
    )
    .await;
    let out = basalt(server, &["volume", "delete", "scratch-snap"]).await;
    assert!(out.status.success(), "{}", text(&out));

    // The primary's storage process dies: the secondary's copy is still
    // known, reported by its own node.
    cluster.members[p_index]
        .storage
        .kill9()
        .expect("kill the primary's storage");
    {
        let logs = [
            &cluster.control,
            &cluster.members[0].agent,
            &cluster.members[1].agent,
        ];
        wait::until(
            "the primary's copy turns unknown",
            DEADLINE,
            &logs,
            || async {
                cli_volume(server, "scratch").await.is_some_and(|v| {
                    v.status.replica(&primary).map(|r| r.state) == Some(ReplicaState::Unknown)
                })
            },
        )
        .await;
    }
    let volume = cli_volume(server, "scratch").await.expect("scratch");
    let secondary = volume
        .status
        .replicas
        .iter()
        .find(|r| !r.primary)
        .expect("a secondary");
    assert_eq!(
        (secondary.state, secondary.node_state),
        (ReplicaState::UpToDate, Some(ReplicaState::UpToDate)),
        "{volume:?}"
    );
    let primary_copy = volume.status.replica(&primary).expect("the primary's copy");
    assert_eq!(primary_copy.node_state, Some(ReplicaState::Unknown));
    assert!(!volume.status.conditions[0].status, "{volume:?}");

    // Back, then deleted: both copies leave both pools.
    cluster.members[p_index]
        .storage
        .restart()
        .expect("restart the storage process");
    let out = basalt(server, &["volume", "delete", "scratch"]).await;
    assert!(out.status.success(), "{}", text(&out));
    for socket in [&cluster.members[0].socket, &cluster.members[1].socket] {
        wait::until(
            &format!("the copy leaves {}", socket.display()),
            DEADLINE,
            &cluster.logs(),
            || async { in_pool(socket, &pool_name).await == Some(false) },
        )
        .await;
    }
}
