//! Raft traffic between members over gRPC (basalt-api's Raft service):
//! [`Network`] sends openraft's requests, [`RaftService`] receives them.
//! Payloads are openraft's own request and response types in JSON. The
//! same service carries the writes followers forward to the leader
//! ([`forward`]).
//!
//! Invariants:
//! - a payload a peer sends is decoded before openraft sees it; one that
//!   does not decode is refused with `INVALID_ARGUMENT`, never a panic;
//! - every AppendEntries sent carries a commit index no newer than the
//!   newest entry durable in this member's log ([`DurableLog`]): the
//!   leader's own entries are sent before its fsync, and openraft counts
//!   its unsynced copy in the quorum, so its commit index alone could let
//!   a follower apply an entry that one copy holds (decision 57).

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use basalt_api::{ApiError, RaftApi, RaftClient};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::admin::AdminService;
use crate::raft_types::{NodeId, Raft, TypeConfig};
use crate::store::{DurableLog, ElectionGuard};

pub mod forward;

/// How much of an empty AppendEntries' time budget it may spend waiting
/// for the leader's fsync to cover its whole commit index (a divisor of
/// the RPC's time to live).
const COMMIT_WAIT_SHARE: u32 = 4;

/// Opens a [`PeerConnection`] per peer for openraft.
#[derive(Debug, Clone)]
pub struct Network {
    durable: DurableLog,
}

impl Network {
    /// A network whose AppendEntries carry commit indexes clamped to
    /// what `durable` (this member's log) has fsynced.
    pub fn new(durable: DurableLog) -> Self {
        Self { durable }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection {
        PeerConnection {
            target,
            address: node.addr.clone(),
            client: RaftClient::connect_lazy(&node.addr),
            durable: self.durable.clone(),
        }
    }
}

/// openraft's connection to one peer.
#[derive(Debug)]
pub struct PeerConnection {
    target: NodeId,
    address: String,
    /// `Err` when the peer's address cannot be a URI.
    client: Result<RaftClient, ApiError>,
    durable: DurableLog,
}

/// A transport failure, for openraft's `Unreachable`/`NetworkError`.
#[derive(Debug, thiserror::Error)]
#[error("raft call to member {target} at {address}: {reason}")]
struct TransportError {
    target: NodeId,
    address: String,
    reason: String,
}

impl PeerConnection {
    /// Sends one call and decodes `Result<Resp, E>` from the reply.
    async fn call<Req, Resp, E, F, Fut>(
        &self,
        request: &Req,
        option: &RPCOption,
        send: F,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: Error + DeserializeOwned,
        F: FnOnce(RaftClient, Vec<u8>) -> Fut,
        Fut: Future<Output = Result<Vec<u8>, ApiError>>,
    {
        let transport = |reason: String| TransportError {
            target: self.target,
            address: self.address.clone(),
            reason,
        };
        let client = match &self.client {
            Ok(client) => client.clone(),
            Err(err) => {
                return Err(RPCError::Unreachable(Unreachable::new(&transport(
                    err.to_string(),
                ))));
            }
        };
        let payload = serde_json::to_vec(request)
            .map_err(|e| RPCError::Network(NetworkError::new(&transport(e.to_string()))))?;
        let ttl = option.hard_ttl().max(Duration::from_millis(50));
        let reply = match tokio::time::timeout(ttl, send(client, payload)).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&transport(format!(
                    "timed out after {ttl:?}"
                )))));
            }
            Ok(Err(ApiError::Unavailable { reason })) => {
                return Err(RPCError::Unreachable(Unreachable::new(&transport(reason))));
            }
            Ok(Err(err)) => {
                return Err(RPCError::Network(NetworkError::new(&transport(
                    err.to_string(),
                ))));
            }
            Ok(Ok(reply)) => reply,
        };
        let decoded: Result<Resp, E> = serde_json::from_slice(&reply).map_err(|e| {
            RPCError::Network(NetworkError::new(&transport(format!(
                "undecodable reply: {e}"
            ))))
        })?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // Entries go at once (the follower's fsync overlaps the
        // leader's); a message with nothing else to carry (a heartbeat, a
        // new commit index) waits a little for the leader's fsync, so it
        // usually carries the whole index.
        let wait = if rpc.entries.is_empty() {
            option.hard_ttl() / COMMIT_WAIT_SHARE
        } else {
            Duration::ZERO
        };
        rpc.leader_commit = self.durable.clamp_commit(rpc.leader_commit, wait).await;
        self.call(&rpc, &option, |client, payload| async move {
            client.append_entries(payload).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(&rpc, &option, |client, payload| async move {
            client.install_snapshot(payload).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, &option, |client, payload| async move {
            client.vote(payload).await
        })
        .await
    }
}

/// Serves peers' Raft calls to the local [`Raft`].
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    /// Told of every AppendEntries from the current leader on arrival.
    guard: Option<Arc<ElectionGuard>>,
    /// Takes the writes followers forward ([`forward`]).
    admin: Option<AdminService>,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService").finish_non_exhaustive()
    }
}

impl RaftService {
    /// Serves `raft`.
    pub fn new(raft: Raft) -> Self {
        Self {
            raft,
            guard: None,
            admin: None,
        }
    }

    /// Serves the writes followers forward (`Forward`) through `admin`,
    /// each as a write through its admin API.
    pub fn with_writes(mut self, admin: AdminService) -> Self {
        self.admin = Some(admin);
        self
    }

    /// Tells `guard` of each AppendEntries from a committed leader of
    /// this member's term or a later one as it arrives, before openraft's
    /// core takes it (which may be late: see [`ElectionGuard`]).
    pub fn with_guard(mut self, guard: Arc<ElectionGuard>) -> Self {
        self.guard = Some(guard);
        self
    }
}

fn decode<T: DeserializeOwned>(payload: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(payload)
        .map_err(|e| ApiError::invalid("payload", format!("not a {what}: {e}")))
}

fn encode<T: Serialize>(reply: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(reply).map_err(|e| ApiError::Internal {
        reason: format!("encoding a raft reply: {e}"),
    })
}

impl RaftApi for RaftService {
    async fn append_entries(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        let request: AppendEntriesRequest<TypeConfig> = decode(&payload, "append-entries request")?;
        if let Some(guard) = &self.guard
            && request.vote.is_committed()
            && request.vote.leader_id().term
                >= self.raft.server_metrics().borrow().vote.leader_id().term
        {
            guard.heard_leader();
        }
        let reply = self.raft.append_entries(request).await;
        encode(&reply)
    }

    async fn vote(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        let request: VoteRequest<NodeId> = decode(&payload, "vote request")?;
        encode(&self.raft.vote(request).await)
    }

    async fn install_snapshot(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        let request: InstallSnapshotRequest<TypeConfig> =
            decode(&payload, "install-snapshot request")?;
        encode(&self.raft.install_snapshot(request).await)
    }

    async fn forward(&self, payload: Vec<u8>) -> Result<Vec<u8>, ApiError> {
        match &self.admin {
            Some(admin) => forward::serve(admin, &payload).await,
            None => Err(ApiError::FailedPrecondition {
                reason: "this member does not take forwarded writes".into(),
            }),
        }
    }
}
