//! [`StorageClient`]: the storage-local service, in domain types, over the
//! storage process's Unix socket.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::decode_reply;
use crate::pb;
use crate::pb::storage_local_client::StorageLocalClient as PbStorageClient;
use crate::server::FenceStream;
use crate::server::MAX_MESSAGE_BYTES;
use crate::{
    ApiError, AttachVolume, EnsureVolume, FenceAnswer, FenceRequest, ReplicationProtocol,
    StorageStatus, StorageVolume, VerifyVolume, VolumeAttachment, VolumeExport, VolumeVerify,
};

/// A client of a node's storage process. Cheap to clone; calls may run
/// concurrently; it connects on first use and reconnects after a failure
/// (the storage process outlives agent restarts, and may restart itself).
#[derive(Debug, Clone)]
pub struct StorageClient {
    inner: PbStorageClient<Channel>,
    socket: PathBuf,
}

impl StorageClient {
    /// A client of the storage process listening on the Unix socket `socket`.
    pub fn connect_unix(socket: impl AsRef<Path>) -> Result<Self, ApiError> {
        let socket = socket.as_ref().to_path_buf();
        // The URI is required by the transport but unused: the connector
        // below always dials the socket.
        let endpoint =
            Endpoint::from_static("http://storage.local").connect_timeout(super::CONNECT_TIMEOUT);
        let path = socket.clone();
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }));
        Ok(Self {
            inner: PbStorageClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            socket,
        })
    }

    /// The socket this client dials.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn unavailable(&self, err: ApiError) -> ApiError {
        match err {
            ApiError::Unavailable { reason } => ApiError::Unavailable {
                reason: format!("storage process at {}: {reason}", self.socket.display()),
            },
            other => other,
        }
    }

    /// Creates the volume unless it exists; returns it.
    pub async fn ensure_volume(&self, request: EnsureVolume) -> Result<StorageVolume, ApiError> {
        let reply = self
            .inner
            .clone()
            .ensure_volume(pb::EnsureVolumeRequest::from(request))
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        decode_reply(reply.into_inner())
    }

    /// Deletes a volume; `false` when there was none.
    pub async fn delete_volume(&self, name: &str) -> Result<bool, ApiError> {
        let request = pb::DeleteVolumeRequest {
            name: name.to_owned(),
        };
        let reply = self
            .inner
            .clone()
            .delete_volume(request)
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        Ok(reply.into_inner().deleted)
    }

    /// Every volume of the pool.
    pub async fn list_volumes(&self) -> Result<Vec<StorageVolume>, ApiError> {
        let reply = self
            .inner
            .clone()
            .list_volumes(pb::ListVolumesRequest {})
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        reply
            .into_inner()
            .volumes
            .into_iter()
            .map(decode_reply)
            .collect()
    }

    /// Grows a volume.
    pub async fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<StorageVolume, ApiError> {
        let request = pb::ResizeVolumeRequest {
            name: name.to_owned(),
            size_bytes,
        };
        let reply = self
            .inner
            .clone()
            .resize_volume(request)
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        decode_reply(reply.into_inner())
    }

    /// A read-only snapshot `name` of `source`.
    pub async fn snapshot_volume(
        &self,
        source: &str,
        name: &str,
    ) -> Result<StorageVolume, ApiError> {
        let request = pb::SnapshotVolumeRequest {
            source: source.to_owned(),
            name: name.to_owned(),
        };
        let reply = self
            .inner
            .clone()
            .snapshot_volume(request)
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        decode_reply(reply.into_inner())
    }

    /// Where an NBD client opens the volume.
    pub async fn export_address(&self, name: &str) -> Result<VolumeExport, ApiError> {
        let request = pb::ExportAddressRequest {
            name: name.to_owned(),
        };
        let reply = self
            .inner
            .clone()
            .export_address(request)
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        decode_reply(reply.into_inner())
    }

    /// The pool and its replication.
    pub async fn status(&self) -> Result<StorageStatus, ApiError> {
        let reply = self
            .inner
            .clone()
            .status(pb::StorageStatusRequest {})
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        decode_reply(reply.into_inner())
    }

    /// Sets a volume's replication role (standalone, secondary or primary
    /// with peers). Idempotent: the agent may call it on every pass.
    pub async fn attach_volume(&self, request: AttachVolume) -> Result<VolumeAttachment, ApiError> {
        let reply = self
            .inner
            .clone()
            .attach_volume(pb::AttachVolumeRequest::from(request))
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        decode_reply(reply.into_inner())
    }

    /// Sets when volume `name`'s primary acknowledges writes.
    pub async fn set_replication_protocol(
        &self,
        name: &str,
        protocol: ReplicationProtocol,
    ) -> Result<VolumeAttachment, ApiError> {
        let request = pb::SetReplicationProtocolRequest {
            name: name.to_owned(),
            protocol: pb::ReplicationProtocol::from(protocol).into(),
        };
        let reply = self
            .inner
            .clone()
            .set_replication_protocol(request)
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        decode_reply(reply.into_inner())
    }

    /// Watches the fence requests of this storage process's primaries:
    /// every pending one, then each new one.
    pub async fn watch_fences(&self) -> Result<FenceStream, ApiError> {
        let requests = self
            .inner
            .clone()
            .watch_fences(pb::WatchFencesRequest {})
            .await
            .map_err(|s| self.unavailable(s.into()))?
            .into_inner();
        Ok(Box::pin(
            requests.map(|request| decode_reply::<_, FenceRequest>(request?)),
        ))
    }

    /// Answers a fence request; `false` when no writer waits for it any
    /// more.
    pub async fn answer_fence(&self, answer: FenceAnswer) -> Result<bool, ApiError> {
        let reply = self
            .inner
            .clone()
            .answer_fence(pb::AnswerFenceRequest::from(answer))
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        Ok(reply.into_inner().accepted)
    }

    /// Attaches the node's backing store again after an I/O error
    /// detached it, once the device works; the status after. Primary
    /// volumes written meanwhile get those chunks back from a peer first
    /// (writes held), so it may take a while.
    pub async fn attach_disk(&self) -> Result<StorageStatus, ApiError> {
        let reply = self
            .inner
            .clone()
            .attach_disk(pb::AttachDiskRequest {})
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        decode_reply(reply.into_inner())
    }

    /// Online verify of a volume that is a primary on this node against
    /// its peers; returns when every peer was compared (it reads the whole
    /// volume, rate-limited: no deadline of its own).
    pub async fn verify_volume(&self, request: VerifyVolume) -> Result<VolumeVerify, ApiError> {
        let reply = self
            .inner
            .clone()
            .verify_volume(pb::VerifyVolumeRequest::from(request))
            .await
            .map_err(|s| self.unavailable(s.into()))?;
        Ok(reply.into_inner().into())
    }
}
