//! `ha`: node loss to the VM running on another node, with the
//! control plane's default timing (10 s lease, HA after 15 s) and
//! simulated compute, so the figure is the control plane's own: lease
//! expiry, the fence (`Ready=false`, committed), the move (placement and
//! endpoints with `epoch + 1` in one entry), and the new node's agent
//! starting the VM and reporting it.
//!
//! One `basaltd control` and three `basaltd agent --compute sim` run as
//! processes on loopback. Each run: a VM runs on some node; its agent is
//! killed (`kill -9`, so it never says goodbye); the suite measures until
//! the placement names another node, and until that node reports the VM
//! `Running`; then the agent is started again (it registers with its
//! unlimited token). The peers are what their documentation states for
//! the same event: Proxmox VE's HA fences and recovers in about 2 minutes,
//! Harvester (KubeVirt) after 5 minutes by default. Goal (issue 6): p95 ≤
//! 30 s.
//!
//! Needs a build of `basaltd` next to this binary (`cargo build --release
//! -p basaltd -p basalt-bench`). Settings: `--runs` (default 5),
//! `BASALT_HA_DIR` (default `/var/tmp/basalt-bench-ha`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use basalt_api::{AdminClient, JoinToken, KernelBoot, Kind, Object, ObjectMeta, Vm, VmPhase};

use super::Options;
use crate::report::{Better, Goal, Report};
use crate::stats::Samples;

const NODES: [&str; 3] = ["f1", "f2", "f3"];
/// Proxmox VE's documented HA recovery time, seconds.
const PROXMOX_SECONDS: f64 = 120.0;
/// Harvester's default wait before it moves a lost node's VMs, seconds.
const HARVESTER_SECONDS: f64 = 300.0;
const GOAL_P95_SECONDS: f64 = 30.0;
const DEADLINE: Duration = Duration::from_secs(120);

/// Child processes killed when dropped.
#[derive(Default)]
struct Children(Vec<(String, Child)>);

impl Children {
    fn kill(&mut self, name: &str) {
        if let Some(at) = self.0.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.0.remove(at);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(basaltd: &Path, log: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut command = Command::new(basaltd);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .spawn()
        .with_context(|| format!("starting basaltd {}", args.join(" ")))
}

fn start_agent(
    basaltd: &Path,
    dir: &Path,
    server: &str,
    node: &str,
    token: &str,
) -> anyhow::Result<Child> {
    let console = dir.join(format!("console-{node}"));
    spawn(
        basaltd,
        &dir.join(format!("agent-{node}.log")),
        &[
            "agent",
            "--node",
            node,
            "--address",
            "127.0.0.1:7501",
            "--server",
            server,
            "--compute",
            "sim",
            "--cpus",
            "8",
            "--memory-mib",
            "8192",
            "--resync-ms",
            "1000",
            "--console-dir",
            console.to_str().context("a UTF-8 directory")?,
        ],
        &[("BASALT_JOIN_TOKEN", token)],
    )
}

async fn wait<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > DEADLINE {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn ready_nodes(admin: &AdminClient) -> usize {
    admin.list(Kind::Node).await.map_or(0, |l| {
        l.objects
            .iter()
            .filter(|o| matches!(o, Object::Node(n) if n.status.is_ready()))
            .count()
    })
}

async fn running_on(admin: &AdminClient, vm: &str) -> Option<String> {
    match admin.get(Kind::Vm, vm).await {
        Ok(Object::Vm(vm))
            if vm.status.phase == VmPhase::Running
                && vm.status.observed_generation >= vm.meta.generation =>
        {
            vm.status.node
        }
        _ => None,
    }
}

async fn placed_on(admin: &AdminClient, vm: &str) -> Option<String> {
    match admin.get(Kind::Placement, vm).await {
        Ok(Object::Placement(p)) => Some(p.node),
        _ => None,
    }
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let basaltd = std::env::current_exe()?.with_file_name("basaltd");
    if !basaltd.is_file() {
        bail!(
            "no basaltd at {}: cargo build --release -p basaltd -p basalt-bench",
            basaltd.display()
        );
    }
    let runs = opts.runs.unwrap_or(5).max(1);
    let dir = PathBuf::from(
        std::env::var("BASALT_HA_DIR").unwrap_or_else(|_| "/var/tmp/basalt-bench-ha".into()),
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (moved, running) = runtime.block_on(measure(&basaltd, &dir, runs))?;

    let mut report = Report::new("ha");
    let seconds = |samples: &Samples, q: f64| samples.quantile_ms(q) / 1000.0;
    for (metric, samples) in [("placement moved", &moved), ("running elsewhere", &running)] {
        for (name, q) in [("p50", 0.5), ("p95", 0.95), ("max", 1.0)] {
            report.row(
                "node loss (kill -9 of the agent)",
                "basalt",
                &format!("{metric} {name}"),
                "s",
                seconds(samples, q),
            );
        }
    }
    report.row(
        "node loss",
        "proxmox-ve (documented)",
        "recovered",
        "s",
        PROXMOX_SECONDS,
    );
    report.row(
        "node loss",
        "harvester (default)",
        "recovered",
        "s",
        HARVESTER_SECONDS,
    );
    let p95 = seconds(&running, 0.95);
    report.row(
        "node loss",
        "basalt / proxmox-ve",
        "ratio",
        "x",
        p95 / PROXMOX_SECONDS,
    );
    report.row(
        "node loss",
        "basalt / harvester",
        "ratio",
        "x",
        p95 / HARVESTER_SECONDS,
    );
    report.goal(Goal::new(
        "running elsewhere p95 (s)",
        GOAL_P95_SECONDS,
        p95,
        Better::Lower,
    ));
    Ok(report)
}

/// Runs `runs` node losses; returns the samples until the placement moved
/// and until the VM ran elsewhere.
async fn measure(basaltd: &Path, dir: &Path, runs: usize) -> anyhow::Result<(Samples, Samples)> {
    let mut children = Children::default();
    let server = format!("127.0.0.1:{}", free_port()?);
    let data = dir.join("control");
    children.0.push((
        "control".into(),
        spawn(
            basaltd,
            &dir.join("control.log"),
            &[
                "control",
                "--bootstrap",
                "--node-id",
                "1",
                "--listen",
                &server,
                "--data-dir",
                data.to_str().context("a UTF-8 directory")?,
            ],
            &[],
        )?,
    ));
    let admin = AdminClient::connect_lazy(&server)?;
    wait("the control plane answers", || async {
        admin
            .list(Kind::Member)
            .await
            .is_ok_and(|l| !l.objects.is_empty())
    })
    .await?;
    let mut token = JoinToken {
        meta: ObjectMeta::named("ha"),
        ..JoinToken::default()
    };
    token.spec.ttl_seconds = 86_400;
    token.spec.max_uses = 0;
    let Object::Token(token) = admin.create(Object::Token(token)).await? else {
        bail!("creating a token returned another kind");
    };
    let secret = token.secret.context("no token secret")?.expose().to_owned();
    for node in NODES {
        children.0.push((
            node.into(),
            start_agent(basaltd, dir, &server, node, &secret)?,
        ));
    }
    wait("three nodes are ready", || async {
        ready_nodes(&admin).await == NODES.len()
    })
    .await?;

    let mut vm = Vm {
        meta: ObjectMeta::named("ha-vm"),
        ..Vm::default()
    };
    vm.spec.cpus = 1;
    vm.spec.memory_mib = 256;
    vm.spec.running = true;
    vm.spec.kernel = Some(KernelBoot {
        kernel: "/boot/vmlinuz".into(),
        initrd: "/boot/initrd.img".into(),
        cmdline: "console=ttyS0".into(),
    });
    admin.create(Object::Vm(vm)).await?;

    let (mut moved, mut running) = (Samples::new(), Samples::new());
    for run in 0..runs {
        let start = Instant::now();
        let victim = loop {
            if let Some(node) = running_on(&admin, "ha-vm").await {
                break node;
            }
            if start.elapsed() > DEADLINE {
                bail!("timed out waiting until the VM runs");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let lost = Instant::now();
        children.kill(&victim);
        wait("the placement moves", || async {
            placed_on(&admin, "ha-vm")
                .await
                .is_some_and(|n| n != victim)
        })
        .await?;
        moved.record(lost.elapsed());
        wait("the VM runs elsewhere", || async {
            running_on(&admin, "ha-vm")
                .await
                .is_some_and(|n| n != victim)
        })
        .await?;
        running.record(lost.elapsed());
        eprintln!(
            "ha: run {}/{runs}: {victim} lost, VM running elsewhere after {:.1} s",
            run + 1,
            lost.elapsed().as_secs_f64()
        );
        children.0.push((
            victim.clone(),
            start_agent(basaltd, dir, &server, &victim, &secret)?,
        ));
        wait("the node is back", || async {
            ready_nodes(&admin).await == NODES.len()
        })
        .await?;
    }
    Ok((moved, running))
}
