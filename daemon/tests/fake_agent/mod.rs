//! A fake node agent for the control-plane tests that register nodes
//! through the agent API without running `basaltd agent`, and what those
//! tests ask the control plane about the VMs and nodes they made.
//!
//! Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use basalt_api::{
    AdminClient, AgentClient, Disk, Heartbeat, KernelBoot, Kind, Object, ObjectMeta, Placement,
    Registered, Registration, Resources, TokenSecret, Vm, VmSpec,
};

/// Heartbeats for node `node` (uid `uid`) every 300 ms until `stop` is
/// set, as its agent would.
pub fn heartbeats(agent: AgentClient, node: String, uid: String, stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let beat = Heartbeat {
                node: node.clone(),
                node_uid: uid.clone(),
                allocatable: None,
            };
            let _ = agent.heartbeat(beat).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
}

/// Registers node `name` (4 CPUs, `memory_mib`) with `token` and
/// heartbeats for it until the returned flag is set; also returns what
/// registering answered.
pub async fn join(
    agent: &AgentClient,
    token: &TokenSecret,
    name: &str,
    memory_mib: u64,
) -> (Arc<AtomicBool>, Registered) {
    let registered = agent
        .register(Registration {
            token: token.clone(),
            node_name: name.into(),
            address: "127.0.0.1:7500".into(),
            capacity: Resources {
                cpus: 4,
                memory_mib,
                storage_bytes: 0,
            },
            node_credential: None,
        })
        .await
        .expect("register");
    let stop = Arc::new(AtomicBool::new(false));
    heartbeats(
        agent.clone(),
        name.into(),
        registered.node_uid.clone(),
        Arc::clone(&stop),
    );
    (stop, registered)
}

/// A running VM booting a kernel, with one disk `root` of `size_bytes`
/// in `replicas` copies.
pub fn replicated_vm(name: &str, size_bytes: u64, replicas: u32) -> Vm {
    Vm {
        meta: ObjectMeta::named(name),
        spec: VmSpec {
            cpus: 1,
            memory_mib: 256,
            running: true,
            disks: vec![Disk {
                name: "root".into(),
                size_bytes,
                image: None,
                replicas,
                source_volume: None,
                attach: None,
                attached_storage_name: None,
                added_at_epoch: None,
                protocol: Default::default(),
            }],
            kernel: Some(KernelBoot {
                kernel: "/boot/vmlinuz".into(),
                initrd: String::new(),
                cmdline: "console=ttyS0".into(),
            }),
            ..VmSpec::default()
        },
        ..Vm::default()
    }
}

/// The placement of VM `vm`, if it has one.
pub async fn placement(admin: &AdminClient, vm: &str) -> Option<Placement> {
    match admin.get(Kind::Placement, vm).await {
        Ok(Object::Placement(p)) => Some(p),
        _ => None,
    }
}

/// Whether node `node` is ready (its lease runs).
pub async fn ready(admin: &AdminClient, node: &str) -> bool {
    matches!(admin.get(Kind::Node, node).await, Ok(Object::Node(n)) if n.status.is_ready())
}

/// Publishes a replication address on `node`, as its agent does
/// (retrying a compare-and-swap that lost to a heartbeat's status).
pub async fn publish(admin: &AdminClient, node: &str, address: &str) {
    for _ in 0..10 {
        let Ok(Object::Node(mut n)) = admin.get(Kind::Node, node).await else {
            panic!("node {node} not found")
        };
        n.status.replication_address = address.into();
        if admin.update(Object::Node(n)).await.is_ok() {
            return;
        }
    }
    panic!("could not publish the address of {node}");
}
