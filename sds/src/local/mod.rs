//! The storage-local API: what a node agent asks of this storage process
//! (ensure, delete, list, resize and snapshot volumes; the NBD address of
//! an export; a volume's replication role — standalone, secondary, or
//! primary with peers; the pool's and replication's status), served as
//! gRPC on a Unix socket (`basaltd storage serve --local-socket PATH`).
//!
//! The service is a thin layer over the [`Pool`]: every call runs the
//! pool's synchronous operation on a blocking thread and maps its error to
//! an [`ApiError`] naming what was wrong. It lives in the same process as
//! the NBD server, so an agent restart (which drops this socket's clients)
//! never cuts a VM's disk.
//!
//! Invariants:
//! - a primary that lost a peer asks the agent watching `watch_fences`
//!   ([`AgentFencer`]) and goes on only on its yes (`answer_fence`);
//! - `ensure_volume`, `delete_volume` and `attach_volume` are idempotent:
//!   an existing volume is returned as is, a missing one deletes nothing,
//!   the same attachment changes nothing;
//! - deleting a volume stops its replication first;
//! - the export name of a volume is its pool name (see
//!   `docs/decisions.md`), served at the address given at start;
//! - nothing a client sends panics the process: requests are validated
//!   by the adapter in `basalt-api`, and the pool checks the rest.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use basalt_api::{
    ApiError, AttachVolume, DiskState, EnsureVolume, FenceAnswer, FenceRequest, FenceStream,
    PeerVerify, ReplicaPeer, ReplicaPeerState, ReplicationProtocol, StorageApi, StorageStatus,
    StorageVolume, VerifyVolume, VolumeAttachment, VolumeExport, VolumeRole, VolumeVerify,
    storage_routes,
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::pool::{Pool, PoolError, VolumeInfo};
use crate::replication::attach::{AttachError, AttachSpec, AttachmentView, Attachments, Role};
use crate::replication::book::ReplicaBook;
use crate::replication::fence::{AgentFencer, FenceVerdict};
use crate::replication::{PeerState, Protocol, ReplicationError, ReplicationStatus};

/// Where this process serves NBD, as the agent's NBD clients (QEMU,
/// `qemu-img`) reach it inside the node.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The NBD server's TCP address.
    pub tcp: SocketAddr,
    /// Its Unix socket, when it has one.
    pub unix: Option<PathBuf>,
    /// Where the replica server accepts primaries, when it runs.
    pub replication: Option<SocketAddr>,
}

/// The storage-local service over one pool.
#[derive(Debug, Clone)]
pub struct LocalService {
    pool: Pool,
    exports: ExportConfig,
    attachments: Arc<Attachments>,
    fencer: AgentFencer,
}

/// The local API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalServeError {
    /// The socket could not be bound.
    #[error("binding the storage-local socket {path}")]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("serving the storage-local API")]
    Serve(#[source] tonic::transport::Error),
}

impl LocalService {
    /// A service for the pool of `attachments` (the same the NBD server
    /// and the replica server use), whose NBD server listens at
    /// `exports`, and whose primaries ask `fencer` (the one in the
    /// attachments' options) to outdate a lost peer: the agent watches its
    /// questions and answers them through this service.
    pub fn new(
        attachments: Arc<Attachments>,
        exports: ExportConfig,
        fencer: AgentFencer,
    ) -> LocalService {
        LocalService {
            pool: attachments.pool().clone(),
            exports,
            attachments,
            fencer,
        }
    }

    /// Binds `path` (replacing a stale socket file) and serves the API on
    /// it until `shutdown` completes.
    pub async fn serve_unix(
        self,
        path: &Path,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), LocalServeError> {
        let bind_err = |source| LocalServeError::Bind {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        tracing::info!(socket = %path.display(), "serving the storage-local API");
        tonic::transport::Server::builder()
            .add_routes(storage_routes(self))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await
            .map_err(LocalServeError::Serve)
    }

    /// Runs a pool operation on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Pool) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || op(&pool))
            .await
            .map_err(|e| ApiError::Internal {
                reason: format!("pool operation panicked: {e}"),
            })?
    }
}

/// `v` as the API's, with whether the replication book holds its copy
/// incomplete.
fn volume(book: &ReplicaBook, v: VolumeInfo) -> StorageVolume {
    StorageVolume {
        incomplete: book.incomplete(&v.name),
        name: v.name,
        uid: v.uid.to_string(),
        size_bytes: v.size,
        allocated_bytes: v.mapped_bytes,
        read_only: v.read_only,
        created_unix: v.created,
    }
}

/// The pool's error as the API's, naming the field or state at fault.
fn api_error(err: PoolError) -> ApiError {
    match err {
        PoolError::InvalidName { .. } => ApiError::invalid("name", err.to_string()),
        PoolError::InvalidSize { .. } | PoolError::Shrink { .. } => {
            ApiError::invalid("size_bytes", err.to_string())
        }
        PoolError::NoVolume { .. }
        | PoolError::VolumeGone { .. }
        | PoolError::VolumeExists { .. }
        | PoolError::ReadOnly { .. }
        | PoolError::OverProvisioned { .. } => ApiError::FailedPrecondition {
            reason: err.to_string(),
        },
        other => ApiError::Internal {
            reason: error_chain(&other),
        },
    }
}

fn replication_error(err: ReplicationError) -> ApiError {
    match err {
        ReplicationError::Local(e) => api_error(e),
        ReplicationError::NotPrimary { .. }
        | ReplicationError::PeerTooOld { .. }
        | ReplicationError::StaleEpoch { .. } => ApiError::FailedPrecondition {
            reason: error_chain(&err),
        },
        other => ApiError::Unavailable {
            reason: error_chain(&other),
        },
    }
}

fn attach_error(err: AttachError) -> ApiError {
    match err {
        AttachError::Volume { ref source, .. } => match source {
            PoolError::NoVolume { .. } | PoolError::InvalidName { .. } => {
                ApiError::FailedPrecondition {
                    reason: error_chain(&err),
                }
            }
            _ => ApiError::Internal {
                reason: error_chain(&err),
            },
        },
        AttachError::StaleEpoch { .. }
        | AttachError::NotAttached { .. }
        | AttachError::Incomplete { .. } => ApiError::FailedPrecondition {
            reason: err.to_string(),
        },
        AttachError::Peer { .. } => ApiError::invalid("peers", error_chain(&err)),
        AttachError::Record { .. } | AttachError::Start { .. } => ApiError::Internal {
            reason: error_chain(&err),
        },
    }
}

fn role_of(role: Role) -> VolumeRole {
    match role {
        Role::Standalone => VolumeRole::Standalone,
        Role::Secondary => VolumeRole::Secondary,
        Role::Primary => VolumeRole::Primary,
    }
}

fn replica_peer(volume: &str, peer: &str, st: &ReplicationStatus) -> ReplicaPeer {
    ReplicaPeer {
        volume: volume.to_owned(),
        peer: peer.to_owned(),
        state: match st.state {
            PeerState::Connected => ReplicaPeerState::Connected,
            PeerState::Resyncing => ReplicaPeerState::Resyncing,
            PeerState::Away => ReplicaPeerState::Away,
            PeerState::SplitBrain => ReplicaPeerState::SplitBrain,
            PeerState::DiskFailed => ReplicaPeerState::DiskFailed,
            PeerState::Deposed { .. } => ReplicaPeerState::Deposed,
        },
        dirty_chunks: st.dirty_chunks,
        resync_bytes: st.resync_bytes + st.full_sync_bytes,
        acked_frames: st.acked_frames,
    }
}

fn protocol_of(protocol: ReplicationProtocol) -> Protocol {
    match protocol {
        ReplicationProtocol::A => Protocol::A,
        ReplicationProtocol::B => Protocol::B,
        ReplicationProtocol::C => Protocol::C,
    }
}

fn attachment(view: AttachmentView) -> VolumeAttachment {
    let (role, epoch) = view
        .spec
        .as_ref()
        .map_or((VolumeRole::Standalone, 0), |s| (role_of(s.role), s.epoch));
    let protocol = match view.spec.as_ref().map(|s| s.protocol) {
        Some(Protocol::A) => ReplicationProtocol::A,
        Some(Protocol::B) => ReplicationProtocol::B,
        Some(Protocol::C) | None => ReplicationProtocol::C,
    };
    VolumeAttachment {
        protocol,
        peers: view
            .peers
            .iter()
            .map(|(p, st)| replica_peer(&view.volume, p, st))
            .collect(),
        name: view.volume,
        role,
        epoch,
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

/// `made`, just made as a snapshot or clone of `source`, marked
/// incomplete in `book` when `source` is: it holds the same torn data, so
/// it serves nothing until a fill or an operator's force (decision 93).
/// A mark that cannot be recorded deletes `made` again.
pub fn made_from(
    pool: &Pool,
    book: &ReplicaBook,
    source: &str,
    made: VolumeInfo,
) -> Result<VolumeInfo, PoolError> {
    if !book.incomplete(source) {
        return Ok(made);
    }
    match book.start_fill(&made.name) {
        Ok(()) => Ok(made),
        Err(e) => {
            let _ = pool.delete(&made.name);
            Err(PoolError::Io {
                op: "marking a copy of an incomplete volume incomplete",
                source: e,
            })
        }
    }
}

fn ensure(
    pool: &Pool,
    book: &ReplicaBook,
    request: &EnsureVolume,
) -> Result<VolumeInfo, PoolError> {
    if let Ok(existing) = pool.volume_info(&request.name) {
        return Ok(existing);
    }
    let created = match &request.source {
        None => pool.create_volume(&request.name, request.size_bytes),
        Some(source) => {
            let src = pool.volume_info(source)?;
            if request.size_bytes != 0 && request.size_bytes < src.size {
                return Err(PoolError::Shrink {
                    name: request.name.clone(),
                    size: src.size,
                    requested: request.size_bytes,
                });
            }
            pool.clone_volume(source, &request.name)
                .and_then(|clone| made_from(pool, book, source, clone))
                .and_then(|clone| {
                    if request.size_bytes > clone.size {
                        pool.resize(&request.name, request.size_bytes)
                    } else {
                        Ok(clone)
                    }
                })
        }
    };
    match created {
        // Another caller created it meanwhile: same outcome.
        Err(PoolError::VolumeExists { .. }) => pool.volume_info(&request.name),
        other => other,
    }
}

impl StorageApi for LocalService {
    async fn ensure_volume(&self, request: EnsureVolume) -> Result<StorageVolume, ApiError> {
        let book = self.attachments.book().clone();
        self.blocking(move |pool| {
            ensure(pool, &book, &request)
                .map(|v| volume(&book, v))
                .map_err(api_error)
        })
        .await
    }

    async fn delete_volume(&self, name: String) -> Result<bool, ApiError> {
        let attachments = self.attachments.clone();
        self.blocking(move |pool| {
            if pool.volume_info(&name).is_ok() {
                attachments.detach(&name);
            }
            match pool.delete(&name) {
                Ok(()) => Ok(true),
                Err(PoolError::NoVolume { .. }) => Ok(false),
                Err(e) => Err(api_error(e)),
            }
        })
        .await
    }

    async fn list_volumes(&self) -> Result<Vec<StorageVolume>, ApiError> {
        let book = self.attachments.book().clone();
        self.blocking(move |pool| Ok(pool.list().into_iter().map(|v| volume(&book, v)).collect()))
            .await
    }

    async fn resize_volume(
        &self,
        name: String,
        size_bytes: u64,
    ) -> Result<StorageVolume, ApiError> {
        let attachments = self.attachments.clone();
        self.blocking(move |_| {
            attachments
                .resize(&name, size_bytes)
                .map(|v| volume(attachments.book(), v))
                .map_err(replication_error)
        })
        .await
    }

    async fn snapshot_volume(
        &self,
        source: String,
        name: String,
    ) -> Result<StorageVolume, ApiError> {
        let book = self.attachments.book().clone();
        self.blocking(move |pool| {
            if let Ok(existing) = pool.volume_info(&name) {
                if !existing.read_only {
                    return Err(ApiError::FailedPrecondition {
                        reason: format!("volume {name} exists and is not a snapshot"),
                    });
                }
                return Ok(volume(&book, existing));
            }
            pool.snapshot(&source, &name)
                .and_then(|made| made_from(pool, &book, &source, made))
                .map(|v| volume(&book, v))
                .map_err(api_error)
        })
        .await
    }

    async fn export_address(&self, name: String) -> Result<VolumeExport, ApiError> {
        let exports = self.exports.clone();
        self.blocking(move |pool| {
            let v = pool.volume_info(&name).map_err(api_error)?;
            Ok(VolumeExport {
                host: exports.tcp.ip().to_string(),
                port: exports.tcp.port(),
                export_name: v.name,
                unix_socket: exports.unix.map(|p| p.to_string_lossy().into_owned()),
            })
        })
        .await
    }

    async fn set_replication_protocol(
        &self,
        name: String,
        protocol: ReplicationProtocol,
    ) -> Result<VolumeAttachment, ApiError> {
        let attachments = self.attachments.clone();
        let protocol = protocol_of(protocol);
        self.blocking(move |_| {
            attachments
                .set_protocol(&name, protocol)
                .map(attachment)
                .map_err(attach_error)
        })
        .await
    }

    async fn attach_volume(&self, request: AttachVolume) -> Result<VolumeAttachment, ApiError> {
        let attachments = self.attachments.clone();
        let spec = AttachSpec {
            role: match request.role {
                VolumeRole::Standalone => Role::Standalone,
                VolumeRole::Secondary => Role::Secondary,
                VolumeRole::Primary => Role::Primary,
            },
            epoch: request.epoch,
            peers: request.peers,
            allow_outdate: request.allow_outdate && request.role == VolumeRole::Primary,
            // Unset: kept from the attachment (as SetReplicationProtocol
            // left it; C for a volume never attached).
            protocol: match request.protocol {
                Some(p) => protocol_of(p),
                None => attachments.protocol(&request.name),
            },
        };
        let (name, force) = (request.name, request.force);
        self.blocking(move |_| {
            if force {
                attachments.attach_forced(&name, spec)
            } else {
                attachments.attach(&name, spec)
            }
            .map(attachment)
            .map_err(attach_error)
        })
        .await
    }

    async fn attach_disk(&self) -> Result<StorageStatus, ApiError> {
        let attachments = self.attachments.clone();
        self.blocking(move |_| {
            attachments
                .attach_disk()
                .map(drop)
                .map_err(|e| ApiError::FailedPrecondition {
                    reason: error_chain(&e),
                })
        })
        .await?;
        self.status().await
    }

    async fn status(&self) -> Result<StorageStatus, ApiError> {
        let replicas = self
            .attachments
            .views()
            .iter()
            .flat_map(|v| v.peers.iter().map(|(p, st)| replica_peer(&v.volume, p, st)))
            .collect();
        let nbd_address = self.exports.tcp.to_string();
        let replication_address = self
            .exports
            .replication
            .map(|a| a.to_string())
            .unwrap_or_default();
        let disk_error = self.attachments.disk().failed();
        self.blocking(move |pool| {
            let st = pool.status();
            Ok(StorageStatus {
                pool_uid: st.uid.to_string(),
                chunk_size: st.chunk_size,
                data_chunks: st.data_chunks,
                free_chunks: st.free_chunks,
                virtual_bytes: st.virtual_bytes,
                virtual_limit: st.virtual_limit,
                volumes: u32::try_from(st.volumes).unwrap_or(u32::MAX),
                suspended_writers: u32::try_from(st.suspended_writers).unwrap_or(u32::MAX),
                replicas,
                nbd_address,
                replication_address,
                disk_state: if disk_error.is_some() {
                    DiskState::Failed
                } else {
                    DiskState::Attached
                },
                disk_error: disk_error.unwrap_or_default(),
            })
        })
        .await
    }

    async fn watch_fences(&self) -> Result<FenceStream, ApiError> {
        tracing::info!("an agent watches fence requests");
        let questions = self.fencer.watch();
        Ok(Box::pin(futures::StreamExt::map(questions, |q| {
            Ok(FenceRequest {
                id: q.id,
                volume: q.volume,
                peer: q.peer.to_string(),
                epoch: q.epoch,
            })
        })))
    }

    async fn answer_fence(&self, answer: FenceAnswer) -> Result<bool, ApiError> {
        let verdict = if answer.outdated {
            FenceVerdict::Outdated
        } else {
            FenceVerdict::Refused(answer.reason)
        };
        Ok(self.fencer.answer(answer.id, verdict))
    }

    async fn verify_volume(&self, request: VerifyVolume) -> Result<VolumeVerify, ApiError> {
        let attachments = self.attachments.clone();
        let chunk_size = self.pool.chunk_size();
        tokio::task::spawn_blocking(move || {
            let results = attachments
                .verify(&request.name, request.rate_bytes, request.repair)
                .map_err(|e| ApiError::FailedPrecondition {
                    reason: error_chain(&e),
                })?;
            let peers = results
                .into_iter()
                .map(|(peer, result)| match result {
                    Ok(r) => PeerVerify {
                        peer,
                        error: None,
                        checked_chunks: r.checked_chunks,
                        out_of_sync: r.out_of_sync.len() as u64,
                        out_of_sync_chunks: r.out_of_sync,
                        repaired: r.repaired,
                    },
                    Err(e) => PeerVerify {
                        peer,
                        error: Some(error_chain(&e)),
                        ..PeerVerify::default()
                    },
                })
                .collect();
            Ok(VolumeVerify {
                name: request.name,
                chunk_size,
                peers,
            })
        })
        .await
        .map_err(|e| ApiError::Internal {
            reason: format!("verify panicked: {e}"),
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;
    use crate::pool::PoolOptions;
    use crate::replication::attach::AttachOptions;
    use crate::replication::book::ReplicaBook;

    fn service() -> LocalService {
        let pool = Pool::create(Arc::new(MemBackend::new(64 << 20)), &PoolOptions::default())
            .expect("pool");
        let book = Arc::new(ReplicaBook::in_memory(0));
        LocalService::new(
            Arc::new(Attachments::new(pool, book, AttachOptions::default())),
            ExportConfig {
                tcp: "127.0.0.1:10809".parse().expect("addr"),
                unix: None,
                replication: None,
            },
            AgentFencer::default(),
        )
    }

    fn ensure_req(name: &str, size: u64, source: Option<&str>) -> EnsureVolume {
        EnsureVolume {
            name: name.into(),
            size_bytes: size,
            source: source.map(Into::into),
        }
    }

    #[tokio::test]
    async fn ensure_is_idempotent_and_clones_grow() {
        let svc = service();
        let a = svc
            .ensure_volume(ensure_req("a", 1 << 20, None))
            .await
            .unwrap();
        let again = svc
            .ensure_volume(ensure_req("a", 2 << 20, None))
            .await
            .unwrap();
        assert_eq!(a, again, "an existing volume is returned as is");
        let snap = svc
            .snapshot_volume("a".into(), "a-snap".into())
            .await
            .unwrap();
        assert!(snap.read_only);
        let clone = svc
            .ensure_volume(ensure_req("c", 4 << 20, Some("a-snap")))
            .await
            .unwrap();
        assert_eq!((clone.size_bytes, clone.read_only), (4 << 20, false));
        assert!(matches!(
            svc.ensure_volume(ensure_req("d", 512, Some("a"))).await,
            Err(ApiError::InvalidArgument { field, .. }) if field == "size_bytes"
        ));
        assert!(matches!(
            svc.ensure_volume(ensure_req("e", 0, Some("missing"))).await,
            Err(ApiError::FailedPrecondition { .. })
        ));
        assert!(svc.delete_volume("c".into()).await.unwrap());
        assert!(!svc.delete_volume("c".into()).await.unwrap());
        let names: Vec<_> = svc
            .list_volumes()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["a", "a-snap"]);
        let export = svc.export_address("a".into()).await.unwrap();
        assert_eq!(export.uri(), "nbd://127.0.0.1:10809/a");
        assert_eq!(svc.status().await.unwrap().volumes, 2);
        self::assert_send(&svc);
    }

    #[tokio::test]
    async fn snapshots_and_clones_of_an_incomplete_copy_are_incomplete() {
        let svc = service();
        for name in ["a", "b"] {
            svc.ensure_volume(ensure_req(name, 1 << 20, None))
                .await
                .unwrap();
        }
        svc.attachments.book().start_fill("a").unwrap();
        svc.snapshot_volume("a".into(), "a-snap".into())
            .await
            .unwrap();
        svc.ensure_volume(ensure_req("a-clone", 0, Some("a-snap")))
            .await
            .unwrap();
        svc.snapshot_volume("b".into(), "b-snap".into())
            .await
            .unwrap();
        svc.ensure_volume(ensure_req("b-clone", 0, Some("b")))
            .await
            .unwrap();
        let incomplete: Vec<_> = svc
            .list_volumes()
            .await
            .unwrap()
            .into_iter()
            .filter(|v| v.incomplete)
            .map(|v| v.name)
            .collect();
        assert_eq!(incomplete, ["a", "a-clone", "a-snap"]);
    }

    fn assert_send<T: Send + Sync>(_: &T) {}
}
