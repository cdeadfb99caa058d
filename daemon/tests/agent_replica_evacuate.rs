//! A drained node's copy of a VM's replicated disk moves to another node
//! before it goes (decision 82), with real storage processes (root,
//! namespaces): a control plane on namespace node `cp`, and on nodes `a`,
//! `b` and `c` `basaltd storage serve --replica-listen` and `basaltd agent
//! --compute sim` (the simulated hypervisor never opens the disk; the test
//! writes it over NBD as a guest would).
//!
//! The VM's disk has 2 replicas on `a` (its node, primary) and `b`. A
//! pattern is written through `a`. `basalt node drain b --storage
//! --wait`: no VM runs on `b`, but its copy of `db`'s disk does; the
//! placement gains `c`
//! (node and epoch kept), `a`'s primary fills `c`, and only then is `b`
//! dropped: the placement ends on `a` and `c`, `c` holds the pattern and
//! refuses writes as a secondary, `a` replicates to `c` alone, and `b`'s
//! agent deletes its copy. Then a drain of `c`, with `b` still drained,
//! has no node to give its copy to: it runs out of time and says so.

mod common;
mod replica_node;
mod volume_cli;

use std::time::Duration;

use basalt_api::{KernelBoot, Kind, Object, ReplicaPeerState, StorageClient};
use basalt_testkit::wait;

use replica_node::{
    PATTERN_AT, REPLICA_PORT, SHORT_LEASES, SimCluster, create_db_on_a_and_b, in_pool, pattern,
    peer_state, read_export, refuses_writes, write_pattern,
};
use volume_cli::{basalt, drain_storage, text};

const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_nodes_disk_copy_is_replaced_before_it_goes() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cluster = SimCluster::start(&["a", "b", "c"], SHORT_LEASES, DEADLINE).await;
    let server = cluster.server.as_str();
    let logs = cluster.logs();
    let node = |name: &str| &cluster.member(name).node;
    let volume = create_db_on_a_and_b(
        &cluster.admin,
        KernelBoot {
            kernel: "/boot/vmlinuz".into(),
            initrd: String::new(),
            cmdline: "console=ttyS0".into(),
        },
    )
    .await;
    let storage_a =
        StorageClient::connect_unix(&cluster.member("a").socket).expect("storage a client");
    let peer = |n: &str| format!("{}:{REPLICA_PORT}", node(n).addr());
    wait::until(
        "a's primary replicates to b's secondary, in sync",
        DEADLINE,
        &logs,
        || async {
            peer_state(&storage_a, &volume, Some(&peer("b"))).await
                == Some((ReplicaPeerState::Connected, 0))
        },
    )
    .await;
    write_pattern(node("a"), &volume, PATTERN_AT, 3);

    let said = drain_storage(server, "b", DEADLINE).await;
    assert!(
        said.contains("moving 0 VM(s), the disk copies of 1 more")
            && said.contains("vm/db: its disk copies left b")
            && said.contains("node/b drained"),
        "{said}"
    );
    let Ok(Object::Placement(placed)) = cluster.admin.get(Kind::Placement, "db").await else {
        panic!("db's placement");
    };
    assert_eq!(placed.replica_nodes, ["a", "c"]);
    assert_eq!((placed.node.as_str(), placed.epoch), ("a", 1));
    wait::until(
        "a replicates to c alone, in sync",
        DEADLINE,
        &logs,
        || async {
            peer_state(&storage_a, &volume, Some(&peer("c"))).await
                == Some((ReplicaPeerState::Connected, 0))
                && peer_state(&storage_a, &volume, Some(&peer("b")))
                    .await
                    .is_none()
        },
    )
    .await;
    assert_eq!(
        read_export(node("c"), &volume, PATTERN_AT, pattern(3).len()).expect("read c"),
        pattern(3),
        "c's copy holds what was written before it existed"
    );
    assert!(refuses_writes(node("c"), &volume), "c is a secondary");
    let b_socket = cluster.member("b").socket.clone();
    wait::until("b's agent deletes its copy", DEADLINE, &logs, || async {
        in_pool(&b_socket, &volume).await == Some(false)
    })
    .await;
    // With b still drained, no node can take c's copy (a holds the
    // other): a drain of c runs out of time and says why.
    let out = basalt(
        server,
        &[
            "node",
            "drain",
            "c",
            "--storage",
            "--wait",
            "--timeout",
            "3s",
        ],
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vm/db: no node has been given its copy yet"),
        "{}",
        text(&out)
    );
    for node in ["c", "b"] {
        let out = basalt(server, &["node", "uncordon", node]).await;
        assert!(out.status.success(), "{}", text(&out));
    }
}
