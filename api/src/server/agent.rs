//! [`AgentApi`]: the agent service in domain types, and its gRPC adapter.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::{MAX_MESSAGE_BYTES, WatchStream, refuse, reply};
use crate::pb;
use crate::pb::agent_server::{Agent, AgentServer};
use crate::types::validate;
use crate::{
    ApiError, Heartbeat, HeartbeatAck, Placement, Registered, Registration, ReplicaMark,
    StatusReport, Volume, VolumeReport,
};

/// The agent service: what a node agent asks of the control plane.
pub trait AgentApi: Send + Sync + 'static {
    /// Admits a node that holds a valid join token
    /// ([`ApiError::Unauthenticated`] otherwise).
    fn register(
        &self,
        registration: Registration,
    ) -> impl Future<Output = Result<Registered, ApiError>> + Send;

    /// Renews the node's lease.
    fn heartbeat(
        &self,
        heartbeat: Heartbeat,
    ) -> impl Future<Output = Result<HeartbeatAck, ApiError>> + Send;

    /// Streams the changes to the placements that name `node` (the VM
    /// runs there, or it is a replica node), as
    /// [`AdminApi::watch`](crate::AdminApi::watch) does.
    fn watch_placements(
        &self,
        node: String,
        from_resource_version: u64,
    ) -> impl Future<Output = Result<WatchStream<Placement>, ApiError>> + Send;

    /// Streams the changes to the volumes that are `node`'s: those whose
    /// status names it (the primary or a copy) and the snapshots and
    /// clones not made yet of a volume whose primary it is; one that stops
    /// being the node's arrives as deleted. From version 0: the node's
    /// volumes as added, then a bookmark, then every later change.
    fn watch_volumes(
        &self,
        node: String,
        from_resource_version: u64,
    ) -> impl Future<Output = Result<WatchStream<Volume>, ApiError>> + Send;

    /// Records what the node observed about one VM.
    fn report_status(
        &self,
        report: StatusReport,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Records a replica of a VM outdated, or in sync again, for the VM's
    /// primary (the storage fence); `Ok` only once committed.
    fn mark_replica(&self, mark: ReplicaMark) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Records how the copies of a volume stand, from the agent of its
    /// primary node; `Ok(true)` when that changed the volume's status.
    fn report_volume(
        &self,
        report: VolumeReport,
    ) -> impl Future<Output = Result<bool, ApiError>> + Send;
}

impl<T: AgentApi> AgentApi for Arc<T> {
    fn register(
        &self,
        registration: Registration,
    ) -> impl Future<Output = Result<Registered, ApiError>> + Send {
        T::register(self, registration)
    }

    fn heartbeat(
        &self,
        heartbeat: Heartbeat,
    ) -> impl Future<Output = Result<HeartbeatAck, ApiError>> + Send {
        T::heartbeat(self, heartbeat)
    }

    fn watch_placements(
        &self,
        node: String,
        from_resource_version: u64,
    ) -> impl Future<Output = Result<WatchStream<Placement>, ApiError>> + Send {
        T::watch_placements(self, node, from_resource_version)
    }

    fn watch_volumes(
        &self,
        node: String,
        from_resource_version: u64,
    ) -> impl Future<Output = Result<WatchStream<Volume>, ApiError>> + Send {
        T::watch_volumes(self, node, from_resource_version)
    }

    fn report_status(
        &self,
        report: StatusReport,
    ) -> impl Future<Output = Result<(), ApiError>> + Send {
        T::report_status(self, report)
    }

    fn mark_replica(&self, mark: ReplicaMark) -> impl Future<Output = Result<(), ApiError>> + Send {
        T::mark_replica(self, mark)
    }

    fn report_volume(
        &self,
        report: VolumeReport,
    ) -> impl Future<Output = Result<bool, ApiError>> + Send {
        T::report_volume(self, report)
    }
}

/// Serves `api` as the agent service.
pub fn agent_routes<T: AgentApi>(api: T) -> Routes {
    add_agent_routes(Routes::default(), api)
}

/// Adds the agent service, served by `api`, to `routes`.
pub fn add_agent_routes<T: AgentApi>(routes: Routes, api: T) -> Routes {
    routes.add_service(
        AgentServer::new(AgentAdapter(Arc::new(api)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// Implements the generated service on top of an [`AgentApi`].
#[derive(Debug)]
struct AgentAdapter<T>(Arc<T>);

type PbPlacementStream = Pin<Box<dyn Stream<Item = Result<pb::PlacementEvent, Status>> + Send>>;
type PbVolumeStream = Pin<Box<dyn Stream<Item = Result<pb::VolumeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<T: AgentApi> Agent for AgentAdapter<T> {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let result = async {
            let registration = request.into_inner().try_into()?;
            self.0.register(registration).await
        };
        reply("Register", result.await)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let result = async {
            let heartbeat = request.into_inner().try_into()?;
            self.0.heartbeat(heartbeat).await
        };
        reply("Heartbeat", result.await)
    }

    type WatchPlacementsStream = PbPlacementStream;

    async fn watch_placements(
        &self,
        request: Request<pb::WatchPlacementsRequest>,
    ) -> Result<Response<PbPlacementStream>, Status> {
        let result = async {
            let request = request.into_inner();
            validate::name("node", &request.node)?;
            let events = self
                .0
                .watch_placements(request.node, request.from_resource_version)
                .await?;
            Ok(events.map(|event| event.map(pb::PlacementEvent::from).map_err(Status::from)))
        };
        match result.await {
            Ok(events) => Ok(Response::new(Box::pin(events) as PbPlacementStream)),
            Err(err) => Err(refuse("WatchPlacements", err)),
        }
    }

    type WatchVolumesStream = PbVolumeStream;

    async fn watch_volumes(
        &self,
        request: Request<pb::WatchVolumesRequest>,
    ) -> Result<Response<PbVolumeStream>, Status> {
        let result = async {
            let request = request.into_inner();
            validate::name("node", &request.node)?;
            let events = self
                .0
                .watch_volumes(request.node, request.from_resource_version)
                .await?;
            Ok(events.map(|event| event.map(pb::VolumeEvent::from).map_err(Status::from)))
        };
        match result.await {
            Ok(events) => Ok(Response::new(Box::pin(events) as PbVolumeStream)),
            Err(err) => Err(refuse("WatchVolumes", err)),
        }
    }

    async fn report_status(
        &self,
        request: Request<pb::ReportStatusRequest>,
    ) -> Result<Response<pb::ReportStatusResponse>, Status> {
        let result = async {
            let report = request.into_inner().try_into()?;
            self.0.report_status(report).await
        };
        reply(
            "ReportStatus",
            result.await.map(|()| pb::ReportStatusResponse {}),
        )
    }

    async fn mark_replica(
        &self,
        request: Request<pb::MarkReplicaRequest>,
    ) -> Result<Response<pb::MarkReplicaResponse>, Status> {
        let result = async {
            let mark = request.into_inner().try_into()?;
            self.0.mark_replica(mark).await
        };
        reply(
            "MarkReplica",
            result.await.map(|()| pb::MarkReplicaResponse {}),
        )
    }

    async fn report_volume(
        &self,
        request: Request<pb::ReportVolumeRequest>,
    ) -> Result<Response<pb::ReportVolumeResponse>, Status> {
        let result = async {
            let report = request.into_inner().try_into()?;
            self.0.report_volume(report).await
        };
        reply(
            "ReportVolume",
            result
                .await
                .map(|changed| pb::ReportVolumeResponse { changed }),
        )
    }
}
