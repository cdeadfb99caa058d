//! [`Policy`]: which traffic reaches (ingress) and leaves (egress) the VMs
//! whose labels match a selector.
//!
//! Semantics (enforced by every node's datapath): traffic is allowed until
//! a policy selects a VM for a direction; from then on only what some
//! policy allows passes, and a matching deny beats any allow. Peers are
//! other VMs by their labels, or addresses by CIDR. Replies of an allowed
//! connection always pass.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{ObjectMeta, validate};
use crate::ApiError;

/// The most rules one direction of a policy may have.
pub const MAX_POLICY_RULES: usize = 16;

/// A network policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Name and versions.
    pub meta: ObjectMeta,
    /// What the operator declares.
    pub spec: PolicySpec,
}

/// What a policy selects and what it allows or denies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySpec {
    /// The labels a VM must all carry to be selected; empty selects every
    /// VM.
    pub selector: BTreeMap<String, String>,
    /// Rules for traffic to the selected VMs; `None`: this policy does not
    /// cover ingress (`Some` of no rules denies all of it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<PolicyRule>>,
    /// Rules for traffic from the selected VMs; `None`: not covered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<PolicyRule>>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    /// Let matching traffic through.
    #[default]
    Allow,
    /// Drop matching traffic, whatever allows it.
    Deny,
}

/// The IP protocol a rule matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyProtocol {
    /// Every protocol.
    #[default]
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
}

/// One rule: an action for traffic with one peer (VMs by labels, or
/// addresses by CIDR — exactly one), a protocol and destination ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyRule {
    /// Allow (the default) or deny.
    pub action: PolicyAction,
    /// The peer by address: "a.b.c.d/len".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// The peer by labels: VMs carrying all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// The protocol (any by default).
    pub protocol: PolicyProtocol,
    /// Destination ports, "80" or "8000-8080"; `None` for all. Only with
    /// TCP or UDP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<String>,
}

impl PolicyRule {
    /// The destination port range, inclusive (`0..=65535` when unset);
    /// errors name `field`.
    pub fn port_range(&self, field: &str) -> Result<(u16, u16), ApiError> {
        let Some(text) = &self.ports else {
            return Ok((0, u16::MAX));
        };
        let invalid = |reason: &str| ApiError::invalid(field, format!("{text:?}: {reason}"));
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| invalid("ports are numbers 0-65535, as \"80\" or \"8000-8080\""))
        };
        let (lo, hi) = match text.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => {
                let p = port(text)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(invalid("the range is reversed"));
        }
        Ok((lo, hi))
    }

    /// The peer prefix, when the peer is given by CIDR; errors name
    /// `field`.
    pub fn peer_cidr(&self, field: &str) -> Result<Option<(Ipv4Addr, u8)>, ApiError> {
        let Some(text) = &self.cidr else {
            return Ok(None);
        };
        let invalid = |reason: &str| ApiError::invalid(field, format!("{text:?}: {reason}"));
        let (ip, len) = text.split_once('/').unwrap_or((text, "32"));
        let ip: Ipv4Addr = ip.parse().map_err(|_| invalid("not an IPv4 address"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| invalid("the prefix length must be 0-32"))?;
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        if u32::from(ip) & !mask != 0 {
            return Err(invalid("host bits are set"));
        }
        Ok(Some((ip, len)))
    }

    fn validate(&self, field: &str) -> Result<(), ApiError> {
        match (&self.cidr, &self.selector) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(ApiError::invalid(
                    field,
                    "a rule names its peer by exactly one of cidr or selector",
                ));
            }
            (Some(_), None) => {
                self.peer_cidr(&format!("{field}.cidr"))?;
            }
            (None, Some(labels)) => validate::labels(&format!("{field}.selector"), labels)?,
        }
        let ports = format!("{field}.ports");
        self.port_range(&ports)?;
        if self.ports.is_some()
            && !matches!(self.protocol, PolicyProtocol::Tcp | PolicyProtocol::Udp)
        {
            return Err(ApiError::invalid(ports, "ports need protocol tcp or udp"));
        }
        Ok(())
    }
}

/// Whether a VM with `labels` carries every label of `selector`.
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Policy {
    /// Checks every field; errors name the field's path, e.g.
    /// `spec.ingress[0].ports`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        validate::labels("spec.selector", &self.spec.selector)?;
        for (direction, rules) in [
            ("ingress", &self.spec.ingress),
            ("egress", &self.spec.egress),
        ] {
            let Some(rules) = rules else { continue };
            if rules.len() > MAX_POLICY_RULES {
                return Err(ApiError::invalid(
                    format!("spec.{direction}"),
                    format!("at most {MAX_POLICY_RULES} rules"),
                ));
            }
            for (i, rule) in rules.iter().enumerate() {
                rule.validate(&format!("spec.{direction}[{i}]"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(result: Result<(), ApiError>) -> String {
        match result {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    fn policy(rule: PolicyRule) -> Policy {
        Policy {
            meta: ObjectMeta::named("p"),
            spec: PolicySpec {
                selector: BTreeMap::from([("app".into(), "db".into())]),
                ingress: Some(vec![rule]),
                egress: None,
            },
        }
    }

    #[test]
    fn rules_need_one_peer_and_sane_ports() {
        let good = PolicyRule {
            selector: Some(BTreeMap::from([("app".into(), "web".into())])),
            protocol: PolicyProtocol::Tcp,
            ports: Some("5432".into()),
            ..PolicyRule::default()
        };
        policy(good.clone()).validate().unwrap();
        assert_eq!(good.port_range("p").unwrap(), (5432, 5432));
        let mut both = good.clone();
        both.cidr = Some("10.0.0.0/8".into());
        assert_eq!(field(policy(both).validate()), "spec.ingress[0]");
        let mut reversed = good.clone();
        reversed.ports = Some("90-80".into());
        assert_eq!(field(policy(reversed).validate()), "spec.ingress[0].ports");
        let mut icmp_ports = good.clone();
        icmp_ports.protocol = PolicyProtocol::Icmp;
        assert_eq!(
            field(policy(icmp_ports).validate()),
            "spec.ingress[0].ports"
        );
        let cidr = PolicyRule {
            cidr: Some("10.1.0.1/16".into()),
            ..PolicyRule::default()
        };
        assert_eq!(field(policy(cidr).validate()), "spec.ingress[0].cidr");
        let cidr = PolicyRule {
            cidr: Some("0.0.0.0/0".into()),
            action: PolicyAction::Deny,
            ..PolicyRule::default()
        };
        policy(cidr).validate().unwrap();
    }

    #[test]
    fn documents_read_as_an_operator_writes_them() {
        let p: Policy = serde_json::from_value(serde_json::json!({
            "meta": {"name": "db"},
            "spec": {
                "selector": {"app": "db"},
                "ingress": [
                    {"selector": {"app": "web"}, "protocol": "tcp", "ports": "8000-8080"},
                    {"action": "deny", "cidr": "10.9.0.0/16"}
                ]
            }
        }))
        .unwrap();
        p.validate().unwrap();
        let rules = p.spec.ingress.as_ref().unwrap();
        assert_eq!(rules[0].port_range("x").unwrap(), (8000, 8080));
        assert_eq!(rules[1].action, PolicyAction::Deny);
        assert!(p.spec.egress.is_none());
        let typo = serde_json::json!({"spec": {"selectr": {}}});
        assert!(serde_json::from_value::<Policy>(typo).is_err());
    }

    #[test]
    fn selectors_match_subsets() {
        let labels = BTreeMap::from([("app".into(), "db".into()), ("tier".into(), "2".into())]);
        assert!(labels_match(&BTreeMap::new(), &labels));
        assert!(labels_match(
            &BTreeMap::from([("app".into(), "db".into())]),
            &labels
        ));
        assert!(!labels_match(
            &BTreeMap::from([("app".into(), "web".into())]),
            &labels
        ));
    }
}
