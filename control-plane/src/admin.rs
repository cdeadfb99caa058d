//! The admin service on a member: writes go through Raft on the leader
//! (a follower forwards them), Get and List are linearizable reads (read
//! index on the leader; a follower forwards them), Watch streams the
//! member's own recent changes.
//!
//! Invariants:
//! - only the leader assigns a new object's `uid` and creation time, just
//!   before proposing it; a forwarded create carries none of them;
//! - a follower forwards each request at most to the member it believes
//!   leads, with a deadline; it never answers a write itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_api::{AdminApi, AdminClient, ApiError, Kind, Object, ObjectList, WatchStream};
use openraft::BasicNode;
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};

use crate::history::Change;
use crate::raft_types::{NodeId, Raft};
use crate::state::{Command, Outcome};
use crate::store::Shared;
use crate::tokens;

/// How long a forwarded request may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for a leader to be elected before answering
/// `UNAVAILABLE`.
const LEADER_WAIT: Duration = Duration::from_secs(3);
/// How many changes a watch reads from the history at a time.
const WATCH_BATCH: usize = 256;

/// The admin service of one member.
#[derive(Clone)]
pub struct AdminService {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    shared: Arc<Shared>,
    peers: Mutex<HashMap<String, AdminClient>>,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

/// A request a follower may forward to the leader.
// Built once per request and moved: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Request {
    Write(Command),
    Get(Kind, String),
    List(Kind),
    /// Every object of every kind, at one applied index.
    ListAll,
}

#[allow(clippy::large_enum_variant)]
enum Reply {
    Object(Object),
    List(ObjectList),
}

impl AdminService {
    /// The admin service of member `id`, on `raft` and its state machine.
    pub fn new(id: NodeId, raft: Raft, shared: Arc<Shared>) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                raft,
                shared,
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Proposes `command` if this member leads, else forwards it.
    pub(crate) async fn write(&self, command: Command) -> Result<Object, ApiError> {
        let inner = &self.inner;
        match self.leader().await? {
            Leader::Me => {}
            Leader::At(address) => {
                return object_of(self.forward(&address, Request::Write(command)).await?);
            }
        }
        let (proposal, secret) = tokens::seal(stamp(command.clone()))?;
        match inner.raft.client_write(proposal).await {
            Ok(response) => match response.data {
                Outcome::Done(Object::Token(mut token)) if secret.is_some() => {
                    token.secret = secret;
                    Ok(Object::Token(token))
                }
                Outcome::Done(object) => Ok(object),
                Outcome::Refused(refusal) => Err(refusal.into()),
                Outcome::Nothing => Err(ApiError::Internal {
                    reason: "the state machine answered a write with nothing".into(),
                }),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(to))) => {
                let address = leader_address(&to)?;
                object_of(self.forward(&address, Request::Write(command)).await?)
            }
            Err(err) => Err(ApiError::Unavailable {
                reason: format!("raft: {err}"),
            }),
        }
    }

    /// Runs `read` on the local state after a read-index check on the
    /// leader, or forwards the request.
    async fn read(&self, request: Request) -> Result<Reply, ApiError> {
        match self.leader().await? {
            Leader::Me => {}
            Leader::At(address) => return self.forward(&address, request).await,
        }
        match self.inner.raft.ensure_linearizable().await {
            Ok(_) => {}
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(to))) => {
                let address = leader_address(&to)?;
                return self.forward(&address, request).await;
            }
            Err(err) => {
                return Err(ApiError::Unavailable {
                    reason: format!("cannot confirm leadership: {err}"),
                });
            }
        }
        let machine = self.inner.shared.read();
        // This member leads (it just confirmed it): mark its own object.
        let me = self.inner.id;
        let marked = |object: &Object| match object {
            Object::Member(member) => Object::Member(basalt_api::Member {
                leader: member.id == me,
                ..member.clone()
            }),
            other => other.clone(),
        };
        match request {
            Request::Get(kind, name) => match machine.state.get(kind, &name) {
                Some(object) => Ok(Reply::Object(marked(object))),
                None => Err(ApiError::NotFound { kind, name }),
            },
            Request::List(kind) => Ok(Reply::List(ObjectList {
                objects: machine.state.list(kind).map(marked).collect(),
                resource_version: machine.applied_index(),
            })),
            Request::ListAll => Ok(Reply::List(ObjectList {
                objects: machine.state.objects().map(marked).collect(),
                resource_version: machine.applied_index(),
            })),
            Request::Write(_) => Err(ApiError::Internal {
                reason: "a write took the read path".into(),
            }),
        }
    }

    /// The local state machine (for reads that need no read index, and
    /// for the leader's controllers).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// This member's Raft handle.
    pub(crate) fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Who leads, waiting a little for an election to end.
    pub(crate) async fn leader(&self) -> Result<Leader, ApiError> {
        let inner = &self.inner;
        let metrics = inner
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map_err(|_| ApiError::Unavailable {
                reason: "no control-plane leader is elected; retry".into(),
            })?;
        let Some(leader) = metrics.current_leader else {
            return Err(ApiError::Unavailable {
                reason: "no control-plane leader is elected; retry".into(),
            });
        };
        if leader == inner.id {
            return Ok(Leader::Me);
        }
        match metrics.membership_config.membership().get_node(&leader) {
            Some(node) => Ok(Leader::At(node.addr.clone())),
            None => Err(ApiError::NotLeader { leader: None }),
        }
    }

    async fn forward(&self, address: &str, request: Request) -> Result<Reply, ApiError> {
        let client = {
            let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
            match peers.get(address) {
                Some(client) => client.clone(),
                None => {
                    let client = AdminClient::connect_lazy(address)?;
                    peers.insert(address.to_owned(), client.clone());
                    client
                }
            }
        };
        let call = async {
            match request {
                Request::Write(Command::Create(object)) => {
                    client.create(object).await.map(Reply::Object)
                }
                Request::Write(Command::Update(object)) => {
                    client.update(object).await.map(Reply::Object)
                }
                Request::Write(Command::Delete {
                    kind,
                    name,
                    expected_resource_version,
                }) => client
                    .delete(kind, &name, expected_resource_version)
                    .await
                    .map(Reply::Object),
                Request::Write(Command::Register(_)) => Err(ApiError::Unavailable {
                    reason: "leadership changed during a registration; retry".into(),
                }),
                // Batches come from the leader's own controllers only.
                Request::Write(Command::Batch(_)) => Err(ApiError::Unavailable {
                    reason: "leadership changed during a batched write; retry".into(),
                }),
                Request::Get(kind, name) => client.get(kind, &name).await.map(Reply::Object),
                Request::List(kind) => client.list(kind).await.map(Reply::List),
                Request::ListAll => client.list_all().await.map(Reply::List),
            }
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Unavailable {
                reason: format!(
                    "the leader at {address} did not answer within {FORWARD_TIMEOUT:?}"
                ),
            }),
        }
    }
}

/// Who leads the cluster, as a member sees it.
pub(crate) enum Leader {
    /// This member.
    Me,
    /// The member at this address.
    At(String),
}

fn leader_address(to: &ForwardToLeader<NodeId, BasicNode>) -> Result<String, ApiError> {
    match &to.leader_node {
        Some(node) => Ok(node.addr.clone()),
        None => Err(ApiError::Unavailable {
            reason: "leadership is changing; retry".into(),
        }),
    }
}

fn object_of(reply: Reply) -> Result<Object, ApiError> {
    match reply {
        Reply::Object(object) => Ok(object),
        Reply::List(_) => Err(ApiError::Internal {
            reason: "a forwarded write answered with a list".into(),
        }),
    }
}

/// Fills in what only the leader decides for a new object: its uid and
/// creation time.
pub(crate) fn stamp(mut command: Command) -> Command {
    // A member's `leader` is filled on reads, never stored.
    if let Command::Create(Object::Member(member)) | Command::Update(Object::Member(member)) =
        &mut command
    {
        member.leader = false;
    }
    match command {
        Command::Create(mut object) => {
            let meta = object.meta_mut();
            meta.uid = uuid::Uuid::new_v4().to_string();
            meta.created_at_unix_ms = now_unix_ms();
            meta.resource_version = 0;
            meta.generation = 0;
            Command::Create(object)
        }
        other => other,
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl AdminApi for AdminService {
    async fn create(&self, object: Object) -> Result<Object, ApiError> {
        self.write(Command::Create(object)).await
    }

    async fn get(&self, kind: Kind, name: String) -> Result<Object, ApiError> {
        match self.read(Request::Get(kind, name)).await? {
            Reply::Object(object) => Ok(object),
            Reply::List(_) => Err(ApiError::Internal {
                reason: "a get answered with a list".into(),
            }),
        }
    }

    async fn list(&self, kind: Kind) -> Result<ObjectList, ApiError> {
        match self.read(Request::List(kind)).await? {
            Reply::List(list) => Ok(list),
            Reply::Object(_) => Err(ApiError::Internal {
                reason: "a list answered with one object".into(),
            }),
        }
    }

    async fn list_all(&self) -> Result<ObjectList, ApiError> {
        match self.read(Request::ListAll).await? {
            Reply::List(list) => Ok(list),
            Reply::Object(_) => Err(ApiError::Internal {
                reason: "a list answered with one object".into(),
            }),
        }
    }

    async fn update(&self, object: Object) -> Result<Object, ApiError> {
        self.write(Command::Update(object)).await
    }

    async fn delete(
        &self,
        kind: Kind,
        name: String,
        expected_resource_version: Option<u64>,
    ) -> Result<Object, ApiError> {
        self.write(Command::Delete {
            kind,
            name,
            expected_resource_version,
        })
        .await
    }

    async fn watch(
        &self,
        kind: Option<Kind>,
        from_resource_version: u64,
    ) -> Result<WatchStream, ApiError> {
        let from = (from_resource_version != 0).then_some(from_resource_version);
        let changes = changes(Arc::clone(&self.inner.shared), kind, from)?;
        Ok(Box::pin(futures::StreamExt::map(changes, |change| {
            change.map(|c| c.to_event())
        })))
    }
}

/// The changes to objects of `kind` (any when `None`) after version
/// `from` (from now on when `None`), from this member's history: a stream that
/// waits for new changes and ends with `OUT_OF_RANGE` when it falls
/// behind what the history keeps.
pub(crate) fn changes(
    shared: Arc<Shared>,
    kind: Option<Kind>,
    from: Option<u64>,
) -> Result<impl futures::Stream<Item = Result<Change, ApiError>> + Send + 'static, ApiError> {
    let applied = shared.subscribe();
    let cursor = {
        let machine = shared.read();
        let cursor = from.unwrap_or_else(|| machine.applied_index());
        if cursor < machine.history.oldest() {
            return Err(ApiError::OutOfRange {
                requested: cursor,
                oldest: machine.history.oldest(),
            });
        }
        cursor
    };
    let state = WatchState {
        shared,
        applied,
        kind,
        cursor,
        pending: Default::default(),
        failed: false,
    };
    Ok(futures::stream::unfold(state, next_change))
}

/// Where a watch stream is.
struct WatchState {
    shared: Arc<Shared>,
    applied: tokio::sync::watch::Receiver<u64>,
    kind: Option<Kind>,
    /// Every change up to here has been sent (or filtered out).
    cursor: u64,
    pending: std::collections::VecDeque<Change>,
    failed: bool,
}

async fn next_change(mut state: WatchState) -> Option<(Result<Change, ApiError>, WatchState)> {
    if state.failed {
        return None;
    }
    loop {
        if let Some(change) = state.pending.pop_front() {
            return Some((Ok(change), state));
        }
        // Mark the current applied index seen before reading the history,
        // so a change applied after the read wakes the wait below.
        state.applied.borrow_and_update();
        let read = {
            let machine = state.shared.read();
            match machine.history.since(state.cursor, state.kind, WATCH_BATCH) {
                Ok(changes) if changes.is_empty() => {
                    // Nothing of this kind: everything applied so far is seen.
                    state.cursor = state.cursor.max(machine.applied_index());
                    Ok(Vec::new())
                }
                other => other,
            }
        };
        match read {
            Err(oldest) => {
                state.failed = true;
                let requested = state.cursor;
                return Some((Err(ApiError::OutOfRange { requested, oldest }), state));
            }
            Ok(changes) if changes.is_empty() => {
                if state.applied.changed().await.is_err() {
                    return None;
                }
            }
            Ok(changes) => {
                if let Some(last) = changes.last() {
                    state.cursor = last.index;
                }
                state.pending.extend(changes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{Member, ObjectMeta};

    use super::*;

    #[test]
    fn a_written_member_never_stores_the_read_only_leader_flag() {
        let member = Member {
            meta: ObjectMeta::named("m2"),
            id: 2,
            address: "127.0.0.1:7402".into(),
            voter: false,
            leader: true,
        };
        for command in [
            Command::Create(Object::Member(member.clone())),
            Command::Update(Object::Member(member.clone())),
        ] {
            match stamp(command) {
                Command::Create(Object::Member(m)) | Command::Update(Object::Member(m)) => {
                    assert!(!m.leader);
                    assert_eq!((m.id, m.address.as_str()), (2, "127.0.0.1:7402"));
                }
                other => panic!("stamp changed the command: {other:?}"),
            }
        }
    }
}
