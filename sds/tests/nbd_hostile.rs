//! Bad and hostile NBD input: every malformed option or request gets the
//! protocol's error or a clean disconnect, the server keeps serving other
//! clients, and the pool verifies clean. A bounded property test throws
//! random frames at whole sessions.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use basalt_sds::backend::MemBackend;
use basalt_sds::nbd::Server;
use basalt_sds::nbd::proto::{self, Request, cflag, cmd, errno, opt, rep, reply};
use basalt_sds::pool::{Pool, PoolOptions};
use proptest::prelude::*;
use support::{MIB, TestServer};

struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("greeting");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).expect("client flags");
        Raw { s }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).expect("send option");
    }

    /// Reads one option reply: (reply type, data).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().expect("8")),
            proto::OPTION_REPLY_MAGIC
        );
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).expect("option data");
        (kind, data)
    }

    /// Replies until ACK or an error; returns the last type.
    fn option_replies(&mut self) -> u32 {
        loop {
            let (kind, _) = self.option_reply();
            if kind != rep::INFO && kind != rep::META_CONTEXT && kind != rep::SERVER {
                return kind;
            }
        }
    }

    fn go(&mut self, export: &str) -> u32 {
        self.option(opt::GO, &go_payload(export));
        self.option_replies()
    }

    fn send(&mut self, req: Request, payload: &[u8]) {
        self.s.write_all(&req.encode()).expect("request");
        self.s.write_all(payload).expect("payload");
    }

    /// A structured reply: (flags, type, payload).
    fn structured(&mut self) -> (u16, u16, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("reply header");
        let magic = u32::from_be_bytes(h[..4].try_into().expect("4"));
        assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC);
        let flags = u16::from_be_bytes(h[4..6].try_into().expect("2"));
        let kind = u16::from_be_bytes(h[6..8].try_into().expect("2"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).expect("reply payload");
        (flags, kind, data)
    }

    fn error_of(&mut self) -> u32 {
        let (_, kind, data) = self.structured();
        assert_eq!(kind, reply::ERROR, "expected an error chunk");
        u32::from_be_bytes(data[..4].try_into().expect("4"))
    }

    /// Whether the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn go_payload(export: &str) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
    Request {
        flags,
        kind,
        cookie: 0xc0ff_ee00 + u64::from(kind),
        offset,
        length,
    }
}

/// A client that sends a whole pipeline in one segment: small reads and
/// writes (which the server runs inline as one batch), a large write and
/// a FUA write (which go to workers), a bad request in the middle, a
/// FLUSH. Every request gets exactly one reply under its own cookie, the
/// bad one its error, and the reads that follow see every write.
#[test]
fn a_pipeline_in_one_segment_answers_each_request_once() {
    const STRIDE: u64 = 192 << 10;
    let srv = TestServer::start(64 * MIB, &[("disk", 8 * MIB)]);
    let mut c = Raw::connect(srv.port);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0, rep::ACK);
    assert_eq!(c.go("disk"), rep::ACK);

    let block = |i: u64, len: usize| -> Vec<u8> {
        (0..len)
            .map(|j| (i as usize * 31 + j % 251) as u8)
            .collect()
    };
    // (cookie, offset, length) of each write.
    let mut writes = Vec::new();
    let mut segment = Vec::new();
    let push = |segment: &mut Vec<u8>, r: Request, payload: &[u8]| {
        segment.extend_from_slice(&r.encode());
        segment.extend_from_slice(payload);
    };
    for i in 0..40u64 {
        let (flags, len) = match i {
            7 => (0, 160 << 10),
            13 => (cflag::FUA, 4096),
            _ => (0, 4096),
        };
        let offset = i * STRIDE + 512;
        let r = Request {
            flags,
            kind: cmd::WRITE,
            cookie: 1000 + i,
            offset,
            length: len as u32,
        };
        push(&mut segment, r, &block(i, len));
        writes.push((1000 + i, offset, len));
        if i == 20 {
            // Past the end: an error for this one, the rest unaffected.
            let bad = Request {
                flags: 0,
                kind: cmd::READ,
                cookie: 99,
                offset: 8 * MIB - 512,
                length: 4096,
            };
            push(&mut segment, bad, &[]);
        }
    }
    let flush = Request {
        flags: 0,
        kind: cmd::FLUSH,
        cookie: 98,
        offset: 0,
        length: 0,
    };
    push(&mut segment, flush, &[]);
    c.s.write_all(&segment).expect("pipeline");

    let mut answered = std::collections::BTreeMap::new();
    for _ in 0..writes.len() + 2 {
        // Writes and the flush may get simple replies, errors come as
        // structured chunks.
        let mut magic = [0u8; 4];
        c.s.read_exact(&mut magic).expect("reply magic");
        let (cookie, kind) = if u32::from_be_bytes(magic) == proto::SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; 12];
            c.s.read_exact(&mut h).expect("simple reply");
            let error = u32::from_be_bytes(h[..4].try_into().expect("4"));
            let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
            (
                cookie,
                if error == 0 {
                    reply::NONE
                } else {
                    reply::ERROR
                },
            )
        } else {
            assert_eq!(u32::from_be_bytes(magic), proto::STRUCTURED_REPLY_MAGIC);
            let mut h = [0u8; 16];
            c.s.read_exact(&mut h).expect("structured reply");
            let kind = u16::from_be_bytes(h[2..4].try_into().expect("2"));
            let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
            let len = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let mut data = vec![0u8; len as usize];
            c.s.read_exact(&mut data).expect("reply payload");
            (cookie, kind)
        };
        assert!(
            answered.insert(cookie, kind).is_none(),
            "cookie {cookie} answered twice"
        );
    }
    assert_eq!(answered.remove(&99), Some(reply::ERROR), "the bad read");
    assert_eq!(answered.remove(&98), Some(reply::NONE), "the flush");
    for (cookie, _, _) in &writes {
        assert_eq!(answered.remove(cookie), Some(reply::NONE), "write {cookie}");
    }
    assert!(answered.is_empty(), "unexpected replies {answered:?}");

    // Read everything back, again in one segment.
    let mut segment = Vec::new();
    for &(cookie, offset, len) in &writes {
        let r = Request {
            flags: 0,
            kind: cmd::READ,
            cookie,
            offset,
            length: len as u32,
        };
        push(&mut segment, r, &[]);
    }
    c.s.write_all(&segment).expect("reads");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..writes.len() {
        let (flags, kind, data) = c.structured();
        assert_eq!((flags, kind), (reply::FLAG_DONE, reply::OFFSET_DATA));
        let offset = u64::from_be_bytes(data[..8].try_into().expect("8"));
        let i = (offset - 512) / STRIDE;
        let &(cookie, _, len) = &writes[i as usize];
        assert_eq!(data.len() - 8, len, "read {cookie} length");
        assert!(data[8..] == block(i, len)[..], "read {cookie} data");
        assert!(seen.insert(cookie), "read {cookie} answered twice");
    }
    srv.pool.verify().expect("pool verifies");
}

#[test]
fn negotiation_errors_and_recovery() {
    let srv = TestServer::start(64 * MIB, &[("disk", 8 * MIB)]);
    let mut c = Raw::connect(srv.port);
    c.option(999, b"whatever");
    assert_eq!(c.option_reply().0, rep::ERR_UNSUP);
    c.option(opt::STARTTLS, &[]);
    assert_eq!(c.option_reply().0, rep::ERR_UNSUP);
    c.option(opt::INFO, &go_payload("missing"));
    assert_eq!(c.option_replies(), rep::ERR_UNKNOWN);
    c.option(opt::GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.option_reply().0, rep::ERR_INVALID);
    c.option(
        opt::SET_META_CONTEXT,
        &meta_payload("disk", &["base:allocation"]),
    );
    assert_eq!(
        c.option_reply().0,
        rep::ERR_INVALID,
        "needs structured replies"
    );
    c.option(opt::STRUCTURED_REPLY, &[1]);
    assert_eq!(c.option_reply().0, rep::ERR_INVALID);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0, rep::ACK);
    c.option(opt::LIST_META_CONTEXT, &meta_payload("disk", &["base:"]));
    let (kind, data) = c.option_reply();
    assert_eq!(kind, rep::META_CONTEXT);
    assert_eq!(&data[4..], b"base:allocation");
    assert_eq!(c.option_reply().0, rep::ACK);
    c.option(
        opt::SET_META_CONTEXT,
        &meta_payload("disk", &["qemu:dirty-bitmap:x", "base:allocation"]),
    );
    assert_eq!(c.option_reply().0, rep::META_CONTEXT);
    assert_eq!(c.option_reply().0, rep::ACK);
    // After all that, the export still works.
    assert_eq!(c.go("disk"), rep::ACK);
    c.send(req(cmd::BLOCK_STATUS, 0, 0, 4096), &[]);
    let (flags, kind, data) = c.structured();
    assert_eq!((flags, kind), (reply::FLAG_DONE, reply::BLOCK_STATUS));
    assert_eq!(&data[..4], &proto::BASE_ALLOCATION_ID.to_be_bytes());
    assert_eq!(
        &data[8..12],
        &(proto::STATE_HOLE | proto::STATE_ZERO).to_be_bytes()
    );

    // ABORT is acknowledged and ends the session.
    let mut a = Raw::connect(srv.port);
    a.option(opt::ABORT, &[]);
    assert_eq!(a.option_reply().0, rep::ACK);
    assert!(a.closed());

    // Bad option magic, an oversized option, unknown client flags: closed.
    let mut b = Raw::connect(srv.port);
    b.s.write_all(b"NOTANOPT\0\0\0\x01\0\0\0\0").expect("send");
    assert!(b.closed());
    let mut b = Raw::connect(srv.port);
    b.s.write_all(b"IHAVEOPT\0\0\0\x07\xff\xff\xff\xff")
        .expect("send");
    assert!(b.closed());
    let mut s = TcpStream::connect(("127.0.0.1", srv.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("t");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("hello");
    s.write_all(&0x8000_0000u32.to_be_bytes()).expect("flags");
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    // EXPORT_NAME of a missing export: closed (that option has no error).
    let mut e = Raw::connect(srv.port);
    e.option(opt::EXPORT_NAME, b"missing");
    assert!(e.closed());
    srv.pool.verify().expect("verify");
}

#[test]
fn transmission_errors_keep_the_session_and_the_volume() {
    let srv = TestServer::start(64 * MIB, &[("disk", 8 * MIB)]);
    let v = srv.pool.open_volume("disk").expect("open");
    v.write(0, &[0x42; 4096], false).expect("write");
    srv.pool.snapshot("disk", "snap").expect("snapshot");
    let mut c = Raw::connect(srv.port);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0, rep::ACK);
    assert_eq!(c.go("disk"), rep::ACK);
    let size = 8 * MIB;

    c.send(req(cmd::READ, 0, size - 512, 1024), &[]);
    assert_eq!(c.error_of(), errno::EINVAL, "read past the end");
    c.send(req(cmd::READ, 0, u64::MAX - 10, 100), &[]);
    assert_eq!(c.error_of(), errno::EINVAL, "offset overflow");
    c.send(req(cmd::WRITE, 0, size - 512, 1024), &[7; 1024]);
    assert_eq!(c.error_of(), errno::ENOSPC, "write past the end");
    c.send(req(cmd::READ, 0, 0, 64 << 20), &[]);
    assert_eq!(c.error_of(), errno::EINVAL, "read too large");
    c.send(req(99, 0, 0, 0), &[]);
    assert_eq!(c.error_of(), errno::EINVAL, "unknown command");
    c.send(req(cmd::WRITE, 0x8000, 0, 4), &[1, 2, 3, 4]);
    assert_eq!(c.error_of(), errno::EINVAL, "unknown flag");
    c.send(req(cmd::TRIM, cflag::NO_HOLE, 0, 4096), &[]);
    assert_eq!(c.error_of(), errno::EINVAL, "flag not valid for TRIM");
    c.send(req(cmd::BLOCK_STATUS, 0, 0, 4096), &[]);
    assert_eq!(c.error_of(), errno::EINVAL, "no metadata context");
    c.send(req(cmd::WRITE_ZEROES, cflag::FAST_ZERO, 100, 100), &[]);
    assert_eq!(c.error_of(), errno::ENOTSUP, "partial zero is not fast");

    // The session still works, and the data is intact.
    c.send(req(cmd::READ, cflag::DF, 0, 4096), &[]);
    let (flags, kind, data) = c.structured();
    assert_eq!((flags, kind), (reply::FLAG_DONE, reply::OFFSET_DATA));
    assert_eq!(&data[..8], &0u64.to_be_bytes());
    assert!(data[8..].iter().all(|&b| b == 0x42));

    // A read-only export refuses writes with EPERM.
    let mut r = Raw::connect(srv.port);
    r.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(r.option_reply().0, rep::ACK);
    assert_eq!(r.go("snap"), rep::ACK);
    r.send(req(cmd::WRITE, 0, 0, 4), &[9; 4]);
    assert_eq!(r.error_of(), errno::EPERM);
    r.send(req(cmd::TRIM, 0, 0, 65536), &[]);
    assert_eq!(r.error_of(), errno::EPERM);

    // Oversized write payload and bad request magic: disconnect.
    c.send(req(cmd::WRITE, 0, 0, u32::MAX), &[]);
    assert!(c.closed());
    let mut m = Raw::connect(srv.port);
    assert_eq!(m.go("disk"), rep::ACK);
    m.s.write_all(&[0xde; 28]).expect("garbage");
    assert!(m.closed());

    // A client that vanishes in the middle of a write payload.
    let mut g = Raw::connect(srv.port);
    assert_eq!(g.go("disk"), rep::ACK);
    g.send(req(cmd::WRITE, 0, 65536, 65536), &[0x99; 1000]);
    drop(g);

    // Others are unaffected.
    let mut d = Raw::connect(srv.port);
    assert_eq!(d.go("disk"), rep::ACK);
    d.send(req(cmd::FLUSH, 0, 0, 0), &[]);
    let mut simple = [0u8; 16];
    d.s.read_exact(&mut simple).expect("flush reply");
    assert_eq!(&simple[4..8], &[0, 0, 0, 0]);
    let mut buf = vec![0u8; 4096];
    v.read(65536, &mut buf).expect("read");
    assert!(
        buf.iter().all(|&b| b == 0),
        "a half-sent write changed nothing"
    );
    srv.pool.verify().expect("verify");
}

/// Random frames: options (valid and not), then requests (valid and not)
/// and raw garbage.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let option = (0u32..14, proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(o, d)| {
        let data = match o {
            6 | 7 => go_payload(if d.first().is_some_and(|b| b % 2 == 0) {
                "v"
            } else {
                "zz"
            }),
            9 | 10 => meta_payload("v", &["base:allocation"]),
            _ => d,
        };
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&o.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(&data);
        m
    });
    let request = (
        0u16..10,
        any::<u16>(),
        0u64..(5 << 20),
        0u32..(300 << 10),
        any::<u8>(),
    )
        .prop_map(|(kind, flags, offset, length, fill)| {
            let flags = flags & 0x3f;
            let mut m = Request {
                flags,
                kind,
                cookie: u64::from(kind),
                offset,
                length,
            }
            .encode()
            .to_vec();
            if kind == cmd::WRITE {
                m.extend(std::iter::repeat_n(fill, length as usize));
            }
            m
        });
    prop_oneof![
        3 => option,
        6 => request,
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_sessions_never_panic_or_damage_the_pool(
        flags in any::<u32>(),
        frames in proptest::collection::vec(frame(), 0..24),
    ) {
        let backend = Arc::new(MemBackend::new(16 << 20));
        let opts = PoolOptions { chunk_size: 4096, ..PoolOptions::default() };
        let pool = Pool::create(backend, &opts).expect("pool");
        pool.create_volume("v", 4 << 20).expect("volume");
        let server = Server::new(pool.clone());
        let mut input = (flags & 3).to_be_bytes().to_vec();
        for f in frames {
            input.extend_from_slice(&f);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let out = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), server.replay(&input)).await
        });
        prop_assert!(out.is_ok(), "session hung");
        let out = out.expect("checked");
        prop_assert_eq!(&out[..8], b"NBDMAGIC");
        prop_assert!(pool.verify().is_ok(), "{:?}", pool.verify());
    }
}
