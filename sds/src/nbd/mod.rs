//! Basalt's NBD server, on tokio: every volume of a pool is an export
//! (by name or uid), served over TCP or Unix sockets to any number of
//! clients at once.
//!
//! Per connection: the handshake runs on a tokio task; the transmission
//! phase then runs on a thread of its own with the socket in blocking
//! mode (pool I/O is synchronous, so a blocking thread per connection
//! costs no hand-off per request: the thread sleeps in `read` until the
//! client sends, runs what it can, and sends). Quick requests (plain
//! reads of at most 64 KiB; plain writes of that size to a
//! volume with no peer) run on that thread, a run of those the client
//! already sent as one batch answered with one send; reads the page cache
//! cannot answer without waiting (`preadv2(RWF_NOWAIT)`) go to a worker
//! instead, so a miss holds up no other request. A big plain read the
//! page cache holds is sent straight from the pool's mapping of it with
//! one `sendmsg` ([`Volume::read_resident`]: one copy, into the socket,
//! made while the range's stripes are held, so no trim can free and hand
//! out one of its chunks before the bytes are copied). Big writes always
//! go to a blocking worker of the runtime, so one payload's copy into the
//! pool overlaps the thread's copy of the next out of the socket (read
//! straight into its buffer). The rest (FUA, FLUSH, trims, replicated
//! writes) runs on the connection's thread when nothing else is
//! outstanding and nothing more is buffered (nothing to overlap with),
//! else on a worker too, at most [`MAX_IN_FLIGHT`] at a time
//! (backpressure: the thread reads nothing more while that many are
//! outstanding); a worker sends its reply itself. Big payload and reply
//! buffers are reused per connection.
//!
//! Invariants:
//! - nothing a client sends panics the server: malformed options get an
//!   option error, malformed requests an NBD error, and input that leaves
//!   the stream unparseable (bad magic, a write payload over
//!   [`proto::MAX_PAYLOAD`]) a hard disconnect;
//! - a reply is sent only after the operation completed (and, with FUA or
//!   for FLUSH, after it is durable); on `NBD_CMD_DISC` every in-flight
//!   request is answered before the socket closes;
//! - `CAN_MULTI_CONN` is advertised because it holds: all connections
//!   share one pool, and a FLUSH syncs the whole backing store;
//! - every WRITE, TRIM, WRITE_ZEROES and FLUSH passes through the
//!   volume's attachment ([`Attachments`]): on a primary it is answered
//!   only after every peer's [`Replicator`] confirmed it (protocol C); on
//!   a secondary a change is refused with `EPERM` (reads and FLUSH are
//!   served: a live-migration target opens its disk before it is
//!   promoted).

pub mod proto;

use std::io;
use std::path::Path;
use std::sync::Arc;

use std::io::{BufRead as _, Read as _, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};

use crate::pipe::{Fill, Pipe};
use crate::pool::{Extent, Pool, PoolError, Volume, ZeroFlags};
use crate::replication::attach::{AttachOptions, Attachments, Role, Slot};
use crate::replication::book::ReplicaBook;
use crate::replication::{Op, ReplicationError, Replicator};
use proto::{Request, cflag, cmd, errno, info, opt, rep, reply, tflag};

/// Requests one connection may have outstanding.
pub const MAX_IN_FLIGHT: usize = 64;
/// Requests one inline batch may hold.
const MAX_BATCH: usize = 64;
/// Payload bytes (read or written) after which a batch stops growing.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// The largest read or write that runs inline.
const QUICK_MAX_LEN: u32 = 64 << 10;
/// Options one connection may send before it must choose an export.
const MAX_OPTIONS: usize = 1000;
/// Bytes of replies gathered before a send.
const REPLY_BUFFER: usize = 256 << 10;
/// Buffers (write payloads, read replies) at least this big are kept for
/// reuse by their connection: a fresh one costs a zero fill and, from the
/// allocator, a page fault per page.
const RECYCLE_MIN: usize = 128 << 10;
/// Buffers over this size are never kept.
const RECYCLE_MAX: usize = (2 << 20) + 64;
/// Buffers one connection keeps for reuse.
const RECYCLE_KEEP: usize = 8;

/// A connection's big buffers, kept for reuse (see [`RECYCLE_MIN`]).
#[derive(Debug, Default)]
struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn free(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A buffer of `len` bytes; its contents are unspecified.
    fn take(&self, len: usize) -> Vec<u8> {
        if len >= RECYCLE_MIN {
            let mut free = self.free();
            if let Some(i) = free.iter().position(|b| b.capacity() >= len) {
                let mut b = free.swap_remove(i);
                drop(free);
                // Zero-fills only bytes past the buffer's last length.
                b.resize(len, 0);
                return b;
            }
        }
        vec![0u8; len]
    }

    /// Hands `b` back once its bytes are no longer needed.
    fn give(&self, b: Vec<u8>) {
        if (RECYCLE_MIN..=RECYCLE_MAX).contains(&b.capacity()) {
            let mut free = self.free();
            if free.len() < RECYCLE_KEEP {
                free.push(b);
            }
        }
    }
}

/// A connection's pipes for big writes ([`crate::pipe`]), kept for reuse;
/// once the kernel refuses one, the connection buffers its writes.
#[derive(Debug, Default)]
struct Pipes {
    free: std::sync::Mutex<Vec<Pipe>>,
    refused: std::sync::atomic::AtomicBool,
}

impl Pipes {
    fn free(&self) -> std::sync::MutexGuard<'_, Vec<Pipe>> {
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An empty pipe that holds at least `len` bytes, if pipes work here.
    /// One too small for `len` stays in the pool: a payload bigger than
    /// any pipe is buffered without making and closing one each time.
    fn take(&self, len: usize) -> Option<Pipe> {
        use std::sync::atomic::Ordering;
        let popped = self.free().pop();
        let pipe = match popped {
            Some(p) => p,
            None if self.refused.load(Ordering::Relaxed) => return None,
            None => match Pipe::new() {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for big writes: buffering them");
                    self.refused.store(true, Ordering::Relaxed);
                    return None;
                }
            },
        };
        if pipe.size() >= len {
            return Some(pipe);
        }
        self.give(pipe);
        None
    }

    /// Keeps `p` for the next write if nothing is left in it.
    fn give(&self, p: Pipe) {
        if p.is_empty().unwrap_or(false) {
            let mut free = self.free();
            if free.len() < RECYCLE_KEEP {
                free.push(p);
            }
        }
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The socket failed or closed.
    #[error("connection lost")]
    Io(#[from] io::Error),
    /// The client broke the protocol in a way that cannot be answered.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Serves the volumes of one pool.
#[derive(Debug, Clone)]
pub struct Server {
    pool: Pool,
    attachments: Arc<Attachments>,
}

impl Server {
    /// A server for every volume of `pool`, none of them replicated.
    pub fn new(pool: Pool) -> Server {
        Server::with_replication(pool, Vec::new())
    }

    /// A server for every volume of `pool`, where the volumes of
    /// `replicators` ship their writes to a peer (grouped by volume).
    pub fn with_replication(pool: Pool, replicators: Vec<Replicator>) -> Server {
        let book = Arc::new(ReplicaBook::in_memory(0));
        let attachments = Attachments::new(pool.clone(), book, AttachOptions::default());
        let mut by_volume: Vec<(String, u64, Vec<Replicator>)> = Vec::new();
        for r in replicators {
            let name = r.volume().name().to_owned();
            match by_volume.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, _, rs)) => rs.push(r),
                None => by_volume.push((name, r.epoch(), vec![r])),
            }
        }
        for (name, epoch, rs) in by_volume {
            attachments.adopt(&name, epoch, rs);
        }
        Server::with_attachments(Arc::new(attachments))
    }

    /// A server for every volume of `attachments`' pool, each written as
    /// its attachment says.
    pub fn with_attachments(attachments: Arc<Attachments>) -> Server {
        Server {
            pool: attachments.pool().clone(),
            attachments,
        }
    }

    fn session(&self, volume: Volume, structured: bool, meta: bool) -> Session {
        let slot = self.attachments.slot(volume.name());
        Session::new(volume, structured, meta, slot)
    }

    /// Accepts TCP clients forever.
    pub async fn serve_tcp(self, listener: TcpListener) -> io::Result<()> {
        loop {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.handle(stream).await {
                    tracing::debug!(%peer, error = %e, "NBD session ended");
                }
            });
        }
    }

    /// Accepts Unix-socket clients forever.
    pub async fn serve_unix(self, listener: UnixListener) -> io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.handle(stream).await {
                    tracing::debug!(error = %e, "NBD session ended");
                }
            });
        }
    }

    /// Binds a Unix socket at `path`, replacing a stale socket file.
    pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        UnixListener::bind(path)
    }

    /// Runs one session on a connected stream to its end: the handshake
    /// on this task, the transmission phase on a thread of its own with
    /// the socket in blocking mode (see the module's docs).
    pub async fn handle<S: Socket>(&self, stream: S) -> Result<(), SessionError> {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(64 << 10, rd);
        let mut wr = BufWriter::with_capacity(4 << 10, wr);
        let Some(session) = self.negotiate(&mut rd, &mut wr).await? else {
            return Ok(());
        };
        // Requests the client sent right behind its last option.
        let early = rd.buffer().to_vec();
        wr.flush().await?;
        let socket = rd.into_inner().unsplit(wr.into_inner()).into_blocking()?;
        let workers = tokio::runtime::Handle::current();
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("nbd-session".into())
            .spawn(move || {
                let run =
                    std::panic::AssertUnwindSafe(|| transmission(session, socket, early, &workers));
                let _ = done.send(std::panic::catch_unwind(run));
            })?;
        match finished.await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => Err(SessionError::Protocol("the session thread vanished".into())),
        }
    }

    /// Runs one session whose client sends exactly `input` and then
    /// closes its side; returns everything the server sent. For fuzzing
    /// and property tests of the whole protocol path (over a Unix socket
    /// pair, as a real client's session runs).
    pub async fn replay(&self, input: &[u8]) -> Vec<u8> {
        let Ok((client, server)) = std::os::unix::net::UnixStream::pair() else {
            return Vec::new();
        };
        let Ok(server) = server
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(server))
        else {
            return Vec::new();
        };
        let this = self.clone();
        let session = tokio::spawn(async move { this.handle(server).await });
        // The client's side blocks on threads of its own, and its sends
        // raise no SIGPIPE when the server has hung up first.
        let client = BlockingSocket(Inner::Unix(client));
        let input = input.to_vec();
        let feed = client.try_clone().map(|mut wr| {
            tokio::task::spawn_blocking(move || {
                let _ = wr.write_all(&input);
                let _ = wr.shutdown_write();
            })
        });
        let mut rd = client;
        let out = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out);
            out
        })
        .await
        .unwrap_or_default();
        if let Ok(feed) = feed {
            let _ = feed.await;
        }
        if let Err(e) = session.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        out
    }

    fn find(&self, name: &str) -> Option<Volume> {
        if name.is_empty() {
            let all = self.pool.list();
            return match all.as_slice() {
                [only] => self.pool.open_volume(&only.name).ok(),
                _ => None,
            };
        }
        self.pool.open_volume(name).ok()
    }

    /// The handshake; `None` when the client ended it (ABORT).
    async fn negotiate<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Session>, SessionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        wr.write_all(&proto::NBD_MAGIC.to_be_bytes()).await?;
        wr.write_all(&proto::IHAVEOPT.to_be_bytes()).await?;
        wr.write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())
            .await?;
        wr.flush().await?;
        let client_flags = rd.read_u32().await?;
        if client_flags & !proto::CLIENT_FLAGS_KNOWN != 0 {
            return Err(SessionError::Protocol(format!(
                "unknown client flags {client_flags:#x}"
            )));
        }
        let no_zeroes = client_flags & proto::CLIENT_NO_ZEROES != 0;
        let mut structured = false;
        let mut meta_export: Option<String> = None;
        for _ in 0..MAX_OPTIONS {
            let magic = rd.read_u64().await?;
            if magic != proto::IHAVEOPT {
                return Err(SessionError::Protocol(format!(
                    "bad option magic {magic:#x}"
                )));
            }
            let option = rd.read_u32().await?;
            let len = rd.read_u32().await?;
            if len > proto::MAX_OPTION {
                return Err(SessionError::Protocol(format!(
                    "option {option} of {len} bytes is too large"
                )));
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            let send = |kind: u32, payload: &[u8]| proto::option_reply(option, kind, payload);
            match option {
                opt::EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let Some(volume) = self.find(&name) else {
                        // This option has no error reply: close.
                        return Err(SessionError::Protocol(format!("unknown export {name:?}")));
                    };
                    let (size, ro) = volume.geometry().map_err(pool_gone)?;
                    wr.write_all(&size.to_be_bytes()).await?;
                    wr.write_all(&transmission_flags(ro, structured).to_be_bytes())
                        .await?;
                    if !no_zeroes {
                        wr.write_all(&[0u8; 124]).await?;
                    }
                    wr.flush().await?;
                    let meta = meta_export.as_deref() == Some(name.as_str());
                    return Ok(Some(self.session(volume, structured, meta)));
                }
                opt::ABORT => {
                    wr.write_all(&send(rep::ACK, &[])).await?;
                    wr.flush().await?;
                    return Ok(None);
                }
                opt::LIST => {
                    if !data.is_empty() {
                        wr.write_all(&send(rep::ERR_INVALID, b"LIST takes no data"))
                            .await?;
                    } else {
                        for v in self.pool.list() {
                            let mut p = (v.name.len() as u32).to_be_bytes().to_vec();
                            p.extend_from_slice(v.name.as_bytes());
                            wr.write_all(&send(rep::SERVER, &p)).await?;
                        }
                        wr.write_all(&send(rep::ACK, &[])).await?;
                    }
                }
                opt::STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        wr.write_all(&send(rep::ERR_INVALID, b"takes no data"))
                            .await?;
                    } else {
                        structured = true;
                        wr.write_all(&send(rep::ACK, &[])).await?;
                    }
                }
                opt::INFO | opt::GO => {
                    let Ok((name, wanted)) = proto::parse_info_request(&data) else {
                        wr.write_all(&send(rep::ERR_INVALID, b"malformed request"))
                            .await?;
                        wr.flush().await?;
                        continue;
                    };
                    let Some(volume) = self.find(&name) else {
                        let msg = format!("no export named {name:?}");
                        wr.write_all(&send(rep::ERR_UNKNOWN, msg.as_bytes()))
                            .await?;
                        wr.flush().await?;
                        continue;
                    };
                    let (size, ro) = volume.geometry().map_err(pool_gone)?;
                    let mut export = info::EXPORT.to_be_bytes().to_vec();
                    export.extend_from_slice(&size.to_be_bytes());
                    export.extend_from_slice(&transmission_flags(ro, structured).to_be_bytes());
                    wr.write_all(&send(rep::INFO, &export)).await?;
                    if wanted.contains(&info::NAME) {
                        let mut p = info::NAME.to_be_bytes().to_vec();
                        p.extend_from_slice(volume.name().as_bytes());
                        wr.write_all(&send(rep::INFO, &p)).await?;
                    }
                    if wanted.contains(&info::DESCRIPTION) {
                        let mut p = info::DESCRIPTION.to_be_bytes().to_vec();
                        p.extend_from_slice(format!("basalt volume {}", volume.uid()).as_bytes());
                        wr.write_all(&send(rep::INFO, &p)).await?;
                    }
                    let mut bs = info::BLOCK_SIZE.to_be_bytes().to_vec();
                    bs.extend_from_slice(&1u32.to_be_bytes());
                    bs.extend_from_slice(&proto::PREFERRED_BLOCK.to_be_bytes());
                    bs.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
                    wr.write_all(&send(rep::INFO, &bs)).await?;
                    wr.write_all(&send(rep::ACK, &[])).await?;
                    wr.flush().await?;
                    if option == opt::GO {
                        let meta = meta_export.as_deref() == Some(name.as_str());
                        return Ok(Some(self.session(volume, structured, meta)));
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    let set = option == opt::SET_META_CONTEXT;
                    if set && !structured {
                        wr.write_all(&send(
                            rep::ERR_INVALID,
                            b"negotiate structured replies first",
                        ))
                        .await?;
                    } else {
                        match proto::parse_meta_request(&data) {
                            Err(_) => {
                                wr.write_all(&send(rep::ERR_INVALID, b"malformed request"))
                                    .await?
                            }
                            Ok((name, _)) if self.find(&name).is_none() => {
                                let msg = format!("no export named {name:?}");
                                wr.write_all(&send(rep::ERR_UNKNOWN, msg.as_bytes()))
                                    .await?;
                            }
                            Ok((name, queries)) => {
                                let selected = if queries.is_empty() {
                                    !set
                                } else {
                                    queries.iter().any(|q| proto::query_matches(q, !set))
                                };
                                if set {
                                    meta_export = selected.then_some(name);
                                }
                                if selected {
                                    let mut p = proto::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                                    p.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                                    wr.write_all(&send(rep::META_CONTEXT, &p)).await?;
                                }
                                wr.write_all(&send(rep::ACK, &[])).await?;
                            }
                        }
                    }
                }
                opt::STARTTLS => {
                    wr.write_all(&send(rep::ERR_UNSUP, b"TLS is not offered"))
                        .await?;
                }
                other => {
                    let msg = format!("option {other} is not supported");
                    wr.write_all(&send(rep::ERR_UNSUP, msg.as_bytes())).await?;
                }
            }
            wr.flush().await?;
        }
        Err(SessionError::Protocol("too many options".into()))
    }
}

fn pool_gone(e: PoolError) -> SessionError {
    SessionError::Protocol(format!("export vanished: {e}"))
}

fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_TRIM
        | tflag::SEND_WRITE_ZEROES
        | tflag::CAN_MULTI_CONN
        | tflag::SEND_CACHE
        | tflag::SEND_FAST_ZERO;
    if read_only {
        f |= tflag::READ_ONLY;
    }
    if structured {
        f |= tflag::SEND_DF;
    }
    f
}

/// What the handshake settled.
#[derive(Debug)]
struct Session {
    volume: Volume,
    structured: bool,
    meta_context: bool,
    slot: Arc<Slot>,
    buffers: Buffers,
    pipes: Pipes,
}

impl Session {
    fn new(volume: Volume, structured: bool, meta_context: bool, slot: Arc<Slot>) -> Session {
        Session {
            volume,
            structured,
            meta_context: structured && meta_context,
            slot,
            buffers: Buffers::default(),
            pipes: Pipes::default(),
        }
    }

    /// Runs a change as the volume's attachment says: locally, locally and
    /// on every peer, or not at all (a secondary: `EPERM`). Any other
    /// replication failure is an I/O error to the client.
    fn replicated(
        &self,
        op: Op<'_>,
        local: impl FnOnce() -> Result<(), PoolError>,
    ) -> Result<(), PoolError> {
        self.slot.submit(op, local).map_err(|e| match e {
            ReplicationError::Local(e) => e,
            ReplicationError::NotPrimary { volume } => PoolError::ReadOnly { name: volume },
            other => PoolError::Io {
                op: "replicating",
                source: io::Error::other(other.to_string()),
            },
        })
    }

    /// Whether `req` runs inline in a batch: a plain read of at most
    /// [`QUICK_MAX_LEN`] (pool reads are page-cache copies), or such a
    /// write while the volume has no peer to wait for. FUA, FLUSH, trims and replicated writes wait on the
    /// disk or the network and go to blocking workers, so they overlap.
    fn quick(&self, req: &Request) -> bool {
        if req.length > QUICK_MAX_LEN {
            // Big copies are better spread over the blocking workers.
            return false;
        }
        match req.kind {
            // A detached disk's reads wait on a peer.
            cmd::READ => req.flags == 0 && !self.slot.diskless(),
            cmd::WRITE => {
                req.flags == 0 && matches!(self.slot.role(), None | Some(Role::Standalone))
            }
            _ => false,
        }
    }

    /// Whether `req`'s payload may wait in a pipe ([`crate::pipe`])
    /// instead of a buffer: a big plain (or FUA) write while the volume
    /// has no peer that needs its bytes. [`Session::write_piped`] checks
    /// the role again when it runs.
    fn pipeable(&self, req: &Request) -> bool {
        req.kind == cmd::WRITE
            && req.length > QUICK_MAX_LEN
            && req.flags & !cflag::FUA == 0
            && matches!(self.slot.role(), None | Some(Role::Standalone))
    }

    /// Runs a write whose payload waits, whole, in `pipe`, and returns the
    /// reply bytes.
    fn write_piped(&self, req: Request, pipe: &Pipe) -> Vec<u8> {
        let fua = req.flags & cflag::FUA != 0;
        let len = req.length as usize;
        let written = self
            .slot
            .submit_unreplicated(|| self.volume.write_piped(req.offset, pipe, len, fua));
        match written {
            Some(Ok(())) => self.ok_reply(req.cookie),
            Some(Err(e)) => self.error_reply(req.cookie, Self::errno(&e, true), &e.to_string()),
            None => {
                // The volume became a primary or a secondary since the
                // payload arrived: its write goes the ordinary way.
                let mut payload = self.buffers.take(len);
                match pipe.read_exact(&mut payload) {
                    Ok(()) => self.execute(req, payload),
                    Err(e) => self.error_reply(
                        req.cookie,
                        errno::EIO,
                        &format!("taking a write out of its pipe: {e}"),
                    ),
                }
            }
        }
    }

    /// The NBD error for a pool error.
    fn errno(e: &PoolError, writing: bool) -> u32 {
        match e {
            PoolError::ReadOnly { .. } => errno::EPERM,
            PoolError::OutOfRange { .. } if writing => errno::ENOSPC,
            PoolError::OutOfRange { .. } => errno::EINVAL,
            PoolError::NotFast => errno::ENOTSUP,
            PoolError::VolumeGone { .. } => errno::ESHUTDOWN,
            _ => errno::EIO,
        }
    }

    fn error_reply(&self, cookie: u64, error: u32, message: &str) -> Vec<u8> {
        if self.structured {
            proto::structured_error(cookie, error, message)
        } else {
            proto::simple_reply(error, cookie)
        }
    }

    fn ok_reply(&self, cookie: u64) -> Vec<u8> {
        proto::simple_reply(0, cookie)
    }

    /// Runs one request (blocking pool I/O) and returns the reply bytes.
    fn execute(&self, req: Request, payload: Vec<u8>) -> Vec<u8> {
        let reply = self.run(req, &payload);
        self.buffers.give(payload);
        reply
    }

    fn run(&self, req: Request, payload: &[u8]) -> Vec<u8> {
        let cookie = req.cookie;
        let Some(allowed) = proto::allowed_flags(req.kind, self.structured) else {
            return self.error_reply(
                cookie,
                errno::EINVAL,
                &format!("unknown command {}", req.kind),
            );
        };
        if req.flags & !allowed != 0 {
            return self.error_reply(
                cookie,
                errno::EINVAL,
                &format!("flags {:#x} not valid for command {}", req.flags, req.kind),
            );
        }
        let fua = req.flags & cflag::FUA != 0;
        let vol = &self.volume;
        let (off, len) = (req.offset, u64::from(req.length));
        let result = match req.kind {
            cmd::READ => return self.read(req),
            cmd::WRITE => self.replicated(
                Op::Write {
                    offset: off,
                    data: payload,
                    fua,
                },
                || vol.write(off, payload, fua),
            ),
            cmd::FLUSH => self.replicated(Op::Flush, || vol.flush()),
            cmd::TRIM => self.replicated(
                Op::Trim {
                    offset: off,
                    len: req.length,
                    fua,
                },
                || vol.trim(off, len, fua),
            ),
            cmd::WRITE_ZEROES => {
                let flags = ZeroFlags {
                    no_hole: req.flags & cflag::NO_HOLE != 0,
                    fast: req.flags & cflag::FAST_ZERO != 0,
                    fua,
                };
                self.replicated(
                    Op::WriteZeroes {
                        offset: off,
                        len: req.length,
                        no_hole: flags.no_hole,
                        fua,
                    },
                    || vol.write_zeroes(off, len, flags),
                )
            }
            cmd::CACHE => vol.allocation(off, len).map(|_| ()),
            cmd::BLOCK_STATUS => return self.block_status(req),
            _ => Ok(()),
        };
        match result {
            Ok(()) => self.ok_reply(cookie),
            Err(e) => {
                let writing = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
                self.error_reply(cookie, Self::errno(&e, writing), &e.to_string())
            }
        }
    }

    /// A successful read's reply with room for its data after the
    /// returned header length; `None` for an empty structured read.
    fn read_reply(&self, req: &Request) -> Option<(Vec<u8>, usize)> {
        let len = req.length as usize;
        if self.structured {
            if len == 0 {
                return None;
            }
            let head = proto::STRUCTURED_HEADER_LEN + 8;
            let mut out = self.buffers.take(head + len);
            out[..proto::STRUCTURED_HEADER_LEN].copy_from_slice(&proto::structured_header(
                reply::FLAG_DONE,
                reply::OFFSET_DATA,
                req.cookie,
                (8 + len) as u32,
            ));
            out[proto::STRUCTURED_HEADER_LEN..head].copy_from_slice(&req.offset.to_be_bytes());
            Some((out, head))
        } else {
            let mut out = self.buffers.take(16 + len);
            out[..16].copy_from_slice(&proto::simple_reply(0, req.cookie));
            Some((out, 16))
        }
    }

    /// Appends the reply to a quick read to `out` when the page cache
    /// answers it without waiting (see [`Volume::read_cached`]); `false`,
    /// `out` unchanged, when it must go the blocking way (which also
    /// answers any error).
    fn read_cached_into(&self, req: &Request, out: &mut Vec<u8>) -> bool {
        if req.kind != cmd::READ || req.flags != 0 || req.length > QUICK_MAX_LEN {
            return false;
        }
        if self.slot.diskless() {
            // A detached disk's reads go to a peer.
            return false;
        }
        let len = req.length as usize;
        let start = out.len();
        if self.structured {
            if len == 0 {
                return false;
            }
            let head = proto::STRUCTURED_HEADER_LEN + 8;
            out.extend_from_slice(&proto::structured_header(
                reply::FLAG_DONE,
                reply::OFFSET_DATA,
                req.cookie,
                (8 + len) as u32,
            ));
            out.extend_from_slice(&req.offset.to_be_bytes());
            debug_assert_eq!(out.len(), start + head);
        } else {
            out.extend_from_slice(&proto::simple_reply(0, req.cookie));
        }
        let data = out.len();
        out.resize(data + len, 0);
        match self.volume.read_cached(req.offset, &mut out[data..]) {
            Ok(true) => true,
            _ => {
                out.truncate(start);
                false
            }
        }
    }

    /// Sends the reply to a plain read straight from the page cache
    /// ([`Volume::read_resident`]) when every byte is there and no lock
    /// is busy; `Ok(false)`, nothing sent, otherwise (the ordinary path
    /// then answers, errors included). An error is the socket's.
    fn send_resident(&self, req: &Request, replies: &Replies) -> io::Result<bool> {
        if req.kind != cmd::READ
            || req.flags != 0
            || req.length == 0
            || req.length > proto::MAX_PAYLOAD
            || self.slot.diskless()
        {
            return Ok(false);
        }
        let len = req.length as usize;
        let mut head = Vec::with_capacity(proto::STRUCTURED_HEADER_LEN + 8);
        if self.structured {
            head.extend_from_slice(&proto::structured_header(
                reply::FLAG_DONE,
                reply::OFFSET_DATA,
                req.cookie,
                (8 + len) as u32,
            ));
            head.extend_from_slice(&req.offset.to_be_bytes());
        } else {
            head.extend_from_slice(&proto::simple_reply(0, req.cookie));
        }
        match self
            .volume
            .read_resident(req.offset, u64::from(req.length), |data| {
                replies.send_vectored(&head, data)
            }) {
            Ok(Some(sent)) => sent.map(|()| true),
            Ok(None) | Err(_) => Ok(false),
        }
    }

    fn read(&self, req: Request) -> Vec<u8> {
        let cookie = req.cookie;
        if req.length > proto::MAX_PAYLOAD {
            return self.error_reply(cookie, errno::EINVAL, "read larger than 32 MiB");
        }
        let Some((mut out, head)) = self.read_reply(&req) else {
            return proto::structured_header(reply::FLAG_DONE, reply::NONE, cookie, 0).to_vec();
        };
        match self.slot.read(req.offset, &mut out[head..], |b| {
            self.volume.read(req.offset, b)
        }) {
            Ok(()) => out,
            Err(e) => {
                self.buffers.give(out);
                self.error_reply(cookie, Self::errno(&e, false), &e.to_string())
            }
        }
    }

    fn block_status(&self, req: Request) -> Vec<u8> {
        let cookie = req.cookie;
        if !self.meta_context {
            return self.error_reply(cookie, errno::EINVAL, "no metadata context negotiated");
        }
        let extents = if self.slot.diskless() {
            // Detached, or copying back: the local map does not know what
            // only a peer holds, so a hole here may be data there. All of
            // it is reported as data: a client that skips holes (qemu-img
            // convert, compare) then reads it, from the peer.
            vec![Extent {
                len: u64::from(req.length),
                allocated: true,
            }]
        } else {
            match self.volume.allocation(req.offset, u64::from(req.length)) {
                Ok(e) => e,
                Err(e) => return self.error_reply(cookie, Self::errno(&e, false), &e.to_string()),
            }
        };
        let one = req.flags & cflag::REQ_ONE != 0;
        let mut payload = proto::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        for e in &extents {
            let state = if e.allocated {
                0
            } else {
                proto::STATE_HOLE | proto::STATE_ZERO
            };
            payload.extend_from_slice(&(e.len as u32).to_be_bytes());
            payload.extend_from_slice(&state.to_be_bytes());
            if one {
                break;
            }
        }
        if extents.is_empty() {
            // A zero-length query still gets one descriptor.
            payload.extend_from_slice(&0u32.to_be_bytes());
            payload.extend_from_slice(&0u32.to_be_bytes());
        }
        let mut out = proto::structured_header(
            reply::FLAG_DONE,
            reply::BLOCK_STATUS,
            cookie,
            payload.len() as u32,
        )
        .to_vec();
        out.extend_from_slice(&payload);
        out
    }
}

/// A stream a session can run on: a TCP or Unix socket, whose
/// transmission phase runs on a thread in blocking mode.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static + sealed::Sealed {
    /// The same socket, deregistered from the runtime and blocking.
    fn into_blocking(self) -> io::Result<BlockingSocket>;
}

mod sealed {
    /// Only this module's socket types are [`super::Socket`]s.
    pub trait Sealed {}
    impl Sealed for tokio::net::TcpStream {}
    impl Sealed for tokio::net::UnixStream {}
}

impl Socket for tokio::net::TcpStream {
    fn into_blocking(self) -> io::Result<BlockingSocket> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(BlockingSocket(Inner::Tcp(s)))
    }
}

impl Socket for tokio::net::UnixStream {
    fn into_blocking(self) -> io::Result<BlockingSocket> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(BlockingSocket(Inner::Unix(s)))
    }
}

/// A connected socket in blocking mode. Its writes never raise SIGPIPE
/// (a peer that hung up is an `EPIPE` error).
#[derive(Debug)]
pub struct BlockingSocket(Inner);

#[derive(Debug)]
enum Inner {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl BlockingSocket {
    fn try_clone(&self) -> io::Result<BlockingSocket> {
        Ok(BlockingSocket(match &self.0 {
            Inner::Tcp(s) => Inner::Tcp(s.try_clone()?),
            Inner::Unix(s) => Inner::Unix(s.try_clone()?),
        }))
    }

    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.as_fd().as_raw_fd()
    }

    fn shutdown_write(&self) -> io::Result<()> {
        match &self.0 {
            Inner::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Inner::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }
}

impl std::os::fd::AsFd for BlockingSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.0 {
            Inner::Tcp(s) => s.as_fd(),
            Inner::Unix(s) => s.as_fd(),
        }
    }
}

impl io::Read for BlockingSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            Inner::Tcp(s) => s.read(buf),
            Inner::Unix(s) => s.read(buf),
        }
    }
}

impl io::Write for BlockingSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            // The standard library sends with MSG_NOSIGNAL on TCP.
            Inner::Tcp(s) => s.write(buf),
            Inner::Unix(s) => loop {
                // SAFETY: the pointer and length describe `buf`, which
                // outlives the call; the fd is open for `s`'s lifetime.
                let n = unsafe {
                    libc::send(
                        s.as_raw_fd(),
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                if n >= 0 {
                    return Ok(n as usize);
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            },
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Requests handed to workers and not yet answered, bounded by
/// [`MAX_IN_FLIGHT`].
#[derive(Debug, Default)]
struct InFlight {
    count: std::sync::Mutex<usize>,
    changed: std::sync::Condvar,
}

impl InFlight {
    fn count(&self) -> std::sync::MutexGuard<'_, usize> {
        self.count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_idle(&self) -> bool {
        *self.count() == 0
    }

    /// Waits for room, then counts one more request in flight; the
    /// ticket counts it out when dropped (also when its worker never
    /// runs: a runtime shutting down drops it unrun).
    fn enter(self: &Arc<InFlight>) -> Ticket {
        let mut n = self.count();
        while *n >= MAX_IN_FLIGHT {
            n = self
                .changed
                .wait(n)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *n += 1;
        Ticket(self.clone())
    }

    /// Waits until every request in flight was answered.
    fn wait_idle(&self) {
        let mut n = self.count();
        while *n > 0 {
            n = self
                .changed
                .wait(n)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// One request in flight (see [`InFlight::enter`]).
#[derive(Debug)]
struct Ticket(Arc<InFlight>);

impl Drop for Ticket {
    fn drop(&mut self) {
        *self.0.count() -= 1;
        self.0.changed.notify_all();
    }
}

/// The sending side of a connection, shared by its thread and its
/// workers: each reply (or batch of replies) leaves in one locked send.
#[derive(Debug)]
struct Replies(std::sync::Mutex<BlockingSocket>);

impl Replies {
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .write_all(bytes)
    }

    /// Sends `head` and then the memory `data` describes, all of it, as
    /// one reply.
    fn send_vectored(&self, head: &[u8], data: &[libc::iovec]) -> io::Result<()> {
        let mut iov = Vec::with_capacity(data.len() + 1);
        iov.push(libc::iovec {
            iov_base: head.as_ptr().cast_mut().cast(),
            iov_len: head.len(),
        });
        iov.extend_from_slice(data);
        let socket = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut first = 0usize;
        while first < iov.len() {
            let rest = &mut iov[first..];
            // SAFETY: an all-zero msghdr is valid (no name, no control).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = rest.as_mut_ptr();
            msg.msg_iovlen = rest.len().min(1024);
            // SAFETY: every iovec describes memory that stays valid for
            // the call (`head`, and `data`, which the caller keeps mapped
            // and locked); the kernel only reads it.
            let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            // Skip what was sent.
            let mut n = n as usize;
            while n > 0 {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `n` is less than the vector's length, so the
                    // new base stays inside the memory it describes.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                    v.iov_len -= n;
                    n = 0;
                }
            }
            while first < iov.len() && iov[first].iov_len == 0 {
                first += 1;
            }
        }
        Ok(())
    }
}

type Reader = std::io::BufReader<std::io::Chain<std::io::Cursor<Vec<u8>>, BlockingSocket>>;

/// Fills `payload` from the connection: what `rd` already buffered, then
/// the rest straight from the socket into `payload` (a big payload
/// through `rd`'s buffer would be copied twice, and its last read would
/// take the next requests' bytes along).
fn read_payload(rd: &mut Reader, payload: &mut [u8]) -> io::Result<()> {
    let buffered = rd.buffer().len().min(payload.len());
    payload[..buffered].copy_from_slice(&rd.buffer()[..buffered]);
    rd.consume(buffered);
    let rest = &mut payload[buffered..];
    if rest.len() < rd.capacity() {
        rd.read_exact(rest)
    } else {
        rd.get_mut().read_exact(rest)
    }
}

/// Moves a `len`-byte payload into `pipe`: what `rd` already buffered,
/// then the rest straight from the socket. [`Fill::Full`] when the pipe
/// fills first: it holds that many bytes and the rest is still unread.
/// `None`, nothing taken, while bytes the handshake read ahead are still
/// to come (they are not the socket's next bytes).
fn fill_pipe(rd: &mut Reader, pipe: &Pipe, len: usize) -> io::Result<Option<Fill>> {
    let early = rd.get_ref().get_ref().0;
    if (early.position() as usize) < early.get_ref().len() {
        return Ok(None);
    }
    let buffered = rd.buffer().len().min(len);
    pipe.push(&rd.buffer()[..buffered])?;
    rd.consume(buffered);
    let socket = rd.get_ref().get_ref().1.as_fd();
    Ok(Some(match pipe.fill_from(socket, len - buffered)? {
        Fill::Done => Fill::Done,
        Fill::Full(n) => Fill::Full(buffered + n),
    }))
}

/// The next request if it is quick and whole (header and any payload) in
/// `rd`'s buffer, consumed from it; anything else stays for the main loop
/// (which also answers a malformed request).
fn take_buffered(rd: &mut Reader, session: &Session) -> Option<(Request, Vec<u8>)> {
    let buf = rd.buffer();
    let head: &[u8; proto::REQUEST_LEN] = buf.get(..proto::REQUEST_LEN)?.try_into().ok()?;
    let req = Request::parse(head).ok()?;
    if !session.quick(&req) {
        return None;
    }
    let payload_len = if req.kind == cmd::WRITE {
        if req.length > proto::MAX_PAYLOAD {
            return None;
        }
        req.length as usize
    } else {
        0
    };
    let bytes = buf.get(proto::REQUEST_LEN..proto::REQUEST_LEN + payload_len)?;
    let mut payload = session.buffers.take(payload_len);
    payload.copy_from_slice(bytes);
    rd.consume(proto::REQUEST_LEN + payload_len);
    Some((req, payload))
}

/// The transmission phase, on the connection's own thread; `early` holds
/// bytes the handshake read past its end.
fn transmission(
    session: Session,
    socket: BlockingSocket,
    early: Vec<u8>,
    workers: &tokio::runtime::Handle,
) -> Result<(), SessionError> {
    let session = Arc::new(session);
    let replies = Arc::new(Replies(std::sync::Mutex::new(socket.try_clone()?)));
    let mut rd: Reader = std::io::BufReader::with_capacity(
        64 << 10,
        io::Read::chain(io::Cursor::new(early), socket),
    );
    let in_flight = Arc::new(InFlight::default());
    let mut batch_out: Vec<u8> = Vec::with_capacity(REPLY_BUFFER);
    let mut pending: Vec<(Request, Vec<u8>)> = Vec::new();
    let result = (|| -> Result<(), SessionError> {
        loop {
            let mut head = [0u8; proto::REQUEST_LEN];
            rd.read_exact(&mut head)?;
            let req = Request::parse(&head)
                .map_err(|e| SessionError::Protocol(format!("request: {e}")))?;
            if req.kind == cmd::DISC {
                return Ok(());
            }
            let mut payload = Vec::new();
            if req.kind == cmd::WRITE {
                if req.length > proto::MAX_PAYLOAD {
                    return Err(SessionError::Protocol(format!(
                        "write payload of {} bytes is too large",
                        req.length
                    )));
                }
                let len = req.length as usize;
                // A big write's payload goes into a pipe, and from there
                // into the pool's file, without a copy through this
                // process (see crate::pipe).
                let mut read = 0;
                if session.pipeable(&req)
                    && let Some(pipe) = session.pipes.take(len)
                {
                    match fill_pipe(&mut rd, &pipe, len)? {
                        Some(Fill::Done) => {
                            // The pipe goes back to the connection's
                            // pool once empty.
                            hand_off(&session, &replies, &in_flight, workers, move |s| {
                                let reply = s.write_piped(req, &pipe);
                                s.pipes.give(pipe);
                                reply
                            });
                            continue;
                        }
                        Some(Fill::Full(n)) => {
                            // The socket's pages filled the pipe first:
                            // take them out and buffer this one.
                            payload = session.buffers.take(len);
                            pipe.read_exact(&mut payload[..n])?;
                            read = n;
                        }
                        None => {}
                    }
                    session.pipes.give(pipe);
                }
                if payload.is_empty() {
                    payload = session.buffers.take(len);
                }
                read_payload(&mut rd, &mut payload[read..])?;
            }
            // A run of quick requests the client already sent (reads, and
            // writes with nothing to replicate) runs right here, its
            // replies gathered into one send. Reads the page cache cannot
            // answer without waiting go to workers, so a miss never holds
            // up the rest.
            if session.quick(&req) {
                let mut next = Some((req, payload));
                let mut bytes = 0usize;
                let mut count = 0usize;
                while let Some((req, payload)) = next.take() {
                    count += 1;
                    bytes += req.length as usize;
                    if req.kind == cmd::READ {
                        if !session.read_cached_into(&req, &mut batch_out) {
                            pending.push((req, payload));
                        }
                    } else {
                        batch_out.extend_from_slice(&session.execute(req, payload));
                    }
                    if count < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                        next = take_buffered(&mut rd, &session);
                    }
                }
                if !batch_out.is_empty() {
                    replies.send(&batch_out)?;
                    batch_out.clear();
                    if batch_out.capacity() > 2 * REPLY_BUFFER {
                        batch_out.shrink_to(REPLY_BUFFER);
                    }
                }
                let lone = pending.len() == 1 && rd.buffer().is_empty() && in_flight.is_idle();
                for (req, payload) in pending.drain(..) {
                    if lone {
                        let reply = session.execute(req, payload);
                        replies.send(&reply)?;
                        session.buffers.give(reply);
                    } else {
                        hand_off(&session, &replies, &in_flight, workers, move |s| {
                            s.execute(req, payload)
                        });
                    }
                }
                continue;
            }
            // A big read the page cache holds leaves straight from it (one
            // copy, into the socket, instead of two).
            if session.send_resident(&req, &replies)? {
                session.buffers.give(payload);
                continue;
            }
            // A lone request (nothing in flight, nothing more buffered)
            // runs here: there is nothing to overlap it with, and a
            // hand-off to a worker and back is most of a queue-depth-1
            // round trip. Never a big write: its payload was just read
            // whole, so the next one is usually still arriving and nothing
            // looks buffered; run here, its copy into the pool would hold
            // up the reading of the next one, and every later big write
            // would look lone too (the stream runs on one thread, one copy
            // after the other).
            let big_write = req.kind == cmd::WRITE && req.length > QUICK_MAX_LEN;
            if !big_write && rd.buffer().is_empty() && in_flight.is_idle() {
                let reply = session.execute(req, payload);
                replies.send(&reply)?;
                session.buffers.give(reply);
                continue;
            }
            hand_off(&session, &replies, &in_flight, workers, move |s| {
                s.execute(req, payload)
            });
        }
    })();
    // Every in-flight request answers before the socket closes.
    in_flight.wait_idle();
    let closed = replies
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .shutdown_write();
    result?;
    // A client that already closed its side may have taken the socket
    // down with it: that is no error.
    if let Err(e) = closed
        && e.kind() != io::ErrorKind::NotConnected
    {
        return Err(e.into());
    }
    Ok(())
}

/// Runs a request on a blocking worker (`run` returns its reply bytes),
/// which sends its reply itself; waits first while [`MAX_IN_FLIGHT`]
/// requests are outstanding (backpressure: the connection reads nothing
/// more meanwhile).
fn hand_off(
    session: &Arc<Session>,
    replies: &Arc<Replies>,
    in_flight: &Arc<InFlight>,
    workers: &tokio::runtime::Handle,
    run: impl FnOnce(&Session) -> Vec<u8> + Send + 'static,
) {
    let ticket = in_flight.enter();
    let session = session.clone();
    let replies = replies.clone();
    workers.spawn_blocking(move || {
        let reply = run(&session);
        // A failed send means the client is gone; the connection's
        // thread sees that on its next read.
        let _ = replies.send(&reply);
        session.buffers.give(reply);
        drop(ticket);
    });
}
