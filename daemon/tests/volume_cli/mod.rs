//! What the cluster volume tests share: the `basalt` CLI run against a
//! control plane, and volumes read back through it (`-o json`).

use std::process::Output;
use std::time::Duration;

use basalt_api::{Object, ReplicaState, Volume};
use basalt_testkit::{Process, wait};

use crate::common::basalt_cli;
pub use crate::common::text;

/// Runs `basalt --server SERVER ARGS...` (off the async threads).
pub async fn basalt(server: &str, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(basalt_cli());
    command
        .env_remove("BASALT_STORAGE_SOCKET")
        .arg("--server")
        .arg(server)
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run basalt"))
        .await
        .expect("the CLI task")
}

/// `basalt volume get NAME -o json`, parsed; `None` while it fails.
pub async fn cli_volume(server: &str, name: &str) -> Option<Volume> {
    let out = basalt(server, &["volume", "get", name, "-o", "json"]).await;
    if !out.status.success() {
        return None;
    }
    match serde_json::from_slice::<Object>(&out.stdout) {
        Ok(Object::Volume(v)) => Some(v),
        other => panic!(
            "basalt volume get printed no volume: {other:?}\n{}",
            text(&out)
        ),
    }
}

/// Every copy up to date, as the primary sees it and as its own node
/// does, none marked outdated.
#[allow(dead_code)] // not every test of volumes waits on copies
pub fn all_up(v: &Volume) -> bool {
    v.status.replicas.iter().all(|r| {
        r.state == ReplicaState::UpToDate
            && r.node_state == Some(ReplicaState::UpToDate)
            && !r.outdated
    })
}

/// Creates a 2-copy standalone volume `name` of 16 MiB and waits (up to
/// `deadline`) until both copies are up to date; returns it.
#[allow(dead_code)] // not every test of volumes makes one
pub async fn two_copies(server: &str, name: &str, logs: &[&Process], deadline: Duration) -> Volume {
    let out = basalt(
        server,
        &["volume", "create", name, "--size", "16M", "--copies", "2"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    wait::until("both copies up to date", deadline, logs, || async {
        cli_volume(server, name)
            .await
            .is_some_and(|v| v.status.replicas.len() == 2 && all_up(&v))
    })
    .await;
    cli_volume(server, name).await.expect("the volume")
}

/// Each copy's node and state, in the status's order.
#[allow(dead_code)] // not every test of volumes looks at each copy
pub fn states(v: &Volume) -> Vec<(String, ReplicaState)> {
    v.status
        .replicas
        .iter()
        .map(|r| (r.node.clone(), r.state))
        .collect()
}

/// `basalt vm create NAME --memory MEMORY --disk DISK`, which must
/// succeed.
#[allow(dead_code)] // the tests of standalone volumes make no VM
pub async fn create_vm(server: &str, name: &str, memory: &str, disk: &str) {
    let out = basalt(
        server,
        &["vm", "create", name, "--memory", memory, "--disk", disk],
    )
    .await;
    assert!(out.status.success(), "vm create {name}: {}", text(&out));
}

/// `basalt node drain NODE --storage --wait --timeout TIMEOUT`, which
/// must succeed; returns what it printed.
#[allow(dead_code)] // only the tests of moving copies drain
pub async fn drain_storage(server: &str, node: &str, timeout: std::time::Duration) -> String {
    let timeout = format!("{}s", timeout.as_secs());
    let out = basalt(
        server,
        &[
            "node",
            "drain",
            node,
            "--storage",
            "--wait",
            "--timeout",
            &timeout,
        ],
    )
    .await;
    assert!(out.status.success(), "node drain {node}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
