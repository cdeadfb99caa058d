//! Writes a follower forwards to the leader, many in one call (the Raft
//! service's `Forward`): a follower used to make one admin gRPC call to
//! the leader per write, so under many clients most of both members' CPU
//! went to HTTP/2 frames, syscalls and wake-ups for those calls
//! (decision 62). Now the writes that queue while earlier ones are on
//! their way go together.
//!
//! Invariants:
//! - a write that arrives while fewer than [`IN_FLIGHT`] calls are out is
//!   sent at once: batching adds no wait to a lone writer;
//! - the leader handles each write of a call exactly as a write it got
//!   through its admin API (`AdminService::write`) and answers each
//!   on its own; the follower hands every writer its own answer;
//! - a call that failed has the same meaning for each of its writes as a
//!   one-write call failing the same way (never sent, or outcome unknown:
//!   the caller decides, as before); a writer that gave up before its
//!   call left is not sent;
//! - a leader that does not serve `Forward` (an older member) did
//!   nothing: its writes are sent again one by one over the admin API.

use std::sync::Arc;
use std::time::Duration;

use basalt_api::{AdminClient, ApiError, Object, RaftClient};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::admin::AdminService;
use crate::state::Command;

/// Forward calls on their way to the leader at once, per leader.
pub const IN_FLIGHT: usize = 4;
/// Most writes in one call.
pub const MAX_BATCH: usize = 256;
/// How long one call may take before its writes are answered
/// `UNAVAILABLE` (outcome unknown).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One write's answer on the wire: the object written, or the error the
/// leader's admin API would have answered (as its gRPC status parts, so
/// the follower rebuilds the same [`ApiError`]).
// One per write, built and consumed at once: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Done(Object),
    Failed {
        code: i32,
        message: String,
        details: Vec<u8>,
    },
}

impl From<Result<Object, ApiError>> for Answer {
    fn from(result: Result<Object, ApiError>) -> Self {
        match result {
            Ok(object) => Self::Done(object),
            Err(err) => {
                let status = tonic::Status::from(err);
                Self::Failed {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    details: status.details().to_vec(),
                }
            }
        }
    }
}

impl Answer {
    fn into_result(self) -> Result<Object, ApiError> {
        match self {
            Self::Done(object) => Ok(object),
            Self::Failed {
                code,
                message,
                details,
            } => Err(ApiError::from(tonic::Status::with_details(
                tonic::Code::from_i32(code),
                message,
                details.into(),
            ))),
        }
    }
}

/// Handles a `Forward` call on the member that got it: each write as if
/// it came through this member's admin API, all at once (so they share
/// Raft entries), answered in order.
pub(super) async fn serve(admin: &AdminService, payload: &[u8]) -> Result<Vec<u8>, ApiError> {
    let commands: Vec<Command> = serde_json::from_slice(payload)
        .map_err(|e| ApiError::invalid("payload", format!("not forwarded writes: {e}")))?;
    if commands.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "payload",
            format!("{} forwarded writes, at most {MAX_BATCH}", commands.len()),
        ));
    }
    let answers = futures::future::join_all(commands.into_iter().map(|command| async move {
        match command {
            Command::Create(_) | Command::Update(_) | Command::Delete { .. } => {
                Answer::from(admin.write(command).await)
            }
            _ => Answer::from(Err(ApiError::invalid(
                "payload",
                "only creates, updates and deletes are forwarded",
            ))),
        }
    }))
    .await;
    serde_json::to_vec(&answers).map_err(|e| ApiError::Internal {
        reason: format!("encoding forwarded answers: {e}"),
    })
}

/// One write waiting to be forwarded.
struct Pending {
    command: Command,
    reply: oneshot::Sender<Result<Object, ApiError>>,
}

/// Forwards writes to one leader, batching those that queue.
#[derive(Debug, Clone)]
pub struct Forwarder {
    queue: mpsc::UnboundedSender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Starts forwarding to the member at `address` (on the current tokio
    /// runtime; the task ends with the last clone).
    pub fn start(address: &str) -> Result<Self, ApiError> {
        let raft = RaftClient::connect_lazy(address)?;
        let admin = AdminClient::connect_lazy(address)?;
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, admin, pending));
        Ok(Self { queue })
    }

    /// Forwards `command` (a create, update or delete) and waits for the
    /// leader's answer.
    pub async fn write(&self, command: Command) -> Result<Object, ApiError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || ApiError::Unavailable {
            reason: "the forwarding task stopped; the outcome is unknown".into(),
        };
        self.queue
            .send(Pending { command, reply })
            .map_err(|_| ApiError::Unavailable {
                reason: "cannot connect to the leader: the forwarding task stopped".into(),
            })?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Takes writes off the queue: each time a call slot is free, everything
/// queued (up to [`MAX_BATCH`]) goes in one call.
async fn run(raft: RaftClient, admin: AdminClient, mut queue: mpsc::UnboundedReceiver<Pending>) {
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
        let (raft, admin) = (raft.clone(), admin.clone());
        tokio::spawn(async move {
            send(&raft, &admin, batch).await;
            drop(slot);
        });
    }
}

/// Sends one call for `batch` and answers each write in it.
async fn send(raft: &RaftClient, admin: &AdminClient, batch: Vec<Pending>) {
    // A writer that gave up (its deadline, a leader change) is not sent.
    let batch: Vec<Pending> = batch.into_iter().filter(|p| !p.reply.is_closed()).collect();
    if batch.is_empty() {
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<_>) =
        batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let payload = match serde_json::to_vec(&commands) {
        Ok(payload) => payload,
        Err(e) => {
            let err = ApiError::Internal {
                reason: format!("encoding forwarded writes: {e}"),
            };
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
    };
    let result = match tokio::time::timeout(CALL_TIMEOUT, raft.forward(payload)).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::Unavailable {
            reason: format!(
                "the leader did not answer forwarded writes within {CALL_TIMEOUT:?}; the outcome is unknown"
            ),
        }),
    };
    let answers = match result {
        Ok(reply) => serde_json::from_slice::<Vec<Answer>>(&reply)
            .map_err(|e| format!("undecodable answers: {e}"))
            .and_then(|answers| {
                if answers.len() == commands.len() {
                    Ok(answers)
                } else {
                    Err(format!(
                        "{} answers to {} writes",
                        answers.len(),
                        commands.len()
                    ))
                }
            }),
        Err(err) if not_served(&err) => {
            // Nothing was done: one by one, as before this call existed.
            for (command, reply) in commands.into_iter().zip(replies) {
                let admin = admin.clone();
                tokio::spawn(async move {
                    let _ = reply.send(one_by_one(&admin, command).await);
                });
            }
            return;
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
    };
    match answers {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer.into_result());
            }
        }
        Err(reason) => {
            let err = ApiError::Unavailable {
                reason: format!(
                    "the leader's answer to forwarded writes: {reason}; the outcome is unknown"
                ),
            };
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// Whether the leader does not serve `Forward` at all (an older member,
/// or one whose Raft service takes no writes): it did nothing.
fn not_served(err: &ApiError) -> bool {
    match err {
        ApiError::FailedPrecondition { reason } => {
            reason.contains("does not take forwarded writes")
        }
        ApiError::Internal { reason } => reason.contains("not implemented"),
        _ => false,
    }
}

/// Forwards one write over the admin API.
async fn one_by_one(admin: &AdminClient, command: Command) -> Result<Object, ApiError> {
    match command {
        Command::Create(object) => admin.create(object).await,
        Command::Update(object) => admin.update(object).await,
        Command::Delete {
            kind,
            name,
            expected_resource_version,
            force,
        } => {
            if force {
                admin
                    .delete_forced(kind, &name, expected_resource_version)
                    .await
            } else {
                admin.delete(kind, &name, expected_resource_version).await
            }
        }
        _ => Err(ApiError::Unavailable {
            reason: "leadership changed during a batched write; retry".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{Image, Kind, ObjectMeta};

    use super::*;

    #[test]
    fn answers_carry_the_leaders_error_unchanged() {
        let errors = [
            ApiError::AlreadyExists {
                kind: Kind::Image,
                name: "a".into(),
            },
            ApiError::Aborted {
                expected: 3,
                actual: 4,
            },
            ApiError::invalid("meta.name", "too long"),
            ApiError::Unavailable {
                reason: "leadership is changing; retry".into(),
            },
            ApiError::NotLeader {
                leader: Some("127.0.0.1:7400".into()),
            },
        ];
        for err in errors {
            let wire = serde_json::to_vec(&Answer::from(Err(err.clone()))).unwrap();
            let back: Answer = serde_json::from_slice(&wire).unwrap();
            assert_eq!(back.into_result(), Err(err));
        }
        let object = Object::Image(Image {
            meta: ObjectMeta::named("i"),
            ..Image::default()
        });
        let wire = serde_json::to_vec(&Answer::from(Ok(object.clone()))).unwrap();
        let back: Answer = serde_json::from_slice(&wire).unwrap();
        assert_eq!(back.into_result(), Ok(object));
    }
}
