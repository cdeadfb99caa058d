//! The libvirt backend passes the same conformance suite as the simulated
//! one, on a private libvirtd in a namespace, booting the real test guest
//! under TCG. Then an agent restart is simulated: a fresh backend on the
//! same daemon finds (adopts) the running domain. Last, four domains are
//! started and then destroyed and undefined from four threads at once
//! through one backend (the reconciler's concurrent actions): every call
//! succeeds and nothing is left. A second test plugs a disk into the
//! running guest and unplugs another: the guest's kernel finds the new
//! disk and lets go of the old one. Needs root.

use std::time::Duration;

use basalt_agent::compute::conformance;
use basalt_agent::compute::domain::Boot;
use basalt_agent::compute::domain::NbdDisk;
use basalt_agent::compute::libvirt::LibvirtCompute;
use basalt_agent::compute::{Compute, PowerState};
use basalt_testkit::guest::{GuestImage, NbdServer, nbd};
use basalt_testkit::{Fabric, Libvirtd, Prefix};

/// One namespace node with its own libvirtd, and the test guest.
struct Node {
    prefix: Prefix,
    _fabric: Fabric,
    node: basalt_testkit::Node,
    libvirtd: Libvirtd,
    image: GuestImage,
}

/// The node, or `None` (the test skipped) without root.
fn node() -> Option<Node> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return None;
    }
    let prefix = Prefix::for_test().expect("test prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let node = fabric.add_node("n1").expect("node");
    let libvirtd = Libvirtd::start(&prefix, &node, &fabric.hosts()).expect("libvirtd");
    let image = GuestImage::build().expect("guest image");
    Some(Node {
        prefix,
        _fabric: fabric,
        node,
        libvirtd,
        image,
    })
}

#[test]
fn libvirt_passes_the_conformance_suite_and_is_adopted_after_restart() {
    // Every part bound: the namespace and libvirtd live to the end.
    let Some(Node {
        prefix,
        _fabric,
        node: _node,
        libvirtd,
        image,
    }) = node()
    else {
        return;
    };

    let mut spec = conformance::spec(&format!("{}-vm", prefix.name()));
    spec.boot = Boot::Kernel {
        kernel: image.kernel().to_owned(),
        initrd: image.initrd().to_owned(),
        cmdline: "console=ttyS0".to_owned(),
    };
    spec.serial_log = prefix.log_dir().join("conformance.serial.log");

    let compute = LibvirtCompute::new(libvirtd.uri());
    conformance::run(&compute, spec.clone(), Duration::from_secs(5));

    // Adoption: the domain runs; a new backend (a restarted agent) sees
    // it running with the same UUID, without starting it again.
    compute.define(&spec).expect("define");
    compute.start(&spec.name).expect("start");
    drop(compute);
    let restarted = LibvirtCompute::new(libvirtd.uri());
    let found = restarted.list().expect("list");
    let status = found
        .iter()
        .find(|d| d.name == spec.name)
        .expect("the running domain is listed");
    assert_eq!(
        (status.uuid, status.state),
        (spec.uuid, PowerState::Running)
    );
    restarted.destroy(&spec.name).expect("destroy");
    restarted.undefine(&spec.name).expect("undefine");

    // Concurrent calls through one backend (one shared connection).
    let specs: Vec<_> = (0..4)
        .map(|i| {
            let mut s = spec.clone();
            s.name = format!("{}-c{i}", spec.name);
            s.uuid = uuid::Uuid::new_v4();
            s.serial_log = prefix.log_dir().join(format!("c{i}.serial.log"));
            s
        })
        .collect();
    std::thread::scope(|scope| {
        for s in &specs {
            let restarted = &restarted;
            scope.spawn(move || {
                restarted.define(s).expect("define");
                restarted.start(&s.name).expect("start");
            });
        }
    });
    for s in &specs {
        assert!(
            restarted
                .status(&s.name)
                .expect("status")
                .unwrap()
                .state
                .is_active()
        );
    }
    std::thread::scope(|scope| {
        for s in &specs {
            let restarted = &restarted;
            scope.spawn(move || {
                restarted.destroy(&s.name).expect("destroy");
                restarted.undefine(&s.name).expect("undefine");
            });
        }
    });
    for s in &specs {
        assert_eq!(
            restarted.status(&s.name).expect("status"),
            None,
            "{} is left",
            s.name
        );
    }
}

#[test]
fn libvirt_plugs_disks_into_a_running_guest() {
    let Some(Node {
        prefix,
        _fabric,
        node,
        libvirtd,
        image,
    }) = node()
    else {
        return;
    };
    // Two disks, each served by its own qemu-nbd inside the node.
    let servers: Vec<NbdServer> = ["root", "data"]
        .iter()
        .enumerate()
        .map(|(i, export)| {
            let file = prefix.dir().join(format!("{export}.raw"));
            nbd::create_raw_disk(&file, 64 << 20).expect("disk file");
            let port = nbd::NBD_PORT + u16::try_from(i).expect("port");
            NbdServer::start_on_port(&prefix, &node, &file, export, port).expect("qemu-nbd")
        })
        .collect();
    let disk = |s: &NbdServer| NbdDisk {
        target_dev: "vda".to_owned(),
        host: s.host().to_string(),
        port: s.port(),
        export_name: s.export().to_owned(),
    };

    let mut spec = conformance::spec(&format!("{}-plug", prefix.name()));
    spec.boot = Boot::Kernel {
        kernel: image.kernel().to_owned(),
        initrd: image.initrd().to_owned(),
        cmdline: "console=ttyS0".to_owned(),
    };
    // Enough memory for the kernel to boot (the suite's 64 MiB is not).
    spec.memory_mib = 128;
    let serial = prefix.log_dir().join("plug.serial.log");
    spec.serial_log = serial.clone();
    let console = || std::fs::read_to_string(&serial).unwrap_or_default();
    let wait_console = |text: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        while !console().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "the guest never printed {text:?}; its console:\n{}",
                console()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    };

    let compute = LibvirtCompute::new(libvirtd.uri());
    // The guest has booted (and counted its boot on its first disk) once
    // it says so: its kernel then answers hot-plug events.
    conformance::run_disk_plugging(
        &compute,
        spec,
        [disk(&servers[0]), disk(&servers[1])],
        &|| wait_console("basalt-guest: boot 1"),
        Duration::from_secs(60),
    );
    // The guest's kernel found the disk plugged in while it ran.
    assert!(
        console().contains("[vdb]"),
        "the guest's kernel never saw vdb; its console:\n{}",
        console()
    );
}
