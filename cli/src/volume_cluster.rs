//! `basalt volume` against the control plane: the cluster's volumes (one
//! per VM disk, decision 52, and standalone ones) with each copy's node,
//! state and sync progress as the primaries' agents reported them, and
//! how each copy's own node sees it; `resize` grows a VM disk's volume
//! through the VM's spec (the control plane refuses a shrink naming the
//! field); `create` and `delete` store and remove standalone volumes (no
//! VM's disk), which the control plane places on nodes and their agents
//! make and drop (decision 61); `snapshot` and `clone` store a volume
//! made from another, which the agent of the node holding the source's
//! primary copy makes in its pool; `move` names other nodes for a
//! standalone volume's copies, which the control plane moves there
//! (decision 80).
//!
//! Invariant: `list` and `get` only read; `resize` and `move` are one
//! compare-and-swap update each (of the VM, or of a standalone volume),
//! retried on a conflict.

use anyhow::{Context as _, bail};
use basalt_api::{
    AdminClient, ApiError, Kind, Object, ObjectMeta, ReplicaState, Volume, VolumeReplica,
    VolumeSource, VolumeSpec,
};

use crate::output::{self, Format};
use crate::volume::{VolumeCommand, print, table};
use crate::wait::{Deadline, POLL};

/// The table columns of `basalt volume list`.
pub const HEADERS: &[&str] = &[
    "NAME", "SIZE", "COPIES", "PRIMARY", "EPOCH", "REPLICAS", "VM",
];

/// How often `resize` retries a compare-and-swap conflict.
const RESIZE_RETRIES: usize = 5;

/// One row of `basalt volume list`.
pub fn row(v: &Volume) -> Vec<String> {
    vec![
        v.meta.name.clone(),
        size_text(v.spec.size_bytes),
        v.spec.replicas.to_string(),
        dash(&v.status.primary_node),
        v.status.epoch.to_string(),
        replicas_text(&v.status.replicas),
        v.spec
            .owner
            .as_ref()
            .map_or_else(|| "-".to_owned(), |o| format!("{}/{}", o.vm, o.disk)),
    ]
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_owned()
    }
}

/// A size for people: the largest binary unit it is a whole number of.
fn size_text(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

/// A copy's state, with its progress while syncing: `syncing 40%`.
fn state_text(r: &VolumeReplica) -> String {
    match r.state {
        ReplicaState::Syncing if r.sync_total_bytes > 0 => {
            format!("syncing {}%", r.sync_done_bytes * 100 / r.sync_total_bytes)
        }
        state => state.to_string(),
    }
}

/// How a copy's own node last reported it: `held`, `disk-failed: EIO`,
/// `unknown: ...` (its storage process cannot be asked), `-` (not yet).
fn node_view(r: &VolumeReplica) -> String {
    let state = match r.node_state {
        None => return "-".into(),
        Some(ReplicaState::UpToDate) => "held".to_owned(),
        Some(state) => state.to_string(),
    };
    if r.node_error.is_empty() {
        state
    } else {
        format!("{state}: {}", r.node_error)
    }
}

/// Per copy: `a* up-to-date, b syncing 40%` (`*`: the primary).
fn replicas_text(replicas: &[VolumeReplica]) -> String {
    if replicas.is_empty() {
        return "-".into();
    }
    let copies: Vec<String> = replicas
        .iter()
        .map(|r| {
            format!(
                "{}{} {}",
                r.node,
                if r.primary { "*" } else { "" },
                state_text(r)
            )
        })
        .collect();
    copies.join(", ")
}

/// `basalt volume get` as a table: the volume, then one row per copy.
fn details(v: &Volume) -> String {
    let owner = v.spec.owner.as_ref().map_or_else(
        || "- (standalone)".to_owned(),
        |o| {
            let attached = if o.attached {
                " (attached: released when the VM goes)"
            } else {
                ""
            };
            format!("vm {} disk {}{attached}", o.vm, o.disk)
        },
    );
    let owner = match &v.spec.source {
        Some(source) if source.snapshot => format!("{owner}, snapshot of {}", source.volume),
        Some(source) => format!("{owner}, clone of {}", source.volume),
        None => owner,
    };
    let ready = v
        .status
        .conditions
        .iter()
        .find(|c| c.kind == basalt_api::Condition::READY);
    let mut out = format!(
        "name          {}\nsize          {} ({} bytes)\ncopies        {}\nprotocol      {}\nowner         {owner}\nimage         {}\npool name     {}\nprimary       {}\nepoch         {}\n",
        v.meta.name,
        size_text(v.spec.size_bytes),
        v.spec.size_bytes,
        v.spec.replicas,
        v.spec.protocol,
        v.spec.image.as_deref().unwrap_or("-"),
        dash(&v.status.storage_name),
        dash(&v.status.primary_node),
        v.status.epoch,
    );
    if let Some(ready) = ready {
        out.push_str(&format!(
            "ready         {} ({}{})\n",
            if ready.status { "yes" } else { "no" },
            ready.reason,
            if ready.message.is_empty() {
                String::new()
            } else {
                format!(": {}", ready.message)
            }
        ));
    }
    if v.status.replicas.is_empty() {
        out.push_str("replicas      none yet (not placed)\n");
        return out;
    }
    out.push('\n');
    out.push_str(&table(
        &[
            "NODE",
            "ROLE",
            "STATE",
            "SYNCED",
            "TO SYNC",
            "DIRTY",
            "OUTDATED",
            "ITS NODE SAYS",
            "ERROR",
        ],
        v.status
            .replicas
            .iter()
            .map(|r| {
                vec![
                    r.node.clone(),
                    if r.primary { "primary" } else { "secondary" }.to_owned(),
                    state_text(r),
                    r.sync_done_bytes.to_string(),
                    r.sync_total_bytes.to_string(),
                    r.dirty_bytes.to_string(),
                    if r.outdated { "yes" } else { "no" }.to_owned(),
                    node_view(r),
                    dash(&r.last_error),
                ]
            })
            .collect(),
    ));
    out
}

async fn get(client: &AdminClient, name: &str) -> anyhow::Result<Volume> {
    match client.get(Kind::Volume, name).await {
        Ok(Object::Volume(v)) => Ok(v),
        Ok(other) => bail!("the server answered a {} for volume {name}", other.kind()),
        Err(ApiError::NotFound { .. }) => bail!("no volume {name} (basalt volume list shows them)"),
        Err(err) => Err(err).with_context(|| format!("reading volume {name}")),
    }
}

/// Grows `name` to `size` bytes: the VM's disk for a VM disk's volume, the
/// volume's spec for a standalone one. Returns what it changed.
async fn resize(client: &AdminClient, name: &str, size: u64) -> anyhow::Result<String> {
    for _ in 0..RESIZE_RETRIES {
        let mut volume = get(client, name).await?;
        let result = match volume.spec.owner.clone() {
            Some(owner) => {
                let mut vm = match client.get(Kind::Vm, &owner.vm).await {
                    Ok(Object::Vm(vm)) if vm.meta.uid == owner.vm_uid => vm,
                    Ok(_) | Err(ApiError::NotFound { .. }) => {
                        bail!(
                            "volume {name}'s VM {} is gone; it will be deleted",
                            owner.vm
                        )
                    }
                    Err(err) => return Err(err).context("reading the volume's VM"),
                };
                let Some(disk) = vm.spec.disks.iter_mut().find(|d| d.name == owner.disk) else {
                    bail!("VM {} has no disk {} any more", owner.vm, owner.disk);
                };
                let from = disk.size_bytes;
                if from == size {
                    return Ok(format!(
                        "vm {} disk {} is already {size} bytes",
                        owner.vm, owner.disk
                    ));
                }
                disk.size_bytes = size;
                client.update(Object::Vm(vm)).await.map(|_| {
                    format!(
                        "vm {} disk {}: {from} -> {size} bytes",
                        owner.vm, owner.disk
                    )
                })
            }
            None => {
                let from = volume.spec.size_bytes;
                if from == size {
                    return Ok(format!("volume {name} is already {size} bytes"));
                }
                volume.spec.size_bytes = size;
                client
                    .update(Object::Volume(volume))
                    .await
                    .map(|_| format!("volume {name}: {from} -> {size} bytes"))
            }
        };
        match result {
            Ok(done) => return Ok(done),
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    bail!("volume {name} kept changing; not resized after {RESIZE_RETRIES} tries")
}

/// Reads volume `name`, lets `edit` change it, and writes it back by
/// compare-and-swap, read again and retried on a conflict. `edit` answers
/// whether it changed anything and what to print.
async fn edit_volume(
    client: &AdminClient,
    name: &str,
    verb: &str,
    mut edit: impl FnMut(&mut Volume) -> anyhow::Result<(bool, String)>,
) -> anyhow::Result<String> {
    for _ in 0..RESIZE_RETRIES {
        let mut volume = get(client, name).await?;
        let (changed, done) = edit(&mut volume)?;
        if !changed {
            return Ok(done);
        }
        match client.update(Object::Volume(volume)).await {
            Ok(_) => return Ok(done),
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    bail!("volume {name} kept changing; not {verb} after {RESIZE_RETRIES} tries")
}

/// Names `nodes` as where standalone volume `name`'s copies go (one
/// compare-and-swap of its spec, retried on a conflict); the control plane
/// moves them.
async fn move_to(client: &AdminClient, name: &str, nodes: &[String]) -> anyhow::Result<String> {
    edit_volume(client, name, "moved", |volume| {
        if let Some(owner) = &volume.spec.owner {
            bail!(
                "volume {name} is disk {} of vm {}: it moves with its VM (`basalt vm migrate`)",
                owner.disk,
                owner.vm
            );
        }
        if nodes.len() != volume.spec.replicas as usize {
            bail!(
                "volume {name} has {} cop(ies): name one node for each (got {})",
                volume.spec.replicas,
                nodes.len()
            );
        }
        if moved(volume, nodes) {
            return Ok((
                false,
                format!("volume {name} is already on {}", nodes.join(", ")),
            ));
        }
        let from = volume.status.copy_nodes().join(", ");
        volume.spec.nodes = nodes.to_vec();
        Ok((
            true,
            format!("volume {name}: moving from {from} to {}", nodes.join(", ")),
        ))
    })
    .await
}

/// Sets volume `name`'s accept-copy label to its epoch and `node`
/// (decision 94), after checking that `node` holds one of its copies and
/// not the primary's.
async fn accept_copy(client: &AdminClient, name: &str, node: &str) -> anyhow::Result<String> {
    edit_volume(client, name, "accepted", |volume| {
        if let Some(owner) = &volume.spec.owner {
            bail!(
                "volume {name} is disk {} of vm {}: accept its copy through the VM (`basalt vm accept-copy {} --node {node}`)",
                owner.disk,
                owner.vm,
                owner.vm
            );
        }
        let status = &volume.status;
        if status.primary_node == node {
            bail!("volume {name}'s primary is on {node} already");
        }
        if status.replica(node).is_none() {
            bail!(
                "{node} holds no copy of volume {name} (its copies: {})",
                status.copy_nodes().join(", ")
            );
        }
        let epoch = status.epoch;
        let value = format!("{epoch}/{node}");
        let changed = volume.meta.labels.get(Volume::ACCEPT_COPY_LABEL) != Some(&value);
        volume
            .meta
            .labels
            .insert(Volume::ACCEPT_COPY_LABEL.to_owned(), value);
        Ok((
            changed,
            format!(
                "volume {name}: {node}'s copy may now become the primary as it is (epoch {epoch}), once the primary's node is lost; writes it missed are lost"
            ),
        ))
    })
    .await
}

/// Whether `volume`'s copies are on `nodes` exactly, the first the
/// primary, every one up to date.
fn moved(volume: &Volume, nodes: &[String]) -> bool {
    let status = &volume.status;
    status.is_on(nodes)
        && status
            .replicas
            .iter()
            .all(|r| r.state == ReplicaState::UpToDate)
}

/// Polls volume `name` until its copies are on `nodes`, up to date.
async fn wait_moved(
    client: &AdminClient,
    name: &str,
    nodes: &[String],
    deadline: Deadline,
) -> anyhow::Result<()> {
    loop {
        let volume = get(client, name).await?;
        if moved(&volume, nodes) {
            return Ok(());
        }
        deadline.check(|| format!("volume {name} is still moving:\n{}", details(&volume)))?;
        tokio::time::sleep(POLL).await;
    }
}

/// Stores volume `name` made from `source`: a snapshot, or a clone of
/// `size` bytes (at least the source's).
async fn derive(
    client: &AdminClient,
    source: &str,
    name: String,
    snapshot: bool,
    size: Option<u64>,
) -> anyhow::Result<Object> {
    let from = get(client, source).await?;
    let size_bytes = size.unwrap_or(from.spec.size_bytes);
    if size_bytes < from.spec.size_bytes {
        bail!(
            "--size {size_bytes} is smaller than {source}'s {} bytes: a clone only grows",
            from.spec.size_bytes
        );
    }
    let volume = Volume {
        meta: ObjectMeta::named(name),
        spec: VolumeSpec {
            size_bytes,
            replicas: 1,
            image: from.spec.image.clone(),
            owner: None,
            source: Some(VolumeSource {
                volume: source.to_owned(),
                snapshot,
            }),
            protocol: from.spec.protocol,
            nodes: Vec::new(),
        },
        ..Volume::default()
    };
    Ok(client.create(Object::Volume(volume)).await?)
}

/// Runs a `basalt volume` command against the control plane at `server`.
pub async fn run(server: &str, format: Format, command: VolumeCommand) -> anyhow::Result<()> {
    let client = AdminClient::connect(server).await?;
    match command {
        VolumeCommand::List => {
            let list = client.list(Kind::Volume).await?;
            output::print_objects(format, Kind::Volume, &list.objects)
        }
        VolumeCommand::Get { name } => {
            let volume = get(&client, &name).await?;
            print(format, &Object::Volume(volume.clone()), || details(&volume))
        }
        VolumeCommand::Resize { name, size } => {
            let done = resize(&client, &name, size).await?;
            println!("{done}");
            Ok(())
        }
        VolumeCommand::AcceptCopy { name, node } => {
            println!("{}", accept_copy(&client, &name, &node).await?);
            Ok(())
        }
        VolumeCommand::Move {
            name,
            nodes,
            wait,
            timeout,
        } => {
            let done = move_to(&client, &name, &nodes).await?;
            println!("{done}");
            if wait {
                wait_moved(&client, &name, &nodes, Deadline::after(timeout)).await?;
                println!("volume {name}: copies on {}", nodes.join(", "));
            }
            Ok(())
        }
        VolumeCommand::Create {
            name,
            size,
            replicas,
            nodes,
            image,
            protocol,
        } => {
            let replicas =
                replicas.unwrap_or_else(|| u32::try_from(nodes.len().max(1)).unwrap_or(u32::MAX));
            let volume = Volume {
                meta: ObjectMeta::named(name),
                spec: VolumeSpec {
                    size_bytes: size,
                    replicas,
                    image,
                    owner: None,
                    source: None,
                    protocol,
                    nodes,
                },
                ..Volume::default()
            };
            let created = client.create(Object::Volume(volume)).await?;
            output::print_objects(format, Kind::Volume, &[created])
        }
        VolumeCommand::Snapshot { source, name } => {
            let created = derive(&client, &source, name, true, None).await?;
            output::print_objects(format, Kind::Volume, &[created])
        }
        VolumeCommand::Clone { source, name, size } => {
            let created = derive(&client, &source, name, false, size).await?;
            output::print_objects(format, Kind::Volume, &[created])
        }
        VolumeCommand::Delete { name } => {
            client.delete(Kind::Volume, &name, None).await?;
            println!("volume {name} deleted");
            Ok(())
        }
        VolumeCommand::Verify { .. } => bail!(
            "verify runs on the primary's node against its storage process: give --storage-socket"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_show_their_node_role_and_progress() {
        let replicas = vec![
            VolumeReplica {
                node: "a".into(),
                primary: true,
                state: ReplicaState::UpToDate,
                ..VolumeReplica::default()
            },
            VolumeReplica {
                node: "b".into(),
                state: ReplicaState::Syncing,
                sync_done_bytes: 40,
                sync_total_bytes: 100,
                ..VolumeReplica::default()
            },
            VolumeReplica {
                node: "c".into(),
                state: ReplicaState::Outdated,
                outdated: true,
                ..VolumeReplica::default()
            },
        ];
        assert_eq!(
            replicas_text(&replicas),
            "a* up-to-date, b syncing 40%, c outdated"
        );
        assert_eq!(node_view(&replicas[0]), "-");
        let lost = VolumeReplica {
            node_state: Some(ReplicaState::Unknown),
            node_error: "no socket".into(),
            ..VolumeReplica::default()
        };
        assert_eq!(node_view(&lost), "unknown: no socket");
        let held = VolumeReplica {
            node_state: Some(ReplicaState::UpToDate),
            ..VolumeReplica::default()
        };
        assert_eq!(node_view(&held), "held");
        assert_eq!(size_text(20 << 30), "20 GiB");
        assert_eq!(size_text(1536), "1536 B");
        assert_eq!(size_text(3 << 10), "3 KiB");
    }
}
