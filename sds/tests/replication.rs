//! Replication between a primary [`Replicator`] and a [`ReplicaServer`]
//! on loopback, in one process: protocol C (a write returns only once the
//! replica has it), epoch fencing (old hellos and frames refused, a
//! deposed primary acknowledges nothing), peer loss with a fencer that
//! allows (writes go on; on return only the dirty chunks are resynced,
//! bytes counted) and one that denies (writes wait for the peer).

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use basalt_sds::backend::MemBackend;
use basalt_sds::pool::{Pool, PoolOptions, Volume};
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::wire::{
    self, Ack, Frame, FrameKind, Hello, HelloReply, Status, VERSION,
};
use basalt_sds::replication::{
    Op, PeerState, ReplicationError, Replicator, ReplicatorConfig, StaticFencer,
};

const VOL: u64 = 16 << 20;
const CHUNK: u64 = 64 << 10;

fn pool_with_volume() -> (Pool, Volume) {
    let pool =
        Pool::create(Arc::new(MemBackend::new(64 << 20)), &PoolOptions::default()).expect("pool");
    pool.create_volume("vol", VOL).expect("volume");
    let vol = pool.open_volume("vol").expect("open");
    (pool, vol)
}

fn replicator(vol: &Volume, peer: SocketAddr, epoch: u64, allow: bool) -> Replicator {
    let cfg = ReplicatorConfig {
        peer,
        epoch,
        generation: 42,
        chunk_size: CHUNK,
        retry: Duration::from_millis(50),
        protocol: Default::default(),
    };
    Replicator::start(vol.clone(), cfg, Arc::new(StaticFencer { allow })).expect("replicator")
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

#[test]
fn every_returned_write_is_already_on_the_replica() {
    let (rpool, rvol) = pool_with_volume();
    let replica =
        ReplicaServer::start(rpool, "127.0.0.1:0".parse().expect("addr"), 0).expect("replica");
    let (_ppool, pvol) = pool_with_volume();
    let r = replicator(&pvol, replica.addr(), 1, false);
    wait_state(&r, |s| s == PeerState::Connected);
    for i in 0..200u64 {
        let off = (i * 7919 % (VOL / 4096)) * 4096;
        write(&r, &pvol, off, &pattern(i)).expect("write");
        // Protocol C: no wait, the replica has it when submit returns.
        assert_eq!(read(&rvol, off, 4096), pattern(i), "write {i}");
    }
    r.submit(Op::Flush, || pvol.flush()).expect("flush");
    let trim_at = 5 * CHUNK;
    r.submit(
        Op::Trim {
            offset: trim_at,
            len: CHUNK as u32,
            fua: false,
        },
        || pvol.trim(trim_at, CHUNK, false),
    )
    .expect("trim");
    assert_eq!(
        read(&rvol, trim_at, CHUNK as usize),
        read(&pvol, trim_at, CHUNK as usize)
    );
    assert_eq!(r.status().acked_frames, 202);
    assert_eq!(
        replica
            .stats()
            .applied_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        202
    );
}

fn raw_hello(addr: SocketAddr, epoch: u64) -> (BufReader<TcpStream>, TcpStream, HelloReply) {
    let s = TcpStream::connect(addr).expect("connect");
    let mut w = s.try_clone().expect("clone");
    let mut rd = BufReader::new(s);
    let hello = Hello {
        version: VERSION,
        epoch,
        generation: 1,
        synced_from: 0,
        volume_uid: uuid::Uuid::nil(),
        size: VOL,
        volume: "vol".into(),
    };
    w.write_all(&hello.encode()).expect("hello");
    let reply = HelloReply::read(&mut rd).expect("hello reply");
    (rd, w, reply)
}

fn raw_write(
    rd: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    epoch: u64,
    seq: u64,
    byte: u8,
) -> Ack {
    let f = Frame {
        kind: FrameKind::Write,
        flags: 0,
        epoch,
        seq,
        offset: 0,
        length: 4096,
        data: vec![byte; 4096],
    };
    f.write_to(w).expect("frame");
    Ack::read(rd).expect("ack")
}

#[test]
fn old_epochs_are_refused_and_a_deposed_primary_acknowledges_nothing() {
    let (rpool, rvol) = pool_with_volume();
    let replica =
        ReplicaServer::start(rpool, "127.0.0.1:0".parse().expect("addr"), 0).expect("replica");
    let addr = replica.addr();

    let (mut rd5, mut w5, reply) = raw_hello(addr, 5);
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(raw_write(&mut rd5, &mut w5, 5, 1, 0xaa).status, Status::Ok);
    assert_eq!(read(&rvol, 0, 4096), vec![0xaa; 4096]);

    // An older primary cannot even connect.
    let (_, _, reply) = raw_hello(addr, 4);
    assert_eq!(reply.status, Status::StaleEpoch);
    assert_eq!(reply.newest_epoch, 5);

    // A newer primary takes over; the old one's next frame is refused and
    // not applied.
    let (mut rd6, mut w6, reply) = raw_hello(addr, 6);
    assert_eq!(reply.status, Status::Ok);
    let ack = raw_write(&mut rd5, &mut w5, 5, 2, 0xbb);
    assert_eq!(ack.status, Status::StaleEpoch);
    assert_eq!(ack.newest_epoch, 6);
    assert_eq!(
        read(&rvol, 0, 4096),
        vec![0xaa; 4096],
        "stale frame applied"
    );
    assert_eq!(raw_write(&mut rd6, &mut w6, 6, 1, 0xcc).status, Status::Ok);
    assert_eq!(read(&rvol, 0, 4096), vec![0xcc; 4096]);
    assert_eq!(replica.newest_epoch("vol"), 6);
    assert_eq!(
        replica
            .stats()
            .rejected_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // A whole primary with an old epoch is deposed and acknowledges
    // nothing, even with a fencer that would allow.
    let (_ppool, pvol) = pool_with_volume();
    let r = replicator(&pvol, addr, 3, true);
    wait_state(&r, |s| matches!(s, PeerState::Deposed { newest: 6 }));
    let err = write(&r, &pvol, 0, &pattern(1)).expect_err("deposed primary wrote");
    assert!(
        matches!(
            err,
            ReplicationError::StaleEpoch {
                epoch: 3,
                newest: 6
            }
        ),
        "{err}"
    );
    assert_eq!(read(&rvol, 0, 4096), vec![0xcc; 4096]);

    // Garbage on the replication port closes that connection, nothing else.
    let mut junk = TcpStream::connect(addr).expect("connect");
    junk.write_all(&[0xff; 64]).expect("junk");
    drop(junk);
    assert_eq!(raw_write(&mut rd6, &mut w6, 6, 2, 0xdd).status, Status::Ok);
    let _ = wire::MAX_FRAME_PAYLOAD;
}

#[test]
fn fencer_allow_goes_on_without_the_peer_and_resyncs_only_dirty_chunks() {
    let (rpool, rvol) = pool_with_volume();
    let dir = tempfile::tempdir().expect("tempdir");
    let book = dir.path().join("pool.epochs");
    let any = "127.0.0.1:0".parse().expect("addr");
    let replica = ReplicaServer::start_persistent(rpool.clone(), any, 0, &book).expect("replica");
    let addr = replica.addr();
    let (_ppool, pvol) = pool_with_volume();
    let r = replicator(&pvol, addr, 1, true);
    wait_state(&r, |s| s == PeerState::Connected);
    for i in 0..64u64 {
        write(&r, &pvol, i * CHUNK, &pattern(i)).expect("write");
    }
    replica.stop();
    drop(replica);
    // Writes go on: 3 chunks, one write spanning a chunk boundary.
    let away: [(u64, u64); 4] = [
        (3 * CHUNK, 100),
        (3 * CHUNK + 8192, 101),
        (10 * CHUNK, 102),
        (20 * CHUNK + CHUNK - 2048, 103),
    ];
    for &(off, i) in &away {
        write(&r, &pvol, off, &pattern(i)).expect("write while the peer is away");
    }
    let st = r.status();
    assert_eq!(st.state, PeerState::Away);
    assert_eq!(st.dirty_chunks, 4, "{st:?}");
    assert_ne!(read(&rvol, 10 * CHUNK, 4096), pattern(102));

    // The restarted replica remembers it is in sync with this stream: no
    // full sync, only the dirty chunks.
    let replica = ReplicaServer::start_persistent(rpool, addr, 0, &book).expect("replica back");
    wait_state(&r, |s| s == PeerState::Connected);
    let st = r.status();
    assert_eq!(
        st.full_syncs, 1,
        "only the first connection fully syncs: {st:?}"
    );
    assert_eq!(st.dirty_chunks, 0);
    assert_eq!(st.resync_chunks, 4);
    assert!(
        st.resync_bytes > 0 && st.resync_bytes <= 4 * CHUNK,
        "{st:?}"
    );
    assert_eq!(
        replica
            .stats()
            .resync_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        st.resync_bytes
    );
    // The replica now equals the primary, byte for byte.
    assert!(read(&rvol, 0, VOL as usize) == read(&pvol, 0, VOL as usize));
    // And live replication resumed.
    write(&r, &pvol, 40 * CHUNK, &pattern(7)).expect("write");
    assert_eq!(read(&rvol, 40 * CHUNK, 4096), pattern(7));
}

#[test]
fn fencer_deny_suspends_writes_until_the_peer_returns() {
    let (rpool, rvol) = pool_with_volume();
    let dir = tempfile::tempdir().expect("tempdir");
    let book = dir.path().join("pool.epochs");
    let any = "127.0.0.1:0".parse().expect("addr");
    let replica = ReplicaServer::start_persistent(rpool.clone(), any, 0, &book).expect("replica");
    let addr = replica.addr();
    let (_ppool, pvol) = pool_with_volume();
    let r = replicator(&pvol, addr, 1, false);
    wait_state(&r, |s| s == PeerState::Connected);
    write(&r, &pvol, 0, &pattern(1)).expect("write");
    replica.stop();
    drop(replica);
    wait_state(&r, |s| s == PeerState::Away);

    let (tx, rx) = mpsc::channel();
    let (r2, v2) = (r.clone(), pvol.clone());
    let writer = std::thread::spawn(move || {
        let result = write(&r2, &v2, 2 * CHUNK, &pattern(2));
        tx.send(result.is_ok()).expect("send");
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(700)).is_err(),
        "a write was acknowledged without the peer and without the fencer"
    );
    let _replica = ReplicaServer::start_persistent(rpool, addr, 0, &book).expect("replica back");
    let ok = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("write still blocked after the peer returned");
    assert!(ok);
    writer.join().expect("writer");
    assert_eq!(read(&rvol, 2 * CHUNK, 4096), pattern(2));
    // The blocked write reaches the peer either by resync (its chunk was
    // marked dirty) or shipped once the link is back, depending on timing;
    // either way no more than that one chunk is resynced.
    let resynced = r.status().resync_chunks;
    assert!(
        resynced <= 1,
        "resynced {resynced} chunks for one dirty chunk"
    );
}

#[test]
fn a_restarted_replica_remembers_the_newest_epoch() {
    let (rpool, _rvol) = pool_with_volume();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pool.epochs");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let replica = ReplicaServer::start_persistent(rpool.clone(), any, 0, &file).expect("replica");
    let (_, _, reply) = raw_hello(replica.addr(), 7);
    assert_eq!(reply.status, Status::Ok);
    replica.stop();
    drop(replica);
    let replica = ReplicaServer::start_persistent(rpool.clone(), any, 0, &file).expect("replica");
    let (_, _, reply) = raw_hello(replica.addr(), 6);
    assert_eq!(
        reply.status,
        Status::StaleEpoch,
        "epoch 7 forgotten across a restart"
    );
    assert_eq!(reply.newest_epoch, 7);
    let (_, _, reply) = raw_hello(replica.addr(), 7);
    assert_eq!(reply.status, Status::Ok);
    // A damaged epoch file stops the replica from starting.
    std::fs::write(&file, "vol seven\n").expect("write");
    assert!(ReplicaServer::start_persistent(rpool, any, 0, &file).is_err());
}

#[test]
fn a_primary_deposed_while_connected_refuses_its_next_write_before_writing_it() {
    let (rpool, rvol) = pool_with_volume();
    let replica =
        ReplicaServer::start(rpool, "127.0.0.1:0".parse().expect("addr"), 0).expect("replica");
    let addr = replica.addr();
    let (_ppool, pvol) = pool_with_volume();
    let r = replicator(&pvol, addr, 1, true);
    wait_state(&r, |s| s == PeerState::Connected);
    write(&r, &pvol, 0, &pattern(1)).expect("write at epoch 1");
    assert_eq!(read(&rvol, 0, 4096), pattern(1));

    // A newer primary greets the replica while this one stays connected:
    // the replica tells this one at once (an unsolicited stale-epoch ack).
    let (_rd, _w, reply) = raw_hello(addr, 2);
    assert_eq!(reply.status, Status::Ok);
    wait_state(&r, |s| matches!(s, PeerState::Deposed { newest: 2 }));
    // Its next write is refused before it touches either copy.
    let err = write(&r, &pvol, 0, &pattern(2)).expect_err("a deposed primary wrote");
    assert!(
        matches!(
            err,
            ReplicationError::StaleEpoch {
                epoch: 1,
                newest: 2
            }
        ),
        "{err}"
    );
    assert_eq!(
        read(&pvol, 0, 4096),
        pattern(1),
        "the deposed primary applied the refused write to its own copy"
    );
    assert_eq!(read(&rvol, 0, 4096), pattern(1));
}

/// What a fake replica saw of one connection: each frame's kind, flags
/// and offset, in order.
type Seen = Vec<(FrameKind, u8, u64)>;

/// A fake replica listening on `addr`, speaking version 7: it answers
/// every hello "in sync", and every frame ok after `delay`; each
/// connection's frames go to the receiver when it ends.
fn fake_replica(addr: SocketAddr, delay: Duration) -> mpsc::Receiver<Seen> {
    let listener = std::net::TcpListener::bind(addr).expect("bind");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut w = conn.try_clone().expect("clone");
            let mut rd = BufReader::new(conn);
            let Ok(hello) = Hello::read(&mut rd) else {
                continue;
            };
            let reply = HelloReply {
                version: hello.version.min(wire::SYNCED_LIVE_VERSION),
                status: Status::Ok,
                newest_epoch: hello.epoch,
                full_sync: false,
                boot_id: [1; 16],
            };
            if w.write_all(&reply.encode()).is_err() {
                continue;
            }
            let mut seen = Seen::new();
            while let Ok(f) = Frame::read(&mut rd) {
                seen.push((f.kind, f.flags, f.offset));
                std::thread::sleep(delay);
                let ack = Ack {
                    seq: f.seq,
                    status: Status::Ok,
                    newest_epoch: hello.epoch,
                };
                if w.write_all(&ack.encode()).is_err() {
                    break;
                }
            }
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn the_synced_flush_comes_only_after_the_last_resync_batch() {
    // A port nobody listens on yet: the primary starts with its peer away.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let (_pool, vol) = pool_with_volume();
    let r = replicator(&vol, addr, 1, true);
    // Writes while the peer is away: 8 dirty chunks.
    for c in 0..8u64 {
        write(&r, &vol, c * CHUNK, &pattern(c)).expect("write while away");
    }
    assert_eq!(r.status().dirty_chunks, 8, "{:?}", r.status());
    // The peer comes up and acks every 20 ms: the first resync batch
    // takes long enough for writes meanwhile to make a second one.
    let seen = fake_replica(addr, Duration::from_millis(20));
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.status().state != PeerState::Resyncing {
        assert!(Instant::now() < deadline, "{:?}", r.status());
        std::thread::sleep(Duration::from_millis(1));
    }
    for c in 20..24u64 {
        write(&r, &vol, c * CHUNK, &pattern(c)).expect("write during the resync");
    }
    wait_state(&r, |s| s == PeerState::Connected);
    write(&r, &vol, 40 * CHUNK, &pattern(40)).expect("live write");
    r.shutdown();
    drop(r);
    let frames = seen.recv_timeout(Duration::from_secs(10)).expect("frames");
    let synced = |&(kind, flags, _): &(FrameKind, u8, u64)| {
        kind == FrameKind::Flush && flags & wire::FLAG_SYNCED != 0
    };
    let resynced = |&(kind, flags, _): &(FrameKind, u8, u64)| {
        kind == FrameKind::Write && flags & wire::FLAG_RESYNC != 0
    };
    let last_resync = frames.iter().rposition(resynced).expect("resync writes");
    let first_synced = frames.iter().position(synced).expect("a SYNCED flush");
    let batch_flushes = frames[..last_resync]
        .iter()
        .filter(|f| f.0 == FrameKind::Flush)
        .count();
    assert!(
        batch_flushes >= 1,
        "the resync ran in one batch, so it tests nothing: {frames:?}"
    );
    assert!(
        first_synced > last_resync,
        "a SYNCED flush came before the last resync write: {frames:?}"
    );
    assert_eq!(frames.iter().filter(|f| synced(f)).count(), 1, "{frames:?}");
    // It comes before the first live write.
    let live = frames
        .iter()
        .position(|&(kind, flags, off)| {
            kind == FrameKind::Write && flags & wire::FLAG_RESYNC == 0 && off == 40 * CHUNK
        })
        .expect("the live write");
    assert!(first_synced < live, "{frames:?}");
}
