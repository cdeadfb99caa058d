//! The one error type of the contract.
//!
//! Servers return it from [`AdminApi`](crate::AdminApi) and friends, the
//! adapters turn it into a [`tonic::Status`] (see `convert/error.rs`), and
//! the clients turn the status back into the same value.

use crate::types::Kind;

/// Why an API call failed. Each variant maps to one gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request or object is malformed; `field` is its path, e.g.
    /// `spec.memory_mib` or `vm.meta` (`INVALID_ARGUMENT`).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No object of that kind has that name (`NOT_FOUND`).
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Kind of the object looked for.
        kind: Kind,
        /// Its name.
        name: String,
    },
    /// An object of that kind already has that name (`ALREADY_EXISTS`).
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// Kind of the object.
        kind: Kind,
        /// Its name.
        name: String,
    },
    /// Compare-and-swap failed: the object changed since it was read
    /// (`ABORTED`). Read it again and retry.
    #[error("resource version mismatch: expected {expected}, found {actual}")]
    Aborted {
        /// The resource version the caller sent.
        expected: u64,
        /// The object's current resource version.
        actual: u64,
    },
    /// The request is well-formed but the cluster's state forbids it, e.g.
    /// an expired join token (`FAILED_PRECONDITION`).
    #[error("failed precondition: {reason}")]
    FailedPrecondition {
        /// What forbids it.
        reason: String,
    },
    /// A watch asked for changes older than the store keeps
    /// (`OUT_OF_RANGE`): list again and watch from the list's version.
    #[error("resource version {requested} is compacted; the oldest kept is {oldest}")]
    OutOfRange {
        /// The resource version asked for.
        requested: u64,
        /// The oldest resource version still available.
        oldest: u64,
    },
    /// This control-plane member is not the Raft leader (`UNAVAILABLE`,
    /// with the leader's address in the `basalt-leader` metadata).
    #[error("not the leader{}", leader_hint(.leader))]
    NotLeader {
        /// The current leader's address, when known.
        leader: Option<String>,
    },
    /// The service cannot answer now; retrying may help (`UNAVAILABLE`).
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Why, including the address when a connection failed.
        reason: String,
    },
    /// Missing or bad credentials, e.g. an unknown join token (`UNAUTHENTICATED`).
    #[error("unauthenticated: {reason}")]
    Unauthenticated {
        /// What was wrong with the credentials.
        reason: String,
    },
    /// A bug or an unexpected failure on the server (`INTERNAL`).
    #[error("internal error: {reason}")]
    Internal {
        /// What failed.
        reason: String,
    },
}

impl ApiError {
    /// An [`ApiError::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An [`ApiError::InvalidArgument`] for a required field that is unset.
    pub fn missing(field: impl Into<String>) -> Self {
        Self::invalid(field, "required field is missing")
    }
}

fn leader_hint(leader: &Option<String>) -> String {
    match leader {
        Some(leader) => format!("; the leader is {leader}"),
        None => String::new(),
    }
}
