//! DRBD-style replication: a primary ships every write of a volume to
//! each of its peers (one or two) over Basalt's own framed TCP protocol
//! ([`wire`]) and acknowledges its client when the local write is done
//! and each peer applied it (protocol C, the default), received it
//! (protocol B) or has it in the send buffer (protocol A); see
//! [`Protocol`]. FLUSH and FUA always wait for every peer's durability.
//!
//! - [`Replicator`]: the primary's side for one volume and one peer —
//!   ships frames, tracks the peer's state, keeps a dirty-chunk set while
//!   the peer is away, asks a [`Fencer`] before acknowledging without
//!   it, resyncs only the dirty chunks when it returns, and sends the
//!   whole volume (a full sync, rate-limited) to a peer that is not in
//!   sync with its stream;
//! - [`replica::ReplicaServer`]: the peer's side — applies frames in
//!   order and refuses any carrying an epoch older than the newest seen;
//! - [`attach::Attachments`]: each volume's role (standalone, secondary,
//!   primary with peers), set at run time, and the gate NBD writes pass;
//! - [`book::ReplicaBook`]: per volume, the newest epoch and the
//!   generation it is in sync with, kept beside the pool.
//!
//! Invariants:
//! - a write is acknowledged only if every peer acknowledged it (under
//!   protocols A and B: has it in the send buffer, or received it), or the
//!   peer is away and the fencer confirmed it outdated, or the peer is
//!   being fully synced (it was never up to date; with a fencer that
//!   records outdated copies, [`Fencer::guards_full_sync`], only once it
//!   confirmed that one outdated too); then the write's chunks are in
//!   that peer's dirty set until a resync sends them; a write
//!   acknowledged before the peer applied it (protocols A and B) whose
//!   connection is lost, or that the peer fails, joins the dirty set
//!   before any reconnection can take it;
//! - frames go out in the order the writes are applied locally (the
//!   per-peer locks cover the sends and then the local write), and the
//!   replica applies them in that order, so a FLUSH acknowledged by the
//!   peer covers every write before it on both sides;
//! - a primary whose epoch a replica refused stops acknowledging writes
//!   until it is attached with an epoch at least that new;
//! - a replica is in sync with a stream (no full sync) only if it
//!   recorded that stream's generation at the end of a full sync, or the
//!   sender's volume followed a stream the replica itself ships as
//!   primary (dual primary); the design is in `sds/DESIGN.md`;
//! - with a dirty log, every chunk a write touches is set in it, and the
//!   bit or its extent's activity-log slot is durable, before the write is
//!   shipped or applied; a bit is cleared only while the peer is
//!   connected, for chunks neither dirty, in flight nor written in the
//!   last second, and only after a FLUSH the peer acknowledged and a local
//!   flush made their writes durable on both sides; when the connection
//!   is lost, every set bit joins the dirty set (the peer may have lost
//!   writes it acknowledged but had not flushed).
//!
//! With a [`dirty_log::DirtyLog`] (attached primaries of a persistent
//! process), the chunks a peer may miss are also on disk before the write
//! that makes them differ goes out, so a restarted primary keeps its
//! stream's generation and resyncs only those chunks; without one, a
//! restart forgets them and the peer gets a full sync.

pub mod attach;
pub mod book;
pub mod dirty_log;
pub mod fence;
pub mod replica;
pub mod wire;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::io::{self, BufReader, BufWriter};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::pool::{PoolError, Volume};
use dirty_log::{DirtyLog, LogFile};
use wire::{
    FLAG_FUA, FLAG_NO_HOLE, FLAG_RECEIVE_ACK, FLAG_REPAIR, FLAG_RESYNC, FLAG_SYNCED, Frame,
    FrameKind, Hello, HelloReply, Status,
};

/// When a primary acknowledges a write to its client, as DRBD's
/// protocols: always after the local write, and
///
/// - **C** (the default): once every connected peer applied it;
/// - **B**: once every connected peer received it (its receive ack, sent
///   before it applies the write; wire version 6, a peer speaking an
///   older version is waited for as under C);
/// - **A**: once it is in the socket's send buffer to every connected
///   peer.
///
/// FLUSH, FUA writes, grows, verifies and reads wait for every peer's
/// answer under every protocol: a FLUSH acknowledged is durable on every
/// connected peer, covering every write before it (peers apply frames in
/// order). A write acknowledged under A or B that the peer then fails or
/// never answers (the connection is lost) is in that peer's dirty set and
/// dirty log, so its resync sends it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Acknowledged once handed to every peer's send buffer.
    A,
    /// Acknowledged once every peer received it.
    B,
    /// Acknowledged once every peer applied it.
    #[default]
    C,
}

impl Protocol {
    fn code(self) -> u8 {
        match self {
            Protocol::A => 1,
            Protocol::B => 2,
            Protocol::C => 3,
        }
    }

    fn from_code(c: u8) -> Protocol {
        match c {
            1 => Protocol::A,
            2 => Protocol::B,
            _ => Protocol::C,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::A => "A",
            Protocol::B => "B",
            Protocol::C => "C",
        })
    }
}

/// A replication protocol name that is not `A`, `B` or `C`.
#[derive(Debug, thiserror::Error)]
#[error("replication protocol {0:?}: expected A, B or C")]
pub struct ParseProtocolError(String);

impl std::str::FromStr for Protocol {
    type Err = ParseProtocolError;

    fn from_str(s: &str) -> Result<Protocol, ParseProtocolError> {
        match s.trim() {
            "A" | "a" => Ok(Protocol::A),
            "B" | "b" => Ok(Protocol::B),
            "C" | "c" => Ok(Protocol::C),
            other => Err(ParseProtocolError(other.to_owned())),
        }
    }
}

/// How often a writer suspended by a refusing (or silent) fencer asks
/// again.
pub const FENCE_RETRY: Duration = Duration::from_secs(1);

/// Why a fencer would not confirm a peer outdated.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// Whoever decides said no (a static `deny`, or the control plane: this
    /// primary is deposed, or the peer is not one of the volume's
    /// replicas).
    #[error("fencer refused to outdate peer {peer} of volume {volume} at epoch {epoch}: {reason}")]
    Refused {
        /// The volume.
        volume: String,
        /// The peer.
        peer: SocketAddr,
        /// The asking primary's epoch.
        epoch: u64,
        /// Why, as the fencer said it.
        reason: String,
    },
    /// No answer came (no agent watching, or it could not reach the
    /// control plane in time): the primary keeps its writes suspended and
    /// asks again.
    #[error("no answer on outdating peer {peer} of volume {volume} at epoch {epoch}: {reason}")]
    Unanswered {
        /// The volume.
        volume: String,
        /// The peer.
        peer: SocketAddr,
        /// The asking primary's epoch.
        epoch: u64,
        /// What was missing.
        reason: String,
    },
}

/// Confirms that a peer the primary lost is recorded as outdated, so the
/// primary may go on acknowledging writes without it (DRBD's
/// fence-peer). Attached primaries ask the node agent through the
/// storage-local API ([`fence::AgentFencer`]), which asks the control
/// plane; operator flags use [`StaticFencer`].
///
/// Called from a writer's thread with no lock held; it may block (the
/// writes of the volume wait for the answer anyway).
pub trait Fencer: Send + Sync + fmt::Debug {
    /// `Ok` once `peer` is recorded outdated for `volume`, on behalf of
    /// its primary at `epoch`.
    fn outdate_peer(&self, volume: &str, peer: SocketAddr, epoch: u64) -> Result<(), FenceError>;

    /// Whether a peer about to be fully synced (never in sync with this
    /// stream) is asked about too, before the fill starts: a fencer that
    /// records outdated copies must know a half-filled one. `false` (a
    /// static answer has no record to keep): writes go on while it fills.
    fn guards_full_sync(&self) -> bool {
        false
    }
}

/// A fencer with a fixed answer (`--fencer allow` / `--fencer deny`).
#[derive(Debug, Clone, Copy)]
pub struct StaticFencer {
    /// Confirm every peer outdated (allow) or none (deny: writes suspend
    /// until the peer is back in sync).
    pub allow: bool,
}

impl Fencer for StaticFencer {
    fn outdate_peer(&self, volume: &str, peer: SocketAddr, epoch: u64) -> Result<(), FenceError> {
        if self.allow {
            Ok(())
        } else {
            Err(FenceError::Refused {
                volume: volume.to_owned(),
                peer,
                epoch,
                reason: "the fencer is set to deny".into(),
            })
        }
    }
}

/// Why a replicated operation was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The local write failed.
    #[error("local I/O failed")]
    Local(#[from] PoolError),
    /// A replica has seen a newer epoch: this primary is deposed.
    #[error("deposed: the replica has seen epoch {newest}, this primary has {epoch}")]
    StaleEpoch {
        /// This primary's epoch.
        epoch: u64,
        /// The replica's newest.
        newest: u64,
    },
    /// Replication to the peer was stopped (its attachment changed) while
    /// the write waited for it; the write is not acknowledged.
    #[error("replication of {volume} to {peer} stopped while the write waited for the peer")]
    Stopped {
        /// The volume.
        volume: String,
        /// The peer.
        peer: SocketAddr,
    },
    /// The volume is not writable here: it is a secondary.
    #[error("volume {volume} is a secondary here: only its primary writes it")]
    NotPrimary {
        /// The volume.
        volume: String,
    },
    /// A connected peer speaks a replication protocol too old to grow its
    /// copy: the volume is not grown (upgrade the peer first).
    #[error(
        "peer {peer} of {volume} speaks replication protocol {version}, which cannot grow a volume (version {} can): upgrade it first",
        wire::RESIZE_VERSION
    )]
    PeerTooOld {
        /// The volume.
        volume: String,
        /// The peer.
        peer: SocketAddr,
        /// The version it speaks.
        version: u16,
    },
    /// The chunks a write touches could not be marked in the peer's dirty
    /// log (or made durable for a FLUSH): the write is not acknowledged.
    #[error("recording the dirty chunks of {volume} for peer {peer}")]
    DirtyLog {
        /// The volume.
        volume: String,
        /// The peer.
        peer: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Why an online verify of a volume against a peer did not finish.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The volume is not a primary here: only a primary verifies its
    /// peers.
    #[error("volume {volume} is not a primary here: verify runs on the primary")]
    NotPrimary {
        /// The volume.
        volume: String,
    },
    /// The peer is not connected and in sync: there is nothing to compare
    /// (its resync sends what it misses).
    #[error("peer {peer} of {volume} is not connected ({state:?}): nothing to compare")]
    NotConnected {
        /// The volume.
        volume: String,
        /// The peer.
        peer: SocketAddr,
        /// How it stands.
        state: PeerState,
    },
    /// The connection was lost, or the peer could not read a range.
    #[error("verify of {volume} against {peer} was cut")]
    Cut {
        /// The volume.
        volume: String,
        /// The peer.
        peer: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the local copy failed.
    #[error("reading volume {volume} to verify it")]
    Local {
        /// The volume.
        volume: String,
        /// Why.
        #[source]
        source: PoolError,
    },
}

/// What an online verify found on one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The peer.
    pub peer: SocketAddr,
    /// The granularity of the comparison (the pool's chunk size).
    pub chunk_size: u64,
    /// Chunks compared (the whole volume).
    pub checked_chunks: u64,
    /// Chunks whose contents differ (by index), now marked dirty.
    pub out_of_sync: Vec<u64>,
    /// Of those, chunks sent to the peer again (repair), no longer dirty.
    pub repaired: u64,
}

/// How many VERIFY frames may wait for their answers at once.
const VERIFY_WINDOW: usize = 16;

/// One operation to replicate.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// A write (FUA: durable on both sides before the ack).
    Write {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: &'a [u8],
        /// Force unit access.
        fua: bool,
    },
    /// A discard.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Zeroing.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Never unmap.
        no_hole: bool,
        /// Force unit access.
        fua: bool,
    },
    /// Make every earlier write durable.
    Flush,
    /// Grow the volume to `size` bytes: applied by every connected peer
    /// (wire version 5) before it is acknowledged, in the write order, so
    /// writes past the old end that follow it apply there too. A peer away
    /// grows its copy at its next hello.
    Resize {
        /// The new size in bytes.
        size: u64,
    },
}

impl Op<'_> {
    fn frame(&self, epoch: u64, seq: u64) -> Frame {
        let fua = |f: bool| if f { FLAG_FUA } else { 0 };
        let (kind, flags, offset, length, data) = match *self {
            Op::Write {
                offset,
                data,
                fua: f,
            } => (
                FrameKind::Write,
                fua(f),
                offset,
                data.len() as u32,
                data.to_vec(),
            ),
            Op::Trim {
                offset,
                len,
                fua: f,
            } => (FrameKind::Trim, fua(f), offset, len, Vec::new()),
            Op::WriteZeroes {
                offset,
                len,
                no_hole,
                fua: f,
            } => (
                FrameKind::WriteZeroes,
                fua(f) | if no_hole { FLAG_NO_HOLE } else { 0 },
                offset,
                len,
                Vec::new(),
            ),
            Op::Flush => (FrameKind::Flush, 0, 0, 0, Vec::new()),
            Op::Resize { size } => (FrameKind::Resize, 0, size, 0, Vec::new()),
        };
        Frame {
            kind,
            flags,
            epoch,
            seq,
            offset,
            length,
            data,
        }
    }

    /// The byte range it changes.
    pub(crate) fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write { offset, data, .. } => Some((offset, data.len() as u64)),
            Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => {
                Some((offset, len.into()))
            }
            Op::Flush | Op::Resize { .. } => None,
        }
    }

    /// Whether its acknowledgement promises durability (FLUSH, FUA).
    fn durable(&self) -> bool {
        match *self {
            Op::Write { fua, .. } | Op::Trim { fua, .. } | Op::WriteZeroes { fua, .. } => fua,
            Op::Flush => true,
            Op::Resize { .. } => false,
        }
    }
}

/// How the primary sees its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Not connected yet, or away (writes go to the dirty set).
    Away,
    /// Connected, sending the chunks the peer misses (all of them in a
    /// full sync).
    Resyncing,
    /// Connected and in sync: every write is shipped.
    Connected,
    /// The peer refused this primary's epoch: no more acknowledgements.
    Deposed {
        /// The newest epoch the peer has seen.
        newest: u64,
    },
    /// The peer is a primary of the volume that is not in sync with this
    /// one: two diverged copies (reported, retried, never resolved here).
    SplitBrain,
    /// The peer's backing store failed (it answered an I/O error): it is
    /// detached and treated as away (writes tracked dirty, retried).
    DiskFailed,
}

/// Where a primary's replication of one volume to one peer stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationStatus {
    /// The peer.
    pub peer: SocketAddr,
    /// Its state.
    pub state: PeerState,
    /// Chunks changed while the peer was away, not yet resynced.
    pub dirty_chunks: u64,
    /// Bytes sent by resyncs of dirty chunks so far.
    pub resync_bytes: u64,
    /// Chunks sent by resyncs of dirty chunks so far.
    pub resync_chunks: u64,
    /// Frames the peer acknowledged.
    pub acked_frames: u64,
    /// The current connection started with a full sync still running.
    pub full_sync: bool,
    /// Data bytes sent by full syncs so far (unmapped ranges are sent as
    /// trims and not counted).
    pub full_sync_bytes: u64,
    /// Full syncs completed.
    pub full_syncs: u64,
    /// This stream's generation identifier.
    pub generation: u64,
    /// When writes are acknowledged.
    pub protocol: Protocol,
}

/// The primary's replication settings for one volume.
#[derive(Debug, Clone)]
pub struct ReplicatorConfig {
    /// The peer's replication address.
    pub peer: SocketAddr,
    /// This primary's epoch (raised at every promotion).
    pub epoch: u64,
    /// The generation identifier of this stream (unique per replicator:
    /// a replica that recorded it is in sync, except for the chunks this
    /// replicator tracks as dirty).
    pub generation: u64,
    /// Granularity of the dirty set and of resync (the pool's chunk size).
    pub chunk_size: u64,
    /// How often to retry an away peer.
    pub retry: Duration,
    /// When writes are acknowledged ([`Replicator::set_protocol`] changes
    /// it later).
    pub protocol: Protocol,
}

/// How a replicator syncs a peer that is behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncOptions {
    /// The generation the local volume was in sync with when this stream
    /// started (0: none), sent in the hello.
    pub synced_from: u64,
    /// Most data bytes per second a resync or full sync sends (0: no
    /// limit).
    pub rate: u64,
}

/// The primary's side of replication for one volume and one peer.
#[derive(Debug, Clone)]
pub struct Replicator {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    volume: Volume,
    cfg: ReplicatorConfig,
    sync: SyncOptions,
    epoch: AtomicU64,
    /// [`Protocol::code`] of the protocol writes use now.
    protocol: std::sync::atomic::AtomicU8,
    fencer: Mutex<Arc<dyn Fencer>>,
    link: Mutex<Link>,
    changed: Condvar,
    pending: Mutex<HashMap<(u64, u64), Waiting>>,
    /// READ frames waiting for their ack and data: length and answer.
    reads: Mutex<HashMap<(u64, u64), PendingRead>>,
    resync_bytes: AtomicU64,
    resync_chunks: AtomicU64,
    full_sync_bytes: AtomicU64,
    full_syncs: AtomicU64,
    acked: AtomicU64,
    stop: AtomicBool,
    /// The dirty log's file.
    log_file: Option<Arc<LogFile>>,
    /// The log has no activity log: its bits are synced before a FLUSH or
    /// FUA is acknowledged.
    sync_log_on_flush: bool,
}

/// How often set bits of the dirty log are cleared (once a FLUSH made
/// their writes durable on both sides), and how long a chunk stays set
/// after its last write (one to two periods).
const LOG_CLEAN_EVERY: Duration = Duration::from_secs(1);

/// How long bits may wait for a client's FLUSH before the cleaner sends
/// its own (each one stalls the peer's frame order for its sync).
const LOG_FLUSH_EVERY: Duration = Duration::from_secs(10);

/// A chunk written recently, for the dirty log's cleaner.
#[derive(Debug, Default, Clone, Copy)]
struct Touch {
    /// Writes to it not yet settled.
    inflight: u32,
    /// The cleaner's tick of its last write.
    tick: u64,
    /// The write counter at its last write ([`Link::wseq`]).
    seq: u64,
}

#[derive(Debug)]
struct Link {
    state: PeerState,
    writer: Option<BufWriter<TcpStream>>,
    conn: u64,
    next_seq: u64,
    dirty: BTreeSet<u64>,
    /// The fencer confirmed the peer outdated, or the peer is being
    /// fully synced (it was never up to date): writes go on without it.
    outdated: bool,
    full_sync: bool,
    /// Bumped when the fencer is replaced, so suspended writers ask again.
    fencer_version: u64,
    /// A writer is asking the fencer (the others wait for its answer).
    fencing: bool,
    /// Times the peer went live (in sync): a fencer's yes asked for before
    /// the latest of them is stale.
    lives: u64,
    /// The fencer version and time of the last answered question since
    /// the peer was last live (writers ask again every [`FENCE_RETRY`]).
    last_ask: Option<(u64, Instant)>,
    /// A refusal since the peer was last live was logged.
    refusal_logged: bool,
    /// A connect loop runs (it ends when deposed or stopped).
    connecting: bool,
    /// The protocol version the current (or last) connection speaks.
    peer_version: u16,
    /// The version the next hello offers (the oldest one after a peer
    /// closed the connection on a newer hello).
    hello_version: u16,
    /// The boot id the peer's pool was opened in, as of the last
    /// connection (`None`: not known).
    peer_boot: Option<[u8; 16]>,
    /// The persistent dirty bitmap (a superset of `dirty` plus the
    /// chunks written recently or in flight).
    log: Option<DirtyLog>,
    /// Chunks written recently (only with a log).
    touched: HashMap<u64, Touch>,
    /// The cleaner's tick and when it last ran.
    tick: u64,
    last_clean: Instant,
    /// Writes that set dirty-log bits, counted.
    wseq: u64,
    /// Every write up to this count is durable on both sides (a FLUSH the
    /// peer acknowledged after the local one), and when that was last
    /// learnt.
    durable_upto: u64,
    last_durable: Instant,
}

/// A READ frame sent: its length, and where its ack and data go.
type PendingRead = (u32, SyncSender<(wire::Ack, Vec<u8>)>);

/// A frame sent whose final ack has not come.
#[derive(Debug)]
struct Waiting {
    /// Where its acks go (a writer may have stopped listening).
    tx: SyncSender<wire::Ack>,
    /// Acknowledged to its client before the peer applied it (protocols
    /// A and B): the final ack is settled by the ack loop (or the loss of
    /// the connection marks its chunks dirty), not by the writer.
    early: bool,
    /// The chunks it changes, first and last.
    chunks: Option<(u64, u64)>,
}

impl Waiting {
    /// A frame whose sender waits for its final ack.
    fn new(tx: SyncSender<wire::Ack>) -> Waiting {
        Waiting {
            tx,
            early: false,
            chunks: None,
        }
    }
}

/// A frame sent, waiting for its ack.
#[derive(Debug)]
struct Shipped {
    conn: u64,
    ack: Receiver<wire::Ack>,
    /// The write counter when it was sent: a FLUSH acknowledged on the
    /// same connection makes every write up to it durable on the peer.
    mark: u64,
    /// Acknowledged before the peer applies it: `Some(A)` at once,
    /// `Some(B)` at the receive ack; `None`: at the final ack.
    early: Option<Protocol>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Replicator {
    /// Starts replicating `volume` to `cfg.peer`: a background thread
    /// connects (and reconnects, resyncing) on its own.
    pub fn start(
        volume: Volume,
        cfg: ReplicatorConfig,
        fencer: Arc<dyn Fencer>,
    ) -> io::Result<Replicator> {
        Replicator::start_with(volume, cfg, fencer, SyncOptions::default())
    }

    /// Like [`Replicator::start`], with sync options.
    pub fn start_with(
        volume: Volume,
        cfg: ReplicatorConfig,
        fencer: Arc<dyn Fencer>,
        sync: SyncOptions,
    ) -> io::Result<Replicator> {
        Replicator::start_logged(volume, cfg, fencer, sync, None)
    }

    /// Like [`Replicator::start_with`], keeping the peer's dirty chunks in
    /// `log`: the stream's generation is the log's, and a log found on
    /// disk (a restarted primary's) starts with its set chunks dirty.
    pub fn start_logged(
        volume: Volume,
        mut cfg: ReplicatorConfig,
        fencer: Arc<dyn Fencer>,
        sync: SyncOptions,
        log: Option<DirtyLog>,
    ) -> io::Result<Replicator> {
        let mut dirty = BTreeSet::new();
        if let Some(log) = &log {
            cfg.generation = log.generation();
            if log.reused() {
                let chunks = volume_chunks(&volume, cfg.chunk_size);
                dirty.extend(log.set_chunks().into_iter().filter(|&c| c < chunks));
                tracing::info!(volume = %volume.name(), peer = %cfg.peer, generation = cfg.generation, dirty_chunks = dirty.len(), "dirty log found: the peer gets only these chunks");
            }
        }
        let log_file = log.as_ref().map(|l| l.file().clone());
        let sync_log_on_flush = log.as_ref().is_some_and(|l| l.activity_extents() == 0);
        let shared = Arc::new(Shared {
            volume,
            epoch: AtomicU64::new(cfg.epoch),
            protocol: std::sync::atomic::AtomicU8::new(cfg.protocol.code()),
            cfg,
            sync,
            fencer: Mutex::new(fencer),
            link: Mutex::new(Link {
                state: PeerState::Away,
                writer: None,
                conn: 0,
                next_seq: 1,
                dirty,
                outdated: false,
                full_sync: false,
                fencer_version: 0,
                fencing: false,
                lives: 0,
                last_ask: None,
                refusal_logged: false,
                connecting: true,
                peer_version: wire::VERSION,
                hello_version: wire::VERSION,
                peer_boot: None,
                log,
                touched: HashMap::new(),
                tick: 0,
                last_clean: Instant::now(),
                wseq: 0,
                durable_upto: 0,
                last_durable: Instant::now(),
            }),
            changed: Condvar::new(),
            pending: Mutex::new(HashMap::new()),
            reads: Mutex::new(HashMap::new()),
            resync_bytes: AtomicU64::new(0),
            resync_chunks: AtomicU64::new(0),
            full_sync_bytes: AtomicU64::new(0),
            full_syncs: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            log_file,
            sync_log_on_flush,
        });
        let s = shared.clone();
        thread::Builder::new()
            .name("replication-connect".into())
            .spawn(move || s.connect_loop())?;
        Ok(Replicator { shared })
    }

    /// The replicated volume.
    pub fn volume(&self) -> &Volume {
        &self.shared.volume
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.shared.cfg.peer
    }

    /// The epoch frames carry now.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::SeqCst)
    }

    /// Raises (or sets) the epoch later frames carry, keeping the
    /// connection and the dirty set. Call it with no write in flight. A
    /// replicator deposed by an epoch not newer than this one comes back:
    /// every write it failed is in its dirty set, so it resyncs them.
    pub fn set_epoch(&self, epoch: u64) -> io::Result<()> {
        let s = &self.shared;
        s.epoch.store(epoch, Ordering::SeqCst);
        let mut link = lock(&s.link);
        if let PeerState::Deposed { newest } = link.state
            && epoch >= newest
        {
            tracing::info!(volume = %s.volume.name(), peer = %s.cfg.peer, epoch, "epoch raised: reconnecting a deposed replicator");
            s.drain_early(&mut link, None);
            link.state = PeerState::Away;
            if let Some(w) = link.writer.take() {
                let _ = w.get_ref().shutdown(Shutdown::Both);
            }
            if !link.connecting {
                let again = s.clone();
                thread::Builder::new()
                    .name("replication-connect".into())
                    .spawn(move || again.connect_loop())?;
                link.connecting = true;
            }
        }
        Ok(())
    }

    /// When writes are acknowledged now.
    pub fn protocol(&self) -> Protocol {
        Protocol::from_code(self.shared.protocol.load(Ordering::SeqCst))
    }

    /// Changes when later writes are acknowledged (writes in flight keep
    /// theirs).
    pub fn set_protocol(&self, protocol: Protocol) {
        self.shared
            .protocol
            .store(protocol.code(), Ordering::SeqCst);
    }

    /// Replaces the fencer; writes suspended by the old one ask the new
    /// one.
    pub fn set_fencer(&self, fencer: Arc<dyn Fencer>) {
        *lock(&self.shared.fencer) = fencer;
        let mut link = lock(&self.shared.link);
        link.fencer_version += 1;
        self.shared.changed.notify_all();
    }

    /// Where replication stands.
    pub fn status(&self) -> ReplicationStatus {
        let s = &self.shared;
        let link = lock(&s.link);
        ReplicationStatus {
            peer: s.cfg.peer,
            state: link.state,
            dirty_chunks: link.dirty.len() as u64,
            resync_bytes: s.resync_bytes.load(Ordering::Relaxed),
            resync_chunks: s.resync_chunks.load(Ordering::Relaxed),
            acked_frames: s.acked.load(Ordering::Relaxed),
            full_sync: link.full_sync,
            full_sync_bytes: s.full_sync_bytes.load(Ordering::Relaxed),
            full_syncs: s.full_syncs.load(Ordering::Relaxed),
            generation: s.cfg.generation,
            protocol: self.protocol(),
        }
    }

    /// Runs `local` (the local write) and ships `op` to the peer; returns
    /// once both are done, or the peer is away and the fencer confirmed
    /// it outdated. With a refusing fencer, blocks until the peer is back
    /// in sync.
    pub fn submit(
        &self,
        op: Op<'_>,
        local: impl FnOnce() -> Result<(), PoolError>,
    ) -> Result<(), ReplicationError> {
        Replicator::submit_all(std::slice::from_ref(self), op, local)
    }

    /// [`Replicator::submit`] to several peers of one volume at once: the
    /// frame goes to every connected peer, then `local` runs, then each
    /// peer's ack (or its fencer's word) is awaited. Fails if any peer
    /// fails the write; a deposed replicator fails it before anything is
    /// sent or written.
    pub fn submit_all(
        replicators: &[Replicator],
        op: Op<'_>,
        local: impl FnOnce() -> Result<(), PoolError>,
    ) -> Result<(), ReplicationError> {
        Replicator::submit_counted(replicators, op, local).map(|_| ())
    }

    /// [`Replicator::submit_all`], returning how many peers acknowledged
    /// the operation (the others are outdated or being filled).
    pub fn submit_counted(
        replicators: &[Replicator],
        op: Op<'_>,
        local: impl FnOnce() -> Result<(), PoolError>,
    ) -> Result<usize, ReplicationError> {
        Replicator::submit_inner(replicators, op, || local().map(|()| true))
    }

    /// [`Replicator::submit_counted`] where `local` says whether it wrote
    /// here (`false`: the disk is detached and the write stands only on
    /// the peers, so every peer's final ack is awaited, whatever the
    /// protocol).
    pub(crate) fn submit_inner(
        replicators: &[Replicator],
        op: Op<'_>,
        local: impl FnOnce() -> Result<bool, PoolError>,
    ) -> Result<usize, ReplicationError> {
        // Every link is locked (always in the same order) across the sends
        // and the local write, so frames leave in the order writes apply
        // locally on every link, and no resync can finish in between.
        let mut links: Vec<_> = replicators.iter().map(|r| lock(&r.shared.link)).collect();
        for (r, link) in replicators.iter().zip(&links) {
            if let PeerState::Deposed { newest } = link.state {
                return Err(r.shared.deposed(newest));
            }
            if matches!(op, Op::Resize { .. })
                && link.state == PeerState::Connected
                && link.peer_version < wire::RESIZE_VERSION
            {
                return Err(ReplicationError::PeerTooOld {
                    volume: r.shared.volume.name().to_owned(),
                    peer: r.shared.cfg.peer,
                    version: link.peer_version,
                });
            }
        }
        // The chunks go into every peer's dirty log before the write goes
        // anywhere (undone in memory for the peers already marked if one
        // fails: a set bit too many only costs a resync).
        for (i, (r, link)) in replicators.iter().zip(links.iter_mut()).enumerate() {
            if let Err(source) = r.shared.log_write(link, &op) {
                for (r, link) in replicators.iter().zip(links.iter_mut()).take(i) {
                    r.shared.settle_touch(link, &op);
                }
                return Err(ReplicationError::DirtyLog {
                    volume: r.shared.volume.name().to_owned(),
                    peer: r.shared.cfg.peer,
                    source,
                });
            }
        }
        let shipped: Vec<_> = replicators
            .iter()
            .zip(links.iter_mut())
            .map(|(r, link)| r.shared.ship(link, &op))
            .collect();
        // A local failure fails the request; the range's content is then
        // undefined for the client, as after any failed write.
        let applied = match local() {
            Ok(applied) => applied,
            Err(e) => {
                for ((r, link), shipped) in replicators.iter().zip(links.iter_mut()).zip(&shipped) {
                    // An early frame's chunks are settled by its ack.
                    if shipped.as_ref().is_none_or(|s| s.early.is_none()) {
                        r.shared.settle_touch(link, &op);
                    }
                }
                return Err(e.into());
            }
        };
        drop(links);
        if op.durable() {
            for r in replicators.iter().filter(|r| r.shared.sync_log_on_flush) {
                if let Some(f) = &r.shared.log_file
                    && let Err(source) = f.sync()
                {
                    return Err(ReplicationError::DirtyLog {
                        volume: r.shared.volume.name().to_owned(),
                        peer: r.shared.cfg.peer,
                        source,
                    });
                }
            }
        }
        let mut result = Ok(0);
        for (r, shipped) in replicators.iter().zip(shipped) {
            let settled = r.shared.settle(shipped, &op, applied);
            result = match (result, settled) {
                (Ok(n), Ok(acked)) => Ok(n + usize::from(acked)),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            };
        }
        result
    }

    /// Online verify: compares the digest of every chunk here with the
    /// peer's, while writes go on (each VERIFY frame is sent, and the
    /// local chunk read, under the link lock, so both sides read at the
    /// same point of the write order), at most `rate` bytes per second
    /// (0: no limit). Chunks that differ are marked dirty (and set in the
    /// dirty log): the next resync sends them; with `repair`, they are
    /// sent again now, on the live link.
    pub fn verify(&self, rate: u64, repair: bool) -> Result<VerifyReport, VerifyError> {
        let s = &self.shared;
        let (volume, peer) = (s.volume.name().to_owned(), s.cfg.peer);
        let cut = |source: io::Error| VerifyError::Cut {
            volume: volume.clone(),
            peer,
            source,
        };
        let local_err = |source| VerifyError::Local {
            volume: volume.clone(),
            source,
        };
        let cs = s.cfg.chunk_size.max(1);
        let size = s.volume.size().map_err(local_err)?;
        let chunks = size.div_ceil(cs);
        let mut pacer = Pacer::new(rate);
        let mut buf = vec![0u8; cs as usize];
        let mut window: VecDeque<(u64, u64, Receiver<wire::Ack>)> = VecDeque::new();
        let mut out_of_sync = Vec::new();
        let mut check = |(c, local, rx): (u64, u64, Receiver<wire::Ack>)| match rx.recv() {
            Ok(ack) if ack.status == Status::Ok => {
                if ack.newest_epoch != local {
                    out_of_sync.push(c);
                }
                Ok(())
            }
            Ok(ack) => Err(cut(io::Error::other(format!(
                "the peer answered {:?} to verifying chunk {c}",
                ack.status
            )))),
            Err(_) => Err(cut(io::Error::other("the connection was lost"))),
        };
        for c in 0..chunks {
            let offset = c * cs;
            let len = cs.min(size - offset) as usize;
            pacer.pace(len as u64);
            let rx = {
                let mut link = lock(&s.link);
                if link.state != PeerState::Connected {
                    return Err(VerifyError::NotConnected {
                        volume: volume.clone(),
                        peer,
                        state: link.state,
                    });
                }
                s.volume.read(offset, &mut buf[..len]).map_err(local_err)?;
                let (seq, conn) = (link.next_seq, link.conn);
                link.next_seq += 1;
                let (tx, rx) = sync_channel(2);
                lock(&s.pending).insert((conn, seq), Waiting::new(tx));
                let frame = Frame {
                    kind: FrameKind::Verify,
                    flags: 0,
                    epoch: s.epoch.load(Ordering::SeqCst),
                    seq,
                    offset,
                    length: len as u32,
                    data: Vec::new(),
                };
                let sent = link.writer.as_mut().map(|w| frame.write_to(w));
                if !matches!(sent, Some(Ok(()))) {
                    lock(&s.pending).remove(&(conn, seq));
                    s.lose(&mut link, conn);
                    return Err(cut(io::Error::other("sending a verify frame failed")));
                }
                rx
            };
            window.push_back((c, wire::digest(&buf[..len]), rx));
            if window.len() >= VERIFY_WINDOW
                && let Some(front) = window.pop_front()
            {
                check(front)?;
            }
        }
        while let Some(front) = window.pop_front() {
            check(front)?;
        }
        if !out_of_sync.is_empty() {
            tracing::warn!(volume = %volume, %peer, chunks = out_of_sync.len(), "online verify: chunks out of sync, marked dirty");
            let mut link = lock(&s.link);
            for &c in &out_of_sync {
                if let Some(log) = link.log.as_mut()
                    && let Err(e) = log.mark(c, c)
                {
                    tracing::warn!(volume = %volume, %peer, error = %e, "cannot set an out-of-sync chunk in the dirty log");
                }
                link.dirty.insert(c);
            }
        }
        let mut repaired = 0;
        if repair {
            for &c in &out_of_sync {
                if self.resend(c, &mut buf).map_err(cut)? {
                    repaired += 1;
                }
            }
        }
        tracing::info!(volume = %volume, %peer, checked_chunks = chunks, out_of_sync = out_of_sync.len(), repaired, "online verify finished");
        Ok(VerifyReport {
            peer,
            chunk_size: cs,
            checked_chunks: chunks,
            out_of_sync,
            repaired,
        })
    }

    /// Reads `buf.len()` bytes at `offset` from the connected peer's copy:
    /// a READ frame in the live frame order, so it sees every write
    /// shipped before it (for a primary whose own disk failed).
    pub fn read_remote(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = &self.shared;
        let len = u32::try_from(buf.len())
            .ok()
            .filter(|&n| n <= wire::MAX_FRAME_PAYLOAD)
            .ok_or_else(|| io::Error::other("read too large for one frame"))?;
        let rx = {
            let mut link = lock(&s.link);
            if link.state != PeerState::Connected {
                return Err(io::Error::other(format!(
                    "peer {} is not connected ({:?})",
                    s.cfg.peer, link.state
                )));
            }
            let (seq, conn) = (link.next_seq, link.conn);
            link.next_seq += 1;
            let (tx, rx) = sync_channel(1);
            lock(&s.reads).insert((conn, seq), (len, tx));
            let frame = Frame {
                kind: FrameKind::Read,
                flags: 0,
                epoch: s.epoch.load(Ordering::SeqCst),
                seq,
                offset,
                length: len,
                data: Vec::new(),
            };
            let sent = link.writer.as_mut().map(|w| frame.write_to(w));
            if !matches!(sent, Some(Ok(()))) {
                lock(&s.reads).remove(&(conn, seq));
                s.lose(&mut link, conn);
                return Err(io::Error::other("sending a read frame failed"));
            }
            rx
        };
        let (ack, data) = rx
            .recv()
            .map_err(|_| io::Error::other("the connection was lost before the read's answer"))?;
        if ack.status != Status::Ok || data.len() != buf.len() {
            return Err(io::Error::other(format!(
                "peer {} answered {:?} to a read",
                s.cfg.peer, ack.status
            )));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Sends chunk `c` to the connected peer again (a resync write in the
    /// live frame order) and, once acknowledged on the same connection,
    /// takes it off the dirty set. `false`: the peer is not connected (the
    /// chunk stays dirty for the next resync).
    fn resend(&self, c: u64, buf: &mut [u8]) -> io::Result<bool> {
        let s = &self.shared;
        let cs = s.cfg.chunk_size.max(1);
        let size = s.volume.size().map_err(io::Error::other)?;
        let offset = c * cs;
        let len = cs.min(size.saturating_sub(offset)) as usize;
        let (rx, conn) = {
            let mut link = lock(&s.link);
            if link.state != PeerState::Connected {
                return Ok(false);
            }
            s.volume
                .read(offset, &mut buf[..len])
                .map_err(io::Error::other)?;
            let (seq, conn) = (link.next_seq, link.conn);
            link.next_seq += 1;
            let (tx, rx) = sync_channel(2);
            lock(&s.pending).insert((conn, seq), Waiting::new(tx));
            let frame = Frame {
                kind: FrameKind::Write,
                flags: FLAG_REPAIR,
                epoch: s.epoch.load(Ordering::SeqCst),
                seq,
                offset,
                length: len as u32,
                data: buf[..len].to_vec(),
            };
            let sent = link.writer.as_mut().map(|w| frame.write_to(w));
            if !matches!(sent, Some(Ok(()))) {
                lock(&s.pending).remove(&(conn, seq));
                s.lose(&mut link, conn);
                return Ok(false);
            }
            (rx, conn)
        };
        let Ok(ack) = rx.recv() else {
            return Ok(false);
        };
        if ack.status != Status::Ok {
            return Err(io::Error::other(format!(
                "the peer answered {:?} to chunk {c} sent again",
                ack.status
            )));
        }
        let mut link = lock(&s.link);
        // Only on the same live connection: after a loss, a later write
        // may have made the chunk dirty again.
        if link.conn == conn && link.state == PeerState::Connected {
            link.dirty.remove(&c);
            s.resync_bytes.fetch_add(len as u64, Ordering::Relaxed);
            s.resync_chunks.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        Ok(false)
    }

    /// Like [`Replicator::shutdown`], for a stream that ends for good (its
    /// peer removed, or the volume no longer a primary here): its dirty
    /// log is deleted.
    pub fn retire(&self) {
        self.shutdown();
        if let Some(log) = &lock(&self.shared.link).log {
            log.remove();
        }
    }

    /// Slots the dirty log's activity log took (one `fdatasync` each: a
    /// write left the hot extents), 0 without a log.
    pub fn activity_writes(&self) -> u64 {
        lock(&self.shared.link)
            .log
            .as_ref()
            .map_or(0, DirtyLog::activity_writes)
    }

    /// The path of the dirty log, if the stream keeps one.
    pub fn dirty_log_path(&self) -> Option<std::path::PathBuf> {
        self.shared
            .log_file
            .as_ref()
            .and_then(|f| f.path().map(ToOwned::to_owned))
    }

    /// Stops reconnecting and cuts the connection; writes suspended on
    /// this peer fail with [`ReplicationError::Stopped`].
    pub fn shutdown(&self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::SeqCst);
        let mut link = lock(&s.link);
        let conn = link.conn;
        s.lose(&mut link, conn);
        s.changed.notify_all();
    }
}

impl Shared {
    fn deposed(&self, newest: u64) -> ReplicationError {
        ReplicationError::StaleEpoch {
            epoch: self.epoch.load(Ordering::SeqCst),
            newest,
        }
    }

    /// Under the link lock, before the local write: sends the frame when
    /// the peer is connected, or marks the write's chunks dirty (they are
    /// read for the resync only after the lock is released, so after the
    /// local write).
    fn ship(&self, link: &mut Link, op: &Op<'_>) -> Option<Shipped> {
        if link.state == PeerState::Connected {
            let seq = link.next_seq;
            link.next_seq += 1;
            let conn = link.conn;
            let early = self.early(link, op);
            let (tx, rx) = sync_channel(2);
            let waiting = Waiting {
                tx,
                early: early.is_some(),
                chunks: self.chunks(op),
            };
            lock(&self.pending).insert((conn, seq), waiting);
            let mut frame = op.frame(self.epoch.load(Ordering::SeqCst), seq);
            if early == Some(Protocol::B) {
                frame.flags |= FLAG_RECEIVE_ACK;
            }
            let sent = link.writer.as_mut().map(|w| frame.write_to(w));
            if matches!(sent, Some(Ok(()))) {
                return Some(Shipped {
                    conn,
                    ack: rx,
                    mark: link.wseq,
                    early,
                });
            }
            lock(&self.pending).remove(&(conn, seq));
            self.lose(link, conn);
        }
        if let Some((offset, len)) = op.range() {
            self.mark_dirty(link, offset, len);
        }
        None
    }

    /// Whether `op`, shipped now, is acknowledged before the peer applies
    /// it: only plain writes, trims and zeroings (never FLUSH, FUA, grows)
    /// under protocol A, or B with a peer that sends receive acks.
    fn early(&self, link: &Link, op: &Op<'_>) -> Option<Protocol> {
        if op.durable() || op.range().is_none_or(|(_, len)| len == 0) {
            return None;
        }
        match Protocol::from_code(self.protocol.load(Ordering::SeqCst)) {
            Protocol::A => Some(Protocol::A),
            Protocol::B if link.peer_version >= wire::RECEIVE_ACK_VERSION => Some(Protocol::B),
            Protocol::B | Protocol::C => None,
        }
    }

    /// After the local write, without the lock held across it: waits for
    /// the peer's ack (under protocol A, not at all; under B, its receive
    /// ack), or (the peer does not have the write) acknowledges only with
    /// the fencer's word. `applied`: the local write was done (a
    /// diskless primary's write waits for the final ack whatever the
    /// protocol).
    /// `Ok(true)`: the peer acknowledged the write; `Ok(false)`: it does
    /// not have it (outdated by the fencer, or being filled).
    fn settle(
        &self,
        shipped: Option<Shipped>,
        op: &Op<'_>,
        applied: bool,
    ) -> Result<bool, ReplicationError> {
        let Some(shipped) = shipped else {
            let mut link = lock(&self.link);
            self.settle_touch(&mut link, op);
            return self.fence(link).map(|()| false);
        };
        if applied && shipped.early == Some(Protocol::A) {
            // In the send buffer: the ack loop settles it.
            return Ok(true);
        }
        let answer = loop {
            match shipped.ack.recv() {
                // Only frames flagged for protocol B get one.
                Ok(a) if a.status == Status::Received => {
                    if applied {
                        return Ok(true);
                    }
                }
                other => break other.map(|a| a.status),
            }
        };
        let mut link = lock(&self.link);
        if shipped.early.is_none() {
            self.settle_touch(&mut link, op);
        }
        match answer {
            Ok(Status::Ok) => {
                if shipped.early.is_none() {
                    self.acked.fetch_add(1, Ordering::Relaxed);
                }
                // A client's FLUSH, acknowledged here (after the local
                // flush) and there: every write before it is durable on
                // both sides, so the cleaner may clear their bits.
                if matches!(op, Op::Flush) && link.conn == shipped.conn {
                    link.durable_upto = link.durable_upto.max(shipped.mark);
                    link.last_durable = Instant::now();
                }
                return Ok(true);
            }
            Ok(Status::StaleEpoch) => {
                // Applied here, refused there: if a newer epoch revives
                // this replicator, the resync sends it.
                if let Some((offset, len)) = op.range() {
                    self.mark_dirty(&mut link, offset, len);
                }
                let newest = match link.state {
                    PeerState::Deposed { newest } => newest,
                    _ => self.epoch.load(Ordering::SeqCst) + 1,
                };
                return Err(self.deposed(newest));
            }
            Ok(other) => {
                tracing::warn!(volume = %self.volume.name(), status = ?other, "peer could not apply a frame: detaching it");
                self.lose(&mut link, shipped.conn);
                if other == Status::IoError && link.state == PeerState::Away {
                    link.state = PeerState::DiskFailed;
                }
            }
            // The connection dropped before the ack.
            Err(_) => {}
        }
        // The write is applied locally: its chunks, read by a later
        // resync, hold it.
        if let Some((offset, len)) = op.range() {
            self.mark_dirty(&mut link, offset, len);
        }
        self.fence(link).map(|()| false)
    }

    /// The peer does not have a write: acknowledge it only if the peer is
    /// outdated (by the fencer, or because it is being fully synced), or
    /// once the peer is back in sync.
    ///
    /// One writer at a time asks the fencer, without the link's lock (an
    /// agent's fencer asks the control plane, which takes a while, and the
    /// connect loop and status readers must not wait for it); the others
    /// wait for its answer. A refusal is asked again every
    /// [`FENCE_RETRY`] (the control plane may come back), or at once when
    /// the fencer is replaced. A yes counts only if the peer has not been
    /// live since it was asked for: after that, the control plane may have
    /// cleared the mark the yes stands for.
    fn fence<'a>(&'a self, mut link: MutexGuard<'a, Link>) -> Result<(), ReplicationError> {
        loop {
            match link.state {
                PeerState::Connected => return Ok(()),
                PeerState::Deposed { newest } => return Err(self.deposed(newest)),
                _ => {}
            }
            if link.outdated {
                return Ok(());
            }
            if self.stop.load(Ordering::SeqCst) {
                return Err(ReplicationError::Stopped {
                    volume: self.volume.name().to_owned(),
                    peer: self.cfg.peer,
                });
            }
            let due = match link.last_ask {
                None => true,
                Some((version, at)) => {
                    version != link.fencer_version || at.elapsed() >= FENCE_RETRY
                }
            };
            if due && !link.fencing {
                link.fencing = true;
                let (version, lives) = (link.fencer_version, link.lives);
                drop(link);
                let fencer = lock(&self.fencer).clone();
                let epoch = self.epoch.load(Ordering::SeqCst);
                let answer = fencer.outdate_peer(self.volume.name(), self.cfg.peer, epoch);
                link = lock(&self.link);
                link.fencing = false;
                link.last_ask = Some((version, Instant::now()));
                self.changed.notify_all();
                match answer {
                    Ok(()) if link.lives == lives => {
                        if !matches!(link.state, PeerState::Connected | PeerState::Deposed { .. }) {
                            tracing::warn!(volume = %self.volume.name(), peer = %self.cfg.peer, epoch, "peer outdated by the fencer: writing without it");
                            link.outdated = true;
                        }
                    }
                    // The peer went live meanwhile: its state decides, or
                    // a new loss asks again.
                    Ok(()) => link.last_ask = None,
                    Err(e) => {
                        if !link.refusal_logged {
                            link.refusal_logged = true;
                            tracing::warn!(volume = %self.volume.name(), error = %e, "suspending writes until the peer is back or the fencer confirms it outdated");
                        } else {
                            tracing::debug!(volume = %self.volume.name(), error = %e, "fencer still refuses");
                        }
                    }
                }
                continue;
            }
            link = self
                .changed
                .wait_timeout(link, FENCE_RETRY)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The chunks `op` changes, first and last.
    fn chunks(&self, op: &Op<'_>) -> Option<(u64, u64)> {
        let cs = self.cfg.chunk_size.max(1);
        match op.range() {
            Some((offset, len)) if len > 0 => Some((offset / cs, (offset + len - 1) / cs)),
            _ => None,
        }
    }

    /// Under the link lock, before the write is shipped or applied: sets
    /// its chunks in the dirty log and counts it in flight on them.
    fn log_write(&self, link: &mut Link, op: &Op<'_>) -> io::Result<()> {
        let Some((first, last)) = self.chunks(op) else {
            return Ok(());
        };
        let Some(log) = link.log.as_mut() else {
            return Ok(());
        };
        log.mark(first, last)?;
        link.wseq += 1;
        let (tick, seq) = (link.tick, link.wseq);
        for c in first..=last {
            let t = link.touched.entry(c).or_default();
            t.inflight += 1;
            t.tick = tick;
            t.seq = seq;
        }
        Ok(())
    }

    /// The write counted by [`Shared::log_write`] is settled (acked,
    /// tracked as dirty, or failed).
    fn settle_touch(&self, link: &mut Link, op: &Op<'_>) {
        if link.log.is_none() {
            return;
        }
        let Some((first, last)) = self.chunks(op) else {
            return;
        };
        for c in first..=last {
            if let Some(t) = link.touched.get_mut(&c) {
                t.inflight = t.inflight.saturating_sub(1);
            }
        }
    }

    /// Clears the dirty log's bits of chunks the connected peer holds
    /// durably: not dirty, no write in flight, not written in the last
    /// tick, and every write to them covered by a FLUSH the peer
    /// acknowledged after the local flush (a peer that loses power keeps
    /// only what it flushed; so does this primary). The clients' own
    /// FLUSHes provide that; when none came for [`LOG_FLUSH_EVERY`] while
    /// bits wait for one, the cleaner sends its own (in the live frame
    /// order, with a local flush). Runs at most every [`LOG_CLEAN_EVERY`],
    /// from the connect loop.
    fn clean_log(&self) {
        let own_flush = {
            let mut link = lock(&self.link);
            if link.state != PeerState::Connected
                || link.log.is_none()
                || link.last_clean.elapsed() < LOG_CLEAN_EVERY
            {
                return;
            }
            link.last_clean = Instant::now();
            link.tick += 1;
            self.clear_durable(&mut link);
            let waiting = link
                .touched
                .values()
                .any(|t| t.inflight == 0 && t.seq > link.durable_upto);
            if !waiting || link.last_durable.elapsed() < LOG_FLUSH_EVERY {
                return;
            }
            // In the live frame order: after every write counted so far.
            let Some(shipped) = self.ship(&mut link, &Op::Flush) else {
                return;
            };
            shipped
        };
        if let Err(e) = self.volume.flush() {
            tracing::debug!(volume = %self.volume.name(), error = %e, "local flush for the dirty log's cleaner failed");
            return;
        }
        if !matches!(own_flush.ack.recv(), Ok(a) if a.status == Status::Ok) {
            return;
        }
        let mut link = lock(&self.link);
        if link.conn == own_flush.conn && link.state == PeerState::Connected {
            link.durable_upto = link.durable_upto.max(own_flush.mark);
            link.last_durable = Instant::now();
            self.clear_durable(&mut link);
        }
    }

    /// Under the link lock: forgets the chunks whose writes are settled,
    /// old and durable on both sides, and clears their bits (those of
    /// chunks neither dirty nor still remembered).
    fn clear_durable(&self, link: &mut Link) {
        let (tick, durable) = (link.tick, link.durable_upto);
        link.touched
            .retain(|_, t| t.inflight > 0 || t.tick + 2 > tick || t.seq > durable);
        let Some(log) = link.log.as_ref() else {
            return;
        };
        let clear: Vec<u64> = log
            .set_chunks()
            .into_iter()
            .filter(|c| !link.dirty.contains(c) && !link.touched.contains_key(c))
            .collect();
        if clear.is_empty() {
            return;
        }
        if let Some(log) = link.log.as_mut()
            && let Err(e) = log.clear(&clear)
        {
            // Bits left set only cost a resync after a restart.
            tracing::warn!(volume = %self.volume.name(), peer = %self.cfg.peer, error = %e, "cannot clear the dirty log");
        }
    }

    /// The peer comes back in another boot (or cannot say): every chunk
    /// still set in the dirty log may hold a write it acknowledged but
    /// never flushed, lost with its page cache, so it joins the dirty set.
    /// (Bits are cleared only after a FLUSH on both sides, and never while
    /// the peer is away.)
    fn requeue_unflushed(&self, link: &mut Link) {
        let Some(log) = link.log.as_ref() else {
            return;
        };
        let chunks = volume_chunks(&self.volume, self.cfg.chunk_size);
        let set = log.set_chunks();
        link.dirty.extend(set.into_iter().filter(|&c| c < chunks));
    }

    fn mark_dirty(&self, link: &mut Link, offset: u64, len: u64) {
        let cs = self.cfg.chunk_size.max(1);
        if len == 0 {
            return;
        }
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        link.dirty.extend(first..=last);
    }

    /// Under the link lock: a write acknowledged early (protocols A and B)
    /// got its final ack. Ok: its chunks are settled. Otherwise the peer
    /// does not hold a write its client has: its chunks join the dirty
    /// set and the peer is detached (a stale epoch already deposed this
    /// primary).
    fn finish_early(&self, conn: u64, ack: wire::Ack) {
        let mut link = lock(&self.link);
        // Taken under the link lock: a loss drains the same entries.
        let Some(w) = lock(&self.pending).remove(&(conn, ack.seq)) else {
            return;
        };
        let _ = w.tx.try_send(ack);
        if let Some((first, last)) = w.chunks {
            self.untouch(&mut link, first, last);
        }
        if ack.status == Status::Ok {
            self.acked.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some((first, last)) = w.chunks {
            link.dirty.extend(first..=last);
        }
        if ack.status != Status::StaleEpoch {
            tracing::warn!(volume = %self.volume.name(), status = ?ack.status, "peer could not apply a write already acknowledged (protocol A or B): detaching it, the write is tracked dirty");
            self.lose(&mut link, conn);
            if ack.status == Status::IoError && link.state == PeerState::Away {
                link.state = PeerState::DiskFailed;
            }
        }
    }

    /// Under the link lock: the writes acknowledged early (protocols A
    /// and B) on connection `conn` (every connection: `None`) that have
    /// no final ack will never get one: their chunks join the dirty set,
    /// so the next resync sends them.
    fn drain_early(&self, link: &mut Link, conn: Option<u64>) {
        let gone: Vec<Waiting> = lock(&self.pending)
            .extract_if(|(c, _), w| w.early && conn.is_none_or(|conn| conn == *c))
            .map(|(_, w)| w)
            .collect();
        if gone.is_empty() {
            return;
        }
        tracing::info!(volume = %self.volume.name(), peer = %self.cfg.peer, writes = gone.len(), "writes acknowledged before the peer applied them are tracked dirty");
        for w in gone {
            if let Some((first, last)) = w.chunks {
                self.untouch(link, first, last);
                link.dirty.extend(first..=last);
            }
        }
    }

    /// The in-flight count of chunks `first..=last` drops by one write.
    fn untouch(&self, link: &mut Link, first: u64, last: u64) {
        if link.log.is_none() {
            return;
        }
        for c in first..=last {
            if let Some(t) = link.touched.get_mut(&c) {
                t.inflight = t.inflight.saturating_sub(1);
            }
        }
    }

    /// Marks the peer away if `conn` is still the live connection. The
    /// connection's early-acknowledged writes without a final ack join
    /// the dirty set in any case.
    fn lose(&self, link: &mut Link, conn: u64) {
        self.drain_early(link, Some(conn));
        if link.conn != conn || link.state != PeerState::Connected {
            return;
        }
        link.state = PeerState::Away;
        if let Some(w) = link.writer.take() {
            let _ = w.get_ref().shutdown(Shutdown::Both);
        }
        tracing::warn!(volume = %self.volume.name(), peer = %self.cfg.peer, "peer lost: tracking dirty chunks");
        self.changed.notify_all();
    }

    fn connect_loop(self: Arc<Self>) {
        loop {
            {
                let mut link = lock(&self.link);
                if self.stop.load(Ordering::SeqCst)
                    || matches!(link.state, PeerState::Deposed { .. })
                {
                    link.connecting = false;
                    return;
                }
                match link.state {
                    PeerState::Connected | PeerState::Resyncing => {
                        let link = self
                            .changed
                            .wait_timeout(link, self.cfg.retry)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                        drop(link);
                        self.clean_log();
                        continue;
                    }
                    _ => link.conn += 1,
                }
            }
            if let Err(e) = self.connect_once() {
                tracing::debug!(peer = %self.cfg.peer, error = %e, "peer not reachable");
                let mut link = lock(&self.link);
                if link.state == PeerState::Resyncing {
                    link.state = PeerState::Away;
                    link.full_sync = false;
                }
                drop(link);
                thread::sleep(self.cfg.retry);
            }
        }
    }

    fn stopped(&self) -> io::Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(io::Error::other("replication stopped"));
        }
        Ok(())
    }

    /// Connects, greets, syncs what the peer misses (everything, when it
    /// is not in sync with this stream), and goes live.
    fn connect_once(self: &Arc<Self>) -> io::Result<()> {
        let stream = TcpStream::connect_timeout(&self.cfg.peer, Duration::from_secs(1))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut rd = BufReader::with_capacity(64 << 10, stream.try_clone()?);
        let mut wr = BufWriter::with_capacity(256 << 10, stream);
        let epoch = self.epoch.load(Ordering::SeqCst);
        let offered = lock(&self.link).hello_version;
        let hello = Hello {
            version: offered,
            epoch,
            generation: self.cfg.generation,
            synced_from: self.sync.synced_from,
            volume_uid: self.volume.uid(),
            size: self.volume.size().map_err(io::Error::other)?,
            volume: self.volume.name().to_owned(),
        };
        // What the peer's copy measures (it grows to the hello's size).
        let mut peer_size = hello.size;
        io::Write::write_all(&mut wr, &hello.encode())?;
        io::Write::flush(&mut wr)?;
        let reply = match HelloReply::read(&mut rd) {
            Ok(reply) => reply,
            Err(wire::WireError::Io(e))
                if e.kind() == io::ErrorKind::UnexpectedEof && offered > wire::MIN_VERSION =>
            {
                // A replica older than this hello closes unanswered: the
                // next hello offers one version less.
                let retry = offered - 1;
                tracing::warn!(volume = %self.volume.name(), peer = %self.cfg.peer, offered, retry, "the peer closed the connection on the hello: it may be an older basaltd; greeting it with an older protocol next (below 5 it cannot follow a grow of the volume, below 6 protocol B waits like C)");
                lock(&self.link).hello_version = retry;
                return Err(io::Error::other(format!(
                    "peer closed the connection on a version {offered} hello"
                )));
            }
            Err(e) => return Err(io::Error::other(e)),
        };
        {
            let mut link = lock(&self.link);
            link.peer_version = reply.version;
            if reply.status == Status::Ok {
                let boot = (reply.boot_id != [0; 16]).then_some(reply.boot_id);
                if boot.is_none() || link.peer_boot != boot {
                    self.requeue_unflushed(&mut link);
                }
                link.peer_boot = boot;
            }
        }
        match reply.status {
            Status::Ok => {}
            Status::StaleEpoch => {
                tracing::error!(volume = %self.volume.name(), epoch, newest = reply.newest_epoch, "the peer has seen a newer epoch: this primary is deposed");
                let mut link = lock(&self.link);
                link.state = PeerState::Deposed {
                    newest: reply.newest_epoch,
                };
                self.changed.notify_all();
                return Ok(());
            }
            Status::SplitBrain => {
                let mut link = lock(&self.link);
                if link.state != PeerState::SplitBrain {
                    tracing::error!(volume = %self.volume.name(), peer = %self.cfg.peer, "split brain: the peer is a primary of this volume and not in sync with it");
                }
                link.state = PeerState::SplitBrain;
                self.changed.notify_all();
                return Err(io::Error::other("split brain"));
            }
            Status::IoError => {
                let mut link = lock(&self.link);
                if link.state != PeerState::DiskFailed {
                    tracing::warn!(volume = %self.volume.name(), peer = %self.cfg.peer, "the peer's disk failed: it stays detached");
                }
                link.state = PeerState::DiskFailed;
                return Err(io::Error::other("the peer's disk failed"));
            }
            Status::UnknownVolume if reply.version < wire::RESIZE_VERSION => {
                return Err(io::Error::other(format!(
                    "peer refused the volume (no volume of that name and size {}): it speaks protocol {}, which cannot grow its copy",
                    hello.size, reply.version
                )));
            }
            other => return Err(io::Error::other(format!("peer refused: {other:?}"))),
        }
        let full = reply.full_sync;
        // A copy being filled is not up to date: a fencer that records
        // outdated copies (the control plane's) is told before the fill,
        // so a half-filled copy is never made primary; writes go on
        // without the peer only on its yes, and otherwise wait for the
        // fill (asking again themselves).
        let fill_outdated = !full
            || {
                let fencer = lock(&self.fencer).clone();
                !fencer.guards_full_sync()
                    || match fencer.outdate_peer(self.volume.name(), self.cfg.peer, epoch) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(volume = %self.volume.name(), peer = %self.cfg.peer, error = %e, "filling the peer without the fencer's word: writes wait until it is in sync");
                            false
                        }
                    }
            };
        let conn = {
            let mut link = lock(&self.link);
            // Writes acknowledged early on an older connection that got
            // no final ack are resynced with the rest.
            self.drain_early(&mut link, None);
            link.state = PeerState::Resyncing;
            if full {
                // The peer was never up to date with this stream: the
                // full pass covers every chunk marked so far.
                link.outdated = fill_outdated;
                link.full_sync = true;
                link.dirty.clear();
            }
            link.conn
        };
        let mut sync = SyncRun {
            seq: 1,
            pacer: Pacer::new(self.sync.rate),
            bytes: 0,
            chunks: 0,
            trimmed: 0,
        };
        // From version 7 the peer's copy is whole only once nothing is
        // left to resync: the SYNCED flush goes first in the live order
        // (a full pass's last flush would have the peer record the stream
        // while chunks written during the pass are still owed to it).
        let live_synced = reply.version >= wire::SYNCED_LIVE_VERSION;
        if full {
            tracing::info!(volume = %self.volume.name(), peer = %self.cfg.peer, generation = self.cfg.generation, "full sync starting: the peer is not in sync with this stream");
            self.full_pass(&mut rd, &mut wr, &mut sync, !live_synced)?;
            self.volume.flush().map_err(io::Error::other)?;
        }
        let cs = self.cfg.chunk_size.max(1);
        let mut chunk_buf = vec![0u8; cs as usize];
        let (full_bytes, full_trimmed) = (sync.bytes, sync.trimmed);
        let (mut bytes, mut chunks) = (0u64, 0u64);
        loop {
            // The volume grew since the hello (a resize while the peer was
            // not live): the peer grows first, so dirty chunks past its old
            // end apply.
            let size = self.volume.size().map_err(io::Error::other)?;
            if size != peer_size {
                if reply.version < wire::RESIZE_VERSION {
                    return Err(io::Error::other(format!(
                        "the volume grew to {size} bytes and the peer speaks protocol {}, which cannot grow its copy",
                        reply.version
                    )));
                }
                let frame = Frame {
                    kind: FrameKind::Resize,
                    flags: FLAG_RESYNC,
                    epoch: self.epoch.load(Ordering::SeqCst),
                    seq: sync.seq,
                    offset: size,
                    length: 0,
                    data: Vec::new(),
                };
                self.exchange(&mut rd, &mut wr, &frame)?;
                sync.seq += 1;
                peer_size = size;
            }
            let batch: Vec<u64> = {
                let mut link = lock(&self.link);
                // Resizes take the link lock: none slips in before live.
                let grown = self.volume.size().is_ok_and(|s| s != peer_size);
                if link.dirty.is_empty() && !grown {
                    // In sync: go live under the lock, so no write can
                    // slip between the last batch and the state change;
                    // the counters first, so a status that says connected
                    // counts this sync.
                    if full {
                        self.full_sync_bytes
                            .fetch_add(full_bytes + bytes, Ordering::Relaxed);
                        self.full_syncs.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.resync_bytes.fetch_add(bytes, Ordering::Relaxed);
                        self.resync_chunks.fetch_add(chunks, Ordering::Relaxed);
                    }
                    let _ = rd.get_ref().set_read_timeout(None);
                    if live_synced {
                        // Nothing is left to send: once everything before
                        // it is durable, the peer's copy is whole and in
                        // sync with this stream. First in the live order,
                        // so no write can come between; its ack is not
                        // waited for (an unknown sequence number to the
                        // ack loop), and a copy that could not record it
                        // stays marked incomplete, which is safe.
                        let synced = Frame {
                            kind: FrameKind::Flush,
                            flags: FLAG_RESYNC | FLAG_SYNCED,
                            epoch: self.epoch.load(Ordering::SeqCst),
                            seq: sync.seq,
                            offset: 0,
                            length: 0,
                            data: Vec::new(),
                        };
                        synced.write_to(&mut wr)?;
                        sync.seq += 1;
                    }
                    link.state = PeerState::Connected;
                    link.writer = Some(wr);
                    link.next_seq = sync.seq;
                    link.outdated = false;
                    link.full_sync = false;
                    link.lives += 1;
                    link.last_ask = None;
                    link.refusal_logged = false;
                    self.changed.notify_all();
                    break;
                }
                std::mem::take(&mut link.dirty).into_iter().collect()
            };
            for &c in &batch {
                let offset = c * cs;
                let len = cs.min(size.saturating_sub(offset)) as usize;
                let sent = (|| {
                    self.stopped()?;
                    if len == 0 {
                        return Ok(());
                    }
                    let buf = &mut chunk_buf[..len];
                    self.volume.read(offset, buf).map_err(io::Error::other)?;
                    self.send_resync(&mut rd, &mut wr, &mut sync, offset, buf)
                })();
                if let Err(e) = sent {
                    // The batch is confirmed by the FLUSH after it: all of
                    // it stays dirty.
                    lock(&self.link).dirty.extend(&batch);
                    return Err(e);
                }
                bytes += len as u64;
                chunks += 1;
            }
            // Resynced chunks are durable on the peer before it counts as
            // in sync, and here (the dirty log forgets them once they are
            // neither dirty nor written since).
            let flushed = self
                .send_flush(&mut rd, &mut wr, &mut sync, 0)
                .and_then(|()| self.volume.flush().map_err(io::Error::other));
            if let Err(e) = flushed {
                // Not confirmed durable on the peer (nor its copy whole):
                // the whole batch is sent again.
                lock(&self.link).dirty.extend(&batch);
                return Err(e);
            }
        }
        if full {
            tracing::info!(
                volume = %self.volume.name(),
                peer = %self.cfg.peer,
                full_sync_bytes = full_bytes + bytes,
                full_sync_trimmed = full_trimmed,
                "peer in sync: full sync finished"
            );
        } else {
            tracing::info!(
                volume = %self.volume.name(),
                peer = %self.cfg.peer,
                resync_chunks = chunks,
                resync_bytes = bytes,
                "peer in sync: resync finished"
            );
        }
        let s = self.clone();
        thread::Builder::new()
            .name("replication-acks".into())
            .spawn(move || s.ack_loop(rd, conn))?;
        Ok(())
    }

    /// Sends the whole volume: mapped chunks as data, unmapped ranges as
    /// trims, then a FLUSH, which with `synced` tells the peer it is in
    /// sync with this stream (before version 7).
    fn full_pass(
        &self,
        rd: &mut BufReader<TcpStream>,
        wr: &mut BufWriter<TcpStream>,
        sync: &mut SyncRun,
        synced: bool,
    ) -> io::Result<()> {
        const WINDOW: u64 = 64 << 20;
        const MAX_TRIM: u64 = 1 << 30;
        let cs = self.cfg.chunk_size.max(1);
        let size = self.volume.size().map_err(io::Error::other)?;
        let mut buf = vec![0u8; cs as usize];
        let mut off = 0;
        while off < size {
            let len = WINDOW.min(size - off);
            let extents = self.volume.allocation(off, len).map_err(io::Error::other)?;
            let mut at = off;
            for e in extents {
                let end = at + e.len;
                while at < end {
                    self.stopped()?;
                    if e.allocated {
                        let piece = ((at / cs + 1) * cs).min(end) - at;
                        let data = &mut buf[..piece as usize];
                        self.volume.read(at, data).map_err(io::Error::other)?;
                        self.send_resync(rd, wr, sync, at, data)?;
                        sync.bytes += piece;
                        sync.chunks += 1;
                        at += piece;
                    } else {
                        let piece = MAX_TRIM.min(end - at);
                        let frame = Frame {
                            kind: FrameKind::Trim,
                            flags: FLAG_RESYNC,
                            epoch: self.epoch.load(Ordering::SeqCst),
                            seq: sync.seq,
                            offset: at,
                            length: piece as u32,
                            data: Vec::new(),
                        };
                        self.exchange(rd, wr, &frame)?;
                        sync.seq += 1;
                        sync.trimmed += piece;
                        at += piece;
                    }
                }
            }
            off += len;
        }
        self.send_flush(rd, wr, sync, if synced { FLAG_SYNCED } else { 0 })
    }

    fn send_resync(
        &self,
        rd: &mut BufReader<TcpStream>,
        wr: &mut BufWriter<TcpStream>,
        sync: &mut SyncRun,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        sync.pacer.pace(data.len() as u64);
        let frame = Frame {
            kind: FrameKind::Write,
            flags: FLAG_RESYNC,
            epoch: self.epoch.load(Ordering::SeqCst),
            seq: sync.seq,
            offset,
            length: data.len() as u32,
            data: data.to_vec(),
        };
        self.exchange(rd, wr, &frame)?;
        sync.seq += 1;
        Ok(())
    }

    fn send_flush(
        &self,
        rd: &mut BufReader<TcpStream>,
        wr: &mut BufWriter<TcpStream>,
        sync: &mut SyncRun,
        extra: u8,
    ) -> io::Result<()> {
        let flush = Frame {
            kind: FrameKind::Flush,
            flags: FLAG_RESYNC | extra,
            epoch: self.epoch.load(Ordering::SeqCst),
            seq: sync.seq,
            offset: 0,
            length: 0,
            data: Vec::new(),
        };
        self.exchange(rd, wr, &flush)?;
        sync.seq += 1;
        Ok(())
    }

    fn exchange(
        &self,
        rd: &mut BufReader<TcpStream>,
        wr: &mut BufWriter<TcpStream>,
        frame: &Frame,
    ) -> io::Result<()> {
        frame.write_to(wr)?;
        let mut ack = wire::Ack::read(rd).map_err(io::Error::other)?;
        // The replica's notice of a newer epoch than one this primary was
        // raised to meanwhile: not an answer.
        while ack.seq == 0
            && ack.status == Status::StaleEpoch
            && ack.newest_epoch <= self.epoch.load(Ordering::SeqCst)
        {
            ack = wire::Ack::read(rd).map_err(io::Error::other)?;
        }
        match ack.status {
            Status::Ok if ack.seq == frame.seq => Ok(()),
            Status::StaleEpoch => {
                let mut link = lock(&self.link);
                link.state = PeerState::Deposed {
                    newest: ack.newest_epoch,
                };
                self.changed.notify_all();
                Err(io::Error::other("deposed during resync"))
            }
            other => Err(io::Error::other(format!(
                "resync frame {} answered {other:?} (ack for {})",
                frame.seq, ack.seq
            ))),
        }
    }

    fn ack_loop(self: Arc<Self>, mut rd: BufReader<TcpStream>, conn: u64) {
        loop {
            match wire::Ack::read(&mut rd) {
                Ok(ack) => {
                    if ack.seq == 0 {
                        // The replica's notice of a newer epoch (no frame
                        // has sequence number 0): deposed, unless this
                        // primary was raised to it meanwhile.
                        if ack.status == Status::StaleEpoch
                            && ack.newest_epoch > self.epoch.load(Ordering::SeqCst)
                        {
                            let mut link = lock(&self.link);
                            if link.conn == conn && !matches!(link.state, PeerState::Deposed { .. })
                            {
                                link.state = PeerState::Deposed {
                                    newest: ack.newest_epoch,
                                };
                                tracing::error!(volume = %self.volume.name(), newest = ack.newest_epoch, "the peer has seen a newer epoch: deposed before the next write");
                                self.changed.notify_all();
                            }
                        }
                        continue;
                    }
                    if ack.status == Status::StaleEpoch {
                        let mut link = lock(&self.link);
                        link.state = PeerState::Deposed {
                            newest: ack.newest_epoch,
                        };
                        tracing::error!(volume = %self.volume.name(), newest = ack.newest_epoch, "the peer rejected our epoch: deposed");
                        self.changed.notify_all();
                    }
                    if let Some((len, tx)) = lock(&self.reads).remove(&(conn, ack.seq)) {
                        let mut data = Vec::new();
                        if ack.status == Status::Ok {
                            data = vec![0u8; len as usize];
                            if let Err(e) = io::Read::read_exact(&mut rd, &mut data) {
                                tracing::debug!(error = %e, "replication ack stream ended in a read's data");
                                break;
                            }
                        }
                        let _ = tx.send((ack, data));
                    } else {
                        let mut pending = lock(&self.pending);
                        match pending.get(&(conn, ack.seq)) {
                            None => {}
                            // Protocol B's first answer: the writer goes on.
                            Some(w) if ack.status == Status::Received => {
                                let _ = w.tx.try_send(ack);
                            }
                            Some(w) if w.early => {
                                drop(pending);
                                self.finish_early(conn, ack);
                            }
                            Some(_) => {
                                if let Some(w) = pending.remove(&(conn, ack.seq)) {
                                    let _ = w.tx.send(ack);
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "replication ack stream ended");
                    break;
                }
            }
        }
        {
            let mut link = lock(&self.link);
            self.lose(&mut link, conn);
        }
        // Writers still waiting on this connection see it gone.
        lock(&self.pending).retain(|(c, _), _| *c != conn);
        lock(&self.reads).retain(|(c, _), _| *c != conn);
    }
}

/// How many chunks `volume` has (all of them if its size cannot be read).
fn volume_chunks(volume: &Volume, chunk_size: u64) -> u64 {
    volume
        .size()
        .map_or(u64::MAX, |size| size.div_ceil(chunk_size.max(1)))
}

/// One connection's sync: the next sequence number and what was sent.
#[derive(Debug)]
struct SyncRun {
    seq: u64,
    pacer: Pacer,
    bytes: u64,
    chunks: u64,
    trimmed: u64,
}

/// Keeps a sync under its byte rate by sleeping before a send that would
/// exceed it.
#[derive(Debug)]
struct Pacer {
    rate: u64,
    start: Instant,
    sent: u64,
}

impl Pacer {
    fn new(rate: u64) -> Pacer {
        Pacer {
            rate,
            start: Instant::now(),
            sent: 0,
        }
    }

    fn pace(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            thread::sleep(due - elapsed);
        }
        self.sent += bytes;
    }
}
