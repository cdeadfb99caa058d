//! A detached disk attached again without a restart
//! (`Attachments::attach_disk`), in one process with memory backends that
//! fail on command and then work again: refused while the device still
//! fails; a primary gets back from its peer the chunks written while it
//! was diskless, then reads its own copy; a secondary is resynced by its
//! primary, which tracked what it missed; a grow made while the primary
//! was diskless reaches its own copy before the chunks written past the
//! old end are copied back; writes and reads go on while chunks are
//! copied back (held by the test hook), a write to a chunk not copied
//! back yet never overwritten by the older copy. The copies end equal.

mod mem_node;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_sds::backend::MemBackend;
use basalt_sds::pool::Pool;
use basalt_sds::replication::PeerState;
use basalt_sds::replication::attach::{AttachDiskError, Attachments, Role};
use basalt_sds::replication::replica::ReplicaServer;

use mem_node::{VOL, attachments, pool, spec, write, write_bytes};

fn wait_peer(att: &Attachments, want: PeerState) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while att.view("vol").peers[0].1.state != want {
        assert!(Instant::now() < deadline, "{:?}", att.view("vol"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Both pools' copies of the volume, read directly, are equal (sizes
/// too).
fn assert_equal(a: &Pool, b: &Pool) {
    let (va, vb) = (
        a.open_volume("vol").expect("a"),
        b.open_volume("vol").expect("b"),
    );
    let size = va.size().expect("size a");
    assert_eq!(size, vb.size().expect("size b"), "the copies' sizes differ");
    let (mut x, mut y) = (vec![0u8; size as usize], vec![0u8; size as usize]);
    va.read(0, &mut x).expect("read a");
    vb.read(0, &mut y).expect("read b");
    assert!(x == y, "the copies differ");
}

/// One node: its pool, backing store and attachments.
type Node = (Pool, Arc<MemBackend>, Arc<Attachments>);

/// A primary (A) replicating to a secondary (B, with its replica server).
fn setup() -> (
    Node,
    (Pool, Arc<MemBackend>, Arc<Attachments>, ReplicaServer),
) {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let ((pa, disk_a), (pb, disk_b)) = (pool(), pool());
    let (att_a, att_b) = (attachments(&pa), attachments(&pb));
    let sb = ReplicaServer::serve(att_b.clone(), any).expect("replica server B");
    att_b
        .attach("vol", spec(Role::Secondary, &[]))
        .expect("B secondary");
    att_a
        .attach("vol", spec(Role::Primary, &[sb.addr()]))
        .expect("A primary");
    wait_peer(&att_a, PeerState::Connected);
    ((pa, disk_a, att_a), (pb, disk_b, att_b, sb))
}

#[test]
fn a_diskless_primary_gets_back_what_it_missed_from_its_peer() {
    let ((pa, disk_a, att_a), (pb, _, _, _sb)) = setup();
    write(&att_a, &pa, 0, 0x11).expect("write with the disk up");
    disk_a.fail_after_writes(0);
    write(&att_a, &pa, 4096, 0x22).expect("write as the disk fails");
    write(&att_a, &pa, 3 * 65536, 0x33).expect("write diskless");
    assert!(att_a.disk().is_failed());

    // Still failing: refused, still detached.
    assert!(matches!(
        att_a.attach_disk(),
        Err(AttachDiskError::StillFailing { .. })
    ));
    assert!(att_a.disk().is_failed());

    disk_a.heal();
    let done = att_a.attach_disk().expect("attach the disk again");
    assert!(done.was_detached, "{done:?}");
    assert_eq!(done.copied_back, [("vol".to_owned(), 2)], "{done:?}");
    assert!(!att_a.disk().is_failed());
    // The local copy has what went only to the peer.
    let vol = pa.open_volume("vol").expect("open");
    let mut buf = vec![0u8; 4096];
    vol.read(4096, &mut buf).expect("read");
    assert_eq!(buf, vec![0x22; 4096]);
    vol.read(3 * 65536, &mut buf).expect("read");
    assert_eq!(buf, vec![0x33; 4096]);
    assert_equal(&pa, &pb);
    // Writes reach both copies again.
    write(&att_a, &pa, 8192, 0x44).expect("write after the disk came back");
    assert_equal(&pa, &pb);
    pa.verify().expect("the pool verifies");
    // Attached: nothing more to do.
    assert!(!att_a.attach_disk().expect("again").was_detached);
}

#[test]
fn a_secondary_attached_again_is_resynced_by_its_primary() {
    let ((pa, _, att_a), (pb, disk_b, att_b, _sb)) = setup();
    write(&att_a, &pa, 0, 0x11).expect("write with both disks up");
    disk_b.fail_after_writes(0);
    for i in 0..10u64 {
        write(&att_a, &pa, i * 65536, i as u8 + 1).expect("write as B's disk fails");
    }
    wait_peer(&att_a, PeerState::DiskFailed);
    disk_b.heal();
    let done = att_b.attach_disk().expect("attach B's disk again");
    assert!(done.was_detached && done.copied_back.is_empty(), "{done:?}");
    // A's next hello is accepted: the dirty chunks, not a full sync.
    wait_peer(&att_a, PeerState::Connected);
    let st = &att_a.view("vol").peers[0].1;
    assert_eq!(st.full_syncs, 1, "only the initial fill: {st:?}");
    assert!(st.resync_chunks >= 9, "{st:?}");
    assert_equal(&pa, &pb);
}

#[test]
fn a_grow_made_while_diskless_reaches_the_local_copy_when_the_disk_comes_back() {
    let ((pa, disk_a, att_a), (pb, _, _, _sb)) = setup();
    disk_a.fail_after_writes(0);
    write(&att_a, &pa, 0, 0x11).expect("write as the disk fails");
    assert!(att_a.disk().is_failed());

    // Grown on the peer only; the detached copy keeps its size for now.
    let grown = att_a.resize("vol", 2 * VOL).expect("grow while diskless");
    assert_eq!(grown.size, 2 * VOL);
    assert_eq!(pb.volume_info("vol").expect("b").size, 2 * VOL);
    assert_eq!(pa.volume_info("vol").expect("a").size, VOL);
    // Written past the old end: only the peer has it.
    let past = VOL + 5 * 65536;
    write(&att_a, &pa, past, 0x55).expect("write past the old end, diskless");

    disk_a.heal();
    let done = att_a.attach_disk().expect("attach the disk again");
    assert_eq!(done.copied_back, [("vol".to_owned(), 2)], "{done:?}");
    assert_eq!(pa.volume_info("vol").expect("a").size, 2 * VOL);
    let vol = pa.open_volume("vol").expect("open");
    let mut buf = vec![0u8; 4096];
    vol.read(past, &mut buf).expect("read past the old end");
    assert_eq!(buf, vec![0x55; 4096]);
    assert_equal(&pa, &pb);
    // Writes past the old end reach both copies again.
    write(&att_a, &pa, past + 65536, 0x66).expect("write after the disk came back");
    assert_equal(&pa, &pb);
    pa.verify().expect("the pool verifies");
}

/// The local copy's bytes at `offset`.
fn local(pool: &Pool, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    pool.open_volume("vol")
        .expect("open")
        .read(offset, &mut buf)
        .expect("read the local copy");
    buf
}

#[test]
fn writes_go_on_while_the_chunks_written_diskless_are_copied_back() {
    const CHUNK: u64 = 65536;
    let ((pa, disk_a, att_a), (pb, _, _, _sb)) = setup();
    disk_a.fail_after_writes(0);
    // Six chunks written only to the peer, 4 KiB into each.
    for c in 0..6u64 {
        write(&att_a, &pa, c * CHUNK + 4096, 0x20 + c as u8).expect("write diskless");
    }
    assert!(att_a.disk().is_failed());
    disk_a.heal();

    // The copy-back held before its first chunk: the switch is done.
    att_a.copy_back_hold().hold(true);
    let att = att_a.clone();
    let attach = std::thread::spawn(move || att.attach_disk());
    let deadline = Instant::now() + Duration::from_secs(20);
    while att_a.disk().is_failed() {
        assert!(Instant::now() < deadline, "the disk never counted attached");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Writes and reads while it is held, each bounded: part of a chunk
    // not copied back, a whole one, a chunk never missed; a read of a
    // chunk not copied back comes from the peer.
    let (tx, rx) = std::sync::mpsc::channel();
    let (att, pool) = (att_a.clone(), pa.clone());
    std::thread::spawn(move || {
        write(&att, &pool, CHUNK + 8192, 0x71).expect("part of chunk 1");
        write_bytes(&att, &pool, 2 * CHUNK, &[0x72; CHUNK as usize]).expect("all of chunk 2");
        write(&att, &pool, 9 * CHUNK, 0x79).expect("chunk 9");
        let mut buf = vec![0u8; 4096];
        let vol = pool.open_volume("vol").expect("open");
        att.slot("vol")
            .read(3 * CHUNK + 4096, &mut buf, |b| {
                vol.read(3 * CHUNK + 4096, b)
            })
            .expect("read chunk 3");
        tx.send(buf).expect("send");
    });
    let read = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("writes and reads wait for the copy-back");
    assert_eq!(read, vec![0x23; 4096], "chunk 3 read from the peer");
    assert!(
        !attach.is_finished(),
        "the copy-back ended before the writes"
    );
    // Chunk 1 came back before its write: both are there.
    assert_eq!(local(&pa, CHUNK + 4096, 4096), vec![0x21; 4096]);
    assert_eq!(local(&pa, CHUNK + 8192, 4096), vec![0x71; 4096]);

    att_a.copy_back_hold().hold(false);
    let done = attach
        .join()
        .expect("the attach thread")
        .expect("attach the disk again");
    assert_eq!(done.copied_back, [("vol".to_owned(), 6)], "{done:?}");
    assert!(!att_a.slot("vol").diskless());
    // Nothing written meanwhile was overwritten by the older copies.
    assert_eq!(local(&pa, CHUNK + 8192, 4096), vec![0x71; 4096]);
    assert_eq!(
        local(&pa, 2 * CHUNK, CHUNK as usize),
        vec![0x72; CHUNK as usize]
    );
    assert_eq!(local(&pa, 9 * CHUNK, 4096), vec![0x79; 4096]);
    for c in [0u64, 3, 4, 5] {
        assert_eq!(
            local(&pa, c * CHUNK + 4096, 4096),
            vec![0x20 + c as u8; 4096]
        );
    }
    assert_equal(&pa, &pb);
    pa.verify().expect("the pool verifies");
}
