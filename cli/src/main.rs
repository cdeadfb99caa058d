//! `basalt`, the admin CLI: a thin gRPC client of the control plane's admin
//! API. It holds no state of its own; every command is one or a few calls
//! through `basalt_api::AdminClient`.
//!
//! Invariant: a bad flag, an unreadable or invalid file, an unreachable
//! server or an error from the server ends the command with a message that
//! names the problem and a non-zero exit status, never a panic.

mod cluster;
mod commands;
mod image;
mod migrate;
mod network;
mod node;
mod output;
mod policy;
mod token;
mod vm;
mod volume;
mod volume_cluster;
mod wait;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::output::Format;

/// Where the control plane answers unless told otherwise.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7400";

#[derive(Debug, Parser)]
#[command(
    name = "basalt",
    version,
    about = "The Basalt admin CLI",
    propagate_version = true
)]
struct Cli {
    /// The control plane's admin API address (`host:port`), or several
    /// members', comma-separated: a member that cannot be reached is
    /// skipped for the next.
    #[arg(long, global = true, env = "BASALT_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// How to print objects.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print one object: `basalt get vm web-1`.
    Get {
        /// Object kind: node, vm, placement, token, member, network,
        /// endpoint, policy, image, migration or volume.
        kind: basalt_api::Kind,
        /// Object name.
        name: String,
    },
    /// List the objects of a kind: `basalt list vms`.
    #[command(visible_alias = "ls")]
    List {
        /// Object kind, singular or plural: node, vm, placement, token,
        /// member, network, endpoint, policy, image, migration or volume.
        kind: basalt_api::Kind,
    },
    /// Create the objects described in a YAML or JSON file (`-` for stdin).
    Create {
        /// The file: one object, or a YAML stream of several (`---`).
        #[arg(short, long)]
        file: String,
    },
    /// Replace objects with the file's version (compare-and-swap on
    /// `meta.resource_version` when the file carries one).
    Replace {
        /// The file: one object, or a YAML stream of several (`---`).
        #[arg(short, long)]
        file: String,
    },
    /// Delete one object.
    Delete {
        /// Object kind.
        kind: basalt_api::Kind,
        /// Object name.
        name: String,
        /// Delete only if the object is still at this resource version.
        #[arg(long)]
        resource_version: Option<u64>,
        /// Delete even what the control plane refuses to delete for a
        /// reason it names (a node with VMs or a volume's only copy, a
        /// migration switching over).
        #[arg(long)]
        force: bool,
    },
    /// Stream changes as they happen (every kind unless one is named).
    Watch {
        /// Object kind to follow.
        kind: Option<basalt_api::Kind>,
        /// Start after this resource version (0 = from now on).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// The cluster as a whole: `status` (members, quorum, and what needs
    /// attention among nodes, VMs, volumes and migrations).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Join tokens for new nodes: create (prints the secret once), list, revoke.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Disk images for VM disks: import, list, delete.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Nodes: list, cordon, uncordon, drain, remove.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Virtual machines: create, list, get, start, stop, restart, delete, console.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Network policies: apply -f FILE (YAML), list, delete.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// VM networks: create (CIDR, VNI, --routing overlay|native), list.
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Volumes: list, get (each copy's node, state and sync progress),
    /// resize; with --storage-socket, one node's pool from its storage
    /// process: list, get (with replication peers), verify.
    Volume(volume::VolumeArgs),
    /// Print a shell completion script: `basalt completion bash`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "basalt", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("basalt: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Cluster(command) => {
            runtime.block_on(cluster::run(&cli.server, cli.output, command))
        }
        Command::Token(command) => runtime.block_on(token::run(&cli.server, cli.output, command)),
        Command::Policy(command) => runtime.block_on(policy::run(&cli.server, cli.output, command)),
        Command::Network(command) => {
            runtime.block_on(network::run(&cli.server, cli.output, command))
        }
        Command::Image(command) => runtime.block_on(image::run(&cli.server, cli.output, command)),
        Command::Node(command) => runtime.block_on(node::run(&cli.server, cli.output, command)),
        Command::Vm(command) => runtime.block_on(vm::run(&cli.server, cli.output, command)),
        Command::Volume(args) => runtime.block_on(volume::run(&cli.server, cli.output, args)),
        command => runtime.block_on(commands::run(&cli.server, cli.output, command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("basalt: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
