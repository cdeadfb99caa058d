//! Online verify of `basaltd storage serve`: a primary and a replica on
//! loopback, a chunk of the replica's copy corrupted by writing to its
//! pool file directly (behind replication's back), and
//! `basaltd storage volume verify` run against the primary while a
//! writer keeps writing: it reports exactly that chunk and fails; the
//! chunk is marked dirty (the status shows it); `--repair` sends it
//! again; a last verify finds the copies in sync and `qemu-img compare`
//! agrees.

mod storage_cli;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_api::{StorageClient, VolumeVerify};
use basalt_testkit::Prefix;
use basalt_testkit::nbd_client::{BLOCK, NbdClient, block};

use storage_cli::{free_addr, is_root, run, serve, two_pools};

const CHUNK: u64 = 64 << 10;
const VOLUME: u64 = 32 << 20;
/// The chunk corrupted on the replica.
const BAD: u64 = 77;

/// Runs `basaltd storage volume verify` and parses its JSON.
fn verify(socket: &Path, repair: bool) -> (bool, VolumeVerify) {
    let socket = socket.to_str().expect("socket path");
    let mut args = vec![
        "storage",
        "volume",
        "verify",
        "--local-socket",
        socket,
        "vol",
        "--json",
    ];
    if repair {
        args.push("--repair");
    }
    let out = run(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let result = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), result)
}

/// Overwrites 512 bytes of the replica's copy of `pattern` in its pool
/// file (found by content: the pool maps chunks where it likes).
fn corrupt(pool_file: &Path, pattern: &[u8]) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pool_file)
        .expect("open the replica's pool file");
    let len = file.metadata().expect("metadata").len();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < len {
        let n = file.read_at(&mut buf, at).expect("read the pool file");
        if let Some(i) = buf[..n].windows(pattern.len()).position(|w| w == pattern) {
            file.write_all_at(&[0xee; 512], at + i as u64 + 1024)
                .expect("corrupt the pool file");
            return;
        }
        // Blocks are written 4 KiB aligned in 4 KiB-aligned windows.
        at += n as u64;
    }
    panic!("the pattern is not in {}", pool_file.display());
}

#[test]
fn verify_finds_a_chunk_corrupted_on_the_replica_while_the_volume_is_in_use() {
    if !is_root() {
        eprintln!("skipping: needs root (test prefix and process harness)");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let (pa, pb) = two_pools(&prefix, "128M", "32M");
    let socket = prefix.dir().join("a.sock");
    let (pa_s, pb_s) = (pa.as_str(), pb.as_str());
    let (nbd_a, nbd_b, repl_b) = (free_addr(), free_addr(), free_addr());
    let _replica = serve(
        &prefix,
        "replica",
        pb_s,
        nbd_b,
        &["--replica-listen".into(), repl_b.to_string()],
    );
    let primary = serve(
        &prefix,
        "primary",
        pa_s,
        nbd_a,
        &[
            "--peer".to_owned(),
            format!("vol={repl_b}"),
            "--fencer".into(),
            "allow".into(),
            "--local-socket".into(),
            socket.to_str().expect("socket").into(),
        ],
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let api = {
        let _in = rt.enter();
        StorageClient::connect_unix(&socket).expect("client")
    };
    let peer_state = || {
        rt.block_on(async {
            loop {
                if let Ok(st) = api.status().await
                    && let Some(p) = st.replicas.first()
                {
                    break p.clone();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while peer_state().state != basalt_api::ReplicaPeerState::Connected {
        assert!(Instant::now() < deadline, "{}", primary.log_tail(20));
        std::thread::sleep(Duration::from_millis(50));
    }

    // Every chunk holds data; chunk BAD holds a block found by content.
    let mut c = NbdClient::connect(nbd_a, "vol").expect("connect");
    let fill = vec![0x42u8; 1 << 20];
    for i in 0..VOLUME >> 20 {
        c.write(i << 20, &fill).expect("fill");
    }
    let marker = block(0xbad_c0de);
    c.write(BAD * CHUNK, &marker).expect("marker");
    c.flush().expect("flush");
    drop(c);
    corrupt(Path::new(&pb), &marker);

    // A writer keeps the volume busy (never touching chunk BAD).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = NbdClient::connect(nbd_a, "vol").expect("connect");
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let chunk = (n * 13) % (VOLUME / CHUNK);
                if chunk != BAD {
                    c.write(chunk * CHUNK + (n % 16) * BLOCK as u64, &block(n))
                        .expect("write during verify");
                }
                n += 1;
            }
            n
        })
    };

    let (passed, found) = verify(&socket, false);
    assert!(!passed, "verify passed with a corrupted replica: {found:?}");
    assert_eq!(found.peers.len(), 1, "{found:?}");
    let p = &found.peers[0];
    assert_eq!(p.error, None, "{found:?}");
    assert_eq!(p.checked_chunks, VOLUME / CHUNK, "{found:?}");
    assert_eq!(p.out_of_sync_chunks, [BAD], "{found:?}");
    assert_eq!(found.chunk_size as u64, CHUNK);
    // Marked dirty for the next resync.
    assert_eq!(peer_state().dirty_chunks, 1);

    let (passed, repaired) = verify(&socket, true);
    assert!(passed, "{repaired:?}");
    assert_eq!(repaired.peers[0].out_of_sync_chunks, [BAD]);
    assert_eq!(repaired.peers[0].repaired, 1);
    assert_eq!(peer_state().dirty_chunks, 0);
    let (passed, clean) = verify(&socket, false);
    assert!(passed, "{clean:?}");
    assert_eq!(clean.peers[0].out_of_sync, 0);

    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().expect("writer");
    eprintln!("{writes} writes during the three verifies");
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(format!("nbd://{nbd_a}/vol"))
        .arg(format!("nbd://{nbd_b}/vol"))
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "the copies differ after the repair: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A volume that is not a primary here is refused, naming why.
    let out = run(&[
        "storage",
        "volume",
        "verify",
        "--local-socket",
        socket.to_str().expect("socket"),
        "nosuch",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a primary"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
