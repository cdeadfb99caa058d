//! The replica side: accepts primaries' connections and applies their
//! frames, in order, to the volumes of the local pool.
//!
//! Invariants:
//! - per volume, the newest epoch seen only grows (and, with a book file,
//!   survives restarts: it is on disk before the hello that raised it is
//!   answered); a hello or frame carrying an older one is answered
//!   [`Status::StaleEpoch`], never applied, and counted in
//!   [`ReplicaStats::rejected_frames`];
//! - a volume attached standalone refuses primaries ([`Status::Refused`]);
//!   a primary here accepts another primary only if that one is in sync
//!   with it (dual primary), never a full sync ([`Status::SplitBrain`]);
//! - a hello that needs a full sync clears the volume's synced generation
//!   (on disk) before it is answered, and the generation is recorded
//!   again only by the FLUSH that ends the full sync;
//! - a frame is acknowledged only after it was applied (and, for FLUSH or
//!   FUA, made durable) on the local pool; a frame flagged
//!   [`wire::FLAG_RECEIVE_ACK`] (protocol B) is also answered
//!   [`Status::Received`] before that, once read and admitted;
//! - nothing a peer sends panics the process: malformed input closes that
//!   connection;
//! - a volume deleted here while a primary's session feeds it answers
//!   that session's next frame [`Status::UnknownVolume`] and ends it: a
//!   deletion is not an I/O error, so the disk stays attached for the
//!   pool's other volumes.

use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use super::attach::{AttachOptions, Attachments, Role};
use super::book::{EpochWatch, ReplicaBook};
use super::wire::{
    self, Ack, FLAG_FUA, FLAG_NO_HOLE, FLAG_RECEIVE_ACK, FLAG_REPAIR, FLAG_RESYNC, FLAG_SYNCED,
    Frame, FrameKind, Hello, HelloReply, Status,
};
use crate::pool::{Pool, PoolError, Volume, ZeroFlags};

/// Counters a replica keeps (for status and tests).
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Live frames applied (resync and full-sync frames not counted).
    pub applied_frames: AtomicU64,
    /// Data bytes written by resync and full-sync frames.
    pub resync_bytes: AtomicU64,
    /// Hellos and frames refused for carrying an old epoch.
    pub rejected_frames: AtomicU64,
}

/// Test hooks that hold a replica's frames back, to show what each
/// replication protocol acknowledges: holding the receive stops each
/// frame read after it was set before anything is done with it (not
/// admitted, not answered: not received, for the primary), holding the
/// apply stops it once admitted (and, for protocol B, answered
/// received) but not written. A held frame of a server stopped meanwhile
/// is dropped, never applied. Nothing holds unless a test (or `basaltd
/// storage serve --hold-replica-writes-when`) asks.
#[derive(Debug, Default)]
pub struct Holds {
    receive: AtomicBool,
    apply: AtomicBool,
    apply_when: Mutex<Option<PathBuf>>,
}

/// How often a held session looks again.
const HOLD_POLL: Duration = Duration::from_millis(5);

impl Holds {
    /// Stops (or resumes) reading frames from primaries.
    pub fn hold_receive(&self, on: bool) {
        self.receive.store(on, Ordering::SeqCst);
    }

    /// Stops (or resumes) applying frames read from primaries.
    pub fn hold_apply(&self, on: bool) {
        self.apply.store(on, Ordering::SeqCst);
    }

    /// Holds applies while `path` exists (checked before each frame is
    /// applied).
    pub fn hold_apply_when(&self, path: PathBuf) {
        *lock(&self.apply_when) = Some(path);
    }

    /// Waits while receiving is held (checked after each frame is read,
    /// before it is looked at), once the acks written so far are
    /// flushed.
    fn wait_receive(&self, flush: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        if self.receive.load(Ordering::SeqCst) {
            flush()?;
            while self.receive.load(Ordering::SeqCst) {
                thread::sleep(HOLD_POLL);
            }
        }
        Ok(())
    }

    /// Waits while applying is held, once the acks are flushed.
    fn wait_apply(&self, flush: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let held = || {
            self.apply.load(Ordering::SeqCst)
                || lock(&self.apply_when).as_ref().is_some_and(|p| p.exists())
        };
        if !held() {
            return Ok(());
        }
        flush()?;
        tracing::info!("replica applies held");
        while held() {
            thread::sleep(HOLD_POLL);
        }
        Ok(())
    }
}

/// A running replica listener.
#[derive(Debug)]
pub struct ReplicaServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<(u64, TcpStream)>>>,
    stats: Arc<ReplicaStats>,
    holds: Arc<Holds>,
    attachments: Arc<Attachments>,
    acceptor: Mutex<Option<thread::JoinHandle<()>>>,
}

impl ReplicaServer {
    /// Listens on `addr` for primaries writing to the volumes of `pool`;
    /// epochs below `min_epoch` are refused from the start. Epochs and
    /// sync generations are kept in memory only.
    pub fn start(pool: Pool, addr: SocketAddr, min_epoch: u64) -> io::Result<ReplicaServer> {
        let book = Arc::new(ReplicaBook::in_memory(min_epoch));
        let attachments = Attachments::new(pool, book, AttachOptions::default());
        ReplicaServer::serve(Arc::new(attachments), addr)
    }

    /// Like [`ReplicaServer::start`], keeping the newest epoch and the
    /// synced generation of each volume in `epoch_file`, so a restarted
    /// replica still refuses a primary it had seen deposed and needs no
    /// full sync from a primary it was in sync with.
    pub fn start_persistent(
        pool: Pool,
        addr: SocketAddr,
        min_epoch: u64,
        epoch_file: &Path,
    ) -> io::Result<ReplicaServer> {
        let book = Arc::new(ReplicaBook::open(epoch_file, min_epoch)?);
        let attachments = Attachments::new(pool, book, AttachOptions::default());
        ReplicaServer::serve(Arc::new(attachments), addr)
    }

    /// Listens on `addr` for primaries writing to the volumes of
    /// `attachments`' pool, as their roles allow.
    pub fn serve(attachments: Arc<Attachments>, addr: SocketAddr) -> io::Result<ReplicaServer> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let server = ReplicaServer {
            addr: listener.local_addr()?,
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            stats: Arc::new(ReplicaStats::default()),
            holds: Arc::new(Holds::default()),
            attachments: attachments.clone(),
            acceptor: Mutex::new(None),
        };
        let ctx = Ctx {
            attachments,
            stats: server.stats.clone(),
            holds: server.holds.clone(),
            stopped: server.stop.clone(),
        };
        let (stop, conns) = (server.stop.clone(), server.conns.clone());
        let acceptor = thread::Builder::new()
            .name("replica-accept".into())
            .spawn(move || accept_loop(&listener, &stop, &conns, &ctx))?;
        *lock(&server.acceptor) = Some(acceptor);
        tracing::info!(listen = %server.addr, "replica listening");
        Ok(server)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters.
    pub fn stats(&self) -> &ReplicaStats {
        &self.stats
    }

    /// The test hooks that hold frames back.
    pub fn holds(&self) -> &Holds {
        &self.holds
    }

    /// The newest epoch recorded for `volume` (0 if none).
    pub fn newest_epoch(&self, volume: &str) -> u64 {
        self.attachments.book().recorded_epoch(volume)
    }

    /// The generation `volume` is in sync with (0: none).
    pub fn synced_generation(&self, volume: &str) -> u64 {
        self.attachments.book().synced(volume)
    }

    /// Stops accepting (the address is free when this returns) and cuts
    /// every connection (a simulated peer loss).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = lock(&self.acceptor).take() {
            let _ = acceptor.join();
        }
        for (_, c) in lock(&self.conns).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone)]
struct Ctx {
    attachments: Arc<Attachments>,
    stats: Arc<ReplicaStats>,
    holds: Arc<Holds>,
    /// The server was stopped: a held frame is dropped.
    stopped: Arc<AtomicBool>,
}

impl Ctx {
    /// Admits `epoch` for `volume`: raises the newest seen, or refuses an
    /// older one (or one that cannot be recorded). Returns whether it was
    /// admitted and the newest after the check.
    fn admit(&self, volume: &str, epoch: u64) -> (bool, u64) {
        match self.attachments.book().admit(volume, epoch) {
            Ok(newest) => (true, newest),
            Err(stale) => {
                self.stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
                (false, stale.newest)
            }
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    conns: &Arc<Mutex<Vec<(u64, TcpStream)>>>,
    ctx: &Ctx,
) {
    let mut next_id = 0u64;
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                next_id += 1;
                let id = next_id;
                // A clone, so `stop` can cut the session; dropped when the
                // session ends, so the socket closes then.
                if let Ok(clone) = stream.try_clone() {
                    lock(conns).push((id, clone));
                }
                let (ctx, held) = (ctx.clone(), conns.clone());
                let spawned = thread::Builder::new()
                    .name("replica-conn".into())
                    .spawn(move || {
                        if let Err(e) = session(&ctx, stream) {
                            tracing::info!(%peer, error = %e, "replication session ended");
                        }
                        lock(&held).retain(|(c, _)| *c != id);
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a replication session");
                    lock(conns).retain(|(c, _)| *c != id);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(error = %e, "replica accept failed");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn reply(
    wr: &mut impl Write,
    version: u16,
    boot_id: [u8; 16],
    status: Status,
    newest_epoch: u64,
    full_sync: bool,
) -> io::Result<()> {
    wr.write_all(
        &HelloReply {
            version,
            status,
            newest_epoch,
            full_sync,
            boot_id,
        }
        .encode(),
    )?;
    wr.flush()
}

fn session(ctx: &Ctx, stream: TcpStream) -> Result<(), wire::WireError> {
    let mut rd = BufReader::with_capacity(256 << 10, stream.try_clone()?);
    let mut wr = BufWriter::with_capacity(64 << 10, stream);
    let hello = Hello::read(&mut rd)?;
    // The connection speaks the older of the two versions.
    let version = hello.version.min(wire::VERSION);
    let boot = ctx.attachments.pool().boot_id();
    let name = hello.volume.as_str();
    let Ok(volume) = ctx.attachments.pool().open_volume(name) else {
        tracing::warn!(volume = %name, size = hello.size, "hello for an unknown volume");
        reply(&mut wr, version, boot, Status::UnknownVolume, 0, false)?;
        return Ok(());
    };
    // Role and streams from one reading: a demotion racing this hello
    // must not pair "primary" with the secondary's empty streams (that
    // would look like a split brain).
    let (role, primary_generations) = ctx.attachments.role_and_generations(name);
    if role == Some(Role::Standalone) {
        tracing::warn!(volume = %name, "refused a primary: the volume is attached standalone");
        reply(&mut wr, version, boot, Status::Refused, 0, false)?;
        return Ok(());
    }
    if let Some(why) = ctx.attachments.disk().failed() {
        tracing::warn!(volume = %name, error = %why, "refused a primary: this node's disk failed and is detached");
        reply(&mut wr, version, boot, Status::IoError, 0, false)?;
        return Ok(());
    }
    let (ok, newest) = ctx.admit(name, hello.epoch);
    if !ok {
        tracing::warn!(volume = %name, epoch = hello.epoch, newest, "refused a primary with an old epoch");
        reply(&mut wr, version, boot, Status::StaleEpoch, newest, false)?;
        return Ok(());
    }
    // A primary that grew its volume while this copy was away: grow it
    // first (version 5). A copy larger than the primary's is another
    // volume's.
    let size = volume.size().unwrap_or(0);
    if size < hello.size && version >= wire::RESIZE_VERSION {
        match ctx.attachments.pool().resize(name, hello.size) {
            Ok(_) => {
                tracing::info!(volume = %name, from = size, to = hello.size, "copy grown to the primary's size")
            }
            Err(e) => {
                tracing::warn!(volume = %name, size = hello.size, error = %e, "cannot grow the copy to the primary's size");
            }
        }
    }
    if volume.size().ok() != Some(hello.size) {
        tracing::warn!(volume = %name, size = hello.size, local = volume.size().unwrap_or(0), protocol = version, "hello for a volume of another size");
        reply(&mut wr, version, boot, Status::UnknownVolume, newest, false)?;
        return Ok(());
    }
    // In sync: this volume recorded the stream's generation, or the
    // sender's volume followed a stream this process ships as primary.
    let book = ctx.attachments.book();
    let synced = book.synced(name);
    let in_sync = (hello.generation != 0 && synced == hello.generation)
        || (hello.synced_from != 0 && primary_generations.contains(&hello.synced_from));
    let recorded = if in_sync {
        book.set_synced(name, hello.generation)
    } else if role == Some(Role::Primary) {
        tracing::error!(volume = %name, generation = hello.generation, synced_from = hello.synced_from, "split brain: another primary of this volume is not in sync with it");
        reply(&mut wr, version, boot, Status::SplitBrain, newest, false)?;
        return Ok(());
    } else {
        // Whatever this volume followed, it is about to be rewritten: it
        // is incomplete until the full sync's last FLUSH, even across a
        // restart, and refuses to become a primary meanwhile.
        book.start_fill(name)
    };
    if let Err(e) = recorded {
        tracing::error!(volume = %name, error = %e, "cannot record the volume's sync state: refusing the primary");
        reply(&mut wr, version, boot, Status::IoError, newest, false)?;
        return Ok(());
    }
    reply(&mut wr, version, boot, Status::Ok, newest, !in_sync)?;
    let wr = Arc::new(Mutex::new(wr));
    // A newer epoch seen here (another primary's hello or frame, or a
    // promotion of this copy) deposes this primary: it is told at once
    // (an ack with sequence number 0), so it refuses its next write
    // before writing it anywhere instead of learning it from that write.
    let notice: EpochWatch = {
        let (wr, name) = (wr.clone(), name.to_owned());
        Arc::new(move |newest| {
            let notice = Ack {
                seq: 0,
                status: Status::StaleEpoch,
                newest_epoch: newest,
            };
            let mut w = lock(&wr);
            if w.write_all(&notice.encode())
                .and_then(|()| w.flush())
                .is_ok()
            {
                tracing::warn!(volume = %name, newest, "told an older primary it is deposed");
            }
        })
    };
    let mut watched = hello.epoch;
    book.watch(name, watched, &notice);
    tracing::info!(
        volume = %name,
        primary_uid = %hello.volume_uid,
        epoch = hello.epoch,
        generation = hello.generation,
        full_sync = !in_sync,
        "primary connected"
    );
    // A full sync or resync in progress rewrites the volume: it must not
    // reach a volume that became a primary meanwhile.
    let mut filling = !in_sync;
    loop {
        let frame = Frame::read(&mut rd)?;
        ctx.holds.wait_receive(|| lock(&wr).flush())?;
        if ctx.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        if frame.epoch > watched {
            // The primary raised its epoch in place: watched at the new
            // one before it is admitted, so raising it does not depose
            // this very primary.
            watched = frame.epoch;
            book.watch(name, watched, &notice);
        }
        let (ok, newest) = ctx.admit(name, frame.epoch);
        let role = ctx.attachments.role(name);
        if filling && role == Some(Role::Primary) {
            tracing::error!(volume = %name, "the volume became a primary during a sync into it: cutting the sync");
            let ack = Ack {
                seq: frame.seq,
                status: Status::SplitBrain,
                newest_epoch: newest,
            };
            let mut w = lock(&wr);
            w.write_all(&ack.encode())?;
            w.flush()?;
            return Ok(());
        }
        let mut value = newest;
        let mut payload = None;
        let status = if role == Some(Role::Standalone) {
            Status::Refused
        } else if ok && ctx.attachments.disk().failed().is_some() {
            // A failed disk is detached: nothing more is read or written.
            Status::IoError
        } else if ok && frame.kind == FrameKind::Read {
            match read_range(&volume, &frame) {
                Ok(data) => {
                    payload = Some(data);
                    Status::Ok
                }
                Err(status) => status,
            }
        } else if ok && frame.kind == FrameKind::Verify {
            match digest_range(&volume, &frame) {
                Ok(d) => {
                    value = d;
                    Status::Ok
                }
                Err(status) => status,
            }
        } else if ok {
            if frame.flags & FLAG_RECEIVE_ACK != 0 && version >= wire::RECEIVE_ACK_VERSION {
                // Protocol B: received and admitted, not applied yet.
                let received = Ack {
                    seq: frame.seq,
                    status: Status::Received,
                    newest_epoch: newest,
                };
                let mut w = lock(&wr);
                w.write_all(&received.encode())?;
                w.flush()?;
            }
            ctx.holds.wait_apply(|| lock(&wr).flush())?;
            if ctx.stopped.load(Ordering::SeqCst) {
                return Ok(());
            }
            // The first chunk of a resync makes the copy incomplete: it
            // then holds some chunks newer than the others, not the
            // volume as it was at any moment, until the SYNCED flush.
            let must_mark = !filling && version >= wire::SYNCED_LIVE_VERSION && rewrites(&frame);
            let status = match must_mark.then(|| book.start_resync(name)) {
                Some(Err(e)) => {
                    tracing::error!(volume = %name, error = %e, "cannot mark the copy incomplete before a resync: refusing it");
                    Status::IoError
                }
                marked => {
                    filling |= marked.is_some();
                    apply(ctx, &volume, &frame)
                }
            };
            if status == Status::Ok
                && frame.kind == FrameKind::Flush
                && frame.flags & FLAG_SYNCED != 0
            {
                match book.finish_fill(name, hello.generation) {
                    Ok(()) => {
                        filling = false;
                        tracing::info!(volume = %name, generation = hello.generation, "in sync with the primary: sync received");
                        status
                    }
                    Err(e) => {
                        tracing::error!(volume = %name, error = %e, "cannot record the finished full sync");
                        Status::IoError
                    }
                }
            } else {
                status
            }
        } else {
            tracing::warn!(
                volume = %name,
                epoch = frame.epoch,
                newest,
                seq = frame.seq,
                "rejected a frame with an old epoch"
            );
            Status::StaleEpoch
        };
        if status == Status::IoError {
            ctx.attachments
                .disk()
                .fail(&format!("applying a frame to {name} failed"));
        }
        let ack = Ack {
            seq: frame.seq,
            status,
            newest_epoch: value,
        };
        let mut w = lock(&wr);
        w.write_all(&ack.encode())?;
        if status == Status::UnknownVolume {
            // Deleted here: nothing more of this session can be applied.
            w.flush()?;
            return Ok(());
        }
        if let Some(data) = payload {
            w.write_all(&data)?;
        }
        // Acks of frames already buffered go out together.
        if rd.buffer().is_empty() {
            w.flush()?;
        }
    }
}

/// Whether `frame` is part of a resync or full sync that changes the
/// copy's contents (not a flush, a resize, a read or a repair).
fn rewrites(frame: &Frame) -> bool {
    frame.flags & FLAG_REPAIR == FLAG_RESYNC
        && matches!(
            frame.kind,
            FrameKind::Write | FrameKind::Trim | FrameKind::WriteZeroes
        )
}

/// The digest of a VERIFY frame's range, read at this point of the
/// frame order.
fn digest_range(volume: &Volume, f: &Frame) -> Result<u64, Status> {
    read_range(volume, f).map(|data| wire::digest(&data))
}

/// The bytes of a READ or VERIFY frame's range, read at this point of the
/// frame order.
fn read_range(volume: &Volume, f: &Frame) -> Result<Vec<u8>, Status> {
    if f.length > wire::MAX_FRAME_PAYLOAD {
        return Err(Status::Invalid);
    }
    let mut buf = vec![0u8; f.length as usize];
    match volume.read(f.offset, &mut buf) {
        Ok(()) => Ok(buf),
        Err(PoolError::OutOfRange { .. }) => Err(Status::Invalid),
        Err(e) if is_deleted(&e) => Err(Status::UnknownVolume),
        Err(e) => {
            tracing::warn!(volume = %volume.name(), error = %e, "reading a range to verify failed");
            Err(Status::IoError)
        }
    }
}

/// A RESIZE frame: grows the volume to `size` (already that size: done;
/// smaller: a shrink, which replication never asks).
fn grow(ctx: &Ctx, volume: &Volume, size: u64) -> Result<(), PoolError> {
    let now = volume.size()?;
    if size == now {
        return Ok(());
    }
    ctx.attachments
        .pool()
        .resize(volume.name(), size)
        .map(|_| tracing::info!(volume = %volume.name(), from = now, to = size, "copy grown by the primary"))
}

fn apply(ctx: &Ctx, volume: &Volume, f: &Frame) -> Status {
    let fua = f.flags & FLAG_FUA != 0;
    let result = match f.kind {
        FrameKind::Write => volume.write(f.offset, &f.data, fua),
        FrameKind::Trim => volume.trim(f.offset, f.length.into(), fua),
        FrameKind::WriteZeroes => volume.write_zeroes(
            f.offset,
            f.length.into(),
            ZeroFlags {
                no_hole: f.flags & FLAG_NO_HOLE != 0,
                fast: false,
                fua,
            },
        ),
        FrameKind::Flush => volume.flush(),
        FrameKind::Resize => grow(ctx, volume, f.offset),
        // Answered by `read_range` before it gets here.
        FrameKind::Verify | FrameKind::Read => return Status::Invalid,
    };
    match result {
        Ok(()) => {
            if f.flags & FLAG_RESYNC == 0 {
                ctx.stats.applied_frames.fetch_add(1, Ordering::Relaxed);
            } else if f.kind == FrameKind::Write {
                ctx.stats
                    .resync_bytes
                    .fetch_add(f.length.into(), Ordering::Relaxed);
            }
            Status::Ok
        }
        Err(
            PoolError::OutOfRange { .. }
            | PoolError::ReadOnly { .. }
            | PoolError::Shrink { .. }
            | PoolError::InvalidSize { .. }
            | PoolError::OverProvisioned { .. },
        ) => Status::Invalid,
        Err(e) if is_deleted(&e) => {
            tracing::info!(volume = %volume.name(), "the volume was deleted here: ending its primary's session");
            Status::UnknownVolume
        }
        Err(e) => {
            tracing::warn!(volume = %volume.name(), error = %e, "applying a replicated frame failed");
            Status::IoError
        }
    }
}

/// Whether `e` says the volume itself is gone from the pool (deleted by
/// the local API while a primary's session still fed it), which says
/// nothing about the backing store: the session ends and the primary
/// loses this peer, but the disk stays attached for every other volume.
fn is_deleted(e: &PoolError) -> bool {
    matches!(e, PoolError::VolumeGone { .. } | PoolError::NoVolume { .. })
}
