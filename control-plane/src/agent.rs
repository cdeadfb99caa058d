//! The agent service on a member: registration with a join token,
//! heartbeats that renew in-memory leases, each node's placement watch,
//! and VM status reports.
//!
//! Invariants:
//! - registration, heartbeats and status reports are answered by the
//!   leader; a follower forwards them (at most one hop);
//! - a heartbeat is never a Raft write, and is acknowledged only while
//!   this member's leadership was confirmed by a quorum within
//!   [`LEADERSHIP_FRESHNESS`], so a deposed leader stops renewing leases
//!   before a new one can expire them;
//! - a status report is accepted only from the node the VM is placed on,
//!   while that node holds its lease, and never changes the VM's spec (so
//!   not its generation) nor the addresses IPAM gave its NICs;
//! - a replica mark (the storage fence: a VM's copy on another replica
//!   node recorded outdated, or in sync again) is committed only for the
//!   VM's node at the placement's epoch while it holds its lease, in one
//!   Raft entry with an unchanged rewrite of the placement as its
//!   compare-and-swap guard: a primary deposed by a move, even one racing
//!   the mark, never gets a yes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use basalt_api::{
    AgentApi, AgentClient, ApiError, Heartbeat, HeartbeatAck, Kind, Object, Placement, Registered,
    Registration, ReplicaMark, StatusReport, Volume, VolumeReport, WatchEvent, WatchStream,
};
use futures::StreamExt as _;
use openraft::ServerState;

use crate::admin::{AdminService, Leader, changes};
use crate::config::NodeTuning;
use crate::history::Change;
use crate::leases::{LeaseTable, NodeView};
use crate::state::{ChangeType, Command, State};
use crate::tokens;

/// How recently a quorum must have confirmed this member's leadership for
/// it to acknowledge a heartbeat.
pub const LEADERSHIP_FRESHNESS: Duration = Duration::from_millis(500);
/// How long a forwarded call may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a status report retries a compare-and-swap conflict.
const STATUS_RETRIES: usize = 8;

/// The leases and the leadership confirmation, shared by the agent service
/// and the leader's controllers.
#[derive(Debug, Default)]
pub struct Leases {
    table: Mutex<LeaseTable>,
    /// The term and start of the last successful read-index check.
    confirmed: Mutex<Option<(u64, Instant)>>,
}

impl Leases {
    /// Runs `f` on the table after making sure it belongs to `term`.
    pub(crate) fn with_term<R>(
        &self,
        term: u64,
        state: &State,
        lease: Duration,
        f: impl FnOnce(&mut LeaseTable) -> R,
    ) -> R {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.term() != Some(term) {
            table.start_term(term, &node_views(state), Instant::now(), lease);
        }
        f(&mut table)
    }
}

/// What the state says about each node, for the lease table.
pub(crate) fn node_views(state: &State) -> Vec<NodeView> {
    state
        .list(Kind::Node)
        .filter_map(|object| match object {
            Object::Node(node) => Some(NodeView {
                name: node.meta.name.clone(),
                uid: node.meta.uid.clone(),
                ready: node.status.is_ready(),
            }),
            _ => None,
        })
        .collect()
}

/// The agent service of one member.
#[derive(Clone)]
pub struct AgentService {
    inner: Arc<Inner>,
}

struct Inner {
    admin: AdminService,
    leases: Arc<Leases>,
    tuning: NodeTuning,
    peers: Mutex<HashMap<String, AgentClient>>,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService").finish_non_exhaustive()
    }
}

/// Where a request is answered.
enum Route {
    /// Here, as the leader of `term`.
    Here(u64),
    /// By the leader at this client.
    Forward(AgentClient),
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl AgentService {
    /// The agent service on `admin`'s member, sharing `leases` with the
    /// controllers.
    pub fn new(admin: AdminService, leases: Arc<Leases>, tuning: NodeTuning) -> Self {
        Self {
            inner: Arc::new(Inner {
                admin,
                leases,
                tuning,
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(u64::from(self.inner.tuning.lease_seconds))
    }

    async fn route(&self) -> Result<Route, ApiError> {
        match self.inner.admin.leader().await? {
            Leader::At(address) => {
                let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
                let client = match peers.get(&address) {
                    Some(client) => client.clone(),
                    None => {
                        let client = AgentClient::connect_lazy(&address)?;
                        peers.insert(address, client.clone());
                        client
                    }
                };
                Ok(Route::Forward(client))
            }
            Leader::Me => {
                let (state, term) = {
                    let metrics = self.inner.admin.raft().server_metrics();
                    let m = metrics.borrow();
                    (m.state, m.vote.leader_id().term)
                };
                if state != ServerState::Leader {
                    return Err(ApiError::NotLeader { leader: None });
                }
                Ok(Route::Here(term))
            }
        }
    }

    /// Confirms with a quorum that this member still leads `term`, at most
    /// once per [`LEADERSHIP_FRESHNESS`].
    async fn confirm_leadership(&self, term: u64) -> Result<(), ApiError> {
        let fresh = |confirmed: &Option<(u64, Instant)>| {
            confirmed.is_some_and(|(t, at)| t == term && at.elapsed() < LEADERSHIP_FRESHNESS)
        };
        if fresh(
            &self
                .inner
                .leases
                .confirmed
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        ) {
            return Ok(());
        }
        let started = Instant::now();
        let check = self.inner.admin.raft().ensure_linearizable();
        match tokio::time::timeout(LEADERSHIP_FRESHNESS * 2, check).await {
            Ok(Ok(_)) => {
                *self
                    .inner
                    .leases
                    .confirmed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some((term, started));
                Ok(())
            }
            Ok(Err(err)) => Err(ApiError::Unavailable {
                reason: format!("cannot confirm leadership: {err}"),
            }),
            Err(_) => Err(ApiError::Unavailable {
                reason: "cannot confirm leadership in time; retry".into(),
            }),
        }
    }

    fn with_leases<R>(&self, term: u64, f: impl FnOnce(&mut LeaseTable) -> R) -> R {
        let machine = self.inner.admin.shared().read();
        self.inner
            .leases
            .with_term(term, &machine.state, self.lease(), f)
    }

    /// Records a heartbeat's allocatable resources when they changed
    /// (a status write, in the background: the heartbeat does not wait).
    fn note_allocatable(&self, heartbeat: &Heartbeat) {
        let Some(allocatable) = heartbeat.allocatable else {
            return;
        };
        let node = {
            let machine = self.inner.admin.shared().read();
            match machine.state.get(Kind::Node, &heartbeat.node) {
                Some(Object::Node(node))
                    if node.meta.uid == heartbeat.node_uid
                        && node.status.allocatable != allocatable
                        && node.status.capacity.fits(&allocatable) =>
                {
                    let mut node = node.clone();
                    node.status.allocatable = allocatable;
                    node
                }
                _ => return,
            }
        };
        let admin = self.inner.admin.clone();
        tokio::spawn(async move {
            let name = node.meta.name.clone();
            if let Err(err) = admin.write(Command::Update(Object::Node(node))).await {
                tracing::debug!(node = %name, error = %err, "recording allocatable resources failed; the next heartbeat retries");
            }
        });
    }
}

async fn forwarded<T>(call: impl Future<Output = Result<T, ApiError>>) -> Result<T, ApiError> {
    match tokio::time::timeout(FORWARD_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::Unavailable {
            reason: format!("the leader did not answer within {FORWARD_TIMEOUT:?}"),
        }),
    }
}

/// Whether node `node`'s placement stream shows `placement`: the VM runs
/// there, or the placement names it a replica node (it holds a copy of
/// the VM's replicated disks).
pub(crate) fn names_node(placement: &Placement, node: &str) -> bool {
    placement.node == node || placement.holds_replica(node)
}

/// The event a node's stream of `T` objects shows for `change`, if any,
/// with `mine` telling whether an object is that node's: ADDED when the
/// object comes to be the node's (created so, or changed so), MODIFIED
/// while it stays the node's, DELETED when it stops being the node's
/// (carrying the object as it is now) or is deleted while it was; nothing
/// for an object that never was the node's, or of another kind. Both the
/// placement ([`placement_event`]) and the volume
/// ([`crate::volume_watch::volume_event`]) streams are this.
pub(crate) fn node_event<T: TryFrom<Object>>(
    change: Change,
    mine: impl Fn(&T) -> bool,
) -> Option<WatchEvent<T>> {
    let was_mine = change
        .previous
        .and_then(|previous| T::try_from(previous).ok())
        .is_some_and(|previous| mine(&previous));
    let object = T::try_from(change.object).ok()?;
    let resource_version = change.index;
    match (change.change, mine(&object), was_mine) {
        (ChangeType::Added, true, _) | (ChangeType::Modified, true, false) => {
            Some(WatchEvent::Added {
                object,
                resource_version,
            })
        }
        (ChangeType::Modified, true, true) => Some(WatchEvent::Modified {
            object,
            resource_version,
        }),
        (ChangeType::Modified, false, true) | (ChangeType::Deleted, true, _) => {
            Some(WatchEvent::Deleted {
                object,
                resource_version,
            })
        }
        _ => None,
    }
}

/// The event node `node`'s placement stream shows for `change`, if any
/// ([`node_event`]): a placement that comes to name the node
/// ([`names_node`]) is ADDED, one that no longer does is DELETED
/// (carrying its new node); a placement that moves its VM away while
/// keeping the node a replica node is MODIFIED.
pub(crate) fn placement_event(node: &str, change: Change) -> Option<WatchEvent<Placement>> {
    node_event(change, |p: &Placement| names_node(p, node))
}

/// Whether `mark` may be recorded against `placement`: asked by the VM's
/// node at the placement's epoch, about another of its replica nodes.
pub(crate) fn check_mark(placement: &Placement, mark: &ReplicaMark) -> Result<(), ApiError> {
    if placement.node != mark.node {
        return Err(ApiError::FailedPrecondition {
            reason: format!(
                "node: vm {:?} is placed on {:?}, not {:?}: only its primary marks its replicas",
                mark.vm, placement.node, mark.node
            ),
        });
    }
    if placement.epoch != mark.epoch {
        return Err(ApiError::FailedPrecondition {
            reason: format!(
                "epoch: vm {:?} is at epoch {}, not {}: a primary of another epoch is deposed",
                mark.vm, placement.epoch, mark.epoch
            ),
        });
    }
    if !placement.holds_replica(&mark.replica_node) {
        return Err(ApiError::FailedPrecondition {
            reason: format!(
                "replica_node: {:?} holds no replica of vm {:?} (replica nodes: {})",
                mark.replica_node,
                mark.vm,
                placement.replica_nodes.join(", ")
            ),
        });
    }
    Ok(())
}

impl AgentApi for AgentService {
    #[tracing::instrument(skip_all, fields(node = %registration.node_name))]
    async fn register(&self, registration: Registration) -> Result<Registered, ApiError> {
        let term = match self.route().await? {
            Route::Forward(leader) => return forwarded(leader.register(registration)).await,
            Route::Here(term) => term,
        };
        let mut issued = None;
        let command = match &registration.node_credential {
            Some(credential) if !credential.expose().is_empty() => {
                Command::Register(crate::state::Registration {
                    token: String::new(),
                    secret_sha256: String::new(),
                    node: registration.node_name.clone(),
                    address: registration.address.clone(),
                    capacity: registration.capacity,
                    now_unix_ms: now_unix_ms(),
                    new_uid: uuid::Uuid::new_v4().to_string(),
                    node_credential_sha256: tokens::hash(credential.expose()),
                    new_credential_sha256: String::new(),
                })
            }
            _ => {
                let secret = registration.token.expose();
                let Some(token) = tokens::token_name(secret) else {
                    return Err(ApiError::Unauthenticated {
                        reason: "token: not a join token (NAME.SECRET)".into(),
                    });
                };
                let credential = tokens::generate_node_credential();
                let new_credential_sha256 = tokens::hash(credential.expose());
                issued = Some(credential);
                Command::Register(crate::state::Registration {
                    token: token.to_owned(),
                    secret_sha256: tokens::hash(secret),
                    node: registration.node_name.clone(),
                    address: registration.address.clone(),
                    capacity: registration.capacity,
                    now_unix_ms: now_unix_ms(),
                    new_uid: uuid::Uuid::new_v4().to_string(),
                    node_credential_sha256: String::new(),
                    new_credential_sha256,
                })
            }
        };
        let token = match &issued {
            Some(_) => "join token",
            None => "node credential",
        };
        let node = match self.inner.admin.write(command).await? {
            Object::Node(node) => node,
            other => {
                return Err(ApiError::Internal {
                    reason: format!("a registration stored a {}", other.kind()),
                });
            }
        };
        let lease = self.lease();
        self.with_leases(term, |table| {
            table.grant(&node.meta.name, &node.meta.uid, Instant::now(), lease);
        });
        tracing::info!(uid = %node.meta.uid, with = token, "node registered");
        Ok(Registered {
            node_uid: node.meta.uid,
            lease,
            heartbeat_interval: Duration::from_millis(self.inner.tuning.heartbeat_interval_ms),
            node_credential: issued,
        })
    }

    async fn heartbeat(&self, heartbeat: Heartbeat) -> Result<HeartbeatAck, ApiError> {
        let term = match self.route().await? {
            Route::Forward(leader) => return forwarded(leader.heartbeat(heartbeat)).await,
            Route::Here(term) => term,
        };
        self.confirm_leadership(term).await?;
        let lease = self.lease();
        let renewed = self.with_leases(term, |table| {
            table.renew(&heartbeat.node, &heartbeat.node_uid, Instant::now(), lease)
        });
        match renewed {
            Ok(_) => {
                self.note_allocatable(&heartbeat);
                let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
                Ok(HeartbeatAck {
                    lease_expires_at_unix_ms: now_unix_ms().saturating_add(lease_ms),
                    acknowledged: true,
                })
            }
            Err(refusal) => Err(ApiError::FailedPrecondition {
                reason: refusal.to_string(),
            }),
        }
    }

    async fn watch_placements(
        &self,
        node: String,
        from_resource_version: u64,
    ) -> Result<WatchStream<Placement>, ApiError> {
        let shared = Arc::clone(self.inner.admin.shared());
        if from_resource_version != 0 {
            let changes = changes(shared, Some(Kind::Placement), Some(from_resource_version))?;
            let events = changes.filter_map(move |change| {
                let event = match change {
                    Ok(change) => placement_event(&node, change).map(Ok),
                    Err(err) => Some(Err(err)),
                };
                std::future::ready(event)
            });
            return Ok(Box::pin(events));
        }
        // From now on: the node's placements as they are, then a bookmark,
        // then every later change, all read at one applied index.
        let (initial, applied) = {
            let machine = shared.read();
            let applied = machine.applied_index();
            let initial: Vec<Result<WatchEvent<Placement>, ApiError>> = machine
                .state
                .list(Kind::Placement)
                .filter_map(|object| match object {
                    Object::Placement(p) if names_node(p, &node) => Some(Ok(WatchEvent::Added {
                        object: p.clone(),
                        resource_version: p.meta.resource_version,
                    })),
                    _ => None,
                })
                .chain(std::iter::once(Ok(WatchEvent::Bookmark {
                    resource_version: applied,
                })))
                .collect();
            (initial, applied)
        };
        let changes = changes(shared, Some(Kind::Placement), Some(applied))?;
        let events = changes.filter_map(move |change| {
            let event = match change {
                Ok(change) => placement_event(&node, change).map(Ok),
                Err(err) => Some(Err(err)),
            };
            std::future::ready(event)
        });
        Ok(Box::pin(futures::stream::iter(initial).chain(events)))
    }

    async fn watch_volumes(
        &self,
        node: String,
        from_resource_version: u64,
    ) -> Result<WatchStream<Volume>, ApiError> {
        crate::volume_watch::watch(
            Arc::clone(self.inner.admin.shared()),
            node,
            from_resource_version,
        )
    }

    async fn report_status(&self, report: StatusReport) -> Result<(), ApiError> {
        let term = match self.route().await? {
            Route::Forward(leader) => return forwarded(leader.report_status(report)).await,
            Route::Here(term) => term,
        };
        for _ in 0..STATUS_RETRIES {
            let vm = {
                let machine = self.inner.admin.shared().read();
                let state = &machine.state;
                let Some(Object::Vm(vm)) = state.get(Kind::Vm, &report.vm) else {
                    return Err(ApiError::NotFound {
                        kind: Kind::Vm,
                        name: report.vm.clone(),
                    });
                };
                match state.get(Kind::Placement, &report.vm) {
                    Some(Object::Placement(p)) if p.node == report.node => {}
                    Some(Object::Placement(p)) => {
                        return Err(ApiError::FailedPrecondition {
                            reason: format!(
                                "node: vm {:?} is placed on {:?}, not {:?}",
                                report.vm, p.node, report.node
                            ),
                        });
                    }
                    _ => {
                        return Err(ApiError::FailedPrecondition {
                            reason: format!("node: vm {:?} is not placed", report.vm),
                        });
                    }
                }
                let uid = match state.get(Kind::Node, &report.node) {
                    Some(Object::Node(node)) => node.meta.uid.clone(),
                    _ => {
                        return Err(ApiError::NotFound {
                            kind: Kind::Node,
                            name: report.node.clone(),
                        });
                    }
                };
                let lease = self.lease();
                let holds = self.inner.leases.with_term(term, state, lease, |table| {
                    table.holds(&report.node, &uid, Instant::now())
                });
                if !holds {
                    return Err(ApiError::FailedPrecondition {
                        reason: format!(
                            "node: node {:?} holds no lease; register again",
                            report.node
                        ),
                    });
                }
                let mut vm = vm.clone();
                vm.status.phase = report.status.phase;
                vm.status.node = report.status.node.clone();
                vm.status.observed_generation = report.status.observed_generation;
                vm.status.conditions = report.status.conditions.clone();
                vm.status
                    .plugged_volumes
                    .clone_from(&report.status.plugged_volumes);
                vm
            };
            match self
                .inner
                .admin
                .write(Command::Update(Object::Vm(vm)))
                .await
            {
                Ok(_) => return Ok(()),
                Err(ApiError::Aborted { .. }) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(ApiError::Unavailable {
            reason: format!(
                "vm {:?} kept changing; status not recorded after {STATUS_RETRIES} tries",
                report.vm
            ),
        })
    }

    #[tracing::instrument(skip_all, fields(node = %mark.node, vm = %mark.vm, replica_node = %mark.replica_node, epoch = mark.epoch, outdated = mark.outdated))]
    async fn mark_replica(&self, mark: ReplicaMark) -> Result<(), ApiError> {
        let term = match self.route().await? {
            Route::Forward(leader) => return forwarded(leader.mark_replica(mark)).await,
            Route::Here(term) => term,
        };
        for _ in 0..STATUS_RETRIES {
            let batch = {
                let machine = self.inner.admin.shared().read();
                let state = &machine.state;
                let Some(Object::Vm(vm)) = state.get(Kind::Vm, &mark.vm) else {
                    return Err(ApiError::NotFound {
                        kind: Kind::Vm,
                        name: mark.vm.clone(),
                    });
                };
                let Some(Object::Placement(placement)) = state.get(Kind::Placement, &mark.vm)
                else {
                    return Err(ApiError::FailedPrecondition {
                        reason: format!("vm: vm {:?} is not placed", mark.vm),
                    });
                };
                check_mark(placement, &mark)?;
                let uid = match state.get(Kind::Node, &mark.node) {
                    Some(Object::Node(node)) => node.meta.uid.clone(),
                    _ => {
                        return Err(ApiError::NotFound {
                            kind: Kind::Node,
                            name: mark.node.clone(),
                        });
                    }
                };
                let holds = self
                    .inner
                    .leases
                    .with_term(term, state, self.lease(), |table| {
                        table.holds(&mark.node, &uid, Instant::now())
                    });
                if !holds {
                    return Err(ApiError::FailedPrecondition {
                        reason: format!(
                            "node: node {:?} holds no lease: it may be fenced already",
                            mark.node
                        ),
                    });
                }
                let mut vm = vm.clone();
                let marked = vm.status.is_outdated_on(&mark.replica_node);
                if mark.outdated {
                    if !marked {
                        vm.status.outdated_replicas.push(mark.replica_node.clone());
                        vm.status.outdated_replicas.sort();
                    }
                } else if marked {
                    vm.status
                        .outdated_replicas
                        .retain(|n| *n != mark.replica_node);
                } else {
                    // Nothing to clear: no guard needed either.
                    return Ok(());
                }
                // The placement rewritten unchanged: its compare-and-swap
                // makes the mark fail if the VM moved meanwhile.
                vec![
                    Command::Update(Object::Placement(placement.clone())),
                    Command::Update(Object::Vm(vm)),
                ]
            };
            match self.inner.admin.write(Command::Batch(batch)).await {
                Ok(_) => {
                    if mark.outdated {
                        tracing::warn!("replica recorded outdated: its primary goes on without it");
                    } else {
                        tracing::info!("replica recorded in sync again");
                    }
                    return Ok(());
                }
                Err(ApiError::Aborted { .. }) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(ApiError::Unavailable {
            reason: format!(
                "vm {:?} kept changing; replica mark not recorded after {STATUS_RETRIES} tries",
                mark.vm
            ),
        })
    }
    #[tracing::instrument(skip_all, fields(node = %report.node, volume = %report.storage_name))]
    async fn report_volume(&self, report: VolumeReport) -> Result<bool, ApiError> {
        match self.route().await? {
            Route::Forward(leader) => forwarded(leader.report_volume(report)).await,
            Route::Here(_) => crate::volumes::record_report(&self.inner.admin, &report).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::ObjectMeta;

    use super::*;

    fn placement(node: &str) -> Object {
        Object::Placement(Placement {
            meta: ObjectMeta::named("vm-1"),
            vm: "vm-1".into(),
            node: node.into(),
            epoch: 1,
            replica_nodes: Vec::new(),
        })
    }

    fn change(change: ChangeType, now: &str, before: Option<&str>) -> Change {
        Change {
            index: 9,
            change,
            object: placement(now),
            previous: before.map(placement),
        }
    }

    fn kind(event: Option<WatchEvent<Placement>>) -> &'static str {
        match event {
            None => "-",
            Some(WatchEvent::Added { .. }) => "added",
            Some(WatchEvent::Modified { .. }) => "modified",
            Some(WatchEvent::Deleted { .. }) => "deleted",
            Some(WatchEvent::Bookmark { .. }) => "bookmark",
        }
    }

    #[test]
    fn only_the_primary_at_the_placements_epoch_marks_another_replica() {
        let placement = Placement {
            meta: ObjectMeta::named("vm-1"),
            vm: "vm-1".into(),
            node: "a".into(),
            epoch: 3,
            replica_nodes: vec!["a".into(), "b".into()],
        };
        let mark = |node: &str, replica: &str, epoch| ReplicaMark {
            node: node.into(),
            vm: "vm-1".into(),
            replica_node: replica.into(),
            epoch,
            outdated: true,
        };
        assert!(check_mark(&placement, &mark("a", "b", 3)).is_ok());
        let refused = |m: ReplicaMark| match check_mark(&placement, &m) {
            Err(ApiError::FailedPrecondition { reason }) => reason,
            other => panic!("{m:?}: {other:?}"),
        };
        // A deposed primary (older epoch), a newer one not yet placed, the
        // secondary asking, a node holding no replica.
        assert!(refused(mark("a", "b", 2)).starts_with("epoch:"));
        assert!(refused(mark("a", "b", 4)).starts_with("epoch:"));
        assert!(refused(mark("b", "a", 3)).starts_with("node:"));
        assert!(refused(mark("a", "c", 3)).starts_with("replica_node:"));
    }

    #[test]
    fn a_node_sees_placements_arrive_change_and_leave() {
        let on_a = |c| kind(placement_event("a", c));
        assert_eq!(on_a(change(ChangeType::Added, "a", None)), "added");
        assert_eq!(on_a(change(ChangeType::Added, "b", None)), "-");
        assert_eq!(
            on_a(change(ChangeType::Modified, "a", Some("a"))),
            "modified"
        );
        assert_eq!(on_a(change(ChangeType::Modified, "a", Some("b"))), "added");
        assert_eq!(
            on_a(change(ChangeType::Modified, "b", Some("a"))),
            "deleted"
        );
        assert_eq!(on_a(change(ChangeType::Modified, "b", Some("c"))), "-");
        assert_eq!(on_a(change(ChangeType::Deleted, "a", None)), "deleted");
        assert_eq!(on_a(change(ChangeType::Deleted, "b", None)), "-");
    }

    #[test]
    fn a_replica_node_sees_the_placements_naming_it() {
        let on_c = |c| kind(placement_event("c", c));
        let named = |node: &str, replicas: &[&str]| {
            Object::Placement(Placement {
                meta: ObjectMeta::named("vm-1"),
                vm: "vm-1".into(),
                node: node.into(),
                epoch: 1,
                replica_nodes: replicas.iter().map(|n| (*n).to_owned()).collect(),
            })
        };
        let change = |change, now: Object, before: Option<Object>| Change {
            index: 9,
            change,
            object: now,
            previous: before,
        };
        assert_eq!(
            on_c(change(ChangeType::Added, named("a", &["a", "c"]), None)),
            "added"
        );
        assert_eq!(
            on_c(change(ChangeType::Added, named("a", &["a", "b"]), None)),
            "-"
        );
        // The VM moves from a to b; c keeps its copy.
        assert_eq!(
            on_c(change(
                ChangeType::Modified,
                named("b", &["a", "b", "c"]),
                Some(named("a", &["a", "b", "c"]))
            )),
            "modified"
        );
        // c replaced by d in the replica nodes.
        assert_eq!(
            on_c(change(
                ChangeType::Modified,
                named("a", &["a", "d"]),
                Some(named("a", &["a", "c"]))
            )),
            "deleted"
        );
        assert_eq!(
            on_c(change(ChangeType::Deleted, named("a", &["a", "c"]), None)),
            "deleted"
        );
    }
}
