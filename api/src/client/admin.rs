//! [`AdminClient`]: the admin service, in domain types, on one or several
//! control-plane members (see [`super::targets`]).

use futures::StreamExt;
use tonic::transport::Channel;

use super::decode_reply;
use super::targets::{Repeat, Targets};
use super::watch::{Open, Start, resuming};
use crate::convert::kind_to_pb;
use crate::pb;
use crate::pb::admin_client::AdminClient as PbAdminClient;
use crate::server::{MAX_MESSAGE_BYTES, WatchStream};
use crate::{ApiError, Kind, Object, ObjectList, WatchEvent};

/// A client of the admin service. Cheap to clone; calls may run concurrently.
#[derive(Debug, Clone)]
pub struct AdminClient {
    targets: Targets<PbAdminClient<Channel>>,
}

fn pb_client(channel: Channel) -> PbAdminClient<Channel> {
    PbAdminClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl AdminClient {
    /// Connects to `address` ("host:port" or "http://host:port"), or to
    /// the first member that accepts of a comma-separated list of them;
    /// later calls move to the next member when one cannot be reached.
    pub async fn connect(address: &str) -> Result<Self, ApiError> {
        Ok(Self {
            targets: Targets::connect(address, pb_client).await?,
        })
    }

    /// A client that connects on its first call, and reconnects after a
    /// failure; `address` may list several members, comma-separated.
    pub fn connect_lazy(address: &str) -> Result<Self, ApiError> {
        Ok(Self {
            targets: Targets::lazy(address, pb_client)?,
        })
    }

    /// A client on an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            targets: Targets::single(pb_client(channel)),
        }
    }

    /// Stores a new object; returns it as stored.
    pub async fn create(&self, object: Object) -> Result<Object, ApiError> {
        let request = pb::CreateRequest {
            object: Some(object.into()),
        };
        self.targets
            .call(Repeat::Unsafe, |mut client| {
                let request = request.clone();
                async move { decode_reply(client.create(request).await?.into_inner()) }
            })
            .await
    }

    /// Reads one object.
    pub async fn get(&self, kind: Kind, name: &str) -> Result<Object, ApiError> {
        let request = pb::GetRequest {
            kind: kind_to_pb(Some(kind)),
            name: name.to_owned(),
        };
        self.targets
            .call(Repeat::Safe, |mut client| {
                let request = request.clone();
                async move { decode_reply(client.get(request).await?.into_inner()) }
            })
            .await
    }

    /// Reads every object of a kind.
    pub async fn list(&self, kind: Kind) -> Result<ObjectList, ApiError> {
        let request = pb::ListRequest {
            kind: kind_to_pb(Some(kind)),
        };
        self.list_request(request).await
    }

    /// Reads every object of every kind at one version (a consistent
    /// snapshot of the whole state, e.g. for a backup).
    pub async fn list_all(&self) -> Result<ObjectList, ApiError> {
        let request = pb::ListRequest {
            kind: kind_to_pb(None),
        };
        self.list_request(request).await
    }

    async fn list_request(&self, request: pb::ListRequest) -> Result<ObjectList, ApiError> {
        self.targets
            .call(Repeat::Safe, |mut client| async move {
                decode_reply(client.list(request).await?.into_inner())
            })
            .await
    }

    /// Replaces an object if `meta.resource_version` is still current
    /// ([`ApiError::Aborted`] otherwise); returns it as stored.
    pub async fn update(&self, object: Object) -> Result<Object, ApiError> {
        let request = pb::UpdateRequest {
            object: Some(object.into()),
        };
        self.targets
            .call(Repeat::Unsafe, |mut client| {
                let request = request.clone();
                async move { decode_reply(client.update(request).await?.into_inner()) }
            })
            .await
    }

    /// Deletes an object, if still at `expected_resource_version` when
    /// given; returns it as it was. A node with VMs placed on it is
    /// refused ([`ApiError::FailedPrecondition`] naming them): see
    /// [`Self::delete_forced`].
    pub async fn delete(
        &self,
        kind: Kind,
        name: &str,
        expected_resource_version: Option<u64>,
    ) -> Result<Object, ApiError> {
        self.delete_request(kind, name, expected_resource_version, false)
            .await
    }

    /// [`Self::delete`], but a node is deleted even with VMs placed on it;
    /// the control plane then moves them once its agent has had time to
    /// stop them.
    pub async fn delete_forced(
        &self,
        kind: Kind,
        name: &str,
        expected_resource_version: Option<u64>,
    ) -> Result<Object, ApiError> {
        self.delete_request(kind, name, expected_resource_version, true)
            .await
    }

    async fn delete_request(
        &self,
        kind: Kind,
        name: &str,
        expected_resource_version: Option<u64>,
        force: bool,
    ) -> Result<Object, ApiError> {
        let request = pb::DeleteRequest {
            kind: kind_to_pb(Some(kind)),
            name: name.to_owned(),
            expected_resource_version,
            force,
        };
        self.targets
            .call(Repeat::Unsafe, |mut client| {
                let request = request.clone();
                async move { decode_reply(client.delete(request).await?.into_inner()) }
            })
            .await
    }

    /// Streams the changes to objects of `kind` (every kind when `None`)
    /// after `from_resource_version` (from now on when 0).
    ///
    /// When the stream breaks (the member serving it is gone), it is
    /// resumed on another member after the last version given, with no
    /// gap and no event twice (see `watch.rs`); `OUT_OF_RANGE` still
    /// ends it, so the caller re-lists. A watch from 0 resumes once it
    /// has given an event.
    pub async fn watch(
        &self,
        kind: Option<Kind>,
        from_resource_version: u64,
    ) -> Result<WatchStream, ApiError> {
        let targets = self.targets.clone();
        let open: Open<Object> = Box::new(move |index, from| {
            let mut client = targets.client(index);
            let request = pb::WatchRequest {
                kind: kind_to_pb(kind),
                from_resource_version: from,
            };
            Box::pin(async move {
                let events = client.watch(request).await?.into_inner();
                Ok(
                    Box::pin(events.map(|event| decode_reply::<_, WatchEvent>(event?)))
                        as WatchStream,
                )
            })
        });
        let (events, serving) = self
            .targets
            .call_indexed(Repeat::Safe, |client| {
                let request = pb::WatchRequest {
                    kind: kind_to_pb(kind),
                    from_resource_version,
                };
                let mut client = client;
                async move { Ok(client.watch(request).await?.into_inner()) }
            })
            .await?;
        let events: WatchStream =
            Box::pin(events.map(|event| decode_reply::<_, WatchEvent>(event?)));
        Ok(resuming(
            self.targets.clone(),
            open,
            serving,
            (from_resource_version, Start::Changes),
            events,
        ))
    }
}
