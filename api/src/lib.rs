//! Basalt's API contract: the gRPC services every component speaks, the
//! domain types they carry, and the conversions between the two.
//!
//! Four services make up the contract (`proto/basalt/v1/`):
//!
//! - **Admin** — create, get, list, update, delete and watch stored
//!   objects ([`Object`]: nodes, VMs, placements, join tokens,
//!   control-plane members, networks, endpoints, migrations, images,
//!   volumes); the CLI
//!   talks to it through [`AdminClient`], the control plane implements
//!   [`AdminApi`] and serves it with [`admin_routes`].
//! - **Agent** — what a node agent asks of the control plane: register,
//!   heartbeat, watch its placements, report VM status ([`AgentApi`],
//!   [`AgentClient`], [`agent_routes`]).
//! - **Raft** — opaque consensus messages between control-plane members
//!   ([`RaftApi`], [`RaftClient`], [`raft_routes`]).
//! - **StorageLocal** — what a node agent asks of its node's storage
//!   process over a Unix socket: volumes, exports, pool status
//!   ([`StorageApi`], [`StorageClient`], [`storage_routes`]).
//!
//! Serving several services on one port, and calling one:
//!
//! ```no_run
//! # async fn run(admin: impl basalt_api::AdminApi, raft: impl basalt_api::RaftApi)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use basalt_api::{AdminClient, Kind, add_raft_routes, admin_routes};
//!
//! let routes = add_raft_routes(admin_routes(admin), raft);
//! let server = tonic::transport::Server::builder()
//!     .add_routes(routes)
//!     .serve("127.0.0.1:7000".parse()?);
//! tokio::spawn(server);
//!
//! let client = AdminClient::connect("127.0.0.1:7000").await?;
//! let vms = client.list(Kind::Vm).await?;
//! # Ok(()) }
//! ```
//!
//! # Invariants
//!
//! - Generated code stays private: no type from `prost`/`tonic` codegen
//!   appears in this crate's public API, so no other crate can depend on
//!   the wire representation.
//! - Every conversion from the wire validates: a message that is
//!   malformed (a missing field, an unknown enum value, an unparsable
//!   address) or that breaks a rule of its domain type (see each type's
//!   `validate`) becomes [`ApiError::InvalidArgument`] naming the field,
//!   before any handler sees it. Bad input never panics.
//! - Errors map to [`tonic::Status`] in one place (both directions), with
//!   typed details in the status, so a client gets back the exact
//!   [`ApiError`] the server returned.

mod client;
mod convert;
mod error;
mod server;
mod types;

/// Code generated from the `.proto` files. Private: see the crate invariants.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::nursery
)]
mod pb {
    tonic::include_proto!("basalt.v1");
}

pub use client::{AdminClient, AgentClient, RaftClient, StorageClient};
pub use error::ApiError;
pub use server::{
    AdminApi, AgentApi, FenceStream, RaftApi, StorageApi, WatchStream, add_admin_routes,
    add_agent_routes, add_raft_routes, admin_routes, agent_routes, raft_routes, storage_routes,
};
pub use tonic::service::Routes;
pub use types::*;
