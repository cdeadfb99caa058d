//! VM disks made from volumes (decision 64), with real storage processes
//! (root, namespaces): a control plane on namespace node `cp`, and on
//! nodes `a` and `b` `basaltd storage serve --replica-listen` and
//! `basaltd agent --compute sim`.
//!
//! A standalone volume `golden` gets a pattern (qemu-io over NBD) and a
//! snapshot `golden-snap`, then a second pattern. `basalt vm create web
//! --disk name=root,volume=golden-snap,replicas=2` places the VM on the
//! node holding the snapshot (whichever that is), its disk takes the
//! snapshot's size, its volume there holds the first pattern and not the
//! second (qemu-io read -P), and the disk's other copy, on the other
//! node, gets it by the initial full sync. A write to the VM's disk leaves
//! the snapshot as it was. Disks from a missing volume, smaller than
//! their source, or from an image and a volume at once are refused,
//! naming the field. A VM whose source's node cannot take it waits, and
//! `basalt vm get` says why (its `Ready` condition: `Unschedulable`,
//! naming that node).
//!
//! A standalone volume made from an image (`basalt volume create --image`,
//! two copies): its primary copy is cloned from the image's import on its
//! node, its other copy filled by the full sync, and both equal the image
//! (`qemu-img compare` over NBD, inside each node); a missing image is
//! refused naming `spec.image`.
//!
//! A standalone volume attached as a VM's disk (decision 76): `basalt vm
//! create web --disk name=data,attach=scratch` places the VM on the
//! volume's primary node with its copies' nodes as replica nodes and an
//! epoch past the volume's; the volume becomes the disk's (its owner
//! says attached) and keeps its pool name, its data and both copies in
//! sync; a missing volume, a snapshot, a second VM or a wrong copy count
//! is refused naming the field, and deleting the volume while attached is
//! refused. Deleting the VM releases the volume: standalone again, its
//! copies in sync, and a later write still reaches both. When the VM's
//! node is lost, the VM moves to the volume's other copy at a new epoch,
//! the lost copy marked outdated in the VM's status; the volume follows
//! (still the VM's, primary there), serves what was written and, when the
//! node returns, has its copy resynced and the mark cleared.

mod common;
mod replica_node;
mod volume_cli;

use std::time::Duration;

use basalt_agent::storage::disk_volume;
use basalt_api::{Kind, Object, Placement, ReplicaState, VmPhase, Volume, VolumeOwner};
use basalt_testkit::{Node, Process, wait};

use replica_node::{
    NBD, PATTERN_AT, SHORT_LEASES, SimCluster, every, in_pool, pattern, read_export, write_pattern,
};
use volume_cli::{basalt, cli_volume, create_vm, states, text, two_copies};

const DEADLINE: Duration = Duration::from_secs(90);
/// Where the patterns go, and how long they are.
const AT: &str = "1M";
const LEN: &str = "256k";

/// `qemu-io` on `export` of `node`'s NBD server, from inside the node:
/// whether `command` succeeded, and its output.
fn qemu_io(node: &Node, export: &str, read_only: bool, command: &str) -> (bool, String) {
    let mut cmd = node.command("qemu-io");
    if read_only {
        cmd.arg("-r");
    }
    let out = cmd
        .args(["-f", "raw", &format!("nbd://{NBD}/{export}"), "-c", command])
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io answers a failed pattern check with status 0 and a message.
    let ok = out.status.success() && !text.contains("Pattern verification failed");
    (ok, text)
}

/// Asserts that `export` on `node` holds byte `byte` over the pattern's
/// range.
fn assert_holds(node: &Node, export: &str, byte: u8, what: &str) {
    let (ok, out) = qemu_io(node, export, true, &format!("read -P {byte} {AT} {LEN}"));
    assert!(
        ok,
        "{what}: {export} on {} does not hold {byte}: {out}",
        node.name()
    );
}

/// `qemu-io write -P byte` over the pattern's range of `export` on `node`.
fn fill(node: &Node, export: &str, byte: u8) {
    let (ok, out) = qemu_io(node, export, false, &format!("write -P {byte} {AT} {LEN}"));
    assert!(ok, "writing {byte} to {export}: {out}");
}

/// Whether every copy of `v` (and it has `copies`) is up to date.
fn in_sync(v: &Volume, copies: usize) -> bool {
    v.status.replicas.len() == copies
        && v.status
            .replicas
            .iter()
            .all(|r| r.state == ReplicaState::UpToDate)
}

/// Asserts that `basalt` with `args` fails, saying `says`.
async fn refused(server: &str, args: &[&str], says: &str) {
    let out = basalt(server, args).await;
    assert!(!out.status.success(), "{args:?} accepted: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(says),
        "{args:?} does not say {says:?}: {}",
        text(&out)
    );
}

/// Waits until volume `name` has a pool name and a primary node.
async fn made(server: &str, name: &str, logs: &[&Process]) -> Volume {
    wait::until(
        &format!("volume {name} is made"),
        DEADLINE,
        logs,
        || async {
            cli_volume(server, name).await.is_some_and(|v| {
                !v.status.storage_name.is_empty() && !v.status.primary_node.is_empty()
            })
        },
    )
    .await;
    cli_volume(server, name).await.expect("the volume")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_disk_cloned_from_a_snapshot_holds_its_data_on_the_snapshots_node() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cluster = SimCluster::start(&["a", "b"], SHORT_LEASES, DEADLINE).await;
    let (a, b, server, admin) = (
        &cluster.member("a").node,
        &cluster.member("b").node,
        cluster.server.as_str(),
        &cluster.admin,
    );
    let logs = cluster.logs();
    let control = &cluster.control;

    // The source: a standalone volume with a pattern, and its snapshot.
    let out = basalt(server, &["volume", "create", "golden", "--size", "16M"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let golden = made(server, "golden", &logs).await;
    let p = &cluster.member(&golden.status.primary_node).node;
    fill(p, &golden.status.storage_name, 0x5a);
    let out = basalt(server, &["volume", "snapshot", "golden", "golden-snap"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let snap = made(server, "golden-snap", &logs).await;
    assert_eq!(snap.status.primary_node, golden.status.primary_node);
    // Written after the snapshot: no clone of the snapshot may see it.
    fill(p, &golden.status.storage_name, 0x6b);

    // Refusals name what is wrong.
    for (disk, says) in [
        ("name=root,volume=nope", "spec.disks[0].source_volume"),
        (
            "name=root,volume=golden,size=8M",
            "spec.disks[0].size_bytes",
        ),
        (
            "name=root,volume=golden,image=debian",
            "spec.disks[0].source_volume",
        ),
    ] {
        let out = basalt(server, &["vm", "create", "bad", "--disk", disk]).await;
        assert!(!out.status.success(), "{disk} accepted: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{disk}: {}",
            text(&out)
        );
    }

    // The VM: its disk a 2-copy clone of the snapshot, of its size.
    create_vm(
        server,
        "web",
        "128M",
        "name=root,volume=golden-snap,replicas=2",
    )
    .await;
    let Ok(Object::Vm(web)) = admin.get(Kind::Vm, "web").await else {
        panic!("vm web");
    };
    assert_eq!(web.spec.disks[0].size_bytes, 16 << 20, "the source's size");
    wait::until(
        "the disk's volume has both copies up to date",
        DEADLINE,
        &logs,
        || async {
            cli_volume(server, "web-root").await.is_some_and(|v| {
                v.status.replicas.len() == 2
                    && v.status
                        .replicas
                        .iter()
                        .all(|r| r.state == ReplicaState::UpToDate)
            })
        },
    )
    .await;
    let Ok(Object::Placement(placement)) = admin.get(Kind::Placement, "web").await else {
        panic!("web is placed");
    };
    let Placement { node, .. } = &placement;
    assert_eq!(
        node, &golden.status.primary_node,
        "the VM goes where its disk's source is"
    );
    let disk = disk_volume(&web.meta.uid, "root");
    let volume = cli_volume(server, "web-root").await.expect("web-root");
    assert_eq!(volume.status.storage_name, disk);
    assert_eq!(states(&volume).len(), 2, "copies on both nodes: {volume:?}");
    let s = if p.name() == "a" { b } else { a };
    assert_holds(p, &disk, 0x5a, "the clone");
    assert_holds(s, &disk, 0x5a, "the disk's other copy, after its full sync");

    // The VM's writes stay in its disk.
    fill(p, &disk, 0x7c);
    assert_holds(s, &disk, 0x7c, "the disk's other copy");
    assert_holds(p, &snap.status.storage_name, 0x5a, "the snapshot");
    assert_holds(p, &golden.status.storage_name, 0x6b, "the source volume");

    // A VM its source's node cannot take waits, and the reason says why.
    create_vm(server, "big", "3G", "name=root,volume=golden").await;
    wait::until(
        "the control plane says where big must go and why it cannot",
        DEADLINE,
        &[control],
        || async { control.logs().contains("whose primary copy is on node") },
    )
    .await;
    let logs = control.logs();
    assert!(logs.contains("which cannot take it"), "{logs}");
    // And so does `basalt vm get`, from the VM's status.
    wait::until(
        "basalt vm get says why big waits",
        DEADLINE,
        &[control],
        || async {
            let out = basalt(server, &["vm", "get", "big"]).await;
            let shown = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success()
                && shown.contains("Ready false (Unschedulable): ")
                && shown.contains(&format!(
                    "whose primary copy is on node \"{}\", which cannot take it",
                    p.name()
                ))
        },
    )
    .await;
    assert!(
        admin.get(Kind::Placement, "big").await.is_err(),
        "big was placed"
    );
    // Stopped while it waits: nothing waits any more, and the reason goes.
    let out = basalt(server, &["vm", "stop", "big"]).await;
    assert!(out.status.success(), "{}", text(&out));
    wait::until(
        "basalt vm get no longer says big waits",
        DEADLINE,
        &[control],
        || async {
            let out = basalt(server, &["vm", "get", "big"]).await;
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("Unschedulable")
        },
    )
    .await;
}

/// `qemu-img compare` of image file `image` (format `format`) with
/// `export` of `node`'s NBD server, from inside the node.
fn assert_same_as_image(node: &Node, image: &std::path::Path, format: &str, export: &str) {
    let out = node
        .command("qemu-img")
        .args(["compare", "-f", format, "-F", "raw"])
        .arg(image)
        .arg(format!("nbd://{NBD}/{export}"))
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "{export} on {} differs from the image: {}{}",
        node.name(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_volume_from_an_image_holds_the_image_on_every_copy() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cluster = SimCluster::start(&["a", "b"], SHORT_LEASES, DEADLINE).await;
    let (server, logs) = (cluster.server.as_str(), cluster.logs());

    // A qcow2 image with data at both ends and a hole between.
    let image = cluster.prefix.dir().join("tiny.qcow2");
    let run = |program: &str, args: &[&str]| {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .expect(program);
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
    };
    let path = image.to_str().expect("a path");
    run("qemu-img", &["create", "-q", "-f", "qcow2", path, "16M"]);
    for write in ["write -P 0x3c 0 1M", "write -P 0x9d 15M 512k"] {
        run("qemu-io", &["-f", "qcow2", path, "-c", write]);
    }
    let out = basalt(
        server,
        &[
            "image", "import", "tiny", "--source", path, "--format", "qcow2",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));

    // A missing image is refused, naming the field.
    let out = basalt(
        server,
        &[
            "volume", "create", "nothing", "--size", "16M", "--image", "nope",
        ],
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.image"),
        "{}",
        text(&out)
    );

    let out = basalt(
        server,
        &[
            "volume", "create", "base", "--size", "16M", "--copies", "2", "--image", "tiny",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    wait::until(
        "both copies of the volume from the image are up to date",
        DEADLINE,
        &logs,
        || async {
            cli_volume(server, "base").await.is_some_and(|v| {
                v.status.replicas.len() == 2
                    && v.status
                        .replicas
                        .iter()
                        .all(|r| r.state == ReplicaState::UpToDate)
            })
        },
    )
    .await;
    let base = cli_volume(server, "base").await.expect("base");
    assert_eq!(base.spec.image.as_deref(), Some("tiny"));
    for member in &cluster.members {
        assert_same_as_image(&member.node, &image, "qcow2", &base.status.storage_name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_attached_as_a_disk_is_the_vms_and_is_released_with_its_data() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cluster = SimCluster::start(&["a", "b"], SHORT_LEASES, DEADLINE).await;
    let (server, admin, logs) = (cluster.server.as_str(), &cluster.admin, cluster.logs());

    let scratch = two_copies(server, "scratch", &logs, DEADLINE).await;
    let pool_name = scratch.status.storage_name.clone();
    let p = &cluster.member(&scratch.status.primary_node).node;
    let s = &cluster
        .members
        .iter()
        .find(|m| m.node.name() != p.name())
        .expect("the other node")
        .node;
    fill(p, &pool_name, 0x5a);
    assert_holds(s, &pool_name, 0x5a, "scratch's other copy");
    let out = basalt(server, &["volume", "snapshot", "scratch", "scratch-snap"]).await;
    assert!(out.status.success(), "{}", text(&out));
    made(server, "scratch-snap", &logs).await;

    // Refusals name what is wrong.
    for (disk, says) in [
        (
            "name=data,attach=nope",
            "spec.disks[0].attach: volume \"nope\" does not exist",
        ),
        ("name=data,attach=scratch-snap", "snapshot"),
        (
            "name=data,attach=scratch,replicas=1",
            "spec.disks[0].replicas",
        ),
        (
            "name=data,attach=scratch,image=debian",
            "spec.disks[0].attach",
        ),
    ] {
        refused(server, &["vm", "create", "bad", "--disk", disk], says).await;
    }

    create_vm(server, "web", "128M", "name=data,attach=scratch").await;
    let Ok(Object::Vm(web)) = admin.get(Kind::Vm, "web").await else {
        panic!("vm web");
    };
    let disk = &web.spec.disks[0];
    assert_eq!(
        (
            disk.size_bytes,
            disk.replicas,
            disk.attached_storage_name.as_deref()
        ),
        (16 << 20, 2, Some(pool_name.as_str())),
        "the disk takes the volume's size, copies and pool name"
    );
    // One volume, one VM.
    refused(
        server,
        &[
            "vm",
            "create",
            "other",
            "--disk",
            "name=data,attach=scratch",
        ],
        "is attached as disk \"data\" of vm \"web\"",
    )
    .await;

    wait::until(
        "scratch is web's disk, both copies up to date at the VM's epoch",
        DEADLINE,
        &logs,
        || async {
            let Ok(Object::Placement(placement)) = admin.get(Kind::Placement, "web").await else {
                return false;
            };
            cli_volume(server, "scratch").await.is_some_and(|v| {
                v.spec
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.attached && o.vm == "web")
                    && v.status.epoch == placement.epoch
                    && in_sync(&v, 2)
            })
        },
    )
    .await;
    let Ok(Object::Placement(placement)) = admin.get(Kind::Placement, "web").await else {
        panic!("web is placed");
    };
    let mut replica_nodes = placement.replica_nodes.clone();
    replica_nodes.sort();
    assert_eq!(
        placement.node,
        p.name(),
        "the VM goes where the volume's primary is"
    );
    assert_eq!(
        replica_nodes,
        ["a", "b"],
        "its replica nodes are the volume's copies'"
    );
    assert_eq!(
        placement.epoch,
        scratch.status.epoch + 1,
        "its epoch is past the volume's"
    );
    let attached = cli_volume(server, "scratch").await.expect("scratch");
    assert_eq!(
        attached.status.storage_name, pool_name,
        "the same pool volume"
    );
    assert_eq!(
        attached.spec.owner,
        Some(VolumeOwner {
            vm: "web".into(),
            vm_uid: web.meta.uid.clone(),
            disk: "data".into(),
            attached: true,
        })
    );
    let out = basalt(server, &["volume", "get", "scratch"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("vm web disk data (attached: released when the VM goes)"),
        "{}",
        text(&out)
    );
    refused(server, &["volume", "delete", "scratch"], "attached as disk").await;
    // The VM runs on the volume itself: no disk of the derived name.
    wait::until("web runs", DEADLINE, &logs, || async {
        matches!(
            admin.get(Kind::Vm, "web").await,
            Ok(Object::Vm(vm)) if vm.status.phase == VmPhase::Running
        )
    })
    .await;
    for member in &cluster.members {
        assert_eq!(
            in_pool(&member.socket, &disk_volume(&web.meta.uid, "data")).await,
            Some(false),
            "a volume of the derived name on {}",
            member.node.name()
        );
        assert_eq!(in_pool(&member.socket, &pool_name).await, Some(true));
    }

    // The disk holds the volume's data, and the VM's writes reach the
    // other copy at the VM's epoch.
    assert_holds(p, &pool_name, 0x5a, "the attached disk");
    fill(p, &pool_name, 0x7c);
    assert_holds(s, &pool_name, 0x7c, "the attached disk's other copy");

    // Deleting the VM releases the volume, with its data, still in sync.
    let out = basalt(server, &["vm", "delete", "web"]).await;
    assert!(out.status.success(), "{}", text(&out));
    wait::until(
        "scratch is standalone again, both copies up to date",
        DEADLINE,
        &logs,
        || async {
            cli_volume(server, "scratch")
                .await
                .is_some_and(|v| v.spec.owner.is_none() && in_sync(&v, 2))
        },
    )
    .await;
    let released = cli_volume(server, "scratch").await.expect("scratch");
    assert_eq!(released.status.storage_name, pool_name);
    let p = &cluster.member(&released.status.primary_node).node;
    let s = &cluster
        .members
        .iter()
        .find(|m| m.node.name() != p.name())
        .expect("the other node")
        .node;
    assert_holds(p, &pool_name, 0x7c, "the released volume");
    assert_holds(s, &pool_name, 0x7c, "the released volume's other copy");
    // Replication goes on as a standalone volume's.
    wait::until(
        "a write to the released volume reaches its other copy",
        DEADLINE,
        &logs,
        || async {
            fill(p, &pool_name, 0x11);
            qemu_io(s, &pool_name, true, &format!("read -P 17 {AT} {LEN}")).0
        },
    )
    .await;
    let out = basalt(server, &["volume", "delete", "scratch-snap"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let out = basalt(server, &["volume", "delete", "scratch"]).await;
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_an_attached_volume_moves_to_its_other_copy_when_its_node_is_lost() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut cluster = SimCluster::start(&["a", "b"], SHORT_LEASES, DEADLINE).await;
    let (control, admin, server, members) = cluster.parts();
    let scratch = two_copies(server, "scratch", &every(control, members), DEADLINE).await;
    let pool_name = scratch.status.storage_name.clone();
    let (p, s) = if scratch.status.primary_node == "a" {
        (0, 1)
    } else {
        (1, 0)
    };
    let (lost, other) = (
        members[p].node.name().to_owned(),
        members[s].node.name().to_owned(),
    );
    write_pattern(&members[p].node, &pool_name, PATTERN_AT, 3);

    create_vm(server, "web", "128M", "name=data,attach=scratch").await;
    let running_on = |node: String| async move {
        let placed = matches!(
            admin.get(Kind::Placement, "web").await,
            Ok(Object::Placement(p)) if p.node == node
        );
        placed
            && matches!(
                admin.get(Kind::Vm, "web").await,
                Ok(Object::Vm(vm)) if vm.status.phase == VmPhase::Running && vm.status.node.as_deref() == Some(node.as_str())
            )
    };
    wait::until(
        "web runs on the volume's primary, the volume its disk",
        DEADLINE,
        &every(control, members),
        || async {
            running_on(lost.clone()).await
                && cli_volume(server, "scratch")
                    .await
                    .is_some_and(|v| v.spec.owner.is_some() && in_sync(&v, 2))
        },
    )
    .await;
    let Ok(Object::Placement(first)) = admin.get(Kind::Placement, "web").await else {
        panic!("web is placed");
    };

    // The VM's node is lost.
    members[p].agent.kill9().expect("kill the agent");
    members[p]
        .storage
        .kill9()
        .expect("kill the storage process");
    wait::until(
        "web runs on the other copy's node at a new epoch",
        DEADLINE,
        &[control, &members[s].agent, &members[s].storage],
        || async {
            running_on(other.clone()).await
                && matches!(
                    admin.get(Kind::Placement, "web").await,
                    Ok(Object::Placement(p)) if p.epoch == first.epoch + 1
                )
        },
    )
    .await;
    wait::until(
        "the volume follows: still web's, primary on the other node",
        DEADLINE,
        &[control, &members[s].agent, &members[s].storage],
        || async {
            cli_volume(server, "scratch").await.is_some_and(|v| {
                v.spec
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.vm == "web" && o.attached)
                    && v.status.primary_node == other
                    && v.status.epoch == first.epoch + 1
            })
        },
    )
    .await;
    let node_s = &members[s].node;
    wait::until(
        "the other copy serves what was written before the loss",
        DEADLINE,
        &[control, &members[s].agent, &members[s].storage],
        || async {
            read_export(node_s, &pool_name, PATTERN_AT, pattern(3).len())
                .is_ok_and(|got| got == pattern(3))
        },
    )
    .await;
    // A write without the lost peer goes on once the fence recorded that
    // copy outdated, through the VM as for any VM disk.
    write_pattern(node_s, &pool_name, PATTERN_AT, 4);
    let Ok(Object::Vm(web)) = admin.get(Kind::Vm, "web").await else {
        panic!("vm web");
    };
    assert!(
        web.status.is_outdated_on(&lost),
        "the lost copy is fenced through the VM: {:?}",
        web.status
    );
    wait::until(
        "the volume mirrors the mark",
        DEADLINE,
        &[control, &members[s].agent, &members[s].storage],
        || async {
            cli_volume(server, "scratch")
                .await
                .is_some_and(|v| v.status.replica(&lost).is_some_and(|r| r.outdated))
        },
    )
    .await;

    // The node returns: its copy is resynced and the mark cleared.
    members[p].storage.restart().expect("restart its storage");
    members[p].agent.restart().expect("restart its agent");
    wait::until(
        "the returned copy is back in sync, its mark cleared",
        DEADLINE,
        &every(control, members),
        || async {
            let cleared = matches!(
                admin.get(Kind::Vm, "web").await,
                Ok(Object::Vm(vm)) if vm.status.outdated_replicas.is_empty()
            );
            cleared
                && cli_volume(server, "scratch").await.is_some_and(|v| {
                    in_sync(&v, 2) && v.status.replicas.iter().all(|r| !r.outdated)
                })
        },
    )
    .await;
    assert_eq!(
        read_export(&members[p].node, &pool_name, PATTERN_AT, pattern(4).len()).expect("read"),
        pattern(4),
        "the returned copy holds the write made while it was away"
    );
}
