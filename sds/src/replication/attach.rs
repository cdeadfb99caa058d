//! Attachments: the replication role of every volume of this storage
//! process, set at run time (the storage-local API's `AttachVolume`, or
//! `basaltd storage serve --peer` at start), and the gate every NBD write
//! passes through.
//!
//! - **never attached** (every volume at first): written by NBD clients,
//!   not replicated; the replica server accepts primaries for it (the
//!   operator's mode: `--peer` on one process, `--replica-listen` on the
//!   other);
//! - **standalone**: written by NBD clients, not replicated, primaries
//!   refused;
//! - **secondary**: written only by primaries, through the replica
//!   server; NBD clients read it, their writes get EPERM;
//! - **primary**: NBD writes go through one [`Replicator`] per peer
//!   (protocol C unless the spec says A or B); the replica server also accepts other primaries of the
//!   same epoch (two primaries during a live migration). A lost peer is
//!   confirmed outdated by the process's fencer ([`AttachOptions::fencer`],
//!   the node agent's in `basaltd storage serve`), or not at all with
//!   `allow_outdate` (writes go on, the peer's chunks are tracked).
//!
//! Invariants:
//! - attaching again with the same spec changes nothing (no reconnection);
//! - a change waits for the writes in flight (up to a bound: writes
//!   suspended by a denying fencer on a peer that stays cannot finish),
//!   replicators of peers that stay keep their connection and dirty set,
//!   and new ones start only once no write is in flight, so every write is
//!   either shipped or tracked by each peer's replicator;
//! - a primary's writes are refused, before anything is written, once the
//!   pool has seen a newer epoch for the volume than the attachment's;
//! - attaching a primary with an epoch older than the newest seen fails;
//! - with a file ([`Attachments::persistent`]), every attachment is on
//!   disk once `attach` returns, and a restarted process restores them
//!   before it serves: a secondary never comes back writable, a primary
//!   comes back a primary with the same streams (their generations and
//!   dirty chunks are in the dirty logs, `POOL.dirty/`), so its peers get
//!   only the chunks they may miss;
//! - a stream's dirty log is deleted when the stream ends for good (its
//!   peer removed, the volume no longer a primary, detached or deleted),
//!   so a log found at start always belongs to a primary that was
//!   stopped while it was one.
//! - a primary whose disk was detached grows its own copy to the size its
//!   peers grew to meanwhile before anything is copied back, and its
//!   writes are held only for the switch back ([`Attachments::attach_disk`]):
//!   until a chunk written while detached is copied back, reads of it go
//!   to a peer and a write to it copies it back first, so the copy-back
//!   never overwrites a newer write.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Write};
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::book::ReplicaBook;
use super::dirty_log::{self, DirtyLog, LogKey};
#[cfg(doc)]
use super::fence::AgentFencer;
use super::{
    Fencer, Op, Protocol, ReplicationError, ReplicationStatus, Replicator, ReplicatorConfig,
    StaticFencer, SyncOptions, VerifyError, VerifyReport,
};
use crate::pool::{Pool, PoolError, VolumeInfo};

/// What a volume is to replication here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Written by NBD clients, not replicated, primaries refused.
    Standalone,
    /// Written by primaries only; NBD clients may read it.
    Secondary,
    /// Written by NBD clients and shipped to every peer.
    Primary,
}

/// A volume's wanted replication state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    /// The role.
    pub role: Role,
    /// A primary's epoch; a secondary's oldest accepted epoch.
    pub epoch: u64,
    /// A primary's peers, as `host:port` replication addresses.
    pub peers: Vec<String>,
    /// A primary goes on without a lost peer (tracking its dirty chunks)
    /// instead of suspending writes until it is back.
    pub allow_outdate: bool,
    /// A primary's replication protocol: when its writes are
    /// acknowledged (C by default).
    pub protocol: Protocol,
}

impl Default for AttachSpec {
    /// Standalone, epoch 0, no peers, protocol C.
    fn default() -> Self {
        AttachSpec {
            role: Role::Standalone,
            epoch: 0,
            peers: Vec::new(),
            allow_outdate: false,
            protocol: Protocol::C,
        }
    }
}

/// Settings shared by every attachment of a process.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Who confirms a lost peer outdated for a primary attached without
    /// `allow_outdate`: the node agent ([`AgentFencer`], which refuses
    /// while no agent watches), or a fixed answer.
    pub fencer: Arc<dyn Fencer>,
    /// How often a replicator retries an away peer.
    pub retry: Duration,
    /// Most data bytes per second one resync or full sync sends (0: no
    /// limit).
    pub sync_rate: u64,
    /// How long a change waits for writes in flight before going on
    /// without them.
    pub drain_timeout: Duration,
    /// Extents each primary stream's dirty log keeps hot (its activity
    /// log; see [`dirty_log::check_activity_extents`] for the range): a
    /// bigger hot set costs fewer syncs under scattered writes and a
    /// bigger resync after a power loss.
    pub activity_extents: usize,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            fencer: Arc::new(StaticFencer { allow: false }),
            retry: Duration::from_millis(200),
            sync_rate: 100 << 20,
            drain_timeout: Duration::from_secs(10),
            activity_extents: dirty_log::DEFAULT_ACTIVITY_EXTENTS,
        }
    }
}

/// Why an attachment was refused.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The volume does not exist (or cannot be opened).
    #[error("volume {volume} cannot be attached")]
    Volume {
        /// The volume.
        volume: String,
        /// Why.
        #[source]
        source: PoolError,
    },
    /// A primary's epoch is older than the newest seen for the volume.
    #[error(
        "volume {volume}: epoch {epoch} is older than {newest}, the newest this pool has seen for it"
    )]
    StaleEpoch {
        /// The volume.
        volume: String,
        /// The refused epoch.
        epoch: u64,
        /// The newest seen.
        newest: u64,
    },
    /// A peer address does not resolve.
    #[error("peer {peer:?} does not resolve to an address")]
    Peer {
        /// The peer as given.
        peer: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The epoch or role could not be recorded beside the pool.
    #[error("recording the replication state of volume {volume}")]
    Record {
        /// The volume.
        volume: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A replicator thread could not start.
    #[error("starting replication of volume {volume}")]
    Start {
        /// The volume.
        volume: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The volume was never attached: there is no attachment to change.
    #[error("volume {volume} is not attached: attach it first")]
    NotAttached {
        /// The volume.
        volume: String,
    },
    /// A primary or standalone attachment of a copy whose full sync or
    /// resync did not finish (it would serve part of a disk), without
    /// force.
    #[error(
        "volume {volume}: this copy is incomplete (a full sync or resync into it did not finish), so it would serve part of a disk; attach it as a primary with force to accept it as it is"
    )]
    Incomplete {
        /// The volume.
        volume: String,
    },
}

/// The health of the pool's backing store, shared by every volume: an
/// I/O error on it detaches it for good (until the process restarts):
/// nothing more is read or written there. A primary goes on diskless —
/// writes acknowledged once a connected peer has them, reads served by a
/// peer — and a replica refuses its primaries, which go on without it.
#[derive(Debug, Default)]
pub struct DiskHealth {
    failed: AtomicBool,
    why: Mutex<Option<String>>,
}

impl DiskHealth {
    /// Why the disk was detached (`None`: it is attached).
    pub fn failed(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.why).clone()
    }

    /// Whether it was detached (cheap: one atomic load).
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Detaches the disk after an I/O error (`why` is kept from the first
    /// failure).
    pub fn fail(&self, why: &str) {
        let mut slot = lock(&self.why);
        if slot.is_none() {
            tracing::error!(
                error = why,
                "I/O error on the pool's backing store: the disk is detached, replicated volumes go on on their peers"
            );
            *slot = Some(why.to_owned());
        }
        self.failed.store(true, Ordering::Release);
    }

    /// Attaches the disk again (after [`Attachments::attach_disk`] checked
    /// it and copied back what it missed).
    fn recover(&self) {
        let mut slot = lock(&self.why);
        *slot = None;
        self.failed.store(false, Ordering::Release);
    }
}

/// Why a detached disk was not attached again.
#[derive(Debug, thiserror::Error)]
pub enum AttachDiskError {
    /// The backing store still fails (or the pool's metadata does not
    /// verify): it stays detached.
    #[error("the backing store still fails: it stays detached")]
    StillFailing {
        /// Why.
        #[source]
        source: PoolError,
    },
    /// A primary volume was written while the disk was detached and its
    /// writes could not be copied back from a peer.
    #[error(
        "volume {volume} was written while the disk was detached and cannot be copied back: {reason}; the disk stays detached"
    )]
    CopyBack {
        /// The volume.
        volume: String,
        /// Why.
        reason: String,
    },
}

/// What [`Attachments::attach_disk`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskReattached {
    /// The disk was detached (otherwise nothing was done).
    pub was_detached: bool,
    /// Per primary volume written while detached: chunks copied back
    /// from a peer.
    pub copied_back: Vec<(String, u64)>,
}

/// One peer's online verify: the peer as attached, and what was found.
pub type PeerVerifyResult = (String, Result<VerifyReport, VerifyError>);

/// A volume's attachment as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentView {
    /// The volume.
    pub volume: String,
    /// Its spec (`None`: never attached).
    pub spec: Option<AttachSpec>,
    /// A primary's peers, as given, and their replication status.
    pub peers: Vec<(String, ReplicationStatus)>,
}

/// The attachments of one pool's volumes.
pub struct Attachments {
    pool: Pool,
    book: Arc<ReplicaBook>,
    disk: Arc<DiskHealth>,
    opts: AttachOptions,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    file: Option<PathBuf>,
    /// Where primaries keep their peers' dirty logs (persistent only).
    dirty_dir: Option<PathBuf>,
    /// Serialises writes of the file.
    saving: Mutex<()>,
    /// Test hook: holds the copy-back of a disk attached again.
    copy_back_hold: Arc<CopyBackHold>,
}

/// Test hook that holds [`Attachments::attach_disk`]'s copy-back before
/// each chunk (writes and reads go on meanwhile). Nothing holds unless a
/// test (or `basaltd storage serve --hold-copy-back-when`) asks.
#[derive(Debug, Default)]
pub struct CopyBackHold {
    on: AtomicBool,
    when: Mutex<Option<PathBuf>>,
}

impl CopyBackHold {
    /// Holds (or releases) the copy-back.
    pub fn hold(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    /// Holds the copy-back while `path` exists.
    pub fn hold_when(&self, path: PathBuf) {
        *lock(&self.when) = Some(path);
    }

    fn wait(&self) {
        let held = || {
            self.on.load(Ordering::SeqCst) || lock(&self.when).as_ref().is_some_and(|p| p.exists())
        };
        if held() {
            tracing::info!("copy-back held");
            while held() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl fmt::Debug for Attachments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachments")
            .field("volumes", &lock(&self.slots).len())
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// One volume's attachment and its write gate.
#[derive(Debug)]
pub struct Slot {
    name: String,
    /// The pool (to copy a stale chunk back before a write covers part
    /// of it).
    pool: Pool,
    book: Arc<ReplicaBook>,
    disk: Arc<DiskHealth>,
    /// The pool's chunk size.
    chunk: u64,
    /// Chunks a primary wrote while its disk was detached (only its peers
    /// have them): copied back from a peer when the disk is attached
    /// again.
    stale: Mutex<BTreeSet<u64>>,
    /// The size a primary's peers grew to while its disk was detached
    /// (the local copy could not grow): the local copy grows to it before
    /// the stale chunks are copied back.
    grown: Mutex<Option<u64>>,
    /// The disk is attached again but chunks in `stale` are not copied
    /// back yet: reads of them go to a peer, a write to part of one
    /// copies it back first (checked without a lock while false).
    copying: AtomicBool,
    /// One change at a time.
    change: Mutex<()>,
    gate: Mutex<Gate>,
    drained: Condvar,
}

#[derive(Debug)]
struct Gate {
    writers: usize,
    changing: bool,
    state: Arc<Attached>,
}

#[derive(Debug, Default)]
struct Attached {
    spec: Option<AttachSpec>,
    replicators: Vec<(String, Replicator)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Decrements the gate's writer count when a write is done.
struct Entered<'a> {
    slot: &'a Slot,
    state: Arc<Attached>,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let mut gate = lock(&self.slot.gate);
        gate.writers -= 1;
        if gate.writers == 0 {
            self.slot.drained.notify_all();
        }
    }
}

impl Slot {
    fn enter(&self) -> Entered<'_> {
        let mut gate = lock(&self.gate);
        while gate.changing {
            gate = self
                .drained
                .wait(gate)
                .unwrap_or_else(PoisonError::into_inner);
        }
        gate.writers += 1;
        Entered {
            slot: self,
            state: gate.state.clone(),
        }
    }

    /// Runs a change of the volume through its attachment: locally only
    /// (never attached, standalone), refused (a secondary's writes; a
    /// primary the pool has seen a newer epoch than), or locally and on
    /// every peer (a primary). A FLUSH is always allowed.
    pub fn submit(
        &self,
        op: Op<'_>,
        local: impl FnOnce() -> Result<(), PoolError>,
    ) -> Result<(), ReplicationError> {
        let entered = self.enter();
        let checked = || self.write_local(local);
        let Some(spec) = &entered.state.spec else {
            return checked().map_err(Into::into);
        };
        match spec.role {
            Role::Standalone => checked().map_err(Into::into),
            Role::Secondary => match op {
                // A secondary grows when told to (its primary's RESIZE
                // frame, or the agent matching the wanted size).
                Op::Flush | Op::Resize { .. } => checked().map_err(Into::into),
                _ => Err(ReplicationError::NotPrimary {
                    volume: self.name.clone(),
                }),
            },
            Role::Primary => {
                let newest = self.book.newest(&self.name);
                if newest > spec.epoch {
                    return Err(ReplicationError::StaleEpoch {
                        epoch: spec.epoch,
                        newest,
                    });
                }
                let replicators: Vec<_> = entered
                    .state
                    .replicators
                    .iter()
                    .map(|(_, r)| r.clone())
                    .collect();
                // The disk is back but chunks it missed are still being
                // copied back: those this write touches come back first,
                // so it lands on current data and the copy-back never
                // overwrites it.
                if self.copying.load(Ordering::Acquire)
                    && !self.disk.is_failed()
                    && let Some((offset, len)) = op.range()
                    && len > 0
                {
                    self.settle_stale(offset, len, &replicators)?;
                }
                // Diskless (the disk failed before or during this write):
                // the write stands only if a peer applied it.
                let diskless = std::cell::Cell::new(false);
                let result = Replicator::submit_inner(&replicators, op, || match checked() {
                    Err(PoolError::Io { .. }) if !replicators.is_empty() => {
                        diskless.set(true);
                        Ok(false)
                    }
                    other => other.map(|()| true),
                });
                if diskless.get()
                    && let Some((offset, len)) = op.range()
                    && len > 0
                {
                    let cs = self.chunk.max(1);
                    lock(&self.stale).extend(offset / cs..=(offset + len - 1) / cs);
                }
                let acked = result?;
                if diskless.get() && acked == 0 {
                    return Err(ReplicationError::Local(PoolError::Io {
                        op: "writing",
                        source: io::Error::other(
                            "the disk is detached and no connected peer has the write",
                        ),
                    }));
                }
                if diskless.get()
                    && let Op::Resize { size } = op
                {
                    let mut grown = lock(&self.grown);
                    *grown = Some(grown.map_or(size, |g| g.max(size)));
                }
                Ok(())
            }
        }
    }

    /// Runs `local` as [`Slot::submit`] runs a change that goes to no peer
    /// (the volume is not attached, or standalone); `None`, `local` not
    /// run, while its role needs the change's bytes (a primary ships
    /// them, a secondary refuses them): the caller then submits it.
    pub fn submit_unreplicated(
        &self,
        local: impl FnOnce() -> Result<(), PoolError>,
    ) -> Option<Result<(), PoolError>> {
        let entered = self.enter();
        match entered.state.spec.as_ref().map(|s| s.role) {
            None | Some(Role::Standalone) => Some(self.write_local(local)),
            Some(_) => None,
        }
    }

    /// The local write, unless the disk is detached; an I/O error
    /// detaches it.
    fn write_local(&self, local: impl FnOnce() -> Result<(), PoolError>) -> Result<(), PoolError> {
        if let Some(why) = self.disk.failed() {
            return Err(PoolError::Io {
                op: "writing",
                source: io::Error::other(format!("the disk is detached: {why}")),
            });
        }
        local().inspect_err(|e| {
            if matches!(e, PoolError::Io { .. }) {
                self.disk.fail(&error_chain(e));
            }
        })
    }

    /// Reads `buf.len()` bytes at `offset` of the volume: with `local`
    /// while the disk is attached; from a connected peer of a primary
    /// once it is detached (an I/O error here detaches it, and the read is
    /// tried on the peers).
    pub fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        local: impl FnOnce(&mut [u8]) -> Result<(), PoolError>,
    ) -> Result<(), PoolError> {
        if !self.disk.is_failed() && !self.reads_stale(offset, buf.len()) {
            match local(buf) {
                Err(e @ PoolError::Io { .. }) => self.disk.fail(&error_chain(&e)),
                other => return other,
            }
        }
        let state = lock(&self.gate).state.clone();
        let mut why = String::from("the disk is detached and the volume has no connected peer");
        if state.spec.as_ref().map(|s| s.role) == Some(Role::Primary) {
            for (_, r) in &state.replicators {
                match r.read_remote(offset, buf) {
                    Ok(()) => return Ok(()),
                    Err(e) => why = format!("the disk is detached; {e}"),
                }
            }
        }
        Err(PoolError::Io {
            op: "reading",
            source: io::Error::other(why),
        })
    }

    /// Whether reads may go to a peer: the disk is detached, or attached
    /// again with chunks not yet copied back ([`Slot::read`] decides per
    /// read).
    pub fn diskless(&self) -> bool {
        self.disk.is_failed() || self.copying.load(Ordering::Acquire)
    }

    /// Whether a read of `offset..offset+len` must go to a peer while
    /// chunks are copied back: it touches one not copied back yet.
    fn reads_stale(&self, offset: u64, len: usize) -> bool {
        if !self.copying.load(Ordering::Acquire) || len == 0 {
            return false;
        }
        let cs = self.chunk.max(1);
        let (first, last) = (offset / cs, (offset + len as u64 - 1) / cs);
        lock(&self.stale).range(first..=last).next().is_some()
    }

    /// Before a write to `offset..offset+len` while chunks are copied
    /// back: each chunk it touches that is not copied back yet is copied
    /// back first (under the stale set's lock, which the copy-back takes
    /// per chunk too), so neither the write lands on old data nor the
    /// copy-back overwrites the write. A chunk that cannot be copied back
    /// fails the write (EIO) before anything is written.
    fn settle_stale(
        &self,
        offset: u64,
        len: u64,
        replicators: &[Replicator],
    ) -> Result<(), ReplicationError> {
        let cs = self.chunk.max(1);
        let (first, last) = (offset / cs, (offset + len - 1) / cs);
        let mut stale = lock(&self.stale);
        let hit: Vec<u64> = stale.range(first..=last).copied().collect();
        for c in hit {
            self.copy_chunk(c, replicators).map_err(|why| {
                ReplicationError::Local(PoolError::Io {
                    op: "writing",
                    source: io::Error::other(format!(
                        "chunk {c} was written while the disk was detached and cannot be copied back: {why}"
                    )),
                })
            })?;
            stale.remove(&c);
        }
        Ok(())
    }

    /// Copies chunk `c` back into the local copy from the first of
    /// `replicators` that reads it (a READ frame in the live order, so
    /// every write shipped before is in it).
    fn copy_chunk(&self, c: u64, replicators: &[Replicator]) -> Result<(), String> {
        let volume = self
            .pool
            .open_volume(&self.name)
            .map_err(|e| error_chain(&e))?;
        let size = volume.size().map_err(|e| error_chain(&e))?;
        let cs = self.chunk.max(1);
        let offset = c * cs;
        if offset >= size {
            return Ok(());
        }
        let mut buf = vec![0u8; cs.min(size - offset) as usize];
        let mut why = String::from("no connected peer");
        let got = replicators
            .iter()
            .any(|r| match r.read_remote(offset, &mut buf) {
                Ok(()) => true,
                Err(e) => {
                    why = e.to_string();
                    false
                }
            });
        if !got {
            return Err(format!("reading chunk {c} from a peer: {why}"));
        }
        volume.write(offset, &buf, false).map_err(|e| {
            if matches!(e, PoolError::Io { .. }) {
                self.disk.fail(&error_chain(&e));
            }
            error_chain(&e)
        })
    }

    /// Whether a write would be refused outright here (a secondary).
    pub fn role(&self) -> Option<Role> {
        lock(&self.gate).state.spec.as_ref().map(|s| s.role)
    }
}

impl Attachments {
    /// Attachments of `pool`'s volumes, with epochs and sync generations
    /// in `book`.
    pub fn new(pool: Pool, book: Arc<ReplicaBook>, opts: AttachOptions) -> Attachments {
        Attachments {
            pool,
            book,
            disk: Arc::new(DiskHealth::default()),
            opts,
            slots: Mutex::new(HashMap::new()),
            file: None,
            dirty_dir: None,
            saving: Mutex::new(()),
            copy_back_hold: Arc::new(CopyBackHold::default()),
        }
    }

    /// Like [`Attachments::new`], keeping every attachment in `file`
    /// (lines `VOLUME ROLE EPOCH ALLOW_OUTDATE [protocol=A|B] [PEER...]`) and restoring
    /// the ones found there now, and each primary stream's dirty log in
    /// the directory named like `file` with the extension `dirty`. A restored primary whose epoch the pool
    /// has since seen surpassed is restored anyway: its writes are
    /// refused, which is what it deserves; one whose peers no longer
    /// resolve comes back a secondary (never writable without its peers).
    /// Attachments of volumes that no longer exist are dropped.
    pub fn persistent(
        pool: Pool,
        book: Arc<ReplicaBook>,
        opts: AttachOptions,
        file: &Path,
    ) -> io::Result<Attachments> {
        let saved = load_attachments(file)?;
        // Restored with no file, then written once: a crash while
        // restoring leaves the file as it was.
        let mut this = Attachments::new(pool, book, opts);
        let dirty_dir = file.with_extension("dirty");
        this.dirty_dir = Some(dirty_dir.clone());
        for (name, spec) in saved {
            let (role, epoch) = (spec.role, spec.epoch);
            // What was attached stays attached: a copy became a primary
            // only once complete or accepted.
            match this.attach_unchecked(&name, spec, true) {
                Ok(view) => {
                    tracing::info!(volume = %name, spec = ?view.spec, "attachment restored")
                }
                // A primary that cannot ship its writes (a peer name that
                // no longer resolves) must not come back writable without
                // them: it waits as a secondary for the agent.
                Err(e @ (AttachError::Peer { .. } | AttachError::Start { .. }))
                    if role == Role::Primary =>
                {
                    tracing::error!(volume = %name, error = %error_chain(&e), "primary not restored: kept as a secondary until attached again");
                    let fallback = AttachSpec {
                        role: Role::Secondary,
                        epoch,
                        peers: Vec::new(),
                        allow_outdate: false,
                        protocol: Protocol::C,
                    };
                    if let Err(e) = this.attach_unchecked(&name, fallback, false) {
                        tracing::warn!(volume = %name, error = %error_chain(&e), "attachment not restored");
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %name, error = %error_chain(&e), "attachment not restored")
                }
            }
        }
        // Logs of streams that were not restored (their volume is gone or
        // no longer a primary) would only mislead a later stream.
        let keep: Vec<PathBuf> = this
            .views_state()
            .iter()
            .flat_map(|st| {
                st.replicators
                    .iter()
                    .filter_map(|(_, r)| r.dirty_log_path())
            })
            .collect();
        dirty_log::sweep(&dirty_dir, &keep);
        this.file = Some(file.to_owned());
        this.save().map_err(io::Error::other)?;
        Ok(this)
    }

    /// Writes every attachment to the file (temporary file, fsync,
    /// rename, fsync of the directory).
    fn save(&self) -> Result<(), AttachError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let _one = lock(&self.saving);
        let mut text = String::new();
        for view in self.views() {
            let Some(spec) = view.spec else { continue };
            let role = match spec.role {
                Role::Standalone => "standalone",
                Role::Secondary => "secondary",
                Role::Primary => "primary",
            };
            text.push_str(&format!(
                "{} {role} {} {}",
                view.volume,
                spec.epoch,
                u8::from(spec.allow_outdate)
            ));
            // Only when not the default, so older builds read the file.
            if spec.protocol != Protocol::C {
                text.push_str(&format!(" protocol={}", spec.protocol));
            }
            for peer in &spec.peers {
                text.push(' ');
                text.push_str(peer);
            }
            text.push('\n');
        }
        let write = || -> io::Result<()> {
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
        };
        write().map_err(|source| AttachError::Record {
            volume: path.display().to_string(),
            source,
        })
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The book of epochs and sync generations.
    pub fn book(&self) -> &Arc<ReplicaBook> {
        &self.book
    }

    /// The backing store's health.
    pub fn disk(&self) -> &Arc<DiskHealth> {
        &self.disk
    }

    /// Attaches the pool's backing store again after an I/O error detached
    /// it, once the device works: the store must sync and the pool's
    /// metadata verify. Then every volume's writes are held only for the
    /// switch: each primary grown while detached grows its own copy to
    /// its peers' size, each primary written while detached must have a
    /// connected peer, and the disk counts as attached. The chunks those
    /// primaries wrote while detached (only their peers have them) are
    /// then copied back from a peer one at a time while writes go on: a
    /// read of a chunk not copied back yet goes to a peer, a write to one
    /// copies it back first ([`Slot::submit`]), so the copy-back never
    /// overwrites a newer write. Secondaries need nothing here: their
    /// primaries, which tracked what they missed, resync them at their
    /// next hello (refused while the disk was detached). Attachment
    /// changes wait until the copy-back is done. Refused, nothing changed,
    /// while the store fails or a written primary has no connected peer;
    /// a copy-back that fails midway (its peer lost) detaches the disk
    /// again, the chunks not copied back still tracked for the next try.
    pub fn attach_disk(&self) -> Result<DiskReattached, AttachDiskError> {
        if !self.disk.is_failed() {
            return Ok(DiskReattached::default());
        }
        let still = |source| AttachDiskError::StillFailing { source };
        self.pool.flush().map_err(still)?;
        self.pool.verify().map_err(still)?;
        // Every volume's writes held for the switch (slots in name order;
        // attachment changes take one slot at a time, so this cannot
        // deadlock); changes stay out until the copy-back is done.
        let mut slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        let changes: Vec<_> = slots.iter().map(|s| lock(&s.change)).collect();
        for slot in &slots {
            self.drain(slot);
        }
        let prepared = self.prepare_copy_back(&slots);
        if prepared.is_ok() {
            self.disk.recover();
        }
        for slot in &slots {
            let mut gate = lock(&slot.gate);
            gate.changing = false;
            slot.drained.notify_all();
        }
        let to_copy = match prepared {
            Ok(to_copy) => to_copy,
            Err(err) => {
                for slot in &slots {
                    slot.copying.store(false, Ordering::Release);
                }
                return Err(err);
            }
        };
        tracing::info!(
            volumes = to_copy.len(),
            "the pool's backing store is attached again; copying back what it missed while writes go on"
        );
        let result = self.copy_back(&slots);
        if let Err(err) = &result {
            // Diskless again: what is not copied back stays tracked.
            self.disk.fail(&err.to_string());
            for slot in &slots {
                slot.copying.store(false, Ordering::Release);
            }
        }
        drop(changes);
        result?;
        tracing::info!(copied_back = ?to_copy, "chunks written while the disk was detached copied back from a peer");
        Ok(DiskReattached {
            was_detached: true,
            copied_back: to_copy,
        })
    }

    /// With writes held and the disk still detached: grows each primary
    /// grown meanwhile to its peers' size, checks each primary written
    /// meanwhile has a connected peer and marks it copying. Returns, per
    /// such volume, the chunks to copy back.
    fn prepare_copy_back(
        &self,
        slots: &[Arc<Slot>],
    ) -> Result<Vec<(String, u64)>, AttachDiskError> {
        let mut out = Vec::new();
        for slot in slots {
            let fail = |reason: String| AttachDiskError::CopyBack {
                volume: slot.name.clone(),
                reason,
            };
            let grown = *lock(&slot.grown);
            if let Some(size) = grown {
                let info = self
                    .pool
                    .volume_info(&slot.name)
                    .map_err(|e| fail(error_chain(&e)))?;
                if info.size < size {
                    self.pool
                        .resize(&slot.name, size)
                        .map_err(|e| fail(format!("growing to {size}: {}", error_chain(&e))))?;
                    tracing::info!(volume = %slot.name, size, "grown to the size its peers grew to while the disk was detached");
                }
                *lock(&slot.grown) = None;
            }
            let stale = lock(&slot.stale).len() as u64;
            if stale == 0 {
                continue;
            }
            let state = lock(&slot.gate).state.clone();
            let connected = state
                .replicators
                .iter()
                .any(|(_, r)| r.status().state == super::PeerState::Connected);
            if !connected {
                return Err(fail(format!(
                    "{stale} chunks to copy back and no connected peer"
                )));
            }
            slot.copying.store(true, Ordering::Release);
            out.push((slot.name.clone(), stale));
        }
        Ok(out)
    }

    /// With writes going on and the disk attached: copies back each
    /// copying primary's stale chunks, one at a time under the stale
    /// set's lock (a write to a chunk waits for it, or copies it back
    /// itself first), then flushes.
    fn copy_back(&self, slots: &[Arc<Slot>]) -> Result<(), AttachDiskError> {
        for slot in slots {
            if !slot.copying.load(Ordering::Acquire) {
                continue;
            }
            let fail = |reason: String| AttachDiskError::CopyBack {
                volume: slot.name.clone(),
                reason,
            };
            loop {
                self.copy_back_hold.wait();
                let mut stale = lock(&slot.stale);
                let Some(&c) = stale.first() else {
                    break;
                };
                let state = lock(&slot.gate).state.clone();
                let replicators: Vec<Replicator> =
                    state.replicators.iter().map(|(_, r)| r.clone()).collect();
                slot.copy_chunk(c, &replicators).map_err(fail)?;
                stale.remove(&c);
            }
            slot.copying.store(false, Ordering::Release);
            self.pool
                .open_volume(&slot.name)
                .and_then(|v| v.flush())
                .map_err(|e| fail(error_chain(&e)))?;
        }
        Ok(())
    }

    /// The test hook that holds the copy-back of [`Attachments::attach_disk`].
    pub fn copy_back_hold(&self) -> &Arc<CopyBackHold> {
        &self.copy_back_hold
    }

    /// Grows volume `name` to `size` bytes. A primary's grow goes to every
    /// connected peer in the write order (each grows its copy before it
    /// acknowledges; peers away grow at their next hello), so writes past
    /// the old end may follow at once; elsewhere it grows the local copy
    /// only. A size the volume already has changes nothing.
    pub fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo, ReplicationError> {
        let info = self.pool.volume_info(name)?;
        if info.size == size {
            return Ok(info);
        }
        if size < info.size {
            return Err(PoolError::Shrink {
                name: name.to_owned(),
                size: info.size,
                requested: size,
            }
            .into());
        }
        let pool = &self.pool;
        self.slot(name)
            .submit(Op::Resize { size }, || pool.resize(name, size).map(drop))?;
        let mut info = pool.volume_info(name)?;
        if info.size < size {
            // Diskless: the peers grew; the local copy grows when the
            // disk is attached again (`attach_disk`).
            tracing::info!(
                volume = name,
                size,
                "volume grown on its peers; the detached local copy follows when the disk is attached again"
            );
            info.size = size;
        } else {
            tracing::info!(volume = name, size, "volume grown");
        }
        Ok(info)
    }

    /// The gate of volume `name` (created, never attached, on first use).
    pub fn slot(&self, name: &str) -> Arc<Slot> {
        lock(&self.slots)
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    name: name.to_owned(),
                    pool: self.pool.clone(),
                    book: self.book.clone(),
                    disk: self.disk.clone(),
                    chunk: u64::from(self.pool.chunk_size()),
                    stale: Mutex::new(BTreeSet::new()),
                    grown: Mutex::new(None),
                    copying: AtomicBool::new(false),
                    change: Mutex::new(()),
                    gate: Mutex::new(Gate {
                        writers: 0,
                        changing: false,
                        state: Arc::new(Attached::default()),
                    }),
                    drained: Condvar::new(),
                })
            })
            .clone()
    }

    fn existing(&self, name: &str) -> Option<Arc<Slot>> {
        lock(&self.slots).get(name).cloned()
    }

    /// The role of volume `name` (`None`: never attached).
    pub fn role(&self, name: &str) -> Option<Role> {
        self.existing(name).and_then(|s| s.role())
    }

    /// Volume `name`'s role and, when it is a primary, the generations of
    /// the streams this process ships it on, read from one state: a role change between two reads
    /// cannot pair a primary's role with a secondary's (empty) streams.
    pub fn role_and_generations(&self, name: &str) -> (Option<Role>, Vec<u64>) {
        let Some(slot) = self.existing(name) else {
            return (None, Vec::new());
        };
        let state = lock(&slot.gate).state.clone();
        match &state.spec {
            Some(spec) if spec.role == Role::Primary => (
                Some(Role::Primary),
                state
                    .replicators
                    .iter()
                    .map(|(_, r)| r.status().generation)
                    .collect(),
            ),
            spec => (spec.as_ref().map(|s| s.role), Vec::new()),
        }
    }

    /// Volume `name`'s attachment as it stands.
    pub fn view(&self, name: &str) -> AttachmentView {
        let state = self
            .existing(name)
            .map(|s| lock(&s.gate).state.clone())
            .unwrap_or_default();
        AttachmentView {
            volume: name.to_owned(),
            spec: state.spec.clone(),
            peers: state
                .replicators
                .iter()
                .map(|(p, r)| (p.clone(), r.status()))
                .collect(),
        }
    }

    fn views_state(&self) -> Vec<Arc<Attached>> {
        let slots: Vec<_> = lock(&self.slots).values().cloned().collect();
        slots.iter().map(|s| lock(&s.gate).state.clone()).collect()
    }

    /// Every attached volume, by name.
    pub fn views(&self) -> Vec<AttachmentView> {
        let mut names: Vec<String> = lock(&self.slots).keys().cloned().collect();
        names.sort();
        names
            .into_iter()
            .map(|n| self.view(&n))
            .filter(|v| v.spec.is_some())
            .collect()
    }

    /// Sets volume `name`'s attachment (see the module's invariants); a
    /// primary's epoch must not be older than the newest seen.
    /// A copy whose full sync did not finish ([`ReplicaBook::incomplete`])
    /// is refused as a primary or standalone ([`AttachError::Incomplete`]).
    pub fn attach(&self, name: &str, spec: AttachSpec) -> Result<AttachmentView, AttachError> {
        self.apply(name, spec, true, false)
    }

    /// Like [`Attachments::attach`], accepting an incomplete copy as it
    /// is when it becomes a primary or standalone (DRBD's `primary
    /// --force`): its mark goes, and its peers are filled from it.
    pub fn attach_forced(
        &self,
        name: &str,
        spec: AttachSpec,
    ) -> Result<AttachmentView, AttachError> {
        self.apply(name, spec, true, true)
    }

    /// Like [`Attachments::attach`] (or [`Attachments::attach_forced`]
    /// with `force`) without refusing an old primary epoch (operator
    /// flags at start: the peers depose such a primary, and its writes
    /// are refused).
    pub fn attach_unchecked(
        &self,
        name: &str,
        spec: AttachSpec,
        force: bool,
    ) -> Result<AttachmentView, AttachError> {
        self.apply(name, spec, false, force)
    }

    fn apply(
        &self,
        name: &str,
        spec: AttachSpec,
        check_epoch: bool,
        force: bool,
    ) -> Result<AttachmentView, AttachError> {
        let slot = self.slot(name);
        let _one = lock(&slot.change);
        let old = lock(&slot.gate).state.clone();
        if old.spec.as_ref() == Some(&spec) {
            return Ok(self.view(name));
        }
        // Only a copy that starts serving is checked: one already a
        // primary (or standalone) changing its peers or protocol keeps
        // serving what it serves.
        let starts_serving = matches!(spec.role, Role::Primary | Role::Standalone)
            && old.spec.as_ref().is_none_or(|o| o.role != spec.role);
        let incomplete = starts_serving && self.book.incomplete(name);
        if incomplete && !force {
            return Err(AttachError::Incomplete {
                volume: name.to_owned(),
            });
        }
        let volume = self
            .pool
            .open_volume(name)
            .map_err(|source| AttachError::Volume {
                volume: name.to_owned(),
                source,
            })?;
        let mut addrs = Vec::new();
        if spec.role == Role::Primary {
            for peer in &spec.peers {
                let addr = peer
                    .to_socket_addrs()
                    .and_then(|mut a| {
                        a.next()
                            .ok_or_else(|| io::Error::other("no address for this name"))
                    })
                    .map_err(|source| AttachError::Peer {
                        peer: peer.clone(),
                        source,
                    })?;
                addrs.push(addr);
            }
        }
        let record = |source| AttachError::Record {
            volume: name.to_owned(),
            source,
        };
        match spec.role {
            Role::Primary => {
                let newest = self.book.newest(name);
                if spec.epoch < newest {
                    if check_epoch {
                        return Err(AttachError::StaleEpoch {
                            volume: name.to_owned(),
                            epoch: spec.epoch,
                            newest,
                        });
                    }
                    tracing::error!(
                        volume = name,
                        epoch = spec.epoch,
                        newest,
                        "this primary is deposed: the pool has seen a newer epoch"
                    );
                } else {
                    self.admit(name, spec.epoch).map_err(record)?;
                }
            }
            Role::Secondary if spec.epoch > self.book.newest(name) => {
                self.admit(name, spec.epoch).map_err(record)?;
            }
            Role::Secondary | Role::Standalone => {}
        }
        if incomplete {
            self.book.accept_incomplete(name).map_err(record)?;
            tracing::warn!(
                volume = name,
                role = ?spec.role,
                "an incomplete copy accepted as it is (forced): its peers are filled from it"
            );
        }

        // Which replicators stay (a primary staying primary keeps the
        // links of the peers it keeps), go, and come.
        let staying_primary = spec.role == Role::Primary
            && old.spec.as_ref().is_some_and(|s| s.role == Role::Primary);
        let fencer: Arc<dyn Fencer> = if spec.allow_outdate {
            Arc::new(StaticFencer { allow: true })
        } else {
            self.opts.fencer.clone()
        };
        let mut kept = Vec::new();
        let mut removed = Vec::new();
        for (peer, r) in &old.replicators {
            if staying_primary && spec.peers.contains(peer) {
                kept.push((peer.clone(), r.clone()));
            } else {
                removed.push(r.clone());
            }
        }
        // Released first: writes suspended on a peer that goes fail, and
        // ones suspended on a peer that stays ask the new fencer. Their
        // streams end: no later stream may reuse their logs.
        for r in &removed {
            r.retire();
        }
        if old.spec.as_ref().map(|s| s.allow_outdate) != Some(spec.allow_outdate) {
            for (_, r) in &kept {
                r.set_fencer(fencer.clone());
            }
        }
        self.drain(&slot);
        for (_, r) in &kept {
            r.set_protocol(spec.protocol);
        }

        // No write in flight: switch.
        let mut replicators = Vec::new();
        let result = (|| {
            for (_, r) in &kept {
                r.set_epoch(spec.epoch)
                    .map_err(|source| AttachError::Start {
                        volume: name.to_owned(),
                        source,
                    })?;
            }
            for (peer, addr) in spec.peers.iter().zip(&addrs) {
                if let Some((_, r)) = kept.iter().find(|(p, _)| p == peer) {
                    replicators.push((peer.clone(), r.clone()));
                    continue;
                }
                let cfg = ReplicatorConfig {
                    peer: *addr,
                    epoch: spec.epoch,
                    generation: new_generation(),
                    chunk_size: u64::from(self.pool.chunk_size()),
                    retry: self.opts.retry,
                    protocol: spec.protocol,
                };
                let sync = SyncOptions {
                    synced_from: self.book.synced(name),
                    rate: self.opts.sync_rate,
                };
                let start = |source| AttachError::Start {
                    volume: name.to_owned(),
                    source,
                };
                let log = match &self.dirty_dir {
                    Some(dir) => {
                        let key = LogKey {
                            volume_uid: volume.uid(),
                            peer,
                            chunk_size: self.pool.chunk_size(),
                        };
                        let mut log = DirtyLog::open(dir, &key, new_generation).map_err(start)?;
                        log.set_activity_extents(self.opts.activity_extents)
                            .map_err(start)?;
                        Some(log)
                    }
                    None => None,
                };
                let r = Replicator::start_logged(volume.clone(), cfg, fencer.clone(), sync, log)
                    .map_err(start)?;
                replicators.push((peer.clone(), r));
            }
            self.book
                .set_primary(name, spec.role == Role::Primary)
                .map_err(record)
        })();
        let mut gate = lock(&slot.gate);
        match result {
            Ok(()) => {
                tracing::info!(volume = name, role = ?spec.role, epoch = spec.epoch, peers = ?spec.peers, "volume attached");
                gate.state = Arc::new(Attached {
                    spec: Some(spec),
                    replicators,
                });
            }
            Err(_) => {
                // Keep what still works: the old spec with its kept
                // replicators, as before the change.
                for (peer, r) in &replicators {
                    if !kept.iter().any(|(p, _)| p == peer) {
                        r.retire();
                    }
                }
                gate.state = Arc::new(Attached {
                    spec: old.spec.clone(),
                    replicators: kept,
                });
            }
        }
        gate.changing = false;
        slot.drained.notify_all();
        drop(gate);
        result?;
        self.save()?;
        Ok(self.view(name))
    }

    /// The replication protocol of `name`'s attachment (C when never
    /// attached).
    pub fn protocol(&self, name: &str) -> Protocol {
        lock(&self.slot(name).gate)
            .state
            .spec
            .as_ref()
            .map_or(Protocol::C, |s| s.protocol)
    }

    /// Sets when `name`'s primary acknowledges writes: its attachment is
    /// applied again with `protocol` (kept peers keep their connections;
    /// writes in flight finish under the old one). Refused for a volume
    /// never attached.
    pub fn set_protocol(
        &self,
        name: &str,
        protocol: Protocol,
    ) -> Result<AttachmentView, AttachError> {
        let current = lock(&self.slot(name).gate).state.spec.clone();
        let Some(mut spec) = current else {
            return Err(AttachError::NotAttached {
                volume: name.to_owned(),
            });
        };
        spec.protocol = protocol;
        // The epoch was accepted when attached; the role does not change.
        self.apply(name, spec, false, false)
    }

    /// Online verify of primary `name` against each of its peers, one
    /// after the other, at most `rate` bytes per second (0: the
    /// process's sync rate); see [`Replicator::verify`]. Each peer's
    /// result stands alone: a peer that is away does not stop the others.
    pub fn verify(
        &self,
        name: &str,
        rate: u64,
        repair: bool,
    ) -> Result<Vec<PeerVerifyResult>, VerifyError> {
        let state = self
            .existing(name)
            .map(|s| lock(&s.gate).state.clone())
            .unwrap_or_default();
        if state.spec.as_ref().map(|s| s.role) != Some(Role::Primary) {
            return Err(VerifyError::NotPrimary {
                volume: name.to_owned(),
            });
        }
        let rate = if rate == 0 { self.opts.sync_rate } else { rate };
        Ok(state
            .replicators
            .iter()
            .map(|(peer, r)| (peer.clone(), r.verify(rate, repair)))
            .collect())
    }

    /// Raises the newest epoch of `name` to `epoch`.
    fn admit(&self, name: &str, epoch: u64) -> io::Result<()> {
        self.book
            .admit(name, epoch)
            .map(|_| ())
            .map_err(io::Error::other)
    }

    /// Closes the gate to new writes and waits (bounded) for the ones in
    /// flight.
    fn drain(&self, slot: &Slot) {
        let deadline = Instant::now() + self.opts.drain_timeout;
        // Changes are serialised by the slot's change lock: this is the
        // only closer.
        let mut gate = lock(&slot.gate);
        gate.changing = true;
        while gate.writers > 0 {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(volume = %slot.name, writers = gate.writers, "writes still suspended: changing the attachment without waiting for them");
                break;
            }
            gate = slot
                .drained
                .wait_timeout(gate, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Stops replicating volume `name` and forgets its attachment (the
    /// volume is being deleted).
    pub fn detach(&self, name: &str) {
        let Some(slot) = self.existing(name) else {
            return;
        };
        let _one = lock(&slot.change);
        let old = lock(&slot.gate).state.clone();
        for (_, r) in &old.replicators {
            r.retire();
        }
        self.drain(&slot);
        let mut gate = lock(&slot.gate);
        gate.state = Arc::new(Attached::default());
        gate.changing = false;
        slot.drained.notify_all();
        drop(gate);
        if let Err(e) = self.book.forget_content(name) {
            tracing::warn!(volume = name, error = %e, "cannot record that a deleted volume holds nothing");
        }
        if let Err(e) = self.save() {
            tracing::warn!(volume = name, error = %error_chain(&e), "cannot record that a deleted volume is detached");
        }
    }

    /// Makes `replicators` (started by the caller) volume `name`'s primary
    /// replication at `epoch`, without checks: for benchmarks and tests
    /// that build replicators themselves.
    pub fn adopt(&self, name: &str, epoch: u64, replicators: Vec<Replicator>) {
        let slot = self.slot(name);
        let spec = AttachSpec {
            role: Role::Primary,
            epoch,
            peers: replicators.iter().map(|r| r.peer().to_string()).collect(),
            allow_outdate: false,
            protocol: replicators
                .first()
                .map_or(Protocol::C, Replicator::protocol),
        };
        let replicators = replicators
            .into_iter()
            .map(|r| (r.peer().to_string(), r))
            .collect();
        lock(&slot.gate).state = Arc::new(Attached {
            spec: Some(spec),
            replicators,
        });
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn load_attachments(path: &Path) -> io::Result<Vec<(String, AttachSpec)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = || {
            io::Error::other(format!(
                "{} line {}: not `VOLUME ROLE EPOCH ALLOW_OUTDATE [protocol=A|B|C] [PEER...]`",
                path.display(),
                n + 1
            ))
        };
        let mut words = line.split_whitespace();
        let name = words.next().ok_or_else(bad)?;
        let role = match words.next() {
            Some("standalone") => Role::Standalone,
            Some("secondary") => Role::Secondary,
            Some("primary") => Role::Primary,
            _ => return Err(bad()),
        };
        let epoch = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
        let allow_outdate = match words.next() {
            Some("0") => false,
            Some("1") => true,
            _ => return Err(bad()),
        };
        let mut protocol = Protocol::C;
        let mut peers = Vec::new();
        for word in words {
            // Peers are `host:port`: never an `=`.
            match word.strip_prefix("protocol=") {
                Some(p) => protocol = p.parse().map_err(|_| bad())?,
                None => peers.push(word.to_owned()),
            }
        }
        out.push((
            name.to_owned(),
            AttachSpec {
                role,
                epoch,
                peers,
                allow_outdate,
                protocol,
            },
        ));
    }
    Ok(out)
}

/// A fresh, non-zero generation identifier.
fn new_generation() -> u64 {
    loop {
        let g = uuid::Uuid::new_v4().as_u64_pair().0;
        if g != 0 {
            return g;
        }
    }
}
