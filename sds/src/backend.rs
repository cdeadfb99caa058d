//! Where a pool's bytes live: the [`Backend`] trait, its file (or block
//! device) implementation, and a memory implementation that simulates
//! power loss and I/O errors for tests.
//!
//! Contract every backend keeps:
//! - a completed [`Backend::write_at`] is visible to every later
//!   [`Backend::read_at`] (the page cache survives a process crash);
//! - a completed [`Backend::sync`] makes every write completed before it
//!   durable (it survives a power loss); writes not covered by a sync may
//!   be lost, partly or wholly, in any order, at sector granularity.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::pipe::Pipe;

/// A byte store a pool lives on.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset` only if that waits on
    /// no device (every byte is in memory, e.g. the page cache): `Ok(false)`
    /// when it would wait, `buf` then holding nothing useful. The default
    /// never tries.
    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }
    /// Where the `len` bytes at `offset` lie in memory, if the backend
    /// maps its store and every one of those bytes is resident (reading
    /// them waits on no device); `None` otherwise. The default never maps.
    ///
    /// The memory stays mapped while the backend lives, but its bytes
    /// change under concurrent writes: it is only ever handed to the
    /// kernel (a send copies it), never read through a Rust reference.
    fn resident(&self, offset: u64, len: usize) -> Option<std::ptr::NonNull<u8>> {
        let _ = (offset, len);
        None
    }
    /// Writes the next `len` bytes waiting in `pipe` at `offset`, as
    /// [`Backend::write_at`] would write them from memory. The default
    /// reads them out of the pipe first; a file splices them, one copy
    /// fewer.
    fn write_from_pipe(&self, pipe: &Pipe, len: usize, offset: u64) -> io::Result<()> {
        let mut buf = vec![0u8; len];
        pipe.read_exact(&mut buf)?;
        self.write_at(&buf, offset)
    }
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// The store's size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the store has no bytes at all.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Errors opening a file backend.
#[derive(Debug, thiserror::Error)]
pub enum FileBackendError {
    /// The file could not be opened or created.
    #[error("could not open {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process holds the pool (an exclusive `flock`).
    #[error("{path} is in use by another process (is `basaltd storage serve` running on it?)")]
    Locked {
        /// The path.
        path: PathBuf,
    },
    /// The file could not be sized.
    #[error("could not size {path} to {size} bytes")]
    Size {
        /// The path.
        path: PathBuf,
        /// The size asked for.
        size: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A pool on a regular file or a block device, through the page cache.
/// Holds an exclusive `flock` on it for as long as it is open, so two
/// processes never run one pool. The store is also mapped read-only, so
/// resident bytes can be sent without a copy into a buffer first
/// ([`Backend::resident`]).
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    map: Option<Map>,
}

/// A read-only shared mapping of a whole store.
#[derive(Debug)]
struct Map {
    at: std::ptr::NonNull<u8>,
    len: usize,
    page: usize,
}

// SAFETY: the mapping is plain memory shared with the page cache; it is
// never read or written through Rust references (only its address is
// handed to the kernel), so any thread may hold and use it.
unsafe impl Send for Map {}
// SAFETY: as for Send: the struct itself is immutable after creation.
unsafe impl Sync for Map {}

impl Map {
    /// Maps the first `len` bytes of `file`; `None` when that fails
    /// (the backend then simply reads with copies).
    fn new(file: &File, len: u64) -> Option<Map> {
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        // SAFETY: sysconf has no memory effects.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        // SAFETY: a fresh read-only shared mapping of an open fd; the
        // kernel picks the address, and nothing aliases it yet.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return None;
        }
        Some(Map {
            at: std::ptr::NonNull::new(at.cast())?,
            len,
            page,
        })
    }

    /// See [`Backend::resident`]: in range and every page in memory
    /// (`mincore`).
    fn resident(&self, offset: u64, len: usize) -> Option<std::ptr::NonNull<u8>> {
        let offset = usize::try_from(offset).ok()?;
        if len == 0 || offset.checked_add(len)? > self.len {
            return None;
        }
        let first = offset / self.page * self.page;
        let end = (offset + len).div_ceil(self.page) * self.page;
        let pages = (end - first) / self.page;
        let mut present = vec![0u8; pages];
        // SAFETY: `first..end` lies inside the mapping (page-aligned;
        // `end` may pass `self.len` only within its last page, which the
        // mapping covers), and `present` has one byte per page.
        let rc = unsafe {
            libc::mincore(
                self.at.as_ptr().add(first).cast(),
                end - first,
                present.as_mut_ptr(),
            )
        };
        if rc != 0 || present.iter().any(|p| p & 1 == 0) {
            return None;
        }
        // SAFETY: `offset` is inside the mapping (checked above).
        std::ptr::NonNull::new(unsafe { self.at.as_ptr().add(offset) })
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no pointer into
        // it outlives the backend (callers use them only while borrowing
        // it).
        unsafe {
            libc::munmap(self.at.as_ptr().cast(), self.len);
        }
    }
}

impl FileBackend {
    /// Creates `path` as a sparse file of `size` bytes (or, for an
    /// existing block device, uses it as it is) and locks it.
    pub fn create(path: &Path, size: u64) -> Result<FileBackend, FileBackendError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| FileBackendError::Open {
                path: path.to_owned(),
                source,
            })?;
        let backend = FileBackend::locked(file, path)?;
        let meta = backend
            .file
            .metadata()
            .map_err(|source| FileBackendError::Open {
                path: path.to_owned(),
                source,
            })?;
        let mut backend = backend;
        if meta.is_file() {
            backend
                .file
                .set_len(size)
                .map_err(|source| FileBackendError::Size {
                    path: path.to_owned(),
                    size,
                    source,
                })?;
        }
        backend.map = backend
            .len()
            .ok()
            .and_then(|len| Map::new(&backend.file, len));
        Ok(backend)
    }

    /// Opens an existing pool file or block device and locks it.
    pub fn open(path: &Path) -> Result<FileBackend, FileBackendError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| FileBackendError::Open {
                path: path.to_owned(),
                source,
            })?;
        let mut backend = FileBackend::locked(file, path)?;
        backend.map = backend
            .len()
            .ok()
            .and_then(|len| Map::new(&backend.file, len));
        Ok(backend)
    }

    fn locked(file: File, path: &Path) -> Result<FileBackend, FileBackendError> {
        // SAFETY: flock on a file descriptor we own; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(FileBackendError::Locked {
                    path: path.to_owned(),
                });
            }
            return Err(FileBackendError::Open {
                path: path.to_owned(),
                source: err,
            });
        }
        // No readahead: neighbours in the store belong to unrelated
        // virtual places (a thin pool), and readahead's large page-cache
        // folios make every later small write walk all of a folio's
        // blocks (ext4: a 4 KiB random write cost ~12x more after one
        // sequential read of the store). Reads still fetch what they ask.
        // SAFETY: an advice call on a file descriptor we own.
        let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        Ok(FileBackend {
            file,
            path: path.to_owned(),
            map: None,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Backend for FileBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        // preadv2 with RWF_NOWAIT copies only what the page cache holds
        // and answers EAGAIN instead of starting device I/O.
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            let at = offset
                .checked_add(done as u64)
                .and_then(|o| libc::off_t::try_from(o).ok())
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: `iov` describes `rest`, memory this call borrows
            // mutably and that outlives the call; the fd is open for
            // `self`'s lifetime.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) => Ok(false),
                    _ if e.kind() == io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            done += n as usize;
        }
        Ok(true)
    }

    fn resident(&self, offset: u64, len: usize) -> Option<std::ptr::NonNull<u8>> {
        self.map.as_ref()?.resident(offset, len)
    }

    fn write_from_pipe(&self, pipe: &Pipe, len: usize, offset: u64) -> io::Result<()> {
        pipe.drain_to(self.file.as_fd(), offset, len)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.is_file() {
            return Ok(meta.len());
        }
        // A block device: its size is where a seek to the end lands.
        let mut f = &self.file;
        io::Seek::seek(&mut f, io::SeekFrom::End(0))
    }
}

/// The sector size at which [`MemBackend::crash`] tears unsynced writes.
pub const SECTOR: usize = 512;

/// A memory backend for tests: it remembers which writes have not been
/// synced, can drop any subset of them as a power loss would
/// ([`MemBackend::crash`]), and can be told to fail I/O.
pub struct MemBackend {
    state: Mutex<MemState>,
}

impl fmt::Debug for MemBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("MemBackend")
            .field("len", &st.current.len())
            .field("unsynced", &st.unsynced.len())
            .finish()
    }
}

#[derive(Default)]
struct MemState {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a power loss.
    durable: Vec<u8>,
    /// Writes since the last sync, in order.
    unsynced: Vec<(u64, Vec<u8>)>,
    /// Writes left before every I/O fails (`None`: never).
    writes_until_failure: Option<u64>,
}

impl MemBackend {
    /// A zeroed store of `len` bytes, all durable.
    pub fn new(len: usize) -> MemBackend {
        MemBackend {
            state: Mutex::new(MemState {
                current: vec![0; len],
                durable: vec![0; len],
                ..MemState::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        // A test that panicked while holding the lock already failed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store after a process crash (`kill -9`): every completed write
    /// is kept (the page cache survives).
    pub fn process_crash(&self) -> MemBackend {
        let st = self.lock();
        MemBackend {
            state: Mutex::new(MemState {
                current: st.current.clone(),
                durable: st.durable.clone(),
                unsynced: st.unsynced.clone(),
                writes_until_failure: None,
            }),
        }
    }

    /// The store after a power loss: the durable image plus a random
    /// subset of the unsynced writes, each torn at [`SECTOR`] granularity,
    /// chosen by `keep(write index, sector index)`.
    pub fn crash(&self, mut keep: impl FnMut(usize, usize) -> bool) -> MemBackend {
        let st = self.lock();
        let mut image = st.durable.clone();
        for (i, (offset, data)) in st.unsynced.iter().enumerate() {
            let start = *offset as usize;
            let end = start + data.len();
            let mut pos = start;
            let mut sector = 0;
            while pos < end {
                let next = ((pos / SECTOR) + 1) * SECTOR;
                let piece_end = next.min(end);
                if keep(i, sector) {
                    image[pos..piece_end].copy_from_slice(&data[pos - start..piece_end - start]);
                }
                pos = piece_end;
                sector += 1;
            }
        }
        MemBackend {
            state: Mutex::new(MemState {
                current: image.clone(),
                durable: image,
                ..MemState::default()
            }),
        }
    }

    /// After `writes` more successful writes, every read, write and sync
    /// fails with an I/O error (a dying disk).
    pub fn fail_after_writes(&self, writes: u64) {
        self.lock().writes_until_failure = Some(writes);
    }

    /// The device works again: I/O no longer fails.
    pub fn heal(&self) {
        self.lock().writes_until_failure = None;
    }

    /// How many writes are not yet synced.
    pub fn unsynced_writes(&self) -> usize {
        self.lock().unsynced.len()
    }
}

fn injected() -> io::Error {
    io::Error::other("injected I/O error")
}

fn range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    let start =
        usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let end = start
        .checked_add(n)
        .filter(|&e| e <= len)
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    Ok(start..end)
}

impl Backend for MemBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.lock();
        if st.writes_until_failure == Some(0) {
            return Err(injected());
        }
        let r = range(st.current.len(), offset, buf.len())?;
        buf.copy_from_slice(&st.current[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.lock();
        match st.writes_until_failure {
            Some(0) => return Err(injected()),
            Some(n) => st.writes_until_failure = Some(n - 1),
            None => {}
        }
        let r = range(st.current.len(), offset, buf.len())?;
        st.current[r].copy_from_slice(buf);
        st.unsynced.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.lock();
        if st.writes_until_failure == Some(0) {
            return Err(injected());
        }
        let st = &mut *st;
        st.durable.copy_from_slice(&st.current);
        st.unsynced.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_loss_keeps_synced_writes_and_drops_the_rest() {
        let b = MemBackend::new(4096);
        b.write_at(&[1; 1024], 0).unwrap();
        b.sync().unwrap();
        b.write_at(&[2; 1024], 1024).unwrap();
        let none = b.crash(|_, _| false);
        let mut buf = [0u8; 2048];
        none.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1024].iter().all(|&x| x == 1));
        assert!(buf[1024..].iter().all(|&x| x == 0));
        // Torn: only the second sector of the unsynced write survives.
        let torn = b.crash(|_, s| s == 1);
        torn.read_at(&mut buf, 0).unwrap();
        assert!(buf[1024..1536].iter().all(|&x| x == 0));
        assert!(buf[1536..].iter().all(|&x| x == 2));
    }

    #[test]
    fn injected_failures_fail_io() {
        let b = MemBackend::new(4096);
        b.fail_after_writes(1);
        b.write_at(&[1; 10], 0).unwrap();
        assert!(b.write_at(&[1; 10], 0).is_err());
        assert!(b.sync().is_err());
        let mut buf = [0u8; 4];
        assert!(b.read_at(&mut buf, 0).is_err());
    }

    #[test]
    fn out_of_range_io_is_an_error() {
        let b = MemBackend::new(100);
        assert!(b.write_at(&[0; 10], 95).is_err());
        let mut buf = [0u8; 10];
        assert!(b.read_at(&mut buf, u64::MAX).is_err());
    }
}
