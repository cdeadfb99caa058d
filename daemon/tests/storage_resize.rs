//! Replicated resize between two `basaltd storage serve` processes: a
//! grow through the primary's storage-local socket
//! (`basaltd storage volume resize --local-socket`) reaches the replica
//! before it returns, so `qemu-io` writes past the old end at once and the
//! replica has the data; a grow while the replica is away reaches it at
//! its return (it grows at the hello, then the resync sends the chunk past
//! the old end), with no full sync; the copies match (`qemu-img
//! compare`).

mod storage_cli;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use basalt_testkit::Prefix;

use storage_cli::{
    assert_same, free_addr, have, is_root, ok, qemu_io, run, serve, two_pools, wait_log,
};

const MIB: u64 = 1 << 20;

/// The export's size, as `qemu-img info` reads it over NBD.
fn size(nbd: SocketAddr) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", &format!("nbd://{nbd}/vol")])
        .output()
        .expect("qemu-img info");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img info: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["virtual-size"].as_u64().expect("virtual-size")
}

#[test]
fn a_grow_on_the_primary_reaches_the_replica_in_write_order() {
    if !is_root() || !["qemu-io", "qemu-img"].iter().all(|p| have(p)) {
        eprintln!("skipping: needs root, qemu-io and qemu-img");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let (pa, pb) = two_pools(&prefix, "512M", "64M");
    let (pa, pb) = (pa.as_str(), pb.as_str());
    let socket = prefix.dir().join("primary.sock");
    let socket = socket.to_str().expect("socket");
    let (nbd_a, nbd_b, repl_b) = (free_addr(), free_addr(), free_addr());
    let mut replica = serve(
        &prefix,
        "replica",
        pb,
        nbd_b,
        &["--replica-listen".into(), repl_b.to_string()],
    );
    let primary = serve(
        &prefix,
        "primary",
        pa,
        nbd_a,
        &[
            "--peer".to_owned(),
            format!("vol={repl_b}"),
            "--epoch".into(),
            "1".into(),
            "--fencer".into(),
            "allow".into(),
            "--local-socket".into(),
            socket.into(),
        ],
    );
    wait_log(&primary, 0, "peer in sync", Duration::from_secs(30));

    // Live: grown on both before the command returns; a write past the
    // old end right after is on the replica.
    let out = ok(&[
        "storage",
        "volume",
        "resize",
        "--local-socket",
        socket,
        "vol",
        "--size",
        "96M",
    ]);
    assert!(out.contains(&(96 * MIB).to_string()), "{out}");
    assert_eq!(size(nbd_b), 96 * MIB, "the replica did not grow");
    let (w, text) = qemu_io(nbd_a, false, &format!("write -P 90 {} 1M", 80 * MIB));
    assert!(w, "write past the old end: {text}");
    assert_eq!(size(nbd_a), 96 * MIB);
    let (r, text) = qemu_io(nbd_b, true, &format!("read -P 90 {} 1M", 80 * MIB));
    assert!(r, "the replica lacks the write past the old end: {text}");
    assert_same(nbd_a, nbd_b);
    // A shrink is refused, naming the size.
    let out = run(&[
        "storage",
        "volume",
        "resize",
        "--local-socket",
        socket,
        "vol",
        "--size",
        "32M",
    ]);
    assert!(!out.status.success(), "a shrink went through");

    // Away: the replica grows at its return and gets the write past its
    // old end in a resync, not a full sync.
    replica.kill9().expect("kill -9 the replica");
    let (w, text) = qemu_io(nbd_a, false, "write -P 1 0 4k");
    assert!(w, "write with the replica away: {text}");
    ok(&[
        "storage",
        "volume",
        "resize",
        "--local-socket",
        socket,
        "vol",
        "--size",
        "128M",
    ]);
    let (w, text) = qemu_io(nbd_a, false, &format!("write -P 91 {} 64k", 120 * MIB));
    assert!(w, "write past the old end with the replica away: {text}");
    let from = primary.logs().len();
    replica.restart().expect("restart the replica");
    replica
        .wait_for_tcp(nbd_b, None, Duration::from_secs(30))
        .expect("replica listening again");
    wait_log(&primary, from, "peer in sync", Duration::from_secs(30));
    let logs = primary.logs();
    assert!(
        !logs[from..].contains("full sync"),
        "the replica was fully synced:\n{}",
        &logs[from..]
    );
    assert_eq!(
        size(nbd_b),
        128 * MIB,
        "the replica did not grow at its return"
    );
    let (r, text) = qemu_io(nbd_b, true, &format!("read -P 91 {} 64k", 120 * MIB));
    assert!(r, "the replica lacks the write past its old end: {text}");
    assert_same(nbd_a, nbd_b);
}
