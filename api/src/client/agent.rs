//! [`AgentClient`]: the agent service, in domain types.

use futures::StreamExt;
use tonic::transport::Channel;

use super::{connect, connect_lazy, decode_reply};
use crate::pb;
use crate::pb::agent_client::AgentClient as PbAgentClient;
use crate::server::{MAX_MESSAGE_BYTES, WatchStream};
use crate::{
    ApiError, Heartbeat, HeartbeatAck, Placement, Registered, Registration, ReplicaMark,
    StatusReport, WatchEvent,
};

/// A client of the agent service. Cheap to clone; calls may run concurrently.
#[derive(Debug, Clone)]
pub struct AgentClient {
    inner: PbAgentClient<Channel>,
}

impl AgentClient {
    /// Connects to `address` ("host:port" or "http://host:port").
    pub async fn connect(address: &str) -> Result<Self, ApiError> {
        Ok(Self::from_channel(connect(address).await?))
    }

    /// A client that connects on its first call, and reconnects after a
    /// failure.
    pub fn connect_lazy(address: &str) -> Result<Self, ApiError> {
        Ok(Self::from_channel(connect_lazy(address)?))
    }

    /// A client on an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: PbAgentClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// Registers this node with a join token.
    pub async fn register(&self, registration: Registration) -> Result<Registered, ApiError> {
        let request = pb::RegisterRequest::from(registration);
        let reply = self.inner.clone().register(request).await?;
        decode_reply(reply.into_inner())
    }

    /// Renews this node's lease.
    pub async fn heartbeat(&self, heartbeat: Heartbeat) -> Result<HeartbeatAck, ApiError> {
        let request = pb::HeartbeatRequest::from(heartbeat);
        let reply = self.inner.clone().heartbeat(request).await?;
        Ok(reply.into_inner().into())
    }

    /// Streams the changes to the placements that name `node` (the VM
    /// runs there, or it is a replica node) after
    /// `from_resource_version` (from now on when 0).
    pub async fn watch_placements(
        &self,
        node: &str,
        from_resource_version: u64,
    ) -> Result<WatchStream<Placement>, ApiError> {
        let request = pb::WatchPlacementsRequest {
            node: node.to_owned(),
            from_resource_version,
        };
        let events = self
            .inner
            .clone()
            .watch_placements(request)
            .await?
            .into_inner();
        Ok(Box::pin(events.map(|event| {
            decode_reply::<_, WatchEvent<Placement>>(event?)
        })))
    }

    /// Reports what this node observed about one VM.
    pub async fn report_status(&self, report: StatusReport) -> Result<(), ApiError> {
        let request = pb::ReportStatusRequest::from(report);
        self.inner.clone().report_status(request).await?;
        Ok(())
    }

    /// Has the control plane record a replica of a VM outdated, or in
    /// sync again (see [`ReplicaMark`]); `Ok` once committed.
    pub async fn mark_replica(&self, mark: ReplicaMark) -> Result<(), ApiError> {
        let request = pb::MarkReplicaRequest::from(mark);
        self.inner.clone().mark_replica(request).await?;
        Ok(())
    }
}
