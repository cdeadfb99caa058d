//! The leader's parallel log fsync and slow disks, on three in-process
//! members (real RocksDB stores, openraft, gRPC on loopback):
//!
//! - with the leader's fsync held back, an entry its followers hold
//!   durably is committed in openraft's eyes, yet no follower is told so
//!   (every AppendEntries' commit index stays at or below the leader's
//!   fsynced log), no member applies it and the write is not answered;
//!   once the fsync runs, all of that follows;
//! - a membership entry never waits for the held flusher (it is fsynced
//!   in the append);
//! - a follower whose fsync stalls longer than the election timeout does
//!   not start an election: the term and leader stay.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_api::{ApiError, Image, Object, ObjectMeta, RaftApi, raft_routes};
use basalt_control::ControlConfig;
use basalt_control::network::RaftService;
use basalt_control::raft_types::{Raft, TypeConfig};
use basalt_control::server::start_raft;
use basalt_control::state::Command;
use basalt_control::store::{self, FsyncHooks, Shared};
use openraft::BasicNode;
use openraft::raft::AppendEntriesRequest;

/// Serves a member's Raft calls and remembers the highest commit index
/// an AppendEntries brought it; can starve it of AppendEntries while its
/// disk stalls.
struct Recording {
    inner: RaftService,
    max_commit: Arc<AtomicU64>,
    starve: Arc<Starve>,
}

/// Holds AppendEntries back for a while after one carrying entries
/// (whose fsync stalls): as when every runtime worker was blocked, the
/// leader's heartbeats reach openraft's core only after the stall, behind
/// its timer ticks.
#[derive(Default)]
struct Starve {
    /// Armed: the next AppendEntries with entries starts a starvation of
    /// this long.
    armed: Mutex<Option<Duration>>,
    until: Mutex<Option<Instant>>,
}

impl RaftApi for Recording {
    async fn append_entries(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        let request = serde_json::from_slice::<AppendEntriesRequest<TypeConfig>>(&payload).ok();
        if let Some(commit) = request.as_ref().and_then(|r| r.leader_commit) {
            self.max_commit.fetch_max(commit.index, Ordering::SeqCst);
        }
        let has_entries = request.is_some_and(|r| !r.entries.is_empty());
        let until = *self.starve.until.lock().unwrap();
        match until {
            Some(until) if Instant::now() < until => {
                tokio::time::sleep_until(until.into()).await;
            }
            _ => {
                if has_entries && let Some(length) = self.starve.armed.lock().unwrap().take() {
                    *self.starve.until.lock().unwrap() = Some(Instant::now() + length);
                }
            }
        }
        self.inner.append_entries(payload).await
    }

    async fn vote(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        self.inner.vote(payload).await
    }

    async fn install_snapshot(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        self.inner.install_snapshot(payload).await
    }
}

struct Member {
    id: u64,
    raft: Raft,
    shared: Arc<Shared>,
    hooks: Arc<FsyncHooks>,
    durable: store::DurableLog,
    max_commit: Arc<AtomicU64>,
    starve: Arc<Starve>,
    _dir: tempfile::TempDir,
}

impl Member {
    fn applied(&self) -> u64 {
        self.shared.read().applied_index()
    }

    fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }
}

/// Held by each test for its whole run: the tests measure elections
/// against timeouts of a few hundred milliseconds, and three clusters of
/// three members at once on two cores starved one of them into an
/// election once (a leader change mid-test, in a full gate).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts three members (ids 1–3) and initializes them as one cluster.
async fn cluster() -> Vec<Member> {
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addresses: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let mut members = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let dir = tempfile::tempdir().unwrap();
        let config = ControlConfig {
            node_id: id,
            data_dir: dir.path().to_owned(),
            ..ControlConfig::default()
        };
        assert!(
            config.raft.leader_parallel_fsync,
            "the parallel fsync is the default"
        );
        let raft_config = Arc::new(config.openraft_config().unwrap());
        let (log, sm, shared) =
            store::open(dir.path(), 1_000, id, config.raft.leader_parallel_fsync).unwrap();
        let hooks = log.fsync_hooks();
        let durable = log.durable_log();
        let guard = log.election_guard();
        let raft = start_raft(&config, raft_config, log, sm).await.unwrap();
        let max_commit = Arc::new(AtomicU64::new(0));
        let starve = Arc::new(Starve::default());
        let routes = raft_routes(Recording {
            inner: RaftService::new(raft.clone()).with_guard(guard),
            max_commit: Arc::clone(&max_commit),
            starve: Arc::clone(&starve),
        });
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming(incoming),
        );
        members.push(Member {
            id,
            raft,
            shared,
            hooks,
            durable,
            max_commit,
            starve,
            _dir: dir,
        });
    }
    let nodes: BTreeMap<u64, BasicNode> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, BasicNode::new(a)))
        .collect();
    members[0].raft.initialize(nodes).await.unwrap();
    members
}

/// Waits until every member names the same leader; returns its position.
async fn leader(members: &[Member]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leaders: Vec<Option<u64>> = members.iter().map(Member::leader).collect();
        if let Some(Some(id)) = leaders.first()
            && leaders.iter().all(|l| *l == Some(*id))
        {
            return members.iter().position(|m| m.id == *id).unwrap();
        }
        assert!(Instant::now() < deadline, "no leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn create(name: &str) -> Command {
    Command::Create(Object::Image(Image {
        meta: ObjectMeta::named(name),
        ..Image::default()
    }))
}

/// Waits until every member applied `index`.
async fn all_applied(members: &[Member], index: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while members.iter().any(|m| m.applied() < index) {
        let applied: Vec<u64> = members.iter().map(Member::applied).collect();
        assert!(
            Instant::now() < deadline,
            "applied {applied:?}, want {index}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn shutdown(members: Vec<Member>) {
    for member in members {
        let _ = member.raft.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_member_learns_an_entry_committed_before_the_leaders_fsync() {
    let _one = ONE_AT_A_TIME.lock().await;
    let members = cluster().await;
    let l = leader(&members).await;
    let leader_raft = members[l].raft.clone();
    for i in 0..3 {
        leader_raft
            .client_write(create(&format!("before-{i}")))
            .await
            .unwrap();
    }
    let before = members[l].applied();
    all_applied(&members, before).await;

    members[l].hooks.hold_flusher();
    let held = {
        let raft = leader_raft.clone();
        tokio::spawn(async move { raft.client_write(create("held")).await })
    };
    let index = before + 1;
    // Both followers hold the entry durably (openraft's replication
    // progress says so), so openraft's quorum (its own unsynced copy plus
    // one) committed it long ago; several heartbeats pass.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let matched: Vec<u64> = {
            let metrics = leader_raft.metrics().borrow().clone();
            let replication = metrics.replication.unwrap_or_default();
            members
                .iter()
                .filter(|m| m.id != members[l].id)
                .map(|m| {
                    replication
                        .get(&m.id)
                        .cloned()
                        .flatten()
                        .map_or(0, |id| id.index)
                })
                .collect()
        };
        if matched.iter().all(|m| *m >= index) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "followers matched {matched:?}, want {index}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert!(
        !held.is_finished(),
        "a write was answered before the leader's fsync"
    );
    assert_eq!(members[l].durable.durable_upto(index), before);
    for member in &members {
        assert!(
            member.applied() < index,
            "member {} applied entry {index} before the leader's fsync",
            member.id
        );
        assert!(
            member.max_commit.load(Ordering::SeqCst) < index,
            "member {} was told entry {index} is committed before the leader's fsync",
            member.id
        );
    }

    members[l].hooks.release_flusher();
    held.await.unwrap().unwrap();
    assert_eq!(members[l].durable.durable_upto(index), index);
    // The followers learn it with the next AppendEntries (a heartbeat).
    all_applied(&members, index).await;
    for member in &members {
        if member.id != members[l].id {
            assert!(member.max_commit.load(Ordering::SeqCst) >= index);
        }
    }
    shutdown(members).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_membership_entry_is_fsynced_in_its_append() {
    let _one = ONE_AT_A_TIME.lock().await;
    let members = cluster().await;
    let l = leader(&members).await;
    let leader_raft = members[l].raft.clone();
    leader_raft.client_write(create("first")).await.unwrap();
    members[l].hooks.hold_flusher();
    // Committed and applied only once fsynced on the leader: with the
    // flusher held, only an inline fsync lets it through.
    let added = tokio::time::timeout(
        Duration::from_secs(5),
        leader_raft.add_learner(9, BasicNode::new("127.0.0.1:1"), false),
    )
    .await;
    members[l].hooks.release_flusher();
    added
        .expect("the membership entry waited for the held flusher")
        .unwrap();
    shutdown(members).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_whose_fsync_stalls_past_the_election_timeout_starts_no_election() {
    let _one = ONE_AT_A_TIME.lock().await;
    let members = cluster().await;
    let l = leader(&members).await;
    let leader_raft = members[l].raft.clone();
    leader_raft.client_write(create("first")).await.unwrap();
    all_applied(&members, members[l].applied()).await;
    let term = members[l].term();
    let leader_id = members[l].id;
    let f = (l + 1) % members.len();
    // openraft's follower elects after 180-240 ms without a heartbeat
    // (lease 120 ms plus 60-120 ms). The next fsync takes 800 ms, and
    // the leader's AppendEntries reach the core only 30 ms after it.
    members[f]
        .hooks
        .stall_inline_fsyncs(Duration::from_millis(800));
    *members[f].starve.armed.lock().unwrap() = Some(Duration::from_millis(830));
    leader_raft.client_write(create("stalled")).await.unwrap();
    // The write had its quorum from the other follower; the stalled
    // fsync goes on.
    members[f].hooks.stall_inline_fsyncs(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    leader_raft.client_write(create("after")).await.unwrap();
    all_applied(&members, members[l].applied()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    for member in &members {
        assert_eq!(
            (member.term(), member.leader()),
            (term, Some(leader_id)),
            "member {} (stalled: {}) moved on from term {term} with leader {leader_id}",
            member.id,
            member.id == members[f].id,
        );
    }
    shutdown(members).await;
}
