//! A VM on a 2-replica disk moves live and survives the loss of its node
//! (root, libvirt, TCG): a control plane on namespace node `cp`, and on
//! nodes `a` and `b` a private libvirtd, `basaltd storage serve
//! --replica-listen` and `basaltd agent` (libvirt compute, storage socket).
//!
//! The VM's disk asks for 2 replicas and its placement names `a` and `b`:
//! `a`'s agent makes the volume and attaches it primary, `b`'s makes an
//! empty secondary that the primary fills (an NBD write to it is refused).
//! A pattern written through `a`'s NBD export, and the test guest's boot
//! counter (the guest writes it on `/dev/vda` at every boot), are read
//! back from `b`'s export. A live migration to `b` makes `b` the primary
//! at epoch 2 and `a` the secondary, without a reboot. Then `b`'s agent,
//! libvirtd and storage process are killed with SIGKILL and its link is
//! cut: HA moves the VM back to `a` with epoch 3, the guest boots there
//! from its replica (boot 2: it read boot 1 from the disk) and the
//! pattern is intact. Finally the fence: `a`'s pool refuses a primary
//! with the old epoch, and `b`'s storage process, brought back as the old
//! primary (epoch 2), gets no write acknowledged by `a`.

mod common;
mod replica_node;

use std::process::Command;
use std::time::Duration;

use basalt_api::{
    AdminClient, ApiError, AttachVolume, KernelBoot, Kind, Migration, MigrationPhase,
    MigrationSpec, Object, ObjectMeta, ReplicaPeerState, StorageClient, VmPhase, VolumeRole,
    WatchEvent,
};
use basalt_testkit::guest::GuestImage;
use basalt_testkit::nbd_client::NbdClient;
use basalt_testkit::{Fabric, Libvirtd, Node, Prefix, Process, wait};
use futures::StreamExt as _;

use replica_node::{
    NBD, PATTERN_AT, REPLICA_PORT, agent_spec, create_db_on_a_and_b, pattern, peer_state,
    read_export, refuses_writes, start_storage, wait_joined, write_pattern,
};

/// A TCG guest on a loaded machine boots slowly: generous, not tight.
const DEADLINE: Duration = Duration::from_secs(180);
const CONTROL_PORT: u16 = 7400;
/// Short leases so the node's loss takes seconds.
const CONFIG: &str = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 3000\ncontroller_period_ms = 200\n";

/// The boot counter the guest keeps in block 0 of its disk.
fn boots(block0: &[u8]) -> u64 {
    let digits: String = block0
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|b| char::from(*b))
        .collect();
    digits.parse().unwrap_or(0)
}

async fn vm_on(admin: &AdminClient, node: &str) -> bool {
    matches!(admin.get(Kind::Vm, "db").await,
        Ok(Object::Vm(vm)) if vm.status.phase == VmPhase::Running
            && vm.status.node.as_deref() == Some(node))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_a_two_replica_disk_comes_back_on_the_other_replica_with_its_data() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let a = fabric.add_node("a").expect("node a");
    let b = fabric.add_node("b").expect("node b");
    let cp = fabric.add_node("cp").expect("node cp");
    let hosts = fabric.hosts();
    let (la, mut lb) = std::thread::scope(|s| {
        let la = s.spawn(|| Libvirtd::start(&prefix, &a, &hosts).expect("libvirtd a"));
        let lb = s.spawn(|| Libvirtd::start(&prefix, &b, &hosts).expect("libvirtd b"));
        (la.join().expect("a"), lb.join().expect("b"))
    });
    let image = GuestImage::build().expect("guest image");

    // Storage on a and b, the control plane on cp with short leases.
    let (storage_a, sock_a) = start_storage(&prefix, &a);
    let (mut storage_b, sock_b) = start_storage(&prefix, &b);
    let server = format!("{}:{CONTROL_PORT}", cp.addr());
    let (control, admin) =
        common::start_control(&prefix, &server, Some(&cp), DEADLINE, Some(CONFIG)).await;
    let secret = common::join_token(&admin, "join", 2).await;
    let domain_prefix = format!("{}-", prefix.name());
    let agent = |node: &Node, libvirtd: &Libvirtd, socket: &std::path::Path| {
        let console = prefix.log_dir().join(format!("console-{}", node.name()));
        let spec = agent_spec(node, &server, &secret, socket)
            .args(["--libvirt-uri", &libvirtd.uri()])
            .args(["--domain-prefix", &domain_prefix])
            .args(["--stop-grace-ms", "1000"])
            .arg("--console-dir")
            .arg(console);
        Process::start(&prefix, spec).expect("agent")
    };
    let agent_a = agent(&a, &la, &sock_a);
    let mut agent_b = agent(&b, &lb, &sock_b);
    let console_a = prefix.log_dir().join("console-a").join("db.log");
    wait_joined(
        &admin,
        2,
        DEADLINE,
        &[&control, &agent_a, &agent_b, &storage_a, &storage_b],
    )
    .await;

    // The VM, stopped, placed on a with replicas on a and b.
    let volume = create_db_on_a_and_b(
        &admin,
        KernelBoot {
            kernel: image.kernel().to_string_lossy().into_owned(),
            initrd: image.initrd().to_string_lossy().into_owned(),
            cmdline: "console=ttyS0".into(),
        },
    )
    .await;
    let storage_client_a = StorageClient::connect_unix(&sock_a).expect("storage a client");
    let storage_client_b = StorageClient::connect_unix(&sock_b).expect("storage b client");
    {
        let logs = [&control, &agent_a, &agent_b, &storage_a, &storage_b];
        wait::until(
            "a's primary replicates to b's secondary, in sync",
            DEADLINE,
            &logs,
            || async {
                peer_state(&storage_client_a, &volume, None).await
                    == Some((ReplicaPeerState::Connected, 0))
            },
        )
        .await;
    }
    // b's copy refuses writers: it is a secondary.
    assert!(
        refuses_writes(&b, &volume),
        "b's secondary took an NBD write"
    );

    // A pattern written through the primary's export is on b.
    write_pattern(&a, &volume, PATTERN_AT, 0);
    let expected = pattern(0);
    let on_b = read_export(&b, &volume, PATTERN_AT, expected.len()).expect("read b");
    assert!(on_b == expected, "b's replica does not hold the pattern");

    // Run the VM: the guest counts its first boot on the disk (a
    // synchronous write, so on b too once acknowledged).
    loop {
        let Ok(Object::Vm(mut current)) = admin.get(Kind::Vm, "db").await else {
            panic!("the vm is gone")
        };
        current.spec.running = true;
        match admin.update(Object::Vm(current)).await {
            Ok(_) => break,
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => panic!("run the vm: {err}"),
        }
    }
    {
        let logs = [&control, &agent_a, &agent_b, &storage_a, &storage_b];
        wait::until("the guest boots on a (boot 1)", DEADLINE, &logs, || async {
            std::fs::read_to_string(&console_a).is_ok_and(|t| t.contains("basalt-guest: boot 1"))
        })
        .await;
        wait::until("b's replica holds boot 1", DEADLINE, &logs, || async {
            read_export(&b, &volume, 0, 512).is_ok_and(|block| boots(&block) == 1)
        })
        .await;
        wait::until("a reports the VM running", DEADLINE, &logs, || async {
            vm_on(&admin, "a").await
        })
        .await;
    }

    // Live migration to b: b's copy is a second primary while the guest
    // moves; after the switchover b is the primary at epoch 2 and a holds
    // the secondary. The guest does not reboot.
    // Followed from before the request, so b's storage is looked at the
    // moment the migration says `TargetReady`.
    let listed = admin.list(Kind::Migration).await.expect("list migrations");
    let mut migrations = admin
        .watch(Some(Kind::Migration), listed.resource_version)
        .await
        .expect("watch migrations");
    let replication_a = storage_client_a
        .status()
        .await
        .expect("a's storage status")
        .replication_address;
    let request = Migration {
        meta: ObjectMeta::named("db"),
        spec: MigrationSpec {
            vm: "db".into(),
            target: Some("b".into()),
            ..MigrationSpec::default()
        },
        ..Migration::default()
    };
    admin
        .create(Object::Migration(request))
        .await
        .expect("migrate db to b");
    // The target prepared its storage before it said ready: by
    // `TargetReady` b's copy is already a primary replicating to a (dual
    // primary; a secondary has no peers), not a secondary waiting for the
    // replicas' loop to promote it.
    let ready = tokio::time::timeout(DEADLINE, async {
        while let Some(event) = migrations.next().await {
            let (WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. }) =
                event.expect("migration watch")
            else {
                continue;
            };
            let Object::Migration(m) = object else {
                continue;
            };
            match m.status.phase {
                MigrationPhase::Pending | MigrationPhase::Preparing => continue,
                MigrationPhase::Failed => panic!("the migration failed: {m:?}"),
                phase => {
                    let peers: Vec<String> = storage_client_b
                        .status()
                        .await
                        .expect("b's storage status")
                        .replicas
                        .into_iter()
                        .filter(|r| r.volume == volume)
                        .map(|r| r.peer)
                        .collect();
                    return (phase, m.status.epoch, peers);
                }
            }
        }
        panic!("the migration watch ended")
    })
    .await
    .expect("the migration reached TargetReady");
    assert_eq!(
        ready.2,
        [replication_a],
        "at {:?} b's copy is not a primary naming a",
        ready.0
    );
    assert_eq!(ready.1, 1, "the migration's epoch is the placement's");
    {
        let logs = [&control, &agent_a, &agent_b, &storage_a, &storage_b];
        wait::until("the migration ends", DEADLINE, &logs, || async {
            matches!(admin.get(Kind::Migration, "db").await,
            Ok(Object::Migration(m)) if matches!(
                m.status.phase,
                MigrationPhase::Succeeded | MigrationPhase::Failed
            ))
        })
        .await;
        let Ok(Object::Migration(m)) = admin.get(Kind::Migration, "db").await else {
            panic!("the migration is kept")
        };
        assert_eq!(m.status.phase, MigrationPhase::Succeeded, "{m:?}");
        let Ok(Object::Placement(moved)) = admin.get(Kind::Placement, "db").await else {
            panic!("placed")
        };
        assert_eq!((moved.node.as_str(), moved.epoch), ("b", 2));
        assert_eq!(moved.replica_nodes, ["a", "b"]);
        wait::until("the VM runs on b", DEADLINE, &logs, || async {
            vm_on(&admin, "b").await
        })
        .await;
        // b's primary ships to a's copy (the link of the dual-primary
        // phase carries on with epoch 2 frames).
        wait::until(
            "b's primary replicates to a's copy, in sync",
            DEADLINE,
            &logs,
            || async {
                peer_state(&storage_client_b, &volume, None).await
                    == Some((ReplicaPeerState::Connected, 0))
            },
        )
        .await;
        // A new stream fully syncs a's copy, marked outdated meanwhile
        // (decision 44); b's agent clears the mark a moment after its
        // storage says the copy is in sync. Lost before that, b would
        // leave the VM no up-to-date copy to come back on.
        wait::until(
            "a's copy is not marked outdated",
            DEADLINE,
            &logs,
            || async {
                matches!(
                    admin.get(Kind::Vm, "db").await,
                    Ok(Object::Vm(v)) if v.status.outdated_replicas.is_empty()
                )
            },
        )
        .await;
    }
    let block0 = read_export(&b, &volume, 0, 512).expect("read b");
    assert_eq!(
        boots(&block0),
        1,
        "the guest rebooted during the live migration"
    );

    // Node b is lost: its agent, libvirtd and storage process die with
    // SIGKILL (its QEMU lives on, cut off from its disk) and its link to
    // the other nodes goes down.
    agent_b.kill9().expect("kill -9 b's agent");
    lb.process_mut()
        .expect("libvirtd b runs")
        .kill9()
        .expect("kill -9 b's libvirtd");
    storage_b.kill9().expect("kill -9 b's storage");
    let cut = Command::new("ip")
        .args(["link", "set", b.veth(), "down"])
        .status()
        .expect("ip");
    assert!(cut.success(), "cut b's link");

    // HA: the VM moves back to a (the other replica) with epoch 3, and the
    // guest boots there from its replica: boot 2 (it read boot 1).
    {
        let logs = [&control, &agent_a, &storage_a];
        wait::until("the placement moves to a", DEADLINE, &logs, || async {
            matches!(admin.get(Kind::Placement, "db").await,
                Ok(Object::Placement(p)) if p.node == "a")
        })
        .await;
        let Ok(Object::Placement(moved)) = admin.get(Kind::Placement, "db").await else {
            panic!("placed")
        };
        assert_eq!(moved.epoch, 3);
        assert_eq!(moved.replica_nodes, ["a", "b"]);
        wait::until("the VM runs on a", DEADLINE, &logs, || async {
            vm_on(&admin, "a").await
        })
        .await;
        wait::until("the guest boots on a (boot 2)", DEADLINE, &logs, || async {
            read_export(&a, &volume, 0, 512).is_ok_and(|block| boots(&block) == 2)
        })
        .await;
    }
    // The guest writes its boot counter before it prints it: wait for the
    // console line rather than expect it the moment the disk says boot 2.
    wait::until("the console says boot 2", DEADLINE, &[], || async {
        std::fs::read_to_string(&console_a).is_ok_and(|t| t.contains("basalt-guest: boot 2"))
    })
    .await;
    let on_a = read_export(&a, &volume, PATTERN_AT, expected.len()).expect("read a");
    assert!(on_a == expected, "the pattern did not survive the moves");

    // The fence. a's pool refuses a primary with the old epoch.
    match storage_client_a
        .attach_volume(AttachVolume {
            name: volume.clone(),
            role: VolumeRole::Primary,
            epoch: 2,
            peers: Vec::new(),
            allow_outdate: true,
            protocol: None,
            force: false,
        })
        .await
    {
        Err(ApiError::FailedPrecondition { .. }) => {}
        other => panic!("a accepted the old epoch: {other:?}"),
    }
    // b's storage process comes back (its link too) as the old primary,
    // epoch 2, replicating to a: a refuses its frames, so b acknowledges
    // no write, and a's data does not change.
    let up = Command::new("ip")
        .args(["link", "set", b.veth(), "up"])
        .status()
        .expect("ip");
    assert!(up.success(), "restore b's link");
    storage_b.restart().expect("restart b's storage");
    storage_b
        .wait_for_tcp(NBD, Some(&b), Duration::from_secs(30))
        .expect("storage b listening again");
    let a_address = format!("{}:{REPLICA_PORT}", a.addr());
    let old_primary = storage_client_b
        .attach_volume(AttachVolume {
            name: volume.clone(),
            role: VolumeRole::Primary,
            epoch: 2,
            peers: vec![a_address],
            allow_outdate: false,
            protocol: None,
            force: false,
        })
        .await;
    match old_primary {
        Ok(_) => {}
        // a's primary reached b's pool first and showed it epoch 3: the
        // old primary is refused outright.
        Err(ApiError::FailedPrecondition { .. }) => {
            let block0 = read_export(&a, &volume, 0, 512).expect("read a");
            assert_eq!(boots(&block0), 2);
            return;
        }
        Err(err) => panic!("attaching b's old primary: {err}"),
    }
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (b, volume) = (b.clone(), volume.clone());
        std::thread::spawn(move || {
            let acked = b
                .run_in(move || {
                    let mut client = NbdClient::connect(NBD, &volume)?;
                    client.write(0, &[b'9'; 512])?;
                    client.flush()
                })
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            let _ = tx.send(acked.is_ok());
        });
    }
    let acked = rx.recv_timeout(Duration::from_secs(10)).unwrap_or(false);
    assert!(!acked, "the old primary got a write acknowledged");
    {
        let logs = [&storage_a, &storage_b];
        wait::until(
            "b's old primary knows it is deposed",
            DEADLINE,
            &logs,
            || async {
                matches!(
                    peer_state(&storage_client_b, &volume, None).await,
                    Some((ReplicaPeerState::Deposed, _))
                )
            },
        )
        .await;
    }
    let block0 = read_export(&a, &volume, 0, 512).expect("read a");
    assert_eq!(boots(&block0), 2, "a's data changed under the old primary");
    assert!(vm_on(&admin, "a").await, "the VM still runs on a");
}
