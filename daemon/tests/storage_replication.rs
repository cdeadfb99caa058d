//! `basaltd storage serve` with synchronous replication, two processes on
//! loopback: a replica (`--replica-listen`) and a primary (`--peer`)
//! serving NBD. `kill -9` of the primary in the middle of a write stream
//! leaves every acknowledged write on the replica, read back through the
//! replica's own NBD export; then the replica is killed and restarted
//! under a primary with `--fencer allow`, and only the chunks written
//! while it was away are resynced (bytes read from the primary's log);
//! a primary restarted with an older epoch is deposed and acknowledges
//! nothing; with `--fencer deny` a write waits for the lost replica.

mod storage_cli;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use basalt_testkit::Prefix;
use basalt_testkit::nbd_client::{BLOCK, NbdClient, WriteStream, block, slot};

use storage_cli::{field, free_addr, is_root, plain_logs, serve, two_pools, wait_log};

const CHUNK: u64 = 64 << 10;
/// A chunk the away-writes below never touch.
const SPARE: u64 = 1023 * CHUNK;

#[test]
fn primary_kill_9_leaves_every_acknowledged_write_on_the_replica_and_resync_is_dirty_only() {
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
    let peer = vec![
        "--peer".to_owned(),
        format!("vol={repl_b}"),
        "--epoch".into(),
        "1".into(),
        "--fencer".into(),
        "deny".into(),
    ];
    let mut primary = serve(&prefix, "primary", pa, nbd_a, &peer);
    wait_log(&primary, 0, "peer in sync", Duration::from_secs(20));

    // A write stream through the primary; kill -9 it in the middle.
    let stream = WriteStream::start(nbd_a, "vol");
    let deadline = Instant::now() + Duration::from_secs(40);
    while stream.acked() < 1500 {
        assert!(Instant::now() < deadline, "replicated writes too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    primary.kill9().expect("kill -9 the primary");
    let acked = stream.finish();
    eprintln!("{} writes acknowledged before kill -9", acked.len());

    // Every acknowledged write is on the replica, through its own export.
    let mut c = NbdClient::connect(nbd_b, "vol").expect("connect to the replica");
    let mut buf = vec![0u8; BLOCK];
    for &i in &acked {
        c.read(slot(i), &mut buf).expect("read");
        assert!(
            buf == block(i),
            "acknowledged write {i} missing on the replica"
        );
    }
    drop(c);

    // The primary comes back with --fencer allow; the replica dies; writes
    // go on; the replica returns and gets only the dirty chunks.
    let allow = vec![
        "--peer".to_owned(),
        format!("vol={repl_b}"),
        "--epoch".into(),
        "2".into(),
        "--fencer".into(),
        "allow".into(),
    ];
    let primary = serve(&prefix, "primary-2", pa, nbd_a, &allow);
    wait_log(&primary, 0, "peer in sync", Duration::from_secs(20));
    let mut c = NbdClient::connect(nbd_a, "vol").expect("connect");
    c.write(SPARE, &block(1_000_000))
        .expect("write while in sync");
    replica.kill9().expect("kill -9 the replica");
    let mut dirty = BTreeSet::new();
    for i in 0..40u64 {
        let off = (i * 37 % 1024) * CHUNK + 512;
        c.write(off, &block(2_000_000 + i))
            .expect("write with the peer away and the fencer allowing");
        dirty.insert(off / CHUNK);
    }
    c.flush().expect("flush");
    wait_log(&primary, 0, "peer lost", Duration::from_secs(10));
    wait_log(
        &primary,
        0,
        "peer outdated by the fencer",
        Duration::from_secs(10),
    );
    // primary-2's own start resynced the chunks its dirty log kept from
    // the kill -9 above: the resync to count is the next one.
    let syncs_before = plain_logs(&primary, 0).matches("resync_bytes=").count();
    replica.restart().expect("restart the replica");
    replica
        .wait_for_tcp(nbd_b, None, Duration::from_secs(30))
        .expect("replica listening again");
    let line = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let logs = plain_logs(&primary, 0);
            if let Some(l) = logs
                .lines()
                .filter(|l| l.contains("resync_bytes="))
                .nth(syncs_before)
            {
                break l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no resync after the replica returned:\n{}",
                primary.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (chunks, bytes) = (field(&line, "resync_chunks"), field(&line, "resync_bytes"));
    eprintln!(
        "resync: {chunks} chunks, {bytes} bytes for {} dirty chunks",
        dirty.len()
    );
    assert_eq!(chunks, dirty.len() as u64, "{line}");
    assert!(bytes > 0 && bytes <= dirty.len() as u64 * CHUNK, "{line}");
    drop(c);

    // The replica holds the writes made while it was away.
    let mut c = NbdClient::connect(nbd_b, "vol").expect("connect to the replica");
    for i in 0..40u64 {
        let off = (i * 37 % 1024) * CHUNK + 512;
        c.read(off, &mut buf).expect("read");
        assert!(buf == block(2_000_000 + i), "resynced write {i} missing");
    }

    drop(c);

    // Demoted back to epoch 1, the primary is refused by the replica (it
    // has seen epoch 2, and remembers it across its own kill -9) and
    // acknowledges no write.
    let mut primary = primary;
    primary
        .stop(Duration::from_secs(10))
        .expect("stop primary-2");
    replica.kill9().expect("kill -9 the replica");
    replica.restart().expect("restart the replica");
    replica
        .wait_for_tcp(nbd_b, None, Duration::from_secs(30))
        .expect("replica listening again");
    let mut old = allow.clone();
    old[3] = "1".into();
    let primary = serve(&prefix, "primary-old", pa, nbd_a, &old);
    wait_log(&primary, 0, "deposed", Duration::from_secs(20));
    let mut c = NbdClient::connect(nbd_a, "vol").expect("connect");
    assert!(
        c.write(SPARE, &block(3_000_000)).is_err(),
        "a deposed primary acknowledged a write"
    );
    let mut r = NbdClient::connect(nbd_b, "vol").expect("connect to the replica");
    r.read(SPARE, &mut buf).expect("read");
    assert!(
        buf == block(1_000_000),
        "the deposed primary's write reached the replica"
    );
}

#[test]
fn fencer_deny_blocks_writes_until_the_replica_returns() {
    if !is_root() {
        eprintln!("skipping: needs root (test prefix and process harness)");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let (pa, pb) = two_pools(&prefix, "64M", "16M");
    let (pa, pb) = (pa.as_str(), pb.as_str());
    let (nbd_a, nbd_b, repl_b) = (free_addr(), free_addr(), free_addr());
    let mut replica = serve(
        &prefix,
        "replica",
        pb,
        nbd_b,
        &["--replica-listen".into(), repl_b.to_string()],
    );
    let deny = vec![
        "--peer".to_owned(),
        format!("vol={repl_b}"),
        "--fencer".into(),
        "deny".into(),
    ];
    let primary = serve(&prefix, "primary", pa, nbd_a, &deny);
    wait_log(&primary, 0, "peer in sync", Duration::from_secs(20));
    let mut c = NbdClient::connect(nbd_a, "vol").expect("connect");
    c.write(0, &block(1)).expect("write in sync");
    replica.kill9().expect("kill -9 the replica");
    wait_log(&primary, 0, "peer lost", Duration::from_secs(10));

    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let result = c.write(CHUNK, &block(2)).is_ok();
        tx.send(result).expect("send");
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(1500)).is_err(),
        "a write was acknowledged with the replica gone and the fencer denying"
    );
    replica.restart().expect("restart the replica");
    let acked = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the write still blocks after the replica returned");
    assert!(acked, "the suspended write failed instead of completing");
    writer.join().expect("writer");
    replica
        .wait_for_tcp(nbd_b, None, Duration::from_secs(30))
        .expect("replica listening");
    let mut r = NbdClient::connect(nbd_b, "vol").expect("connect to the replica");
    let mut buf = vec![0u8; BLOCK];
    r.read(CHUNK, &mut buf).expect("read");
    assert!(buf == block(2), "the suspended write is not on the replica");
}
