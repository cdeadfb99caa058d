//! `basalt vm`: virtual machines as users think of them — create (from
//! flags or a file), list, get, start, stop, restart, delete, console.
//!
//! Every verb is a change to the VM object (by compare-and-swap) and,
//! with `--wait`, a poll of its status until the agents report the
//! change done, printing each step (`phase` and node) as it is seen.

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use basalt_api::{
    AdminClient, ApiError, CloudInit, Disk, KernelBoot, Kind, Nic, Object, ObjectMeta,
    ReplicationProtocol, Vm, VmPhase,
};

use crate::output::{self, Format};
use crate::wait::{Deadline, POLL};

/// Where agents write consoles unless told otherwise (`basaltd agent
/// --console-dir`).
const DEFAULT_CONSOLE_DIR: &str = "/var/log/basalt/console";

/// What to do with VMs.
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Create a VM from flags, or from a file (`-f`).
    Create(Box<CreateArgs>),
    /// List the VMs.
    #[command(visible_alias = "ls")]
    List,
    /// Print one VM.
    Get {
        /// The VM.
        name: String,
    },
    /// Start a VM.
    Start(PowerArgs),
    /// Stop a VM (graceful, then forced after the agent's grace period).
    Stop(PowerArgs),
    /// Stop a VM, then start it again.
    Restart(PowerArgs),
    /// Delete a VM; its node stops it and removes its domain.
    #[command(visible_alias = "rm")]
    Delete(PowerArgs),
    /// Print a VM's serial console log (and follow it with `--follow`).
    Console {
        /// The VM.
        name: String,
        /// Keep printing what the guest writes until interrupted.
        #[arg(long, short = 'F')]
        follow: bool,
        /// Where the VM's node writes consoles (its agent's `--console-dir`).
        #[arg(long, default_value = DEFAULT_CONSOLE_DIR)]
        console_dir: PathBuf,
    },
    /// Move a running VM live to another node (`--to`, or the scheduler's
    /// choice); `--wait` follows it to the end.
    Migrate(crate::migrate::MigrateArgs),
    /// Add a disk to a VM, as `vm create --disk` describes one; a running
    /// guest gets it at once. `attach=VOLUME` needs the volume where the
    /// VM's disks are (its primary copy on the VM's node).
    AddDisk {
        /// The VM.
        name: String,
        /// The disk.
        #[arg(long, value_parser = parse_disk)]
        disk: Disk,
    },
    /// Let the control plane start a VM held off by a replica node's
    /// unfinished or outdated disk copies (their primary's node was lost
    /// while they filled, or while they were away) on that node's copies
    /// as they are: writes they missed are lost. Good for the VM's
    /// current placement only; that node's storage then takes its copies
    /// as primaries with force.
    AcceptCopy {
        /// The VM.
        name: String,
        /// The replica node whose copies to accept.
        #[arg(long)]
        node: String,
    },
    /// Remove a disk from a VM; a running guest is asked to let go of it.
    /// A VM's own disk is deleted with its data; an attached volume is
    /// kept, released (standalone again) once the guest has let go of it.
    RemoveDisk {
        /// The VM.
        name: String,
        /// The disk's name.
        disk: String,
    },
}

/// `basalt vm create` flags.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The VM's name (a DNS label); not needed with `-f`.
    name: Option<String>,
    /// A YAML or JSON file with the VM object(s) instead of flags.
    #[arg(short, long, conflicts_with_all = ["cpus", "memory", "disk", "nic", "kernel", "user_data", "network_config", "ssh_key"])]
    file: Option<String>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory: MiB, or a size with M or G (e.g. 512M, 2G).
    #[arg(long, default_value = "256M", value_parser = parse_memory_mib)]
    memory: u64,
    /// A disk: `name=NAME,size=SIZE[,image=IMAGE][,replicas=N][,protocol=P]`,
    /// or `name=NAME,volume=VOLUME[,size=SIZE][,replicas=N][,protocol=P]`
    /// for a clone of a volume or snapshot (its size when `size` is left
    /// out), or `name=NAME,attach=VOLUME` for an existing volume that is
    /// the disk itself (the VM goes where its copies are; the volume stays
    /// when the VM is deleted); `protocol` is when the primary acknowledges
    /// a write, A, B or C (the default) (repeat).
    #[arg(long, value_parser = parse_disk)]
    disk: Vec<Disk>,
    /// A NIC: `network=NET[,ip=ADDR][,mac=MAC]` (repeat).
    #[arg(long, value_parser = parse_nic)]
    nic: Vec<Nic>,
    /// Boot this kernel directly (an absolute path present on every node).
    #[arg(long)]
    kernel: Option<String>,
    /// The initrd for `--kernel`.
    #[arg(long, requires = "kernel")]
    initrd: Option<String>,
    /// The kernel command line for `--kernel`.
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,
    /// cloud-init: a file whose content is the VM's user-data (e.g. a
    /// `#cloud-config`); the VM gets a NoCloud seed.
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
    /// cloud-init: a file whose content is the VM's network-config.
    #[arg(long, value_name = "FILE")]
    network_config: Option<PathBuf>,
    /// cloud-init: an SSH public key line, or `@FILE` for every key line
    /// of a file such as `~/.ssh/id_ed25519.pub` (repeat).
    #[arg(long, value_name = "KEY|@FILE")]
    ssh_key: Vec<String>,
    /// A label `KEY=VALUE` (repeat).
    #[arg(long, value_parser = parse_pair)]
    label: Vec<(String, String)>,
    /// Create it stopped.
    #[arg(long)]
    stopped: bool,
    /// Wait until the VM runs (or is placed and stopped, with --stopped).
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits: a number with s, m or h.
    #[arg(long, default_value = "5m", value_parser = crate::token::parse_duration)]
    timeout: Duration,
}

/// The flags of the verbs that change one VM.
#[derive(Debug, clap::Args)]
pub struct PowerArgs {
    /// The VM.
    name: String,
    /// Wait until the change is done, printing progress.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits: a number with s, m or h.
    #[arg(long, default_value = "5m", value_parser = crate::token::parse_duration)]
    timeout: Duration,
}

/// Runs one `basalt vm` command against the server at `server`.
pub async fn run(server: &str, format: Format, command: VmCommand) -> anyhow::Result<()> {
    // Local input first: a bad flag or file is reported with no server.
    let create = match &command {
        VmCommand::Create(args) => Some(vms_to_create(args)?),
        _ => None,
    };
    let client = AdminClient::connect(server).await?;
    match command {
        VmCommand::Create(args) => {
            for vm in create.unwrap_or_default() {
                let name = vm.meta.name.clone();
                let running = vm.spec.running;
                let created = client
                    .create(Object::Vm(vm))
                    .await
                    .with_context(|| format!("creating vm/{name}"))?;
                println!(
                    "vm/{name} created (resource version {})",
                    created.meta().resource_version
                );
                if args.wait {
                    let target = if running {
                        VmPhase::Running
                    } else {
                        VmPhase::Stopped
                    };
                    wait_for_phase(&client, &name, target, args.timeout).await?;
                }
            }
            Ok(())
        }
        VmCommand::List => {
            let list = client.list(Kind::Vm).await?;
            output::print_objects(format, Kind::Vm, &list.objects)
        }
        VmCommand::Get { name } => {
            let vm = client.get(Kind::Vm, &name).await?;
            let (outdated, conditions) = match &vm {
                Object::Vm(vm) => (
                    vm.status.outdated_replicas.clone(),
                    vm.status.conditions.clone(),
                ),
                _ => (Vec::new(), Vec::new()),
            };
            output::print_objects(format, Kind::Vm, &[vm])?;
            if format == output::Format::Table {
                // Why it is not ready: its node's word, or the scheduler's
                // while no node takes it.
                for c in conditions {
                    let holds = if c.status { "true" } else { "false" };
                    println!("{} {holds} ({}): {}", c.kind, c.reason, c.message);
                }
            }
            if format == output::Format::Table
                && let Ok(Object::Placement(p)) = client.get(Kind::Placement, &name).await
            {
                print!("placed on {} at epoch {}", p.node, p.epoch);
                if p.replica_nodes.is_empty() {
                    println!();
                } else {
                    println!("; disk replicas on {}", p.replica_nodes.join(", "));
                }
                if !outdated.is_empty() {
                    println!(
                        "outdated replicas (missed writes, resyncing): {}",
                        outdated.join(", ")
                    );
                }
            }
            Ok(())
        }
        VmCommand::Start(args) => power(&client, &args, true).await,
        VmCommand::Stop(args) => power(&client, &args, false).await,
        VmCommand::Restart(args) => {
            let deadline = Deadline::after(args.timeout);
            set_running(&client, &args.name, false).await?;
            println!("vm/{} stopping", args.name);
            wait_for_phase(&client, &args.name, VmPhase::Stopped, args.timeout).await?;
            deadline.check(|| format!("vm/{} stopped but not restarted", args.name))?;
            power(&client, &args, true).await
        }
        VmCommand::Delete(args) => {
            client.delete(Kind::Vm, &args.name, None).await?;
            println!("vm/{} deleted", args.name);
            if args.wait {
                let deadline = Deadline::after(args.timeout);
                loop {
                    match client.get(Kind::Placement, &args.name).await {
                        Err(ApiError::NotFound { .. }) => break,
                        Ok(Object::Placement(p)) => deadline
                            .check(|| format!("vm/{} still placed on {}", args.name, p.node))?,
                        Ok(_) => break,
                        Err(err) => return Err(err.into()),
                    }
                    tokio::time::sleep(POLL).await;
                }
                println!("vm/{} gone from its node", args.name);
            }
            Ok(())
        }
        VmCommand::Console {
            name,
            follow,
            console_dir,
        } => console(&client, &name, follow, &console_dir).await,
        VmCommand::Migrate(args) => crate::migrate::run(server, format, args).await,
        VmCommand::AddDisk { name, disk } => {
            let added = disk.name.clone();
            edit_vm(&client, &name, |vm| {
                if vm.spec.disks.iter().any(|d| d.name == disk.name) {
                    bail!("vm/{name} already has a disk {:?}", disk.name);
                }
                vm.spec.disks.push(disk.clone());
                Ok(true)
            })
            .await?;
            println!("vm/{name}: disk {added} added");
            Ok(())
        }
        VmCommand::AcceptCopy { name, node } => {
            let placement = match client.get(Kind::Placement, &name).await {
                Ok(Object::Placement(p)) => p,
                Ok(other) => bail!("placement/{name} is a {}", other.kind()),
                Err(ApiError::NotFound { .. }) => bail!("vm/{name} is not placed on any node"),
                Err(err) => return Err(err).context(format!("reading vm/{name}'s placement")),
            };
            if placement.node == node {
                bail!("vm/{name} is placed on {node} already: its copies there are the primary's");
            }
            if !placement.replica_nodes.contains(&node) {
                bail!(
                    "{node} holds no copy of vm/{name}'s disks (its replica nodes: {})",
                    placement.replica_nodes.join(", ")
                );
            }
            let value = format!("{}/{node}", placement.epoch);
            edit_vm(&client, &name, |vm| {
                let changed = vm.meta.labels.get(Vm::ACCEPT_COPY_LABEL) != Some(&value);
                vm.meta
                    .labels
                    .insert(Vm::ACCEPT_COPY_LABEL.to_owned(), value.clone());
                Ok(changed)
            })
            .await?;
            println!(
                "vm/{name}: may now start on {node}'s copies as they are (placement epoch {}); writes they missed are lost",
                placement.epoch
            );
            Ok(())
        }
        VmCommand::RemoveDisk { name, disk } => {
            edit_vm(&client, &name, |vm| {
                let before = vm.spec.disks.len();
                vm.spec.disks.retain(|d| d.name != disk);
                if vm.spec.disks.len() == before {
                    bail!("vm/{name} has no disk {disk:?}");
                }
                Ok(true)
            })
            .await?;
            println!("vm/{name}: disk {disk} removed");
            Ok(())
        }
    }
}

/// Builds the VMs `create` asks for, validated.
fn vms_to_create(args: &CreateArgs) -> anyhow::Result<Vec<Vm>> {
    if let Some(file) = &args.file {
        let mut vms = Vec::new();
        for object in crate::commands::read_objects(file)? {
            match object {
                Object::Vm(vm) => vms.push(vm),
                other => bail!(
                    "{file}: {}/{} is not a VM (use `basalt create -f` for other kinds)",
                    other.kind(),
                    other.name()
                ),
            }
        }
        return Ok(vms);
    }
    let Some(name) = &args.name else {
        bail!("give the VM a name, or a file with -f");
    };
    let mut vm = Vm {
        meta: ObjectMeta::named(name.clone()),
        ..Vm::default()
    };
    vm.meta.labels = args.label.iter().cloned().collect::<BTreeMap<_, _>>();
    vm.spec.cpus = args.cpus;
    vm.spec.memory_mib = args.memory;
    vm.spec.running = !args.stopped;
    vm.spec.disks = args.disk.clone();
    vm.spec.nics = args.nic.clone();
    vm.spec.kernel = args.kernel.as_ref().map(|kernel| KernelBoot {
        kernel: kernel.clone(),
        initrd: args.initrd.clone().unwrap_or_default(),
        cmdline: args.cmdline.clone().unwrap_or_default(),
    });
    vm.spec.cloud_init = cloud_init(args)?;
    Object::Vm(vm.clone())
        .validate()
        .with_context(|| format!("vm/{name}"))?;
    Ok(vec![vm])
}

/// The cloud-init section the flags ask for; `None` without any of them.
fn cloud_init(args: &CreateArgs) -> anyhow::Result<Option<CloudInit>> {
    if args.user_data.is_none() && args.network_config.is_none() && args.ssh_key.is_empty() {
        return Ok(None);
    }
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let mut keys = Vec::new();
    for key in &args.ssh_key {
        match key.strip_prefix('@') {
            Some(file) => {
                let text = read(&PathBuf::from(file))?;
                keys.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_owned),
                );
            }
            None => keys.push(key.trim().to_owned()),
        }
    }
    Ok(Some(CloudInit {
        user_data: args
            .user_data
            .as_ref()
            .map(read)
            .transpose()?
            .unwrap_or_default(),
        network_config: args.network_config.as_ref().map(read).transpose()?,
        ssh_authorized_keys: keys,
    }))
}

/// `start` or `stop`, then waits when asked.
async fn power(client: &AdminClient, args: &PowerArgs, running: bool) -> anyhow::Result<()> {
    let changed = set_running(client, &args.name, running).await?;
    let (verb, target) = if running {
        ("starting", VmPhase::Running)
    } else {
        ("stopping", VmPhase::Stopped)
    };
    if changed {
        println!("vm/{} {verb}", args.name);
    } else {
        println!(
            "vm/{} already {}",
            args.name,
            if running { "started" } else { "stopped" }
        );
    }
    if args.wait {
        wait_for_phase(client, &args.name, target, args.timeout).await?;
    }
    Ok(())
}

/// Sets `spec.running` by compare-and-swap (retrying conflicts); returns
/// whether it changed.
async fn set_running(client: &AdminClient, name: &str, running: bool) -> anyhow::Result<bool> {
    edit_vm(client, name, |vm| {
        let changed = vm.spec.running != running;
        vm.spec.running = running;
        Ok(changed)
    })
    .await
}

/// Reads VM `name`, lets `edit` change it (it says whether it did, or
/// why it cannot) and writes it back by compare-and-swap, from a fresh
/// read after each conflict. Returns whether it changed.
async fn edit_vm(
    client: &AdminClient,
    name: &str,
    mut edit: impl FnMut(&mut Vm) -> anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    loop {
        let Object::Vm(mut vm) = client
            .get(Kind::Vm, name)
            .await
            .with_context(|| format!("reading vm/{name}"))?
        else {
            bail!("vm/{name} is not a VM");
        };
        if !edit(&mut vm)? {
            return Ok(false);
        }
        Object::Vm(vm.clone())
            .validate()
            .with_context(|| format!("vm/{name}"))?;
        match client.update(Object::Vm(vm)).await {
            Ok(_) => return Ok(true),
            Err(ApiError::Aborted { .. }) => continue,
            Err(err) => return Err(err).with_context(|| format!("updating vm/{name}")),
        }
    }
}

/// Polls the VM until its status describes its current spec and shows
/// `target`, printing each phase and node seen on the way. A `Failed`
/// phase ends the wait with the VM's reason.
pub async fn wait_for_phase(
    client: &AdminClient,
    name: &str,
    target: VmPhase,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Deadline::after(timeout);
    let mut last = None;
    loop {
        let Object::Vm(vm) = client
            .get(Kind::Vm, name)
            .await
            .with_context(|| format!("reading vm/{name}"))?
        else {
            bail!("vm/{name} is not a VM");
        };
        let current = vm.status.observed_generation >= vm.meta.generation;
        let seen = (vm.status.phase, vm.status.node.clone());
        if last.as_ref() != Some(&seen) {
            match &seen.1 {
                Some(node) => println!("  vm/{name}: {} on {node}", seen.0),
                None => println!("  vm/{name}: {}", seen.0),
            }
            last = Some(seen);
        }
        if current && vm.status.phase == target {
            println!("vm/{name} is {target}");
            return Ok(());
        }
        if current && vm.status.phase == VmPhase::Failed && target != VmPhase::Failed {
            let why = vm
                .status
                .conditions
                .iter()
                .map(|c| format!("{}: {}", c.reason, c.message))
                .collect::<Vec<_>>()
                .join("; ");
            bail!("vm/{name} failed: {why}");
        }
        deadline.check(|| format!("vm/{name} is {}, not {target}", vm.status.phase))?;
        tokio::time::sleep(POLL).await;
    }
}

/// Prints the console log the VM's node writes, when it is on this
/// machine; says where it is otherwise.
async fn console(
    client: &AdminClient,
    name: &str,
    follow: bool,
    console_dir: &std::path::Path,
) -> anyhow::Result<()> {
    client
        .get(Kind::Vm, name)
        .await
        .with_context(|| format!("reading vm/{name}"))?;
    let node = match client.get(Kind::Placement, name).await {
        Ok(Object::Placement(p)) => Some(p.node),
        Ok(_) | Err(ApiError::NotFound { .. }) => None,
        Err(err) => return Err(err.into()),
    };
    let path = console_dir.join(format!("{name}.log"));
    let Ok(mut file) = std::fs::File::open(&path) else {
        match node {
            Some(node) => println!(
                "vm/{name} runs on node {node}; its console log is {} on that node (give --console-dir if its agent writes elsewhere)",
                path.display()
            ),
            None => println!("vm/{name} is not placed on any node: no console yet"),
        }
        return Ok(());
    };
    let mut stdout = std::io::stdout();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("reading {}", path.display()))?;
        if read > 0 {
            stdout.write_all(&buffer[..read])?;
            continue;
        }
        stdout.flush()?;
        if !follow {
            return Ok(());
        }
        // The log may be replaced when the domain is defined again.
        let position = file.stream_position()?;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() < position) {
            file.seek(SeekFrom::Start(0))?;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Splits `key=value,key=value` into pairs; errors name the bad part.
fn fields(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not KEY=VALUE"))?;
        if map.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(format!("{key:?} appears twice"));
        }
    }
    Ok(map)
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Parses a size in bytes: plain bytes, or a number with K, M, G or T
/// (powers of 1024; an `i` and a `B` are accepted: `10GiB`).
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let unit_at = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(unit_at);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 512M or 10G"))?;
    let shift = match unit.trim_end_matches('B').trim_end_matches('i') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use K, M, G or T"
            ));
        }
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Memory: plain MiB, or a size with a unit.
fn parse_memory_mib(text: &str) -> Result<u64, String> {
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| format!("{text:?} is not a number of MiB"));
    }
    let bytes = parse_bytes(text)?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("{text:?} is not a whole number of MiB"));
    }
    Ok(bytes >> 20)
}

fn parse_disk(text: &str) -> Result<Disk, String> {
    let mut fields = fields(text)?;
    let name = fields.remove("name").ok_or("a disk needs name=")?;
    let source_volume = fields.remove("volume");
    let attach = fields.remove("attach");
    let size_bytes = match fields.remove("size") {
        Some(size) => parse_bytes(&size)?,
        // A clone of a volume, or an attached volume, takes its size.
        None if source_volume.is_some() || attach.is_some() => 0,
        None => return Err("a disk needs size= (or volume= or attach=)".into()),
    };
    let disk = Disk {
        name,
        size_bytes,
        image: fields.remove("image"),
        replicas: match fields.remove("replicas") {
            Some(n) => n
                .parse()
                .map_err(|_| format!("replicas={n:?} is not a number"))?,
            // An attached volume keeps its own copies.
            None if attach.is_some() => 0,
            None => 1,
        },
        source_volume,
        attach,
        attached_storage_name: None,
        added_at_epoch: None,
        protocol: match fields.remove("protocol") {
            Some(p) => crate::volume::parse_protocol(&p)
                .map_err(|_| format!("protocol={p:?}: give A, B or C"))?,
            None => ReplicationProtocol::C,
        },
    };
    if let Some(key) = fields.keys().next() {
        return Err(format!(
            "unknown disk field {key:?} (name, size, image, volume, attach, replicas, protocol)"
        ));
    }
    Ok(disk)
}

fn parse_nic(text: &str) -> Result<Nic, String> {
    let mut fields = fields(text)?;
    let network = fields.remove("network").ok_or("a NIC needs network=")?;
    let ip = match fields.remove("ip") {
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| format!("ip={ip:?} is not an address"))?,
        ),
        None => None,
    };
    let nic = Nic {
        network,
        mac: fields.remove("mac"),
        ip,
    };
    if let Some(key) = fields.keys().next() {
        return Err(format!("unknown NIC field {key:?} (network, ip, mac)"));
    }
    Ok(nic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_disks_and_nics_parse_and_errors_name_the_part() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("10GiB"), Ok(10 << 30));
        assert!(parse_bytes("1X").unwrap_err().contains("unknown unit"));
        assert_eq!(parse_memory_mib("512"), Ok(512));
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert!(parse_memory_mib("1000K").is_err());

        let disk = parse_disk("name=root,size=1G,image=debian,replicas=2").unwrap();
        assert_eq!(
            (
                disk.name.as_str(),
                disk.size_bytes,
                disk.image.as_deref(),
                disk.replicas
            ),
            ("root", 1 << 30, Some("debian"), 2)
        );
        assert_eq!(parse_disk("name=d,size=1M").unwrap().replicas, 1);
        assert!(parse_disk("size=1M").unwrap_err().contains("name="));
        assert!(parse_disk("name=d").unwrap_err().contains("size="));
        let clone = parse_disk("name=root,volume=golden-snap,replicas=2").unwrap();
        assert_eq!(
            (
                clone.source_volume.as_deref(),
                clone.size_bytes,
                clone.replicas
            ),
            (Some("golden-snap"), 0, 2)
        );
        assert_eq!(
            parse_disk("name=d,size=1M,replicas=2,protocol=b")
                .unwrap()
                .protocol,
            ReplicationProtocol::B
        );
        assert_eq!(
            parse_disk("name=d,size=1M").unwrap().protocol,
            ReplicationProtocol::C
        );
        assert!(
            parse_disk("name=d,size=1M,protocol=D")
                .unwrap_err()
                .contains("protocol=\"D\"")
        );
        let attached = parse_disk("name=data,attach=scratch").unwrap();
        assert_eq!(
            (
                attached.attach.as_deref(),
                attached.size_bytes,
                attached.replicas,
                attached.source_volume.as_deref()
            ),
            (Some("scratch"), 0, 0, None),
            "an attached volume keeps its size and copies"
        );
        let bigger = parse_disk("name=root,volume=golden,size=1G").unwrap();
        assert_eq!(bigger.size_bytes, 1 << 30);
        assert!(
            parse_disk("name=d,size=1M,color=red")
                .unwrap_err()
                .contains("color")
        );

        let nic = parse_nic("network=default,ip=10.1.0.5").unwrap();
        assert_eq!(nic.network, "default");
        assert_eq!(nic.ip, Some("10.1.0.5".parse().unwrap()));
        assert!(parse_nic("network=n,ip=nope").unwrap_err().contains("ip="));
        assert!(parse_nic("ip=10.0.0.1").unwrap_err().contains("network="));
    }
}
