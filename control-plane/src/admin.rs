//! The admin service on a member: writes go through Raft on the leader
//! (a follower forwards them), Get and List are linearizable reads (read
//! index on the leader; a follower forwards them), Watch streams the
//! member's own recent changes.
//!
//! Invariants:
//! - only the leader assigns a new object's `uid` and creation time, just
//!   before proposing it; a forwarded create carries none of them;
//! - a follower forwards each request only to the member it believes
//!   leads, with a deadline; it never answers a write itself;
//! - a request is sent again (to the next leader) only when it cannot have
//!   taken effect: a read, a write whose connection to the leader was
//!   never made, or a write this member's Raft refused as not leading.
//!   A write whose outcome is unknown (the leader died or was deposed
//!   while it was on its way) answers `UNAVAILABLE`, never a guess.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use basalt_api::{AdminApi, AdminClient, ApiError, Kind, Object, ObjectList, WatchStream};
use openraft::error::{CheckIsLeaderError, RaftError};

use crate::history::Change;
use crate::network::forward::Forwarder;
use crate::proposer::{ProposeError, Proposer};
use crate::raft_types::{NodeId, Raft, ServerMetrics};
use crate::state::{Command, Outcome};
use crate::store::Shared;
use crate::tokens;

/// How long a forwarded request may take. A forward also ends as soon as
/// this member sees another leader (or none) than the one it forwarded to.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a leader (an election, or a leader that
/// could not be reached being replaced) before answering `UNAVAILABLE`.
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
    /// Batches this member's proposals while it leads.
    proposer: Proposer,
    shared: Arc<Shared>,
    peers: Mutex<HashMap<String, AdminClient>>,
    /// Batches the writes this member forwards, per leader address.
    forwarders: Mutex<HashMap<String, Forwarder>>,
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
#[derive(Clone)]
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
    /// Starts the proposal batching task: call it on a tokio runtime.
    pub fn new(id: NodeId, raft: Raft, shared: Arc<Shared>) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                proposer: Proposer::start(raft.clone()),
                raft,
                shared,
                peers: Mutex::new(HashMap::new()),
                forwarders: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Proposes `command` if this member leads, else forwards it.
    pub(crate) async fn write(&self, command: Command) -> Result<Object, ApiError> {
        object_of(self.route(Request::Write(command)).await?)
    }

    /// Runs `read` on the local state after a read-index check on the
    /// leader, or forwards the request.
    async fn read(&self, request: Request) -> Result<Reply, ApiError> {
        self.route(request).await
    }

    /// Answers `request` here if this member leads, else forwards it to
    /// the leader; when that attempt cannot have had an effect (see the
    /// module's invariants), waits for a different leader and tries again,
    /// for up to [`LEADER_WAIT`] in all.
    async fn route(&self, request: Request) -> Result<Reply, ApiError> {
        let started = Instant::now();
        let mut failed: Option<LeaderTerm> = None;
        loop {
            let wait = LEADER_WAIT.saturating_sub(started.elapsed());
            let (leader, seen) = self.leader_other_than(failed, wait).await?;
            let attempt = match leader {
                Leader::Me => self.here(request.clone()).await,
                Leader::At(address) => self.forward(&address, seen, request.clone()).await,
            };
            match attempt {
                Ok(reply) => return Ok(reply),
                Err(Attempt::Retry(err)) => {
                    if started.elapsed() >= LEADER_WAIT {
                        return Err(err);
                    }
                    tracing::debug!(error = %err, leader = seen.0, term = seen.1, "no effect; trying the next leader");
                    failed = Some(seen);
                }
                Err(Attempt::Failed(err)) => return Err(err),
            }
        }
    }

    /// Answers `request` as the leader: proposes a write, or reads the
    /// local state after a read-index check.
    async fn here(&self, request: Request) -> Result<Reply, Attempt> {
        let command = match request {
            Request::Write(command) => command,
            read => return self.read_here(read).await,
        };
        let (proposal, secret) = tokens::seal(stamp(command))?;
        match self.inner.proposer.propose(proposal).await {
            Ok(outcome) => match outcome {
                Outcome::Done(Object::Token(mut token)) if secret.is_some() => {
                    token.secret = secret;
                    Ok(Reply::Object(Object::Token(token)))
                }
                Outcome::Done(object) => Ok(Reply::Object(object)),
                Outcome::Refused(refusal) => Err(Attempt::Failed(refusal.into())),
                Outcome::Nothing | Outcome::Many(_) => Err(Attempt::Failed(ApiError::Internal {
                    reason: "the state machine answered a write with nothing".into(),
                })),
            },
            // Refused before it was proposed (this member no longer
            // leads), or dropped from the log by a new leader: the next
            // leader gets it.
            Err(ProposeError::NotLeader) => Err(Attempt::Retry(ApiError::Unavailable {
                reason: "leadership is changing; retry".into(),
            })),
            Err(err) => Err(Attempt::Failed(ApiError::Unavailable {
                reason: err.to_string(),
            })),
        }
    }

    /// Answers a read as the leader, after a read-index check.
    async fn read_here(&self, request: Request) -> Result<Reply, Attempt> {
        match self.inner.raft.ensure_linearizable().await {
            Ok(_) => {}
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                return Err(Attempt::Retry(ApiError::Unavailable {
                    reason: "leadership is changing; retry".into(),
                }));
            }
            Err(err) => {
                // A read has no effect: another leader may answer it.
                return Err(Attempt::Retry(ApiError::Unavailable {
                    reason: format!("cannot confirm leadership: {err}"),
                }));
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
                None => Err(Attempt::Failed(ApiError::NotFound { kind, name })),
            },
            Request::List(kind) => Ok(Reply::List(ObjectList {
                objects: machine.state.list(kind).map(marked).collect(),
                resource_version: machine.applied_index(),
            })),
            Request::ListAll => Ok(Reply::List(ObjectList {
                objects: machine.state.objects().map(marked).collect(),
                resource_version: machine.applied_index(),
            })),
            Request::Write(_) => Err(Attempt::Failed(ApiError::Internal {
                reason: "a write took the read path".into(),
            })),
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
        Ok(self.leader_other_than(None, LEADER_WAIT).await?.0)
    }

    /// Who leads, waiting up to `wait` for a leader other than `failed`
    /// (a request to it could not be answered): the same member in a
    /// later term counts as another leader.
    async fn leader_other_than(
        &self,
        failed: Option<LeaderTerm>,
        wait: Duration,
    ) -> Result<(Leader, LeaderTerm), ApiError> {
        let inner = &self.inner;
        let unavailable = || ApiError::Unavailable {
            reason: match failed {
                None => "no control-plane leader is elected; retry".into(),
                Some((id, term)) => format!(
                    "member {id} (leader in term {term}) cannot be reached and no other leader is elected yet; retry"
                ),
            },
        };
        // The server metrics change only with the vote, the role, the
        // leader or the membership: waiting on them wakes nobody per log
        // entry (openraft sends its full metrics on every turn of its
        // core, and each request waiting on those woke with each).
        let mut server = inner.raft.server_metrics();
        let known = |m: &ServerMetrics| {
            m.current_leader
                .is_some_and(|leader| Some((leader, m.vote.leader_id().term)) != failed)
        };
        let (leader, seen, address) = {
            let metrics = match tokio::time::timeout(wait, server.wait_for(known)).await {
                Ok(Ok(metrics)) => metrics,
                Ok(Err(_)) | Err(_) => return Err(unavailable()),
            };
            let Some(leader) = metrics.current_leader else {
                return Err(unavailable());
            };
            let address = metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|node| node.addr.clone());
            (leader, (leader, metrics.vote.leader_id().term), address)
        };
        if leader == inner.id {
            return Ok((Leader::Me, seen));
        }
        match address {
            Some(address) => Ok((Leader::At(address), seen)),
            None => Err(ApiError::NotLeader { leader: None }),
        }
    }

    /// The forwarder of writes to the member at `address`.
    fn forwarder(&self, address: &str) -> Result<Forwarder, ApiError> {
        let mut forwarders = self
            .inner
            .forwarders
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(forwarder) = forwarders.get(address) {
            return Ok(forwarder.clone());
        }
        let forwarder = Forwarder::start(address)?;
        forwarders.insert(address.to_owned(), forwarder.clone());
        Ok(forwarder)
    }

    /// Sends `request` to the leader `seen` at `address`. Ends early when
    /// this member sees another leader (or none): the answer may never
    /// come.
    async fn forward(
        &self,
        address: &str,
        seen: LeaderTerm,
        request: Request,
    ) -> Result<Reply, Attempt> {
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
        let is_read = !matches!(request, Request::Write(_));
        let call = async {
            match request {
                // Writes that queue share one call (decision 62).
                Request::Write(
                    command @ (Command::Create(_) | Command::Update(_) | Command::Delete { .. }),
                ) => self
                    .forwarder(address)?
                    .write(command)
                    .await
                    .map(Reply::Object),
                Request::Write(Command::Register(_)) => Err(ApiError::Unavailable {
                    reason: "leadership changed during a registration; retry".into(),
                }),
                // Batches come from the leader's own controllers only.
                Request::Write(Command::Batch(_) | Command::Many(_)) => {
                    Err(ApiError::Unavailable {
                        reason: "leadership changed during a batched write; retry".into(),
                    })
                }
                Request::Get(kind, name) => client.get(kind, &name).await.map(Reply::Object),
                Request::List(kind) => client.list(kind).await.map(Reply::List),
                Request::ListAll => client.list_all().await.map(Reply::List),
            }
        };
        let mut server = self.inner.raft.server_metrics();
        let deposed = async move {
            let _ = server
                .wait_for(|m| m.current_leader != Some(seen.0) || m.vote.leader_id().term != seen.1)
                .await;
        };
        let result = tokio::select! {
            result = tokio::time::timeout(FORWARD_TIMEOUT, call) => match result {
                Ok(result) => result,
                Err(_) => Err(ApiError::Unavailable {
                    reason: format!(
                        "the leader at {address} did not answer within {FORWARD_TIMEOUT:?}"
                    ),
                }),
            },
            () = deposed => Err(ApiError::Unavailable {
                reason: format!(
                    "member {} at {address} stopped leading while it had the request; retry",
                    seen.0
                ),
            }),
        };
        match result {
            Ok(reply) => Ok(reply),
            // The leader was never reached, or a read (no effect) failed.
            Err(err) if never_sent(&err) || (is_read && is_transient(&err)) => {
                Err(Attempt::Retry(err))
            }
            Err(err) => Err(Attempt::Failed(transport_unavailable(err))),
        }
    }
}

/// A leader as seen by this member: its id and the term.
type LeaderTerm = (NodeId, u64);

/// How one attempt to answer a request failed.
enum Attempt {
    /// It cannot have had an effect: another leader may be asked.
    Retry(ApiError),
    /// The answer (or an unknown outcome): the caller gets it.
    Failed(ApiError),
}

impl From<ApiError> for Attempt {
    fn from(err: ApiError) -> Self {
        Self::Failed(err)
    }
}

/// Whether a call failed before a connection to the server existed, so
/// the server never saw it (tonic's connector reports "tcp connect
/// error"; this crate's eager connect "cannot connect to").
fn never_sent(err: &ApiError) -> bool {
    matches!(err, ApiError::Unavailable { reason }
        if reason.contains("tcp connect error") || reason.starts_with("cannot connect to"))
}

/// Whether asking again (elsewhere) may help.
fn is_transient(err: &ApiError) -> bool {
    match err {
        ApiError::Unavailable { .. } | ApiError::NotLeader { .. } => true,
        // A connection that broke under a call surfaces as gRPC UNKNOWN.
        ApiError::Internal { reason } => reason.contains("transport error"),
        _ => false,
    }
}

/// A connection that broke under a forwarded call (the leader died):
/// `UNAVAILABLE`, so clients retry, not the leader's `INTERNAL`.
fn transport_unavailable(err: ApiError) -> ApiError {
    match err {
        ApiError::Internal { reason } if reason.contains("transport error") => {
            ApiError::Unavailable {
                reason: format!(
                    "the connection to the leader broke; the outcome is unknown: {reason}"
                ),
            }
        }
        other => other,
    }
}

/// Who leads the cluster, as a member sees it.
pub(crate) enum Leader {
    /// This member.
    Me,
    /// The member at this address.
    At(String),
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
        force: bool,
    ) -> Result<Object, ApiError> {
        self.write(Command::Delete {
            kind,
            name,
            expected_resource_version,
            force,
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
