//! cloud-init NoCloud seeds end to end: a real control plane, a storage
//! process (`basaltd storage serve`, NBD at 127.0.0.1:10809 inside the
//! node) and an agent driving a private libvirtd, with the test guest
//! booted under TCG. A VM with a cloud-init section gets a seed volume in
//! the node's pool that QEMU opens as a read-only CD-ROM (the domain would
//! not start otherwise); read back over NBD, it is an ISO 9660 image
//! labelled `cidata` whose `meta-data`, `user-data` and `network-config`
//! say what the spec said. Changing the spec makes a new seed and drops
//! the old one; deleting the VM removes its seed. Needs root.
//!
//! The test guest itself does not mount the seed: its initramfs carries
//! only the virtio modules, not the IDE/`sr`/iso9660 ones.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use basalt_agent::storage::seed::seed_volume;
use basalt_api::{
    AdminClient, CloudInit, KernelBoot, Kind, Object, ObjectMeta, StorageClient, Vm, VmPhase,
    VmSpec,
};
use basalt_testkit::guest::GuestImage;
use basalt_testkit::{Fabric, Libvirtd, Node, Prefix, Process, ProcessSpec, wait};

use common::BASALTD;

const DEADLINE: Duration = Duration::from_secs(120);
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEdlJ2DMaM8vSRNI8QO9fsnhdbxgZaBeCtgvmzRo7xYh ops@example";
const USER_DATA: &str =
    "#cloud-config\nruncmd:\n  - [sh, -c, \"echo 'hello <seed>' > /run/hello\"]\n";
const NETWORK_CONFIG: &str = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n";

async fn volume_names(storage: &StorageClient) -> Vec<String> {
    storage
        .list_volumes()
        .await
        .map(|v| v.into_iter().map(|v| v.name).collect())
        .unwrap_or_default()
}

async fn get_vm(admin: &AdminClient, name: &str) -> Option<Vm> {
    match admin.get(Kind::Vm, name).await.ok()? {
        Object::Vm(vm) => Some(vm),
        _ => None,
    }
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("the tool runs");
    assert!(out.status.success(), "{command:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies export `name` of the node's NBD server into `dir/<name>.iso` with
/// qemu-img (a real NBD client, inside the node where QEMU reads it), then
/// extracts the ISO with xorriso; returns the extraction and xorriso's
/// report (which names the volume id).
fn read_seed(node: &Node, name: &str, dir: &Path) -> (std::path::PathBuf, String) {
    let iso = dir.join(format!("{name}.iso"));
    run(node
        .command("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd://127.0.0.1:10809/{name}"))
        .arg(&iso));
    let out = dir.join(name);
    let report = run(Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(&iso)
        .args(["-pvd_info", "-extract", "/"])
        .arg(&out));
    (out, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_gets_its_cloud_init_seed_as_a_cdrom() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let dir = prefix.dir().to_path_buf();
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let node = fabric.add_node("n1").expect("node");
    let libvirtd = Libvirtd::start(&prefix, &node, &fabric.hosts()).expect("libvirtd");
    let image = GuestImage::build().expect("guest image");

    let pool = dir.join("pool.img");
    run(Command::new(BASALTD)
        .args(["storage", "pool", "create", "--size", "256M", "--path"])
        .arg(&pool));
    let socket = dir.join("storage.sock");
    let mut storage_process = Process::start(
        &prefix,
        ProcessSpec::new("storage", BASALTD)
            .args(["storage", "serve", "--listen", "127.0.0.1:10809", "--pool"])
            .arg(&pool)
            .arg("--local-socket")
            .arg(&socket)
            .netns(&node),
    )
    .expect("storage");
    storage_process
        .wait_for_tcp(
            "127.0.0.1:10809".parse().expect("address"),
            Some(&node),
            Duration::from_secs(30),
        )
        .expect("storage listening");
    let storage = StorageClient::connect_unix(&socket).expect("storage client");

    // Everything in the node, as on a real one: the agent writes seeds
    // through the NBD server at 127.0.0.1:10809 of its own namespace.
    let server = format!("{}:7400", node.addr());
    let (control, admin) = common::start_control(&prefix, &server, Some(&node), DEADLINE).await;
    let secret = common::join_token(&admin, "join-n1", 1).await;
    let agent = Process::start(
        &prefix,
        ProcessSpec::new("agent", BASALTD)
            .args(["agent", "--node", "n1", "--address"])
            .arg(format!("{}:7500", node.addr()))
            .args(["--server", &server, "--libvirt-uri", &libvirtd.uri()])
            .args(["--domain-prefix", &format!("{}-", prefix.name())])
            .args(["--resync-ms", "300", "--stop-grace-ms", "1000"])
            .arg("--storage-socket")
            .arg(&socket)
            .arg("--console-dir")
            .arg(prefix.log_dir())
            .env("BASALT_JOIN_TOKEN", &secret)
            .netns(&node),
    )
    .expect("agent");
    let logs = [&control, &agent, &storage_process];
    wait::until("node n1 has joined", DEADLINE, &logs, || async {
        admin.get(Kind::Node, "n1").await.is_ok()
    })
    .await;

    let vm = Vm {
        meta: ObjectMeta::named("web"),
        spec: VmSpec {
            cpus: 1,
            memory_mib: 128,
            running: true,
            kernel: Some(KernelBoot {
                kernel: image.kernel().to_string_lossy().into_owned(),
                initrd: image.initrd().to_string_lossy().into_owned(),
                cmdline: "console=ttyS0".into(),
            }),
            cloud_init: Some(CloudInit {
                user_data: USER_DATA.into(),
                network_config: Some(NETWORK_CONFIG.into()),
                ssh_authorized_keys: vec![KEY.into()],
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
    };
    let Object::Vm(vm) = admin.create(Object::Vm(vm)).await.expect("vm") else {
        panic!("a vm")
    };
    let seed = seed_volume(&vm).expect("a seed name");
    let domain = format!("{}-web", prefix.name());
    let running = tokio::time::timeout(DEADLINE, async {
        loop {
            let vm = get_vm(&admin, "web").await;
            if vm
                .as_ref()
                .is_some_and(|v| v.status.phase == VmPhase::Running)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    assert!(
        running.is_ok(),
        "the VM does not run: {:?}\nagent:\n{}",
        get_vm(&admin, "web").await.map(|v| v.status),
        agent.log_tail(30)
    );

    // The running domain has the seed as a read-only CD-ROM: QEMU opened
    // the export when it started.
    let xml = libvirtd.virsh(&["dumpxml", &domain]).expect("dumpxml");
    let cdrom = xml
        .split("<disk ")
        .find(|d| d.contains("device='cdrom'"))
        .unwrap_or_else(|| panic!("no cdrom in\n{xml}"));
    assert!(cdrom.contains(&format!("name='{seed}'")), "{cdrom}");
    assert!(cdrom.contains("protocol='nbd'"), "{cdrom}");
    assert!(cdrom.contains("<readonly/>"), "{cdrom}");
    assert!(cdrom.contains("dev='hdc'"), "{cdrom}");
    let blocks = libvirtd
        .virsh(&["domblklist", &domain])
        .expect("domblklist");
    assert!(
        blocks
            .lines()
            .any(|l| l.trim_start().starts_with("hdc") && l.contains(&seed)),
        "{blocks}"
    );

    // The seed volume is a read-only snapshot; no staging volume is left.
    let volumes = storage.list_volumes().await.expect("volumes");
    let seed_vol = volumes
        .iter()
        .find(|v| v.name == seed)
        .unwrap_or_else(|| panic!("no {seed} in {volumes:?}"));
    assert!(seed_vol.read_only);
    assert!(
        volumes.iter().all(|v| !v.name.ends_with(".import")),
        "{volumes:?}"
    );

    // Read back over NBD: a `cidata` ISO saying what the spec said.
    let (files, report) = read_seed(&node, &seed, &dir);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("Volume Id") && l.trim_end().ends_with("cidata")),
        "{report}"
    );
    let read =
        |f: &str| std::fs::read_to_string(files.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    let meta: serde_json::Value = serde_json::from_str(&read("meta-data")).expect("meta-data");
    assert_eq!(meta["instance-id"], vm.meta.uid.as_str(), "{meta}");
    assert_eq!(meta["local-hostname"], "web", "{meta}");
    assert_eq!(meta["public-keys"][0], KEY, "{meta}");
    assert_eq!(read("user-data"), USER_DATA);
    assert_eq!(read("network-config"), NETWORK_CONFIG);

    // A changed seed: a new volume, the domain points at it, the old one
    // goes (garbage collection runs every 10 s).
    let mut changed = get_vm(&admin, "web").await.expect("vm");
    let ci = changed.spec.cloud_init.as_mut().expect("cloud-init");
    ci.user_data.clear();
    ci.network_config = None;
    let Object::Vm(changed) = admin.update(Object::Vm(changed)).await.expect("update") else {
        panic!("a vm")
    };
    let new_seed = seed_volume(&changed).expect("a seed name");
    assert_ne!(new_seed, seed);
    wait::until(
        "the domain's definition points at the new seed and the old one is gone",
        DEADLINE,
        &logs,
        || async {
            let names = volume_names(&storage).await;
            let defined = libvirtd
                .virsh(&["dumpxml", "--inactive", &domain])
                .unwrap_or_default();
            names.contains(&new_seed) && !names.contains(&seed) && defined.contains(&new_seed)
        },
    )
    .await;
    let (files, _) = read_seed(&node, &new_seed, &dir);
    let user_data = read_in(&files, "user-data");
    let (header, body) = user_data.split_once('\n').expect("two lines");
    assert_eq!(header, "#cloud-config");
    let config: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert_eq!(config["ssh_authorized_keys"][0], KEY);
    assert!(!files.join("network-config").exists());

    // Deleting the VM removes its domain and its seed.
    admin.delete(Kind::Vm, "web", None).await.expect("delete");
    wait::until(
        "the domain and the seed are gone",
        DEADLINE,
        &logs,
        || async {
            let names = volume_names(&storage).await;
            libvirtd.virsh(&["domstate", &domain]).is_err()
                && !names.iter().any(|n| n.starts_with("seed-"))
        },
    )
    .await;
}

fn read_in(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}
