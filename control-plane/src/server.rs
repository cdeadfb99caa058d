//! Runs one member: opens the storage, starts Raft, serves the admin,
//! agent and Raft services on one gRPC port, bootstraps or joins a
//! cluster, and runs the membership reconciler and the controllers, until
//! asked to stop.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use basalt_api::{
    AdminClient, ApiError, Member, Object, ObjectMeta, add_agent_routes, add_raft_routes,
    admin_routes,
};
use openraft::BasicNode;

use crate::admin::AdminService;
use crate::agent::{AgentService, Leases};
use crate::config::{ConfigError, ControlConfig};
use crate::controllers::Controllers;
use crate::ipam::IpamController;
use crate::members::{self, Me};
use crate::network::{Network, RaftService};
use crate::raft_types::Raft;
use crate::store::{self, OpenError};

/// How often a joining member retries asking to be added.
const JOIN_RETRY: Duration = Duration::from_secs(1);

/// A member could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory cannot be created.
    #[error("creating the data directory {path}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The storage cannot be opened.
    #[error(transparent)]
    Storage(#[from] OpenError),
    /// Raft did not start.
    #[error("starting raft: {reason}")]
    Raft {
        /// openraft's error.
        reason: String,
    },
    /// The listen address cannot be bound.
    #[error("listening on {address}")]
    Listen {
        /// The address.
        address: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving gRPC")]
    Serve(#[source] tonic::transport::Error),
}

/// Runs a member with `config` until `shutdown` resolves.
pub async fn run(
    config: ControlConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    config.validate(None)?;
    let raft_config = Arc::new(config.openraft_config()?);
    std::fs::create_dir_all(&config.data_dir).map_err(|source| RunError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let (log, sm, shared) = store::open(
        &config.data_dir,
        config.raft.watch_history,
        config.node_id,
        config.raft.leader_parallel_fsync,
    )?;
    let guard = log.election_guard();
    let raft = start_raft(&config, raft_config, log, sm).await?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Listen {
            address: config.listen,
            source,
        })?;
    let admin = AdminService::new(config.node_id, raft.clone(), Arc::clone(&shared));
    let leases = Arc::new(Leases::default());
    let agent = AgentService::new(admin.clone(), Arc::clone(&leases), config.nodes.clone());
    let controllers = Controllers::new(
        admin.clone(),
        leases,
        config.nodes.clone(),
        IpamController::new(&config.ipam),
    );
    let raft_service = RaftService::new(raft.clone())
        .with_guard(Arc::clone(&guard))
        .with_writes(admin.clone());
    let routes = add_agent_routes(add_raft_routes(admin_routes(admin), raft_service), agent);
    // Without TCP_NODELAY, a small Raft message or reply can wait for the
    // peer's delayed ACK (40 ms) behind the previous one.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown);
    let server = tokio::spawn(server);
    tracing::info!(node_id = config.node_id, listen = %config.listen, advertise = %config.advertise_address(), "control-plane member serving");

    let me = Me {
        id: config.node_id,
        name: config.member_name(),
        address: config.advertise_address(),
    };
    let initialized = raft.is_initialized().await.map_err(|e| RunError::Raft {
        reason: e.to_string(),
    })?;
    if !initialized {
        if config.bootstrap {
            let members = BTreeMap::from([(me.id, BasicNode::new(&me.address))]);
            raft.initialize(members).await.map_err(|e| RunError::Raft {
                reason: format!("bootstrapping: {e}"),
            })?;
            tracing::info!("bootstrapped a new cluster");
        } else if let Some(seed) = &config.join {
            tokio::spawn(join(seed.clone(), me.clone()));
        } else {
            tracing::warn!(
                "no cluster in the data directory and neither --bootstrap nor --join: waiting to be added"
            );
        }
    }
    let reconciler = tokio::spawn(members::run(raft.clone(), Arc::clone(&shared), me));
    let controllers = tokio::spawn(controllers.run());
    let leader_log = tokio::spawn(log_leader_changes(raft.clone()));

    let served = server.await;
    reconciler.abort();
    controllers.abort();
    leader_log.abort();
    if let Err(err) = raft.shutdown().await {
        tracing::warn!(error = %err, "raft did not shut down cleanly");
    }
    guard.detach();
    match served {
        Ok(result) => result.map_err(RunError::Serve),
        Err(join) => Err(RunError::Raft {
            reason: format!("the gRPC server task failed: {join}"),
        }),
    }
}

/// Starts openraft for member `config.node_id` on its opened storage: the
/// network clamps the commit indexes it sends to the log's fsynced
/// entries, and the log's election guard watches its disk stalls.
pub async fn start_raft(
    config: &ControlConfig,
    raft_config: Arc<openraft::Config>,
    log: store::LogStore,
    sm: store::StateMachineStore,
) -> Result<Raft, RunError> {
    let network = Network::new(log.durable_log());
    let guard = log.election_guard();
    let raft = Raft::new(config.node_id, raft_config, network, log, sm)
        .await
        .map_err(|e| RunError::Raft {
            reason: e.to_string(),
        })?;
    // A disk call longer than a heartbeat interval may have hidden the
    // leader's heartbeats behind it; an election timeout is long enough
    // for the queued ones to be taken.
    guard.attach(
        raft.clone(),
        Duration::from_millis(config.raft.heartbeat_ms),
        Duration::from_millis(config.raft.election_timeout_max_ms),
    );
    Ok(raft)
}

/// Logs every change of leader, with the term (operators and tests read it).
async fn log_leader_changes(raft: Raft) {
    // The server metrics, not the full ones: those change (and would wake
    // this task) on every turn of openraft's core.
    let mut metrics = raft.server_metrics();
    let mut seen = None;
    loop {
        let (leader, term) = {
            let m = metrics.borrow_and_update();
            (m.current_leader, m.vote.leader_id().term)
        };
        if leader.is_some() && seen != Some((leader, term)) {
            seen = Some((leader, term));
            tracing::info!(
                leader_id = leader.unwrap_or_default(),
                term,
                "leader changed"
            );
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Asks the cluster at `seed` to add this member, until it is recorded.
async fn join(seed: String, me: Me) {
    let member = Object::Member(Member {
        meta: ObjectMeta::named(me.name.clone()),
        id: me.id,
        address: me.address.clone(),
        voter: false,
        leader: false,
    });
    loop {
        let result = match AdminClient::connect_lazy(&seed) {
            Ok(client) => client.create(member.clone()).await,
            Err(err) => Err(err),
        };
        match result {
            Ok(_) => {
                tracing::info!(%seed, "asked the cluster to add this member");
                return;
            }
            Err(ApiError::AlreadyExists { .. }) => {
                tracing::info!(%seed, "this member is already recorded in the cluster");
                return;
            }
            Err(err @ (ApiError::InvalidArgument { .. } | ApiError::FailedPrecondition { .. })) => {
                tracing::error!(%seed, error = %err, "the cluster refused this member");
                return;
            }
            Err(err) => {
                tracing::info!(%seed, error = %err, "cannot join yet; retrying");
                tokio::time::sleep(JOIN_RETRY).await;
            }
        }
    }
}
