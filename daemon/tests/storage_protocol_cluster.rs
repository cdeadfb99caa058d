//! The replication protocol through the cluster API down to the storage
//! processes (decision 66), with real storage processes (root,
//! namespaces): a control plane on namespace node `cp`, and on nodes `a`
//! and `b` `basaltd storage serve --replica-listen` and `basaltd agent
//! --compute sim`.
//!
//! `basalt volume create fast --size 16M --copies 2 --protocol A`: the
//! volume object keeps protocol A (`basalt volume get` shows it), both
//! copies come up to date, and the primary's storage process holds the
//! volume attached primary with protocol A (its attachments file, which
//! it writes before `AttachVolume` returns); a write through the primary
//! reaches the secondary. `--protocol D` is refused naming the flag.
//!
//! A VM disk's protocol likewise: `basalt vm create web --disk
//! name=root,size=16M,replicas=2,protocol=B` gives volume `web-root`
//! protocol B and its primary's attachment protocol B; `protocol=D` is
//! refused naming the field.

mod common;
mod replica_node;
mod storage_cli;
mod volume_cli;

use std::time::Duration;

use basalt_api::{ReplicaState, ReplicationProtocol};
use basalt_testkit::{Prefix, wait};

use replica_node::{PATTERN_AT, SHORT_LEASES, SimCluster, pattern, read_export, write_pattern};
use volume_cli::{basalt, cli_volume, create_vm, states, text};

const DEADLINE: Duration = Duration::from_secs(90);

/// The line of `storage_name` in node `node`'s attachments file, if any.
fn attachment_line(prefix: &Prefix, node: &str, storage_name: &str) -> Option<String> {
    let pool = prefix.dir().join(format!("pool-{node}.img"));
    let file = std::fs::read_to_string(storage_cli::attachments_file(&pool)).ok()?;
    file.lines()
        .find(|l| l.split_whitespace().next() == Some(storage_name))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_created_with_protocol_a_is_attached_with_a_on_its_primary() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cluster = SimCluster::start(&["a", "b"], SHORT_LEASES, DEADLINE).await;
    let (server, logs) = (cluster.server.as_str(), cluster.logs());

    // A bad protocol is refused before anything is stored.
    let out = basalt(
        server,
        &[
            "volume",
            "create",
            "bad",
            "--size",
            "16M",
            "--protocol",
            "D",
        ],
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--protocol"), "{}", text(&out));
    assert!(cli_volume(server, "bad").await.is_none());

    let out = basalt(
        server,
        &[
            "volume",
            "create",
            "fast",
            "--size",
            "16M",
            "--copies",
            "2",
            "--protocol",
            "A",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let up = vec![
        ("a".to_owned(), ReplicaState::UpToDate),
        ("b".to_owned(), ReplicaState::UpToDate),
    ];
    wait::until("both copies up to date", DEADLINE, &logs, || async {
        cli_volume(server, "fast")
            .await
            .is_some_and(|v| states(&v) == up)
    })
    .await;
    let volume = cli_volume(server, "fast").await.expect("fast");
    assert_eq!(volume.spec.protocol, ReplicationProtocol::A, "{volume:?}");
    let out = basalt(server, &["volume", "get", "fast"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        shown
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["protocol", "A"]),
        "{shown}"
    );

    // The primary's storage process holds it primary under protocol A.
    let pool_name = volume.status.storage_name.clone();
    let primary = volume.status.primary_node.clone();
    let line = attachment_line(&cluster.prefix, &primary, &pool_name)
        .unwrap_or_else(|| panic!("no attachment of {pool_name} on {primary}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.get(1), Some(&"primary"), "{line}");
    assert!(words.contains(&"protocol=A"), "{line}");

    // Replicated all the same.
    let secondary = if primary == "a" { "b" } else { "a" };
    let (p, s) = (
        &cluster.member(&primary).node,
        &cluster.member(secondary).node,
    );
    write_pattern(p, &pool_name, PATTERN_AT, 3);
    wait::until(
        "the secondary holds the primary's write",
        DEADLINE,
        &logs,
        || async {
            read_export(s, &pool_name, PATTERN_AT, pattern(3).len()).ok() == Some(pattern(3))
        },
    )
    .await;

    // A VM disk's protocol: a bad one is refused naming the field, a good
    // one is its volume's and its primary's attachment's.
    let out = basalt(
        server,
        &[
            "vm",
            "create",
            "bad",
            "--disk",
            "name=root,size=16M,replicas=2,protocol=D",
        ],
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("protocol=\"D\""), "{}", text(&out));
    create_vm(
        server,
        "web",
        "128M",
        "name=root,size=16M,replicas=2,protocol=B",
    )
    .await;
    wait::until(
        "both copies of web's disk up to date",
        DEADLINE,
        &logs,
        || async {
            cli_volume(server, "web-root")
                .await
                .is_some_and(|v| states(&v) == up)
        },
    )
    .await;
    let disk = cli_volume(server, "web-root").await.expect("web-root");
    assert_eq!(disk.spec.protocol, ReplicationProtocol::B, "{disk:?}");
    let (pool_name, primary) = (&disk.status.storage_name, &disk.status.primary_node);
    let line = attachment_line(&cluster.prefix, primary, pool_name)
        .unwrap_or_else(|| panic!("no attachment of {pool_name} on {primary}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.get(1), Some(&"primary"), "{line}");
    assert!(words.contains(&"protocol=B"), "{line}");
}
