//! The thin pool: one backing store split into fixed-size data chunks,
//! thin volumes that map virtual chunks to data chunks on first write,
//! snapshots and clones that share the mapping copy-on-write, and a
//! journal plus two checkpoint slots that make every change crash-safe.
//! The on-disk format and the crash argument are in `sds/DESIGN.md`.
//!
//! Invariants:
//! - a data chunk is free, reserved by one in-flight write, pending (freed
//!   by a record not yet covered by a durable commit), or referenced by
//!   the mapping with the right count — never two of these
//!   ([`Pool::verify`]);
//! - a write is acknowledged only after its data and, for a new mapping,
//!   its journal record have been written to the backend (so a process
//!   crash loses nothing acknowledged), and [`Pool::flush`] makes every
//!   acknowledged write survive a power loss;
//! - a chunk freed by a record is handed out again only once that record
//!   is durable, so no crash can leave a chunk mapped twice;
//! - when no chunk is free, writers that need one wait until one is (a
//!   full pool suspends writers, it does not fail them);
//! - the page-cache memory [`Volume::read_resident`] hands out is used
//!   only while the range's stripes are held (no trim can free one of its
//!   chunks meanwhile) and only by the kernel (a send copies it), so no
//!   chunk handed to another volume is ever read through it; a reader
//!   holding several stripes at once takes them only if free right now,
//!   so it never waits while holding one.
//!
//! Locking, outermost first: a volume's I/O lock (shared by I/O, exclusive
//! for snapshot and delete), a stripe lock per virtual chunk (shared by
//! I/O that leaves the mapping alone, exclusive for I/O that changes it),
//! then the metadata mutex, held only for short in-memory work and
//! journal appends.

mod format;
mod mapping;

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::backend::Backend;
use crate::pipe::Pipe;
use format::{LABEL_SIZE, Label, MAX_RECORD, Record, SLOT_HEADER_SIZE, SlotHeader, VolumeMeta};
use mapping::{Lookup, Mapping};

pub use format::FormatError;
pub use mapping::{ApplyError, VerifyError};

/// The default data chunk: 64 KiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 << 10;
/// The default over-provisioning limit: volumes may add up to 4× the
/// pool's data area.
pub const DEFAULT_OVERPROVISION_PERCENT: u32 = 400;
/// The largest volume: 1 PiB.
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;
/// The longest volume name.
pub const MAX_NAME_LEN: usize = 64;

const STRIPES: usize = 256;
/// How often a suspended writer re-checks for space on its own.
const SPACE_POLL: Duration = Duration::from_millis(500);

/// Everything that can go wrong with a pool or a volume.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Backend I/O failed.
    #[error("I/O error {op}")]
    Io {
        /// What the pool was doing.
        op: &'static str,
        /// The backend's error.
        #[source]
        source: io::Error,
    },
    /// The store is not a pool, or its metadata is damaged.
    #[error("the pool's metadata is unreadable")]
    Format(#[from] FormatError),
    /// Neither checkpoint slot holds a valid checkpoint.
    #[error("no valid checkpoint in either metadata slot")]
    NoCheckpoint,
    /// The journal does not apply to its checkpoint.
    #[error("journal record {seq} does not apply")]
    Corrupt {
        /// The record's sequence number.
        seq: u64,
        /// Why.
        #[source]
        source: ApplyError,
    },
    /// The metadata area cannot hold a checkpoint of the current state.
    #[error("metadata area full: a checkpoint needs {needed} bytes, a slot holds {available}")]
    MetadataFull {
        /// Bytes needed.
        needed: u64,
        /// Bytes per slot.
        available: u64,
    },
    /// A creation option is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidOption {
        /// The option.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The backing store is too small for the metadata and one chunk.
    #[error("backing store of {size} bytes is too small: at least {needed} bytes needed")]
    TooSmall {
        /// Its size.
        size: u64,
        /// The minimum.
        needed: u64,
    },
    /// A volume name is not allowed.
    #[error(
        "invalid volume name {name:?}: 1 to 64 of [A-Za-z0-9._-], starting with a letter or digit"
    )]
    InvalidName {
        /// The name.
        name: String,
    },
    /// A volume size is not allowed.
    #[error("invalid volume size {size}: a positive multiple of 512 up to 1 PiB")]
    InvalidSize {
        /// The size.
        size: u64,
    },
    /// The name is taken.
    #[error("volume {name} already exists")]
    VolumeExists {
        /// The name.
        name: String,
    },
    /// No volume has that name or uid.
    #[error("no volume named {name}")]
    NoVolume {
        /// The name or uid asked for.
        name: String,
    },
    /// The volume was deleted while in use.
    #[error("volume {name} was deleted")]
    VolumeGone {
        /// The name.
        name: String,
    },
    /// Writes to a snapshot.
    #[error("volume {name} is read-only")]
    ReadOnly {
        /// The name.
        name: String,
    },
    /// A request outside the volume.
    #[error("range {offset}+{len} is outside volume {name} of {size} bytes")]
    OutOfRange {
        /// The volume.
        name: String,
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// The volume's size.
        size: u64,
    },
    /// Volumes only grow.
    #[error("volume {name} cannot shrink from {size} to {requested} bytes")]
    Shrink {
        /// The volume.
        name: String,
        /// Its size.
        size: u64,
        /// The size asked for.
        requested: u64,
    },
    /// The sum of volume sizes would pass the over-provisioning limit.
    #[error(
        "over-provisioning limit: volumes would total {requested} bytes, the pool allows {limit}"
    )]
    OverProvisioned {
        /// The new total.
        requested: u64,
        /// The limit.
        limit: u64,
    },
    /// A fast zero was asked for and cannot be done without writing.
    #[error("zeroing this range needs writes, not just unmapping")]
    NotFast,
    /// An invariant does not hold.
    #[error("pool verification failed")]
    Verify(#[from] VerifyError),
}

impl PoolError {
    fn io(op: &'static str) -> impl FnOnce(io::Error) -> PoolError {
        move |source| PoolError::Io { op, source }
    }
}

/// How to create a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Bytes per data chunk: a power of two from 4 KiB to 4 MiB.
    pub chunk_size: u32,
    /// Sum of volume sizes allowed, in percent of the data area (≥ 100).
    pub overprovision_percent: u32,
    /// Bytes per checkpoint slot; by default 24 bytes per data chunk plus
    /// 64 KiB.
    pub metadata_size: Option<u64>,
    /// Bytes of journal; by default 1/256 of the store, 256 KiB to 64 MiB.
    pub journal_size: Option<u64>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            overprovision_percent: DEFAULT_OVERPROVISION_PERCENT,
            metadata_size: None,
            journal_size: None,
        }
    }
}

/// A volume as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Unique name.
    pub name: String,
    /// Unique id (also accepted as an export name).
    pub uid: Uuid,
    /// Size in bytes.
    pub size: u64,
    /// A snapshot.
    pub read_only: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Bytes mapped (some may be shared with snapshots or clones).
    pub mapped_bytes: u64,
}

/// The pool's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The pool's id.
    pub uid: Uuid,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// Data chunks.
    pub data_chunks: u64,
    /// Chunks not referenced by any volume (free, or freed and awaiting a
    /// commit).
    pub free_chunks: u64,
    /// Sum of volume sizes.
    pub virtual_bytes: u64,
    /// The over-provisioning limit on that sum.
    pub virtual_limit: u64,
    /// Volumes, snapshots included.
    pub volumes: usize,
    /// Writers waiting for free space.
    pub suspended_writers: usize,
    /// The current checkpoint generation.
    pub generation: u64,
}

/// A run of a volume that is mapped or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes.
    pub len: u64,
    /// Mapped to data (false: a hole that reads as zeros).
    pub allocated: bool,
}

/// How [`Volume::write_zeroes`] may zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Keep the range allocated (write zeros instead of unmapping).
    pub no_hole: bool,
    /// Fail with [`PoolError::NotFast`] rather than write.
    pub fast: bool,
    /// Make the result durable before returning.
    pub fua: bool,
}

/// The kernel's boot id: the same as when the journal was written means
/// the page cache still holds every write made then.
pub fn current_boot_id() -> [u8; 16] {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| Uuid::parse_str(s.trim()).ok())
        .map_or_else(|| *Uuid::new_v4().as_bytes(), |u| *u.as_bytes())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

fn validate_name(name: &str) -> Result<(), PoolError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(PoolError::InvalidName {
            name: name.to_owned(),
        })
    }
}

fn validate_size(size: u64) -> Result<(), PoolError> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_VOLUME_SIZE {
        return Err(PoolError::InvalidSize { size });
    }
    Ok(())
}

/// A volume's I/O gate: shared by reads and writes, exclusive while a
/// snapshot or delete changes what the volume's chunks are.
#[derive(Debug, Default)]
struct VolumeIo {
    lock: RwLock<()>,
    gone: AtomicBool,
}

#[derive(Debug)]
struct Meta {
    map: Mapping,
    generation: u64,
    slot: usize,
    /// The next record's sequence number.
    seq: u64,
    /// Journal bytes used.
    tail: u64,
    /// Records below this sequence number are covered by a durable commit.
    committed: u64,
    /// Chunks ready to hand out; the lowest last.
    free: Vec<u64>,
    /// Chunks freed by record `.1`, usable once that record is committed.
    pending: Vec<(u64, u64)>,
    /// Chunks handed to writes that have not journaled their mapping yet.
    reserved: HashSet<u64>,
    /// Chunks left less shared by record `.1` (chunk → newest such
    /// record), not yet covered by a durable commit: until it is, a crash
    /// may share them again, so they are not overwritten in place.
    unshared: HashMap<u64, u64>,
    io: HashMap<u32, Arc<VolumeIo>>,
    boot_id: [u8; 16],
}

#[derive(Debug)]
struct Inner {
    backend: Arc<dyn Backend>,
    label: Label,
    meta: Mutex<Meta>,
    space: Condvar,
    flush_lock: Mutex<()>,
    stripes: Box<[RwLock<()>]>,
    suspended: AtomicUsize,
}

/// A thin pool on a [`Backend`]. Cheap to clone; all clones are one pool.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// Formats `backend` as an empty pool.
    pub fn create(backend: Arc<dyn Backend>, opts: &PoolOptions) -> Result<Pool, PoolError> {
        Pool::create_in_boot(backend, opts, current_boot_id())
    }

    /// [`Pool::create`] as if the kernel's boot id were `boot_id` (tests
    /// simulate reboots with it).
    pub fn create_in_boot(
        backend: Arc<dyn Backend>,
        opts: &PoolOptions,
        boot_id: [u8; 16],
    ) -> Result<Pool, PoolError> {
        let len = backend.len().map_err(PoolError::io("sizing the backend"))?;
        let cs = opts.chunk_size;
        if !cs.is_power_of_two() || !(4096..=(4 << 20)).contains(&cs) {
            return Err(PoolError::InvalidOption {
                field: "chunk size",
                reason: format!("{cs} is not a power of two from 4 KiB to 4 MiB"),
            });
        }
        if opts.overprovision_percent < 100 {
            return Err(PoolError::InvalidOption {
                field: "over-provisioning",
                reason: format!("{}% is below 100%", opts.overprovision_percent),
            });
        }
        let cs64 = u64::from(cs);
        let est_chunks = len / cs64;
        let slot_size = round_up(
            opts.metadata_size
                .unwrap_or(64 * 1024 + est_chunks.saturating_mul(24)),
            4096,
        );
        let journal_size = round_up(
            opts.journal_size
                .unwrap_or((len / 256).clamp(256 << 10, 64 << 20)),
            4096,
        );
        if journal_size < 4 * MAX_RECORD as u64 || slot_size < 4096 {
            return Err(PoolError::InvalidOption {
                field: "metadata or journal size",
                reason: "too small".into(),
            });
        }
        let data_start = round_up(LABEL_SIZE + 2 * slot_size + journal_size, cs64);
        if len < data_start + cs64 {
            return Err(PoolError::TooSmall {
                size: len,
                needed: data_start + cs64,
            });
        }
        let label = Label {
            chunk_size: cs,
            slot_size,
            journal_size,
            data_start,
            overprovision_percent: opts.overprovision_percent,
            uid: *Uuid::new_v4().as_bytes(),
        };
        let mut bytes = label.encode();
        bytes.resize(LABEL_SIZE as usize, 0);
        backend
            .write_at(&bytes, 0)
            .map_err(PoolError::io("writing the label"))?;
        backend
            .write_at(&[0; SLOT_HEADER_SIZE], label.slot_offset(1))
            .map_err(PoolError::io("clearing a checkpoint slot"))?;
        let data_chunks = label.data_chunks(len);
        let map = Mapping::new(data_chunks, cs64);
        let pool = Pool::assemble(backend, label, map, 0, 1, boot_id);
        {
            let mut m = lock(&pool.inner.meta);
            pool.inner.checkpoint(&mut m)?;
        }
        tracing::info!(chunk_size = cs, data_chunks, "pool created");
        Ok(pool)
    }

    /// Whether `backend` holds a pool label (reads only; changes nothing).
    pub fn probe(backend: &dyn Backend) -> bool {
        let mut buf = vec![0u8; LABEL_SIZE as usize];
        backend.len().is_ok_and(|l| l >= LABEL_SIZE)
            && backend.read_at(&mut buf, 0).is_ok()
            && Label::decode(&buf).is_ok()
    }

    /// Opens a pool, replaying its journal: after a process crash (same
    /// kernel boot) every record written is replayed; after a reboot only
    /// the records a durable commit covers.
    pub fn open(backend: Arc<dyn Backend>) -> Result<Pool, PoolError> {
        Pool::open_in_boot(backend, current_boot_id())
    }

    /// [`Pool::open`] as if the kernel's boot id were `boot_id`.
    pub fn open_in_boot(backend: Arc<dyn Backend>, boot_id: [u8; 16]) -> Result<Pool, PoolError> {
        let len = backend.len().map_err(PoolError::io("sizing the backend"))?;
        let mut buf = vec![0u8; LABEL_SIZE as usize];
        if len < LABEL_SIZE {
            return Err(FormatError::Truncated { what: "pool label" }.into());
        }
        backend
            .read_at(&mut buf, 0)
            .map_err(PoolError::io("reading the label"))?;
        let label = Label::decode(&buf)?;
        let data_chunks = label.data_chunks(len);
        if data_chunks == 0 {
            return Err(PoolError::TooSmall {
                size: len,
                needed: label.data_start + u64::from(label.chunk_size),
            });
        }
        let cs = u64::from(label.chunk_size);

        // The newest slot whose header and body both check out.
        let mut headers = Vec::new();
        for slot in 0..2 {
            let mut h = [0u8; SLOT_HEADER_SIZE];
            backend
                .read_at(&mut h, label.slot_offset(slot))
                .map_err(PoolError::io("reading a checkpoint header"))?;
            if let Some(h) = SlotHeader::decode(&h, &label.uid) {
                headers.push((slot, h));
            }
        }
        headers.sort_by_key(|(_, h)| std::cmp::Reverse(h.generation));
        let mut found = None;
        let mut last_err = PoolError::NoCheckpoint;
        for (slot, h) in headers {
            if h.body_len > label.slot_size - SLOT_HEADER_SIZE as u64 {
                continue;
            }
            let mut body = vec![0u8; h.body_len as usize];
            backend
                .read_at(&mut body, label.slot_offset(slot) + SLOT_HEADER_SIZE as u64)
                .map_err(PoolError::io("reading a checkpoint"))?;
            if format::salted_crc(&label.uid, &body) != h.body_crc {
                continue;
            }
            match Mapping::decode(&body, data_chunks, cs) {
                Ok(map) => {
                    found = Some((slot, h, map));
                    break;
                }
                Err(e) => last_err = e.into(),
            }
        }
        let Some((slot, header, mut map)) = found else {
            return Err(last_err);
        };

        // Replay the journal written after that checkpoint.
        let mut journal = vec![0u8; label.journal_size as usize];
        backend
            .read_at(&mut journal, label.journal_offset())
            .map_err(PoolError::io("reading the journal"))?;
        let mut records = Vec::new();
        let mut off = 0;
        while let Some((rec, n)) = Record::decode(
            &journal[off..],
            header.generation,
            records.len() as u64,
            &label.uid,
        ) {
            records.push(rec);
            off += n;
        }
        let same_boot = header.boot_id == boot_id;
        let trusted = if same_boot {
            records.len()
        } else {
            let upto = records
                .iter()
                .filter_map(|r| match r {
                    Record::Commit { upto } => Some(*upto),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            (upto as usize).min(records.len())
        };
        for (seq, rec) in records[..trusted].iter().enumerate() {
            map.apply(rec).map_err(|source| PoolError::Corrupt {
                seq: seq as u64,
                source,
            })?;
        }
        tracing::info!(
            generation = header.generation,
            records = records.len(),
            replayed = trusted,
            same_boot,
            "pool opened"
        );
        let pool = Pool::assemble(backend, label, map, header.generation, slot, boot_id);
        {
            // Start a fresh journal from a checkpoint of what was
            // recovered, written in this boot.
            let mut m = lock(&pool.inner.meta);
            pool.inner.checkpoint(&mut m)?;
        }
        Ok(pool)
    }

    fn assemble(
        backend: Arc<dyn Backend>,
        label: Label,
        map: Mapping,
        generation: u64,
        slot: usize,
        boot_id: [u8; 16],
    ) -> Pool {
        let mut free = map.unreferenced_chunks();
        free.reverse();
        let io = map
            .volumes()
            .map(|v| (v.id, Arc::new(VolumeIo::default())))
            .collect();
        let meta = Meta {
            map,
            generation,
            slot,
            seq: 0,
            tail: 0,
            committed: 0,
            free,
            pending: Vec::new(),
            reserved: HashSet::new(),
            unshared: HashMap::new(),
            io,
            boot_id,
        };
        Pool {
            inner: Arc::new(Inner {
                backend,
                label,
                meta: Mutex::new(meta),
                space: Condvar::new(),
                flush_lock: Mutex::new(()),
                stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
                suspended: AtomicUsize::new(0),
            }),
        }
    }

    /// Bytes per data chunk.
    pub fn chunk_size(&self) -> u32 {
        self.inner.label.chunk_size
    }

    /// The kernel boot id the pool was opened in: the same one later means
    /// the page cache still holds every write made since.
    pub fn boot_id(&self) -> [u8; 16] {
        lock(&self.inner.meta).boot_id
    }

    /// Makes every completed write and metadata change durable.
    pub fn flush(&self) -> Result<(), PoolError> {
        self.inner.flush()
    }

    /// Checks the invariants: no chunk leaked, none doubly owned, every
    /// reference count right.
    pub fn verify(&self) -> Result<(), PoolError> {
        let m = lock(&self.inner.meta);
        let mut held: Vec<u64> = m.pending.iter().map(|&(c, _)| c).collect();
        held.extend(m.reserved.iter().copied());
        m.map.verify(&m.free, &held)?;
        Ok(())
    }

    /// The pool's state.
    pub fn status(&self) -> PoolStatus {
        let m = lock(&self.inner.meta);
        let data_chunks = m.map.data_chunks();
        PoolStatus {
            uid: Uuid::from_bytes(self.inner.label.uid),
            chunk_size: self.inner.label.chunk_size,
            data_chunks,
            free_chunks: (m.free.len() + m.pending.len()) as u64,
            virtual_bytes: m.map.virtual_bytes(),
            virtual_limit: self.inner.virtual_limit(&m),
            volumes: m.map.volumes().count(),
            suspended_writers: self.inner.suspended.load(Ordering::Relaxed),
            generation: m.generation,
        }
    }

    fn info(&self, m: &Meta, v: &VolumeMeta) -> VolumeInfo {
        VolumeInfo {
            name: v.name.clone(),
            uid: Uuid::from_bytes(v.uid),
            size: v.size,
            read_only: v.read_only,
            created: v.created,
            mapped_bytes: m.map.mapped_chunks(v.id) * u64::from(self.inner.label.chunk_size),
        }
    }

    /// Every volume, by name.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let m = lock(&self.inner.meta);
        let mut out: Vec<_> = m.map.volumes().map(|v| self.info(&m, v)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One volume, by name or uid.
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo, PoolError> {
        let m = lock(&self.inner.meta);
        let v = find(&m, name)?;
        Ok(self.info(&m, v))
    }

    /// A handle for I/O on a volume, by name or uid.
    pub fn open_volume(&self, name: &str) -> Result<Volume, PoolError> {
        let m = lock(&self.inner.meta);
        let v = find(&m, name)?;
        let io = m.io.get(&v.id).cloned().unwrap_or_default();
        Ok(Volume {
            pool: self.clone(),
            id: v.id,
            name: v.name.clone(),
            uid: Uuid::from_bytes(v.uid),
            io,
        })
    }

    /// Creates an empty thin volume.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, PoolError> {
        validate_name(name)?;
        validate_size(size)?;
        let info = {
            let mut m = lock(&self.inner.meta);
            if find(&m, name).is_ok() {
                return Err(PoolError::VolumeExists {
                    name: name.to_owned(),
                });
            }
            self.inner.check_overprovision(&m, size)?;
            let meta = VolumeMeta {
                id: m.map.next_volume_id(),
                uid: *Uuid::new_v4().as_bytes(),
                name: name.to_owned(),
                size,
                read_only: false,
                created: now(),
            };
            self.inner
                .append(&mut m, &Record::CreateVolume(meta.clone()))?;
            m.io.insert(meta.id, Arc::default());
            self.info(&m, &meta)
        };
        self.flush()?;
        tracing::info!(volume = name, size, "volume created");
        Ok(info)
    }

    /// A read-only snapshot of `source`, sharing its chunks.
    pub fn snapshot(&self, source: &str, name: &str) -> Result<VolumeInfo, PoolError> {
        self.copy(source, name, true)
    }

    /// A writable clone of `source`, sharing its chunks.
    pub fn clone_volume(&self, source: &str, name: &str) -> Result<VolumeInfo, PoolError> {
        self.copy(source, name, false)
    }

    fn copy(&self, source: &str, name: &str, read_only: bool) -> Result<VolumeInfo, PoolError> {
        validate_name(name)?;
        let src = self.open_volume(source)?;
        // No write of the source may be in flight while its chunks become
        // shared.
        let _quiet = src.io.lock.write().unwrap_or_else(PoisonError::into_inner);
        let info = {
            let mut m = lock(&self.inner.meta);
            if find(&m, name).is_ok() {
                return Err(PoolError::VolumeExists {
                    name: name.to_owned(),
                });
            }
            let src_meta = m.map.volume(src.id).cloned().ok_or(PoolError::VolumeGone {
                name: src.name.clone(),
            })?;
            self.inner.check_overprovision(&m, src_meta.size)?;
            let meta = VolumeMeta {
                id: m.map.next_volume_id(),
                uid: *Uuid::new_v4().as_bytes(),
                name: name.to_owned(),
                size: src_meta.size,
                read_only,
                created: now(),
            };
            self.inner.append(
                &mut m,
                &Record::Snapshot {
                    source: src.id,
                    volume: meta.clone(),
                },
            )?;
            m.io.insert(meta.id, Arc::default());
            self.info(&m, &meta)
        };
        self.flush()?;
        tracing::info!(source, volume = name, read_only, "volume copied");
        Ok(info)
    }

    /// Grows a volume (online: open handles see the new size).
    pub fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo, PoolError> {
        validate_size(size)?;
        let info = {
            let mut m = lock(&self.inner.meta);
            let v = find(&m, name)?.clone();
            if size < v.size {
                return Err(PoolError::Shrink {
                    name: v.name,
                    size: v.size,
                    requested: size,
                });
            }
            self.inner.check_overprovision(&m, size - v.size)?;
            self.inner
                .append(&mut m, &Record::Resize { volume: v.id, size })?;
            let v = m.map.volume(v.id).cloned().ok_or(PoolError::VolumeGone {
                name: name.to_owned(),
            })?;
            self.info(&m, &v)
        };
        self.flush()?;
        tracing::info!(volume = name, size, "volume resized");
        Ok(info)
    }

    /// Deletes a volume; its chunks return to the pool unless a snapshot
    /// or clone still shares them. Open handles fail from then on.
    pub fn delete(&self, name: &str) -> Result<(), PoolError> {
        let vol = self.open_volume(name)?;
        {
            let _quiet = vol.io.lock.write().unwrap_or_else(PoisonError::into_inner);
            vol.io.gone.store(true, Ordering::SeqCst);
            let mut m = lock(&self.inner.meta);
            if m.map.volume(vol.id).is_none() {
                return Err(PoolError::NoVolume {
                    name: name.to_owned(),
                });
            }
            if let Err(e) = self
                .inner
                .append(&mut m, &Record::Delete { volume: vol.id })
            {
                vol.io.gone.store(false, Ordering::SeqCst);
                return Err(e);
            }
            m.io.remove(&vol.id);
        }
        // Wake suspended writers of this volume so they fail, then commit
        // so the chunks can be reused.
        self.inner.space.notify_all();
        self.flush()?;
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }
}

fn find<'m>(m: &'m Meta, name: &str) -> Result<&'m VolumeMeta, PoolError> {
    let uid = Uuid::parse_str(name).ok();
    m.map
        .volumes()
        .find(|v| v.name == name || uid.is_some_and(|u| u.as_bytes() == &v.uid))
        .ok_or_else(|| PoolError::NoVolume {
            name: name.to_owned(),
        })
}

impl Inner {
    fn virtual_limit(&self, m: &Meta) -> u64 {
        let data = m.map.data_chunks() * u64::from(self.label.chunk_size);
        data.saturating_mul(u64::from(self.label.overprovision_percent)) / 100
    }

    fn check_overprovision(&self, m: &Meta, more: u64) -> Result<(), PoolError> {
        let requested = m.map.virtual_bytes().saturating_add(more);
        let limit = self.virtual_limit(m);
        if requested > limit {
            return Err(PoolError::OverProvisioned { requested, limit });
        }
        Ok(())
    }

    fn stripe(&self, id: u32, vchunk: u64) -> &RwLock<()> {
        let h = (u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ vchunk) as usize;
        &self.stripes[h % STRIPES]
    }

    /// Appends `rec` to the journal (checkpointing first if it is full),
    /// then applies it.
    fn append(&self, m: &mut Meta, rec: &Record) -> Result<(), PoolError> {
        m.map
            .check(rec)
            .map_err(|source| PoolError::Corrupt { seq: m.seq, source })?;
        let mut bytes = rec.encode(m.generation, m.seq, &self.label.uid);
        if m.tail + bytes.len() as u64 > self.label.journal_size {
            self.checkpoint(m)?;
            bytes = rec.encode(m.generation, m.seq, &self.label.uid);
        }
        self.backend
            .write_at(&bytes, self.label.journal_offset() + m.tail)
            .map_err(PoolError::io("appending to the journal"))?;
        m.tail += bytes.len() as u64;
        let seq = m.seq;
        m.seq += 1;
        let applied = m
            .map
            .apply_tracked(rec)
            .map_err(|source| PoolError::Corrupt { seq, source })?;
        m.pending
            .extend(applied.freed.into_iter().map(|c| (c, seq)));
        m.unshared
            .extend(applied.unshared.into_iter().map(|c| (c, seq)));
        Ok(())
    }

    /// Writes the whole state to the older slot, syncs, and starts a new
    /// journal generation. A commit: pending chunks become free.
    fn checkpoint(&self, m: &mut Meta) -> Result<(), PoolError> {
        let body = m.map.encode();
        let needed = (SLOT_HEADER_SIZE + body.len()) as u64;
        if needed > self.label.slot_size {
            return Err(PoolError::MetadataFull {
                needed,
                available: self.label.slot_size,
            });
        }
        let next = 1 - m.slot;
        let header = SlotHeader {
            generation: m.generation + 1,
            body_len: body.len() as u64,
            body_crc: format::salted_crc(&self.label.uid, &body),
            boot_id: m.boot_id,
        };
        let mut buf = header.encode(&self.label.uid).to_vec();
        buf.extend_from_slice(&body);
        self.backend
            .write_at(&buf, self.label.slot_offset(next))
            .map_err(PoolError::io("writing a checkpoint"))?;
        self.backend
            .sync()
            .map_err(PoolError::io("syncing a checkpoint"))?;
        m.slot = next;
        m.generation += 1;
        m.seq = 0;
        m.tail = 0;
        m.committed = 0;
        m.unshared.clear();
        let freed: Vec<u64> = m.pending.drain(..).map(|(c, _)| c).collect();
        m.free.extend(freed);
        self.space.notify_all();
        Ok(())
    }

    fn flush(&self) -> Result<(), PoolError> {
        let _one = lock(&self.flush_lock);
        let (generation, upto, need_commit) = {
            let m = lock(&self.meta);
            (m.generation, m.seq, m.seq > m.committed)
        };
        self.backend.sync().map_err(PoolError::io("flushing"))?;
        if !need_commit {
            return Ok(());
        }
        {
            let mut m = lock(&self.meta);
            if m.generation != generation {
                // A checkpoint committed everything meanwhile.
                return Ok(());
            }
            self.append(&mut m, &Record::Commit { upto })?;
        }
        self.backend
            .sync()
            .map_err(PoolError::io("syncing a commit"))?;
        let mut m = lock(&self.meta);
        if m.generation == generation {
            m.committed = m.committed.max(upto);
            let (done, still): (Vec<_>, Vec<_>) = m.pending.iter().partition(|&&(_, s)| s < upto);
            m.pending = still;
            m.free.extend(done.into_iter().map(|(c, _)| c));
            m.unshared.retain(|_, s| *s >= upto);
            self.space.notify_all();
        }
        Ok(())
    }

    /// Takes a free chunk, waiting for one while the pool is full.
    fn allocate(&self, io: &VolumeIo, name: &str) -> Result<u64, PoolError> {
        let mut m = lock(&self.meta);
        let mut warned = false;
        loop {
            if let Some(c) = m.free.pop() {
                m.reserved.insert(c);
                return Ok(c);
            }
            if io.gone.load(Ordering::SeqCst) {
                return Err(PoolError::VolumeGone {
                    name: name.to_owned(),
                });
            }
            if !m.pending.is_empty() {
                drop(m);
                self.flush()?;
                m = lock(&self.meta);
                continue;
            }
            if !warned {
                tracing::warn!(
                    volume = name,
                    "pool full: writer suspended until space is freed"
                );
                warned = true;
            }
            self.suspended.fetch_add(1, Ordering::Relaxed);
            m = self
                .space
                .wait_timeout(m, SPACE_POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            self.suspended.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn release(&self, chunk: u64) {
        let mut m = lock(&self.meta);
        if m.reserved.remove(&chunk) {
            m.free.push(chunk);
        }
        self.space.notify_all();
    }
}

/// One chunk-sized piece of a request.
#[derive(Debug, Clone, Copy)]
struct Segment {
    vchunk: u64,
    /// Offset inside the chunk.
    at: usize,
    len: usize,
    /// Offset inside the request's buffer.
    buf: usize,
    /// Covers the whole chunk (or all of the volume's last, short chunk).
    whole: bool,
}

fn segments(offset: u64, len: u64, chunk: u64, size: u64) -> impl Iterator<Item = Segment> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let vchunk = pos / chunk;
        let at = pos % chunk;
        let n = (chunk - at).min(end - pos);
        let seg = Segment {
            vchunk,
            at: at as usize,
            len: n as usize,
            buf: (pos - offset) as usize,
            whole: at == 0 && (n == chunk || pos + n >= size),
        };
        pos += n;
        Some(seg)
    })
}

/// A handle for I/O on one volume. Cheap to clone; every handle fails
/// with [`PoolError::VolumeGone`] once the volume is deleted.
#[derive(Debug, Clone)]
pub struct Volume {
    pool: Pool,
    id: u32,
    name: String,
    uid: Uuid,
    io: Arc<VolumeIo>,
}

impl Volume {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume's uid.
    pub fn uid(&self) -> Uuid {
        self.uid
    }

    /// The pool it lives in.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn gone(&self) -> PoolError {
        PoolError::VolumeGone {
            name: self.name.clone(),
        }
    }

    /// Current size and read-only flag.
    pub fn geometry(&self) -> Result<(u64, bool), PoolError> {
        let m = lock(&self.pool.inner.meta);
        m.map
            .volume(self.id)
            .map(|v| (v.size, v.read_only))
            .ok_or_else(|| self.gone())
    }

    /// Current size in bytes.
    pub fn size(&self) -> Result<u64, PoolError> {
        Ok(self.geometry()?.0)
    }

    /// Checks liveness, range and (for changes) writability; returns the
    /// size.
    fn admit(&self, offset: u64, len: u64, change: bool) -> Result<u64, PoolError> {
        if self.io.gone.load(Ordering::SeqCst) {
            return Err(self.gone());
        }
        let (size, read_only) = self.geometry()?;
        if change && read_only {
            return Err(PoolError::ReadOnly {
                name: self.name.clone(),
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(PoolError::OutOfRange {
                name: self.name.clone(),
                offset,
                len,
                size,
            });
        }
        Ok(size)
    }

    fn lookup(&self, vchunk: u64) -> Lookup {
        lock(&self.pool.inner.meta).map.lookup(self.id, vchunk)
    }

    fn chunk_offset(&self, chunk: u64) -> u64 {
        self.pool.inner.label.chunk_offset(chunk)
    }

    fn cs(&self) -> u64 {
        u64::from(self.pool.inner.label.chunk_size)
    }

    /// Reads `buf.len()` bytes at `offset`; holes read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), PoolError> {
        let _io = self.io.lock.read().unwrap_or_else(PoisonError::into_inner);
        let size = self.admit(offset, buf.len() as u64, false)?;
        let inner = &self.pool.inner;
        if buf.len() as u64 > self.cs() && self.read_runs(offset, buf, size)? {
            return Ok(());
        }
        for seg in segments(offset, buf.len() as u64, self.cs(), size) {
            let _s = inner
                .stripe(self.id, seg.vchunk)
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let out = &mut buf[seg.buf..seg.buf + seg.len];
            match self.lookup(seg.vchunk) {
                Lookup::Hole => out.fill(0),
                Lookup::Mapped { chunk, .. } => inner
                    .backend
                    .read_at(out, self.chunk_offset(chunk) + seg.at as u64)
                    .map_err(PoolError::io("reading data"))?,
            }
        }
        Ok(())
    }

    /// The read guards of every stripe `segs` fall in, each taken once and
    /// only if free right now (`None` when one is not): a reader holding
    /// several stripes never waits for another, so it can never close a
    /// cycle with writers that wait for space.
    fn try_stripes(&self, segs: &[Segment]) -> Option<Vec<std::sync::RwLockReadGuard<'_, ()>>> {
        let inner = &self.pool.inner;
        let mut held: Vec<*const RwLock<()>> = Vec::with_capacity(segs.len());
        let mut guards = Vec::with_capacity(segs.len());
        for seg in segs {
            let stripe = inner.stripe(self.id, seg.vchunk);
            if held.contains(&std::ptr::from_ref(stripe)) {
                continue;
            }
            held.push(stripe);
            guards.push(stripe.try_read().ok()?);
        }
        Some(guards)
    }

    /// Where `segs` lie in the backend, chunks that lie next to each other
    /// there merged into one run: `(backend offset, buffer offset, len)`,
    /// `None` for a hole. Looked up under one metadata lock; the caller
    /// holds the segments' stripes.
    fn runs(&self, segs: &[Segment]) -> Vec<(Option<u64>, usize, usize)> {
        let m = lock(&self.pool.inner.meta);
        let mut runs: Vec<(Option<u64>, usize, usize)> = Vec::with_capacity(segs.len());
        for seg in segs {
            let at = match m.map.lookup(self.id, seg.vchunk) {
                Lookup::Hole => None,
                Lookup::Mapped { chunk, .. } => Some(self.chunk_offset(chunk) + seg.at as u64),
            };
            match (runs.last_mut(), at) {
                (Some((Some(r_at), r_buf, r_len)), Some(at))
                    if *r_at + *r_len as u64 == at && *r_buf + *r_len == seg.buf =>
                {
                    *r_len += seg.len;
                }
                _ => runs.push((at, seg.buf, seg.len)),
            }
        }
        runs
    }

    /// [`Volume::read`] of several chunks with one backend read per run of
    /// chunks that lie next to each other in the backend; `Ok(false)`
    /// (nothing read) when a stripe is busy.
    fn read_runs(&self, offset: u64, buf: &mut [u8], size: u64) -> Result<bool, PoolError> {
        let segs: Vec<Segment> = segments(offset, buf.len() as u64, self.cs(), size).collect();
        let Some(_guards) = self.try_stripes(&segs) else {
            return Ok(false);
        };
        for (at, from, len) in self.runs(&segs) {
            let out = &mut buf[from..from + len];
            match at {
                None => out.fill(0),
                Some(at) => self
                    .pool
                    .inner
                    .backend
                    .read_at(out, at)
                    .map_err(PoolError::io("reading data"))?,
            }
        }
        Ok(true)
    }

    /// Hands `f` the `len` bytes at `offset` where they lie in memory (the
    /// backend's mapping of the page cache, [`Backend::resident`]), as
    /// I/O vectors, with every stripe of the range held, so no trim can
    /// free and hand out one of its chunks while `f` runs: `f` must copy
    /// the bytes out (a send does) before it returns, and only the kernel
    /// may read them. `Ok(None)`, `f` not called, when that cannot be
    /// done without waiting: a lock is busy, part of the range is a hole,
    /// or a byte is not resident.
    pub fn read_resident<R>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[libc::iovec]) -> R,
    ) -> Result<Option<R>, PoolError> {
        let Ok(_io) = self.io.lock.try_read() else {
            return Ok(None);
        };
        let size = self.admit(offset, len, false)?;
        let segs: Vec<Segment> = segments(offset, len, self.cs(), size).collect();
        let Some(_guards) = self.try_stripes(&segs) else {
            return Ok(None);
        };
        let mut iov = Vec::new();
        for (at, _, len) in self.runs(&segs) {
            let Some(at) = at else {
                return Ok(None);
            };
            let Some(ptr) = self.pool.inner.backend.resident(at, len) else {
                return Ok(None);
            };
            iov.push(libc::iovec {
                iov_base: ptr.as_ptr().cast(),
                iov_len: len,
            });
        }
        if iov.is_empty() {
            return Ok(None);
        }
        Ok(Some(f(&iov)))
    }

    /// Like [`Volume::read`], but only if nothing has to wait: no lock is
    /// contended and the backend holds every byte in memory
    /// ([`Backend::read_at_cached`]). `Ok(false)` when something would
    /// wait (`buf` then holds nothing useful). Lets the NBD server answer
    /// cached reads on its async task and hand only the rest to threads.
    pub fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, PoolError> {
        let Ok(_io) = self.io.lock.try_read() else {
            return Ok(false);
        };
        let inner = &self.pool.inner;
        let Ok(m) = inner.meta.try_lock() else {
            return Ok(false);
        };
        drop(m);
        let size = self.admit(offset, buf.len() as u64, false)?;
        // Chunks that lie next to each other in the backend are read with
        // one call; every stripe lock is held until the reads are done.
        let mut guards = Vec::new();
        let mut run: Option<(u64, usize, usize)> = None;
        let read_run = |buf: &mut [u8], (at, from, len): (u64, usize, usize)| {
            inner
                .backend
                .read_at_cached(&mut buf[from..from + len], at)
                .map_err(PoolError::io("reading data"))
        };
        for seg in segments(offset, buf.len() as u64, self.cs(), size) {
            let Ok(s) = inner.stripe(self.id, seg.vchunk).try_read() else {
                return Ok(false);
            };
            guards.push(s);
            let Ok(m) = inner.meta.try_lock() else {
                return Ok(false);
            };
            let found = m.map.lookup(self.id, seg.vchunk);
            drop(m);
            match found {
                Lookup::Hole => buf[seg.buf..seg.buf + seg.len].fill(0),
                Lookup::Mapped { chunk, .. } => {
                    let at = self.chunk_offset(chunk) + seg.at as u64;
                    match &mut run {
                        Some((r_at, r_from, r_len))
                            if *r_at + *r_len as u64 == at && *r_from + *r_len == seg.buf =>
                        {
                            *r_len += seg.len;
                        }
                        _ => {
                            if let Some(r) = run.replace((at, seg.buf, seg.len))
                                && !read_run(buf, r)?
                            {
                                return Ok(false);
                            }
                        }
                    }
                }
            }
        }
        if let Some(r) = run
            && !read_run(buf, r)?
        {
            return Ok(false);
        }
        drop(guards);
        Ok(true)
    }

    /// Writes `data` at `offset`; with `fua`, durable before returning.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), PoolError> {
        {
            let _io = self.io.lock.read().unwrap_or_else(PoisonError::into_inner);
            let size = self.admit(offset, data.len() as u64, true)?;
            let done = data.len() as u64 > self.cs() && self.write_runs(offset, data, size)?;
            if !done {
                for seg in segments(offset, data.len() as u64, self.cs(), size) {
                    self.write_segment(seg, &data[seg.buf..seg.buf + seg.len], false)?;
                }
            }
        }
        if fua {
            self.pool.flush()?;
        }
        Ok(())
    }

    /// [`Volume::write`] over several chunks that are all this volume's
    /// alone, with one backend write per run of chunks that lie next to
    /// each other in the backend. `Ok(false)`, nothing written, when a
    /// stripe is busy or a chunk needs more than an overwrite (the
    /// per-chunk path then does it all).
    fn write_runs(&self, offset: u64, data: &[u8], size: u64) -> Result<bool, PoolError> {
        let segs: Vec<Segment> = segments(offset, data.len() as u64, self.cs(), size).collect();
        let Some(_guards) = self.try_stripes(&segs) else {
            return Ok(false);
        };
        let Some(runs) = self.overwrite_runs(&segs) else {
            return Ok(false);
        };
        for (at, from, len) in runs {
            self.pool
                .inner
                .backend
                .write_at(&data[from..from + len], at)
                .map_err(PoolError::io("writing data"))?;
        }
        Ok(true)
    }

    /// Where `segs` lie in the backend when every one of them is an
    /// overwrite (what [`Volume::write_segment`] writes in place: a chunk
    /// this volume owns alone, that ownership committed), runs of chunks
    /// next to each other in the backend merged: `(backend offset, buffer
    /// offset, len)`; `None` when one needs more. The caller holds the
    /// segments' stripes.
    fn overwrite_runs(&self, segs: &[Segment]) -> Option<Vec<(u64, usize, usize)>> {
        let m = lock(&self.pool.inner.meta);
        let mut runs: Vec<(u64, usize, usize)> = Vec::with_capacity(segs.len());
        for seg in segs {
            let chunk = match m.map.lookup(self.id, seg.vchunk) {
                Lookup::Mapped {
                    chunk,
                    exclusive: true,
                } if !m.unshared.contains_key(&chunk) => chunk,
                _ => return None,
            };
            let at = self.chunk_offset(chunk) + seg.at as u64;
            match runs.last_mut() {
                Some((r_at, r_buf, r_len))
                    if *r_at + *r_len as u64 == at && *r_buf + *r_len == seg.buf =>
                {
                    *r_len += seg.len;
                }
                _ => runs.push((at, seg.buf, seg.len)),
            }
        }
        Some(runs)
    }

    /// [`Volume::write`] of `len` bytes waiting in `pipe`: an overwrite
    /// goes from the pipe into the backend
    /// ([`Backend::write_from_pipe`]: a file takes them without a copy
    /// through memory); anything more takes them out first and writes
    /// them the ordinary way. After an error the pipe may still hold
    /// some of them.
    pub fn write_piped(
        &self,
        offset: u64,
        pipe: &Pipe,
        len: usize,
        fua: bool,
    ) -> Result<(), PoolError> {
        let done = {
            let _io = self.io.lock.read().unwrap_or_else(PoisonError::into_inner);
            let size = self.admit(offset, len as u64, true)?;
            let segs: Vec<Segment> = segments(offset, len as u64, self.cs(), size).collect();
            match self
                .try_stripes(&segs)
                .and_then(|guards| Some((guards, self.overwrite_runs(&segs)?)))
            {
                Some((_guards, runs)) => {
                    for (at, _, n) in runs {
                        self.pool
                            .inner
                            .backend
                            .write_from_pipe(pipe, n, at)
                            .map_err(PoolError::io("writing data"))?;
                    }
                    true
                }
                None => false,
            }
        };
        if !done {
            let mut data = vec![0u8; len];
            pipe.read_exact(&mut data)
                .map_err(PoolError::io("taking a write out of its pipe"))?;
            return self.write(offset, &data, fua);
        }
        if fua {
            self.pool.flush()?;
        }
        Ok(())
    }

    /// Writes one segment: in place when the chunk is this volume's alone,
    /// else into a new chunk (filled from the shared one, or zeros), then
    /// journals the new mapping. All-zero data into a hole is skipped
    /// unless `allocate` is set.
    fn write_segment(&self, seg: Segment, data: &[u8], allocate: bool) -> Result<(), PoolError> {
        let inner = &self.pool.inner;
        let stripe = inner.stripe(self.id, seg.vchunk);
        let skip_zero = |d: &[u8]| !allocate && d.iter().all(|&b| b == 0);
        {
            let _s = stripe.read().unwrap_or_else(PoisonError::into_inner);
            match self.lookup(seg.vchunk) {
                Lookup::Mapped {
                    chunk,
                    exclusive: true,
                } => {
                    return self.write_in_place(chunk, seg, data);
                }
                Lookup::Hole if skip_zero(data) => return Ok(()),
                _ => {}
            }
        }
        let _s = stripe.write().unwrap_or_else(PoisonError::into_inner);
        let old = match self.lookup(seg.vchunk) {
            Lookup::Mapped {
                chunk,
                exclusive: true,
            } => {
                return self.write_in_place(chunk, seg, data);
            }
            Lookup::Hole if skip_zero(data) => return Ok(()),
            Lookup::Hole => None,
            Lookup::Mapped { chunk, .. } => Some(chunk),
        };
        let new = inner.allocate(&self.io, &self.name)?;
        let result = (|| {
            let cs = self.cs() as usize;
            let filled;
            let bytes: &[u8] = if seg.at == 0 && data.len() == cs {
                data
            } else {
                let mut buf = vec![0u8; cs];
                if let Some(old) = old {
                    inner
                        .backend
                        .read_at(&mut buf, self.chunk_offset(old))
                        .map_err(PoolError::io("copying a shared chunk"))?;
                }
                buf[seg.at..seg.at + data.len()].copy_from_slice(data);
                filled = buf;
                &filled
            };
            inner
                .backend
                .write_at(bytes, self.chunk_offset(new))
                .map_err(PoolError::io("writing data"))?;
            let mut m = lock(&inner.meta);
            if self.io.gone.load(Ordering::SeqCst) {
                return Err(self.gone());
            }
            inner.append(
                &mut m,
                &Record::Map {
                    volume: self.id,
                    vchunk: seg.vchunk,
                    chunk: new,
                },
            )?;
            m.reserved.remove(&new);
            Ok(())
        })();
        if result.is_err() {
            inner.release(new);
        }
        result
    }

    /// Overwrites part of a chunk this volume owns alone. When that
    /// ownership rests on a record no commit covers yet (another volume
    /// just stopped sharing the chunk), commits first: a power loss that
    /// dropped the record would otherwise hand the other volume a chunk
    /// holding this volume's newer data.
    fn write_in_place(&self, chunk: u64, seg: Segment, data: &[u8]) -> Result<(), PoolError> {
        let inner = &self.pool.inner;
        let uncommitted = lock(&inner.meta).unshared.contains_key(&chunk);
        if uncommitted {
            inner.flush()?;
        }
        inner
            .backend
            .write_at(data, self.chunk_offset(chunk) + seg.at as u64)
            .map_err(PoolError::io("writing data"))
    }

    fn unmap_segment(&self, seg: Segment) -> Result<(), PoolError> {
        let inner = &self.pool.inner;
        let _s = inner
            .stripe(self.id, seg.vchunk)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut m = lock(&inner.meta);
        if matches!(m.map.lookup(self.id, seg.vchunk), Lookup::Hole) {
            return Ok(());
        }
        inner.append(
            &mut m,
            &Record::Unmap {
                volume: self.id,
                vchunk: seg.vchunk,
            },
        )
    }

    /// Discards whole chunks in the range (they read as zeros after);
    /// partial chunks are left as they are, which TRIM allows.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), PoolError> {
        {
            let _io = self.io.lock.read().unwrap_or_else(PoisonError::into_inner);
            let size = self.admit(offset, len, true)?;
            for seg in segments(offset, len, self.cs(), size).filter(|s| s.whole) {
                self.unmap_segment(seg)?;
            }
        }
        if fua {
            self.pool.flush()?;
        }
        Ok(())
    }

    /// Makes the range read as zeros: whole chunks are unmapped (unless
    /// `no_hole`), partial ones written.
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), PoolError> {
        {
            let _io = self.io.lock.read().unwrap_or_else(PoisonError::into_inner);
            let size = self.admit(offset, len, true)?;
            let cs = self.cs();
            if flags.fast {
                for seg in segments(offset, len, cs, size) {
                    let unmap_only = seg.whole && !flags.no_hole;
                    let already = !flags.no_hole && self.lookup(seg.vchunk) == Lookup::Hole;
                    if !unmap_only && !already {
                        return Err(PoolError::NotFast);
                    }
                }
            }
            let zeros = vec![0u8; cs as usize];
            for seg in segments(offset, len, cs, size) {
                if seg.whole && !flags.no_hole {
                    self.unmap_segment(seg)?;
                } else if flags.no_hole || self.lookup(seg.vchunk) != Lookup::Hole {
                    self.write_segment(seg, &zeros[..seg.len], flags.no_hole)?;
                }
            }
        }
        if flags.fua {
            self.pool.flush()?;
        }
        Ok(())
    }

    /// Which parts of the range are mapped, as merged extents covering it.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, PoolError> {
        let _io = self.io.lock.read().unwrap_or_else(PoisonError::into_inner);
        let size = self.admit(offset, len, false)?;
        let m = lock(&self.pool.inner.meta);
        let mut out: Vec<Extent> = Vec::new();
        for seg in segments(offset, len, self.cs(), size) {
            let allocated = matches!(m.map.lookup(self.id, seg.vchunk), Lookup::Mapped { .. });
            match out.last_mut() {
                Some(e) if e.allocated == allocated => e.len += seg.len as u64,
                _ => out.push(Extent {
                    len: seg.len as u64,
                    allocated,
                }),
            }
        }
        Ok(out)
    }

    /// Makes every completed write durable (the whole pool's).
    pub fn flush(&self) -> Result<(), PoolError> {
        if self.io.gone.load(Ordering::SeqCst) {
            return Err(self.gone());
        }
        self.pool.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;

    const MIB: u64 = 1 << 20;

    fn small_pool(len: usize) -> (Arc<MemBackend>, Pool) {
        let backend = Arc::new(MemBackend::new(len));
        let opts = PoolOptions {
            journal_size: Some(64 << 10),
            ..PoolOptions::default()
        };
        let pool = Pool::create_in_boot(backend.clone(), &opts, [1; 16]).unwrap();
        (backend, pool)
    }

    #[test]
    fn write_read_snapshot_clone_delete() {
        let (_b, pool) = small_pool(8 << 20);
        pool.create_volume("a", 4 * MIB).unwrap();
        let a = pool.open_volume("a").unwrap();
        let mut buf = vec![0u8; 8192];
        a.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        a.write(4096, &[7; 8192], false).unwrap();
        a.read(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        pool.verify().unwrap();

        let snap = pool.snapshot("a", "a-snap").unwrap();
        assert!(snap.read_only);
        let s = pool.open_volume("a-snap").unwrap();
        assert!(matches!(
            s.write(0, &[1], false),
            Err(PoolError::ReadOnly { .. })
        ));
        a.write(4096, &[9; 4096], false).unwrap();
        s.read(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7), "snapshot kept the old data");
        a.read(4096, &mut buf[..4096]).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 9));
        pool.verify().unwrap();

        pool.clone_volume("a-snap", "c").unwrap();
        let c = pool
            .open_volume(&pool.volume_info("c").unwrap().uid.to_string())
            .unwrap();
        c.write(0, &[3; 100], false).unwrap();
        c.read(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        pool.verify().unwrap();

        pool.delete("a").unwrap();
        assert!(matches!(
            a.read(0, &mut buf),
            Err(PoolError::VolumeGone { .. })
        ));
        s.read(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        pool.delete("a-snap").unwrap();
        pool.delete("c").unwrap();
        pool.verify().unwrap();
        assert_eq!(pool.status().free_chunks, pool.status().data_chunks);
    }

    /// A pipe holding `data` (small enough to fit).
    fn piped(data: &[u8]) -> Pipe {
        let pipe = Pipe::new().unwrap();
        pipe.push(data).unwrap();
        pipe
    }

    #[test]
    fn writes_from_a_pipe_allocate_overwrite_and_copy_on_write_like_buffered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let backend =
            crate::backend::FileBackend::create(&dir.path().join("pool"), 16 << 20).unwrap();
        let opts = PoolOptions {
            chunk_size: 64 << 10,
            journal_size: Some(64 << 10),
            ..PoolOptions::default()
        };
        let pool = Pool::create(Arc::new(backend), &opts).unwrap();
        pool.create_volume("a", 4 * MIB).unwrap();
        let a = pool.open_volume("a").unwrap();
        let pattern = |seed: u8, len: usize| -> Vec<u8> {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect()
        };
        let check = |vol: &Volume, offset: u64, want: &[u8]| {
            let mut got = vec![0u8; want.len()];
            vol.read(offset, &mut got).unwrap();
            assert!(got == want, "bytes at {offset} differ");
        };
        // Holes: the pipe is emptied into a buffer and chunks allocated.
        let first = pattern(1, 200_000);
        let pipe = piped(&first);
        a.write_piped(10_000, &pipe, first.len(), false).unwrap();
        assert!(pipe.is_empty().unwrap());
        check(&a, 10_000, &first);
        // Overwrites across chunk boundaries go from the pipe to the file.
        let second = pattern(2, 150_000);
        let pipe = piped(&second);
        a.write_piped(30_000, &pipe, second.len(), true).unwrap();
        assert!(pipe.is_empty().unwrap());
        check(&a, 30_000, &second);
        check(&a, 10_000, &first[..20_000]);
        check(&a, 180_000, &first[170_000..]);
        // Shared chunks are copied on write; the snapshot keeps its bytes.
        pool.snapshot("a", "snap").unwrap();
        let third = pattern(3, 100_000);
        let pipe = piped(&third);
        a.write_piped(50_000, &pipe, third.len(), false).unwrap();
        check(&a, 50_000, &third);
        check(&a, 30_000, &second[..20_000]);
        check(&pool.open_volume("snap").unwrap(), 30_000, &second);
        // Out of range: an error naming the range, the volume unchanged.
        let pipe = piped(&third);
        let err = a
            .write_piped(4 * MIB - 1000, &pipe, third.len(), false)
            .unwrap_err();
        assert!(matches!(err, PoolError::OutOfRange { .. }), "{err}");
        check(&a, 50_000, &third);
        pool.verify().unwrap();
    }

    #[test]
    fn a_write_from_a_pipe_on_a_memory_backend_reads_the_pipe() {
        let (_b, pool) = small_pool(8 << 20);
        pool.create_volume("a", 4 * MIB).unwrap();
        let a = pool.open_volume("a").unwrap();
        a.write(0, &[1; 300_000], false).unwrap();
        let pipe = piped(&[9; 200_000]);
        a.write_piped(4096, &pipe, 200_000, false).unwrap();
        assert!(pipe.is_empty().unwrap());
        let mut buf = vec![0u8; 300_000];
        a.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 1));
        assert!(buf[4096..204_096].iter().all(|&b| b == 9));
        assert!(buf[204_096..].iter().all(|&b| b == 1));
        pool.verify().unwrap();
    }

    #[test]
    fn bad_requests_are_errors() {
        let (_b, pool) = small_pool(8 << 20);
        assert!(matches!(
            pool.create_volume("../x", MIB),
            Err(PoolError::InvalidName { .. })
        ));
        assert!(matches!(
            pool.create_volume("x", 1000),
            Err(PoolError::InvalidSize { .. })
        ));
        pool.create_volume("x", MIB).unwrap();
        assert!(matches!(
            pool.create_volume("x", MIB),
            Err(PoolError::VolumeExists { .. })
        ));
        assert!(matches!(
            pool.create_volume("huge", 1 << 40),
            Err(PoolError::OverProvisioned { .. })
        ));
        let x = pool.open_volume("x").unwrap();
        assert!(matches!(
            x.write(MIB - 1, &[1, 2], false),
            Err(PoolError::OutOfRange { .. })
        ));
        assert!(matches!(
            x.read(u64::MAX, &mut [0; 2]),
            Err(PoolError::OutOfRange { .. })
        ));
        assert!(matches!(
            pool.resize("x", 4096),
            Err(PoolError::Shrink { .. })
        ));
        pool.resize("x", 2 * MIB).unwrap();
        x.write(MIB + 10, &[1, 2], false).unwrap();
        assert!(matches!(
            pool.open_volume("nope"),
            Err(PoolError::NoVolume { .. })
        ));
        pool.verify().unwrap();
    }

    #[test]
    fn zeroing_trim_and_allocation_map() {
        let (_b, pool) = small_pool(8 << 20);
        let cs = u64::from(pool.chunk_size());
        pool.create_volume("z", 8 * cs).unwrap();
        let z = pool.open_volume("z").unwrap();
        z.write(0, &vec![5; (3 * cs) as usize], false).unwrap();
        assert_eq!(
            z.allocation(0, 8 * cs).unwrap(),
            vec![
                Extent {
                    len: 3 * cs,
                    allocated: true
                },
                Extent {
                    len: 5 * cs,
                    allocated: false
                }
            ]
        );
        // Zeroing a partial chunk needs a write: not fast.
        assert!(matches!(
            z.write_zeroes(
                10,
                100,
                ZeroFlags {
                    fast: true,
                    ..ZeroFlags::default()
                }
            ),
            Err(PoolError::NotFast)
        ));
        z.write_zeroes(cs, cs + 10, ZeroFlags::default()).unwrap();
        let mut buf = vec![1u8; (3 * cs) as usize];
        z.read(0, &mut buf).unwrap();
        assert!(buf[..cs as usize].iter().all(|&b| b == 5));
        assert!(
            buf[cs as usize..(2 * cs + 10) as usize]
                .iter()
                .all(|&b| b == 0)
        );
        assert!(buf[(2 * cs + 10) as usize..].iter().all(|&b| b == 5));
        z.trim(0, cs, false).unwrap();
        assert!(!z.allocation(0, cs).unwrap()[0].allocated);
        z.write_zeroes(
            4 * cs,
            cs,
            ZeroFlags {
                no_hole: true,
                ..ZeroFlags::default()
            },
        )
        .unwrap();
        assert!(z.allocation(4 * cs, cs).unwrap()[0].allocated);
        pool.verify().unwrap();
    }

    #[test]
    fn full_pool_suspends_writers_until_space_is_freed() {
        let (_b, pool) = small_pool(4 << 20);
        let cs = u64::from(pool.chunk_size());
        let chunks = pool.status().data_chunks;
        pool.create_volume("fill", chunks * cs).unwrap();
        pool.create_volume("more", 4 * cs).unwrap();
        let fill = pool.open_volume("fill").unwrap();
        fill.write(0, &vec![1; (chunks * cs) as usize], false)
            .unwrap();
        assert_eq!(pool.status().free_chunks, 0);
        let more = pool.open_volume("more").unwrap();
        let writer = std::thread::spawn(move || more.write(0, &[2; 4096], false));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.status().suspended_writers == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "writer never suspended"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!writer.is_finished());
        fill.trim(0, cs, false).unwrap();
        writer.join().unwrap().unwrap();
        pool.verify().unwrap();
    }

    #[test]
    fn reopen_after_process_crash_and_many_checkpoints() {
        let (b, pool) = small_pool(8 << 20);
        pool.create_volume("v", 4 * MIB).unwrap();
        let v = pool.open_volume("v").unwrap();
        // Enough mapping churn to wrap the 64 KiB journal several times.
        for round in 0..200u8 {
            for i in 0..30u64 {
                v.write(i * 65536, &[round; 512], false).unwrap();
            }
            v.trim(0, 10 * 65536, false).unwrap();
        }
        let generation = pool.status().generation;
        assert!(
            generation >= 3,
            "generation {generation}: the journal never wrapped"
        );
        let crashed = Arc::new(b.process_crash());
        drop(v);
        drop(pool);
        let pool = Pool::open_in_boot(crashed, [1; 16]).unwrap();
        pool.verify().unwrap();
        let v = pool.open_volume("v").unwrap();
        let mut buf = [0u8; 512];
        v.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 512]);
        v.read(20 * 65536, &mut buf).unwrap();
        assert_eq!(buf, [199; 512]);
    }
}
