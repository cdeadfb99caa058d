//! `basalt network`: VM networks. `create` declares one (its CIDR, VXLAN
//! VNI and, optionally, how nodes carry it: `--routing overlay|native`;
//! without it each node's agent default applies), `list` shows them.
//! The control plane checks the CIDR overlaps no other network and the
//! VNI is unique; errors name the field.

use anyhow::{Context as _, bail};
use basalt_api::{AdminClient, Kind, Network, NetworkRouting, NetworkSpec, Object, ObjectMeta};

use crate::output::{self, Format};

/// What to do with VM networks.
#[derive(Debug, clap::Subcommand)]
pub enum NetworkCommand {
    /// Create a VM network.
    Create {
        /// The network's name (VM NICs name it).
        name: String,
        /// Its addresses, "a.b.c.d/len" (8-30), overlapping no other network.
        #[arg(long)]
        cidr: String,
        /// Its VXLAN network identifier, 1 to 16777215, unique.
        #[arg(long)]
        vni: u32,
        /// How nodes carry its packets between them: `overlay` (VXLAN) or
        /// `native` (unencapsulated, to the owner node as next hop: one L2
        /// segment, or routers that route the CIDR to the nodes). Default:
        /// each node's agent setting (`--net-routing`).
        #[arg(long, value_parser = parse_routing)]
        routing: Option<NetworkRouting>,
    },
    /// List VM networks.
    #[command(visible_alias = "ls")]
    List,
}

/// Parses `overlay` or `native`.
fn parse_routing(text: &str) -> Result<NetworkRouting, String> {
    match NetworkRouting::parse("--routing", text) {
        Ok(Some(routing)) => Ok(routing),
        Ok(None) => Err("expected overlay or native".into()),
        Err(err) => Err(err.to_string()),
    }
}

/// Runs a `basalt network` command against `server`.
pub async fn run(server: &str, format: Format, command: NetworkCommand) -> anyhow::Result<()> {
    let client = AdminClient::connect(server).await?;
    match command {
        NetworkCommand::Create {
            name,
            cidr,
            vni,
            routing,
        } => {
            let object = Object::Network(Network {
                meta: ObjectMeta::named(name.clone()),
                spec: NetworkSpec { cidr, vni, routing },
            });
            object.validate()?;
            let created = client
                .create(object)
                .await
                .with_context(|| format!("creating network {name}"))?;
            let Object::Network(network) = &created else {
                bail!(
                    "the server answered a network create with a {}",
                    created.kind()
                );
            };
            match format {
                Format::Table => {
                    println!(
                        "network/{} created: {}, vni {}, routing {}",
                        network.meta.name,
                        network.spec.cidr,
                        network.spec.vni,
                        routing_text(network.spec.routing)
                    );
                    Ok(())
                }
                _ => output::print_objects(format, Kind::Network, std::slice::from_ref(&created)),
            }
        }
        NetworkCommand::List => {
            let list = client
                .list(Kind::Network)
                .await
                .context("listing networks")?;
            output::print_objects(format, Kind::Network, &list.objects)
        }
    }
}

/// A network's routing mode for tables: `overlay`, `native`, or
/// `node default` when it leaves it to the nodes.
pub fn routing_text(routing: Option<NetworkRouting>) -> &'static str {
    routing.map_or("node default", NetworkRouting::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_flag_takes_the_two_modes_only() {
        assert_eq!(parse_routing("native"), Ok(NetworkRouting::Native));
        assert_eq!(parse_routing("overlay"), Ok(NetworkRouting::Overlay));
        let err = parse_routing("vxlan").unwrap_err();
        assert!(err.contains("--routing"), "{err}");
        assert!(parse_routing("").is_err());
        assert_eq!(routing_text(None), "node default");
    }
}
