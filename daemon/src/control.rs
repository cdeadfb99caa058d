//! `basaltd control`: one control-plane member. Flags override the TOML
//! config file; the member runs until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use basalt_control::ControlConfig;

/// Flags of `basaltd control`. Each overrides the config file's field of
/// the same name.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// A TOML config file (unknown fields are refused).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
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

impl ControlArgs {
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

/// Runs the member until SIGINT or SIGTERM.
pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    let (config, path) = args.config()?;
    config.validate(path.as_deref())?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
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
