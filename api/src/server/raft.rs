//! [`RaftApi`]: Raft traffic between control-plane members, and its gRPC
//! adapter. Payloads are serialized consensus messages this crate does
//! not interpret.

use std::future::Future;
use std::sync::Arc;

use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::{MAX_MESSAGE_BYTES, reply};
use crate::ApiError;
use crate::pb;
use crate::pb::raft_server::{Raft, RaftServer};

/// The Raft service: each call takes and returns one opaque payload.
pub trait RaftApi: Send + Sync + 'static {
    /// Handles a serialized append-entries request.
    fn append_entries(
        &self,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, ApiError>> + Send;

    /// Handles a serialized vote request.
    fn vote(&self, payload: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, ApiError>> + Send;

    /// Handles a serialized install-snapshot request (one chunk).
    fn install_snapshot(
        &self,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, ApiError>> + Send;

    /// Handles serialized writes a follower forwards, many in one call.
    /// By default refused, without effect, as not served here.
    fn forward(&self, payload: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, ApiError>> + Send {
        let _ = payload;
        async {
            Err(ApiError::FailedPrecondition {
                reason: "this member does not take forwarded writes".into(),
            })
        }
    }
}

impl<T: RaftApi> RaftApi for Arc<T> {
    fn append_entries(
        &self,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, ApiError>> + Send {
        T::append_entries(self, payload)
    }

    fn vote(&self, payload: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, ApiError>> + Send {
        T::vote(self, payload)
    }

    fn install_snapshot(
        &self,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, ApiError>> + Send {
        T::install_snapshot(self, payload)
    }

    fn forward(&self, payload: Vec<u8>) -> impl Future<Output = Result<Vec<u8>, ApiError>> + Send {
        T::forward(self, payload)
    }
}

/// Serves `api` as the Raft service.
pub fn raft_routes<T: RaftApi>(api: T) -> Routes {
    add_raft_routes(Routes::default(), api)
}

/// Adds the Raft service, served by `api`, to `routes`.
pub fn add_raft_routes<T: RaftApi>(routes: Routes, api: T) -> Routes {
    routes.add_service(
        RaftServer::new(RaftAdapter(Arc::new(api)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// Implements the generated service on top of a [`RaftApi`].
#[derive(Debug)]
struct RaftAdapter<T>(Arc<T>);

fn payload_reply(payload: Vec<u8>) -> pb::RaftReply {
    pb::RaftReply { payload }
}

#[tonic::async_trait]
impl<T: RaftApi> Raft for RaftAdapter<T> {
    async fn append_entries(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let result = self.0.append_entries(request.into_inner().payload).await;
        reply("AppendEntries", result.map(payload_reply))
    }

    async fn vote(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let result = self.0.vote(request.into_inner().payload).await;
        reply("Vote", result.map(payload_reply))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let result = self.0.install_snapshot(request.into_inner().payload).await;
        reply("InstallSnapshot", result.map(payload_reply))
    }

    async fn forward(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let result = self.0.forward(request.into_inner().payload).await;
        reply("Forward", result.map(payload_reply))
    }
}
