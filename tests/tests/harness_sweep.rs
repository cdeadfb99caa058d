//! A test killed mid-way (SIGKILL: no drops run) leaves a fabric, a daemon,
//! a private libvirtd (with its virtlogd) and a QEMU behind; `sweep_stale`
//! removes them, and only them. Needs root, libvirt and QEMU.
//!
//! The killed test is this binary run again as a child, with
//! [`CHILD_ENV`] set, running only [`leak_objects_then_wait`].

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use basalt_testkit::prefix::STATE_ROOT;
use basalt_testkit::{Fabric, Libvirtd, Prefix, Process, ProcessSpec, sweep};

/// Set in the child: it leaks objects, prints them and waits to be killed.
const CHILD_ENV: &str = "BASALT_HARNESS_SWEEP_CHILD";

/// A diskless domain that sits in SeaBIOS: enough to have a QEMU running.
const IDLE_DOMAIN: &str = "<domain type='qemu'>
  <name>idle</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
";

/// In the child only (a no-op in a normal run): makes a prefix, a fabric
/// with one node, a process, a libvirtd and a domain in it, prints
/// `LEAKED <prefix> <sleeper pid> <qemu pid>`, and waits to be killed.
#[test]
fn leak_objects_then_wait() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let node = fabric.add_node("a").expect("node");
    let sleeper = Process::start(
        &prefix,
        ProcessSpec::new("sleeper", "sleep")
            .arg("1000")
            .netns(&node),
    )
    .expect("start");
    let daemon = Libvirtd::start(&prefix, &node, &fabric.hosts()).expect("libvirtd");
    let xml = prefix.dir().join("idle.xml");
    std::fs::write(&xml, IDLE_DOMAIN).expect("write xml");
    daemon
        .virsh(&["create", &xml.to_string_lossy()])
        .expect("create domain");
    let qemu = std::fs::read_to_string(daemon.state_dir().join("run/qemu/idle.pid"))
        .expect("qemu pid file");
    println!("LEAKED {} {} {}", prefix.name(), sleeper.pid(), qemu.trim());
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn sweep_removes_what_a_killed_test_left() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    // A live test's prefix, which the sweep must leave alone.
    let mine = Prefix::for_test().expect("prefix");
    let mut my_fabric = Fabric::new(&mine).expect("fabric");
    let my_node = my_fabric.add_node("a").expect("node");

    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "leak_objects_then_wait",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the leaking child");
    let stdout = child.stdout.take().expect("stdout");
    let (report, reported) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let leaked = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                // libtest prints "test NAME ... " on the same line first.
                let rest = line.split_once("LEAKED ")?.1.to_owned();
                let mut words = rest.split_whitespace();
                let name = words.next()?.to_owned();
                let sleeper = words.next()?.parse::<u32>().ok()?;
                let qemu = words.next()?.parse::<u32>().ok()?;
                Some((name, sleeper, qemu))
            });
        let _ = report.send(leaked);
    });
    let leaked = reported
        .recv_timeout(Duration::from_secs(300))
        .ok()
        .flatten();
    // The owner dies without running a single drop.
    child.kill().expect("kill the child");
    child.wait().expect("reap the child");
    let (name, sleeper, qemu) = leaked.expect("the child reported its objects");

    let before = sweep::objects(&name);
    assert_eq!(before.namespaces, [format!("{name}-a")]);
    assert_eq!(before.links.len(), 2, "{before:?}");
    assert!(before.processes.contains(&sleeper), "{before:?}");
    assert!(before.processes.contains(&qemu), "{before:?}");
    // sleeper, libvirtd, virtlogd, QEMU.
    assert!(before.processes.len() >= 4, "{before:?}");

    sweep::sweep_stale();

    // Another test binary's sweep may have got there first: check the
    // outcome, not the report.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = sweep::objects(&name);
    while !after.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = sweep::objects(&name);
    }
    assert!(after.is_empty(), "left behind: {after:?}");
    assert!(!Path::new(STATE_ROOT).join(&name).exists());
    let claims = std::fs::read_dir(Path::new(STATE_ROOT).join("subnets")).expect("claims");
    for claim in claims.flatten() {
        let owner = std::fs::read_to_string(claim.path()).unwrap_or_default();
        assert_ne!(owner.trim(), name, "claim {:?} left", claim.path());
    }

    // The live prefix is untouched.
    assert!(my_node.netns_path().exists());
    assert!(
        Path::new("/sys/class/net")
            .join(my_fabric.bridge())
            .exists()
    );
    assert!(mine.dir().exists());
}
