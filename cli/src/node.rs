//! `basalt node`: the cluster's nodes — list, cordon (no new VMs),
//! uncordon, drain (move every VM off) and remove (decommission).
//!
//! Drain ([`drain`]) moves running VMs live (a `migration` each) and the
//! others cold: the placement is labelled [`Placement::EVICT_LABEL`], the
//! node's agent stops the VM, and the control plane moves the placement to
//! another node with `epoch + 1` once the VM is reported stopped
//! (`docs/decisions.md` §30). Commands are idempotent: a drain cut short
//! is finished by running it again.

mod drain;

use std::time::Duration;

use anyhow::{Context as _, bail};
use basalt_api::{AdminClient, ApiError, Kind, MigrationPhase, Node, Object, Placement};

use crate::output::{self, Format};

/// What to do with nodes.
#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// List the nodes.
    #[command(visible_alias = "ls")]
    List,
    /// Stop placing new VMs on a node (its VMs keep running).
    Cordon {
        /// The node.
        name: String,
    },
    /// Let the scheduler use a node again; cancels a drain in progress:
    /// its cold moves not yet made and its live migrations not yet
    /// started (one under way finishes).
    Uncordon {
        /// The node.
        name: String,
    },
    /// Cordon a node and move every VM off it: a running VM moves live (a
    /// migration; the control plane chooses the target), any other VM —
    /// and one whose migration fails — moves cold (stopped there, then
    /// started on another node) — except a VM with a one-copy disk, which
    /// only moves live. With `--storage`, the copies of volumes and disks
    /// on it move to other nodes too. Prints each VM's progress; run it
    /// again to continue a drain cut short (its live migrations still
    /// waiting to start fail by themselves a minute after `--timeout`).
    /// Uncordon stops it (a copy already on its way to another node
    /// finishes its move).
    Drain {
        /// The node.
        name: String,
        /// Also wait until no VM is placed on the node (the cold moves too).
        #[arg(long)]
        wait: bool,
        /// How long the drain (and `--wait`) may take: a number with s, m
        /// or h.
        #[arg(long, default_value = "5m", value_parser = crate::token::parse_duration)]
        timeout: Duration,
        /// How many live migrations run at once.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        parallel: u16,
        /// Move every VM cold, none live.
        #[arg(long)]
        cold: bool,
        /// Also move the node's storage off it, as before a decommission:
        /// the copies of its standalone volumes and of VMs' replicated
        /// disks go to other nodes, each filled before the old one goes
        /// (`--wait` waits for them too). Without it they stay, and
        /// resync when the node is back.
        #[arg(long)]
        storage: bool,
        /// Cap each live migration's bandwidth, in MiB/s (0: no cap).
        #[arg(long = "bandwidth-mib", value_name = "MIB_S", default_value_t = 0)]
        bandwidth_mib_s: u32,
    },
    /// Remove (decommission) a node: deletes it and its lease. Refused
    /// while VMs are placed on it or it holds a volume's only copy, unless
    /// `--force` (then the control plane moves the VMs once the node's
    /// agent has had time to stop them, and replaces the copies it held
    /// that have another copy elsewhere).
    #[command(visible_alias = "rm")]
    Remove {
        /// The node.
        name: String,
        /// Remove it even though VMs are still placed on it.
        #[arg(long)]
        force: bool,
    },
}

/// Runs one `basalt node` command against the server at `server`.
pub async fn run(server: &str, format: Format, command: NodeCommand) -> anyhow::Result<()> {
    let client = AdminClient::connect(server).await?;
    match command {
        NodeCommand::List => {
            let list = client.list(Kind::Node).await?;
            output::print_objects(format, Kind::Node, &list.objects)
        }
        NodeCommand::Cordon { name } => {
            set_cordoned(&client, &name, true, None).await?;
            println!("node/{name} cordoned");
            Ok(())
        }
        NodeCommand::Uncordon { name } => {
            set_cordoned(&client, &name, false, Some(false)).await?;
            let mut cancelled = 0;
            for placement in placements_on(&client, &name).await? {
                if placement.is_evicting() && set_evicting(&client, &placement.vm, false).await? {
                    cancelled += 1;
                }
            }
            cancelled += cancel_drain_migrations(&client, &name).await?;
            if cancelled > 0 {
                println!("node/{name} uncordoned ({cancelled} pending move(s) cancelled)");
            } else {
                println!("node/{name} uncordoned");
            }
            Ok(())
        }
        NodeCommand::Drain {
            name,
            wait,
            timeout,
            parallel,
            cold,
            bandwidth_mib_s,
            storage,
        } => {
            let options = drain::DrainOptions {
                wait,
                timeout,
                parallel: usize::from(parallel),
                cold,
                bandwidth_mib_s,
                storage,
            };
            drain::drain(&client, &name, options).await
        }
        NodeCommand::Remove { name, force } => {
            client
                .get(Kind::Node, &name)
                .await
                .with_context(|| format!("reading node/{name}"))?;
            // The control plane refuses a node with VMs placed on it unless
            // forced (checked where the delete is applied, so a VM placed
            // meanwhile counts too).
            let placed = if force {
                placements_on(&client, &name).await?
            } else {
                Vec::new()
            };
            // Copies that have another elsewhere: replaced once it is gone.
            let disks = drain::copies_on(&client, &name).await?;
            let volumes = drain::volumes_on(&client, &name).await?;
            let deleted = if force {
                client.delete_forced(Kind::Node, &name, None).await
            } else {
                client.delete(Kind::Node, &name, None).await
            };
            match deleted {
                Ok(_) => {}
                Err(ApiError::FailedPrecondition { reason }) => bail!(
                    "{reason}\n(drain it first: `basalt node drain {name} --wait`, with --storage to move its volumes' copies too; or remove it with --force)"
                ),
                Err(err) => return Err(err.into()),
            }
            if placed.is_empty() {
                println!("node/{name} removed");
            } else {
                println!(
                    "node/{name} removed; its {} VM(s) move to other nodes once its agent has stopped them",
                    placed.len()
                );
            }
            if !disks.is_empty() || !volumes.is_empty() {
                println!(
                    "its copies of {} VM(s)' disks and of {} volume(s) are made again on other nodes, one copy short until each is filled (`basalt node drain {name} --storage --wait` before a removal moves them first)",
                    disks.len(),
                    volumes.len()
                );
            }
            Ok(())
        }
    }
}

/// Sets `spec.cordoned` and, when `evacuate` is given, sets or clears
/// [`Node::EVACUATE_LABEL`] (the copies on it move off), by
/// compare-and-swap, retrying on a conflict.
async fn set_cordoned(
    client: &AdminClient,
    name: &str,
    cordoned: bool,
    evacuate: Option<bool>,
) -> anyhow::Result<()> {
    loop {
        let Object::Node(mut node) = client
            .get(Kind::Node, name)
            .await
            .with_context(|| format!("reading node/{name}"))?
        else {
            bail!("node/{name} is not a node");
        };
        let evacuate = evacuate.unwrap_or(node.is_evacuating());
        if node.spec.cordoned == cordoned && node.is_evacuating() == evacuate {
            return Ok(());
        }
        node.spec.cordoned = cordoned;
        if evacuate {
            node.meta
                .labels
                .insert(Node::EVACUATE_LABEL.into(), "true".into());
        } else {
            node.meta.labels.remove(Node::EVACUATE_LABEL);
        }
        match client.update(Object::Node(node)).await {
            Ok(_) => return Ok(()),
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => return Err(err).with_context(|| format!("updating node/{name}")),
        }
    }
}

/// Sets or clears the eviction label of `vm`'s placement by
/// compare-and-swap; returns whether it changed anything.
async fn set_evicting(client: &AdminClient, vm: &str, evicting: bool) -> anyhow::Result<bool> {
    loop {
        let mut placement = match client.get(Kind::Placement, vm).await {
            Ok(Object::Placement(p)) => p,
            Ok(_) | Err(ApiError::NotFound { .. }) => return Ok(false),
            Err(err) => return Err(err).with_context(|| format!("reading placement/{vm}")),
        };
        if placement.is_evicting() == evicting {
            return Ok(false);
        }
        if evicting {
            placement
                .meta
                .labels
                .insert(Placement::EVICT_LABEL.into(), "true".into());
        } else {
            placement.meta.labels.remove(Placement::EVICT_LABEL);
        }
        match client.update(Object::Placement(placement)).await {
            Ok(_) => return Ok(true),
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => return Err(err).with_context(|| format!("updating placement/{vm}")),
        }
    }
}

/// Deletes the migrations a drain of node `name` asked for that have not
/// started (pending: waiting for a target's copies, or for a target); one
/// under way finishes. Returns how many it deleted.
async fn cancel_drain_migrations(client: &AdminClient, name: &str) -> anyhow::Result<usize> {
    let migrations = client
        .list(Kind::Migration)
        .await
        .context("listing migrations")?
        .objects;
    let mut cancelled = 0;
    for object in migrations {
        let Object::Migration(m) = object else {
            continue;
        };
        if m.drained_node() != Some(name) || m.status.phase != MigrationPhase::Pending {
            continue;
        }
        // At the version read: one that started meanwhile stays.
        match client
            .delete(Kind::Migration, &m.meta.name, Some(m.meta.resource_version))
            .await
        {
            Ok(_) => cancelled += 1,
            Err(ApiError::NotFound { .. } | ApiError::Aborted { .. }) => {}
            Err(err) => {
                return Err(err).with_context(|| format!("cancelling migration/{}", m.meta.name));
            }
        }
    }
    Ok(cancelled)
}

/// The placements on node `name`.
pub async fn placements_on(client: &AdminClient, name: &str) -> anyhow::Result<Vec<Placement>> {
    Ok(client
        .list(Kind::Placement)
        .await
        .context("listing placements")?
        .objects
        .into_iter()
        .filter_map(|o| match o {
            Object::Placement(p) if p.node == name => Some(p),
            _ => None,
        })
        .collect())
}
