//! `basaltd storage` end to end: the operator commands, `kill -9` of the
//! serving process in the middle of a write stream (every acknowledged
//! write is readable after the restart and the pool verifies clean), and
//! a libvirt guest (TCG) whose disk is a Basalt volume served over NBD
//! inside its node's namespace, across a storage restart and a reboot.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use basalt_agent::compute::domain::{Accel, Boot, DomainSpec, EthernetNic, NbdDisk};
use basalt_testkit::guest::{GuestClient, GuestImage, LibvirtDomain, static_ip_cmdline, wire_tap};
use basalt_testkit::nbd_client::{BLOCK, NbdClient, WriteStream, block, slot};
use basalt_testkit::process::{Process, ProcessSpec};
use basalt_testkit::{Fabric, Libvirtd, Prefix};

const BASALTD: &str = env!("CARGO_BIN_EXE_basaltd");

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn basaltd(args: &[&str]) -> Output {
    Command::new(BASALTD)
        .args(args)
        .output()
        .expect("run basaltd")
}

fn ok(args: &[&str]) -> String {
    let out = basaltd(args);
    assert!(
        out.status.success(),
        "basaltd {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn operator_commands_and_their_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = dir.path().join("pool.img");
    let p = pool.to_str().expect("path");
    ok(&["storage", "pool", "create", "--path", p, "--size", "256M"]);
    ok(&[
        "storage", "volume", "create", "--pool", p, "vm0", "--size", "64M",
    ]);
    ok(&[
        "storage", "volume", "snapshot", "--pool", p, "vm0", "vm0-snap",
    ]);
    ok(&["storage", "volume", "clone", "--pool", p, "vm0-snap", "vm1"]);
    ok(&[
        "storage", "volume", "resize", "--pool", p, "vm1", "--size", "128M",
    ]);
    let list = ok(&["storage", "volume", "list", "--pool", p, "--json"]);
    let vols: serde_json::Value = serde_json::from_str(&list).expect("json");
    let names: Vec<&str> = vols
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["vm0", "vm0-snap", "vm1"]);
    assert_eq!(vols[2]["size"], 128 << 20);
    assert_eq!(vols[1]["read_only"], true);
    assert_eq!(vols[0]["incomplete"], false);
    // A copy whose full sync was cut (its mark in the replication book
    // beside the pool) says so.
    std::fs::write(format!("{p}.epochs"), "vm1 2 0 f\n").expect("write the book");
    let list = ok(&["storage", "volume", "list", "--pool", p, "--json"]);
    let vols: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(vols[2]["incomplete"], true, "{vols}");
    assert_eq!(vols[0]["incomplete"], false, "{vols}");
    let table = ok(&["storage", "volume", "list", "--pool", p]);
    assert!(table.contains("incomplete"), "{table}");
    // A snapshot of it, and a clone of that, hold the same torn data.
    ok(&[
        "storage", "volume", "snapshot", "--pool", p, "vm1", "vm1-snap",
    ]);
    ok(&["storage", "volume", "clone", "--pool", p, "vm1-snap", "vm2"]);
    let list = ok(&["storage", "volume", "list", "--pool", p, "--json"]);
    let vols: serde_json::Value = serde_json::from_str(&list).expect("json");
    let incomplete: Vec<&str> = vols
        .as_array()
        .expect("array")
        .iter()
        .filter(|v| v["incomplete"] == true)
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(incomplete, ["vm1", "vm1-snap", "vm2"], "{vols}");
    ok(&["storage", "volume", "delete", "--pool", p, "vm0"]);
    ok(&["storage", "pool", "status", "--pool", p]);

    // Errors: non-zero exit and a message naming the problem.
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "storage", "volume", "create", "--pool", p, "vm1", "--size", "1M",
            ],
            "already exists",
        ),
        (
            &[
                "storage", "volume", "create", "--pool", p, "x", "--size", "12Q",
            ],
            "unknown size unit",
        ),
        (
            &[
                "storage",
                "volume",
                "create",
                "--pool",
                "/nonexistent/p",
                "x",
                "--size",
                "1M",
            ],
            "does not exist",
        ),
        (
            &[
                "storage", "volume", "resize", "--pool", p, "vm1", "--size", "1M",
            ],
            "cannot shrink",
        ),
        (
            &[
                "storage", "volume", "create", "--pool", p, "big", "--size", "100T",
            ],
            "over-provisioning",
        ),
        (
            &["storage", "pool", "create", "--path", p, "--size", "1G"],
            "already holds a pool",
        ),
        (
            &["storage", "volume", "delete", "--pool", p, "ghost"],
            "no volume named",
        ),
    ];
    for (args, needle) in cases {
        let out = basaltd(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in:\n{err}"
        );
    }
}

#[test]
fn kill_9_mid_stream_keeps_every_acknowledged_write() {
    if !is_root() {
        eprintln!("skipping: needs root (test prefix and process harness)");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let pool = prefix.dir().join("pool.img");
    let p = pool.to_str().expect("path");
    ok(&["storage", "pool", "create", "--path", p, "--size", "256M"]);
    ok(&[
        "storage", "volume", "create", "--pool", p, "vol", "--size", "64M",
    ]);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, basalt_testkit::free_port()));
    let spec = ProcessSpec::new("basalt-storage", BASALTD).args([
        "storage",
        "serve",
        "--pool",
        p,
        "--listen",
        &addr.to_string(),
    ]);
    let mut server = Process::start(&prefix, spec).expect("start server");
    server
        .wait_for_tcp(addr, None, Duration::from_secs(30))
        .expect("server listening");

    let stream = WriteStream::start(addr, "vol");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stream.acked() < 2000 {
        assert!(Instant::now() < deadline, "writes too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill9().expect("kill -9");
    let acked = stream.finish();
    eprintln!("{} writes acknowledged before kill -9", acked.len());

    server.restart().expect("restart");
    server
        .wait_for_tcp(addr, None, Duration::from_secs(30))
        .expect("server listening again");
    let mut c = NbdClient::connect(addr, "vol").expect("reconnect");
    let mut buf = vec![0u8; BLOCK];
    for &i in &acked {
        c.read(slot(i), &mut buf).expect("read");
        assert!(buf == block(i), "acknowledged write {i} lost after kill -9");
    }
    drop(c);
    let exit = server.stop(Duration::from_secs(10)).expect("stop");
    eprintln!("server stopped: {exit}");
    // The pool verifies clean (no leaked or doubly owned chunk).
    let status = ok(&["storage", "pool", "status", "--pool", p, "--json"]);
    assert!(status.contains("\"verify\":\"ok\""), "{status}");
}

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 10);
const GUEST_MAC: &str = "52:54:00:0b:a5:02";
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const TAP_DEADLINE: Duration = Duration::from_secs(30);

fn guest_log(serial: &Path) -> String {
    basalt_testkit::guest::log_tail(serial, 40)
}

#[test]
fn libvirt_guest_disk_on_a_basalt_volume_survives_storage_kill_and_reboot() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let image = GuestImage::build().expect("guest image");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let node = fabric.add_node("a").expect("node");
    let libvirtd = Libvirtd::start(&prefix, &node, &fabric.hosts()).expect("libvirtd");

    let pool = prefix.dir().join("pool.img");
    let p = pool.to_str().expect("path");
    ok(&["storage", "pool", "create", "--path", p, "--size", "256M"]);
    ok(&[
        "storage", "volume", "create", "--pool", p, "vol0", "--size", "64M",
    ]);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 10809));
    let spec = ProcessSpec::new("basalt-storage-a", BASALTD)
        .args([
            "storage",
            "serve",
            "--pool",
            p,
            "--listen",
            &addr.to_string(),
        ])
        .netns(&node);
    let mut storage = Process::start(&prefix, spec).expect("storage");
    storage
        .wait_for_tcp(addr, Some(&node), Duration::from_secs(30))
        .expect("storage listening in the node");

    let tap = prefix.ifname("t0").expect("tap");
    let serial = prefix.log_dir().join("guest0.serial.log");
    let name = format!("{}-guest0", prefix.name());
    let spec = DomainSpec {
        name: name.clone(),
        uuid: uuid::Uuid::new_v4(),
        accel: Accel::Tcg,
        memory_mib: 256,
        vcpus: 1,
        cpu_model: None,
        boot: Boot::Kernel {
            kernel: image.kernel().to_owned(),
            initrd: image.initrd().to_owned(),
            cmdline: static_ip_cmdline(GUEST_IP),
        },
        disks: vec![NbdDisk {
            target_dev: "vda".to_owned(),
            host: addr.ip().to_string(),
            port: addr.port(),
            export_name: "vol0".to_owned(),
        }],
        seed: None,
        nics: vec![EthernetNic {
            tap: tap.clone(),
            mac: GUEST_MAC.parse().expect("MAC"),
            precreated: false,
        }],
        serial_log: serial.clone(),
    };
    let xml = spec.to_xml().expect("domain XML");
    let domain = LibvirtDomain::define(&libvirtd, &name, &xml, prefix.dir()).expect("define");
    let client = GuestClient::in_node(GUEST_IP, Some(&node));

    domain.start().expect("virsh start");
    wire_tap(&node, &tap, GUEST_IP, TAP_DEADLINE).expect("tap");
    if let Err(e) = client.wait_ready(BOOT_DEADLINE) {
        panic!("first boot: {e}\n{}", guest_log(&serial));
    }
    let fresh = client.read_disk().expect("read_disk");
    assert_eq!((fresh.boots, fresh.data.as_str()), (1, ""), "fresh volume");
    let data = "written through basalt's NBD server";
    client.write_disk(data).expect("write_disk");
    assert_eq!(client.read_disk().expect("read back").data, data);

    // Pull the plug on the guest and kill -9 the storage process; bring
    // storage back and boot again: the record is still there.
    domain.destroy().expect("virsh destroy");
    storage.kill9().expect("kill -9 storage");
    storage.restart().expect("restart storage");
    storage
        .wait_for_tcp(addr, Some(&node), Duration::from_secs(30))
        .expect("storage listening again");
    domain.start().expect("second virsh start");
    wire_tap(&node, &tap, GUEST_IP, TAP_DEADLINE).expect("tap again");
    if let Err(e) = client.wait_ready(BOOT_DEADLINE) {
        panic!("second boot: {e}\n{}", guest_log(&serial));
    }
    let record = client.read_disk().expect("read_disk after reboot");
    assert_eq!((record.boots, record.data.as_str()), (2, data));
    domain.destroy().expect("virsh destroy");
    storage.stop(Duration::from_secs(10)).expect("stop storage");
    let status = ok(&["storage", "pool", "status", "--pool", p, "--json"]);
    assert!(status.contains("\"verify\":\"ok\""), "{status}");
}
