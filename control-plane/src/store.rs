//! RocksDB storage for a member: the Raft log, the vote, and the state
//! machine (objects, applied state, current snapshot), in one database.
//!
//! Invariants:
//! - a log append is acknowledged to openraft (its `LogFlushed` callback)
//!   only after the write-ahead log is fsynced (in the append itself:
//!   openraft 0.9 waits for each append before it takes the next, so a
//!   follower's appends have nothing to share an fsync with); except,
//!   when `raft.leader_parallel_fsync` is set (the default), the
//!   leader's own new normal entries (written by this member as the
//!   leader of the term its committed vote names; never a membership
//!   entry, which openraft acts on as soon as it is committed): those are
//!   acknowledged as soon as they are written, so openraft sends them to
//!   the followers while the leader's fsync runs, fsynced by the flusher
//!   thread (appends that arrive while an fsync runs share the next one:
//!   group commit), and their fsync is awaited before they are applied
//!   instead (below);
//! - openraft then counts the leader's unsynced copy in its commit
//!   quorum, so its commit index can run ahead of what a majority holds
//!   durably. That index never leaves this member unchecked: every
//!   AppendEntries the leader sends carries it clamped to the newest
//!   entry durable here ([`DurableLog::clamp_commit`], decision 57), so
//!   no follower applies an entry before the leader's fsync, and the
//!   leader applies only what it has fsynced; an entry lost with the
//!   leader's page cache was seen by nobody;
//! - the commit index openraft saves (`save_committed`) is written
//!   without a sync after the entries it names, in the same write-ahead
//!   log, which RocksDB recovers as a prefix: it is never recovered
//!   beyond the recovered log;
//! - a member whose own disk stalled longer than a heartbeat interval
//!   (an append's fsync, a truncation) does not start an election for
//!   an election timeout after it, nor while its leader's AppendEntries
//!   keep arriving ([`ElectionGuard`]): openraft's core takes its timer
//!   tick before the AppendEntries that queued meanwhile, and would count
//!   a late core as the leader's silence;
//! - nothing is applied to the state machine before every append holding
//!   an entry up to the applied one is fsynced, so no client sees an
//!   answer or a read that rests on an entry this member could lose:
//!   a write is answered only once it is fsynced on the leader and on
//!   the followers that made up its quorum;
//! - the vote and log truncations are written with a synchronous write;
//! - the newest log entries are also kept in memory (`RecentEntries`,
//!   up to [`RECENT_BYTES`] of their encoded size), equal to what the
//!   database holds at those indexes: replication and apply read them
//!   from there instead of reading and decoding them back;
//! - everything lives in one database with one write-ahead log, which
//!   RocksDB recovers as a consistent prefix, so the state machine on disk
//!   is never ahead of the log it was applied from;
//! - the in-memory [`Machine`] always equals the state machine on disk
//!   plus nothing: it is updated in the same step as the disk write;
//! - the current snapshot lives in its own file (`SNAPSHOT` in the data
//!   directory: a JSON line of metadata, then the data), written to a
//!   temporary file, fsynced and renamed over the old one, never in the
//!   database: megabytes through the write-ahead log would make every log
//!   append's fsync wait for them (and Raft's heartbeats behind those).
//!   A snapshot in the database (a seeded directory, or an older member)
//!   is read when there is no file;
//! - a snapshot is built on a blocking thread from a RocksDB snapshot
//!   taken under the state lock (so it is the state at the applied index
//!   read with it), concatenating the objects' stored JSON: the lock is
//!   held for that moment only, never for a copy of the state, so apply
//!   (and the async workers it would block) goes on meanwhile.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io::{self, Cursor};
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use basalt_api::Object;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, CommittedLeaderId, EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    Snapshot, StorageIOError, Vote,
};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};

use crate::history::{Change, History};
use crate::raft_types::{
    Entry, LogId, NodeId, Raft, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::state::{Command, Outcome, Refusal, State};

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_SM: &str = "sm";

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
/// The current snapshot's file in the data directory.
const SNAPSHOT_FILE: &str = "SNAPSHOT";
const KEY_APPLIED: &[u8] = b"applied";
const OBJECT_PREFIX: &str = "obj/";
/// The first key after every `obj/…` key.
const OBJECT_END: &str = "obj0";

/// The storage could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// RocksDB refused to open the directory.
    #[error("opening the database in {path}")]
    Open {
        /// The data directory.
        path: String,
        /// RocksDB's error.
        #[source]
        source: rocksdb::Error,
    },
    /// What is on disk cannot be read back.
    #[error("reading the state machine from {path}: {reason}")]
    Corrupt {
        /// The data directory.
        path: String,
        /// What could not be decoded.
        reason: String,
    },
    /// The group-commit thread could not be started.
    #[error("starting the log flusher thread")]
    Flusher(#[source] io::Error),
}

/// The state machine's data in memory, shared by the Raft state machine,
/// the admin service (reads, watches) and the controllers.
#[derive(Debug)]
pub struct Machine {
    /// Every stored object.
    pub state: State,
    /// The last applied log id.
    pub last_applied: Option<LogId>,
    /// The last applied membership.
    pub membership: StoredMembership,
    /// Recent changes, for watches.
    pub history: History,
}

impl Machine {
    /// The index of the last applied entry (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.last_applied.map_or(0, |id| id.index)
    }
}

/// The [`Machine`] behind a lock, plus a channel that announces each new
/// applied index (watches wait on it).
#[derive(Debug)]
pub struct Shared {
    machine: RwLock<Machine>,
    applied: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// Reads the machine. A poisoned lock (a panic while writing, which
    /// the code avoids) still gives the data: every write is a single
    /// in-place step.
    pub fn read(&self) -> RwLockReadGuard<'_, Machine> {
        self.machine.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Machine> {
        self.machine.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that sees every new applied index.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }
}

/// Opens (or creates) the database in `dir` for member `me`; returns the
/// log store, the state machine and the shared machine they fill.
/// `history` is how many changes to keep for watches.
///
/// `parallel_leader_fsync` acknowledges the leader's own appends before
/// their fsync (see the module's invariants: safe only with every
/// AppendEntries' commit index clamped by [`DurableLog::clamp_commit`]).
pub fn open(
    dir: &Path,
    history: usize,
    me: NodeId,
    parallel_leader_fsync: bool,
) -> Result<(LogStore, StateMachineStore, Arc<Shared>), OpenError> {
    let path = dir.display().to_string();
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let families = [CF_LOG, CF_META, CF_SM]
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, rocksdb::Options::default()));
    let db =
        DB::open_cf_descriptors(&options, dir, families).map_err(|source| OpenError::Open {
            path: path.clone(),
            source,
        })?;
    let db = Arc::new(db);

    let corrupt = |reason: String| OpenError::Corrupt {
        path: path.clone(),
        reason,
    };
    let (last_applied, membership) = match get_json::<AppliedState>(&db, CF_SM, KEY_APPLIED) {
        Ok(Some(applied)) => (applied.last_applied, applied.membership),
        Ok(None) => (None, StoredMembership::default()),
        Err(err) => return Err(corrupt(err.to_string())),
    };
    let mut objects = Vec::new();
    for item in db.iterator_cf(
        cf(&db, CF_SM),
        IteratorMode::From(OBJECT_PREFIX.as_bytes(), Direction::Forward),
    ) {
        let (key, value) = item.map_err(|e| corrupt(e.to_string()))?;
        if !key.starts_with(OBJECT_PREFIX.as_bytes()) {
            break;
        }
        let object: Object = serde_json::from_slice(&value)
            .map_err(|e| corrupt(format!("object {}: {e}", String::from_utf8_lossy(&key))))?;
        objects.push(object);
    }
    let start = last_applied.map_or(0, |id| id.index);
    let (applied, _) = tokio::sync::watch::channel(start);
    let shared = Arc::new(Shared {
        machine: RwLock::new(Machine {
            state: State::from_objects(objects),
            last_applied,
            membership,
            history: History::new(history, start),
        }),
        applied,
    });

    let (flush_tx, flush_rx) = mpsc::channel();
    let flusher_db = Arc::clone(&db);
    let durability = Arc::new(Durability::default());
    let flusher_durability = Arc::clone(&durability);
    let hooks = Arc::new(FsyncHooks::default());
    let flusher_hooks = Arc::clone(&hooks);
    thread::Builder::new()
        .name("raft-log-flush".into())
        .spawn(move || run_flusher(&flusher_db, &flush_rx, &flusher_durability, &flusher_hooks))
        .map_err(OpenError::Flusher)?;

    let log = LogStore {
        db: Arc::clone(&db),
        flusher: flush_tx,
        me,
        leading: None,
        parallel_leader_fsync,
        durability: Arc::clone(&durability),
        recent: Arc::default(),
        hooks,
        guard: Arc::new(ElectionGuard::default()),
    };
    let sm = StateMachineStore {
        db,
        dir: dir.to_owned(),
        shared: Arc::clone(&shared),
        durability,
        snapshot_hooks: Arc::default(),
    };
    Ok((log, sm, shared))
}

/// One of the leader's own appends on its way to the flusher.
struct FlushJob {
    /// The append's number in [`Durability`].
    seq: u64,
}

/// Which appends are not fsynced yet, so that apply can wait for them.
#[derive(Debug, Default)]
struct Durability {
    state: Mutex<DurabilityState>,
    /// Wakes appliers after each fsync.
    flushed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct DurabilityState {
    /// The number the next append gets.
    next_seq: u64,
    /// Appends written but not fsynced yet: (number, first index), in order.
    unflushed: VecDeque<(u64, u64)>,
    /// The last fsync failed: nothing more is reported durable.
    failed: Option<String>,
}

impl Durability {
    fn lock(&self) -> std::sync::MutexGuard<'_, DurabilityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an append of entries from `first_index` on; returns its number.
    fn appended(&self, first_index: u64) -> u64 {
        let mut state = self.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.unflushed.push_back((seq, first_index));
        seq
    }

    /// Records that every append up to number `seq` is fsynced (or that
    /// the fsync failed).
    fn flushed(&self, seq: u64, result: Result<(), String>) {
        {
            let mut state = self.lock();
            match result {
                Ok(()) => {
                    while state.unflushed.front().is_some_and(|(s, _)| *s <= seq) {
                        state.unflushed.pop_front();
                    }
                }
                Err(reason) => state.failed = Some(reason),
            }
        }
        self.flushed.notify_waiters();
    }

    /// The highest index at or below `index` that no unfsynced append
    /// holds (entries at or below it are durable here).
    fn durable_upto(&self, index: u64) -> u64 {
        let state = self.lock();
        state
            .unflushed
            .iter()
            .map(|(_, first)| *first)
            .min()
            .map_or(index, |first| index.min(first.saturating_sub(1)))
    }

    /// Waits until every append holding an entry at or below `index` is
    /// fsynced; an error when an fsync failed.
    async fn wait_durable(&self, index: u64) -> Result<(), String> {
        loop {
            let notified = self.flushed.notified();
            tokio::pin!(notified);
            // Registered before the check, so an fsync that ends between
            // the check and the wait still wakes it.
            notified.as_mut().enable();
            {
                let state = self.lock();
                if let Some(reason) = &state.failed {
                    return Err(reason.clone());
                }
                if !state.unflushed.iter().any(|(_, first)| *first <= index) {
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

/// The group commit of the leader's own appends: waits for one, then
/// fsyncs the write-ahead log once for every append that arrived
/// meanwhile, and records them durable.
fn run_flusher(
    db: &DB,
    pending: &mpsc::Receiver<FlushJob>,
    durability: &Durability,
    hooks: &FsyncHooks,
) {
    while let Ok(first) = pending.recv() {
        hooks.wait_flusher_released();
        let last = pending
            .try_iter()
            .map(|job| job.seq)
            .fold(first.seq, u64::max);
        let result = db.flush_wal(true).map_err(|e| e.to_string());
        durability.flushed(last, result);
    }
}

/// Test hooks that make the log's fsyncs slow on purpose: the leader's
/// flusher held back, a member's inline fsyncs stalled. Both are off
/// unless a test sets them; they emulate a slow disk, nothing else.
#[derive(Debug, Default)]
pub struct FsyncHooks {
    held: Mutex<bool>,
    released: Condvar,
    /// Milliseconds every inline fsync sleeps first.
    stall_ms: AtomicU64,
}

impl FsyncHooks {
    /// Holds the flusher thread before its next fsync until
    /// [`FsyncHooks::release_flusher`].
    pub fn hold_flusher(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Lets the flusher thread go on.
    pub fn release_flusher(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.released.notify_all();
    }

    /// Makes every inline fsync (a follower's append, a truncation) take
    /// `stall` longer; zero turns it off.
    pub fn stall_inline_fsyncs(&self, stall: Duration) {
        let ms = u64::try_from(stall.as_millis()).unwrap_or(u64::MAX);
        self.stall_ms.store(ms, Ordering::Relaxed);
    }

    fn wait_flusher_released(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn stall_inline(&self) {
        let ms = self.stall_ms.load(Ordering::Relaxed);
        if ms > 0 {
            thread::sleep(Duration::from_millis(ms));
        }
    }
}

/// The longest an [`ElectionGuard`] holds elections off, in multiples of
/// its `hold`.
pub const GUARD_HOLD_LIMIT: u32 = 5;

/// Keeps a member from starting an election it has no grounds for: while
/// its own disk stalled, and while its leader's AppendEntries keep
/// arriving.
///
/// openraft's core runs a log append (and its inline fsync) to the end
/// before it looks at anything else, then takes its timer tick before
/// the AppendEntries that queued meanwhile, and it counts the leader as
/// heard only when its core takes an AppendEntries: a core that is late
/// (a stalled disk, a starved CPU) reads as the leader's silence,
/// although the leader's messages are waiting in the queue. Such an
/// election deposes a working leader, and a member whose log is behind
/// keeps electing without winning, deposing each new leader in turn
/// (seen under a saturated CPU: hundreds of terms in two minutes).
///
/// So elections are switched off (openraft's runtime switch, read by the
/// tick):
/// - after a disk call longer than `stall_after`, for `hold` or the
///   stall's own length, whichever is longer (at most
///   [`GUARD_HOLD_LIMIT`] × `hold`: a long stall usually starved the
///   whole process, so the queued AppendEntries need longer to reach the
///   core); a later stall extends it;
/// - for `hold` after an AppendEntries of the current term (or a later
///   one) from a committed leader arrived at this member's Raft service
///   ([`ElectionGuard::heard_leader`]), before the core takes it.
///
/// A ticker switches them on again once both holds ran out. A leader that
/// really died is not replaced later than otherwise: its messages stop
/// arriving, and `hold` (the election timeout's maximum, which openraft
/// also grants as the leader lease) ends before openraft's own timer
/// (that lease plus the election timeout) after the last one the core took.
#[derive(Default)]
pub struct ElectionGuard {
    switch: Mutex<Option<ElectionSwitch>>,
    settings: Mutex<Option<(Duration, Duration)>>,
    holds: Mutex<GuardHolds>,
}

/// What turns a member's elections on (`true`) or off.
type ElectionSwitch = Arc<dyn Fn(bool) + Send + Sync>;

#[derive(Debug, Default)]
struct GuardHolds {
    /// A disk stall holds elections off until then.
    stalled_until: Option<Instant>,
    /// The leader was heard: elections are off until then.
    heard_until: Option<Instant>,
    /// Elections are switched off now.
    off: bool,
}

impl std::fmt::Debug for ElectionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElectionGuard")
            .field("holds", &self.holds)
            .finish_non_exhaustive()
    }
}

impl ElectionGuard {
    /// Starts guarding `raft` (see the type): a disk call longer than
    /// `stall_after` switches its elections off for `hold` or the call's
    /// length, whichever is longer (at most [`GUARD_HOLD_LIMIT`] × `hold`),
    /// and an AppendEntries from its leader for `hold`. Runs a ticker on
    /// the current tokio runtime until [`ElectionGuard::detach`].
    pub fn attach(self: &Arc<Self>, raft: Raft, stall_after: Duration, hold: Duration) {
        let switch = move |on: bool| raft.runtime_config().elect(on);
        self.attach_switch(Arc::new(switch), stall_after, hold);
    }

    /// [`ElectionGuard::attach`] with any switch (tests).
    fn attach_switch(
        self: &Arc<Self>,
        switch: ElectionSwitch,
        stall_after: Duration,
        hold: Duration,
    ) {
        *self.switch.lock().unwrap_or_else(|e| e.into_inner()) = Some(switch);
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = Some((stall_after, hold));
        let guard = Arc::downgrade(self);
        let tick = (stall_after / 2).max(Duration::from_millis(5));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(tick).await;
                    let Some(guard) = guard.upgrade() else { return };
                    if !guard.release_expired(Instant::now()) {
                        return;
                    }
                }
            });
        }
    }

    /// Stops guarding (drops the Raft handle it keeps; the ticker ends).
    pub fn detach(&self) {
        *self.switch.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GuardHolds> {
        self.holds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Switches elections on or off; false when detached.
    fn set_elect(&self, on: bool) -> bool {
        match &*self.switch.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(switch) => {
                switch(on);
                true
            }
            None => false,
        }
    }

    /// Switches elections on again when every hold ran out by `now`;
    /// false when detached.
    fn release_expired(&self, now: Instant) -> bool {
        let mut holds = self.lock();
        let held = holds.stalled_until.is_some_and(|t| now < t)
            || holds.heard_until.is_some_and(|t| now < t);
        if holds.off && !held {
            holds.off = false;
            return self.set_elect(true);
        }
        self.switch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Holds elections off until `until` at least (`stall`: a disk stall,
    /// else the leader heard).
    fn hold_until(&self, until: Instant, stall: bool) {
        let mut holds = self.lock();
        let slot = if stall {
            &mut holds.stalled_until
        } else {
            &mut holds.heard_until
        };
        *slot = Some(slot.map_or(until, |t| t.max(until)));
        if !holds.off {
            holds.off = true;
            self.set_elect(false);
        }
    }

    /// Records that an AppendEntries from a committed leader of the
    /// current term (or a later one) arrived at this member: no election
    /// for the hold, whatever the core is busy with.
    pub fn heard_leader(&self) {
        let Some((_, hold)) = *self.settings.lock().unwrap_or_else(|e| e.into_inner()) else {
            return;
        };
        self.hold_until(Instant::now() + hold, false);
    }

    /// Records a disk call that started at `started` and just ended.
    fn disk_call_ended(&self, started: Instant) {
        let Some((stall_after, hold)) = *self.settings.lock().unwrap_or_else(|e| e.into_inner())
        else {
            return;
        };
        let took = started.elapsed();
        if took <= stall_after {
            return;
        }
        let hold = took.clamp(hold, hold.saturating_mul(GUARD_HOLD_LIMIT));
        // Switched off before the append returns to the core, so its
        // next tick already sees it.
        self.hold_until(Instant::now() + hold, true);
        tracing::info!(
            ?took,
            ?hold,
            "the log's disk stalled: this member starts no election for a while"
        );
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    // The families are created on open (`create_missing_column_families`),
    // so a missing one is a broken invariant of this module, not input.
    db.cf_handle(name)
        .unwrap_or_else(|| unreachable!("column family {name} is created on open"))
}

/// Errors reading or decoding one stored value.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("rocksdb")]
    Db(#[from] rocksdb::Error),
    #[error("decoding a stored value")]
    Decode(#[from] serde_json::Error),
}

fn get_json<T: for<'de> Deserialize<'de>>(
    db: &DB,
    family: &str,
    key: &[u8],
) -> Result<Option<T>, ReadError> {
    match db.get_cf(cf(db, family), key)? {
        Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
        None => Ok(None),
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Our stored types are plain data with string keys: encoding cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn sync_writes() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn object_key(object: &Object) -> String {
    format!("{OBJECT_PREFIX}{}/{}", object.kind(), object.name())
}

/// What the state machine has applied, stored with every applied batch.
#[derive(Debug, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// A snapshot as stored: its metadata and the serialized state.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The serialized state in a snapshot.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotState {
    objects: Vec<Object>,
}

/// How much of the newest log (by encoded size) is kept in memory.
pub const RECENT_BYTES: usize = 32 << 20;

/// The newest log entries, at consecutive indexes, with their encoded
/// sizes: what openraft reads back right after an append (to send to the
/// followers, to apply) without RocksDB and JSON.
#[derive(Debug, Default)]
struct RecentEntries {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    /// Drops every entry at `index` or after.
    fn truncate_from(&mut self, index: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= index)
        {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops every entry at `index` or before.
    fn purge_upto(&mut self, index: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| e.log_id.index <= index)
        {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// Adds entries just written at consecutive indexes (replacing any
    /// at or after the first of them), then drops the oldest past the
    /// size limit.
    fn push(&mut self, appended: Vec<(Entry, usize)>) {
        let Some(first) = appended.first().map(|(e, _)| e.log_id.index) else {
            return;
        };
        self.truncate_from(first);
        let follows = self
            .entries
            .back()
            .is_none_or(|(e, _)| e.log_id.index + 1 == first);
        if !follows {
            // A gap (after a snapshot was installed): start again.
            self.entries.clear();
            self.bytes = 0;
        }
        for (entry, size) in appended {
            self.bytes += size;
            self.entries.push_back((entry, size));
        }
        while self.bytes > RECENT_BYTES && self.entries.len() > 1 {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// The log id at `index`, if its entry is here.
    fn log_id_at(&self, index: u64) -> Option<LogId> {
        let offset = usize::try_from(index.checked_sub(self.first_index()?)?).ok()?;
        self.entries.get(offset).map(|(e, _)| e.log_id)
    }

    /// The entries from `start` to `end`, if all of them are here.
    fn get(&self, start: u64, end: Bound<u64>) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let next = first + self.entries.len() as u64;
        let end = match end {
            Bound::Included(last) => last.saturating_add(1),
            Bound::Excluded(end) => end,
            Bound::Unbounded => next,
        };
        if start < first || end > next {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end - first).ok()?;
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

/// The Raft log and vote in RocksDB, with group commit.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    flusher: mpsc::Sender<FlushJob>,
    /// This member's id.
    me: NodeId,
    /// The leader id (term, this member) while the last saved vote is this
    /// member's committed vote: it leads that term.
    leading: Option<CommittedLeaderId<NodeId>>,
    /// The leader's own appends are acknowledged before their fsync.
    parallel_leader_fsync: bool,
    durability: Arc<Durability>,
    recent: Arc<Mutex<RecentEntries>>,
    hooks: Arc<FsyncHooks>,
    guard: Arc<ElectionGuard>,
}

/// What the network needs from the log store to send only commit
/// indexes that rest on this member's fsynced log (the leader's side of
/// decision 57).
#[derive(Clone)]
pub struct DurableLog {
    db: Arc<DB>,
    durability: Arc<Durability>,
    recent: Arc<Mutex<RecentEntries>>,
}

impl std::fmt::Debug for DurableLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableLog").finish_non_exhaustive()
    }
}

impl DurableLog {
    /// The newest log id at or below `committed` whose entry (and every
    /// one before it) is fsynced in this member's log: what an
    /// AppendEntries may tell a follower is committed. openraft's leader
    /// counts its own written-but-unsynced entries in the quorum, so its
    /// commit index alone may name an entry only one member holds
    /// durably. Waits up to `wait` for the fsync first (a heartbeat that
    /// carries nothing else may as well carry the full index); never
    /// answers more than `committed`. `None` when even the first entry
    /// is not durable, or the id at the bound cannot be read (a smaller
    /// commit index is always safe to send: followers keep the larger
    /// one they know).
    pub async fn clamp_commit(&self, committed: Option<LogId>, wait: Duration) -> Option<LogId> {
        let committed = committed?;
        let index = committed.index;
        if self.durability.durable_upto(index) == index {
            return Some(committed);
        }
        if !wait.is_zero()
            && let Ok(Ok(())) =
                tokio::time::timeout(wait, self.durability.wait_durable(index)).await
        {
            return Some(committed);
        }
        let bound = self.durability.durable_upto(index);
        if bound == index {
            return Some(committed);
        }
        if bound == 0 {
            return None;
        }
        self.log_id_at(bound)
    }

    /// The log id at `index`, from the recent entries or the database.
    fn log_id_at(&self, index: u64) -> Option<LogId> {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log_id_at(index);
        if recent.is_some() {
            return recent;
        }
        let value = self
            .db
            .get_cf(cf(&self.db, CF_LOG), log_key(index))
            .ok()??;
        serde_json::from_slice::<Entry>(&value)
            .ok()
            .map(|entry| entry.log_id)
    }

    /// The highest index at or below `index` that is durable here.
    pub fn durable_upto(&self, index: u64) -> u64 {
        self.durability.durable_upto(index)
    }
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("me", &self.me)
            .field("leading", &self.leading)
            .finish_non_exhaustive()
    }
}

impl LogStore {
    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEntries> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The handle the network clamps commit indexes with.
    pub fn durable_log(&self) -> DurableLog {
        DurableLog {
            db: Arc::clone(&self.db),
            durability: Arc::clone(&self.durability),
            recent: Arc::clone(&self.recent),
        }
    }

    /// This store's fsync test hooks.
    pub fn fsync_hooks(&self) -> Arc<FsyncHooks> {
        Arc::clone(&self.hooks)
    }

    /// The guard that keeps a stalled disk from starting elections.
    pub fn election_guard(&self) -> Arc<ElectionGuard> {
        Arc::clone(&self.guard)
    }

    /// fsyncs the write-ahead log inline (a stall past the guard's limit
    /// holds this member's elections off).
    fn sync_inline(&self) -> Result<(), String> {
        let started = Instant::now();
        self.hooks.stall_inline();
        let result = self.db.flush_wal(true).map_err(|e| e.to_string());
        self.guard.disk_call_ended(started);
        result
    }

    // openraft's own error type, returned as openraft wants it.
    #[allow(clippy::result_large_err)]
    fn read_entries(&self, start: u64, end: Bound<u64>) -> Result<Vec<Entry>, StorageError> {
        if let Some(entries) = self.recent().get(start, end) {
            return Ok(entries);
        }
        let mut entries = Vec::new();
        let from = log_key(start);
        for item in self.db.iterator_cf(
            cf(&self.db, CF_LOG),
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = index_of(&key).map_err(|e| StorageIOError::read_logs(&e))?;
            let past_end = match end {
                Bound::Included(last) => index > last,
                Bound::Excluded(end) => index >= end,
                Bound::Unbounded => false,
            };
            if past_end {
                break;
            }
            let entry: Entry = serde_json::from_slice(&value)
                .map_err(|e| StorageIOError::read_log_at_index(index, &e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

fn index_of(key: &[u8]) -> Result<u64, io::Error> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| io::Error::other(format!("log key of {} bytes, expected 8", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        self.read_entries(start, range.end_bound().cloned())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> =
            get_json(&self.db, CF_META, KEY_PURGED).map_err(|e| StorageIOError::read_logs(&e))?;
        let last = self
            .db
            .iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End)
            .next()
            .transpose()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last_log_id = match last {
            Some((_, value)) => {
                let entry: Entry =
                    serde_json::from_slice(&value).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.leading = (vote.committed && vote.leader_id.node_id == self.me)
            .then(|| CommittedLeaderId::new(vote.leader_id.term, self.me));
        self.db
            .put_cf_opt(
                cf(&self.db, CF_META),
                KEY_VOTE,
                to_json(vote),
                &sync_writes(),
            )
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        get_json(&self.db, CF_META, KEY_VOTE).map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.db
            .put_cf(cf(&self.db, CF_META), KEY_COMMITTED, to_json(&committed))
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> =
            get_json(&self.db, CF_META, KEY_COMMITTED).map_err(|e| StorageIOError::read(&e))?;
        Ok(committed.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let family = cf(&self.db, CF_LOG);
        let mut first_index = None;
        let mut own = true;
        let mut appended = Vec::new();
        for entry in entries {
            first_index.get_or_insert(entry.log_id.index);
            // A membership entry takes effect in openraft as soon as it
            // is committed (the next step of a change, a removed
            // member's exit), so it never commits on an unsynced copy.
            own &= self.leading == Some(entry.log_id.leader_id)
                && !matches!(entry.payload, EntryPayload::Membership(_));
            let encoded = to_json(&entry);
            let size = encoded.len();
            batch.put_cf(family, log_key(entry.log_id.index), encoded);
            appended.push((entry, size));
        }
        let Some(first_index) = first_index else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        // Not synced here: the flusher fsyncs the write-ahead log once for
        // every append waiting, then acknowledges them.
        self.db
            .write(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.recent().push(appended);
        let seq = self.durability.appended(first_index);
        if !own || !self.parallel_leader_fsync {
            // A follower's append (or entries of another term, a
            // membership entry, or any append when the leader's fsync
            // may not run late): openraft
            // waits for it before it takes anything else, so there is
            // nothing to share the fsync with; synced here, which spares
            // the hand-over to the flusher thread and back (measured:
            // under load those wake-ups held followers past their
            // election timeout).
            let result = self.sync_inline();
            self.durability.flushed(seq, result.clone());
            callback.log_io_completed(result.map_err(io::Error::other));
            return Ok(());
        }
        // The leader's own entries: reported written at once, so openraft
        // replicates them while the flusher fsyncs them (several appends
        // that arrive meanwhile share one); apply waits for the fsync.
        callback.log_io_completed(Ok(()));
        if self.flusher.send(FlushJob { seq }).is_err() {
            self.durability
                .flushed(seq, Err("the log flusher thread is gone".into()));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.recent().truncate_from(log_id.index);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            cf(&self.db, CF_LOG),
            log_key(log_id.index),
            log_key(u64::MAX),
        );
        batch.delete_cf(cf(&self.db, CF_LOG), log_key(u64::MAX));
        let started = Instant::now();
        let result = self.db.write_opt(batch, &sync_writes());
        self.guard.disk_call_ended(started);
        result.map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.recent().purge_upto(log_id.index);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf(&self.db, CF_META), KEY_PURGED, to_json(&log_id));
        batch.delete_range_cf(
            cf(&self.db, CF_LOG),
            log_key(0),
            log_key(log_id.index.saturating_add(1)),
        );
        self.db
            .write(batch)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// The state machine: applies entries to the [`Machine`] and to RocksDB,
/// builds and installs snapshots.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    db: Arc<DB>,
    dir: std::path::PathBuf,
    shared: Arc<Shared>,
    durability: Arc<Durability>,
    snapshot_hooks: Arc<SnapshotHooks>,
}

impl StateMachineStore {
    #[allow(clippy::result_large_err)]
    fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        write_snapshot_file(&self.dir, snapshot)
            .map_err(|e| StorageIOError::write_snapshot(Some(snapshot.meta.signature()), &e))?;
        // A snapshot a seed or an older member left in the database is
        // older than the file now.
        self.db
            .delete_cf(cf(&self.db, CF_META), KEY_SNAPSHOT)
            .map_err(|e| StorageIOError::write_snapshot(Some(snapshot.meta.signature()), &e).into())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Everything runs on a blocking thread, and the state lock is
        // held only to take a RocksDB snapshot at the applied index: a
        // copy of every object under the lock (what this did before)
        // held apply, which blocked a second async worker on the lock,
        // so on a 2-core machine the whole member stopped for the copy
        // (350 ms under load, the leader's heartbeats with it: its
        // followers elected a new leader in the middle of a write load).
        let store = self.clone();
        // openraft's own error type, as openraft wants it.
        #[allow(clippy::result_large_err)]
        let build = move || store.snapshot_from_db();
        tokio::task::spawn_blocking(build)
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::error(e.to_string())))?
    }
}

/// Test hooks of the snapshot builder: hold it right after it took its
/// point in time.
#[derive(Debug, Default)]
pub struct SnapshotHooks {
    /// (held, reached): whether the builder must wait, whether one waits.
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl SnapshotHooks {
    /// Holds the next snapshot builders after they took their point in time.
    pub fn hold(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
    }

    /// Lets held builders go on.
    pub fn release(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = false;
        self.changed.notify_all();
    }

    /// Whether a builder is waiting at the hold.
    pub fn reached(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    fn pass(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.0 {
            state.1 = true;
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.1 = false;
    }
}

impl StateMachineStore {
    /// The snapshot builder's test hooks.
    pub fn snapshot_hooks(&self) -> Arc<SnapshotHooks> {
        Arc::clone(&self.snapshot_hooks)
    }

    /// Builds and stores a snapshot of the applied state from the
    /// database (blocking). The state lock is held only while a RocksDB
    /// snapshot is taken: apply writes the database under the write
    /// lock, so that snapshot holds exactly the objects at the applied
    /// index read with it. The stored objects are already the JSON a
    /// [`SnapshotState`] holds them as: the data is their concatenation,
    /// without decoding or encoding any of them.
    #[allow(clippy::result_large_err)]
    fn snapshot_from_db(&self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (point, last_applied, membership) = {
            let machine = self.shared.read();
            (
                self.db.snapshot(),
                machine.last_applied,
                machine.membership.clone(),
            )
        };
        self.snapshot_hooks.pass();
        let failed = |e: &dyn std::error::Error| {
            StorageError::from(StorageIOError::read_state_machine(AnyError::error(
                e.to_string(),
            )))
        };
        let mut data = Vec::with_capacity(1 << 20);
        data.extend_from_slice(b"{\"objects\":[");
        let mut first = true;
        for item in point.iterator_cf(
            cf(&self.db, CF_SM),
            IteratorMode::From(OBJECT_PREFIX.as_bytes(), Direction::Forward),
        ) {
            let (key, value) = item.map_err(|e| failed(&e))?;
            if !key.starts_with(OBJECT_PREFIX.as_bytes()) {
                break;
            }
            if !first {
                data.push(b',');
            }
            first = false;
            data.extend_from_slice(&value);
        }
        data.extend_from_slice(b"]}");
        drop(point);
        self.store_snapshot(data, last_applied, membership)
    }

    /// Stores `data` (an encoded [`SnapshotState`]) as the snapshot at
    /// `last_applied`.
    #[allow(clippy::result_large_err)]
    fn store_snapshot(
        &self,
        data: Vec<u8>,
        last_applied: Option<LogId>,
        membership: StoredMembership,
    ) -> Result<Snapshot<TypeConfig>, StorageError> {
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot { meta, data };
        self.save_snapshot(&stored)?;
        tracing::info!(last_log_id = ?stored.meta.last_log_id, bytes = stored.data.len(), "built a snapshot");
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let machine = self.shared.read();
        Ok((machine.last_applied, machine.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            // The leader's own entries may be committed before its fsync
            // ends (see the module's invariants): nothing is answered or
            // read from them before it has.
            let index = last.log_id.index;
            self.durability
                .wait_durable(index)
                .await
                .map_err(|reason| {
                    StorageIOError::write_logs(AnyError::error(format!(
                        "the log fsync failed: {reason}"
                    )))
                })?;
        }
        let mut outcomes = Vec::new();
        let mut batch = WriteBatch::default();
        let family = cf(&self.db, CF_SM);
        let applied_index;
        {
            let mut machine = self.shared.write();
            for entry in entries {
                machine.last_applied = Some(entry.log_id);
                let index = entry.log_id.index;
                let outcome = match entry.payload {
                    EntryPayload::Blank => Outcome::Nothing,
                    EntryPayload::Membership(membership) => {
                        machine.membership = StoredMembership::new(Some(entry.log_id), membership);
                        Outcome::Nothing
                    }
                    EntryPayload::Normal(Command::Many(commands)) => Outcome::Many(
                        commands
                            .into_iter()
                            .map(|command| match command {
                                Command::Many(_) => Outcome::Refused(Refusal::Invalid {
                                    field: "many".into(),
                                    reason: "a batch of independent commands does not nest".into(),
                                }),
                                command => {
                                    apply_command(&mut machine, &mut batch, family, index, command)
                                }
                            })
                            .collect(),
                    ),
                    EntryPayload::Normal(command) => {
                        apply_command(&mut machine, &mut batch, family, index, command)
                    }
                };
                outcomes.push(outcome);
            }
            let applied = AppliedState {
                last_applied: machine.last_applied,
                membership: machine.membership.clone(),
            };
            batch.put_cf(family, KEY_APPLIED, to_json(&applied));
            applied_index = machine.applied_index();
            // Written under the lock, so the disk and memory change together.
            self.db
                .write(batch)
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
        }
        self.shared.applied.send_replace(applied_index);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let decoded: SnapshotState = serde_json::from_slice(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        let family = cf(&self.db, CF_SM);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(family, OBJECT_PREFIX, OBJECT_END);
        for object in &decoded.objects {
            batch.put_cf(family, object_key(object), to_json(object));
        }
        let applied = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        batch.put_cf(family, KEY_APPLIED, to_json(&applied));
        let index = meta.last_log_id.map_or(0, |id| id.index);
        {
            let mut machine = self.shared.write();
            self.db
                .write(batch)
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
            machine.state = State::from_objects(decoded.objects);
            machine.last_applied = meta.last_log_id;
            machine.membership = meta.last_membership.clone();
            machine.history.reset(index);
        }
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })?;
        self.shared.applied.send_replace(index);
        tracing::info!(last_log_id = ?meta.last_log_id, "installed a snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let stored = match read_snapshot_file(&self.dir)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        {
            Some(stored) => Some(stored),
            None => get_json(&self.db, CF_META, KEY_SNAPSHOT)
                .map_err(|e| StorageIOError::read_snapshot(None, &e))?,
        };
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

/// Applies one command at `index` to the machine, adds its changes to the
/// database batch and the watch history, and answers it.
fn apply_command(
    machine: &mut Machine,
    batch: &mut WriteBatch,
    family: &ColumnFamily,
    index: u64,
    command: Command,
) -> Outcome {
    match machine.state.apply(index, command) {
        Ok(applied) => {
            for changed in applied.changes {
                match changed.change {
                    crate::state::ChangeType::Deleted => {
                        batch.delete_cf(family, object_key(&changed.object))
                    }
                    _ => batch.put_cf(
                        family,
                        object_key(&changed.object),
                        to_json(&changed.object),
                    ),
                }
                machine.history.push(Change {
                    index,
                    change: changed.change,
                    object: changed.object,
                    previous: changed.previous,
                });
            }
            Outcome::Done(applied.reply)
        }
        Err(refusal) => Outcome::Refused(refusal),
    }
}

/// Writes `snapshot` as the data directory's snapshot file: a temporary
/// file, fsynced, renamed over the old one, the directory fsynced.
fn write_snapshot_file(dir: &Path, snapshot: &StoredSnapshot) -> io::Result<()> {
    use std::io::Write as _;
    let meta = serde_json::to_vec(&snapshot.meta).map_err(io::Error::other)?;
    let temporary = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&meta)?;
    file.write_all(b"\n")?;
    file.write_all(&snapshot.data)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the data directory's snapshot file, if there is one.
fn read_snapshot_file(dir: &Path) -> io::Result<Option<StoredSnapshot>> {
    let bytes = match std::fs::read(dir.join(SNAPSHOT_FILE)) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let Some(newline) = bytes.iter().position(|&b| b == b'\n') else {
        return Err(io::Error::other("the snapshot file has no metadata line"));
    };
    let meta: SnapshotMeta = serde_json::from_slice(&bytes[..newline])
        .map_err(|e| io::Error::other(format!("the snapshot file's metadata: {e}")))?;
    Ok(Some(StoredSnapshot {
        meta,
        data: bytes[newline + 1..].to_vec(),
    }))
}

/// What a new one-member cluster starts from: a state at a log index
/// (from a backup, or recovered from a survivor's data directory).
#[derive(Debug, Clone)]
pub struct Seed {
    /// Every object.
    pub objects: Vec<Object>,
    /// The log index the state is at; the new cluster's log continues
    /// after it, so stored resource versions stay below new ones.
    pub index: u64,
    /// The Raft term the seed's last entry was written in (at least 1).
    pub term: u64,
}

/// Seeding a data directory failed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The directory already holds a member's data.
    #[error("{path} already holds a control-plane member's data; seed an empty directory")]
    NotEmpty {
        /// The data directory.
        path: String,
    },
    /// The directory cannot be read or created.
    #[error("preparing {path}")]
    Io {
        /// The data directory.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The database cannot be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Writing or reading the database failed.
    #[error("{what} in {path}")]
    Db {
        /// What was being done.
        what: &'static str,
        /// The data directory.
        path: String,
        /// RocksDB's error.
        #[source]
        source: rocksdb::Error,
    },
    /// What is on disk cannot be decoded.
    #[error("reading {path}: {reason}")]
    Corrupt {
        /// The data directory.
        path: String,
        /// What could not be decoded.
        reason: String,
    },
}

fn open_db(dir: &Path) -> Result<DB, OpenError> {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let families = [CF_LOG, CF_META, CF_SM]
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, rocksdb::Options::default()));
    DB::open_cf_descriptors(&options, dir, families).map_err(|source| OpenError::Open {
        path: dir.display().to_string(),
        source,
    })
}

/// Writes a new one-member cluster into the empty directory `dir`: the
/// seed's objects as the applied state at `seed.index`, a membership of
/// member `id` at `address` only, the log purged up to that index, a
/// snapshot of it, and a vote for `id` in the seed's term (so the member
/// elects itself when started). `Member` objects are dropped: the new
/// leader records its own.
pub fn seed_new_cluster(
    dir: &Path,
    id: NodeId,
    address: &str,
    seed: Seed,
) -> Result<(), SeedError> {
    let path = dir.display().to_string();
    let io = |source| SeedError::Io {
        path: path.clone(),
        source,
    };
    if dir.exists() && std::fs::read_dir(dir).map_err(io)?.next().is_some() {
        return Err(SeedError::NotEmpty { path });
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let db = open_db(dir)?;
    let term = seed.term.max(1);
    let log_id = LogId::new(openraft::CommittedLeaderId::new(term, id), seed.index);
    let membership = openraft::Membership::new(
        vec![std::collections::BTreeSet::from([id])],
        std::collections::BTreeMap::from([(id, openraft::BasicNode::new(address))]),
    );
    let membership = StoredMembership::new(Some(log_id), membership);
    let objects: Vec<Object> = seed
        .objects
        .into_iter()
        .filter(|o| !matches!(o, Object::Member(_)))
        .collect();

    let mut batch = WriteBatch::default();
    let sm = cf(&db, CF_SM);
    for object in &objects {
        batch.put_cf(sm, object_key(object), to_json(object));
    }
    batch.put_cf(
        sm,
        KEY_APPLIED,
        to_json(&AppliedState {
            last_applied: Some(log_id),
            membership: membership.clone(),
        }),
    );
    let meta = cf(&db, CF_META);
    batch.put_cf(meta, KEY_PURGED, to_json(&log_id));
    batch.put_cf(meta, KEY_COMMITTED, to_json(&Some(log_id)));
    batch.put_cf(meta, KEY_VOTE, to_json(&Vote::new(term, id)));
    let data = to_json(&SnapshotState { objects });
    let snapshot = StoredSnapshot {
        meta: SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: membership,
            snapshot_id: format!("seed-{term}-{}-{}", seed.index, data.len()),
        },
        data,
    };
    batch.put_cf(meta, KEY_SNAPSHOT, to_json(&snapshot));
    db.write_opt(batch, &sync_writes())
        .map_err(|source| SeedError::Db {
            what: "writing the seed",
            path: path.clone(),
            source,
        })?;
    Ok(())
}

/// Reads what a stopped member's data directory holds, for forcing a new
/// cluster from it: the applied state plus every later entry of its log,
/// applied in order — what Raft itself would commit if this member won an
/// election (a new leader commits its whole log). Entries it holds past
/// the commit index it knew may have been acknowledged to clients; none
/// it lacks can be recovered from it. Returns the seed and the membership
/// the member last knew (ids → addresses).
pub fn read_for_recovery(
    dir: &Path,
) -> Result<(Seed, std::collections::BTreeMap<NodeId, String>), SeedError> {
    let path = dir.display().to_string();
    if !dir.join("CURRENT").is_file() {
        return Err(SeedError::Corrupt {
            path,
            reason: "no control-plane database here".into(),
        });
    }
    let db = open_db(dir)?;
    let corrupt = |reason: String| SeedError::Corrupt {
        path: path.clone(),
        reason,
    };
    let applied: AppliedState = get_json(&db, CF_SM, KEY_APPLIED)
        .map_err(|e| corrupt(e.to_string()))?
        .unwrap_or(AppliedState {
            last_applied: None,
            membership: StoredMembership::default(),
        });
    let mut objects = Vec::new();
    for item in db.iterator_cf(
        cf(&db, CF_SM),
        IteratorMode::From(OBJECT_PREFIX.as_bytes(), Direction::Forward),
    ) {
        let (key, value) = item.map_err(|e| corrupt(e.to_string()))?;
        if !key.starts_with(OBJECT_PREFIX.as_bytes()) {
            break;
        }
        objects.push(
            serde_json::from_slice::<Object>(&value)
                .map_err(|e| corrupt(format!("object {}: {e}", String::from_utf8_lossy(&key))))?,
        );
    }
    let mut state = State::from_objects(objects);
    let mut last = applied.last_applied;
    let mut membership = applied.membership.membership().clone();
    let applied_index = applied.last_applied.map_or(0, |id| id.index);
    {
        let from = log_key(applied_index + 1);
        for item in db.iterator_cf(
            cf(&db, CF_LOG),
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (key, value) = item.map_err(|e| corrupt(e.to_string()))?;
            let index = index_of(&key).map_err(|e| corrupt(e.to_string()))?;
            let entry: Entry =
                serde_json::from_slice(&value).map_err(|e| corrupt(format!("log {index}: {e}")))?;
            match entry.payload {
                EntryPayload::Normal(command) => {
                    // A refused command changed nothing on any member.
                    let _ = state.apply(index, command);
                }
                EntryPayload::Membership(m) => membership = m,
                EntryPayload::Blank => {}
            }
            last = Some(entry.log_id);
        }
    }
    let members = membership
        .nodes()
        .map(|(id, node)| (*id, node.addr.clone()))
        .collect();
    let seed = Seed {
        objects: state.objects().cloned().collect(),
        index: last.map_or(0, |id| id.index),
        term: last.map_or(1, |id| id.leader_id.term),
    };
    Ok((seed, members))
}

#[cfg(test)]
mod tests {
    use basalt_api::{Image, Kind, ObjectMeta};
    use openraft::CommittedLeaderId;

    use super::*;

    fn image(name: &str) -> Object {
        Object::Image(Image {
            meta: ObjectMeta::named(name),
            ..Image::default()
        })
    }

    fn entry(index: u64, command: Command) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    #[test]
    fn recent_entries_answer_only_ranges_they_hold_whole() {
        let mut recent = RecentEntries::default();
        let batch = |from: u64, to: u64| {
            (from..=to)
                .map(|i| (entry(i, Command::Create(image(&format!("i{i}")))), 10))
                .collect::<Vec<_>>()
        };
        let indexes = |got: Option<Vec<Entry>>| {
            got.map(|v| v.iter().map(|e| e.log_id.index).collect::<Vec<_>>())
        };
        recent.push(batch(5, 9));
        assert_eq!(
            indexes(recent.get(6, Bound::Excluded(9))),
            Some(vec![6, 7, 8])
        );
        assert_eq!(
            indexes(recent.get(5, Bound::Unbounded)),
            Some(vec![5, 6, 7, 8, 9])
        );
        assert_eq!(recent.get(4, Bound::Included(6)), None, "4 is not held");
        assert_eq!(recent.log_id_at(7).map(|id| id.index), Some(7));
        assert_eq!(recent.log_id_at(4), None);
        assert_eq!(recent.log_id_at(10), None);
        assert_eq!(recent.get(8, Bound::Included(10)), None, "10 is not held");
        // A new leader's entries replace those at and after their first.
        recent.push(batch(8, 8));
        assert_eq!(
            indexes(recent.get(5, Bound::Unbounded)),
            Some(vec![5, 6, 7, 8])
        );
        recent.truncate_from(7);
        recent.purge_upto(5);
        assert_eq!(indexes(recent.get(6, Bound::Unbounded)), Some(vec![6]));
        // A gap (a snapshot installed) starts again.
        recent.push(batch(20, 21));
        assert_eq!(recent.get(6, Bound::Unbounded), None);
        assert_eq!(
            indexes(recent.get(20, Bound::Unbounded)),
            Some(vec![20, 21])
        );
        assert_eq!(recent.bytes, 20);
    }

    #[tokio::test]
    async fn a_commit_index_is_clamped_to_the_fsynced_log() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _sm, _shared) = open(dir.path(), 100, 1, true).unwrap();
        let durable = log.durable_log();
        let id = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
        let no_wait = std::time::Duration::ZERO;
        // Entries 1..=4 fsynced, 5..=6 written and not yet.
        log.recent().push(
            (1..=6)
                .map(|i| (entry(i, Command::Create(image(&format!("i{i}")))), 10))
                .collect(),
        );
        let synced = log.durability.appended(1);
        log.durability.flushed(synced, Ok(()));
        let pending = log.durability.appended(5);
        assert_eq!(durable.clamp_commit(None, no_wait).await, None);
        assert_eq!(
            durable.clamp_commit(Some(id(3)), no_wait).await,
            Some(id(3))
        );
        assert_eq!(
            durable.clamp_commit(Some(id(6)), no_wait).await,
            Some(id(4))
        );
        // An empty message waits for the fsync, within its limit.
        let waited = {
            let durable = durable.clone();
            tokio::spawn(async move {
                durable
                    .clamp_commit(Some(id(6)), std::time::Duration::from_secs(5))
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waited.is_finished());
        log.durability.flushed(pending, Ok(()));
        assert_eq!(waited.await.unwrap(), Some(id(6)));
        // A later append not fsynced yet: the index stops before it.
        let first = log.durability.appended(7);
        assert_eq!(
            durable.clamp_commit(Some(id(7)), no_wait).await,
            Some(id(6))
        );
        log.durability.flushed(first, Ok(()));
        // Nothing durable at all: no commit index.
        let dir = tempfile::tempdir().unwrap();
        let (fresh, _sm, _shared) = open(dir.path(), 100, 1, true).unwrap();
        let _ = fresh.durability.appended(1);
        let clamped = fresh.durable_log().clamp_commit(Some(id(2)), no_wait).await;
        assert_eq!(clamped, None);
    }

    #[tokio::test]
    async fn apply_waits_for_the_fsync_of_every_append_up_to_its_entries() {
        let durability = Arc::new(Durability::default());
        let first = durability.appended(5); // entries 5..=6
        let second = durability.appended(7); // entries 7..=9
        let durable = |index| {
            let durability = Arc::clone(&durability);
            tokio::spawn(async move { durability.wait_durable(index).await })
        };
        // Nothing appended at or below 4 waits.
        durable(4).await.unwrap().unwrap();
        let five = durable(6);
        let nine = durable(9);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!five.is_finished() && !nine.is_finished());
        durability.flushed(first, Ok(()));
        five.await.unwrap().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!nine.is_finished(), "entries 7..=9 are not fsynced yet");
        durability.flushed(second, Ok(()));
        nine.await.unwrap().unwrap();
        // A failed fsync fails every wait from then on.
        let third = durability.appended(10);
        durability.flushed(third, Err("EIO".into()));
        assert_eq!(durable(10).await.unwrap(), Err("EIO".into()));
    }

    #[tokio::test]
    async fn elections_stay_off_while_the_leader_is_heard_or_the_disk_stalled() {
        let guard = Arc::new(ElectionGuard::default());
        let switched = Arc::new(Mutex::new(Vec::<bool>::new()));
        let record = Arc::clone(&switched);
        let switch: ElectionSwitch = Arc::new(move |on| record.lock().unwrap().push(on));
        let hold = Duration::from_millis(200);
        guard.attach_switch(switch, Duration::from_millis(50), hold);
        let on = || switched.lock().unwrap().last().copied().unwrap_or(true);
        // The leader heard every 50 ms for a second: never on meanwhile.
        for _ in 0..20 {
            guard.heard_leader();
            assert!(!on());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*switched.lock().unwrap(), vec![false], "switched off once");
        // Silence: on again within the hold (plus a tick), not before.
        let silent = Instant::now();
        while !on() {
            assert!(
                silent.elapsed() < Duration::from_secs(2),
                "never switched on again"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            silent.elapsed() + Duration::from_millis(60) >= hold,
            "on again early"
        );
        // A disk stall of 400 ms holds them off for its own length.
        guard.disk_call_ended(Instant::now() - Duration::from_millis(400));
        assert!(!on());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!on(), "still within the stall's length");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(on());
        // A short disk call changes nothing; detached, nothing is switched.
        guard.disk_call_ended(Instant::now());
        assert!(on());
        guard.detach();
        guard.heard_leader();
        assert!(on());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_is_a_point_in_time_built_while_apply_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm, shared) = open(dir.path(), 100, 1, false).unwrap();
        sm.apply((1..=50).map(|i| entry(i, Command::Create(image(&format!("i{i}"))))))
            .await
            .unwrap();
        let at_50: Vec<Object> = shared.read().state.objects().cloned().collect();
        let hooks = sm.snapshot_hooks();
        hooks.hold();
        let mut builder = sm.get_snapshot_builder().await;
        let built = tokio::spawn(async move { builder.build_snapshot().await });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hooks.reached() {
            assert!(
                Instant::now() < deadline,
                "the builder never took its point"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The builder holds its point in time, not the state: apply goes on.
        let later = [
            entry(51, Command::Create(image("late"))),
            entry(
                52,
                Command::Delete {
                    kind: Kind::Image,
                    name: "i1".into(),
                    expected_resource_version: None,
                    force: false,
                },
            ),
        ];
        tokio::time::timeout(Duration::from_secs(5), sm.apply(later))
            .await
            .expect("apply waited for the snapshot builder")
            .unwrap();
        assert_eq!(shared.read().applied_index(), 52);
        hooks.release();
        let snapshot = built.await.unwrap().unwrap();
        assert_eq!(snapshot.meta.last_log_id.map(|id| id.index), Some(50));
        let decoded: SnapshotState = serde_json::from_slice(snapshot.snapshot.get_ref()).unwrap();
        assert_eq!(decoded.objects, at_50, "the state at index 50, in order");
        // The stored snapshot is the same, and installs as that state.
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snapshot.meta);
        assert_eq!(current.snapshot.get_ref(), snapshot.snapshot.get_ref());
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut other, other_shared) = open(dir.path(), 100, 2, false).unwrap();
        other
            .install_snapshot(&current.meta, current.snapshot)
            .await
            .unwrap();
        let installed: Vec<Object> = other_shared.read().state.objects().cloned().collect();
        assert_eq!(installed, at_50);
    }

    #[tokio::test]
    async fn a_batch_of_independent_writes_answers_each_and_persists_what_applied() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_log, mut sm, shared) = open(dir.path(), 100, 1, false).unwrap();
            let outcomes = sm
                .apply([
                    entry(1, Command::Create(image("a"))),
                    entry(
                        2,
                        Command::Many(vec![
                            Command::Create(image("b")),
                            // Refused: exists. Undoes only itself.
                            Command::Create(image("a")),
                            Command::Delete {
                                kind: Kind::Image,
                                name: "a".into(),
                                expected_resource_version: Some(1),
                                force: false,
                            },
                            Command::Many(vec![]),
                        ]),
                    ),
                ])
                .await
                .unwrap();
            assert!(matches!(&outcomes[0], Outcome::Done(o) if o.name() == "a"));
            let Outcome::Many(many) = &outcomes[1] else {
                panic!("expected one answer per write: {outcomes:?}");
            };
            assert_eq!(many.len(), 4);
            assert!(
                matches!(&many[0], Outcome::Done(o) if o.name() == "b" && o.meta().resource_version == 2)
            );
            assert!(matches!(
                &many[1],
                Outcome::Refused(Refusal::AlreadyExists { .. })
            ));
            assert!(matches!(&many[2], Outcome::Done(o) if o.name() == "a"));
            assert!(matches!(
                &many[3],
                Outcome::Refused(Refusal::Invalid { .. })
            ));
            let machine = shared.read();
            assert!(machine.state.get(Kind::Image, "a").is_none());
            assert!(machine.state.get(Kind::Image, "b").is_some());
            let changes = machine.history.since(1, None, 10).unwrap();
            assert_eq!(changes.len(), 2, "b added and a deleted, both at index 2");
            assert!(changes.iter().all(|c| c.index == 2));
        }
        // What applied is on disk. (The flusher thread lets go of the
        // database once it sees the log store gone: retry until then.)
        let mut tries = 0;
        let (_log, _sm, shared) = loop {
            match open(dir.path(), 100, 1, false) {
                Ok(opened) => break opened,
                Err(err) if tries < 100 => {
                    tries += 1;
                    let _ = err;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(err) => panic!("reopening: {err}"),
            }
        };
        let machine = shared.read();
        assert!(machine.state.get(Kind::Image, "a").is_none());
        assert!(machine.state.get(Kind::Image, "b").is_some());
        assert_eq!(machine.applied_index(), 2);
    }
}
