//! The replica side: accepts primaries' connections and applies their
//! frames, in order, to the volumes of the local pool.
//!
//! Invariants:
//! - per volume, the newest epoch seen only grows (and, with an epoch
//!   file, survives restarts: it is on disk before the hello that raised
//!   it is answered); a hello or frame
//!   carrying an older one is answered [`Status::StaleEpoch`], never
//!   applied, and counted in [`ReplicaStats::rejected_frames`];
//! - a frame is acknowledged only after it was applied (and, for FLUSH or
//!   FUA, made durable) on the local pool;
//! - nothing a peer sends panics the process: malformed input closes that
//!   connection.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use super::wire::{
    self, Ack, FLAG_FUA, FLAG_NO_HOLE, FLAG_RESYNC, Frame, FrameKind, Hello, HelloReply, Status,
};
use crate::pool::{Pool, PoolError, Volume, ZeroFlags};

/// Counters a replica keeps (for status and tests).
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Frames applied.
    pub applied_frames: AtomicU64,
    /// Bytes written by resync frames.
    pub resync_bytes: AtomicU64,
    /// Hellos and frames refused for carrying an old epoch.
    pub rejected_frames: AtomicU64,
}

/// A running replica listener.
#[derive(Debug)]
pub struct ReplicaServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stats: Arc<ReplicaStats>,
    epochs: Arc<Mutex<HashMap<String, u64>>>,
    acceptor: Mutex<Option<thread::JoinHandle<()>>>,
}

impl ReplicaServer {
    /// Listens on `addr` for primaries writing to the volumes of `pool`;
    /// epochs below `min_epoch` are refused from the start.
    pub fn start(pool: Pool, addr: SocketAddr, min_epoch: u64) -> io::Result<ReplicaServer> {
        ReplicaServer::start_inner(pool, addr, min_epoch, None)
    }

    /// Like [`ReplicaServer::start`], remembering the newest epoch of each
    /// volume in `epoch_file` (lines `VOLUME EPOCH`), so a restarted
    /// replica still refuses a primary it had seen deposed.
    pub fn start_persistent(
        pool: Pool,
        addr: SocketAddr,
        min_epoch: u64,
        epoch_file: &Path,
    ) -> io::Result<ReplicaServer> {
        ReplicaServer::start_inner(pool, addr, min_epoch, Some(epoch_file.to_owned()))
    }

    fn start_inner(
        pool: Pool,
        addr: SocketAddr,
        min_epoch: u64,
        epoch_file: Option<PathBuf>,
    ) -> io::Result<ReplicaServer> {
        let mut epochs = HashMap::new();
        if let Some(path) = &epoch_file {
            epochs = load_epochs(path)?;
        }
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let server = ReplicaServer {
            addr: listener.local_addr()?,
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            stats: Arc::new(ReplicaStats::default()),
            epochs: Arc::new(Mutex::new(epochs)),
            acceptor: Mutex::new(None),
        };
        let ctx = Ctx {
            pool,
            min_epoch,
            epoch_file,
            stats: server.stats.clone(),
            epochs: server.epochs.clone(),
        };
        let (stop, conns) = (server.stop.clone(), server.conns.clone());
        let acceptor = thread::Builder::new()
            .name("replica-accept".into())
            .spawn(move || accept_loop(&listener, &stop, &conns, &ctx))?;
        *lock(&server.acceptor) = Some(acceptor);
        tracing::info!(listen = %server.addr, min_epoch, "replica listening");
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

    /// The newest epoch seen for `volume` (0 if none).
    pub fn newest_epoch(&self, volume: &str) -> u64 {
        lock(&self.epochs).get(volume).copied().unwrap_or(0)
    }

    /// Stops accepting (the address is free when this returns) and cuts
    /// every connection (a simulated peer loss).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = lock(&self.acceptor).take() {
            let _ = acceptor.join();
        }
        for c in lock(&self.conns).drain(..) {
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
    pool: Pool,
    min_epoch: u64,
    epoch_file: Option<PathBuf>,
    stats: Arc<ReplicaStats>,
    epochs: Arc<Mutex<HashMap<String, u64>>>,
}

impl Ctx {
    /// Admits `epoch` for `volume`: raises the newest seen, or refuses an
    /// older one. Returns the newest after the check.
    /// An epoch that cannot be recorded is refused (reported as the
    /// newest seen), so a replica never forgets an epoch it accepted.
    fn admit(&self, volume: &str, epoch: u64) -> (bool, u64) {
        let mut epochs = lock(&self.epochs);
        let newest = epochs.get(volume).copied().unwrap_or(0).max(self.min_epoch);
        if epoch < newest {
            self.stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
            return (false, newest);
        }
        if epoch > newest || !epochs.contains_key(volume) {
            let before = epochs.insert(volume.to_owned(), epoch);
            if let Some(path) = &self.epoch_file
                && let Err(e) = save_epochs(path, &epochs)
            {
                tracing::error!(path = %path.display(), error = %e, "cannot record a new epoch: refusing it");
                match before {
                    Some(b) => epochs.insert(volume.to_owned(), b),
                    None => epochs.remove(volume),
                };
                return (false, newest);
            }
        }
        (true, epoch)
    }
}

fn load_epochs(path: &Path) -> io::Result<HashMap<String, u64>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e),
    };
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let parsed = line
            .split_once(' ')
            .and_then(|(v, e)| Some((v.to_owned(), e.trim().parse::<u64>().ok()?)));
        let Some((volume, epoch)) = parsed else {
            return Err(io::Error::other(format!(
                "{} line {}: not `VOLUME EPOCH`",
                path.display(),
                n + 1
            )));
        };
        out.insert(volume, epoch);
    }
    Ok(out)
}

/// Writes the epochs to a temporary file, syncs it and renames it over
/// `path`, so the file is always whole.
fn save_epochs(path: &Path, epochs: &HashMap<String, u64>) -> io::Result<()> {
    let mut text = String::new();
    for (v, e) in epochs {
        text.push_str(&format!("{v} {e}\n"));
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    conns: &Mutex<Vec<TcpStream>>,
    ctx: &Ctx,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                if let Ok(clone) = stream.try_clone() {
                    let mut all = lock(conns);
                    all.retain(|c| c.peer_addr().is_ok());
                    all.push(clone);
                }
                let ctx = ctx.clone();
                let spawned = thread::Builder::new()
                    .name("replica-conn".into())
                    .spawn(move || {
                        if let Err(e) = session(&ctx, stream) {
                            tracing::info!(%peer, error = %e, "replication session ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a replication session");
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

fn session(ctx: &Ctx, stream: TcpStream) -> Result<(), wire::WireError> {
    let mut rd = BufReader::with_capacity(256 << 10, stream.try_clone()?);
    let mut wr = BufWriter::with_capacity(64 << 10, stream);
    let hello = Hello::read(&mut rd)?;
    let volume = ctx
        .pool
        .open_volume(&hello.volume)
        .ok()
        .filter(|v| v.size().is_ok_and(|s| s == hello.size));
    let Some(volume) = volume else {
        tracing::warn!(volume = %hello.volume, size = hello.size, "hello for an unknown volume or one of another size");
        wr.write_all(
            &HelloReply {
                status: Status::UnknownVolume,
                newest_epoch: 0,
            }
            .encode(),
        )?;
        wr.flush()?;
        return Ok(());
    };
    let (ok, newest) = ctx.admit(&hello.volume, hello.epoch);
    let status = if ok { Status::Ok } else { Status::StaleEpoch };
    wr.write_all(
        &HelloReply {
            status,
            newest_epoch: newest,
        }
        .encode(),
    )?;
    wr.flush()?;
    if !ok {
        tracing::warn!(volume = %hello.volume, epoch = hello.epoch, newest, "refused a primary with an old epoch");
        return Ok(());
    }
    tracing::info!(
        volume = %hello.volume,
        primary_uid = %hello.volume_uid,
        epoch = hello.epoch,
        generation = hello.generation,
        "primary connected"
    );
    loop {
        let frame = Frame::read(&mut rd)?;
        let (ok, newest) = ctx.admit(&hello.volume, frame.epoch);
        let status = if ok {
            apply(ctx, &volume, &frame)
        } else {
            tracing::warn!(
                volume = %hello.volume,
                epoch = frame.epoch,
                newest,
                seq = frame.seq,
                "rejected a frame with an old epoch"
            );
            Status::StaleEpoch
        };
        let ack = Ack {
            seq: frame.seq,
            status,
            newest_epoch: newest,
        };
        wr.write_all(&ack.encode())?;
        // Acks of frames already buffered go out together.
        if rd.buffer().is_empty() {
            wr.flush()?;
        }
    }
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
    };
    match result {
        Ok(()) => {
            ctx.stats.applied_frames.fetch_add(1, Ordering::Relaxed);
            if f.flags & FLAG_RESYNC != 0 {
                ctx.stats
                    .resync_bytes
                    .fetch_add(f.length.into(), Ordering::Relaxed);
            }
            Status::Ok
        }
        Err(PoolError::OutOfRange { .. } | PoolError::ReadOnly { .. }) => Status::Invalid,
        Err(e) => {
            tracing::warn!(volume = %volume.name(), error = %e, "applying a replicated frame failed");
            Status::IoError
        }
    }
}
