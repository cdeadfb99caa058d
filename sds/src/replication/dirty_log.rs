//! The persistent dirty log of one primary stream (one volume, one
//! peer): a bitmap with one bit per chunk, and an activity log of the
//! extents being written, kept in a file beside the pool
//! (`POOL.dirty/VOLUME-UID.PEER`), so a restarted primary resyncs only
//! the chunks its peer may miss instead of the whole volume.
//!
//! A set bit means "this chunk may differ on the peer". It is written
//! (`pwrite`) before the primary ships or applies a write to the chunk,
//! and cleared lazily, once the peer is connected, the chunk is not
//! dirty, no write to it is in flight, it has not been written for a
//! while, and a FLUSH acknowledged by the peer and a local flush made
//! every write to it durable on both sides. A `kill -9` keeps every bit
//! (the page cache survives).
//!
//! A power loss may drop bits not yet synced. The **activity log** (DRBD's
//! AL) covers them: the chunks are grouped in extents of 64 (one bitmap
//! word; 4 MiB with 64 KiB chunks), and a bounded set of hot extents
//! ([`DirtyLog::set_activity_extents`], [`DEFAULT_ACTIVITY_EXTENTS`]) is
//! recorded in slots of the file. Before a write to an extent outside the
//! set is shipped or applied, the extent takes a slot and the slot is made
//! durable (`fdatasync`): one sync when a write leaves the hot set, none
//! while it stays in it. A slot given to another extent has the bits of
//! the extent it held made durable first (one more sync, skipped when
//! they are all clear). When the log is opened in another boot than the
//! one that last wrote it (the page cache was lost), every chunk of every
//! extent in a slot counts as set: so after a power loss the set bits
//! cover every write that may have reached one copy and not the other.
//!
//! The header names the stream: its generation identifier (reused by the
//! restarted primary, so the peer, which recorded it, answers "in sync"
//! and gets only the set bits), the volume's uid, the chunk size and the
//! peer, so a log never applies to another volume or peer.
//!
//! File layout (little-endian): magic `BSLTDIRT` (8), version u32, chunk
//! size u32, generation u64, volume uid (16), peer length u16, peer,
//! CRC-32 of everything before it (u32), within the first [`BOOT_AT`]
//! bytes; at [`BOOT_AT`] the kernel boot id of the process that opened it
//! last (16); at [`AL_AT`] the activity log's slots up to [`HEADER`]
//! (u64 each: extent + 1, 0 when free); then the bitmap as u64 words (bit
//! `c % 64` of word `c / 64` is chunk `c`), as long as the highest chunk
//! ever marked needs. Logs written before the activity log existed have
//! zeros there (no slot in use) and stay valid.
//!
//! Invariants:
//! - a log is created whole (temporary file, fsync, rename, fsync of the
//!   directory) before its generation is sent to anyone;
//! - every chunk a write touches has its bit set in the file, and either
//!   that bit or its extent's slot durable, before the write is shipped
//!   or applied locally;
//! - a log whose header does not match (another volume, peer or chunk
//!   size, a torn or foreign file) is never used: a new stream (and a
//!   full sync) starts instead.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use uuid::Uuid;

use crate::backend::Backend;

/// Bytes before the bitmap.
pub const HEADER: u64 = 4096;
/// Where the boot id of the last opener lives.
pub const BOOT_AT: u64 = 1008;
/// Where the activity log's slots start.
pub const AL_AT: u64 = 1024;
/// How many slots the file has room for.
pub const AL_SLOTS: usize = ((HEADER - AL_AT) / 8) as usize;
/// Hot extents by default (1 GiB of 64 KiB chunks: a primary restarted
/// after a power loss resyncs at most that much for the writes that were
/// not flushed).
pub const DEFAULT_ACTIVITY_EXTENTS: usize = 256;
/// Checks an activity-log size (hot extents) asked for by an operator:
/// at most [`AL_SLOTS`] (the slots the log's header has room for); 0
/// keeps no hot set (the bits are then synced with the FLUSH or FUA that
/// covers their writes, which a power loss before that FLUSH may undo).
/// The error says why, for the caller to name its field.
pub fn check_activity_extents(n: usize) -> Result<usize, String> {
    if n > AL_SLOTS {
        return Err(format!(
            "{n} hot extents: the dirty log has room for at most {AL_SLOTS}"
        ));
    }
    Ok(n)
}

/// Chunks per activity-log extent (one bitmap word).
pub const EXTENT_CHUNKS: u64 = 64;
const MAGIC: &[u8; 8] = b"BSLTDIRT";
const VERSION: u32 = 1;

/// The file of a log: written by writers under the link lock, synced
/// without it.
#[derive(Debug)]
pub struct LogFile {
    store: Arc<dyn Backend>,
    path: Option<PathBuf>,
    unsynced: AtomicBool,
}

impl LogFile {
    /// Makes every bit written so far durable (nothing to do when none
    /// was written since the last sync).
    pub fn sync(&self) -> io::Result<()> {
        if self.unsynced.swap(false, Ordering::SeqCst)
            && let Err(e) = self.store.sync()
        {
            self.unsynced.store(true, Ordering::SeqCst);
            return Err(e);
        }
        Ok(())
    }

    /// Where it lives (`None` for a log on a store of a test).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.unsynced.store(true, Ordering::SeqCst);
        self.store.write_at(buf, offset)
    }
}

/// A log's file, without the pool file's lock (a stream being replaced
/// and its successor may both hold it for a moment).
#[derive(Debug)]
struct PlainFile(File);

impl PlainFile {
    fn open(path: &Path) -> io::Result<PlainFile> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(PlainFile)
    }
}

impl Backend for PlainFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

/// The activity log in memory: which extent each slot holds, and when it
/// was last used.
#[derive(Debug, Default)]
struct Activity {
    /// Slots in use at most (0: no activity log, bits are synced with the
    /// FLUSH or FUA that covers them instead).
    limit: usize,
    /// Per slot: the extent it holds.
    slots: Vec<Option<u64>>,
    /// Per slot: the clock at its last use.
    used: Vec<u64>,
    /// Extent to slot.
    index: HashMap<u64, usize>,
    clock: u64,
    /// Slot writes (each one `fdatasync`) since the log was opened.
    writes: u64,
}

/// One stream's persistent bitmap and activity log (see the module's
/// doc).
#[derive(Debug)]
pub struct DirtyLog {
    file: Arc<LogFile>,
    generation: u64,
    words: Vec<u64>,
    reused: bool,
    activity: Activity,
}

/// What identifies the stream a log belongs to.
#[derive(Debug, Clone, Copy)]
pub struct LogKey<'a> {
    /// The volume's uid.
    pub volume_uid: Uuid,
    /// The peer, as attached (`host:port`).
    pub peer: &'a str,
    /// The pool's chunk size (one bit per chunk).
    pub chunk_size: u32,
}

impl LogKey<'_> {
    /// The log's file name in `dir`.
    pub fn path(&self, dir: &Path) -> PathBuf {
        let peer: String = self
            .peer
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        dir.join(format!("{}.{peer}", self.volume_uid))
    }

    fn header(&self, generation: u64) -> io::Result<Vec<u8>> {
        let peer = self.peer.as_bytes();
        let peer_len = u16::try_from(peer.len())
            .ok()
            .filter(|&n| u64::from(n) < BOOT_AT - 64)
            .ok_or_else(|| io::Error::other(format!("peer name too long: {:?}", self.peer)))?;
        let mut h = Vec::with_capacity(HEADER as usize);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&self.chunk_size.to_le_bytes());
        h.extend_from_slice(&generation.to_le_bytes());
        h.extend_from_slice(self.volume_uid.as_bytes());
        h.extend_from_slice(&peer_len.to_le_bytes());
        h.extend_from_slice(peer);
        let crc = crc32fast::hash(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        h.resize(HEADER as usize, 0);
        Ok(h)
    }
}

/// Reads the generation of a log whose header matches `key`.
fn parse_header(key: &LogKey<'_>, h: &[u8]) -> Option<u64> {
    let fixed = 8 + 4 + 4 + 8 + 16 + 2;
    if h.len() < fixed + 4 || &h[..8] != MAGIC {
        return None;
    }
    let u32_at = |at: usize| {
        h.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let version = u32_at(8)?;
    let chunk = u32_at(12)?;
    let generation = u64::from_le_bytes(h.get(16..24)?.try_into().ok()?);
    let uid = Uuid::from_slice(h.get(24..40)?).ok()?;
    let peer_len = usize::from(u16::from_le_bytes(h.get(40..42)?.try_into().ok()?));
    if 42 + peer_len + 4 > BOOT_AT as usize {
        return None;
    }
    let peer = h.get(42..42 + peer_len)?;
    let crc = u32_at(42 + peer_len)?;
    if crc32fast::hash(&h[..42 + peer_len]) != crc
        || version != VERSION
        || chunk != key.chunk_size
        || uid != key.volume_uid
        || peer != key.peer.as_bytes()
        || generation == 0
    {
        return None;
    }
    Some(generation)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = bytes.get(at..) {
        let n = s.len().min(8);
        b[..n].copy_from_slice(&s[..n]);
    }
    u64::from_le_bytes(b)
}

impl DirtyLog {
    /// The log of `key`'s stream in `dir`: the one there if its header
    /// matches (its generation and set bits are reused), otherwise a new
    /// one with generation `new_generation()` and no bit set, on disk
    /// before this returns. The activity log holds
    /// [`DEFAULT_ACTIVITY_EXTENTS`].
    pub fn open(
        dir: &Path,
        key: &LogKey<'_>,
        new_generation: impl FnOnce() -> u64,
    ) -> io::Result<DirtyLog> {
        std::fs::create_dir_all(dir)?;
        let path = key.path(dir);
        let boot = crate::pool::current_boot_id();
        if path.exists() {
            let store = Arc::new(PlainFile::open(&path)?);
            if let Some(log) = DirtyLog::reopen(store, Some(path.clone()), key, boot)? {
                return Ok(log);
            }
        }
        let generation = new_generation();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp)?;
        let mut header = key.header(generation)?;
        header[BOOT_AT as usize..AL_AT as usize].copy_from_slice(&boot);
        f.write_all(&header)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()?;
        let store = Arc::new(PlainFile::open(&path)?);
        Ok(DirtyLog::fresh(store, Some(path), generation))
    }

    /// [`DirtyLog::open`] on `store` (a test's memory store, which
    /// simulates power loss), as if the kernel's boot id were `boot`: a
    /// log found there from another boot has its activity log's extents
    /// counted as set.
    pub fn open_in(
        store: Arc<dyn Backend>,
        key: &LogKey<'_>,
        new_generation: impl FnOnce() -> u64,
        boot: [u8; 16],
    ) -> io::Result<DirtyLog> {
        if let Some(log) = DirtyLog::reopen(store.clone(), None, key, boot)? {
            return Ok(log);
        }
        let generation = new_generation();
        let len = store.len()?;
        if len > HEADER {
            store.write_at(&vec![0; (len - HEADER) as usize], HEADER)?;
        }
        let mut header = key.header(generation)?;
        header[BOOT_AT as usize..AL_AT as usize].copy_from_slice(&boot);
        store.write_at(&header, 0)?;
        store.sync()?;
        Ok(DirtyLog::fresh(store, None, generation))
    }

    fn fresh(store: Arc<dyn Backend>, path: Option<PathBuf>, generation: u64) -> DirtyLog {
        let mut log = DirtyLog {
            file: Arc::new(LogFile {
                store,
                path,
                unsynced: AtomicBool::new(false),
            }),
            generation,
            words: Vec::new(),
            reused: false,
            activity: Activity::default(),
        };
        log.activity.resize(DEFAULT_ACTIVITY_EXTENTS);
        log
    }

    fn reopen(
        store: Arc<dyn Backend>,
        path: Option<PathBuf>,
        key: &LogKey<'_>,
        boot: [u8; 16],
    ) -> io::Result<Option<DirtyLog>> {
        let len = store.len()?;
        let mut bytes = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
        store.read_at(&mut bytes, 0)?;
        let where_ = path
            .as_ref()
            .map_or_else(|| "memory".to_owned(), |p| p.display().to_string());
        let Some(generation) = bytes
            .get(..HEADER as usize)
            .and_then(|h| parse_header(key, h))
        else {
            tracing::warn!(log = %where_, "dirty log does not match its stream: starting a new one (full sync)");
            return Ok(None);
        };
        let mut words: Vec<u64> = bytes[HEADER as usize..]
            .chunks(8)
            .map(|w| u64_at(w, 0))
            .collect();
        let slots: Vec<Option<u64>> = (0..AL_SLOTS)
            .map(|s| u64_at(&bytes, AL_AT as usize + s * 8).checked_sub(1))
            .collect();
        let same_boot = bytes.get(BOOT_AT as usize..AL_AT as usize) == Some(&boot[..]);
        let mut log = DirtyLog {
            file: Arc::new(LogFile {
                store,
                path,
                unsynced: AtomicBool::new(false),
            }),
            generation,
            words: Vec::new(),
            reused: true,
            activity: Activity::default(),
        };
        if same_boot {
            // The page cache kept every bit: the extents stay hot as they
            // were (their slots are durable).
            log.words = words;
            log.activity.resize(
                DEFAULT_ACTIVITY_EXTENTS
                    .max(slots.iter().rposition(Option::is_some).map_or(0, |s| s + 1)),
            );
            for (s, e) in slots.iter().enumerate() {
                if let Some(e) = *e {
                    log.activity.take(s, e);
                }
            }
            return Ok(Some(log));
        }
        // Another boot: bits not synced may be lost, and every write that
        // may have reached one copy only is in a hot extent. Those count
        // as set, durably, before the slots are freed.
        let hot: Vec<u64> = slots.iter().flatten().copied().collect();
        for &e in &hot {
            let Ok(w) = usize::try_from(e) else { continue };
            if w >= words.len() {
                if w > (1 << 32) {
                    continue;
                }
                words.resize(w + 1, 0);
            }
            words[w] = u64::MAX;
        }
        log.words = words;
        if !hot.is_empty() {
            tracing::warn!(log = %where_, extents = hot.len(), "dirty log from another boot: every chunk of its hot extents counts as dirty");
            if !log.words.is_empty() {
                log.write_words(0, log.words.len() - 1)?;
            }
            log.file.sync()?;
            log.file.write_at(&vec![0; AL_SLOTS * 8], AL_AT)?;
        }
        log.file.write_at(&boot, BOOT_AT)?;
        log.file.sync()?;
        log.activity.resize(DEFAULT_ACTIVITY_EXTENTS);
        Ok(Some(log))
    }

    /// Sets how many extents the activity log keeps hot (at most
    /// [`AL_SLOTS`]; 0: none, and the bits are made durable with the
    /// FLUSH or FUA that covers them instead, which a power loss before
    /// that FLUSH may undo). Extents beyond the new limit leave the hot
    /// set (their bits are made durable first).
    pub fn set_activity_extents(&mut self, n: usize) -> io::Result<()> {
        let n = n.min(AL_SLOTS);
        let extra: Vec<usize> = (n..self.activity.slots.len())
            .filter(|&s| self.activity.slots[s].is_some())
            .collect();
        if !extra.is_empty() {
            self.file.sync()?;
            for s in extra {
                self.write_slot(s, None)?;
            }
            self.file.sync()?;
        }
        self.activity.resize(n);
        Ok(())
    }

    /// How many extents the activity log keeps hot (0: none).
    pub fn activity_extents(&self) -> usize {
        self.activity.limit
    }

    /// Extents that took a slot (one `fdatasync` each) since the log was
    /// opened.
    pub fn activity_writes(&self) -> u64 {
        self.activity.writes
    }

    /// The stream's generation identifier.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether it was found on disk (a restarted primary's) rather than
    /// created.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// The file, for syncing without the owner's lock.
    pub fn file(&self) -> &Arc<LogFile> {
        &self.file
    }

    /// Whether chunk `c`'s bit is set.
    pub fn is_set(&self, c: u64) -> bool {
        usize::try_from(c / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }

    /// Every chunk whose bit is set.
    pub fn set_chunks(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                out.push(i as u64 * 64 + b);
                w &= w - 1;
            }
        }
        out
    }

    /// Before a write to chunks `first..=last` goes anywhere: puts their
    /// extents in the activity log (a durable slot write for each one not
    /// hot yet) and sets their bits (written, not synced). With no
    /// activity log, or when a write spans more extents than it holds,
    /// the bits are synced instead.
    pub fn mark(&mut self, first: u64, last: u64) -> io::Result<()> {
        if first > last {
            return Ok(());
        }
        let mut covered = self.activity.limit > 0;
        if covered {
            self.activity.clock += 1;
            let now = self.activity.clock;
            for e in first / EXTENT_CHUNKS..=last / EXTENT_CHUNKS {
                if !self.arm(e, now)? {
                    covered = false;
                    break;
                }
            }
        }
        self.set_bits(first, last)?;
        if !covered && self.activity.limit > 0 {
            self.file.sync()?;
        }
        Ok(())
    }

    /// Makes extent `e` hot. `false`: no slot can be given up (every one
    /// holds an extent of the same write).
    fn arm(&mut self, e: u64, now: u64) -> io::Result<bool> {
        if let Some(&s) = self.activity.index.get(&e) {
            self.activity.used[s] = now;
            return Ok(true);
        }
        let limit = self.activity.limit;
        let slot = match (0..limit).find(|&s| self.activity.slots[s].is_none()) {
            Some(s) => s,
            None => {
                // The least recently used, preferring one with no bit set
                // (nothing to make durable before it leaves).
                let victim = (0..limit)
                    .filter(|&s| self.activity.used[s] < now)
                    .min_by_key(|&s| {
                        let busy = self.activity.slots[s].is_some_and(|v| self.word(v) != 0);
                        (busy, self.activity.used[s])
                    });
                let Some(s) = victim else {
                    return Ok(false);
                };
                if self.activity.slots[s].is_some_and(|v| self.word(v) != 0) {
                    // Its bits cover its writes once it leaves.
                    self.file.sync()?;
                }
                s
            }
        };
        self.write_slot(slot, Some(e))?;
        self.file.sync()?;
        self.activity.take(slot, e);
        self.activity.used[slot] = now;
        self.activity.writes += 1;
        Ok(true)
    }

    fn word(&self, e: u64) -> u64 {
        usize::try_from(e)
            .ok()
            .and_then(|w| self.words.get(w))
            .copied()
            .unwrap_or(0)
    }

    fn write_slot(&mut self, s: usize, e: Option<u64>) -> io::Result<()> {
        let v = e.map_or(0, |e| e + 1);
        self.file.write_at(&v.to_le_bytes(), AL_AT + s as u64 * 8)?;
        if let Some(old) = self.activity.slots[s].take() {
            self.activity.index.remove(&old);
        }
        Ok(())
    }

    /// Sets the bits of chunks `first..=last` and writes the words that
    /// changed (no I/O when all were set).
    fn set_bits(&mut self, first: u64, last: u64) -> io::Result<()> {
        let (Ok(lo), Ok(hi)) = (usize::try_from(first / 64), usize::try_from(last / 64)) else {
            return Err(io::Error::other("chunk index out of range"));
        };
        if hi >= self.words.len() {
            self.words.resize(hi + 1, 0);
        }
        let mut changed = None::<(usize, usize)>;
        for w in lo..=hi {
            let from = if w == lo { first % 64 } else { 0 };
            let to = if w == hi { last % 64 } else { 63 };
            let mask = if to - from == 63 {
                u64::MAX
            } else {
                ((1u64 << (to - from + 1)) - 1) << from
            };
            let old = self.words[w];
            if old | mask != old {
                self.words[w] = old | mask;
                changed = Some(changed.map_or((w, w), |(a, _)| (a, w)));
            }
        }
        if let Some((a, b)) = changed {
            self.write_words(a, b)?;
        }
        Ok(())
    }

    /// Clears the bits of `chunks` (sorted or not) and writes the words
    /// that changed.
    pub fn clear(&mut self, chunks: &[u64]) -> io::Result<()> {
        let mut lo = usize::MAX;
        let mut hi = 0;
        for &c in chunks {
            let Ok(w) = usize::try_from(c / 64) else {
                continue;
            };
            if let Some(word) = self.words.get_mut(w) {
                *word &= !(1 << (c % 64));
                lo = lo.min(w);
                hi = hi.max(w);
            }
        }
        if lo <= hi {
            self.write_words(lo, hi)?;
        }
        Ok(())
    }

    fn write_words(&self, lo: usize, hi: usize) -> io::Result<()> {
        let mut buf = Vec::with_capacity((hi - lo + 1) * 8);
        for w in &self.words[lo..=hi] {
            buf.extend_from_slice(&w.to_le_bytes());
        }
        self.file.write_at(&buf, HEADER + lo as u64 * 8)
    }

    /// Deletes the file (the stream ended for good: the peer was removed
    /// or the volume is no longer a primary here).
    pub fn remove(&self) {
        let Some(path) = &self.file.path else {
            return;
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(log = %path.display(), error = %e, "cannot remove a dirty log")
            }
        }
    }
}

impl Activity {
    fn resize(&mut self, n: usize) {
        self.limit = n;
        if self.slots.len() < n {
            self.slots.resize(n, None);
            self.used.resize(n, 0);
        }
        for s in n..self.slots.len() {
            if let Some(e) = self.slots[s].take() {
                self.index.remove(&e);
            }
        }
    }

    fn take(&mut self, s: usize, e: u64) {
        if let Some(old) = self.slots[s].replace(e) {
            self.index.remove(&old);
        }
        self.index.insert(e, s);
    }
}

/// Deletes the logs in `dir` that are not in `keep` (streams that ended
/// while the process was down).
pub fn sweep(dir: &Path, keep: &[PathBuf]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !keep.contains(&path) {
            tracing::info!(log = %path.display(), "removing the dirty log of a stream that ended");
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;

    #[test]
    fn bits_survive_a_reopen_and_a_foreign_log_is_never_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uid = Uuid::new_v4();
        let key = LogKey {
            volume_uid: uid,
            peer: "10.0.0.2:7000",
            chunk_size: 65536,
        };
        let mut log = DirtyLog::open(dir.path(), &key, || 42).expect("open");
        assert!(!log.reused());
        assert_eq!(log.generation(), 42);
        log.mark(3, 3).expect("mark");
        log.mark(62, 130).expect("mark");
        log.clear(&[100, 101]).expect("clear");
        log.file().sync().expect("sync");
        drop(log);
        let log = DirtyLog::open(dir.path(), &key, || 7).expect("reopen");
        assert!(log.reused());
        assert_eq!(log.generation(), 42);
        let want: Vec<u64> = std::iter::once(3)
            .chain(62..=130)
            .filter(|c| *c != 100 && *c != 101)
            .collect();
        // Same boot: the bits are exact, the hot extents stay hot.
        assert_eq!(log.set_chunks(), want);
        assert!(log.is_set(130) && !log.is_set(131) && !log.is_set(100));
        drop(log);

        // Another peer, another volume or chunk size: a new stream.
        for other in [
            LogKey {
                peer: "10.0.0.3:7000",
                ..key
            },
            LogKey {
                chunk_size: 4096,
                ..key
            },
        ] {
            let log = DirtyLog::open(dir.path(), &other, || 9).expect("other");
            assert!(!log.reused() && log.set_chunks().is_empty());
        }
        // A damaged header is never trusted.
        let path = key.path(dir.path());
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[20] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        let log = DirtyLog::open(dir.path(), &key, || 11).expect("damaged");
        assert_eq!((log.reused(), log.generation()), (false, 11));
        sweep(dir.path(), &[log.file().path().expect("path").to_owned()]);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(left, [path]);
    }

    /// A write to a cold extent syncs its slot before it goes anywhere; a
    /// write to a hot one costs no sync; after a power loss that drops
    /// every unsynced write, the reopened log (another boot) still holds
    /// every chunk written.
    #[test]
    fn power_loss_keeps_every_written_chunk_through_the_activity_log() {
        let key = LogKey {
            volume_uid: Uuid::new_v4(),
            peer: "peer:7000",
            chunk_size: 65536,
        };
        let store = Arc::new(MemBackend::new((HEADER + 4096) as usize));
        let mut log = DirtyLog::open_in(store.clone(), &key, || 5, [1; 16]).expect("open");
        log.set_activity_extents(2).expect("limit");
        log.mark(3, 3).expect("mark");
        assert_eq!((log.activity_writes(), store.unsynced_writes()), (1, 1));
        log.mark(70, 70).expect("mark");
        log.mark(4, 5).expect("mark");
        assert_eq!(log.activity_writes(), 2, "extents 0 and 1 are hot");
        // Extent 5 takes extent 1's slot (least recently used): extent 1's
        // bit is made durable first.
        log.mark(64 * 5 + 1, 64 * 5 + 1).expect("mark");
        assert_eq!(log.activity_writes(), 3);
        // A write over more extents than the log holds syncs its bits.
        log.mark(64 * 10, 64 * 13).expect("mark");
        assert_eq!(store.unsynced_writes(), 0);
        log.mark(6, 6).expect("mark");
        assert!(
            store.unsynced_writes() > 0,
            "a hot extent's bit is not synced"
        );
        let written = [3u64, 4, 5, 6, 70, 64 * 5 + 1];

        // Power loss: nothing unsynced survives.
        let lost = Arc::new(store.crash(|_, _| false));
        let log = DirtyLog::open_in(lost.clone(), &key, || 9, [2; 16]).expect("reopen");
        assert!(log.reused());
        assert_eq!(log.generation(), 5);
        let set = log.set_chunks();
        for c in written.iter().chain(&[64 * 10, 64 * 13]) {
            assert!(set.contains(c), "chunk {c} lost: {set:?}");
        }
        drop(log);
        // The folded bits are durable and the slots free: another power
        // loss right away keeps them.
        let again = Arc::new(lost.crash(|_, _| false));
        let log = DirtyLog::open_in(again, &key, || 9, [3; 16]).expect("reopen");
        assert_eq!(log.set_chunks(), set);

        // A process crash (same boot): the bits are exact.
        let crashed = Arc::new(store.process_crash());
        let log = DirtyLog::open_in(crashed, &key, || 9, [1; 16]).expect("reopen");
        let mut want: Vec<u64> = written.to_vec();
        want.extend(64 * 10..=64 * 13);
        want.sort_unstable();
        assert_eq!(log.set_chunks(), want);
    }
}
