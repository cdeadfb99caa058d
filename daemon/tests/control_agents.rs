//! The agent side of the control plane against one real `basaltd control`
//! process, with fake agents driven through `AgentClient`: join tokens
//! (good, wrong, expired, revoked, used up), heartbeats that keep nodes
//! ready, placement of running VMs, the per-node placement watch, status
//! reports, and node loss — the node turns not ready after its lease, its
//! VMs move with a higher epoch only after that fence is committed, a VM
//! is never on two nodes, and a late heartbeat changes nothing; IPAM —
//! networks never overlap, each NIC gets an endpoint (a static address
//! honoured) that keeps its address when the VM moves and follows the
//! placement's node and epoch, released after the VM is deleted.

use basalt_testkit::wait;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_api::{
    AdminClient, AgentClient, ApiError, Condition, Endpoint, Heartbeat, JoinToken, Kind, Network,
    NetworkSpec, Nic, Object, ObjectMeta, Placement, Registration, Resources, StatusReport,
    TokenSecret, Vm, VmPhase, VmStatus, WatchEvent,
};
use basalt_testkit::{Prefix, Process, ProcessSpec};
use futures::StreamExt as _;

const BASALTD: &str = env!("CARGO_BIN_EXE_basaltd");
const DEADLINE: Duration = Duration::from_secs(60);
/// The test's timing: short leases so node loss takes seconds.
const LEASE: Duration = Duration::from_secs(2);
const HA_AFTER: Duration = Duration::from_secs(3);
const CONFIG: &str = "[nodes]\nlease_seconds = 2\nheartbeat_interval_ms = 300\nha_after_ms = 3000\ncontroller_period_ms = 100\n[ipam]\nrelease_grace_ms = 1000\n";

fn start_member(prefix: &Prefix) -> (Process, String) {
    let config = prefix.dir().join("control.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let address = format!("127.0.0.1:{}", basalt_testkit::free_port());
    let spec = ProcessSpec::new("control-1", BASALTD)
        .args(["control", "--bootstrap", "--node-id", "1", "--config"])
        .arg(&config)
        .args(["--listen", &address, "--data-dir"])
        .arg(prefix.dir().join("control-1"))
        .env("RUST_LOG", "info");
    (
        Process::start(prefix, spec).expect("start basaltd control"),
        address,
    )
}

async fn create_token(admin: &AdminClient, name: &str, ttl: u64, uses: u32) -> TokenSecret {
    let mut token = JoinToken {
        meta: ObjectMeta::named(name),
        ..JoinToken::default()
    };
    token.spec.ttl_seconds = ttl;
    token.spec.max_uses = uses;
    match admin
        .create(Object::Token(token))
        .await
        .expect("create token")
    {
        Object::Token(token) => token.secret.expect("the create reply carries the secret"),
        other => panic!("not a token: {other:?}"),
    }
}

fn registration(token: &TokenSecret, node: &str) -> Registration {
    Registration {
        token: token.clone(),
        node_name: node.into(),
        address: "127.0.0.1:7500".into(),
        capacity: Resources {
            cpus: 4,
            memory_mib: 4096,
            storage_bytes: 0,
        },
        node_credential: None,
    }
}

async fn node_ready(admin: &AdminClient, name: &str) -> Option<bool> {
    match admin.get(Kind::Node, name).await {
        Ok(Object::Node(node)) => Some(node.status.is_ready()),
        _ => None,
    }
}

async fn placements(admin: &AdminClient) -> BTreeMap<String, Placement> {
    admin
        .list(Kind::Placement)
        .await
        .expect("list placements")
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Placement(p) => Some((p.vm.clone(), p)),
            _ => None,
        })
        .collect()
}

async fn endpoints(admin: &AdminClient) -> BTreeMap<String, Endpoint> {
    admin
        .list(Kind::Endpoint)
        .await
        .expect("list endpoints")
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Endpoint(e) => Some((e.vm.clone(), e)),
            _ => None,
        })
        .collect()
}

fn network(name: &str, cidr: &str, vni: u32) -> Object {
    Object::Network(Network {
        meta: ObjectMeta::named(name),
        spec: NetworkSpec {
            cidr: cidr.into(),
            vni,
            routing: None,
        },
    })
}

/// A fake agent's heartbeat loop; returns when `stop` is set.
fn heartbeats(
    agent: AgentClient,
    node: String,
    uid: String,
    stop: Arc<AtomicBool>,
    last_ack: Arc<Mutex<HashMap<String, Instant>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let beat = Heartbeat {
                node: node.clone(),
                node_uid: uid.clone(),
                allocatable: None,
            };
            if let Ok(ack) = agent.heartbeat(beat).await
                && ack.acknowledged
            {
                last_ack
                    .lock()
                    .unwrap()
                    .insert(node.clone(), Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_register_heartbeat_and_lose_their_vms_only_after_the_fence() {
    let prefix = Prefix::for_test().expect("prefix");
    let (_member, address) = start_member(&prefix);
    let admin = AdminClient::connect_lazy(&address).expect("admin client");
    let agent = AgentClient::connect_lazy(&address).expect("agent client");
    wait::until("the member leads", DEADLINE, &[], || async {
        admin
            .list(Kind::Member)
            .await
            .is_ok_and(|l| !l.objects.is_empty())
    })
    .await;

    // Tokens: the secret comes back once; the store keeps only its hash.
    let secret = create_token(&admin, "join", 3600, 4).await;
    let Ok(Object::Token(stored)) = admin.get(Kind::Token, "join").await else {
        panic!("get token")
    };
    assert_eq!(stored.secret, None, "get never shows the secret");
    assert_eq!(stored.status.secret_sha256.len(), 64);
    assert!(!stored.status.secret_sha256.contains(secret.expose()));

    let wrong = TokenSecret::new("join.0000");
    assert!(matches!(
        agent.register(registration(&wrong, "x")).await,
        Err(ApiError::Unauthenticated { .. })
    ));
    assert!(matches!(
        agent
            .register(registration(&TokenSecret::new("garbage"), "x"))
            .await,
        Err(ApiError::Unauthenticated { .. })
    ));
    let once = create_token(&admin, "once", 3600, 1).await;
    agent
        .register(registration(&once, "n-once"))
        .await
        .expect("first use");
    match agent.register(registration(&once, "n-once-2")).await {
        Err(ApiError::FailedPrecondition { reason }) => {
            assert!(reason.contains("used up"), "{reason}")
        }
        other => panic!("a used-up token must be refused, got {other:?}"),
    }
    let revoked = create_token(&admin, "revoked", 3600, 0).await;
    let Ok(Object::Token(mut token)) = admin.get(Kind::Token, "revoked").await else {
        panic!("get token")
    };
    token.spec.revoked = true;
    admin.update(Object::Token(token)).await.expect("revoke");
    match agent.register(registration(&revoked, "n-revoked")).await {
        Err(ApiError::FailedPrecondition { reason }) => {
            assert!(reason.contains("revoked"), "{reason}")
        }
        other => panic!("a revoked token must be refused, got {other:?}"),
    }
    let short = create_token(&admin, "short", 1, 0).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    match agent.register(registration(&short, "n-expired")).await {
        Err(ApiError::FailedPrecondition { reason }) => {
            assert!(reason.contains("expired"), "{reason}")
        }
        other => panic!("an expired token must be refused, got {other:?}"),
    }
    assert_eq!(node_ready(&admin, "n-revoked").await, None);
    assert_eq!(node_ready(&admin, "n-expired").await, None);
    // The one-use node never heartbeats: it turns not ready after its lease.
    wait::until("the silent node turns not ready", DEADLINE, &[], || async {
        node_ready(&admin, "n-once").await == Some(false)
    })
    .await;

    // Three nodes that heartbeat.
    let stop: HashMap<&str, Arc<AtomicBool>> = ["n1", "n2", "n3"]
        .into_iter()
        .map(|n| (n, Arc::new(AtomicBool::new(false))))
        .collect();
    let last_ack = Arc::new(Mutex::new(HashMap::new()));
    let mut uids = HashMap::new();
    for name in ["n1", "n2", "n3"] {
        let registered = agent
            .register(registration(&secret, name))
            .await
            .expect("register");
        assert_eq!(registered.lease, LEASE);
        assert_eq!(registered.heartbeat_interval, Duration::from_millis(300));
        uids.insert(name, registered.node_uid.clone());
        heartbeats(
            agent.clone(),
            name.into(),
            registered.node_uid,
            Arc::clone(&stop[name]),
            Arc::clone(&last_ack),
        );
    }
    let unknown = Heartbeat {
        node: "n1".into(),
        node_uid: "not-the-uid".into(),
        allocatable: None,
    };
    assert!(matches!(
        agent.heartbeat(unknown).await,
        Err(ApiError::FailedPrecondition { .. })
    ));
    tokio::time::sleep(LEASE + Duration::from_secs(1)).await;
    for name in ["n1", "n2", "n3"] {
        assert_eq!(
            node_ready(&admin, name).await,
            Some(true),
            "heartbeats keep {name} ready past its lease"
        );
    }

    // A network; another that overlaps it is refused, naming spec.cidr.
    admin
        .create(network("blue", "10.77.0.0/24", 77))
        .await
        .expect("create network");
    match admin.create(network("red", "10.77.0.128/25", 78)).await {
        Err(ApiError::InvalidArgument { field, .. }) => assert_eq!(field, "spec.cidr"),
        other => panic!("an overlapping network must be refused, got {other:?}"),
    }
    let fixed: std::net::Ipv4Addr = "10.77.0.50".parse().unwrap();

    // Running VMs get placements from the placement controller, and each
    // NIC an endpoint from IPAM.
    for i in 0..6 {
        let mut vm = Vm {
            meta: ObjectMeta::named(format!("vm-{i}")),
            ..Vm::default()
        };
        vm.spec.cpus = 1;
        vm.spec.memory_mib = 256;
        vm.spec.running = true;
        vm.spec.nics = vec![Nic {
            network: "blue".into(),
            mac: None,
            ip: (i == 1).then_some(std::net::IpAddr::V4(fixed)),
        }];
        admin.create(Object::Vm(vm)).await.expect("create vm");
    }
    wait::until(
        "every NIC has an endpoint on its VM's node",
        DEADLINE,
        &[],
        || async {
            let (placed, endpoints) = (placements(&admin).await, endpoints(&admin).await);
            endpoints.len() == 6
                && endpoints.values().all(|e| {
                    placed
                        .get(&e.vm)
                        .is_some_and(|p| p.node == e.node && p.epoch == e.epoch)
                })
        },
    )
    .await;
    let leased = endpoints(&admin).await;
    assert_eq!(
        leased["vm-1"].ip,
        Some(fixed),
        "the static address is honoured"
    );
    let mut addresses: Vec<_> = leased.values().map(|e| e.ip).collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), 6, "one address per NIC");
    wait::until("every VM is placed", DEADLINE, &[], || async {
        placements(&admin).await.len() == 6
    })
    .await;
    let before = placements(&admin).await;
    assert!(before.values().all(|p| p.epoch == 1 && p.node != "n-once"));
    let victim = before
        .values()
        .map(|p| p.node.clone())
        .find(|n| n.starts_with('n'))
        .expect("a node with VMs");
    let victim_vms: Vec<String> = before
        .values()
        .filter(|p| p.node == victim)
        .map(|p| p.vm.clone())
        .collect();

    // The victim's placement watch starts with its placements, then a bookmark.
    let mut victim_watch = agent.watch_placements(&victim, 0).await.expect("watch");
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, victim_watch.next()).await {
            Ok(Some(Ok(WatchEvent::Added { object, .. }))) => initial.push(object.vm),
            Ok(Some(Ok(WatchEvent::Bookmark { .. }))) => break,
            other => panic!("expected ADDED or BOOKMARK, got {other:?}"),
        }
    }
    initial.sort();
    assert_eq!(initial, victim_vms);

    // Status reports: from the VM's node only; the generation stays.
    let reported = &victim_vms[0];
    let status = VmStatus {
        phase: VmPhase::Running,
        node: Some(victim.clone()),
        observed_generation: 1,
        conditions: vec![Condition {
            kind: Condition::READY.into(),
            status: true,
            ..Condition::default()
        }],
        ..VmStatus::default()
    };
    agent
        .report_status(StatusReport {
            node: victim.clone(),
            vm: reported.clone(),
            status: status.clone(),
        })
        .await
        .expect("report status");
    let Ok(Object::Vm(vm)) = admin.get(Kind::Vm, reported).await else {
        panic!("get vm")
    };
    assert_eq!(vm.status.phase, VmPhase::Running);
    assert!(vm.status.is_ready());
    assert_eq!(vm.meta.generation, 1, "a status write keeps the generation");
    let elsewhere = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != victim)
        .unwrap();
    assert!(matches!(
        agent
            .report_status(StatusReport {
                node: elsewhere.into(),
                vm: reported.clone(),
                status,
            })
            .await,
        Err(ApiError::FailedPrecondition { .. })
    ));

    // Record every placement change from here on: no VM may ever be on two
    // nodes, and epochs only grow.
    let list = admin.list(Kind::Placement).await.expect("list");
    let mut changes = admin
        .watch(Some(Kind::Placement), list.resource_version)
        .await
        .expect("watch placements");
    let node_fenced_at = Arc::new(Mutex::new(None::<u64>));
    let mut node_watch = admin
        .watch(Some(Kind::Node), list.resource_version)
        .await
        .expect("watch nodes");
    {
        let (fenced, victim) = (Arc::clone(&node_fenced_at), victim.clone());
        tokio::spawn(async move {
            while let Some(Ok(event)) = node_watch.next().await {
                if let WatchEvent::Modified {
                    object: Object::Node(node),
                    resource_version,
                } = event
                    && node.meta.name == victim
                    && !node.status.is_ready()
                {
                    fenced.lock().unwrap().get_or_insert(resource_version);
                }
            }
        });
    }

    // The victim goes silent.
    stop[victim.as_str()].store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let silent_since = last_ack.lock().unwrap()[victim.as_str()];
    wait::until("the silent node turns not ready", DEADLINE, &[], || async {
        node_ready(&admin, &victim).await == Some(false)
    })
    .await;
    let not_ready_after = silent_since.elapsed();
    assert!(
        not_ready_after >= LEASE - Duration::from_millis(100),
        "not ready only after the lease: {not_ready_after:?}"
    );
    assert!(
        placements(&admin).await.values().any(|p| p.node == victim),
        "the VMs stay until ha_after_ms"
    );
    wait::until("the victim's VMs move", DEADLINE, &[], || async {
        placements(&admin).await.values().all(|p| p.node != victim)
    })
    .await;
    let moved_after = silent_since.elapsed();
    assert!(
        moved_after >= HA_AFTER - Duration::from_millis(100),
        "moved only after ha_after_ms: {moved_after:?}"
    );
    let after = placements(&admin).await;
    for vm in &victim_vms {
        assert_eq!(after[vm].epoch, 2, "{vm} moved with a new epoch");
        assert!(["n1", "n2", "n3"].contains(&after[vm].node.as_str()));
    }
    for (vm, p) in &after {
        if !victim_vms.contains(vm) {
            assert_eq!(p, &before[vm], "{vm} did not move");
        }
    }
    // Their endpoints were fenced in the same Raft entry as the move: the
    // endpoint and the placement were changed at one resource version.
    let fenced = endpoints(&admin).await;
    for vm in &victim_vms {
        assert_eq!(
            (
                fenced[vm].node.as_str(),
                fenced[vm].epoch,
                fenced[vm].meta.resource_version
            ),
            (after[vm].node.as_str(), 2, after[vm].meta.resource_version),
            "{vm}'s endpoint moved with its placement, in one entry"
        );
    }
    // Their endpoints keep the address and follow the node and epoch.
    wait::until(
        "the endpoints follow the moved VMs",
        DEADLINE,
        &[],
        || async {
            let endpoints = endpoints(&admin).await;
            victim_vms
                .iter()
                .all(|vm| endpoints[vm].node == after[vm].node && endpoints[vm].epoch == 2)
        },
    )
    .await;
    let followed = endpoints(&admin).await;
    for (vm, endpoint) in &followed {
        assert_eq!(endpoint.ip, leased[vm].ip, "{vm} kept its address");
    }
    let fenced_at = node_fenced_at
        .lock()
        .unwrap()
        .expect("the fence was watched");
    let mut nodes_of: HashMap<String, (String, u64)> = before
        .values()
        .map(|p| (p.vm.clone(), (p.node.clone(), p.epoch)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut moves = 0;
    while moves < victim_vms.len() {
        let event = tokio::time::timeout(deadline - Instant::now(), changes.next())
            .await
            .expect("placement events in time")
            .expect("the watch goes on")
            .expect("no watch error");
        let WatchEvent::Modified {
            object: Object::Placement(p),
            resource_version,
        } = event
        else {
            panic!("only moves are expected, got {event:?}")
        };
        assert!(
            resource_version > fenced_at,
            "{} moved at {resource_version}, before the fence at {fenced_at}",
            p.vm
        );
        let (old_node, old_epoch) = &nodes_of[&p.vm];
        assert!(p.epoch > *old_epoch && p.node != *old_node);
        nodes_of.insert(p.vm.clone(), (p.node.clone(), p.epoch));
        moves += 1;
    }
    // The victim's own stream says its VMs left.
    let mut left = Vec::new();
    while left.len() < victim_vms.len() {
        match tokio::time::timeout(DEADLINE, victim_watch.next()).await {
            Ok(Some(Ok(WatchEvent::Deleted { object, .. }))) => left.push(object.vm),
            other => panic!("expected DELETED on the victim's stream, got {other:?}"),
        }
    }
    left.sort();
    assert_eq!(left, victim_vms);

    // A late heartbeat from the lost node changes nothing.
    let late = Heartbeat {
        node: victim.clone(),
        node_uid: uids[victim.as_str()].clone(),
        allocatable: None,
    };
    match agent.heartbeat(late).await {
        Err(ApiError::FailedPrecondition { reason }) => {
            assert!(reason.contains("register again"), "{reason}")
        }
        other => panic!("a late heartbeat must be refused, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node_ready(&admin, &victim).await, Some(false));
    assert_eq!(placements(&admin).await, after);

    // It may register again, and then heartbeats work again.
    let again = agent
        .register(registration(&secret, &victim))
        .await
        .expect("register again");
    assert_eq!(again.node_uid, uids[victim.as_str()], "same node, same uid");
    agent
        .heartbeat(Heartbeat {
            node: victim.clone(),
            node_uid: again.node_uid,
            allocatable: None,
        })
        .await
        .expect("heartbeat after registering again");
    assert_eq!(node_ready(&admin, &victim).await, Some(true));

    // A deleted VM loses its placement, and its address after the grace.
    let released_ip = followed["vm-0"].ip.expect("vm-0's address");
    admin
        .delete(Kind::Vm, "vm-0", None)
        .await
        .expect("delete vm");
    wait::until(
        "the deleted VM's placement is removed",
        DEADLINE,
        &[],
        || async { !placements(&admin).await.contains_key("vm-0") },
    )
    .await;
    let name = Endpoint::name_for(released_ip);
    match admin.get(Kind::Endpoint, &name).await {
        Ok(Object::Endpoint(e)) => assert!(e.release_at_unix_ms > 0 && e.node.is_empty(), "{e:?}"),
        Err(ApiError::NotFound { .. }) => {}
        other => panic!("expected the released endpoint, got {other:?}"),
    }
    wait::until(
        "the released address is freed after the grace",
        DEADLINE,
        &[],
        || async {
            matches!(
                admin.get(Kind::Endpoint, &name).await,
                Err(ApiError::NotFound { .. })
            )
        },
    )
    .await;
    for flag in stop.values() {
        flag.store(true, Ordering::Relaxed);
    }
}
