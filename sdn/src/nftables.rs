//! The node's nftables: source NAT for VM egress, and guards that keep
//! what the programs hand to the node's stack from going anywhere else.
//!
//! The programs pass up the stack only DHCP, packets to the gateway, ARP
//! replies and destinations outside the VM networks (see `ebpf/`). The
//! node routes the last out of its uplink, where they are masqueraded to
//! the node's address; replies are un-NATed by the kernel and routed to the
//! guest's /32 on its tap. A TCP flow whose first packet this node sees is
//! not a SYN is never masqueraded: it was opened elsewhere, typically a
//! connection from outside to a VM that has just moved here live, whose
//! replies must keep the VM's address (masqueraded, the peer would answer
//! them with a reset). The guards:
//! - forward: a packet that came in on a VM tap may leave only by the
//!   uplink, so the node's own routing can never carry guest-to-guest
//!   traffic around the programs' anti-spoofing and policy (should a tap
//!   ever lack its program);
//! - input: from a VM tap the node accepts only DHCP and ICMP, so guests
//!   cannot reach the node's own services (agent, storage) by address.
//!
//! Invariant: Basalt owns exactly one table, `inet basalt`, and replaces it
//! whole in one `nft` transaction, so applying is idempotent and never
//! leaves half a ruleset.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::model::Cidr;

/// The table Basalt owns.
pub const TABLE: &str = "basalt";

/// What the node's ruleset is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRules {
    /// The interface to the outside (masquerade happens there).
    pub uplink: String,
    /// Every VM tap's name starts with this.
    pub tap_prefix: String,
    /// The VM networks.
    pub networks: Vec<Cidr>,
}

/// `nft` failed, or the rules cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be run.
    #[error("could not run nft")]
    Spawn(#[source] std::io::Error),
    /// `nft` refused the ruleset.
    #[error("nft refused the ruleset: {stderr}")]
    Refused {
        /// What nft printed.
        stderr: String,
    },
    /// An interface name cannot be put in a ruleset.
    #[error("invalid interface name {0:?}")]
    Name(String),
}

fn check_name(name: &str) -> Result<(), NftError> {
    let valid = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(NftError::Name(name.to_owned()))
    }
}

/// The ruleset for `rules`.
pub fn ruleset(rules: &NodeRules) -> Result<String, NftError> {
    check_name(&rules.uplink)?;
    check_name(&rules.tap_prefix)?;
    let (uplink, taps) = (&rules.uplink, format!("{}*", rules.tap_prefix));
    // `add` then `delete` makes the delete succeed whether or not the table
    // existed; the whole file is one transaction.
    let mut s =
        format!("add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    s.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    // The nat chain sees only a flow's first packet: a TCP flow picked up
    // mid-stream (not a SYN) keeps its addresses.
    let _ = writeln!(
        s,
        "    oifname \"{uplink}\" meta l4proto tcp tcp flags & (syn | ack) != syn return"
    );
    for net in &rules.networks {
        let _ = writeln!(
            s,
            "    oifname \"{uplink}\" ip saddr {net} ip daddr != {net} masquerade"
        );
    }
    s.push_str("  }\n");
    s.push_str("  chain forward {\n    type filter hook forward priority filter; policy accept;\n");
    let _ = writeln!(s, "    iifname \"{taps}\" oifname != \"{uplink}\" drop");
    s.push_str("  }\n");
    s.push_str("  chain input {\n    type filter hook input priority filter; policy accept;\n");
    let _ = writeln!(s, "    iifname \"{taps}\" udp dport 67 accept");
    let _ = writeln!(s, "    iifname \"{taps}\" meta l4proto icmp accept");
    let _ = writeln!(
        s,
        "    iifname \"{taps}\" ct state established,related accept"
    );
    let _ = writeln!(s, "    iifname \"{taps}\" drop");
    s.push_str("  }\n}\n");
    Ok(s)
}

/// Installs (or replaces) the table in the calling thread's network
/// namespace.
pub fn apply(rules: &NodeRules) -> Result<(), NftError> {
    run_nft(&ruleset(rules)?)
}

/// Removes the table, if any.
pub fn remove() -> Result<(), NftError> {
    run_nft(&format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n"
    ))
}

fn run_nft(rules: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Refused {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(uplink: &str) -> NodeRules {
        NodeRules {
            uplink: uplink.into(),
            tap_prefix: "vmtap".into(),
            networks: vec!["10.77.0.0/16".parse().unwrap()],
        }
    }

    #[test]
    fn ruleset_masquerades_and_guards() {
        let s = ruleset(&rules("eth0")).unwrap();
        assert!(s.starts_with("add table inet basalt\ndelete table inet basalt\n"));
        assert!(s.contains(
            "oifname \"eth0\" ip saddr 10.77.0.0/16 ip daddr != 10.77.0.0/16 masquerade"
        ));
        let picked_up = s
            .find("tcp flags & (syn | ack) != syn return")
            .expect("mid-stream TCP flows are not masqueraded");
        assert!(picked_up < s.find("masquerade").expect("masquerade"));
        assert!(s.contains("iifname \"vmtap*\" oifname != \"eth0\" drop"));
        assert!(s.contains("iifname \"vmtap*\" drop"));
    }

    #[test]
    fn odd_interface_names_are_refused() {
        assert!(ruleset(&rules("eth0\"; flush ruleset")).is_err());
        assert!(ruleset(&rules("")).is_err());
        let mut r = rules("eth0");
        r.tap_prefix = "a b".into();
        assert!(ruleset(&r).is_err());
    }
}
