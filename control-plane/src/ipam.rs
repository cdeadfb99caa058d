//! The IPAM controller: a lease per VM NIC, kept as an [`Endpoint`]
//! object named after the address, on the pure `basalt-ipam` pools.
//!
//! Each round rebuilds the pools from the stored networks and endpoints
//! (the state is the only truth), plans with [`plan`] — pure, no I/O —
//! and writes the plan by compare-and-swap on the leader.
//!
//! Invariants:
//! - an address is leased to at most one NIC: endpoints are named after
//!   their address, and a create of a taken name fails;
//! - a lease belongs to the VM (uid + NIC index), not to a node: when the
//!   VM moves, only the endpoint's `node` and `epoch` change (they follow
//!   the placement), never its address;
//! - during a live migration the target's agent moves the endpoint ahead
//!   of the placement, on activation (to the target, at the migration's
//!   epoch + 1): an endpoint exactly there is left alone while the
//!   migration is under way and the placement is still the source's at the
//!   migration's epoch; once the migration fails it follows the placement
//!   back to the source;
//! - a static address request is honoured or reported, never replaced by
//!   another address;
//! - a released address (VM deleted, NIC removed or moved to another
//!   network) is held for the grace period — its endpoint stays, with no
//!   node — before it is deleted and may be leased again.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use basalt_api::{Endpoint, Kind, NicAddress, Object, ObjectMeta, Vm};
use basalt_ipam::{Cidr, Owner, Pool, Registry};

use crate::admin::AdminService;
use crate::agent::now_unix_ms;
use crate::config::IpamTuning;
use crate::state::{Command, State};

/// What one round decided: the writes, and the NICs that cannot get an
/// address (key → message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpamPlan {
    /// Creates, updates and deletes, in order.
    pub writes: Vec<Command>,
    /// `vm/nic` → why it has no address.
    pub problems: BTreeMap<String, String>,
}

/// The MAC of NIC `nic` of the VM with uid `vm_uid` when its spec names
/// none: [`basalt_api::Nic::default_mac`], the very MAC the node agent
/// gives the domain's NIC, so the endpoint says what the guest sends.
pub fn generated_mac(vm_uid: &str, nic: u32) -> String {
    let m = basalt_api::Nic::default_mac(vm_uid, nic as usize);
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// The policy identity of a label set: 0 for none, else a stable nonzero
/// hash (FNV-1a over the sorted `key=value` pairs).
pub fn identity(labels: &BTreeMap<String, String>) -> u32 {
    if labels.is_empty() {
        return 0;
    }
    let mut hash: u32 = 0x811c_9dc5;
    for (key, value) in labels {
        for byte in key.bytes().chain([b'=']).chain(value.bytes()).chain([0]) {
            hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
    }
    hash.max(1)
}

fn endpoints(state: &State) -> impl Iterator<Item = &Endpoint> {
    state.list(Kind::Endpoint).filter_map(|o| match o {
        Object::Endpoint(e) => Some(e),
        _ => None,
    })
}

/// VM name → (target, epoch + 1) of each live migration under way whose
/// placement is still the source's at the migration's epoch: where the
/// target's agent may have moved the VM's endpoints on activation.
fn taken_over<'a>(
    state: &'a State,
    placements: &HashMap<&str, (&str, u64)>,
) -> HashMap<&'a str, (&'a str, u64)> {
    use basalt_api::MigrationPhase::{Migrating, Switching, TargetReady};
    state
        .list(Kind::Migration)
        .filter_map(|o| match o {
            Object::Migration(m) => Some(m),
            _ => None,
        })
        .filter(|m| matches!(m.status.phase, TargetReady | Migrating | Switching))
        .filter(|m| {
            placements.get(m.spec.vm.as_str()) == Some(&(m.status.source.as_str(), m.status.epoch))
        })
        .map(|m| {
            (
                m.spec.vm.as_str(),
                (m.status.target.as_str(), m.status.epoch + 1),
            )
        })
        .collect()
}

/// Plans one round at `now_unix_ms`; released addresses are held for
/// `grace_ms`.
pub fn plan(state: &State, now_unix_ms: u64, grace_ms: u64) -> IpamPlan {
    let mut plan = IpamPlan::default();
    let mut registry = Registry::new();
    for object in state.list(Kind::Network) {
        let Object::Network(network) = object else {
            continue;
        };
        let pool = network
            .spec
            .parse_cidr()
            .ok()
            .and_then(|(ip, prefix)| Cidr::new(ip, prefix).ok())
            .map(|cidr| Pool::new(cidr, None, grace_ms));
        if let Some(pool) = pool
            && let Err(err) = registry.add(network.meta.name.clone(), pool)
        {
            plan.problems
                .insert(format!("network/{}", network.meta.name), err.to_string());
        }
    }

    // What is leased now: active leases by owner; released ones hold their
    // address under a key of their own, so the owner may lease anew.
    let mut active: HashMap<(String, u32), &Endpoint> = HashMap::new();
    for endpoint in endpoints(state) {
        let Some(ip) = endpoint.ip else { continue };
        let released = endpoint.release_at_unix_ms != 0;
        let owner = if released {
            Owner::new(format!("released:{}", endpoint.meta.name), 0)
        } else {
            Owner::new(endpoint.vm_uid.clone(), endpoint.nic)
        };
        if let Ok(pool) = registry.get_mut(&endpoint.network) {
            let _ = pool.allocate(owner, Some(ip), now_unix_ms);
        }
        if released {
            if endpoint.release_at_unix_ms <= now_unix_ms {
                plan.writes.push(Command::Delete {
                    kind: Kind::Endpoint,
                    name: endpoint.meta.name.clone(),
                    expected_resource_version: Some(endpoint.meta.resource_version),
                    force: false,
                });
            }
        } else {
            active.insert((endpoint.vm_uid.clone(), endpoint.nic), endpoint);
        }
    }

    let placements: HashMap<&str, (&str, u64)> = state
        .list(Kind::Placement)
        .filter_map(|o| match o {
            Object::Placement(p) => Some((p.vm.as_str(), (p.node.as_str(), p.epoch))),
            _ => None,
        })
        .collect();
    let release = |endpoint: &Endpoint| {
        let mut released = endpoint.clone();
        released.release_at_unix_ms = now_unix_ms.saturating_add(grace_ms).max(1);
        released.node.clear();
        Command::Update(Object::Endpoint(released))
    };

    let taken_over = taken_over(state, &placements);

    let mut wanted: HashMap<(String, u32), ()> = HashMap::new();
    for object in state.list(Kind::Vm) {
        let Object::Vm(vm) = object else { continue };
        let (node, epoch) = placements
            .get(vm.meta.name.as_str())
            .copied()
            .unwrap_or(("", 0));
        let ahead = taken_over.get(vm.meta.name.as_str()).copied();
        for (index, nic) in vm.spec.nics.iter().enumerate() {
            let Ok(index) = u32::try_from(index) else {
                break;
            };
            let key = format!("{}/{index}", vm.meta.name);
            let owner_key = (vm.meta.uid.clone(), index);
            wanted.insert(owner_key.clone(), ());
            let requested = match nic.ip {
                None => None,
                Some(IpAddr::V4(ip)) => Some(ip),
                Some(IpAddr::V6(ip)) => {
                    plan.problems
                        .insert(key, format!("{ip} is IPv6; networks are IPv4"));
                    continue;
                }
            };
            let mac = nic
                .mac
                .clone()
                .map(|m| m.to_ascii_lowercase())
                .unwrap_or_else(|| generated_mac(&vm.meta.uid, index));
            let identity = identity(&vm.meta.labels);
            if let Some(current) = active.get(&owner_key) {
                let fits = current.network == nic.network
                    && requested.is_none_or(|r| current.ip == Some(r));
                if fits {
                    // Taken over by the migration's target: it stays there.
                    let (node, epoch) = match ahead {
                        Some((to, next)) if current.node == to && current.epoch == next => {
                            (to, next)
                        }
                        _ => (node, epoch),
                    };
                    let follows = current.node == node
                        && current.epoch == epoch
                        && current.mac == mac
                        && current.identity == identity
                        && current.vm == vm.meta.name;
                    if !follows {
                        let mut moved = (*current).clone();
                        moved.node = node.to_owned();
                        moved.epoch = epoch;
                        moved.mac = mac;
                        moved.identity = identity;
                        moved.vm = vm.meta.name.clone();
                        plan.writes.push(Command::Update(Object::Endpoint(moved)));
                    }
                    continue;
                }
                // Another network or another static address: release this
                // one (held for the grace period) and lease anew below.
                plan.writes.push(release(current));
                if let Ok(pool) = registry.get_mut(&current.network) {
                    pool.release(&Owner::new(vm.meta.uid.clone(), index), now_unix_ms);
                }
            }
            let Ok(pool) = registry.get_mut(&nic.network) else {
                plan.problems
                    .insert(key, format!("network {:?} does not exist", nic.network));
                continue;
            };
            let owner = Owner::new(vm.meta.uid.clone(), index);
            if active
                .get(&owner_key)
                .is_some_and(|current| current.network == nic.network)
            {
                // Same pool: the owner's old address must be forgotten
                // first; it is released above and leased anew next round.
                continue;
            }
            match pool.allocate(owner, requested, now_unix_ms) {
                Ok(ip) => plan.writes.push(Command::Create(Object::Endpoint(Endpoint {
                    meta: ObjectMeta::named(Endpoint::name_for(ip)),
                    network: nic.network.clone(),
                    ip: Some(ip),
                    mac,
                    vm: vm.meta.name.clone(),
                    vm_uid: vm.meta.uid.clone(),
                    nic: index,
                    node: node.to_owned(),
                    epoch,
                    identity,
                    release_at_unix_ms: 0,
                }))),
                Err(err) => {
                    plan.problems.insert(key, err.to_string());
                }
            }
        }
    }
    for ((uid, nic), endpoint) in &active {
        if !wanted.contains_key(&(uid.clone(), *nic)) {
            plan.writes.push(release(endpoint));
        }
    }

    // The VM's status shows the addresses its NICs hold now.
    let by_owner: HashMap<(&str, u32), &Endpoint> = active
        .values()
        .map(|e| ((e.vm_uid.as_str(), e.nic), *e))
        .collect();
    for object in state.list(Kind::Vm) {
        let Object::Vm(vm) = object else { continue };
        let addresses = nic_addresses(vm, &by_owner);
        if vm.status.nic_addresses != addresses {
            let mut updated = vm.clone();
            updated.status.nic_addresses = addresses;
            plan.writes.push(Command::Update(Object::Vm(updated)));
        }
    }
    plan
}

fn nic_addresses(vm: &Vm, by_owner: &HashMap<(&str, u32), &Endpoint>) -> Vec<NicAddress> {
    (0..vm.spec.nics.len())
        .filter_map(|i| u32::try_from(i).ok())
        .map(|index| {
            let endpoint = by_owner.get(&(vm.meta.uid.as_str(), index));
            NicAddress {
                index,
                mac: endpoint.map(|e| e.mac.clone()).unwrap_or_else(|| {
                    vm.spec.nics[index as usize]
                        .mac
                        .clone()
                        .map(|m| m.to_ascii_lowercase())
                        .unwrap_or_else(|| generated_mac(&vm.meta.uid, index))
                }),
                ip: endpoint.and_then(|e| e.ip).map(IpAddr::V4),
            }
        })
        .collect()
}

/// The IPAM controller of one member; it acts only while it leads.
#[derive(Debug)]
pub struct IpamController {
    grace_ms: u64,
    /// `vm/nic` → the problem last logged.
    reported: BTreeMap<String, String>,
}

impl IpamController {
    /// A controller with `tuning`.
    pub fn new(tuning: &IpamTuning) -> Self {
        Self {
            grace_ms: tuning.release_grace_ms,
            reported: BTreeMap::new(),
        }
    }

    /// One round on the leader: plans and writes.
    pub async fn round(&mut self, admin: &AdminService) {
        let plan = {
            let machine = admin.shared().read();
            plan(&machine.state, now_unix_ms(), self.grace_ms)
        };
        for command in plan.writes {
            let what = describe(&command);
            match admin.write(command).await {
                Ok(_) => tracing::debug!(%what, "ipam"),
                Err(err) => tracing::info!(%what, error = %err, "ipam write failed; will retry"),
            }
        }
        for (key, problem) in &plan.problems {
            if self.reported.get(key) != Some(problem) {
                tracing::warn!(nic = %key, %problem, "no address for a VM NIC");
            }
        }
        self.reported = plan.problems;
    }
}

fn describe(command: &Command) -> String {
    match command {
        Command::Create(o) | Command::Update(o) => format!("{}/{}", o.kind(), o.name()),
        Command::Delete { kind, name, .. } => format!("delete {kind}/{name}"),
        Command::Register(r) => format!("register {}", r.node),
        Command::Batch(commands) => format!("batch of {}", commands.len()),
        Command::Many(commands) => format!("{} independent commands", commands.len()),
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{Network, NetworkSpec, Nic, Node, Placement};

    use std::net::Ipv4Addr;

    use super::*;

    const GRACE: u64 = 60_000;

    /// An address inside `cidr` is what the pools hand out (for tests).
    fn inside(cidr: &str, ip: Ipv4Addr) -> bool {
        let (net, prefix) = cidr.split_once('/').unwrap();
        Cidr::new(net.parse().unwrap(), prefix.parse().unwrap())
            .unwrap()
            .contains(ip)
    }

    /// Applies a round's writes like the leader would; returns the problems.
    fn round(state: &mut State, index: &mut u64, now: u64) -> BTreeMap<String, String> {
        let plan = plan(state, now, GRACE);
        for command in plan.writes {
            *index += 1;
            let _ = state.apply(*index, command);
        }
        plan.problems
    }

    fn create(state: &mut State, index: &mut u64, object: Object) {
        *index += 1;
        state.apply(*index, Command::Create(object)).unwrap();
    }

    fn vm(name: &str, uid: &str, nics: Vec<Nic>) -> Object {
        let mut vm = Vm {
            meta: ObjectMeta::named(name),
            ..Vm::default()
        };
        vm.meta.uid = uid.into();
        vm.spec.cpus = 1;
        vm.spec.memory_mib = 64;
        vm.spec.nics = nics;
        Object::Vm(vm)
    }

    fn nic(network: &str, ip: Option<Ipv4Addr>) -> Nic {
        Nic {
            network: network.into(),
            mac: None,
            ip: ip.map(IpAddr::V4),
        }
    }

    fn endpoint_of(state: &State, uid: &str, nic: u32) -> Option<Endpoint> {
        endpoints(state)
            .find(|e| e.vm_uid == uid && e.nic == nic && e.release_at_unix_ms == 0)
            .cloned()
    }

    #[test]
    fn leases_follow_the_vm_and_outlive_it_by_the_grace_period() {
        let (mut state, mut index) = (State::default(), 0);
        create(
            &mut state,
            &mut index,
            Object::Network(Network {
                meta: ObjectMeta::named("blue"),
                spec: NetworkSpec {
                    cidr: "10.9.0.0/29".into(),
                    vni: 9,
                    routing: None,
                },
            }),
        );
        for name in ["n1", "n2"] {
            let mut node = Node {
                meta: ObjectMeta::named(name),
                ..Node::default()
            };
            node.spec.address = "10.0.0.1:1".into();
            create(&mut state, &mut index, Object::Node(node));
        }
        let fixed = Ipv4Addr::new(10, 9, 0, 5);
        create(
            &mut state,
            &mut index,
            vm("a", "ua", vec![nic("blue", Some(fixed))]),
        );
        create(
            &mut state,
            &mut index,
            vm("b", "ub", vec![nic("blue", None), nic("red", None)]),
        );
        create(
            &mut state,
            &mut index,
            Object::Placement(Placement {
                meta: ObjectMeta::named("a"),
                vm: "a".into(),
                node: "n1".into(),
                epoch: 1,
                ..Placement::default()
            }),
        );
        let problems = round(&mut state, &mut index, 1_000);
        let a = endpoint_of(&state, "ua", 0).expect("a's lease");
        assert_eq!(a.ip, Some(fixed), "the static request is honoured");
        assert_eq!(a.meta.name, "10-9-0-5");
        assert_eq!((a.node.as_str(), a.epoch), ("n1", 1));
        assert_eq!(a.mac, generated_mac("ua", 0));
        // The domain's NIC MAC (the agent derives it from the same uid).
        let m = basalt_api::Nic::default_mac("ua", 0);
        assert_eq!(a.mac[..8], *"52:54:00");
        assert_eq!(
            a.mac,
            m.map(|b| format!("{b:02x}")).join(":"),
            "one MAC for the endpoint and the domain"
        );
        let b = endpoint_of(&state, "ub", 0).expect("b's lease");
        assert!(inside("10.9.0.0/29", b.ip.unwrap()) && b.ip != Some(fixed));
        assert!(problems["b/1"].contains("red"), "{problems:?}");
        // The next round writes the addresses into the VMs' status, then
        // nothing changes.
        round(&mut state, &mut index, 1_100);
        let Some(Object::Vm(vm_a)) = state.get(Kind::Vm, "a") else {
            panic!()
        };
        assert_eq!(vm_a.status.nic_addresses[0].ip, Some(IpAddr::V4(fixed)));
        assert_eq!(vm_a.meta.generation, 1, "status only");
        assert!(plan(&state, 1_200, GRACE).writes.is_empty());

        // The VM moves: same address, the endpoint follows with the epoch.
        let Some(Object::Placement(mut placement)) = state.get(Kind::Placement, "a").cloned()
        else {
            panic!()
        };
        placement.node = "n2".into();
        placement.epoch = 2;
        index += 1;
        state
            .apply(index, Command::Update(Object::Placement(placement)))
            .unwrap();
        round(&mut state, &mut index, 2_000);
        let moved = endpoint_of(&state, "ua", 0).unwrap();
        assert_eq!(
            (moved.ip, moved.node.as_str(), moved.epoch),
            (Some(fixed), "n2", 2)
        );

        // The pool (/29: six addresses) runs out with a clear message.
        for i in 0..5 {
            create(
                &mut state,
                &mut index,
                vm(&format!("x{i}"), &format!("ux{i}"), vec![nic("blue", None)]),
            );
        }
        let problems = round(&mut state, &mut index, 3_000);
        assert_eq!(endpoints(&state).count(), 6);
        let exhausted: Vec<_> = problems
            .values()
            .filter(|p| p.contains("exhausted"))
            .collect();
        assert_eq!(exhausted.len(), 1, "{problems:?}");

        // Deleting a VM releases its address, held for the grace period.
        index += 1;
        state
            .apply(
                index,
                Command::Delete {
                    kind: Kind::Vm,
                    name: "a".into(),
                    expected_resource_version: None,
                    force: false,
                },
            )
            .unwrap();
        round(&mut state, &mut index, 4_000);
        let Some(Object::Endpoint(held)) = state.get(Kind::Endpoint, "10-9-0-5") else {
            panic!("the released address is held")
        };
        assert_eq!(held.release_at_unix_ms, 4_000 + GRACE);
        assert!(
            held.node.is_empty(),
            "no node forwards to a released address"
        );
        create(
            &mut state,
            &mut index,
            vm("c", "uc", vec![nic("blue", Some(fixed))]),
        );
        let problems = round(&mut state, &mut index, 5_000);
        assert!(problems["c/0"].contains("10.9.0.5"), "{problems:?}");
        // After the grace period the address is free again.
        round(&mut state, &mut index, 4_000 + GRACE);
        round(&mut state, &mut index, 4_001 + GRACE);
        assert_eq!(endpoint_of(&state, "uc", 0).and_then(|e| e.ip), Some(fixed));
    }

    #[test]
    fn an_endpoint_taken_over_by_a_migrations_target_stays_until_the_migration_ends() {
        use basalt_api::{Migration, MigrationPhase, MigrationSpec, MigrationStatus};
        let (mut state, mut index) = (State::default(), 0);
        create(
            &mut state,
            &mut index,
            Object::Network(Network {
                meta: ObjectMeta::named("blue"),
                spec: NetworkSpec {
                    cidr: "10.9.0.0/29".into(),
                    vni: 9,
                    routing: None,
                },
            }),
        );
        for name in ["n1", "n2", "n3"] {
            let mut node = Node {
                meta: ObjectMeta::named(name),
                ..Node::default()
            };
            node.spec.address = "10.0.0.1:1".into();
            create(&mut state, &mut index, Object::Node(node));
        }
        create(
            &mut state,
            &mut index,
            vm("a", "ua", vec![nic("blue", None)]),
        );
        create(
            &mut state,
            &mut index,
            Object::Placement(Placement {
                meta: ObjectMeta::named("a"),
                vm: "a".into(),
                node: "n1".into(),
                epoch: 3,
                ..Placement::default()
            }),
        );
        round(&mut state, &mut index, 1_000);
        let mut migration = Migration {
            meta: ObjectMeta::named("a"),
            spec: MigrationSpec {
                vm: "a".into(),
                ..MigrationSpec::default()
            },
            status: MigrationStatus {
                phase: MigrationPhase::Migrating,
                source: "n1".into(),
                target: "n2".into(),
                epoch: 3,
                ..MigrationStatus::default()
            },
        };
        create(&mut state, &mut index, Object::Migration(migration.clone()));
        // The target's agent saw the activation and took the endpoint.
        let mut taken = endpoint_of(&state, "ua", 0).unwrap();
        taken.node = "n2".into();
        taken.epoch = 4;
        index += 1;
        state
            .apply(index, Command::Update(Object::Endpoint(taken)))
            .unwrap();
        round(&mut state, &mut index, 2_000);
        let ep = endpoint_of(&state, "ua", 0).unwrap();
        assert_eq!((ep.node.as_str(), ep.epoch), ("n2", 4), "not moved back");
        // Anywhere else (another node, another epoch) still follows the
        // placement.
        let mut stray = ep.clone();
        stray.node = "n3".into();
        index += 1;
        state
            .apply(index, Command::Update(Object::Endpoint(stray)))
            .unwrap();
        round(&mut state, &mut index, 2_500);
        let ep = endpoint_of(&state, "ua", 0).unwrap();
        assert_eq!((ep.node.as_str(), ep.epoch), ("n1", 3));
        // Taken again, then the migration fails: back to the source.
        let mut taken = ep;
        taken.node = "n2".into();
        taken.epoch = 4;
        index += 1;
        state
            .apply(index, Command::Update(Object::Endpoint(taken)))
            .unwrap();
        let Some(Object::Migration(current)) = state.get(Kind::Migration, "a").cloned() else {
            panic!()
        };
        migration.meta = current.meta;
        migration.status.phase = MigrationPhase::Failed;
        index += 1;
        state
            .apply(index, Command::Update(Object::Migration(migration)))
            .unwrap();
        round(&mut state, &mut index, 3_000);
        let ep = endpoint_of(&state, "ua", 0).unwrap();
        assert_eq!((ep.node.as_str(), ep.epoch), ("n1", 3));
    }

    #[test]
    fn identities_depend_on_the_label_set_only() {
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(identity(&BTreeMap::new()), 0);
        let web = identity(&labels(&[("app", "web"), ("tier", "front")]));
        assert_ne!(web, 0);
        assert_eq!(web, identity(&labels(&[("tier", "front"), ("app", "web")])));
        assert_ne!(web, identity(&labels(&[("app", "db"), ("tier", "front")])));
        assert_ne!(
            identity(&labels(&[("a", "bc")])),
            identity(&labels(&[("ab", "c")]))
        );
    }
}
