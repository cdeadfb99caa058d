//! Standalone volumes on lost nodes (decision 65), with real storage
//! processes (root, namespaces): a control plane on namespace node `cp`
//! with short leases, and on each node `basaltd storage serve
//! --replica-listen` and `basaltd agent --compute sim`.
//!
//! - The primary's node is lost (its agent and storage process killed):
//!   once its lease ran out and `nodes.ha_after_ms` passed, the other
//!   copy is the primary at epoch 2 with the lost one marked outdated,
//!   and serves the pattern written before over NBD; every version of
//!   the volume the watch shows names one primary. The old node back: its
//!   agent attaches its copy secondary at the new epoch, the new primary
//!   resyncs it (the write made meanwhile is on it, the mark cleared, up
//!   to date) and it refuses NBD writes.
//! - A secondary's node is lost and the primary is written: the control
//!   plane records the lost copy outdated (the storage fence asks through
//!   the agent); after `nodes.replica_replace_after_ms` (not before) a
//!   third node takes its place at the same epoch, is filled by a full
//!   sync (that write is read back from it) and reports up to date;
//!   the lost copy leaves the status, and its node's agent, back,
//!   deletes its data. Meanwhile each node's volume watch
//!   (`Agent.WatchVolumes`) shows only its own volumes: the third node's
//!   stream stays silent while the volume changes on the other two, then
//!   shows it added when the node gets its copy; the lost node's shows it
//!   deleted then.
//! - A secondary's storage process is killed and the primary written:
//!   the copy is marked outdated, naming the volume's version before the
//!   mark; restarted, it is resynced and the mark cleared (decision 74).
//! - The primary's node is lost in the middle of such a resync: the copy
//!   is incomplete in its storage (decision 93) and reported `syncing` by
//!   its node, so the volume keeps its lost primary until the operator
//!   runs `basalt volume accept-copy`; then that copy is the primary at
//!   the next epoch with the forced-copy label, and its storage takes it
//!   with force and serves writes (decision 94).

mod common;
mod replica_node;
// Its copy-state list is not needed here.
#[allow(dead_code)]
mod volume_cli;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_api::{
    AgentClient, Kind, Object, ReplicaState, StorageClient, Volume, WatchEvent, WatchStream,
};
use basalt_testkit::wait;
use futures::StreamExt as _;

use replica_node::{
    Member, PATTERN_AT, SimCluster, every, fill, in_pool, incomplete, pattern, read_export,
    refuses_writes, write_pattern,
};
use volume_cli::{all_up, basalt, cli_volume, text, two_copies};

const DEADLINE: Duration = Duration::from_secs(120);

/// The next event of a node's volume watch (within [`DEADLINE`]): its
/// kind, the volume's name and the version (empty and 0 for a bookmark).
async fn next_event(events: &mut WatchStream<Volume>) -> Option<(&'static str, String, u64)> {
    let event = tokio::time::timeout(DEADLINE, events.next())
        .await
        .expect("an event within the deadline")?
        .expect("the watch works");
    Some(match event {
        WatchEvent::Added {
            object,
            resource_version,
        } => ("added", object.meta.name, resource_version),
        WatchEvent::Modified {
            object,
            resource_version,
        } => ("modified", object.meta.name, resource_version),
        WatchEvent::Deleted {
            object,
            resource_version,
        } => ("deleted", object.meta.name, resource_version),
        WatchEvent::Bookmark { .. } => ("bookmark", String::new(), 0),
    })
}

/// The next volume change of the cluster's watch (within [`DEADLINE`]):
/// its kind, the volume and the version.
async fn next_change(events: &mut WatchStream) -> Option<(&'static str, Volume, u64)> {
    loop {
        let event = tokio::time::timeout(DEADLINE, events.next())
            .await
            .expect("a change within the deadline")?
            .expect("the watch works");
        let (kind, object, version) = match event {
            WatchEvent::Added {
                object,
                resource_version,
            } => ("added", object, resource_version),
            WatchEvent::Modified {
                object,
                resource_version,
            } => ("modified", object, resource_version),
            WatchEvent::Deleted {
                object,
                resource_version,
            } => ("deleted", object, resource_version),
            WatchEvent::Bookmark { .. } => continue,
        };
        if let Object::Volume(v) = object {
            return Some((kind, v, version));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_primary_moves_to_the_up_to_date_copy_and_comes_back_secondary() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let config = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 5000\ncontroller_period_ms = 200\n";
    let mut cluster = SimCluster::start(&["a", "b"], config, DEADLINE).await;
    let (control, admin, server, members) = cluster.parts();
    let logs = |members: &[Member]| -> Vec<String> {
        members
            .iter()
            .flat_map(|m| [m.agent.logs(), m.storage.logs()])
            .collect()
    };
    let volume = {
        let all = every(control, members);
        two_copies(server, "scratch", &all, DEADLINE).await
    };
    let pool_name = volume.status.storage_name.clone();
    assert_eq!(volume.status.epoch, 1);
    let old = volume.status.primary_node.clone();
    let (p, s) = if old == "a" { (0, 1) } else { (1, 0) };
    let new = members[s].node.name().to_owned();
    write_pattern(&members[p].node, &pool_name, PATTERN_AT, 5);

    // Every version of the volume from now on names one primary, and the
    // entry flagged primary is that node's.
    let list = admin.list(Kind::Volume).await.expect("list");
    let mut events = admin
        .watch(Some(Kind::Volume), list.resource_version)
        .await
        .expect("watch");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut versions = 0usize;
            let mut epochs = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let event =
                    match tokio::time::timeout(Duration::from_millis(200), events.next()).await {
                        Err(_) => continue,
                        Ok(None) => return Err("the watch ended".to_owned()),
                        Ok(Some(Err(err))) => return Err(format!("the watch broke: {err}")),
                        Ok(Some(Ok(event))) => event,
                    };
                let (WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. }) =
                    event
                else {
                    continue;
                };
                let Object::Volume(v) = object else { continue };
                if v.meta.name != "scratch" {
                    continue;
                }
                versions += 1;
                let flagged: Vec<&str> = v
                    .status
                    .replicas
                    .iter()
                    .filter(|r| r.primary)
                    .map(|r| r.node.as_str())
                    .collect();
                if flagged != [v.status.primary_node.as_str()] {
                    return Err(format!(
                        "version {} names primaries {flagged:?} with primary_node {:?}",
                        v.meta.resource_version, v.status.primary_node
                    ));
                }
                if epochs.last() != Some(&v.status.epoch) {
                    epochs.push(v.status.epoch);
                }
            }
            Ok((versions, epochs))
        })
    };

    // The primary's node is lost.
    let killed = Instant::now();
    members[p].agent.kill9().expect("kill the primary's agent");
    members[p]
        .storage
        .kill9()
        .expect("kill the primary's storage");
    {
        let mut all = vec![control];
        all.push(&members[s].agent);
        all.push(&members[s].storage);
        wait::until(
            "the other copy is the primary at epoch 2",
            DEADLINE,
            &all,
            || async {
                cli_volume(server, "scratch")
                    .await
                    .is_some_and(|v| v.status.primary_node == new && v.status.epoch == 2)
            },
        )
        .await;
    }
    assert!(
        // ha_after_ms counts from the last acknowledged heartbeat, which a
        // loaded machine may have delayed: up to 1.5 s of slack.
        killed.elapsed() >= Duration::from_millis(3500),
        "moved {:?} after the loss: before the lease and ha_after_ms ran out",
        killed.elapsed()
    );
    let moved = cli_volume(server, "scratch").await.expect("scratch");
    let lost = moved
        .status
        .replica(&old)
        .expect("the old copy stays listed");
    assert!(lost.outdated && !lost.primary, "{moved:?}");
    // The mark names the version it was made over (decision 74): only a
    // report read after it clears it.
    assert!(
        lost.outdated_after_version > 0
            && lost.outdated_after_version < moved.meta.resource_version,
        "{moved:?}"
    );
    // The new primary serves what was written through the old one, and
    // takes writes.
    let node_s = &members[s].node;
    wait::until(
        "the new primary's export serves the pattern",
        DEADLINE,
        &[control, &members[s].agent, &members[s].storage],
        || async {
            read_export(node_s, &pool_name, PATTERN_AT, pattern(5).len())
                .is_ok_and(|got| got == pattern(5))
        },
    )
    .await;
    write_pattern(node_s, &pool_name, PATTERN_AT, 6);

    // The old node comes back: secondary at the new epoch, resynced.
    members[p].storage.restart().expect("restart its storage");
    members[p].agent.restart().expect("restart its agent");
    {
        let all = every(control, members);
        wait::until(
            "the old copy is back in sync, its mark cleared",
            DEADLINE,
            &all,
            || async {
                cli_volume(server, "scratch").await.is_some_and(|v| {
                    v.status.primary_node == new && v.status.epoch == 2 && all_up(&v)
                })
            },
        )
        .await;
    }
    let node_p = &members[p].node;
    assert_eq!(
        read_export(node_p, &pool_name, PATTERN_AT, pattern(6).len()).expect("read the old copy"),
        pattern(6),
        "the old primary's copy misses the new primary's write"
    );
    assert!(
        refuses_writes(node_p, &pool_name),
        "the old primary still takes writes"
    );
    stop.store(true, Ordering::SeqCst);
    let (versions, epochs) = watcher
        .await
        .expect("the watcher")
        .unwrap_or_else(|err| panic!("{err}\n{}", logs(members).join("\n")));
    assert!(versions >= 2, "{versions} versions seen");
    assert_eq!(epochs.last(), Some(&2), "{epochs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_copy_is_replaced_after_the_delay_filled_and_deleted_from_its_node() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let config = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 3000\ncontroller_period_ms = 200\nreplica_replace_after_ms = 6000\n";
    let mut cluster = SimCluster::start(&["a", "b", "c"], config, DEADLINE).await;
    let (control, admin, server, members) = cluster.parts();
    let volume = {
        let all = every(control, members);
        two_copies(server, "scratch", &all, DEADLINE).await
    };
    let pool_name = volume.status.storage_name.clone();
    let primary = volume.status.primary_node.clone();
    let index = |name: &str| {
        members
            .iter()
            .position(|m| m.node.name() == name)
            .expect("a member")
    };
    let p = index(&primary);
    let lost = volume
        .status
        .replicas
        .iter()
        .find(|r| !r.primary)
        .map(|r| r.node.clone())
        .expect("a secondary");
    let l = index(&lost);
    let t = (0..3).find(|i| *i != p && *i != l).expect("a third node");
    let third = members[t].node.name().to_owned();
    write_pattern(&members[p].node, &pool_name, PATTERN_AT, 7);

    // The third node's and the lost node's volume watches, and every
    // volume change, from here on.
    let agent = AgentClient::connect(server).await.expect("agent client");
    let mut third_watch = agent.watch_volumes(&third, 0).await.expect("watch");
    assert_eq!(
        next_event(&mut third_watch).await.map(|e| e.0),
        Some("bookmark"),
        "a node holding no copy was listed a volume"
    );
    let mut lost_watch = agent.watch_volumes(&lost, 0).await.expect("watch");
    let listed = next_event(&mut lost_watch).await;
    assert_eq!(
        listed.as_ref().map(|e| (e.0, e.1.as_str())),
        Some(("added", "scratch"))
    );
    assert_eq!(
        next_event(&mut lost_watch).await.map(|e| e.0),
        Some("bookmark")
    );
    let list = admin.list(Kind::Volume).await.expect("list");
    let mut all_changes = admin
        .watch(Some(Kind::Volume), list.resource_version)
        .await
        .expect("watch");

    let killed = Instant::now();
    members[l]
        .agent
        .kill9()
        .expect("kill the secondary's agent");
    members[l]
        .storage
        .kill9()
        .expect("kill the secondary's storage");
    // A write without the lost copy: the primary asks the fencer, which
    // has the control plane record the copy outdated first.
    write_pattern(&members[p].node, &pool_name, PATTERN_AT, 8);
    {
        let all = [
            control,
            &members[p].agent,
            &members[p].storage,
            &members[t].agent,
            &members[t].storage,
        ];
        wait::until(
            "the third node holds the lost copy's place",
            DEADLINE,
            &all,
            || async {
                cli_volume(server, "scratch")
                    .await
                    .is_some_and(|v| v.status.replica(&third).is_some())
            },
        )
        .await;
        assert!(
            // Counted from the last acknowledged heartbeat: 1.5 s of slack.
            killed.elapsed() >= Duration::from_millis(4500),
            "replaced {:?} after the loss: before replica_replace_after_ms",
            killed.elapsed()
        );
        let replaced = cli_volume(server, "scratch").await.expect("scratch");
        // The volume changed on the other nodes before it named the third
        // (the lost copy reported away): the third node's watch showed
        // none of it, only the volume added when it named the node; the
        // lost node's showed it deleted then.
        let mut changes_before = 0;
        let mut marked = false;
        let mut replaced_at = None;
        while replaced_at.is_none() {
            let Some((kind, v, version)) = next_change(&mut all_changes).await else {
                panic!("the volume watch ended before the replacement");
            };
            if v.meta.name != "scratch" || kind != "modified" {
                continue;
            }
            if v.status.replica(&third).is_some() {
                replaced_at = Some(version);
            } else {
                changes_before += 1;
                // The fence's mark names the version it was made over.
                marked |= v.status.replica(&lost).is_some_and(|r| {
                    r.outdated && r.outdated_after_version > 0 && r.outdated_after_version < version
                });
            }
        }
        // The primary went on without the lost copy only once the
        // control plane recorded it outdated (the storage fence).
        assert!(marked, "the lost copy was never recorded outdated");
        assert!(changes_before >= 1, "the volume did not change before");
        let first = next_event(&mut third_watch).await;
        assert_eq!(
            first,
            Some(("added", "scratch".to_owned(), replaced_at.unwrap())),
            "the third node's watch showed something else first"
        );
        // The lost node still held a copy during the changes before.
        let mut gone = next_event(&mut lost_watch).await;
        while let Some(("modified", _, version)) = &gone
            && *version < replaced_at.unwrap()
        {
            gone = next_event(&mut lost_watch).await;
        }
        assert_eq!(
            gone,
            Some(("deleted", "scratch".to_owned(), replaced_at.unwrap()))
        );
        assert_eq!(replaced.status.epoch, 1, "{replaced:?}");
        assert_eq!(replaced.status.primary_node, primary);
        assert!(replaced.status.replica(&lost).is_none(), "{replaced:?}");
        wait::until(
            "the new copy is filled and up to date",
            DEADLINE,
            &all,
            || async {
                cli_volume(server, "scratch")
                    .await
                    .is_some_and(|v| v.status.replicas.len() == 2 && all_up(&v))
            },
        )
        .await;
    }
    let node_t = &members[t].node;
    assert_eq!(
        read_export(node_t, &pool_name, PATTERN_AT, pattern(8).len()).expect("read the new copy"),
        pattern(8),
        "the new copy misses what was written before it was made"
    );
    assert!(
        refuses_writes(node_t, &pool_name),
        "the new copy is not a secondary"
    );

    // The lost node comes back: its agent deletes its old copy.
    members[l].storage.restart().expect("restart its storage");
    members[l].agent.restart().expect("restart its agent");
    let socket = members[l].socket.clone();
    let all = every(control, members);
    wait::until(
        "the lost node's old copy is deleted",
        DEADLINE,
        &all,
        || async { in_pool(&socket, &pool_name).await == Some(false) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_copy_back_in_sync_has_its_mark_cleared() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // No replacement and no failover within the test: only the fence's
    // mark and its clearing (decision 74).
    let config =
        "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\ncontroller_period_ms = 200\n";
    let mut cluster = SimCluster::start(&["a", "b"], config, DEADLINE).await;
    let (control, _, server, members) = cluster.parts();
    let volume = {
        let all = every(control, members);
        two_copies(server, "scratch", &all, DEADLINE).await
    };
    let pool_name = volume.status.storage_name.clone();
    let primary = volume.status.primary_node.clone();
    let (p, s) = if primary == "a" { (0, 1) } else { (1, 0) };
    let away = members[s].node.name().to_owned();

    // The secondary's storage process goes away; a write through the
    // primary goes on only once the copy is recorded outdated.
    members[s]
        .storage
        .kill9()
        .expect("kill the secondary's storage");
    write_pattern(&members[p].node, &pool_name, PATTERN_AT, 9);
    let marked = cli_volume(server, "scratch").await.expect("scratch");
    let mark = marked.status.replica(&away).expect("the copy stays listed");
    assert!(mark.outdated, "the write went on unrecorded: {marked:?}");
    assert!(
        mark.outdated_after_version > 0
            && mark.outdated_after_version < marked.meta.resource_version,
        "{marked:?}"
    );
    assert_eq!(marked.status.primary_node, primary, "{marked:?}");

    // Back: the primary resyncs it and, reading its storage after the mark,
    // has the control plane clear it.
    members[s].storage.restart().expect("restart its storage");
    {
        let all = every(control, members);
        wait::until(
            "the fenced copy is back in sync, its mark cleared",
            DEADLINE,
            &all,
            || async {
                cli_volume(server, "scratch")
                    .await
                    .is_some_and(|v| all_up(&v))
            },
        )
        .await;
    }
    let cleared = cli_volume(server, "scratch").await.expect("scratch");
    let copy = cleared.status.replica(&away).expect("the copy");
    assert_eq!(copy.outdated_after_version, 0, "{cleared:?}");
    assert_eq!(
        read_export(&members[s].node, &pool_name, PATTERN_AT, pattern(9).len())
            .expect("read the fenced copy"),
        pattern(9),
        "the fenced copy misses the write made without it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_lost_mid_resync_moves_only_onto_the_copy_the_operator_accepts() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let config = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 3000\ncontroller_period_ms = 200\n";
    // Resyncs at 1 MiB/s: 12 MiB missed takes 12 s to send back.
    let mut cluster =
        SimCluster::start_with(&["a", "b"], config, DEADLINE, &["--sync-rate", "1M"]).await;
    let (control, admin, server, members) = cluster.parts();
    let volume = {
        let all = every(control, members);
        two_copies(server, "scratch", &all, DEADLINE).await
    };
    let pool_name = volume.status.storage_name.clone();
    let old = volume.status.primary_node.clone();
    let (p, s) = if old == "a" { (0, 1) } else { (1, 0) };
    let new = members[s].node.name().to_owned();

    // The secondary's storage goes and 12 MiB are written without it;
    // back, the primary resyncs it slowly.
    members[s]
        .storage
        .kill9()
        .expect("kill the secondary's storage");
    fill(&members[p].node, &pool_name, 12 << 20);
    members[s].storage.restart().expect("restart its storage");
    let storage = StorageClient::connect_unix(&members[s].socket).expect("storage client");
    {
        let all = every(control, members);
        wait::until(
            "the returning copy is incomplete in its storage, and its node says syncing",
            DEADLINE,
            &all,
            || async {
                incomplete(&storage, &pool_name).await == Some(true)
                    && cli_volume(server, "scratch").await.is_some_and(|v| {
                        v.status.replica(&new).and_then(|r| r.node_state)
                            == Some(ReplicaState::Syncing)
                    })
            },
        )
        .await;
    }

    // The primary's node is lost in the middle of the resync.
    members[p].agent.kill9().expect("kill the primary's agent");
    members[p]
        .storage
        .kill9()
        .expect("kill the primary's storage");
    {
        let all = vec![control, &members[s].agent, &members[s].storage];
        wait::until(
            "the primary's node is not ready",
            DEADLINE,
            &all,
            || async {
                matches!(admin.get(Kind::Node, &old).await,
                Ok(Object::Node(n)) if !n.status.is_ready())
            },
        )
        .await;
    }
    // Past `ha_after_ms`: still no move, the only other copy is torn.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = cli_volume(server, "scratch").await.expect("scratch");
    assert_eq!(
        (held.status.primary_node.as_str(), held.status.epoch),
        (old.as_str(), 1),
        "{held:?}"
    );
    assert_eq!(incomplete(&storage, &pool_name).await, Some(true));

    // A copy that is not there, or the primary's, is refused by name.
    let out = basalt(
        server,
        &["volume", "accept-copy", "scratch", "--node", &old],
    )
    .await;
    assert!(
        !out.status.success() && text(&out).contains("primary"),
        "{}",
        text(&out)
    );
    let out = basalt(
        server,
        &["volume", "accept-copy", "scratch", "--node", "zz"],
    )
    .await;
    assert!(
        !out.status.success() && text(&out).contains("holds no copy"),
        "{}",
        text(&out)
    );
    // The operator accepts it as it is.
    let out = basalt(
        server,
        &["volume", "accept-copy", "scratch", "--node", &new],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("as it is"), "{}", text(&out));
    {
        let all = vec![control, &members[s].agent, &members[s].storage];
        wait::until(
            "the accepted copy is the primary at epoch 2, taken with force",
            DEADLINE,
            &all,
            || async {
                cli_volume(server, "scratch").await.is_some_and(|v| {
                    v.status.primary_node == new && v.status.epoch == 2 && v.forces_copy()
                }) && incomplete(&storage, &pool_name).await == Some(false)
            },
        )
        .await;
    }
    let moved = cli_volume(server, "scratch").await.expect("scratch");
    assert!(
        !moved.status.replica(&new).expect("copy").outdated,
        "{moved:?}"
    );
    assert!(
        moved.status.replica(&old).expect("copy").outdated,
        "{moved:?}"
    );
    assert!(
        !refuses_writes(&members[s].node, &pool_name),
        "the accepted primary refuses writes"
    );
}
