//! Cached reads (the NBD server's no-wait path): `Volume::read_cached`
//! over a file backend returns exactly what `Volume::read` returns —
//! holes as zeros, mapped chunks, ranges across chunk boundaries — or
//! says it would wait; it never answers with other bytes, and it refuses
//! what `read` refuses.

use std::sync::Arc;

use basalt_sds::backend::{Backend, FileBackend, MemBackend};
use basalt_sds::pool::{Pool, PoolError, PoolOptions};

const MIB: u64 = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 253) as u8 ^ seed.wrapping_mul(31))
        .collect()
}

#[test]
fn cached_reads_match_plain_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = FileBackend::create(&dir.path().join("pool.img"), 64 * MIB).expect("pool file");
    let pool = Pool::create(Arc::new(backend), &PoolOptions::default()).expect("pool");
    pool.create_volume("v", 16 * MIB).expect("volume");
    let vol = pool.open_volume("v").expect("open");
    // Data in the first and third MiB; the second stays a hole.
    vol.write(0, &pattern(MIB as usize, 1), false)
        .expect("write");
    vol.write(2 * MIB + 4096, &pattern(300_000, 2), false)
        .expect("write");

    let mut cached_any = false;
    for &(offset, len) in &[
        (0u64, 4096usize),
        (4096 * 7, 65536),
        (MIB - 2048, 8192),
        (MIB, 4096),
        (2 * MIB, MIB as usize),
        (0, 4 * MIB as usize),
    ] {
        let mut plain = vec![0u8; len];
        vol.read(offset, &mut plain).expect("read");
        let mut cached = vec![0xEEu8; len];
        // Just written through the page cache: present unless evicted.
        if vol.read_cached(offset, &mut cached).expect("cached read") {
            cached_any = true;
            assert!(
                cached == plain,
                "cached read at {offset}+{len} differs from a plain read"
            );
        }
    }
    assert!(
        cached_any,
        "no read was served from the page cache right after writing"
    );

    let mut buf = vec![0u8; 4096];
    let past_end = vol.read_cached(16 * MIB - 2048, &mut buf);
    assert!(
        matches!(past_end, Err(PoolError::OutOfRange { .. })),
        "a read past the end must be refused, got {past_end:?}"
    );
    pool.verify().expect("verify");
}

#[test]
fn backend_cached_read_is_exact_or_declined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = FileBackend::create(&dir.path().join("raw.img"), 4 * MIB).expect("file");
    let data = pattern(MIB as usize, 9);
    backend.write_at(&data, MIB).expect("write");
    let mut out = vec![0u8; data.len()];
    assert!(
        backend.read_at_cached(&mut out, MIB).expect("cached read"),
        "data just written is in the page cache"
    );
    assert!(out == data, "cached bytes differ from what was written");
    let mut past = vec![0u8; 8192];
    assert!(
        backend.read_at_cached(&mut past, 4 * MIB - 4096).is_err(),
        "a read past the end of the file is an error"
    );
    // A backend that cannot tell never claims a cached read.
    let mem = MemBackend::new(MIB as usize);
    let mut b = vec![0u8; 4096];
    assert!(!mem.read_at_cached(&mut b, 0).expect("mem"));
}
