//! Online verify in one process, on loopback: a primary compares every
//! chunk with its peer while a writer keeps writing, finds exactly the
//! chunk corrupted behind replication's back on the peer (no false
//! positive from the writes in flight), marks it dirty, and a repair
//! sends it again so the copies are equal.

mod mem_node;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_sds::backend::MemBackend;
use basalt_sds::pool::{Pool, PoolOptions};
use basalt_sds::replication::attach::{AttachSpec, Attachments, Role};
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::{Op, PeerState, VerifyError};

use mem_node::attachments;

const VOL: u64 = 16 << 20;
const CHUNK: u64 = 64 << 10;

fn pool() -> Pool {
    let pool =
        Pool::create(Arc::new(MemBackend::new(64 << 20)), &PoolOptions::default()).expect("pool");
    pool.create_volume("vol", VOL).expect("volume");
    pool
}

fn write(att: &Attachments, pool: &Pool, offset: u64, data: &[u8]) {
    let vol = pool.open_volume("vol").expect("open");
    att.slot("vol")
        .submit(
            Op::Write {
                offset,
                data,
                fua: false,
            },
            || vol.write(offset, data, false),
        )
        .expect("replicated write");
}

fn whole(pool: &Pool) -> Vec<u8> {
    let mut buf = vec![0u8; VOL as usize];
    pool.open_volume("vol")
        .expect("open")
        .read(0, &mut buf)
        .expect("read");
    buf
}

#[test]
fn verify_finds_a_corrupted_chunk_while_writes_go_on_and_repair_fixes_it() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let (pa, pb) = (pool(), pool());
    let (att_a, att_b) = (attachments(&pa), attachments(&pb));
    let sb = ReplicaServer::serve(att_b.clone(), any).expect("replica server B");
    att_b
        .attach(
            "vol",
            AttachSpec {
                role: Role::Secondary,
                epoch: 1,
                peers: Vec::new(),
                allow_outdate: false,
                protocol: Default::default(),
            },
        )
        .expect("B secondary");
    assert!(matches!(
        att_a.verify("vol", 0, false),
        Err(VerifyError::NotPrimary { .. })
    ));
    att_a
        .attach(
            "vol",
            AttachSpec {
                role: Role::Primary,
                epoch: 1,
                peers: vec![sb.addr().to_string()],
                allow_outdate: true,
                protocol: Default::default(),
            },
        )
        .expect("A primary");
    let deadline = Instant::now() + Duration::from_secs(20);
    while att_a.view("vol").peers[0].1.state != PeerState::Connected {
        assert!(Instant::now() < deadline, "{:?}", att_a.view("vol"));
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..VOL / CHUNK {
        write(
            &att_a,
            &pa,
            i * CHUNK,
            &vec![(i % 200) as u8 + 1; CHUNK as usize],
        );
    }
    assert_eq!(whole(&pa), whole(&pb));

    // A chunk changed on B behind replication's back.
    let bad = 77;
    pb.open_volume("vol")
        .expect("open B")
        .write(bad * CHUNK + 4096, &[0xee; 512], false)
        .expect("corrupt B");

    // A writer keeps writing through the primary during the verify.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (att, pa, stop) = (att_a.clone(), pa.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let chunk = (n * 13) % (VOL / CHUNK);
                if chunk != bad {
                    write(&att, &pa, chunk * CHUNK + (n % 16) * 4096, &[n as u8; 4096]);
                }
                n += 1;
            }
            n
        })
    };
    let results = att_a.verify("vol", 0, false).expect("verify");
    assert_eq!(results.len(), 1);
    let report = results[0].1.as_ref().expect("verify against B");
    assert_eq!(report.checked_chunks, VOL / CHUNK);
    assert_eq!(report.out_of_sync, [bad], "{report:?}");
    assert_eq!(report.repaired, 0);
    // Marked dirty for the next resync.
    assert_eq!(att_a.view("vol").peers[0].1.dirty_chunks, 1);

    // Repair sends it again, live; a second verify finds nothing.
    let results = att_a.verify("vol", 0, true).expect("verify and repair");
    let report = results[0].1.as_ref().expect("verify against B");
    assert_eq!(
        (report.out_of_sync.as_slice(), report.repaired),
        ([bad].as_slice(), 1)
    );
    assert_eq!(att_a.view("vol").peers[0].1.dirty_chunks, 0);
    let results = att_a.verify("vol", 0, false).expect("verify again");
    let report = results[0].1.as_ref().expect("verify against B");
    assert!(report.out_of_sync.is_empty(), "{report:?}");
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().expect("writer");
    eprintln!("{writes} writes during the three verifies");
    assert!(writes > 0);
    assert_eq!(whole(&pa), whole(&pb));
    // A repaired chunk, rewritten in the live order, leaves the copy
    // whole (a resync's chunk would mark it incomplete).
    assert!(!att_b.book().incomplete("vol"));

    // A peer that is away is reported, not compared.
    drop(sb);
    att_b
        .attach(
            "vol",
            AttachSpec {
                role: Role::Standalone,
                epoch: 1,
                peers: Vec::new(),
                allow_outdate: false,
                protocol: Default::default(),
            },
        )
        .expect("B standalone");
    write(&att_a, &pa, 0, &[9; 4096]);
    let results = att_a.verify("vol", 0, false).expect("verify");
    assert!(
        matches!(results[0].1, Err(VerifyError::NotConnected { .. })),
        "{results:?}"
    );
}
