//! DRBD-style synchronous replication, first milestone: one primary
//! ships every write of a volume to one peer over Basalt's own framed
//! TCP protocol ([`wire`]) and acknowledges its client only when the
//! local write and the peer's ack are both done (protocol C).
//!
//! - [`Replicator`]: the primary's side for one volume and one peer —
//!   ships frames, tracks the peer's state, keeps a dirty-chunk set while
//!   the peer is away, asks a [`Fencer`] before acknowledging without
//!   it, and resyncs only the dirty chunks when it returns;
//! - [`replica::ReplicaServer`]: the peer's side — applies frames in
//!   order and refuses any carrying an epoch older than the newest seen.
//!
//! Invariants:
//! - a write is acknowledged only if the peer acknowledged it, or the
//!   peer is away and the fencer confirmed it outdated (then the write's
//!   chunks are in the dirty set until a resync sends them);
//! - frames go out in the order the writes are applied locally (one
//!   per-volume lock covers the send and then the local write), and the
//!   replica applies them in that order, so a FLUSH acknowledged by the
//!   peer covers every write before it on both sides;
//! - a primary whose epoch a replica refused stops acknowledging writes
//!   for good (it has been deposed).
//!
//! The dirty set is kept in memory only (this milestone): a primary
//! restart forgets it, so a peer that was away across a primary restart
//! needs a full sync, which is not implemented yet.

pub mod replica;
pub mod wire;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::{self, BufReader, BufWriter};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use crate::pool::{PoolError, Volume};
use wire::{FLAG_FUA, FLAG_NO_HOLE, FLAG_RESYNC, Frame, FrameKind, Hello, HelloReply, Status};

/// Why a fencer would not confirm a peer outdated.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The fencer refused (or cannot reach whoever decides).
    #[error("fencer refused to outdate peer {peer} of volume {volume}")]
    Refused {
        /// The volume.
        volume: String,
        /// The peer.
        peer: SocketAddr,
    },
}

/// Confirms that a peer the primary lost is recorded as outdated, so the
/// primary may go on acknowledging writes without it (DRBD's
/// fence-peer). The agent's fencer asks the control plane; standalone
/// mode uses [`StaticFencer`].
pub trait Fencer: Send + Sync + fmt::Debug {
    /// `Ok` once `peer` is recorded outdated for `volume`.
    fn outdate_peer(&self, volume: &str, peer: SocketAddr) -> Result<(), FenceError>;
}

/// A fencer with a fixed answer (`--fencer allow` / `--fencer deny`).
#[derive(Debug, Clone, Copy)]
pub struct StaticFencer {
    /// Confirm every peer outdated (allow) or none (deny: writes suspend
    /// until the peer is back in sync).
    pub allow: bool,
}

impl Fencer for StaticFencer {
    fn outdate_peer(&self, volume: &str, peer: SocketAddr) -> Result<(), FenceError> {
        if self.allow {
            Ok(())
        } else {
            Err(FenceError::Refused {
                volume: volume.to_owned(),
                peer,
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
}

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
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write { offset, data, .. } => Some((offset, data.len() as u64)),
            Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => {
                Some((offset, len.into()))
            }
            Op::Flush => None,
        }
    }
}

/// How the primary sees its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Not connected yet, or away (writes go to the dirty set).
    Away,
    /// Connected, sending the dirty chunks.
    Resyncing,
    /// Connected and in sync: every write is shipped.
    Connected,
    /// The peer refused this primary's epoch: no more acknowledgements.
    Deposed {
        /// The newest epoch the peer has seen.
        newest: u64,
    },
}

/// Where a primary's replication of one volume stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationStatus {
    /// The peer.
    pub peer: SocketAddr,
    /// Its state.
    pub state: PeerState,
    /// Chunks changed while the peer was away, not yet resynced.
    pub dirty_chunks: u64,
    /// Bytes sent by resyncs so far.
    pub resync_bytes: u64,
    /// Chunks sent by resyncs so far.
    pub resync_chunks: u64,
    /// Frames the peer acknowledged.
    pub acked_frames: u64,
}

/// The primary's replication settings for one volume.
#[derive(Debug, Clone)]
pub struct ReplicatorConfig {
    /// The peer's replication address.
    pub peer: SocketAddr,
    /// This primary's epoch (raised at every promotion).
    pub epoch: u64,
    /// The volume's generation identifier on this primary.
    pub generation: u64,
    /// Granularity of the dirty set and of resync (the pool's chunk size).
    pub chunk_size: u64,
    /// How often to retry an away peer.
    pub retry: Duration,
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
    fencer: Arc<dyn Fencer>,
    link: Mutex<Link>,
    changed: Condvar,
    pending: Mutex<HashMap<(u64, u64), SyncSender<Status>>>,
    resync_bytes: AtomicU64,
    resync_chunks: AtomicU64,
    acked: AtomicU64,
    stop: AtomicBool,
}

#[derive(Debug)]
struct Link {
    state: PeerState,
    writer: Option<BufWriter<TcpStream>>,
    conn: u64,
    next_seq: u64,
    dirty: BTreeSet<u64>,
    outdated: bool,
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
        let shared = Arc::new(Shared {
            volume,
            cfg,
            fencer,
            link: Mutex::new(Link {
                state: PeerState::Away,
                writer: None,
                conn: 0,
                next_seq: 1,
                dirty: BTreeSet::new(),
                outdated: false,
            }),
            changed: Condvar::new(),
            pending: Mutex::new(HashMap::new()),
            resync_bytes: AtomicU64::new(0),
            resync_chunks: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            stop: AtomicBool::new(false),
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
        let s = &self.shared;
        let mut link = lock(&s.link);
        if let PeerState::Deposed { newest } = link.state {
            return Err(s.deposed(newest));
        }
        // The frame goes out first, so the peer applies it while the local
        // write runs; both happen under the lock, so the order is the same.
        let mut waiting = None;
        if link.state == PeerState::Connected {
            let seq = link.next_seq;
            link.next_seq += 1;
            let conn = link.conn;
            let (tx, rx) = sync_channel(1);
            lock(&s.pending).insert((conn, seq), tx);
            let frame = op.frame(s.cfg.epoch, seq);
            let sent = link.writer.as_mut().map(|w| frame.write_to(w));
            if matches!(sent, Some(Ok(()))) {
                waiting = Some((rx, conn));
            } else {
                lock(&s.pending).remove(&(conn, seq));
                s.lose(&mut link, conn);
            }
        }
        // A local failure fails the request; the range's content is then
        // undefined for the client, as after any failed write.
        local()?;
        if let Some((rx, conn)) = waiting {
            drop(link);
            let answer = rx.recv();
            link = lock(&s.link);
            match answer {
                Ok(Status::Ok) => {
                    s.acked.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(Status::StaleEpoch) => {
                    let newest = match link.state {
                        PeerState::Deposed { newest } => newest,
                        _ => s.cfg.epoch + 1,
                    };
                    return Err(s.deposed(newest));
                }
                Ok(other) => {
                    tracing::warn!(volume = %s.volume.name(), status = ?other, "peer could not apply a frame: detaching it");
                    s.lose(&mut link, conn);
                }
                // The connection dropped before the ack.
                Err(_) => {}
            }
        }
        // The peer does not have this write: remember it, then acknowledge
        // only with the fencer's word.
        if let Some((offset, len)) = op.range() {
            s.mark_dirty(&mut link, offset, len);
        }
        if let PeerState::Deposed { newest } = link.state {
            return Err(s.deposed(newest));
        }
        if link.outdated {
            return Ok(());
        }
        match s.fencer.outdate_peer(s.volume.name(), s.cfg.peer) {
            Ok(()) => {
                tracing::warn!(volume = %s.volume.name(), peer = %s.cfg.peer, "peer outdated by the fencer: writing without it");
                link.outdated = true;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(volume = %s.volume.name(), error = %e, "suspending writes until the peer is back");
                loop {
                    match link.state {
                        PeerState::Connected => return Ok(()),
                        PeerState::Deposed { newest } => return Err(s.deposed(newest)),
                        _ => {}
                    }
                    link = s
                        .changed
                        .wait_timeout(link, Duration::from_secs(1))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }

    /// Stops reconnecting and cuts the connection.
    pub fn shutdown(&self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::SeqCst);
        let mut link = lock(&s.link);
        let conn = link.conn;
        s.lose(&mut link, conn);
    }
}

impl Shared {
    fn deposed(&self, newest: u64) -> ReplicationError {
        ReplicationError::StaleEpoch {
            epoch: self.cfg.epoch,
            newest,
        }
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

    /// Marks the peer away if `conn` is still the live connection.
    fn lose(&self, link: &mut Link, conn: u64) {
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
        while !self.stop.load(Ordering::SeqCst) {
            {
                let mut link = lock(&self.link);
                match link.state {
                    PeerState::Deposed { .. } => return,
                    PeerState::Connected | PeerState::Resyncing => {
                        let _ = self.changed.wait_timeout(link, self.cfg.retry);
                        continue;
                    }
                    PeerState::Away => {
                        link.conn += 1;
                    }
                }
            }
            if let Err(e) = self.connect_once() {
                tracing::debug!(peer = %self.cfg.peer, error = %e, "peer not reachable");
                let mut link = lock(&self.link);
                if link.state == PeerState::Resyncing {
                    link.state = PeerState::Away;
                }
                drop(link);
                thread::sleep(self.cfg.retry);
            }
        }
    }

    /// Connects, greets, resyncs the dirty chunks, and goes live.
    fn connect_once(self: &Arc<Self>) -> io::Result<()> {
        let stream = TcpStream::connect_timeout(&self.cfg.peer, Duration::from_secs(1))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut rd = BufReader::with_capacity(64 << 10, stream.try_clone()?);
        let mut wr = BufWriter::with_capacity(256 << 10, stream);
        let hello = Hello {
            version: wire::VERSION,
            epoch: self.cfg.epoch,
            generation: self.cfg.generation,
            volume_uid: self.volume.uid(),
            size: self.volume.size().map_err(io::Error::other)?,
            volume: self.volume.name().to_owned(),
        };
        io::Write::write_all(&mut wr, &hello.encode())?;
        io::Write::flush(&mut wr)?;
        let reply = HelloReply::read(&mut rd).map_err(io::Error::other)?;
        match reply.status {
            Status::Ok => {}
            Status::StaleEpoch => {
                tracing::error!(volume = %self.volume.name(), epoch = self.cfg.epoch, newest = reply.newest_epoch, "the peer has seen a newer epoch: this primary is deposed");
                let mut link = lock(&self.link);
                link.state = PeerState::Deposed {
                    newest: reply.newest_epoch,
                };
                self.changed.notify_all();
                return Ok(());
            }
            other => return Err(io::Error::other(format!("peer refused: {other:?}"))),
        }
        let conn = {
            let mut link = lock(&self.link);
            link.state = PeerState::Resyncing;
            link.conn
        };
        let cs = self.cfg.chunk_size.max(1);
        let size = self.volume.size().map_err(io::Error::other)?;
        let (mut seq, mut bytes, mut chunks) = (1u64, 0u64, 0u64);
        let mut chunk_buf = vec![0u8; cs as usize];
        loop {
            let batch: Vec<u64> = {
                let mut link = lock(&self.link);
                if link.dirty.is_empty() {
                    // In sync: go live under the lock, so no write can
                    // slip between the last batch and the state change.
                    let _ = rd.get_ref().set_read_timeout(None);
                    link.state = PeerState::Connected;
                    link.writer = Some(wr);
                    link.next_seq = seq;
                    link.outdated = false;
                    self.changed.notify_all();
                    break;
                }
                std::mem::take(&mut link.dirty).into_iter().collect()
            };
            for (i, &c) in batch.iter().enumerate() {
                let offset = c * cs;
                let len = cs.min(size.saturating_sub(offset)) as usize;
                let sent = (|| {
                    if len == 0 {
                        return Ok(());
                    }
                    let buf = &mut chunk_buf[..len];
                    self.volume.read(offset, buf).map_err(io::Error::other)?;
                    let frame = Frame {
                        kind: FrameKind::Write,
                        flags: FLAG_RESYNC,
                        epoch: self.cfg.epoch,
                        seq,
                        offset,
                        length: len as u32,
                        data: buf.to_vec(),
                    };
                    self.exchange(&mut rd, &mut wr, &frame)
                })();
                if let Err(e) = sent {
                    // Whatever was not confirmed stays dirty.
                    lock(&self.link).dirty.extend(&batch[i..]);
                    return Err(e);
                }
                seq += 1;
                bytes += len as u64;
                chunks += 1;
            }
            // Resynced chunks are durable on the peer before it counts as
            // in sync.
            let flush = Frame {
                kind: FrameKind::Flush,
                flags: FLAG_RESYNC,
                epoch: self.cfg.epoch,
                seq,
                offset: 0,
                length: 0,
                data: Vec::new(),
            };
            self.exchange(&mut rd, &mut wr, &flush)?;
            seq += 1;
        }
        self.resync_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.resync_chunks.fetch_add(chunks, Ordering::Relaxed);
        tracing::info!(
            volume = %self.volume.name(),
            peer = %self.cfg.peer,
            resync_chunks = chunks,
            resync_bytes = bytes,
            "peer in sync: resync finished"
        );
        let s = self.clone();
        thread::Builder::new()
            .name("replication-acks".into())
            .spawn(move || s.ack_loop(rd, conn))?;
        Ok(())
    }

    fn exchange(
        &self,
        rd: &mut BufReader<TcpStream>,
        wr: &mut BufWriter<TcpStream>,
        frame: &Frame,
    ) -> io::Result<()> {
        frame.write_to(wr)?;
        let ack = wire::Ack::read(rd).map_err(io::Error::other)?;
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
                    if ack.status == Status::StaleEpoch {
                        let mut link = lock(&self.link);
                        link.state = PeerState::Deposed {
                            newest: ack.newest_epoch,
                        };
                        tracing::error!(volume = %self.volume.name(), newest = ack.newest_epoch, "the peer rejected our epoch: deposed");
                        self.changed.notify_all();
                    }
                    if let Some(tx) = lock(&self.pending).remove(&(conn, ack.seq)) {
                        let _ = tx.send(ack.status);
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
    }
}
