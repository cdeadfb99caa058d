//! The recent changes a member keeps in memory to serve watches.
//!
//! Invariant: every change with a resource version above [`History::oldest`]
//! is held, in order; a watch from an older version must re-list
//! (`OUT_OF_RANGE`). The history is not persisted: after a restart or a
//! snapshot install it starts at the member's applied index (see
//! `docs/decisions.md`).

use std::collections::VecDeque;

use basalt_api::{Kind, Object, WatchEvent};

use crate::state::ChangeType;

/// One applied change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The log index it was applied at: its resource version.
    pub index: u64,
    /// Added, modified or deleted.
    pub change: ChangeType,
    /// The object after the change (as it was, for a delete).
    pub object: Object,
    /// The object before the change, for an update (so a filtered watch
    /// can tell that an object left its filter, e.g. a placement that
    /// moved off a node).
    pub previous: Option<Object>,
}

impl Change {
    /// The change as a watch event.
    pub fn to_event(&self) -> WatchEvent {
        let (object, resource_version) = (self.object.clone(), self.index);
        match self.change {
            ChangeType::Added => WatchEvent::Added {
                object,
                resource_version,
            },
            ChangeType::Modified => WatchEvent::Modified {
                object,
                resource_version,
            },
            ChangeType::Deleted => WatchEvent::Deleted {
                object,
                resource_version,
            },
        }
    }
}

/// A bounded, ordered window of recent changes.
#[derive(Debug)]
pub struct History {
    changes: VecDeque<Change>,
    capacity: usize,
    oldest: u64,
}

impl History {
    /// An empty history that can serve watches from `start` on, keeping at
    /// most `capacity` changes (at least one).
    pub fn new(capacity: usize, start: u64) -> Self {
        Self {
            changes: VecDeque::new(),
            capacity: capacity.max(1),
            oldest: start,
        }
    }

    /// The oldest version a watch may start from.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// Records a change; drops the oldest one when full.
    pub fn push(&mut self, change: Change) {
        if self.changes.len() == self.capacity
            && let Some(dropped) = self.changes.pop_front()
        {
            self.oldest = dropped.index;
        }
        self.changes.push_back(change);
    }

    /// Forgets everything: watches may start from `start` on (after a
    /// snapshot replaced the state).
    pub fn reset(&mut self, start: u64) {
        self.changes.clear();
        self.oldest = start;
    }

    /// Up to `limit` changes to objects of `kind` (any when `None`) with a
    /// version above `after` — more when the last one shares its version
    /// with others (one command can change several objects), so a batch
    /// never ends inside a version; `Err(oldest)` when `after` is older
    /// than the history reaches.
    pub fn since(&self, after: u64, kind: Option<Kind>, limit: usize) -> Result<Vec<Change>, u64> {
        if after < self.oldest {
            return Err(self.oldest);
        }
        let start = self.changes.partition_point(|c| c.index <= after);
        let mut batch: Vec<Change> = Vec::new();
        for change in self
            .changes
            .range(start..)
            .filter(|c| kind.is_none_or(|k| c.object.kind() == k))
        {
            if batch.len() >= limit && batch.last().is_none_or(|last| last.index != change.index) {
                break;
            }
            batch.push(change.clone());
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{Member, ObjectMeta};

    use super::*;

    fn change(index: u64) -> Change {
        Change {
            index,
            change: ChangeType::Added,
            object: Object::Member(Member {
                meta: ObjectMeta::named("m"),
                id: 1,
                address: "a:1".into(),
                voter: false,
                leader: false,
            }),
            previous: None,
        }
    }

    #[test]
    fn keeps_a_window_and_refuses_older_starts() {
        let mut history = History::new(3, 10);
        for index in [11, 12, 15, 20] {
            history.push(change(index));
        }
        assert_eq!(history.oldest(), 11);
        assert_eq!(history.since(10, None, 10), Err(11));
        let indexes = |v: Vec<Change>| v.into_iter().map(|c| c.index).collect::<Vec<_>>();
        assert_eq!(indexes(history.since(11, None, 10).unwrap()), [12, 15, 20]);
        assert_eq!(indexes(history.since(15, None, 10).unwrap()), [20]);
        assert_eq!(indexes(history.since(12, None, 1).unwrap()), [15]);
        assert!(
            history
                .since(20, Some(Kind::Member), 10)
                .unwrap()
                .is_empty()
        );
        assert!(history.since(11, Some(Kind::Vm), 10).unwrap().is_empty());

        // A batch never ends between two changes of one version.
        let mut shared = History::new(10, 0);
        for index in [1, 2, 2, 2, 3] {
            shared.push(change(index));
        }
        assert_eq!(indexes(shared.since(0, None, 2).unwrap()), [1, 2, 2, 2]);
        assert_eq!(indexes(shared.since(2, None, 1).unwrap()), [3]);
        history.reset(30);
        assert_eq!(history.since(20, None, 10), Err(30));
    }
}
