//! The test guest boots for real: under a node's private libvirtd, from
//! the domain XML `basalt-agent` writes, with its disk over NBD and its NIC
//! on a tap — and under plain QEMU, the benchmarks' peer. Needs root.

use std::error::Error;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basalt_agent::compute::domain::{Accel, Boot, DomainSpec, EthernetNic, NbdDisk};
use basalt_testkit::guest::nbd::create_raw_disk;
use basalt_testkit::guest::{
    GuestClient, GuestImage, LibvirtDomain, NbdServer, QemuGuest, QemuGuestSpec, READY_MARKER,
    check_consecutive, log_tail, static_ip_cmdline, wire_tap,
};
use basalt_testkit::{Fabric, Libvirtd, Prefix};

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 10);
const GUEST_MAC: &str = "52:54:00:0b:a5:01";
const DISK_SIZE: u64 = 64 << 20;
/// TCG guests on a loaded two-core machine: minutes, not seconds.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const TAP_DEADLINE: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// An error with its sources, one line.
fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Panics with `what`, the error, and the end of the guest's console.
trait OrGuestLog<T> {
    fn or_log(self, what: &str, serial: &Path) -> T;
}

impl<T, E: Error> OrGuestLog<T> for Result<T, E> {
    fn or_log(self, what: &str, serial: &Path) -> T {
        self.unwrap_or_else(|e| {
            panic!(
                "{what}: {}\n--- guest serial log ({}), last lines ---\n{}",
                chain(&e),
                serial.display(),
                log_tail(serial, 40)
            )
        })
    }
}

#[test]
fn guest_boots_under_libvirt_with_an_nbd_disk_and_a_tap() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    init_logs();
    let prefix = Prefix::for_test().expect("test prefix");
    let image = GuestImage::build().expect("guest image");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let node = fabric.add_node("a").expect("node");
    let libvirtd = Libvirtd::start(&prefix, &node, &fabric.hosts()).expect("private libvirtd");

    let disk = prefix.dir().join("disk0.raw");
    create_raw_disk(&disk, DISK_SIZE).expect("disk file");
    let nbd = NbdServer::start(&prefix, &node, &disk, "vol0").expect("qemu-nbd");

    let tap = prefix.ifname("t0").expect("tap name");
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
            host: nbd.host().to_string(),
            port: nbd.port(),
            export_name: nbd.export().to_owned(),
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
    let domain =
        LibvirtDomain::define(&libvirtd, &name, &xml, prefix.dir()).or_log("define", &serial);
    let client = GuestClient::in_node(GUEST_IP, Some(&node));

    // First boot.
    let started = Instant::now();
    domain.start().or_log("virsh start", &serial);
    wire_tap(&node, &tap, GUEST_IP, TAP_DEADLINE).or_log("wiring the tap", &serial);
    client
        .wait_ready(BOOT_DEADLINE)
        .or_log("first boot", &serial);
    eprintln!(
        "libvirt guest answered {:?} after virsh start",
        started.elapsed()
    );

    assert_eq!(
        client.echo("hello, guest").or_log("echo", &serial),
        "hello, guest"
    );
    let fresh = client.read_disk().or_log("read_disk", &serial);
    assert_eq!((fresh.boots, fresh.data.as_str()), (1, ""), "fresh disk");
    let data = "written by basalt's guest_boot test & <kept>";
    client.write_disk(data).or_log("write_disk", &serial);
    let record = client.read_disk().or_log("read_disk after write", &serial);
    assert_eq!((record.boots, record.data.as_str()), (1, data));

    // Pull the plug and boot again: the disk over NBD keeps both records.
    domain.destroy().or_log("virsh destroy", &serial);
    let started = Instant::now();
    domain.start().or_log("second virsh start", &serial);
    wire_tap(&node, &tap, GUEST_IP, TAP_DEADLINE).or_log("wiring the tap again", &serial);
    client
        .wait_ready(BOOT_DEADLINE)
        .or_log("second boot", &serial);
    eprintln!(
        "libvirt guest answered {:?} after the second virsh start",
        started.elapsed()
    );
    let record = client.read_disk().or_log("read_disk after reboot", &serial);
    assert_eq!(
        (record.boots, record.data.as_str()),
        (2, data),
        "after destroy + start; serial log:\n{}",
        log_tail(&serial, 40)
    );

    // The console went to the serial log file, through both boots.
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        console.contains("basalt-guest: boot 2") && console.contains(READY_MARKER),
        "serial log {} lacks the guest's markers:\n{}",
        serial.display(),
        log_tail(&serial, 40)
    );

    // The numbered stream runs without gaps.
    let numbers = client
        .stream(20, Duration::from_secs(60))
        .or_log("stream", &serial);
    if let Err((at, before, found)) = check_consecutive(&numbers) {
        panic!("stream jumped from {before} to {found} at line {at}: {numbers:?}");
    }
}

#[test]
fn guest_boots_under_plain_qemu() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    init_logs();
    let prefix = Prefix::for_test().expect("test prefix");
    let image = GuestImage::build().expect("guest image");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let node = fabric.add_node("a").expect("node");

    let disk = prefix.dir().join("disk0.raw");
    create_raw_disk(&disk, DISK_SIZE).expect("disk file");
    let nbd = NbdServer::start(&prefix, &node, &disk, "vol0").expect("qemu-nbd");

    let tap = prefix.ifname("t0").expect("tap name");
    let serial: PathBuf = prefix.log_dir().join("qemu0.serial.log");
    let mut spec = QemuGuestSpec::new(
        "qemu0",
        &image,
        &static_ip_cmdline(GUEST_IP),
        &tap,
        GUEST_MAC,
        &serial,
    );
    spec.disk_uri = Some(nbd.uri());

    let started = Instant::now();
    let mut guest = QemuGuest::start(&prefix, &node, &spec).expect("qemu");
    let client = GuestClient::in_node(GUEST_IP, Some(&node));
    if let Err(e) = wire_tap(&node, &tap, GUEST_IP, TAP_DEADLINE) {
        panic!("{}; QEMU log:\n{}", chain(&e), guest.process().log_tail(20));
    }
    client.wait_ready(BOOT_DEADLINE).or_log("boot", &serial);
    eprintln!(
        "plain QEMU guest answered {:?} after spawn",
        started.elapsed()
    );
    assert_eq!(client.echo("peer").or_log("echo", &serial), "peer");
    let record = client.read_disk().or_log("read_disk", &serial);
    assert_eq!(record.boots, 1);
    assert!(guest.is_running());
}
