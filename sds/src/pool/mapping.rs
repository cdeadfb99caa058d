//! The pool's metadata as a pure state machine: volumes, their mapping
//! from virtual chunks to data chunks, and reference counts. No I/O here:
//! the live pool and journal replay both change it only through
//! [`Mapping::apply`], so replaying the journal rebuilds exactly the state
//! the live pool had.
//!
//! Structure (a two-level tree, as dm-thin shares btree nodes):
//! - a volume has a page table: one slot per [`PAGE_ENTRIES`] virtual
//!   chunks, each empty or naming a *page*;
//! - a page holds [`PAGE_ENTRIES`] entries (data chunk + 1, or 0 for a
//!   hole) and a count of the page tables that name it;
//! - a data chunk's reference count is the number of distinct pages whose
//!   entries name it.
//!
//! A snapshot copies the page table and counts one more reference on each
//! page: its cost is the number of pages, independent of how many chunks
//! are allocated, and no data moves. The first change to a shared page
//! copies that page (counting one more reference on each chunk it names);
//! a write to a chunk named by more than one page goes to a new chunk
//! (copy-on-write).
//!
//! Invariants (checked by [`Mapping::verify`]):
//! - every page's reference count equals the page-table slots naming it,
//!   and no page lives with zero references;
//! - every data chunk's reference count equals the pages naming it;
//! - every page's `mapped` equals its non-hole entries.

use std::collections::{BTreeMap, HashMap};

use super::format::{Dec, Enc, FormatError, Record, VolumeMeta};

/// Virtual chunks per mapping page.
pub const PAGE_ENTRIES: u64 = 1024;

/// A record cannot apply to the current state (a bug, or a journal that
/// does not belong to its checkpoint).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// No such volume.
    #[error("volume id {0} does not exist")]
    NoVolume(u32),
    /// The volume id is already taken.
    #[error("volume id {0} already exists")]
    VolumeExists(u32),
    /// The virtual chunk is past the volume's end.
    #[error("virtual chunk {vchunk} is past the end of volume {volume}")]
    OutOfRange {
        /// The volume.
        volume: u32,
        /// The virtual chunk.
        vchunk: u64,
    },
    /// The data chunk is outside the pool or already in use.
    #[error("data chunk {0} is out of range or already in use")]
    ChunkInUse(u64),
    /// A volume may only grow.
    #[error("volume {volume} cannot shrink")]
    Shrink {
        /// The volume.
        volume: u32,
    },
}

/// What the pool verifier (`Pool::verify`) found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A data chunk's count differs from the pages naming it.
    #[error("data chunk {chunk}: reference count {stored}, but {actual} pages map it")]
    ChunkRefcount {
        /// The chunk.
        chunk: u64,
        /// The count kept.
        stored: u32,
        /// The pages that name it.
        actual: u32,
    },
    /// A page's count differs from the page tables naming it.
    #[error("page {page}: reference count {stored}, but {actual} volumes hold it")]
    PageRefcount {
        /// The page.
        page: u32,
        /// The count kept.
        stored: u32,
        /// The page tables that name it.
        actual: u32,
    },
    /// A page's mapped count is wrong.
    #[error("page {page}: mapped count {stored}, actual {actual}")]
    PageMapped {
        /// The page.
        page: u32,
        /// The count kept.
        stored: u32,
        /// The entries that are not holes.
        actual: u32,
    },
    /// A page names a chunk outside the pool.
    #[error("page {page} maps data chunk {chunk}, past the pool's end")]
    ChunkOutOfRange {
        /// The page.
        page: u32,
        /// The chunk.
        chunk: u64,
    },
    /// A volume names a page that does not exist.
    #[error("volume {volume} names missing page {page}")]
    MissingPage {
        /// The volume.
        volume: u32,
        /// The page.
        page: u32,
    },
    /// A chunk is both free and in use, or free twice.
    #[error("data chunk {chunk} is doubly owned ({why})")]
    DoublyOwned {
        /// The chunk.
        chunk: u64,
        /// How.
        why: &'static str,
    },
    /// A chunk is neither in use nor free.
    #[error("data chunk {chunk} is leaked: unused but not free")]
    Leaked {
        /// The chunk.
        chunk: u64,
    },
}

#[derive(Debug, Clone)]
struct Page {
    refs: u32,
    mapped: u32,
    /// Data chunk + 1; 0 is a hole.
    entries: Box<[u64]>,
}

#[derive(Debug, Clone)]
struct VolumeMap {
    meta: VolumeMeta,
    pages: Vec<Option<u32>>,
}

/// Volumes, pages and reference counts.
#[derive(Debug, Clone)]
pub struct Mapping {
    chunk_size: u64,
    pages: Vec<Option<Page>>,
    free_pages: Vec<u32>,
    volumes: BTreeMap<u32, VolumeMap>,
    refcounts: Vec<u32>,
    next_volume_id: u32,
    /// Chunks the record being applied left shared by fewer references
    /// (but still referenced): each may have just become exclusive.
    unshared: Vec<u64>,
}

/// What one [`Mapping::apply_tracked`] changed beyond the mapping itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Data chunks no longer referenced.
    pub freed: Vec<u64>,
    /// Data chunks still referenced, by fewer pages or volumes than
    /// before: an in-place write to one of them is safe only once the
    /// record is durable, since a crash that loses the record shares the
    /// chunk again.
    pub unshared: Vec<u64>,
}

/// What [`Mapping::lookup`] found for a virtual chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A hole: reads as zeros, a write allocates.
    Hole,
    /// Mapped to `chunk`; `exclusive` when no other volume shares it, so
    /// a write may go in place.
    Mapped {
        /// The data chunk.
        chunk: u64,
        /// Whether a write may overwrite it in place.
        exclusive: bool,
    },
}

fn vchunks(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

fn page_slots(size: u64, chunk_size: u64) -> usize {
    vchunks(size, chunk_size).div_ceil(PAGE_ENTRIES) as usize
}

impl Mapping {
    /// An empty pool of `data_chunks` chunks of `chunk_size` bytes.
    pub fn new(data_chunks: u64, chunk_size: u64) -> Mapping {
        Mapping {
            chunk_size,
            pages: Vec::new(),
            free_pages: Vec::new(),
            volumes: BTreeMap::new(),
            refcounts: vec![0; data_chunks as usize],
            next_volume_id: 1,
            unshared: Vec::new(),
        }
    }

    /// Data chunks in the pool.
    pub fn data_chunks(&self) -> u64 {
        self.refcounts.len() as u64
    }

    /// The id the next new volume gets.
    pub fn next_volume_id(&self) -> u32 {
        self.next_volume_id
    }

    /// A data chunk's reference count.
    pub fn refcount(&self, chunk: u64) -> u32 {
        self.refcounts.get(chunk as usize).copied().unwrap_or(0)
    }

    /// Every volume, by id.
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeMeta> {
        self.volumes.values().map(|v| &v.meta)
    }

    /// One volume.
    pub fn volume(&self, id: u32) -> Option<&VolumeMeta> {
        self.volumes.get(&id).map(|v| &v.meta)
    }

    /// Sum of all volume sizes.
    pub fn virtual_bytes(&self) -> u64 {
        self.volumes.values().map(|v| v.meta.size).sum()
    }

    /// Chunks the volume maps (shared or not).
    pub fn mapped_chunks(&self, id: u32) -> u64 {
        let Some(v) = self.volumes.get(&id) else {
            return 0;
        };
        v.pages
            .iter()
            .flatten()
            .filter_map(|&p| self.page(p))
            .map(|p| u64::from(p.mapped))
            .sum()
    }

    fn page(&self, id: u32) -> Option<&Page> {
        self.pages.get(id as usize).and_then(Option::as_ref)
    }

    /// What virtual chunk `vchunk` of volume `id` maps to.
    pub fn lookup(&self, id: u32, vchunk: u64) -> Lookup {
        let Some(v) = self.volumes.get(&id) else {
            return Lookup::Hole;
        };
        let slot = (vchunk / PAGE_ENTRIES) as usize;
        let Some(Some(pid)) = v.pages.get(slot) else {
            return Lookup::Hole;
        };
        let Some(page) = self.page(*pid) else {
            return Lookup::Hole;
        };
        match page.entries[(vchunk % PAGE_ENTRIES) as usize] {
            0 => Lookup::Hole,
            e => {
                let chunk = e - 1;
                Lookup::Mapped {
                    chunk,
                    exclusive: page.refs == 1 && self.refcount(chunk) == 1,
                }
            }
        }
    }

    fn new_page(&mut self, page: Page) -> u32 {
        if let Some(id) = self.free_pages.pop() {
            self.pages[id as usize] = Some(page);
            id
        } else {
            self.pages.push(Some(page));
            (self.pages.len() - 1) as u32
        }
    }

    /// Drops one reference to page `pid`; frees it (and drops its chunk
    /// references) at zero. Chunks reaching zero go to `freed`.
    fn unref_page(&mut self, pid: u32, freed: &mut Vec<u64>) {
        let Some(page) = self.pages.get_mut(pid as usize).and_then(Option::as_mut) else {
            return;
        };
        page.refs -= 1;
        if page.refs > 0 {
            // The page's remaining holders may now own its chunks alone.
            let entries = page.entries.iter().filter(|&&e| e != 0).map(|e| e - 1);
            self.unshared.extend(entries);
            return;
        }
        let page = self.pages[pid as usize].take().expect("page checked above");
        self.free_pages.push(pid);
        for &e in page.entries.iter().filter(|&&e| e != 0) {
            let rc = &mut self.refcounts[(e - 1) as usize];
            *rc -= 1;
            if *rc == 0 {
                freed.push(e - 1);
            } else {
                self.unshared.push(e - 1);
            }
        }
    }

    /// Makes the page under (`id`, slot) private to the volume, creating
    /// an empty one for a hole; returns its id.
    fn private_page(&mut self, id: u32, slot: usize) -> u32 {
        let current = self.volumes[&id].pages[slot];
        let pid = match current {
            None => self.new_page(Page {
                refs: 1,
                mapped: 0,
                entries: vec![0; PAGE_ENTRIES as usize].into_boxed_slice(),
            }),
            Some(pid)
                if self.pages[pid as usize]
                    .as_ref()
                    .is_some_and(|p| p.refs == 1) =>
            {
                return pid;
            }
            Some(pid) => {
                let old = self.pages[pid as usize]
                    .as_mut()
                    .expect("named page exists");
                old.refs -= 1;
                let copy = Page {
                    refs: 1,
                    mapped: old.mapped,
                    entries: old.entries.clone(),
                };
                for &e in copy.entries.iter().filter(|&&e| e != 0) {
                    self.refcounts[(e - 1) as usize] += 1;
                }
                self.new_page(copy)
            }
        };
        self.volumes.get_mut(&id).expect("volume checked").pages[slot] = Some(pid);
        pid
    }

    /// Sets or clears one entry; returns chunks whose count fell to zero.
    fn set_entry(&mut self, id: u32, vchunk: u64, new: Option<u64>) -> Vec<u64> {
        let mut freed = Vec::new();
        let slot = (vchunk / PAGE_ENTRIES) as usize;
        let idx = (vchunk % PAGE_ENTRIES) as usize;
        if new.is_none() && matches!(self.lookup(id, vchunk), Lookup::Hole) {
            return freed;
        }
        let pid = self.private_page(id, slot);
        let page = self.pages[pid as usize]
            .as_mut()
            .expect("private page exists");
        let old = page.entries[idx];
        page.entries[idx] = new.map_or(0, |c| c + 1);
        match (old != 0, new.is_some()) {
            (false, true) => page.mapped += 1,
            (true, false) => page.mapped -= 1,
            _ => {}
        }
        let empty = page.mapped == 0;
        if let Some(c) = new {
            self.refcounts[c as usize] += 1;
        }
        if old != 0 {
            let rc = &mut self.refcounts[(old - 1) as usize];
            *rc -= 1;
            if *rc == 0 {
                freed.push(old - 1);
            } else {
                self.unshared.push(old - 1);
            }
        }
        if empty {
            // A page of holes is a hole: drop it.
            self.volumes.get_mut(&id).expect("volume checked").pages[slot] = None;
            self.unref_page(pid, &mut freed);
        }
        freed
    }

    /// Checks that `record` can apply, without changing anything.
    pub fn check(&self, record: &Record) -> Result<(), ApplyError> {
        let vol = |id: u32| self.volumes.get(&id).ok_or(ApplyError::NoVolume(id));
        let in_range = |id: u32, vchunk: u64| -> Result<(), ApplyError> {
            if vchunk >= vchunks(vol(id)?.meta.size, self.chunk_size) {
                return Err(ApplyError::OutOfRange { volume: id, vchunk });
            }
            Ok(())
        };
        match record {
            Record::CreateVolume(m) | Record::Snapshot { volume: m, .. } => {
                if self.volumes.contains_key(&m.id) || m.id == 0 {
                    return Err(ApplyError::VolumeExists(m.id));
                }
                if let Record::Snapshot { source, .. } = record {
                    vol(*source)?;
                }
            }
            Record::Resize { volume, size } => {
                if *size < vol(*volume)?.meta.size {
                    return Err(ApplyError::Shrink { volume: *volume });
                }
            }
            Record::Delete { volume } => {
                vol(*volume)?;
            }
            Record::Map {
                volume,
                vchunk,
                chunk,
            } => {
                in_range(*volume, *vchunk)?;
                if *chunk >= self.data_chunks() || self.refcount(*chunk) != 0 {
                    return Err(ApplyError::ChunkInUse(*chunk));
                }
            }
            Record::Unmap { volume, vchunk } => in_range(*volume, *vchunk)?,
            Record::Commit { .. } => {}
        }
        Ok(())
    }

    /// Applies one change; returns the data chunks it left unreferenced.
    pub fn apply(&mut self, record: &Record) -> Result<Vec<u64>, ApplyError> {
        Ok(self.apply_tracked(record)?.freed)
    }

    /// Applies one change; returns the chunks it freed and those it left
    /// less shared.
    pub fn apply_tracked(&mut self, record: &Record) -> Result<Applied, ApplyError> {
        self.unshared.clear();
        let freed = self.apply_inner(record)?;
        let mut unshared = std::mem::take(&mut self.unshared);
        unshared.sort_unstable();
        unshared.dedup();
        Ok(Applied { freed, unshared })
    }

    fn apply_inner(&mut self, record: &Record) -> Result<Vec<u64>, ApplyError> {
        self.check(record)?;
        let mut freed = Vec::new();
        match record {
            Record::CreateVolume(m) => {
                let slots = page_slots(m.size, self.chunk_size);
                self.volumes.insert(
                    m.id,
                    VolumeMap {
                        meta: m.clone(),
                        pages: vec![None; slots],
                    },
                );
                self.next_volume_id = self.next_volume_id.max(m.id + 1);
            }
            Record::Snapshot { source, volume } => {
                let mut pages = self.volumes[source].pages.clone();
                for pid in pages.iter().flatten() {
                    if let Some(p) = self.pages.get_mut(*pid as usize).and_then(Option::as_mut) {
                        p.refs += 1;
                    }
                }
                let mut meta = volume.clone();
                // A snapshot is as large as its source at that moment.
                meta.size = meta.size.max(self.volumes[source].meta.size);
                pages.resize(page_slots(meta.size, self.chunk_size), None);
                self.volumes.insert(volume.id, VolumeMap { meta, pages });
                self.next_volume_id = self.next_volume_id.max(volume.id + 1);
            }
            Record::Resize { volume, size } => {
                let chunk_size = self.chunk_size;
                let v = self.volumes.get_mut(volume).expect("checked");
                v.meta.size = *size;
                v.pages.resize(page_slots(*size, chunk_size), None);
            }
            Record::Delete { volume } => {
                let v = self.volumes.remove(volume).expect("checked");
                for pid in v.pages.into_iter().flatten() {
                    self.unref_page(pid, &mut freed);
                }
            }
            Record::Map {
                volume,
                vchunk,
                chunk,
            } => freed = self.set_entry(*volume, *vchunk, Some(*chunk)),
            Record::Unmap { volume, vchunk } => freed = self.set_entry(*volume, *vchunk, None),
            Record::Commit { .. } => {}
        }
        Ok(freed)
    }

    /// Data chunks with no reference, ascending.
    pub fn unreferenced_chunks(&self) -> Vec<u64> {
        (0..self.data_chunks())
            .filter(|&c| self.refcounts[c as usize] == 0)
            .collect()
    }

    /// Checks every invariant of the module doc, and that `free` and
    /// `pending` (chunks the pool may hand out, and chunks freed since the
    /// last commit) together are exactly the unreferenced chunks, each
    /// once.
    pub fn verify(&self, free: &[u64], pending: &[u64]) -> Result<(), VerifyError> {
        let mut chunk_refs = vec![0u32; self.refcounts.len()];
        let mut page_refs: HashMap<u32, u32> = HashMap::new();
        for v in self.volumes.values() {
            for &pid in v.pages.iter().flatten() {
                if self.page(pid).is_none() {
                    return Err(VerifyError::MissingPage {
                        volume: v.meta.id,
                        page: pid,
                    });
                }
                *page_refs.entry(pid).or_default() += 1;
            }
        }
        for (pid, page) in self.pages.iter().enumerate() {
            let Some(page) = page else { continue };
            let pid = pid as u32;
            let actual = page_refs.get(&pid).copied().unwrap_or(0);
            if page.refs != actual || actual == 0 {
                return Err(VerifyError::PageRefcount {
                    page: pid,
                    stored: page.refs,
                    actual,
                });
            }
            let mut mapped = 0;
            for &e in page.entries.iter().filter(|&&e| e != 0) {
                let chunk = e - 1;
                let Some(r) = chunk_refs.get_mut(chunk as usize) else {
                    return Err(VerifyError::ChunkOutOfRange { page: pid, chunk });
                };
                *r += 1;
                mapped += 1;
            }
            if mapped != page.mapped {
                return Err(VerifyError::PageMapped {
                    page: pid,
                    stored: page.mapped,
                    actual: mapped,
                });
            }
        }
        for (chunk, (&stored, &actual)) in self.refcounts.iter().zip(&chunk_refs).enumerate() {
            if stored != actual {
                return Err(VerifyError::ChunkRefcount {
                    chunk: chunk as u64,
                    stored,
                    actual,
                });
            }
        }
        let mut seen = vec![false; self.refcounts.len()];
        for &c in free.iter().chain(pending) {
            let Some(s) = seen.get_mut(c as usize) else {
                return Err(VerifyError::DoublyOwned {
                    chunk: c,
                    why: "free chunk past the pool's end",
                });
            };
            if *s {
                return Err(VerifyError::DoublyOwned {
                    chunk: c,
                    why: "free twice",
                });
            }
            *s = true;
            if chunk_refs[c as usize] != 0 {
                return Err(VerifyError::DoublyOwned {
                    chunk: c,
                    why: "free and mapped",
                });
            }
        }
        for (c, (&s, &r)) in seen.iter().zip(&chunk_refs).enumerate() {
            if !s && r == 0 {
                return Err(VerifyError::Leaked { chunk: c as u64 });
            }
        }
        Ok(())
    }

    /// The checkpoint body: every volume and every live page. Reference
    /// counts are not stored; [`Mapping::decode`] recomputes them.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(self.chunk_size).u32(self.next_volume_id);
        let live: Vec<(u32, &Page)> = self
            .pages
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i as u32, p)))
            .collect();
        e.u32(live.len() as u32);
        for (pid, page) in &live {
            e.u32(*pid).u32(page.mapped);
            for (i, &entry) in page.entries.iter().enumerate() {
                if entry != 0 {
                    e.u16(i as u16).u64(entry - 1);
                }
            }
        }
        e.u32(self.volumes.len() as u32);
        for v in self.volumes.values() {
            v.meta.encode(&mut e);
            let named = v.pages.iter().filter(|p| p.is_some()).count();
            e.u32(named as u32);
            for (slot, pid) in v.pages.iter().enumerate() {
                if let Some(pid) = pid {
                    e.u32(slot as u32).u32(*pid);
                }
            }
        }
        e.0
    }

    /// Rebuilds the state from a checkpoint body, recounting references;
    /// checks every reference it reads.
    pub fn decode(body: &[u8], data_chunks: u64, chunk_size: u64) -> Result<Mapping, FormatError> {
        let mut d = Dec::new(body, "checkpoint");
        if d.u64()? != chunk_size {
            return Err(d.invalid("chunk size"));
        }
        let mut m = Mapping::new(data_chunks, chunk_size);
        m.next_volume_id = d.u32()?;
        let npages = d.u32()?;
        for _ in 0..npages {
            let pid = d.u32()?;
            let mapped = d.u32()?;
            if mapped as u64 > PAGE_ENTRIES || pid as usize > body.len() {
                return Err(d.invalid("page"));
            }
            let mut entries = vec![0u64; PAGE_ENTRIES as usize].into_boxed_slice();
            for _ in 0..mapped {
                let idx = usize::from(d.u16()?);
                let chunk = d.u64()?;
                if idx >= entries.len() || entries[idx] != 0 || chunk >= data_chunks {
                    return Err(d.invalid("page entry"));
                }
                entries[idx] = chunk + 1;
                m.refcounts[chunk as usize] += 1;
            }
            if m.pages.len() <= pid as usize {
                m.pages.resize(pid as usize + 1, None);
            }
            if m.pages[pid as usize].is_some() {
                return Err(d.invalid("duplicate page"));
            }
            m.pages[pid as usize] = Some(Page {
                refs: 0,
                mapped,
                entries,
            });
        }
        let nvols = d.u32()?;
        for _ in 0..nvols {
            let meta = VolumeMeta::decode(&mut d)?;
            if meta.id == 0 || meta.id >= m.next_volume_id || m.volumes.contains_key(&meta.id) {
                return Err(d.invalid("volume id"));
            }
            let mut pages = vec![None; page_slots(meta.size, chunk_size)];
            let named = d.u32()?;
            for _ in 0..named {
                let slot = d.u32()? as usize;
                let pid = d.u32()?;
                let page = m.pages.get_mut(pid as usize).and_then(Option::as_mut);
                match (pages.get_mut(slot), page) {
                    (Some(s @ None), Some(page)) => {
                        *s = Some(pid);
                        page.refs += 1;
                    }
                    _ => return Err(d.invalid("page table")),
                }
            }
            m.volumes.insert(meta.id, VolumeMap { meta, pages });
        }
        if d.remaining() != 0 {
            return Err(d.invalid("trailing bytes"));
        }
        for (pid, slot) in m.pages.iter_mut().enumerate() {
            match slot {
                Some(p) if p.refs == 0 => return Err(d.invalid("unreferenced page")),
                Some(_) => {}
                None => m.free_pages.push(pid as u32),
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;

    fn meta(id: u32, size: u64) -> VolumeMeta {
        VolumeMeta {
            id,
            uid: [id as u8; 16],
            name: format!("v{id}"),
            size,
            read_only: false,
            created: 0,
        }
    }

    fn verify(m: &Mapping) {
        let free = m.unreferenced_chunks();
        m.verify(&free, &[]).unwrap();
    }

    #[test]
    fn snapshot_shares_then_copies_on_write() {
        let mut m = Mapping::new(100, CS);
        m.apply(&Record::CreateVolume(meta(1, 10 * CS))).unwrap();
        for v in 0..3 {
            m.apply(&Record::Map {
                volume: 1,
                vchunk: v,
                chunk: v,
            })
            .unwrap();
        }
        assert_eq!(
            m.lookup(1, 0),
            Lookup::Mapped {
                chunk: 0,
                exclusive: true
            }
        );
        m.apply(&Record::Snapshot {
            source: 1,
            volume: meta(2, 0),
        })
        .unwrap();
        verify(&m);
        // Shared page: no longer exclusive for either volume.
        assert_eq!(
            m.lookup(1, 0),
            Lookup::Mapped {
                chunk: 0,
                exclusive: false
            }
        );
        assert_eq!(m.volume(2).unwrap().size, 10 * CS);
        // Copy on write of chunk 0 into chunk 50.
        let freed = m
            .apply(&Record::Map {
                volume: 1,
                vchunk: 0,
                chunk: 50,
            })
            .unwrap();
        assert!(freed.is_empty(), "the snapshot still holds chunk 0");
        verify(&m);
        assert_eq!(
            m.lookup(2, 0),
            Lookup::Mapped {
                chunk: 0,
                exclusive: true
            }
        );
        assert_eq!(m.refcount(1), 2);
        // Deleting the snapshot frees only what it alone held.
        let freed = m.apply(&Record::Delete { volume: 2 }).unwrap();
        assert_eq!(freed, vec![0]);
        verify(&m);
        assert_eq!(m.refcount(1), 1);
        // A chunk cannot be mapped twice.
        assert_eq!(
            m.apply(&Record::Map {
                volume: 1,
                vchunk: 5,
                chunk: 1,
            }),
            Err(ApplyError::ChunkInUse(1))
        );
        // Unmapping everything drops the page.
        for v in 0..3 {
            m.apply(&Record::Unmap {
                volume: 1,
                vchunk: v,
            })
            .unwrap();
        }
        verify(&m);
        assert_eq!(m.unreferenced_chunks().len(), 100);
        assert_eq!(m.pages.iter().flatten().count(), 0);
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut m = Mapping::new(5000, CS);
        m.apply(&Record::CreateVolume(meta(1, 3000 * CS))).unwrap();
        for v in (0..3000).step_by(3) {
            m.apply(&Record::Map {
                volume: 1,
                vchunk: v,
                chunk: v + 1,
            })
            .unwrap();
        }
        m.apply(&Record::Snapshot {
            source: 1,
            volume: meta(2, 0),
        })
        .unwrap();
        m.apply(&Record::Map {
            volume: 2,
            vchunk: 1,
            chunk: 4000,
        })
        .unwrap();
        let bytes = m.encode();
        let back = Mapping::decode(&bytes, 5000, CS).unwrap();
        verify(&back);
        assert_eq!(back.refcounts, m.refcounts);
        assert_eq!(back.volumes.len(), 2);
        for v in 0..3000 {
            assert_eq!(back.lookup(1, v), m.lookup(1, v));
            assert_eq!(back.lookup(2, v), m.lookup(2, v));
        }
        // Damage never panics.
        for cut in [0, 5, 20, bytes.len() / 2, bytes.len() - 1] {
            assert!(Mapping::decode(&bytes[..cut], 5000, CS).is_err());
        }
    }

    #[test]
    fn verify_catches_leaks_and_double_ownership() {
        let mut m = Mapping::new(10, CS);
        m.apply(&Record::CreateVolume(meta(1, 10 * CS))).unwrap();
        m.apply(&Record::Map {
            volume: 1,
            vchunk: 0,
            chunk: 3,
        })
        .unwrap();
        let free: Vec<u64> = m.unreferenced_chunks();
        m.verify(&free, &[]).unwrap();
        assert!(matches!(
            m.verify(&free[1..], &[]),
            Err(VerifyError::Leaked { .. })
        ));
        let mut double = free.clone();
        double.push(3);
        assert!(matches!(
            m.verify(&double, &[]),
            Err(VerifyError::DoublyOwned { chunk: 3, .. })
        ));
        m.refcounts[3] = 2;
        assert!(matches!(
            m.verify(&free, &[]),
            Err(VerifyError::ChunkRefcount { chunk: 3, .. })
        ));
    }
}
