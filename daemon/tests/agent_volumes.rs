//! Volumes as the cluster sees them (decision 52), with real storage
//! processes (root, namespaces): a control plane on namespace node `cp`,
//! and on nodes `a` and `b` `basaltd storage serve --replica-listen` and
//! `basaltd agent --compute sim` (the simulated hypervisor never opens the
//! disk; the test writes it over NBD as a guest would).
//!
//! The admin API refuses a volume of a bad size naming `spec.size_bytes`,
//! and one owned by a VM that does not exist. VM `db` gets a 2-replica
//! disk placed on `a` (primary) and `b`: the control plane makes volume
//! `db-root` for it, and the cluster-wide `basalt volume get` (no storage
//! socket) shows both copies `up-to-date`, `a` the primary, epoch 1, the
//! pool name the agents use, Ready; `basalt volume list` shows them too.
//! `basalt volume snapshot` and `clone` make a snapshot and a clone of
//! it in `a`'s pool (the clone holds what the disk held at the snapshot,
//! not a later write), and deleting them drops them from the pool.
//! `basalt volume delete` refuses the VM's disk; a standalone volume is
//! created, listed and deleted. `basalt volume resize` grows the VM's
//! disk, the volume and both copies' pool volumes, and refuses a shrink
//! naming `spec.disks[0].size_bytes`. Then `b`'s storage process is
//! killed with SIGKILL: after a write through `a`, the volume shows `b`'s
//! copy outdated once the storage fence recorded it (Ready false,
//! Degraded). Deleting the VM deletes the volume.

mod common;
mod replica_node;
mod volume_cli;

use std::time::Duration;

use basalt_api::{
    AdminClient, ApiError, KernelBoot, Kind, Object, ObjectMeta, ReplicaState, StorageClient,
    Volume, VolumeOwner, VolumeSpec,
};
use basalt_testkit::wait;

use replica_node::{
    DISK_BYTES, PATTERN_AT, SHORT_LEASES, SimCluster, create_db_on_a_and_b, pattern, read_export,
    write_pattern,
};
use volume_cli::{basalt, cli_volume, states, text};

const DEADLINE: Duration = Duration::from_secs(120);

fn bad_volume(size_bytes: u64, owner: Option<VolumeOwner>) -> Object {
    Object::Volume(Volume {
        meta: ObjectMeta::named("bad"),
        spec: VolumeSpec {
            size_bytes,
            replicas: 1,
            image: None,
            owner,
            source: None,
            ..VolumeSpec::default()
        },
        ..Volume::default()
    })
}

async fn volume_exists(admin: &AdminClient, name: &str) -> bool {
    !matches!(
        admin.get(Kind::Volume, name).await,
        Err(ApiError::NotFound { .. })
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_shows_each_copy_of_a_vm_disk_and_a_lost_one() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut cluster = SimCluster::start(&["a", "b"], SHORT_LEASES, DEADLINE).await;
    let (control, admin, server, members) = cluster.parts();
    let [a, b] = members else {
        unreachable!("two nodes")
    };

    // Bad volumes are refused, naming what is wrong.
    match admin.create(bad_volume(1000, None)).await {
        Err(ApiError::InvalidArgument { field, .. }) => assert_eq!(field, "spec.size_bytes"),
        other => panic!("a 1000-byte volume: {other:?}"),
    }
    let ghost = VolumeOwner {
        vm: "ghost".into(),
        vm_uid: "u-ghost".into(),
        disk: "root".into(),
        attached: false,
    };
    match admin.create(bad_volume(4096, Some(ghost))).await {
        Err(ApiError::FailedPrecondition { reason }) => {
            assert!(reason.contains("spec.owner.vm"), "{reason}");
        }
        other => panic!("a volume of a VM that does not exist: {other:?}"),
    }

    // The VM, placed on a with replicas on a and b by the test.
    let pool_name = create_db_on_a_and_b(
        admin,
        KernelBoot {
            kernel: "/boot/vmlinuz".into(),
            initrd: String::new(),
            cmdline: "console=ttyS0".into(),
        },
    )
    .await;
    let up = vec![
        ("a".to_owned(), ReplicaState::UpToDate),
        ("b".to_owned(), ReplicaState::UpToDate),
    ];
    {
        let logs = [control, &a.agent, &b.agent, &a.storage, &b.storage];
        wait::until(
            "basalt volume get shows both copies up to date",
            DEADLINE,
            &logs,
            || async {
                cli_volume(server, "db-root")
                    .await
                    .is_some_and(|v| states(&v) == up)
            },
        )
        .await;
    }
    let volume = cli_volume(server, "db-root").await.expect("db-root");
    assert_eq!(volume.status.storage_name, pool_name);
    assert_eq!(volume.status.primary_node, "a");
    assert_eq!(volume.status.epoch, 1);
    assert_eq!(volume.spec.size_bytes, DISK_BYTES);
    assert_eq!(volume.spec.replicas, 2);
    let primaries: Vec<&str> = volume
        .status
        .replicas
        .iter()
        .filter(|r| r.primary)
        .map(|r| r.node.as_str())
        .collect();
    assert_eq!(primaries, ["a"]);
    let ready = &volume.status.conditions[0];
    assert!(ready.status, "{ready:?}");
    let listed = basalt(server, &["volume", "list"]).await;
    assert!(listed.status.success(), "{}", text(&listed));
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(
        table.contains("db-root") && table.contains("a* up-to-date, b up-to-date"),
        "{table}"
    );
    let table = basalt(server, &["volume", "get", "db-root"]).await;
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("primary") && table.contains("secondary"),
        "{table}"
    );

    // A VM disk's volume is not deleted on its own.
    let out = basalt(server, &["volume", "delete", "db-root"]).await;
    assert!(!out.status.success(), "deleted alone: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("disk \"root\" of vm \"db\""),
        "{}",
        text(&out)
    );
    // A snapshot and a clone of it, made in a's pool by a's agent: the
    // clone holds what the disk held when the snapshot was taken.
    write_pattern(&a.node, &pool_name, PATTERN_AT, 1);
    let out = basalt(server, &["volume", "snapshot", "db-root", "db-snap"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let made = |name: &'static str| {
        let server = server.to_owned();
        async move {
            cli_volume(&server, name)
                .await
                .filter(|v| v.status.primary_node == "a" && !v.status.storage_name.is_empty())
        }
    };
    wait::until(
        "the snapshot is made on a",
        DEADLINE,
        &[control, &a.agent],
        || {
            let made = made("db-snap");
            async move { made.await.is_some() }
        },
    )
    .await;
    write_pattern(&a.node, &pool_name, PATTERN_AT, 2);
    let out = basalt(server, &["volume", "clone", "db-snap", "db-clone"]).await;
    assert!(out.status.success(), "{}", text(&out));
    wait::until(
        "the clone is made on a",
        DEADLINE,
        &[control, &a.agent],
        || {
            let made = made("db-clone");
            async move { made.await.is_some() }
        },
    )
    .await;
    let snap = made("db-snap").await.expect("db-snap");
    let clone = made("db-clone").await.expect("db-clone");
    let storage = StorageClient::connect_unix(&a.socket).expect("storage a client");
    let pool = storage.list_volumes().await.expect("a's pool");
    let in_pool = |name: &str| pool.iter().find(|v| v.name == name).cloned();
    assert!(
        in_pool(&snap.status.storage_name)
            .expect("the snapshot in a's pool")
            .read_only
    );
    assert!(
        !in_pool(&clone.status.storage_name)
            .expect("the clone in a's pool")
            .read_only
    );
    assert!(
        read_export(
            &a.node,
            &clone.status.storage_name,
            PATTERN_AT,
            pattern(1).len()
        )
        .expect("read the clone")
            == pattern(1),
        "the clone does not hold what the disk held at the snapshot"
    );
    for name in ["db-clone", "db-snap"] {
        let out = basalt(server, &["volume", "delete", name]).await;
        assert!(out.status.success(), "{}", text(&out));
    }
    wait::until(
        "a's agent drops them from its pool",
        DEADLINE,
        &[&a.agent],
        || async {
            storage.list_volumes().await.is_ok_and(|pool| {
                !pool.iter().any(|v| {
                    v.name == snap.status.storage_name || v.name == clone.status.storage_name
                })
            })
        },
    )
    .await;

    // A standalone volume is stored, listed and deleted.
    let out = basalt(
        server,
        &[
            "volume",
            "create",
            "scratch",
            "--size",
            "64M",
            "--replicas",
            "2",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let listed = basalt(server, &["volume", "list", "-o", "yaml"]).await;
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("name: scratch"),
        "{}",
        text(&listed)
    );
    let out = basalt(server, &["volume", "delete", "scratch"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(!volume_exists(admin, "scratch").await);

    // Resize: the VM's disk grows, and the volume with it; never shrinks.
    let grown = DISK_BYTES * 2;
    let out = basalt(server, &["volume", "resize", "db-root", "--size", "32M"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(grown, 32 << 20);
    match admin.get(Kind::Vm, "db").await {
        Ok(Object::Vm(vm)) => assert_eq!(vm.spec.disks[0].size_bytes, grown),
        other => panic!("vm db: {other:?}"),
    }
    wait::until("the volume is 32 MiB", DEADLINE, &[control], || async {
        cli_volume(server, "db-root")
            .await
            .is_some_and(|v| v.spec.size_bytes == grown)
    })
    .await;
    // Both copies grow: the primary's and the secondary's pool volumes.
    for (node, socket) in [("a", &a.socket), ("b", &b.socket)] {
        let storage = StorageClient::connect_unix(socket).expect("storage client");
        wait::until(
            &format!("{node}'s copy is 32 MiB"),
            DEADLINE,
            &[control, &a.agent, &b.agent],
            || async {
                storage.list_volumes().await.is_ok_and(|volumes| {
                    volumes
                        .iter()
                        .any(|v| v.name == pool_name && v.size_bytes == grown)
                })
            },
        )
        .await;
    }
    let out = basalt(server, &["volume", "resize", "db-root", "--size", "8M"]).await;
    assert!(
        !out.status.success(),
        "a shrink went through: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.disks[0].size_bytes"),
        "{}",
        text(&out)
    );

    // b's storage process dies: a's primary loses its peer.
    b.storage.kill9().expect("kill b's storage");
    write_pattern(&a.node, &pool_name, PATTERN_AT, 3);
    {
        let logs = [control, &a.agent, &b.agent, &a.storage];
        wait::until(
            "the volume shows b's copy outdated, fenced",
            DEADLINE,
            &logs,
            || async {
                cli_volume(server, "db-root").await.is_some_and(|v| {
                    v.status.replica("b").is_some_and(|r| {
                        r.state == ReplicaState::Outdated && r.outdated && !r.primary
                    }) && v.status.replica("a").map(|r| r.state) == Some(ReplicaState::UpToDate)
                })
            },
        )
        .await;
    }
    let volume = cli_volume(server, "db-root").await.expect("db-root");
    let ready = &volume.status.conditions[0];
    assert!(!ready.status && ready.reason == "Degraded", "{ready:?}");

    // The volume goes with its VM.
    admin
        .delete(Kind::Vm, "db", None)
        .await
        .expect("delete the vm");
    wait::until(
        "the volume is deleted with its VM",
        DEADLINE,
        &[control],
        || async { !volume_exists(admin, "db-root").await },
    )
    .await;
}
