//! `basalt policy`: network policies. `apply -f FILE` creates or replaces
//! the policies a YAML stream declares (`kind: policy` documents), `list`
//! shows them (or only those selecting one VM), `delete` removes one.
//!
//! A policy file:
//!
//! ```yaml
//! kind: policy
//! meta: {name: db-from-web}
//! spec:
//!   selector: {app: db}          # the VMs it covers
//!   ingress:                     # traffic to them: only what is allowed
//!     - selector: {app: web}     # peers by VM labels ...
//!       protocol: tcp
//!       ports: "5432"
//!     - action: deny             # ... or by address
//!       cidr: 10.9.0.0/16
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use basalt_api::{AdminClient, ApiError, Kind, Object, Policy, PolicyAction, PolicyRule};

use crate::output::{self, Format};

/// What to do with network policies.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Create or replace the policies in a YAML file (`-` for stdin).
    Apply {
        /// The file: one `kind: policy` document, or a stream of several.
        #[arg(short, long)]
        file: String,
    },
    /// List policies.
    #[command(visible_alias = "ls")]
    List {
        /// Only the policies that select this VM.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Delete a policy: the VMs it selected are no longer held to it.
    Delete {
        /// The policy's name.
        name: String,
    },
}

/// `app=db,tier=2`, or `*` for every VM.
pub fn selector_text(selector: &BTreeMap<String, String>) -> String {
    if selector.is_empty() {
        return "*".into();
    }
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A direction's rules in one cell: `-` when not covered, `deny all` when
/// covered by no rule, else the rules.
pub fn rules_text(rules: Option<&[PolicyRule]>) -> String {
    let Some(rules) = rules else {
        return "-".into();
    };
    if rules.is_empty() {
        return "deny all".into();
    }
    let mut out = String::new();
    for (i, rule) in rules.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let action = match rule.action {
            PolicyAction::Allow => "allow",
            PolicyAction::Deny => "deny",
        };
        let peer = match (&rule.cidr, &rule.selector) {
            (Some(cidr), _) => cidr.clone(),
            (None, Some(labels)) => selector_text(labels),
            (None, None) => "?".into(),
        };
        let _ = write!(out, "{action} {peer} {:?}", rule.protocol);
        if let Some(ports) = &rule.ports {
            let _ = write!(out, ":{ports}");
        }
    }
    out.to_lowercase()
}

/// The policies in `path` (a YAML stream); every document must be a
/// policy.
fn read_policies(path: &str) -> anyhow::Result<Vec<Policy>> {
    crate::commands::read_objects(path)?
        .into_iter()
        .enumerate()
        .map(|(i, object)| match object {
            Object::Policy(policy) => Ok(policy),
            other => bail!(
                "{path}: document {} is a {}, not a policy",
                i + 1,
                other.kind()
            ),
        })
        .collect()
}

/// Creates `policy`, or replaces the stored one of that name.
async fn apply_one(client: &AdminClient, mut policy: Policy) -> anyhow::Result<&'static str> {
    let name = policy.meta.name.clone();
    loop {
        match client.get(Kind::Policy, &name).await {
            Ok(Object::Policy(current)) => {
                if current.spec == policy.spec && current.meta.labels == policy.meta.labels {
                    return Ok("unchanged");
                }
                policy.meta.resource_version = current.meta.resource_version;
                match client.update(Object::Policy(policy.clone())).await {
                    Ok(_) => return Ok("replaced"),
                    // Changed meanwhile: read it again.
                    Err(ApiError::Aborted { .. }) => continue,
                    Err(err) => return Err(err).context(format!("replacing policy/{name}")),
                }
            }
            Ok(other) => bail!("policy/{name} came back as a {}", other.kind()),
            Err(ApiError::NotFound { .. }) => {
                policy.meta.resource_version = 0;
                match client.create(Object::Policy(policy.clone())).await {
                    Ok(_) => return Ok("created"),
                    Err(ApiError::AlreadyExists { .. }) => continue,
                    Err(err) => return Err(err).context(format!("creating policy/{name}")),
                }
            }
            Err(err) => return Err(err).context(format!("reading policy/{name}")),
        }
    }
}

/// Runs one `basalt policy` command against the server at `server`.
pub async fn run(server: &str, format: Format, command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Apply { file } => {
            let policies = read_policies(&file)?;
            let client = AdminClient::connect(server).await?;
            for policy in policies {
                let name = policy.meta.name.clone();
                let what = apply_one(&client, policy).await?;
                println!("policy/{name} {what}");
            }
            Ok(())
        }
        PolicyCommand::List { vm } => {
            let client = AdminClient::connect(server).await?;
            let mut list = client.list(Kind::Policy).await?;
            if let Some(vm) = vm {
                let Object::Vm(vm) = client
                    .get(Kind::Vm, &vm)
                    .await
                    .with_context(|| format!("reading vm/{vm}"))?
                else {
                    bail!("vm/{vm} is not a vm");
                };
                list.objects.retain(|o| {
                    matches!(o, Object::Policy(p) if basalt_api::labels_match(&p.spec.selector, &vm.meta.labels))
                });
            }
            output::print_objects(format, Kind::Policy, &list.objects)
        }
        PolicyCommand::Delete { name } => {
            let client = AdminClient::connect(server).await?;
            client
                .delete(Kind::Policy, &name, None)
                .await
                .with_context(|| format!("deleting policy/{name}"))?;
            println!("policy/{name} deleted");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_file_reads_and_other_kinds_are_named() {
        let dir = std::env::temp_dir().join(format!("basalt-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.yaml");
        std::fs::write(
            &path,
            "kind: policy\nmeta: {name: db}\nspec:\n  selector: {app: db}\n  ingress:\n    - selector: {app: web}\n      protocol: tcp\n      ports: \"5432\"\n    - action: deny\n      cidr: 10.9.0.0/16\n",
        )
        .unwrap();
        let policies = read_policies(path.to_str().unwrap()).unwrap();
        assert_eq!(policies.len(), 1);
        let rules = policies[0].spec.ingress.as_deref();
        assert_eq!(
            rules_text(rules),
            "allow app=web tcp:5432; deny 10.9.0.0/16 any"
        );
        assert_eq!(rules_text(Some(&[])), "deny all");
        assert_eq!(rules_text(None), "-");

        std::fs::write(
            &path,
            "kind: network\nmeta: {name: n}\nspec: {cidr: 10.1.0.0/16, vni: 5}\n",
        )
        .unwrap();
        let err = format!("{:#}", read_policies(path.to_str().unwrap()).unwrap_err());
        assert!(err.contains("not a policy"), "{err}");
        std::fs::write(
            &path,
            "kind: policy\nmeta: {name: db}\nspec:\n  ingress:\n    - {cidr: 10.9.0.1/16}\n",
        )
        .unwrap();
        let err = format!("{:#}", read_policies(path.to_str().unwrap()).unwrap_err());
        assert!(err.contains("spec.ingress[0].cidr"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
