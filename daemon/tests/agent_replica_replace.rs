//! A lost replica is replaced on a third node and filled by a full sync
//! (decision 43), with real storage processes (root, namespaces): a
//! control plane on namespace node `cp` with a short
//! `nodes.replica_replace_after_ms`, and on nodes `a`, `b` and `c`
//! `basaltd storage serve --replica-listen` and `basaltd agent --compute
//! sim` (the simulated hypervisor never opens the disk; the test writes
//! it over NBD as a guest would).
//!
//! The VM's disk has 2 replicas on `a` (its node, primary) and `b`
//! (secondary). A pattern written through `a`'s export is on `b`. Then
//! `b`'s agent and storage process are killed with SIGKILL: once its
//! lease ran out and the delay passed, the placement names `c` in `b`'s
//! place with the same node and epoch; `c`'s agent attaches an empty
//! secondary, `a`'s agent gives its primary `c` as the peer instead of
//! `b`, and the primary's full sync fills `c`: the pattern is read back
//! from `c`'s export, `c` refuses NBD writes (a secondary), and a write
//! acknowledged by `a` afterwards is on `c` at once (protocol C).
//! When `b` comes back, its agent deletes its old copy (no longer one the
//! placement names) and `a`'s primary does not take `b` back.

mod common;
mod replica_node;

use std::time::Duration;

use basalt_api::{KernelBoot, ReplicaPeerState, StorageClient};
use basalt_testkit::{Fabric, Prefix, Process, wait};

use replica_node::{
    PATTERN_AT, REPLICA_PORT, ReplicaNodes, agent_spec, create_db_on_a_and_b, pattern, peer_state,
    read_export, refuses_writes, start_replica_nodes, write_pattern,
};

const DEADLINE: Duration = Duration::from_secs(120);
/// Short leases and a short delay so the replacement takes seconds.
const CONFIG: &str = replica_node::SHORT_LEASES_QUICK_REPLACE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replica_is_replaced_on_a_third_node_and_fully_synced() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let a = fabric.add_node("a").expect("node a");
    let b = fabric.add_node("b").expect("node b");
    let c = fabric.add_node("c").expect("node c");
    let cp = fabric.add_node("cp").expect("node cp");

    let ReplicaNodes {
        mut storages,
        sockets,
        control,
        admin,
        mut agents,
        server,
    } = start_replica_nodes(&prefix, &[&a, &b, &c], &cp, CONFIG, &[], DEADLINE).await;

    // The VM, placed on a with replicas on a and b by the test. The
    // simulated hypervisor never opens its kernel.
    let volume = create_db_on_a_and_b(
        &admin,
        KernelBoot {
            kernel: "/boot/vmlinuz".into(),
            initrd: String::new(),
            cmdline: "console=ttyS0".into(),
        },
    )
    .await;
    let storage_a = StorageClient::connect_unix(&sockets[0]).expect("storage a client");
    let (b_peer, c_peer) = (
        format!("{}:{REPLICA_PORT}", b.addr()),
        format!("{}:{REPLICA_PORT}", c.addr()),
    );
    {
        let logs: Vec<&Process> = storages.iter().chain(&agents).chain([&control]).collect();
        wait::until(
            "a's primary replicates to b's secondary, in sync",
            DEADLINE,
            &logs,
            || async {
                peer_state(&storage_a, &volume, Some(&b_peer)).await
                    == Some((ReplicaPeerState::Connected, 0))
            },
        )
        .await;
    }
    write_pattern(&a, &volume, PATTERN_AT, 1);
    assert!(
        read_export(&b, &volume, PATTERN_AT, pattern(1).len()).expect("read b") == pattern(1),
        "b's replica does not hold the pattern"
    );

    // b is lost: its agent and storage process die.
    agents[1].kill9().expect("kill b's agent");
    storages[1].kill9().expect("kill b's storage");
    {
        let logs: Vec<&Process> = [&storages[0], &storages[2], &agents[0], &agents[2], &control]
            .into_iter()
            .collect();
        wait::until(
            "the placement names c instead of b",
            DEADLINE,
            &logs,
            || async {
                replica_node::db_placement(&admin)
                    .await
                    .is_some_and(|p| !p.holds_replica("b"))
            },
        )
        .await;
        let replaced = replica_node::db_placement(&admin).await.expect("placed");
        assert_eq!(replaced.replica_nodes, ["a", "c"], "{replaced:?}");
        assert_eq!((replaced.node.as_str(), replaced.epoch), ("a", 1));

        wait::until(
            "a's primary has synced c fully and dropped b",
            DEADLINE,
            &logs,
            || async {
                peer_state(&storage_a, &volume, Some(&c_peer)).await
                    == Some((ReplicaPeerState::Connected, 0))
                    && peer_state(&storage_a, &volume, Some(&b_peer))
                        .await
                        .is_none()
            },
        )
        .await;
    }
    assert!(
        read_export(&c, &volume, PATTERN_AT, pattern(1).len()).expect("read c") == pattern(1),
        "c's new replica does not hold what was written before it existed"
    );
    // c's copy is a secondary: it refuses writers.
    assert!(
        refuses_writes(&c, &volume),
        "c's secondary took an NBD write"
    );
    // A write acknowledged by a now is on c (protocol C).
    write_pattern(&a, &volume, PATTERN_AT + (1 << 20), 2);
    assert!(
        read_export(&c, &volume, PATTERN_AT + (1 << 20), pattern(2).len()).expect("read c")
            == pattern(2),
        "a write acknowledged after the replacement is missing on c"
    );

    // b comes back (its pool as it was, a fresh join token): its old copy
    // is no longer one the placement names, so its agent deletes it, and
    // a's primary never takes b back as a peer.
    storages[1].restart().expect("restart b's storage");
    let rejoin = common::join_token(&admin, "rejoin-b", 1).await;
    agents[1] = Process::start(
        &prefix,
        agent_spec(&b, &server, &rejoin, &sockets[1]).args(["--compute", "sim"]),
    )
    .expect("b's agent again");
    let storage_b = StorageClient::connect_unix(&sockets[1]).expect("storage b client");
    {
        let logs: Vec<&Process> = storages.iter().chain(&agents).chain([&control]).collect();
        wait::until(
            "b's agent deletes its replaced copy",
            DEADLINE,
            &logs,
            || async {
                storage_b
                    .list_volumes()
                    .await
                    .is_ok_and(|pool| pool.iter().all(|v| v.name != volume))
            },
        )
        .await;
    }
    assert!(
        peer_state(&storage_a, &volume, Some(&b_peer))
            .await
            .is_none(),
        "a's primary took the replaced node back as a peer"
    );
    assert!(
        read_export(&c, &volume, PATTERN_AT + (1 << 20), pattern(2).len()).expect("read c")
            == pattern(2),
        "c's copy changed when b's stale copy was collected"
    );
}
