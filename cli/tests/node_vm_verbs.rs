//! The `basalt node` and `basalt vm` verbs, run as a user runs them,
//! against a real `basaltd control` and three real `basaltd agent`s with
//! simulated compute (fast): create from flags and from a file with
//! `--wait`, list, get, stop, start, restart, console, cordon (no new VM
//! lands there), uncordon, drain (every VM moves off with a higher epoch
//! and runs again elsewhere; the agents are separate processes whose
//! simulated hypervisors cannot reach each other, so each live migration
//! fails and the VM moves cold — `node_drain.rs` has the live moves),
//! remove (refused while VMs are there, then
//! allowed; `--force` moves the VMs after the node is gone), delete.

mod common;

use std::path::Path;
use std::time::Duration;

use basalt_api::{Kind, Object, Placement, VmPhase};
use basalt_testkit::{Prefix, Process, ProcessSpec};

use common::{KERNEL, basaltd, cli, join_token, ok, placement, vm, wait_until};

fn start_agent(prefix: &Prefix, server: &str, node: &str, token: &str) -> Process {
    let spec = ProcessSpec::new(format!("agent-{node}"), basaltd())
        .args([
            "agent",
            "--node",
            node,
            "--address",
            "127.0.0.1:7501",
            "--server",
            server,
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
        .arg(prefix.dir().join(format!("console-{node}")))
        .env("BASALT_JOIN_TOKEN", token)
        .env("RUST_LOG", "info");
    Process::start(prefix, spec).expect("start basaltd agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_vm_verbs_against_a_real_cluster() {
    let prefix = Prefix::for_test().expect("prefix");
    let (_member, server, admin) = common::start_control(&prefix).await;

    // One single-use token per node: a removed node cannot come back.
    let mut agents = Vec::new();
    for node in ["n1", "n2", "n3"] {
        let secret = join_token(&admin, node).await;
        agents.push(start_agent(&prefix, &server, node, &secret));
    }
    common::wait_ready_nodes(&admin, 3).await;
    let nodes = ok(&server, &["node", "list"]);
    for node in ["n1", "n2", "n3"] {
        assert!(nodes.contains(node), "{nodes}");
    }

    // vm create from flags, waiting until it runs.
    let mut args = vec!["vm", "create", "web", "--cpus", "1", "--memory", "128M"];
    args.extend(KERNEL);
    args.extend(["--wait", "--timeout", "60s"]);
    let out = ok(&server, &args);
    assert!(out.contains("vm/web is Running"), "{out}");
    // Bad flags are refused before any server is asked.
    let (success, out) = cli("127.0.0.1:1", &["vm", "create", "bad", "--disk", "size=1G"]);
    assert!(!success && out.contains("name="), "{out}");

    // vm create from a file.
    let file = prefix.dir().join("db.yaml");
    std::fs::write(
        &file,
        "kind: vm\nmeta: {name: db}\nspec:\n  cpus: 1\n  memory_mib: 128\n  running: true\n  kernel: {kernel: /boot/vmlinuz, initrd: /boot/initrd.img, cmdline: console=ttyS0}\n",
    )
    .expect("write db.yaml");
    let out = ok(
        &server,
        &[
            "vm",
            "create",
            "-f",
            path(&file),
            "--wait",
            "--timeout",
            "60s",
        ],
    );
    assert!(out.contains("vm/db is Running"), "{out}");

    let list = ok(&server, &["vm", "list"]);
    assert!(list.contains("web") && list.contains("db"), "{list}");
    let json = ok(&server, &["-o", "json", "vm", "get", "web"]);
    let Object::Vm(got) = serde_json::from_str(&json).expect("vm get -o json") else {
        panic!("not a VM: {json}")
    };
    assert_eq!(got.status.phase, VmPhase::Running);

    // stop, start, restart, each waited for.
    let out = ok(
        &server,
        &["vm", "stop", "web", "--wait", "--timeout", "60s"],
    );
    assert!(out.contains("vm/web is Stopped"), "{out}");
    assert!(!vm(&admin, "web").await.expect("web").spec.running);
    let out = ok(
        &server,
        &["vm", "start", "web", "--wait", "--timeout", "60s"],
    );
    assert!(out.contains("vm/web is Running"), "{out}");
    let out = ok(
        &server,
        &["vm", "restart", "web", "--wait", "--timeout", "60s"],
    );
    let stopped = out.find("vm/web is Stopped").expect("restart stops first");
    let running = out.find("vm/web is Running").expect("then starts");
    assert!(stopped < running, "{out}");

    // console: the log the node's agent writes, when it is on this machine.
    let web_node = placement(&admin, "web").await.expect("web placed").node;
    let console_dir = prefix.dir().join(format!("console-{web_node}"));
    let out = ok(
        &server,
        &[
            "vm",
            "console",
            "web",
            "--console-dir",
            path(&prefix.dir().join("nowhere")),
        ],
    );
    assert!(out.contains(&format!("runs on node {web_node}")), "{out}");
    std::fs::create_dir_all(&console_dir).expect("console dir");
    std::fs::write(console_dir.join("web.log"), "Linux version 6\nlogin: ").expect("log");
    let out = ok(
        &server,
        &["vm", "console", "web", "--console-dir", path(&console_dir)],
    );
    assert!(out.contains("Linux version 6"), "{out}");

    // accept-copy refuses what would accept nothing, naming why.
    let (success, out) = cli(&server, &["vm", "accept-copy", "web", "--node", &web_node]);
    assert!(
        !success && out.contains("placed on") && out.contains("already"),
        "{out}"
    );
    let (success, out) = cli(
        &server,
        &["vm", "accept-copy", "web", "--node", "elsewhere"],
    );
    assert!(!success && out.contains("holds no copy"), "{out}");
    assert!(
        !vm(&admin, "web")
            .await
            .expect("web")
            .meta
            .labels
            .contains_key(basalt_api::Vm::ACCEPT_COPY_LABEL)
    );

    // migrate --cancel: nothing to cancel yet; then a request (these
    // simulated hypervisors cannot reach each other, so the copy fails
    // soon) is cancelled while under way or found ended, either way said.
    let (success, out) = cli(&server, &["vm", "migrate", "web", "--cancel"]);
    assert!(
        !success && out.contains("has no migration to cancel"),
        "{out}"
    );
    ok(&server, &["vm", "migrate", "web"]);
    let (success, out) = cli(&server, &["vm", "migrate", "web", "--cancel"]);
    assert!(
        (success && out.contains("migration of web cancelled"))
            || (!success && out.contains("has ended; nothing to cancel")),
        "{out}"
    );
    if success {
        assert!(matches!(
            admin.get(Kind::Migration, "web").await,
            Err(basalt_api::ApiError::NotFound { .. })
        ));
    }
    wait_until("web runs after its migration is gone or failed", || async {
        vm(&admin, "web")
            .await
            .is_some_and(|v| v.status.phase == VmPhase::Running)
    })
    .await;

    // cordon: a new VM never lands on the cordoned node.
    let out = ok(&server, &["node", "cordon", &web_node]);
    assert!(out.contains("cordoned"), "{out}");
    for i in 0..3 {
        let name = format!("extra-{i}");
        let mut args = vec!["vm", "create", name.as_str(), "--memory", "64"];
        args.extend(KERNEL);
        args.extend(["--wait", "--timeout", "60s"]);
        ok(&server, &args);
        let p = placement(&admin, &name).await.expect("placed");
        assert_ne!(p.node, web_node, "{name} landed on the cordoned node");
    }
    ok(&server, &["node", "uncordon", &web_node]);
    let Ok(Object::Node(n)) = admin.get(Kind::Node, &web_node).await else {
        panic!("node")
    };
    assert!(!n.spec.cordoned);

    // drain: every VM on the node moves off with epoch + 1 and runs again.
    let before: Vec<Placement> = admin
        .list(Kind::Placement)
        .await
        .expect("placements")
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Placement(p) if p.node == web_node => Some(p),
            _ => None,
        })
        .collect();
    assert!(!before.is_empty());
    let out = ok(
        &server,
        &["node", "drain", &web_node, "--wait", "--timeout", "60s"],
    );
    assert!(out.contains("drained"), "{out}");
    for old in &before {
        let now = placement(&admin, &old.vm).await.expect("still placed");
        assert_ne!(now.node, web_node, "{} still on the drained node", old.vm);
        assert_eq!(now.epoch, old.epoch + 1, "{} moved with epoch + 1", old.vm);
        assert!(!now.is_evicting());
        let target = now.node.clone();
        let name = old.vm.clone();
        wait_until(&format!("{name} runs on {target}"), || async {
            vm(&admin, &name).await.is_some_and(|v| {
                v.status.phase == VmPhase::Running && v.status.node.as_deref() == Some(&*target)
            })
        })
        .await;
    }

    // remove: refused while VMs are placed, allowed on the drained node,
    // and a removed node stays removed (its single-use token is spent).
    let busy = placement(&admin, "web").await.expect("web").node;
    let (success, out) = cli(&server, &["node", "remove", &busy]);
    // Refused by the control plane, naming the VM.
    assert!(
        !success && out.contains("still has") && out.contains("web") && out.contains("--force"),
        "{out}"
    );
    let out = ok(&server, &["node", "remove", &web_node]);
    assert!(out.contains("removed"), "{out}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        matches!(
            admin.get(Kind::Node, &web_node).await,
            Err(basalt_api::ApiError::NotFound { .. })
        ),
        "the removed node came back"
    );

    // remove --force: the node's VMs move once it is gone.
    let moved: Vec<String> = admin
        .list(Kind::Placement)
        .await
        .expect("placements")
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Placement(p) if p.node == busy => Some(p.vm),
            _ => None,
        })
        .collect();
    let out = ok(&server, &["node", "remove", &busy, "--force"]);
    assert!(out.contains("move to other nodes"), "{out}");
    let last = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != busy && *n != web_node)
        .expect("a node is left");
    for name in &moved {
        wait_until(&format!("{name} runs on {last}"), || async {
            vm(&admin, name).await.is_some_and(|v| {
                v.status.phase == VmPhase::Running && v.status.node.as_deref() == Some(last)
            })
        })
        .await;
    }

    // delete, waited for until its node let go.
    let out = ok(
        &server,
        &["vm", "delete", "web", "--wait", "--timeout", "60s"],
    );
    assert!(out.contains("gone from its node"), "{out}");
    assert!(vm(&admin, "web").await.is_none());
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}
