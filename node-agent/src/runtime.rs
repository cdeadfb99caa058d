//! The agent's runtime: joins the cluster, keeps its lease, follows its
//! placements and runs the compute [`Reconciler`] on every change and
//! periodically, reporting what it sees.
//!
//! Four tasks share one small state: the heartbeat task records when the
//! control plane last acknowledged the lease; the placement task keeps the
//! set of VMs placed on this node (a list, then a watch from its resource
//! version, re-listing whenever the watch breaks); the reconcile task
//! builds the desired state (fenced when no heartbeat was acknowledged
//! within the fencing window), executes a pass on a blocking thread and
//! reports each VM's status. Any task's failure is retried; only a refused
//! first registration ends the agent. When the control plane drops the
//! node's lease (a heartbeat answered `FAILED_PRECONDITION` or `NOT_FOUND`:
//! the lease expired, or the node object was replaced or removed), the
//! heartbeat task registers again — with the node credential the first
//! registration returned, then with the join token — and keeps retrying.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use basalt_api::{
    AdminClient, AgentClient, ApiError, Condition, Heartbeat, Kind, Object, Placement, Registered,
    Registration, Resources, StatusReport, TokenSecret, VmPhase, VmStatus, WatchEvent,
};
use futures::StreamExt as _;
use tokio::sync::Notify;

use crate::compute::{Compute, PowerState};
use crate::migration::MigrationAgent;
use crate::reconcile::{Desired, DesiredVm, Reconciler, VmObservation};
use crate::vm_domain::{DomainPolicy, domain_name, domain_spec};

/// What an agent needs to know.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name.
    pub node: String,
    /// Where this node is reachable (`host:port`), as the cluster sees it.
    pub address: String,
    /// A control-plane member's address (any member: followers forward).
    pub server: String,
    /// The join token's secret; may be empty when `credential_file` holds
    /// a credential.
    pub token: String,
    /// Where the node credential is kept across restarts
    /// ([`crate::credential`]); `None`: in memory only.
    pub credential_file: Option<crate::credential::CredentialFile>,
    /// What this node offers to VMs.
    pub capacity: Resources,
    /// How VMs become domains here.
    pub policy: DomainPolicy,
    /// Where VM consoles are written.
    pub console_dir: PathBuf,
    /// Stop every VM when no heartbeat was acknowledged for this long.
    pub fence_after: Duration,
    /// Reconcile at least this often.
    pub resync: Duration,
    /// How long a graceful stop may take.
    pub stop_grace: Duration,
    /// This node's VM networking ([`crate::network`]); `None`: none (VMs
    /// with NICs cannot start).
    pub network: Option<crate::network::NetworkConfig>,
    /// The node's storage process ([`crate::storage`]); `None`: VM disks
    /// must exist already.
    pub storage: Option<crate::storage::StorageConfig>,
}

/// The agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The control plane refused to let this node join.
    #[error("registration of node {node} refused")]
    Refused {
        /// The node.
        node: String,
        /// The control plane's answer.
        #[source]
        source: ApiError,
    },
}

#[derive(Debug, Default)]
struct Shared {
    /// When the control plane last acknowledged a heartbeat.
    last_ack: Option<Instant>,
    /// The node uid of the current registration.
    node_uid: String,
    /// The credential the control plane issued at the last registration
    /// with the join token (registers the node again without the token).
    credential: Option<TokenSecret>,
    /// Placements on this node, by VM name.
    placements: BTreeMap<String, Placement>,
}

type State = Arc<Mutex<Shared>>;

fn lock(state: &State) -> std::sync::MutexGuard<'_, Shared> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the agent until `shutdown` completes. Fails only when the
/// registration is refused (a bad token, a name taken by another node).
pub async fn run<C: Compute + 'static>(
    config: AgentConfig,
    compute: Arc<C>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let agent =
        AgentClient::connect_lazy(&config.server).map_err(|source| AgentError::Refused {
            node: config.node.clone(),
            source,
        })?;
    let admin =
        AdminClient::connect_lazy(&config.server).map_err(|source| AgentError::Refused {
            node: config.node.clone(),
            source,
        })?;
    let stored = load_credential(&config);
    let registered = first_registration(&agent, &config, stored.clone()).await?;
    tracing::info!(node = %config.node, uid = %registered.node_uid, "registered");
    keep_credential(&config, registered.node_credential.as_ref());
    let state: State = Arc::new(Mutex::new(Shared {
        node_uid: registered.node_uid.clone(),
        credential: registered.node_credential.clone().or(stored),
        ..Shared::default()
    }));
    let trigger = Arc::new(Notify::new());
    let started = Instant::now();
    // The placements naming this node (its VMs, and those it holds
    // copies of), for the replicas' loop and the fencer.
    let named = crate::storage::replicas::NodePlacements::new(&config.node);

    let heartbeat = tokio::spawn(heartbeats(
        agent.clone(),
        config.clone(),
        registered,
        state.clone(),
    ));
    let placements = tokio::spawn(follow_placements(
        admin.clone(),
        agent.clone(),
        config.node.clone(),
        state.clone(),
        trigger.clone(),
        named.clone(),
    ));
    // The datapath: the reconcile passes make the taps, live migrations
    // their standby taps and the endpoint move on activation.
    let network =
        (config.network.clone()).map(|net| crate::network::NetworkAgent::start(net, admin.clone()));
    let migrations = MigrationAgent::new(&config.node, &config.policy.prefix, network.clone());
    // A migration target readies the VM's seed and replicated disks.
    if let Some(storage) = &config.storage
        && let Ok(volumes) = crate::storage::Volumes::new(&config.node, storage, admin.clone())
    {
        migrations.set_volumes(volumes);
    }
    let migrating = tokio::spawn(crate::migration::run(
        migrations.clone(),
        admin.clone(),
        compute.clone(),
        trigger.clone(),
    ));
    // The secondaries this node holds for VMs placed elsewhere.
    let replicas = config.storage.clone().map(|storage| {
        tokio::spawn(crate::storage::replicas::run(
            config.node.clone(),
            storage,
            admin.clone(),
            named.clone(),
            migrations.clone(),
        ))
    });
    // The storage fence: the storage process's primaries ask, through
    // this agent, the control plane to record a lost peer outdated.
    // The volume versions this agent has seen (the watch, its own marks),
    // which its reports carry (decision 74).
    let seen = crate::storage::seen::SeenVolumes::default();
    let fencer = config.storage.clone().map(|storage| {
        tokio::spawn(crate::storage::fencer::run(
            config.node.clone(),
            storage,
            admin.clone(),
            agent.clone(),
            named.clone(),
            seen.clone(),
        ))
    });
    // How the copies of this node's primaries stand, for the volumes'
    // status.
    let reporter = config.storage.clone().map(|storage| {
        tokio::spawn(crate::storage::report::run(
            config.node.clone(),
            storage,
            agent.clone(),
            named.clone(),
            seen.clone(),
        ))
    });
    // Copies of standalone volumes placed here, and snapshots and clones
    // of the volumes whose primary copy is here (a watch on volumes).
    let snapshots = config.storage.clone().map(|storage| {
        tokio::spawn(crate::storage::standalone::run(
            config.node.clone(),
            storage,
            admin.clone(),
            agent.clone(),
            seen,
        ))
    });
    let reconcile = tokio::spawn(reconcile_loop(
        admin, agent, config, compute, state, trigger, started, migrations, network,
    ));
    shutdown.await;
    heartbeat.abort();
    if let Some(replicas) = replicas {
        replicas.abort();
    }
    if let Some(fencer) = fencer {
        fencer.abort();
    }
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    if let Some(snapshots) = snapshots {
        snapshots.abort();
    }
    placements.abort();
    reconcile.abort();
    migrating.abort();
    Ok(())
}

/// The credential stored by an earlier run, if any; a file that cannot
/// be read is logged (naming it) and the join token is used instead.
fn load_credential(config: &AgentConfig) -> Option<TokenSecret> {
    let file = config.credential_file.as_ref()?;
    match file.load() {
        Ok(credential) => credential,
        Err(err) => {
            tracing::warn!(error = %err, "ignoring the stored node credential");
            None
        }
    }
}

/// Stores a newly issued credential, when the agent keeps one on disk. A
/// failure is logged: the credential still works from memory until the
/// next restart, which then falls back to the join token.
fn keep_credential(config: &AgentConfig, issued: Option<&TokenSecret>) {
    if let (Some(file), Some(credential)) = (&config.credential_file, issued)
        && let Err(err) = file.store(credential)
    {
        tracing::error!(error = %err, "could not keep the node credential");
    }
}

/// The agent's first registration: with the stored credential when there
/// is one, then (refused, e.g. the node was removed meanwhile) with the
/// join token when one was given.
async fn first_registration(
    agent: &AgentClient,
    config: &AgentConfig,
    stored: Option<TokenSecret>,
) -> Result<Registered, AgentError> {
    let Some(credential) = stored else {
        return register(agent, config, None).await;
    };
    match register(agent, config, Some(credential)).await {
        Ok(registered) => {
            tracing::info!("registered with the stored node credential");
            Ok(registered)
        }
        Err(err) if !config.token.is_empty() => {
            tracing::warn!(error = %err, "the stored node credential was refused; joining with the token");
            register(agent, config, None).await
        }
        Err(err) => Err(err),
    }
}

/// Registers with the join token, or with `credential` when given
/// (registering again after the lease was dropped).
async fn register(
    agent: &AgentClient,
    config: &AgentConfig,
    credential: Option<TokenSecret>,
) -> Result<Registered, AgentError> {
    let registration = Registration {
        token: TokenSecret::new(config.token.clone()),
        node_name: config.node.clone(),
        address: config.address.clone(),
        capacity: config.capacity,
        node_credential: credential,
    };
    loop {
        match agent.register(registration.clone()).await {
            Ok(registered) => return Ok(registered),
            Err(
                err @ (ApiError::Unavailable { .. }
                | ApiError::NotLeader { .. }
                | ApiError::Internal { .. }),
            ) => {
                tracing::warn!(error = %err, "control plane not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(source) => {
                return Err(AgentError::Refused {
                    node: config.node.clone(),
                    source,
                });
            }
        }
    }
}

async fn heartbeats(agent: AgentClient, config: AgentConfig, registered: Registered, state: State) {
    let interval = registered
        .heartbeat_interval
        .max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let node_uid = lock(&state).node_uid.clone();
        let beat = Heartbeat {
            node: config.node.clone(),
            node_uid,
            allocatable: None,
        };
        match agent.heartbeat(beat).await {
            Ok(ack) if ack.acknowledged => lock(&state).last_ack = Some(Instant::now()),
            Ok(_) => tracing::debug!("heartbeat not acknowledged"),
            Err(err @ (ApiError::FailedPrecondition { .. } | ApiError::NotFound { .. })) => {
                tracing::warn!(error = %err, "the control plane dropped this node's lease; registering again");
                register_again(&agent, &config, &state).await;
            }
            Err(err) => tracing::warn!(error = %err, "heartbeat failed"),
        }
    }
}

/// Registers again after the lease was dropped: with the node credential
/// first, then with the join token; on success the new registration's uid
/// (and credential, if one was issued) replace the old ones and the lease
/// counts as acknowledged. A refusal is logged and left to the next
/// heartbeat to retry: the agent never gives up on its cluster.
async fn register_again(agent: &AgentClient, config: &AgentConfig, state: &State) {
    let credential = lock(state).credential.clone();
    let mut attempt = match credential {
        Some(credential) => register(agent, config, Some(credential)).await,
        None => register(agent, config, None).await,
    };
    if let Err(err) = &attempt
        && lock(state).credential.is_some()
    {
        tracing::warn!(error = %err, "the node credential was refused; trying the join token");
        attempt = register(agent, config, None).await;
    }
    match attempt {
        Ok(registered) => {
            tracing::info!(uid = %registered.node_uid, "registered again");
            keep_credential(config, registered.node_credential.as_ref());
            let mut shared = lock(state);
            shared.node_uid = registered.node_uid;
            if let Some(credential) = registered.node_credential {
                shared.credential = Some(credential);
            }
            shared.last_ack = Some(Instant::now());
        }
        Err(err) => {
            tracing::error!(error = %err, "registering again was refused; retrying at the next heartbeat");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

async fn follow_placements(
    admin: AdminClient,
    agent: AgentClient,
    node: String,
    state: State,
    trigger: Arc<Notify>,
    named: crate::storage::replicas::NodePlacements,
) {
    loop {
        if let Err(err) = follow_once(&admin, &agent, &node, &state, &trigger, &named).await {
            tracing::warn!(error = %err, "placement watch broke; listing again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Lists this node's placements, then follows the watch from the list's
/// version until it breaks. `named` also gets the placements that name
/// this node a replica node.
async fn follow_once(
    admin: &AdminClient,
    agent: &AgentClient,
    node: &str,
    state: &State,
    trigger: &Notify,
    named: &crate::storage::replicas::NodePlacements,
) -> Result<(), ApiError> {
    let list = admin.list(Kind::Placement).await?;
    let listed: Vec<Placement> = list
        .objects
        .into_iter()
        .filter_map(|object| match object {
            Object::Placement(p) => Some(p),
            _ => None,
        })
        .collect();
    let placements = listed
        .iter()
        .filter(|p| p.node == node)
        .map(|p| (p.vm.clone(), p.clone()))
        .collect();
    lock(state).placements = placements;
    named.replace(listed);
    trigger.notify_one();
    let mut events = agent.watch_placements(node, list.resource_version).await?;
    while let Some(event) = events.next().await {
        match event? {
            WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. } => {
                named.upsert(object.clone());
                let mut shared = lock(state);
                if object.node == node {
                    shared.placements.insert(object.vm.clone(), object);
                } else {
                    // Moved elsewhere (a new epoch on another node), or
                    // a copy this node holds.
                    shared.placements.remove(&object.vm);
                }
            }
            WatchEvent::Deleted { object, .. } => {
                named.remove(&object.vm);
                lock(state).placements.remove(&object.vm);
            }
            WatchEvent::Bookmark { .. } => continue,
        }
        trigger.notify_one();
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn reconcile_loop<C: Compute + 'static>(
    admin: AdminClient,
    agent: AgentClient,
    config: AgentConfig,
    compute: Arc<C>,
    state: State,
    trigger: Arc<Notify>,
    started: Instant,
    migrations: MigrationAgent,
    network: Option<crate::network::NetworkAgent>,
) {
    let reconciler = Arc::new(Mutex::new(Reconciler::new(
        compute,
        config.policy.prefix.clone(),
        config.stop_grace,
    )));
    let volumes = config.storage.as_ref().and_then(|storage| {
        crate::storage::Volumes::new(&config.node, storage, admin.clone())
            .inspect_err(
                |err| tracing::error!(error = %err, "no storage client: VM disks are not managed"),
            )
            .ok()
    });
    let mut reported: BTreeMap<String, VmStatus> = BTreeMap::new();
    loop {
        // One snapshot for the whole pass: which VMs are wanted here and
        // which moving VMs are left alone both follow from it.
        let (placed, last_ack, placements) = {
            let shared = lock(&state);
            (
                shared
                    .placements
                    .iter()
                    .map(|(vm, p)| (vm.clone(), p.is_evicting()))
                    .collect::<Vec<_>>(),
                shared.last_ack,
                shared.placements.clone(),
            )
        };
        // A VM that left this node may come back (a migration there and
        // back): forget what was reported for it, so it is reported afresh.
        reported.retain(|vm, _| placements.contains_key(vm));
        let fenced = last_ack.unwrap_or(started).elapsed() > config.fence_after;
        if fenced {
            tracing::warn!(window = ?config.fence_after, "no heartbeat acknowledged within the fencing window: stopping every VM");
        }
        let mut desired = Desired {
            vms: Vec::new(),
            fenced,
            kept: BTreeSet::new(),
        };
        let mut generations = BTreeMap::new();
        let mut problems = BTreeMap::new();
        let mut unreadable = false;
        let mut waiting = BTreeMap::new();
        // A fenced node runs nothing: no spec is needed.
        let placed = if fenced { Vec::new() } else { placed };
        for (name, evicting) in placed {
            let got = admin.get(Kind::Vm, &name).await;
            let placement = lock(&state).placements.get(&name).cloned();
            let placement = placement.unwrap_or_else(|| Placement {
                epoch: 1,
                ..Placement::default()
            });
            // Volumes first (replicated ones attached primary): a domain
            // is defined only on exported disks.
            if let (Ok(Object::Vm(vm)), Some(volumes)) = (&got, &volumes)
                && let Err(err) = volumes.ensure_placed(vm, &placement).await
            {
                if err.is_transient() {
                    tracing::warn!(vm = %name, error = %err, "storage unreachable; keeping what runs");
                    unreadable = true;
                    break;
                }
                let at = if err.is_pending() {
                    &mut waiting
                } else {
                    &mut problems
                };
                at.insert(name.clone(), (vm.meta.generation, err.to_string()));
                // Whatever runs keeps running as it is: a disk being made
                // (an image still importing) or one that failed is no
                // reason to stop the guest, nor to start it.
                // Only a guest told to run: one told to stop is stopped
                // (and undefined until its disks are ready), as before.
                if vm.spec.running {
                    desired.kept.insert(domain_name(&config.policy, &name));
                }
                continue;
            }
            match got {
                Ok(Object::Vm(vm)) => match domain_spec(&vm, &config.policy, &config.console_dir) {
                    Ok(spec) => {
                        generations.insert(spec.name.clone(), (name.clone(), vm.meta.generation));
                        desired.vms.push(DesiredVm {
                            spec,
                            // An evicted VM stays stopped here until the
                            // control plane moves it (a cold move).
                            running: vm.spec.running && !evicting,
                        });
                    }
                    Err(err) => {
                        problems.insert(name.clone(), (vm.meta.generation, err.to_string()));
                    }
                },
                Ok(_) => {}
                Err(ApiError::NotFound { .. }) => {}
                Err(err) => {
                    tracing::warn!(vm = %name, error = %err, "could not read the VM; keeping what runs");
                    unreadable = true;
                    break;
                }
            }
        }
        if unreadable {
            // Without every spec, leave the domains as they are rather
            // than treating a VM as unplaced; the fence still applies
            // once its window has passed.
            wait(&trigger, config.resync).await;
            continue;
        }
        let pass = {
            let reconciler = reconciler.clone();
            let desired = desired.clone();
            let network = network.clone();
            let migrations = migrations.clone();
            tokio::task::spawn_blocking(move || {
                let mut reconciler = reconciler
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                migrations.during_pass(&placements, desired.fenced, |hands_off| {
                    // Taps first: a domain starts on the tap it is given.
                    // Only once the migrations are listed: the taps named
                    // here are the node's, and a restarted target has its
                    // incoming guests' standby taps back by then.
                    if let Some(network) = &network {
                        network.prepare_taps(&desired);
                    }
                    reconciler.set_hands_off(hands_off);
                    reconciler.reconcile(&desired)
                })
            })
            .await
        };
        match pass {
            Ok(Ok(pass)) => {
                for observation in &pass.vms {
                    if let Some((vm, generation)) = generations.get(&observation.name) {
                        let status = vm_status(&config.node, *generation, observation);
                        report(&agent, &config.node, vm, status, &mut reported).await;
                    }
                }
                // Only after the domains of deleted VMs are gone. A
                // fenced node collects too (its pass stopped every
                // domain): a removed node's agent still frees the copies
                // of VMs deleted since, when it can list the cluster.
                if let Some(volumes) = &volumes {
                    volumes.collect_garbage().await;
                }
            }
            Ok(Err(err)) => tracing::warn!(error = %err, "reconcile pass failed"),
            Err(err) => tracing::error!(error = %err, "reconcile pass panicked"),
        }
        for (vm, (generation, message)) in problems {
            let status = VmStatus {
                phase: VmPhase::Failed,
                node: Some(config.node.clone()),
                observed_generation: generation,
                conditions: vec![ready(false, "CannotRun", &message)],
                ..VmStatus::default()
            };
            report(&agent, &config.node, &vm, status, &mut reported).await;
        }
        for (vm, (generation, message)) in waiting {
            let status = VmStatus {
                phase: VmPhase::Starting,
                node: Some(config.node.clone()),
                observed_generation: generation,
                conditions: vec![ready(false, "VolumesNotReady", &message)],
                ..VmStatus::default()
            };
            report(&agent, &config.node, &vm, status, &mut reported).await;
        }
        wait(&trigger, config.resync).await;
    }
}

/// Until the next trigger, or `resync` at the latest.
async fn wait(trigger: &Notify, resync: Duration) {
    tokio::select! {
        () = trigger.notified() => {}
        () = tokio::time::sleep(resync) => {}
    }
}

/// Sends `status` unless it is what was last reported for `vm`.
async fn report(
    agent: &AgentClient,
    node: &str,
    vm: &str,
    status: VmStatus,
    reported: &mut BTreeMap<String, VmStatus>,
) {
    if reported
        .get(vm)
        .is_some_and(|last| same_status(last, &status))
    {
        return;
    }
    let report = StatusReport {
        node: node.to_owned(),
        vm: vm.to_owned(),
        status: status.clone(),
    };
    match agent.report_status(report).await {
        Ok(()) => {
            reported.insert(vm.to_owned(), status);
        }
        Err(err) => tracing::warn!(vm, error = %err, "status report failed"),
    }
}

/// Equal but for condition timestamps.
fn same_status(a: &VmStatus, b: &VmStatus) -> bool {
    let strip = |s: &VmStatus| {
        let mut s = s.clone();
        s.conditions
            .iter_mut()
            .for_each(|c| c.last_transition_unix_ms = 0);
        s
    };
    strip(a) == strip(b)
}

fn ready(status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        kind: Condition::READY.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// The status a VM's observation maps to.
pub fn vm_status(node: &str, generation: u64, observation: &VmObservation) -> VmStatus {
    let phase = match (observation.state, &observation.error) {
        (_, Some(_)) | (Some(PowerState::Crashed), _) => VmPhase::Failed,
        (Some(PowerState::Running | PowerState::Paused), _) => VmPhase::Running,
        (Some(PowerState::ShuttingDown), _) => VmPhase::Stopping,
        (Some(PowerState::ShutOff), _) => VmPhase::Stopped,
        (Some(PowerState::Other) | None, _) => VmPhase::Starting,
    };
    let condition = match &observation.error {
        Some(error) => ready(false, "ReconcileFailed", error),
        None if phase == VmPhase::Running => ready(true, "Running", "the guest runs"),
        None => ready(
            false,
            "NotRunning",
            &format!("the domain is {:?}", observation.state),
        ),
    };
    let mut plugged = observation.disks.clone();
    plugged.sort();
    VmStatus {
        phase,
        node: Some(node.to_owned()),
        observed_generation: generation,
        conditions: vec![condition],
        plugged_volumes: plugged,
        ..VmStatus::default()
    }
}
