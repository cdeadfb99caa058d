//! Basalt's VM networking: loads the TC eBPF programs of `ebpf/` with aya,
//! manages links, addresses, routes and VXLAN through rtnetlink, keeps the
//! endpoint, policy and connection-tracking maps in step with the control
//! plane, and answers DHCP on each VM tap.
//!
//! Invariants:
//! - a VM NIC sends only from its own MAC and IP;
//! - traffic is allowed until a policy selects an endpoint, then only what a
//!   policy allows passes;
//! - maps are pinned per node, so an agent restart keeps traffic flowing.
//!
//! The datapath lands with the network issue; this crate holds its place in
//! the workspace until then.
