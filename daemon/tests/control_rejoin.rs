//! A real `basaltd agent` (simulated compute) against a real `basaltd
//! control`: when the control plane drops the node's lease (the agent was
//! frozen past its lease, so the node was marked not ready), the agent
//! registers again with the node credential its first registration
//! returned — its single-use join token is spent — and keeps its uid and
//! its VM; and after the control-plane leader is killed and restarted
//! from its data directory, the agent keeps working (the VM runs again);
//! and the agent keeps its credential in a file, so after a kill -9 and a
//! new start it registers with it instead of the spent token.

mod common;

use common::BASALTD;

use basalt_testkit::wait;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use basalt_api::{AdminClient, KernelBoot, Kind, Object, ObjectMeta, Vm, VmPhase};
use basalt_testkit::{Prefix, Process, ProcessSpec};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const DEADLINE: Duration = Duration::from_secs(60);
const CONFIG: &str = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 3000\ncontroller_period_ms = 100\n";

async fn node(admin: &AdminClient, name: &str) -> Option<basalt_api::Node> {
    match admin.get(Kind::Node, name).await {
        Ok(Object::Node(node)) => Some(node),
        _ => None,
    }
}

async fn vm_running_on(admin: &AdminClient, name: &str, node: &str) -> bool {
    match admin.get(Kind::Vm, name).await {
        Ok(Object::Vm(vm)) => {
            vm.status.phase == VmPhase::Running && vm.status.node.as_deref() == Some(node)
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registers_again_with_its_credential_and_survives_a_leader_restart() {
    let prefix = Prefix::for_test().expect("prefix");
    let address = format!("127.0.0.1:{}", basalt_testkit::free_port());
    let (mut member, admin) =
        common::start_control(&prefix, &address, None, DEADLINE, Some(CONFIG)).await;

    // A token good for exactly one registration.
    let secret = common::join_token(&admin, "once", 1).await;

    let credential_file = prefix.dir().join("agent-state/node-credential");
    let agent_spec = ProcessSpec::new("agent-n1", BASALTD)
        .args([
            "agent",
            "--node",
            "n1",
            "--address",
            "127.0.0.1:7501",
            "--server",
            &address,
            "--compute",
            "sim",
            "--cpus",
            "4",
            "--memory-mib",
            "4096",
            "--fence-after-ms",
            "1500",
            "--resync-ms",
            "300",
            "--stop-grace-ms",
            "200",
            "--console-dir",
        ])
        .arg(prefix.dir().join("console"))
        .arg("--credential-file")
        .arg(&credential_file)
        .env("BASALT_JOIN_TOKEN", &secret)
        .env("RUST_LOG", "info");
    let mut agent = Process::start(&prefix, agent_spec).expect("start basaltd agent");
    wait::until("n1 is ready", DEADLINE, &[], || async {
        node(&admin, "n1")
            .await
            .is_some_and(|n| n.status.is_ready())
    })
    .await;
    let first = node(&admin, "n1").await.expect("n1");
    assert_eq!(
        first.status.credential_sha256.len(),
        64,
        "the node stores its credential's hash"
    );

    let mut vm = Vm {
        meta: ObjectMeta::named("web"),
        ..Vm::default()
    };
    vm.spec.cpus = 1;
    vm.spec.memory_mib = 128;
    vm.spec.running = true;
    // Simulated compute boots nothing; the path only has to be absolute.
    vm.spec.kernel = Some(KernelBoot {
        kernel: "/boot/vmlinuz".into(),
        initrd: "/boot/initrd.img".into(),
        cmdline: "console=ttyS0".into(),
    });
    admin.create(Object::Vm(vm)).await.expect("create vm");
    wait::until("web runs on n1", DEADLINE, &[], || {
        vm_running_on(&admin, "web", "n1")
    })
    .await;

    // Freeze the agent past its lease: the node is marked not ready and
    // its lease dropped; the next heartbeat is refused.
    let pid = Pid::from_raw(i32::try_from(agent.pid()).expect("pid"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    wait::until("n1 is marked not ready", DEADLINE, &[], || async {
        node(&admin, "n1")
            .await
            .is_some_and(|n| !n.status.is_ready())
    })
    .await;
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    wait::until(
        "n1 registered again and is ready",
        DEADLINE,
        &[],
        || async {
            node(&admin, "n1")
                .await
                .is_some_and(|n| n.status.is_ready())
        },
    )
    .await;
    let again = node(&admin, "n1").await.expect("n1");
    assert_eq!(again.meta.uid, first.meta.uid, "same node, same uid");
    let Ok(Object::Token(spent)) = admin.get(Kind::Token, "once").await else {
        panic!("get token")
    };
    assert_eq!(
        spent.status.uses, 1,
        "the agent came back with its credential, not the spent token"
    );
    assert!(
        agent.logs().contains("registered again"),
        "{}",
        agent.log_tail(30)
    );
    wait::until("web runs on n1 again", DEADLINE, &[], || {
        vm_running_on(&admin, "web", "n1")
    })
    .await;

    // Kill the leader (the only member) and bring it back from its data
    // directory, after the agent's fencing window: the agent keeps
    // working and runs its VM again.
    member.kill9().expect("kill -9 the leader");
    tokio::time::sleep(Duration::from_secs(3)).await;
    member.restart().expect("restart the leader");
    wait::until(
        "n1 is ready under the new leader",
        DEADLINE,
        &[],
        || async {
            node(&admin, "n1")
                .await
                .is_some_and(|n| n.status.is_ready())
        },
    )
    .await;
    wait::until("web runs on n1 after the restart", DEADLINE, &[], || {
        vm_running_on(&admin, "web", "n1")
    })
    .await;
    // And it stays ready over several leases.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = node(&admin, "n1").await.expect("n1");
    assert!(later.status.is_ready(), "{later:?}\n{}", agent.log_tail(30));
    assert_eq!(later.meta.uid, first.meta.uid);

    // The credential outlives the agent process: it was kept in the file
    // (owner-only), and an agent killed and started again — its token
    // spent — registers with it.
    let mode = std::fs::metadata(&credential_file)
        .expect("the agent kept its credential in the file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the credential file is owner-only");
    agent.kill9().expect("kill -9 the agent");
    agent.restart().expect("start the agent again");
    wait::until(
        "the restarted agent registered with its stored credential",
        DEADLINE,
        &[&agent],
        || async {
            agent
                .logs()
                .contains("registered with the stored node credential")
        },
    )
    .await;
    wait::until(
        "web runs on n1 after the agent restart",
        DEADLINE,
        &[&agent],
        || vm_running_on(&admin, "web", "n1"),
    )
    .await;
    let restarted = node(&admin, "n1").await.expect("n1");
    assert_eq!(restarted.meta.uid, first.meta.uid, "same node, same uid");
    let Ok(Object::Token(spent)) = admin.get(Kind::Token, "once").await else {
        panic!("get token")
    };
    assert_eq!(spent.status.uses, 1, "the spent token was not used again");

    // With neither a token nor a stored credential there is nothing to
    // register with: the agent says so, naming the settings.
    let out = std::process::Command::new(BASALTD)
        .args([
            "agent",
            "--check-config",
            "--node",
            "n9",
            "--address",
            "127.0.0.1:7509",
        ])
        .arg("--credential-file")
        .arg(prefix.dir().join("agent-state/none"))
        .env_remove("BASALT_JOIN_TOKEN")
        .output()
        .expect("run basaltd agent --check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("BASALT_JOIN_TOKEN") && stderr.contains("BASALT_CREDENTIAL_FILE"),
        "{stderr}"
    );
}
