//! The suites, each a function from options to a report.

use crate::report::Report;

mod datapath;
mod endpoint_move;
mod failover;
mod guest_boot;
mod ha;
mod migration;
mod nbd;
mod policy_update;
mod raft;
mod replication;
mod scheduler;
mod snapshot;
mod vm_lifecycle;

/// Options every suite may use.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Repetitions of a whole operation, when the suite has one.
    pub runs: Option<usize>,
}

/// A named suite.
#[derive(Debug)]
pub struct Suite {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Options) -> anyhow::Result<Report>,
}

pub const ALL: &[Suite] = &[
    Suite {
        name: "guest-boot",
        about: "libvirt define to the test guest answering, against plain QEMU booting the same guest",
        run: guest_boot::run,
    },
    Suite {
        name: "datapath",
        about: "TCP throughput, 64-byte UDP rate, request/response latency and per-packet program cost across two nodes: eBPF + VXLAN against kernel routing + nftables, at 0 to 10 000 rules",
        run: datapath::run,
    },
    Suite {
        name: "endpoint-move",
        about: "an endpoint moves between nodes under a peer's TCP ping-pong: activation to every node forwarding, and the peer's longest gap",
        run: endpoint_move::run,
    },
    Suite {
        name: "policy-update",
        about: "a committed policy change (create, delete) to its enforcement in every node's eBPF maps, 3 namespace nodes running basaltd agent --network",
        run: policy_update::run,
    },
    Suite {
        name: "nbd",
        about: "fio through NBD: Basalt against qemu-nbd, nbdkit file, nbdkit null and local O_DIRECT",
        run: nbd::run,
    },
    Suite {
        name: "replication",
        about: "4 KiB random writes through NBD with 2 replicas (protocol C, loopback) against 1, and the bytes and speed of a dirty-chunk resync",
        run: replication::run,
    },
    Suite {
        name: "snapshot",
        about: "snapshot and clone creation of half-allocated 1, 8 and 100 GiB thin volumes, and first-write / copy-on-write latency, against qcow2 internal snapshots (qemu-img snapshot -c)",
        run: snapshot::run,
    },
    Suite {
        name: "ha",
        about: "node loss (kill -9 of its agent) to the VM running on another node, simulated compute, default timing: against Proxmox VE's and Harvester's documented recovery times",
        run: ha::run,
    },
    Suite {
        name: "failover",
        about: "the control-plane leader killed (kill -9) under a steady write load, again and again: the client-visible write outage",
        run: failover::run,
    },
    Suite {
        name: "vm-lifecycle",
        about: "basalt vm create to the test guest answering, and delete to its domain gone, for 1 VM and 10 at once (TCG, one namespace node with the real stack), against virsh create/destroy of the same domain XML",
        run: vm_lifecycle::run,
    },
    Suite {
        name: "migration",
        about: "live migration of a running TCG guest between two nodes with the agents' eBPF datapath: downtime by ICMP and TCP probes from a peer VM on a third node, and total time, against Deckhouse's published ~100 ms",
        run: migration::run,
    },
    Suite {
        name: "raft",
        about: "replicated writes, 3 members on loopback with fsync, 1/16/64 clients, 256-byte values: Basalt's control plane against etcd",
        run: raft::run,
    },
    Suite {
        name: "scheduler",
        about: "placements/s for 1 000 nodes × 10 000 VMs: the pure planner, and end to end through 3 Raft members (VMs created, and nodes joining a backlog), against issue 3's goals",
        run: scheduler::run,
    },
];
