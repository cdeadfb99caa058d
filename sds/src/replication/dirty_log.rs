//! The persistent dirty log of one primary stream (one volume, one
//! peer): a bitmap with one bit per chunk, kept in a file beside the pool
//! (`POOL.dirty/VOLUME-UID.PEER`), so a restarted primary resyncs only
//! the chunks its peer may miss instead of the whole volume.
//!
//! A set bit means "this chunk may differ on the peer". It is set before
//! the primary ships or applies a write to the chunk (DRBD's activity
//! log: marked durable before the write goes out), and cleared lazily,
//! once the peer is connected, the chunk is not dirty, no write to it is
//! in flight and it has not been written for a while (so a hot chunk
//! costs one bitmap write, not one per write). The bits are written with
//! `pwrite` before the write they cover (a `kill -9` keeps them: the page
//! cache survives) and made durable (`fdatasync`) before a FLUSH or FUA
//! that covers that write is acknowledged.
//!
//! The header names the stream: its generation identifier (reused by the
//! restarted primary, so the peer, which recorded it, answers "in sync"
//! and gets only the set bits), the volume's uid, the chunk size and the
//! peer, so a log never applies to another volume or peer.
//!
//! File layout (little-endian): magic `BSLTDIRT` (8), version u32, chunk
//! size u32, generation u64, volume uid (16), peer length u16, peer,
//! CRC-32 of everything before it (u32), padded to [`HEADER`] bytes;
//! then the bitmap as u64 words (bit `c % 64` of word `c / 64` is chunk
//! `c`), as long as the highest chunk ever marked needs.
//!
//! Invariants:
//! - a log is created whole (temporary file, fsync, rename, fsync of the
//!   directory) before its generation is sent to anyone;
//! - every chunk a write touches has its bit set in the file before the
//!   write is shipped or applied locally;
//! - a log whose header does not match (another volume, peer or chunk
//!   size, a torn or foreign file) is never used: a new stream (and a
//!   full sync) starts instead.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use uuid::Uuid;

/// Bytes before the bitmap.
pub const HEADER: u64 = 4096;
const MAGIC: &[u8; 8] = b"BSLTDIRT";
const VERSION: u32 = 1;

/// The file of a log: written by writers under the link lock, synced
/// without it.
#[derive(Debug)]
pub struct LogFile {
    file: File,
    path: PathBuf,
    unsynced: AtomicBool,
}

impl LogFile {
    /// Makes every bit written so far durable (nothing to do when none
    /// was written since the last sync).
    pub fn sync(&self) -> io::Result<()> {
        if self.unsynced.swap(false, Ordering::SeqCst)
            && let Err(e) = self.file.sync_data()
        {
            self.unsynced.store(true, Ordering::SeqCst);
            return Err(e);
        }
        Ok(())
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One stream's persistent bitmap (see the module's doc).
#[derive(Debug)]
pub struct DirtyLog {
    file: Arc<LogFile>,
    generation: u64,
    words: Vec<u64>,
    reused: bool,
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
            .filter(|&n| u64::from(n) < HEADER - 64)
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

impl DirtyLog {
    /// The log of `key`'s stream in `dir`: the one there if its header
    /// matches (its generation and set bits are reused), otherwise a new
    /// one with generation `new_generation()` and no bit set, on disk
    /// before this returns.
    pub fn open(
        dir: &Path,
        key: &LogKey<'_>,
        new_generation: impl FnOnce() -> u64,
    ) -> io::Result<DirtyLog> {
        std::fs::create_dir_all(dir)?;
        let path = key.path(dir);
        if let Some(log) = DirtyLog::reopen(&path, key)? {
            return Ok(log);
        }
        let generation = new_generation();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp)?;
        f.write_all(&key.header(generation)?)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        Ok(DirtyLog {
            file: Arc::new(LogFile {
                file,
                path,
                unsynced: AtomicBool::new(false),
            }),
            generation,
            words: Vec::new(),
            reused: false,
        })
    }

    fn reopen(path: &Path, key: &LogKey<'_>) -> io::Result<Option<DirtyLog>> {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bytes = std::fs::read(path)?;
        let Some(generation) = bytes
            .get(..HEADER as usize)
            .and_then(|h| parse_header(key, h))
        else {
            tracing::warn!(log = %path.display(), "dirty log does not match its stream: starting a new one (full sync)");
            return Ok(None);
        };
        let words = bytes[HEADER as usize..]
            .chunks(8)
            .map(|w| {
                let mut b = [0u8; 8];
                b[..w.len()].copy_from_slice(w);
                u64::from_le_bytes(b)
            })
            .collect();
        Ok(Some(DirtyLog {
            file: Arc::new(LogFile {
                file,
                path: path.to_owned(),
                unsynced: AtomicBool::new(false),
            }),
            generation,
            words,
            reused: true,
        }))
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

    /// Sets the bits of chunks `first..=last` and writes the words that
    /// changed (no I/O when all were set).
    pub fn mark(&mut self, first: u64, last: u64) -> io::Result<()> {
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
        self.file.unsynced.store(true, Ordering::SeqCst);
        self.file.file.write_all_at(&buf, HEADER + lo as u64 * 8)
    }

    /// Deletes the file (the stream ended for good: the peer was removed
    /// or the volume is no longer a primary here).
    pub fn remove(&self) {
        match std::fs::remove_file(&self.file.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(log = %self.file.path.display(), error = %e, "cannot remove a dirty log")
            }
        }
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
        assert_eq!(log.set_chunks(), want);
        assert!(log.is_set(130) && !log.is_set(131) && !log.is_set(100));

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
        sweep(dir.path(), &[log.file().path().to_owned()]);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(left, [path]);
    }
}
