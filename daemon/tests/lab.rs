//! `basaltd lab` end to end, as an operator runs it: up, status, up again
//! (idempotent), the VM answers and keeps its disk, the control plane
//! shows it running on the node its agent reports, down removes exactly
//! what up made. Needs root; skipped (with a message) when a lab is
//! already up on this machine, so a developer's lab is never touched.

use std::process::{Command, Output};

use basalt_testkit::guest::GuestClient;
use basalt_testkit::prefix::LAB_PREFIX;
use basalt_testkit::sweep;

fn basaltd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_basaltd"))
        .args(args)
        .output()
        .expect("basaltd runs")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits (30 s at most) for `want`, e.g. `10.0.0.2 via 10.99.0.2`, among
/// the route follower's routes in the root namespace.
fn wait_route(want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let routes = Command::new("ip")
            .args(["route", "show", "proto", "186"])
            .output()
            .unwrap();
        let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
        if routes.contains(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no route {want:?} in the root namespace: {routes}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Tears the lab down even when an assertion fails half-way.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let out = basaltd(&["lab", "down"]);
        if !out.status.success() {
            eprintln!("lab down failed: {}", text(&out));
        }
    }
}

#[test]
fn lab_up_status_down() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    if !sweep::objects(LAB_PREFIX).is_empty() {
        eprintln!("skipped: a lab is up on this machine; not touching it");
        return;
    }
    let _down = Down;

    let out = basaltd(&["lab", "up", "--nodes", "2"]);
    assert!(out.status.success(), "lab up: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("/run/basalt-testkit/bl0000/lab.json").unwrap(),
    )
    .unwrap();
    let vm_ip: std::net::Ipv4Addr = state["vm"]["ip"].as_str().unwrap().parse().unwrap();
    assert!(
        stdout.contains(&vm_ip.to_string()),
        "lab up names the VM's address: {stdout}"
    );

    // The VM answers from the host at the address it took by DHCP, and
    // its disk works.
    let vm = GuestClient::new(vm_ip);
    assert_eq!(vm.echo("ping").unwrap(), "ping");
    vm.write_disk("kept").unwrap();
    let record = vm.read_disk().unwrap();
    assert_eq!((record.boots, record.data.as_str()), (1, "kept"));

    // The cluster behind it: both nodes joined, the VM runs where it was
    // placed, as its agent reports.
    let server = state["vm"]["server"].as_str().unwrap().to_owned();
    // Every control-plane member is named, so no client (agents included)
    // depends on one member.
    assert_eq!(server.split(',').count(), 2, "{server}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let admin = basalt_api::AdminClient::connect(&server).await.unwrap();
        let nodes = admin.list(basalt_api::Kind::Node).await.unwrap();
        assert_eq!(nodes.objects.len(), 2, "{nodes:?}");
        let basalt_api::Object::Vm(vm) = admin.get(basalt_api::Kind::Vm, "lab-vm").await.unwrap()
        else {
            panic!("lab-vm is a vm")
        };
        assert_eq!(vm.status.phase, basalt_api::VmPhase::Running, "{vm:?}");
        assert_eq!(vm.status.node.as_deref(), state["vm"]["node"].as_str());
        // Its disk has a replica on each of the two nodes.
        let basalt_api::Object::Placement(placement) = admin
            .get(basalt_api::Kind::Placement, "lab-vm")
            .await
            .unwrap()
        else {
            panic!("lab-vm is placed")
        };
        assert_eq!(placement.replica_nodes.len(), 2, "{placement:?}");
        assert_eq!(Some(placement.node.as_str()), state["vm"]["node"].as_str());
        // The address the guest answers at is the one IPAM leased to its
        // NIC: the guest has no address but what DHCP gave it.
        let endpoints = admin.list(basalt_api::Kind::Endpoint).await.unwrap();
        let leased: Vec<_> = endpoints
            .objects
            .iter()
            .filter_map(|o| match o {
                basalt_api::Object::Endpoint(e) if e.vm == "lab-vm" => Some(e.ip),
                _ => None,
            })
            .collect();
        assert_eq!(leased, [Some(vm_ip)], "{endpoints:?}");
    });

    // The root namespace has the VM's own route, through the node that
    // holds it, from the route follower (so it follows moves).
    let holder = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == state["vm"]["node"])
        .map(|n| n["address"].as_str().unwrap().to_owned())
        .unwrap();
    wait_route(&format!("{vm_ip} via {holder}"));

    // The VM moves live to the other node: it keeps its address, its
    // disk and its boot (no restart), and the host's route follows it.
    let (target, target_address) = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] != state["vm"]["node"])
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_owned(),
                n["address"].as_str().unwrap().to_owned(),
            )
        })
        .unwrap();
    runtime.block_on(async {
        let admin = basalt_api::AdminClient::connect(&server).await.unwrap();
        let request = basalt_api::Migration {
            meta: basalt_api::ObjectMeta::named("lab-vm"),
            spec: basalt_api::MigrationSpec {
                vm: "lab-vm".into(),
                target: Some(target.clone()),
                ..basalt_api::MigrationSpec::default()
            },
            ..basalt_api::Migration::default()
        };
        admin
            .create(basalt_api::Object::Migration(request))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let Ok(basalt_api::Object::Migration(m)) =
                admin.get(basalt_api::Kind::Migration, "lab-vm").await
            else {
                panic!("the migration is gone")
            };
            if m.status.phase == basalt_api::MigrationPhase::Succeeded {
                break;
            }
            assert!(
                m.status.phase != basalt_api::MigrationPhase::Failed,
                "the lab VM's migration failed: {m:?}"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "the lab VM's migration did not finish: {m:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        // The VM's status follows from the target agent's report, a moment
        // after the migration's own success.
        loop {
            let basalt_api::Object::Vm(moved) =
                admin.get(basalt_api::Kind::Vm, "lab-vm").await.unwrap()
            else {
                panic!("lab-vm is a vm")
            };
            if moved.status.node.as_deref() == Some(target.as_str()) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "lab-vm's status never named {target}: {:?}",
                moved.status
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    wait_route(&format!("{vm_ip} via {target_address}"));
    assert_eq!(vm.echo("moved").unwrap(), "moved");
    let record = vm.read_disk().unwrap();
    assert_eq!((record.boots, record.data.as_str()), (1, "kept"));

    // Status finds the VM where it runs now.
    let out = basaltd(&["lab", "status"]);
    assert!(out.status.success(), "lab status: {}", text(&out));
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("answers: yes") && status.contains(&format!("on {target}: ")),
        "{}",
        text(&out)
    );

    // A second `up` finds the lab healthy and changes nothing: the VM
    // was not rebooted.
    let out = basaltd(&["lab", "up", "--nodes", "2"]);
    assert!(out.status.success(), "second lab up: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already up"),
        "{}",
        text(&out)
    );
    assert_eq!(vm.read_disk().unwrap().boots, 1);

    // Asking for another size is refused, naming both.
    let out = basaltd(&["lab", "up", "--nodes", "3"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2 nodes"),
        "{}",
        text(&out)
    );

    let out = basaltd(&["lab", "down"]);
    assert!(out.status.success(), "lab down: {}", text(&out));
    let left = sweep::objects(LAB_PREFIX);
    assert!(left.is_empty(), "lab down left {left:?}");
    assert!(
        !std::path::Path::new("/sys/fs/bpf/basalt/n1").exists(),
        "lab down removes the agents' pinned datapaths"
    );
    // An echo round trip, not a connect: the host's uplink may accept any
    // connection once the lab's route is gone.
    assert!(
        vm.echo("gone").is_err(),
        "the VM still answers after lab down"
    );
    let out = basaltd(&["lab", "status"]);
    assert!(
        !out.status.success(),
        "status after down must fail: {}",
        text(&out)
    );
}

#[test]
fn bad_flags_are_named_and_never_panic() {
    let out = basaltd(&["lab", "up", "--nodes", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--nodes"),
        "{}",
        text(&out)
    );
    let out = basaltd(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--frobnicate"),
        "{}",
        text(&out)
    );
}
