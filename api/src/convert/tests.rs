//! Round trips through the wire format, and malformed messages that must be
//! refused with the right field named. Here rather than in `tests/` because
//! they need the private generated types.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;
use prost::Message;

use crate::pb;
use crate::*;

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map("[a-z][a-z0-9._/-]{0,20}", "[A-Za-z0-9._-]{0,20}", 0..4)
}

fn meta() -> impl Strategy<Value = ObjectMeta> {
    (name(), "[a-f0-9-]{0,36}", labels(), any::<[u64; 3]>()).prop_map(
        |(name, uid, labels, [resource_version, generation, created_at_unix_ms])| ObjectMeta {
            name,
            uid,
            labels,
            resource_version,
            generation,
            created_at_unix_ms,
        },
    )
}

fn conditions() -> impl Strategy<Value = Vec<Condition>> {
    prop::collection::btree_map(
        "[A-Z][A-Za-z0-9_]{0,15}",
        (
            any::<bool>(),
            "([A-Z][A-Za-z]{0,10})?",
            ".{0,20}",
            any::<u64>(),
        ),
        0..3,
    )
    .prop_map(|conditions| {
        conditions
            .into_iter()
            .map(|(kind, (status, reason, message, at))| Condition {
                kind,
                status,
                reason,
                message,
                last_transition_unix_ms: at,
            })
            .collect()
    })
}

fn mac() -> impl Strategy<Value = String> {
    any::<[u8; 6]>().prop_map(|mut octets| {
        octets[0] &= 0xfe;
        octets
            .iter()
            .map(|o| format!("{o:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    })
}

fn resources() -> impl Strategy<Value = Resources> {
    (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(cpus, memory_mib, storage_bytes)| {
        Resources {
            cpus,
            memory_mib,
            storage_bytes,
        }
    })
}

fn node() -> impl Strategy<Value = Node> {
    (
        meta(),
        "[a-z0-9.-]{1,20}:[1-9][0-9]{0,3}",
        any::<bool>(),
        resources(),
        0.0..=1.0f64,
        conditions(),
        any::<u64>(),
    )
        .prop_map(
            |(meta, address, cordoned, capacity, share, conditions, heartbeat)| {
                // Allocatable is a share of capacity, so it always fits.
                let part = |v: u64| (v as f64 * share) as u64;
                let allocatable = Resources {
                    cpus: (f64::from(capacity.cpus) * share) as u32,
                    memory_mib: part(capacity.memory_mib).min(capacity.memory_mib),
                    storage_bytes: part(capacity.storage_bytes).min(capacity.storage_bytes),
                };
                Node {
                    meta,
                    spec: NodeSpec { address, cordoned },
                    status: NodeStatus {
                        capacity,
                        allocatable,
                        conditions,
                        last_heartbeat_unix_ms: heartbeat,
                        credential_sha256: String::new(),
                        replication_address: String::new(),
                    },
                }
            },
        )
}

fn disks() -> impl Strategy<Value = Vec<Disk>> {
    prop::collection::btree_map(
        name(),
        (
            1..u64::MAX / 512,
            prop::option::of(name()),
            1..=MAX_DISK_REPLICAS,
            any::<bool>(),
            prop_oneof![
                Just(ReplicationProtocol::A),
                Just(ReplicationProtocol::B),
                Just(ReplicationProtocol::C)
            ],
        ),
        0..4,
    )
    .prop_map(|disks| {
        disks
            .into_iter()
            .map(|(name, (sectors, from, replicas, cloned, protocol))| {
                // An image, a source volume or an attached volume, never
                // two.
                let (image, source_volume, attach) = match (cloned, sectors % 2 == 0) {
                    (true, _) => (None, from, None),
                    (false, true) => (None, None, from),
                    (false, false) => (from, None, None),
                };
                let attached_storage_name = attach.as_ref().map(|a| format!("vol-{a}"));
                Disk {
                    name,
                    size_bytes: sectors * DISK_SECTOR_BYTES,
                    image,
                    replicas,
                    source_volume,
                    attach,
                    attached_storage_name,
                    added_at_epoch: (sectors % 3 == 0).then_some(sectors),
                    protocol,
                }
            })
            .collect()
    })
}

fn nics() -> impl Strategy<Value = Vec<Nic>> {
    prop::collection::vec(
        (
            name(),
            prop::option::of(mac()),
            prop::option::of(any::<IpAddr>()),
        ),
        0..4,
    )
    .prop_map(|nics| {
        nics.into_iter()
            .map(|(network, mac, ip)| Nic { network, mac, ip })
            .collect()
    })
}

fn phase() -> impl Strategy<Value = VmPhase> {
    prop::sample::select(vec![
        VmPhase::Pending,
        VmPhase::Scheduled,
        VmPhase::Starting,
        VmPhase::Running,
        VmPhase::Stopping,
        VmPhase::Stopped,
        VmPhase::Migrating,
        VmPhase::Failed,
    ])
}

fn vm() -> impl Strategy<Value = Vm> {
    let spec = (
        1..=u32::MAX,
        MIN_VM_MEMORY_MIB..=u64::MAX,
        any::<bool>(),
        disks(),
        nics(),
        labels(),
        prop::option::of(name()),
        prop::option::of(("/[a-z]{1,8}", "(/[a-z]{1,8})?", "[ -~]{0,40}")),
    )
        .prop_map(
            |(cpus, memory_mib, running, disks, nics, node_selector, group, kernel)| VmSpec {
                cpus,
                memory_mib,
                running,
                disks,
                nics,
                placement: PlacementRules {
                    node_selector,
                    anti_affinity_group: group,
                },
                kernel: kernel.map(|(kernel, initrd, cmdline)| KernelBoot {
                    kernel,
                    initrd,
                    cmdline,
                }),
                cloud_init: (cpus % 2 == 0).then(|| CloudInit {
                    user_data: format!("#cloud-config\nhostname: vm{cpus}\n"),
                    network_config: (cpus % 4 == 0).then(|| "version: 2\n".to_owned()),
                    ssh_authorized_keys: vec![
                        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEdlJ2DMaM8vSRNI8QO9fsnhdbxgZaBeCtgvmzRo7xYh a@b".to_owned(),
                    ],
                }),
            },
        );
    (meta(), spec).prop_flat_map(|(meta, spec)| {
        let nic_count = spec.nics.len() as u32;
        let addresses = prop::collection::vec(
            (
                0..nic_count.max(1),
                mac(),
                prop::option::of(any::<IpAddr>()),
            ),
            if nic_count == 0 { 0..1 } else { 0..4 },
        );
        let status = (
            phase(),
            prop::option::of(name()),
            any::<u64>(),
            conditions(),
            addresses,
            (
                prop::collection::vec(name(), 0..3),
                prop::collection::vec(name(), 0..3),
            ),
        )
            .prop_map(
                |(phase, node, observed_generation, conditions, addresses, (outdated, plugged))| {
                    VmStatus {
                        phase,
                        node,
                        observed_generation,
                        conditions,
                        nic_addresses: addresses
                            .into_iter()
                            .map(|(index, mac, ip)| NicAddress { index, mac, ip })
                            .collect(),
                        outdated_replicas: outdated,
                        plugged_volumes: plugged,
                    }
                },
            );
        (Just(meta), Just(spec), status).prop_map(|(meta, spec, status)| Vm { meta, spec, status })
    })
}

/// Domain → wire → bytes → wire → domain.
fn through_the_wire<D, P>(value: D) -> Result<D, ApiError>
where
    P: Message + Default + From<D>,
    D: TryFrom<P, Error = ApiError>,
{
    let bytes = P::from(value).encode_to_vec();
    D::try_from(P::decode(bytes.as_slice()).expect("decodes what it encoded"))
}

proptest! {
    #[test]
    fn vms_survive_the_wire(vm in vm()) {
        prop_assert_eq!(vm.validate(), Ok(()));
        prop_assert_eq!(through_the_wire::<Vm, pb::Vm>(vm.clone()), Ok(vm));
    }

    #[test]
    fn nodes_survive_the_wire(node in node()) {
        prop_assert_eq!(node.validate(), Ok(()));
        prop_assert_eq!(through_the_wire::<Node, pb::Node>(node.clone()), Ok(node));
    }

    #[test]
    fn objects_and_events_survive_the_wire(vm in vm(), node in node(), rv in any::<u64>()) {
        for object in [Object::Vm(vm), Object::Node(node)] {
            prop_assert_eq!(
                through_the_wire::<Object, pb::Object>(object.clone()),
                Ok(object.clone())
            );
            let event = WatchEvent::Modified { object, resource_version: rv };
            prop_assert_eq!(
                through_the_wire::<WatchEvent, pb::WatchEvent>(event.clone()),
                Ok(event)
            );
        }
    }

    #[test]
    fn vms_survive_json(vm in vm()) {
        let object = Object::Vm(vm);
        let json = serde_json::to_string(&object).unwrap();
        prop_assert_eq!(serde_json::from_str::<Object>(&json).unwrap(), object);
    }
}

#[test]
fn every_other_type_survives_the_wire() {
    let placement = Placement {
        meta: ObjectMeta::named("web-1"),
        vm: "web-1".into(),
        node: "node-3".into(),
        epoch: 7,
        replica_nodes: vec!["node-3".into(), "node-5".into()],
    };
    let token = JoinToken {
        meta: ObjectMeta::named("join-1"),
        spec: JoinTokenSpec {
            ttl_seconds: 3600,
            max_uses: 3,
            revoked: false,
        },
        status: JoinTokenStatus {
            uses: 1,
            expires_at_unix_ms: 1_700_000_000_000,
            secret_sha256: "ab".repeat(32),
        },
        secret: Some(TokenSecret::new("s3cret")),
    };
    for object in [Object::Placement(placement.clone()), Object::Token(token)] {
        assert_eq!(
            through_the_wire::<Object, pb::Object>(object.clone()),
            Ok(object)
        );
    }
    let events = [
        WatchEvent::Added {
            object: placement.clone(),
            resource_version: 1,
        },
        WatchEvent::Deleted {
            object: placement,
            resource_version: 2,
        },
        WatchEvent::Bookmark {
            resource_version: 3,
        },
    ];
    for event in events {
        assert_eq!(
            through_the_wire::<WatchEvent<Placement>, pb::PlacementEvent>(event.clone()),
            Ok(event)
        );
    }
    let list = ObjectList {
        objects: vec![],
        resource_version: 9,
    };
    assert_eq!(
        through_the_wire::<ObjectList, pb::ListResponse>(list.clone()),
        Ok(list)
    );

    let registration = Registration {
        token: TokenSecret::new("s3cret"),
        node_name: "node-1".into(),
        address: "10.0.0.1:7001".into(),
        capacity: Resources {
            cpus: 8,
            memory_mib: 16384,
            storage_bytes: 1 << 40,
        },
        node_credential: None,
    };
    assert_eq!(
        through_the_wire::<Registration, pb::RegisterRequest>(registration.clone()),
        Ok(registration.clone())
    );
    let again = Registration {
        token: TokenSecret::default(),
        node_credential: Some(TokenSecret::new("node-secret")),
        ..registration
    };
    assert_eq!(
        through_the_wire::<Registration, pb::RegisterRequest>(again.clone()),
        Ok(again)
    );
    let registered = Registered {
        node_uid: "u-1".into(),
        lease: std::time::Duration::from_secs(10),
        heartbeat_interval: std::time::Duration::from_millis(2500),
        node_credential: Some(TokenSecret::new("node-secret")),
    };
    assert_eq!(
        through_the_wire::<Registered, pb::RegisterResponse>(registered.clone()),
        Ok(registered)
    );
    let heartbeat = Heartbeat {
        node: "node-1".into(),
        node_uid: "u-1".into(),
        allocatable: None,
    };
    assert_eq!(
        through_the_wire::<Heartbeat, pb::HeartbeatRequest>(heartbeat.clone()),
        Ok(heartbeat)
    );
    let report = StatusReport {
        node: "node-1".into(),
        vm: "web-1".into(),
        status: VmStatus {
            phase: VmPhase::Running,
            node: Some("node-1".into()),
            observed_generation: 2,
            plugged_volumes: vec!["vol-u1".into()],
            ..VmStatus::default()
        },
    };
    assert_eq!(
        through_the_wire::<StatusReport, pb::ReportStatusRequest>(report.clone()),
        Ok(report)
    );
}

/// The field an `InvalidArgument` names, or a panic.
fn field<T: std::fmt::Debug>(result: Result<T, ApiError>) -> String {
    match result {
        Err(ApiError::InvalidArgument { field, .. }) => field,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

fn good_vm() -> pb::Vm {
    Vm {
        meta: ObjectMeta::named("web-1"),
        spec: VmSpec {
            cpus: 1,
            memory_mib: 64,
            nics: vec![Nic {
                network: "default".into(),
                mac: None,
                ip: None,
            }],
            ..VmSpec::default()
        },
        status: VmStatus::default(),
    }
    .into()
}

#[test]
fn malformed_messages_name_their_field() {
    assert_eq!(Vm::try_from(good_vm()).map(|_| ()), Ok(()));

    assert_eq!(
        field(Object::try_from(pb::Object { kind: None })),
        "object.kind"
    );

    let mut vm = good_vm();
    vm.meta = None;
    assert_eq!(field(Vm::try_from(vm)), "vm.meta");

    let mut vm = good_vm();
    vm.spec = None;
    assert_eq!(field(Vm::try_from(vm)), "vm.spec");

    let mut vm = good_vm();
    vm.status.as_mut().unwrap().phase = 99;
    assert_eq!(field(Vm::try_from(vm)), "status.phase");

    let mut vm = good_vm();
    vm.spec.as_mut().unwrap().nics[0].ip = Some("10.0.0.300".into());
    assert_eq!(field(Vm::try_from(vm)), "spec.nics[0].ip");

    let mut vm = good_vm();
    vm.spec.as_mut().unwrap().disks = vec![
        pb::Disk {
            name: "root".into(),
            size_bytes: 1 << 20,
            replicas: 2,
            protocol: "b".into(),
            ..pb::Disk::default()
        },
        pb::Disk {
            name: "data".into(),
            size_bytes: 1 << 20,
            replicas: 2,
            protocol: "D".into(),
            ..pb::Disk::default()
        },
    ];
    assert_eq!(field(Vm::try_from(vm.clone())), "spec.disks[1].protocol");
    vm.spec.as_mut().unwrap().disks[1].protocol = String::new();
    let disks = Vm::try_from(vm).unwrap().spec.disks;
    assert_eq!(
        (disks[0].protocol, disks[1].protocol),
        (ReplicationProtocol::B, ReplicationProtocol::C)
    );

    let mut vm = good_vm();
    vm.spec.as_mut().unwrap().memory_mib = 8;
    let wrapped = pb::Object {
        kind: Some(pb::object::Kind::Vm(vm)),
    };
    assert_eq!(field(Object::try_from(wrapped)), "spec.memory_mib");

    let mut vm = good_vm();
    vm.meta.as_mut().unwrap().name = "Not_A_Label".into();
    assert_eq!(field(Vm::try_from(vm)), "meta.name");

    // A VM with no status at all is a new VM: accepted, Pending.
    let mut vm = good_vm();
    vm.status = None;
    assert_eq!(Vm::try_from(vm).unwrap().status.phase, VmPhase::Pending);

    let node = pb::Node {
        meta: Some(ObjectMeta::named("node-1").into()),
        spec: None,
        status: None,
    };
    assert_eq!(field(Node::try_from(node)), "node.spec");

    let placement = pb::Placement {
        meta: Some(ObjectMeta::named("p").into()),
        vm: "web-1".into(),
        node: String::new(),
        epoch: 1,
        replica_nodes: Vec::new(),
    };
    assert_eq!(field(Placement::try_from(placement)), "node");
    // Replica nodes: valid names, each once, the placement's node among them.
    let replicated = |replica_nodes: &[&str]| pb::Placement {
        meta: Some(ObjectMeta::named("web-1").into()),
        vm: "web-1".into(),
        node: "n1".into(),
        epoch: 1,
        replica_nodes: replica_nodes.iter().map(|n| (*n).to_owned()).collect(),
    };
    assert!(Placement::try_from(replicated(&["n2", "n1"])).is_ok());
    assert_eq!(
        field(Placement::try_from(replicated(&["n2", "n3"]))),
        "replica_nodes"
    );
    assert_eq!(
        field(Placement::try_from(replicated(&["n1", "n2", "n1"]))),
        "replica_nodes[2]"
    );
    assert_eq!(
        field(Placement::try_from(replicated(&["n1", "N_2"]))),
        "replica_nodes[1]"
    );

    let token = pb::JoinToken {
        meta: Some(ObjectMeta::named("t").into()),
        spec: None,
        status: None,
        secret: None,
    };
    assert_eq!(field(JoinToken::try_from(token)), "token.spec");

    let event = pb::WatchEvent {
        r#type: pb::EventType::Added.into(),
        object: None,
        resource_version: 4,
    };
    assert_eq!(field(WatchEvent::try_from(event)), "object");

    let event = pb::WatchEvent {
        r#type: 42,
        object: None,
        resource_version: 4,
    };
    assert_eq!(field(WatchEvent::try_from(event)), "type");

    assert_eq!(field(convert::required_kind(0, "kind")), "kind");
    assert_eq!(field(convert::required_kind(17, "kind")), "kind");

    let request = pb::RegisterRequest {
        token: "s".into(),
        node_name: "node-1".into(),
        address: "10.0.0.1:7001".into(),
        capacity: None,
        node_credential: String::new(),
    };
    assert_eq!(field(Registration::try_from(request)), "capacity");
}

#[test]
fn garbage_bytes_never_panic() {
    // Arbitrary bytes either fail to decode or decode into something the
    // conversion accepts or refuses; none of it may panic.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for len in 0..512 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        if let Ok(object) = pb::Object::decode(bytes.as_slice()) {
            let _ = Object::try_from(object);
        }
    }
}
