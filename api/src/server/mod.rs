//! The typed server side: one trait per service, written in domain types,
//! and adapters that serve an implementation as gRPC [`Routes`].
//!
//! An implementation never sees a protobuf message: the adapters decode
//! and validate each request first (answering `INVALID_ARGUMENT` with the
//! field's path when that fails) and encode replies and errors after.

mod admin;
mod agent;
mod raft;
mod storage;

use std::pin::Pin;

use futures::Stream;
use tonic::{Response, Status};

use crate::{ApiError, Object, WatchEvent};

pub use admin::{AdminApi, add_admin_routes, admin_routes};
pub use agent::{AgentApi, add_agent_routes, agent_routes};
pub use raft::{RaftApi, add_raft_routes, raft_routes};
pub use storage::{FenceStream, StorageApi, storage_routes};

#[cfg(doc)]
use tonic::service::Routes;

/// A stream of watch events, as servers return it and clients receive it.
/// An `Err` item (e.g. [`ApiError::OutOfRange`]) ends the watch.
pub type WatchStream<T = Object> =
    Pin<Box<dyn Stream<Item = Result<WatchEvent<T>, ApiError>> + Send>>;

/// Largest message a server or client sends or accepts: a list of every
/// VM of a large cluster, or a Raft snapshot chunk, fits.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Turns a handler's result into the gRPC reply, logging a failure.
pub(crate) fn reply<T, P: From<T>>(
    method: &'static str,
    result: Result<T, ApiError>,
) -> Result<Response<P>, Status> {
    result
        .map(|value| Response::new(value.into()))
        .map_err(|err| refuse(method, err))
}

/// Turns a handler's error into the gRPC status, logging it: a server
/// fault as a warning, a refused request (bad input, CAS conflict) at debug.
pub(crate) fn refuse(method: &'static str, err: ApiError) -> Status {
    if matches!(err, ApiError::Internal { .. }) {
        tracing::warn!(method, error = %err, "request failed");
    } else {
        tracing::debug!(method, error = %err, "request refused");
    }
    err.into()
}
