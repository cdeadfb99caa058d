//! [`RaftClient`]: the Raft service, with opaque payloads.

use tonic::transport::Channel;

use super::{connect, connect_lazy};
use crate::ApiError;
use crate::pb;
use crate::pb::raft_client::RaftClient as PbRaftClient;
use crate::server::MAX_MESSAGE_BYTES;

/// A client of another control-plane member's Raft service. Cheap to
/// clone; calls may run concurrently.
#[derive(Debug, Clone)]
pub struct RaftClient {
    inner: PbRaftClient<Channel>,
}

impl RaftClient {
    /// Connects to `address` ("host:port" or "http://host:port").
    pub async fn connect(address: &str) -> Result<Self, ApiError> {
        Ok(Self::from_channel(connect(address).await?))
    }

    /// A client that connects on its first call, and reconnects after a
    /// failure: what a Raft member wants for peers that may be down.
    pub fn connect_lazy(address: &str) -> Result<Self, ApiError> {
        Ok(Self::from_channel(connect_lazy(address)?))
    }

    /// A client on an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: PbRaftClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// Sends a serialized append-entries request; returns the serialized reply.
    pub async fn append_entries(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        let reply = self
            .inner
            .clone()
            .append_entries(pb::RaftRequest { payload })
            .await?;
        Ok(reply.into_inner().payload)
    }

    /// Sends a serialized vote request; returns the serialized reply.
    pub async fn vote(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        let reply = self.inner.clone().vote(pb::RaftRequest { payload }).await?;
        Ok(reply.into_inner().payload)
    }

    /// Sends serialized forwarded writes; returns the serialized answers.
    pub async fn forward(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        let reply = self
            .inner
            .clone()
            .forward(pb::RaftRequest { payload })
            .await?;
        Ok(reply.into_inner().payload)
    }

    /// Sends a serialized install-snapshot request; returns the serialized reply.
    pub async fn install_snapshot(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        let reply = self
            .inner
            .clone()
            .install_snapshot(pb::RaftRequest { payload })
            .await?;
        Ok(reply.into_inner().payload)
    }
}
