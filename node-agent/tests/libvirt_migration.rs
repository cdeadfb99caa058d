//! The libvirt backend passes the migration suite between two private
//! libvirtds in two namespace nodes: a refused and an aborted migration
//! leave the test guest running on the source only, a pre-copy migration
//! moves it, and a post-copy one brings it back. Needs root.

use basalt_agent::compute::conformance::{self, Peer};
use basalt_agent::compute::domain::Boot;
use basalt_agent::compute::libvirt::LibvirtCompute;
use basalt_testkit::guest::GuestImage;
use basalt_testkit::{Fabric, Libvirtd, Prefix};

#[test]
fn libvirt_passes_the_migration_suite() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prefix = Prefix::for_test().expect("test prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let n1 = fabric.add_node("n1").expect("node n1");
    let n2 = fabric.add_node("n2").expect("node n2");
    let hosts = fabric.hosts();
    let (l1, l2) = std::thread::scope(|s| {
        let l1 = s.spawn(|| Libvirtd::start(&prefix, &n1, &hosts).expect("libvirtd n1"));
        let l2 = s.spawn(|| Libvirtd::start(&prefix, &n2, &hosts).expect("libvirtd n2"));
        (l1.join().expect("n1"), l2.join().expect("n2"))
    });
    let image = GuestImage::build().expect("guest image");

    let mut spec = conformance::spec(&format!("{}-mig", prefix.name()));
    spec.boot = Boot::Kernel {
        kernel: image.kernel().to_owned(),
        initrd: image.initrd().to_owned(),
        cmdline: "console=ttyS0".to_owned(),
    };
    spec.serial_log = prefix.log_dir().join("migration.serial.log");

    let (uri1, uri2) = (l1.uri(), l2.uri());
    let a = LibvirtCompute::new(uri1.clone());
    let b = LibvirtCompute::new(uri2.clone());
    conformance::run_migration(
        Peer {
            compute: &a,
            uri: &uri1,
        },
        Peer {
            compute: &b,
            uri: &uri2,
        },
        spec,
    );
}
