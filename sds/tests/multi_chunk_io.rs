//! Reads and writes that span several chunks (the pool's one-call-per-run
//! paths, and the NBD server's sends straight from the page cache) return
//! exactly what a model of the volume holds: across holes, chunks shared
//! with a snapshot (copied on write, the snapshot unchanged) and trimmed
//! chunks; a range with a hole or outside the volume is never handed out
//! as resident memory.

use std::sync::Arc;

use basalt_sds::backend::FileBackend;
use basalt_sds::pool::{Pool, PoolError, PoolOptions, Volume};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * KIB;
const SIZE: u64 = 8 * MIB;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + usize::from(seed) * 13) % 251) as u8 + 1)
        .collect()
}

fn write(vol: &Volume, model: &mut [u8], offset: u64, data: &[u8]) {
    vol.write(offset, data, false).expect("write");
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

fn check(vol: &Volume, model: &[u8], offset: u64, len: usize) {
    let mut got = vec![0xEEu8; len];
    vol.read(offset, &mut got).expect("read");
    assert!(
        got == model[offset as usize..offset as usize + len],
        "read at {offset}+{len} differs from the model"
    );
}

/// The bytes `read_resident` hands out, copied (nothing writes meanwhile).
fn resident(vol: &Volume, offset: u64, len: u64) -> Option<Vec<u8>> {
    vol.read_resident(offset, len, |iov| {
        let mut out = Vec::new();
        for v in iov {
            // SAFETY: the vectors describe mapped, resident memory that
            // stays mapped while the pool lives and that no thread writes
            // during this test's call.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
            });
        }
        out
    })
    .expect("resident read")
}

#[test]
fn multi_chunk_reads_and_writes_match_a_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = FileBackend::create(&dir.path().join("pool.img"), 32 * MIB).expect("pool file");
    let opts = PoolOptions {
        chunk_size: CHUNK as u32,
        ..PoolOptions::default()
    };
    let pool = Pool::create(Arc::new(backend), &opts).expect("pool");
    pool.create_volume("v", SIZE).expect("volume");
    let vol = pool.open_volume("v").expect("open");
    let mut model = vec![0u8; SIZE as usize];

    // First writes allocate (holes: the per-chunk path), leaving a hole
    // between two written ranges.
    write(&vol, &mut model, 100 * KIB, &pattern((2 * MIB) as usize, 1));
    write(&vol, &mut model, 3 * MIB, &pattern(MIB as usize, 2));
    for &(offset, len) in &[
        (0, 4 * MIB as usize),
        (100 * KIB - 1, (2 * MIB) as usize + 2),
        (2 * MIB, (2 * MIB) as usize),
        (CHUNK - 512, (3 * CHUNK) as usize),
    ] {
        check(&vol, &model, offset, len);
    }

    // Overwrites of chunks the volume owns alone (one write per run),
    // at offsets that start and end inside chunks.
    write(
        &vol,
        &mut model,
        130 * KIB + 3,
        &pattern((MIB + 5000) as usize, 3),
    );
    check(&vol, &model, 0, (4 * MIB) as usize);

    // A snapshot shares every chunk: an overwrite across them copies on
    // write; the snapshot keeps the old bytes.
    let before = model.clone();
    pool.snapshot("v", "snap").expect("snapshot");
    let snap = pool.open_volume("snap").expect("open snapshot");
    write(&vol, &mut model, 200 * KIB, &pattern((MIB / 2) as usize, 4));
    check(&vol, &model, 0, (4 * MIB) as usize);
    check(&snap, &before, 0, (4 * MIB) as usize);
    // Now the volume owns those chunks alone again: in place.
    write(&vol, &mut model, 190 * KIB, &pattern((MIB / 2) as usize, 5));
    check(&vol, &model, 0, (4 * MIB) as usize);
    check(&snap, &before, 0, (4 * MIB) as usize);

    // A trimmed chunk in the middle of a range reads as zeros.
    vol.trim(4 * CHUNK, CHUNK, false).expect("trim");
    model[(4 * CHUNK) as usize..(5 * CHUNK) as usize].fill(0);
    check(&vol, &model, 0, (4 * MIB) as usize);

    // Resident memory: exactly the model's bytes where every chunk is
    // mapped (just written: in the page cache, unless evicted); never
    // for a range with a hole; errors for ranges outside the volume.
    let mut resident_any = false;
    for &(offset, len) in &[
        (3 * MIB, MIB),
        (3 * MIB + 4097, 200 * KIB),
        (6 * CHUNK, CHUNK),
    ] {
        if let Some(got) = resident(&vol, offset, len) {
            resident_any = true;
            assert!(
                got == model[offset as usize..(offset + len) as usize],
                "resident bytes at {offset}+{len} differ from the model"
            );
        }
    }
    assert!(resident_any, "nothing just written was resident");
    assert_eq!(
        resident(&vol, 2 * MIB, 2 * MIB),
        None,
        "a range over a hole"
    );
    assert_eq!(resident(&vol, 4 * CHUNK, CHUNK), None, "a trimmed chunk");
    let outside = vol.read_resident(SIZE - 4096, 8192, |_| ());
    assert!(
        matches!(outside, Err(PoolError::OutOfRange { .. })),
        "a range past the end must be refused, got {outside:?}"
    );
    pool.verify().expect("verify");
}
