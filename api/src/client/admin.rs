//! [`AdminClient`]: the admin service, in domain types.

use futures::StreamExt;
use tonic::transport::Channel;

use super::{connect, connect_lazy, decode_reply};
use crate::convert::kind_to_pb;
use crate::pb;
use crate::pb::admin_client::AdminClient as PbAdminClient;
use crate::server::{MAX_MESSAGE_BYTES, WatchStream};
use crate::{ApiError, Kind, Object, ObjectList, WatchEvent};

/// A client of the admin service. Cheap to clone; calls may run concurrently.
#[derive(Debug, Clone)]
pub struct AdminClient {
    inner: PbAdminClient<Channel>,
}

impl AdminClient {
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
            inner: PbAdminClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// Stores a new object; returns it as stored.
    pub async fn create(&self, object: Object) -> Result<Object, ApiError> {
        let request = pb::CreateRequest {
            object: Some(object.into()),
        };
        let reply = self.inner.clone().create(request).await?;
        decode_reply(reply.into_inner())
    }

    /// Reads one object.
    pub async fn get(&self, kind: Kind, name: &str) -> Result<Object, ApiError> {
        let request = pb::GetRequest {
            kind: kind_to_pb(Some(kind)),
            name: name.to_owned(),
        };
        let reply = self.inner.clone().get(request).await?;
        decode_reply(reply.into_inner())
    }

    /// Reads every object of a kind.
    pub async fn list(&self, kind: Kind) -> Result<ObjectList, ApiError> {
        let request = pb::ListRequest {
            kind: kind_to_pb(Some(kind)),
        };
        let reply = self.inner.clone().list(request).await?;
        decode_reply(reply.into_inner())
    }

    /// Reads every object of every kind at one version (a consistent
    /// snapshot of the whole state, e.g. for a backup).
    pub async fn list_all(&self) -> Result<ObjectList, ApiError> {
        let request = pb::ListRequest {
            kind: kind_to_pb(None),
        };
        let reply = self.inner.clone().list(request).await?;
        decode_reply(reply.into_inner())
    }

    /// Replaces an object if `meta.resource_version` is still current
    /// ([`ApiError::Aborted`] otherwise); returns it as stored.
    pub async fn update(&self, object: Object) -> Result<Object, ApiError> {
        let request = pb::UpdateRequest {
            object: Some(object.into()),
        };
        let reply = self.inner.clone().update(request).await?;
        decode_reply(reply.into_inner())
    }

    /// Deletes an object, if still at `expected_resource_version` when
    /// given; returns it as it was.
    pub async fn delete(
        &self,
        kind: Kind,
        name: &str,
        expected_resource_version: Option<u64>,
    ) -> Result<Object, ApiError> {
        let request = pb::DeleteRequest {
            kind: kind_to_pb(Some(kind)),
            name: name.to_owned(),
            expected_resource_version,
        };
        let reply = self.inner.clone().delete(request).await?;
        decode_reply(reply.into_inner())
    }

    /// Streams the changes to objects of `kind` (every kind when `None`)
    /// after `from_resource_version` (from now on when 0).
    pub async fn watch(
        &self,
        kind: Option<Kind>,
        from_resource_version: u64,
    ) -> Result<WatchStream, ApiError> {
        let request = pb::WatchRequest {
            kind: kind_to_pb(kind),
            from_resource_version,
        };
        let events = self.inner.clone().watch(request).await?.into_inner();
        Ok(Box::pin(
            events.map(|event| decode_reply::<_, WatchEvent>(event?)),
        ))
    }
}
