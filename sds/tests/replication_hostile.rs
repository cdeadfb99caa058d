//! A replica facing a hostile or broken peer: random sessions (a hello,
//! valid or not, then frames with any kind code, flags, epoch, offset and
//! length, and raw junk) sent to a replica server on loopback never panic
//! a thread of it, never leave its pool inconsistent (the pool verifier),
//! always end with the replica closing its side once the peer closed
//! its own, and leave it serving: afterwards a real primary at a newer
//! epoch still connects, fills it and ships a write to it.

mod mem_node;

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use basalt_sds::backend::MemBackend;
use basalt_sds::pool::{Pool, PoolOptions};
use basalt_sds::replication::attach::{AttachSpec, Role};
use basalt_sds::replication::replica::ReplicaServer;
use basalt_sds::replication::wire::{FRAME_HEADER_LEN, Hello, MIN_VERSION, VERSION};
use basalt_sds::replication::{Op, PeerState};
use proptest::prelude::*;

use mem_node::attachments;

const VOL: u64 = 4 << 20;
const FRAME_MAGIC: u32 = 0x5246_4c42;

/// One piece of a hostile session.
#[derive(Debug, Clone)]
enum Piece {
    /// A frame header with any fields, and `payload` bytes after it.
    Frame {
        kind: u8,
        flags: u8,
        epoch: u64,
        offset: u64,
        length: u32,
        payload: usize,
    },
    /// Bytes of anything.
    Junk(Vec<u8>),
}

impl Piece {
    fn bytes(&self, seq: u64) -> Vec<u8> {
        match self {
            Piece::Frame {
                kind,
                flags,
                epoch,
                offset,
                length,
                payload,
            } => {
                let mut h = vec![0u8; FRAME_HEADER_LEN];
                h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
                h[4] = *kind;
                h[5] = *flags;
                h[8..16].copy_from_slice(&epoch.to_le_bytes());
                h[16..24].copy_from_slice(&seq.to_le_bytes());
                h[24..32].copy_from_slice(&offset.to_le_bytes());
                h[32..36].copy_from_slice(&length.to_le_bytes());
                h.extend(std::iter::repeat_n(0x5a, *payload));
                h
            }
            Piece::Junk(b) => b.clone(),
        }
    }
}

fn piece() -> impl Strategy<Value = Piece> {
    let offset = prop_oneof![
        4 => 0u64..(VOL + (1 << 20)),
        1 => any::<u64>(),
    ];
    let length = prop_oneof![
        4 => 0u32..(256 << 10),
        1 => any::<u32>(),
    ];
    let frame = (
        0u8..9,
        any::<u8>(),
        0u64..6,
        offset,
        length,
        0usize..(128 << 10),
    )
        .prop_map(
            |(kind, flags, epoch, offset, length, payload)| Piece::Frame {
                kind,
                // Mostly the known flags, sometimes any.
                flags: if flags & 0x80 == 0 {
                    flags & 0x1f
                } else {
                    flags
                },
                epoch,
                offset,
                length,
                // A write's payload is mostly as long as it says.
                payload: if kind == 1 && payload % 4 != 0 {
                    length.min(256 << 10) as usize
                } else {
                    payload % 4096
                },
            },
        );
    prop_oneof![
        8 => frame,
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Piece::Junk),
    ]
}

/// A hello: for the volume at its size (mostly), or not.
fn hello() -> impl Strategy<Value = Vec<u8>> {
    (
        0u16..9,
        0u64..6,
        any::<u64>(),
        prop_oneof![4 => Just(VOL), 1 => any::<u64>()],
        prop_oneof![4 => Just("vol".to_owned()), 1 => "[a-z]{0,8}"],
        any::<bool>(),
    )
        .prop_map(|(version, epoch, generation, size, volume, junk)| {
            let mut bytes = Hello {
                version: if version < MIN_VERSION {
                    version
                } else {
                    VERSION.min(version)
                },
                epoch,
                generation,
                synced_from: 0,
                volume_uid: uuid::Uuid::nil(),
                size,
                volume,
            }
            .encode();
            if junk {
                // A torn or damaged hello.
                let cut = (generation as usize) % bytes.len();
                bytes[cut] ^= 0xa5;
            }
            bytes
        })
}

fn pool() -> Pool {
    let opts = PoolOptions {
        chunk_size: 64 << 10,
        ..PoolOptions::default()
    };
    let pool = Pool::create(Arc::new(MemBackend::new(32 << 20)), &opts).expect("pool");
    pool.create_volume("vol", VOL).expect("volume");
    pool
}

/// Sends `hello` then `pieces` to the replica at `addr`, closes its side
/// and reads whatever comes back until the replica closes; returns
/// whether it did within 5 s.
fn session(addr: SocketAddr, hello: &[u8], pieces: &[Piece]) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        panic!("the replica no longer accepts connections");
    };
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut input = hello.to_vec();
    for (i, p) in pieces.iter().enumerate() {
        input.extend(p.bytes(i as u64 + 1));
    }
    // The replica may close early (it refused something): a broken pipe
    // here is an answer, not a failure.
    let _ = s.write_all(&input);
    let _ = s.shutdown(Shutdown::Write);
    let until = Instant::now() + Duration::from_secs(5);
    let mut sink = [0u8; 64 << 10];
    while Instant::now() < until {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

#[test]
fn hostile_peers_never_panic_the_replica_damage_its_pool_or_stop_it_serving() {
    count_panics();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let r = pool();
    let r_att = attachments(&r);
    let server = ReplicaServer::serve(r_att.clone(), any).expect("replica");
    let addr = server.addr();

    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &(hello(), proptest::collection::vec(piece(), 0..16)),
            |(hello, pieces)| {
                // The session ends with the peer's side: the replica
                // closes its socket too (it used to keep a clone of every
                // connection open until it stopped).
                prop_assert!(
                    session(addr, &hello, &pieces),
                    "the replica kept the connection open after the peer closed"
                );
                prop_assert_eq!(
                    PANICS.load(Ordering::SeqCst),
                    0,
                    "a replica thread panicked"
                );
                prop_assert!(r.verify().is_ok(), "{:?}", r.verify());
                Ok(())
            },
        )
        .expect("hostile sessions");

    // Still serving: a real primary at a newer epoch fills the copy and
    // ships a write to it. (A peer is trusted with the epochs it claims:
    // a damaged hello may have raised the volume's to anything.)
    let epoch = server.newest_epoch("vol").max(1).saturating_add(1);
    let p = pool();
    let att = attachments(&p);
    let spec = |role| AttachSpec {
        role,
        epoch,
        peers: if role == Role::Primary {
            vec![addr.to_string()]
        } else {
            Vec::new()
        },
        allow_outdate: false,
        protocol: Default::default(),
    };
    r_att
        .attach("vol", spec(Role::Secondary))
        .expect("secondary");
    att.attach("vol", spec(Role::Primary)).expect("primary");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !att
        .view("vol")
        .peers
        .iter()
        .all(|(_, st)| st.state == PeerState::Connected)
    {
        assert!(Instant::now() < deadline, "{:?}", att.view("vol"));
        std::thread::sleep(Duration::from_millis(10));
    }
    let vol = p.open_volume("vol").expect("open");
    let data = vec![0x77u8; 4096];
    att.slot("vol")
        .submit(
            Op::Write {
                offset: 8192,
                data: &data,
                fua: false,
            },
            || vol.write(8192, &data, false),
        )
        .expect("a write after the hostile sessions");
    let mut back = vec![0u8; VOL as usize];
    r.open_volume("vol")
        .expect("open")
        .read(0, &mut back)
        .expect("read");
    let mut want = vec![0u8; VOL as usize];
    vol.read(0, &mut want).expect("read");
    assert!(
        back == want,
        "the replica does not hold the primary's volume"
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    assert!(r.verify().is_ok());
}
