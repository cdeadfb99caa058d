//! Power loss and the dirty log: writes not covered by a FLUSH, then a
//! simulated power loss (memory backends that drop every write not
//! synced) on the primary or on its peer; after the restart the resync
//! makes both copies equal (`qemu-img compare` on their images) without a
//! full sync. The primary's dirty log lives on a memory store too, so
//! its bits not synced are lost with the rest: what survives is the
//! activity log's hot extents, made durable before any write to them went
//! out.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_sds::backend::MemBackend;
use basalt_sds::pool::{Pool, PoolOptions, Volume};
use basalt_sds::replication::dirty_log::{DirtyLog, EXTENT_CHUNKS, HEADER, LogKey};
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::{
    Op, PeerState, Replicator, ReplicatorConfig, StaticFencer, SyncOptions,
};

const VOL: u64 = 32 << 20;
const CHUNK: u64 = 64 << 10;
const POOL: usize = 64 << 20;

fn wait_connected(r: &Replicator) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.status().state != PeerState::Connected {
        assert!(Instant::now() < deadline, "not connected: {:?}", r.status());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn block(i: u64) -> Vec<u8> {
    let mut b = vec![(i % 251) as u8 + 1; 4096];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

fn write(r: &Replicator, vol: &Volume, offset: u64, data: &[u8]) {
    r.submit(
        Op::Write {
            offset,
            data,
            fua: false,
        },
        || vol.write(offset, data, false),
    )
    .expect("replicated write");
}

fn flush(r: &Replicator, vol: &Volume) {
    r.submit(Op::Flush, || vol.flush())
        .expect("replicated flush");
}

/// Every chunk written once, then flushed: the copies' baseline.
fn baseline(r: &Replicator, vol: &Volume) {
    for c in 0..VOL / CHUNK {
        write(r, vol, c * CHUNK, &block(c));
    }
    flush(r, vol);
}

/// Both copies hold the same bytes: compared here and by `qemu-img
/// compare` on images of them.
fn assert_equal(a: &Volume, b: &Volume, dir: &Path) {
    let (mut x, mut y) = (vec![0u8; VOL as usize], vec![0u8; VOL as usize]);
    a.read(0, &mut x).expect("read primary");
    b.read(0, &mut y).expect("read peer");
    let differ: Vec<u64> = (0..VOL / CHUNK)
        .filter(|&c| {
            let r = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
            x[r.clone()] != y[r]
        })
        .collect();
    assert!(
        differ.is_empty(),
        "chunks differ between the copies: {differ:?}"
    );
    let (pa, pb) = (dir.join("primary.raw"), dir.join("peer.raw"));
    std::fs::write(&pa, &x).expect("image");
    std::fs::write(&pb, &y).expect("image");
    match std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&pa)
        .arg(&pb)
        .status()
    {
        Ok(s) => assert!(s.success(), "qemu-img compare: the images differ ({s})"),
        Err(e) => eprintln!("qemu-img not available ({e}): compared in memory only"),
    }
}

struct Primary {
    backend: Arc<MemBackend>,
    log_store: Arc<MemBackend>,
    pool: Pool,
    vol: Volume,
    repl: Replicator,
}

fn start_primary(
    backend: Arc<MemBackend>,
    log_store: Arc<MemBackend>,
    peer: SocketAddr,
    boot: [u8; 16],
    fresh: bool,
) -> (Primary, DirtyLogInfo) {
    let pool = if fresh {
        let pool = Pool::create(backend.clone(), &PoolOptions::default()).expect("pool");
        pool.create_volume("vol", VOL).expect("volume");
        pool
    } else {
        Pool::open_in_boot(backend.clone(), boot).expect("reopen the primary's pool")
    };
    let vol = pool.open_volume("vol").expect("open");
    let peer_name = peer.to_string();
    let key = LogKey {
        volume_uid: vol.uid(),
        peer: &peer_name,
        chunk_size: CHUNK as u32,
    };
    let mut log = DirtyLog::open_in(log_store.clone(), &key, || 42, boot).expect("dirty log");
    // Two hot extents: what a restart after a power loss resyncs is
    // bounded by them.
    log.set_activity_extents(2).expect("activity log");
    let info = DirtyLogInfo {
        reused: log.reused(),
        generation: log.generation(),
        set: log.set_chunks(),
    };
    let repl = Replicator::start_logged(
        vol.clone(),
        ReplicatorConfig {
            peer,
            epoch: 1,
            generation: 0,
            chunk_size: CHUNK,
            retry: Duration::from_millis(50),
            protocol: Default::default(),
        },
        Arc::new(StaticFencer { allow: true }),
        SyncOptions::default(),
        Some(log),
    )
    .expect("replicator");
    (
        Primary {
            backend,
            log_store,
            pool,
            vol,
            repl,
        },
        info,
    )
}

#[derive(Debug)]
struct DirtyLogInfo {
    reused: bool,
    generation: u64,
    set: Vec<u64>,
}

#[test]
fn a_primary_that_loses_power_resyncs_its_hot_extents_and_the_copies_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    let peer_backend = Arc::new(MemBackend::new(POOL));
    let peer_pool = Pool::create(peer_backend, &PoolOptions::default()).expect("peer pool");
    peer_pool.create_volume("vol", VOL).expect("volume");
    let replica = ReplicaServer::start_persistent(
        peer_pool.clone(),
        "127.0.0.1:0".parse().expect("addr"),
        0,
        &dir.path().join("peer.epochs"),
    )
    .expect("replica");
    let (p, _) = start_primary(
        Arc::new(MemBackend::new(POOL)),
        Arc::new(MemBackend::new((HEADER + 4096) as usize)),
        replica.addr(),
        [1; 16],
        true,
    );
    wait_connected(&p.repl);
    assert_eq!(p.repl.status().full_syncs, 1, "a new peer is filled once");
    baseline(&p.repl, &p.vol);
    // The cleaner forgets the baseline's chunks once both sides flushed.
    std::thread::sleep(Duration::from_secs(5));

    // Writes no FLUSH covers, in extents 1 and 5: shipped to the peer and
    // applied here, in the page cache only.
    let hot: Vec<u64> = (70..76).chain(330..336).collect();
    for (i, &c) in hot.iter().enumerate() {
        write(&p.repl, &p.vol, c * CHUNK + 4096, &block(1000 + i as u64));
    }
    assert!(
        p.backend.unsynced_writes() > 0,
        "the writes are not synced here"
    );

    // Power loss on the primary: nothing unsynced survives, in the pool
    // or in the dirty log.
    let (backend, log_store) = (
        Arc::new(p.backend.crash(|_, _| false)),
        Arc::new(p.log_store.crash(|_, _| false)),
    );
    p.repl.shutdown();
    drop(p);

    let (p, log) = start_primary(backend, log_store, replica.addr(), [2; 16], false);
    assert!(log.reused && log.generation == 42, "{log:?}");
    for c in &hot {
        assert!(
            log.set.contains(c),
            "chunk {c} is not in the log after the power loss: {log:?}"
        );
    }
    assert!(
        log.set.len() as u64 <= 2 * EXTENT_CHUNKS,
        "more than the two hot extents are set: {log:?}"
    );
    wait_connected(&p.repl);
    let st = p.repl.status();
    eprintln!(
        "primary power loss: resync {} chunks ({} bytes) of {} for {} unflushed writes",
        st.resync_chunks,
        st.resync_bytes,
        VOL / CHUNK,
        hot.len()
    );
    assert_eq!(
        st.full_syncs, 0,
        "the restarted primary fully synced: {st:?}"
    );
    assert!(
        st.resync_chunks >= hot.len() as u64 && st.resync_chunks <= 2 * EXTENT_CHUNKS,
        "{st:?}"
    );
    let peer_vol = peer_pool.open_volume("vol").expect("peer volume");
    assert_equal(&p.vol, &peer_vol, dir.path());
    p.pool.verify().expect("primary pool verifies");
    peer_pool.verify().expect("peer pool verifies");
}

#[test]
fn a_peer_that_loses_power_gets_back_what_it_had_not_flushed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let epochs = dir.path().join("peer.epochs");
    let mut peer_backend = Arc::new(MemBackend::new(POOL));
    let mut peer_pool =
        Pool::create(peer_backend.clone(), &PoolOptions::default()).expect("peer pool");
    peer_pool.create_volume("vol", VOL).expect("volume");
    let mut replica = ReplicaServer::start_persistent(
        peer_pool.clone(),
        "127.0.0.1:0".parse().expect("addr"),
        0,
        &epochs,
    )
    .expect("replica");
    let addr = replica.addr();
    let (p, _) = start_primary(
        Arc::new(MemBackend::new(POOL)),
        Arc::new(MemBackend::new((HEADER + 4096) as usize)),
        addr,
        [1; 16],
        true,
    );
    wait_connected(&p.repl);
    baseline(&p.repl, &p.vol);
    std::thread::sleep(Duration::from_secs(5));

    // Twice: the peer loses power right after writes it acknowledged but
    // never flushed (they are in the primary's log: the lost connection
    // puts them in the dirty set), then again a few seconds after such
    // writes (the dirty log's cleaner clears a bit only after a FLUSH on
    // both sides).
    for (round, wait) in [(0u64, Duration::ZERO), (1, Duration::from_secs(5))] {
        let chunks: Vec<u64> = (0..8)
            .map(|i| (round * 97 + i * 61) % (VOL / CHUNK))
            .collect();
        for (i, &c) in chunks.iter().enumerate() {
            write(
                &p.repl,
                &p.vol,
                c * CHUNK,
                &block(5000 + round * 100 + i as u64),
            );
        }
        std::thread::sleep(wait);
        let before = p.repl.status();
        // Stopped first: nothing the old replica acknowledges (a FLUSH of
        // the dirty log's cleaner, say) can miss the crashed image.
        replica.stop();
        drop(replica);
        let crashed = Arc::new(peer_backend.crash(|_, _| false));
        peer_backend = crashed;
        peer_pool = Pool::open_in_boot(peer_backend.clone(), [10 + round as u8; 16])
            .expect("reopen the peer's pool");
        // The primary sees the peer gone before it comes back.
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.repl.status().state == PeerState::Connected {
            assert!(Instant::now() < deadline, "the peer's loss is not seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        replica = ReplicaServer::start_persistent(peer_pool.clone(), addr, 0, &epochs)
            .expect("replica back");
        wait_connected(&p.repl);
        let st = p.repl.status();
        eprintln!(
            "peer power loss {round}: resync {} chunks for {} writes",
            st.resync_chunks - before.resync_chunks,
            chunks.len()
        );
        assert_eq!(
            st.full_syncs, before.full_syncs,
            "the peer was fully synced: {st:?}"
        );
        let peer_vol = peer_pool.open_volume("vol").expect("peer volume");
        assert_equal(&p.vol, &peer_vol, dir.path());
        peer_pool.verify().expect("peer pool verifies");
    }
}
