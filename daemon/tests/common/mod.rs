//! What the daemon's end-to-end tests share: a one-member control plane
//! started and answering, join tokens for their agents, and the `basalt`
//! CLI run against it.
//!
//! Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use basalt_api::{AdminClient, JoinToken, JoinTokenSpec, Kind, Object, ObjectMeta};
use basalt_testkit::{Node, Prefix, Process, ProcessSpec, wait};

/// The `basaltd` binary under test.
pub const BASALTD: &str = env!("CARGO_BIN_EXE_basaltd");

/// Starts `basaltd control` bootstrapping a one-member cluster on
/// `server` (inside `netns` when given), with `config` (TOML) as its
/// configuration file when given (e.g. short node leases so a node's loss
/// takes seconds), and waits until it answers.
pub async fn start_control(
    prefix: &Prefix,
    server: &str,
    netns: Option<&Node>,
    deadline: Duration,
    config: Option<&str>,
) -> (Process, AdminClient) {
    let mut spec = ProcessSpec::new("control", BASALTD)
        .args([
            "control",
            "--node-id",
            "1",
            "--bootstrap",
            "--listen",
            server,
        ])
        .arg("--data-dir")
        .arg(prefix.dir().join("control"))
        .env("RUST_LOG", "info");
    if let Some(node) = netns {
        spec = spec.netns(node);
    }
    if let Some(config) = config {
        let path = prefix.dir().join("control.toml");
        std::fs::write(&path, config).expect("write the control plane's config");
        spec = spec.arg("--config").arg(path);
    }
    let control = Process::start(prefix, spec).expect("control plane");
    let admin = AdminClient::connect_lazy(server).expect("client");
    wait::until(
        "the control plane answers",
        deadline,
        &[&control],
        || async { admin.list(Kind::Node).await.is_ok() },
    )
    .await;
    (control, admin)
}

/// Creates join token `name` good for `uses` registrations; returns its
/// secret.
pub async fn join_token(admin: &AdminClient, name: &str, uses: u32) -> String {
    let token = JoinToken {
        meta: ObjectMeta::named(name),
        spec: JoinTokenSpec {
            ttl_seconds: 600,
            max_uses: uses,
            revoked: false,
        },
        ..JoinToken::default()
    };
    let Object::Token(created) = admin.create(Object::Token(token)).await.expect("token") else {
        panic!("a token comes back as a token")
    };
    created
        .secret
        .expect("the secret is returned on create")
        .expose()
        .to_owned()
}

/// The `basalt` CLI built beside `basaltd` (`cargo build -p basalt`).
pub fn basalt_cli() -> PathBuf {
    let path = PathBuf::from(BASALTD).with_file_name("basalt");
    assert!(
        path.is_file(),
        "the basalt CLI is not built at {} (cargo build -p basalt)",
        path.display()
    );
    path
}

/// Runs `basalt --server SERVER ARGS...` (off the async threads).
pub async fn basalt(server: &str, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(basalt_cli());
    command.arg("--server").arg(server).args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run basalt"))
        .await
        .expect("the CLI task")
}

/// A CLI run's status and output, for assertion messages.
pub fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
