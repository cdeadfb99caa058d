//! The replicated state — every stored object — and the pure rules that
//! apply one command to it. No I/O: the Raft state machine in
//! [`store`](crate::store) persists what this module decides.
//!
//! Invariants:
//! - applying the same commands at the same log indexes to the same state
//!   gives the same result on every member (no clock, no randomness: the
//!   proposer fills in `uid` and `created_at_unix_ms` before proposing);
//! - an object's `resource_version` is the log index of its last change;
//!   `generation` starts at 1 and grows only when the spec changes;
//! - a refused command changes nothing.

use std::collections::BTreeMap;

use basalt_api::{ApiError, Condition, Kind, Network, Node, Object, ObjectMeta, Resources};
use serde::{Deserialize, Serialize};

/// How many VMs a refused node delete names.
const MAX_NAMED: usize = 10;

/// A change to the stored objects: the payload of a Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Store a new object. Its `uid` and `created_at_unix_ms` are set by
    /// the proposing leader; versions are set on apply.
    Create(Object),
    /// Replace an object if its `meta.resource_version` is still current.
    Update(Object),
    /// Delete an object, if still at `expected_resource_version` when given.
    Delete {
        /// Kind of the object.
        kind: Kind,
        /// Its name.
        name: String,
        /// Compare-and-swap token, when the caller gave one.
        expected_resource_version: Option<u64>,
        /// Delete a node even though VMs are placed on it (the
        /// controllers then move them); refused without it.
        #[serde(default)]
        force: bool,
    },
    /// A node agent registers with a join token: in one step, the token's
    /// use is counted and the node is created or refreshed (address,
    /// capacity, `Ready`). Everything time- or randomness-dependent is
    /// filled in by the proposing leader.
    Register(Registration),
    /// Several creates, updates and deletes applied as one: all of them at
    /// one index, or none (the first refusal undoes the others and is the
    /// answer). How a placement moves together with its endpoints' node
    /// and epoch, so no reader ever sees one fenced without the other.
    Batch(Vec<Command>),
    /// Independent commands that share one log entry (the leader batches
    /// concurrent clients' writes so they share an fsync): each is applied
    /// on its own, in order, at the entry's index, and answers on its own
    /// ([`Outcome::Many`]); a refusal undoes only its own command.
    Many(Vec<Command>),
}

/// What [`Command::Register`] carries. Never the secret itself: only its
/// hash goes into the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The join token's name.
    pub token: String,
    /// Hex SHA-256 of the secret the agent presented.
    pub secret_sha256: String,
    /// The node's name.
    pub node: String,
    /// Where its agent is reachable.
    pub address: String,
    /// What its hardware has.
    pub capacity: Resources,
    /// The leader's clock when it proposed the registration.
    pub now_unix_ms: u64,
    /// The uid the node gets if it is new.
    pub new_uid: String,
    /// Hex SHA-256 of the node credential the agent presented instead of a
    /// join token (registering again after its lease was dropped); empty
    /// for a registration with a join token.
    #[serde(default)]
    pub node_credential_sha256: String,
    /// Hex SHA-256 of the node credential issued by this registration
    /// (with a join token); empty when none is issued.
    #[serde(default)]
    pub new_credential_sha256: String,
}

/// One object a command changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectChange {
    /// Added, modified or deleted.
    pub change: ChangeType,
    /// The object after the change (as it was, for a delete).
    pub object: Object,
    /// The object before the change (`None` for a create).
    pub previous: Option<Object>,
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// What the proposer is answered: the object created, updated or
    /// deleted (for a registration, the node).
    pub reply: Object,
    /// Every object the command changed, in order (all at one version).
    pub changes: Vec<ObjectChange>,
}

/// The result of applying one log entry: what the state machine answers
/// the client that proposed it.
// One per applied entry, moved to the waiting client: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Not a client command (a blank or membership entry).
    Nothing,
    /// The object as stored (create, update) or as it was (delete).
    Done(Object),
    /// The command was refused; nothing changed.
    Refused(Refusal),
    /// The answers to a [`Command::Many`], one per command, in order.
    Many(Vec<Outcome>),
}

/// Why a command was refused, decided deterministically on apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// No such object.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Kind looked for.
        kind: Kind,
        /// Name looked for.
        name: String,
    },
    /// The name is taken.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// Kind of the object.
        kind: Kind,
        /// Its name.
        name: String,
    },
    /// Compare-and-swap failed.
    #[error("resource version mismatch: expected {expected}, found {actual}")]
    Aborted {
        /// The version the caller sent.
        expected: u64,
        /// The object's current version.
        actual: u64,
    },
    /// The state forbids the change, e.g. a reference to a missing object.
    #[error("failed precondition: {reason}")]
    FailedPrecondition {
        /// What forbids it.
        reason: String,
    },
    /// The object contradicts the stored state in a field (e.g. a
    /// network whose CIDR overlaps another's).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field's path.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The credentials do not match anything stored (a join token).
    #[error("unauthenticated: {reason}")]
    Unauthenticated {
        /// What did not match.
        reason: String,
    },
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NotFound { kind, name } => ApiError::NotFound { kind, name },
            Refusal::AlreadyExists { kind, name } => ApiError::AlreadyExists { kind, name },
            Refusal::Aborted { expected, actual } => ApiError::Aborted { expected, actual },
            Refusal::FailedPrecondition { reason } => ApiError::FailedPrecondition { reason },
            Refusal::Unauthenticated { reason } => ApiError::Unauthenticated { reason },
            Refusal::Invalid { field, reason } => ApiError::InvalidArgument { field, reason },
        }
    }
}

/// How an applied command changed an object (for watch streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeType {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Deleted.
    Deleted,
}

/// Every stored object, by kind and name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    objects: BTreeMap<Kind, BTreeMap<String, Object>>,
}

impl State {
    /// A state holding `objects` (e.g. from a snapshot or the disk).
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut state = State::default();
        for object in objects {
            state.insert(object);
        }
        state
    }

    /// Every object, ordered by kind then name.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values().flat_map(BTreeMap::values)
    }

    /// The object of `kind` named `name`.
    pub fn get(&self, kind: Kind, name: &str) -> Option<&Object> {
        self.objects.get(&kind)?.get(name)
    }

    /// Every object of `kind`, ordered by name.
    pub fn list(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        self.objects
            .get(&kind)
            .into_iter()
            .flat_map(BTreeMap::values)
    }

    /// How many objects are stored.
    pub fn len(&self) -> usize {
        self.objects.values().map(BTreeMap::len).sum()
    }

    /// Whether no object is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&mut self, object: Object) {
        self.objects
            .entry(object.kind())
            .or_default()
            .insert(object.name().to_owned(), object);
    }

    fn remove(&mut self, kind: Kind, name: &str) -> Option<Object> {
        self.objects.get_mut(&kind)?.remove(name)
    }

    /// Applies `command`, committed at log `index`. Returns what changed,
    /// or why the command was refused (then nothing changed).
    pub fn apply(&mut self, index: u64, command: Command) -> Result<Applied, Refusal> {
        match command {
            Command::Create(mut object) => {
                if self.get(object.kind(), object.name()).is_some() {
                    return Err(Refusal::AlreadyExists {
                        kind: object.kind(),
                        name: object.name().to_owned(),
                    });
                }
                crate::disk_sources::complete(self, &mut object, None);
                self.check_references(&object, None)?;
                if let Object::Token(token) = &mut object {
                    token.secret = None;
                }
                let meta = object.meta_mut();
                meta.resource_version = index;
                meta.generation = 1;
                self.insert(object.clone());
                Ok(Applied::one(ChangeType::Added, object, None))
            }
            Command::Update(mut object) => {
                let kind = object.kind();
                let current = self
                    .get(kind, object.name())
                    .ok_or_else(|| Refusal::NotFound {
                        kind,
                        name: object.name().to_owned(),
                    })?;
                let current_meta = current.meta();
                if object.meta().resource_version != current_meta.resource_version {
                    return Err(Refusal::Aborted {
                        expected: object.meta().resource_version,
                        actual: current_meta.resource_version,
                    });
                }
                keep_protected(current, &mut object);
                crate::disk_sources::complete(self, &mut object, Some(current));
                self.check_references(&object, Some(current))?;
                let previous = current.clone();
                self.replace(index, &previous, &mut object);
                Ok(Applied::one(ChangeType::Modified, object, Some(previous)))
            }
            Command::Delete {
                kind,
                name,
                expected_resource_version,
                force,
            } => {
                let current = self.get(kind, &name).ok_or_else(|| Refusal::NotFound {
                    kind,
                    name: name.clone(),
                })?;
                if let Some(expected) = expected_resource_version {
                    let actual = current.meta().resource_version;
                    if expected != actual {
                        return Err(Refusal::Aborted { expected, actual });
                    }
                }
                self.check_delete(kind, &name, force)?;
                let object = self
                    .remove(kind, &name)
                    .ok_or(Refusal::NotFound { kind, name })?;
                Ok(Applied::one(ChangeType::Deleted, object, None))
            }
            Command::Register(registration) => self.register(index, registration),
            Command::Batch(commands) => self.apply_batch(index, commands),
            Command::Many(commands) => self.apply_many(index, commands),
        }
    }

    /// Applies each of `commands` on its own at `index`: the changes of
    /// every one that was applied, answering the first one's reply; the
    /// first refusal when none was (then nothing changed). The state
    /// machine applies a [`Command::Many`] one command at a time instead,
    /// to answer each; this serves callers that only need the state.
    fn apply_many(&mut self, index: u64, commands: Vec<Command>) -> Result<Applied, Refusal> {
        let mut applied: Option<Applied> = None;
        let mut refused = None;
        for command in commands {
            let result = match command {
                Command::Many(_) => Err(Refusal::Invalid {
                    field: "many".into(),
                    reason: "a batch of independent commands does not nest".into(),
                }),
                command => self.apply(index, command),
            };
            match (result, applied.as_mut()) {
                (Ok(one), Some(all)) => all.changes.extend(one.changes),
                (Ok(one), None) => applied = Some(one),
                (Err(refusal), _) => {
                    refused.get_or_insert(refusal);
                }
            }
        }
        applied.ok_or_else(|| {
            refused.unwrap_or(Refusal::Invalid {
                field: "many".into(),
                reason: "an empty batch".into(),
            })
        })
    }

    /// Applies every command of a batch at `index`, or none.
    fn apply_batch(&mut self, index: u64, commands: Vec<Command>) -> Result<Applied, Refusal> {
        let mut changes: Vec<ObjectChange> = Vec::new();
        let mut reply = None;
        for command in commands {
            let result = match command {
                Command::Register(_) | Command::Batch(_) | Command::Many(_) => {
                    Err(Refusal::Invalid {
                        field: "batch".into(),
                        reason: "a batch holds only creates, updates and deletes".into(),
                    })
                }
                command => self.apply(index, command),
            };
            match result {
                Ok(applied) => {
                    reply.get_or_insert(applied.reply);
                    changes.extend(applied.changes);
                }
                Err(refusal) => {
                    self.undo(&changes);
                    return Err(refusal);
                }
            }
        }
        let Some(reply) = reply else {
            return Err(Refusal::Invalid {
                field: "batch".into(),
                reason: "an empty batch".into(),
            });
        };
        Ok(Applied { reply, changes })
    }

    /// Puts back what `changes` changed, newest first.
    fn undo(&mut self, changes: &[ObjectChange]) {
        for change in changes.iter().rev() {
            match (change.change, &change.previous) {
                (ChangeType::Added, _) => {
                    self.remove(change.object.kind(), change.object.name());
                }
                (ChangeType::Modified, Some(previous)) => self.insert(previous.clone()),
                (ChangeType::Deleted, _) | (ChangeType::Modified, None) => {
                    self.insert(change.object.clone())
                }
            }
        }
    }

    /// Stores `object` as the new version of `previous`: keeps the uid and
    /// creation time, bumps the generation when the spec changed.
    fn replace(&mut self, index: u64, previous: &Object, object: &mut Object) {
        let current_meta = previous.meta();
        let generation = if same_spec(previous, object) {
            current_meta.generation
        } else {
            current_meta.generation + 1
        };
        let (uid, created) = (current_meta.uid.clone(), current_meta.created_at_unix_ms);
        let meta = object.meta_mut();
        meta.uid = uid;
        meta.created_at_unix_ms = created;
        meta.generation = generation;
        meta.resource_version = index;
        self.insert(object.clone());
    }

    /// Checks the join token and counts its use, then creates or refreshes
    /// the node, all at `index`. A registration with a node credential
    /// instead checks it against the node's stored hash and refreshes the
    /// node (no token use is counted; the credential stays valid).
    fn register(&mut self, index: u64, registration: Registration) -> Result<Applied, Refusal> {
        if !registration.node_credential_sha256.is_empty() {
            return self.register_again(index, registration);
        }
        let Registration {
            token: token_name,
            secret_sha256,
            node: node_name,
            address,
            capacity,
            now_unix_ms,
            new_uid,
            node_credential_sha256: _,
            new_credential_sha256,
        } = registration;
        let unknown = || Refusal::Unauthenticated {
            reason: format!("token: no join token {token_name:?} with this secret"),
        };
        let Some(Object::Token(token)) = self.get(Kind::Token, &token_name) else {
            return Err(unknown());
        };
        if token.status.secret_sha256.is_empty() || token.status.secret_sha256 != secret_sha256 {
            return Err(unknown());
        }
        if token.spec.revoked {
            return Err(Refusal::FailedPrecondition {
                reason: format!("token: join token {token_name:?} is revoked"),
            });
        }
        if now_unix_ms >= token.status.expires_at_unix_ms {
            return Err(Refusal::FailedPrecondition {
                reason: format!(
                    "token: join token {token_name:?} expired {} s ago",
                    (now_unix_ms - token.status.expires_at_unix_ms) / 1000
                ),
            });
        }
        if token.spec.max_uses != 0 && token.status.uses >= token.spec.max_uses {
            return Err(Refusal::FailedPrecondition {
                reason: format!(
                    "token: join token {token_name:?} is used up ({} of {} uses)",
                    token.status.uses, token.spec.max_uses
                ),
            });
        }
        let previous_token = Object::Token(token.clone());
        let mut used = token.clone();
        used.status.uses += 1;
        let mut used = Object::Token(used);
        self.replace(index, &previous_token, &mut used);

        let (node, node_change, previous_node) = self.refresh_node(
            index,
            node_name,
            address,
            capacity,
            now_unix_ms,
            new_uid,
            Some(new_credential_sha256),
        );
        Ok(Applied {
            reply: node.clone(),
            changes: vec![
                ObjectChange {
                    change: ChangeType::Modified,
                    object: used,
                    previous: Some(previous_token),
                },
                ObjectChange {
                    change: node_change,
                    object: node,
                    previous: previous_node,
                },
            ],
        })
    }

    /// A node registering again with the credential its last token
    /// registration issued: the node must exist and the hash match.
    fn register_again(
        &mut self,
        index: u64,
        registration: Registration,
    ) -> Result<Applied, Refusal> {
        let matches = match self.get(Kind::Node, &registration.node) {
            Some(Object::Node(node)) => {
                !node.status.credential_sha256.is_empty()
                    && node.status.credential_sha256 == registration.node_credential_sha256
            }
            _ => false,
        };
        if !matches {
            return Err(Refusal::Unauthenticated {
                reason: format!(
                    "node_credential: no node {:?} with this credential (removed nodes must join again with a token)",
                    registration.node
                ),
            });
        }
        let (node, change, previous) = self.refresh_node(
            index,
            registration.node,
            registration.address,
            registration.capacity,
            registration.now_unix_ms,
            registration.new_uid,
            None,
        );
        Ok(Applied {
            reply: node.clone(),
            changes: vec![ObjectChange {
                change,
                object: node,
                previous,
            }],
        })
    }

    /// Creates or refreshes a registering node (address, capacity,
    /// `Ready`); a new credential hash replaces the stored one when given.
    #[allow(clippy::too_many_arguments)]
    fn refresh_node(
        &mut self,
        index: u64,
        node_name: String,
        address: String,
        capacity: Resources,
        now_unix_ms: u64,
        new_uid: String,
        credential_sha256: Option<String>,
    ) -> (Object, ChangeType, Option<Object>) {
        let ready = Condition {
            kind: Condition::READY.into(),
            status: true,
            reason: "Registered".into(),
            message: "the agent registered".into(),
            last_transition_unix_ms: now_unix_ms,
        };
        let previous_node = self.get(Kind::Node, &node_name).cloned();
        let mut node = match &previous_node {
            Some(Object::Node(node)) => node.clone(),
            _ => Node {
                meta: ObjectMeta {
                    uid: new_uid,
                    created_at_unix_ms: now_unix_ms,
                    ..ObjectMeta::named(node_name)
                },
                ..Node::default()
            },
        };
        node.spec.address = address;
        node.status.capacity = capacity;
        node.status.allocatable = capacity;
        node.status.last_heartbeat_unix_ms = now_unix_ms;
        if let Some(hash) = credential_sha256 {
            node.status.credential_sha256 = hash;
        }
        set_condition(&mut node.status.conditions, ready);
        let mut node = Object::Node(node);
        let node_change = match &previous_node {
            Some(previous) => {
                self.replace(index, previous, &mut node);
                ChangeType::Modified
            }
            None => {
                let meta = node.meta_mut();
                meta.resource_version = index;
                meta.generation = 1;
                self.insert(node.clone());
                ChangeType::Added
            }
        };
        (node, node_change, previous_node)
    }

    /// Checks what `object` refers to: a placement's VM and node must
    /// exist; a member's id must be its own and unique.
    fn check_references(&self, object: &Object, current: Option<&Object>) -> Result<(), Refusal> {
        match object {
            Object::Placement(placement) => {
                if self.get(Kind::Vm, &placement.vm).is_none() {
                    return Err(Refusal::FailedPrecondition {
                        reason: format!("vm: vm {:?} does not exist", placement.vm),
                    });
                }
                if self.get(Kind::Node, &placement.node).is_none() {
                    return Err(Refusal::FailedPrecondition {
                        reason: format!("node: node {:?} does not exist", placement.node),
                    });
                }
                Ok(())
            }
            Object::Member(member) => {
                if let Some(Object::Member(current)) = current
                    && current.id != member.id
                {
                    return Err(Refusal::FailedPrecondition {
                        reason: format!(
                            "id: member {:?} has id {}; a member's id cannot change",
                            member.meta.name, current.id
                        ),
                    });
                }
                let taken = self.list(Kind::Member).find_map(|other| match other {
                    Object::Member(other)
                        if other.id == member.id && other.meta.name != member.meta.name =>
                    {
                        Some(other.meta.name.clone())
                    }
                    _ => None,
                });
                match taken {
                    Some(other) => Err(Refusal::FailedPrecondition {
                        reason: format!("id: member {other:?} already has id {}", member.id),
                    }),
                    None => Ok(()),
                }
            }
            Object::Network(network) => self.check_network(network, current),
            Object::Vm(vm) => {
                let before = match current {
                    Some(Object::Vm(before)) => Some(before),
                    _ => None,
                };
                crate::disk_sources::check(self, vm, before)?;
                crate::volumes::check(self, object, current)
            }
            Object::Volume(_) => crate::volumes::check(self, object, current),
            Object::Endpoint(endpoint) => {
                if self.get(Kind::Network, &endpoint.network).is_none() {
                    return Err(Refusal::FailedPrecondition {
                        reason: format!("network: network {:?} does not exist", endpoint.network),
                    });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A network's CIDR overlaps no other network's and never changes;
    /// its VNI is unique.
    fn check_network(&self, network: &Network, current: Option<&Object>) -> Result<(), Refusal> {
        let invalid = |field: &str, reason: String| Refusal::Invalid {
            field: field.into(),
            reason,
        };
        if let Some(Object::Network(current)) = current
            && current.spec.cidr != network.spec.cidr
        {
            return Err(invalid(
                "spec.cidr",
                format!(
                    "a network's CIDR cannot change (it is {}); create another network",
                    current.spec.cidr
                ),
            ));
        }
        let range = |n: &Network| {
            n.spec.parse_cidr().ok().map(|(ip, prefix)| {
                let start = u64::from(u32::from(ip));
                (start, start + (1u64 << (32 - u32::from(prefix))) - 1)
            })
        };
        let Some((start, end)) = range(network) else {
            return Err(invalid(
                "spec.cidr",
                format!("{:?} is not a CIDR", network.spec.cidr),
            ));
        };
        for other in self.list(Kind::Network) {
            let Object::Network(other) = other else {
                continue;
            };
            if other.meta.name == network.meta.name {
                continue;
            }
            if let Some((other_start, other_end)) = range(other)
                && start <= other_end
                && other_start <= end
            {
                return Err(invalid(
                    "spec.cidr",
                    format!(
                        "{} overlaps network {:?} ({})",
                        network.spec.cidr, other.meta.name, other.spec.cidr
                    ),
                ));
            }
            if other.spec.vni == network.spec.vni {
                return Err(invalid(
                    "spec.vni",
                    format!(
                        "VNI {} is network {:?}'s",
                        network.spec.vni, other.meta.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A network may be deleted only when no endpoint holds an address in it.
    fn check_delete(&self, kind: Kind, name: &str, force: bool) -> Result<(), Refusal> {
        if kind == Kind::Node && !force {
            let vms: Vec<&str> = self
                .list(Kind::Placement)
                .filter_map(|o| match o {
                    Object::Placement(p) if p.node == name => Some(p.vm.as_str()),
                    _ => None,
                })
                .collect();
            if !vms.is_empty() {
                let (count, named) = named_list(&vms);
                return Err(Refusal::FailedPrecondition {
                    reason: format!(
                        "node {name:?} still has {count} VM(s) placed on it: {named}; drain it first, or delete it with force (its VMs then move to other nodes)"
                    ),
                });
            }
            // A volume whose only copy is there would be lost with it.
            let only: Vec<&str> = self
                .list(Kind::Volume)
                .filter_map(|o| match o {
                    Object::Volume(v)
                        if v.status.replicas.len() == 1 && v.status.replicas[0].node == name =>
                    {
                        Some(v.meta.name.as_str())
                    }
                    _ => None,
                })
                .collect();
            if !only.is_empty() {
                let (count, named) = named_list(&only);
                return Err(Refusal::FailedPrecondition {
                    reason: format!(
                        "node {name:?} holds the only copy of {count} volume(s): {named}; move them first (`basalt volume move`, or `basalt node drain {name} --storage`; a snapshot or clone stays with its source), or delete it with force (their data goes with the node)"
                    ),
                });
            }
        }
        if kind == Kind::Volume {
            crate::volumes::check_delete(self, name)?;
        }
        // libvirt has moved the guest: only the placement's move is left,
        // and without the migration nobody would make it.
        if kind == Kind::Migration
            && !force
            && let Some(Object::Migration(m)) = self.get(Kind::Migration, name)
            && m.status.phase == basalt_api::MigrationPhase::Switching
        {
            return Err(Refusal::FailedPrecondition {
                reason: format!(
                    "migration {name:?} is switching over: the guest already runs on {:?} and the control plane is moving the placement there; it ends by itself (delete it with force only if that never happens)",
                    m.status.target
                ),
            });
        }
        if kind == Kind::Network {
            let leased = self
                .list(Kind::Endpoint)
                .filter(|o| matches!(o, Object::Endpoint(e) if e.network == name))
                .count();
            if leased > 0 {
                return Err(Refusal::FailedPrecondition {
                    reason: format!(
                        "network {name:?} still has {leased} endpoint(s); delete its VMs' NICs first"
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Applied {
    fn one(change: ChangeType, object: Object, previous: Option<Object>) -> Self {
        Self {
            reply: object.clone(),
            changes: vec![ObjectChange {
                change,
                object,
                previous,
            }],
        }
    }
}

/// Replaces the condition of the same type, or adds it; the transition
/// time is kept when the status did not change.
pub fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) {
    match conditions.iter_mut().find(|c| c.kind == condition.kind) {
        Some(existing) => {
            if existing.status == condition.status {
                condition.last_transition_unix_ms = existing.last_transition_unix_ms;
            }
            *existing = condition;
        }
        None => conditions.push(condition),
    }
}

/// How many `names` there are, and the first [`MAX_NAMED`] of them joined
/// ("a, b and 3 more"), for a refusal that names them.
fn named_list(names: &[&str]) -> (usize, String) {
    let more = names.len().saturating_sub(MAX_NAMED);
    let mut named = names[..names.len() - more].join(", ");
    if more > 0 {
        named.push_str(&format!(" and {more} more"));
    }
    (names.len(), named)
}

/// What an update may not change: a join token's status (its uses, expiry
/// and secret hash are the control plane's), a node's credential hash, and
/// no stored token carries its secret.
fn keep_protected(current: &Object, update: &mut Object) {
    match (current, update) {
        (Object::Token(current), Object::Token(update)) => {
            update.status = current.status.clone();
            update.secret = None;
        }
        (Object::Node(current), Object::Node(update)) => {
            update
                .status
                .credential_sha256
                .clone_from(&current.status.credential_sha256);
        }
        (Object::Vm(current), Object::Vm(update)) => {
            crate::disk_sources::keep_recorded(current, update);
        }
        _ => {}
    }
}

/// Whether two objects of the same kind have the same spec (what
/// `generation` counts). Objects without a separate status are all spec.
fn same_spec(a: &Object, b: &Object) -> bool {
    match (a, b) {
        (Object::Node(a), Object::Node(b)) => a.spec == b.spec,
        (Object::Vm(a), Object::Vm(b)) => a.spec == b.spec,
        (Object::Token(a), Object::Token(b)) => a.spec == b.spec,
        (Object::Placement(a), Object::Placement(b)) => {
            (&a.vm, &a.node, a.epoch, &a.replica_nodes)
                == (&b.vm, &b.node, b.epoch, &b.replica_nodes)
        }
        (Object::Member(a), Object::Member(b)) => (a.id, &a.address) == (b.id, &b.address),
        (Object::Network(a), Object::Network(b)) => a.spec == b.spec,
        (Object::Policy(a), Object::Policy(b)) => a.spec == b.spec,
        (Object::Migration(a), Object::Migration(b)) => a.spec == b.spec,
        (Object::Image(a), Object::Image(b)) => a.spec == b.spec,
        (Object::Volume(a), Object::Volume(b)) => a.spec == b.spec,
        (Object::Endpoint(a), Object::Endpoint(b)) => {
            let mut a = a.clone();
            a.meta = b.meta.clone();
            a == *b
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{Member, Node, ObjectMeta, Placement, Vm};

    use super::*;

    fn node(name: &str) -> Object {
        let mut node = Node {
            meta: ObjectMeta::named(name),
            ..Node::default()
        };
        node.spec.address = "10.0.0.1".into();
        Object::Node(node)
    }

    fn vm(name: &str) -> Object {
        let mut vm = Vm {
            meta: ObjectMeta::named(name),
            ..Vm::default()
        };
        vm.spec.cpus = 1;
        vm.spec.memory_mib = 256;
        Object::Vm(vm)
    }

    #[test]
    fn a_migration_switching_over_is_deleted_only_by_force() {
        use basalt_api::{Migration, MigrationPhase, MigrationSpec};

        let mut state = State::default();
        state.apply(1, Command::Create(vm("web"))).expect("vm");
        let mut m = Migration {
            meta: ObjectMeta::named("web"),
            spec: MigrationSpec {
                vm: "web".into(),
                ..MigrationSpec::default()
            },
            ..Migration::default()
        };
        state
            .apply(2, Command::Create(Object::Migration(m.clone())))
            .expect("migration");
        let delete = |force: bool| Command::Delete {
            kind: Kind::Migration,
            name: "web".into(),
            expected_resource_version: None,
            force,
        };
        for (index, phase) in [
            (3, MigrationPhase::Migrating),
            (5, MigrationPhase::Switching),
        ] {
            let Some(Object::Migration(stored)) = state.get(Kind::Migration, "web") else {
                panic!("no migration")
            };
            m.meta = stored.meta.clone();
            m.status.phase = phase;
            m.status.target = "n2".into();
            state
                .apply(index, Command::Update(Object::Migration(m.clone())))
                .expect("phase");
        }
        match state.apply(6, delete(false)) {
            Err(Refusal::FailedPrecondition { reason }) => {
                assert!(
                    reason.contains("switching over") && reason.contains("\"n2\""),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        state.apply(7, delete(true)).expect("forced");
        // Before the switch, a plain delete cancels it.
        m.meta = ObjectMeta::named("web");
        m.status.phase = MigrationPhase::Migrating;
        state
            .apply(8, Command::Create(Object::Migration(m)))
            .expect("again");
        state.apply(9, delete(false)).expect("cancelled");
    }

    fn member(name: &str, id: u64) -> Object {
        Object::Member(Member {
            meta: ObjectMeta::named(name),
            id,
            address: "127.0.0.1:7400".into(),
            voter: false,
            leader: false,
        })
    }

    #[test]
    fn versions_follow_the_log_index_and_generation_the_spec() {
        let mut state = State::default();
        let applied = state.apply(5, Command::Create(node("n1"))).unwrap();
        assert_eq!(applied.changes[0].change, ChangeType::Added);
        let created = applied.reply;
        assert_eq!(created.meta().resource_version, 5);
        assert_eq!(created.meta().generation, 1);

        // A status-only change keeps the generation.
        let Object::Node(mut n) = created.clone() else {
            unreachable!()
        };
        n.status.last_heartbeat_unix_ms = 42;
        let updated = state
            .apply(7, Command::Update(Object::Node(n.clone())))
            .unwrap()
            .reply;
        assert_eq!(updated.meta().resource_version, 7);
        assert_eq!(updated.meta().generation, 1);

        // A stale version is refused and changes nothing.
        n.spec.cordoned = true;
        assert_eq!(
            state.apply(8, Command::Update(Object::Node(n.clone()))),
            Err(Refusal::Aborted {
                expected: 5,
                actual: 7
            })
        );
        assert_eq!(state.get(Kind::Node, "n1"), Some(&updated));

        // A spec change bumps it.
        n.meta.resource_version = 7;
        n.meta.uid = "forged".into();
        let updated = state
            .apply(9, Command::Update(Object::Node(n)))
            .unwrap()
            .reply;
        assert_eq!(updated.meta().generation, 2);
        assert_eq!(updated.meta().uid, created.meta().uid, "uid is kept");
    }

    #[test]
    fn create_and_delete_check_existence_and_versions() {
        let mut state = State::default();
        state.apply(1, Command::Create(vm("a"))).unwrap();
        assert!(matches!(
            state.apply(2, Command::Create(vm("a"))),
            Err(Refusal::AlreadyExists { .. })
        ));
        let delete = |expected| Command::Delete {
            kind: Kind::Vm,
            name: "a".into(),
            expected_resource_version: expected,
            force: false,
        };
        assert_eq!(
            state.apply(3, delete(Some(2))),
            Err(Refusal::Aborted {
                expected: 2,
                actual: 1
            })
        );
        let applied = state.apply(4, delete(Some(1))).unwrap();
        assert_eq!(
            (applied.changes[0].change, applied.reply.name()),
            (ChangeType::Deleted, "a")
        );
        assert!(matches!(
            state.apply(5, delete(None)),
            Err(Refusal::NotFound { .. })
        ));
        assert!(state.is_empty());
    }

    #[test]
    fn placements_need_their_vm_and_node() {
        let mut state = State::default();
        let placement = Object::Placement(Placement {
            meta: ObjectMeta::named("a"),
            vm: "a".into(),
            node: "n1".into(),
            epoch: 1,
            replica_nodes: Vec::new(),
        });
        assert!(matches!(
            state.apply(1, Command::Create(placement.clone())),
            Err(Refusal::FailedPrecondition { reason }) if reason.starts_with("vm:")
        ));
        state.apply(2, Command::Create(vm("a"))).unwrap();
        assert!(matches!(
            state.apply(3, Command::Create(placement.clone())),
            Err(Refusal::FailedPrecondition { reason }) if reason.starts_with("node:")
        ));
        state.apply(4, Command::Create(node("n1"))).unwrap();
        state.apply(5, Command::Create(placement)).unwrap();
    }

    #[test]
    fn a_batch_applies_whole_or_not_at_all() {
        let mut state = State::default();
        state.apply(1, Command::Create(node("n1"))).unwrap();
        state.apply(2, Command::Create(node("n2"))).unwrap();
        state.apply(3, Command::Create(vm("a"))).unwrap();
        let placement = |node: &str, epoch, version| {
            let mut p = Placement {
                meta: ObjectMeta::named("a"),
                vm: "a".into(),
                node: node.into(),
                epoch,
                replica_nodes: Vec::new(),
            };
            p.meta.resource_version = version;
            Object::Placement(p)
        };
        state
            .apply(4, Command::Create(placement("n1", 1, 0)))
            .unwrap();
        let Some(Object::Node(mut n2)) = state.get(Kind::Node, "n2").cloned() else {
            panic!()
        };
        n2.spec.cordoned = true;
        n2.meta.resource_version = 1;
        // The second command's version is stale: nothing changes.
        let stale = Command::Batch(vec![
            Command::Update(placement("n2", 2, 4)),
            Command::Update(Object::Node(n2.clone())),
            Command::Create(vm("b")),
        ]);
        assert!(matches!(
            state.apply(5, stale),
            Err(Refusal::Aborted {
                expected: 1,
                actual: 2
            })
        ));
        let Some(Object::Placement(p)) = state.get(Kind::Placement, "a") else {
            panic!()
        };
        assert_eq!(
            (p.node.as_str(), p.epoch, p.meta.resource_version),
            ("n1", 1, 4)
        );
        assert!(state.get(Kind::Vm, "b").is_none());

        n2.meta.resource_version = 2;
        let applied = state
            .apply(
                6,
                Command::Batch(vec![
                    Command::Update(placement("n2", 2, 4)),
                    Command::Update(Object::Node(n2)),
                    Command::Create(vm("b")),
                    Command::Delete {
                        kind: Kind::Node,
                        name: "n1".into(),
                        expected_resource_version: Some(1),
                        force: false,
                    },
                ]),
            )
            .unwrap();
        assert_eq!(applied.reply.kind(), Kind::Placement, "the first reply");
        assert_eq!(applied.changes.len(), 4);
        assert!(
            applied
                .changes
                .iter()
                .all(|c| c.object.meta().resource_version == 6 || c.change == ChangeType::Deleted)
        );
        assert!(state.get(Kind::Node, "n1").is_none());
        assert!(matches!(
            state.apply(7, Command::Batch(Vec::new())),
            Err(Refusal::Invalid { .. })
        ));
    }

    #[test]
    fn member_ids_are_unique_and_fixed() {
        let mut state = State::default();
        state.apply(1, Command::Create(member("m1", 1))).unwrap();
        assert!(matches!(
            state.apply(2, Command::Create(member("m2", 1))),
            Err(Refusal::FailedPrecondition { .. })
        ));
        let mut changed = member("m1", 3);
        changed.meta_mut().resource_version = 1;
        assert!(matches!(
            state.apply(3, Command::Update(changed)),
            Err(Refusal::FailedPrecondition { .. })
        ));
    }

    fn token(name: &str, max_uses: u32, expires: u64) -> Object {
        let mut token = basalt_api::JoinToken {
            meta: ObjectMeta::named(name),
            ..basalt_api::JoinToken::default()
        };
        token.spec.ttl_seconds = 60;
        token.spec.max_uses = max_uses;
        token.status.expires_at_unix_ms = expires;
        token.status.secret_sha256 = "aa".repeat(32);
        Object::Token(token)
    }

    fn registration(token: &str, node: &str, now: u64) -> Command {
        Command::Register(Registration {
            token: token.into(),
            secret_sha256: "aa".repeat(32),
            node: node.into(),
            address: "10.0.0.9:7500".into(),
            capacity: Resources {
                cpus: 4,
                memory_mib: 8192,
                storage_bytes: 0,
            },
            now_unix_ms: now,
            new_uid: format!("uid-{node}-{now}"),
            node_credential_sha256: String::new(),
            new_credential_sha256: format!("{:064x}", now),
        })
    }

    #[test]
    fn a_node_registers_again_with_its_credential_not_a_spent_token() {
        let mut state = State::default();
        state
            .apply(1, Command::Create(token("t", 1, 1_000)))
            .unwrap();
        state.apply(2, registration("t", "n1", 10)).unwrap();
        let credential = format!("{:064x}", 10);
        let again = |hash: &str, node: &str, at: u64| {
            let Command::Register(mut r) = registration("", node, at) else {
                unreachable!()
            };
            r.secret_sha256 = String::new();
            r.node_credential_sha256 = hash.to_owned();
            r.new_credential_sha256 = String::new();
            Command::Register(r)
        };
        // The token is used up; the credential still registers the node.
        assert!(matches!(
            state.apply(3, registration("t", "n1", 20)),
            Err(Refusal::FailedPrecondition { .. })
        ));
        let Some(Object::Node(mut lost)) = state.get(Kind::Node, "n1").cloned() else {
            panic!()
        };
        lost.status.conditions.clear();
        lost.status.credential_sha256 = "forged".into();
        lost.meta.resource_version = 2;
        state.apply(4, Command::Update(Object::Node(lost))).unwrap();
        let applied = state.apply(5, again(&credential, "n1", 30)).unwrap();
        let Object::Node(node) = &applied.reply else {
            panic!()
        };
        assert!(node.status.is_ready());
        assert_eq!(node.meta.uid, "uid-n1-10");
        assert_eq!(
            node.status.credential_sha256, credential,
            "an update cannot change the credential hash"
        );
        assert_eq!(applied.changes.len(), 1, "no token use is counted");
        assert!(matches!(
            state.apply(6, again(&"bb".repeat(32), "n1", 40)),
            Err(Refusal::Unauthenticated { reason }) if reason.starts_with("node_credential")
        ));
        assert!(matches!(
            state.apply(7, again(&credential, "n2", 40)),
            Err(Refusal::Unauthenticated { .. })
        ));
    }

    #[test]
    fn registration_checks_and_counts_the_token_then_refreshes_the_node() {
        let mut state = State::default();
        state
            .apply(1, Command::Create(token("t", 2, 1_000)))
            .unwrap();
        let applied = state.apply(2, registration("t", "n1", 10)).unwrap();
        let Object::Node(node) = &applied.reply else {
            panic!("{applied:?}")
        };
        assert_eq!(node.meta.uid, "uid-n1-10");
        assert!(node.status.is_ready());
        assert_eq!(node.status.capacity.cpus, 4);
        assert_eq!(applied.changes.len(), 2);
        assert!(
            applied
                .changes
                .iter()
                .all(|c| c.object.meta().resource_version == 2)
        );

        // Again (an agent restart): same uid, one more use.
        let again = state.apply(3, registration("t", "n1", 20)).unwrap();
        assert_eq!(again.reply.meta().uid, "uid-n1-10");
        let Some(Object::Token(used)) = state.get(Kind::Token, "t") else {
            panic!()
        };
        assert_eq!(used.status.uses, 2);
        assert!(matches!(
            state.apply(4, registration("t", "n2", 30)),
            Err(Refusal::FailedPrecondition { reason }) if reason.contains("used up")
        ));

        state
            .apply(5, Command::Create(token("old", 0, 100)))
            .unwrap();
        assert!(matches!(
            state.apply(6, registration("old", "n2", 100)),
            Err(Refusal::FailedPrecondition { reason }) if reason.contains("expired")
        ));
        let Some(Object::Token(mut revoked)) = state.get(Kind::Token, "old").cloned() else {
            panic!()
        };
        revoked.spec.revoked = true;
        revoked.status.uses = 0;
        revoked.status.secret_sha256 = "forged".into();
        state
            .apply(7, Command::Update(Object::Token(revoked)))
            .unwrap();
        let Some(Object::Token(stored)) = state.get(Kind::Token, "old") else {
            panic!()
        };
        assert_eq!(
            stored.status.secret_sha256,
            "aa".repeat(32),
            "an update cannot change the hash"
        );
        assert!(matches!(
            state.apply(8, registration("old", "n2", 50)),
            Err(Refusal::FailedPrecondition { reason }) if reason.contains("revoked")
        ));
        let mut wrong = registration("t", "n2", 30);
        if let Command::Register(r) = &mut wrong {
            r.secret_sha256 = "bb".repeat(32);
        }
        assert!(matches!(
            state.apply(9, wrong),
            Err(Refusal::Unauthenticated { .. })
        ));
        assert!(matches!(
            state.apply(10, registration("nope", "n2", 30)),
            Err(Refusal::Unauthenticated { .. })
        ));
        assert!(
            state.get(Kind::Node, "n2").is_none(),
            "refusals change nothing"
        );
    }

    fn network(name: &str, cidr: &str, vni: u32) -> Object {
        Object::Network(Network {
            meta: ObjectMeta::named(name),
            spec: basalt_api::NetworkSpec {
                cidr: cidr.into(),
                vni,
                routing: None,
            },
        })
    }

    #[test]
    fn networks_never_overlap_and_keep_their_cidr() {
        let mut state = State::default();
        state
            .apply(1, Command::Create(network("a", "10.1.0.0/16", 1)))
            .unwrap();
        let field = |r: Result<Applied, Refusal>| match r {
            Err(Refusal::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        };
        assert_eq!(
            field(state.apply(2, Command::Create(network("b", "10.1.128.0/24", 2)))),
            "spec.cidr"
        );
        assert_eq!(
            field(state.apply(3, Command::Create(network("b", "10.0.0.0/8", 2)))),
            "spec.cidr"
        );
        assert_eq!(
            field(state.apply(4, Command::Create(network("b", "10.2.0.0/16", 1)))),
            "spec.vni"
        );
        state
            .apply(5, Command::Create(network("b", "10.2.0.0/16", 2)))
            .unwrap();
        let mut moved = network("b", "10.3.0.0/16", 2);
        moved.meta_mut().resource_version = 5;
        assert_eq!(field(state.apply(6, Command::Update(moved))), "spec.cidr");
    }
}
