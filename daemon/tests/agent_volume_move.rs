//! Moving a standalone volume's copies (decision 80), with real storage
//! processes (root, namespaces): a control plane on namespace node `cp`,
//! and on nodes `a`, `b` and `c` `basaltd storage serve --replica-listen`
//! and `basaltd agent --compute sim`.
//!
//! - One copy, `a` → `b` (`basalt volume move solo --nodes b --wait`):
//!   the data written on `a` is read on `b`, `b` is the primary one epoch
//!   later and takes writes, and `a`'s pool lets the copy go.
//! - Two copies, `a,b` → `c,b`: the new primary `c` has the data, `b`
//!   stays a secondary that receives `c`'s writes, `a` lets its copy go.
//! - Bad moves are refused naming what is wrong: a node that does not
//!   exist, the wrong number of nodes, a snapshot.
//! - `basalt node drain b --storage --wait` moves both volumes' copies
//!   off `b` (decision 81): each gets a copy elsewhere, `pair` keeps `c` as its
//!   primary, `solo`'s data goes along, and `b`'s pool lets both go.

mod common;
mod replica_node;
mod volume_cli;

use std::time::Duration;

use basalt_api::{ReplicaPeerState, ReplicaState, StorageClient, Volume};
use basalt_testkit::wait;

use replica_node::{
    PATTERN_AT, SHORT_LEASES, SimCluster, in_pool, pattern, read_export, write_pattern,
};
use volume_cli::{all_up, basalt, cli_volume, drain_storage, text};

const DEADLINE: Duration = Duration::from_secs(120);

/// The copies' nodes of `v`, each with whether it is the primary.
fn copies(v: &Volume) -> Vec<(String, bool)> {
    v.status
        .replicas
        .iter()
        .map(|r| (r.node.clone(), r.primary))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_volume_moves_to_the_nodes_named_with_its_data() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cluster = SimCluster::start(&["a", "b", "c"], SHORT_LEASES, DEADLINE).await;
    let server = cluster.server.as_str();
    let logs = cluster.logs();
    let node = |name: &str| &cluster.member(name).node;
    let socket = |name: &str| cluster.member(name).socket.clone();

    // One copy on a, written there.
    let out = basalt(
        server,
        &["volume", "create", "solo", "--size", "16M", "--nodes", "a"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    wait::until("solo is up to date on a", DEADLINE, &logs, || async {
        cli_volume(server, "solo")
            .await
            .is_some_and(|v| all_up(&v) && v.status.replicas.len() == 1)
    })
    .await;
    let solo = cli_volume(server, "solo").await.expect("solo");
    let pool = solo.status.storage_name.clone();
    write_pattern(node("a"), &pool, PATTERN_AT, 5);

    // Moved to b: the data follows, b is the primary one epoch later.
    let timeout = format!("{}s", DEADLINE.as_secs());
    let out = basalt(
        server,
        &[
            "volume",
            "move",
            "solo",
            "--nodes",
            "b",
            "--wait",
            "--timeout",
            &timeout,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("moving from a to b"),
        "{}",
        text(&out)
    );
    let moved = cli_volume(server, "solo").await.expect("solo");
    assert_eq!(copies(&moved), [("b".to_owned(), true)]);
    assert_eq!(
        (moved.status.epoch, moved.status.primary_node.as_str()),
        (solo.status.epoch + 1, "b")
    );
    assert_eq!(moved.spec.nodes, ["b"]);
    assert_eq!(
        read_export(node("b"), &pool, PATTERN_AT, pattern(5).len()).expect("read on b"),
        pattern(5),
        "the data written on a is on b"
    );
    // b's copy takes writes now (it was a secondary while it filled).
    wait::until("b's copy takes writes", DEADLINE, &logs, || async {
        !replica_node::refuses_writes(node("b"), &pool)
    })
    .await;
    write_pattern(node("b"), &pool, PATTERN_AT, 6);
    assert_eq!(
        read_export(node("b"), &pool, PATTERN_AT, pattern(6).len()).expect("read on b"),
        pattern(6)
    );
    let a_socket = socket("a");
    wait::until("a lets its copy go", DEADLINE, &logs, || async {
        in_pool(&a_socket, &pool).await == Some(false)
    })
    .await;
    let out = basalt(server, &["volume", "move", "solo", "--nodes", "b"]).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("already on b"),
        "{}",
        text(&out)
    );

    // Two copies, a and b, moved to c (the primary) and b.
    let out = basalt(
        server,
        &[
            "volume", "create", "pair", "--size", "16M", "--nodes", "a,b",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    wait::until("pair is up to date on a and b", DEADLINE, &logs, || async {
        cli_volume(server, "pair")
            .await
            .is_some_and(|v| all_up(&v) && v.status.replicas.len() == 2)
    })
    .await;
    let pair = cli_volume(server, "pair").await.expect("pair");
    let pair_pool = pair.status.storage_name.clone();
    write_pattern(node("a"), &pair_pool, PATTERN_AT, 7);
    let out = basalt(
        server,
        &[
            "volume",
            "move",
            "pair",
            "--nodes",
            "c,b",
            "--wait",
            "--timeout",
            &timeout,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let moved = cli_volume(server, "pair").await.expect("pair");
    assert_eq!(
        copies(&moved),
        [("b".to_owned(), false), ("c".to_owned(), true)]
    );
    assert_eq!(moved.status.epoch, pair.status.epoch + 1);
    assert!(
        moved
            .status
            .replicas
            .iter()
            .all(|r| r.state == ReplicaState::UpToDate),
        "{moved:?}"
    );
    for at in ["c", "b"] {
        assert_eq!(
            read_export(node(at), &pair_pool, PATTERN_AT, pattern(7).len()).expect("read"),
            pattern(7),
            "the data written on a is on {at}"
        );
    }
    // c is the primary and b its secondary: c's writes reach b.
    let c_storage = StorageClient::connect_unix(socket("c")).expect("c's storage");
    wait::until("c replicates to b, in sync", DEADLINE, &logs, || async {
        replica_node::peer_state(&c_storage, &pair_pool, None).await
            == Some((ReplicaPeerState::Connected, 0))
    })
    .await;
    write_pattern(node("c"), &pair_pool, PATTERN_AT, 8);
    assert_eq!(
        read_export(node("b"), &pair_pool, PATTERN_AT, pattern(8).len()).expect("read on b"),
        pattern(8),
        "b receives the new primary's writes"
    );
    assert!(
        replica_node::refuses_writes(node("b"), &pair_pool),
        "b is a secondary"
    );
    wait::until("a lets its copy of pair go", DEADLINE, &logs, || async {
        in_pool(&a_socket, &pair_pool).await == Some(false)
    })
    .await;

    // Bad moves, refused naming what is wrong.
    let refused = |args: &'static [&'static str], says: &'static str| async move {
        let out = basalt(server, args).await;
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}: {}",
            text(&out)
        );
    };
    refused(
        &["volume", "move", "pair", "--nodes", "a,zz"],
        "spec.nodes[1]: node \"zz\" does not exist",
    )
    .await;
    refused(
        &["volume", "move", "pair", "--nodes", "a"],
        "has 2 cop(ies): name one node for each",
    )
    .await;
    let out = basalt(server, &["volume", "snapshot", "pair", "pair-snap"]).await;
    assert!(out.status.success(), "{}", text(&out));
    refused(
        &["volume", "move", "pair-snap", "--nodes", "a"],
        "spec.nodes",
    )
    .await;
    let still = cli_volume(server, "pair").await.expect("pair");
    assert_eq!(still.spec.nodes, ["c", "b"], "nothing changed");

    // Drained, b gives up its copies: solo's (its only one) and pair's.
    let said = drain_storage(server, "b", DEADLINE).await;
    assert!(
        said.contains(
            "moving 0 VM(s), the disk copies of 0 more and 2 standalone volume cop(ies) off it"
        ) && said.contains("volume/solo: its copy left b")
            && said.contains("node/b drained"),
        "{said}"
    );
    let solo = cli_volume(server, "solo").await.expect("solo");
    let pair = cli_volume(server, "pair").await.expect("pair");
    for v in [&solo, &pair] {
        assert!(v.status.replica("b").is_none(), "{v:?}");
        assert_eq!(v.status.replicas.len(), v.spec.replicas as usize, "{v:?}");
    }
    // pair kept c as its primary; solo's data moved with it.
    assert_eq!(pair.status.primary_node, "c");
    assert_eq!(
        read_export(
            node(&solo.status.primary_node),
            &pool,
            PATTERN_AT,
            pattern(6).len()
        )
        .expect("read solo"),
        pattern(6),
        "solo's data left b with it"
    );
    let b_socket = socket("b");
    wait::until("b lets its copies go", DEADLINE, &logs, || async {
        in_pool(&b_socket, &pool).await == Some(false)
            && in_pool(&b_socket, &pair_pool).await == Some(false)
    })
    .await;
    let out = basalt(server, &["node", "uncordon", "b"]).await;
    assert!(out.status.success(), "{}", text(&out));
}
