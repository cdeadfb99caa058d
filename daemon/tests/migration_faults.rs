//! Live migrations that do not go the easy way, end to end (root,
//! libvirt, TCG, Basalt's datapath and storage; the cluster of
//! `live_cluster`: nodes `a` and `b`, the control plane and the route
//! follower on `cp`). The test guest runs on `a` from a disk replicated to
//! both nodes, with a NIC whose address it takes by DHCP; one TCP
//! connection from `cp` to its numbered stream is held through both moves.
//!
//! - **Post-copy**: the guest dirties its memory in a loop (8 MiB of RAM
//!   rewritten round after round) and the migration's bandwidth is capped
//!   far below that rate through the API (`--bandwidth-mib 1`; the source
//!   QEMU's `max-bandwidth` reads 1 MiB/s during the copy), so pre-copy
//!   cannot converge; `basalt vm migrate --to b --post-copy
//!   --timeout-seconds 3 --bandwidth-mib 1 --wait` switches it to
//!   post-copy after 3 s and the move completes: the migration says
//!   post-copy did it, the VM runs on `b` only (placement at the next
//!   epoch), and the dirtier's rounds go on there. All along, sampling
//!   both libvirtds (a, b, a) never sees two running copies.
//! - **The target's agent killed mid-copy**: a migration back to `a`,
//!   slowed down the same way, is under way when `a`'s agent is killed
//!   with SIGKILL and started again seconds later; libvirt goes on
//!   copying. The migration either completes (the restarted agent adopts
//!   the incoming domain) or is failed cleanly; either way the VM runs on
//!   exactly one node, the other keeps no domain, no tap and no primary
//!   role on the VM's disk, and the two copies match.
//!
//! - **A disk with a single copy**: a second VM whose 1 GiB disk has one
//!   copy (in one node's pool only) with a few MiB written moves live with
//!   it: the target makes a fresh volume, libvirt's storage migration
//!   copies the disk into it; on the target the disk holds the guest's
//!   boot record (no second boot) and data written on the source, its
//!   pool allocates about what the source's did (the holes stay holes:
//!   the whole disk would not even fit the test's 512 MiB pools), and the
//!   source keeps neither domain nor copy. Its second disk is an
//!   attached volume (a one-copy clone of the first VM's disk): the VM
//!   is placed where that copy is, at an epoch past the volume's, and the
//!   volume moves the same way: its data on the target, no copy left on
//!   the source, still the VM's, its status naming the target. That move
//!   is slowed down and a volume created mid-copy, so every agent's
//!   standalone loop looks for copies to drop while the target holds the
//!   attached volume's new copy that the volume does not name yet: the
//!   target keeps it.
//!
//! - **A disk plugged in**: after that move, a new one-copy volume made on
//!   the VM's node (`basalt volume create --nodes`) is added to the
//!   running VM (`basalt vm add-disk ... attach=`): the guest's kernel
//!   finds a third disk without a reboot, the volume becomes the VM's;
//!   a disk of its own added then (`basalt vm add-disk ... size=`) is
//!   made on its node at the moved placement's epoch and found as a
//!   fourth; the volume removed again (`basalt vm remove-disk`), it is
//!   unplugged and only then released, its copy kept.
//!
//! After each move the held connection is still the same one (no reset,
//! every number one more than the last), the guest has not rebooted (its
//! disk's boot counter stays 1), keeps its address and reads back what it
//! wrote.

mod common;
mod datapath;
mod live_cluster;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use basalt_agent::storage::disk_volume;
use basalt_api::{
    Disk, KernelBoot, Kind, Migration, MigrationPhase, Nic, Object, ObjectMeta, ReplicaState, Vm,
    VmPhase, VmSpec, Volume,
};
use basalt_testkit::guest::{GuestClient, GuestImage};
use basalt_testkit::nbd_client::NbdClient;
use basalt_testkit::{Libvirtd, Prefix, wait};

use live_cluster::{
    DEADLINE, HeldStream, LiveCluster, basalt, copies_match, domain_state, domains, endpoint_of,
    get_vm, in_sync, links, placement, text, vm_taps,
};

const DISK_BYTES: u64 = 16 << 20;
/// The longest pause the held connection may see across a move: far above
/// a switchover (about a second), far below a reboot (which resets it
/// anyway).
const MAX_PAUSE: Duration = Duration::from_secs(20);
/// The migration bandwidth while a move must not finish by itself
/// (MiB/s): the guest has tens of MiB of non-zero memory, and its dirtier
/// rewrites 8 MiB many times a second.
const SLOW_MIB_S: &str = "1";
/// How soon after a move, once its endpoint has followed, the guest
/// answers a new connection from `cp`.
const NEW_CONNECTIONS_WITHIN: Duration = Duration::from_secs(20);
/// The single-copy VM's disk: far larger than what is written on it.
const SINGLE_DISK_BYTES: u64 = 1 << 30;
/// Where the single-copy test writes beside the guest's own records.
const PATTERN_AT: u64 = 1 << 20;
const PATTERN_BYTES: usize = 4 << 20;
/// How much more the target's copy of the single-copy disk may allocate
/// than the source's (chunks the mirror touches twice, the guest's own
/// writes meanwhile).
const ALLOCATION_MARGIN: u64 = 4 << 20;

/// `len` bytes at `offset` of export `export` as `node`'s storage serves
/// it; `None` if it cannot be read.
async fn read_at(
    node: &basalt_testkit::Node,
    export: &str,
    offset: u64,
    len: usize,
) -> Option<Vec<u8>> {
    let (node, export) = (node.clone(), export.to_owned());
    tokio::task::spawn_blocking(move || {
        node.run_in(move || {
            let mut client = NbdClient::connect(live_cluster::NBD, &export).ok()?;
            let mut buf = vec![0u8; len];
            client.read(offset, &mut buf).ok()?;
            Some(buf)
        })
        .ok()
        .flatten()
    })
    .await
    .ok()
    .flatten()
}

/// Caps (or lifts) the migration bandwidth of `domain` on `libvirtd`:
/// libvirt applies it to the domain's next migration, or at once to one
/// under way.
fn set_speed(libvirtd: &Libvirtd, domain: &str, mib_s: &str) {
    libvirtd
        .virsh(&["migrate-setspeed", domain, mib_s])
        .unwrap_or_else(|err| panic!("migrate-setspeed {domain} {mib_s}: {err}"));
}

/// The source QEMU's migration bandwidth cap (`max-bandwidth`, bytes/s)
/// as QEMU itself reports it; `None` when it cannot be read (no domain).
fn max_bandwidth(libvirtd: &Libvirtd, domain: &str) -> Option<u64> {
    let out = libvirtd
        .virsh(&[
            "qemu-monitor-command",
            domain,
            r#"{"execute":"query-migrate-parameters"}"#,
        ])
        .ok()?;
    let reply: serde_json::Value = serde_json::from_str(&out).ok()?;
    reply["return"]["max-bandwidth"].as_u64()
}

/// Bytes received by every interface of `node`'s namespace so far.
fn received(node: &basalt_testkit::Node) -> u64 {
    let dev = node
        .run_in(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .expect("netns")
        .expect("/proc/net/dev");
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split(':').nth(1))
        .filter_map(|counters| counters.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The volume the single-copy VM attaches.
async fn attached_volume(admin: &basalt_api::AdminClient) -> Option<Volume> {
    match admin.get(Kind::Volume, "data").await {
        Ok(Object::Volume(v)) => Some(v),
        _ => None,
    }
}

/// `volume`'s allocated bytes in a node's pool.
async fn allocated(storage: &basalt_api::StorageClient, volume: &str) -> Option<u64> {
    storage
        .list_volumes()
        .await
        .ok()?
        .into_iter()
        .find(|v| v.name == volume)
        .map(|v| v.allocated_bytes)
}

/// Whether the control plane holds none of `vm`'s copies outdated (the
/// agent clears a mark a moment after its storage says the copy is in
/// sync; a move asked before that finds no up-to-date target).
async fn none_outdated(admin: &basalt_api::AdminClient, vm: &str) -> bool {
    matches!(
        admin.get(Kind::Vm, vm).await,
        Ok(Object::Vm(v)) if v.status.outdated_replicas.is_empty()
    )
}

async fn migration(admin: &basalt_api::AdminClient, vm: &str) -> Option<Migration> {
    match admin.get(Kind::Migration, vm).await {
        Ok(Object::Migration(m)) => Some(m),
        _ => None,
    }
}

/// `virsh domstate` of `domain` on the libvirtd at `uri` (`undefined`
/// when it has none).
fn state_at(uri: &str, domain: &str) -> String {
    Command::new("virsh")
        .args(["-q", "-c", uri, "domstate", domain])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map_or_else(
            || "undefined".to_owned(),
            |out| String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
}

/// Samples both libvirtds (a, b, a) until stopped; records every time the
/// domain was running on `b` while it ran on `a` before and after.
struct TwoCopies {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl TwoCopies {
    fn watch(a: &Libvirtd, b: &Libvirtd, domain: String) -> TwoCopies {
        let (a, b) = (a.uri(), b.uri());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut samples, mut both) = (0, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    let first = state_at(&a, &domain);
                    let there = state_at(&b, &domain);
                    let then = state_at(&a, &domain);
                    samples += 1;
                    if first == "running" && there == "running" && then == "running" {
                        both.push(format!("sample {samples}: running on a and b"));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                (samples, both)
            })
        };
        TwoCopies {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; asserts no sample saw two running copies.
    fn finish(mut self, what: &str) {
        self.stop.store(true, Ordering::SeqCst);
        let (samples, both) = self
            .thread
            .take()
            .expect("running")
            .join()
            .expect("the sampler panicked");
        eprintln!("{what}: {samples} samples of both libvirtds");
        assert!(samples > 0, "{what}: never sampled");
        assert!(both.is_empty(), "{what}: two running copies: {both:?}");
    }
}

impl Drop for TwoCopies {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_copy_and_a_target_agent_killed_mid_copy_leave_one_running_copy() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let image = GuestImage::build().expect("guest image");
    let mut cluster = LiveCluster::start(&prefix, &["a", "b"]).await;
    cluster.default_network().await;
    let (a, b, cp) = (
        cluster.nodes[0].clone(),
        cluster.nodes[1].clone(),
        cluster.cp.clone(),
    );
    let (admin, server) = (cluster.admin.clone(), cluster.server.clone());

    let vm = Vm {
        meta: ObjectMeta::named("mover"),
        spec: VmSpec {
            cpus: 1,
            memory_mib: 160,
            running: false,
            disks: vec![Disk {
                name: "root".into(),
                size_bytes: DISK_BYTES,
                image: None,
                replicas: 2,
                source_volume: None,
                attach: None,
                attached_storage_name: None,
                added_at_epoch: None,
                protocol: Default::default(),
            }],
            kernel: Some(KernelBoot {
                kernel: image.kernel().to_string_lossy().into_owned(),
                initrd: image.initrd().to_string_lossy().into_owned(),
                cmdline: "console=ttyS0 basalt.dhcp=1".into(),
            }),
            nics: vec![Nic {
                network: "default".into(),
                mac: None,
                ip: None,
            }],
            ..VmSpec::default()
        },
        ..Vm::default()
    };
    let stored = cluster.create_vm(vm, 0, &[0, 1]).await;
    let volume = disk_volume(&stored.meta.uid, "root");
    let domain = format!("{}mover", cluster.domain_prefix);
    wait::until(
        "a's primary is in sync with b's copy, the domain runs on a, the NIC is leased",
        DEADLINE,
        &cluster.processes(),
        || async {
            in_sync(&cluster.clients[0], &volume, 1).await
                && domain_state(&cluster.libvirtds[0], &domain) == "running"
                && endpoint_of(&admin, "mover").await.is_some()
        },
    )
    .await;
    let ip = endpoint_of(&admin, "mover")
        .await
        .and_then(|e| e.ip)
        .expect("the leased address");
    cluster.wait_guest(&prefix, "mover", ip).await;
    let record = cluster.write(ip, "before-moves").await.expect("write");
    assert_eq!((record.boots, record.data.as_str()), (1, "before-moves"));

    // The connection held through both moves.
    let held = {
        let cp = cp.clone();
        tokio::task::spawn_blocking(move || {
            let held = HeldStream::open(ip, &cp, MAX_PAUSE);
            assert!(held.wait_more(5, DEADLINE), "the stream sends numbers");
            held
        })
        .await
        .expect("join")
    };

    // 1. Post-copy: a guest dirtying memory faster than the copy goes.
    let dirtier = {
        let cp = cp.clone();
        tokio::task::spawn_blocking(move || {
            let rounds = GuestClient::in_node(ip, Some(&cp))
                .dirty_memory()
                .expect("start the guest's memory dirtier");
            let dirtier = HeldStream::hold(rounds, MAX_PAUSE);
            assert!(
                dirtier.wait_more(3, DEADLINE),
                "the guest dirties its memory round after round"
            );
            dirtier
        })
        .await
        .expect("join")
    };
    let sampler = TwoCopies::watch(&cluster.libvirtds[0], &cluster.libvirtds[1], domain.clone());
    let started = Instant::now();
    let move_to_b = {
        let (server, to) = (server.clone(), b.netns().to_owned());
        tokio::spawn(async move {
            basalt(
                &server,
                &[
                    "vm",
                    "migrate",
                    "mover",
                    "--to",
                    &to,
                    "--post-copy",
                    "--timeout-seconds",
                    "3",
                    "--bandwidth-mib",
                    SLOW_MIB_S,
                    "--wait",
                ],
            )
            .await
        })
    };
    // The cap reached the source's QEMU: its migration parameter reads
    // 1 MiB/s while the copy runs (QEMU's own default is 128 MiB/s).
    let mut seen = Vec::new();
    while !move_to_b.is_finished() {
        let copying = migration(&admin, "mover")
            .await
            .is_some_and(|m| m.status.phase == MigrationPhase::Migrating);
        if copying && let Some(cap) = max_bandwidth(&cluster.libvirtds[0], &domain) {
            seen.push(cap);
            if cap == 1 << 20 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.contains(&(1 << 20)),
        "the source QEMU's max-bandwidth during the copy is the API's 1 MiB/s: read {seen:?}"
    );
    let out = move_to_b.await.expect("join");
    eprintln!("post-copy move took {:?}", started.elapsed());
    assert!(out.status.success(), "migrate --post-copy: {}", text(&out));
    let m = migration(&admin, "mover").await.expect("the migration");
    assert_eq!(m.status.phase, MigrationPhase::Succeeded, "{m:?}");
    assert!(
        m.status.post_copy_active,
        "pre-copy could not converge: post-copy did the move: {m:?}"
    );
    let moved = placement(&admin, "mover").await.expect("placed");
    assert_eq!(
        (moved.node.as_str(), moved.epoch),
        (b.netns(), 2),
        "one move, one epoch"
    );
    // The guest goes on dirtying its memory, on b now.
    let dirtier = tokio::task::spawn_blocking(move || {
        let more = dirtier.wait_more(3, DEADLINE);
        let report = dirtier.finish();
        (more, report)
    })
    .await
    .expect("join");
    if !dirtier.0 {
        let echo = {
            let cp = cp.clone();
            tokio::task::spawn_blocking(move || GuestClient::in_node(ip, Some(&cp)).echo("x"))
                .await
                .expect("join")
        };
        let held = held.finish();
        panic!(
            "the dirtier stopped after the move: {} rounds, {:?}, longest pause {:?}; echo: {echo:?}; held stream: {} numbers, {:?}\nguest:\n{}\nagent b:\n{}",
            dirtier.1.numbers.len(),
            dirtier.1.broken,
            dirtier.1.longest_pause,
            held.numbers.len(),
            held.broken,
            basalt_testkit::guest::log_tail(&prefix.log_dir().join("mover.log"), 30),
            cluster.agents[1].log_tail(40),
        );
    }
    let dirtier = dirtier.1;
    assert!(
        dirtier.broken.is_none(),
        "the dirtier's connection broke: {:?}",
        dirtier.broken
    );
    assert!(
        basalt_testkit::guest::check_consecutive(&dirtier.numbers).is_ok(),
        "the dirtier's rounds are numbered in order"
    );
    eprintln!("the dirtier ran {} rounds", dirtier.numbers.len());
    sampler.finish("post-copy");
    assert_eq!(domain_state(&cluster.libvirtds[1], &domain), "running");
    wait::until(
        "a keeps no domain and no tap",
        DEADLINE,
        &cluster.processes(),
        || async { domains(&cluster.libvirtds[0]).is_empty() && vm_taps(&a).is_empty() },
    )
    .await;
    let record = cluster.write(ip, "after-post-copy").await.expect("write");
    assert_eq!(
        (record.boots, record.data.as_str()),
        (1, "after-post-copy"),
        "the guest rebooted"
    );
    assert_eq!(
        endpoint_of(&admin, "mover").await.and_then(|e| e.ip),
        Some(ip)
    );
    wait::until(
        "b's primary is in sync with a's copy",
        DEADLINE,
        &cluster.processes(),
        || async { in_sync(&cluster.clients[1], &volume, 1).await },
    )
    .await;
    wait::until(
        "the control plane holds no copy of mover outdated",
        DEADLINE,
        &cluster.processes(),
        || async { none_outdated(&admin, "mover").await },
    )
    .await;
    assert!(
        held.wait_more(5, DEADLINE),
        "the held stream goes on after the post-copy move"
    );

    // 2. Back to a, slowly; a's agent (the target's) dies mid-copy.
    let sampler = TwoCopies::watch(&cluster.libvirtds[0], &cluster.libvirtds[1], domain.clone());
    let out = basalt(
        &server,
        &[
            "vm",
            "migrate",
            "mover",
            "--to",
            a.netns(),
            "--bandwidth-mib",
            SLOW_MIB_S,
        ],
    )
    .await;
    assert!(out.status.success(), "migrate back: {}", text(&out));
    wait::until(
        "the copy back to a is under way",
        DEADLINE,
        &cluster.processes(),
        || async {
            migration(&admin, "mover").await.is_some_and(|m| {
                m.status.target == a.netns()
                    && m.status.phase == MigrationPhase::Migrating
                    && m.status.data_processed > 0
            })
        },
    )
    .await;
    cluster.agents[0].kill9().expect("kill -9 a's agent");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = migration(&admin, "mover").await.expect("the migration");
    eprintln!(
        "3 s after the target's agent died: {:?}, {} of {} bytes",
        during.status.phase, during.status.data_processed, during.status.data_total
    );
    cluster.agents[0].restart().expect("restart a's agent");
    // Let the copy finish now (libvirt's own knob: the API's cap is the
    // request's, fixed for the copy).
    set_speed(&cluster.libvirtds[1], &domain, "100000");
    wait::until(
        "the migration back to a ends",
        DEADLINE,
        &cluster.processes(),
        || async {
            migration(&admin, "mover").await.is_some_and(|m| {
                matches!(
                    m.status.phase,
                    MigrationPhase::Succeeded | MigrationPhase::Failed
                )
            })
        },
    )
    .await;
    let m = migration(&admin, "mover").await.expect("the migration");
    eprintln!(
        "after the target's agent restart: {:?}: {}",
        m.status.phase, m.status.message
    );
    let (here, other) = if m.status.phase == MigrationPhase::Succeeded {
        (0, 1)
    } else {
        (1, 0)
    };
    let placed = placement(&admin, "mover").await.expect("placed");
    assert_eq!(
        (placed.node.as_str(), placed.epoch),
        (cluster.nodes[here].netns(), if here == 0 { 3 } else { 2 }),
        "the placement follows the outcome: {m:?}"
    );
    wait::until(
        "the VM runs on one node only, the other keeps no domain, tap or primary",
        DEADLINE,
        &cluster.processes(),
        || async {
            domain_state(&cluster.libvirtds[here], &domain) == "running"
                && domains(&cluster.libvirtds[other]).is_empty()
                && vm_taps(&cluster.nodes[other]).is_empty()
                && links(&cluster.clients[other], &volume).await.is_empty()
                && in_sync(&cluster.clients[here], &volume, 1).await
        },
    )
    .await;
    sampler.finish("target agent restart");
    wait::until(
        "the VM reports running on its node",
        DEADLINE,
        &cluster.processes(),
        || async {
            get_vm(&admin, "mover").await.is_some_and(|v| {
                v.status.phase == VmPhase::Running
                    && v.status.node.as_deref() == Some(placed.node.as_str())
            })
        },
    )
    .await;
    // The endpoint follows the outcome (moved on activation, or by the
    // switchover when the restarted agent missed the activation).
    wait::until(
        "the endpoint names the VM's node at the placement's epoch",
        DEADLINE,
        &cluster.processes(),
        || async {
            endpoint_of(&admin, "mover")
                .await
                .is_some_and(|e| e.node == placed.node && e.epoch == placed.epoch)
        },
    )
    .await;
    // New connections reach the guest there: within a few seconds (a SYN
    // lost while cp's route changes over is resent after 1 s, then 3 s;
    // one connect gives up after 2 s), never a lasting outage.
    let answered = Instant::now();
    let record = loop {
        match cluster.write(ip, "after-restart").await {
            Ok(record) => break record,
            Err(err) if answered.elapsed() < NEW_CONNECTIONS_WITHIN => {
                eprintln!("write after the restart: {err}; again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => panic!(
                "write: {err:?} (no new connection for {NEW_CONNECTIONS_WITHIN:?})\n{}\n{}\n{}",
                datapath::dump(cluster.nodes[here].netns(), ip),
                datapath::dump(cluster.nodes[other].netns(), ip),
                cluster
                    .processes()
                    .iter()
                    .map(|p| format!("--- {} ---\n{}", p.name(), p.log_tail(40)))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    };
    eprintln!(
        "a new connection after the restart took {:?}",
        answered.elapsed()
    );
    assert_eq!(
        (record.boots, record.data.as_str()),
        (1, "after-restart"),
        "the guest rebooted"
    );
    assert_eq!(
        endpoint_of(&admin, "mover").await.and_then(|e| e.ip),
        Some(ip)
    );
    let held = tokio::task::spawn_blocking(move || {
        assert!(held.wait_more(10, DEADLINE), "the held stream goes on");
        held.finish_intact("the connection held across both moves", MAX_PAUSE)
    })
    .await
    .expect("join");
    eprintln!(
        "the held connection read {} numbers, longest pause {:?}",
        held.numbers.len(),
        held.longest_pause
    );

    // 3. A disk with a single copy moves with the guest: the target makes
    // a fresh volume, the source's hypervisor copies the disk into it, and
    // the source's copy goes once the VM is placed on the target. The VM
    // also attaches a volume (decision 76), a one-copy clone of the
    // mover's disk made where that disk's primary is: the VM is pinned
    // there, and the volume's copy moves with it the same way.
    let out = basalt(&server, &["volume", "clone", "mover-root", "data"]).await;
    assert!(out.status.success(), "volume clone: {}", text(&out));
    wait::until(
        "the clone is made, one copy up to date",
        DEADLINE,
        &cluster.processes(),
        || async {
            attached_volume(&admin).await.is_some_and(|v| {
                v.status.replicas.len() == 1 && v.status.replicas[0].state == ReplicaState::UpToDate
            })
        },
    )
    .await;
    let data = attached_volume(&admin).await.expect("the clone");
    assert_eq!(data.status.primary_node, cluster.nodes[here].netns());
    let single = Vm {
        meta: ObjectMeta::named("single"),
        spec: VmSpec {
            cpus: 1,
            memory_mib: 96,
            running: true,
            disks: vec![
                Disk {
                    name: "root".into(),
                    size_bytes: SINGLE_DISK_BYTES,
                    replicas: 1,
                    ..Disk::default()
                },
                // Its size and copies are the volume's.
                Disk {
                    name: "data".into(),
                    attach: Some("data".into()),
                    ..Disk::default()
                },
            ],
            kernel: Some(KernelBoot {
                kernel: image.kernel().to_string_lossy().into_owned(),
                initrd: image.initrd().to_string_lossy().into_owned(),
                cmdline: "console=ttyS0".into(),
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
    };
    // Placed by the scheduler, on the attached volume's pin.
    let Object::Vm(single) = admin.create(Object::Vm(single)).await.expect("vm") else {
        panic!("a vm")
    };
    let single_domain = format!("{}single", cluster.domain_prefix);
    let single_volume = disk_volume(&single.meta.uid, "root");
    let data_volume = single.spec.disks[1].storage_name(&single.meta.uid);
    assert_eq!(data_volume, data.status.storage_name);
    // Booted: the guest has counted its boot on its disk.
    wait::until(
        "the single-copy VM runs and has counted its boot",
        DEADLINE,
        &cluster.processes(),
        || async {
            domain_state(&cluster.libvirtds[here], &single_domain) == "running"
                && read_at(&cluster.nodes[here], &single_volume, 0, 512)
                    .await
                    .is_some_and(|b| b.starts_with(b"1\n"))
        },
    )
    .await;
    let pinned = placement(&admin, "single").await.expect("placed");
    assert_eq!(
        (pinned.node.as_str(), pinned.epoch),
        (cluster.nodes[here].netns(), data.status.epoch + 1),
        "pinned to the attached volume's node, past its epoch"
    );
    // Data the guest never touches, written beside it through the exports
    // of both disks.
    let pattern: Vec<u8> = (0..PATTERN_BYTES).map(|i| (i % 251) as u8 + 1).collect();
    for (export, at) in [(&single_volume, PATTERN_AT), (&data_volume, 0)] {
        let (node, export, pattern) =
            (cluster.nodes[here].clone(), export.clone(), pattern.clone());
        tokio::task::spawn_blocking(move || {
            node.run_in(move || {
                let mut client = NbdClient::connect(live_cluster::NBD, &export)?;
                client.write(at, &pattern)?;
                client.flush()
            })
        })
        .await
        .expect("join")
        .expect("netns")
        .expect("write the pattern");
    }
    let before = allocated(&cluster.clients[here], &single_volume)
        .await
        .expect("the source's copy");
    assert!(
        before >= PATTERN_BYTES as u64 && before < SINGLE_DISK_BYTES / 8,
        "the source's copy allocates what was written: {before} bytes"
    );
    let received_before = received(&cluster.nodes[other]);
    let started = Instant::now();
    // Slowed down (libvirt counts the disk's holes against the cap: about
    // 17 s for its 1 GiB), so the volume watch can be stirred mid-copy: every
    // agent's standalone loop then looks for `vol-` copies to drop, and
    // the target holds the attached volume's new copy while the volume
    // still names the source.
    let migrate = {
        let (server, to) = (server.clone(), cluster.nodes[other].netns().to_owned());
        tokio::spawn(async move {
            basalt(
                &server,
                &[
                    "vm",
                    "migrate",
                    "single",
                    "--to",
                    &to,
                    "--bandwidth-mib",
                    "64",
                    "--wait",
                ],
            )
            .await
        })
    };
    wait::until(
        "the target holds the attached volume's new copy mid-migration",
        DEADLINE,
        &cluster.processes(),
        || async {
            migration(&admin, "single")
                .await
                .is_some_and(|m| m.status.phase == MigrationPhase::Migrating)
                && live_cluster::volume_names(&cluster.clients[other])
                    .await
                    .is_some_and(|v| v.contains(&data_volume))
        },
    )
    .await;
    let out = basalt(&server, &["volume", "create", "poke", "--size", "1M"]).await;
    assert!(out.status.success(), "volume create poke: {}", text(&out));
    wait::until(
        "the stirring volume is made",
        DEADLINE,
        &cluster.processes(),
        || async {
            matches!(admin.get(Kind::Volume, "poke").await,
                Ok(Object::Volume(v)) if v.status.replicas.iter().any(|r| r.state == ReplicaState::UpToDate))
        },
    )
    .await;
    let stirred_mid_copy = migration(&admin, "single")
        .await
        .is_some_and(|m| !m.status.phase.is_terminal());
    let out = migrate.await.expect("join");
    assert!(out.status.success(), "migrate single: {}", text(&out));
    eprintln!("the volume watch was stirred mid-copy: {stirred_mid_copy}");
    let out = basalt(&server, &["volume", "delete", "poke"]).await;
    assert!(out.status.success(), "volume delete poke: {}", text(&out));
    let m = migration(&admin, "single").await.expect("the migration");
    let crossed = received(&cluster.nodes[other]) - received_before;
    eprintln!(
        "single-copy move took {:?}: {} bytes by libvirt's count, {crossed} bytes received by the target",
        started.elapsed(),
        m.status.data_total
    );
    // The holes did not cross: the target received the guest's memory and
    // the data written, not the 1 GiB disk.
    assert!(
        crossed < SINGLE_DISK_BYTES / 4,
        "the target received {crossed} bytes for a 1 GiB disk with {before} bytes allocated"
    );
    assert_eq!(m.status.phase, MigrationPhase::Succeeded, "{m:?}");
    assert_eq!(
        placement(&admin, "single").await.map(|p| (p.node, p.epoch)),
        Some((cluster.nodes[other].netns().to_owned(), pinned.epoch + 1)),
    );
    assert_eq!(
        domain_state(&cluster.libvirtds[other], &single_domain),
        "running"
    );
    // The disk came along: the boot count (no second boot) and the data.
    let moved = read_at(&cluster.nodes[other], &single_volume, 0, 512)
        .await
        .expect("the target's copy");
    assert!(
        moved.starts_with(b"1\n"),
        "boot record on the target: {:?}",
        &moved[..8]
    );
    assert_eq!(
        read_at(
            &cluster.nodes[other],
            &single_volume,
            PATTERN_AT,
            PATTERN_BYTES
        )
        .await
        .expect("the target's copy"),
        pattern,
        "the data written on the source is on the target"
    );
    assert_eq!(
        read_at(&cluster.nodes[other], &data_volume, 0, PATTERN_BYTES)
            .await
            .expect("the target's copy of the attached volume"),
        pattern,
        "the attached volume's data is on the target"
    );
    // Only the allocated data travelled: the target's pool holds about as
    // much of the disk as the source's did, not the whole 1 GiB.
    let after = allocated(&cluster.clients[other], &single_volume)
        .await
        .expect("the target's copy");
    eprintln!(
        "single-copy disk of {SINGLE_DISK_BYTES} bytes: {before} allocated on the source, {after} on the target"
    );
    assert!(
        after >= PATTERN_BYTES as u64 && after <= before + ALLOCATION_MARGIN,
        "the target allocates about what the source did: {after} bytes against {before}"
    );
    let started = Instant::now();
    loop {
        let state = domain_state(&cluster.libvirtds[here], &single_domain);
        let volumes = live_cluster::volume_names(&cluster.clients[here]).await;
        if state == "undefined"
            && volumes
                .as_ref()
                .is_some_and(|v| !v.contains(&single_volume) && !v.contains(&data_volume))
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the source still has the single-copy VM: domain {state}, volumes {volumes:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        domain_state(&cluster.libvirtds[other], &single_domain),
        "running",
        "the moved guest runs on"
    );
    // The attached volume followed its VM: still its disk, its one copy on
    // the target, at the placement's epoch; and the target's agent kept
    // that copy although it was made before the volume named the node.
    wait::until(
        "the attached volume names the target",
        DEADLINE,
        &cluster.processes(),
        || async {
            attached_volume(&admin).await.is_some_and(|v| {
                v.status.primary_node == cluster.nodes[other].netns()
                    && v.status.replicas.len() == 1
            })
        },
    )
    .await;
    let data = attached_volume(&admin).await.expect("the volume");
    let owner = data.spec.owner.as_ref().expect("still the VM's");
    assert_eq!(
        (owner.vm.as_str(), owner.disk.as_str(), owner.attached),
        ("single", "data", true)
    );
    assert_eq!(data.status.epoch, pinned.epoch + 1);
    assert!(
        live_cluster::volume_names(&cluster.clients[other])
            .await
            .is_some_and(|v| v.contains(&data_volume)),
        "the target keeps the attached volume's copy"
    );

    // 4. A disk plugged into the running guest: a new one-copy volume made
    // on the VM's node (`--nodes`, at epoch 1, below the VM's), added with
    // `basalt vm add-disk`. The guest's kernel finds a third disk without
    // a reboot, and the volume becomes the VM's.
    let out = basalt(
        &server,
        &[
            "volume",
            "create",
            "extra",
            "--size",
            "64M",
            "--nodes",
            cluster.nodes[other].netns(),
        ],
    )
    .await;
    assert!(out.status.success(), "volume create: {}", text(&out));
    let extra = || async {
        match admin.get(Kind::Volume, "extra").await {
            Ok(Object::Volume(v)) => Some(v),
            _ => None,
        }
    };
    wait::until(
        "the new volume is made on the VM's node, one copy up to date",
        DEADLINE,
        &cluster.processes(),
        || async {
            extra().await.is_some_and(|v| {
                v.status.replicas.len() == 1
                    && v.status.replicas[0].node == cluster.nodes[other].netns()
                    && v.status.replicas[0].state == ReplicaState::UpToDate
            })
        },
    )
    .await;
    let console = prefix.log_dir().join("single.log");
    // `basalt vm add-disk single --disk DISK`, then the running guest's
    // kernel log names `device`.
    let plug = |disk: &'static str, device: &'static str| {
        let (server, console, processes) = (&server, &console, cluster.processes());
        async move {
            let out = basalt(server, &["vm", "add-disk", "single", "--disk", disk]).await;
            assert!(out.status.success(), "vm add-disk: {}", text(&out));
            wait::until(
                &format!("the running guest finds {device}"),
                DEADLINE,
                &processes,
                || async {
                    std::fs::read_to_string(console)
                        .unwrap_or_default()
                        .contains(&format!("[{device}]"))
                },
            )
            .await;
        }
    };
    plug("name=extra,attach=extra", "vdc").await;
    assert_eq!(
        domain_state(&cluster.libvirtds[other], &single_domain),
        "running",
        "plugged in without a restart"
    );
    assert!(
        read_at(&cluster.nodes[other], &single_volume, 0, 512)
            .await
            .is_some_and(|b| b.starts_with(b"1\n")),
        "the guest booted once"
    );
    let extra_volume = extra().await.expect("extra").status.storage_name;
    // A disk of the VM's own added after its move (an epoch past its
    // first): made on its node at that epoch, plugged in as a fourth disk.
    plug("name=scratch,size=32M", "vdd").await;
    wait::until(
        "the plugged volume is the VM's",
        DEADLINE,
        &cluster.processes(),
        || async {
            extra().await.is_some_and(|v| {
                v.spec.owner.is_some_and(|o| {
                    (o.vm.as_str(), o.disk.as_str(), o.attached) == ("single", "extra", true)
                })
            })
        },
    )
    .await;
    // Removed from the running VM: unplugged, and released (standalone
    // again, data kept) only once the guest let go of it.
    let out = basalt(&server, &["vm", "remove-disk", "single", "extra"]).await;
    assert!(out.status.success(), "vm remove-disk: {}", text(&out));
    wait::until(
        "the removed volume is released",
        DEADLINE,
        &cluster.processes(),
        || async { extra().await.is_some_and(|v| v.spec.owner.is_none()) },
    )
    .await;
    let blocks = cluster.libvirtds[other]
        .virsh(&["domblklist", &single_domain])
        .expect("virsh domblklist");
    assert!(
        !blocks.contains("vdc"),
        "released while the guest still had it:\n{blocks}"
    );
    assert_eq!(
        domain_state(&cluster.libvirtds[other], &single_domain),
        "running",
        "unplugged without a restart"
    );
    assert!(
        live_cluster::volume_names(&cluster.clients[other])
            .await
            .is_some_and(|v| v.contains(&extra_volume)),
        "the released volume's copy stays"
    );

    let nodes = cluster.nodes.clone();
    let volume_name = volume.clone();
    tokio::task::spawn_blocking(move || {
        copies_match(&[&nodes[here], &nodes[other]], &volume_name, DISK_BYTES)
    })
    .await
    .expect("join")
    .expect("both copies match after the moves");
}
