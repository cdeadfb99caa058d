//! What the CLI's end-to-end tests share: the binaries under test, running
//! `basalt` as a user does, a one-member control plane with short
//! timings, join tokens, and small readers of the cluster's state.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_api::{AdminClient, JoinToken, Kind, Object, ObjectMeta, Placement, Vm};
use basalt_testkit::{Prefix, Process, ProcessSpec};

/// How long any one wait in these tests may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Short leases and controller periods, so moves happen in seconds.
const CONFIG: &str = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 3000\ncontroller_period_ms = 100\n";

/// The `basalt` binary under test.
pub fn basalt() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_basalt"))
}

/// `basaltd` is built next to `basalt` whenever the workspace's tests are
/// (the daemon's integration tests need it).
pub fn basaltd() -> PathBuf {
    let path = basalt().with_file_name("basaltd");
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo build -p basaltd)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs `basalt --server SERVER ARGS…`; returns (success, stdout + stderr).
pub fn cli(server: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(basalt())
        .arg("--server")
        .arg(server)
        .args(args)
        .output()
        .expect("run basalt");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Runs a command that must succeed; returns its output.
pub fn ok(server: &str, args: &[&str]) -> String {
    let (success, text) = cli(server, args);
    assert!(success, "basalt {args:?} failed:\n{text}");
    text
}

/// Polls `check` until it holds, failing the test after [`DEADLINE`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The VM's placement, if any.
pub async fn placement(admin: &AdminClient, vm: &str) -> Option<Placement> {
    match admin.get(Kind::Placement, vm).await {
        Ok(Object::Placement(p)) => Some(p),
        _ => None,
    }
}

/// The VM, if any.
pub async fn vm(admin: &AdminClient, name: &str) -> Option<Vm> {
    match admin.get(Kind::Vm, name).await {
        Ok(Object::Vm(vm)) => Some(vm),
        _ => None,
    }
}

/// Starts a one-member `basaltd control` on a free loopback port and
/// waits until it leads; returns it, its address and a client.
pub async fn start_control(prefix: &Prefix) -> (Process, String, AdminClient) {
    let config = prefix.dir().join("control.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let server = format!("127.0.0.1:{}", free_port());
    let member = ProcessSpec::new("control-1", basaltd())
        .args(["control", "--bootstrap", "--node-id", "1", "--config"])
        .arg(&config)
        .args(["--listen", &server, "--data-dir"])
        .arg(prefix.dir().join("control-1"))
        .env("RUST_LOG", "info");
    let member = Process::start(prefix, member).expect("start basaltd control");
    let admin = AdminClient::connect_lazy(&server).expect("admin client");
    wait_until("the member leads", || async {
        admin
            .list(Kind::Member)
            .await
            .is_ok_and(|l| !l.objects.is_empty())
    })
    .await;
    (member, server, admin)
}

/// A single-use join token for `node` (a removed node cannot come back
/// with it); returns its secret.
pub async fn join_token(admin: &AdminClient, node: &str) -> String {
    let mut token = JoinToken {
        meta: ObjectMeta::named(format!("join-{node}")),
        ..JoinToken::default()
    };
    token.spec.ttl_seconds = 3600;
    token.spec.max_uses = 1;
    let Ok(Object::Token(token)) = admin.create(Object::Token(token)).await else {
        panic!("create token")
    };
    token.secret.expect("secret").expose().to_owned()
}

/// Waits until `count` nodes are ready.
pub async fn wait_ready_nodes(admin: &AdminClient, count: usize) {
    wait_until(&format!("{count} nodes are ready"), || async {
        admin.list(Kind::Node).await.is_ok_and(|l| {
            l.objects
                .iter()
                .filter(|o| matches!(o, Object::Node(n) if n.status.is_ready()))
                .count()
                == count
        })
    })
    .await;
}

/// The kernel flags every test VM is created with (the simulated
/// hypervisor never opens the files).
pub const KERNEL: [&str; 6] = [
    "--kernel",
    "/boot/vmlinuz",
    "--initrd",
    "/boot/initrd.img",
    "--cmdline",
    "console=ttyS0",
];
