//! Clients given every member's address: three `basaltd control`
//! processes on loopback, the `basalt` CLI and the typed clients given
//! `--server a,b,c`. With the first member killed (`kill -9`; it was the
//! bootstrap member, so usually the leader too), the CLI still reads and
//! writes through the list, the typed clients move on to the next member
//! and stay there, while a CLI given only the dead member fails naming it.
//! `basalt cluster status` shows every member answering, then the dead
//! one not answering and the quorum kept by the two others; with a
//! second member killed it fails, naming what it could not read.

use std::process::Output;
use std::time::Duration;

use basalt_api::{AdminClient, Kind};
use basalt_testkit::{Prefix, wait};

mod common;
mod control_trio;

use common::basalt_cli;
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs the CLI with `args` (off the async threads).
async fn cli(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(basalt_cli())
            .args(&args)
            .env_remove("BASALT_SERVER")
            .output()
            .expect("run basalt")
    })
    .await
    .expect("the CLI task")
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `basalt --server SERVERS cluster status -o json`, parsed.
async fn cluster_status(servers: &str) -> serde_json::Value {
    let output = cli(vec![
        "--server".into(),
        servers.into(),
        "-o".into(),
        "json".into(),
        "cluster".into(),
        "status".into(),
    ])
    .await;
    assert!(output.status.success(), "{}", text(&output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| panic!("{err}: {}", text(&output)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_every_member_survives_the_loss_of_one() {
    let prefix = Prefix::for_test().expect("prefix");
    let control_trio::Trio {
        addresses,
        mut processes,
    } = control_trio::start(&prefix);
    let all = addresses.join(",");
    let client = AdminClient::connect_lazy(&all).expect("a client of every member");
    wait::until("three voters", DEADLINE, &[], || async {
        matches!(control_trio::members(&client).await, Some((3, _)))
    })
    .await;

    let listed = cli(vec![
        "--server".into(),
        all.clone(),
        "list".into(),
        "members".into(),
    ])
    .await;
    assert!(listed.status.success(), "{}", text(&listed));
    let before = cluster_status(&all).await;
    assert_eq!(before["quorum"]["answering"], 3, "{before}");
    assert_eq!(
        before["members"]
            .as_array()
            .map(|m| m.iter().filter(|m| m["leader"] == true).count()),
        Some(1),
        "one leader: {before}"
    );
    assert_eq!(before["healthy"], true, "{before}");

    processes[0].kill9().expect("kill -9 the first member");

    // The CLI connects to the first member that accepts, and its calls go
    // there: a read and a write (the survivors elect a leader meanwhile;
    // the member asked waits for it).
    let listed = cli(vec![
        "--server".into(),
        all.clone(),
        "list".into(),
        "members".into(),
    ])
    .await;
    assert!(
        listed.status.success(),
        "list through the list of members: {}",
        text(&listed)
    );
    let created = cli(vec![
        "--server".into(),
        all.clone(),
        "token".into(),
        "create".into(),
        "--name".into(),
        "after-the-loss".into(),
    ])
    .await;
    assert!(
        created.status.success(),
        "a write through the list of members: {}",
        text(&created)
    );

    // The typed client, whose first call went to the dead member: it moves
    // on, and the next calls go to the member that answered.
    let token = client
        .get(Kind::Token, "after-the-loss")
        .await
        .expect("a read through the client of every member");
    assert_eq!(token.name(), "after-the-loss");
    let nodes = client
        .list(Kind::Node)
        .await
        .expect("a second read through the client of every member");
    assert!(nodes.objects.is_empty());

    // `cluster status` names the member that does not answer; the two
    // others still make a quorum.
    let after = cluster_status(&all).await;
    assert_eq!(after["quorum"]["voters"], 3, "{after}");
    assert_eq!(after["quorum"]["answering"], 2, "{after}");
    assert_eq!(after["healthy"], false, "{after}");
    let silent: Vec<&serde_json::Value> = after["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["answers"] == false)
        .collect();
    assert_eq!(silent.len(), 1, "{after}");
    assert_eq!(silent[0]["address"], addresses[0].as_str(), "{after}");
    assert!(silent[0]["error"].is_string(), "{after}");

    // The same CLI given only the dead member fails, and says which.
    let dead = cli(vec![
        "--server".into(),
        addresses[0].clone(),
        "list".into(),
        "members".into(),
    ])
    .await;
    assert!(!dead.status.success(), "{}", text(&dead));
    assert!(
        String::from_utf8_lossy(&dead.stderr).contains(&addresses[0]),
        "{}",
        text(&dead)
    );

    // A second member gone: no quorum, so `cluster status` fails, and in
    // bounded time, instead of showing a state nobody can vouch for.
    processes[1].kill9().expect("kill -9 the second member");
    let lost = tokio::time::timeout(
        DEADLINE,
        cli(vec![
            "--server".into(),
            all.clone(),
            "cluster".into(),
            "status".into(),
        ]),
    )
    .await
    .expect("cluster status answers without a quorum too");
    assert!(!lost.status.success(), "{}", text(&lost));
    assert!(
        String::from_utf8_lossy(&lost.stderr).contains("reading the cluster's"),
        "{}",
        text(&lost)
    );
}
