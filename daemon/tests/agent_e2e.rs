//! The agent end to end: a real control plane (`basaltd control`), a real
//! agent (`basaltd agent`) driving a private libvirtd in a namespace, and
//! the test guest booted under TCG. The agent joins with a token, runs what
//! is placed on its node, stops and starts it as the spec says, removes it
//! when the placement goes, and — once the control plane is gone for the
//! fencing window — destroys it. Needs root.

mod common;

use basalt_testkit::wait;
use std::time::Duration;

use basalt_api::{
    AdminClient, KernelBoot, Kind, Object, ObjectMeta, Placement, Vm, VmPhase, VmSpec,
};
use basalt_testkit::guest::GuestImage;
use basalt_testkit::{Fabric, Libvirtd, Prefix, Process, ProcessSpec};

use common::BASALTD;
const DEADLINE: Duration = Duration::from_secs(120);

fn domain_state(libvirtd: &Libvirtd, domain: &str) -> String {
    libvirtd
        .virsh(&["domstate", domain])
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "undefined".into())
}

async fn vm_phase(admin: &AdminClient, name: &str) -> Option<(VmPhase, u64, u64)> {
    match admin.get(Kind::Vm, name).await.ok()? {
        Object::Vm(vm) => Some((
            vm.status.phase,
            vm.status.observed_generation,
            vm.meta.generation,
        )),
        _ => None,
    }
}

/// Places VM `web` on n1 unless the control plane's placement controller
/// already did (it is the only node), and checks where it went.
async fn place(admin: &AdminClient) {
    let placement = Placement {
        meta: ObjectMeta::named("web"),
        vm: "web".into(),
        node: "n1".into(),
        epoch: 1,
        replica_nodes: Vec::new(),
    };
    match admin.create(Object::Placement(placement)).await {
        Ok(_) | Err(basalt_api::ApiError::AlreadyExists { .. }) => {}
        Err(err) => panic!("placing web: {err}"),
    }
    let Ok(Object::Placement(p)) = admin.get(Kind::Placement, "web").await else {
        panic!("no placement for web")
    };
    assert_eq!(p.node, "n1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_what_is_placed_and_fences_itself_without_a_control_plane() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let mut fabric = Fabric::new(&prefix).expect("fabric");
    let node = fabric.add_node("n1").expect("node");
    let libvirtd = Libvirtd::start(&prefix, &node, &fabric.hosts()).expect("libvirtd");
    let image = GuestImage::build().expect("guest image");

    let server = format!("127.0.0.1:{}", basalt_testkit::free_port());
    let (mut control, admin) = common::start_control(&prefix, &server, None, DEADLINE, None).await;
    let secret = common::join_token(&admin, "join-n1", 1).await;

    let agent = Process::start(
        &prefix,
        ProcessSpec::new("agent", BASALTD)
            .args([
                "agent",
                "--node",
                "n1",
                "--address",
                "127.0.0.1:7500",
                "--server",
                &server,
            ])
            .args([
                "--libvirt-uri",
                &libvirtd.uri(),
                "--domain-prefix",
                &format!("{}-", prefix.name()),
            ])
            .args([
                "--fence-after-ms",
                "3000",
                "--resync-ms",
                "300",
                "--stop-grace-ms",
                "1000",
            ])
            .arg("--console-dir")
            .arg(prefix.log_dir())
            .env("BASALT_JOIN_TOKEN", &secret),
    )
    .expect("agent");
    let logs = [&control, &agent];
    wait::until("node n1 has joined", DEADLINE, &logs, || async {
        admin.get(Kind::Node, "n1").await.is_ok()
    })
    .await;

    // A VM, placed on n1 by hand (the scheduler's work elsewhere).
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
            ..VmSpec::default()
        },
        ..Vm::default()
    };
    admin.create(Object::Vm(vm.clone())).await.expect("vm");
    place(&admin).await;
    let domain = format!("{}-web", prefix.name());

    wait::until("the domain runs", DEADLINE, &logs, || async {
        domain_state(&libvirtd, &domain) == "running"
    })
    .await;
    wait::until("the VM reports Running for its generation", DEADLINE, &logs, || async {
        matches!(vm_phase(&admin, "web").await, Some((VmPhase::Running, seen, generation)) if seen == generation)
    })
    .await;

    // Stop it through the spec.
    let Object::Vm(mut current) = admin.get(Kind::Vm, "web").await.expect("get") else {
        panic!("a vm")
    };
    current.spec.running = false;
    admin.update(Object::Vm(current)).await.expect("update");
    wait::until("the domain is shut off", DEADLINE, &logs, || async {
        domain_state(&libvirtd, &domain) == "shut off"
    })
    .await;
    wait::until("the VM reports Stopped", DEADLINE, &logs, || async {
        matches!(vm_phase(&admin, "web").await, Some((VmPhase::Stopped, seen, generation)) if seen == generation)
    })
    .await;

    // Start it again, then take the placement away: the domain goes.
    let Object::Vm(mut current) = admin.get(Kind::Vm, "web").await.expect("get") else {
        panic!("a vm")
    };
    current.spec.running = true;
    admin.update(Object::Vm(current)).await.expect("update");
    wait::until("the domain runs again", DEADLINE, &logs, || async {
        domain_state(&libvirtd, &domain) == "running"
    })
    .await;
    // Deleting the VM removes its domain.
    admin
        .delete(Kind::Vm, "web", None)
        .await
        .expect("delete the vm");
    wait::until("the domain is removed", DEADLINE, &logs, || async {
        domain_state(&libvirtd, &domain) == "undefined"
    })
    .await;

    // Declared again, then the control plane dies: the agent fences itself.
    admin.create(Object::Vm(vm)).await.expect("vm again");
    place(&admin).await;
    wait::until("the domain runs once more", DEADLINE, &logs, || async {
        domain_state(&libvirtd, &domain) == "running"
    })
    .await;
    control.kill9().expect("kill the control plane");
    wait::until(
        "the fenced agent has destroyed the domain",
        DEADLINE,
        &[&agent],
        || async { domain_state(&libvirtd, &domain) == "shut off" },
    )
    .await;
    assert!(
        agent.log_tail(200).contains("fencing window"),
        "the agent says why it stopped the VM"
    );
}
