//! The host side of a guest's tap: how a node routes to a guest whose
//! address is a `/32` behind the link-local [`GATEWAY`].
//!
//! The tap takes `GATEWAY/32` (so the node answers the guest's ARP for its
//! gateway) and a route `GUEST/32 dev TAP` (so the node reaches the guest,
//! and answers ARP with a source the guest can route back to). Whoever
//! starts the guest creates the tap (libvirt, or QEMU's `-netdev tap`), and
//! it vanishes with the guest: wire it again after every start.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::GATEWAY;
use crate::cmd::CommandError;
use crate::netns::Node;

/// The tap could not be wired.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The tap did not appear in the node in time.
    #[error("tap {tap} did not appear in {netns} within {waited:?}")]
    Missing {
        /// The tap's name.
        tap: String,
        /// The node's namespace.
        netns: String,
        /// How long it was waited for.
        waited: Duration,
    },
    /// An `ip` command failed.
    #[error("could not wire tap {tap} in {netns}")]
    Ip {
        /// The tap's name.
        tap: String,
        /// The node's namespace.
        netns: String,
        /// The failed command.
        #[source]
        source: CommandError,
    },
}

/// Whether `tap` exists in `node`'s namespace.
pub fn tap_exists(node: &Node, tap: &str) -> bool {
    node.ip(&["link", "show", "dev", tap]).is_ok()
}

/// Waits up to `timeout` for `tap` to appear in `node`, then brings it up
/// with [`GATEWAY`]`/32` and a route to `guest`. Idempotent.
pub fn wire_tap(
    node: &Node,
    tap: &str,
    guest: Ipv4Addr,
    timeout: Duration,
) -> Result<(), TapError> {
    let started = Instant::now();
    while !tap_exists(node, tap) {
        if started.elapsed() >= timeout {
            return Err(TapError::Missing {
                tap: tap.to_owned(),
                netns: node.netns().to_owned(),
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ip = |args: &[&str]| {
        node.ip(args).map_err(|source| TapError::Ip {
            tap: tap.to_owned(),
            netns: node.netns().to_owned(),
            source,
        })
    };
    ip(&["link", "set", "dev", tap, "up"])?;
    ip(&["addr", "replace", &format!("{GATEWAY}/32"), "dev", tap])?;
    ip(&["route", "replace", &format!("{guest}/32"), "dev", tap])?;
    Ok(())
}
