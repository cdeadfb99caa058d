//! Replication protocol A end to end, with two `basaltd storage serve`
//! processes: the replica holds its applies (`--hold-replica-writes-when`)
//! while the primary (`--protocol A`) acknowledges writes it only handed
//! to the send buffer; both are killed with `kill -9` before the replica
//! applied them; when they come back the primary resyncs exactly those
//! chunks from its dirty log (no full sync) and `qemu-img compare` finds
//! the two copies identical. On the way, `basaltd storage volume
//! protocol` switches the protocol through the storage-local API and the
//! attachments file keeps it.

mod storage_cli;

use std::net::SocketAddr;
use std::time::Duration;

use basalt_testkit::Prefix;
use basalt_testkit::nbd_client::{BLOCK, NbdClient, block};

use storage_cli::{
    assert_same, field, free_addr, is_root, ok, plain_logs, serve, two_pools, wait_log,
};

const CHUNK: u64 = 64 << 10;

fn read_block(addr: SocketAddr, offset: u64) -> Vec<u8> {
    let mut c = NbdClient::connect(addr, "vol").expect("connect");
    let mut buf = vec![0u8; BLOCK];
    c.read(offset, &mut buf).expect("read");
    buf
}

#[test]
fn writes_acknowledged_under_protocol_a_survive_kill_9_of_both_ends() {
    if !is_root() {
        eprintln!("skipping: needs root (test prefix and process harness)");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let (pa, pb) = two_pools(&prefix, "256M", "64M");
    let (pa, pb) = (pa.as_str(), pb.as_str());
    let (nbd_a, nbd_b, repl_b) = (free_addr(), free_addr(), free_addr());
    let hold = prefix.dir().join("hold-applies");
    let mut replica = serve(
        &prefix,
        "replica",
        pb,
        nbd_b,
        &[
            "--replica-listen".into(),
            repl_b.to_string(),
            "--hold-replica-writes-when".into(),
            hold.to_str().expect("path").into(),
        ],
    );
    let socket = prefix.dir().join("primary.sock");
    let socket = socket.to_str().expect("path");
    let flags = vec![
        "--peer".to_owned(),
        format!("vol={repl_b}"),
        "--epoch".into(),
        "1".into(),
        "--fencer".into(),
        "allow".into(),
        "--protocol".into(),
        "A".into(),
        "--local-socket".into(),
        socket.into(),
    ];
    let mut primary = serve(&prefix, "primary", pa, nbd_a, &flags);
    wait_log(&primary, 0, "peer in sync", Duration::from_secs(20));

    // The storage-local API switches the protocol; the attachment keeps it.
    let attachments = format!("{pa}.attachments");
    for (protocol, word) in [("B", "protocol=B"), ("A", "protocol=A")] {
        let out = ok(&[
            "storage",
            "volume",
            "protocol",
            "--local-socket",
            socket,
            "vol",
            protocol,
        ]);
        assert!(out.contains(&format!("protocol {protocol}")), "{out}");
        let kept = std::fs::read_to_string(&attachments).expect("attachments file");
        assert!(kept.contains(word), "{attachments}: {kept}");
    }
    let out = storage_cli::run(&[
        "storage",
        "volume",
        "protocol",
        "--local-socket",
        socket,
        "vol",
        "D",
    ]);
    assert!(!out.status.success(), "protocol D accepted");

    // 8 MiB on both copies, flushed; the dirty log forgets those chunks a
    // second or two later.
    let mut c = NbdClient::connect(nbd_a, "vol").expect("connect");
    let mib = vec![0x5au8; 1 << 20];
    for i in 0..8u64 {
        c.write(i << 20, &mib).expect("write in sync");
    }
    c.flush().expect("flush");
    std::thread::sleep(Duration::from_secs(4));

    // The replica applies nothing from now on; under A the primary still
    // acknowledges (20 chunks).
    std::fs::write(&hold, b"").expect("hold file");
    let offsets: Vec<u64> = (0..20u64).map(|i| (i * 3 + 1) * CHUNK + 512).collect();
    for (i, &off) in offsets.iter().enumerate() {
        c.write(off, &block(9_000 + i as u64))
            .expect("a write acknowledged under protocol A while the peer holds it");
    }
    wait_log(&replica, 0, "replica applies held", Duration::from_secs(10));
    assert_ne!(
        read_block(nbd_b, offsets[0] & !(BLOCK as u64 - 1)),
        read_block(nbd_a, offsets[0] & !(BLOCK as u64 - 1)),
        "the replica applied a held write"
    );
    drop(c);

    // Both ends die before the replica applied anything held.
    primary.kill9().expect("kill -9 the primary");
    replica.kill9().expect("kill -9 the replica");
    std::fs::remove_file(&hold).expect("release the hold");
    replica.restart().expect("restart the replica");
    replica
        .wait_for_tcp(nbd_b, None, Duration::from_secs(30))
        .expect("replica listening again");
    let from = primary.logs().len();
    primary.restart().expect("restart the primary");
    primary
        .wait_for_tcp(nbd_a, None, Duration::from_secs(30))
        .expect("primary listening again");
    let found = wait_log(&primary, from, "dirty log found", Duration::from_secs(10));
    let done = wait_log(&primary, from, "peer in sync", Duration::from_secs(30));
    let logs = plain_logs(&primary, from);
    assert!(
        !logs.contains("full sync"),
        "a restarted primary fully synced its peer:\n{logs}"
    );
    let (found, chunks, bytes) = (
        field(&found, "dirty_chunks"),
        field(&done, "resync_chunks"),
        field(&done, "resync_bytes"),
    );
    eprintln!(
        "protocol A, both killed: dirty log {found} chunks, resync {chunks} chunks, {bytes} bytes"
    );
    let written = offsets.len() as u64;
    assert_eq!(
        found, written,
        "the log holds other chunks than the {written} acknowledged and not applied"
    );
    assert_eq!(chunks, written, "{done}");
    assert!(bytes <= written * CHUNK, "{done}");
    assert_same(nbd_a, nbd_b);
    for (i, &off) in offsets.iter().enumerate() {
        let aligned = off & !(BLOCK as u64 - 1);
        let on_replica = read_block(nbd_b, aligned);
        let mut expected = vec![0x5au8; BLOCK];
        let within = (off - aligned) as usize;
        let data = block(9_000 + i as u64);
        expected[within..].copy_from_slice(&data[..BLOCK - within]);
        assert_eq!(
            on_replica, expected,
            "acknowledged write {i} is not on the replica"
        );
    }
}
