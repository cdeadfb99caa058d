//! Routes to every VM address through the node that holds it, for a host
//! beside the nodes that is not itself a node (the lab's root namespace, a
//! router on the nodes' network).
//!
//! A VM's address belongs to the VM, not to a node (DESIGN.md, Network):
//! when it moves by live migration or HA, a route to its network through
//! one fixed node would go on pointing at a node that no longer holds it
//! (or that is gone). So the host gets one /32 per endpoint, via the
//! underlay address of the node that holds it, updated as the endpoint
//! moves. The holder delivers to its tap like any routed packet, and its
//! replies go back straight to the host.
//!
//! Parts: [`plan`] (pure: endpoints and nodes to routes), [`apply`] (the
//! difference, through `basalt-sdn`'s netlink), [`follow`] (lists endpoints
//! and nodes, applies, then watches both kinds and applies again on every
//! change; lists again when the watch breaks).
//!
//! Invariants: the routes made here carry routing protocol number
//! [`ROUTE_PROTOCOL`] and nothing else is ever changed or removed, so a
//! restarted follower takes over its predecessor's routes and leaves the
//! host's own alone; an endpoint that is released, unplaced, or whose node
//! has no known address has no route (the host's broader routes, if any,
//! apply).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use basalt_api::{AdminClient, ApiError, Endpoint, Kind, Node, Object, WatchEvent};
use basalt_sdn::netlink::NetlinkError;
use basalt_sdn::{Cidr, Netlink};
use futures::StreamExt as _;

use super::plan::node_address;

/// The routing protocol number that marks the routes this module owns
/// (`ip route show proto 186`).
pub const ROUTE_PROTOCOL: u8 = 186;

/// The routes a host needs: each endpoint's address → the underlay address
/// of the node that holds it. Released or unplaced endpoints, and those on
/// a node without a known address, get none.
pub fn plan<'a>(
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
    nodes: &BTreeMap<String, Node>,
) -> BTreeMap<Ipv4Addr, Ipv4Addr> {
    endpoints
        .into_iter()
        .filter(|ep| ep.release_at_unix_ms == 0 && !ep.node.is_empty())
        .filter_map(|ep| {
            let via = nodes.get(&ep.node).and_then(node_address)?;
            Some((ep.ip?, via))
        })
        .collect()
}

/// What one [`apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Routes added or pointed at another node.
    pub set: usize,
    /// Routes removed.
    pub removed: usize,
}

/// Makes the routes marked [`ROUTE_PROTOCOL`] in `netlink`'s namespace
/// exactly `want`: sets the missing and moved ones, removes the others.
pub fn apply(
    netlink: &Netlink,
    want: &BTreeMap<Ipv4Addr, Ipv4Addr>,
) -> Result<Applied, NetlinkError> {
    let have: BTreeMap<Ipv4Addr, Option<Ipv4Addr>> = netlink
        .routes_of_protocol(ROUTE_PROTOCOL)?
        .into_iter()
        .filter(|(dst, _)| dst.len == 32)
        .map(|(dst, via)| (dst.addr, via))
        .collect();
    let mut applied = Applied::default();
    for (&ip, &via) in want {
        if have.get(&ip) != Some(&Some(via)) {
            netlink.route_via_gateway(Cidr::host(ip), via, ROUTE_PROTOCOL)?;
            applied.set += 1;
        }
    }
    for &ip in have.keys() {
        if !want.contains_key(&ip) {
            netlink.delete_route(Cidr::host(ip), ROUTE_PROTOCOL)?;
            applied.removed += 1;
        }
    }
    Ok(applied)
}

/// Keeps a namespace routed to every endpoint through its holder, forever
/// (until the task is dropped). `netlink` must have been opened in the
/// namespace to route; `admins` are clients of the control-plane members,
/// tried in turn (a round that fails moves to the next).
pub async fn follow(admins: Vec<AdminClient>, netlink: Netlink) {
    let netlink = Arc::new(netlink);
    for admin in admins.iter().cycle() {
        match follow_once(admin, &netlink).await {
            Err(FollowError::Api(ApiError::OutOfRange { .. })) => {
                tracing::info!("host routes: watch fell behind the compacted log; listing again");
                continue;
            }
            Err(err) => tracing::warn!(error = %err, "host routes: listing again"),
            Ok(()) => tracing::debug!("host routes: watch ended; listing again"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::error!("host routes: no control-plane member to follow");
}

/// Why one round of [`follow`] ended.
#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error("control plane")]
    Api(#[from] ApiError),
    #[error("routes")]
    Routes(#[from] NetlinkError),
    #[error("the route-writing task ended abnormally")]
    Task(#[from] tokio::task::JoinError),
}

/// [`apply`] off the async threads (netlink calls block).
async fn apply_blocking(
    netlink: &Arc<Netlink>,
    want: BTreeMap<Ipv4Addr, Ipv4Addr>,
) -> Result<Applied, FollowError> {
    let netlink = Arc::clone(netlink);
    Ok(tokio::task::spawn_blocking(move || apply(&netlink, &want)).await??)
}

async fn follow_once(admin: &AdminClient, netlink: &Arc<Netlink>) -> Result<(), FollowError> {
    let nodes_list = admin.list(Kind::Node).await?;
    let endpoints_list = admin.list(Kind::Endpoint).await?;
    let mut nodes = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    for object in nodes_list.objects.into_iter().chain(endpoints_list.objects) {
        match object {
            Object::Node(n) => drop(nodes.insert(n.meta.name.clone(), n)),
            Object::Endpoint(e) => drop(endpoints.insert(e.meta.name.clone(), e)),
            _ => {}
        }
    }
    let listed = [
        (Kind::Node, nodes_list.resource_version),
        (Kind::Endpoint, endpoints_list.resource_version),
    ];
    let from = listed[0].1.min(listed[1].1);
    let applied = apply_blocking(netlink, plan(endpoints.values(), &nodes)).await?;
    tracing::info!(
        endpoints = endpoints.len(),
        set = applied.set,
        removed = applied.removed,
        "host routes: resynced"
    );
    let mut events = admin.watch(None, from).await?;
    while let Some(event) = events.next().await {
        let event = event?;
        // A kind's list already holds its changes up to its version.
        let seen = event.object().is_some_and(|o| {
            listed
                .iter()
                .any(|(kind, rv)| *kind == o.kind() && event.resource_version() <= *rv)
        });
        if seen {
            continue;
        }
        let changed = match event {
            WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. } => {
                match object {
                    Object::Node(n) => {
                        nodes.insert(n.meta.name.clone(), n);
                        true
                    }
                    Object::Endpoint(e) => {
                        endpoints.insert(e.meta.name.clone(), e);
                        true
                    }
                    _ => false,
                }
            }
            WatchEvent::Deleted { object, .. } => match object.kind() {
                Kind::Node => nodes.remove(object.name()).is_some(),
                Kind::Endpoint => endpoints.remove(object.name()).is_some(),
                _ => false,
            },
            WatchEvent::Bookmark { .. } => false,
        };
        if changed {
            let applied = apply_blocking(netlink, plan(endpoints.values(), &nodes)).await?;
            if applied != Applied::default() {
                tracing::info!(
                    set = applied.set,
                    removed = applied.removed,
                    "host routes: followed an endpoint or node change"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_api::{NodeSpec, ObjectMeta};

    fn node(name: &str, address: &str) -> (String, Node) {
        let node = Node {
            meta: ObjectMeta::named(name),
            spec: NodeSpec {
                address: address.into(),
                ..NodeSpec::default()
            },
            ..Node::default()
        };
        (name.to_owned(), node)
    }

    fn endpoint(last: u8, node: &str) -> Endpoint {
        let ip = Ipv4Addr::new(10, 80, 0, last);
        Endpoint {
            meta: ObjectMeta::named(Endpoint::name_for(ip)),
            network: "lab".into(),
            ip: Some(ip),
            node: node.into(),
            ..Endpoint::default()
        }
    }

    #[test]
    fn each_endpoint_is_routed_through_its_holder_only() {
        let nodes = BTreeMap::from([node("n1", "10.0.0.1:7500"), node("n2", "10.0.0.2")]);
        let mut released = endpoint(4, "n1");
        released.release_at_unix_ms = 1;
        let no_ip = Endpoint {
            ip: None,
            ..endpoint(5, "n1")
        };
        let eps = [
            endpoint(1, "n1"),
            endpoint(2, "n2"),
            endpoint(3, ""),
            released,
            no_ip,
            endpoint(6, "gone"),
        ];
        let routes = plan(&eps, &nodes);
        assert_eq!(
            routes,
            BTreeMap::from([
                (Ipv4Addr::new(10, 80, 0, 1), Ipv4Addr::new(10, 0, 0, 1)),
                (Ipv4Addr::new(10, 80, 0, 2), Ipv4Addr::new(10, 0, 0, 2)),
            ])
        );
        // The VM moves: its route follows.
        let moved = [endpoint(1, "n2")];
        assert_eq!(
            plan(&moved, &nodes)[&Ipv4Addr::new(10, 80, 0, 1)],
            Ipv4Addr::new(10, 0, 0, 2)
        );
    }
}
