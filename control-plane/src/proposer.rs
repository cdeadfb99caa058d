//! The leader's proposal batching: writes that arrive while earlier ones
//! are on their way through Raft share one log entry
//! ([`Command::Many`]), so they share the leader's log fsync and one slot
//! in every follower's append.
//!
//! Why: openraft 0.9 appends one proposal at a time and waits for that
//! append's fsync before it takes the next, so one entry per write meant
//! one fsync per write on the leader, in series (the log store's group
//! commit never had two appends to share a flush). Decision 46.
//!
//! Invariants:
//! - a write that arrives while fewer than [`IN_FLIGHT`] entries are on
//!   their way is proposed at once, alone: batching adds no wait to a
//!   lone client; writes queue only behind a full pipeline;
//! - every write gets its own answer: the commands of a batch are applied
//!   independently (a refusal undoes only its own command);
//! - a batch that Raft refused before proposing it (this member does not
//!   lead) answers [`ProposeError::NotLeader`] to each write in it, so each
//!   may be sent to the next leader; any other failure leaves the outcome
//!   unknown ([`ProposeError::Raft`]).

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::raft_types::{NodeId, Raft};
use crate::state::{Command, Outcome};

/// Entries of batched writes on their way through Raft at once.
pub const IN_FLIGHT: usize = 2;
/// Most writes in one entry.
pub const MAX_BATCH: usize = 512;

/// Why a proposal has no outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This member does not lead (any more): the write was not proposed,
    /// or was dropped from the log by a new leader.
    #[error("this member does not lead")]
    NotLeader,
    /// Raft failed with the write on its way: the outcome is unknown.
    #[error("raft: {reason}")]
    Raft {
        /// openraft's error.
        reason: String,
    },
    /// The batching task is gone (the member is shutting down).
    #[error("the member is shutting down")]
    Stopped,
}

impl From<RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>> for ProposeError {
    fn from(err: RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>) -> Self {
        match err {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Self::NotLeader,
            other => Self::Raft {
                reason: other.to_string(),
            },
        }
    }
}

/// One write waiting to be proposed.
struct Pending {
    command: Command,
    reply: oneshot::Sender<Result<Outcome, ProposeError>>,
}

/// Proposes writes on a member's Raft, batching those that queue.
#[derive(Debug, Clone)]
pub struct Proposer {
    queue: mpsc::UnboundedSender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl Proposer {
    /// Starts the batching task on the current tokio runtime; it ends
    /// when the last clone of the proposer is dropped.
    pub fn start(raft: Raft) -> Self {
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, pending));
        Self { queue }
    }

    /// Proposes `command` (already stamped and sealed) and waits for its
    /// outcome.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { command, reply })
            .map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)?
    }
}

/// Takes writes off the queue: each time an entry slot is free, everything
/// queued (up to [`MAX_BATCH`]) goes into one entry.
async fn run(raft: Raft, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            propose_batch(&raft, batch).await;
            drop(slot);
        });
    }
}

/// Proposes one entry for `batch` and answers each write in it.
async fn propose_batch(raft: &Raft, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let Some(one) = batch.pop() else { return };
        let result = raft
            .client_write(one.command)
            .await
            .map(|response| response.data)
            .map_err(ProposeError::from);
        // The writer may have gone (its client hung up): nothing to tell.
        let _ = one.reply.send(result);
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<_>) =
        batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let count = commands.len();
    match raft.client_write(Command::Many(commands)).await {
        Ok(response) => match response.data {
            Outcome::Many(outcomes) if outcomes.len() == count => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            other => {
                let err = ProposeError::Raft {
                    reason: format!(
                        "the state machine answered a batch of {count} writes with {other:?}"
                    ),
                };
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        },
        Err(err) => {
            let err = ProposeError::from(err);
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}
