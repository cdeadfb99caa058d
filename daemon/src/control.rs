//! `basaltd control`: one control-plane member. Flags override the TOML
//! config file; the member runs until SIGINT or SIGTERM. Its subcommands
//! are the disaster-recovery tools (`backup`, `restore`,
//! `force-new-cluster`; see `docs/control-plane-recovery.md`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use basalt_control::{ControlConfig, recovery};

/// `basaltd control`: run a member (flags), or a recovery tool.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ControlArgs {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    member: MemberArgs,
}

/// The disaster-recovery tools.
#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Write the whole cluster state, read at one version, to a file.
    Backup {
        /// Any member's address.
        #[arg(long, default_value = "127.0.0.1:7400")]
        server: String,
        /// The backup file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Seed an empty data directory with a backup, as a new cluster of one
    /// member; then start it with `basaltd control --data-dir DIR
    /// --node-id N --listen ADDR` and add members with `--join`.
    Restore {
        /// The backup file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// The new member's (empty) data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The new member's Raft id.
        #[arg(long)]
        node_id: u64,
        /// Where the new member will listen.
        #[arg(long)]
        listen: SocketAddr,
        /// Where others reach it (default: the listen address).
        #[arg(long)]
        advertise: Option<String>,
    },
    /// Lost quorum for good: turn a stopped survivor's data directory into
    /// a new one-member cluster (every other member dropped; the original
    /// directory is kept beside it). Then start it as usual.
    ForceNewCluster {
        /// The survivor's data directory (its member must be stopped).
        #[arg(long)]
        data_dir: PathBuf,
        /// The survivor's Raft id.
        #[arg(long)]
        node_id: u64,
        /// Its address, if not the one the membership recorded.
        #[arg(long)]
        advertise: Option<String>,
    },
}

/// Flags of a running member. Each overrides the config file's field of
/// the same name.
#[derive(Debug, clap::Args)]
pub struct MemberArgs {
    /// A TOML config file (unknown fields are refused).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Check the config file and flags, print the result and exit.
    #[arg(long)]
    check_config: bool,
    /// This member's Raft node id (at least 1, unique in the cluster).
    #[arg(long)]
    node_id: Option<u64>,
    /// Name of this member's `member` object (default `member-<id>`).
    #[arg(long)]
    name: Option<String>,
    /// Address the admin API and Raft listen on (default 127.0.0.1:7400).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address other members and clients reach this member at (default:
    /// the listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Where the Raft log, vote and state machine live.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Start a new cluster with this member as its only voter.
    #[arg(long)]
    bootstrap: bool,
    /// Join the cluster of the member at this address.
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// Build a snapshot after this many log entries.
    #[arg(long)]
    snapshot_threshold: Option<u64>,
    /// Log entries kept behind a snapshot.
    #[arg(long)]
    logs_to_keep: Option<u64>,
}

impl MemberArgs {
    /// The config file (or the defaults) with the flags applied on top.
    fn config(self) -> anyhow::Result<(ControlConfig, Option<PathBuf>)> {
        let mut config = match &self.config {
            Some(path) => ControlConfig::load(path)?,
            None => ControlConfig::default(),
        };
        if let Some(id) = self.node_id {
            config.node_id = id;
        }
        if self.name.is_some() {
            config.name = self.name;
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if self.advertise.is_some() {
            config.advertise = self.advertise;
        }
        if let Some(dir) = self.data_dir {
            config.data_dir = dir;
        }
        if self.bootstrap {
            config.bootstrap = true;
        }
        if self.join.is_some() {
            config.join = self.join;
        }
        if let Some(threshold) = self.snapshot_threshold {
            config.raft.snapshot_threshold = threshold;
        }
        if let Some(keep) = self.logs_to_keep {
            config.raft.logs_to_keep = keep;
        }
        Ok((config, self.config))
    }
}

/// Runs the member until SIGINT or SIGTERM, or one recovery tool.
pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    match args.action {
        None => run_member(args.member),
        Some(action) => run_action(action),
    }
}

fn run_action(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Backup { server, out } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let backup = runtime.block_on(recovery::backup(&server, &out))?;
            println!(
                "backed up {} objects at resource version {} to {}",
                backup.objects.len(),
                backup.resource_version,
                out.display()
            );
        }
        Action::Restore {
            input,
            data_dir,
            node_id,
            listen,
            advertise,
        } => {
            anyhow::ensure!(node_id >= 1, "--node-id must be at least 1");
            let backup = recovery::read_backup(&input)?;
            let address = advertise.unwrap_or_else(|| listen.to_string());
            let (objects, version) = (backup.objects.len(), backup.resource_version);
            recovery::restore(backup, &data_dir, node_id, &address)?;
            println!(
                "restored {objects} objects (resource version {version}) into {}: start it with `basaltd control --data-dir {} --node-id {node_id} --listen {listen}`",
                data_dir.display(),
                data_dir.display()
            );
        }
        Action::ForceNewCluster {
            data_dir,
            node_id,
            advertise,
        } => {
            let forced = recovery::force_new_cluster(&data_dir, node_id, advertise.as_deref())?;
            println!(
                "{} is now a one-member cluster (member {node_id} at {}, state at index {}); the original data is kept in {}",
                data_dir.display(),
                forced.address,
                forced.index,
                forced.kept_at.display()
            );
        }
    }
    Ok(())
}

fn run_member(args: MemberArgs) -> anyhow::Result<()> {
    let check = args.check_config;
    let (config, path) = args.config()?;
    config.validate(path.as_deref())?;
    if check {
        println!(
            "control config ok: member {} (id {}) at {}, data in {}",
            config.member_name(),
            config.node_id,
            config.advertise_address(),
            config.data_dir.display()
        );
        return Ok(());
    }
    let runtime = match config.worker_threads {
        0 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot watch SIGTERM; stop with SIGINT");
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        };
        basalt_control::run(config, shutdown).await
    })?;
    Ok(())
}
