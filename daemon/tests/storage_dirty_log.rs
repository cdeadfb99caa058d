//! The persistent dirty log of `basaltd storage serve`: a primary killed
//! with `kill -9` and restarted keeps its stream to the replica, so the
//! replica gets only the chunks it may miss — those written while it was
//! away, and those written in the last moments before the kill — never a
//! full sync, and both copies end identical (`qemu-img compare` over
//! both NBD exports).

mod storage_cli;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_testkit::Prefix;
use basalt_testkit::nbd_client::{BLOCK, NbdClient, block};
use basalt_testkit::process::Process;

use storage_cli::{assert_same, field, free_addr, is_root, plain_logs, serve, two_pools, wait_log};

const CHUNK: u64 = 64 << 10;
const VOLUME: u64 = 64 << 20;

/// Restarts the primary after `kill -9` and waits for its resync of the
/// replica; returns (chunks in the dirty log found, resync chunks, resync
/// bytes).
fn restart_and_resync(primary: &mut Process, nbd: SocketAddr) -> (u64, u64, u64) {
    let from = primary.logs().len();
    primary.restart().expect("restart the primary");
    primary
        .wait_for_tcp(nbd, None, Duration::from_secs(30))
        .expect("primary listening again");
    let found = wait_log(primary, from, "dirty log found", Duration::from_secs(10));
    let done = wait_log(primary, from, "peer in sync", Duration::from_secs(30));
    let logs = plain_logs(primary, from);
    assert!(
        !logs.contains("full sync"),
        "a restarted primary fully synced its peer:\n{logs}"
    );
    (
        field(&found, "dirty_chunks"),
        field(&done, "resync_chunks"),
        field(&done, "resync_bytes"),
    )
}

#[test]
fn a_restarted_primary_resyncs_only_the_chunks_in_its_dirty_log() {
    if !is_root() {
        eprintln!("skipping: needs root (test prefix and process harness)");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let (pa, pb) = two_pools(&prefix, "256M", "64M");
    let (pa, pb) = (pa.as_str(), pb.as_str());
    let (nbd_a, nbd_b, repl_b) = (free_addr(), free_addr(), free_addr());
    let mut replica = serve(
        &prefix,
        "replica",
        pb,
        nbd_b,
        &["--replica-listen".into(), repl_b.to_string()],
    );
    let flags = vec![
        "--peer".to_owned(),
        format!("vol={repl_b}"),
        "--epoch".into(),
        "1".into(),
        "--fencer".into(),
        "allow".into(),
    ];
    let mut primary = serve(&prefix, "primary", pa, nbd_a, &flags);
    wait_log(&primary, 0, "peer in sync", Duration::from_secs(20));

    // 16 MiB written while both are up: on both copies.
    let mut c = NbdClient::connect(nbd_a, "vol").expect("connect");
    let mib = vec![0x5au8; 1 << 20];
    for i in 0..16u64 {
        c.write(i << 20, &mib).expect("write in sync");
    }
    c.flush().expect("flush");
    // The dirty log forgets chunks the peer has, a second or two after
    // their last write.
    std::thread::sleep(Duration::from_secs(4));

    // The replica goes away; 40 chunks are written without it.
    replica.kill9().expect("kill -9 the replica");
    let mut away = std::collections::BTreeSet::new();
    for i in 0..40u64 {
        let off = (i * 37 % (VOLUME / CHUNK)) * CHUNK + 512;
        c.write(off, &block(7_000 + i))
            .expect("write with the replica away");
        away.insert(off / CHUNK);
    }
    c.flush().expect("flush");
    wait_log(
        &primary,
        0,
        "peer outdated by the fencer",
        Duration::from_secs(10),
    );
    drop(c);

    // kill -9 of the primary; it comes back, then the replica does.
    primary.kill9().expect("kill -9 the primary");
    let from = primary.logs().len();
    primary.restart().expect("restart the primary");
    primary
        .wait_for_tcp(nbd_a, None, Duration::from_secs(30))
        .expect("primary listening again");
    let found = wait_log(&primary, from, "dirty log found", Duration::from_secs(10));
    assert_eq!(
        field(&found, "dirty_chunks"),
        away.len() as u64,
        "the dirty log holds other chunks than those written while the replica was away: {found}"
    );
    replica.restart().expect("restart the replica");
    let done = wait_log(&primary, from, "peer in sync", Duration::from_secs(30));
    let (chunks, bytes) = (field(&done, "resync_chunks"), field(&done, "resync_bytes"));
    eprintln!(
        "resync after kill -9 of the primary: {chunks} chunks, {bytes} bytes for {} dirty chunks of a {VOLUME}-byte volume",
        away.len()
    );
    assert_eq!(chunks, away.len() as u64, "{done}");
    assert!(bytes <= away.len() as u64 * CHUNK, "{done}");
    assert!(
        bytes * 20 < VOLUME,
        "resync of {bytes} bytes is not a small part of the volume"
    );
    let logs = plain_logs(&primary, from);
    assert!(
        !logs.contains("full sync"),
        "a restarted primary fully synced its peer:\n{logs}"
    );
    replica
        .wait_for_tcp(nbd_b, None, Duration::from_secs(30))
        .expect("replica listening again");
    assert_same(nbd_a, nbd_b);

    // kill -9 of the primary in the middle of a write stream (the peer
    // connected): the chunks written last are in the log, resynced, and
    // the copies are identical again; every acknowledged write is there.
    // (First the log forgets the chunks just resynced: the peer has them.)
    std::thread::sleep(Duration::from_millis(2500));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut c = NbdClient::connect(nbd_a, "vol").expect("connect");
            // 4 KiB blocks over the first 2 MiB (32 chunks), round and round.
            for i in 0.. {
                let off = (i % 512) * BLOCK as u64;
                if stop.load(Ordering::SeqCst) || c.write(off, &block(100_000 + i)).is_err() {
                    return;
                }
                acked.lock().expect("lock").push(i);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while acked.lock().expect("lock").len() < 1500 {
        assert!(Instant::now() < deadline, "replicated writes too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    primary.kill9().expect("kill -9 the primary mid-stream");
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    let acked = std::mem::take(&mut *acked.lock().expect("lock"));
    let (found, chunks, bytes) = restart_and_resync(&mut primary, nbd_a);
    eprintln!(
        "resync after kill -9 mid-stream ({} writes acknowledged): log {found} chunks, resync {chunks} chunks, {bytes} bytes",
        acked.len()
    );
    assert!(
        (1..=32).contains(&found) && chunks == found,
        "the log should hold the hot chunks of the first 2 MiB only: log {found}, resync {chunks}"
    );
    assert_same(nbd_a, nbd_b);
    // The last acknowledged write of each block is on the replica.
    let mut last = std::collections::HashMap::new();
    for &i in &acked {
        last.insert(i % 512, i);
    }
    let mut r = NbdClient::connect(nbd_b, "vol").expect("connect to the replica");
    let mut buf = vec![0u8; BLOCK];
    for (slot, i) in last {
        r.read(slot * BLOCK as u64, &mut buf).expect("read");
        let got = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        // A write in flight at the kill (never acknowledged) may have
        // landed after the last acknowledged one.
        assert!(
            got >= 100_000 + i,
            "acknowledged write {i} missing on the replica (block holds {got})"
        );
    }
}
