//! Basalt's VM networking: loads the TC eBPF programs of `ebpf/` with aya,
//! manages links, addresses, routes and VXLAN through rtnetlink, keeps the
//! endpoint, policy and connection-tracking maps in step with the control
//! plane, and answers DHCP on each VM tap.
//!
//! - [`abi`]: the map and event layouts shared with the C programs;
//! - [`model`]: endpoints, networks and policies as the control plane gives
//!   them;
//! - [`sync`]: compiling the model into map contents and writing only the
//!   difference ([`Datapath`]);
//! - [`loader`]: the aya loader, pinned maps and TCX links ([`Loader`]);
//! - [`conntrack`]: how long connection-tracking entries live (timeouts by
//!   protocol and state, swept from user space);
//! - [`netlink`]: links, addresses, routes and the VXLAN device;
//! - [`dhcp`]: a DHCP server per tap handing out the leased /32;
//! - [`nftables`]: source NAT on the node's uplink for egress, and guards
//!   that keep guest traffic the programs pass up from going elsewhere;
//! - [`tap`]: VM taps through `/dev/net/tun`.
//!
//! Invariants:
//! - a VM NIC sends only from its own MAC and IP;
//! - traffic is allowed until a policy selects an endpoint, then only what a
//!   policy allows passes, and a deny beats any allow;
//! - maps and links are pinned per node, so an agent restart keeps traffic
//!   flowing.

pub mod abi;
pub mod conntrack;
pub mod dhcp;
pub mod loader;
pub mod model;
pub mod netlink;
pub mod nftables;
pub mod sync;
pub mod tap;

pub use loader::{Hook, Loader};
pub use model::{Action, Cidr, Endpoint, Network, Peer, Policy, Protocol, Rule};
pub use netlink::Netlink;
pub use sync::{Datapath, NodeConfig, Routing};
