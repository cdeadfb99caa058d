//! Replicated resize: a primary's grow reaches every connected peer in
//! the write order (the peer grows before it acknowledges, so a write
//! past the old end right after applies there), a peer away grows at its
//! next hello, and a peer speaking the older protocol gets a clear error
//! instead of a frame it cannot read.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use basalt_sds::backend::MemBackend;
use basalt_sds::pool::{Pool, PoolOptions, Volume};
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::wire::{
    Ack, Frame, Hello, HelloReply, MIN_VERSION, RESIZE_VERSION, Status, VERSION,
};
use basalt_sds::replication::{
    Op, PeerState, ReplicationError, Replicator, ReplicatorConfig, StaticFencer,
};

const VOL: u64 = 8 << 20;
const CHUNK: u64 = 64 << 10;

fn pool_with_volume() -> (Pool, Volume) {
    let pool =
        Pool::create(Arc::new(MemBackend::new(64 << 20)), &PoolOptions::default()).expect("pool");
    pool.create_volume("vol", VOL).expect("volume");
    let vol = pool.open_volume("vol").expect("open");
    (pool, vol)
}

fn replicator(vol: &Volume, peer: SocketAddr) -> Replicator {
    let cfg = ReplicatorConfig {
        peer,
        epoch: 1,
        generation: 42,
        chunk_size: CHUNK,
        retry: Duration::from_millis(50),
        protocol: Default::default(),
    };
    Replicator::start(vol.clone(), cfg, Arc::new(StaticFencer { allow: true })).expect("start")
}

fn wait_state(r: &Replicator, want: PeerState) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.status().state != want {
        assert!(Instant::now() < deadline, "state stuck at {:?}", r.status());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn grow(r: &Replicator, pool: &Pool, size: u64) -> Result<(), ReplicationError> {
    r.submit(Op::Resize { size }, || pool.resize("vol", size).map(drop))
}

fn write(r: &Replicator, vol: &Volume, offset: u64, byte: u8) {
    let data = vec![byte; 4096];
    r.submit(
        Op::Write {
            offset,
            data: &data,
            fua: false,
        },
        || vol.write(offset, &data, false),
    )
    .expect("replicated write");
}

fn read(vol: &Volume, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    vol.read(offset, &mut buf).expect("read");
    buf
}

#[test]
fn a_grow_reaches_the_peer_before_writes_past_the_old_end() {
    let (ppool, pvol) = pool_with_volume();
    let (rpool, rvol) = pool_with_volume();
    // The peer's book on disk: back after the cut, it is still in sync.
    let dir = tempfile::tempdir().expect("tempdir");
    let book = dir.path().join("peer.epochs");
    let replica = ReplicaServer::start_persistent(
        rpool.clone(),
        "127.0.0.1:0".parse().expect("addr"),
        0,
        &book,
    )
    .expect("replica");
    let addr = replica.addr();
    let r = replicator(&pvol, addr);
    wait_state(&r, PeerState::Connected);

    // Live: grown on both, then written past the old end at once.
    grow(&r, &ppool, 2 * VOL).expect("grow");
    assert_eq!(
        rvol.size().expect("size"),
        2 * VOL,
        "the peer grew before the ack"
    );
    write(&r, &pvol, VOL + 4096, 0x5a);
    assert_eq!(read(&rvol, VOL + 4096), vec![0x5a; 4096]);
    assert_eq!(r.status().state, PeerState::Connected);
    // The same size again changes nothing; a shrink is refused locally.
    grow(&r, &ppool, 2 * VOL).expect("same size");
    assert!(grow(&r, &ppool, VOL).is_err(), "a shrink went through");
    assert_eq!(rvol.size().expect("size"), 2 * VOL);

    // Away: the peer grows at its next hello, then gets the write past
    // its old end in the resync.
    replica.stop();
    drop(replica);
    wait_state(&r, PeerState::Away);
    grow(&r, &ppool, 3 * VOL).expect("grow with the peer away");
    write(&r, &pvol, 2 * VOL + 8192, 0x6b);
    let before = r.status();
    let _replica = ReplicaServer::start_persistent(rpool, addr, 0, &book).expect("replica back");
    wait_state(&r, PeerState::Connected);
    assert_eq!(rvol.size().expect("size"), 3 * VOL);
    assert_eq!(read(&rvol, 2 * VOL + 8192), vec![0x6b; 4096]);
    let after = r.status();
    assert_eq!(after.full_syncs, before.full_syncs, "{after:?}");
    assert_eq!(after.resync_chunks - before.resync_chunks, 1, "{after:?}");
}

/// A replica of protocol 4 (before RESIZE frames): it answers a v4 hello
/// and acknowledges every frame; the first hello's version is reported.
fn old_replica(close_newer_hellos: bool) -> (SocketAddr, mpsc::Receiver<u16>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(s) = conn else { return };
            let mut w = s.try_clone().expect("clone");
            let mut rd = BufReader::new(s);
            let Ok(hello) = Hello::read(&mut rd) else {
                continue;
            };
            let _ = tx.send(hello.version);
            if close_newer_hellos && hello.version > MIN_VERSION {
                // What a v4 build does with a v5 hello: closes.
                continue;
            }
            let reply = HelloReply {
                version: MIN_VERSION,
                status: Status::Ok,
                newest_epoch: hello.epoch,
                full_sync: false,
                boot_id: [0; 16],
            };
            if w.write_all(&reply.encode()).is_err() {
                continue;
            }
            while let Ok(f) = Frame::read(&mut rd) {
                let ack = Ack {
                    seq: f.seq,
                    status: Status::Ok,
                    newest_epoch: f.epoch,
                };
                if w.write_all(&ack.encode()).is_err() {
                    break;
                }
            }
        }
    });
    (addr, rx)
}

#[test]
fn an_older_peer_gets_a_clear_error_not_a_frame_it_cannot_read() {
    const { assert!(RESIZE_VERSION > MIN_VERSION && VERSION >= RESIZE_VERSION) };
    for close_newer in [false, true] {
        let (ppool, pvol) = pool_with_volume();
        let (addr, hellos) = old_replica(close_newer);
        let r = replicator(&pvol, addr);
        wait_state(&r, PeerState::Connected);
        let offered: Vec<u16> = hellos.try_iter().collect();
        if close_newer {
            let expected: Vec<u16> = (MIN_VERSION..=VERSION).rev().collect();
            assert_eq!(
                offered, expected,
                "a closed hello is retried one version older each time"
            );
        } else {
            assert_eq!(offered, [VERSION]);
        }
        // Writes replicate; a grow is refused before anything changes.
        write(&r, &pvol, 0, 1);
        match grow(&r, &ppool, 2 * VOL) {
            Err(e @ ReplicationError::PeerTooOld { version, .. }) => {
                assert_eq!(version, MIN_VERSION);
                let text = e.to_string();
                assert!(text.contains("upgrade"), "{text}");
            }
            other => panic!("grow with an old peer: {other:?}"),
        }
        assert_eq!(pvol.size().expect("size"), VOL, "grown despite the refusal");
        assert_eq!(r.status().state, PeerState::Connected);
    }
}
