//! Leader loss seen by a client that knows one follower only: three
//! `basaltd control` processes on loopback, the leader killed with
//! `kill -9`, and single calls (no client-side retry) through a surviving
//! follower right after the kill. The follower still believes the dead
//! leader leads; its forward finds no one listening, so it waits for the
//! next leader and forwards there — the calls succeed instead of answering
//! `UNAVAILABLE`, and every acknowledged write is stored.

use std::time::Duration;

use basalt_api::{AdminClient, Kind, Node, Object, ObjectMeta};
use basalt_testkit::{Prefix, wait};

mod control_trio;
use control_trio::members;

const DEADLINE: Duration = Duration::from_secs(60);

fn node(name: &str) -> Object {
    let mut node = Node {
        meta: ObjectMeta::named(name),
        ..Node::default()
    };
    node.spec.address = "10.0.0.1:7500".into();
    Object::Node(node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_answers_writes_and_reads_right_after_the_leader_is_killed() {
    let prefix = Prefix::for_test().expect("prefix");
    let control_trio::Trio {
        addresses,
        mut processes,
    } = control_trio::start(&prefix);
    let clients: Vec<AdminClient> = addresses
        .iter()
        .map(|a| AdminClient::connect_lazy(a).expect("client"))
        .collect();
    wait::until("three voters and a leader", DEADLINE, &[], || async {
        matches!(members(&clients[0]).await, Some((3, Some(_))))
    })
    .await;
    let Some((_, Some(leader))) = members(&clients[0]).await else {
        panic!("no leader marked");
    };
    let victim = usize::try_from(leader - 1).expect("member index");
    let follower = (victim + 1) % 3;
    let client = &clients[follower];
    // The follower has forwarded to the leader before: its connection to
    // the leader is open when the leader dies.
    client
        .create(node("before"))
        .await
        .expect("a write via the follower");

    processes[victim].kill9().expect("kill -9 the leader");
    // Let the kernel's reset of the old connection reach the follower, well
    // inside the election timeout (it still believes the dead leader leads).
    tokio::time::sleep(Duration::from_millis(50)).await;

    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let name = format!("after-{i}");
        let created = client
            .create(node(&name))
            .await
            .unwrap_or_else(|e| panic!("write {i} via the follower right after the kill: {e}"));
        assert!(created.meta().resource_version > 0);
        acknowledged.push(name);
    }
    let read = client
        .get(Kind::Node, "before")
        .await
        .expect("a read via the follower after the kill");
    assert_eq!(read.name(), "before");

    let (_, new_leader) = members(client).await.expect("members via the follower");
    let new_leader = new_leader.expect("a new leader is marked");
    assert_ne!(new_leader, leader, "another member leads");

    let stored: Vec<String> = client
        .list(Kind::Node)
        .await
        .expect("list")
        .objects
        .iter()
        .map(|o| o.name().to_owned())
        .collect();
    for name in &acknowledged {
        assert!(
            stored.contains(name),
            "acknowledged {name} is lost: {stored:?}"
        );
    }
}
