//! Egress to addresses outside the VM networks: source NAT (masquerade) on
//! the node's uplink, with nftables.
//!
//! The programs pass such packets up the node's stack; the node routes them
//! out of its uplink, and the rule here rewrites their source to the
//! node's address. Replies are un-NATed by the kernel and routed to the
//! guest's /32 on its tap.
//!
//! Invariant: Basalt owns exactly one table, `ip basalt_snat`, and
//! replaces it whole in one `nft` transaction, so applying is idempotent and
//! never leaves half a ruleset.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::model::Cidr;

/// The table Basalt owns.
pub const TABLE: &str = "basalt_snat";

/// `nft` failed.
#[derive(Debug, thiserror::Error)]
pub enum SnatError {
    /// `nft` could not be run.
    #[error("could not run nft")]
    Spawn(#[source] std::io::Error),
    /// `nft` refused the ruleset.
    #[error("nft refused the ruleset: {stderr}")]
    Refused {
        /// What nft printed.
        stderr: String,
    },
    /// The uplink's name cannot be put in a ruleset.
    #[error("invalid uplink name {0:?}")]
    Uplink(String),
}

/// The ruleset masquerading `networks` out of `uplink`.
pub fn ruleset(uplink: &str, networks: &[Cidr]) -> Result<String, SnatError> {
    let valid = !uplink.is_empty()
        && uplink.len() <= 15
        && uplink
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid {
        return Err(SnatError::Uplink(uplink.to_owned()));
    }
    // `add` then `delete` makes the delete succeed whether or not the table
    // existed; the whole file is one transaction.
    let mut rules = format!("add table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    rules.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    for net in networks {
        rules.push_str(&format!(
            "    oifname \"{uplink}\" ip saddr {net} ip daddr != {net} masquerade\n"
        ));
    }
    rules.push_str("  }\n}\n");
    Ok(rules)
}

/// Installs (or replaces) the SNAT table in the calling thread's network
/// namespace.
pub fn apply(uplink: &str, networks: &[Cidr]) -> Result<(), SnatError> {
    let rules = ruleset(uplink, networks)?;
    run_nft(&rules)
}

/// Removes the SNAT table, if any.
pub fn remove() -> Result<(), SnatError> {
    run_nft(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"))
}

fn run_nft(rules: &str) -> Result<(), SnatError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(SnatError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(SnatError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(SnatError::Spawn)?;
    if !out.status.success() {
        return Err(SnatError::Refused {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_masquerades_each_network_out_of_the_uplink() {
        let rules = ruleset("eth0", &["10.77.0.0/16".parse().unwrap()]).unwrap();
        assert!(rules.contains(
            "oifname \"eth0\" ip saddr 10.77.0.0/16 ip daddr != 10.77.0.0/16 masquerade"
        ));
        assert!(rules.starts_with("add table ip basalt_snat\ndelete table ip basalt_snat\n"));
    }

    #[test]
    fn odd_uplink_names_are_refused() {
        assert!(ruleset("eth0\"; flush ruleset", &[]).is_err());
        assert!(ruleset("", &[]).is_err());
    }
}
