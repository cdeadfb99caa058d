//! `basalt node`: the cluster's nodes — list, cordon (no new VMs),
//! uncordon, drain (move every VM off) and remove (decommission).
//!
//! Drain is a cold move for now: the node is cordoned, each of its
//! placements is labelled [`Placement::EVICT_LABEL`], the node's agent stops the VM,
//! and the control plane moves the placement to another node with
//! `epoch + 1` once the VM is reported stopped (`docs/decisions.md`).
//! Commands are idempotent: a drain cut short is finished by running it
//! again.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use basalt_api::{AdminClient, ApiError, Kind, Object, Placement};

use crate::output::{self, Format};
use crate::wait::{Deadline, POLL};

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
    /// Let the scheduler use a node again; cancels a drain in progress.
    Uncordon {
        /// The node.
        name: String,
    },
    /// Cordon a node and move every VM off it (each VM is stopped there,
    /// then started on another node).
    Drain {
        /// The node.
        name: String,
        /// Wait until no VM is placed on the node, printing progress.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits: a number with s, m or h.
        #[arg(long, default_value = "5m", value_parser = crate::token::parse_duration)]
        timeout: Duration,
    },
    /// Remove (decommission) a node: deletes it and its lease. Refused
    /// while VMs are placed on it, unless `--force` (then the control plane
    /// moves them once the node's agent has had time to stop them).
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
            set_cordoned(&client, &name, true).await?;
            println!("node/{name} cordoned");
            Ok(())
        }
        NodeCommand::Uncordon { name } => {
            set_cordoned(&client, &name, false).await?;
            let mut cancelled = 0;
            for placement in placements_on(&client, &name).await? {
                if placement.is_evicting() && set_evicting(&client, &placement.vm, false).await? {
                    cancelled += 1;
                }
            }
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
        } => drain(&client, &name, wait, timeout).await,
        NodeCommand::Remove { name, force } => {
            client
                .get(Kind::Node, &name)
                .await
                .with_context(|| format!("reading node/{name}"))?;
            let placed = placements_on(&client, &name).await?;
            if !placed.is_empty() && !force {
                let vms: Vec<&str> = placed.iter().map(|p| p.vm.as_str()).collect();
                bail!(
                    "node/{name} still runs {} VM(s): {}; drain it first (`basalt node drain {name} --wait`) or remove it with --force",
                    vms.len(),
                    vms.join(", ")
                );
            }
            client.delete(Kind::Node, &name, None).await?;
            if placed.is_empty() {
                println!("node/{name} removed");
            } else {
                println!(
                    "node/{name} removed; its {} VM(s) move to other nodes once its agent has stopped them",
                    placed.len()
                );
            }
            Ok(())
        }
    }
}

/// Sets `spec.cordoned` by compare-and-swap, retrying on a conflict.
async fn set_cordoned(client: &AdminClient, name: &str, cordoned: bool) -> anyhow::Result<()> {
    loop {
        let Object::Node(mut node) = client
            .get(Kind::Node, name)
            .await
            .with_context(|| format!("reading node/{name}"))?
        else {
            bail!("node/{name} is not a node");
        };
        if node.spec.cordoned == cordoned {
            return Ok(());
        }
        node.spec.cordoned = cordoned;
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

/// Cordons `name` and asks for every VM on it to move; with `wait`,
/// follows the moves until the node is empty.
async fn drain(
    client: &AdminClient,
    name: &str,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    client
        .get(Kind::Node, name)
        .await
        .with_context(|| format!("reading node/{name}"))?;
    set_cordoned(client, name, true).await?;
    let placed = placements_on(client, name).await?;
    // Hook: once live migration is available, a running VM gets a
    // `Migration` object here instead of the eviction label.
    for placement in &placed {
        set_evicting(client, &placement.vm, true).await?;
    }
    println!("node/{name} cordoned; moving {} VM(s) off it", placed.len());
    if !wait {
        return Ok(());
    }
    let deadline = Deadline::after(timeout);
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let remaining = placements_on(client, name).await?;
        let mut now: BTreeMap<String, String> = BTreeMap::new();
        for placement in &remaining {
            let phase = match client.get(Kind::Vm, &placement.vm).await {
                Ok(Object::Vm(vm)) => vm.status.phase.to_string(),
                _ => "-".into(),
            };
            now.insert(placement.vm.clone(), phase);
        }
        for (vm, phase) in &now {
            if last.get(vm) != Some(phase) {
                println!("  vm/{vm}: {phase} on {name}, waiting to move");
            }
        }
        for vm in last.keys().filter(|vm| !now.contains_key(*vm)) {
            match client.get(Kind::Placement, vm).await {
                Ok(Object::Placement(p)) => {
                    println!("  vm/{vm}: moved to {} (epoch {})", p.node, p.epoch)
                }
                _ => println!("  vm/{vm}: no longer placed"),
            }
        }
        if remaining.is_empty() {
            println!("node/{name} drained");
            return Ok(());
        }
        last = now;
        deadline.check(|| {
            format!(
                "node/{name} still holds {} VM(s): {}",
                last.len(),
                last.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        tokio::time::sleep(POLL).await;
    }
}
