//! `basalt volume`: volumes, cluster-wide from the control plane (the
//! default: [`crate::volume_cluster`]) or one node's pool from that node's
//! storage process over its storage-local socket (`--storage-socket`, run
//! on the node, as `drbdadm` is).
//!
//! Node-local mode lists the pool's volumes, gets one with its
//! replication peers and how each stands (connected, resyncing, away,
//! deposed, split-brain), and verifies a primary against its peers online.
//!
//! Invariant: node-local mode is read-only except `verify`, which only
//! marks chunks that differ dirty (or, with `--repair`, sends them to the
//! peer again).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use basalt_api::{
    DiskState, ReplicaPeer, ReplicaPeerState, ReplicationProtocol, StorageClient, StorageVolume,
    VerifyVolume,
};
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

use crate::output::{Format, print_yaml_document};

/// What to do with the volumes.
#[derive(Debug, clap::Args)]
pub struct VolumeArgs {
    /// Ask this node's storage process (its storage-local socket, e.g.
    /// /run/basalt-storage/local.sock) about its own pool instead of the
    /// control plane about the whole cluster.
    #[arg(long, env = "BASALT_STORAGE_SOCKET")]
    storage_socket: Option<PathBuf>,
    #[command(subcommand)]
    command: VolumeCommand,
}

/// The `basalt volume` verbs.
#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// List the volumes: the cluster's, with their copies and how each
    /// stands (or the pool's, with --storage-socket).
    #[command(visible_alias = "ls")]
    List,
    /// One volume, with each copy's node, state and sync progress (or,
    /// with --storage-socket, the pool's volume and its replication peers
    /// when it is a primary there).
    Get {
        /// The volume (its pool name with --storage-socket).
        name: String,
    },
    /// Create a standalone volume (one that is no VM's disk): the control
    /// plane places its copies on nodes, whose agents make them (empty, or
    /// cloned from `--image`), and moves its primary if that node is lost.
    Create {
        /// The volume's name.
        name: String,
        /// Its size: bytes, or a number with K, M, G or T (e.g. 20G).
        #[arg(long, value_parser = crate::vm::parse_bytes)]
        size: u64,
        /// Number of copies, each on its own node (placed by the control
        /// plane); 1, or as many as `--nodes` names.
        #[arg(long, visible_alias = "copies")]
        replicas: Option<u32>,
        /// The nodes its copies go on, comma-separated, the first its
        /// primary (instead of the control plane's choice), e.g. those of
        /// a VM it is to be attached to.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// An image to clone it from.
        #[arg(long)]
        image: Option<String>,
        /// When its primary acknowledges a write: A (once sent to every
        /// peer), B (once every peer received it) or C (once every peer
        /// wrote it, the default).
        #[arg(long, default_value = "C", value_parser = parse_protocol)]
        protocol: ReplicationProtocol,
    },
    /// Delete a standalone volume. A VM disk's volume goes with its VM
    /// (or its disk); the control plane refuses to delete it alone.
    #[command(visible_alias = "rm")]
    Delete {
        /// The volume.
        name: String,
    },
    /// Take a read-only snapshot of a volume: made copy-on-write by the
    /// agent of the node holding the source's primary copy, in its pool
    /// (one copy, on that node).
    Snapshot {
        /// The volume to snapshot.
        source: String,
        /// The snapshot's name.
        name: String,
    },
    /// Make a writable clone of a volume or snapshot, copy-on-write, on
    /// the node holding the source's primary copy (one copy).
    Clone {
        /// The volume or snapshot to clone.
        source: String,
        /// The clone's name.
        name: String,
        /// A size larger than the source's (default: the source's).
        #[arg(long, value_parser = crate::vm::parse_bytes)]
        size: Option<u64>,
    },
    /// Grow a volume: a VM disk's volume through its VM's spec (the
    /// agents grow every copy online). A volume never shrinks.
    Resize {
        /// The volume.
        name: String,
        /// The new size: bytes, or a number with K, M, G or T (e.g. 20G).
        #[arg(long, value_parser = crate::vm::parse_bytes)]
        size: u64,
    },
    /// Move a standalone volume's copies to other nodes, e.g. to where a
    /// VM it is to be attached to runs: the control plane adds a copy on
    /// each named node that has none, the primary fills it, and once every
    /// named copy is up to date the others are dropped and the first named
    /// node's copy is the primary (one epoch later when that changes).
    Move {
        /// The volume.
        name: String,
        /// The nodes its copies go on, comma-separated, the first its
        /// primary: one per copy.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Wait until the copies are there and up to date.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits: a number with s, m or h.
        #[arg(long, default_value = "10m", value_parser = crate::token::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Let the control plane make one copy of a standalone volume whose
    /// primary's node is lost the new primary as it is, though it is
    /// outdated or was still filling (DRBD's `primary --force`): writes
    /// it missed are lost. Good only at the volume's current epoch. A VM
    /// disk's volume is accepted through its VM (`basalt vm accept-copy`).
    AcceptCopy {
        /// The volume.
        name: String,
        /// The node whose copy to take.
        #[arg(long)]
        node: String,
    },
    /// Online verify of a primary volume against each connected peer,
    /// while it is in use: chunks that differ are listed and marked dirty
    /// (the next resync sends them). Fails when any differ (and were not
    /// repaired) or a peer could not be compared.
    Verify {
        /// The volume (its pool name).
        name: String,
        /// Send the chunks that differ to the peer again now.
        #[arg(long)]
        repair: bool,
        /// Most bytes per second read on each side (0: the storage
        /// process's sync rate).
        #[arg(long, default_value_t = 0)]
        rate_bytes: u64,
    },
}

/// A volume and its peers, as `get` prints it.
#[derive(Debug, Serialize)]
struct VolumeView {
    #[serde(flatten)]
    volume: StorageVolume,
    /// The node's backing store (a failed one serves from the peers).
    disk_state: DiskState,
    #[serde(skip_serializing_if = "String::is_empty")]
    disk_error: String,
    peers: Vec<ReplicaPeer>,
}

/// Parses `--protocol` (A, B or C, either case); an error names the flag.
pub fn parse_protocol(value: &str) -> Result<ReplicationProtocol, String> {
    if value.is_empty() {
        return Err("--protocol: give A, B or C".to_owned());
    }
    ReplicationProtocol::parse("--protocol", value).map_err(|e| e.to_string())
}

fn state_name(state: ReplicaPeerState) -> &'static str {
    match state {
        ReplicaPeerState::Connected => "connected",
        ReplicaPeerState::Resyncing => "resyncing",
        ReplicaPeerState::Away => "away",
        ReplicaPeerState::Deposed => "deposed",
        ReplicaPeerState::SplitBrain => "split-brain",
        ReplicaPeerState::DiskFailed => "disk-failed",
    }
}

pub(crate) fn print(
    format: Format,
    value: &impl Serialize,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    match format {
        Format::Table => print!("{}", table()),
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => print_yaml_document(value)?,
    }
    Ok(())
}

pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    format!("{t}\n")
}

/// Runs a `basalt volume` command: against the control plane at
/// `server`, or the node's storage process with `--storage-socket`.
pub async fn run(server: &str, format: Format, args: VolumeArgs) -> anyhow::Result<()> {
    let Some(socket) = &args.storage_socket else {
        return crate::volume_cluster::run(server, format, args.command).await;
    };
    let socket: &Path = socket;
    let client = StorageClient::connect_unix(socket)
        .with_context(|| format!("storage process at {}", socket.display()))?;
    match args.command {
        VolumeCommand::Resize { .. }
        | VolumeCommand::Create { .. }
        | VolumeCommand::Delete { .. }
        | VolumeCommand::Snapshot { .. }
        | VolumeCommand::Clone { .. }
        | VolumeCommand::Move { .. }
        | VolumeCommand::AcceptCopy { .. } => {
            bail!(
                "create, delete, resize, snapshot, clone, move and accept-copy go through the control plane: run them without --storage-socket"
            )
        }
        VolumeCommand::List => {
            let volumes = client.list_volumes().await?;
            print(format, &volumes, || {
                table(
                    &["NAME", "SIZE", "ALLOCATED", "READ-ONLY", "UID"],
                    volumes
                        .iter()
                        .map(|v| {
                            vec![
                                v.name.clone(),
                                v.size_bytes.to_string(),
                                v.allocated_bytes.to_string(),
                                v.read_only.to_string(),
                                v.uid.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        VolumeCommand::Get { name } => {
            let volume = client
                .list_volumes()
                .await?
                .into_iter()
                .find(|v| v.name == name)
                .with_context(|| format!("no volume {name} in this node's pool"))?;
            let status = client.status().await?;
            let peers: Vec<ReplicaPeer> = status
                .replicas
                .into_iter()
                .filter(|p| p.volume == name)
                .collect();
            let view = VolumeView {
                volume,
                disk_state: status.disk_state,
                disk_error: status.disk_error,
                peers,
            };
            print(format, &view, || {
                let v = &view.volume;
                let mut out = format!(
                    "name       {}\nuid        {}\nsize       {}\nallocated  {}\nread-only  {}\n",
                    v.name, v.uid, v.size_bytes, v.allocated_bytes, v.read_only
                );
                out.push_str(&match view.disk_state {
                    DiskState::Attached => "disk       attached\n".to_owned(),
                    DiskState::Failed => {
                        format!(
                            "disk       failed, served by the peers ({})\n",
                            view.disk_error
                        )
                    }
                });
                if view.peers.is_empty() {
                    out.push_str("peers      none (not a primary here)\n");
                } else {
                    out.push('\n');
                    out.push_str(&table(
                        &[
                            "PEER",
                            "STATE",
                            "DIRTY CHUNKS",
                            "RESYNC BYTES",
                            "ACKED FRAMES",
                        ],
                        view.peers
                            .iter()
                            .map(|p| {
                                vec![
                                    p.peer.clone(),
                                    state_name(p.state).to_owned(),
                                    p.dirty_chunks.to_string(),
                                    p.resync_bytes.to_string(),
                                    p.acked_frames.to_string(),
                                ]
                            })
                            .collect(),
                    ));
                }
                out
            })
        }
        VolumeCommand::Verify {
            name,
            repair,
            rate_bytes,
        } => {
            let result = client
                .verify_volume(VerifyVolume {
                    name: name.clone(),
                    repair,
                    rate_bytes,
                })
                .await?;
            print(format, &result, || {
                table(
                    &[
                        "PEER",
                        "RESULT",
                        "CHECKED",
                        "OUT OF SYNC",
                        "REPAIRED",
                        "CHUNKS",
                    ],
                    result
                        .peers
                        .iter()
                        .map(|p| {
                            let result = match (&p.error, p.out_of_sync) {
                                (Some(e), _) => format!("not compared: {e}"),
                                (None, 0) => "in sync".to_owned(),
                                (None, _) => "differs".to_owned(),
                            };
                            let chunks: Vec<String> =
                                p.out_of_sync_chunks.iter().map(u64::to_string).collect();
                            vec![
                                p.peer.clone(),
                                result,
                                p.checked_chunks.to_string(),
                                p.out_of_sync.to_string(),
                                p.repaired.to_string(),
                                chunks.join(","),
                            ]
                        })
                        .collect(),
                )
            })?;
            let failed: Vec<&str> = result
                .peers
                .iter()
                .filter(|p| p.error.is_some() || p.out_of_sync > p.repaired)
                .map(|p| p.peer.as_str())
                .collect();
            if result.peers.is_empty() {
                bail!("{name} has no peers to verify against");
            }
            if !failed.is_empty() {
                bail!(
                    "{name} is not known to be in sync with {} (chunks that differ are marked dirty; the next resync sends them)",
                    failed.join(", ")
                );
            }
            Ok(())
        }
    }
}
