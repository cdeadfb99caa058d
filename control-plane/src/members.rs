//! The membership reconciler: makes the Raft membership match the
//! `Member` objects, one change at a time, on the leader only.
//!
//! Rules (each round makes at most one change, then starts over):
//! - the leader makes sure its own `Member` object exists (this is how a
//!   bootstrapped cluster's first member appears);
//! - a `Member` whose id is not a voter is added as a learner, which
//!   blocks until it has caught up, then promoted to voter;
//! - a voter or learner without a `Member` object is removed, except the
//!   leader itself and the last voter (to remove the leader, stop it: the
//!   next leader removes it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use basalt_api::{Kind, Member, Object, ObjectMeta};
use openraft::{BasicNode, ChangeMembers, ServerState};

use crate::admin::stamp;
use crate::raft_types::{NodeId, Raft};
use crate::state::{Command, Outcome, Refusal};
use crate::store::Shared;

/// How often the reconciler looks, besides after every applied change.
const PERIOD: Duration = Duration::from_secs(1);
/// How long adding one learner may take (it must catch up first).
const ADD_LEARNER_TIMEOUT: Duration = Duration::from_secs(60);

/// This member, as its own `Member` object describes it.
#[derive(Debug, Clone)]
pub struct Me {
    /// Raft id.
    pub id: NodeId,
    /// `Member` object name.
    pub name: String,
    /// Advertised address.
    pub address: String,
}

/// Runs the reconciler until the state machine's channel closes.
pub async fn run(raft: Raft, shared: Arc<Shared>, me: Me) {
    let mut applied = shared.subscribe();
    loop {
        match reconcile_once(&raft, &shared, &me).await {
            Ok(Some(done)) => {
                tracing::info!(change = %done, "membership changed");
                continue;
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "membership change failed; will retry"),
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(PERIOD) => {}
        }
    }
}

/// One round: at most one change. Returns what it did.
async fn reconcile_once(raft: &Raft, shared: &Shared, me: &Me) -> Result<Option<String>, String> {
    let metrics = raft.server_metrics().borrow().clone();
    if metrics.state != ServerState::Leader {
        return Ok(None);
    }
    let desired: BTreeMap<NodeId, String> = shared
        .read()
        .state
        .list(Kind::Member)
        .filter_map(|object| match object {
            Object::Member(member) => Some((member.id, member.address.clone())),
            _ => None,
        })
        .collect();

    if !desired.contains_key(&me.id) {
        let member = Object::Member(Member {
            meta: ObjectMeta::named(me.name.clone()),
            id: me.id,
            address: me.address.clone(),
            voter: false,
            leader: false,
        });
        let response = raft
            .client_write(stamp(Command::Create(member)))
            .await
            .map_err(|e| format!("recording this member: {e}"))?;
        return match response.data {
            Outcome::Refused(Refusal::AlreadyExists { .. })
            | Outcome::Refused(Refusal::FailedPrecondition { .. }) => Err(format!(
                "cannot record this member as {:?} with id {}: {:?}",
                me.name, me.id, response.data
            )),
            _ => Ok(Some(format!("recorded member {} ({})", me.id, me.name))),
        };
    }

    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let nodes: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();

    if let Some((&id, address)) = desired.iter().find(|(id, _)| !voters.contains(id)) {
        let add = raft.add_learner(id, BasicNode::new(address), true);
        tokio::time::timeout(ADD_LEARNER_TIMEOUT, add)
            .await
            .map_err(|_| {
                format!("member {id} at {address} did not catch up within {ADD_LEARNER_TIMEOUT:?}")
            })?
            .map_err(|e| format!("adding member {id} at {address} as a learner: {e}"))?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| format!("promoting member {id} to voter: {e}"))?;
        return Ok(Some(format!("added member {id} at {address} as a voter")));
    }

    let stale = nodes.iter().copied().find(|id| {
        !desired.contains_key(id) && *id != me.id && !(voters.len() == 1 && voters.contains(id))
    });
    if let Some(id) = stale {
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        raft.change_membership(change, false)
            .await
            .map_err(|e| format!("removing member {id}: {e}"))?;
        return Ok(Some(format!("removed member {id}")));
    }
    // Status: each member's `voter` flag follows the Raft membership.
    let outdated = shared
        .read()
        .state
        .list(Kind::Member)
        .find_map(|object| match object {
            Object::Member(member) if member.voter != voters.contains(&member.id) => {
                Some(member.clone())
            }
            _ => None,
        });
    if let Some(mut member) = outdated {
        member.voter = !member.voter;
        let (id, voter) = (member.id, member.voter);
        raft.client_write(Command::Update(Object::Member(member)))
            .await
            .map_err(|e| format!("recording member {id}'s role: {e}"))?;
        return Ok(Some(format!(
            "member {id} is {}",
            if voter { "a voter" } else { "not a voter" }
        )));
    }
    Ok(None)
}
