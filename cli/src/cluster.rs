//! `basalt cluster status`: the control plane's members — which leads,
//! which vote, which answer when asked directly — and what the cluster
//! holds, with what wants an operator's eye: nodes not ready, VMs that
//! failed or that no node takes, volumes with a copy not up to date,
//! migrations under way.
//!
//! The state is read once through `--server` (a linearizable list per
//! kind, so a cluster without a quorum fails here with the server's
//! reason); then each member is asked for its own object at its own
//! address, with a deadline, so one that is down or cut off shows as not
//! answering.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use basalt_api::{AdminClient, Condition, Kind, Member, Node, Object, Vm, VmPhase, Volume};
use serde::Serialize;

use crate::output::{self, Format};

/// What to ask of the cluster.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// The members (leader, voters, which answer) and a summary of the
    /// nodes, VMs, volumes and migrations, naming what needs attention.
    Status {
        /// How long each member has to answer, in milliseconds.
        #[arg(long, default_value_t = 2_000)]
        member_timeout_ms: u64,
    },
}

/// The whole answer, as `-o json|yaml` prints it.
#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    /// Every member, by id.
    pub members: Vec<MemberHealth>,
    /// Voters that answered, of how many, and how many make a quorum.
    pub quorum: Quorum,
    /// The nodes.
    pub nodes: Counted,
    /// The VMs.
    pub vms: Counted,
    /// The volumes.
    pub volumes: Counted,
    /// Migrations not yet succeeded or failed: "vm: phase".
    pub migrations: Vec<String>,
    /// Every member answered, every node is ready, nothing is listed as
    /// needing attention.
    pub healthy: bool,
}

/// One member, and whether it answered at its own address.
#[derive(Debug, Serialize)]
pub struct MemberHealth {
    /// Its name.
    pub name: String,
    /// Its Raft id.
    pub id: u64,
    /// Where it serves.
    pub address: String,
    /// A voter (false: a learner catching up).
    pub voter: bool,
    /// It leads.
    pub leader: bool,
    /// It answered a read at its own address.
    pub answers: bool,
    /// How long that took, in milliseconds, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_ms: Option<u64>,
    /// Why it did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Voters answering against the quorum.
#[derive(Debug, Serialize)]
pub struct Quorum {
    /// Voters.
    pub voters: usize,
    /// Voters that answered.
    pub answering: usize,
    /// Voters a quorum needs.
    pub needed: usize,
}

/// Objects of one kind: how many, how many are fine, and the others by
/// name with the reason.
#[derive(Debug, Default, Serialize)]
pub struct Counted {
    /// All of them.
    pub total: usize,
    /// Those that are as asked (ready nodes, running or stopped VMs as
    /// asked, volumes with every copy up to date).
    pub ok: usize,
    /// "name: why" for each of the others.
    pub attention: Vec<String>,
}

impl Counted {
    fn add(&mut self, name: &str, problem: Option<String>) {
        self.total += 1;
        match problem {
            None => self.ok += 1,
            Some(why) => self.attention.push(format!("{name}: {why}")),
        }
    }
}

/// Runs a `basalt cluster` command against `server`.
pub async fn run(server: &str, format: Format, command: ClusterCommand) -> anyhow::Result<()> {
    let ClusterCommand::Status { member_timeout_ms } = command;
    let client = AdminClient::connect(server).await?;
    let mut lists = Vec::new();
    for kind in [
        Kind::Member,
        Kind::Node,
        Kind::Vm,
        Kind::Volume,
        Kind::Migration,
    ] {
        let list = client
            .list(kind)
            .await
            .with_context(|| format!("reading the cluster's {kind}s"))?;
        lists.push(list.objects);
    }
    let [members, nodes, vms, volumes, migrations]: [Vec<Object>; 5] = lists
        .try_into()
        .map_err(|_| anyhow::anyhow!("five lists were read"))?;
    let timeout = Duration::from_millis(member_timeout_ms);
    let mut health = Vec::new();
    for object in members {
        if let Object::Member(member) = object {
            health.push(ask(member, timeout).await);
        }
    }
    health.sort_by_key(|m| m.id);
    let status = summarize(health, &nodes, &vms, &volumes, &migrations);
    match format {
        Format::Table => {
            print!("{}", table(&status));
            Ok(())
        }
        Format::Json => {
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(())
        }
        Format::Yaml => output::print_yaml_document(&status),
    }
}

/// Asks `member` for its own object at its own address.
async fn ask(member: Member, timeout: Duration) -> MemberHealth {
    let started = Instant::now();
    let answer = tokio::time::timeout(timeout, async {
        let client = AdminClient::connect(&member.address).await?;
        client.get(Kind::Member, &member.meta.name).await
    })
    .await;
    let (answers, error) = match answer {
        Ok(Ok(_)) => (true, None),
        Ok(Err(err)) => (false, Some(err.to_string())),
        Err(_) => (
            false,
            Some(format!("no answer within {} ms", timeout.as_millis())),
        ),
    };
    MemberHealth {
        name: member.meta.name,
        id: member.id,
        address: member.address,
        voter: member.voter,
        leader: member.leader,
        answers,
        answer_ms: answers
            .then(|| u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
        error,
    }
}

/// The status from what was read (pure: unit-tested).
pub fn summarize(
    members: Vec<MemberHealth>,
    nodes: &[Object],
    vms: &[Object],
    volumes: &[Object],
    migrations: &[Object],
) -> ClusterStatus {
    let voters = members.iter().filter(|m| m.voter).count();
    let quorum = Quorum {
        voters,
        answering: members.iter().filter(|m| m.voter && m.answers).count(),
        needed: voters / 2 + 1,
    };
    let mut node_count = Counted::default();
    for object in nodes {
        if let Object::Node(node) = object {
            node_count.add(&node.meta.name, node_problem(node));
        }
    }
    let mut vm_count = Counted::default();
    for object in vms {
        if let Object::Vm(vm) = object {
            vm_count.add(&vm.meta.name, vm_problem(vm));
        }
    }
    let mut volume_count = Counted::default();
    for object in volumes {
        if let Object::Volume(volume) = object {
            volume_count.add(&volume.meta.name, volume_problem(volume));
        }
    }
    let migrations: Vec<String> = migrations
        .iter()
        .filter_map(|o| match o {
            Object::Migration(m) if !m.status.phase.is_terminal() => {
                Some(format!("{}: {}", m.spec.vm, m.status.phase))
            }
            _ => None,
        })
        .collect();
    let healthy = members.iter().all(|m| m.answers)
        && node_count.attention.is_empty()
        && vm_count.attention.is_empty()
        && volume_count.attention.is_empty();
    ClusterStatus {
        members,
        quorum,
        nodes: node_count,
        vms: vm_count,
        volumes: volume_count,
        migrations,
        healthy,
    }
}

fn node_problem(node: &Node) -> Option<String> {
    let mut problems = Vec::new();
    if !node.status.is_ready() {
        problems.push("not ready".to_owned());
    }
    if node.spec.cordoned {
        problems.push("cordoned".to_owned());
    }
    if node.is_evacuating() {
        problems.push("its storage is being moved off".to_owned());
    }
    (!problems.is_empty()).then(|| problems.join(", "))
}

fn vm_problem(vm: &Vm) -> Option<String> {
    let held = vm
        .status
        .conditions
        .iter()
        .find(|c| c.kind == Condition::READY && !c.status && c.reason == "Unschedulable");
    if let Some(held) = held {
        return Some(format!("no node takes it: {}", held.message));
    }
    match vm.status.phase {
        VmPhase::Failed => Some(format!(
            "failed{}",
            vm.status
                .conditions
                .iter()
                .find(|c| c.kind == Condition::READY && !c.status && !c.message.is_empty())
                .map(|c| format!(": {}", c.message))
                .unwrap_or_default()
        )),
        VmPhase::Running | VmPhase::Migrating if vm.spec.running => None,
        VmPhase::Stopped | VmPhase::Pending if !vm.spec.running => None,
        phase if vm.spec.running => Some(format!("asked to run, {phase}")),
        phase => Some(format!("asked to stop, {phase}")),
    }
}

fn volume_problem(volume: &Volume) -> Option<String> {
    let status = &volume.status;
    if status.replicas.is_empty() {
        return None;
    }
    let behind: Vec<String> = status
        .replicas
        .iter()
        .filter(|r| !r.primary && !r.in_sync())
        .map(|r| format!("{} {}", r.node, r.state.with_mark(r.outdated)))
        .collect();
    (!behind.is_empty()).then(|| format!("copies not in sync: {}", behind.join(", ")))
}

fn yes(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

/// The table form.
pub fn table(status: &ClusterStatus) -> String {
    let mut out = String::new();
    let mut members = comfy_table::Table::new();
    members.load_preset(comfy_table::presets::NOTHING);
    members.set_header(["MEMBER", "ID", "ADDRESS", "VOTER", "LEADER", "ANSWERS"]);
    for m in &status.members {
        let answers = match (&m.error, m.answer_ms) {
            (Some(error), _) => format!("no: {error}"),
            (None, Some(ms)) => format!("yes ({ms} ms)"),
            (None, None) => "yes".to_owned(),
        };
        members.add_row([
            m.name.clone(),
            m.id.to_string(),
            m.address.clone(),
            yes(m.voter).to_owned(),
            yes(m.leader).to_owned(),
            answers,
        ]);
    }
    out.push_str(&members.to_string());
    out.push('\n');
    let q = &status.quorum;
    out.push_str(&format!(
        "quorum: {} of {} voters answer, {} needed{}\n",
        q.answering,
        q.voters,
        q.needed,
        if q.answering < q.needed {
            " (LOST)"
        } else {
            ""
        }
    ));
    for (what, counted, ok) in [
        ("nodes", &status.nodes, "ready"),
        ("vms", &status.vms, "as asked"),
        ("volumes", &status.volumes, "in sync"),
    ] {
        out.push_str(&format!(
            "{what}: {} ({} {ok})\n",
            counted.total, counted.ok
        ));
        for line in &counted.attention {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out.push_str(&format!(
        "migrations under way: {}\n",
        status.migrations.len()
    ));
    for line in &status.migrations {
        out.push_str(&format!("  {line}\n"));
    }
    out.push_str(if status.healthy {
        "healthy\n"
    } else {
        "needs attention\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use basalt_api::{ObjectMeta, ReplicaState, VolumeReplica, VolumeStatus};

    use super::*;

    fn member(id: u64, answers: bool) -> MemberHealth {
        MemberHealth {
            name: format!("c{id}"),
            id,
            address: format!("10.0.0.{id}:7400"),
            voter: true,
            leader: id == 1,
            answers,
            answer_ms: answers.then_some(3),
            error: (!answers).then(|| "connection refused".to_owned()),
        }
    }

    fn node(name: &str, ready: bool) -> Object {
        let mut node = Node {
            meta: ObjectMeta::named(name),
            ..Node::default()
        };
        node.status.conditions.push(Condition {
            kind: Condition::READY.into(),
            status: ready,
            ..Condition::default()
        });
        Object::Node(node)
    }

    fn vm(name: &str, running: bool, phase: VmPhase) -> Vm {
        let mut vm = Vm {
            meta: ObjectMeta::named(name),
            ..Vm::default()
        };
        vm.spec.running = running;
        vm.status.phase = phase;
        vm
    }

    #[test]
    fn what_needs_attention_is_named_and_the_quorum_counted() {
        let mut held = vm("big", true, VmPhase::Pending);
        held.status.conditions.push(Condition {
            kind: Condition::READY.into(),
            status: false,
            reason: "Unschedulable".into(),
            message: "3 short of memory".into(),
            ..Condition::default()
        });
        let copy = |node: &str, state: ReplicaState, primary: bool| VolumeReplica {
            node: node.into(),
            state,
            node_state: Some(state),
            primary,
            ..VolumeReplica::default()
        };
        let volume = |name: &str, second: ReplicaState| {
            Object::Volume(Volume {
                meta: ObjectMeta::named(name),
                status: VolumeStatus {
                    replicas: vec![
                        copy("n1", ReplicaState::UpToDate, true),
                        copy("n2", second, false),
                    ],
                    ..VolumeStatus::default()
                },
                ..Volume::default()
            })
        };
        let status = summarize(
            vec![member(1, true), member(2, true), member(3, false)],
            &[node("n1", true), node("n2", false)],
            &[
                Object::Vm(vm("web", true, VmPhase::Running)),
                Object::Vm(vm("off", false, VmPhase::Stopped)),
                Object::Vm(held),
                Object::Vm(vm("slow", true, VmPhase::Starting)),
            ],
            &[
                volume("good", ReplicaState::UpToDate),
                volume("bad", ReplicaState::Syncing),
            ],
            &[],
        );
        assert_eq!(
            (
                status.quorum.voters,
                status.quorum.answering,
                status.quorum.needed
            ),
            (3, 2, 2)
        );
        assert_eq!(status.nodes.attention, ["n2: not ready"]);
        assert_eq!(
            status.vms.attention,
            [
                "big: no node takes it: 3 short of memory",
                "slow: asked to run, Starting"
            ]
        );
        assert_eq!(
            status.volumes.attention,
            ["bad: copies not in sync: n2 syncing"]
        );
        assert!(!status.healthy);
        let text = table(&status);
        assert!(text.contains("no: connection refused"), "{text}");
        assert!(
            text.contains("quorum: 2 of 3 voters answer, 2 needed\n"),
            "{text}"
        );
        assert!(text.ends_with("needs attention\n"), "{text}");

        let fine = summarize(
            vec![member(1, true)],
            &[node("n1", true)],
            &[Object::Vm(vm("web", true, VmPhase::Running))],
            &[volume("good", ReplicaState::UpToDate)],
            &[],
        );
        assert!(fine.healthy);
        assert!(table(&fine).ends_with("healthy\n"));
    }
}
