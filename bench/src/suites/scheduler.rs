//! `scheduler`: placements per second for 1 000 nodes and 10 000 VMs,
//! for the pure planner and end to end through Raft.
//!
//! The workload, the same in every case: 1 000 nodes of 64 CPUs,
//! 256 GiB and a 4 TiB pool; 10 000 VMs of 1 to 4 vCPUs and 1 to 8 GiB,
//! every fifth in one of 500 anti-affinity groups (four VMs each), every
//! tenth with a 20 GiB disk asking for 2 replicas (so the planner also
//! chooses replica nodes), the others diskless with a direct kernel boot.
//! Everything fits: every VM must be placed.
//!
//! - **planner**: `basalt_control::scheduler::plan` over the whole
//!   workload in this process (no I/O); placements/s = VMs placed / time
//!   of one plan, median over `--runs` plans (default 5).
//! - **end to end**: three `basaltd control` members on loopback with
//!   their defaults (real RocksDB, fsync on a quorum before an answer);
//!   the nodes register through the agent API with one join token and
//!   heartbeat like agents (the suite plays the 1 000 agents), the VMs
//!   are created through the admin API by 64 concurrent clients spread
//!   over the members, and the leader's placement controller writes the
//!   placements. The end is the moment the 10 000th placement arrives on
//!   a watch of a follower (so committed and applied there), and the
//!   suite then re-checks every placement against the rules (one per VM,
//!   on a node that exists, within CPU and memory, anti-affinity, two
//!   distinct replica nodes for replicated disks). Two cases:
//!   - *VMs created*: the nodes are ready first; from the first VM create
//!     to the last placement (this includes the 10 000 VM writes, which
//!     the placements overlap: the figure can be no better than the VM
//!     creates per second, reported beside it, with the 1 000 nodes'
//!     heartbeats going on);
//!   - *nodes join a backlog*: the 10 000 VMs exist first (unschedulable:
//!     no nodes); from the first node registration to the last placement
//!     (this includes the 1 000 registrations).
//!
//! No peer is named: no other scheduler runs this workload here, and a
//! naive planner is not a peer. The figures are reported against issue
//! 3's goals as ratios: ≥ 20 000 placements/s for the planner, ≥ 2 000/s
//! end to end.
//!
//! Needs release builds of `basaltd` next to this binary
//! (`cargo build --release -p basaltd -p basalt-bench`). Settings:
//! `--runs` (planner repetitions, default 5), `BASALT_SCHEDULER_DIR`
//! (default `/var/tmp/basalt-bench-scheduler`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use basalt_api::{
    AdminClient, AgentClient, Condition, Disk, Heartbeat, JoinToken, KernelBoot, Kind, Node,
    Object, ObjectMeta, Placement, Registration, Resources, TokenSecret, Vm, VmSpec, WatchEvent,
};
use basalt_control::scheduler::{self, Overcommit};
use tokio::sync::Mutex;

use super::Options;
use super::raft::{Started, start_basalt};
use crate::report::{Better, Goal, Report};

const NODES: usize = 1_000;
const VMS: usize = 10_000;
/// Concurrent clients creating VMs or registering nodes.
const CLIENTS: usize = 64;
const PLANNER_GOAL: f64 = 20_000.0;
const END_TO_END_GOAL: f64 = 2_000.0;
/// How long the last placement may take to arrive.
const DEADLINE: Duration = Duration::from_secs(600);
const GIB: u64 = 1 << 30;

fn node_name(i: usize) -> String {
    format!("n{i:04}")
}

fn capacity() -> Resources {
    Resources {
        cpus: 64,
        memory_mib: 262_144,
        storage_bytes: 4 << 40,
    }
}

/// The workload's VM number `i`.
fn vm(i: usize) -> Vm {
    let mut vm = Vm {
        meta: ObjectMeta::named(format!("vm-{i:05}")),
        spec: VmSpec {
            cpus: 1 + (i % 4) as u32,
            memory_mib: 1_024 * (1 + (i % 8) as u64),
            running: true,
            kernel: Some(KernelBoot {
                kernel: "/boot/vmlinuz".into(),
                initrd: String::new(),
                cmdline: "console=ttyS0".into(),
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
    };
    if i.is_multiple_of(5) {
        vm.spec.placement.anti_affinity_group = Some(format!("g{}", (i / 5) % 500));
    }
    if i % 10 == 3 {
        vm.spec.disks.push(Disk {
            name: "root".into(),
            size_bytes: 20 * GIB,
            image: None,
            replicas: 2,
            source_volume: None,
            attach: None,
            attached_storage_name: None,
            added_at_epoch: None,
            protocol: Default::default(),
        });
    }
    vm
}

/// The workload's nodes as the planner sees registered, ready nodes.
fn ready_nodes() -> Vec<Node> {
    (0..NODES)
        .map(|i| {
            let mut node = Node {
                meta: ObjectMeta::named(node_name(i)),
                ..Node::default()
            };
            node.spec.address = "127.0.0.1:7500".into();
            node.status.capacity = capacity();
            node.status.allocatable = capacity();
            node.status.conditions.push(Condition {
                kind: Condition::READY.into(),
                status: true,
                ..Condition::default()
            });
            node
        })
        .collect()
}

/// Plans the whole workload `runs` times: (placements/s of each run).
fn planner(runs: usize) -> anyhow::Result<Vec<f64>> {
    let nodes = ready_nodes();
    let vms: Vec<Vm> = (0..VMS).map(vm).collect();
    let mut rates = Vec::new();
    for run in 0..runs {
        let start = Instant::now();
        let plan = scheduler::plan(&nodes, &vms, &[], Overcommit::default(), run as u64);
        let elapsed = start.elapsed();
        ensure!(
            plan.placements.len() == VMS,
            "the planner placed {} of {VMS} VMs: {:?}",
            plan.placements.len(),
            plan.unschedulable.first()
        );
        let rate = VMS as f64 / elapsed.as_secs_f64();
        eprintln!(
            "scheduler: planner run {}/{runs}: {VMS} placements in {:.1} ms ({rate:.0}/s)",
            run + 1,
            elapsed.as_secs_f64() * 1e3
        );
        rates.push(rate);
    }
    Ok(rates)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `count` jobs on [`CLIENTS`] concurrent tasks, `job(i)` for each i.
async fn concurrently<F, Fut>(count: usize, job: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (job, next) = (Arc::clone(&job), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(());
                }
                job(i).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// The suite playing the nodes' agents: registers them, then heartbeats
/// each one every `interval` until dropped.
struct Agents {
    stop: Arc<AtomicBool>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Agents {
    async fn register(agents: &[AgentClient], token: &TokenSecret) -> anyhow::Result<Self> {
        let uids = Arc::new(Mutex::new(BTreeMap::new()));
        let interval = Arc::new(Mutex::new(Duration::from_secs(2)));
        {
            let (agents, token, uids, interval) = (
                agents.to_vec(),
                token.clone(),
                Arc::clone(&uids),
                Arc::clone(&interval),
            );
            concurrently(NODES, move |i| {
                let agent = agents[i % agents.len()].clone();
                let (token, uids, interval) =
                    (token.clone(), Arc::clone(&uids), Arc::clone(&interval));
                async move {
                    let registered = agent
                        .register(Registration {
                            token,
                            node_name: node_name(i),
                            address: "127.0.0.1:7500".into(),
                            capacity: capacity(),
                            node_credential: None,
                        })
                        .await
                        .with_context(|| format!("registering {}", node_name(i)))?;
                    *interval.lock().await = registered.heartbeat_interval;
                    uids.lock().await.insert(i, registered.node_uid);
                    Ok(())
                }
            })
            .await?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let uids: Vec<(usize, String)> = uids.lock().await.clone().into_iter().collect();
        let interval = *interval.lock().await;
        // One task per member's share of the nodes, each beating its nodes
        // in turn, a whole round per interval.
        for (member, agent) in agents.iter().enumerate() {
            let mine: Vec<(usize, String)> = uids
                .iter()
                .filter(|(i, _)| i % agents.len() == member)
                .cloned()
                .collect();
            let (agent, stop) = (agent.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let round = Instant::now();
                    for (i, uid) in &mine {
                        let beat = Heartbeat {
                            node: node_name(*i),
                            node_uid: uid.clone(),
                            allocatable: None,
                        };
                        let agent = agent.clone();
                        tokio::spawn(async move { agent.heartbeat(beat).await });
                    }
                    tokio::time::sleep(interval.saturating_sub(round.elapsed())).await;
                }
            });
        }
        Ok(Self { stop })
    }
}

/// Counts the placements created on a watch and says when the last of
/// [`VMS`] arrived.
fn watch_placements(
    admin: AdminClient,
    from: u64,
) -> tokio::task::JoinHandle<anyhow::Result<Instant>> {
    tokio::spawn(async move {
        use futures::StreamExt as _;
        let mut events = admin.watch(Some(Kind::Placement), from).await?;
        let mut seen = BTreeSet::new();
        while let Some(event) = events.next().await {
            if let WatchEvent::Added { object, .. } = event? {
                seen.insert(object.meta().name.clone());
                if seen.len() == VMS {
                    return Ok(Instant::now());
                }
            }
        }
        bail!("the placement watch ended after {} placements", seen.len())
    })
}

/// Checks every placement against the rules; returns how many there are.
async fn check_placements(admin: &AdminClient) -> anyhow::Result<usize> {
    let placements: Vec<Placement> = admin
        .list(Kind::Placement)
        .await?
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Placement(p) => Some(p),
            _ => None,
        })
        .collect();
    let vms: HashMap<String, Vm> = (0..VMS).map(vm).map(|v| (v.meta.name.clone(), v)).collect();
    let mut used: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut groups = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let cap = capacity();
    let limit_cpus = (f64::from(cap.cpus) * Overcommit::default().cpu) as u64;
    let limit_memory = (cap.memory_mib as f64 * Overcommit::default().memory) as u64;
    for p in &placements {
        let vm = vms
            .get(&p.vm)
            .with_context(|| format!("a placement of unknown VM {}", p.vm))?;
        ensure!(seen.insert(p.vm.as_str()), "{} placed twice", p.vm);
        ensure!(p.epoch == 1, "{} placed at epoch {}", p.vm, p.epoch);
        let entry = used.entry(p.node.as_str()).or_default();
        entry.0 += u64::from(vm.spec.cpus);
        entry.1 += vm.spec.memory_mib;
        ensure!(
            entry.0 <= limit_cpus && entry.1 <= limit_memory,
            "{} overcommitted",
            p.node
        );
        if let Some(group) = &vm.spec.placement.anti_affinity_group {
            ensure!(
                groups.insert((p.node.as_str(), group.as_str())),
                "group {group} twice on {}",
                p.node
            );
        }
        let wanted = vm.spec.replicas_wanted();
        let distinct: BTreeSet<&String> = p.replica_nodes.iter().collect();
        ensure!(
            p.replica_nodes.len() == wanted
                && distinct.len() == wanted
                && (wanted == 0 || p.replica_nodes[0] == p.node),
            "{}: replica nodes {:?}",
            p.vm,
            p.replica_nodes
        );
    }
    Ok(placements.len())
}

async fn create_vms(admins: &[AdminClient]) -> anyhow::Result<()> {
    let admins = admins.to_vec();
    concurrently(VMS, move |i| {
        let admin = admins[i % admins.len()].clone();
        async move {
            admin
                .create(Object::Vm(vm(i)))
                .await
                .with_context(|| format!("creating vm {i}"))?;
            Ok(())
        }
    })
    .await
}

async fn join_token(admin: &AdminClient) -> anyhow::Result<TokenSecret> {
    let mut token = JoinToken {
        meta: ObjectMeta::named("bench"),
        ..JoinToken::default()
    };
    token.spec.ttl_seconds = 86_400;
    token.spec.max_uses = 0;
    let Object::Token(token) = admin.create(Object::Token(token)).await? else {
        bail!("creating a token returned another kind");
    };
    token.secret.context("the created token has no secret")
}

/// The outcome of one end-to-end case.
#[derive(Debug)]
struct Measured {
    /// Placements per second over the whole case.
    placements_per_s: f64,
    /// The writes that let the placements happen (VM creates or node
    /// registrations), per second.
    setup_per_s: f64,
    /// VM creates per second (in the backlog case, before any node).
    creates_per_s: f64,
    seconds: f64,
}

/// Which end-to-end case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    VmsCreated,
    NodesJoin,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::VmsCreated => "end to end: VMs created",
            Case::NodesJoin => "end to end: nodes join a backlog",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Case::VmsCreated => "created",
            Case::NodesJoin => "backlog",
        }
    }
}

async fn end_to_end(dir: &Path, basaltd: &Path, case: Case) -> anyhow::Result<Measured> {
    let dir = dir.join(case.slug());
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "scheduler: {}: starting 3 members in {}",
        case.name(),
        dir.display()
    );
    let Started {
        members: _members,
        clients: admins,
        args,
    } = start_basalt(&dir, basaltd).await?;
    let addresses: Vec<String> = args
        .iter()
        .map(|args| listen_address(args))
        .collect::<anyhow::Result<_>>()?;
    let agents: Vec<AgentClient> = addresses
        .iter()
        .map(|a| AgentClient::connect_lazy(a))
        .collect::<Result<_, _>>()?;
    let token = join_token(&admins[0]).await?;
    let leader = leader_index(&admins).await?;
    // A follower's watch: what it sees is committed and applied there.
    let follower = admins[(leader + 1) % admins.len()].clone();

    let (start, setup_done, _agents, created) = match case {
        Case::VmsCreated => {
            let agents = Agents::register(&agents, &token).await?;
            eprintln!("scheduler: {}: {NODES} nodes ready", case.name());
            let from = follower.list(Kind::Placement).await?.resource_version;
            let watch = watch_placements(follower.clone(), from);
            let start = Instant::now();
            create_vms(&admins).await?;
            let created = start.elapsed();
            (start, (created, watch), agents, created)
        }
        Case::NodesJoin => {
            let creating = Instant::now();
            create_vms(&admins).await?;
            let created = creating.elapsed();
            eprintln!("scheduler: {}: {VMS} VMs waiting for nodes", case.name());
            tokio::time::sleep(Duration::from_secs(1)).await;
            let from = follower.list(Kind::Placement).await?.resource_version;
            let watch = watch_placements(follower.clone(), from);
            let start = Instant::now();
            let agents = Agents::register(&agents, &token).await?;
            let joined = start.elapsed();
            (start, (joined, watch), agents, created)
        }
    };
    let (setup, watch) = setup_done;
    let last = tokio::time::timeout(DEADLINE, watch)
        .await
        .with_context(|| {
            format!(
                "not every placement was written in {} s (logs in {})",
                DEADLINE.as_secs(),
                dir.display()
            )
        })???;
    let seconds = last.duration_since(start).as_secs_f64();
    let count = check_placements(&admins[leader]).await?;
    ensure!(count == VMS, "{count} placements, {VMS} VMs");
    let setup_count = match case {
        Case::VmsCreated => VMS,
        Case::NodesJoin => NODES,
    };
    let measured = Measured {
        placements_per_s: VMS as f64 / seconds,
        setup_per_s: setup_count as f64 / setup.as_secs_f64(),
        creates_per_s: VMS as f64 / created.as_secs_f64(),
        seconds,
    };
    eprintln!("scheduler: {}: {measured:?}", case.name());
    Ok(measured)
}

/// The index of the member a member list marks as leader.
async fn leader_index(admins: &[AdminClient]) -> anyhow::Result<usize> {
    let list = admins[0].list(Kind::Member).await?;
    let id = list
        .objects
        .iter()
        .find_map(|o| match o {
            Object::Member(m) if m.leader => Some(m.id),
            _ => None,
        })
        .context("no member is marked leader")?;
    usize::try_from(id - 1).context("member id")
}

/// The address a member listens on, from its command line.
fn listen_address(args: &[String]) -> anyhow::Result<String> {
    args.iter()
        .skip_while(|a| *a != "--listen")
        .nth(1)
        .cloned()
        .context("a member's command line without --listen")
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let runs = opts.runs.unwrap_or(5);
    ensure!(runs > 0, "--runs must be at least 1");
    let basaltd = std::env::current_exe()?.with_file_name("basaltd");
    if !basaltd.is_file() {
        bail!(
            "no basaltd at {}: cargo build --release -p basaltd -p basalt-bench",
            basaltd.display()
        );
    }
    let dir = PathBuf::from(
        std::env::var("BASALT_SCHEDULER_DIR")
            .unwrap_or_else(|_| "/var/tmp/basalt-bench-scheduler".into()),
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let rates = planner(runs)?;
    let planner_rate = median(rates.clone());
    let best = rates.iter().copied().fold(0.0, f64::max);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut cases = Vec::new();
    for case in [Case::VmsCreated, Case::NodesJoin] {
        let measured = runtime.block_on(end_to_end(&dir, &basaltd, case))?;
        cases.push((case, measured));
    }

    let mut report = Report::new("scheduler");
    let workload = format!("{NODES} nodes × {VMS} VMs");
    report.row(
        &format!("planner, {workload}"),
        "basalt",
        "placements (median)",
        "placements/s",
        planner_rate,
    );
    report.row(
        &format!("planner, {workload}"),
        "basalt",
        "placements (best)",
        "placements/s",
        best,
    );
    report.goal(Goal::new(
        "planner placements/s ≥ 20 000",
        PLANNER_GOAL,
        planner_rate,
        Better::Higher,
    ));
    for (case, m) in &cases {
        let name = format!("{}, {workload}", case.name());
        report.row(
            &name,
            "basalt",
            "placements",
            "placements/s",
            m.placements_per_s,
        );
        report.row(&name, "basalt", "to the last placement", "s", m.seconds);
        match case {
            Case::VmsCreated => {
                report.row(&name, "basalt", "VM creates", "writes/s", m.setup_per_s);
            }
            Case::NodesJoin => {
                report.row(
                    &name,
                    "basalt",
                    "VM creates (before any node)",
                    "writes/s",
                    m.creates_per_s,
                );
                report.row(
                    &name,
                    "basalt",
                    "node registrations",
                    "writes/s",
                    m.setup_per_s,
                );
            }
        }
        report.goal(Goal::new(
            format!("{}: placements/s ≥ 2 000", case.name()),
            END_TO_END_GOAL,
            m.placements_per_s,
            Better::Higher,
        ));
    }
    Ok(report)
}
