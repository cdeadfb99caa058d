//! `guest-boot`: from "run this guest" to the guest answering on the
//! network, Basalt's way against plain QEMU.
//!
//! - Basalt: the domain XML from `basalt_agent::compute::domain`, then
//!   `virsh define` + `virsh start` on a node's private libvirtd, until the
//!   test guest answers echo;
//! - peer: `qemu-system-x86_64` started by hand with the same kernel,
//!   initramfs, NBD disk and tap, until the guest answers echo.
//!
//! Both run in the same node (namespace), one at a time, alternating which
//! goes first so a slow spell of the machine does not land on one side
//! only. The goal: Basalt's median within 1.5× of plain QEMU's, i.e. what
//! libvirt and the agent add stays small next to the guest's own boot.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use basalt_agent::compute::domain::{Accel, Boot, DomainSpec, EthernetNic, NbdDisk};
use basalt_testkit::guest::nbd::create_raw_disk;
use basalt_testkit::guest::{
    GuestClient, GuestImage, LibvirtDomain, NbdServer, QemuGuest, QemuGuestSpec, log_tail,
    static_ip_cmdline, wire_tap,
};
use basalt_testkit::{Fabric, Libvirtd, Node, Prefix};

use super::Options;
use crate::report::{Better, Goal, Report};
use crate::stats::Samples;

const DEFAULT_RUNS: usize = 10;
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 10);
const GUEST_MAC: &str = "52:54:00:0b:a5:02";
const MEMORY_MIB: u64 = 256;
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const TAP_DEADLINE: Duration = Duration::from_secs(30);
/// Basalt's median boot may be at most this many times plain QEMU's.
const GOAL_RATIO: f64 = 1.5;

const CASE: &str = "define/spawn to echo";
const BASALT: &str = "basalt (libvirt)";
const PEER: &str = "plain qemu";

/// What both systems boot, and where.
struct Setup<'a> {
    prefix: &'a Prefix,
    node: &'a Node,
    image: &'a GuestImage,
    nbd: &'a NbdServer,
    tap: String,
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let runs = opts.runs.unwrap_or(DEFAULT_RUNS);
    ensure!(runs > 0, "--runs must be at least 1");
    ensure!(
        nix::unistd::geteuid().is_root(),
        "guest-boot needs root (namespaces, taps, libvirtd)"
    );

    let prefix = Prefix::for_test().context("creating a prefix")?;
    let image = GuestImage::build().context("building the guest image")?;
    let mut fabric = Fabric::new(&prefix).context("creating the fabric")?;
    let node = fabric.add_node("a").context("adding a node")?;
    let libvirtd = Libvirtd::start(&prefix, &node, &fabric.hosts()).context("starting libvirtd")?;
    let disk = prefix.dir().join("disk0.raw");
    create_raw_disk(&disk, 64 << 20)?;
    let nbd = NbdServer::start(&prefix, &node, &disk, "vol0").context("starting qemu-nbd")?;
    let setup = Setup {
        tap: prefix.ifname("t0")?,
        prefix: &prefix,
        node: &node,
        image: &image,
        nbd: &nbd,
    };

    let mut basalt = Samples::new();
    let mut peer = Samples::new();
    for i in 0..runs {
        let mut basalt_run = || -> anyhow::Result<()> {
            let took = boot_libvirt(&setup, &libvirtd, i)?;
            eprintln!("run {}/{runs}: {BASALT} {took:.2?}", i + 1);
            basalt.record(took);
            Ok(())
        };
        if i % 2 == 0 {
            basalt_run()?;
        }
        let took = boot_qemu(&setup, i)?;
        eprintln!("run {}/{runs}: {PEER} {took:.2?}", i + 1);
        peer.record(took);
        if i % 2 == 1 {
            basalt_run()?;
        }
    }

    let mut report = Report::new("guest-boot");
    for (system, samples) in [(BASALT, &basalt), (PEER, &peer)] {
        ensure!(!samples.is_empty(), "no {system} boot was measured");
        report.row(CASE, system, "runs", "boots", samples.len() as f64);
        report.row(CASE, system, "p50", "ms", samples.quantile_ms(0.5));
        report.row(CASE, system, "p99", "ms", samples.quantile_ms(0.99));
    }
    report.goal(Goal::new(
        format!("{BASALT} p50 ms <= {GOAL_RATIO}x {PEER} p50"),
        GOAL_RATIO * peer.quantile_ms(0.5),
        basalt.quantile_ms(0.5),
        Better::Lower,
    ));
    Ok(report)
}

/// One Basalt boot: write the XML, define, start, wire the tap, wait for
/// echo; then destroy and undefine (not timed).
fn boot_libvirt(setup: &Setup<'_>, libvirtd: &Libvirtd, run: usize) -> anyhow::Result<Duration> {
    let serial = setup.prefix.log_dir().join("basalt.serial.log");
    let name = format!("{}-bench{run}", setup.prefix.name());
    let started = Instant::now();
    let spec = DomainSpec {
        name: name.clone(),
        uuid: uuid::Uuid::new_v4(),
        accel: Accel::Tcg,
        memory_mib: MEMORY_MIB,
        vcpus: 1,
        cpu_model: None,
        boot: Boot::Kernel {
            kernel: setup.image.kernel().to_owned(),
            initrd: setup.image.initrd().to_owned(),
            cmdline: static_ip_cmdline(GUEST_IP),
        },
        disks: vec![NbdDisk {
            target_dev: "vda".to_owned(),
            host: setup.nbd.host().to_string(),
            port: setup.nbd.port(),
            export_name: setup.nbd.export().to_owned(),
        }],
        seed: None,
        nics: vec![EthernetNic {
            tap: setup.tap.clone(),
            mac: GUEST_MAC.parse()?,
            precreated: false,
        }],
        serial_log: serial.clone(),
    };
    let xml = spec.to_xml()?;
    let domain = LibvirtDomain::define(libvirtd, &name, &xml, setup.prefix.dir())?;
    domain.start()?;
    wire_tap(setup.node, &setup.tap, GUEST_IP, TAP_DEADLINE)?;
    wait_ready(setup.node, &serial)?;
    Ok(started.elapsed())
}

/// One plain-QEMU boot: spawn, wire the tap, wait for echo; then kill.
fn boot_qemu(setup: &Setup<'_>, run: usize) -> anyhow::Result<Duration> {
    let serial = setup.prefix.log_dir().join("qemu.serial.log");
    let started = Instant::now();
    let mut spec = QemuGuestSpec::new(
        &format!("qemu-bench{run}"),
        setup.image,
        &static_ip_cmdline(GUEST_IP),
        &setup.tap,
        GUEST_MAC,
        &serial,
    );
    spec.memory_mib = MEMORY_MIB;
    spec.disk_uri = Some(setup.nbd.uri());
    let mut guest = QemuGuest::start(setup.prefix, setup.node, &spec)?;
    wire_tap(setup.node, &setup.tap, GUEST_IP, TAP_DEADLINE)
        .with_context(|| format!("QEMU log:\n{}", guest.process().log_tail(20)))?;
    wait_ready(setup.node, &serial)?;
    Ok(started.elapsed())
}

fn wait_ready(node: &Node, serial: &Path) -> anyhow::Result<()> {
    GuestClient::in_node(GUEST_IP, Some(node))
        .wait_ready(BOOT_DEADLINE)
        .with_context(|| format!("guest serial log:\n{}", log_tail(serial, 30)))?;
    Ok(())
}
