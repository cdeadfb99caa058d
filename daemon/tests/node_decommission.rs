//! Decommissioning a node under a running VM, end to end (root, libvirt,
//! TCG, Basalt's datapath and storage): a control plane on namespace node
//! `cp`, and on nodes `a`, `b` and `c` a private libvirtd, `basaltd
//! storage serve --replica-listen` and `basaltd agent --network
//! --storage-socket` (libvirt compute). The test guest runs on `a` from a
//! disk replicated to all three nodes, with a cloud-init seed and a NIC
//! whose address it takes by DHCP; `cp` reaches it through the node that
//! holds it (`basaltd lab routes`, the lab's route follower).
//!
//! - **Three replicas**: `a`'s primary ships to both secondaries; after
//!   the guest's writes all three copies are byte for byte the same.
//! - **Drain**: `basalt node drain a --wait` moves the VM live (the
//!   guest never reboots: its disk's boot counter stays 1) to `b` or `c`,
//!   seed and all (the target made the seed volume before the copy, and
//!   the running domain reads it there); it answers at the same address
//!   from its new node, and `a` keeps no domain and no tap. One TCP
//!   connection from `cp` to the guest's numbered stream, opened before
//!   the drain, is read all through it: no reset, every number one more
//!   than the last, still flowing after the move.
//! - **A secondary lost**: the storage process of the other secondary is
//!   killed with SIGKILL: the guest keeps writing (the control plane
//!   records that copy outdated), and once the process is back the copy
//!   resyncs, the mark is cleared, and the three copies match again.
//! - **Remove, then delete everything**: `basalt node remove a` (no VM
//!   left there), then the VM and its network are deleted: no domain on
//!   any libvirtd, no VM tap in any node's namespace, no volume of the VM
//!   (disk or seed) in any node's pool — the removed node's too, whose
//!   agent still runs, fenced for good since its removal — and no
//!   placement, migration or endpoint (the IP lease) in the control
//!   plane.

mod common;
mod live_cluster;

use std::time::Duration;

use basalt_agent::storage::disk_volume;
use basalt_agent::storage::seed::seed_volume;
use basalt_api::{
    CloudInit, Disk, KernelBoot, Kind, MigrationPhase, Nic, Object, ObjectMeta, Vm, VmPhase, VmSpec,
};
use basalt_testkit::guest::GuestImage;
use basalt_testkit::{Prefix, wait};

use live_cluster::{
    DEADLINE, HeldStream, LiveCluster, NBD, Prober, basalt, copies_match, count, domain_state,
    domains, endpoint_of, get_vm, in_sync, placement, text, vm_taps, volume_names,
};

const DISK_BYTES: u64 = 16 << 20;
/// The longest the guest may go unanswered from `cp` while it moves live:
/// far above a switchover and its route change (about a second), below a
/// stop and a boot under TCG on a loaded machine.
const MAX_SILENCE: Duration = Duration::from_secs(20);
/// The longest pause the held connection may see across the drain: the
/// same bound (a reset or a reboot breaks it outright).
const MAX_PAUSE: Duration = MAX_SILENCE;
const USER_DATA: &str =
    "#cloud-config\nruncmd:\n  - [sh, -c, \"echo decommission-seed > /run/seed\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_drained_live_removed_and_nothing_is_left() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prefix = Prefix::for_test().expect("prefix");
    let image = GuestImage::build().expect("guest image");
    let mut cluster = LiveCluster::start(&prefix, &["a", "b", "c"]).await;
    cluster.default_network().await;
    let nodes = cluster.nodes.clone();
    let (a, cp) = (nodes[0].clone(), cluster.cp.clone());
    let (admin, server) = (cluster.admin.clone(), cluster.server.clone());

    // The VM, stopped, placed on a with its disk on a, b and c; then run.
    let vm = Vm {
        meta: ObjectMeta::named("db"),
        spec: VmSpec {
            cpus: 1,
            memory_mib: 128,
            running: false,
            disks: vec![Disk {
                name: "root".into(),
                size_bytes: DISK_BYTES,
                image: None,
                replicas: 3,
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
            cloud_init: Some(CloudInit {
                user_data: USER_DATA.into(),
                network_config: None,
                ssh_authorized_keys: Vec::new(),
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
    };
    let stored = cluster.create_vm(vm, 0, &[0, 1, 2]).await;
    let volume = disk_volume(&stored.meta.uid, "root");
    let seed = seed_volume(&stored).expect("a seed");
    let domain = format!("{}db", cluster.domain_prefix);

    // Three replicas: a's primary in sync with both secondaries.
    wait::until(
        "a's primary is in sync with b's and c's copies",
        DEADLINE,
        &cluster.processes(),
        || async { in_sync(&cluster.clients[0], &volume, 2).await },
    )
    .await;
    wait::until(
        "the domain runs on a",
        DEADLINE,
        &cluster.processes(),
        || async { domain_state(&cluster.libvirtds[0], &domain) == "running" },
    )
    .await;
    wait::until(
        "the NIC is leased",
        DEADLINE,
        &cluster.processes(),
        || async { endpoint_of(&admin, "db").await.is_some() },
    )
    .await;
    let leased = endpoint_of(&admin, "db").await.expect("the endpoint");
    let ip = leased.ip.expect("the leased address");
    cluster.wait_guest(&prefix, "db", ip).await;
    let record = cluster
        .write(ip, "before-drain")
        .await
        .expect("the guest writes");
    assert_eq!((record.boots, record.data.as_str()), (1, "before-drain"));
    {
        let (nodes, volume) = (nodes.clone(), volume.clone());
        tokio::task::spawn_blocking(move || {
            copies_match(&[&nodes[0], &nodes[1], &nodes[2]], &volume, DISK_BYTES)
        })
        .await
        .expect("join")
        .expect("three copies after the first writes");
    }
    assert!(
        volume_names(&cluster.clients[0])
            .await
            .is_some_and(|v| v.contains(&seed)),
        "a holds the seed"
    );

    // Drain a: the VM moves live, answering all along, and one TCP
    // connection from cp to its numbered stream is held across the move.
    let held = {
        let cp = cp.clone();
        tokio::task::spawn_blocking(move || {
            let held = HeldStream::open(ip, &cp, MAX_PAUSE);
            assert!(
                held.wait_more(5, DEADLINE),
                "the held stream sends numbers before the drain"
            );
            held
        })
        .await
        .expect("join")
    };
    let prober = Prober::start(ip, &cp);
    let out = basalt(
        &server,
        &["node", "drain", a.netns(), "--wait", "--timeout", "300s"],
    )
    .await;
    let (answered, gap) = prober.finish();
    // Still the same connection, numbers still coming after the move.
    let held = tokio::task::spawn_blocking(move || {
        assert!(
            held.wait_more(10, DEADLINE),
            "the held stream goes on after the drain"
        );
        held.finish_intact("the connection held across the drain", MAX_PAUSE)
    })
    .await
    .expect("join");
    eprintln!(
        "drain: the held connection read {} numbers, longest pause {:?}",
        held.numbers.len(),
        held.longest_pause
    );
    assert!(
        out.status.success() && text(&out).contains("moved live"),
        "drain: {}",
        text(&out)
    );
    eprintln!("drain: {answered} probes answered, longest silence {gap:?}");
    // A cold move would be silent for a whole stop and boot (and the
    // guest's boot counter below would say 2).
    assert!(
        answered > 0 && gap < MAX_SILENCE,
        "the VM did not keep answering through the drain: {answered} answers, {gap:?} silent"
    );
    let moved = placement(&admin, "db").await.expect("placed");
    assert_eq!(moved.epoch, 2, "one move, one epoch: {moved:?}");
    let t = nodes
        .iter()
        .position(|n| n.netns() == moved.node)
        .filter(|i| *i != 0)
        .unwrap_or_else(|| panic!("moved to {}", moved.node));
    let s = 3 - t; // the other secondary (b = 1, c = 2)
    let Ok(Object::Migration(m)) = admin.get(Kind::Migration, "db").await else {
        panic!("the drain's migration is kept")
    };
    assert_eq!(m.status.phase, MigrationPhase::Succeeded, "{m:?}");
    assert_eq!(domain_state(&cluster.libvirtds[t], &domain), "running");
    wait::until(
        "a keeps no domain and no tap",
        DEADLINE,
        &cluster.processes(),
        || async { domains(&cluster.libvirtds[0]).is_empty() && vm_taps(&a).is_empty() },
    )
    .await;
    // The seed came along: the target made it before the copy, and the
    // running domain reads its CD-ROM from the target's pool.
    assert!(
        volume_names(&cluster.clients[t])
            .await
            .is_some_and(|v| v.contains(&seed)),
        "the target holds the seed"
    );
    let xml = cluster.libvirtds[t]
        .virsh(&["dumpxml", &domain])
        .expect("dumpxml on the target");
    assert!(
        xml.split("<disk ")
            .any(|d| d.contains("device='cdrom'") && d.contains(&format!("name='{seed}'"))),
        "the migrated domain has no seed CD-ROM:\n{xml}"
    );
    wait::until(
        "the VM reports running on its new node",
        DEADLINE,
        &cluster.processes(),
        || async {
            get_vm(&admin, "db").await.is_some_and(|v| {
                v.status.phase == VmPhase::Running
                    && v.status.node.as_deref() == Some(moved.node.as_str())
            })
        },
    )
    .await;
    // Live, not cold: the same boot, the same address.
    let record = cluster
        .write(ip, "after-drain")
        .await
        .expect("the guest writes after the drain");
    assert_eq!(
        (record.boots, record.data.as_str()),
        (1, "after-drain"),
        "the guest rebooted during the drain"
    );
    assert_eq!(
        endpoint_of(&admin, "db").await.and_then(|e| e.ip),
        Some(ip),
        "the address stays"
    );
    wait::until(
        "the new primary is in sync with both other copies",
        DEADLINE,
        &cluster.processes(),
        || async { in_sync(&cluster.clients[t], &volume, 2).await },
    )
    .await;
    {
        let (nodes, volume) = (nodes.clone(), volume.clone());
        tokio::task::spawn_blocking(move || {
            copies_match(&[&nodes[t], &nodes[0], &nodes[s]], &volume, DISK_BYTES)
        })
        .await
        .expect("join")
        .expect("three copies after the drain");
    }

    // The other secondary's storage process dies: the guest keeps
    // writing once the control plane has that copy recorded outdated.
    cluster.storages[s]
        .kill9()
        .expect("kill -9 a secondary's storage");
    let lost = nodes[s].netns().to_owned();
    wait::until(
        "the guest writes with one copy lost",
        DEADLINE,
        &cluster.processes(),
        || async {
            cluster
                .write(ip, "one-copy-lost")
                .await
                .is_ok_and(|r| r.data == "one-copy-lost" && r.boots == 1)
        },
    )
    .await;
    let marked = get_vm(&admin, "db").await.expect("vm");
    assert_eq!(
        marked.status.outdated_replicas,
        [lost],
        "the lost copy is recorded outdated"
    );
    cluster.storages[s]
        .restart()
        .expect("restart the secondary's storage");
    cluster.storages[s]
        .wait_for_tcp(NBD, Some(&nodes[s]), Duration::from_secs(30))
        .expect("storage listening again");
    wait::until(
        "the lost copy resyncs and its mark is cleared",
        DEADLINE,
        &cluster.processes(),
        || async {
            in_sync(&cluster.clients[t], &volume, 2).await
                && get_vm(&admin, "db")
                    .await
                    .is_some_and(|v| v.status.outdated_replicas.is_empty())
        },
    )
    .await;
    {
        let (nodes, volume) = (nodes.clone(), volume.clone());
        tokio::task::spawn_blocking(move || {
            copies_match(&[&nodes[t], &nodes[0], &nodes[s]], &volume, DISK_BYTES)
        })
        .await
        .expect("join")
        .expect("three copies after the resync");
    }

    // Remove a (nothing runs there), then delete the VM and its network.
    let out = basalt(&server, &["node", "remove", a.netns()]).await;
    assert!(
        out.status.success() && text(&out).contains("removed"),
        "remove: {}",
        text(&out)
    );
    // The removed node's agent keeps running, fenced for good (its token
    // is spent); its pool still holds a copy of the VM's disk.
    wait::until(
        "the removed node's agent has fenced itself",
        DEADLINE,
        &cluster.processes(),
        || async { cluster.agents[0].log_tail(50).contains("fencing window") },
    )
    .await;
    assert!(
        volume_names(&cluster.clients[0])
            .await
            .is_some_and(|v| v.contains(&volume)),
        "the removed node holds its copy until the VM is deleted"
    );
    let out = basalt(
        &server,
        &["vm", "delete", "db", "--wait", "--timeout", "120s"],
    )
    .await;
    assert!(out.status.success(), "delete: {}", text(&out));
    wait::until(
        "the VM's address is released",
        DEADLINE,
        &cluster.processes(),
        || async { count(&admin, Kind::Endpoint).await == Some(0) },
    )
    .await;
    admin
        .delete(Kind::Network, "default", None)
        .await
        .expect("delete the network");

    // Nothing is left, on any node, in any pool, in the control plane.
    wait::until(
        "no domain, tap or volume of the VM is left on any node",
        DEADLINE,
        &cluster.processes(),
        || async {
            for (i, node) in nodes.iter().enumerate() {
                if !domains(&cluster.libvirtds[i]).is_empty() || !vm_taps(node).is_empty() {
                    return false;
                }
                match volume_names(&cluster.clients[i]).await {
                    Some(names) if !names.contains(&volume) && !names.contains(&seed) => {}
                    _ => return false,
                }
            }
            true
        },
    )
    .await;
    for kind in [Kind::Vm, Kind::Placement, Kind::Migration, Kind::Endpoint] {
        wait::until(
            &format!("no {kind:?} object is left"),
            DEADLINE,
            &cluster.processes(),
            || async { count(&admin, kind).await == Some(0) },
        )
        .await;
    }
    let left: Vec<String> = admin
        .list(Kind::Node)
        .await
        .expect("nodes")
        .objects
        .into_iter()
        .map(|o| o.name().to_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n == a.netns()) && left.len() == 2,
        "a stays removed: {left:?}"
    );
}
