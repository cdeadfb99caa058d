//! What a guest boots with, end to end: its cloud-init seed and its first
//! disk. A real control plane, a storage process (`basaltd storage
//! serve`, NBD at 127.0.0.1:10809 inside the node) and an agent driving a
//! private libvirtd, with the test guest booted under TCG.
//!
//! Seed: a VM with a cloud-init section gets a seed volume in
//! the node's pool that QEMU opens as a read-only CD-ROM (the domain would
//! not start otherwise); read back over NBD, it is an ISO 9660 image
//! labelled `cidata` whose `meta-data`, `user-data` and `network-config`
//! say what the spec said. Changing the spec makes a new seed and drops
//! the old one; deleting the VM removes its seed. Needs root.
//!
//! The test guest itself does not mount the seed: its initramfs carries
//! only the virtio modules, not the IDE/`sr`/iso9660 ones.
//!
//! Disk boot: a VM without a kernel, whose disk is a clone of an image
//! holding GRUB (BIOS, MBR + core image before the first partition, made
//! with `grub-mkimage`, `sfdisk`, `mkfs.vfat` and mtools on plain files,
//! no loop device) and the test guest's kernel and initramfs on a FAT
//! partition, boots from that disk (`<boot dev='hd'/>`, no `<kernel>`)
//! and answers on its address.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use basalt_agent::storage::seed::seed_volume;
use basalt_agent::vm_domain::{tap_name, vm_uuid};
use basalt_api::{
    AdminClient, CloudInit, Disk, Image, ImageFormat, ImageSpec, KernelBoot, Kind, Network,
    NetworkSpec, Nic, Object, ObjectMeta, StorageClient, Vm, VmPhase, VmSpec,
};
use basalt_testkit::guest::{GuestClient, GuestImage, static_ip_cmdline, wire_tap};
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

/// A 32 MiB raw disk that boots `kernel` and `initrd` with `cmdline`
/// through GRUB (BIOS): `boot.img` in the MBR, the core image in the gap
/// before the first partition, a FAT partition with the kernel, the
/// initramfs and `grub.cfg`. Plain files only: no loop device, no mount.
fn bootable_disk(dir: &Path, kernel: &Path, initrd: &Path, cmdline: &str) -> std::path::PathBuf {
    let work = dir.join("boot-disk");
    std::fs::create_dir_all(&work).expect("work dir");
    let early = work.join("early.cfg");
    std::fs::write(
        &early,
        "set root=(hd0,msdos1)\nset prefix=(hd0,msdos1)/boot/grub\n",
    )
    .expect("early.cfg");
    let core = work.join("core.img");
    run(Command::new("grub-mkimage")
        .args(["-O", "i386-pc", "-p", "(hd0,msdos1)/boot/grub", "-o"])
        .arg(&core)
        .arg("-c")
        .arg(&early)
        .args(["biosdisk", "part_msdos", "fat", "normal", "linux", "boot"])
        .args(["serial", "terminal"]));
    let fat = work.join("fat.img");
    run(Command::new("mkfs.vfat")
        .arg("-C")
        .arg(&fat)
        .arg((31 * 1024).to_string()));
    let grub_cfg = work.join("grub.cfg");
    std::fs::write(
        &grub_cfg,
        format!(
            "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n\
             linux /vmlinuz {cmdline}\ninitrd /initrd\nboot\n"
        ),
    )
    .expect("grub.cfg");
    let fat_arg = fat.to_string_lossy().into_owned();
    run(Command::new("mmd").args(["-i", &fat_arg, "::/boot", "::/boot/grub"]));
    for (from, to) in [
        (kernel, "::/vmlinuz"),
        (initrd, "::/initrd"),
        (grub_cfg.as_path(), "::/boot/grub/grub.cfg"),
    ] {
        run(Command::new("mcopy")
            .args(["-i", &fat_arg])
            .arg(from)
            .arg(to));
    }
    let disk = work.join("disk.img");
    let mut bytes = vec![0u8; 32 << 20];
    let boot = std::fs::read("/usr/lib/grub/i386-pc/boot.img").expect("GRUB's boot.img");
    let core = std::fs::read(&core).expect("core.img");
    let fat = std::fs::read(&fat).expect("fat.img");
    assert!(
        core.len() < (1 << 20) - 512,
        "the core image fits before 1 MiB"
    );
    // boot.img's code only: the partition table goes after it (sfdisk).
    bytes[..440].copy_from_slice(&boot[..440]);
    bytes[512..512 + core.len()].copy_from_slice(&core);
    bytes[1 << 20..(1 << 20) + fat.len()].copy_from_slice(&fat);
    std::fs::write(&disk, bytes).expect("disk.img");
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"start=2048, type=c, bootable\n")
        .expect("partition table");
    assert!(child.wait().expect("sfdisk").success(), "sfdisk failed");
    disk
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_boots_with_its_cloud_init_seed_and_from_its_first_disk() {
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
    let (control, admin) =
        common::start_control(&prefix, &server, Some(&node), DEADLINE, None).await;
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

    // Disk boot: an image that boots the test guest through GRUB, a VM
    // without a kernel whose first disk clones it.
    let ip = std::net::Ipv4Addr::new(10, 80, 0, 20);
    let disk_file = bootable_disk(&dir, image.kernel(), image.initrd(), &static_ip_cmdline(ip));
    let bootable = Image {
        meta: ObjectMeta::named("bootable"),
        spec: ImageSpec {
            source: disk_file.to_string_lossy().into_owned(),
            format: ImageFormat::Raw,
        },
        ..Image::default()
    };
    admin.create(Object::Image(bootable)).await.expect("image");
    let network = Network {
        meta: ObjectMeta::named("default"),
        spec: NetworkSpec {
            cidr: "10.80.0.0/24".into(),
            vni: 80,
            routing: None,
        },
    };
    admin
        .create(Object::Network(network))
        .await
        .expect("network");
    let vm = Vm {
        meta: ObjectMeta::named("from-disk"),
        spec: VmSpec {
            cpus: 1,
            memory_mib: 128,
            running: true,
            disks: vec![Disk {
                name: "root".into(),
                size_bytes: 32 << 20,
                image: Some("bootable".into()),
                replicas: 1,
                source_volume: None,
                attach: None,
                attached_storage_name: None,
                added_at_epoch: None,
                protocol: Default::default(),
            }],
            nics: vec![Nic {
                network: "default".into(),
                mac: None,
                ip: None,
            }],
            ..VmSpec::default()
        },
        ..Vm::default()
    };
    let Object::Vm(vm) = admin.create(Object::Vm(vm)).await.expect("vm") else {
        panic!("a vm")
    };
    let domain = format!("{}-from-disk", prefix.name());
    let tap = tap_name(vm_uuid(&vm.meta.uid), 0);
    let wired = tokio::task::spawn_blocking({
        let node = node.clone();
        move || wire_tap(&node, &tap, ip, DEADLINE)
    })
    .await
    .expect("wiring");
    if let Err(err) = wired {
        panic!(
            "{err}\nvm: {:?}\nagent:\n{}",
            get_vm(&admin, "from-disk").await.map(|v| v.status),
            agent.log_tail(30)
        );
    }
    let xml = libvirtd.virsh(&["dumpxml", &domain]).expect("dumpxml");
    assert!(xml.contains("<boot dev='hd'/>"), "{xml}");
    assert!(!xml.contains("<kernel>"), "{xml}");
    let serial = prefix.log_dir().join("from-disk.log");
    let answered = tokio::task::spawn_blocking({
        let node = node.clone();
        move || GuestClient::in_node(ip, Some(&node)).wait_ready(DEADLINE)
    })
    .await
    .expect("waiting");
    assert!(
        answered.is_ok(),
        "the disk-booted guest does not answer: {answered:?}\nserial:\n{}",
        basalt_testkit::guest::log_tail(&serial, 30)
    );
}

fn read_in(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}
