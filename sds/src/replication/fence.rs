//! The agent's fencer: a primary that lost a peer asks, through the
//! storage-local API, the node agent that watches this process's fence
//! requests (`WatchFences`) to have the control plane record that peer
//! outdated, and waits for the answer (`AnswerFence`).
//!
//! The storage process has no control-plane credentials and no idea of
//! VMs and placements: the agent has both. So the question goes out as a
//! request on a stream the agent watches, and comes back as an answer to
//! its id.
//!
//! Invariants:
//! - only a yes from the agent confirms a peer outdated; no agent
//!   watching, no answer within [`ANSWER_TIMEOUT`], or a no all leave the
//!   primary's writes suspended (it asks again, see
//!   [`super::FENCE_RETRY`]) — an isolated primary acknowledges nothing;
//! - writers asking the same question (volume, peer, epoch) at once share
//!   one request; a request is forgotten once its last asker has its
//!   answer or gave up, so an answer never serves a later question;
//! - every watcher sees every pending request (a new watcher first gets
//!   those already pending), each once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::watch;

use super::{FenceError, Fencer};

/// How long a primary's writer waits for the agent's answer before giving
/// up (and asking again later). Longer than the agent's own call to the
/// control plane, so a slow but successful answer is not wasted.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// A primary's question: may it go on without `peer`?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceQuestion {
    /// Names this question in the answer.
    pub id: u64,
    /// The volume (the pool's name for it).
    pub volume: String,
    /// The lost peer's replication address.
    pub peer: SocketAddr,
    /// The asking primary's epoch.
    pub epoch: u64,
}

/// The answer to a [`FenceQuestion`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceVerdict {
    /// The control plane recorded the peer outdated.
    Outdated,
    /// The control plane refused, saying why.
    Refused(String),
}

#[derive(Debug)]
struct Pending {
    question: FenceQuestion,
    verdict: Option<FenceVerdict>,
    askers: usize,
}

#[derive(Debug, Default)]
struct Broker {
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    watchers: usize,
}

/// The fencer of attached primaries, answered by the node agent. Cheap to
/// clone (shared state).
#[derive(Debug, Clone)]
pub struct AgentFencer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    broker: Mutex<Broker>,
    answered: Condvar,
    /// Bumped whenever a question is added, for watchers.
    added: watch::Sender<u64>,
    timeout: Duration,
}

fn lock(m: &Mutex<Broker>) -> MutexGuard<'_, Broker> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for AgentFencer {
    fn default() -> Self {
        AgentFencer::new(ANSWER_TIMEOUT)
    }
}

/// Fence questions as a watcher receives them; dropping it stops the watch.
pub type FenceQuestions = Pin<Box<dyn Stream<Item = FenceQuestion> + Send>>;

/// Counts a watcher while its stream lives.
struct Watching(Arc<Shared>);

impl Drop for Watching {
    fn drop(&mut self) {
        lock(&self.0.broker).watchers -= 1;
    }
}

impl AgentFencer {
    /// A fencer whose askers wait at most `timeout` for an answer.
    pub fn new(timeout: Duration) -> AgentFencer {
        AgentFencer {
            shared: Arc::new(Shared {
                broker: Mutex::new(Broker::default()),
                answered: Condvar::new(),
                added: watch::Sender::new(0),
                timeout,
            }),
        }
    }

    /// How many watchers are connected.
    pub fn watchers(&self) -> usize {
        lock(&self.shared.broker).watchers
    }

    /// The questions waiting for an answer, oldest first.
    pub fn pending(&self) -> Vec<FenceQuestion> {
        lock(&self.shared.broker)
            .pending
            .values()
            .filter(|p| p.verdict.is_none())
            .map(|p| p.question.clone())
            .collect()
    }

    /// Every question pending now, then each new one, once each, until
    /// the stream is dropped.
    pub fn watch(&self) -> FenceQuestions {
        let shared = self.shared.clone();
        lock(&shared.broker).watchers += 1;
        let state = (
            Watching(shared.clone()),
            shared.added.subscribe(),
            BTreeSet::<u64>::new(),
        );
        Box::pin(futures::stream::unfold(
            state,
            |(guard, mut added, mut seen)| async move {
                loop {
                    added.mark_unchanged();
                    let next = lock(&guard.0.broker)
                        .pending
                        .values()
                        .find(|p| p.verdict.is_none() && !seen.contains(&p.question.id))
                        .map(|p| p.question.clone());
                    if let Some(question) = next {
                        seen.insert(question.id);
                        // Forget ids that are no longer pending.
                        let broker = lock(&guard.0.broker);
                        seen.retain(|id| broker.pending.contains_key(id));
                        drop(broker);
                        return Some((question, (guard, added, seen)));
                    }
                    if added.changed().await.is_err() {
                        return None;
                    }
                }
            },
        ))
    }

    /// Records the agent's answer to question `id`. `false` when no asker
    /// waits for it any more (it gave up, or another answer came first).
    pub fn answer(&self, id: u64, verdict: FenceVerdict) -> bool {
        let mut broker = lock(&self.shared.broker);
        match broker.pending.get_mut(&id) {
            Some(p) if p.verdict.is_none() => {
                tracing::info!(volume = %p.question.volume, peer = %p.question.peer, epoch = p.question.epoch, ?verdict, "fence answered");
                p.verdict = Some(verdict);
                self.shared.answered.notify_all();
                true
            }
            _ => false,
        }
    }

    fn ask(&self, volume: &str, peer: SocketAddr, epoch: u64) -> Result<(), FenceError> {
        let unanswered = |reason: &str| FenceError::Unanswered {
            volume: volume.to_owned(),
            peer,
            epoch,
            reason: reason.to_owned(),
        };
        let mut broker = lock(&self.shared.broker);
        if broker.watchers == 0 {
            return Err(unanswered(
                "no node agent watches this process's fence requests",
            ));
        }
        let existing = broker
            .pending
            .values()
            .find(|p| {
                p.verdict.is_none()
                    && p.question.volume == volume
                    && p.question.peer == peer
                    && p.question.epoch == epoch
            })
            .map(|p| p.question.id);
        let id = match existing {
            Some(id) => id,
            None => {
                broker.next_id += 1;
                let id = broker.next_id;
                let question = FenceQuestion {
                    id,
                    volume: volume.to_owned(),
                    peer,
                    epoch,
                };
                tracing::info!(volume, %peer, epoch, id, "asking the node agent to outdate a lost peer");
                broker.pending.insert(
                    id,
                    Pending {
                        question,
                        verdict: None,
                        askers: 0,
                    },
                );
                self.shared.added.send_modify(|v| *v += 1);
                id
            }
        };
        if let Some(p) = broker.pending.get_mut(&id) {
            p.askers += 1;
        }
        let deadline = Instant::now() + self.shared.timeout;
        let verdict = loop {
            match broker.pending.get(&id).and_then(|p| p.verdict.clone()) {
                Some(v) => break Some(v),
                None if Instant::now() >= deadline => break None,
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            broker = self
                .shared
                .answered
                .wait_timeout(broker, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        let last = broker.pending.get_mut(&id).is_some_and(|p| {
            p.askers -= 1;
            p.askers == 0
        });
        if last {
            broker.pending.remove(&id);
        }
        match verdict {
            Some(FenceVerdict::Outdated) => Ok(()),
            Some(FenceVerdict::Refused(reason)) => Err(FenceError::Refused {
                volume: volume.to_owned(),
                peer,
                epoch,
                reason,
            }),
            None => Err(unanswered(&format!(
                "the node agent did not answer within {:?}",
                self.shared.timeout
            ))),
        }
    }
}

impl Fencer for AgentFencer {
    fn outdate_peer(&self, volume: &str, peer: SocketAddr, epoch: u64) -> Result<(), FenceError> {
        self.ask(volume, peer, epoch)
    }

    /// The control plane must know a copy being filled is not up to date.
    fn guards_full_sync(&self) -> bool {
        true
    }
}
