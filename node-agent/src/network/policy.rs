//! Policy objects (selectors by VM labels) → the datapath's policies
//! (selectors by label identity). Pure.
//!
//! The control plane gives every distinct label set one identity
//! (`endpoint.identity`); a policy's selector, and a rule's peer selector,
//! become the identities of the endpoints whose VM's labels match. All
//! VMs with one identity carry the same labels, so a selector picks whole
//! identities, never part of one.
//!
//! Limits: identity 0 (a VM without labels) can be a policy's subject, but
//! not a rule's peer by selector (name it by CIDR instead); a peer
//! selector that matches no VM yet contributes no rule until one appears.

use std::collections::{BTreeMap, BTreeSet};

use basalt_api::{Policy, PolicyAction, PolicyProtocol, PolicyRule, Vm, labels_match};
use basalt_sdn::model;

/// Every (identity, labels) the endpoints carry, from their VMs.
pub fn identities<'a>(
    endpoints: impl Iterator<Item = &'a basalt_api::Endpoint>,
    vms_by_uid: &BTreeMap<&str, &'a Vm>,
) -> BTreeMap<u32, &'a BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for endpoint in endpoints {
        if let Some(vm) = vms_by_uid.get(endpoint.vm_uid.as_str()) {
            out.insert(endpoint.identity, &vm.meta.labels);
        }
    }
    out
}

fn matching(
    selector: &BTreeMap<String, String>,
    identities: &BTreeMap<u32, &BTreeMap<String, String>>,
) -> BTreeSet<u32> {
    identities
        .iter()
        .filter(|(_, labels)| labels_match(selector, labels))
        .map(|(id, _)| *id)
        .collect()
}

fn rules(
    policy: &Policy,
    rules: &[PolicyRule],
    identities: &BTreeMap<u32, &BTreeMap<String, String>>,
) -> Result<Vec<model::Rule>, String> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let field = format!("rule {i}");
        let action = match rule.action {
            PolicyAction::Allow => model::Action::Allow,
            PolicyAction::Deny => model::Action::Deny,
        };
        let protocol = match rule.protocol {
            PolicyProtocol::Any => model::Protocol::Any,
            PolicyProtocol::Tcp => model::Protocol::Tcp,
            PolicyProtocol::Udp => model::Protocol::Udp,
            PolicyProtocol::Icmp => model::Protocol::Icmp,
        };
        let ports = rule.port_range(&field).map_err(|e| e.to_string())?;
        let peers: Vec<model::Peer> = match (&rule.cidr, &rule.selector) {
            (Some(_), _) => {
                let (ip, len) = rule
                    .peer_cidr(&field)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{field}: no cidr"))?;
                let cidr = model::Cidr::new(ip, len)
                    .ok_or_else(|| format!("{field}: {ip}/{len} is not a prefix"))?;
                vec![model::Peer::Cidr(cidr)]
            }
            (None, Some(selector)) => matching(selector, identities)
                .into_iter()
                .filter(|id| *id != 0)
                .map(model::Peer::Identity)
                .collect(),
            (None, None) => {
                return Err(format!(
                    "policy {}: {field} names no peer",
                    policy.meta.name
                ));
            }
        };
        out.extend(peers.into_iter().map(|peer| model::Rule {
            action,
            peer,
            protocol,
            ports,
        }));
    }
    Ok(out)
}

/// The datapath policies for `policies`, given the identities in use.
/// A policy that cannot be compiled is skipped and reported (name → why).
pub fn compile(
    policies: &BTreeMap<String, Policy>,
    identities: &BTreeMap<u32, &BTreeMap<String, String>>,
) -> (Vec<model::Policy>, BTreeMap<String, String>) {
    let mut out = Vec::new();
    let mut problems = BTreeMap::new();
    for policy in policies.values() {
        let selector = matching(&policy.spec.selector, identities);
        let compiled = (|| {
            let ingress = policy
                .spec
                .ingress
                .as_deref()
                .map(|r| rules(policy, r, identities))
                .transpose()?;
            let egress = policy
                .spec
                .egress
                .as_deref()
                .map(|r| rules(policy, r, identities))
                .transpose()?;
            Ok::<_, String>(model::Policy {
                name: policy.meta.name.clone(),
                selector,
                ingress,
                egress,
            })
        })();
        match compiled {
            Ok(p) => out.push(p),
            Err(why) => {
                problems.insert(format!("policy/{}", policy.meta.name), why);
            }
        }
    }
    (out, problems)
}

#[cfg(test)]
mod tests {
    use basalt_api::{ObjectMeta, PolicySpec};

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn selectors_become_identities() {
        let web = labels(&[("app", "web")]);
        let db = labels(&[("app", "db"), ("tier", "2")]);
        let none = BTreeMap::new();
        let ids = BTreeMap::from([(11, &web), (22, &db), (0, &none)]);
        let policy = Policy {
            meta: ObjectMeta::named("db"),
            spec: PolicySpec {
                selector: labels(&[("app", "db")]),
                ingress: Some(vec![
                    PolicyRule {
                        selector: Some(labels(&[("app", "web")])),
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
                egress: None,
            },
        };
        let (out, problems) = compile(&BTreeMap::from([("db".into(), policy)]), &ids);
        assert!(problems.is_empty(), "{problems:?}");
        let [p] = &out[..] else { panic!("{out:?}") };
        assert_eq!(p.selector, BTreeSet::from([22]));
        assert!(p.egress.is_none());
        let ingress = p.ingress.as_ref().unwrap();
        assert_eq!(ingress.len(), 2);
        assert_eq!(ingress[0].peer, model::Peer::Identity(11));
        assert_eq!(ingress[0].ports, (5432, 5432));
        assert_eq!(ingress[1].action, model::Action::Deny);
        assert_eq!(
            ingress[1].peer,
            model::Peer::Cidr("10.9.0.0/16".parse().unwrap())
        );
        // An empty selector selects every VM, the unlabelled ones too.
        let all = Policy {
            meta: ObjectMeta::named("all"),
            spec: PolicySpec {
                ingress: Some(Vec::new()),
                ..PolicySpec::default()
            },
        };
        let (out, _) = compile(&BTreeMap::from([("all".into(), all)]), &ids);
        assert_eq!(out[0].selector, BTreeSet::from([0, 11, 22]));
        assert_eq!(out[0].ingress.as_deref(), Some(&[][..]));
    }
}
