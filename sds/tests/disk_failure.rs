//! I/O errors on a backing store detach that disk, in one process on
//! loopback with memory backends that fail on command: a primary whose
//! disk fails goes on diskless (writes acknowledged once the peer has
//! them, reads served by the peer; with no peer left, writes and reads
//! fail), and a secondary whose disk fails is detached by its primary,
//! which goes on without it; both show it in the storage-local status.
//! A secondary's volume deleted while its primary still ships frames to
//! it is not a disk failure: that session ends, the disk stays attached
//! and the pool's other replicated volumes go on.

mod mem_node;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_api::{DiskState, ReplicaPeerState, StorageApi};
use basalt_sds::local::{ExportConfig, LocalService};
use basalt_sds::pool::Pool;
use basalt_sds::replication::attach::{Attachments, Role};
use basalt_sds::replication::fence::AgentFencer;
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::{Op, PeerState};

use mem_node::{VOL, attachments, pool, spec, write};

fn read(att: &Attachments, pool: &Pool, offset: u64) -> Result<Vec<u8>, String> {
    let vol = pool.open_volume("vol").expect("open");
    let mut buf = vec![0u8; 4096];
    att.slot("vol")
        .read(offset, &mut buf, |b| vol.read(offset, b))
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// The storage-local API over `att`, as `basaltd storage serve` runs it,
/// and a runtime to call it from a plain test.
fn local(att: &Arc<Attachments>) -> (LocalService, tokio::runtime::Runtime) {
    let local = LocalService::new(
        att.clone(),
        ExportConfig {
            tcp: "127.0.0.1:10809".parse().expect("addr"),
            unix: None,
            replication: None,
        },
        AgentFencer::default(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    (local, rt)
}

fn disk_state(att: &Arc<Attachments>) -> (DiskState, Vec<ReplicaPeerState>) {
    let (local, rt) = local(att);
    let st = rt.block_on(local.status()).expect("status");
    (st.disk_state, st.replicas.iter().map(|p| p.state).collect())
}

fn connected(att: &Attachments) {
    volume_connected(att, "vol");
}

fn volume_connected(att: &Attachments, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while att.view(name).peers[0].1.state != PeerState::Connected {
        assert!(Instant::now() < deadline, "{:?}", att.view(name));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_primary_whose_disk_fails_goes_on_diskless_on_its_peer() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let ((pa, disk_a), (pb, _)) = (pool(), pool());
    let (att_a, att_b) = (attachments(&pa), attachments(&pb));
    let sb = ReplicaServer::serve(att_b.clone(), any).expect("replica server B");
    att_b
        .attach("vol", spec(Role::Secondary, &[]))
        .expect("B secondary");
    att_a
        .attach("vol", spec(Role::Primary, &[sb.addr()]))
        .expect("A primary");
    connected(&att_a);
    write(&att_a, &pa, 0, 0x11).expect("write with the disk up");
    assert_eq!(disk_state(&att_a).0, DiskState::Attached);

    // A's disk dies: the next write fails there, and is acknowledged
    // because B has it; reads come from B.
    disk_a.fail_after_writes(0);
    write(&att_a, &pa, 4096, 0x22).expect("write as the disk fails");
    write(&att_a, &pa, 65536, 0x33).expect("write diskless");
    let (state, peers) = disk_state(&att_a);
    assert_eq!(state, DiskState::Failed);
    assert_eq!(peers, [ReplicaPeerState::Connected]);
    assert_eq!(read(&att_a, &pa, 0), Ok(vec![0x11; 4096]));
    assert_eq!(read(&att_a, &pa, 4096), Ok(vec![0x22; 4096]));
    assert_eq!(read(&att_a, &pa, 65536), Ok(vec![0x33; 4096]));
    // Unwritten ranges read as zeros from B.
    assert_eq!(read(&att_a, &pa, 1 << 20), Ok(vec![0; 4096]));

    // No peer left: nothing can hold a write or answer a read.
    drop(sb);
    let deadline = Instant::now() + Duration::from_secs(10);
    while att_a.view("vol").peers[0].1.state == PeerState::Connected {
        assert!(Instant::now() < deadline, "B never noticed as gone");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        write(&att_a, &pa, 0, 0x44).is_err(),
        "a write with no copy anywhere"
    );
    assert!(
        read(&att_a, &pa, 0).is_err(),
        "a read with no copy anywhere"
    );
}

#[test]
fn a_secondary_whose_disk_fails_is_detached_and_the_primary_goes_on() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let ((pa, _), (pb, disk_b)) = (pool(), pool());
    let (att_a, att_b) = (attachments(&pa), attachments(&pb));
    let sb = ReplicaServer::serve(att_b.clone(), any).expect("replica server B");
    att_b
        .attach("vol", spec(Role::Secondary, &[]))
        .expect("B secondary");
    att_a
        .attach("vol", spec(Role::Primary, &[sb.addr()]))
        .expect("A primary");
    connected(&att_a);
    write(&att_a, &pa, 0, 0x11).expect("write with both disks up");

    disk_b.fail_after_writes(0);
    // B fails the frame; A detaches it and (its fencer allowing) goes on.
    for i in 0..10u64 {
        write(&att_a, &pa, i * 65536, i as u8 + 1).expect("write as B's disk fails");
    }
    assert_eq!(disk_state(&att_b).0, DiskState::Failed);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (state, peers) = disk_state(&att_a);
        assert_eq!(state, DiskState::Attached);
        if peers == [ReplicaPeerState::DiskFailed] {
            break;
        }
        assert!(Instant::now() < deadline, "A shows B as {peers:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reconnecting does not bring it back: B refuses while its disk is
    // detached, and A keeps its chunks dirty.
    std::thread::sleep(Duration::from_millis(300));
    let view = att_a.view("vol");
    assert_eq!(view.peers[0].1.state, PeerState::DiskFailed, "{view:?}");
    assert!(view.peers[0].1.dirty_chunks >= 9, "{view:?}");
    assert_eq!(read(&att_a, &pa, 9 * 65536), Ok(vec![10; 4096]));
}

#[test]
fn a_secondary_deleted_under_its_primary_leaves_the_disk_attached() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let ((pa, _), (pb, _)) = (pool(), pool());
    for pool in [&pa, &pb] {
        pool.create_volume("other", VOL).expect("second volume");
    }
    let (att_a, att_b) = (attachments(&pa), attachments(&pb));
    let sb = ReplicaServer::serve(att_b.clone(), any).expect("replica server B");
    for name in ["vol", "other"] {
        att_b
            .attach(name, spec(Role::Secondary, &[]))
            .expect("B secondary");
        att_a
            .attach(name, spec(Role::Primary, &[sb.addr()]))
            .expect("A primary");
    }
    for name in ["vol", "other"] {
        volume_connected(&att_a, name);
    }
    write(&att_a, &pa, 0, 0x11).expect("write with both copies");

    // B's copy of vol is deleted through its local API (as its agent
    // does when the volume is deleted), while A still ships to it.
    let (local_b, rt) = local(&att_b);
    assert!(
        rt.block_on(local_b.delete_volume("vol".into()))
            .expect("delete B's copy")
    );
    for i in 1..10u64 {
        write(&att_a, &pa, i * 65536, 0x22).expect("write after B's copy is gone");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while att_a.view("vol").peers[0].1.state == PeerState::Connected {
        assert!(Instant::now() < deadline, "{:?}", att_a.view("vol"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(
        att_a.view("vol").peers[0].1.state,
        PeerState::DiskFailed,
        "a deleted copy is not a failed disk"
    );
    assert_eq!(disk_state(&att_b).0, DiskState::Attached);

    // The other volume still replicates to B.
    let data = vec![0x33; 4096];
    let other = pa.open_volume("other").expect("open");
    att_a
        .slot("other")
        .submit(
            Op::Write {
                offset: 0,
                data: &data,
                fua: true,
            },
            || other.write(0, &data, true),
        )
        .expect("write the other volume");
    assert_eq!(
        att_a.view("other").peers[0].1.state,
        PeerState::Connected,
        "{:?}",
        att_a.view("other")
    );
    let mut held = vec![0u8; 4096];
    pb.open_volume("other")
        .expect("B's other volume")
        .read(0, &mut held)
        .expect("read B's copy");
    assert_eq!(held, data, "B's copy of the other volume missed the write");
    assert_eq!(disk_state(&att_b).0, DiskState::Attached);
}
