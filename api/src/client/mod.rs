//! Typed clients: each call takes and returns domain types, and every
//! failure is an [`ApiError`] (the server's own, or `Unavailable` for a
//! transport failure).

mod admin;
mod agent;
mod raft;
mod storage;
mod targets;
mod watch;

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::ApiError;

pub use admin::AdminClient;
pub use agent::AgentClient;
pub use raft::RaftClient;
pub use storage::StorageClient;

/// How long a client waits for a TCP connection to a server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoint for `address`: "host:port" or a full "http://host:port" URI.
fn endpoint(address: &str) -> Result<Endpoint, ApiError> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|err| ApiError::invalid("address", format!("{address:?}: {err}")))?;
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT))
}

/// Connects to `address` now; [`ApiError::Unavailable`] names the address
/// when that fails.
async fn connect(address: &str) -> Result<Channel, ApiError> {
    endpoint(address)?
        .connect()
        .await
        .map_err(|err| ApiError::Unavailable {
            reason: format!("cannot connect to {address}: {}", error_chain(&err)),
        })
}

/// A channel to `address` that connects on first use (and reconnects).
fn connect_lazy(address: &str) -> Result<Channel, ApiError> {
    Ok(endpoint(address)?.connect_lazy())
}

/// An error and its sources, joined by ": " (tonic's transport error says
/// only "transport error"; the reason is in its sources).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Decodes a server's reply; a reply that fails to decode is the server's
/// fault, so it is [`ApiError::Internal`], not the server's
/// `InvalidArgument`.
fn decode_reply<P, T: TryFrom<P, Error = ApiError>>(reply: P) -> Result<T, ApiError> {
    T::try_from(reply).map_err(|err| ApiError::Internal {
        reason: format!("the server sent an invalid reply: {err}"),
    })
}
