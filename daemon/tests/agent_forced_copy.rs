//! A copy whose fill was cut serves nothing until an operator accepts it
//! (decision 91), with real storage processes (root, namespaces): a
//! control plane on namespace node `cp`, and on nodes `a`, `b` and `c`
//! `basaltd storage serve --replica-listen` and `basaltd agent --compute
//! sim`.
//!
//! The VM's disk has 2 replicas on `a` (its node, primary) and `b`. `b`
//! is lost and replaced by `c` (decision 43), whose copy `a`'s primary
//! fills slowly (its sync rate is 1 MiB/s over 12 MiB of data); `a` is
//! lost in the middle of the fill. Then:
//! - `c`'s storage process holds its copy incomplete and refuses to make
//!   it a primary without force, saying why;
//! - the control plane reads `c`'s copy as syncing by its own node's word
//!   (and the fence marked it outdated when its fill began) and keeps the
//!   VM on `a`, saying why;
//! - the operator accepts `c`'s copy (the accept-copy label): the VM
//!   moves onto `c` at the next epoch with the forced-copy label, and
//!   `c`'s agent attaches the copy as a primary with force: it is no
//!   longer incomplete, and it replicates towards `a`.

mod common;
mod replica_node;

use std::time::Duration;

use basalt_api::{
    ApiError, AttachVolume, Condition, KernelBoot, Kind, Object, ReplicaPeerState, ReplicaState,
    StorageClient, Vm, VolumeRole,
};
use basalt_testkit::{Fabric, Prefix, Process, wait};

use replica_node::{
    REPLICA_PORT, ReplicaNodes, create_db_on_a_and_b, fill, incomplete, peer_state,
    start_replica_nodes,
};

const DEADLINE: Duration = Duration::from_secs(120);
/// Short leases and a short delay so the replacement takes seconds.
const CONFIG: &str = replica_node::SHORT_LEASES_QUICK_REPLACE;
/// What `a` holds, hence what `c`'s full sync must send.
const DATA_BYTES: usize = 12 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cut_in_its_fill_is_made_primary_only_when_the_operator_accepts_it() {
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
        ..
    } = start_replica_nodes(
        &prefix,
        &[&a, &b, &c],
        &cp,
        CONFIG,
        &["--sync-rate", "1M"],
        DEADLINE,
    )
    .await;
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
    let storage_c = StorageClient::connect_unix(&sockets[2]).expect("storage c client");
    let (a_peer, b_peer) = (
        format!("{}:{REPLICA_PORT}", a.addr()),
        format!("{}:{REPLICA_PORT}", b.addr()),
    );
    {
        let logs: Vec<&Process> = storages.iter().chain(&agents).chain([&control]).collect();
        wait::until("a's primary has b in sync", DEADLINE, &logs, || async {
            peer_state(&storage_a, &volume, Some(&b_peer)).await
                == Some((ReplicaPeerState::Connected, 0))
        })
        .await;
    }
    fill(&a, &volume, DATA_BYTES);

    // b is lost and replaced by c; a's primary starts filling c.
    agents[1].kill9().expect("kill b's agent");
    storages[1].kill9().expect("kill b's storage");
    {
        let logs: Vec<&Process> = [&storages[0], &storages[2], &agents[0], &agents[2], &control]
            .into_iter()
            .collect();
        wait::until(
            "c's copy is being filled (incomplete)",
            DEADLINE,
            &logs,
            || async { incomplete(&storage_c, &volume).await == Some(true) },
        )
        .await;
    }
    // a is lost in the middle of the fill (12 MiB at 1 MiB/s).
    agents[0].kill9().expect("kill a's agent");
    storages[0].kill9().expect("kill a's storage");
    let logs: Vec<&Process> = [&storages[2], &agents[2], &control].into_iter().collect();

    // c's storage process refuses to serve its copy without force.
    let as_primary = |force| AttachVolume {
        name: volume.clone(),
        role: VolumeRole::Primary,
        epoch: 2,
        peers: Vec::new(),
        allow_outdate: true,
        protocol: None,
        force,
    };
    match storage_c.attach_volume(as_primary(false)).await {
        Err(ApiError::FailedPrecondition { reason }) => {
            assert!(reason.contains("incomplete"), "{reason}")
        }
        other => panic!("c's incomplete copy became a primary: {other:?}"),
    }
    assert_eq!(incomplete(&storage_c, &volume).await, Some(true));

    // The control plane hears it from c and keeps the VM off c.
    wait::until(
        "the VM is held off c's unfinished copy, and c's node says syncing",
        DEADLINE,
        &logs,
        || async {
            let Ok(Object::Vm(db)) = admin.get(Kind::Vm, "db").await else {
                return false;
            };
            let held = db.status.conditions.iter().any(|c| {
                c.kind == Condition::READY
                    && !c.status
                    && c.reason == "Unschedulable"
                    && c.message.contains("outdated or unfinished replica")
            });
            let c_says_syncing = admin
                .list(Kind::Volume)
                .await
                .is_ok_and(|l| {
                    l.objects.iter().any(|o| {
                        matches!(o, Object::Volume(v)
                            if v.status.storage_name == volume
                                && v.status.replica("c").is_some_and(|r| r.node_state == Some(ReplicaState::Syncing)))
                    })
                });
            held && c_says_syncing
        },
    )
    .await;
    let held = replica_node::db_placement(&admin).await.expect("placed");
    assert_eq!((held.node.as_str(), held.epoch), ("a", 1), "{held:?}");

    // The operator accepts c's copy as it is.
    let Ok(Object::Vm(mut db)) = admin.get(Kind::Vm, "db").await else {
        panic!("db is gone")
    };
    db.meta
        .labels
        .insert(Vm::ACCEPT_COPY_LABEL.into(), format!("{}/c", held.epoch));
    admin.update(Object::Vm(db)).await.expect("accept c's copy");
    wait::until(
        "c's agent makes its accepted copy a primary",
        DEADLINE,
        &logs,
        || async {
            incomplete(&storage_c, &volume).await == Some(false)
                && peer_state(&storage_c, &volume, Some(&a_peer))
                    .await
                    .is_some()
        },
    )
    .await;
    let moved = replica_node::db_placement(&admin).await.expect("placed");
    assert_eq!((moved.node.as_str(), moved.epoch), ("c", 2), "{moved:?}");
    assert!(moved.forces_copy(), "{moved:?}");
    // The fill had the fence mark c's copy outdated; the move cleared the
    // mark the operator overrode.
    let Ok(Object::Vm(db)) = admin.get(Kind::Vm, "db").await else {
        panic!("db is gone")
    };
    assert!(!db.status.is_outdated_on("c"), "{:?}", db.status);
}
