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
    /// VM name → why no node fits.
    pub unschedulable: Vec<(String, String)>,
}

/// What a node has promised so far while planning.
#[derive(Debug, Clone, Default)]
struct Load {
    cpus: u64,
    memory_mib: u64,
    groups: BTreeSet<String>,
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
    let by_name: HashMap<&str, &Vm> = vms.iter().map(|vm| (vm.meta.name.as_str(), vm)).collect();
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.meta.name.as_str(), i))
        .collect();
    let mut load = vec![Load::default(); nodes.len()];
    let placed: BTreeSet<&str> = placements.iter().map(|p| p.vm.as_str()).collect();
    for placement in placements {
        if let (Some(vm), Some(&i)) = (
            by_name.get(placement.vm.as_str()),
            index.get(placement.node.as_str()),
        ) {
            add(&mut load[i], vm);
        }
    }
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

    let mut plan = Plan::default();
    for vm in pending {
        let vm_key = seeded_hash(seed, &vm.meta.name);
        let mut best: Option<(f64, u64, usize)> = None;
        let mut refusals: BTreeMap<&'static str, usize> = BTreeMap::new();
        for (i, node) in nodes.iter().enumerate() {
            if let Err(reason) = fits(node, &load[i], vm, overcommit) {
                *refusals.entry(reason).or_default() += 1;
                continue;
            }
            let score = score(node, &load[i], vm, overcommit);
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
                plan.placements
                    .push((vm.meta.name.clone(), nodes[i].meta.name.clone()));
            }
            None => {
                let reasons = if refusals.is_empty() {
                    "no nodes".to_owned()
                } else {
                    refusals
                        .iter()
                        .map(|(reason, count)| format!("{count} {reason}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                plan.unschedulable.push((vm.meta.name.clone(), reasons));
            }
        }
    }
    plan
}

fn add(load: &mut Load, vm: &Vm) {
    load.cpus += u64::from(vm.spec.cpus);
    load.memory_mib += vm.spec.memory_mib;
    if let Some(group) = &vm.spec.placement.anti_affinity_group {
        load.groups.insert(group.clone());
    }
}

fn capacity(amount: u64, ratio: f64) -> u64 {
    // Float to integer: saturates, and the ratio is validated positive.
    (amount as f64 * ratio).floor() as u64
}

/// Whether `vm` may go to `node`; the error names the filter that failed.
fn fits(node: &Node, load: &Load, vm: &Vm, overcommit: Overcommit) -> Result<(), &'static str> {
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
    if let Some(group) = &vm.spec.placement.anti_affinity_group
        && load.groups.contains(group)
    {
        return Err("holding a VM of the same anti-affinity group");
    }
    let allocatable = &node.status.allocatable;
    if load.cpus + u64::from(vm.spec.cpus) > capacity(u64::from(allocatable.cpus), overcommit.cpu) {
        return Err("short of CPU");
    }
    if load.memory_mib + vm.spec.memory_mib > capacity(allocatable.memory_mib, overcommit.memory) {
        return Err("short of memory");
    }
    Ok(())
}

/// Higher is better: the share of CPU and memory left free after placing
/// `vm` (spreads VMs; memory counts twice as much as CPU).
fn score(node: &Node, load: &Load, vm: &Vm, overcommit: Overcommit) -> f64 {
    let free = |used: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            1.0 - used as f64 / total as f64
        }
    };
    let allocatable = &node.status.allocatable;
    let cpu = free(
        load.cpus + u64::from(vm.spec.cpus),
        capacity(u64::from(allocatable.cpus), overcommit.cpu),
    );
    let memory = free(
        load.memory_mib + vm.spec.memory_mib,
        capacity(allocatable.memory_mib, overcommit.memory),
    );
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

/// Writes each planned placement (`epoch` 1, named after the VM) through
/// the admin API; an existing placement is left alone.
pub async fn execute(api: &impl AdminApi, plan: &Plan) -> Executed {
    let mut executed = Executed::default();
    for (vm, node) in &plan.placements {
        let placement = Placement {
            meta: ObjectMeta::named(vm.clone()),
            vm: vm.clone(),
            node: node.clone(),
            epoch: 1,
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
}
