//! `basalt-install`: validate an answer file, show the install plan, or
//! (on the live ISO) install a Basalt node.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use basalt_installer::plan::{Inventory, Link};
use basalt_installer::{AnswerError, AnswerFile, disks::Disk, execute, source};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "basalt-install",
    version,
    about = "Install a Basalt node from an answer file"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check an answer file; print every error with its field, or "ok".
    Validate {
        /// The answer file (YAML).
        file: PathBuf,
    },
    /// Show what an install would do on a machine, without touching it.
    Plan {
        /// The answer file (YAML).
        file: PathBuf,
        /// The machine's disks: output of `lsblk --json --bytes --nodeps
        /// --output PATH,SIZE,MODEL,SERIAL,TYPE,RO,RM,TRAN` (default: run it).
        #[arg(long)]
        disks_json: Option<PathBuf>,
        /// The machine's links: output of `ip -json link` (default: the
        /// interface is chosen at install time unless the file names one).
        #[arg(long)]
        links_json: Option<PathBuf>,
        /// Plan as if /dev/kvm were present.
        #[arg(long)]
        kvm: bool,
    },
    /// Install this machine (on the live ISO; erases the chosen disks).
    Run(execute::RunArgs),
    /// Find the answer file (kernel command line, labelled partition, the
    /// ISO, or questions on the console) and print it.
    Find {
        /// Where the live medium is mounted.
        #[arg(long, default_value = source::LIVE_MEDIUM)]
        medium: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { file } => validate(&file),
        Command::Plan {
            file,
            disks_json,
            links_json,
            kvm,
        } => show_plan(&file, disks_json.as_deref(), links_json.as_deref(), kvm),
        Command::Run(args) => execute::run(args),
        Command::Find { medium } => source::find(&medium).map(|(origin, text)| {
            eprintln!("answer file from {origin}");
            print!("{text}");
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("basalt-install: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(file: &Path) -> anyhow::Result<AnswerFile> {
    match AnswerFile::load(file) {
        Ok(answers) => Ok(answers),
        Err(err @ AnswerError::Invalid { .. }) => {
            anyhow::bail!("{} is not a valid answer file:\n{err}", file.display())
        }
        Err(err) => Err(err.into()),
    }
}

fn validate(file: &Path) -> anyhow::Result<()> {
    load(file)?;
    println!("{}: ok", file.display());
    Ok(())
}

fn show_plan(
    file: &Path,
    disks_json: Option<&Path>,
    links_json: Option<&Path>,
    kvm: bool,
) -> anyhow::Result<()> {
    let answers = load(file)?;
    let disks = match disks_json {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Disk::parse_lsblk(&text)?
        }
        None => execute::list_disks()?,
    };
    let links = match links_json {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(Link::parse_ip_json(&text)?)
        }
        None => None,
    };
    let inventory = Inventory {
        disks,
        links,
        exclude: Vec::new(),
        kvm,
    };
    let plan = basalt_installer::plan(&answers, &inventory, &|p| p.to_owned())?;
    print!("{}", plan.describe());
    Ok(())
}
