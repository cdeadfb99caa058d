//! Removing a node that VMs are placed on: the control plane itself
//! refuses it (`FAILED_PRECONDITION` naming the VMs), whoever asks — the
//! typed client or `basalt node remove` — unless the delete is forced
//! (`basalt node remove --force`), which deletes the node and leaves its
//! VMs' placements for the controllers to move. A node without VMs goes
//! with a plain delete.

use std::time::Duration;

use basalt_api::{AdminClient, ApiError, Kind, Node, Object, ObjectMeta, Placement, Vm, VmSpec};
use basalt_testkit::Prefix;

mod common;

use common::{basalt, text};

const DEADLINE: Duration = Duration::from_secs(60);

async fn create_node(admin: &AdminClient, name: &str) {
    let mut node = Node {
        meta: ObjectMeta::named(name),
        ..Node::default()
    };
    node.spec.address = "10.0.0.1:7500".into();
    admin
        .create(Object::Node(node))
        .await
        .expect("create a node");
}

/// A stopped VM (the scheduler leaves it alone) placed on `node` by hand.
async fn place_vm(admin: &AdminClient, vm: &str, node: &str) {
    let spec = VmSpec {
        cpus: 1,
        memory_mib: 64,
        running: false,
        ..VmSpec::default()
    };
    admin
        .create(Object::Vm(Vm {
            meta: ObjectMeta::named(vm),
            spec,
            ..Vm::default()
        }))
        .await
        .expect("create a VM");
    admin
        .create(Object::Placement(Placement {
            meta: ObjectMeta::named(vm),
            vm: vm.into(),
            node: node.into(),
            epoch: 1,
            ..Placement::default()
        }))
        .await
        .expect("place the VM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_vms_is_removed_only_when_forced() {
    let prefix = Prefix::for_test().expect("prefix");
    let server = format!("127.0.0.1:{}", basalt_testkit::free_port());
    let (_control, admin) = common::start_control(&prefix, &server, None, DEADLINE, None).await;
    create_node(&admin, "busy").await;
    create_node(&admin, "idle").await;
    place_vm(&admin, "web", "busy").await;
    place_vm(&admin, "db", "busy").await;

    // The API refuses, naming the VMs.
    match admin.delete(Kind::Node, "busy", None).await {
        Err(ApiError::FailedPrecondition { reason }) => {
            assert!(
                reason.contains("web") && reason.contains("db") && reason.contains("2 VM"),
                "{reason}"
            );
        }
        other => panic!("deleting a node with VMs must be FAILED_PRECONDITION, got {other:?}"),
    }
    admin
        .get(Kind::Node, "busy")
        .await
        .expect("the refused node is still there");

    // So does the CLI, which only asks.
    let refused = basalt(&server, &["node", "remove", "busy"]).await;
    assert!(!refused.status.success(), "{}", text(&refused));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("web") && stderr.contains("--force"),
        "{}",
        text(&refused)
    );
    admin
        .get(Kind::Node, "busy")
        .await
        .expect("the node is still there after the CLI's refusal");

    // A node without VMs goes with a plain delete, even when it holds a
    // copy of a VM's disks (web's second replica node): the CLI says the
    // copy is made again elsewhere.
    let Ok(Object::Placement(mut web)) = admin.get(Kind::Placement, "web").await else {
        panic!("web is not placed")
    };
    web.replica_nodes = vec!["busy".into(), "idle".into()];
    admin
        .update(Object::Placement(web))
        .await
        .expect("give web a copy on idle");
    let removed = basalt(&server, &["node", "remove", "idle"]).await;
    assert!(removed.status.success(), "{}", text(&removed));
    assert!(
        String::from_utf8_lossy(&removed.stdout)
            .contains("its copies of 1 VM(s)' disks and of 0 volume(s) are made again"),
        "{}",
        text(&removed)
    );
    assert!(matches!(
        admin.get(Kind::Node, "idle").await,
        Err(ApiError::NotFound { .. })
    ));

    // Forced: the node goes, its VMs' placements stay for the controllers
    // to move.
    let forced = basalt(&server, &["node", "remove", "busy", "--force"]).await;
    assert!(forced.status.success(), "{}", text(&forced));
    assert!(
        String::from_utf8_lossy(&forced.stdout).contains("2 VM(s) move"),
        "{}",
        text(&forced)
    );
    assert!(matches!(
        admin.get(Kind::Node, "busy").await,
        Err(ApiError::NotFound { .. })
    ));
    match admin.get(Kind::Placement, "web").await {
        Ok(Object::Placement(p)) => assert_eq!(p.node, "busy"),
        other => panic!("the placement stays until the controllers move it: {other:?}"),
    }

    // The typed client's forced delete, on a node placed on again.
    create_node(&admin, "again").await;
    place_vm(&admin, "cache", "again").await;
    admin
        .delete_forced(Kind::Node, "again", None)
        .await
        .expect("a forced delete");
}
