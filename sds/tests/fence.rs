//! The agent's fencer in front of a real replicator and replica server on
//! loopback: a primary that lost its peer acknowledges no write while no
//! agent watches, nor while the agent refuses (it asks again), and goes
//! on at the agent's yes, tracking the peer's chunks; a yes never carries
//! over to a later loss of the peer once it came back in sync; a copy
//! about to be fully synced is asked about before the fill, and writes go
//! on without it only on the yes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use basalt_sds::backend::MemBackend;
use basalt_sds::pool::{Pool, PoolOptions, Volume};
use basalt_sds::replication::fence::{AgentFencer, FenceQuestions, FenceVerdict};
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::{
    FENCE_RETRY, Op, PeerState, ReplicationError, Replicator, ReplicatorConfig, SyncOptions,
};
use futures::StreamExt as _;

const VOL: u64 = 16 << 20;
const CHUNK: u64 = 64 << 10;

fn pool_with_volume() -> (Pool, Volume) {
    let pool =
        Pool::create(Arc::new(MemBackend::new(64 << 20)), &PoolOptions::default()).expect("pool");
    pool.create_volume("vol", VOL).expect("volume");
    let vol = pool.open_volume("vol").expect("open");
    (pool, vol)
}

fn wait_state(r: &Replicator, want: impl Fn(PeerState) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !want(r.status().state) {
        assert!(Instant::now() < deadline, "state stuck at {:?}", r.status());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn write(r: &Replicator, vol: &Volume, offset: u64, data: &[u8]) -> Result<(), ReplicationError> {
    r.submit(
        Op::Write {
            offset,
            data,
            fua: false,
        },
        || vol.write(offset, data, false),
    )
}

/// Writes in a thread; the receiver gets whether it was acknowledged.
fn write_in_background(r: &Replicator, vol: &Volume, offset: u64) -> mpsc::Receiver<bool> {
    let (tx, rx) = mpsc::channel();
    let (r, vol) = (r.clone(), vol.clone());
    std::thread::spawn(move || {
        let ok = write(&r, &vol, offset, &[7u8; 4096]).is_ok();
        let _ = tx.send(ok);
    });
    rx
}

/// The next question on `watch`, within 5 s.
fn next_question(watch: &mut FenceQuestions) -> basalt_sds::replication::fence::FenceQuestion {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), watch.next()).await })
        .expect("a fence question within 5 s")
        .expect("the watch goes on")
}

#[test]
fn a_primary_without_its_peer_writes_only_on_the_agents_yes() {
    let (rpool, _rvol) = pool_with_volume();
    let dir = tempfile::tempdir().expect("tempdir");
    let book = dir.path().join("pool.epochs");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let replica = ReplicaServer::start_persistent(rpool.clone(), any, 0, &book).expect("replica");
    let addr = replica.addr();
    let (_ppool, pvol) = pool_with_volume();
    let fencer = AgentFencer::new(Duration::from_secs(3));
    let cfg = ReplicatorConfig {
        peer: addr,
        epoch: 4,
        generation: 42,
        chunk_size: CHUNK,
        retry: Duration::from_millis(50),
        protocol: Default::default(),
    };
    let r = Replicator::start(pvol.clone(), cfg, Arc::new(fencer.clone())).expect("replicator");
    wait_state(&r, |s| s == PeerState::Connected);
    write(&r, &pvol, 0, &[1u8; 4096]).expect("write with the peer there");
    replica.stop();
    drop(replica);
    wait_state(&r, |s| s == PeerState::Away);

    // No agent watches: the write waits (asked again every second).
    let acked = write_in_background(&r, &pvol, 2 * CHUNK);
    assert!(
        acked.recv_timeout(FENCE_RETRY * 3).is_err(),
        "a write was acknowledged with the peer gone and no agent to ask"
    );

    // An agent watches: the pending question reaches it; a refusal keeps
    // the write suspended, and the primary asks again.
    let mut watch = fencer.watch();
    let q = next_question(&mut watch);
    assert_eq!((q.volume.as_str(), q.peer, q.epoch), ("vol", addr, 4));
    assert!(fencer.answer(q.id, FenceVerdict::Refused("deposed".into())));
    assert!(
        !fencer.answer(q.id, FenceVerdict::Outdated),
        "a question is answered once"
    );
    assert!(
        acked.recv_timeout(Duration::from_millis(300)).is_err(),
        "a write was acknowledged after a refusal"
    );
    let again = next_question(&mut watch);
    assert_ne!(again.id, q.id, "asked again as a new question");
    assert!(fencer.answer(again.id, FenceVerdict::Outdated));
    assert_eq!(
        acked.recv_timeout(Duration::from_secs(5)),
        Ok(true),
        "the write goes on once the peer is recorded outdated"
    );
    // Later writes go on without asking; the peer's chunks are tracked.
    write(&r, &pvol, 4 * CHUNK, &[2u8; 4096]).expect("write with the peer outdated");
    assert!(fencer.pending().is_empty());
    assert_eq!(r.status().dirty_chunks, 2);

    // The peer returns and resyncs; lost again, the old yes is spent.
    let replica = ReplicaServer::start_persistent(rpool, addr, 0, &book).expect("replica back");
    wait_state(&r, |s| s == PeerState::Connected);
    assert_eq!(r.status().dirty_chunks, 0);
    replica.stop();
    drop(replica);
    wait_state(&r, |s| s == PeerState::Away);
    let acked = write_in_background(&r, &pvol, 6 * CHUNK);
    let third = next_question(&mut watch);
    assert!(
        acked.recv_timeout(Duration::from_millis(300)).is_err(),
        "a yes from before the peer came back was used again"
    );
    // No answer at all: the asker gives up after its timeout (and asks
    // again), never acknowledging.
    assert!(
        acked.recv_timeout(Duration::from_secs(4)).is_err(),
        "acknowledged without an answer"
    );
    let fourth = next_question(&mut watch);
    assert!(fourth.id > third.id);
    assert!(fencer.answer(fourth.id, FenceVerdict::Outdated));
    assert_eq!(acked.recv_timeout(Duration::from_secs(5)), Ok(true));
    // The watcher leaves: nobody to ask.
    drop(watch);
    assert_eq!(fencer.watchers(), 0);
}

#[test]
fn a_copy_about_to_be_filled_is_recorded_outdated_before_writes_go_on_without_it() {
    let (rpool, rvol) = pool_with_volume();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let replica = ReplicaServer::start(rpool, any, 0).expect("replica");
    let (_ppool, pvol) = pool_with_volume();
    for i in 0..4u64 {
        pvol.write(i * (1 << 20), &vec![9u8; 1 << 20], false)
            .expect("data to fill the peer with");
    }
    let fencer = AgentFencer::new(Duration::from_secs(10));
    let mut watch = fencer.watch();
    let cfg = ReplicatorConfig {
        peer: replica.addr(),
        epoch: 2,
        generation: 77,
        chunk_size: CHUNK,
        retry: Duration::from_millis(50),
        protocol: Default::default(),
    };
    // 4 MiB at 1 MiB/s: the fill takes seconds.
    let sync = SyncOptions {
        synced_from: 0,
        rate: 1 << 20,
    };
    let r = Replicator::start_with(pvol.clone(), cfg, Arc::new(fencer.clone()), sync)
        .expect("replicator");
    // Asked at the start of the fill, before any write.
    let q = next_question(&mut watch);
    assert_eq!((q.peer, q.epoch), (replica.addr(), 2));
    assert_eq!(r.status().full_syncs, 0);
    let acked = write_in_background(&r, &pvol, 8 << 20);
    assert!(
        acked.recv_timeout(Duration::from_millis(500)).is_err(),
        "a write went on without the filling peer before it was recorded outdated"
    );
    assert!(fencer.answer(q.id, FenceVerdict::Outdated));
    assert_eq!(acked.recv_timeout(Duration::from_secs(2)), Ok(true));
    assert_ne!(
        r.status().state,
        PeerState::Connected,
        "the write waited for the whole fill"
    );
    wait_state(&r, |s| s == PeerState::Connected);
    let mut buf = vec![0u8; 4096];
    rvol.read(8 << 20, &mut buf).expect("read");
    assert_eq!(buf, vec![7u8; 4096], "the write reached the filled peer");
}
