//! Volume attachments in one process, on loopback: a primary with two
//! peers (3 replicas) ships every write to both and tracks a lost one
//! alone; a secondary refuses writes; epochs are checked at attach time;
//! two primaries that diverged report a split brain instead of
//! overwriting each other; attachments survive a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_api::ReplicaPeerState;
use basalt_api::StorageApi;
use basalt_sds::backend::MemBackend;
use basalt_sds::local::{ExportConfig, LocalService};
use basalt_sds::pool::{Pool, PoolOptions};
use basalt_sds::replication::attach::{
    AttachError, AttachOptions, AttachSpec, AttachmentView, Attachments, Role,
};
use basalt_sds::replication::book::ReplicaBook;
use basalt_sds::replication::dirty_log::DEFAULT_ACTIVITY_EXTENTS;
use basalt_sds::replication::fence::AgentFencer;
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::{Op, PeerState, Protocol, ReplicationError};

const VOL: u64 = 16 << 20;
const CHUNK: u64 = 64 << 10;

fn pool() -> Pool {
    let pool =
        Pool::create(Arc::new(MemBackend::new(64 << 20)), &PoolOptions::default()).expect("pool");
    pool.create_volume("vol", VOL).expect("volume");
    pool
}

fn opts() -> AttachOptions {
    AttachOptions {
        retry: Duration::from_millis(50),
        ..AttachOptions::default()
    }
}

fn attachments(pool: &Pool) -> Arc<Attachments> {
    Arc::new(Attachments::new(
        pool.clone(),
        Arc::new(ReplicaBook::in_memory(0)),
        opts(),
    ))
}

/// Attachments of `pool` whose resyncs and full syncs send at most
/// `rate` bytes per second.
fn paced(pool: &Pool, rate: u64) -> Arc<Attachments> {
    Arc::new(Attachments::new(
        pool.clone(),
        Arc::new(ReplicaBook::in_memory(0)),
        AttachOptions {
            sync_rate: rate,
            ..opts()
        },
    ))
}

fn spec(role: Role, epoch: u64, peers: &[SocketAddr], allow_outdate: bool) -> AttachSpec {
    AttachSpec {
        role,
        epoch,
        peers: peers.iter().map(ToString::to_string).collect(),
        allow_outdate,
        protocol: Default::default(),
    }
}

fn write(att: &Attachments, pool: &Pool, offset: u64, byte: u8) -> Result<(), ReplicationError> {
    let vol = pool.open_volume("vol").expect("open");
    let data = vec![byte; 4096];
    att.slot("vol").submit(
        Op::Write {
            offset,
            data: &data,
            fua: false,
        },
        || vol.write(offset, &data, false),
    )
}

fn read(pool: &Pool, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    pool.open_volume("vol")
        .expect("open")
        .read(offset, &mut buf)
        .expect("read");
    buf
}

fn whole(pool: &Pool) -> Vec<u8> {
    let mut buf = vec![0u8; VOL as usize];
    pool.open_volume("vol")
        .expect("open")
        .read(0, &mut buf)
        .expect("read");
    buf
}

fn wait_peers(att: &Attachments, want: impl Fn(&AttachmentView) -> bool) -> AttachmentView {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = att.view("vol");
        if want(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "peers stuck: {view:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn all_connected(view: &AttachmentView) -> bool {
    view.peers
        .iter()
        .all(|(_, st)| st.state == PeerState::Connected)
}

#[test]
fn three_replicas_get_every_write_and_a_lost_one_is_tracked_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let (r1, r2) = (pool(), pool());
    let s1 = ReplicaServer::start(r1.clone(), any, 0).expect("replica 1");
    let book2 = dir.path().join("r2.epochs");
    let s2 = ReplicaServer::start_persistent(r2.clone(), any, 0, &book2).expect("replica 2");
    let (a1, a2) = (s1.addr(), s2.addr());
    let p = pool();
    let att = attachments(&p);
    // Data written before replication starts reaches both by full sync.
    write(&att, &p, 3 * CHUNK, 0x33).expect("standalone write");
    att.attach("vol", spec(Role::Primary, 1, &[a1, a2], true))
        .expect("attach");
    let view = wait_peers(&att, all_connected);
    assert_eq!(view.peers.len(), 2);
    assert!(view.peers.iter().all(|(_, st)| st.full_syncs == 1));
    for i in 0..50u64 {
        write(&att, &p, i * 7 * 4096, i as u8 + 1).expect("write");
    }
    // Protocol C: every returned write is on both replicas.
    for i in 0..50u64 {
        assert_eq!(read(&r1, i * 7 * 4096), vec![i as u8 + 1; 4096]);
        assert_eq!(read(&r2, i * 7 * 4096), vec![i as u8 + 1; 4096]);
    }
    assert!(whole(&r1) == whole(&p) && whole(&r2) == whole(&p));

    // Replica 2 goes away: writes go on (allow_outdate), only its peer
    // tracks them.
    s2.stop();
    drop(s2);
    for i in 0..5u64 {
        write(&att, &p, (40 + i) * CHUNK, 0xa0 + i as u8).expect("write with a peer away");
    }
    let view = att.view("vol");
    let st = |peer: SocketAddr| {
        view.peers
            .iter()
            .find(|(p, _)| *p == peer.to_string())
            .map(|(_, st)| st.clone())
            .expect("peer")
    };
    assert_eq!(
        (st(a1).state, st(a1).dirty_chunks),
        (PeerState::Connected, 0)
    );
    assert_eq!(st(a2).state, PeerState::Away);
    assert_eq!(st(a2).dirty_chunks, 5);
    assert_eq!(read(&r1, 44 * CHUNK), vec![0xa4; 4096]);

    // Back (its book remembers the stream): only the dirty chunks.
    let _s2 = ReplicaServer::start_persistent(r2.clone(), a2, 0, &book2).expect("replica 2 back");
    let view = wait_peers(&att, all_connected);
    let back = view
        .peers
        .iter()
        .find(|(p, _)| *p == a2.to_string())
        .map(|(_, st)| st.clone())
        .expect("peer 2");
    assert_eq!((back.full_syncs, back.resync_chunks), (1, 5), "{back:?}");
    assert!(whole(&r2) == whole(&p));

    // Idempotent: the same spec keeps both links.
    let before: Vec<_> = view.peers.iter().map(|(_, st)| st.acked_frames).collect();
    att.attach("vol", spec(Role::Primary, 1, &[a1, a2], true))
        .expect("again");
    write(&att, &p, 0, 0x77).expect("write");
    let after = att.view("vol");
    for ((_, st), b) in after.peers.iter().zip(before) {
        assert_eq!(st.acked_frames, b + 1, "{st:?}");
        assert_eq!(st.state, PeerState::Connected);
    }
    // Dropping a peer keeps the other's link.
    att.attach("vol", spec(Role::Primary, 1, &[a1], true))
        .expect("one peer");
    let one = att.view("vol");
    assert_eq!(one.peers.len(), 1);
    assert_eq!(one.peers[0].1.state, PeerState::Connected);
    assert_eq!(one.peers[0].1.full_syncs, 1);
}

#[test]
fn a_secondary_refuses_writes_and_primaries_need_the_newest_epoch() {
    let p = pool();
    let att = attachments(&p);
    // A change whose bytes are not at hand (a big write still in its
    // pipe) runs where no peer needs them: a volume never attached...
    let ran = std::cell::Cell::new(0);
    let unreplicated = || {
        att.slot("vol").submit_unreplicated(|| {
            ran.set(ran.get() + 1);
            Ok(())
        })
    };
    assert!(matches!(unreplicated(), Some(Ok(()))));
    att.attach("vol", spec(Role::Secondary, 3, &[], false))
        .expect("secondary");
    assert!(matches!(
        write(&att, &p, 0, 1),
        Err(ReplicationError::NotPrimary { .. })
    ));
    // ... but not a secondary (nor a primary, below): nothing runs.
    assert!(unreplicated().is_none());
    assert_eq!(ran.get(), 1);
    let vol = p.open_volume("vol").expect("open");
    att.slot("vol")
        .submit(Op::Flush, || vol.flush())
        .expect("a secondary flushes");
    match att.attach("vol", spec(Role::Primary, 2, &[], false)) {
        Err(AttachError::StaleEpoch { epoch, newest, .. }) => assert_eq!((epoch, newest), (2, 3)),
        other => panic!("an old primary was attached: {other:?}"),
    }
    assert_eq!(att.role("vol"), Some(Role::Secondary));
    att.attach("vol", spec(Role::Primary, 3, &[], false))
        .expect("primary");
    write(&att, &p, 0, 2).expect("a primary with no peers writes");
    assert!(unreplicated().is_none());
    assert_eq!(ran.get(), 1);
    // A newer epoch seen for the volume (a newer primary's frames) fences
    // this primary before it writes anything.
    att.book().admit("vol", 4).expect("newer epoch");
    assert!(matches!(
        write(&att, &p, 0, 3),
        Err(ReplicationError::StaleEpoch {
            epoch: 3,
            newest: 4
        })
    ));
    assert_eq!(read(&p, 0), vec![2; 4096]);
    assert!(matches!(
        att.attach("missing", spec(Role::Secondary, 1, &[], false)),
        Err(AttachError::Volume { .. })
    ));
    assert!(matches!(
        att.attach("vol", spec(Role::Primary, 5, &[], false))
            .and_then(|_| att.attach(
                "vol",
                AttachSpec {
                    peers: vec!["no-such-host.invalid:7800".into()],
                    ..spec(Role::Primary, 5, &[], false)
                }
            )),
        Err(AttachError::Peer { .. })
    ));
}

#[test]
fn diverged_primaries_report_a_split_brain_and_overwrite_nothing() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let (pa, pb) = (pool(), pool());
    let (att_a, att_b) = (attachments(&pa), attachments(&pb));
    let sa = ReplicaServer::serve(att_a.clone(), any).expect("replica server A");
    let sb = ReplicaServer::serve(att_b.clone(), any).expect("replica server B");
    // Each written on its own, neither ever a copy of the other.
    write(&att_a, &pa, 0, 0xaa).expect("write A");
    write(&att_b, &pb, 0, 0xbb).expect("write B");
    att_a
        .attach("vol", spec(Role::Standalone, 0, &[], false))
        .expect("A standalone");
    att_b
        .attach("vol", spec(Role::Standalone, 0, &[], false))
        .expect("B standalone");
    att_a
        .attach("vol", spec(Role::Primary, 1, &[sb.addr()], true))
        .expect("A primary");
    att_b
        .attach("vol", spec(Role::Primary, 1, &[sa.addr()], true))
        .expect("B primary");
    let split = |v: &AttachmentView| v.peers[0].1.state == PeerState::SplitBrain;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(split(&att_a.view("vol")) && split(&att_b.view("vol"))) {
        assert!(
            Instant::now() < deadline,
            "no split brain: {:?} {:?}",
            att_a.view("vol"),
            att_b.view("vol")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read(&pa, 0), vec![0xaa; 4096]);
    assert_eq!(read(&pb, 0), vec![0xbb; 4096]);
    // The storage-local API says so (it used to say "away").
    let local = LocalService::new(
        att_a.clone(),
        ExportConfig {
            tcp: any,
            unix: None,
            replication: Some(sa.addr()),
        },
        AgentFencer::default(),
    );
    let status = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(local.status())
        .expect("status");
    assert_eq!(status.replicas.len(), 1, "{status:?}");
    assert_eq!(
        status.replicas[0].state,
        ReplicaPeerState::SplitBrain,
        "{status:?}"
    );
}

fn persistent(pool: &Pool, dir: &Path) -> Attachments {
    let book = ReplicaBook::open(&dir.join("pool.epochs"), 0).expect("book");
    Attachments::persistent(
        pool.clone(),
        Arc::new(book),
        opts(),
        &dir.join("pool.attachments"),
    )
    .expect("attachments")
}

#[test]
fn attachments_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pool();
    p.create_volume("other", VOL).expect("other");
    let att = persistent(&p, dir.path());
    att.attach("vol", spec(Role::Secondary, 2, &[], false))
        .expect("secondary");
    att.attach(
        "other",
        spec(
            Role::Primary,
            4,
            &["127.0.0.1:9".parse().expect("addr")],
            true,
        ),
    )
    .expect("primary");
    drop(att);
    let att = persistent(&p, dir.path());
    assert_eq!(att.role("vol"), Some(Role::Secondary));
    assert!(matches!(
        write(&att, &p, 0, 1),
        Err(ReplicationError::NotPrimary { .. })
    ));
    let other = att.view("other");
    let spec_back = other.spec.expect("other restored");
    assert_eq!(
        (spec_back.role, spec_back.epoch, spec_back.allow_outdate),
        (Role::Primary, 4, true)
    );
    assert_eq!(spec_back.peers, ["127.0.0.1:9"]);
    // A primary whose peer no longer resolves comes back a secondary,
    // never writable without it.
    att.attach(
        "vol",
        spec(
            Role::Primary,
            5,
            &["127.0.0.1:9".parse().expect("addr")],
            true,
        ),
    )
    .expect("primary");
    drop(att);
    let file = dir.path().join("pool.attachments");
    let text = std::fs::read_to_string(&file).expect("read");
    let text = text.replace(
        "vol primary 5 1 127.0.0.1:9",
        "vol primary 5 1 no-such-host.invalid:9",
    );
    std::fs::write(&file, text).expect("write");
    let att = persistent(&p, dir.path());
    assert_eq!(att.role("vol"), Some(Role::Secondary));
    assert!(matches!(
        write(&att, &p, 0, 1),
        Err(ReplicationError::NotPrimary { .. })
    ));
    // A deleted volume's attachment is gone after the next restart.
    att.detach("other");
    p.delete("other").expect("delete");
    drop(att);
    let att = persistent(&p, dir.path());
    assert!(att.view("other").spec.is_none());
    std::fs::write(dir.path().join("pool.attachments"), "vol boss 1 0\n").expect("write");
    assert!(
        Attachments::persistent(
            p.clone(),
            Arc::new(ReplicaBook::in_memory(0)),
            opts(),
            &dir.path().join("pool.attachments"),
        )
        .is_err()
    );
}

#[test]
fn writes_during_a_full_sync_end_on_the_replica_and_a_deposed_primary_revives() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let r = pool();
    let server = ReplicaServer::start(r.clone(), any, 0).expect("replica");
    let p = pool();
    // A slow full sync (2 MiB/s over 4 MiB of data) that writes overtake.
    let att = paced(&p, 2 << 20);
    for c in 0..64u64 {
        write(&att, &p, c * CHUNK, 0x10).expect("standalone write");
    }
    att.attach("vol", spec(Role::Primary, 1, &[server.addr()], false))
        .expect("attach");
    let deadline = Instant::now() + Duration::from_secs(10);
    while att.view("vol").peers[0].1.state != PeerState::Resyncing {
        assert!(Instant::now() < deadline, "{:?}", att.view("vol"));
        std::thread::sleep(Duration::from_millis(5));
    }
    // The fencer denies, yet writes go on: a peer being filled was never
    // up to date. They land on chunks already sent and not yet sent.
    let started = Instant::now();
    for c in (0..64u64).step_by(3) {
        write(&att, &p, c * CHUNK + 512, 0x20).expect("write during the full sync");
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "writes waited for the full sync"
    );
    let view = wait_peers(&att, all_connected);
    assert_eq!(view.peers[0].1.full_syncs, 1);
    assert!(whole(&r) == whole(&p), "the replica differs after the sync");
    // Recorded by the SYNCED flush that goes first in the live order.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.synced_generation("vol") != view.peers[0].1.generation {
        assert!(Instant::now() < deadline, "the stream was never recorded");
        std::thread::sleep(Duration::from_millis(5));
    }

    // A newer epoch reaches the replica (a newer primary elsewhere): this
    // primary's next write is refused there and fails here.
    let data = vec![0x30; 4096];
    {
        use std::io::{BufReader, Write};
        let s = std::net::TcpStream::connect(server.addr()).expect("connect");
        let mut w = s.try_clone().expect("clone");
        let mut rd = BufReader::new(s);
        let hello = basalt_sds::replication::wire::Hello {
            version: basalt_sds::replication::wire::VERSION,
            epoch: 2,
            generation: view.peers[0].1.generation,
            synced_from: 0,
            volume_uid: uuid::Uuid::nil(),
            size: VOL,
            volume: "vol".into(),
        };
        w.write_all(&hello.encode()).expect("hello");
        basalt_sds::replication::wire::HelloReply::read(&mut rd).expect("reply");
    }
    let err = write(&att, &p, 5 * CHUNK, 0x30).expect_err("a deposed primary wrote");
    assert!(
        matches!(err, ReplicationError::StaleEpoch { newest: 2, .. }),
        "{err}"
    );
    assert_ne!(read(&r, 5 * CHUNK), data);
    // Attached again at the newer epoch, it comes back on the same stream
    // and resyncs the write the replica refused, if the primary applied
    // it (the replica's notice of the newer epoch usually comes first,
    // and then the write was refused before it was written anywhere).
    att.attach("vol", spec(Role::Primary, 2, &[server.addr()], false))
        .expect("epoch 2");
    let view = wait_peers(&att, all_connected);
    assert_eq!(view.peers[0].1.full_syncs, 1, "{view:?}");
    assert!(whole(&r) == whole(&p));
    write(&att, &p, 6 * CHUNK, 0x40).expect("write at epoch 2");
    assert_eq!(read(&r, 6 * CHUNK), vec![0x40; 4096]);
}

/// A FLUSH through the volume's attachment (every peer applied and
/// synced every write before it, whatever the protocol).
fn flush(att: &Attachments, pool: &Pool) {
    att.slot("vol")
        .submit(Op::Flush, || pool.flush())
        .expect("flush");
}

/// Activity-log slots in use in the dirty log files under `dir`.
fn hot_slots(dir: &Path) -> usize {
    use basalt_sds::replication::dirty_log::{AL_AT, AL_SLOTS};
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("dirty log directory") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read log");
        n += (0..AL_SLOTS)
            .filter(|s| {
                let at = AL_AT as usize + s * 8;
                bytes[at..at + 8] != [0u8; 8]
            })
            .count();
    }
    n
}

#[test]
fn the_protocol_and_the_hot_set_size_are_kept_and_used() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let r = pool();
    let server = ReplicaServer::start(r.clone(), any, 0).expect("replica");
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pool();
    let file = dir.path().join("pool.attachments");
    let open = |extents: usize| {
        Arc::new(
            Attachments::persistent(
                p.clone(),
                Arc::new(ReplicaBook::in_memory(0)),
                AttachOptions {
                    activity_extents: extents,
                    ..opts()
                },
                &file,
            )
            .expect("attachments"),
        )
    };
    // A protocol change needs an attachment.
    let att = open(2);
    assert!(matches!(
        att.set_protocol("vol", Protocol::B),
        Err(AttachError::NotAttached { .. })
    ));
    att.attach(
        "vol",
        AttachSpec {
            protocol: Protocol::B,
            ..spec(Role::Primary, 1, &[server.addr()], true)
        },
    )
    .expect("primary");
    wait_peers(&att, all_connected);
    // Writes in all 4 extents (64 chunks each) of the volume: a hot set
    // of 2 keeps 2 slots.
    for extent in 0..4u64 {
        write(&att, &p, extent * 64 * CHUNK, 0x41).expect("write");
    }
    let logs = dir.path().join("pool.dirty");
    assert_eq!(hot_slots(&logs), 2, "a hot set of 2 extents");
    flush(&att, &p);
    assert!(whole(&r) == whole(&p), "protocol B: the replica differs");
    drop(att);
    let text = std::fs::read_to_string(&file).expect("attachments file");
    assert!(text.contains("protocol=B"), "{text}");
    // Restored with its protocol; the default hot set holds all 4.
    let att = open(DEFAULT_ACTIVITY_EXTENTS);
    let back = att.view("vol").spec.expect("restored");
    assert_eq!(back.protocol, Protocol::B);
    wait_peers(&att, all_connected);
    for extent in 0..4u64 {
        write(&att, &p, extent * 64 * CHUNK + 4096, 0x42).expect("write");
    }
    assert_eq!(hot_slots(&logs), 4, "the default hot set");
    let view = att.set_protocol("vol", Protocol::A).expect("set protocol");
    assert_eq!(view.spec.expect("spec").protocol, Protocol::A);
    assert_eq!(att.protocol("vol"), Protocol::A);
    // The same attachment otherwise: the peer kept its connection.
    assert_eq!(att.view("vol").peers[0].1.state, PeerState::Connected);
    write(&att, &p, 8192, 0x43).expect("write under A");
    flush(&att, &p);
    assert!(
        whole(&r) == whole(&p),
        "after a FLUSH under A the replica differs"
    );
    drop(att);
    assert!(
        std::fs::read_to_string(&file)
            .expect("attachments file")
            .contains("protocol=A")
    );
}

#[test]
fn a_copy_whose_full_sync_was_cut_serves_nothing_until_accepted_with_force() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let r = pool();
    let r_att = attachments(&r);
    let server = ReplicaServer::serve(r_att.clone(), any).expect("replica");
    let p = pool();
    // 4 MiB of data at 1 MiB/s: the full sync is cut well before its end.
    let att = paced(&p, 1 << 20);
    for c in 0..64u64 {
        write(&att, &p, c * CHUNK, 0x10).expect("standalone write");
    }
    assert!(
        !r_att.book().incomplete("vol"),
        "a fresh copy is not incomplete"
    );
    r_att
        .attach("vol", spec(Role::Secondary, 1, &[], false))
        .expect("secondary");
    att.attach("vol", spec(Role::Primary, 1, &[server.addr()], false))
        .expect("attach");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(r_att.book().incomplete("vol") && read(&r, 0) == vec![0x10; 4096]) {
        assert!(Instant::now() < deadline, "{:?}", att.view("vol"));
        std::thread::sleep(Duration::from_millis(5));
    }
    // The primary goes (its node is lost) in the middle of the fill.
    server.stop();
    att.attach("vol", spec(Role::Standalone, 1, &[], false))
        .expect("the primary alone");
    assert!(whole(&r) != whole(&p), "the fill was not cut");
    assert!(r_att.book().incomplete("vol"));

    // Neither a primary nor a standalone copy serves half a disk.
    for role in [Role::Primary, Role::Standalone] {
        let err = r_att
            .attach("vol", spec(role, 2, &[], true))
            .expect_err("an incomplete copy was attached to serve");
        assert!(matches!(err, AttachError::Incomplete { .. }), "{err}");
        assert!(err.to_string().contains("incomplete"), "{err}");
    }
    assert_eq!(
        r_att.view("vol").spec.map(|s| s.role),
        Some(Role::Secondary)
    );
    assert_eq!(
        r_att.book().recorded_epoch("vol"),
        1,
        "a refused attach raised the epoch"
    );
    // The local API says so, and answers a refused attach with
    // FAILED_PRECONDITION naming the reason.
    let local = LocalService::new(
        r_att.clone(),
        ExportConfig {
            tcp: any,
            unix: None,
            replication: Some(server.addr()),
        },
        AgentFencer::default(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let listed = rt.block_on(local.list_volumes()).expect("list");
    assert!(
        listed.iter().any(|v| v.name == "vol" && v.incomplete),
        "{listed:?}"
    );
    let request = |force| basalt_api::AttachVolume {
        name: "vol".into(),
        role: basalt_api::VolumeRole::Primary,
        epoch: 2,
        peers: Vec::new(),
        allow_outdate: true,
        protocol: None,
        force,
    };
    match rt.block_on(local.attach_volume(request(false))) {
        Err(basalt_api::ApiError::FailedPrecondition { reason }) => {
            assert!(reason.contains("incomplete"), "{reason}")
        }
        other => panic!("an incomplete copy attached as a primary: {other:?}"),
    }
    // With force it is taken as it is: the mark goes, and it writes.
    rt.block_on(local.attach_volume(request(true)))
        .expect("forced primary");
    assert!(!r_att.book().incomplete("vol"));
    let listed = rt.block_on(local.list_volumes()).expect("list");
    assert!(listed.iter().all(|v| !v.incomplete), "{listed:?}");
    write(&r_att, &r, 0, 0x50).expect("write on the forced primary");
    assert_eq!(read(&r, 0), vec![0x50; 4096]);
}

#[test]
fn a_copy_whose_resync_was_cut_is_incomplete_until_the_resync_ends() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let r = pool();
    let r_att = attachments(&r);
    let server = ReplicaServer::serve(r_att.clone(), any).expect("replica");
    let addr = server.addr();
    let p = pool();
    // 4 MiB of dirty chunks at 1 MiB/s: the resync is cut well before
    // its end.
    let att = paced(&p, 1 << 20);
    r_att
        .attach("vol", spec(Role::Secondary, 1, &[], false))
        .expect("secondary");
    att.attach("vol", spec(Role::Primary, 1, &[addr], true))
        .expect("attach");
    wait_peers(&att, all_connected);
    write(&att, &p, 0, 0x01).expect("a write both copies get");
    assert_eq!(read(&r, 0), vec![0x01; 4096]);

    // The copy's node goes; the primary writes on without it.
    server.stop();
    drop(server);
    for c in 0..64u64 {
        write(&att, &p, c * CHUNK, 0x20).expect("write while the copy is away");
    }
    assert!(
        !r_att.book().incomplete("vol"),
        "an away copy is whole, only old"
    );

    // It comes back; the resync starts and is cut.
    let server = ReplicaServer::serve(r_att.clone(), addr).expect("replica back");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(r_att.book().incomplete("vol") && read(&r, 0) == vec![0x20; 4096]) {
        assert!(Instant::now() < deadline, "{:?}", att.view("vol"));
        std::thread::sleep(Duration::from_millis(5));
    }
    server.stop();
    drop(server);
    assert!(whole(&r) != whole(&p), "the resync was not cut");
    assert!(r_att.book().incomplete("vol"));
    let err = r_att
        .attach("vol", spec(Role::Primary, 2, &[], true))
        .expect_err("a half-resynced copy was attached as a primary");
    assert!(matches!(err, AttachError::Incomplete { .. }), "{err}");
    assert!(err.to_string().contains("resync"), "{err}");

    // Back again: the resync goes on from the primary's dirty set (no
    // full sync), and its end (the SYNCED flush first in the live order)
    // makes the copy whole.
    let _server = ReplicaServer::serve(r_att.clone(), addr).expect("replica back again");
    wait_peers(&att, all_connected);
    let deadline = Instant::now() + Duration::from_secs(10);
    while r_att.book().incomplete("vol") {
        assert!(Instant::now() < deadline, "the copy stayed incomplete");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(whole(&r) == whole(&p));
    let (_, peer) = &att.view("vol").peers[0];
    assert_eq!(peer.full_syncs, 1, "{peer:?}");
    assert!(peer.resync_chunks > 0, "{peer:?}");
}
