//! Private libvirtds: one per node, each answering as its own host, and
//! nothing of them left after drop. Needs root, libvirt and QEMU.

use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use basalt_testkit::{Fabric, Libvirtd, Prefix, sweep};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("basalt_testkit=debug")
        .try_init();
}

/// The `<uuid>` of `<host>` in `virsh capabilities`.
fn host_uuid(daemon: &Libvirtd) -> String {
    let caps = daemon.virsh(&["capabilities"]).expect("capabilities");
    caps.split("<uuid>")
        .nth(1)
        .and_then(|rest| rest.split("</uuid>").next())
        .expect("a host uuid")
        .to_owned()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Live libvirtd/virtlogd processes whose command line names `dir`.
fn daemons_under(dir: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let name = comm(pid);
        if (name == "libvirtd" || name == "virtlogd") && cmdline.contains(dir) {
            found.push(format!("{pid} {cmdline}"));
        }
    }
    found
}

#[test]
fn two_private_libvirtds_answer_as_their_nodes_and_go_away() {
    init_tracing();
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let a = fabric.add_node("a").expect("node a");
    let b = fabric.add_node("b").expect("node b");
    let hosts = fabric.hosts();

    let (da, db) = std::thread::scope(|scope| {
        let ta = scope.spawn(|| Libvirtd::start(&prefix, &a, &hosts));
        let tb = scope.spawn(|| Libvirtd::start(&prefix, &b, &hosts));
        (ta.join().expect("thread a"), tb.join().expect("thread b"))
    });
    let (da, mut db) = (da.expect("libvirtd a"), db.expect("libvirtd b"));

    assert_eq!(da.uri(), format!("qemu+tcp://{}/system", a.addr()));
    for (daemon, node) in [(&da, &a), (&db, &b)] {
        let version = daemon.virsh(&["version"]).expect("version");
        assert!(version.contains("QEMU"), "{version}");
        assert_eq!(
            daemon.virsh(&["hostname"]).expect("hostname").trim(),
            node.name()
        );
        // The daemon runs in the node's namespace, as libvirtd itself.
        let pid = daemon.process().expect("process").pid();
        assert_eq!(comm(pid), "libvirtd");
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns link");
        let node_ns = std::fs::metadata(node.netns_path()).expect("netns");
        assert_eq!(ns.to_string_lossy(), format!("net:[{}]", node_ns.ino()));
        assert!(daemon.state_dir().join("virtlogd.pid").exists());
    }
    assert_ne!(host_uuid(&da), host_uuid(&db), "host UUIDs must differ");
    // Each node's /etc/hosts lists every node.
    let hosts_file = std::fs::read_to_string(da.state_dir().join("hosts")).expect("hosts");
    assert!(
        hosts_file.contains(&format!("{} b", b.addr())),
        "{hosts_file}"
    );

    // A restart keeps the node's identity.
    let uuid_b = host_uuid(&db);
    let pid_b = db.process().expect("process").pid();
    db.restart().expect("restart");
    assert_ne!(db.process().expect("process").pid(), pid_b);
    assert_eq!(host_uuid(&db), uuid_b);
    assert_eq!(db.virsh(&["hostname"]).expect("hostname").trim(), "b");

    // Detached, the daemon keeps running; adopted, it is owned again.
    let pid_a = da.process().expect("process").pid();
    da.detach();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(comm(pid_a), "libvirtd");
    let da = Libvirtd::adopt(&prefix, &a).expect("adopt");
    assert_eq!(da.process().expect("process").pid(), pid_a);

    let dir = prefix.dir().to_string_lossy().into_owned();
    assert_eq!(daemons_under(&dir).len(), 4, "{:?}", daemons_under(&dir));
    drop(da);
    drop(db);
    assert!(daemons_under(&dir).is_empty(), "{:?}", daemons_under(&dir));
    let left = sweep::objects(prefix.name());
    assert!(left.processes.is_empty(), "{left:?}");
}

/// A diskless domain that sits in SeaBIOS: enough to have a QEMU running.
const IDLE_DOMAIN: &str = "<domain type='qemu'>
  <name>idle</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
";

#[test]
fn qemus_die_with_their_daemon_even_after_it_crashed() {
    init_tracing();
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let node = fabric.add_node("n1").expect("node");
    let mut daemon = Libvirtd::start(&prefix, &node, &fabric.hosts()).expect("libvirtd");

    let xml = prefix.dir().join("idle.xml");
    std::fs::write(&xml, IDLE_DOMAIN).expect("write xml");
    daemon
        .virsh(&["create", &xml.to_string_lossy()])
        .expect("create domain");
    let pid_file = daemon.state_dir().join("run/qemu/idle.pid");
    let qemu: u32 = std::fs::read_to_string(&pid_file)
        .expect("qemu pid file in the private run dir")
        .trim()
        .parse()
        .expect("pid");
    assert!(comm(qemu).starts_with("qemu"), "{}", comm(qemu));
    let listed = daemon.virsh(&["list", "--name"]).expect("list");
    assert_eq!(listed.trim(), "idle");

    // libvirtd crashes; its QEMU keeps running, as on a real host.
    daemon
        .process_mut()
        .expect("process")
        .kill9()
        .expect("kill9");
    std::thread::sleep(Duration::from_millis(300));
    assert!(comm(qemu).starts_with("qemu"));

    drop(daemon);
    assert!(
        comm(qemu).is_empty() || is_zombie(qemu),
        "QEMU {qemu} survived"
    );
    let left = sweep::objects(prefix.name());
    assert!(left.processes.is_empty(), "{left:?}");
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}
