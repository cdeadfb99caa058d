//! [`Policy`] ⇄ protobuf.

use super::{enum_value, required};
use crate::pb;
use crate::{ApiError, Policy, PolicyAction, PolicyProtocol, PolicyRule, PolicySpec};

impl From<PolicyAction> for pb::PolicyAction {
    fn from(action: PolicyAction) -> Self {
        match action {
            PolicyAction::Allow => pb::PolicyAction::Allow,
            PolicyAction::Deny => pb::PolicyAction::Deny,
        }
    }
}

impl From<PolicyProtocol> for pb::PolicyProtocol {
    fn from(protocol: PolicyProtocol) -> Self {
        match protocol {
            PolicyProtocol::Any => pb::PolicyProtocol::Any,
            PolicyProtocol::Tcp => pb::PolicyProtocol::Tcp,
            PolicyProtocol::Udp => pb::PolicyProtocol::Udp,
            PolicyProtocol::Icmp => pb::PolicyProtocol::Icmp,
        }
    }
}

fn rules_to_pb(rules: Option<Vec<PolicyRule>>) -> Option<pb::PolicyRules> {
    rules.map(|rules| pb::PolicyRules {
        rules: rules
            .into_iter()
            .map(|rule| pb::PolicyRule {
                action: pb::PolicyAction::from(rule.action).into(),
                cidr: rule.cidr.unwrap_or_default(),
                peer_selector: rule
                    .selector
                    .map(|labels| pb::PolicyPeerSelector { labels }),
                protocol: pb::PolicyProtocol::from(rule.protocol).into(),
                ports: rule.ports.unwrap_or_default(),
            })
            .collect(),
    })
}

fn rules_from_pb(
    rules: Option<pb::PolicyRules>,
    direction: &str,
) -> Result<Option<Vec<PolicyRule>>, ApiError> {
    let Some(rules) = rules else {
        return Ok(None);
    };
    rules
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, rule)| {
            let field = |name: &str| format!("spec.{direction}[{i}].{name}");
            let action = match enum_value(rule.action, &field("action"))? {
                pb::PolicyAction::Unspecified | pb::PolicyAction::Allow => PolicyAction::Allow,
                pb::PolicyAction::Deny => PolicyAction::Deny,
            };
            let protocol = match enum_value(rule.protocol, &field("protocol"))? {
                pb::PolicyProtocol::Any => PolicyProtocol::Any,
                pb::PolicyProtocol::Tcp => PolicyProtocol::Tcp,
                pb::PolicyProtocol::Udp => PolicyProtocol::Udp,
                pb::PolicyProtocol::Icmp => PolicyProtocol::Icmp,
            };
            Ok(PolicyRule {
                action,
                cidr: (!rule.cidr.is_empty()).then_some(rule.cidr),
                selector: rule.peer_selector.map(|s| s.labels),
                protocol,
                ports: (!rule.ports.is_empty()).then_some(rule.ports),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()
        .map(Some)
}

impl From<Policy> for pb::Policy {
    fn from(policy: Policy) -> Self {
        Self {
            meta: Some(policy.meta.into()),
            spec: Some(pb::PolicySpec {
                selector: policy.spec.selector,
                ingress: rules_to_pb(policy.spec.ingress),
                egress: rules_to_pb(policy.spec.egress),
            }),
        }
    }
}

impl TryFrom<pb::Policy> for Policy {
    type Error = ApiError;

    fn try_from(policy: pb::Policy) -> Result<Self, ApiError> {
        let spec = required(policy.spec, "policy.spec")?;
        let policy = Policy {
            meta: required(policy.meta, "policy.meta")?.into(),
            spec: PolicySpec {
                selector: spec.selector,
                ingress: rules_from_pb(spec.ingress, "ingress")?,
                egress: rules_from_pb(spec.egress, "egress")?,
            },
        };
        policy.validate()?;
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ObjectMeta;

    #[test]
    fn policies_survive_the_wire() {
        let policy = Policy {
            meta: ObjectMeta::named("db"),
            spec: PolicySpec {
                selector: BTreeMap::from([("app".into(), "db".into())]),
                ingress: Some(vec![
                    PolicyRule {
                        selector: Some(BTreeMap::from([("app".into(), "web".into())])),
                        protocol: PolicyProtocol::Tcp,
                        ports: Some("5432".into()),
                        ..PolicyRule::default()
                    },
                    PolicyRule {
                        action: PolicyAction::Deny,
                        cidr: Some("10.9.0.0/16".into()),
                        ..PolicyRule::default()
                    },
                ]),
                egress: Some(Vec::new()),
            },
        };
        let wire = pb::Policy::from(policy.clone());
        assert_eq!(Policy::try_from(wire), Ok(policy));
        let mut bad = pb::Policy::from(Policy {
            meta: ObjectMeta::named("x"),
            spec: PolicySpec::default(),
        });
        bad.spec.as_mut().unwrap().ingress = Some(pb::PolicyRules {
            rules: vec![pb::PolicyRule {
                protocol: 99,
                cidr: "10.0.0.0/8".into(),
                ..pb::PolicyRule::default()
            }],
        });
        assert!(matches!(
            Policy::try_from(bad),
            Err(ApiError::InvalidArgument { field, .. }) if field == "spec.ingress[0].protocol"
        ));
    }
}
