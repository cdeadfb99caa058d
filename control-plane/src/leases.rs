//! Node leases, kept in memory by the leader: heartbeats renew them, and
//! none of this is a Raft write (DESIGN.md, "Leases and fencing").
//!
//! The table is pure: every method takes the current instant, so tests
//! drive time by hand.
//!
//! Invariants:
//! - the table belongs to one Raft term: when a member starts leading (a
//!   new term) it forgets everything and starts a full lease for every
//!   node the state says is ready — a new leader never expires a node
//!   sooner than a full lease after its election;
//! - a lease, once expired, is never renewed: the node must register
//!   again (a late heartbeat changes nothing);
//! - a lease is bound to the node's uid: a heartbeat from a node object
//!   that was replaced is refused;
//! - the work per round grows with what changed, not with the cluster:
//!   [`LeaseTable::sync_node`] brings one changed node in line, and
//!   [`LeaseTable::expire`] looks only at leases whose expiry passed (a
//!   queue ordered by expiry; a renewal leaves its old entry behind, which
//!   is skipped when it comes up). [`LeaseTable::sync`] (every node) is
//!   for a new term or a state replaced by a snapshot.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

/// One node's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLease {
    /// The node's uid (the `Node` object's).
    pub uid: String,
    /// The last grant or renewal.
    pub renewed: Instant,
    /// When it runs out unless renewed.
    pub expires: Instant,
    /// It ran out; the node is being marked not ready.
    pub expired: bool,
}

/// Why a heartbeat did not renew a lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseRefusal {
    /// No lease for the node: it never registered with this leader's
    /// state, or its lease ran out and it was marked not ready.
    #[error(
        "node {node:?} holds no lease (it expired or the node never registered); register again"
    )]
    NoLease {
        /// The node.
        node: String,
    },
    /// The node object was replaced since the agent registered.
    #[error("node {node:?} has uid {current}, not {presented}; register again")]
    WrongUid {
        /// The node.
        node: String,
        /// The node's uid now.
        current: String,
        /// The uid the heartbeat carried.
        presented: String,
    },
    /// The lease ran out before this heartbeat arrived.
    #[error("the lease of node {node:?} expired; register again")]
    Expired {
        /// The node.
        node: String,
    },
}

/// What the state says about a node, for [`LeaseTable::sync`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The node's name.
    pub name: String,
    /// Its uid.
    pub uid: String,
    /// Whether its `Ready` condition holds.
    pub ready: bool,
}

/// Every node's lease, for one leadership term.
#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    term: Option<u64>,
    leases: HashMap<String, NodeLease>,
    /// Nodes that are lost (not ready), with the instant the HA controller
    /// counts from: their last renewal, or when this leader first saw them
    /// lost.
    lost: HashMap<String, Instant>,
    /// Every grant's and renewal's expiry, soonest first; an entry whose
    /// lease was renewed since (or is gone) is stale and skipped.
    expiries: BinaryHeap<Reverse<(Instant, String)>>,
    /// Nodes whose lease was marked expired (a name whose lease is gone
    /// or was granted again since is dropped when next looked at).
    expired: BTreeSet<String>,
}

impl LeaseTable {
    /// Starts term `term` if it is not the current one: forgets every
    /// lease, gives each ready node a full lease from `now`, and counts
    /// every not-ready node as lost from `now`. Returns whether it reset.
    pub fn start_term(
        &mut self,
        term: u64,
        nodes: &[NodeView],
        now: Instant,
        lease: Duration,
    ) -> bool {
        if self.term == Some(term) {
            return false;
        }
        self.term = Some(term);
        self.leases.clear();
        self.lost.clear();
        self.expiries.clear();
        self.expired.clear();
        self.sync(nodes, now, lease);
        true
    }

    /// The term the table belongs to.
    pub fn term(&self) -> Option<u64> {
        self.term
    }

    /// Gives `node` a fresh lease (it just registered).
    pub fn grant(&mut self, node: &str, uid: &str, now: Instant, lease: Duration) {
        self.lost.remove(node);
        self.expiries.push(Reverse((now + lease, node.to_owned())));
        self.leases.insert(
            node.to_owned(),
            NodeLease {
                uid: uid.to_owned(),
                renewed: now,
                expires: now + lease,
                expired: false,
            },
        );
    }

    /// Renews `node`'s lease on a heartbeat; returns the new expiry.
    pub fn renew(
        &mut self,
        node: &str,
        uid: &str,
        now: Instant,
        lease: Duration,
    ) -> Result<Instant, LeaseRefusal> {
        let Some(held) = self.leases.get_mut(node) else {
            return Err(LeaseRefusal::NoLease {
                node: node.to_owned(),
            });
        };
        if held.uid != uid {
            return Err(LeaseRefusal::WrongUid {
                node: node.to_owned(),
                current: held.uid.clone(),
                presented: uid.to_owned(),
            });
        }
        if held.expired || now >= held.expires {
            held.expired = true;
            self.expired.insert(node.to_owned());
            return Err(LeaseRefusal::Expired {
                node: node.to_owned(),
            });
        }
        held.renewed = now;
        held.expires = now + lease;
        let expires = held.expires;
        self.expiries.push(Reverse((expires, node.to_owned())));
        Ok(expires)
    }

    /// Whether `node` holds a live lease for `uid`.
    pub fn holds(&self, node: &str, uid: &str, now: Instant) -> bool {
        self.leases
            .get(node)
            .is_some_and(|l| l.uid == uid && !l.expired && now < l.expires)
    }

    /// Brings the table in line with the state: a ready node without a
    /// lease (or with one for another uid) gets a fresh one; a lease of a
    /// node that is gone, or not ready and not being fenced, is dropped;
    /// not-ready nodes count as lost from `now` unless already counted;
    /// ready nodes are not lost.
    pub fn sync(&mut self, nodes: &[NodeView], now: Instant, lease: Duration) {
        let by_name: HashMap<&str, &NodeView> =
            nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        self.leases
            .retain(|name, held| match by_name.get(name.as_str()) {
                None => false,
                Some(view) => view.uid == held.uid && (view.ready || held.expired),
            });
        self.lost
            .retain(|name, _| by_name.get(name.as_str()).is_some_and(|view| !view.ready));
        for view in nodes {
            if view.ready {
                if !self.leases.contains_key(&view.name) {
                    self.grant(&view.name, &view.uid, now, lease);
                }
            } else if !self.leases.contains_key(&view.name) {
                self.lost.entry(view.name.clone()).or_insert(now);
            }
        }
    }

    /// Brings one node's lease in line with the state, as [`Self::sync`]
    /// does for every node: `view` is what the state says about the node
    /// `name` now (`None`: it is gone).
    pub fn sync_node(
        &mut self,
        name: &str,
        view: Option<&NodeView>,
        now: Instant,
        lease: Duration,
    ) {
        let keep = match (self.leases.get(name), view) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(held), Some(view)) => view.uid == held.uid && (view.ready || held.expired),
        };
        if !keep {
            self.leases.remove(name);
        }
        let Some(view) = view else {
            self.lost.remove(name);
            return;
        };
        if view.ready {
            self.lost.remove(name);
            if !self.leases.contains_key(name) {
                self.grant(name, &view.uid, now, lease);
            }
        } else if !self.leases.contains_key(name) {
            self.lost.entry(name.to_owned()).or_insert(now);
        }
    }

    /// Marks every lease that ran out by `now` as expired (it can no
    /// longer be renewed) and returns each expired one: `(node, uid)`,
    /// sorted. An expired lease stays until [`Self::fenced`] or a sync
    /// drops it, and is returned again by every call until then.
    pub fn expire(&mut self, now: Instant) -> Vec<(String, String)> {
        while let Some(Reverse((at, _))) = self.expiries.peek()
            && *at <= now
        {
            let Some(Reverse((at, name))) = self.expiries.pop() else {
                break;
            };
            if let Some(held) = self.leases.get_mut(&name)
                && held.expires == at
            {
                held.expired = true;
                self.expired.insert(name);
            }
        }
        let leases = &self.leases;
        self.expired
            .retain(|name| leases.get(name).is_some_and(|held| held.expired));
        self.expired
            .iter()
            .filter_map(|name| Some((name.clone(), leases.get(name)?.uid.clone())))
            .collect()
    }

    /// The node was recorded as not ready: its lease is gone, and it is
    /// lost from its last renewal.
    pub fn fenced(&mut self, node: &str, uid: &str) {
        if let Some(held) = self.leases.get(node)
            && held.uid == uid
        {
            self.lost.insert(node.to_owned(), held.renewed);
            self.leases.remove(node);
        }
    }

    /// Since when `node` counts as lost, if it does.
    pub fn lost_since(&self, node: &str) -> Option<Instant> {
        self.lost.get(node).copied()
    }

    /// Every lost node, with since when it counts as lost.
    pub fn lost(&self) -> impl Iterator<Item = (&str, Instant)> {
        self.lost
            .iter()
            .map(|(name, since)| (name.as_str(), *since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    fn view(name: &str, uid: &str, ready: bool) -> NodeView {
        NodeView {
            name: name.into(),
            uid: uid.into(),
            ready,
        }
    }

    #[test]
    fn heartbeats_renew_until_the_lease_runs_out_then_never_again() {
        let t0 = Instant::now();
        let mut table = LeaseTable::default();
        assert!(table.start_term(3, &[view("a", "u1", true)], t0, LEASE));
        assert!(!table.start_term(3, &[], t0, LEASE), "same term: no reset");
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(table.renew("a", "u1", at(5), LEASE), Ok(at(15)));
        assert!(table.expire(at(14)).is_empty());
        assert!(matches!(
            table.renew("a", "u2", at(6), LEASE),
            Err(LeaseRefusal::WrongUid { .. })
        ));
        assert!(matches!(
            table.renew("b", "u9", at(6), LEASE),
            Err(LeaseRefusal::NoLease { .. })
        ));
        assert_eq!(table.expire(at(15)), [("a".to_owned(), "u1".to_owned())]);
        // A late heartbeat, even a second after, renews nothing.
        assert!(matches!(
            table.renew("a", "u1", at(15), LEASE),
            Err(LeaseRefusal::Expired { .. })
        ));
        assert!(!table.holds("a", "u1", at(15)));
        // While the node is being fenced, sync keeps the expired lease.
        table.sync(&[view("a", "u1", true)], at(15), LEASE);
        assert!(matches!(
            table.renew("a", "u1", at(15), LEASE),
            Err(LeaseRefusal::Expired { .. })
        ));
        table.fenced("a", "u1");
        assert_eq!(
            table.lost_since("a"),
            Some(at(5)),
            "lost from its last renewal"
        );
        table.sync(&[view("a", "u1", false)], at(16), LEASE);
        assert!(matches!(
            table.renew("a", "u1", at(16), LEASE),
            Err(LeaseRefusal::NoLease { .. })
        ));
        // Registering again clears it.
        table.grant("a", "u1", at(20), LEASE);
        assert_eq!(table.lost_since("a"), None);
        assert!(table.holds("a", "u1", at(29)));
    }

    /// What a table shows about `names` at `now`.
    fn observed(table: &LeaseTable, names: &[&str], now: Instant) -> Vec<String> {
        let mut lost: Vec<(&str, Instant)> = table.lost().collect();
        lost.sort();
        let mut seen: Vec<String> = names
            .iter()
            .map(|n| {
                let uid = table.leases.get(*n).map(|l| l.uid.clone());
                let holds = uid.as_deref().is_some_and(|uid| table.holds(n, uid, now));
                format!("{n}: {uid:?} holds={holds} lost={:?}", table.lost_since(n))
            })
            .collect();
        seen.push(format!("{lost:?}"));
        seen
    }

    #[test]
    fn syncing_the_changed_nodes_equals_syncing_every_node() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let names = ["a", "b", "c", "d"];
        // Each step: the nodes as the state has them, and the names that
        // changed since the step before.
        let steps: Vec<(Vec<NodeView>, Vec<&str>)> = vec![
            (
                vec![view("a", "u1", true), view("b", "u2", false)],
                vec!["a", "b"],
            ),
            // c registers; b becomes ready.
            (
                vec![
                    view("a", "u1", true),
                    view("b", "u2", true),
                    view("c", "u3", true),
                ],
                vec!["b", "c"],
            ),
            // a is replaced by a new object; c is deleted; d appears not ready.
            (
                vec![
                    view("a", "u9", true),
                    view("b", "u2", true),
                    view("d", "u4", false),
                ],
                vec!["a", "c", "d"],
            ),
            // b marked not ready (after its lease expired).
            (
                vec![
                    view("a", "u9", true),
                    view("b", "u2", false),
                    view("d", "u4", false),
                ],
                vec!["b"],
            ),
        ];
        let mut full = LeaseTable::default();
        let mut incremental = LeaseTable::default();
        full.start_term(1, &steps[0].0, t0, LEASE);
        incremental.start_term(1, &steps[0].0, t0, LEASE);
        for (i, (nodes, changed)) in steps.iter().enumerate().skip(1) {
            let now = at(4 * i as u64);
            full.sync(nodes, now, LEASE);
            for name in changed {
                let view = nodes.iter().find(|v| v.name == *name);
                incremental.sync_node(name, view, now, LEASE);
            }
            assert_eq!(
                observed(&full, &names, now),
                observed(&incremental, &names, now),
                "step {i}"
            );
            assert_eq!(full.expire(now), incremental.expire(now), "step {i}");
        }
        // Nothing renewed: every lease runs out in both, at the same time.
        let late = at(30);
        assert_eq!(full.expire(late), incremental.expire(late));
        assert_eq!(
            incremental.expire(late),
            [("a".to_owned(), "u9".to_owned())],
            "b was not ready, c and d never held one"
        );
    }

    #[test]
    fn a_renewed_lease_does_not_expire_at_its_old_time() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut table = LeaseTable::default();
        table.start_term(
            1,
            &[view("a", "u1", true), view("b", "u2", true)],
            t0,
            LEASE,
        );
        table.renew("a", "u1", at(8), LEASE).unwrap();
        assert_eq!(table.expire(at(10)), [("b".to_owned(), "u2".to_owned())]);
        assert_eq!(
            table.expire(at(12)),
            [("b".to_owned(), "u2".to_owned())],
            "an expired lease is reported until fenced"
        );
        table.fenced("b", "u2");
        assert!(table.expire(at(17)).is_empty());
        assert_eq!(table.expire(at(18)), [("a".to_owned(), "u1".to_owned())]);
    }

    #[test]
    fn a_new_term_restarts_every_timer_and_counts_unready_nodes_lost() {
        let t0 = Instant::now();
        let mut table = LeaseTable::default();
        table.start_term(1, &[view("a", "u1", true)], t0, LEASE);
        let later = t0 + Duration::from_secs(9);
        let nodes = [view("a", "u1", true), view("b", "u2", false)];
        assert!(table.start_term(2, &nodes, later, LEASE));
        assert_eq!(table.term(), Some(2));
        assert!(
            table.expire(t0 + Duration::from_secs(18)).is_empty(),
            "a full lease from the election"
        );
        assert_eq!(table.lost_since("b"), Some(later));
        assert!(matches!(
            table.renew("b", "u2", later, LEASE),
            Err(LeaseRefusal::NoLease { .. })
        ));
        // A node that vanished loses its lease; a replaced one gets a new one.
        table.sync(&[view("a", "u3", true)], later, LEASE);
        assert!(table.holds("a", "u3", later));
        assert!(!table.holds("a", "u1", later));
        assert_eq!(table.lost_since("b"), None);
    }
}
