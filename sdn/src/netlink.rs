//! Links, addresses, routes and the VXLAN device, through rtnetlink.
//!
//! [`Netlink`] is a blocking facade: it owns a single-threaded tokio
//! runtime and one rtnetlink connection. The connection's socket belongs to
//! the network namespace of the thread that called [`Netlink::new`], for
//! its whole life, whichever thread uses it later.
//!
//! Every operation is idempotent (`replace` semantics), so a reconciler can
//! repeat it.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::model::Cidr;

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// A netlink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket or runtime could not be set up.
    #[error("could not open a netlink connection")]
    Connect(#[source] io::Error),
    /// No link of that name in this namespace.
    #[error("no link named {name}")]
    NoLink {
        /// The name.
        name: String,
    },
    /// The kernel has no route to an address.
    #[error("no route to {addr}")]
    NoRoute {
        /// The address.
        addr: Ipv4Addr,
    },
    /// The kernel refused a request.
    #[error("{what} failed")]
    Request {
        /// What was asked, e.g. `set link tap1 up`.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
}

/// A blocking rtnetlink connection, bound to the namespace it was made in.
#[derive(Debug)]
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace.
    pub fn new() -> Result<Netlink, NetlinkError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetlinkError::Connect)?;
        let (connection, handle, _) = {
            let _guard = runtime.enter();
            rtnetlink::new_connection().map_err(NetlinkError::Connect)?
        };
        runtime.spawn(connection);
        Ok(Netlink { runtime, handle })
    }

    fn request<T>(
        &self,
        what: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T, NetlinkError> {
        self.runtime
            .block_on(fut)
            .map_err(|source| NetlinkError::Request {
                what: what(),
                source,
            })
    }

    /// The link named `name`, if it exists.
    pub fn link(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match self.runtime.block_on(stream.try_next()) {
            Ok(link) => Ok(link),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(source) => Err(NetlinkError::Request {
                what: format!("get link {name}"),
                source,
            }),
        }
    }

    /// The names of every link in this namespace.
    pub fn link_names(&self) -> Result<Vec<String>, NetlinkError> {
        let stream = self.handle.link().get().execute();
        let links: Vec<LinkMessage> =
            self.request(|| "list links".to_owned(), stream.try_collect())?;
        Ok(links
            .iter()
            .filter_map(|l| {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some(name.clone()),
                    _ => None,
                })
            })
            .collect())
    }

    /// The ifindex of `name`.
    pub fn index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.link(name)?
            .map(|l| l.header.index)
            .ok_or_else(|| NetlinkError::NoLink {
                name: name.to_owned(),
            })
    }

    /// `name` as the datapath's maps need a tap: its ifindex, and whether
    /// it is a veth (whose other end packets can be handed to directly).
    pub fn tap_link(&self, name: &str) -> Result<crate::sync::TapLink, NetlinkError> {
        let link = self.link(name)?.ok_or_else(|| NetlinkError::NoLink {
            name: name.to_owned(),
        })?;
        let veth = link.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos
                .iter()
                .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
            _ => false,
        });
        Ok(crate::sync::TapLink {
            ifindex: link.header.index,
            veth,
        })
    }

    /// The MAC of `name`.
    pub fn mac(&self, name: &str) -> Result<Option<[u8; 6]>, NetlinkError> {
        let link = self.link(name)?.ok_or_else(|| NetlinkError::NoLink {
            name: name.to_owned(),
        })?;
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) if mac.len() == 6 => {
                let mut out = [0u8; 6];
                out.copy_from_slice(mac);
                Some(out)
            }
            _ => None,
        }))
    }

    /// Sets `name`'s MAC and MTU (when given) and brings it up.
    pub fn configure(
        &self,
        name: &str,
        mac: Option<[u8; 6]>,
        mtu: Option<u32>,
    ) -> Result<(), NetlinkError> {
        let index = self.index(name)?;
        let mut msg = LinkUnspec::new_with_index(index).up();
        if let Some(mac) = mac {
            msg = msg.address(mac.to_vec());
        }
        if let Some(mtu) = mtu {
            msg = msg.mtu(mtu);
        }
        self.request(
            || format!("configure link {name}"),
            self.handle.link().change(msg.build()).execute(),
        )
    }

    /// Adds (or keeps) `addr/len` on `name`.
    pub fn add_address(&self, name: &str, addr: Ipv4Addr, len: u8) -> Result<(), NetlinkError> {
        let index = self.index(name)?;
        self.request(
            || format!("add address {addr}/{len} to {name}"),
            self.handle
                .address()
                .add(index, IpAddr::V4(addr), len)
                .replace()
                .execute(),
        )
    }

    /// Routes `dst` straight out of `name` (scope link), replacing any
    /// route to the same prefix.
    pub fn route_via_link(&self, dst: Cidr, name: &str) -> Result<(), NetlinkError> {
        let index = self.index(name)?;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr, dst.len)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        self.request(
            || format!("route {dst} dev {name}"),
            self.handle.route().add(msg).replace().execute(),
        )
    }

    /// Routes `dst` via `gateway` (on-link, resolved by the kernel), marked
    /// with routing protocol number `protocol` so its owner can find it
    /// again; replaces any route to the same prefix.
    pub fn route_via_gateway(
        &self,
        dst: Cidr,
        gateway: Ipv4Addr,
        protocol: u8,
    ) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr, dst.len)
            .gateway(gateway)
            .protocol(RouteProtocol::from(protocol))
            .build();
        self.request(
            || format!("route {dst} via {gateway}"),
            self.handle.route().add(msg).replace().execute(),
        )
    }

    /// The IPv4 routes of the main table marked with `protocol`: each
    /// destination and its gateway (if it has one).
    pub fn routes_of_protocol(
        &self,
        protocol: u8,
    ) -> Result<Vec<(Cidr, Option<Ipv4Addr>)>, NetlinkError> {
        let stream = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let routes: Vec<RouteMessage> =
            self.request(|| "list routes".to_owned(), stream.try_collect())?;
        let wanted = RouteProtocol::from(protocol);
        Ok(routes
            .iter()
            .filter(|r| r.header.protocol == wanted)
            .map(|r| {
                let mut dst = None;
                let mut gateway = None;
                for attribute in &r.attributes {
                    match attribute {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(*a),
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
                        _ => {}
                    }
                }
                let cidr = Cidr {
                    addr: dst.unwrap_or(Ipv4Addr::UNSPECIFIED),
                    len: r.header.destination_prefix_length,
                };
                (cidr, gateway)
            })
            .collect())
    }

    /// Deletes the route to `dst` marked with `protocol`, if there is one.
    pub fn delete_route(&self, dst: Cidr, protocol: u8) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr, dst.len)
            .protocol(RouteProtocol::from(protocol))
            .build();
        match self
            .runtime
            .block_on(self.handle.route().del(msg).execute())
        {
            Ok(()) => Ok(()),
            // ESRCH: no such route.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                what: format!("delete route {dst}"),
                source,
            }),
        }
    }

    /// Prepares a VM tap's host side: the gateway's MAC (so frames the
    /// program passes up are addressed to the host), `169.254.1.1/32` (the
    /// source of the node's own packets to the guest, e.g. DHCP), up, and a
    /// route to the guest's /32 (return traffic from outside the VM
    /// networks).
    pub fn wire_tap(&self, tap: &str, guest: Ipv4Addr) -> Result<(), NetlinkError> {
        self.configure(tap, Some(crate::abi::GATEWAY_MAC), None)?;
        self.add_address(tap, crate::abi::GATEWAY_IP, 32)?;
        self.route_via_link(Cidr::host(guest), tap)
    }

    /// Makes sure the node's collect-metadata VXLAN device `name` exists
    /// (external mode: the programs choose VNI and remote per packet) and
    /// is up with `mtu`; returns its ifindex.
    pub fn ensure_vxlan(&self, name: &str, mtu: u32) -> Result<u32, NetlinkError> {
        if self.link(name)?.is_none() {
            let msg = LinkMessageBuilder::<LinkVxlan>::new(name)
                .collect_metadata(true)
                .port(VXLAN_PORT)
                .learning(false)
                .build();
            self.request(
                || format!("add vxlan device {name}"),
                self.handle.link().add(msg).execute(),
            )?;
        }
        self.configure(name, None, Some(mtu))?;
        self.index(name)
    }

    /// The next hop towards `addr` and the interface it is on, as the
    /// kernel's FIB has them (`ip route get ADDR`): `addr` itself when it
    /// is on-link, else the route's gateway.
    pub fn next_hop(&self, addr: Ipv4Addr) -> Result<(Ipv4Addr, u32), NetlinkError> {
        let what = || format!("route get {addr}");
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(addr, 32)
            .build();
        let mut stream = self.handle.route().get(msg).execute();
        let route = self
            .request(what, stream.try_next())?
            .ok_or(NetlinkError::NoRoute { addr })?;
        let mut hop = addr;
        let mut oif = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => hop = *gw,
                RouteAttribute::Oif(index) => oif = Some(*index),
                _ => {}
            }
        }
        let oif = oif.ok_or(NetlinkError::NoRoute { addr })?;
        Ok((hop, oif))
    }

    /// Keeps the next hop towards `addr` resolved: a *managed* neighbour
    /// entry for it (`ip neigh replace HOP dev IF managed`), which the
    /// kernel resolves at once and keeps resolved whether traffic flows or
    /// not. Native routing's receive side needs the MAC of the next hop
    /// towards each peer node to tell that node's frames from others'
    /// (`no-neighbour` drops while it is unknown). Does nothing when a
    /// managed entry is there already; returns the next hop.
    pub fn keep_resolved(&self, addr: Ipv4Addr) -> Result<Ipv4Addr, NetlinkError> {
        let (hop, oif) = self.next_hop(addr)?;
        let neighbours = self.managed_neighbours()?;
        if neighbours
            .iter()
            .any(|n| n.header.ifindex == oif && neighbour_is(n, hop))
        {
            return Ok(hop);
        }
        let mut add = self
            .handle
            .neighbours()
            .add(oif, IpAddr::V4(hop))
            .state(NeighbourState::None)
            .replace();
        add.message_mut()
            .attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        self.request(|| format!("neigh replace {hop} managed"), add.execute())?;
        Ok(hop)
    }

    /// The IPv4 neighbour entries that are managed.
    fn managed_neighbours(&self) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        let all: Vec<NeighbourMessage> = self.request(
            || "neigh show".to_owned(),
            self.handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Inet)
                .execute()
                .try_collect(),
        )?;
        Ok(all
            .into_iter()
            .filter(|n| {
                n.attributes.iter().any(|a| {
                    matches!(a, NeighbourAttribute::ExtFlags(f) if f.contains(NeighbourExtFlags::Managed))
                })
            })
            .collect())
    }

    /// Removes the managed neighbour entry [`Netlink::keep_resolved`] made
    /// for the next hop `hop` (a no-op if there is none).
    pub fn forget_resolved(&self, hop: Ipv4Addr) -> Result<(), NetlinkError> {
        let neighbours = self.managed_neighbours()?;
        for n in neighbours {
            if neighbour_is(&n, hop) {
                self.request(
                    || format!("neigh del {hop}"),
                    self.handle.neighbours().del(n).execute(),
                )?;
            }
        }
        Ok(())
    }

    /// Deletes `name` if it exists.
    pub fn delete(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(link) = self.link(name)? else {
            return Ok(());
        };
        self.request(
            || format!("delete link {name}"),
            self.handle.link().del(link.header.index).execute(),
        )
    }
}

/// Whether neighbour entry `n` is the one of `addr`.
fn neighbour_is(n: &NeighbourMessage, addr: Ipv4Addr) -> bool {
    n.attributes
        .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(
            addr,
        )))
}
