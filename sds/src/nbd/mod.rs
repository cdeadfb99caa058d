//! Basalt's NBD server, on tokio: every volume of a pool is an export
//! (by name or uid), served over TCP or Unix sockets to any number of
//! clients at once.
//!
//! Per connection: the handshake runs inline; in transmission a reader
//! parses requests. Quick ones (plain reads; plain writes of a volume
//! with no peer) run on the reader's task, a run of those the client
//! already sent as one batch answered with one flush (reads the page cache
//! holds are copied right there, `preadv2(RWF_NOWAIT)`; the rest of the
//! batch in one blocking section); the rest go each to a blocking worker
//! (pool I/O is synchronous), at most [`MAX_IN_FLIGHT`] at a time
//! (backpressure: the reader stops reading while that many are
//! outstanding), and a writer task sends their replies in completion
//! order. Big payload and reply buffers are reused per connection.
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

use tokio::io::{
    AsyncBufRead as _, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc};

use crate::pool::{Pool, PoolError, Volume, ZeroFlags};
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

    /// Runs one session on a connected stream to its end.
    pub async fn handle<S>(&self, stream: S) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(64 << 10, rd);
        // Room for a whole batch of small replies: one send each.
        let mut wr = BufWriter::with_capacity(REPLY_BUFFER, wr);
        let Some(session) = self.negotiate(&mut rd, &mut wr).await? else {
            return Ok(());
        };
        transmission(session, rd, wr).await
    }

    /// Runs one session whose client sends exactly `input` and then
    /// closes its side; returns everything the server sent. For fuzzing
    /// and property tests of the whole protocol path.
    pub async fn replay(&self, input: &[u8]) -> Vec<u8> {
        let (client, server) = tokio::io::duplex(256 << 10);
        let this = self.clone();
        let session = tokio::spawn(async move { this.handle(server).await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let input = input.to_vec();
        let feed = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        let _ = feed.await;
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
}

impl Session {
    fn new(volume: Volume, structured: bool, meta_context: bool, slot: Arc<Slot>) -> Session {
        Session {
            volume,
            structured,
            meta_context: structured && meta_context,
            slot,
            buffers: Buffers::default(),
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

    /// The reply to a quick read when the page cache answers it without
    /// waiting (see [`Volume::read_cached`]); `None` when it must go the
    /// blocking way (which also answers any error).
    fn read_cached(&self, req: &Request) -> Option<Vec<u8>> {
        if req.kind != cmd::READ || req.flags != 0 || req.length > QUICK_MAX_LEN {
            return None;
        }
        if self.slot.diskless() {
            // A detached disk's reads go to a peer.
            return None;
        }
        let (mut out, head) = self.read_reply(req)?;
        match self.volume.read_cached(req.offset, &mut out[head..]) {
            Ok(true) => Some(out),
            _ => {
                self.buffers.give(out);
                None
            }
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
        let extents = match self.volume.allocation(req.offset, u64::from(req.length)) {
            Ok(e) => e,
            Err(e) => return self.error_reply(cookie, Self::errno(&e, false), &e.to_string()),
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

/// The next request if it is quick and whole (header and any payload) in
/// `rd`'s buffer, consumed from it; anything else stays for the main loop
/// (which also answers a malformed request).
fn take_buffered<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    session: &Session,
) -> Option<(Request, Vec<u8>)> {
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
    std::pin::Pin::new(rd).consume(proto::REQUEST_LEN + payload_len);
    Some((req, payload))
}

async fn transmission<R, W>(
    session: Session,
    mut rd: BufReader<R>,
    wr: W,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session = Arc::new(session);
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT * 2);
    let writer = {
        let wr = wr.clone();
        let session = session.clone();
        tokio::spawn(async move {
            while let Some(buf) = rx.recv().await {
                let mut wr = wr.lock().await;
                wr.write_all(&buf).await?;
                session.buffers.give(buf);
                // Coalesce replies that are already waiting, then send.
                while let Ok(buf) = rx.try_recv() {
                    wr.write_all(&buf).await?;
                    session.buffers.give(buf);
                }
                wr.flush().await?;
            }
            wr.lock().await.shutdown().await
        })
    };
    // Inline execution needs a runtime that can lend out the worker thread.
    let can_inline = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread;
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let result = async {
        loop {
            let mut head = [0u8; proto::REQUEST_LEN];
            rd.read_exact(&mut head).await?;
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
                payload = session.buffers.take(req.length as usize);
                rd.read_exact(&mut payload).await?;
            }
            // A lone request (nothing in flight, nothing more buffered) runs
            // on this task and answers directly: no hand-off to a blocking
            // thread and back, which is most of a queue-depth-1 round trip.
            // Quick ones take the batch path below: a cached read needs no
            // blocking section at all.
            let lone = can_inline
                && rd.buffer().is_empty()
                && permits.available_permits() == MAX_IN_FLIGHT
                && !session.quick(&req);
            if lone {
                let reply = tokio::task::block_in_place(|| session.execute(req, payload));
                let mut w = wr.lock().await;
                w.write_all(&reply).await?;
                session.buffers.give(reply);
                w.flush().await?;
                continue;
            }
            // A run of quick requests the client already sent (reads, and
            // writes with nothing to replicate) runs here as one batch:
            // the page cache answers them in microseconds, far less than
            // a hand-off to a blocking thread each, and the replies leave
            // with one flush.
            if can_inline && session.quick(&req) {
                let mut batch = vec![(req, payload)];
                let mut bytes = 0usize;
                while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                    let Some((next, next_payload)) = take_buffered(&mut rd, &session) else {
                        break;
                    };
                    bytes += next.length as usize;
                    batch.push((next, next_payload));
                }
                // Reads the page cache holds are answered right here; only
                // the rest (writes, reads that would wait) enter a blocking
                // section, which hands this worker thread's runtime to
                // another thread and costs a wake-up and switches.
                let mut replies: Vec<Option<Vec<u8>>> = batch
                    .iter()
                    .map(|(req, _)| session.read_cached(req))
                    .collect();
                if replies.iter().any(Option::is_none) {
                    tokio::task::block_in_place(|| {
                        for ((req, payload), reply) in batch.into_iter().zip(&mut replies) {
                            if reply.is_none() {
                                *reply = Some(session.execute(req, payload));
                            }
                        }
                    });
                }
                let mut w = wr.lock().await;
                for reply in replies.into_iter().flatten() {
                    w.write_all(&reply).await?;
                    session.buffers.give(reply);
                }
                w.flush().await?;
                continue;
            }
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| SessionError::Protocol("server shutting down".into()))?;
            let session = session.clone();
            let tx = tx.clone();
            tokio::task::spawn_blocking(move || {
                let reply = session.execute(req, payload);
                let _ = tx.blocking_send(reply);
                drop(permit);
            });
        }
    }
    .await;
    // Every in-flight request answers before the socket closes.
    drop(tx);
    let written = writer
        .await
        .map_err(|e| SessionError::Protocol(format!("reply writer failed: {e}")))?;
    result?;
    written?;
    Ok(())
}
