//! `basaltd`, the one Basalt daemon binary: thin wiring of the library
//! crates into subcommands. Each subcommand appears as its component lands:
//! `lab` now; `control`, `agent` and `storage` with their issues.
//!
//! Invariant: bad flags or configuration end the process with a message
//! naming the problem and a non-zero exit status, never a panic.

mod agent;
mod control;
mod lab;
mod logging;
mod net;
mod storage;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "basaltd",
    version,
    about = "The Basalt daemon",
    propagate_version = true
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::Format::Text)]
    log_format: logging::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The node agent: joins the cluster and runs the VMs placed here.
    Agent(Box<agent::AgentArgs>),
    /// A control-plane member: Raft-replicated cluster state and the admin API.
    Control(Box<control::ControlArgs>),
    /// A multi-node lab on this machine: every node a network namespace
    /// with its own libvirtd, and a test VM running.
    Lab(lab::LabArgs),
    /// Views of the node's eBPF datapath (pinned maps).
    Net(net::NetArgs),
    /// The node's storage process: thin pool, volumes, NBD server.
    Storage(storage::StorageArgs),
}

/// Every role of the daemon allocates through mimalloc: the control
/// plane's per-write encoding, decoding and state copies spent about a
/// seventh of its CPU in glibc's malloc and free (decision 71).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Agent(args) => agent::run(*args),
        Command::Lab(args) => lab::run(args),
        Command::Net(args) => net::run(args),
        Command::Storage(args) => storage::run(args),
        Command::Control(args) => control::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("basaltd: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
