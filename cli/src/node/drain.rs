//! `basalt node drain NAME`: cordons the node and moves every VM off it.
//!
//! A running VM moves live: drain asks for a `migration` named after it,
//! with no target (the control plane chooses one, keeping a VM with
//! replicated disks on its replica nodes), at most `--parallel` at a time,
//! and prints each one's progress. A VM that does not run there, every VM
//! under `--cold`, and a VM whose migration fails move cold instead: the
//! placement gets [`Placement::EVICT_LABEL`], the node's agent stops the VM
//! and the control plane starts it on another node (`docs/decisions.md`
//! §30). Each VM's way out is printed.
//!
//! With `--storage` the node is also labelled
//! [`basalt_api::Node::EVACUATE_LABEL`]: the control plane moves the
//! copies of its standalone volumes (decision 81) and, once their VMs are
//! elsewhere, of VMs' replicated disks (decision 82) to other nodes, and
//! `--wait` waits for those too. A VM with a one-copy
//! disk is never moved cold: it only moves live.
//!
//! Idempotent, as `kubectl drain` is: run again, it follows the migrations
//! already under way instead of asking again, leaves VMs already evicted
//! alone, and asks again only for VMs still on the node. `--wait` then
//! waits until no placement names the node.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use anyhow::{Context as _, bail};
use basalt_api::{
    AdminClient, ApiError, Kind, Migration, MigrationPhase, MigrationSpec, Object, ObjectMeta,
    Placement, Vm, VmPhase, Volume,
};

use super::{placements_on, set_cordoned, set_evicting};
use crate::wait::{Deadline, POLL};

/// How a drain moves VMs.
#[derive(Debug, Clone, Copy)]
pub struct DrainOptions {
    /// Wait until no placement names the node.
    pub wait: bool,
    /// How long the whole drain may take.
    pub timeout: Duration,
    /// How many live migrations run at once.
    pub parallel: usize,
    /// Move every VM cold, none live.
    pub cold: bool,
    /// Also move the copies of volumes and disks off the node.
    pub storage: bool,
    /// Each live migration's bandwidth cap, MiB/s (0: none).
    pub bandwidth_mib_s: u32,
}

/// One migration this drain follows.
#[derive(Debug)]
struct Following {
    /// What was last printed.
    last: Option<crate::migrate::ProgressKey>,
}

/// Cordons `name` and moves every VM off it; see the module doc.
pub async fn drain(client: &AdminClient, name: &str, options: DrainOptions) -> anyhow::Result<()> {
    client
        .get(Kind::Node, name)
        .await
        .with_context(|| format!("reading node/{name}"))?;
    set_cordoned(client, name, true, options.storage.then_some(true)).await?;
    let deadline = Deadline::after(options.timeout);
    let placed = placements_on(client, name).await?;
    let held = if options.storage {
        let held = Held {
            volumes: volumes_on(client, name).await?,
            copies: copies_on(client, name).await?,
        };
        println!(
            "node/{name} cordoned; moving {} VM(s), the disk copies of {} more and {} standalone volume cop(ies) off it",
            placed.len(),
            held.copies.len(),
            held.volumes.len()
        );
        Some(held)
    } else {
        println!("node/{name} cordoned; moving {} VM(s) off it", placed.len());
        None
    };

    // First the cold moves (they start at once), then the live ones.
    let mut live: VecDeque<String> = VecDeque::new();
    for placement in &placed {
        let vm = placement.vm.as_str();
        if placement.is_evicting() {
            println!("  vm/{vm}: already moving cold (eviction)");
            continue;
        }
        if let Some(m) = migration(client, vm).await?
            && !m.status.phase.is_terminal()
        {
            // Asked before (an earlier drain, or `basalt vm migrate`):
            // followed, not asked again, even under --cold.
            live.push_back(vm.to_owned());
            continue;
        }
        if options.cold {
            evict(client, vm, "--cold").await?;
            continue;
        }
        match runs_on(client, vm, name).await? {
            Ok(()) => live.push_back(vm.to_owned()),
            Err(why) => evict(client, vm, &why).await?,
        }
    }

    let mut following: BTreeMap<String, Following> = BTreeMap::new();
    loop {
        while following.len() < options.parallel.max(1)
            && let Some(vm) = live.pop_front()
        {
            if start_live(
                client,
                &vm,
                name,
                options.bandwidth_mib_s,
                start_timeout(&deadline),
            )
            .await?
            {
                following.insert(vm, Following { last: None });
            }
        }
        if following.is_empty() {
            break;
        }
        let mut ended = Vec::new();
        for (vm, state) in &mut following {
            if follow_step(client, vm, name, state).await? {
                ended.push(vm.clone());
            }
        }
        for vm in ended {
            following.remove(&vm);
        }
        if following.is_empty() && live.is_empty() {
            break;
        }
        deadline.check(|| {
            let moving: Vec<&str> = following.keys().map(String::as_str).collect();
            format!(
                "live migration of {} still under way, {} VM(s) not started yet; run the drain again to continue",
                moving.join(", "),
                live.len()
            )
        })?;
        tokio::time::sleep(POLL).await;
    }

    if !options.wait {
        return Ok(());
    }
    wait_empty(client, name, deadline, held).await
}

/// What a node holds besides its VMs, that a drain moves off it.
struct Held {
    /// Standalone volumes with a copy there ([`volumes_on`]).
    volumes: Vec<String>,
    /// VMs elsewhere with a disk copy there ([`copies_on`]).
    copies: Vec<String>,
}

/// The standalone volumes (not a VM's disk, not a snapshot or clone:
/// those stay with their source) with a copy on node `name`: what a drain
/// moves off it besides the VMs.
pub(super) async fn volumes_on(client: &AdminClient, name: &str) -> anyhow::Result<Vec<String>> {
    let list = client
        .list(Kind::Volume)
        .await
        .context("listing the volumes")?;
    Ok(list
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Volume(v)
                if v.spec.owner.is_none()
                    && v.spec.source.is_none()
                    && v.status.replica(name).is_some() =>
            {
                Some(v.meta.name)
            }
            _ => None,
        })
        .collect())
}

/// The VMs placed on another node with a replicated disk's copy on node
/// `name` (their replica nodes name it): what a drain moves off it once
/// the VMs themselves have left.
pub(super) async fn copies_on(client: &AdminClient, name: &str) -> anyhow::Result<Vec<String>> {
    let list = client
        .list(Kind::Placement)
        .await
        .context("listing the placements")?;
    Ok(list
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Placement(p) if p.node != name && p.holds_replica(name) => Some(p.vm),
            _ => None,
        })
        .collect())
}

/// For each of `vms` (placed elsewhere, with a disk copy on `node`), why
/// that copy is still there ([`copy_stays_because`]).
async fn why_copies_stay(
    client: &AdminClient,
    node: &str,
    vms: &[String],
) -> anyhow::Result<Vec<String>> {
    let volumes: Vec<Volume> = client
        .list(Kind::Volume)
        .await
        .context("listing the volumes")?
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Volume(v) => Some(v),
            _ => None,
        })
        .collect();
    let mut lines = Vec::new();
    for name in vms {
        let vm = match client.get(Kind::Vm, name).await {
            Ok(Object::Vm(vm)) => vm,
            _ => continue,
        };
        let Some(p) = placement(client, name).await? else {
            continue;
        };
        lines.push(format!(
            "vm/{name}: {}",
            copy_stays_because(&vm, &p, &volumes, node)
        ));
    }
    Ok(lines)
}

/// Why `vm` (placed as `p`) still has a disk copy on the drained `node`:
/// the node taking its place is still being filled (with how far each
/// disk got), or no node has been given the copy yet, which the control
/// plane does as soon as one can take it.
fn copy_stays_because(vm: &Vm, p: &Placement, volumes: &[Volume], node: &str) -> String {
    let wanted = vm.spec.replicas_wanted();
    let added: Vec<&String> = p
        .replica_nodes
        .iter()
        .skip(wanted)
        .filter(|n| *n != node)
        .collect();
    if added.is_empty() {
        return format!(
            "no node has been given its copy yet: the control plane needs a ready, uncordoned node with room and a replication address that holds no copy of it ({} do)",
            p.replica_nodes.join(", ")
        );
    }
    let mut states = Vec::new();
    for to in added {
        for v in volumes.iter().filter(|v| {
            v.spec
                .owner
                .as_ref()
                .is_some_and(|o| o.vm == vm.meta.name && o.vm_uid == vm.meta.uid)
        }) {
            let disk = v.spec.owner.as_ref().map_or("", |o| o.disk.as_str());
            let state = match v.status.replica(to) {
                Some(r) if r.sync_total_bytes > 0 => format!(
                    "{} ({} of {} MiB sent)",
                    r.state,
                    r.sync_done_bytes >> 20,
                    r.sync_total_bytes >> 20
                ),
                Some(r) => r.state.to_string(),
                None => "not reported yet".into(),
            };
            states.push(format!("disk {disk} on {to}: {state}"));
        }
    }
    format!("its new copy is being filled: {}", states.join("; "))
}

/// The VM's migration, if any.
async fn migration(client: &AdminClient, vm: &str) -> anyhow::Result<Option<Migration>> {
    match client.get(Kind::Migration, vm).await {
        Ok(Object::Migration(m)) => Ok(Some(m)),
        Ok(other) => bail!("{vm} is a {}, not a migration", other.kind()),
        Err(ApiError::NotFound { .. }) => Ok(None),
        Err(err) => Err(err).with_context(|| format!("reading migration/{vm}")),
    }
}

/// `Ok` when `vm` runs on `node` (so it can move live); otherwise why not.
async fn runs_on(client: &AdminClient, vm: &str, node: &str) -> anyhow::Result<Result<(), String>> {
    let vm = match client.get(Kind::Vm, vm).await {
        Ok(Object::Vm(vm)) => vm,
        Ok(_) | Err(ApiError::NotFound { .. }) => return Ok(Err("no such VM".into())),
        Err(err) => return Err(err).with_context(|| format!("reading vm/{vm}")),
    };
    let phase = vm.status.phase;
    let here = vm.status.node.as_deref() == Some(node);
    if vm.spec.running && here && matches!(phase, VmPhase::Running | VmPhase::Migrating) {
        Ok(Ok(()))
    } else if !vm.spec.running {
        Ok(Err("not running (stopped by its spec)".into()))
    } else {
        Ok(Err(format!("not running ({phase})")))
    }
}

/// The first disk of `vm` with a single copy (only on the VM's node):
/// such a VM moves only live.
fn one_copy_disk(vm: &Vm) -> Option<&str> {
    vm.spec
        .disks
        .iter()
        .find(|d| d.replicas < 2)
        .map(|d| d.name.as_str())
}

/// Labels `vm`'s placement for a cold move (unless a disk of it has one
/// copy: then it stays, saying so), saying why.
async fn evict(client: &AdminClient, vm: &str, why: &str) -> anyhow::Result<()> {
    // A disk with one copy lives only here: a cold move would start the
    // VM elsewhere without it (the agent there refuses a fresh disk for a
    // VM that ran before). Only a live migration carries it along.
    if let Ok(Object::Vm(v)) = client.get(Kind::Vm, vm).await
        && let Some(disk) = one_copy_disk(&v)
    {
        println!(
            "  vm/{vm}: {why}: stays: its disk {disk} has one copy, on this node, which a cold move would leave behind; start the VM and drain again (a running VM moves live with its disk)"
        );
        return Ok(());
    }
    set_evicting(client, vm, true).await?;
    println!("  vm/{vm}: {why}: moving it cold (stopped here, started on another node)");
    Ok(())
}

/// How long a migration this drain asks for may stay pending: the
/// drain's time left and a minute more, so it ends by itself after a
/// drain that timed out (which leaves it, as uncordon or a new drain
/// would find it) but not before the drain stops following it (which
/// would move its VM cold).
fn start_timeout(deadline: &Deadline) -> u32 {
    let seconds = (deadline.left() + Duration::from_secs(60)).as_secs();
    u32::try_from(seconds)
        .unwrap_or(u32::MAX)
        .min(basalt_api::MAX_MIGRATION_START_TIMEOUT_SECONDS)
}

/// Asks for `vm`'s live migration off `node`, or finds the one under
/// way. Returns whether there is one to follow; when there is none (the
/// VM left or stopped meanwhile, or the request was refused) it has said
/// so and moved the VM cold where that is still needed.
async fn start_live(
    client: &AdminClient,
    vm: &str,
    node: &str,
    bandwidth_mib_s: u32,
    start_timeout_seconds: u32,
) -> anyhow::Result<bool> {
    loop {
        // Still here? (Time passed while others moved.)
        match placement(client, vm).await? {
            Some(p) if p.node == node && !p.is_evicting() => {}
            Some(p) if p.node == node => {
                println!("  vm/{vm}: already moving cold (eviction)");
                return Ok(false);
            }
            Some(p) => {
                println!("  vm/{vm}: already moved to {} (epoch {})", p.node, p.epoch);
                return Ok(false);
            }
            None => {
                println!("  vm/{vm}: no longer placed");
                return Ok(false);
            }
        }
        match migration(client, vm).await? {
            Some(m) if !m.status.phase.is_terminal() => {
                println!(
                    "  vm/{vm}: a live migration is already under way ({}); following it",
                    m.status.phase
                );
                return Ok(true);
            }
            Some(m) => {
                // A finished one (an earlier move): replaced by ours.
                match client
                    .delete(Kind::Migration, vm, Some(m.meta.resource_version))
                    .await
                {
                    Ok(_) | Err(ApiError::NotFound { .. } | ApiError::Aborted { .. }) => {}
                    Err(err) => {
                        return Err(err)
                            .with_context(|| format!("removing the finished migration/{vm}"));
                    }
                }
            }
            None => {}
        }
        if let Err(why) = runs_on(client, vm, node).await? {
            evict(client, vm, &why).await?;
            return Ok(false);
        }
        let mut meta = ObjectMeta::named(vm);
        // Uncordon cancels it while it has not started.
        meta.labels
            .insert(Migration::DRAIN_LABEL.into(), node.to_owned());
        let request = Migration {
            meta,
            spec: MigrationSpec {
                vm: vm.to_owned(),
                target: None,
                post_copy: false,
                timeout_seconds: 0,
                // `--bandwidth-mib`; by default no cap: a drain empties
                // the node as fast as the link allows (decision 60).
                bandwidth_mib_s,
                start_timeout_seconds,
            },
            ..Migration::default()
        };
        match client.create(Object::Migration(request)).await {
            Ok(_) => {
                println!("  vm/{vm}: moving live (migration requested)");
                return Ok(true);
            }
            // Someone asked at the same moment: look again.
            Err(ApiError::AlreadyExists { .. }) => continue,
            Err(err @ (ApiError::InvalidArgument { .. } | ApiError::FailedPrecondition { .. })) => {
                evict(client, vm, &format!("live migration refused ({err})")).await?;
                return Ok(false);
            }
            Err(err) => {
                return Err(err).with_context(|| format!("requesting the migration of {vm}"));
            }
        }
    }
}

/// Looks at `vm`'s migration once, printing what changed; returns whether
/// it is over (and, if it failed, has moved the VM cold).
async fn follow_step(
    client: &AdminClient,
    vm: &str,
    node: &str,
    state: &mut Following,
) -> anyhow::Result<bool> {
    let Some(m) = migration(client, vm).await? else {
        return fall_back(client, vm, node, "its migration was removed").await;
    };
    let status = &m.status;
    let now = crate::migrate::progress_key(&m);
    if state.last.as_ref() != Some(&now) {
        state.last = Some(now);
        if !status.phase.is_terminal() {
            println!(
                "  vm/{vm}: {:<11} {}",
                status.phase.to_string(),
                crate::migrate::progress_text(&m)
            );
        }
    }
    match status.phase {
        MigrationPhase::Succeeded => match placement(client, vm).await? {
            Some(p) if p.node != node => {
                println!("  vm/{vm}: moved live to {} (epoch {})", p.node, p.epoch);
                Ok(true)
            }
            // An older success (it came back since): move it again.
            _ => fall_back(client, vm, node, "it is still here after its migration").await,
        },
        MigrationPhase::Failed => {
            let why = format!("live migration failed ({})", status.message);
            fall_back(client, vm, node, &why).await
        }
        _ => Ok(false),
    }
}

/// A live move ended without moving `vm`: moves it cold if it is still
/// on `node`. Always returns `true` (nothing left to follow).
async fn fall_back(client: &AdminClient, vm: &str, node: &str, why: &str) -> anyhow::Result<bool> {
    match placement(client, vm).await? {
        Some(p) if p.node == node => evict(client, vm, why).await?,
        Some(p) => println!("  vm/{vm}: {why}, but it is on {} now", p.node),
        None => println!("  vm/{vm}: {why}; no longer placed"),
    }
    Ok(true)
}

async fn placement(client: &AdminClient, vm: &str) -> anyhow::Result<Option<Placement>> {
    match client.get(Kind::Placement, vm).await {
        Ok(Object::Placement(p)) => Ok(Some(p)),
        Ok(_) | Err(ApiError::NotFound { .. }) => Ok(None),
        Err(err) => Err(err).with_context(|| format!("reading placement/{vm}")),
    }
}

/// Follows the node until no placement names it (`--wait`) and, with
/// `--storage` (`held`: what it held when the drain began), until no
/// standalone volume and no other VM's disk has a copy on it, each
/// reported when its copy leaves.
async fn wait_empty(
    client: &AdminClient,
    name: &str,
    deadline: Deadline,
    held: Option<Held>,
) -> anyhow::Result<()> {
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let storage = held.is_some();
    let Held {
        volumes: mut last_volumes,
        copies: mut last_copies,
    } = held.unwrap_or(Held {
        volumes: Vec::new(),
        copies: Vec::new(),
    });
    loop {
        if storage {
            let volumes = volumes_on(client, name).await?;
            for volume in last_volumes.iter().filter(|v| !volumes.contains(v)) {
                println!("  volume/{volume}: its copy left {name}");
            }
            last_volumes = volumes;
            let copies = copies_on(client, name).await?;
            for vm in last_copies.iter().filter(|v| !copies.contains(v)) {
                println!("  vm/{vm}: its disk copies left {name}");
            }
            last_copies = copies;
        }
        let remaining = placements_on(client, name).await?;
        let mut now: BTreeMap<String, String> = BTreeMap::new();
        for placement in &remaining {
            let phase = match client.get(Kind::Vm, &placement.vm).await {
                Ok(Object::Vm(vm)) => vm.status.phase.to_string(),
                _ => "-".into(),
            };
            now.insert(placement.vm.clone(), phase);
        }
        for (vm, phase) in &now {
            if last.get(vm) != Some(phase) {
                println!("  vm/{vm}: {phase} on {name}, waiting to move");
            }
        }
        for vm in last.keys().filter(|vm| !now.contains_key(*vm)) {
            match placement(client, vm).await? {
                Some(p) => println!("  vm/{vm}: moved to {} (epoch {})", p.node, p.epoch),
                None => println!("  vm/{vm}: no longer placed"),
            }
        }
        if remaining.is_empty() && last_volumes.is_empty() && last_copies.is_empty() {
            println!("node/{name} drained");
            return Ok(());
        }
        last = now;
        // Why each VM's disk copies are still there, for the message.
        let stuck = if deadline.passed() && !last_copies.is_empty() {
            why_copies_stay(client, name, &last_copies).await?
        } else {
            Vec::new()
        };
        deadline.check(|| {
            let mut message = format!(
                "node/{name} still holds {} VM(s) ({}), disk copies of {} more ({}) and copies of {} standalone volume(s) ({})",
                last.len(),
                last.keys().cloned().collect::<Vec<_>>().join(", "),
                last_copies.len(),
                last_copies.join(", "),
                last_volumes.len(),
                last_volumes.join(", ")
            );
            for line in &stuck {
                message.push_str(&format!("\n  {line}"));
            }
            message
        })?;
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::Disk;

    use super::*;

    #[test]
    fn a_drains_migrations_may_wait_a_minute_past_its_deadline() {
        let seconds = start_timeout(&Deadline::after(Duration::from_secs(300)));
        assert!((359..=360).contains(&seconds), "{seconds}");
        assert_eq!(start_timeout(&Deadline::after(Duration::ZERO)), 60);
        assert_eq!(
            start_timeout(&Deadline::after(Duration::from_secs(30 * 86_400))),
            basalt_api::MAX_MIGRATION_START_TIMEOUT_SECONDS
        );
    }

    #[test]
    fn a_copy_that_stays_says_whether_it_waits_for_a_node_or_for_its_fill() {
        use basalt_api::{
            ObjectMeta, ReplicaState, VolumeOwner, VolumeReplica, VolumeSpec, VolumeStatus,
        };

        let mut vm = Vm {
            meta: ObjectMeta::named("db"),
            ..Vm::default()
        };
        vm.meta.uid = "u1".into();
        vm.spec.disks = vec![Disk {
            name: "root".into(),
            size_bytes: 1 << 30,
            replicas: 2,
            ..Disk::default()
        }];
        let mut p = Placement {
            vm: "db".into(),
            node: "a".into(),
            replica_nodes: vec!["a".into(), "b".into()],
            ..Placement::default()
        };
        let volume = Volume {
            meta: ObjectMeta::named("db-root"),
            spec: VolumeSpec {
                owner: Some(VolumeOwner {
                    vm: "db".into(),
                    vm_uid: "u1".into(),
                    disk: "root".into(),
                    ..VolumeOwner::default()
                }),
                ..VolumeSpec::default()
            },
            status: VolumeStatus {
                replicas: vec![VolumeReplica {
                    node: "c".into(),
                    state: ReplicaState::Syncing,
                    sync_done_bytes: 300 << 20,
                    sync_total_bytes: 1 << 30,
                    ..VolumeReplica::default()
                }],
                ..VolumeStatus::default()
            },
        };
        let volumes = [volume];
        let why = copy_stays_because(&vm, &p, &volumes, "b");
        assert!(
            why.starts_with("no node has been given its copy yet"),
            "{why}"
        );
        p.replica_nodes.push("c".into());
        assert_eq!(
            copy_stays_because(&vm, &p, &volumes, "b"),
            "its new copy is being filled: disk root on c: syncing (300 of 1024 MiB sent)"
        );
    }

    #[test]
    fn a_vm_with_a_one_copy_disk_moves_only_live() {
        let disk = |name: &str, replicas: u32| Disk {
            name: name.into(),
            size_bytes: 1 << 20,
            replicas,
            ..Disk::default()
        };
        let mut vm = Vm::default();
        assert_eq!(one_copy_disk(&vm), None, "no disk");
        vm.spec.disks = vec![disk("root", 2), disk("data", 3)];
        assert_eq!(one_copy_disk(&vm), None, "every disk replicated");
        vm.spec.disks.push(disk("scratch", 1));
        assert_eq!(one_copy_disk(&vm), Some("scratch"));
    }
}
