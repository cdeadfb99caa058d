//! A backing-device failure under `basaltd storage serve`, with QEMU's
//! own NBD client: a primary replicating to a peer loses its disk (the
//! test backend fails every I/O once a trigger file exists); the disk is
//! detached (FAILED in the storage-local status), and the volume goes on
//! diskless: `qemu-io` writes through the primary still succeed (the peer
//! has them), and reads through the primary — of data written before and
//! after the failure — are served by the peer; block status reports no
//! hole where only the peer holds data (a `qemu-img convert` of the
//! primary's export matches the peer's). Once the device works again,
//! `basaltd storage volume attach-disk` attaches it: the chunks written
//! meanwhile are copied back from the peer while writes go on
//! (the copy-back held by the hidden `--hold-copy-back-when`: `qemu-io`
//! writes into chunks not copied back yet, and reads of them, complete
//! before `attach-disk` returns, and are never overwritten by the older
//! copies), and both copies match (`qemu-img compare`).

mod storage_cli;

use std::time::{Duration, Instant};

use basalt_api::{DiskState, ReplicaPeerState, StorageClient, StorageStatus};
use basalt_testkit::Prefix;

/// `qemu-io` on the export at `nbd`: whether it succeeded, and its output.
use storage_cli::{assert_same, free_addr, is_root, qemu_img, qemu_io, run, serve, two_pools};

#[test]
fn a_primary_whose_disk_fails_serves_the_volume_from_its_peer() {
    if !is_root() {
        eprintln!("skipping: needs root (test prefix and process harness)");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let (pa, pb) = two_pools(&prefix, "64M", "16M");
    let (pa, pb) = (pa.as_str(), pb.as_str());
    let trigger = prefix.dir().join("a-disk-dies");
    let hold = prefix.dir().join("hold-copy-back");
    let socket = prefix.dir().join("a.sock");
    let (nbd_a, nbd_b, repl_b) = (free_addr(), free_addr(), free_addr());
    let _replica = serve(
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
            "--fencer".into(),
            "allow".into(),
            "--local-socket".into(),
            socket.to_str().expect("socket").into(),
            "--fail-io-when".into(),
            trigger.to_str().expect("trigger").into(),
            "--hold-copy-back-when".into(),
            hold.to_str().expect("hold").into(),
        ],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let api = {
        let _in = rt.enter();
        StorageClient::connect_unix(&socket).expect("client")
    };
    let status = || -> StorageStatus {
        rt.block_on(async {
            loop {
                if let Ok(st) = api.status().await {
                    break st;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while status().replicas.first().map(|p| p.state) != Some(ReplicaPeerState::Connected) {
        assert!(Instant::now() < deadline, "{}", primary.log_tail(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (done, text) = qemu_io(nbd_a, false, "write -P 0x11 0 1M");
    assert!(done, "write with the disk up: {text}");
    assert_eq!(status().disk_state, DiskState::Attached);

    // The disk dies.
    std::fs::write(&trigger, b"").expect("trigger");
    let (done, text) = qemu_io(nbd_a, false, "write -P 0x22 1M 1M");
    assert!(done, "a write failed with the peer holding it: {text}");
    let st = status();
    assert_eq!(st.disk_state, DiskState::Failed, "{st:?}");
    assert!(!st.disk_error.is_empty(), "{st:?}");
    eprintln!(
        "after the failure: disk {:?} ({})",
        st.disk_state, st.disk_error
    );
    let (done, text) = qemu_io(nbd_a, false, "write -P 0x33 4M 64k");
    assert!(done, "a diskless write failed: {text}");
    for (pattern, offset, len) in [
        ("0x11", "0", "1M"),
        ("0x22", "1M", "1M"),
        ("0x33", "4M", "64k"),
    ] {
        let command = format!("read -P {pattern} {offset} {len}");
        let (done, text) = qemu_io(nbd_a, false, &command);
        assert!(done, "diskless primary, {command}: {text}");
        let (done, text) = qemu_io(nbd_b, false, &command);
        assert!(done, "replica, {command}: {text}");
    }
    assert!(
        primary.logs().contains("the disk is detached"),
        "{}",
        primary.log_tail(20)
    );
    // Block status does not call a hole what only the peer holds: a
    // client that skips holes (`qemu-img convert`) reads it, from the
    // peer, and its copy matches the peer's.
    let copy = prefix.dir().join("while-detached.raw");
    let copy = copy.to_str().expect("copy path");
    let (a, b) = (format!("nbd://{nbd_a}/vol"), format!("nbd://{nbd_b}/vol"));
    qemu_img(
        "convert the detached primary's export",
        &["convert", "-f", "raw", "-O", "raw", &a, copy],
    );
    qemu_img(
        "the converted copy differs from the peer's",
        &["compare", "-f", "raw", "-F", "raw", copy, &b],
    );

    // Attached again by the operator: refused while the device still
    // fails; once it works, the chunks written while it was detached are
    // copied back from the peer and the copies match.
    let sock = socket.to_str().expect("socket");
    let out = run(&["storage", "volume", "attach-disk", "--local-socket", sock]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("still fails"),
        "attached with the device failing: {text}"
    );
    assert_eq!(status().disk_state, DiskState::Failed);
    std::fs::remove_file(&trigger).expect("the device works again");
    std::fs::write(&hold, b"").expect("hold the copy-back");
    let mut attach = std::process::Command::new(env!("CARGO_BIN_EXE_basaltd"))
        .args(["storage", "volume", "attach-disk", "--local-socket", sock])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("basaltd storage volume attach-disk");
    let deadline = Instant::now() + Duration::from_secs(20);
    while status().disk_state != DiskState::Attached {
        assert!(Instant::now() < deadline, "{}", primary.log_tail(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The copy-back is held: writes into chunks not copied back yet (part
    // of one, all of another) and reads of others complete meanwhile.
    for command in [
        "write -P 0x55 1052672 4k",
        "write -P 0x66 4M 64k",
        "read -P 0x22 1536k 64k",
    ] {
        let (done, text) = qemu_io(nbd_a, false, command);
        assert!(done, "during the copy-back, {command}: {text}");
    }
    assert!(
        attach.try_wait().expect("attach-disk").is_none(),
        "attach-disk returned before the writes made during its copy-back"
    );
    assert!(
        primary.logs().contains("copy-back held"),
        "{}",
        primary.log_tail(20)
    );
    std::fs::remove_file(&hold).expect("release the copy-back");
    let out = attach.wait_with_output().expect("attach-disk ends");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("Attached"), "{out:?}");
    // Nothing written meanwhile was overwritten by the older copies.
    for command in [
        "read -P 0x22 1M 4k",
        "read -P 0x55 1052672 4k",
        "read -P 0x22 1056768 60k",
        "read -P 0x66 4M 64k",
    ] {
        for nbd in [nbd_a, nbd_b] {
            let (done, text) = qemu_io(nbd, false, command);
            assert!(done, "after the copy-back, {command} on {nbd}: {text}");
        }
    }
    let st = status();
    assert_eq!(st.disk_state, DiskState::Attached, "{st:?}");
    assert!(st.disk_error.is_empty(), "{st:?}");
    assert!(
        primary.logs().contains("copied back from a peer"),
        "{}",
        primary.log_tail(20)
    );
    assert_same(nbd_a, nbd_b);
    // Writes land on both copies again, and the primary reads its own.
    let (done, text) = qemu_io(nbd_a, false, "write -P 0x44 2M 256k");
    assert!(done, "write after the disk came back: {text}");
    for nbd in [nbd_a, nbd_b] {
        let (done, text) = qemu_io(nbd, false, "read -P 0x44 2M 256k");
        assert!(done, "read after the disk came back: {text}");
    }
    assert_same(nbd_a, nbd_b);
}
