//! The scheduler: a pure planner that decides where pending VMs go
//! (filter, then score), and an executor that writes its decisions as
//! `Placement` objects by compare-and-swap.
//!
//! Invariants:
//! - the planner does no I/O and is deterministic: the same nodes, VMs,
//!   placements and seed give the same plan;
//! - a plan never breaks a rule: a node gets a VM only if it is ready and
//!   not cordoned, matches the VM's node selector, keeps the requested CPU
//!   and memory within allocatable × overcommit ratio, and holds no other
//!   VM of the VM's anti-affinity group;
//! - storage locality: a VM with replicated disks (a disk with `replicas`
//!   of 2 or more) gets, at its first placement, as many distinct replica
//!   nodes as its disks ask at most (each ready, not cordoned, matching the
//!   node selector, with room in its pool when the node reports a pool
//!   size), its primary among them — or none at all and a reason; a VM
//!   that moves ([`plan_with_moves`]) and has replica nodes goes only to
//!   one of them, and keeps them;
//! - a lost replica node is replaced ([`plan_replacements`]) in its slot
//!   by a node that holds no copy of the VM, is not lost, could hold a
//!   first replica, and has published its replication address; the VM's
//!   own node is never replaced;
//! - a pinned VM ([`Pin`]: a disk cloned from a volume, decision 64) goes,
//!   at its first placement, only to the node its pin names, or nowhere
//!   with a reason that names that node;
//! - the executor only creates placements: one that already exists (a
//!   concurrent scheduler won) is left alone, so a VM is never placed twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use basalt_api::{AdminApi, ApiError, Node, Object, ObjectMeta, Placement, Vm};

/// How much of a node's allocatable CPU and memory may be promised to VMs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overcommit {
    /// vCPUs per allocatable CPU (e.g. 4.0).
    pub cpu: f64,
    /// MiB promised per allocatable MiB (e.g. 1.0: no overcommit).
    pub memory: f64,
}

impl Default for Overcommit {
    fn default() -> Self {
        Self {
            cpu: 4.0,
            memory: 1.0,
        }
    }
}

/// Where each pending VM goes, and why the others cannot go anywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// VM name → node name, in the order decided.
    pub placements: Vec<(String, String)>,
    /// VM name → the nodes chosen to hold its replicated disks (its node
    /// first), for VMs placed for the first time that have replicated
    /// disks. A VM that moves keeps the replica nodes it has.
    pub replica_nodes: BTreeMap<String, Vec<String>>,
    /// VM name → why no node fits.
    pub unschedulable: Vec<(String, String)>,
}

/// The one node a VM may take at its first placement, and why: a disk
/// made from a volume is cloned in the pool of the node holding that
/// volume's primary copy (decision 64); a disk that is a volume goes where
/// the volume is, its copies' nodes the VM's replica nodes (decision 76).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pin {
    /// The node; `None` while the source is on no node yet (the VM waits).
    pub node: Option<String>,
    /// The replica nodes the placement must have (an attached volume's
    /// copies' nodes); empty leaves them to the scheduler.
    pub replica_nodes: Vec<String>,
    /// The least epoch of the first placement (past an attached volume's,
    /// whose copies refuse an older one); 0 or 1 is the usual 1.
    pub epoch: u64,
    /// Why, for the unschedulable reason: e.g. `disk "root" is a clone of
    /// volume "golden", whose primary copy is on node "a"`.
    pub why: String,
}

/// VM name → its [`Pin`].
pub type Pins = BTreeMap<String, Pin>;

/// What a node has promised so far while planning.
#[derive(Debug, Clone, Default)]
struct Load {
    cpus: u64,
    memory_mib: u64,
    /// Bytes of VM disks on the node (replicated disks count on every
    /// replica node, the others on the VM's node).
    storage_bytes: u64,
    groups: BTreeSet<String>,
}

/// Bytes of `vm`'s replicated disks (on every replica node) and of its
/// other disks (on its node only).
fn disk_bytes(vm: &Vm) -> (u64, u64) {
    let replicated = vm.spec.replicas_wanted() > 0;
    vm.spec.disks.iter().fold((0, 0), |(shared, local), disk| {
        if replicated && disk.replicas >= 2 {
            (shared + disk.size_bytes, local)
        } else {
            (shared, local + disk.size_bytes)
        }
    })
}

/// The part of `vm` the planners read — its name, CPUs, memory,
/// placement rules, disks and outdated replicas — and nothing else (no
/// cloud-init documents, NICs, labels or other status): callers that copy
/// every VM out of the state for a plan copy this instead, which keeps
/// the copy short for VMs with large specs.
pub fn planning_view(vm: &Vm) -> Vm {
    let mut view = Vm {
        meta: ObjectMeta::named(vm.meta.name.clone()),
        ..Vm::default()
    };
    view.spec.cpus = vm.spec.cpus;
    view.spec.memory_mib = vm.spec.memory_mib;
    view.spec.running = vm.spec.running;
    view.spec.placement = vm.spec.placement.clone();
    view.spec.disks = vm.spec.disks.clone();
    view.status.outdated_replicas = vm.status.outdated_replicas.clone();
    view
}

/// Plans the VMs in `vms` that have no placement yet, onto `nodes`,
/// given the existing `placements`. VMs are taken largest first (memory,
/// then CPUs, then name), so big VMs are not starved by fragmentation.
pub fn plan(
    nodes: &[Node],
    vms: &[Vm],
    placements: &[Placement],
    overcommit: Overcommit,
    seed: u64,
) -> Plan {
    plan_with_moves(nodes, vms, placements, &[], overcommit, seed)
}

/// [`plan`], where the VMs of `moving` (current placements of VMs that
/// must leave their node: HA, drain, migration; not in `placements`) are
/// pending too. Such a VM with replica nodes may only go to one of them
/// (its disks are there) and gets no new ones; one without replica nodes
/// goes anywhere that fits, like a VM placed for the first time.
pub fn plan_with_moves(
    nodes: &[Node],
    vms: &[Vm],
    placements: &[Placement],
    moving: &[Placement],
    overcommit: Overcommit,
    seed: u64,
) -> Plan {
    plan_pinned(
        nodes,
        vms,
        placements,
        moving,
        &Pins::new(),
        overcommit,
        seed,
    )
}

/// [`plan_with_moves`], where the VMs named in `pins` that are placed for
/// the first time may only go to their pin's node (a VM that moves keeps
/// its own rules: its disks exist by then).
pub fn plan_pinned(
    nodes: &[Node],
    vms: &[Vm],
    placements: &[Placement],
    moving: &[Placement],
    pins: &Pins,
    overcommit: Overcommit,
    seed: u64,
) -> Plan {
    let by_name: HashMap<&str, &Vm> = vms.iter().map(|vm| (vm.meta.name.as_str(), vm)).collect();
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.meta.name.as_str(), i))
        .collect();
    let mut load = vec![Load::default(); nodes.len()];
    let placed: BTreeSet<&str> = placements.iter().map(|p| p.vm.as_str()).collect();
    for placement in placements {
        if let Some(vm) = by_name.get(placement.vm.as_str()) {
            if let Some(&i) = index.get(placement.node.as_str()) {
                add(&mut load[i], vm);
            }
            add_storage(
                &mut load,
                &index,
                vm,
                &placement.node,
                &placement.replica_nodes,
            );
        }
    }
    // The disks of moving VMs stay where they are.
    for placement in moving {
        if let Some(vm) = by_name.get(placement.vm.as_str()) {
            let (shared, _) = disk_bytes(vm);
            for replica in &placement.replica_nodes {
                if let Some(&i) = index.get(replica.as_str()) {
                    load[i].storage_bytes += shared;
                }
            }
        }
    }
    let holders: HashMap<&str, &[String]> = moving
        .iter()
        .filter(|p| !p.replica_nodes.is_empty())
        .map(|p| (p.vm.as_str(), p.replica_nodes.as_slice()))
        .collect();
    let moves: BTreeSet<&str> = moving.iter().map(|p| p.vm.as_str()).collect();
    let node_keys: Vec<u64> = nodes
        .iter()
        .map(|n| seeded_hash(seed, &n.meta.name))
        .collect();

    let mut pending: Vec<&Vm> = vms
        .iter()
        .filter(|vm| !placed.contains(vm.meta.name.as_str()))
        .collect();
    pending.sort_by(|a, b| {
        (b.spec.memory_mib, b.spec.cpus)
            .cmp(&(a.spec.memory_mib, a.spec.cpus))
            .then_with(|| a.meta.name.cmp(&b.meta.name))
    });

    let facts: Vec<Facts> = nodes.iter().map(|n| Facts::of(n, overcommit)).collect();
    let mut plan = Plan::default();
    for vm in pending {
        let vm_key = seeded_hash(seed, &vm.meta.name);
        let (shared, local_bytes) = disk_bytes(vm);
        let pin = pins
            .get(&vm.meta.name)
            .filter(|_| !moves.contains(vm.meta.name.as_str()));
        if let Some(Pin {
            node: None, why, ..
        }) = pin
        {
            plan.unschedulable.push((vm.meta.name.clone(), why.clone()));
            continue;
        }
        let pinned = pin.and_then(|p| p.node.as_deref());
        // An attached volume's copies are the VM's replica nodes: the VM
        // goes among them as a moving VM goes among its own.
        let pinned_copies = pin
            .map(|p| p.replica_nodes.as_slice())
            .filter(|copies| !copies.is_empty());
        let holders = holders
            .get(vm.meta.name.as_str())
            .copied()
            .or(pinned_copies);
        // Why the pinned node refused the VM, when it did.
        let mut pinned_refusal: Option<&'static str> = None;
        // A first placement of a VM with replicated disks: the nodes that
        // could hold a replica; the VM waits unless there are enough. A
        // VM that moves never gets new replica nodes.
        let wanted = if moves.contains(vm.meta.name.as_str()) || pinned_copies.is_some() {
            0
        } else {
            vm.spec.replicas_wanted()
        };
        let mut replica_refusals: BTreeMap<&'static str, usize> = BTreeMap::new();
        let eligible: Vec<usize> = if wanted > 0 {
            (0..nodes.len())
                .filter(
                    |&i| match can_hold_replica(&nodes[i], &load[i], vm, shared) {
                        Ok(()) => true,
                        Err(reason) => {
                            *replica_refusals.entry(reason).or_default() += 1;
                            false
                        }
                    },
                )
                .collect()
        } else {
            Vec::new()
        };
        if wanted > eligible.len() {
            let mut reason = format!(
                "{wanted} replicas asked, {} node(s) can hold one",
                eligible.len()
            );
            if !replica_refusals.is_empty() {
                reason.push_str(&format!(" (other nodes: {})", summary(&replica_refusals)));
            }
            plan.unschedulable.push((vm.meta.name.clone(), reason));
            continue;
        }
        let mut can_replicate = vec![false; if wanted > 0 { nodes.len() } else { 0 }];
        for &i in &eligible {
            can_replicate[i] = true;
        }
        let mut best: Option<(f64, u64, usize)> = None;
        let mut refusals: BTreeMap<&'static str, usize> = BTreeMap::new();
        for (i, node) in nodes.iter().enumerate() {
            if pinned.is_some_and(|p| p != node.meta.name) {
                continue;
            }
            let local = match holders {
                Some(holders) if !holders.contains(&node.meta.name) => {
                    Err("not holding a replica of its disks")
                }
                // Its copy missed acknowledged writes (the storage fence),
                // or is still filling (a planning view's mark).
                Some(_) if vm.status.is_outdated_on(&node.meta.name) => {
                    Err("holding an outdated or unfinished replica of its disks")
                }
                Some(_) => Ok(()),
                None if wanted > 0 && !can_replicate[i] => Err("unable to hold a replica"),
                // A first placement of a VM without replicated disks:
                // its local disks need room here.
                None if wanted == 0 => fits_storage(node, &load[i], local_bytes),
                None => fits_storage(node, &load[i], local_bytes + shared),
            };
            if let Err(reason) = local.and_then(|()| fits(node, &facts[i], &load[i], vm)) {
                *refusals.entry(reason).or_default() += 1;
                pinned_refusal = Some(reason);
                continue;
            }
            let score = score(&facts[i], &load[i], vm);
            let tie = mix(vm_key ^ node_keys[i]);
            let better = match best {
                None => true,
                Some((s, t, _)) => score > s || (score == s && tie > t),
            };
            if better {
                best = Some((score, tie, i));
            }
        }
        match best {
            Some((_, _, i)) => {
                add(&mut load[i], vm);
                let node = nodes[i].meta.name.clone();
                if wanted > 0 {
                    // The primary, then the other eligible nodes with the
                    // most room in their pools (seeded ties), picked one
                    // by one (a few out of many: no full sort).
                    let rank = |j: usize| {
                        let free = nodes[j]
                            .status
                            .allocatable
                            .storage_bytes
                            .saturating_sub(load[j].storage_bytes);
                        (free, mix(vm_key ^ node_keys[j]))
                    };
                    let mut chosen = vec![i];
                    while chosen.len() < wanted {
                        let Some(next) = eligible
                            .iter()
                            .copied()
                            .filter(|j| !chosen.contains(j))
                            .max_by_key(|&j| rank(j))
                        else {
                            break;
                        };
                        chosen.push(next);
                    }
                    let replicas: Vec<String> =
                        chosen.iter().map(|&j| nodes[j].meta.name.clone()).collect();
                    add_storage(&mut load, &index, vm, &node, &replicas);
                    plan.replica_nodes.insert(vm.meta.name.clone(), replicas);
                } else if let Some(copies) = pinned_copies {
                    add_storage(&mut load, &index, vm, &node, copies);
                    plan.replica_nodes
                        .insert(vm.meta.name.clone(), copies.to_vec());
                } else if holders.is_none() {
                    add_storage(&mut load, &index, vm, &node, &[]);
                }
                plan.placements.push((vm.meta.name.clone(), node));
            }
            None => {
                let reasons = match (pin, pinned_refusal) {
                    (Some(pin), Some(reason)) => {
                        format!("{}, which cannot take it: {reason}", pin.why)
                    }
                    (Some(pin), None) => format!("{}, which is not a known node", pin.why),
                    (None, _) if refusals.is_empty() => "no nodes".to_owned(),
                    (None, _) => summary(&refusals),
                };
                plan.unschedulable.push((vm.meta.name.clone(), reasons));
            }
        }
    }
    plan
}

/// Replacement replica nodes for VMs that lost some (decision 43).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaPlan {
    /// VM name → its placement's new `replica_nodes`: each lost node
    /// replaced in place by a new one (its node stays first), in the
    /// order of the placements given.
    pub replaced: Vec<(String, Vec<String>)>,
    /// VM name → why a lost replica node of it cannot be replaced now.
    pub unschedulable: Vec<(String, String)>,
}

/// Chooses, for every placement in `placements` whose `replica_nodes`
/// hold a node of `lost` other than the placement's own node, a
/// replacement for each such node: distinct from every node already
/// holding a copy and from `lost`, ready, not cordoned, matching the
/// VM's node selector, with room in its pool for the replicated disks,
/// and with a published replication address (so the running primary can
/// reach it at once);
/// the most room left wins, seeded ties. A VM whose own node is lost is
/// left alone (HA moves it first; its old node is replaced after). A
/// lost node with no replacement stays in the list, with the reason.
/// Pure and deterministic for a seed.
pub fn plan_replacements(
    nodes: &[Node],
    vms: &[Vm],
    placements: &[Placement],
    lost: &BTreeSet<String>,
    seed: u64,
) -> ReplicaPlan {
    let by_name: HashMap<&str, &Vm> = vms.iter().map(|vm| (vm.meta.name.as_str(), vm)).collect();
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.meta.name.as_str(), i))
        .collect();
    let mut load = vec![Load::default(); nodes.len()];
    for placement in placements {
        if let Some(vm) = by_name.get(placement.vm.as_str()) {
            add_storage(
                &mut load,
                &index,
                vm,
                &placement.node,
                &placement.replica_nodes,
            );
        }
    }
    let node_keys: Vec<u64> = nodes
        .iter()
        .map(|n| seeded_hash(seed, &n.meta.name))
        .collect();
    let mut plan = ReplicaPlan::default();
    for placement in placements {
        if lost.contains(&placement.node)
            || !placement
                .replica_nodes
                .iter()
                .any(|n| lost.contains(n) && *n != placement.node)
        {
            continue;
        }
        let Some(vm) = by_name.get(placement.vm.as_str()) else {
            continue;
        };
        let (shared, _) = disk_bytes(vm);
        let vm_key = seeded_hash(seed, &vm.meta.name);
        let mut replicas = placement.replica_nodes.clone();
        let mut reasons = Vec::new();
        for slot in 0..replicas.len() {
            if !lost.contains(&replicas[slot]) || replicas[slot] == placement.node {
                continue;
            }
            let mut refusals: BTreeMap<&'static str, usize> = BTreeMap::new();
            let mut best: Option<(u64, u64, usize)> = None;
            for (i, node) in nodes.iter().enumerate() {
                let fit = if lost.contains(&node.meta.name) {
                    Err("lost")
                } else if replicas.contains(&node.meta.name) {
                    Err("holding a copy already")
                } else if node.status.replication_address.is_empty() {
                    Err("without a replication address")
                } else {
                    can_hold_replica(node, &load[i], vm, shared)
                };
                if let Err(reason) = fit {
                    *refusals.entry(reason).or_default() += 1;
                    continue;
                }
                let free = node
                    .status
                    .allocatable
                    .storage_bytes
                    .saturating_sub(load[i].storage_bytes);
                let tie = mix(vm_key ^ node_keys[i]);
                if best.is_none_or(|(f, t, _)| (free, tie) > (f, t)) {
                    best = Some((free, tie, i));
                }
            }
            match best {
                Some((_, _, i)) => {
                    load[i].storage_bytes += shared;
                    replicas[slot] = nodes[i].meta.name.clone();
                }
                None => reasons.push(format!(
                    "no node can take the copy on lost node {} ({})",
                    replicas[slot],
                    summary(&refusals)
                )),
            }
        }
        if replicas != placement.replica_nodes {
            plan.replaced.push((placement.vm.clone(), replicas));
        }
        if !reasons.is_empty() {
            plan.unschedulable
                .push((placement.vm.clone(), reasons.join("; ")));
        }
    }
    plan
}

/// "2 cordoned, 1 not ready".
fn summary(refusals: &BTreeMap<&'static str, usize>) -> String {
    refusals
        .iter()
        .map(|(reason, count)| format!("{count} {reason}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn add(load: &mut Load, vm: &Vm) {
    load.cpus += u64::from(vm.spec.cpus);
    load.memory_mib += vm.spec.memory_mib;
    if let Some(group) = &vm.spec.placement.anti_affinity_group {
        load.groups.insert(group.clone());
    }
}

/// Counts `vm`'s disks on the nodes that hold them: its replicated disks
/// on each of `replicas` (when it has any), the others on `node`.
fn add_storage(
    load: &mut [Load],
    index: &HashMap<&str, usize>,
    vm: &Vm,
    node: &str,
    replicas: &[String],
) {
    let (shared, local) = disk_bytes(vm);
    let (shared, local) = if replicas.is_empty() {
        (0, shared + local)
    } else {
        (shared, local)
    };
    if let Some(&i) = index.get(node) {
        load[i].storage_bytes += local;
    }
    for replica in replicas {
        if let Some(&i) = index.get(replica.as_str()) {
            load[i].storage_bytes += shared;
        }
    }
}

/// Whether `bytes` more of disks fit in `node`'s pool. A node that reports
/// no pool size (0) is not checked.
fn fits_storage(node: &Node, load: &Load, bytes: u64) -> Result<(), &'static str> {
    let pool = node.status.allocatable.storage_bytes;
    if bytes > 0 && pool > 0 && load.storage_bytes + bytes > pool {
        return Err("short of storage");
    }
    Ok(())
}

/// Whether `node` may hold a replica of `vm`'s replicated disks (`bytes`
/// of them): ready, not cordoned, matching the VM's node selector (the VM
/// may have to run there), with room in its pool.
fn can_hold_replica(node: &Node, load: &Load, vm: &Vm, bytes: u64) -> Result<(), &'static str> {
    if node.spec.cordoned {
        return Err("cordoned");
    }
    if !node.status.is_ready() {
        return Err("not ready");
    }
    let labels = &node.meta.labels;
    if !vm
        .spec
        .placement
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
    {
        return Err("not matching the node selector");
    }
    fits_storage(node, load, bytes)
}

fn capacity(amount: u64, ratio: f64) -> u64 {
    // Float to integer: saturates, and the ratio is validated positive.
    (amount as f64 * ratio).floor() as u64
}

/// What the filters need of a node that does not change while planning,
/// worked out once per plan rather than once per VM and node.
#[derive(Debug, Clone, Copy)]
struct Facts {
    /// Why no VM may go there at all (cordoned, not ready), if so.
    closed: Option<&'static str>,
    /// vCPUs that may be promised (allocatable × ratio).
    cpus: u64,
    /// MiB that may be promised (allocatable × ratio).
    memory_mib: u64,
}

impl Facts {
    fn of(node: &Node, overcommit: Overcommit) -> Self {
        let closed = if node.spec.cordoned {
            Some("cordoned")
        } else if !node.status.is_ready() {
            Some("not ready")
        } else {
            None
        };
        let allocatable = &node.status.allocatable;
        Facts {
            closed,
            cpus: capacity(u64::from(allocatable.cpus), overcommit.cpu),
            memory_mib: capacity(allocatable.memory_mib, overcommit.memory),
        }
    }
}

/// Whether `vm` may go to `node`; the error names the filter that failed.
fn fits(node: &Node, facts: &Facts, load: &Load, vm: &Vm) -> Result<(), &'static str> {
    if let Some(reason) = facts.closed {
        return Err(reason);
    }
    let selector = &vm.spec.placement.node_selector;
    if !selector.is_empty() {
        let labels = &node.meta.labels;
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            return Err("not matching the node selector");
        }
    }
    if let Some(group) = &vm.spec.placement.anti_affinity_group
        && load.groups.contains(group)
    {
        return Err("holding a VM of the same anti-affinity group");
    }
    if load.cpus + u64::from(vm.spec.cpus) > facts.cpus {
        return Err("short of CPU");
    }
    if load.memory_mib + vm.spec.memory_mib > facts.memory_mib {
        return Err("short of memory");
    }
    Ok(())
}

/// Higher is better: the share of CPU and memory left free after placing
/// `vm` (spreads VMs; memory counts twice as much as CPU).
fn score(facts: &Facts, load: &Load, vm: &Vm) -> f64 {
    let free = |used: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            1.0 - used as f64 / total as f64
        }
    };
    let cpu = free(load.cpus + u64::from(vm.spec.cpus), facts.cpus);
    let memory = free(load.memory_mib + vm.spec.memory_mib, facts.memory_mib);
    (cpu + 2.0 * memory) / 3.0
}

/// A seeded hash of a name (FNV-1a, stable across builds and platforms).
fn seeded_hash(seed: u64, name: &str) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in name.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    mix(hash)
}

/// splitmix64's finalizer: spreads the bits, so ties break evenly.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What the executor did with a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Executed {
    /// Placements written.
    pub written: usize,
    /// Placements that already existed (another scheduler won the race).
    pub already_placed: usize,
    /// VM name → why its placement could not be written.
    pub failed: Vec<(String, ApiError)>,
}

/// Writes each planned placement (`epoch` 1, named after the VM, with its
/// replica nodes) through the admin API; an existing placement is left
/// alone.
pub async fn execute(api: &impl AdminApi, plan: &Plan) -> Executed {
    let mut executed = Executed::default();
    for (vm, node) in &plan.placements {
        let placement = Placement {
            meta: ObjectMeta::named(vm.clone()),
            vm: vm.clone(),
            node: node.clone(),
            epoch: 1,
            replica_nodes: plan.replica_nodes.get(vm).cloned().unwrap_or_default(),
        };
        match api.create(Object::Placement(placement)).await {
            Ok(_) => executed.written += 1,
            Err(ApiError::AlreadyExists { .. }) => executed.already_placed += 1,
            Err(err) => executed.failed.push((vm.clone(), err)),
        }
    }
    executed
}

#[cfg(test)]
mod tests {
    use basalt_api::{Condition, Resources};

    use super::*;

    fn node(name: &str, cpus: u32, memory_mib: u64) -> Node {
        let mut node = Node {
            meta: ObjectMeta::named(name),
            ..Node::default()
        };
        node.spec.address = "10.0.0.1:7500".into();
        node.status.allocatable = Resources {
            cpus,
            memory_mib,
            storage_bytes: 0,
        };
        node.status.capacity = node.status.allocatable;
        node.status.conditions.push(Condition {
            kind: Condition::READY.into(),
            status: true,
            ..Condition::default()
        });
        node
    }

    fn vm(name: &str, cpus: u32, memory_mib: u64, group: Option<&str>) -> Vm {
        let mut vm = Vm {
            meta: ObjectMeta::named(name),
            ..Vm::default()
        };
        vm.spec.cpus = cpus;
        vm.spec.memory_mib = memory_mib;
        vm.spec.placement.anti_affinity_group = group.map(str::to_owned);
        vm
    }

    #[test]
    fn filters_cordoned_unready_selector_and_anti_affinity() {
        let mut cordoned = node("a", 8, 8192);
        cordoned.spec.cordoned = true;
        let mut unready = node("b", 8, 8192);
        unready.status.conditions.clear();
        let mut ssd = node("c", 8, 8192);
        ssd.meta.labels.insert("disk".into(), "ssd".into());
        let plain = node("d", 8, 8192);
        let nodes = [cordoned, unready, ssd, plain];

        let mut wants_ssd = vm("db", 2, 1024, None);
        wants_ssd
            .spec
            .placement
            .node_selector
            .insert("disk".into(), "ssd".into());
        let vms = [
            wants_ssd,
            vm("web-1", 1, 512, Some("web")),
            vm("web-2", 1, 512, Some("web")),
            vm("web-3", 1, 512, Some("web")),
        ];
        let plan = plan(&nodes, &vms, &[], Overcommit::default(), 7);
        let placed: BTreeMap<_, _> = plan.placements.iter().cloned().collect();
        assert_eq!(placed.get("db").map(String::as_str), Some("c"));
        let web: BTreeSet<_> = ["web-1", "web-2", "web-3"]
            .iter()
            .filter_map(|v| placed.get(*v))
            .collect();
        assert_eq!(web.len(), 2, "two usable nodes, one web VM each: {plan:?}");
        assert_eq!(plan.unschedulable.len(), 1);
        let reason = &plan.unschedulable[0].1;
        assert!(
            reason.contains("1 cordoned")
                && reason.contains("1 not ready")
                && reason.contains("anti-affinity"),
            "{reason}"
        );
    }

    #[test]
    fn overcommit_ratios_bound_what_is_promised() {
        let nodes = [node("a", 2, 1024)];
        let vms: Vec<Vm> = (0..10)
            .map(|i| vm(&format!("v{i}"), 1, 100, None))
            .collect();
        let ratio = Overcommit {
            cpu: 2.0,
            memory: 1.0,
        };
        let plan = plan(&nodes, &vms, &[], ratio, 1);
        assert_eq!(plan.placements.len(), 4, "2 CPUs × 2.0 = 4 vCPUs");
        assert!(
            plan.unschedulable
                .iter()
                .all(|(_, r)| r.contains("short of CPU"))
        );
    }

    /// 1 000 nodes, 10 000 VMs with anti-affinity groups, node selectors,
    /// cordoned nodes and overcommit: every rule is re-checked on the
    /// result, and the same seed gives the same plan.
    #[test]
    fn simulation_of_a_thousand_nodes_and_ten_thousand_vms() {
        let mut nodes = Vec::new();
        for i in 0..1_000u32 {
            let mut n = node(
                &format!("node-{i}"),
                16 + (i % 3) * 16,
                65_536 + u64::from(i % 4) * 32_768,
            );
            n.meta.labels.insert("zone".into(), format!("z{}", i % 4));
            n.spec.cordoned = i % 50 == 0;
            nodes.push(n);
        }
        let mut vms = Vec::new();
        for i in 0..10_000u32 {
            let group = (i % 5 == 0).then(|| format!("g{}", i % 200));
            let mut v = vm(
                &format!("vm-{i}"),
                1 + i % 8,
                1_024 * u64::from(1 + i % 16),
                group.as_deref(),
            );
            if i % 7 == 0 {
                v.spec
                    .placement
                    .node_selector
                    .insert("zone".into(), format!("z{}", i % 4));
            }
            vms.push(v);
        }
        // A few VMs are already placed.
        let existing: Vec<Placement> = (0..100)
            .map(|i| Placement {
                meta: ObjectMeta::named(format!("vm-{i}")),
                vm: format!("vm-{i}"),
                node: format!("node-{}", i * 7 + 1),
                epoch: 1,
                replica_nodes: Vec::new(),
            })
            .collect();
        let overcommit = Overcommit {
            cpu: 2.0,
            memory: 1.0,
        };
        let first = plan(&nodes, &vms, &existing, overcommit, 42);
        assert_eq!(
            first,
            plan(&nodes, &vms, &existing, overcommit, 42),
            "same seed, same plan"
        );
        assert_ne!(
            first.placements,
            plan(&nodes, &vms, &existing, overcommit, 43).placements
        );

        // Re-check every rule on the result.
        let nodes_by_name: HashMap<&str, &Node> =
            nodes.iter().map(|n| (n.meta.name.as_str(), n)).collect();
        let vms_by_name: HashMap<&str, &Vm> =
            vms.iter().map(|v| (v.meta.name.as_str(), v)).collect();
        let mut seen = BTreeSet::new();
        let mut used: HashMap<&str, (u64, u64)> = HashMap::new();
        let mut groups: BTreeSet<(&str, &str)> = BTreeSet::new();
        let all = existing
            .iter()
            .map(|p| (p.vm.as_str(), p.node.as_str()))
            .chain(
                first
                    .placements
                    .iter()
                    .map(|(v, n)| (v.as_str(), n.as_str())),
            );
        let mut violations = Vec::new();
        for (vm_name, node_name) in all {
            let (vm, node) = (vms_by_name[vm_name], nodes_by_name[node_name]);
            if !seen.insert(vm_name) {
                violations.push(format!("{vm_name} placed twice"));
            }
            let entry = used.entry(node_name).or_default();
            entry.0 += u64::from(vm.spec.cpus);
            entry.1 += vm.spec.memory_mib;
            if let Some(group) = &vm.spec.placement.anti_affinity_group
                && !groups.insert((node_name, group.as_str()))
            {
                violations.push(format!("{vm_name}: group {group} twice on {node_name}"));
            }
            if first.placements.iter().any(|(v, _)| v == vm_name) {
                if node.spec.cordoned {
                    violations.push(format!("{vm_name} on cordoned {node_name}"));
                }
                for (k, v) in &vm.spec.placement.node_selector {
                    if node.meta.labels.get(k) != Some(v) {
                        violations.push(format!("{vm_name} on {node_name} breaks its selector"));
                    }
                }
            }
        }
        for (name, (cpus, memory)) in &used {
            let allocatable = &nodes_by_name[name].status.allocatable;
            if *cpus > u64::from(allocatable.cpus) * 2 || *memory > allocatable.memory_mib {
                violations.push(format!("{name} overcommitted: {cpus} vCPUs, {memory} MiB"));
            }
        }
        assert!(
            violations.is_empty(),
            "{} violations, e.g. {:?}",
            violations.len(),
            &violations[..violations.len().min(5)]
        );
        assert_eq!(
            first.placements.len() + first.unschedulable.len() + existing.len(),
            vms.len()
        );
        assert!(
            first.placements.len() > 9_000,
            "only {} placed",
            first.placements.len()
        );
    }

    fn replicated(name: &str, replicas: u32, size_bytes: u64) -> Vm {
        let mut v = vm(name, 1, 256, None);
        v.spec.disks.push(basalt_api::Disk {
            name: "root".into(),
            size_bytes,
            image: None,
            replicas,
            source_volume: None,
            attach: None,
            attached_storage_name: None,
            added_at_epoch: None,
            protocol: Default::default(),
        });
        v
    }

    fn with_pool(mut n: Node, bytes: u64) -> Node {
        n.status.allocatable.storage_bytes = bytes;
        n.status.capacity.storage_bytes = bytes;
        n
    }

    #[test]
    fn a_replicated_vm_gets_distinct_eligible_replica_nodes_its_node_first() {
        let mut cordoned = node("a", 8, 8192);
        cordoned.spec.cordoned = true;
        let mut unready = node("b", 8, 8192);
        unready.status.conditions.clear();
        let full = with_pool(node("c", 8, 8192), 1 << 30);
        let nodes = [
            cordoned,
            unready,
            full,
            with_pool(node("d", 8, 8192), 100 << 30),
            with_pool(node("e", 8, 8192), 100 << 30),
            node("f", 8, 8192),
        ];
        let vms = [replicated("db", 3, 10 << 30), vm("plain", 1, 256, None)];
        let plan = plan(&nodes, &vms, &[], Overcommit::default(), 3);
        assert!(plan.unschedulable.is_empty(), "{plan:?}");
        let placed: BTreeMap<_, _> = plan.placements.iter().cloned().collect();
        let replicas = &plan.replica_nodes["db"];
        assert_eq!(replicas.len(), 3);
        assert_eq!(replicas[0], placed["db"], "its node comes first");
        let set: BTreeSet<&str> = replicas.iter().map(String::as_str).collect();
        assert_eq!(set, BTreeSet::from(["d", "e", "f"]), "{replicas:?}");
        assert!(
            !plan.replica_nodes.contains_key("plain"),
            "no replicated disk, no replica nodes"
        );

        // Same seed, same choice; the planning view plans the same.
        assert_eq!(
            plan,
            super::plan(&nodes, &vms, &[], Overcommit::default(), 3)
        );
        let mut full = vms.clone();
        full[0].spec.nics.push(basalt_api::Nic::default());
        full[0].meta.labels.insert("app".into(), "db".into());
        let views: Vec<Vm> = full.iter().map(planning_view).collect();
        assert!(views[0].spec.nics.is_empty() && views[0].meta.labels.is_empty());
        assert_eq!(
            plan,
            super::plan(&nodes, &views, &[], Overcommit::default(), 3)
        );
    }

    #[test]
    fn too_few_nodes_for_the_replicas_leaves_the_vm_pending_with_the_reason() {
        let mut unready = node("b", 8, 8192);
        unready.status.conditions.clear();
        let nodes = [node("a", 8, 8192), unready];
        let plan = plan(
            &nodes,
            &[replicated("db", 2, 1 << 30)],
            &[],
            Overcommit::default(),
            1,
        );
        assert!(plan.placements.is_empty(), "{plan:?}");
        assert!(plan.replica_nodes.is_empty());
        let (vm, reason) = &plan.unschedulable[0];
        assert_eq!(vm, "db");
        assert!(
            reason.contains("2 replicas asked, 1 node(s) can hold one")
                && reason.contains("1 not ready"),
            "{reason}"
        );
    }

    /// [`plan_pinned`] of `vm` alone, placed for the first time.
    fn first_placement(nodes: &[Node], vm: Vm, pins: &Pins, seed: u64) -> Plan {
        plan_pinned(nodes, &[vm], &[], &[], pins, Overcommit::default(), seed)
    }

    fn pin(node: Option<&str>) -> Pin {
        Pin {
            node: node.map(str::to_owned),
            why: "disk \"root\" is a clone of volume \"golden\"".into(),
            ..Pin::default()
        }
    }

    #[test]
    fn a_vm_pinned_with_copies_takes_them_as_its_replica_nodes() {
        // The roomiest nodes would win; an attached volume's copies hold.
        let nodes = [
            node("a", 64, 65536),
            node("b", 8, 8192),
            node("c", 8, 8192),
            node("d", 64, 65536),
        ];
        let pins = Pins::from([(
            "db".to_owned(),
            Pin {
                node: Some("b".into()),
                why: "disk \"data\" is volume \"scratch\"".into(),
                replica_nodes: vec!["b".into(), "c".into()],
                epoch: 4,
            },
        )]);
        let plan = first_placement(&nodes, replicated("db", 2, 1 << 20), &pins, 7);
        assert_eq!(plan.placements, [("db".to_owned(), "b".to_owned())]);
        assert_eq!(plan.replica_nodes["db"], ["b", "c"]);
        // The pinned node cannot take it: pending, naming it.
        let small = [node("a", 64, 65536), node("b", 1, 64), node("c", 8, 8192)];
        let plan = first_placement(&small, replicated("db", 2, 1 << 20), &pins, 7);
        assert!(plan.placements.is_empty(), "{plan:?}");
        assert!(
            plan.unschedulable[0]
                .1
                .contains("volume \"scratch\", which cannot take it"),
            "{plan:?}"
        );
    }

    #[test]
    fn a_pinned_vm_goes_only_to_its_node_or_nowhere_with_that_node_named() {
        // The roomiest node would win; the pin overrides the score.
        let nodes = [node("a", 2, 1024), node("b", 64, 65536)];
        let pins = Pins::from([("web".to_owned(), pin(Some("a")))]);
        let vms = [vm("web", 1, 512, None), vm("free", 1, 512, None)];
        let plan = plan_pinned(&nodes, &vms, &[], &[], &pins, Overcommit::default(), 1);
        assert!(
            plan.placements
                .contains(&("web".to_owned(), "a".to_owned())),
            "{plan:?}"
        );
        assert!(
            plan.placements
                .contains(&("free".to_owned(), "b".to_owned()))
        );

        // The pinned node is full: pending, and the reason names it.
        let plan = first_placement(&nodes, vm("web", 1, 4096, None), &pins, 1);
        assert!(plan.placements.is_empty(), "{plan:?}");
        let reason = &plan.unschedulable[0].1;
        assert!(
            reason.contains("volume \"golden\"") && reason.contains("cannot take it: "),
            "{reason}"
        );

        // A replicated disk: the pinned node is the primary, the other
        // copies go elsewhere as usual.
        let nodes = [node("a", 8, 8192), node("b", 8, 8192), node("c", 8, 8192)];
        let pins = Pins::from([("db".to_owned(), pin(Some("c")))]);
        let plan = first_placement(&nodes, replicated("db", 2, 1 << 20), &pins, 7);
        assert_eq!(plan.placements, [("db".to_owned(), "c".to_owned())]);
        let copies = &plan.replica_nodes["db"];
        assert_eq!((copies.len(), copies[0].as_str()), (2, "c"), "{copies:?}");

        // The source is on no node yet: the VM waits.
        let pins = Pins::from([("db".to_owned(), pin(None))]);
        let plan = first_placement(&nodes, replicated("db", 2, 1 << 20), &pins, 7);
        assert!(plan.placements.is_empty());
        assert_eq!(plan.unschedulable[0].1, pin(None).why, "{plan:?}");

        // A VM that moves (off c) is not held by the pin of its first
        // placement.
        let pins = Pins::from([("db".to_owned(), pin(Some("c")))]);
        let plan = plan_pinned(
            &nodes[..2],
            &[replicated("db", 2, 1 << 20)],
            &[],
            &[moving("db", "c", &["b", "c"])],
            &pins,
            Overcommit::default(),
            7,
        );
        assert_eq!(plan.placements, [("db".to_owned(), "b".to_owned())]);
    }

    fn moving(vm: &str, node: &str, replicas: &[&str]) -> Placement {
        Placement {
            meta: ObjectMeta::named(vm),
            vm: vm.into(),
            node: node.into(),
            epoch: 4,
            replica_nodes: replicas.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    #[test]
    fn a_moving_vm_goes_only_to_another_replica_node_or_nowhere() {
        let mut lost = node("a", 8, 8192);
        lost.status.conditions.clear();
        // c has far more room, but the disks are on b.
        let nodes = [lost.clone(), node("b", 2, 1024), node("c", 64, 65536)];
        let vms = [replicated("db", 2, 1 << 30)];
        let current = moving("db", "a", &["a", "b"]);
        let plan = plan_with_moves(
            &nodes,
            &vms,
            &[],
            std::slice::from_ref(&current),
            Overcommit::default(),
            9,
        );
        assert_eq!(plan.placements, [("db".to_owned(), "b".to_owned())]);
        assert!(
            plan.replica_nodes.is_empty(),
            "a move keeps its replica nodes"
        );

        // b is lost too: the VM stays unplaced, with the reason, and
        // never goes to c.
        let mut b_lost = node("b", 2, 1024);
        b_lost.status.conditions.clear();
        let nodes = [lost, b_lost, node("c", 64, 65536)];
        let plan = plan_with_moves(
            &nodes,
            &vms,
            &[],
            std::slice::from_ref(&current),
            Overcommit::default(),
            9,
        );
        assert!(plan.placements.is_empty(), "{plan:?}");
        let reason = &plan.unschedulable[0].1;
        assert!(
            reason.contains("1 not holding a replica of its disks")
                && reason.contains("2 not ready"),
            "{reason}"
        );

        // A moving VM without replica nodes goes anywhere that fits.
        let plan = plan_with_moves(
            &nodes,
            &[vm("web", 1, 256, None)],
            &[],
            &[moving("web", "a", &[])],
            Overcommit::default(),
            9,
        );
        assert_eq!(plan.placements, [("web".to_owned(), "c".to_owned())]);
    }

    #[test]
    fn replicas_count_against_every_holders_pool() {
        // Each pool takes 3 GiB; db-1 holds 2 GiB on a and b already.
        let nodes = [
            with_pool(node("a", 8, 8192), 3 << 30),
            with_pool(node("b", 8, 8192), 3 << 30),
            with_pool(node("c", 8, 8192), 3 << 30),
        ];
        let vms = [
            replicated("db-1", 2, 2 << 30),
            replicated("db-2", 2, 2 << 30),
            replicated("db-3", 2, 2 << 30),
        ];
        let existing = [moving("db-1", "a", &["a", "b"])];
        let plan = plan(&nodes, &vms, &existing, Overcommit::default(), 5);
        // Only c has room: one more 2-replica disk cannot be placed.
        assert!(plan.placements.is_empty(), "{plan:?}");
        assert_eq!(plan.unschedulable.len(), 2);
        assert!(
            plan.unschedulable[0].1.contains("2 short of storage"),
            "{plan:?}"
        );
    }

    fn addressed(mut n: Node, pool: u64) -> Node {
        n.status.replication_address = format!("10.0.0.{}:7789", n.meta.name.len());
        with_pool(n, pool)
    }

    fn lost(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_lost_replica_node_is_replaced_by_a_distinct_eligible_node_with_room() {
        let mut gone = addressed(node("b", 8, 8192), 100 << 30);
        gone.status.conditions.clear();
        let mut cordoned = addressed(node("c", 8, 8192), 100 << 30);
        cordoned.spec.cordoned = true;
        let mut unready = addressed(node("u", 8, 8192), 100 << 30);
        unready.status.conditions.clear();
        let nodes = [
            addressed(node("a", 8, 8192), 100 << 30),
            gone,
            cordoned,
            with_pool(node("d", 8, 8192), 100 << 30),
            addressed(node("e", 8, 8192), 5 << 30),
            addressed(node("f", 8, 8192), 80 << 30),
            addressed(node("g", 8, 8192), 50 << 30),
            unready,
        ];
        let vms = [
            replicated("db", 2, 10 << 30),
            replicated("web", 2, 1 << 30),
            replicated("moved", 2, 1 << 30),
        ];
        let placements = [
            moving("db", "a", &["a", "b"]),
            moving("web", "a", &["a", "g"]),
            // Its own node is lost: HA moves it first.
            moving("moved", "b", &["b", "a"]),
        ];
        let plan = plan_replacements(&nodes, &vms, &placements, &lost(&["b"]), 7);
        // c cordoned, d no address, e too small, u not ready, a holds a
        // copy: f and g remain, f has more room.
        assert_eq!(
            plan.replaced,
            [("db".to_owned(), vec!["a".to_owned(), "f".to_owned()])],
            "{plan:?}"
        );
        assert!(plan.unschedulable.is_empty(), "{plan:?}");
        assert_eq!(
            plan,
            plan_replacements(&nodes, &vms, &placements, &lost(&["b"]), 7),
            "same seed, same plan"
        );

        // f and g gone too: nothing can take the copy; b stays, with the
        // reason.
        let few = [
            nodes[0].clone(),
            nodes[1].clone(),
            nodes[2].clone(),
            nodes[3].clone(),
        ];
        let plan = plan_replacements(&few, &vms, &placements[..1], &lost(&["b"]), 7);
        assert!(plan.replaced.is_empty(), "{plan:?}");
        let (vm, reason) = &plan.unschedulable[0];
        assert_eq!(vm, "db");
        assert!(
            reason.contains("lost node b")
                && reason.contains("1 cordoned")
                && reason.contains("1 without a replication address")
                && reason.contains("1 holding a copy already"),
            "{reason}"
        );
    }

    #[test]
    fn each_lost_copy_gets_its_own_node_and_the_rest_say_why() {
        let mut nodes: Vec<Node> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| addressed(node(n, 8, 8192), 100 << 30))
            .collect();
        for n in &mut nodes[1..3] {
            n.status.conditions.clear();
        }
        let vms = [replicated("db", 3, 1 << 30)];
        let placements = [moving("db", "a", &["a", "b", "c"])];
        let plan = plan_replacements(&nodes, &vms, &placements, &lost(&["b", "c"]), 1);
        // Only d can take one: it takes the first lost slot, c stays.
        assert_eq!(
            plan.replaced,
            [(
                "db".to_owned(),
                vec!["a".to_owned(), "d".to_owned(), "c".to_owned()]
            )]
        );
        assert!(plan.unschedulable[0].1.contains("lost node c"), "{plan:?}");
        // The copies count against the pools: d with room for one disk
        // only is not chosen twice over two VMs.
        let mut small = nodes.clone();
        small[3] = addressed(node("d", 8, 8192), 1 << 30);
        let vms = [replicated("x", 2, 1 << 30), replicated("y", 2, 1 << 30)];
        let placements = [moving("x", "a", &["a", "b"]), moving("y", "a", &["a", "c"])];
        let plan = plan_replacements(&small, &vms, &placements, &lost(&["b", "c"]), 1);
        assert_eq!(plan.replaced.len(), 1, "{plan:?}");
        assert!(
            plan.unschedulable[0].1.contains("1 short of storage"),
            "{plan:?}"
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Nodes: (ready, cordoned, pool GiB or 0 for unreported).
        fn nodes() -> impl Strategy<Value = Vec<(bool, bool, u64)>> {
            prop::collection::vec(
                (
                    prop::bool::weighted(0.8),
                    prop::bool::weighted(0.15),
                    0u64..40,
                ),
                1..8,
            )
        }

        /// A VM: (replicas, disk GiB, already placed on node i with a
        /// replica set that must move).
        type VmCase = (u32, u64, Option<(usize, usize)>);

        /// VMs.
        fn vms() -> impl Strategy<Value = Vec<VmCase>> {
            prop::collection::vec(
                (
                    0u32..4,
                    1u64..8,
                    prop::option::weighted(0.3, (0usize..8, 1usize..8)),
                ),
                0..12,
            )
        }

        proptest! {
            /// Whatever the nodes and VMs: a planned replicated VM has
            /// exactly the replicas asked, on distinct ready uncordoned
            /// nodes, its node among them; a moving VM with replica nodes
            /// lands only on one of them and gets no new ones; every VM is
            /// either placed once or unschedulable with a reason.
            #[test]
            fn replica_choice_and_moves_keep_the_rules(
                spec_nodes in nodes(),
                spec_vms in vms(),
                seed in any::<u64>(),
            ) {
                let nodes: Vec<Node> = spec_nodes
                    .iter()
                    .enumerate()
                    .map(|(i, &(ready, cordoned, gib))| {
                        let mut n = with_pool(node(&format!("n{i}"), 16, 16_384), gib << 30);
                        n.spec.cordoned = cordoned;
                        if !ready {
                            n.status.conditions.clear();
                        }
                        n
                    })
                    .collect();
                let mut vms = Vec::new();
                let mut moves = Vec::new();
                for (i, &(replicas, gib, placed)) in spec_vms.iter().enumerate() {
                    let name = format!("vm-{i}");
                    vms.push(replicated(&name, replicas, gib << 30));
                    if let Some((from, second)) = placed {
                        let from = from % nodes.len();
                        let second = (from + second) % nodes.len();
                        let mut holders = vec![format!("n{from}")];
                        if second != from && replicas >= 2 {
                            holders.push(format!("n{second}"));
                        }
                        if replicas < 2 {
                            holders.clear();
                        }
                        moves.push(moving(&name, &format!("n{from}"), &holders.iter().map(String::as_str).collect::<Vec<_>>()));
                    }
                }
                let plan = plan_with_moves(&nodes, &vms, &[], &moves, Overcommit::default(), seed);
                let by_name: HashMap<&str, &Node> =
                    nodes.iter().map(|n| (n.meta.name.as_str(), n)).collect();
                let mut seen = BTreeSet::new();
                for (vm, target) in &plan.placements {
                    prop_assert!(seen.insert(vm.clone()), "{vm} placed twice");
                    let node = by_name[target.as_str()];
                    prop_assert!(node.status.is_ready() && !node.spec.cordoned);
                    let spec = vms.iter().find(|v| &v.meta.name == vm).unwrap();
                    match moves.iter().find(|p| &p.vm == vm) {
                        Some(current) => {
                            if !current.replica_nodes.is_empty() {
                                prop_assert!(current.holds_replica(target), "{vm} left its replicas for {target}");
                            }
                            prop_assert!(!plan.replica_nodes.contains_key(vm));
                        }
                        None => {
                            let wanted = spec.spec.replicas_wanted();
                            match plan.replica_nodes.get(vm) {
                                None => prop_assert_eq!(wanted, 0),
                                Some(replicas) => {
                                    prop_assert_eq!(replicas.len(), wanted);
                                    prop_assert_eq!(&replicas[0], target);
                                    let distinct: BTreeSet<&String> = replicas.iter().collect();
                                    prop_assert_eq!(distinct.len(), replicas.len());
                                    for r in replicas {
                                        let n = by_name[r.as_str()];
                                        prop_assert!(n.status.is_ready() && !n.spec.cordoned);
                                    }
                                }
                            }
                        }
                    }
                }
                for (vm, reason) in &plan.unschedulable {
                    prop_assert!(seen.insert(vm.clone()), "{vm} both placed and unschedulable");
                    prop_assert!(!reason.is_empty());
                }
                prop_assert_eq!(seen.len(), vms.len());
            }

            /// Whatever is lost: a replacement keeps the list's length and
            /// its first node, changes only lost slots other than the VM's
            /// own node, and puts there distinct ready, uncordoned nodes
            /// with an address that held no copy and are not lost.
            #[test]
            fn replacements_keep_the_rules(
                spec_nodes in nodes(),
                holders in prop::collection::vec(prop::collection::vec(0usize..8, 1..4), 0..10),
                lost_nodes in prop::collection::vec(0usize..8, 0..4),
                seed in any::<u64>(),
            ) {
                let nodes: Vec<Node> = spec_nodes
                    .iter()
                    .enumerate()
                    .map(|(i, &(ready, cordoned, gib))| {
                        let mut n = addressed(node(&format!("n{i}"), 16, 16_384), gib << 30);
                        n.spec.cordoned = cordoned;
                        if !ready {
                            n.status.conditions.clear();
                        }
                        n
                    })
                    .collect();
                let lost: BTreeSet<String> = lost_nodes
                    .iter()
                    .map(|i| format!("n{}", i % nodes.len()))
                    .collect();
                let mut vms = Vec::new();
                let mut placements = Vec::new();
                for (i, on) in holders.iter().enumerate() {
                    let mut replicas: Vec<String> = Vec::new();
                    for j in on {
                        let name = format!("n{}", j % nodes.len());
                        if !replicas.contains(&name) {
                            replicas.push(name);
                        }
                    }
                    let name = format!("vm-{i}");
                    vms.push(replicated(&name, replicas.len().max(2) as u32, 1 << 30));
                    let refs: Vec<&str> = replicas.iter().map(String::as_str).collect();
                    placements.push(moving(&name, &replicas[0], &refs));
                }
                let plan = plan_replacements(&nodes, &vms, &placements, &lost, seed);
                let by_name: HashMap<&str, &Node> =
                    nodes.iter().map(|n| (n.meta.name.as_str(), n)).collect();
                for (vm, replicas) in &plan.replaced {
                    let before = &placements.iter().find(|p| &p.vm == vm).unwrap().replica_nodes;
                    prop_assert_eq!(replicas.len(), before.len());
                    prop_assert_eq!(&replicas[0], &before[0]);
                    prop_assert!(!lost.contains(&before[0]), "{vm}: its own node is lost");
                    let distinct: BTreeSet<&String> = replicas.iter().collect();
                    prop_assert_eq!(distinct.len(), replicas.len());
                    for (old, new) in before.iter().zip(replicas) {
                        if old != new {
                            prop_assert!(lost.contains(old), "{vm}: {old} was not lost");
                            prop_assert!(!before.contains(new), "{vm}: {new} held a copy");
                            prop_assert!(!lost.contains(new));
                            let n = by_name[new.as_str()];
                            prop_assert!(n.status.is_ready() && !n.spec.cordoned);
                            prop_assert!(!n.status.replication_address.is_empty());
                        }
                    }
                }
            }
        }
    }
}
