//! Replicated VM disks in the control plane, against one real `basaltd
//! control` process with fake agents (heartbeats through `AgentClient`):
//! a VM whose disk asks for 2 replicas is placed with two distinct replica
//! nodes, its node first; when that node is lost, HA moves the VM with
//! `epoch + 1` onto the other replica node — never onto the third node,
//! which has more room — and keeps the replica nodes; when that node is
//! lost too, the VM stays where it is (one placement, same epoch) and the
//! controller says why; a VM asking for more replicas than there are nodes
//! is never placed, with the reason in the log.

mod fake_agent;

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use basalt_api::{AgentClient, Kind, Object, TokenSecret};
use basalt_testkit::{Prefix, wait};
use fake_agent::{placement, replicated_vm};

const DEADLINE: Duration = Duration::from_secs(60);
/// Short leases so node loss takes seconds.
const CONFIG: &str = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 2000\ncontroller_period_ms = 100\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ha_moves_a_replicated_vm_only_onto_its_other_replica_node() {
    let prefix = Prefix::for_test().expect("prefix");
    let address = format!("127.0.0.1:{}", basalt_testkit::free_port());
    let (member, admin) =
        common::start_control(&prefix, &address, None, DEADLINE, Some(CONFIG)).await;
    let agent = AgentClient::connect_lazy(&address).expect("agent client");

    let secret = TokenSecret::new(common::join_token(&admin, "join", 3).await);
    let mut stops = std::collections::HashMap::new();
    for (name, memory_mib) in [("n1", 4096), ("n2", 4096), ("n3", 4096)] {
        let (stop, _) = fake_agent::join(&agent, &secret, name, memory_mib).await;
        stops.insert(name.to_owned(), stop);
    }

    // More replicas than nodes: never placed, and the log says why.
    admin
        .create(Object::Vm(replicated_vm("greedy", 1 << 30, 4)))
        .await
        .expect("create greedy");
    admin
        .create(Object::Vm(replicated_vm("db", 1 << 30, 2)))
        .await
        .expect("create db");
    wait::until("db is placed", DEADLINE, &[&member], || async {
        placement(&admin, "db").await.is_some()
    })
    .await;
    let first = placement(&admin, "db").await.expect("placed");
    assert_eq!(first.epoch, 1);
    assert_eq!(first.replica_nodes.len(), 2, "{first:?}");
    assert_eq!(first.replica_nodes[0], first.node, "its node comes first");
    assert_ne!(first.replica_nodes[0], first.replica_nodes[1]);
    let other = first.replica_nodes[1].clone();
    let third = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| !first.holds_replica(n))
        .expect("a node without a replica")
        .to_owned();
    wait::until(
        "the controller says why greedy waits",
        DEADLINE,
        &[&member],
        || async {
            member
                .logs()
                .contains("4 replicas asked, 3 node(s) can hold one")
        },
    )
    .await;
    assert!(placement(&admin, "greedy").await.is_none());

    // The primary's node is lost: the VM moves to its other replica node
    // (epoch 2), keeping its replica nodes.
    stops[&first.node].store(true, Ordering::Relaxed);
    wait::until(
        "db moves off its lost node",
        DEADLINE,
        &[&member],
        || async {
            placement(&admin, "db")
                .await
                .is_some_and(|p| p.node != first.node)
        },
    )
    .await;
    let moved = placement(&admin, "db").await.expect("placed");
    assert_eq!(moved.node, other, "onto the other replica, not {third}");
    assert_eq!(moved.epoch, 2);
    assert_eq!(moved.replica_nodes, first.replica_nodes);

    // The other replica's node is lost too: only the third node is ready,
    // and it holds no replica: the VM stays, unplaced elsewhere, with the
    // reason logged; never placed twice nor on the third node.
    stops[&other].store(true, Ordering::Relaxed);
    wait::until(
        "the controller says db has nowhere to go",
        DEADLINE,
        &[&member],
        || async { member.logs().contains("not holding a replica of its disks") },
    )
    .await;
    // Several more HA rounds (ha_after 2 s, rounds every 100 ms).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stuck = placement(&admin, "db").await.expect("still placed");
    assert_eq!(stuck.node, other, "{stuck:?}");
    assert_eq!(stuck.epoch, 2, "no new epoch without a move");
    let placed: BTreeSet<String> = admin
        .list(Kind::Placement)
        .await
        .expect("list")
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Placement(p) => Some(p.vm),
            _ => None,
        })
        .collect();
    assert_eq!(placed, BTreeSet::from(["db".to_owned()]));
}
