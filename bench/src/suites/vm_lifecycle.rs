//! `vm-lifecycle`: a VM from `basalt vm create` to its guest answering on
//! the network, and from delete to its domain gone, for 1 VM and for 10
//! created at once, against `virsh create` of the same domain XML.
//!
//! One namespace node runs the real stack as the daemon's end-to-end
//! tests do: `basaltd control`, `basaltd storage serve` (NBD at
//! 127.0.0.1:10809 inside the node), a private libvirtd and `basaltd agent`
//! (libvirt, TCG, default timing). Each VM is the test guest (direct
//! kernel boot, a static address on the kernel command line) with a 64 MiB
//! empty disk and one NIC.
//!
//! - Basalt: the VM objects are created through the admin API; the control
//!   plane places them, the agent makes each disk volume, defines and
//!   starts each domain; the clock stops when every guest answers TCP on
//!   its address (inside the node). Delete: the VM objects are deleted;
//!   the clock stops when no domain of theirs is left on the libvirtd.
//! - Peer: the same domain XML (`basalt_agent::vm_domain`, fresh UUIDs) on
//!   volumes made beforehand, `virsh create` for each (all at once), the
//!   clock stops when every guest answers; delete is `virsh destroy` until
//!   the domains are gone.
//!
//! The host side of each tap (gateway address, /32 route) is wired by the
//! benchmark for both (the agent runs without `--network` here: the eBPF
//! datapath is the `datapath` and `migration` suites' subject). Rounds
//! alternate which system goes first. The goal: Basalt's median create
//! time within 1.5× of the peer's, i.e. what the control plane, the
//! scheduler, the agent and the volumes add stays small next to the
//! guest's own boot.
//!
//! Needs root and a build of `basaltd` next to this binary (`cargo build
//! --release -p basaltd -p basalt-bench`). `--runs` sets the rounds per
//! case (default 3).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use basalt_agent::compute::domain::Accel;
use basalt_agent::storage::disk_volume;
use basalt_agent::vm_domain::{DomainPolicy, domain_spec, tap_name, vm_uuid};
use basalt_api::{
    AdminClient, Disk, EnsureVolume, JoinToken, JoinTokenSpec, KernelBoot, Kind, Network,
    NetworkSpec, Nic, Object, ObjectMeta, StorageClient, Vm, VmSpec,
};
use basalt_testkit::guest::{GuestClient, GuestImage, static_ip_cmdline, wire_tap};
use basalt_testkit::{Fabric, Libvirtd, Node, Prefix, Process, ProcessSpec};

use super::Options;
use crate::report::{Better, Goal, Report};
use crate::stats::Samples;

const DEFAULT_RUNS: usize = 3;
const BATCHES: [usize; 2] = [1, 10];
const MEMORY_MIB: u64 = 128;
const DISK_BYTES: u64 = 64 << 20;
const NBD: &str = "127.0.0.1:10809";
const BOOT_DEADLINE: Duration = Duration::from_secs(600);
const GONE_DEADLINE: Duration = Duration::from_secs(120);
/// Basalt's median create-to-answering may be at most this many times
/// the peer's.
const GOAL_RATIO: f64 = 1.5;

const BASALT: &str = "basalt (vm create/delete)";
const PEER: &str = "virsh create/destroy (same XML)";

/// The running stack.
struct Stack {
    prefix: Prefix,
    node: Node,
    libvirtd: Libvirtd,
    image: GuestImage,
    admin: AdminClient,
    storage: StorageClient,
    _processes: Vec<Process>,
    _fabric: Fabric,
}

/// What one round of one system measured.
struct Round {
    /// Create to answering, per VM.
    each: Vec<Duration>,
    /// Create to the last VM answering.
    all: Duration,
    /// Delete to the last domain gone.
    gone: Duration,
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let runs = opts.runs.unwrap_or(DEFAULT_RUNS);
    ensure!(runs > 0, "--runs must be at least 1");
    ensure!(
        nix::unistd::geteuid().is_root(),
        "vm-lifecycle needs root (namespaces, taps, libvirtd)"
    );
    let basaltd = std::env::current_exe()?.with_file_name("basaltd");
    if !basaltd.is_file() {
        bail!(
            "no basaltd at {}: cargo build --release -p basaltd -p basalt-bench",
            basaltd.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let stack = runtime.block_on(start(&basaltd))?;

    let mut report = Report::new("vm-lifecycle");
    for batch in BATCHES {
        let mut each = [Samples::new(), Samples::new()];
        let mut all = [Samples::new(), Samples::new()];
        let mut gone = [Samples::new(), Samples::new()];
        for round in 0..runs {
            for first in [round % 2, 1 - round % 2] {
                let tag = format!("r{round}n{batch}");
                let measured = if first == 0 {
                    runtime.block_on(basalt_round(&stack, batch, &tag))?
                } else {
                    runtime.block_on(peer_round(&stack, batch, &tag))?
                };
                let system = [BASALT, PEER][first];
                eprintln!(
                    "{batch} VM(s), round {}/{runs}: {system}: all answering {:.2?}, gone {:.2?}",
                    round + 1,
                    measured.all,
                    measured.gone
                );
                for d in &measured.each {
                    each[first].record(*d);
                }
                all[first].record(measured.all);
                gone[first].record(measured.gone);
            }
        }
        let case = |what: &str| format!("{batch} VM{} {what}", if batch == 1 { "" } else { "s" });
        for (i, system) in [BASALT, PEER].into_iter().enumerate() {
            let create = case("create to answering");
            report.row(&create, system, "rounds", "rounds", all[i].len() as f64);
            report.row(
                &create,
                system,
                "p50 per VM",
                "ms",
                each[i].quantile_ms(0.5),
            );
            report.row(
                &create,
                system,
                "max per VM",
                "ms",
                each[i].quantile_ms(1.0),
            );
            report.row(
                &create,
                system,
                "p50 all answering",
                "ms",
                all[i].quantile_ms(0.5),
            );
            let delete = case("delete to domain gone");
            report.row(&delete, system, "p50", "ms", gone[i].quantile_ms(0.5));
            report.row(&delete, system, "max", "ms", gone[i].quantile_ms(1.0));
        }
        report.row(
            &case("create to answering"),
            "ratio basalt/peer",
            "p50 all answering",
            "x",
            all[0].quantile_ms(0.5) / all[1].quantile_ms(0.5),
        );
        report.row(
            &case("delete to domain gone"),
            "ratio basalt/peer",
            "p50",
            "x",
            gone[0].quantile_ms(0.5) / gone[1].quantile_ms(0.5),
        );
        report.goal(Goal::new(
            format!(
                "{} p50 ms <= {GOAL_RATIO}x peer",
                case("create to answering")
            ),
            GOAL_RATIO * all[1].quantile_ms(0.5),
            all[0].quantile_ms(0.5),
            Better::Lower,
        ));
    }
    drop(stack);
    Ok(report)
}

/// Starts the node: fabric, libvirtd, pool and storage process, control
/// plane and agent, and waits until the agent has joined.
async fn start(basaltd: &Path) -> anyhow::Result<Stack> {
    let prefix = Prefix::for_test().context("creating a prefix")?;
    let image = GuestImage::build().context("building the guest image")?;
    let mut fabric = Fabric::new(&prefix).context("creating the fabric")?;
    let node = fabric.add_node("a").context("adding a node")?;
    let libvirtd = Libvirtd::start(&prefix, &node, &fabric.hosts()).context("starting libvirtd")?;
    let dir = prefix.dir().to_path_buf();

    let pool = dir.join("pool.img");
    let out = Command::new(basaltd)
        .args(["storage", "pool", "create", "--size", "4G", "--path"])
        .arg(&pool)
        .output()?;
    ensure!(out.status.success(), "creating the pool: {out:?}");
    let socket = dir.join("storage.sock");
    let mut storage_process = Process::start(
        &prefix,
        ProcessSpec::new("storage", basaltd)
            .args(["storage", "serve", "--listen", NBD, "--pool"])
            .arg(&pool)
            .arg("--local-socket")
            .arg(&socket)
            .netns(&node),
    )?;
    storage_process.wait_for_tcp(NBD.parse()?, Some(&node), Duration::from_secs(30))?;
    let storage = StorageClient::connect_unix(&socket)?;

    let server = format!("{}:7400", node.addr());
    let control = Process::start(
        &prefix,
        ProcessSpec::new("control", basaltd)
            .args(["control", "--node-id", "1", "--bootstrap", "--listen"])
            .arg(&server)
            .arg("--data-dir")
            .arg(dir.join("control"))
            .netns(&node),
    )?;
    let admin = AdminClient::connect_lazy(&server)?;
    until(
        "the control plane answers",
        Duration::from_secs(60),
        || async { admin.list(Kind::Node).await.is_ok() },
    )
    .await?;
    let token = JoinToken {
        meta: ObjectMeta::named("join-a"),
        spec: JoinTokenSpec {
            ttl_seconds: 600,
            max_uses: 1,
            revoked: false,
        },
        ..JoinToken::default()
    };
    let Object::Token(token) = admin.create(Object::Token(token)).await? else {
        bail!("the control plane returned another kind for a token");
    };
    let secret = token.secret.context("no secret in the created token")?;
    // The network the guests' NICs are declared on.
    let network = Network {
        meta: ObjectMeta::named("default"),
        spec: NetworkSpec {
            cidr: "10.80.0.0/24".into(),
            vni: 80,
            routing: None,
        },
    };
    admin.create(Object::Network(network)).await?;
    let agent = Process::start(
        &prefix,
        ProcessSpec::new("agent", basaltd)
            .args(["agent", "--node", "a", "--address"])
            .arg(format!("{}:7500", node.addr()))
            .args(["--server", &server, "--libvirt-uri", &libvirtd.uri()])
            // Not a prefix of the peer's domains: the agent removes every
            // domain under its prefix that is not placed on its node.
            .args(["--domain-prefix", &format!("{}-b-", prefix.name())])
            // Room for 10 one-vCPU guests on any machine (TCG overcommits).
            .args(["--cpus", "64", "--memory-mib", "65536"])
            .arg("--storage-socket")
            .arg(&socket)
            .arg("--console-dir")
            .arg(prefix.log_dir())
            .env("BASALT_JOIN_TOKEN", secret.expose())
            .netns(&node),
    )?;
    until("the agent joins", Duration::from_secs(60), || async {
        admin.get(Kind::Node, "a").await.is_ok()
    })
    .await?;
    Ok(Stack {
        prefix,
        node,
        libvirtd,
        image,
        admin,
        storage,
        _processes: vec![storage_process, control, agent],
        _fabric: fabric,
    })
}

async fn until<F, Fut>(what: &str, deadline: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        if started.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn guest_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 80, 0, 10 + i as u8)
}

/// VM `name` with guest address `ip`: the test guest, a 64 MiB disk, a NIC.
fn vm(stack: &Stack, name: &str, ip: Ipv4Addr) -> Vm {
    Vm {
        meta: ObjectMeta::named(name),
        spec: VmSpec {
            cpus: 1,
            memory_mib: MEMORY_MIB,
            running: true,
            disks: vec![Disk {
                name: "root".into(),
                size_bytes: DISK_BYTES,
                image: None,
                replicas: 1,
                source_volume: None,
                attach: None,
                attached_storage_name: None,
                added_at_epoch: None,
                protocol: Default::default(),
            }],
            // The guest takes `ip` from its kernel command line; the lease
            // is the network's choice (an address freed by a deleted VM
            // may not be free again yet).
            nics: vec![Nic {
                network: "default".into(),
                mac: None,
                ip: None,
            }],
            kernel: Some(KernelBoot {
                kernel: stack.image.kernel().to_string_lossy().into_owned(),
                initrd: stack.image.initrd().to_string_lossy().into_owned(),
                cmdline: static_ip_cmdline(ip),
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
    }
}

/// From `started`, waits (one thread per guest) until every tap exists,
/// wires it, and the guest answers; returns each guest's time.
fn wait_answering(
    stack: &Stack,
    guests: &[(String, Ipv4Addr)],
    started: Instant,
) -> anyhow::Result<Vec<Duration>> {
    std::thread::scope(|scope| {
        let waits: Vec<_> = guests
            .iter()
            .map(|(tap, ip)| {
                let node = &stack.node;
                scope.spawn(move || -> anyhow::Result<Duration> {
                    wire_tap(node, tap, *ip, BOOT_DEADLINE)?;
                    GuestClient::in_node(*ip, Some(node)).wait_ready(BOOT_DEADLINE)?;
                    Ok(started.elapsed())
                })
            })
            .collect();
        waits
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow::anyhow!("a waiter panicked"))?)
            .collect()
    })
}

/// Waits until none of `domains` is known to the libvirtd.
async fn wait_gone(stack: &Stack, domains: &[String]) -> anyhow::Result<()> {
    until("the domains are gone", GONE_DEADLINE, || async {
        domains
            .iter()
            .all(|d| stack.libvirtd.virsh(&["domstate", d]).is_err())
    })
    .await
}

async fn basalt_round(stack: &Stack, batch: usize, tag: &str) -> anyhow::Result<Round> {
    let vms: Vec<Vm> = (0..batch)
        .map(|i| vm(stack, &format!("{tag}-{i}"), guest_ip(i)))
        .collect();
    let started = Instant::now();
    let mut guests = Vec::new();
    let mut domains = Vec::new();
    for (i, vm) in vms.into_iter().enumerate() {
        let name = vm.meta.name.clone();
        let Object::Vm(created) = stack.admin.create(Object::Vm(vm)).await? else {
            bail!("the control plane returned another kind for vm/{name}");
        };
        guests.push((tap_name(vm_uuid(&created.meta.uid), 0), guest_ip(i)));
        domains.push(format!("{}-b-{name}", stack.prefix.name()));
    }
    let each = tokio::task::block_in_place(|| wait_answering(stack, &guests, started))
        .context("waiting for the Basalt VMs")?;
    let all = started.elapsed();

    let started = Instant::now();
    for i in 0..batch {
        stack
            .admin
            .delete(Kind::Vm, &format!("{tag}-{i}"), None)
            .await?;
    }
    wait_gone(stack, &domains).await?;
    let gone = started.elapsed();
    Ok(Round { each, all, gone })
}

async fn peer_round(stack: &Stack, batch: usize, tag: &str) -> anyhow::Result<Round> {
    let policy = DomainPolicy {
        prefix: format!("{}-p-", stack.prefix.name()),
        accel: Accel::Tcg,
        cpu_model: Some("qemu64".into()),
        agent_taps: false,
    };
    let mut files: Vec<PathBuf> = Vec::new();
    let mut guests = Vec::new();
    let mut domains = Vec::new();
    let mut volumes = Vec::new();
    for i in 0..batch {
        let mut vm = vm(stack, &format!("{tag}-{i}"), guest_ip(i));
        vm.meta.uid = uuid::Uuid::new_v4().to_string();
        // Not a VM disk's name: the agent (running beside, idle) collects
        // disk volumes of VMs the control plane does not know, and did
        // delete these between `ensure_volume` and `virsh create`.
        let volume = format!("peer-{}", disk_volume(&vm.meta.uid, "root"));
        stack
            .storage
            .ensure_volume(EnsureVolume {
                name: volume.clone(),
                size_bytes: DISK_BYTES,
                source: None,
            })
            .await?;
        volumes.push(volume.clone());
        let mut spec = domain_spec(&vm, &policy, &stack.prefix.log_dir())?;
        for disk in &mut spec.disks {
            disk.export_name.clone_from(&volume);
        }
        let file = stack.prefix.dir().join(format!("{}.xml", spec.name));
        std::fs::write(&file, spec.to_xml()?)?;
        files.push(file);
        guests.push((spec.nics[0].tap.clone(), guest_ip(i)));
        domains.push(spec.name);
    }
    let started = Instant::now();
    let each = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            for file in &files {
                scope.spawn(move || {
                    let file = file.to_string_lossy();
                    if let Err(err) = stack.libvirtd.virsh(&["create", &file]) {
                        eprintln!("virsh create {file}: {err}");
                    }
                });
            }
            wait_answering(stack, &guests, started)
        })
    })
    .context("waiting for the virsh-created guests")?;
    let all = started.elapsed();

    let started = Instant::now();
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            for domain in &domains {
                scope.spawn(move || stack.libvirtd.virsh(&["destroy", domain]));
            }
        })
    });
    wait_gone(stack, &domains).await?;
    let gone = started.elapsed();
    for volume in volumes {
        stack.storage.delete_volume(&volume).await?;
    }
    Ok(Round { each, all, gone })
}
