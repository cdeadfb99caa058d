//! The replication book: per volume of this pool, the newest epoch seen
//! (the fence) and the generation identifier this volume is in sync with
//! (whether a primary must send it the whole volume), kept beside the
//! pool in `POOL.epochs`.
//!
//! File format: one line per volume, `VOLUME EPOCH [SYNCED [FLAGS]]`:
//! the newest epoch, the generation of the last primary stream this
//! volume fully received (0: none), and flags: `p` when the volume was a
//! primary, `f` while a full sync or a resync into it has not finished
//! (the copy is incomplete: DRBD's Inconsistent). The file is replaced whole (write,
//! fsync, rename, fsync of the directory).
//!
//! Invariants:
//! - a volume's newest epoch only grows, and a raised epoch is on disk
//!   before it is acted on (one that cannot be recorded is refused);
//! - whoever watches a volume's epoch ([`ReplicaBook::watch`]: the
//!   replica sessions of primaries) is told as soon as it rises past the
//!   watched one, so a primary deposed by a newer one learns it before
//!   its next write rather than by it;
//! - a volume that was a primary when the process stopped comes back
//!   with no synced generation: its writes since the last sync are not
//!   known to be anywhere else, so nothing may skip a full sync because
//!   of what it followed before (`sds/DESIGN.md`, "Initial full sync");
//! - a volume is marked incomplete on disk before a full sync or a
//!   resync into it writes anything, and the mark goes only when the
//!   sync's SYNCED flush is applied, or when an operator accepts the copy as it is: a copy
//!   cut in the middle of its fill says so across restarts.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

/// Told the new newest epoch of a watched volume once it rises past the
/// watched epoch (see [`ReplicaBook::watch`]).
pub type EpochWatch = Arc<dyn Fn(u64) + Send + Sync>;

/// Watches of one volume: the watched epoch and the callback, held
/// weakly (a watch ends when its owner drops it).
type Watches = Vec<(u64, Weak<dyn Fn(u64) + Send + Sync>)>;

/// What the book knows of one volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    newest: u64,
    synced: u64,
    primary: bool,
    filling: bool,
}

/// Epochs and sync generations of a pool's volumes.
#[derive(Debug)]
pub struct ReplicaBook {
    min_epoch: u64,
    file: Option<PathBuf>,
    entries: Mutex<HashMap<String, Entry>>,
    watches: Mutex<HashMap<String, Watches>>,
}

/// An epoch older than the newest seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("epoch {epoch} is older than {newest}, the newest seen for this volume")]
pub struct StaleEpoch {
    /// The refused epoch.
    pub epoch: u64,
    /// The newest seen (or the one that could not be recorded).
    pub newest: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ReplicaBook {
    /// A book kept in memory only; epochs below `min_epoch` are refused.
    pub fn in_memory(min_epoch: u64) -> ReplicaBook {
        ReplicaBook {
            min_epoch,
            file: None,
            entries: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
        }
    }

    /// The book kept in `file` (created on the first change); a volume
    /// recorded as primary loses its synced generation.
    pub fn open(file: &Path, min_epoch: u64) -> io::Result<ReplicaBook> {
        let mut entries = load(file)?;
        for e in entries.values_mut() {
            if e.primary {
                e.synced = 0;
                e.primary = false;
            }
        }
        Ok(ReplicaBook {
            min_epoch,
            file: Some(file.to_owned()),
            entries: Mutex::new(entries),
            watches: Mutex::new(HashMap::new()),
        })
    }

    /// The newest epoch seen for `volume` (at least the floor).
    pub fn newest(&self, volume: &str) -> u64 {
        lock(&self.entries)
            .get(volume)
            .map_or(0, |e| e.newest)
            .max(self.min_epoch)
    }

    /// The newest epoch recorded for `volume`, 0 when none (the floor
    /// not applied).
    pub fn recorded_epoch(&self, volume: &str) -> u64 {
        lock(&self.entries).get(volume).map_or(0, |e| e.newest)
    }

    /// Admits `epoch` for `volume`: raises the newest seen, or refuses an
    /// older one. Returns the newest after the check.
    pub fn admit(&self, volume: &str, epoch: u64) -> Result<u64, StaleEpoch> {
        let mut entries = lock(&self.entries);
        let newest = entries
            .get(volume)
            .map_or(0, |e| e.newest)
            .max(self.min_epoch);
        if epoch < newest {
            return Err(StaleEpoch { epoch, newest });
        }
        let before = entries.get(volume).copied();
        if before.is_none_or(|b| b.newest < epoch) {
            let mut e = before.unwrap_or_default();
            e.newest = epoch;
            entries.insert(volume.to_owned(), e);
            if let Err(err) = self.save(&entries) {
                tracing::error!(volume, epoch, error = %err, "cannot record a new epoch: refusing it");
                restore(&mut entries, volume, before);
                return Err(StaleEpoch { epoch, newest });
            }
            drop(entries);
            self.tell(volume, epoch);
        }
        Ok(epoch)
    }

    /// Calls `watch` with the newest epoch once `volume`'s rises past
    /// `epoch` (at once if it already has), for as long as the caller
    /// holds `watch`. Watching again with the same `watch` replaces the
    /// watched epoch.
    pub fn watch(&self, volume: &str, epoch: u64, watch: &EpochWatch) {
        {
            let mut all = lock(&self.watches);
            let list = all.entry(volume.to_owned()).or_default();
            list.retain(|(_, w)| w.strong_count() > 0);
            let weak = Arc::downgrade(watch);
            match list.iter_mut().find(|(_, w)| Weak::ptr_eq(w, &weak)) {
                Some(entry) => entry.0 = epoch,
                None => list.push((epoch, weak)),
            }
        }
        let newest = self.newest(volume);
        if newest > epoch {
            watch(newest);
        }
    }

    /// Tells the watches of `volume` below `newest` (outside every lock).
    fn tell(&self, volume: &str, newest: u64) {
        let due: Vec<EpochWatch> = {
            let mut all = lock(&self.watches);
            let Some(list) = all.get_mut(volume) else {
                return;
            };
            list.retain(|(_, w)| w.strong_count() > 0);
            list.iter()
                .filter(|(e, _)| *e < newest)
                .filter_map(|(_, w)| w.upgrade())
                .collect()
        };
        for watch in due {
            watch(newest);
        }
    }

    /// The generation `volume` is in sync with (0: none).
    pub fn synced(&self, volume: &str) -> u64 {
        lock(&self.entries).get(volume).map_or(0, |e| e.synced)
    }

    /// Records that `volume` is in sync with generation `synced` (0:
    /// with none, before a full sync rewrites it).
    pub fn set_synced(&self, volume: &str, synced: u64) -> io::Result<()> {
        self.update(volume, |e| e.synced = synced)
    }

    /// Records whether `volume` is a primary here.
    pub fn set_primary(&self, volume: &str, primary: bool) -> io::Result<()> {
        self.update(volume, |e| e.primary = primary)
    }

    /// Whether a full sync or a resync into `volume` started and has not
    /// finished: the copy holds part of a primary's data and part of what
    /// it held before.
    pub fn incomplete(&self, volume: &str) -> bool {
        lock(&self.entries).get(volume).is_some_and(|e| e.filling)
    }

    /// Records that a full sync into `volume` starts: in sync with no
    /// generation, and incomplete until [`ReplicaBook::finish_fill`].
    pub fn start_fill(&self, volume: &str) -> io::Result<()> {
        self.update(volume, |e| {
            e.synced = 0;
            e.filling = true;
        })
    }

    /// Records that a resync of dirty chunks into `volume` starts: still
    /// in sync with its stream (a cut resync goes on from the primary's
    /// dirty set), but incomplete until [`ReplicaBook::finish_fill`].
    pub fn start_resync(&self, volume: &str) -> io::Result<()> {
        self.update(volume, |e| e.filling = true)
    }

    /// Records that the full sync into `volume` finished: in sync with
    /// generation `synced`, complete.
    pub fn finish_fill(&self, volume: &str, synced: u64) -> io::Result<()> {
        self.update(volume, |e| {
            e.synced = synced;
            e.filling = false;
        })
    }

    /// Takes `volume` as complete as it is (an operator's force): it
    /// stays in sync with no generation, so any peer it meets is filled
    /// from it or fills it whole. Returns whether it was incomplete.
    pub fn accept_incomplete(&self, volume: &str) -> io::Result<bool> {
        let was = self.incomplete(volume);
        // Unchanged (not incomplete): `update` writes nothing.
        self.update(volume, |e| {
            if e.filling {
                e.synced = 0;
                e.filling = false;
            }
        })?;
        Ok(was)
    }

    /// Forgets what `volume` held (it was deleted); its epoch stays, so a
    /// volume of the same name still refuses older primaries.
    pub fn forget_content(&self, volume: &str) -> io::Result<()> {
        self.update(volume, |e| {
            e.synced = 0;
            e.primary = false;
            e.filling = false;
        })
    }

    fn update(&self, volume: &str, change: impl FnOnce(&mut Entry)) -> io::Result<()> {
        let mut entries = lock(&self.entries);
        let before = entries.get(volume).copied();
        let mut e = before.unwrap_or_default();
        change(&mut e);
        if before == Some(e) || (before.is_none() && e == Entry::default()) {
            return Ok(());
        }
        entries.insert(volume.to_owned(), e);
        self.save(&entries)
            .inspect_err(|_| restore(&mut entries, volume, before))
    }

    /// Writes the book to a temporary file, syncs it and renames it over
    /// the file, so the file is always whole.
    fn save(&self, entries: &HashMap<String, Entry>) -> io::Result<()> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let mut names: Vec<_> = entries.keys().collect();
        names.sort();
        let mut text = String::new();
        for name in names {
            let e = entries[name];
            text.push_str(&format!("{name} {} {}", e.newest, e.synced));
            match (e.primary, e.filling) {
                (false, false) => {}
                (true, false) => text.push_str(" p"),
                (false, true) => text.push_str(" f"),
                (true, true) => text.push_str(" pf"),
            }
            text.push('\n');
        }
        // Beside the file, named after all of it: the book and the
        // attachments share a stem.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn restore(entries: &mut HashMap<String, Entry>, volume: &str, before: Option<Entry>) {
    match before {
        Some(b) => entries.insert(volume.to_owned(), b),
        None => entries.remove(volume),
    };
}

fn load(path: &Path) -> io::Result<HashMap<String, Entry>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e),
    };
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let bad = || {
            io::Error::other(format!(
                "{} line {}: not `VOLUME EPOCH [SYNCED [FLAGS]]` (flags: p, f)",
                path.display(),
                n + 1
            ))
        };
        let mut words = line.split_whitespace();
        let volume = words.next().ok_or_else(bad)?;
        let newest = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let synced = match words.next() {
            Some(w) => w.parse().map_err(|_| bad())?,
            None => 0,
        };
        let flags = words.next().unwrap_or("");
        if flags.chars().any(|c| c != 'p' && c != 'f') {
            return Err(bad());
        }
        let (primary, filling) = (flags.contains('p'), flags.contains('f'));
        if words.next().is_some() {
            return Err(bad());
        }
        out.insert(
            volume.to_owned(),
            Entry {
                newest,
                synced,
                primary,
                filling,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_survives_a_restart_and_a_primary_forgets_its_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pool.epochs");
        let book = ReplicaBook::open(&file, 0).expect("open");
        assert_eq!(book.admit("a", 3), Ok(3));
        assert_eq!(
            book.admit("a", 2),
            Err(StaleEpoch {
                epoch: 2,
                newest: 3
            })
        );
        book.set_synced("a", 77).expect("synced");
        book.admit("b", 1).expect("b");
        book.set_synced("b", 88).expect("synced");
        book.set_primary("b", true).expect("primary");
        drop(book);
        // The old two-column format still loads.
        let book = ReplicaBook::open(&file, 0).expect("reopen");
        assert_eq!((book.newest("a"), book.synced("a")), (3, 77));
        assert_eq!((book.newest("b"), book.synced("b")), (1, 0));
        std::fs::write(&file, "a 5\n").expect("write");
        let book = ReplicaBook::open(&file, 7).expect("old format");
        assert_eq!((book.newest("a"), book.recorded_epoch("a")), (7, 5));
        std::fs::write(&file, "a five\n").expect("write");
        assert!(ReplicaBook::open(&file, 0).is_err());
        std::fs::write(&file, "a 5 6 q\n").expect("write");
        assert!(ReplicaBook::open(&file, 0).is_err());
    }

    #[test]
    fn an_incomplete_copy_stays_incomplete_across_a_restart_until_filled_or_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pool.epochs");
        let book = ReplicaBook::open(&file, 0).expect("open");
        book.admit("a", 2).expect("a");
        book.set_synced("a", 9).expect("synced");
        book.start_fill("a").expect("fill");
        assert!(book.incomplete("a"));
        assert_eq!(book.synced("a"), 0);
        assert!(!book.incomplete("b"));
        book.admit("b", 1).expect("b");
        book.start_fill("b").expect("fill b");
        book.finish_fill("b", 44).expect("filled");
        drop(book);
        let book = ReplicaBook::open(&file, 0).expect("reopen");
        assert!(book.incomplete("a"), "the mark survives a restart");
        assert_eq!((book.incomplete("b"), book.synced("b")), (false, 44));
        assert_eq!(book.accept_incomplete("a").ok(), Some(true));
        assert_eq!(book.accept_incomplete("a").ok(), Some(false));
        assert!(!book.incomplete("a"));
        book.start_fill("b").expect("fill b again");
        book.set_primary("b", true).expect("primary");
        assert!(
            std::fs::read_to_string(&file)
                .expect("read")
                .contains("b 1 0 pf")
        );
        book.forget_content("b").expect("forget");
        assert!(!book.incomplete("b"));
        std::fs::write(&file, "a 5 6 fp\n").expect("write");
        let book = ReplicaBook::open(&file, 0).expect("flags in any order");
        // A volume that was a primary forgets its sync, not its mark.
        assert!(book.incomplete("a"));
    }

    #[test]
    fn a_resync_marks_the_copy_incomplete_and_keeps_its_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pool.epochs");
        let book = ReplicaBook::open(&file, 0).expect("open");
        book.admit("a", 3).expect("a");
        book.set_synced("a", 17).expect("synced");
        book.start_resync("a").expect("resync");
        drop(book);
        let book = ReplicaBook::open(&file, 0).expect("reopen");
        // Cut and restarted: incomplete, and still in sync with the
        // stream, whose dirty set finishes the resync.
        assert_eq!((book.incomplete("a"), book.synced("a")), (true, 17));
        assert!(
            std::fs::read_to_string(&file)
                .expect("read")
                .contains("a 3 17 f")
        );
        book.finish_fill("a", 17).expect("resynced");
        assert_eq!((book.incomplete("a"), book.synced("a")), (false, 17));
    }
}
