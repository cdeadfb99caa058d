//! `basalt vm migrate VM [--to NODE] [--wait] [--post-copy]
//! [--bandwidth-mib N]`: asks the
//! control plane to move a running VM live to another node, and with
//! `--wait` follows the migration to its end, printing each phase and the
//! data left to copy.
//!
//! A request is a `migration` object named after the VM. A finished one
//! (succeeded or failed) is replaced; one still under way is reported and
//! left alone. With `--wait`, the command fails when the migration does.
//! `--cancel` deletes one still under way (the agents abort its copy);
//! the control plane refuses that once it is switching over.

use anyhow::{Context as _, bail};
use basalt_api::{
    AdminClient, ApiError, Kind, Migration, MigrationPhase, MigrationSpec, Object, ObjectMeta,
    WatchEvent,
};
use futures::StreamExt as _;

use crate::output::{self, Format};

/// `basalt vm migrate` flags.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The VM to move.
    pub vm: String,
    /// The node to move it to (default: the scheduler chooses).
    #[arg(long)]
    pub to: Option<String>,
    /// Follow the migration until it ends; fail if it fails.
    #[arg(long)]
    pub wait: bool,
    /// If pre-copy has not converged within the timeout, switch to
    /// post-copy instead of aborting.
    #[arg(long)]
    pub post_copy: bool,
    /// How long pre-copy may run, in seconds (0: the control plane's
    /// default).
    #[arg(long, default_value_t = 0)]
    pub timeout_seconds: u32,
    /// Cap the copy's bandwidth, in MiB/s (0: no cap).
    #[arg(long = "bandwidth-mib", value_name = "MIB_S", default_value_t = 0)]
    pub bandwidth_mib_s: u32,
    /// How long the migration may wait to start (for the target's disk
    /// copies to fill), in seconds from now; then it fails, saying what
    /// it waited for (0: the control plane's default, an hour).
    #[arg(long, default_value_t = 0)]
    pub start_timeout_seconds: u32,
    /// Cancel the VM's migration under way instead: one still pending or
    /// preparing is dropped, a copy in progress is aborted (the guest
    /// stays where it runs). One switching over cannot be cancelled.
    #[arg(long, conflicts_with_all = ["to", "wait", "post_copy", "timeout_seconds", "bandwidth_mib_s", "start_timeout_seconds"])]
    pub cancel: bool,
}

/// Runs `basalt vm migrate` against the server at `server`.
pub async fn run(server: &str, format: Format, args: MigrateArgs) -> anyhow::Result<()> {
    let client = AdminClient::connect(server).await?;
    if args.cancel {
        return cancel(&client, &args.vm).await;
    }
    let request = Migration {
        meta: ObjectMeta::named(args.vm.clone()),
        spec: MigrationSpec {
            vm: args.vm.clone(),
            target: args.to.clone(),
            post_copy: args.post_copy,
            timeout_seconds: args.timeout_seconds,
            bandwidth_mib_s: args.bandwidth_mib_s,
            start_timeout_seconds: args.start_timeout_seconds,
        },
        ..Migration::default()
    };
    let created = match client.create(Object::Migration(request.clone())).await {
        Ok(created) => created,
        Err(ApiError::AlreadyExists { .. }) => replace_finished(&client, request).await?,
        Err(err) => return Err(err).context(format!("requesting the migration of {}", args.vm)),
    };
    let version = created.meta().resource_version;
    if !args.wait {
        return match format {
            Format::Table => {
                println!(
                    "migration of {} requested; follow it with `basalt get migration {}`",
                    args.vm, args.vm
                );
                Ok(())
            }
            _ => output::print_objects(format, Kind::Migration, &[created]),
        };
    }
    follow(&client, format, created, version).await
}

/// Deletes `vm`'s migration if it is still under way, by compare-and-swap
/// on the version just read: a migration that moved on meanwhile is read
/// again (and left alone once it has ended).
async fn cancel(client: &AdminClient, vm: &str) -> anyhow::Result<()> {
    loop {
        let m = match client.get(Kind::Migration, vm).await {
            Ok(Object::Migration(m)) => m,
            Ok(other) => bail!("{vm} is a {}, not a migration", other.kind()),
            Err(ApiError::NotFound { .. }) => bail!("VM {vm} has no migration to cancel"),
            Err(err) => return Err(err).context(format!("reading migration/{vm}")),
        };
        if m.status.phase.is_terminal() {
            bail!(
                "the migration of {vm} has ended ({}: {}); nothing to cancel",
                m.status.phase,
                m.status.message
            );
        }
        match client
            .delete(Kind::Migration, vm, Some(m.meta.resource_version))
            .await
        {
            Ok(_) => {}
            Err(ApiError::Aborted { .. } | ApiError::NotFound { .. }) => continue,
            Err(err) => return Err(err).context(format!("cancelling the migration of {vm}")),
        }
        match m.status.phase {
            MigrationPhase::Migrating => println!(
                "migration of {vm} cancelled: the copy to {} is aborted, the guest stays on {}",
                m.status.target, m.status.source
            ),
            phase => println!("migration of {vm} cancelled (it was {phase})"),
        }
        return Ok(());
    }
}

/// Replaces a finished migration of the same VM; refuses if one is still
/// under way.
async fn replace_finished(client: &AdminClient, request: Migration) -> anyhow::Result<Object> {
    let name = request.meta.name.clone();
    let existing = match client.get(Kind::Migration, &name).await? {
        Object::Migration(m) => m,
        other => bail!("{name} is a {}, not a migration", other.kind()),
    };
    if !existing.status.phase.is_terminal() {
        bail!(
            "VM {name} is already migrating ({}: {} → {})",
            existing.status.phase,
            or_dash(&existing.status.source),
            or_dash(&existing.status.target)
        );
    }
    client
        .delete(Kind::Migration, &name, Some(existing.meta.resource_version))
        .await
        .context("removing the previous, finished migration")?;
    client
        .create(Object::Migration(request))
        .await
        .with_context(|| format!("requesting the migration of {name}"))
}

/// Prints the migration's changes until it ends.
async fn follow(
    client: &AdminClient,
    format: Format,
    created: Object,
    version: u64,
) -> anyhow::Result<()> {
    let uid = created.meta().uid.clone();
    let name = created.name().to_owned();
    let mut events = client.watch(Some(Kind::Migration), version).await?;
    let mut last: Option<ProgressKey> = None;
    // What happened between the create and the watch is in the current
    // object; later changes come from the watch.
    let mut next = Some(client.get(Kind::Migration, &name).await?);
    loop {
        let object = match next.take() {
            Some(object) => object,
            None => match events.next().await {
                Some(Ok(
                    WatchEvent::Added { object, .. } | WatchEvent::Modified { object, .. },
                )) => object,
                Some(Ok(WatchEvent::Deleted { object, .. })) if object.name() == name => {
                    bail!("the migration of {name} was removed before it ended");
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(err).context("following the migration"),
                None => bail!("the control plane closed the watch"),
            },
        };
        let Object::Migration(m) = object else {
            continue;
        };
        if m.meta.name != name || m.meta.uid != uid {
            continue;
        }
        let now = progress_key(&m);
        if last.as_ref() != Some(&now) {
            last = Some(now);
            print_progress(format, &m)?;
        }
        match m.status.phase {
            MigrationPhase::Succeeded => return Ok(()),
            MigrationPhase::Failed => bail!("the migration of {name} failed: {}", m.status.message),
            _ => {}
        }
    }
}

/// What a progress line shows: the phase, the MiB left and what a
/// pending migration waits for. A new line is printed when it changes.
pub type ProgressKey = (MigrationPhase, u64, String);

/// The [`ProgressKey`] of `m`.
pub fn progress_key(m: &Migration) -> ProgressKey {
    let status = &m.status;
    (
        status.phase,
        status.data_remaining >> 20,
        if status.phase == MigrationPhase::Pending {
            status.message.clone()
        } else {
            String::new()
        },
    )
}

/// The words after the phase on a progress line of `m`.
pub fn progress_text(m: &Migration) -> String {
    let status = &m.status;
    match status.phase {
        MigrationPhase::Pending if !status.message.is_empty() => status.message.clone(),
        MigrationPhase::Pending => "waiting for the control plane".to_owned(),
        MigrationPhase::Migrating if status.data_total > 0 => format!(
            "{} → {}: {} MiB of {} MiB left{}",
            status.source,
            status.target,
            status.data_remaining >> 20,
            status.data_total >> 20,
            if status.post_copy_active {
                " (post-copy)"
            } else {
                ""
            }
        ),
        MigrationPhase::Succeeded | MigrationPhase::Failed => status.message.clone(),
        _ => format!("{} → {}: {}", status.source, status.target, status.message),
    }
}

fn print_progress(format: Format, m: &Migration) -> anyhow::Result<()> {
    match format {
        Format::Table => {
            println!("{:<12} {}", m.status.phase.to_string(), progress_text(m));
            Ok(())
        }
        Format::Json => output::print_json_line(m),
        Format::Yaml => output::print_yaml_document(m),
    }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

#[cfg(test)]
mod tests {
    use basalt_api::MigrationStatus;

    use super::*;

    #[test]
    fn a_pending_migration_says_what_it_waits_for_and_a_new_reason_is_a_new_line() {
        let mut m = Migration::default();
        assert_eq!(progress_text(&m), "waiting for the control plane");
        let before = progress_key(&m);
        m.status.message =
            "waiting for the target's copies: disk root's copy on \"b\" is syncing".into();
        assert!(progress_text(&m).contains("is syncing"));
        assert_ne!(progress_key(&m), before);
        m.status = MigrationStatus {
            phase: MigrationPhase::Migrating,
            source: "a".into(),
            target: "b".into(),
            data_total: 512 << 20,
            data_remaining: 100 << 20,
            message: "copying".into(),
            ..MigrationStatus::default()
        };
        assert_eq!(progress_text(&m), "a → b: 100 MiB of 512 MiB left");
        // Messages of other phases do not make lines by themselves.
        let copying = progress_key(&m);
        m.status.message = "still copying".into();
        assert_eq!(progress_key(&m), copying);
    }
}
