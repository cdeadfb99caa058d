//! [`StorageApi`]: the storage-local service in domain types, and its gRPC
//! adapter. A node's storage process implements it; its agent calls it
//! over a Unix socket ([`StorageClient`](crate::StorageClient)).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};

use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::{MAX_MESSAGE_BYTES, refuse, reply};
use crate::pb;
use crate::pb::storage_local_server::{StorageLocal, StorageLocalServer};
use crate::types::{validate_volume_name, validate_volume_size};
use crate::{
    ApiError, AttachVolume, EnsureVolume, FenceAnswer, FenceRequest, ReplicationProtocol,
    StorageStatus, StorageVolume, VerifyVolume, VolumeAttachment, VolumeExport, VolumeVerify,
};

/// A stream of fence requests, as the storage process sends them and the
/// agent receives them. An `Err` item ends it.
pub type FenceStream = Pin<Box<dyn Stream<Item = Result<FenceRequest, ApiError>> + Send>>;

/// The storage-local service: volumes of one node's pool.
pub trait StorageApi: Send + Sync + 'static {
    /// Creates the volume (empty, or a clone of `source`) unless it exists;
    /// returns it.
    fn ensure_volume(
        &self,
        request: EnsureVolume,
    ) -> impl Future<Output = Result<StorageVolume, ApiError>> + Send;

    /// Deletes a volume; `false` when there was none.
    fn delete_volume(&self, name: String) -> impl Future<Output = Result<bool, ApiError>> + Send;

    /// Every volume, by name.
    fn list_volumes(&self) -> impl Future<Output = Result<Vec<StorageVolume>, ApiError>> + Send;

    /// Grows a volume.
    fn resize_volume(
        &self,
        name: String,
        size_bytes: u64,
    ) -> impl Future<Output = Result<StorageVolume, ApiError>> + Send;

    /// A read-only snapshot `name` of `source` (an existing one is
    /// returned as is).
    fn snapshot_volume(
        &self,
        source: String,
        name: String,
    ) -> impl Future<Output = Result<StorageVolume, ApiError>> + Send;

    /// Where an NBD client opens the volume.
    fn export_address(
        &self,
        name: String,
    ) -> impl Future<Output = Result<VolumeExport, ApiError>> + Send;

    /// The pool and its replication.
    fn status(&self) -> impl Future<Output = Result<StorageStatus, ApiError>> + Send;

    /// Sets a volume's replication role (the request is validated);
    /// idempotent.
    fn attach_volume(
        &self,
        request: AttachVolume,
    ) -> impl Future<Output = Result<VolumeAttachment, ApiError>> + Send;

    /// Sets when volume `name`'s primary acknowledges writes (kept with
    /// its attachment); refused for a volume never attached.
    fn set_replication_protocol(
        &self,
        name: String,
        protocol: ReplicationProtocol,
    ) -> impl Future<Output = Result<VolumeAttachment, ApiError>> + Send;

    /// Every pending fence request, then each new one, while the stream is
    /// held (primaries ask only while some agent watches).
    fn watch_fences(&self) -> impl Future<Output = Result<FenceStream, ApiError>> + Send;

    /// Answers a fence request; `false` when no writer waits for the
    /// answer any more.
    fn answer_fence(
        &self,
        answer: FenceAnswer,
    ) -> impl Future<Output = Result<bool, ApiError>> + Send;

    /// Online verify of a volume that is a primary here against its
    /// peers (the request is validated).
    fn verify_volume(
        &self,
        request: VerifyVolume,
    ) -> impl Future<Output = Result<VolumeVerify, ApiError>> + Send;

    /// Attaches the node's backing store again after an I/O error
    /// detached it (see the proto); the status after. The default answers
    /// `UNIMPLEMENTED`-like `FAILED_PRECONDITION` (fakes need not serve it).
    fn attach_disk(&self) -> impl Future<Output = Result<StorageStatus, ApiError>> + Send {
        async {
            Err(ApiError::FailedPrecondition {
                reason: "this storage service cannot attach its disk again".into(),
            })
        }
    }
}

/// Serves `api` as the storage-local service.
pub fn storage_routes<T: StorageApi>(api: T) -> Routes {
    Routes::default().add_service(
        StorageLocalServer::new(StorageAdapter(Arc::new(api)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// Implements the generated service on top of a [`StorageApi`].
#[derive(Debug)]
struct StorageAdapter<T>(Arc<T>);

#[tonic::async_trait]
impl<T: StorageApi> StorageLocal for StorageAdapter<T> {
    async fn ensure_volume(
        &self,
        request: Request<pb::EnsureVolumeRequest>,
    ) -> Result<Response<pb::StorageVolume>, Status> {
        let result = async {
            let request = request.into_inner().try_into()?;
            self.0.ensure_volume(request).await
        };
        reply("EnsureVolume", result.await)
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let result = async {
            let name = request.into_inner().name;
            validate_volume_name("name", &name)?;
            self.0.delete_volume(name).await
        };
        reply(
            "DeleteVolume",
            result
                .await
                .map(|deleted| pb::DeleteVolumeResponse { deleted }),
        )
    }

    async fn list_volumes(
        &self,
        _request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let result = self
            .0
            .list_volumes()
            .await
            .map(|volumes| pb::ListVolumesResponse {
                volumes: volumes.into_iter().map(Into::into).collect(),
            });
        reply("ListVolumes", result)
    }

    async fn resize_volume(
        &self,
        request: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::StorageVolume>, Status> {
        let result = async {
            let request = request.into_inner();
            validate_volume_name("name", &request.name)?;
            validate_volume_size("size_bytes", request.size_bytes, false)?;
            self.0.resize_volume(request.name, request.size_bytes).await
        };
        reply("ResizeVolume", result.await)
    }

    async fn snapshot_volume(
        &self,
        request: Request<pb::SnapshotVolumeRequest>,
    ) -> Result<Response<pb::StorageVolume>, Status> {
        let result = async {
            let request = request.into_inner();
            validate_volume_name("source", &request.source)?;
            validate_volume_name("name", &request.name)?;
            self.0.snapshot_volume(request.source, request.name).await
        };
        reply("SnapshotVolume", result.await)
    }

    async fn export_address(
        &self,
        request: Request<pb::ExportAddressRequest>,
    ) -> Result<Response<pb::VolumeExport>, Status> {
        let result = async {
            let name = request.into_inner().name;
            validate_volume_name("name", &name)?;
            self.0.export_address(name).await
        };
        reply("ExportAddress", result.await)
    }

    async fn status(
        &self,
        _request: Request<pb::StorageStatusRequest>,
    ) -> Result<Response<pb::StorageStatus>, Status> {
        reply("Status", self.0.status().await)
    }

    async fn attach_volume(
        &self,
        request: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::VolumeAttachment>, Status> {
        let result = async {
            let request = request.into_inner().try_into()?;
            self.0.attach_volume(request).await
        };
        reply("AttachVolume", result.await)
    }

    async fn set_replication_protocol(
        &self,
        request: Request<pb::SetReplicationProtocolRequest>,
    ) -> Result<Response<pb::VolumeAttachment>, Status> {
        let result = async {
            let request = request.into_inner();
            validate_volume_name("name", &request.name)?;
            let protocol = request.checked_protocol()?;
            self.0
                .set_replication_protocol(request.name, protocol)
                .await
        };
        reply("SetReplicationProtocol", result.await)
    }

    type WatchFencesStream = PbFenceStream;

    async fn watch_fences(
        &self,
        _request: Request<pb::WatchFencesRequest>,
    ) -> Result<Response<PbFenceStream>, Status> {
        match self.0.watch_fences().await {
            Ok(requests) => Ok(Response::new(Box::pin(
                requests.map(|request| request.map(pb::FenceRequest::from).map_err(Status::from)),
            ) as PbFenceStream)),
            Err(err) => Err(refuse("WatchFences", err)),
        }
    }

    async fn answer_fence(
        &self,
        request: Request<pb::AnswerFenceRequest>,
    ) -> Result<Response<pb::AnswerFenceResponse>, Status> {
        let answer = FenceAnswer::from(request.into_inner());
        reply(
            "AnswerFence",
            self.0
                .answer_fence(answer)
                .await
                .map(|accepted| pb::AnswerFenceResponse { accepted }),
        )
    }

    async fn verify_volume(
        &self,
        request: Request<pb::VerifyVolumeRequest>,
    ) -> Result<Response<pb::VolumeVerify>, Status> {
        let result = async {
            let request = request.into_inner().try_into()?;
            self.0.verify_volume(request).await
        };
        reply("VerifyVolume", result.await)
    }

    async fn attach_disk(
        &self,
        _request: Request<pb::AttachDiskRequest>,
    ) -> Result<Response<pb::StorageStatus>, Status> {
        reply("AttachDisk", self.0.attach_disk().await)
    }
}

type PbFenceStream = Pin<Box<dyn Stream<Item = Result<pb::FenceRequest, Status>> + Send>>;
