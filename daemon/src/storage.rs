//! `basaltd storage`: the per-node storage process and its operator
//! commands — create a pool, manage its volumes, serve them over NBD.
//!
//! `serve --local-socket PATH` also serves the storage-local gRPC API
//! (`basalt_sds::local`) that the node agent uses to manage volumes while
//! the NBD server runs.
//!
//! The pool file is locked by whichever process has it open, so volume
//! commands fail with a clear message while `serve` runs on the same pool.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use basalt_sds::backend::FileBackend;
use basalt_sds::local::{ExportConfig, LocalService, made_from};
use basalt_sds::nbd::Server;
use basalt_sds::pool::{Pool, PoolOptions, VolumeInfo};
use basalt_sds::replication::Protocol;
use basalt_sds::replication::attach::{AttachOptions, AttachSpec, Attachments, Role};
use basalt_sds::replication::book::ReplicaBook;
use basalt_sds::replication::fence::AgentFencer;
use basalt_sds::replication::replica::ReplicaServer;
use clap::{Args, Subcommand};

/// `basaltd storage ...`
#[derive(Debug, Args)]
pub struct StorageArgs {
    #[command(subcommand)]
    command: StorageCommand,
}

#[derive(Debug, Subcommand)]
enum StorageCommand {
    /// Create or inspect a pool.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Create, list, snapshot, clone, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Serve every volume of a pool over NBD (export name = volume name or
    /// uid) until SIGTERM or SIGINT.
    Serve(Box<ServeArgs>),
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Format a file (created sparse) or block device as an empty pool.
    Create {
        /// The backing file or block device.
        #[arg(long)]
        path: PathBuf,
        /// Size of a new backing file, e.g. 10G (ignored for a block device).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Data chunk size, a power of two from 4K to 4M.
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        chunk_size: u64,
        /// Volumes may add up to this percentage of the data area.
        #[arg(long, default_value_t = basalt_sds::pool::DEFAULT_OVERPROVISION_PERCENT)]
        overprovision_percent: u32,
        /// Overwrite an existing pool.
        #[arg(long)]
        force: bool,
    },
    /// Show the pool's state and check its invariants.
    Status {
        /// The pool.
        #[arg(long, env = "BASALT_POOL")]
        pool: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create an empty thin volume.
    Create {
        /// The pool.
        #[arg(long, env = "BASALT_POOL")]
        pool: PathBuf,
        /// The volume's name.
        name: String,
        /// Its size, e.g. 10G (a multiple of 512 bytes).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// List volumes.
    List {
        /// The pool.
        #[arg(long, env = "BASALT_POOL")]
        pool: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A read-only snapshot sharing the source's chunks.
    Snapshot {
        /// The pool.
        #[arg(long, env = "BASALT_POOL")]
        pool: PathBuf,
        /// The volume to snapshot.
        source: String,
        /// The snapshot's name.
        name: String,
    },
    /// A writable clone sharing the source's chunks.
    Clone {
        /// The pool.
        #[arg(long, env = "BASALT_POOL")]
        pool: PathBuf,
        /// The volume or snapshot to clone.
        source: String,
        /// The clone's name.
        name: String,
    },
    /// Grow a volume: offline in a pool file, or online through a running
    /// storage process (`--local-socket`), where a primary's peers grow
    /// their copies before it returns.
    Resize {
        /// The pool (offline: no process serves it).
        #[arg(long, env = "BASALT_POOL", required_unless_present = "local_socket")]
        pool: Option<PathBuf>,
        /// The running process's storage-local socket (online; used
        /// instead of the pool when given).
        #[arg(long)]
        local_socket: Option<PathBuf>,
        /// The volume.
        name: String,
        /// The new size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume (chunks shared with snapshots or clones stay).
    Delete {
        /// The pool.
        #[arg(long, env = "BASALT_POOL")]
        pool: PathBuf,
        /// The volume.
        name: String,
    },
    /// Attach the pool's backing store again, in the running storage
    /// process, after an I/O error detached it (once the device works):
    /// primary volumes written meanwhile get those chunks back from a
    /// peer first; secondaries are resynced by their primaries.
    AttachDisk {
        /// The running process's storage-local socket.
        #[arg(long, env = "BASALT_STORAGE_SOCKET")]
        local_socket: PathBuf,
    },
    /// Online verify of a volume that is a primary in the running storage
    /// process: compare every chunk with each connected peer while the
    /// volume is in use; chunks that differ are marked dirty (the next
    /// resync sends them). Exits 1 when any differ or a peer could not be
    /// compared.
    Verify {
        /// The running process's storage-local socket.
        #[arg(long, env = "BASALT_STORAGE_SOCKET")]
        local_socket: PathBuf,
        /// The volume.
        name: String,
        /// Send the chunks that differ again at once.
        #[arg(long)]
        repair: bool,
        /// Most bytes per second read on each side, e.g. 50M (0: the
        /// process's sync rate).
        #[arg(long, value_parser = parse_size, default_value = "0")]
        rate: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set when an attached volume's primary acknowledges writes, in the
    /// running storage process: `A` once written here and handed to every
    /// peer's send buffer, `B` once every peer received it, `C` once every
    /// peer applied it (FLUSH and FUA always wait for every peer's
    /// durability). Kept with the attachment.
    Protocol {
        /// The running process's storage-local socket.
        #[arg(long, env = "BASALT_STORAGE_SOCKET")]
        local_socket: PathBuf,
        /// The volume.
        name: String,
        /// A, B or C.
        protocol: Protocol,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The pool.
    #[arg(long, env = "BASALT_POOL")]
    pool: PathBuf,
    /// TCP address to serve NBD on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// Also serve on this Unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Serve the storage-local gRPC API (what the node agent calls:
    /// volumes, exports, status) on this Unix socket.
    #[arg(long)]
    local_socket: Option<PathBuf>,
    /// Also run as a replica peer: accept primaries' replication
    /// connections on this address and apply their writes to this pool's
    /// volumes of the same name (never-attached volumes, and volumes
    /// attached secondary or primary through the storage-local API).
    #[arg(long)]
    replica_listen: Option<SocketAddr>,
    /// Most bytes per second one resync or full sync of a peer sends
    /// (e.g. 100M; 0: no limit).
    #[arg(long, value_parser = parse_size, default_value = "100M")]
    sync_rate: u64,
    /// As a replica, refuse primaries and frames with an epoch below this
    /// (the newest epoch seen per volume is also kept in `POOL.epochs`).
    #[arg(long, default_value_t = 0)]
    min_epoch: u64,
    /// As a primary, replicate VOLUME to the replica peer at ADDR
    /// (repeatable; two peers of one volume make 3 replicas).
    #[arg(long, value_name = "VOLUME=ADDR", value_parser = parse_peer)]
    peer: Vec<(String, SocketAddr)>,
    /// When the `--peer` volumes acknowledge writes: `C` once every peer
    /// applied them, `B` once every peer received them, `A` once they are
    /// in every peer's send buffer (FLUSH and FUA always wait for every
    /// peer's durability).
    #[arg(long, default_value = "C")]
    protocol: Protocol,
    /// This primary's epoch, raised at every promotion; replicas refuse
    /// writes from any older one.
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// With `--peer`: make a copy whose full sync did not finish a
    /// primary anyway, as it is (DRBD's `primary --force`); its peers are
    /// then filled from it. Without it such a copy is refused.
    #[arg(long)]
    force_primary: bool,
    /// Who confirms a lost peer is outdated: `allow` goes on without it
    /// (its chunks are tracked and resynced), `deny` suspends writes until
    /// it is back.
    #[arg(long, value_enum, default_value_t = FencerArg::Deny)]
    fencer: FencerArg,
    /// Extents (64 chunks each) every primary stream's dirty log keeps
    /// hot, 0 to 384: writes to a hot extent cost no sync, a write
    /// outside the hot set one `fdatasync`; after a power loss a
    /// restarted primary resyncs at most the hot extents. 0 keeps none
    /// (bits synced with each FLUSH: a power loss before it may lose
    /// them).
    #[arg(long, default_value_t = basalt_sds::replication::dirty_log::DEFAULT_ACTIVITY_EXTENTS, value_parser = parse_activity_extents)]
    activity_extents: usize,
    /// For tests of backing-device errors: every read, write and sync of
    /// the pool fails with EIO once this file exists (checked on each
    /// I/O).
    #[arg(long, hide = true)]
    fail_io_when: Option<PathBuf>,
    /// For tests of the replication protocols: as a replica, apply no
    /// primary's frame while this file exists (frames are still read, and
    /// protocol B's receive acks sent).
    #[arg(long, hide = true)]
    hold_replica_writes_when: Option<PathBuf>,
    /// For tests of a disk attached again: hold the copy-back of the
    /// chunks it missed while this file exists (reads and writes go on).
    #[arg(long, hide = true)]
    hold_copy_back_when: Option<PathBuf>,
}

/// A backing store that fails every I/O once a trigger file exists (a
/// dying disk, on command, for end-to-end tests).
#[derive(Debug)]
struct FailOnTrigger {
    inner: FileBackend,
    trigger: PathBuf,
}

impl FailOnTrigger {
    fn check(&self) -> std::io::Result<()> {
        if self.trigger.exists() {
            return Err(std::io::Error::from_raw_os_error(nix::libc::EIO));
        }
        Ok(())
    }
}

impl basalt_sds::backend::Backend for FailOnTrigger {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.write_at(buf, offset)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync()
    }

    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
}

/// The standalone fencer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FencerArg {
    /// Confirm every lost peer outdated.
    Allow,
    /// Confirm none: writes wait for the peer.
    Deny,
}

fn parse_activity_extents(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|e| format!("--activity-extents {s:?}: {e}"))?;
    basalt_sds::replication::dirty_log::check_activity_extents(n)
        .map_err(|e| format!("--activity-extents: {e}"))
}

fn parse_peer(s: &str) -> Result<(String, SocketAddr), String> {
    let (vol, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not VOLUME=ADDR"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("bad peer address {addr:?}: {e}"))?;
    Ok((vol.to_owned(), addr))
}

/// Parses `4096`, `64K`, `10M`, `1G`, `2T` (also `KiB`, `MiB`, ...; powers
/// of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64K, 10G)"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn open(path: &Path) -> anyhow::Result<Pool> {
    if !path.exists() {
        bail!(
            "pool {} does not exist (create it with `basaltd storage pool create`)",
            path.display()
        );
    }
    let backend = FileBackend::open(path)?;
    Pool::open(Arc::new(backend)).with_context(|| format!("opening pool {}", path.display()))
}

/// The replication book of pool `pool`, as a command that changes no
/// epoch reads it.
fn open_book(pool: &Path) -> anyhow::Result<ReplicaBook> {
    let file = book_path(pool);
    ReplicaBook::open(&file, 0).with_context(|| format!("reading {}", file.display()))
}

/// The replication book kept beside pool `pool` (`POOL.epochs`).
fn book_path(pool: &Path) -> PathBuf {
    let mut file = pool.as_os_str().to_owned();
    file.push(".epochs");
    PathBuf::from(file)
}

fn print_volume(v: &VolumeInfo) {
    println!(
        "{:<24} {:>14} {:>14} {:<3} {}",
        v.name,
        v.size,
        v.mapped_bytes,
        if v.read_only { "ro" } else { "rw" },
        v.uid
    );
}

fn volume_json(v: &VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "name": v.name,
        "uid": v.uid.to_string(),
        "size": v.size,
        "mapped_bytes": v.mapped_bytes,
        "read_only": v.read_only,
        "created": v.created,
    })
}

/// Runs a storage subcommand.
pub fn run(args: StorageArgs) -> anyhow::Result<()> {
    match args.command {
        StorageCommand::Pool(PoolCommand::Create {
            path,
            size,
            chunk_size,
            overprovision_percent,
            force,
        }) => {
            if !force && path.exists() && FileBackend::open(&path).is_ok_and(|b| Pool::probe(&b)) {
                bail!(
                    "{} already holds a pool (pass --force to overwrite it)",
                    path.display()
                );
            }
            let chunk_size = u32::try_from(chunk_size)
                .map_err(|_| anyhow::anyhow!("chunk size {chunk_size} is too large"))?;
            let backend = FileBackend::create(&path, size)?;
            let opts = PoolOptions {
                chunk_size,
                overprovision_percent,
                ..PoolOptions::default()
            };
            let pool = Pool::create(Arc::new(backend), &opts)
                .with_context(|| format!("creating pool {}", path.display()))?;
            let st = pool.status();
            println!(
                "created pool {} at {}: {} chunks of {} bytes",
                st.uid,
                path.display(),
                st.data_chunks,
                st.chunk_size
            );
        }
        StorageCommand::Pool(PoolCommand::Status { pool, json }) => {
            let p = open(&pool)?;
            let st = p.status();
            let verified = p.verify();
            if json {
                let v = serde_json::json!({
                    "uid": st.uid.to_string(),
                    "chunk_size": st.chunk_size,
                    "data_chunks": st.data_chunks,
                    "free_chunks": st.free_chunks,
                    "virtual_bytes": st.virtual_bytes,
                    "virtual_limit": st.virtual_limit,
                    "volumes": st.volumes,
                    "generation": st.generation,
                    "verify": verified.as_ref().map_or_else(|e| e.to_string(), |()| "ok".into()),
                });
                println!("{v}");
            } else {
                println!("pool        {}", st.uid);
                println!("chunk size  {}", st.chunk_size);
                println!("chunks      {} ({} free)", st.data_chunks, st.free_chunks);
                println!(
                    "virtual     {} of {} allowed",
                    st.virtual_bytes, st.virtual_limit
                );
                println!("volumes     {}", st.volumes);
                println!("generation  {}", st.generation);
            }
            verified.context("pool verification")?;
        }
        StorageCommand::Volume(cmd) => volume(cmd)?,
        StorageCommand::Serve(args) => serve(*args)?,
    }
    Ok(())
}

fn volume(cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create { pool, name, size } => {
            print_volume(&open(&pool)?.create_volume(&name, size)?);
        }
        VolumeCommand::List { pool, json } => {
            let vols = open(&pool)?.list();
            // Which copies a cut full sync left incomplete (decision 91).
            let book = open_book(&pool)?;
            if json {
                let all: Vec<_> = vols
                    .iter()
                    .map(|v| {
                        let mut j = volume_json(v);
                        j["incomplete"] = book.incomplete(&v.name).into();
                        j
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(all));
            } else {
                println!(
                    "{:<24} {:>14} {:>14} {:<3} UID",
                    "NAME", "SIZE", "MAPPED", "RW"
                );
                for v in &vols {
                    print_volume(v);
                    if book.incomplete(&v.name) {
                        println!(
                            "  ^ incomplete: a full sync or resync into this copy did not finish"
                        );
                    }
                }
            }
        }
        VolumeCommand::Snapshot { pool, source, name } => {
            let (p, book) = (open(&pool)?, open_book(&pool)?);
            let made = p.snapshot(&source, &name)?;
            print_volume(&made_from(&p, &book, &source, made)?);
        }
        VolumeCommand::Clone { pool, source, name } => {
            let (p, book) = (open(&pool)?, open_book(&pool)?);
            let made = p.clone_volume(&source, &name)?;
            print_volume(&made_from(&p, &book, &source, made)?);
        }
        VolumeCommand::AttachDisk { local_socket } => attach_disk(&local_socket)?,
        VolumeCommand::Protocol {
            local_socket,
            name,
            protocol,
        } => set_protocol(&local_socket, &name, protocol)?,
        VolumeCommand::Resize {
            pool,
            local_socket,
            name,
            size,
        } => match (local_socket, pool) {
            (Some(socket), _) => resize_online(&socket, &name, size)?,
            (None, Some(pool)) => print_volume(&open(&pool)?.resize(&name, size)?),
            (None, None) => anyhow::bail!("resize needs --pool or --local-socket"),
        },
        VolumeCommand::Delete { pool, name } => {
            open(&pool)?.delete(&name)?;
            println!("deleted {name}");
        }
        VolumeCommand::Verify {
            local_socket,
            name,
            repair,
            rate,
            json,
        } => verify(&local_socket, name, repair, rate, json)?,
    }
    Ok(())
}

/// Attaches the backing store of the running process at `socket` again.
fn attach_disk(socket: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let st = rt
        .block_on(async {
            basalt_api::StorageClient::connect_unix(socket)?
                .attach_disk()
                .await
        })
        .context("attaching the disk again")?;
    println!("disk {:?}", st.disk_state);
    Ok(())
}

/// Sets the replication protocol of `name` in the running process at
/// `socket`.
fn set_protocol(socket: &Path, name: &str, protocol: Protocol) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let wanted = match protocol {
        Protocol::A => basalt_api::ReplicationProtocol::A,
        Protocol::B => basalt_api::ReplicationProtocol::B,
        Protocol::C => basalt_api::ReplicationProtocol::C,
    };
    let a = rt
        .block_on(async {
            basalt_api::StorageClient::connect_unix(socket)?
                .set_replication_protocol(name, wanted)
                .await
        })
        .with_context(|| format!("setting protocol {protocol} on {name}"))?;
    println!(
        "{} {:?} epoch {} protocol {protocol}",
        a.name, a.role, a.epoch
    );
    Ok(())
}

/// Grows `name` through the running process at `socket`.
fn resize_online(socket: &Path, name: &str, size: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let v = rt
        .block_on(async {
            basalt_api::StorageClient::connect_unix(socket)?
                .resize_volume(name, size)
                .await
        })
        .with_context(|| format!("growing {name} to {size} bytes"))?;
    println!(
        "{:<24} {:>14} {:>14} {:<3} {}",
        v.name,
        v.size_bytes,
        v.allocated_bytes,
        if v.read_only { "ro" } else { "rw" },
        v.uid
    );
    Ok(())
}

fn verify(socket: &Path, name: String, repair: bool, rate: u64, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(async {
        let client = basalt_api::StorageClient::connect_unix(socket)?;
        client
            .verify_volume(basalt_api::VerifyVolume {
                name: name.clone(),
                repair,
                rate_bytes: rate,
            })
            .await
    });
    let result = result.with_context(|| format!("verifying {name}"))?;
    if json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "{:<24} {:<12} {:>10} {:>12} {:>9}  CHUNKS ({} bytes each)",
            "PEER", "RESULT", "CHECKED", "OUT-OF-SYNC", "REPAIRED", result.chunk_size
        );
        for p in &result.peers {
            let listed: Vec<String> = p.out_of_sync_chunks.iter().map(u64::to_string).collect();
            println!(
                "{:<24} {:<12} {:>10} {:>12} {:>9}  {}",
                p.peer,
                if p.error.is_some() {
                    "not compared"
                } else if p.out_of_sync > 0 {
                    "differs"
                } else {
                    "in sync"
                },
                p.checked_chunks,
                p.out_of_sync,
                p.repaired,
                p.error.clone().unwrap_or_else(|| listed.join(","))
            );
        }
    }
    if result.peers.is_empty() {
        bail!("{name} has no peers to verify against");
    }
    let failed: Vec<&str> = result
        .peers
        .iter()
        .filter(|p| p.error.is_some() || p.out_of_sync > p.repaired)
        .map(|p| p.peer.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{name} is not known to be in sync with {} (chunks that differ are marked dirty)",
            failed.join(", ")
        );
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let pool = match &args.fail_io_when {
        None => open(&args.pool)?,
        Some(trigger) => {
            tracing::warn!(trigger = %trigger.display(), "the pool's I/O fails once this file exists (test mode)");
            let backend = FailOnTrigger {
                inner: FileBackend::open(&args.pool)?,
                trigger: trigger.clone(),
            };
            Pool::open(Arc::new(backend))
                .with_context(|| format!("opening pool {}", args.pool.display()))?
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // The newest epoch and the synced generation per volume, kept beside
    // the pool.
    let book_file = book_path(&args.pool);
    let book = ReplicaBook::open(&book_file, args.min_epoch)
        .with_context(|| format!("reading {}", book_file.display()))?;
    // Every volume's role, kept beside the pool and restored before
    // anything is served.
    let mut attach_file = args.pool.clone().into_os_string();
    attach_file.push(".attachments");
    let attach_file = PathBuf::from(attach_file);
    // Attached primaries ask the node agent (watching the local API's
    // fence requests) to outdate a lost peer; with no agent, they wait.
    let fencer = AgentFencer::default();
    let attachments = Arc::new(
        Attachments::persistent(
            pool.clone(),
            Arc::new(book),
            AttachOptions {
                sync_rate: args.sync_rate,
                fencer: Arc::new(fencer.clone()),
                activity_extents: args.activity_extents,
                ..AttachOptions::default()
            },
            &attach_file,
        )
        .with_context(|| format!("restoring {}", attach_file.display()))?,
    );
    let replica = match args.replica_listen {
        Some(addr) => Some(
            ReplicaServer::serve(attachments.clone(), addr)
                .with_context(|| format!("listening for primaries on {addr}"))?,
        ),
        None => None,
    };
    if let (Some(replica), Some(path)) = (&replica, &args.hold_replica_writes_when) {
        replica.holds().hold_apply_when(path.clone());
    }
    if let Some(path) = &args.hold_copy_back_when {
        attachments.copy_back_hold().hold_when(path.clone());
    }
    // The operator's static peers: each volume named becomes a primary
    // with its peers, as if attached through the API, over whatever was
    // restored (an old epoch is left for the peers to depose).
    let mut static_peers: Vec<(String, Vec<String>)> = Vec::new();
    for (name, peer) in &args.peer {
        match static_peers.iter_mut().find(|(n, _)| n == name) {
            Some((_, peers)) => peers.push(peer.to_string()),
            None => static_peers.push((name.clone(), vec![peer.to_string()])),
        }
    }
    for (name, peers) in static_peers {
        let spec = AttachSpec {
            role: Role::Primary,
            epoch: args.epoch,
            peers: peers.clone(),
            allow_outdate: args.fencer == FencerArg::Allow,
            protocol: args.protocol,
        };
        tracing::info!(volume = %name, ?peers, epoch = args.epoch, fencer = ?args.fencer, protocol = %args.protocol, "replicating");
        attachments
            .attach_unchecked(&name, spec, args.force_primary)
            .with_context(|| format!("--peer {name}={}", peers.join(",")))?;
    }
    let local = args.local_socket.as_ref().map(|_| {
        LocalService::new(
            attachments.clone(),
            ExportConfig {
                tcp: args.listen,
                unix: args.unix.clone(),
                replication: replica.as_ref().map(ReplicaServer::addr),
            },
            fencer.clone(),
        )
    });
    let result = rt.block_on(async {
        let server = Server::with_attachments(attachments.clone());
        let tcp = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(server.clone().serve_tcp(tcp));
        if let Some(path) = &args.unix {
            let unix = Server::bind_unix(path)
                .with_context(|| format!("listening on {}", path.display()))?;
            tasks.spawn(server.serve_unix(unix));
        }
        if let (Some(local), Some(path)) = (local, args.local_socket.clone()) {
            tasks.spawn(async move {
                local
                    .serve_unix(&path, std::future::pending())
                    .await
                    .map_err(std::io::Error::other)
            });
        }
        tracing::info!(
            listen = %args.listen,
            unix = ?args.unix,
            local_socket = ?args.local_socket,
            pool = %args.pool.display(),
            volumes = pool.list().len(),
            "serving NBD"
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            Some(r) = tasks.join_next() => {
                r.context("listener task")?.context("accepting connections")?;
            }
        }
        anyhow::Ok(())
    });
    pool.flush().context("flushing the pool on shutdown")?;
    for path in args.unix.iter().chain(&args.local_socket) {
        let _ = std::fs::remove_file(path);
    }
    // Blocking workers may still be parked on idle connections.
    rt.shutdown_background();
    result
}

#[cfg(test)]
mod tests {
    use super::{parse_activity_extents, parse_size};

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999P").is_err());
    }

    #[test]
    fn activity_extents_are_checked_and_name_the_flag() {
        assert_eq!(parse_activity_extents("0"), Ok(0));
        assert_eq!(parse_activity_extents("384"), Ok(384));
        for bad in ["385", "-1", "many"] {
            let e = parse_activity_extents(bad).expect_err(bad);
            assert!(e.contains("--activity-extents"), "{e}");
        }
    }
}
