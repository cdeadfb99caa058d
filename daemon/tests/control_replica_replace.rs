//! Replacement replicas in the control plane (decision 43), against one
//! real `basaltd control` process with fake agents (heartbeats through
//! `AgentClient`) and a short `nodes.replica_replace_after_ms`: a VM's
//! disk has 2 replicas on n1 and n2; the replica node that does not run
//! it stops heartbeating; once its lease ran out it is still listed
//! (the delay has not passed), then the placement names n3 in its place
//! — not n4, which has published no replication address — with the same
//! node and epoch, and the lost copy's outdated mark is gone with it.
//! Then n3 is removed from the cluster (decommissioned): its copy goes to
//! n4 at once, without waiting for the delay (decision 51). The VM never
//! moves and is never placed twice. Last, the primary's node is lost
//! while n4's copy is reported filling: the VM is not moved onto it
//! (decision 84) and says why, until the operator accepts n4's copy as
//! it is: then it moves there.

mod common;
mod fake_agent;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_api::{
    AgentClient, ApiError, Condition, Kind, Migration, MigrationPhase, MigrationSpec, Object,
    ObjectMeta, ReplicaMark, ReplicaReport, ReplicaState, TokenSecret, Volume, VolumeReport,
};
use basalt_testkit::{Prefix, wait};
use fake_agent::{placement, publish, ready, replicated_vm};

const DEADLINE: Duration = Duration::from_secs(60);
/// `replica_replace_after_ms`, less the heartbeat interval and some
/// slack: the delay runs from the last acknowledged heartbeat, a little
/// before the test stops them.
const REPLACE_AFTER: Duration = Duration::from_millis(7_500);
/// Short leases so node loss takes seconds; HA would move the VM only
/// if its own node were lost.
const CONFIG: &str = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 2000\ncontroller_period_ms = 100\nreplica_replace_after_ms = 8000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_replica_node_is_replaced_after_the_delay_and_a_removed_one_at_once() {
    let prefix = Prefix::for_test().expect("prefix");
    let address = format!("127.0.0.1:{}", basalt_testkit::free_port());
    let (member, admin) =
        common::start_control(&prefix, &address, None, DEADLINE, Some(CONFIG)).await;
    let agent = AgentClient::connect_lazy(&address).expect("agent client");

    let secret = TokenSecret::new(common::join_token(&admin, "join", 4).await);
    let mut stops: HashMap<String, Arc<AtomicBool>> = HashMap::new();
    let join = |name: &'static str| {
        let (agent, secret) = (agent.clone(), secret.clone());
        async move { fake_agent::join(&agent, &secret, name, 4096).await.0 }
    };

    // Two nodes: the VM's replicas are on both.
    for name in ["n1", "n2"] {
        stops.insert(name.into(), join(name).await);
        publish(&admin, name, &format!("10.0.0.{}:7789", &name[1..])).await;
    }
    admin
        .create(Object::Vm(replicated_vm("db", 1 << 30, 2)))
        .await
        .expect("create db");
    wait::until("db is placed", DEADLINE, &[&member], || async {
        placement(&admin, "db").await.is_some()
    })
    .await;
    let first = placement(&admin, "db").await.expect("placed");
    assert_eq!(first.replica_nodes.len(), 2, "{first:?}");
    let secondary = first.replica_nodes[1].clone();

    // n3 can take a copy; n4 has not said where it takes replicas.
    for name in ["n3", "n4"] {
        stops.insert(name.into(), join(name).await);
    }
    publish(&admin, "n3", "10.0.0.3:7789").await;

    // The secondary's node is lost: still listed until the delay passed.
    stops[&secondary].store(true, Ordering::Relaxed);
    let lost_at = Instant::now();
    wait::until(
        "the secondary's node is marked not ready",
        DEADLINE,
        &[&member],
        || async { !ready(&admin, &secondary).await },
    )
    .await;
    // The primary's agent has the lost copy recorded outdated (decision
    // 44), as its fencer does when the link breaks.
    agent
        .mark_replica(ReplicaMark {
            node: first.node.clone(),
            vm: "db".into(),
            replica_node: secondary.clone(),
            epoch: first.epoch,
            outdated: true,
        })
        .await
        .expect("mark the lost copy outdated");
    let fenced = placement(&admin, "db").await.expect("placed");
    assert!(
        lost_at.elapsed() >= REPLACE_AFTER || fenced.replica_nodes == first.replica_nodes,
        "replaced before the delay: {fenced:?}"
    );
    wait::until(
        "the lost copy is replaced",
        DEADLINE,
        &[&member],
        || async {
            placement(&admin, "db")
                .await
                .is_some_and(|p| !p.holds_replica(&secondary))
        },
    )
    .await;
    assert!(
        lost_at.elapsed() >= REPLACE_AFTER,
        "replaced {:?} after the heartbeats stopped, before the delay",
        lost_at.elapsed()
    );
    let replaced = placement(&admin, "db").await.expect("placed");
    assert_eq!(
        replaced.replica_nodes,
        [first.node.clone(), "n3".to_owned()],
        "n3 in the lost node's slot, not n4 (no address): {replaced:?}"
    );
    assert_eq!(replaced.node, first.node, "the primary stays");
    assert_eq!(replaced.epoch, first.epoch, "no new epoch without a move");
    let Ok(Object::Vm(db)) = admin.get(Kind::Vm, "db").await else {
        panic!("db is gone")
    };
    assert!(
        db.status.outdated_replicas.is_empty(),
        "the replaced node's outdated mark went with it: {:?}",
        db.status.outdated_replicas
    );
    assert!(
        member.logs().contains("replaced lost replica nodes"),
        "the controller says what it did"
    );

    // n3 is removed from the cluster (its object deleted): it is not
    // coming back, so its copy goes to n4 (which has published its
    // address by now) at once, not after the delay.
    publish(&admin, "n4", "10.0.0.4:7789").await;
    stops["n3"].store(true, Ordering::Relaxed);
    admin
        .delete(Kind::Node, "n3", None)
        .await
        .expect("remove n3");
    let removed_at = Instant::now();
    wait::until(
        "the removed node's copy is replaced",
        DEADLINE,
        &[&member],
        || async {
            placement(&admin, "db")
                .await
                .is_some_and(|p| !p.holds_replica("n3"))
        },
    )
    .await;
    assert!(
        removed_at.elapsed() < REPLACE_AFTER,
        "a removed node's copy waited {:?}, as long as a lost node's",
        removed_at.elapsed()
    );
    let again = placement(&admin, "db").await.expect("placed");
    assert_eq!(again.replica_nodes, [first.node.clone(), "n4".to_owned()]);
    assert_eq!(
        (again.node.as_str(), again.epoch),
        (first.node.as_str(), first.epoch)
    );
    let placements = admin.list(Kind::Placement).await.expect("list").objects;
    assert_eq!(placements.len(), 1, "{placements:?}");

    // n4's copy is being filled when the primary's node is lost too: HA
    // must not start the VM on half a disk (decision 84). The primary's
    // agent reported its own copy up to date and n4's syncing.
    let storage_name = volume_of(&admin, "db").await.status.storage_name;
    let syncing = |done: u64| VolumeReport {
        node: first.node.clone(),
        storage_name: storage_name.clone(),
        local: ReplicaReport {
            state: ReplicaState::UpToDate,
            ..ReplicaReport::default()
        },
        peers: vec![ReplicaReport {
            address: "10.0.0.4:7789".into(),
            state: ReplicaState::Syncing,
            sync_done_bytes: done,
            sync_total_bytes: 1 << 30,
            ..ReplicaReport::default()
        }],
        seen_version: 0,
    };
    agent
        .report_volume(syncing(1 << 20))
        .await
        .expect("report the fill");
    let filling = volume_of(&admin, "db").await;
    assert_eq!(
        filling.status.replica("n4").map(|r| r.state),
        Some(ReplicaState::Syncing),
        "{filling:?}"
    );

    // A drain's migration to n4 waits in Pending for the fill; uncordon
    // of the drained node cancels it. One asked without a drain stays.
    let to_n4 = |drained: Option<&str>| {
        let mut meta = ObjectMeta::named("db");
        if let Some(node) = drained {
            meta.labels
                .insert(Migration::DRAIN_LABEL.into(), node.to_owned());
        }
        Migration {
            meta,
            spec: MigrationSpec {
                vm: "db".into(),
                target: Some("n4".into()),
                ..MigrationSpec::default()
            },
            ..Migration::default()
        }
    };
    for drained in [Some(first.node.as_str()), None] {
        admin
            .create(Object::Migration(to_n4(drained)))
            .await
            .expect("ask for a migration to n4");
        wait::until(
            "the migration waits for n4's copy",
            DEADLINE,
            &[&member],
            || async {
                matches!(admin.get(Kind::Migration, "db").await,
                    Ok(Object::Migration(m)) if m.status.phase == MigrationPhase::Pending
                        && m.status.message.contains("waiting for the target's copies"))
            },
        )
        .await;
        let out = common::basalt(&address, &["node", "uncordon", &first.node]).await;
        assert!(out.status.success(), "{}", common::text(&out));
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let left = admin.get(Kind::Migration, "db").await;
        if drained.is_some() {
            assert!(said.contains("1 pending move(s) cancelled"), "{said}");
            assert!(
                matches!(left, Err(ApiError::NotFound { .. })),
                "a drain's pending migration outlived uncordon: {left:?}"
            );
        } else {
            assert!(!said.contains("cancelled"), "{said}");
            let Ok(Object::Migration(m)) = left else {
                panic!("uncordon removed a migration no drain asked for: {left:?}")
            };
            admin
                .delete(Kind::Migration, "db", Some(m.meta.resource_version))
                .await
                .expect("call the operator's migration off");
        }
    }
    stops[&first.node].store(true, Ordering::Relaxed);
    wait::until(
        "db says why it does not move to n4",
        DEADLINE,
        &[&member],
        || async {
            let Ok(Object::Vm(db)) = admin.get(Kind::Vm, "db").await else {
                return false;
            };
            db.status.conditions.iter().any(|c| {
                c.kind == Condition::READY
                    && !c.status
                    && c.reason == "Unschedulable"
                    && c.message.contains("outdated or unfinished replica")
            })
        },
    )
    .await;
    let held = placement(&admin, "db").await.expect("still placed");
    assert_eq!(
        (held.node.as_str(), held.epoch),
        (first.node.as_str(), first.epoch),
        "moved onto a copy still filling: {held:?}"
    );

    // The operator accepts n4's copies as they are (`basalt vm
    // accept-copy db --node n4`): the VM moves there, one epoch later.
    let Ok(Object::Vm(mut db)) = admin.get(Kind::Vm, "db").await else {
        panic!("db is gone")
    };
    db.meta.labels.insert(
        basalt_api::Vm::ACCEPT_COPY_LABEL.into(),
        format!("{}/n4", held.epoch),
    );
    admin
        .update(Object::Vm(db))
        .await
        .expect("accept n4's copy");
    wait::until(
        "db moves onto n4's accepted copy",
        DEADLINE,
        &[&member],
        || async {
            placement(&admin, "db")
                .await
                .is_some_and(|p| p.node == "n4")
        },
    )
    .await;
    let forced = placement(&admin, "db").await.expect("placed");
    assert_eq!(forced.epoch, held.epoch + 1, "{forced:?}");
    // n4's agent is told to attach its copies with force (a copy whose
    // fill did not finish refuses to be a primary otherwise).
    assert!(forced.forces_copy(), "{forced:?}");
}

async fn volume_of(admin: &basalt_api::AdminClient, vm: &str) -> Volume {
    for object in admin
        .list(Kind::Volume)
        .await
        .expect("list volumes")
        .objects
    {
        if let Object::Volume(v) = object
            && v.spec.owner.as_ref().is_some_and(|o| o.vm == vm)
        {
            return v;
        }
    }
    panic!("no volume of {vm}")
}
