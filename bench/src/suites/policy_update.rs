//! `policy-update`: a committed policy change to its enforcement on every
//! node, on three nodes running the real stack's network side.
//!
//! One `basaltd control` and three `basaltd agent --compute sim --network`
//! run in three network-namespace nodes (each agent loads the eBPF
//! datapath in its node). Three VMs labelled `app=db`, one per node, get
//! their endpoints. Each run makes two changes: a policy selecting
//! `app=db` for ingress is created (enforcement starts), then deleted
//! (it stops). A change counts from the create or delete request (so the
//! Raft commit is inside the figure: an agent may apply a change before
//! its writer has the answer) to the moment every node's pinned maps
//! enforce it: the VMs' identity in `subjects` with
//! `SUBJ_INGRESS`, and every endpoint of that identity flagged
//! `EP_SEL_INGRESS` (the programs skip policy for endpoints without it),
//! or neither once deleted. The maps are read from outside the agents,
//! every millisecond.
//!
//! Peer: none that runs here; Cilium states policy changes reach its
//! agents' maps within seconds (its watch and regeneration), which is
//! what the goal is about. Goal (issue 5): p99 < 100 ms on 3 nodes.
//!
//! Needs a build of `basaltd` next to this binary (`cargo build --release
//! -p basaltd -p basalt-bench`). Settings: `--runs` (default 20: 40
//! changes).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use basalt_api::{
    AdminClient, JoinToken, JoinTokenSpec, KernelBoot, Kind, Network, NetworkSpec, Nic, Object,
    ObjectMeta, PlacementRules, Policy, PolicySpec, Vm, VmSpec,
};
use basalt_sdn::abi::{EP_SEL_INGRESS, SUBJ_INGRESS};
use basalt_sdn::loader;
use basalt_testkit::{Fabric, Node, Prefix, Process, ProcessSpec};

use super::Options;
use crate::report::{Better, Goal, Report};
use crate::stats::Samples;

const NODES: usize = 3;
const CONTROL_PORT: u16 = 7400;
const DEADLINE: Duration = Duration::from_secs(90);
const GOAL_P99_MS: f64 = 100.0;
const SYSTEM: &str = "basalt (3 nodes)";
const CASE: &str = "policy create/delete";

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let basaltd = std::env::current_exe()?.with_file_name("basaltd");
    if !basaltd.is_file() {
        bail!(
            "no basaltd at {}: cargo build --release -p basaltd -p basalt-bench",
            basaltd.display()
        );
    }
    let runs = opts.runs.unwrap_or(20).max(1);
    let prefix = Prefix::for_test()?;
    let mut fabric = Fabric::new(&prefix)?;
    let nodes: Vec<Node> = (1..=NODES)
        .map(|i| fabric.add_node(&format!("p{i}")))
        .collect::<Result<_, _>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(measure(&basaltd, &prefix, &nodes, runs));
    for node in &nodes {
        let _ = loader::remove_pins(node.netns());
    }
    let (created, deleted, all) = result?;

    let mut report = Report::new("policy-update");
    for (what, samples) in [
        ("create to enforced on every node", &created),
        ("delete to lifted on every node", &deleted),
        ("any change to every node", &all),
    ] {
        for (name, q) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
            report.row(
                CASE,
                SYSTEM,
                &format!("{what} {name}"),
                "ms",
                samples.quantile_ms(q),
            );
        }
    }
    report.goal(Goal::new(
        "committed change to enforcement on every node p99 (ms)",
        GOAL_P99_MS,
        all.quantile_ms(0.99),
        Better::Lower,
    ));
    Ok(report)
}

fn vm(name: &str) -> Vm {
    let mut meta = ObjectMeta::named(name);
    meta.labels.insert("app".into(), "db".into());
    Vm {
        meta,
        spec: VmSpec {
            cpus: 1,
            memory_mib: 128,
            running: true,
            nics: vec![Nic {
                network: "bench".into(),
                mac: None,
                ip: None,
            }],
            placement: PlacementRules {
                anti_affinity_group: Some("db".into()),
                ..PlacementRules::default()
            },
            kernel: Some(KernelBoot {
                kernel: "/boot/vmlinuz".into(),
                initrd: "/boot/initrd.img".into(),
                cmdline: String::new(),
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
    }
}

fn lockdown() -> Policy {
    Policy {
        meta: ObjectMeta::named("db-lockdown"),
        spec: PolicySpec {
            selector: BTreeMap::from([("app".to_owned(), "db".to_owned())]),
            ingress: Some(Vec::new()),
            egress: None,
        },
    }
}

/// Polls `check` every `every` until it holds or `DEADLINE` passes.
async fn wait_for<F, Fut>(what: &str, every: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > DEADLINE {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// Whether `node`'s pinned maps enforce ingress policy on `identity`
/// (its subject flag and every endpoint of it flagged), as `want` says.
fn enforced(node: &Node, identity: u32, want: bool) -> bool {
    let Ok(status) = loader::status(node.netns()) else {
        return false;
    };
    let subject = status
        .subjects
        .get(&identity)
        .is_some_and(|f| f & SUBJ_INGRESS != 0);
    let mut eps = status
        .endpoints
        .values()
        .filter(|e| e.identity == identity)
        .peekable();
    if eps.peek().is_none() {
        return false;
    }
    let flagged: Vec<bool> = eps.map(|e| e.flags & EP_SEL_INGRESS != 0).collect();
    subject == want && flagged.iter().all(|f| *f == want)
}

/// Starts the cluster, then measures `runs` create/delete pairs: samples
/// of creates, deletes and both.
async fn measure(
    basaltd: &Path,
    prefix: &Prefix,
    nodes: &[Node],
    runs: usize,
) -> anyhow::Result<(Samples, Samples, Samples)> {
    let server = format!("{}:{CONTROL_PORT}", nodes[0].addr());
    let control = Process::start(
        prefix,
        ProcessSpec::new("control", basaltd)
            .args(["control", "--node-id", "1", "--bootstrap", "--listen"])
            .arg(&server)
            .arg("--data-dir")
            .arg(prefix.dir().join("control"))
            .env("RUST_LOG", "warn")
            .netns(&nodes[0]),
    )?;
    let admin = AdminClient::connect_lazy(&server)?;
    wait_for("the control plane", Duration::from_millis(100), || async {
        admin.list(Kind::Node).await.is_ok()
    })
    .await?;
    let mut agents = Vec::new();
    for node in nodes {
        let token = JoinToken {
            meta: ObjectMeta::named(format!("join-{}", node.name())),
            spec: JoinTokenSpec {
                ttl_seconds: 600,
                max_uses: 1,
                revoked: false,
            },
            ..JoinToken::default()
        };
        let Object::Token(token) = admin.create(Object::Token(token)).await? else {
            bail!("a token create answered another kind");
        };
        let secret = token.secret.context("no token secret")?;
        agents.push(Process::start(
            prefix,
            ProcessSpec::new(format!("agent-{}", node.name()), basaltd)
                .args(["agent", "--node", node.netns(), "--address"])
                .arg(format!("{}:7500", node.addr()))
                .args(["--server", &server, "--compute", "sim", "--network"])
                .arg("--console-dir")
                .arg(prefix.log_dir())
                .env("BASALT_JOIN_TOKEN", secret.expose())
                .env("RUST_LOG", "warn")
                .netns(node),
        )?);
    }
    wait_for("every node to join", Duration::from_millis(200), || async {
        admin
            .list(Kind::Node)
            .await
            .is_ok_and(|l| l.objects.len() == NODES)
    })
    .await?;
    admin
        .create(Object::Network(Network {
            meta: ObjectMeta::named("bench"),
            spec: NetworkSpec {
                cidr: "10.79.0.0/16".into(),
                vni: 4790,
                routing: None,
            },
        }))
        .await?;
    for i in 1..=NODES {
        admin.create(Object::Vm(vm(&format!("db-{i}")))).await?;
    }
    let start = Instant::now();
    let identity = loop {
        let placed: Vec<u32> = admin
            .list(Kind::Endpoint)
            .await
            .map(|list| {
                list.objects
                    .iter()
                    .filter_map(|o| match o {
                        Object::Endpoint(e) if !e.node.is_empty() && e.identity != 0 => {
                            Some(e.identity)
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if placed.len() == NODES {
            break placed[0];
        }
        if start.elapsed() > DEADLINE {
            bail!("timed out waiting for the VMs' endpoints");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Every node's maps hold the three endpoints, unenforced.
    wait_for("every node's maps", Duration::from_millis(100), || async {
        nodes.iter().all(|n| {
            enforced(n, identity, false)
                && loader::status(n.netns()).is_ok_and(|s| {
                    s.endpoints
                        .values()
                        .filter(|e| e.identity == identity)
                        .count()
                        == NODES
                })
        })
    })
    .await?;

    let (mut created, mut deleted, mut all) = (Samples::new(), Samples::new(), Samples::new());
    for _ in 0..runs {
        for want in [true, false] {
            // From the request: the commit is inside the figure (an
            // agent may apply a change before its writer has the answer).
            let committed = Instant::now();
            if want {
                admin.create(Object::Policy(lockdown())).await?;
            } else {
                admin.delete(Kind::Policy, "db-lockdown", None).await?;
            }
            let mut seen = vec![None; nodes.len()];
            while seen.iter().any(Option::is_none) {
                if committed.elapsed() > DEADLINE {
                    bail!("a policy change was not enforced on every node");
                }
                for (i, node) in nodes.iter().enumerate() {
                    if seen[i].is_none() && enforced(node, identity, want) {
                        seen[i] = Some(committed.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let last = seen.into_iter().flatten().max().unwrap_or_default();
            all.record(last);
            if want {
                created.record(last);
            } else {
                deleted.record(last);
            }
            // Let the agents settle before the next change.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop(agents);
    drop(control);
    Ok((created, deleted, all))
}
