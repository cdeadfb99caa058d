//! Replication protocols A, B and C between a primary [`Replicator`] and
//! a [`ReplicaServer`] on loopback, in one process, with the replica's
//! test hooks holding frames back: each protocol acknowledges a write at
//! its own point (A: in the send buffer, B: received, C: applied), a FLUSH
//! waits for the peer under every protocol, and writes acknowledged under
//! A that the peer never applied are resynced when it returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use basalt_sds::backend::MemBackend;
use basalt_sds::pool::{Pool, PoolOptions, Volume};
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::{
    Op, PeerState, Protocol, ReplicationError, Replicator, ReplicatorConfig, StaticFencer,
};

const VOL: u64 = 16 << 20;
const CHUNK: u64 = 64 << 10;
/// How long a write that must not be acknowledged is given.
const NOT_YET: Duration = Duration::from_millis(400);
const DEADLINE: Duration = Duration::from_secs(10);

fn pool_with_volume() -> (Pool, Volume) {
    let pool =
        Pool::create(Arc::new(MemBackend::new(64 << 20)), &PoolOptions::default()).expect("pool");
    pool.create_volume("vol", VOL).expect("volume");
    let vol = pool.open_volume("vol").expect("open");
    (pool, vol)
}

fn replicator(vol: &Volume, peer: SocketAddr, protocol: Protocol) -> Replicator {
    let cfg = ReplicatorConfig {
        peer,
        epoch: 1,
        generation: 7,
        chunk_size: CHUNK,
        retry: Duration::from_millis(50),
        protocol,
    };
    Replicator::start(vol.clone(), cfg, Arc::new(StaticFencer { allow: true })).expect("replicator")
}

fn wait_state(r: &Replicator, want: PeerState) {
    let deadline = Instant::now() + DEADLINE;
    while r.status().state != want {
        assert!(Instant::now() < deadline, "state stuck at {:?}", r.status());
        thread::sleep(Duration::from_millis(5));
    }
}

fn write_now(
    r: &Replicator,
    vol: &Volume,
    offset: u64,
    data: &[u8],
) -> Result<(), ReplicationError> {
    r.submit(
        Op::Write {
            offset,
            data,
            fua: false,
        },
        || vol.write(offset, data, false),
    )
}

/// A write that must be acknowledged within [`DEADLINE`].
fn write(r: &Replicator, vol: &Volume, offset: u64, data: &[u8]) {
    write_async(r, vol, offset, data.to_vec())
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("write at {offset} not acknowledged in {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("write at {offset}: {e}"));
}

/// A FLUSH that must be acknowledged within [`DEADLINE`].
fn flush(r: &Replicator, vol: &Volume) {
    let (tx, rx) = mpsc::channel();
    let (r, vol) = (r.clone(), vol.clone());
    thread::spawn(move || {
        let _ = tx.send(r.submit(Op::Flush, || vol.flush()));
    });
    rx.recv_timeout(DEADLINE)
        .expect("flush not acknowledged in time")
        .expect("flush");
}

/// Submits a write on another thread; its result comes on the channel.
fn write_async(
    r: &Replicator,
    vol: &Volume,
    offset: u64,
    data: Vec<u8>,
) -> mpsc::Receiver<Result<(), ReplicationError>> {
    let (tx, rx) = mpsc::channel();
    let (r, vol) = (r.clone(), vol.clone());
    thread::spawn(move || {
        let _ = tx.send(write_now(&r, &vol, offset, &data));
    });
    rx
}

fn read(vol: &Volume, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    vol.read(offset, &mut buf).expect("read");
    buf
}

fn pattern(i: u64) -> Vec<u8> {
    let mut b = vec![(i % 251) as u8 + 1; 4096];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Live frames the replica applied.
fn applied(replica: &ReplicaServer) -> u64 {
    replica
        .stats()
        .applied_frames
        .load(std::sync::atomic::Ordering::SeqCst)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Hold {
    /// The replica holds every frame it reads before looking at it.
    Receive,
    /// The replica reads frames (and answers protocol B's receive acks)
    /// but applies none.
    Apply,
}

#[test]
fn each_protocol_acknowledges_at_its_own_point() {
    for (protocol, hold, acked_while_held) in [
        (Protocol::A, Hold::Receive, true),
        (Protocol::B, Hold::Receive, false),
        (Protocol::C, Hold::Receive, false),
        (Protocol::A, Hold::Apply, true),
        (Protocol::B, Hold::Apply, true),
        (Protocol::C, Hold::Apply, false),
    ] {
        let case = format!("protocol {protocol}, {hold:?} held");
        let (rpool, rvol) = pool_with_volume();
        let replica =
            ReplicaServer::start(rpool, "127.0.0.1:0".parse().expect("addr"), 0).expect("replica");
        let (_ppool, pvol) = pool_with_volume();
        let r = replicator(&pvol, replica.addr(), protocol);
        wait_state(&r, PeerState::Connected);
        match hold {
            Hold::Receive => replica.holds().hold_receive(true),
            Hold::Apply => replica.holds().hold_apply(true),
        }
        let at = 9 * CHUNK + 4096;
        let done = write_async(&r, &pvol, at, pattern(1));
        if acked_while_held {
            done.recv_timeout(DEADLINE)
                .unwrap_or_else(|_| panic!("{case}: not acknowledged"))
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            // Acknowledged before the peer applied it.
            assert_ne!(read(&rvol, at, 4096), pattern(1), "{case}");
        } else {
            assert!(
                matches!(
                    done.recv_timeout(NOT_YET),
                    Err(mpsc::RecvTimeoutError::Timeout)
                ),
                "{case}: acknowledged while the peer held it"
            );
        }
        // A FLUSH waits for the peer's durability under every protocol.
        let (ftx, flushed) = mpsc::channel();
        {
            let (r, pvol) = (r.clone(), pvol.clone());
            thread::spawn(move || {
                let _ = ftx.send(r.submit(Op::Flush, || pvol.flush()));
            });
        }
        assert!(
            matches!(
                flushed.recv_timeout(NOT_YET),
                Err(mpsc::RecvTimeoutError::Timeout)
            ),
            "{case}: a FLUSH acknowledged while the peer held the writes"
        );
        replica.holds().hold_receive(false);
        replica.holds().hold_apply(false);
        flushed
            .recv_timeout(DEADLINE)
            .expect("flush answered")
            .unwrap_or_else(|e| panic!("{case}: flush: {e}"));
        if !acked_while_held {
            done.recv_timeout(DEADLINE)
                .expect("acknowledged once released")
                .unwrap_or_else(|e| panic!("{case}: {e}"));
        }
        // The flush came after the write in the frame order: it is there.
        assert_eq!(read(&rvol, at, 4096), pattern(1), "{case}");
        assert_eq!(r.status().state, PeerState::Connected, "{case}");
        // Every final ack was counted, once (the write and the flush).
        wait_for(&format!("{case}: acks counted"), || {
            r.status().acked_frames == 2
        });
        assert_eq!(applied(&replica), 2, "{case}");
        r.shutdown();
    }
}

#[test]
fn writes_acknowledged_under_a_that_the_peer_lost_are_resynced() {
    let (rpool, rvol) = pool_with_volume();
    let dir = tempfile::tempdir().expect("tempdir");
    let book = dir.path().join("pool.epochs");
    let any = "127.0.0.1:0".parse().expect("addr");
    let replica = ReplicaServer::start_persistent(rpool.clone(), any, 0, &book).expect("replica");
    let addr = replica.addr();
    let (_ppool, pvol) = pool_with_volume();
    let r = replicator(&pvol, addr, Protocol::A);
    wait_state(&r, PeerState::Connected);
    for i in 0..32u64 {
        write(&r, &pvol, i * CHUNK, &pattern(i));
    }
    flush(&r, &pvol);
    replica.holds().hold_receive(true);
    // Acknowledged under A, never read by the peer: three chunks, one
    // write spanning a chunk boundary.
    let lost: [(u64, u64); 3] = [
        (10 * CHUNK, 101),
        (20 * CHUNK + CHUNK - 2048, 102),
        (10 * CHUNK + 8192, 103),
    ];
    for &(off, i) in &lost {
        write(&r, &pvol, off, &pattern(i));
    }
    assert_ne!(read(&rvol, 10 * CHUNK, 4096), pattern(101));
    // The peer goes, with the frames it had not read.
    replica.stop();
    drop(replica);
    wait_state(&r, PeerState::Away);
    let st = r.status();
    assert_eq!(
        st.dirty_chunks, 3,
        "the unapplied writes' chunks (10, 20, 21) are dirty: {st:?}"
    );

    let replica = ReplicaServer::start_persistent(rpool, addr, 0, &book).expect("replica back");
    wait_state(&r, PeerState::Connected);
    let st = r.status();
    assert_eq!(
        st.full_syncs, 1,
        "only the first connection fully syncs: {st:?}"
    );
    assert_eq!(st.resync_chunks, 3, "{st:?}");
    assert!(st.resync_bytes <= 3 * CHUNK, "{st:?}");
    assert!(
        read(&rvol, 0, VOL as usize) == read(&pvol, 0, VOL as usize),
        "the copies differ after the resync"
    );
    write(&r, &pvol, 40 * CHUNK, &pattern(7));
    flush(&r, &pvol);
    assert_eq!(read(&rvol, 40 * CHUNK, 4096), pattern(7));
    drop(replica);
}
