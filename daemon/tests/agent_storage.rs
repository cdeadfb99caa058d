//! The agent's volume reconciler against real processes, all inside one
//! test node's network namespace as on a real node: `basaltd control`,
//! `basaltd storage serve --local-socket` (NBD at 127.0.0.1:10809, where
//! QEMU looks) and `basaltd agent --compute sim --storage-socket`. A VM's disks become volumes of the
//! node's pool (empty, or clones of an imported image whose bytes the
//! clone shows, read back over NBD), the image's import is reported in its
//! status, a VM that moved here without its volume is refused rather
//! than given a fresh disk, deleting the image leaves the running VM and its data alone,
//! and deleting the VM removes its volumes while an operator's own volume
//! stays.

use basalt_testkit::wait;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_agent::storage::disk_volume;
use basalt_agent::storage::image::image_volume;
use basalt_api::{
    AdminClient, Disk, EnsureVolume, Image, ImageFormat, ImagePhase, ImageSpec, JoinToken,
    KernelBoot, Kind, Object, ObjectMeta, Placement, StorageClient, Vm, VmPhase, VmSpec,
};
use basalt_testkit::nbd_client::NbdClient;
use basalt_testkit::{Fabric, Prefix, Process, ProcessSpec};

const BASALTD: &str = env!("CARGO_BIN_EXE_basaltd");
/// Volume garbage collection runs every 10 s; imports take a moment.
const DEADLINE: Duration = Duration::from_secs(60);
const IMAGE_BYTES: usize = 3 << 20;

/// A raw image: 3 MiB whose every 4 KiB block starts with its number.
fn write_image(path: &Path) {
    let mut bytes = vec![0u8; IMAGE_BYTES];
    for (i, block) in bytes.chunks_mut(4096).enumerate() {
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    std::fs::write(path, bytes).expect("image file");
}

fn vm(name: &str, disks: Vec<Disk>) -> Object {
    Object::Vm(Vm {
        meta: ObjectMeta::named(name),
        spec: VmSpec {
            cpus: 1,
            memory_mib: 128,
            running: true,
            disks,
            // The simulated hypervisor never opens these.
            kernel: Some(KernelBoot {
                kernel: "/boot/vmlinuz".into(),
                initrd: "/boot/initrd.img".into(),
                cmdline: "console=ttyS0".into(),
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
    })
}

fn disk(name: &str, size: u64, image: Option<&str>) -> Disk {
    Disk {
        name: name.into(),
        size_bytes: size,
        image: image.map(Into::into),
        replicas: 1,
        source_volume: None,
        attach: None,
        attached_storage_name: None,
        added_at_epoch: None,
        protocol: Default::default(),
    }
}

async fn volume_names(storage: &StorageClient) -> Vec<String> {
    storage
        .list_volumes()
        .await
        .map(|v| v.into_iter().map(|v| v.name).collect())
        .unwrap_or_default()
}

#[test]
fn the_agent_makes_clones_and_removes_volumes() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root (namespaces and process harness)");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let dir = prefix.dir().to_path_buf();
    let image_file = dir.join("tiny.raw");
    write_image(&image_file);
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let node = fabric.add_node("a").expect("node");

    let pool = dir.join("pool.img");
    let out = Command::new(BASALTD)
        .args(["storage", "pool", "create", "--size", "512M", "--path"])
        .arg(&pool)
        .output()
        .expect("basaltd runs");
    assert!(out.status.success(), "{out:?}");
    let socket = dir.join("storage.sock");
    let nbd = SocketAddr::from((Ipv4Addr::LOCALHOST, 10809));
    let spec = ProcessSpec::new("storage", BASALTD)
        .args(["storage", "serve", "--listen", &nbd.to_string(), "--pool"])
        .arg(&pool)
        .arg("--local-socket")
        .arg(&socket)
        .netns(&node);
    let mut storage_process = Process::start(&prefix, spec).expect("storage");
    storage_process
        .wait_for_tcp(nbd, Some(&node), Duration::from_secs(30))
        .expect("storage listening");

    let server = format!("{}:7400", node.addr());
    let spec = ProcessSpec::new("control-1", BASALTD)
        .args(["control", "--bootstrap", "--node-id", "1"])
        .args(["--listen", &server, "--data-dir"])
        .arg(dir.join("control-1"))
        .netns(&node);
    let _control = Process::start(&prefix, spec).expect("control");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = rt.enter();
    let admin = AdminClient::connect_lazy(&server).expect("admin client");
    let storage = StorageClient::connect_unix(&socket).expect("storage client");
    rt.block_on(async {
        wait::until("the control plane answers", DEADLINE, &[], || async {
            admin.list(Kind::Node).await.is_ok()
        })
        .await;
        // An operator's volume the agent must never touch.
        storage
            .ensure_volume(EnsureVolume {
                name: "operator-scratch".into(),
                size_bytes: 1 << 20,
                source: None,
            })
            .await
            .expect("operator volume");
        let mut token = JoinToken {
            meta: ObjectMeta::named("join-a"),
            ..JoinToken::default()
        };
        token.spec.ttl_seconds = 600;
        token.spec.max_uses = 1;
        let Object::Token(token) = admin.create(Object::Token(token)).await.unwrap() else {
            panic!("a token")
        };
        let secret = token.secret.expect("secret");
        let spec = ProcessSpec::new("agent-a", BASALTD)
            .args([
                "agent",
                "--node",
                "a",
                "--address",
                &format!("{}:7500", node.addr()),
            ])
            .args([
                "--server",
                &server,
                "--compute",
                "sim",
                "--resync-ms",
                "300",
            ])
            .args(["--cpus", "4", "--memory-mib", "4096", "--storage-socket"])
            .arg(&socket)
            .arg("--console-dir")
            .arg(prefix.log_dir())
            .env("BASALT_JOIN_TOKEN", secret.expose())
            .netns(&node);
        let mut agent = Process::start(&prefix, spec).expect("agent");
        // The node registers its pool's size as the scheduler counts it:
        // the volume sizes the pool's over-provisioning allows.
        let pool_limit = storage.status().await.expect("status").virtual_limit;
        assert!(pool_limit > 0);
        wait::until("node a registers", DEADLINE, &[&agent], || async {
            matches!(admin.get(Kind::Node, "a").await, Ok(Object::Node(_)))
        })
        .await;
        let Ok(Object::Node(a)) = admin.get(Kind::Node, "a").await else {
            panic!("node a")
        };
        assert_eq!(
            a.status.capacity.storage_bytes, pool_limit,
            "the node's storage capacity is its pool's: {a:?}"
        );

        // An image, and a VM with an empty disk and one cloned from it
        // (larger than the image: the clone grows).
        let image = Image {
            meta: ObjectMeta::named("tiny"),
            spec: ImageSpec {
                source: image_file.to_string_lossy().into_owned(),
                format: ImageFormat::Raw,
            },
            ..Image::default()
        };
        let Object::Image(image) = admin.create(Object::Image(image)).await.expect("image") else {
            panic!("an image")
        };
        let Object::Vm(web) = admin
            .create(vm(
                "web",
                vec![
                    disk("root", 8 << 20, Some("tiny")),
                    disk("data", 4 << 20, None),
                ],
            ))
            .await
            .expect("create vm")
        else {
            panic!("a vm")
        };
        let root = disk_volume(&web.meta.uid, "root");
        let data = disk_volume(&web.meta.uid, "data");
        let start = Instant::now();
        loop {
            let now = admin.get(Kind::Vm, "web").await;
            if matches!(&now, Ok(Object::Vm(v)) if v.status.phase == VmPhase::Running) {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the VM does not run: {now:?}\nagent:\n{}\nstorage:\n{}",
                agent.log_tail(30),
                storage_process.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let volumes = storage.list_volumes().await.expect("list");
        let find = |name: &str| volumes.iter().find(|v| v.name == name).cloned();
        let root_volume = find(&root).expect("root volume");
        assert_eq!(root_volume.size_bytes, 8 << 20);
        assert_eq!(find(&data).expect("data volume").size_bytes, 4 << 20);
        let snapshot = find(&image_volume(&image.meta.uid)).expect("the image's snapshot");
        assert!(snapshot.read_only);
        assert_eq!(snapshot.size_bytes, IMAGE_BYTES as u64);
        assert!(
            volumes.iter().all(|v| !v.name.ends_with(".import")),
            "no staging volume left: {volumes:?}"
        );

        // The import is reported in the image's status.
        let Object::Image(image) = admin.get(Kind::Image, "tiny").await.unwrap() else {
            panic!("an image")
        };
        let entry = image
            .status
            .nodes
            .iter()
            .find(|n| n.node == "a")
            .expect("a's entry");
        assert_eq!(entry.phase, ImagePhase::Ready, "{image:?}");
        assert_eq!(entry.bytes_done, IMAGE_BYTES as u64);
        assert_eq!(image.status.size_bytes, IMAGE_BYTES as u64);

        // The clone holds the image's bytes (read over NBD, inside the
        // node, where QEMU reads it) and zeros past them.
        let read = node
            .run_in(move || {
                let mut c = NbdClient::connect(nbd, &root).expect("nbd");
                let mut out = Vec::new();
                for block in [0u64, 1, 700, (IMAGE_BYTES / 4096) as u64] {
                    let mut buf = [0u8; 8];
                    c.read(block * 4096, &mut buf).expect("read");
                    out.push(u64::from_le_bytes(buf));
                }
                out
            })
            .expect("run in the node");
        assert_eq!(read, [0, 1, 700, 0]);

        // A VM that ran elsewhere before (placed here with epoch 2, as HA
        // does) whose volume is not in this pool is refused, not started
        // on a fresh disk.
        let mut moved = vm("moved", vec![disk("root", 4 << 20, None)]);
        if let Object::Vm(v) = &mut moved {
            v.spec.running = false;
        }
        let Object::Vm(moved) = admin.create(moved).await.expect("create vm") else {
            panic!("a vm")
        };
        admin
            .create(Object::Placement(Placement {
                meta: ObjectMeta::named("moved"),
                vm: "moved".into(),
                node: "a".into(),
                epoch: 2,
                ..Placement::default()
            }))
            .await
            .expect("place it with epoch 2");
        wait::until("the moved VM is refused", DEADLINE, &[], || async {
            match admin.get(Kind::Vm, "moved").await {
                Ok(Object::Vm(v)) => {
                    v.status.phase == VmPhase::Failed
                        && v.status
                            .conditions
                            .iter()
                            .any(|c| c.message.contains("ran elsewhere"))
                }
                _ => false,
            }
        })
        .await;
        let moved_root = disk_volume(&moved.meta.uid, "root");
        assert!(!volume_names(&storage).await.contains(&moved_root));
        // A disk added now, at epoch 2, is made here: this node is where
        // the VM is when it is added. The missing root stays missing.
        let Object::Vm(mut edited) = admin.get(Kind::Vm, "moved").await.expect("get") else {
            panic!("a vm")
        };
        edited.spec.disks = vec![disk("added", 4 << 20, None)];
        let Object::Vm(edited) = admin.update(Object::Vm(edited)).await.expect("add a disk") else {
            panic!("a vm")
        };
        assert_eq!(edited.spec.disks[0].added_at_epoch, Some(2));
        let added = disk_volume(&moved.meta.uid, "added");
        wait::until("the added disk is made", DEADLINE, &[], || async {
            volume_names(&storage).await.contains(&added)
        })
        .await;
        assert!(!volume_names(&storage).await.contains(&moved_root));
        admin
            .delete(Kind::Vm, "moved", None)
            .await
            .expect("delete the moved vm");

        // Delete the image while the VM runs: its snapshot goes, the VM
        // keeps running on its clone, which keeps the image's bytes.
        admin
            .delete(Kind::Image, "tiny", None)
            .await
            .expect("delete image");
        let snapshot = image_volume(&image.meta.uid);
        wait::until("the image's snapshot is deleted", DEADLINE, &[], || async {
            let names = volume_names(&storage).await;
            !names.is_empty() && !names.contains(&snapshot)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            matches!(admin.get(Kind::Vm, "web").await,
                Ok(Object::Vm(v)) if v.status.phase == VmPhase::Running),
            "the VM still runs without its image"
        );
        let root_again = disk_volume(&web.meta.uid, "root");
        let read = node
            .run_in(move || {
                let mut c = NbdClient::connect(nbd, &root_again).expect("nbd");
                let mut buf = [0u8; 8];
                c.read(700 * 4096, &mut buf).expect("read");
                u64::from_le_bytes(buf)
            })
            .expect("run in the node");
        assert_eq!(read, 700);

        // Delete the VM: its volumes go; the operator's volume stays.
        admin
            .delete(Kind::Vm, "web", None)
            .await
            .expect("delete vm");
        wait::until("the VM's volumes are deleted", DEADLINE, &[], || async {
            volume_names(&storage).await == ["operator-scratch"]
        })
        .await;
        assert!(agent.is_running(), "agent:\n{}", agent.logs());
    });
    // The pool verifies clean once its process has stopped (it holds the
    // pool's lock while it runs).
    storage_process
        .stop(Duration::from_secs(10))
        .expect("stop storage");
    let out = Command::new(BASALTD)
        .args(["storage", "pool", "status", "--json", "--pool"])
        .arg(&pool)
        .output()
        .expect("basaltd runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"verify\":\"ok\""), "{text}");
    assert!(text.contains("\"volumes\":1"), "{text}");
}
