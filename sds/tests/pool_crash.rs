//! Random operations on a pool over the fault-injecting memory backend,
//! with process crashes and power losses at random points. After every
//! operation the pool verifies (no chunk leaked or doubly owned); after
//! every crash the reopened pool verifies and every sector holds a value
//! the durability contract allows:
//! - after a process crash (same boot): exactly the last value written;
//! - after a power loss: the value made durable by the last FLUSH or FUA
//!   that covered it, or a value written since.

use std::collections::BTreeMap;
use std::sync::Arc;

use basalt_sds::backend::MemBackend;
use basalt_sds::pool::{Pool, PoolError, PoolOptions, ZeroFlags};
use proptest::prelude::*;

const SECTOR: usize = 512;
const CHUNK: usize = 4096;
const SECTORS_PER_CHUNK: usize = CHUNK / SECTOR;
const VOLUME_SECTORS: usize = 32 * SECTORS_PER_CHUNK;
const NAMES: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Write {
        vol: usize,
        sector: usize,
        count: usize,
        fua: bool,
    },
    Trim {
        vol: usize,
        sector: usize,
        count: usize,
    },
    Zero {
        vol: usize,
        sector: usize,
        count: usize,
        no_hole: bool,
    },
    Flush,
    Snapshot {
        src: usize,
        dst: usize,
        writable: bool,
    },
    Delete(usize),
    Crash {
        seed: u64,
        power_loss: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let vol = 0..NAMES.len();
    let range = (0..VOLUME_SECTORS, 1..3 * SECTORS_PER_CHUNK);
    prop_oneof![
        1 => vol.clone().prop_map(Op::Create),
        8 => (vol.clone(), range.clone(), any::<bool>()).prop_map(|(vol, (sector, count), fua)| {
            Op::Write { vol, sector, count, fua: fua && sector % 3 == 0 }
        }),
        2 => (vol.clone(), range.clone())
            .prop_map(|(vol, (sector, count))| Op::Trim { vol, sector, count }),
        2 => (vol.clone(), range, any::<bool>())
            .prop_map(|(vol, (sector, count), no_hole)| Op::Zero { vol, sector, count, no_hole }),
        2 => Just(Op::Flush),
        1 => (vol.clone(), vol.clone(), any::<bool>())
            .prop_map(|(src, dst, writable)| Op::Snapshot { src, dst, writable }),
        1 => vol.prop_map(Op::Delete),
        2 => (any::<u64>(), any::<bool>())
            .prop_map(|(seed, power_loss)| Op::Crash { seed, power_loss }),
    ]
}

/// The value of one sector: 0 is zeros, `k` is the pattern of write `k`.
fn pattern(k: u32) -> [u8; SECTOR] {
    let mut out = [0u8; SECTOR];
    if k != 0 {
        for c in out.chunks_mut(4) {
            c.copy_from_slice(&k.to_le_bytes());
        }
    }
    out
}

fn decode(sector: &[u8]) -> Option<u32> {
    let k = u32::from_le_bytes(sector[..4].try_into().ok()?);
    (sector == pattern(k)).then_some(k)
}

#[derive(Debug, Clone)]
struct SectorModel {
    current: u32,
    durable: u32,
    since: Vec<u32>,
}

#[derive(Debug, Clone)]
struct VolumeModel {
    sectors: Vec<SectorModel>,
    read_only: bool,
}

impl VolumeModel {
    fn new() -> Self {
        VolumeModel {
            sectors: vec![
                SectorModel {
                    current: 0,
                    durable: 0,
                    since: Vec::new(),
                };
                VOLUME_SECTORS
            ],
            read_only: false,
        }
    }

    fn set(&mut self, sector: usize, k: u32, durable: bool) {
        let s = &mut self.sectors[sector];
        s.current = k;
        if durable {
            s.durable = k;
            s.since.clear();
        } else {
            s.since.push(k);
        }
    }
}

struct Harness {
    backend: Arc<MemBackend>,
    pool: Pool,
    model: BTreeMap<usize, VolumeModel>,
    next_write: u32,
    boot: u8,
}

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

impl Harness {
    fn new() -> Self {
        let backend = Arc::new(MemBackend::new(2 << 20));
        let opts = PoolOptions {
            chunk_size: CHUNK as u32,
            metadata_size: Some(64 << 10),
            journal_size: Some(16 << 10),
            ..PoolOptions::default()
        };
        let pool = Pool::create_in_boot(backend.clone(), &opts, [0; 16]).expect("create");
        Harness {
            backend,
            pool,
            model: BTreeMap::new(),
            next_write: 1,
            boot: 0,
        }
    }

    fn flush_model(&mut self) {
        for v in self.model.values_mut() {
            for s in &mut v.sectors {
                s.durable = s.current;
                s.since.clear();
            }
        }
    }

    fn clamp(sector: usize, count: usize) -> (usize, usize) {
        (sector, count.min(VOLUME_SECTORS - sector))
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Create(v) => {
                let r = self
                    .pool
                    .create_volume(NAMES[v], (VOLUME_SECTORS * SECTOR) as u64);
                match r {
                    Ok(_) => {
                        // Creation flushes the whole pool.
                        self.flush_model();
                        self.model.insert(v, VolumeModel::new());
                    }
                    Err(PoolError::VolumeExists { .. }) => {
                        prop_assert!(self.model.contains_key(&v));
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("create: {e}"))),
                }
            }
            Op::Write {
                vol,
                sector,
                count,
                fua,
            } => {
                let Some(m) = self.model.get(&vol) else {
                    return Ok(());
                };
                let (sector, count) = Self::clamp(sector, count);
                let read_only = m.read_only;
                let first = self.next_write;
                self.next_write += count as u32;
                let mut data = Vec::with_capacity(count * SECTOR);
                for i in 0..count {
                    data.extend_from_slice(&pattern(first + i as u32));
                }
                let h = self.pool.open_volume(NAMES[vol]).expect("open");
                let r = h.write((sector * SECTOR) as u64, &data, fua);
                if read_only {
                    let refused = matches!(r, Err(PoolError::ReadOnly { .. }));
                    prop_assert!(refused, "{:?}", r);
                    return Ok(());
                }
                r.map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
                if fua {
                    self.flush_model();
                }
                let m = self.model.get_mut(&vol).expect("checked");
                for i in 0..count {
                    m.set(sector + i, first + i as u32, fua);
                }
            }
            Op::Trim { vol, sector, count }
            | Op::Zero {
                vol, sector, count, ..
            } => {
                let Some(m) = self.model.get(&vol) else {
                    return Ok(());
                };
                let read_only = m.read_only;
                let (sector, count) = Self::clamp(sector, count);
                let h = self.pool.open_volume(NAMES[vol]).expect("open");
                let (off, len) = ((sector * SECTOR) as u64, (count * SECTOR) as u64);
                let (r, affected): (_, Vec<usize>) = match *op {
                    Op::Trim { .. } => {
                        // Only whole chunks are discarded.
                        let whole = (sector..sector + count)
                            .filter(|s| {
                                let c0 = s / SECTORS_PER_CHUNK * SECTORS_PER_CHUNK;
                                c0 >= sector && c0 + SECTORS_PER_CHUNK <= sector + count
                            })
                            .collect();
                        (h.trim(off, len, false), whole)
                    }
                    Op::Zero { no_hole, .. } => (
                        h.write_zeroes(
                            off,
                            len,
                            ZeroFlags {
                                no_hole,
                                ..ZeroFlags::default()
                            },
                        ),
                        (sector..sector + count).collect(),
                    ),
                    _ => unreachable!(),
                };
                if read_only {
                    let refused = matches!(r, Err(PoolError::ReadOnly { .. }));
                    prop_assert!(refused, "{:?}", r);
                    return Ok(());
                }
                r.map_err(|e| TestCaseError::fail(format!("trim/zero: {e}")))?;
                let m = self.model.get_mut(&vol).expect("checked");
                for s in affected {
                    m.set(s, 0, false);
                }
            }
            Op::Flush => {
                self.pool.flush().expect("flush");
                self.flush_model();
            }
            Op::Snapshot { src, dst, writable } => {
                let r = if writable {
                    self.pool.clone_volume(NAMES[src], NAMES[dst])
                } else {
                    self.pool.snapshot(NAMES[src], NAMES[dst])
                };
                match (self.model.contains_key(&src), self.model.contains_key(&dst)) {
                    (true, false) => {
                        r.map_err(|e| TestCaseError::fail(format!("snapshot: {e}")))?;
                        self.flush_model();
                        let mut copy = self.model[&src].clone();
                        copy.read_only = !writable;
                        self.model.insert(dst, copy);
                    }
                    _ => prop_assert!(r.is_err()),
                }
            }
            Op::Delete(v) => {
                let r = self.pool.delete(NAMES[v]);
                if self.model.remove(&v).is_some() {
                    r.map_err(|e| TestCaseError::fail(format!("delete: {e}")))?;
                    self.flush_model();
                } else {
                    let missing = matches!(r, Err(PoolError::NoVolume { .. }));
                    prop_assert!(missing, "{:?}", r);
                }
            }
            Op::Crash { seed, power_loss } => {
                let mut rng = seed | 1;
                let crashed = if power_loss {
                    self.boot += 1;
                    self.backend
                        .crash(|_, _| xorshift(&mut rng).is_multiple_of(2))
                } else {
                    self.backend.process_crash()
                };
                self.backend = Arc::new(crashed);
                self.pool = Pool::open_in_boot(self.backend.clone(), [self.boot; 16])
                    .map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?;
                self.check_after_crash(power_loss)?;
            }
        }
        self.pool
            .verify()
            .map_err(|e| TestCaseError::fail(format!("verify after {op:?}: {e}")))?;
        Ok(())
    }

    fn check_after_crash(&mut self, power_loss: bool) -> Result<(), TestCaseError> {
        let listed: Vec<String> = self.pool.list().into_iter().map(|v| v.name).collect();
        let expected: Vec<String> = self.model.keys().map(|&v| NAMES[v].to_owned()).collect();
        prop_assert_eq!(listed, expected, "volumes after the crash");
        for (&v, m) in &mut self.model {
            let h = self.pool.open_volume(NAMES[v]).expect("open");
            let mut buf = vec![0u8; VOLUME_SECTORS * SECTOR];
            h.read(0, &mut buf).expect("read");
            for (i, s) in m.sectors.iter_mut().enumerate() {
                let got = decode(&buf[i * SECTOR..(i + 1) * SECTOR]);
                let ok = match got {
                    Some(k) if !power_loss => k == s.current,
                    Some(k) => k == s.durable || s.since.contains(&k),
                    None => false,
                };
                prop_assert!(
                    ok,
                    "volume {} sector {}: found {:?}, durable {}, current {}, since {:?} (power loss: {})",
                    NAMES[v],
                    i,
                    got,
                    s.durable,
                    s.current,
                    s.since,
                    power_loss
                );
                let k = got.unwrap_or(0);
                *s = SectorModel {
                    current: k,
                    durable: k,
                    since: Vec::new(),
                };
            }
        }
        Ok(())
    }
}

/// A clone copies a chunk on write (its new mapping not yet durable), the
/// origin then overwrites the chunk it now owns alone, and the power
/// fails: the clone's mapping may be lost, so the origin must not have
/// overwritten the chunk in place before that mapping was committed, or
/// the clone would read the origin's newer data (found with 3 000 random
/// cases).
#[test]
fn clone_then_cow_then_power_loss() {
    let mut h = Harness::new();
    let ops = [
        Op::Create(1),
        Op::Write {
            vol: 1,
            sector: 147,
            count: 22,
            fua: false,
        },
        Op::Snapshot {
            src: 1,
            dst: 2,
            writable: true,
        },
        Op::Write {
            vol: 2,
            sector: 163,
            count: 1,
            fua: false,
        },
        Op::Write {
            vol: 1,
            sector: 141,
            count: 21,
            fua: false,
        },
        Op::Crash {
            seed: 3_829_801_673_009_055_408,
            power_loss: true,
        },
    ];
    for op in &ops {
        if let Err(err) = h.run(op) {
            panic!("{op:?}: {err}");
        }
    }
}

proptest! {
    // A fixed seed: CI runs the same 256 cases every time, so a known bug
    // found by a longer run (above) does not fail it at random. Explore
    // with `PROPTEST_CASES=5000 PROPTEST_RNG_SEED=<n>`.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(
            std::env::var("PROPTEST_RNG_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_127),
        ),
        ..ProptestConfig::default()
    })]

    #[test]
    fn pool_survives_random_crashes(ops in proptest::collection::vec(op(), 1..80)) {
        let mut h = Harness::new();
        for op in &ops {
            h.run(op)?;
        }
        // A final power loss after a flush keeps everything.
        h.pool.flush().expect("flush");
        h.flush_model();
        h.run(&Op::Crash { seed: 7, power_loss: true })?;
    }
}

/// A crash in the middle of a checkpoint (torn slot write) falls back to
/// the previous checkpoint and its journal.
#[test]
fn torn_checkpoint_falls_back_to_the_older_slot() {
    let mut h = Harness::new();
    h.run(&Op::Create(0)).unwrap();
    for round in 0..400usize {
        h.run(&Op::Write {
            vol: 0,
            sector: (round * 13) % VOLUME_SECTORS,
            count: 9,
            fua: false,
        })
        .unwrap();
        if round % 50 == 0 {
            h.run(&Op::Trim {
                vol: 0,
                sector: 0,
                count: VOLUME_SECTORS,
            })
            .unwrap();
        }
        if round % 7 == 0 {
            h.run(&Op::Flush).unwrap();
        }
        if round % 40 == 39 {
            h.run(&Op::Crash {
                seed: round as u64,
                power_loss: true,
            })
            .unwrap();
        }
    }
}
