//! [`AgentClient`]: the agent service, in domain types, on one or several
//! control-plane members (see [`super::targets`]).

use std::future::Future;
use std::pin::Pin;

use futures::StreamExt;
use tonic::transport::Channel;

use super::decode_reply;
use super::targets::{Repeat, Targets};
use super::watch::{Open, Start, resuming};
use crate::pb;
use crate::pb::agent_client::AgentClient as PbAgentClient;
use crate::server::{MAX_MESSAGE_BYTES, WatchStream};
use crate::{
    ApiError, Heartbeat, HeartbeatAck, Placement, Registered, Registration, ReplicaMark,
    StatusReport, Volume, VolumeReport, WatchEvent,
};

/// Opens one of a node's watches on one member: (client, node, from).
type OpenOne<T> = fn(
    PbAgentClient<Channel>,
    String,
    u64,
) -> Pin<Box<dyn Future<Output = Result<WatchStream<T>, ApiError>> + Send>>;

fn open_placements(
    mut client: PbAgentClient<Channel>,
    node: String,
    from_resource_version: u64,
) -> Pin<Box<dyn Future<Output = Result<WatchStream<Placement>, ApiError>> + Send>> {
    Box::pin(async move {
        let request = pb::WatchPlacementsRequest {
            node,
            from_resource_version,
        };
        let events = client.watch_placements(request).await?.into_inner();
        Ok(
            Box::pin(events.map(|event| decode_reply::<_, WatchEvent<Placement>>(event?)))
                as WatchStream<Placement>,
        )
    })
}

fn open_volumes(
    mut client: PbAgentClient<Channel>,
    node: String,
    from_resource_version: u64,
) -> Pin<Box<dyn Future<Output = Result<WatchStream<Volume>, ApiError>> + Send>> {
    Box::pin(async move {
        let request = pb::WatchVolumesRequest {
            node,
            from_resource_version,
        };
        let events = client.watch_volumes(request).await?.into_inner();
        Ok(
            Box::pin(events.map(|event| decode_reply::<_, WatchEvent<Volume>>(event?)))
                as WatchStream<Volume>,
        )
    })
}

/// A client of the agent service. Cheap to clone; calls may run concurrently.
#[derive(Debug, Clone)]
pub struct AgentClient {
    targets: Targets<PbAgentClient<Channel>>,
}

fn pb_client(channel: Channel) -> PbAgentClient<Channel> {
    PbAgentClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl AgentClient {
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

    /// Registers this node with a join token.
    pub async fn register(&self, registration: Registration) -> Result<Registered, ApiError> {
        let request = pb::RegisterRequest::from(registration);
        self.targets
            .call(Repeat::Unsafe, |mut client| {
                let request = request.clone();
                async move { decode_reply(client.register(request).await?.into_inner()) }
            })
            .await
    }

    /// Renews this node's lease.
    pub async fn heartbeat(&self, heartbeat: Heartbeat) -> Result<HeartbeatAck, ApiError> {
        let request = pb::HeartbeatRequest::from(heartbeat);
        // A heartbeat renews a lease: repeating it is harmless.
        self.targets
            .call(Repeat::Safe, |mut client| {
                let request = request.clone();
                async move { Ok(client.heartbeat(request).await?.into_inner().into()) }
            })
            .await
    }

    /// Streams the changes to the placements that name `node` (the VM
    /// runs there, or it is a replica node) after
    /// `from_resource_version` (from now on when 0: first the placements
    /// as they are, then a bookmark).
    ///
    /// A broken stream resumes on another member like
    /// [`crate::AdminClient::watch`]'s, once past the bookmark.
    pub async fn watch_placements(
        &self,
        node: &str,
        from_resource_version: u64,
    ) -> Result<WatchStream<Placement>, ApiError> {
        self.watch_node(node, from_resource_version, open_placements)
            .await
    }

    /// Streams the changes to node `node`'s volumes (see
    /// [`crate::AgentApi::watch_volumes`]) above `from_resource_version`
    /// (from now on when 0: first the volumes as they are, then a
    /// bookmark); a broken stream resumes on another member like
    /// [`Self::watch_placements`]'s.
    pub async fn watch_volumes(
        &self,
        node: &str,
        from_resource_version: u64,
    ) -> Result<WatchStream<Volume>, ApiError> {
        self.watch_node(node, from_resource_version, open_volumes)
            .await
    }

    /// One of node `node`'s watches above `from_resource_version`, opened
    /// on the first member that answers by `open_one` and resumed on
    /// another member by it when the stream breaks.
    async fn watch_node<T: Send + 'static>(
        &self,
        node: &str,
        from_resource_version: u64,
        open_one: OpenOne<T>,
    ) -> Result<WatchStream<T>, ApiError> {
        let targets = self.targets.clone();
        let owned = node.to_owned();
        let open: Open<T> =
            Box::new(move |index, from| open_one(targets.client(index), owned.clone(), from));
        let (events, serving) = self
            .targets
            .call_indexed(Repeat::Safe, |client| {
                open_one(client, node.to_owned(), from_resource_version)
            })
            .await?;
        Ok(resuming(
            self.targets.clone(),
            open,
            serving,
            (from_resource_version, Start::ListingThenBookmark),
            events,
        ))
    }

    /// Reports what this node observed about one VM.
    pub async fn report_status(&self, report: StatusReport) -> Result<(), ApiError> {
        let request = pb::ReportStatusRequest::from(report);
        self.targets
            .call(Repeat::Unsafe, |mut client| {
                let request = request.clone();
                async move {
                    client.report_status(request).await?;
                    Ok(())
                }
            })
            .await
    }

    /// Has the control plane record a replica of a VM outdated, or in
    /// sync again (see [`ReplicaMark`]); `Ok` once committed.
    pub async fn mark_replica(&self, mark: ReplicaMark) -> Result<(), ApiError> {
        let request = pb::MarkReplicaRequest::from(mark);
        self.targets
            .call(Repeat::Unsafe, |mut client| {
                let request = request.clone();
                async move {
                    client.mark_replica(request).await?;
                    Ok(())
                }
            })
            .await
    }

    /// Reports how the copies of a volume this node is the primary of
    /// stand (see [`VolumeReport`]); `Ok(true)` when that changed the
    /// volume's status.
    pub async fn report_volume(&self, report: VolumeReport) -> Result<bool, ApiError> {
        let request = pb::ReportVolumeRequest::from(report);
        // A report is idempotent: sending it again records the same.
        self.targets
            .call(Repeat::Safe, |mut client| {
                let request = request.clone();
                async move { Ok(client.report_volume(request).await?.into_inner().changed) }
            })
            .await
    }
}
