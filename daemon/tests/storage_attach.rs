//! Replication driven at run time through the storage-local API, as the
//! node agent drives it: two `basaltd storage serve` processes on loopback
//! (NBD, local socket, replica listener each), one volume attached
//! primary on one and secondary on the other, then promoted, demoted, made
//! dual primary, and a fresh replica filled by a full sync — with QEMU's
//! own clients (`qemu-io`, `qemu-img`) writing and reading through the
//! NBD exports.

mod storage_cli;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_api::{
    ApiError, AttachVolume, EnsureVolume, ReplicaPeer, ReplicaPeerState, ReplicationProtocol,
    VolumeRole,
};
use basalt_testkit::Prefix;
use storage_cli::{LocalStorage as Node, have};

const MIB: u64 = 1 << 20;

impl Node {
    fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    /// `qemu-io` on this node's export of `volume`; whether every command
    /// succeeded, and the output.
    fn qemu_io(&self, volume: &str, command: &str) -> (bool, String) {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", &self.uri(volume), "-c", command])
            .output()
            .expect("qemu-io runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let failed = !out.status.success()
            || text.contains("failed")
            || text.contains("Pattern verification");
        (!failed, text)
    }

    fn write(&self, volume: &str, byte: u8, offset: u64, len: u64) {
        let (ok, text) = self.qemu_io(volume, &format!("write -P {byte} {offset} {len}"));
        assert!(ok, "write on {}: {text}", self.process.name());
    }

    fn check(&self, volume: &str, byte: u8, offset: u64, len: u64) {
        let (ok, text) = self.qemu_io(volume, &format!("read -P {byte} {offset} {len}"));
        assert!(
            ok,
            "{} does not read {byte:#x} at {offset}: {text}",
            self.process.name()
        );
    }

    /// The log without terminal colour escapes.
    fn plain_logs(&self) -> String {
        storage_cli::plain_logs(&self.process, 0)
    }

    fn log_count(&self, needle: &str) -> usize {
        self.plain_logs()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} log:\n{}",
                self.process.name(),
                self.process.log_tail(80)
            );
        }
    }
}

fn attach(role: VolumeRole, epoch: u64, peers: &[SocketAddr]) -> AttachVolume {
    AttachVolume {
        name: "vol".into(),
        role,
        epoch,
        peers: peers.iter().map(ToString::to_string).collect(),
        allow_outdate: false,
        protocol: None,
        force: false,
    }
}

/// The status of `node`'s replication of `volume` to its only peer.
async fn peer_of(node: &Node, volume: &str) -> Option<ReplicaPeer> {
    let status = node.api.status().await.expect("status");
    status.replicas.into_iter().find(|p| p.volume == volume)
}

/// Waits until `node`'s peer of `volume` is connected and in sync.
async fn wait_connected(node: &Node, volume: &str) -> ReplicaPeer {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(p) = peer_of(node, volume).await
            && p.state == ReplicaPeerState::Connected
        {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "{} never connected to its peer of {volume}: {:?}\n{}",
            node.process.name(),
            peer_of(node, volume).await,
            node.process.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn replication_is_attached_promoted_demoted_and_dual_primary_through_the_local_api() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root (test prefix and process harness)");
        return;
    }
    if !["qemu-io", "qemu-img"].iter().all(|p| have(p)) {
        eprintln!("skipping: qemu-io and qemu-img are needed (scripts/install-deps)");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _in_runtime = rt.enter();
    // A's full syncs are slow enough to be seen in its status.
    let a = Node::start(&prefix, "store-a", &["--sync-rate", "4M"]);
    let b = Node::start(&prefix, "store-b", &[]);
    rt.block_on(async {
        for n in [&a, &b] {
            n.api
                .ensure_volume(EnsureVolume {
                    name: "vol".into(),
                    size_bytes: 64 * MIB,
                    source: None,
                })
                .await
                .expect("ensure vol");
            let st = n.api.status().await.expect("status");
            assert_eq!(st.replication_address, n.repl.to_string());
        }

        // A primary (epoch 1) replicating to B, B secondary.
        b.api
            .attach_volume(attach(VolumeRole::Secondary, 1, &[]))
            .await
            .expect("attach B secondary");
        let attached = a
            .api
            .attach_volume(attach(VolumeRole::Primary, 1, &[b.repl]))
            .await
            .expect("attach A primary");
        assert_eq!((attached.role, attached.epoch), (VolumeRole::Primary, 1));
        assert_eq!(attached.peers.len(), 1);
        assert_eq!(attached.peers[0].peer, b.repl.to_string());
        assert_eq!(attached.protocol, ReplicationProtocol::C);
        wait_connected(&a, "vol").await;
        a.write("vol", 0xa1, 0, MIB);
        b.check("vol", 0xa1, 0, MIB);

        // The protocol rides on AttachVolume: set, then kept by a later
        // attach that leaves it unset, then set back to C.
        for (asked, kept) in [
            (Some(ReplicationProtocol::B), ReplicationProtocol::B),
            (None, ReplicationProtocol::B),
            (Some(ReplicationProtocol::C), ReplicationProtocol::C),
        ] {
            let attached = a
                .api
                .attach_volume(AttachVolume {
                    protocol: asked,
                    ..attach(VolumeRole::Primary, 1, &[b.repl])
                })
                .await
                .expect("attach A primary with a protocol");
            assert_eq!(attached.protocol, kept, "asked {asked:?}");
            let file = std::fs::read_to_string(a.attachments_file()).expect("attachments");
            assert_eq!(
                file.contains("protocol=B"),
                kept == ReplicationProtocol::B,
                "{file}"
            );
        }
        wait_connected(&a, "vol").await;

        // The secondary's export reads, but refuses writes.
        let (ok, text) = b.qemu_io("vol", "write -P 0xee 0 4096");
        assert!(!ok, "a secondary accepted a write: {text}");
        assert!(text.contains("not permitted"), "{text}");
        a.check("vol", 0xa1, 0, 4096);
        b.check("vol", 0xa1, 0, 4096);

        // Attaching again changes nothing: same link, acks keep counting.
        let before = wait_connected(&a, "vol").await.acked_frames;
        let connects = b.log_count("primary connected");
        for _ in 0..3 {
            a.api
                .attach_volume(attach(VolumeRole::Primary, 1, &[b.repl]))
                .await
                .expect("attach again");
            b.api
                .attach_volume(attach(VolumeRole::Secondary, 1, &[]))
                .await
                .expect("attach B again");
        }
        a.write("vol", 0xa2, MIB, MIB);
        b.check("vol", 0xa2, MIB, MIB);
        let after = wait_connected(&a, "vol").await.acked_frames;
        assert!(after > before, "acked frames {before} -> {after}");
        assert_eq!(
            b.log_count("primary connected"),
            connects,
            "re-attaching reconnected"
        );

        // Promote B (epoch 2, peer A), then demote A: B's writes reach A,
        // A's export refuses writes, and A cannot be primary at epoch 1.
        b.api
            .attach_volume(attach(VolumeRole::Primary, 2, &[a.repl]))
            .await
            .expect("promote B");
        a.api
            .attach_volume(attach(VolumeRole::Secondary, 2, &[]))
            .await
            .expect("demote A");
        wait_connected(&b, "vol").await;
        b.write("vol", 0xb2, 2 * MIB, MIB);
        a.check("vol", 0xb2, 2 * MIB, MIB);
        b.check("vol", 0xa2, MIB, MIB);
        let (ok, text) = a.qemu_io("vol", "write -P 0xef 2097152 4096");
        assert!(!ok, "the demoted primary accepted a write: {text}");
        b.check("vol", 0xb2, 2 * MIB, 4096);
        match a
            .api
            .attach_volume(attach(VolumeRole::Primary, 1, &[b.repl]))
            .await
        {
            Err(ApiError::FailedPrecondition { reason }) => {
                assert!(
                    reason.contains("epoch 1") && reason.contains('2'),
                    "{reason}"
                );
            }
            other => panic!("an old epoch was attached primary: {other:?}"),
        }
        assert!(
            peer_of(&a, "vol").await.is_none(),
            "a refused attachment left replication behind"
        );

        // Dual primary (live migration): A primary again at B's epoch, each
        // the other's peer; writes on either reach both.
        a.api
            .attach_volume(attach(VolumeRole::Primary, 2, &[b.repl]))
            .await
            .expect("A primary beside B");
        wait_connected(&a, "vol").await;
        wait_connected(&b, "vol").await;
        a.write("vol", 0xc3, 4 * MIB, MIB);
        b.write("vol", 0xd4, 6 * MIB, MIB);
        for n in [&a, &b] {
            n.check("vol", 0xc3, 4 * MIB, MIB);
            n.check("vol", 0xd4, 6 * MIB, MIB);
            n.check("vol", 0xb2, 2 * MIB, MIB);
        }
        assert_eq!(
            a.log_count("split brain") + b.log_count("split brain"),
            0,
            "dual primaries in sync were taken for a split brain"
        );
        // The migration ends: A steps down, B goes on alone with A as its
        // secondary.
        a.api
            .attach_volume(attach(VolumeRole::Secondary, 3, &[]))
            .await
            .expect("demote A");
        b.api
            .attach_volume(attach(VolumeRole::Primary, 3, &[a.repl]))
            .await
            .expect("B at epoch 3");
        b.write("vol", 0xe5, 8 * MIB, MIB);
        a.check("vol", 0xe5, 8 * MIB, MIB);
        let vol = b.api.status().await.expect("status");
        assert!(vol.replicas.iter().any(|p| p.volume == "vol"));

        // Full sync: data written on A while standalone, then a fresh empty
        // volume on B attached as its secondary gets all of it.
        a.api
            .ensure_volume(EnsureVolume {
                name: "fresh".into(),
                size_bytes: 32 * MIB,
                source: None,
            })
            .await
            .expect("fresh on A");
        a.write("fresh", 0x5a, 0, 4 * MIB);
        a.write("fresh", 0x6b, 20 * MIB + 4096, 4 * MIB);
        b.api
            .ensure_volume(EnsureVolume {
                name: "fresh".into(),
                size_bytes: 32 * MIB,
                source: None,
            })
            .await
            .expect("fresh on B");
        let mut sec = attach(VolumeRole::Secondary, 1, &[]);
        sec.name = "fresh".into();
        b.api.attach_volume(sec).await.expect("B secondary");
        let mut pri = attach(VolumeRole::Primary, 1, &[b.repl]);
        pri.name = "fresh".into();
        a.api.attach_volume(pri).await.expect("A primary");
        let mut saw_resyncing = false;
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = loop {
            let p = peer_of(&a, "fresh").await.expect("fresh's peer");
            saw_resyncing |= p.state == ReplicaPeerState::Resyncing;
            if p.state == ReplicaPeerState::Connected {
                break p;
            }
            assert!(Instant::now() < deadline, "full sync stuck: {p:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(saw_resyncing, "the full sync never showed in the status");
        assert!(
            done.resync_bytes >= 8 * MIB && done.resync_bytes <= 10 * MIB,
            "full sync sent {} bytes for 8 MiB of data",
            done.resync_bytes
        );
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .args([a.uri("fresh"), b.uri("fresh")])
            .output()
            .expect("qemu-img runs");
        assert!(
            out.status.success(),
            "the replica differs after the full sync: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Live writes follow the full sync.
        a.write("fresh", 0x7c, 30 * MIB, MIB);
        b.check("fresh", 0x7c, 30 * MIB, MIB);

        // Deleting the volume stops its replication.
        assert!(a.api.delete_volume("fresh").await.expect("delete"));
        assert!(peer_of(&a, "fresh").await.is_none());
    });

    // kill -9 of both storage processes: each comes back with its roles
    // (A still refuses writes as B's secondary), and B, the primary, keeps
    // its stream to A (its dirty log is on disk): A gets only the chunks
    // the log holds, never a full sync.
    let mut a = a;
    let mut b = b;
    let b_from = b.plain_logs().len();
    for n in [&mut a, &mut b] {
        n.process.kill9().expect("kill -9");
        n.process.restart().expect("restart");
        n.process
            .wait_for_tcp(n.nbd, None, Duration::from_secs(30))
            .expect("NBD back");
    }
    let (ok, text) = a.qemu_io("vol", "write -P 0xef 0 4096");
    assert!(!ok, "a restarted secondary accepted a write: {text}");
    rt.block_on(async {
        // Attaching the same again is how the agent asks (and the local
        // socket may take a moment to be back).
        let deadline = Instant::now() + Duration::from_secs(30);
        let attached = loop {
            match b
                .api
                .attach_volume(attach(VolumeRole::Primary, 3, &[a.repl]))
                .await
            {
                Ok(a) => break a,
                Err(e) => {
                    assert!(Instant::now() < deadline, "B's API after restart: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(attached.peers.len(), 1, "B forgot its peer: {attached:?}");
        wait_connected(&b, "vol").await;
    });
    let after = b.plain_logs()[b_from..].to_owned();
    assert!(
        after
            .lines()
            .any(|l| l.contains("dirty log found") && l.contains("volume=vol ")),
        "a restarted primary did not find its dirty log: {after}"
    );
    assert!(
        !after
            .lines()
            .any(|l| l.contains("full sync starting") && l.contains("volume=vol ")),
        "a restarted primary fully synced its peer: {after}"
    );
    b.write("vol", 0xf6, 10 * MIB, MIB);
    a.check("vol", 0xf6, 10 * MIB, MIB);
    a.check("vol", 0xe5, 8 * MIB, MIB);
    for n in [&a, &b] {
        for line in n.plain_logs().lines() {
            if line.contains("full sync") || line.contains("volume attached") {
                eprintln!("{}: {line}", n.process.name());
            }
        }
    }
}
