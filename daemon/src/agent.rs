//! `basaltd agent`: the node agent (see `basalt_agent::runtime`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use basalt_agent::compute::domain::Accel;
use basalt_agent::compute::libvirt::LibvirtCompute;
use basalt_agent::compute::sim::SimCompute;
use basalt_agent::credential::CredentialFile;
use basalt_agent::runtime::{self, AgentConfig};
use basalt_agent::vm_domain::DomainPolicy;
use basalt_api::Resources;
use clap::{Args, ValueEnum};

/// `basaltd agent` flags.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// This node's name (a DNS label).
    #[arg(long, env = "BASALT_NODE")]
    node: String,
    /// Where the cluster reaches this node (`host:port`).
    #[arg(long, env = "BASALT_ADDRESS")]
    address: String,
    /// A control-plane member (any member), or several, comma-separated
    /// (`a:7400,b:7400,c:7400`): the agent moves on to the next when one
    /// cannot be reached.
    #[arg(long, env = "BASALT_SERVER", default_value = "127.0.0.1:7400")]
    server: String,
    /// The join token's secret (`basalt token create`); needed until the
    /// node holds a credential in `--credential-file`.
    #[arg(
        long,
        env = "BASALT_JOIN_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    token: String,
    /// Keep the node credential the control plane issues at the first join
    /// in this file (mode 0600), and register with it after a restart
    /// instead of the join token.
    #[arg(long, env = "BASALT_CREDENTIAL_FILE")]
    credential_file: Option<PathBuf>,
    /// Check the flags and environment (BASALT_NODE, BASALT_ADDRESS,
    /// BASALT_SERVER, ...), print them and exit without joining.
    #[arg(long)]
    check_config: bool,
    /// The hypervisor: libvirt, or a simulated one for tests and scale runs.
    #[arg(long, value_enum, default_value_t = Backend::Libvirt)]
    compute: Backend,
    /// libvirt connection URI.
    #[arg(long, env = "BASALT_LIBVIRT_URI", default_value = "qemu:///system")]
    libvirt_uri: String,
    /// Hardware acceleration for guests (TCG where KVM is unusable).
    #[arg(long, env = "BASALT_ACCEL", value_enum, default_value_t = AccelArg::Tcg)]
    accel: AccelArg,
    /// The cluster-wide CPU model (same on every node so VMs can migrate).
    #[arg(long, env = "BASALT_CPU_MODEL", default_value = "qemu64")]
    cpu_model: String,
    /// Prefix of the libvirt domains this agent owns.
    #[arg(long, default_value = "basalt-")]
    domain_prefix: String,
    /// Where VM consoles are written.
    #[arg(
        long,
        env = "BASALT_CONSOLE_DIR",
        default_value = "/var/log/basalt/console"
    )]
    console_dir: PathBuf,
    /// vCPUs offered to VMs (default: the host's).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory offered to VMs in MiB (default: the host's).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Stop every VM after this many milliseconds without an acknowledged
    /// heartbeat.
    #[arg(long, default_value_t = 8_000)]
    fence_after_ms: u64,
    /// Reconcile at least this often (milliseconds).
    #[arg(long, default_value_t = 5_000)]
    resync_ms: u64,
    /// How long a graceful VM stop may take (milliseconds).
    #[arg(long, default_value_t = 30_000)]
    stop_grace_ms: u64,
    /// Drive this node's VM networking (eBPF datapath, taps, DHCP, VXLAN,
    /// SNAT); VMs with NICs need it.
    #[arg(long)]
    network: bool,
    /// The interface to the other nodes and the outside (VXLAN underlay,
    /// source NAT).
    #[arg(long, default_value = "eth0")]
    net_uplink: String,
    /// DNS servers handed to guests by DHCP (repeatable).
    #[arg(long)]
    net_dns: Vec<std::net::Ipv4Addr>,
    /// Idle timeouts of connection-tracking entries in seconds, as
    /// NAME=SECONDS items (any subset of tcp, tcp-opening, tcp-syn-recv,
    /// tcp-closing, tcp-close-wait, tcp-last-ack, tcp-time-wait, tcp-close,
    /// udp, udp-stream, icmp, other; the rest keep
    /// the kernel's defaults),
    /// e.g. `tcp=86400,udp=60`.
    #[arg(long, default_value_t = basalt_sdn::conntrack::Timeouts::default())]
    net_conntrack_timeouts: basalt_sdn::conntrack::Timeouts,
    /// How often connection tracking is swept for expired entries
    /// (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    net_conntrack_sweep_ms: u64,
    /// How this node sends packets for VMs on other nodes: `overlay`
    /// (VXLAN, any underlay that carries UDP between the nodes) or `native`
    /// (unencapsulated, to the owner node's underlay address as the next
    /// hop: the nodes share an L2 segment, or the underlay routes VM
    /// addresses to their nodes). Every node receives both.
    #[arg(long, default_value_t = basalt_sdn::Routing::Overlay)]
    net_routing: basalt_sdn::Routing,
    /// The node's storage process (`basaltd storage serve --local-socket`):
    /// the agent makes and removes VM volumes through it. Without it, VM
    /// disks must exist already.
    #[arg(long)]
    storage_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    Libvirt,
    Sim,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AccelArg {
    Tcg,
    Kvm,
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    if args.check_config {
        return check_config(&args);
    }
    std::fs::create_dir_all(&args.console_dir).with_context(|| {
        format!(
            "creating the console directory {}",
            args.console_dir.display()
        )
    })?;
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let network = args.network.then(|| {
        let mut net = basalt_agent::network::NetworkConfig::new(args.node.clone());
        net.uplink = args.net_uplink.clone();
        net.dns = args.net_dns.clone();
        net.conntrack = args.net_conntrack_timeouts;
        net.conntrack_sweep = Duration::from_millis(args.net_conntrack_sweep_ms.max(100));
        net.routing = args.net_routing;
        net
    });
    let credential_file = args.credential_file.clone().map(CredentialFile::new);
    stored_credential(&args)?;
    let config = AgentConfig {
        node: args.node,
        address: args.address,
        server: args.server,
        token: args.token,
        credential_file,
        capacity: Resources {
            cpus: args.cpus.unwrap_or(host_cpus),
            memory_mib: args.memory_mib.unwrap_or_else(host_memory_mib),
            storage_bytes: 0,
        },
        policy: DomainPolicy {
            prefix: args.domain_prefix,
            accel: match args.accel {
                AccelArg::Tcg => Accel::Tcg,
                AccelArg::Kvm => Accel::Kvm,
            },
            cpu_model: Some(args.cpu_model),
            agent_taps: args.network,
        },
        console_dir: args.console_dir,
        fence_after: Duration::from_millis(args.fence_after_ms),
        resync: Duration::from_millis(args.resync_ms),
        stop_grace: Duration::from_millis(args.stop_grace_ms),
        network,
        storage: args
            .storage_socket
            .map(|socket| basalt_agent::storage::StorageConfig { socket }),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut config = config;
        if let Some(storage) = &config.storage {
            config.capacity.storage_bytes = pool_capacity(&storage.socket).await;
        }
        let result = match args.compute {
            Backend::Libvirt => {
                runtime::run(
                    config,
                    Arc::new(LibvirtCompute::new(args.libvirt_uri)),
                    shutdown(),
                )
                .await
            }
            Backend::Sim => runtime::run(config, Arc::new(SimCompute::new()), shutdown()).await,
        };
        result.context("the agent stopped")
    })
}

/// What the node's pool can hold, as the scheduler counts it (the sum of
/// volume sizes over-provisioning allows), from the storage process at
/// `socket`; asked for a few seconds (the storage process may be starting
/// beside the agent), then 0 — "unknown", which the scheduler does not
/// check — with a warning.
async fn pool_capacity(socket: &std::path::Path) -> u64 {
    let mut last = String::new();
    for _ in 0..10 {
        match basalt_api::StorageClient::connect_unix(socket) {
            Ok(client) => match client.status().await {
                Ok(status) => return status.virtual_limit,
                Err(err) => last = err.to_string(),
            },
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::warn!(socket = %socket.display(), error = %last, "the storage pool's size is unknown: registering without it (the scheduler will not check this node's pool)");
    0
}

/// `--check-config`: the registration this agent would send must be
/// valid, and the server an address with a port.
fn check_config(args: &AgentArgs) -> anyhow::Result<()> {
    let registration = basalt_api::Registration {
        token: basalt_api::TokenSecret::new(args.token.clone()),
        node_name: args.node.clone(),
        address: args.address.clone(),
        capacity: Resources::default(),
        node_credential: stored_credential(args)?,
    };
    registration
        .validate()
        .map_err(|err| anyhow::anyhow!("invalid agent configuration: {err}"))?;
    let port_ok = args.server.split(',').all(|member| {
        member.trim().rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        })
    });
    anyhow::ensure!(
        port_ok,
        "invalid agent configuration: server (BASALT_SERVER): {:?} is not host:port (or a comma-separated list of them)",
        args.server
    );
    println!(
        "agent config ok: node {} at {}, control plane {}, libvirt {}",
        args.node, args.address, args.server, args.libvirt_uri
    );
    Ok(())
}

/// The credential in `--credential-file`, if any. Without a join token
/// the agent can only register with it, so a missing or unreadable file is
/// then an error naming both settings.
fn stored_credential(args: &AgentArgs) -> anyhow::Result<Option<basalt_api::TokenSecret>> {
    let loaded = match &args.credential_file {
        Some(path) => CredentialFile::new(path).load(),
        None => Ok(None),
    };
    match loaded {
        Ok(Some(credential)) => Ok(Some(credential)),
        Ok(None) if args.token.is_empty() => anyhow::bail!(
            "invalid agent configuration: token (BASALT_JOIN_TOKEN): required until the node holds a credential in credential_file (BASALT_CREDENTIAL_FILE){}",
            args.credential_file
                .as_ref()
                .map(|p| format!("; {} has none", p.display()))
                .unwrap_or_default()
        ),
        Ok(None) => Ok(None),
        Err(err) if args.token.is_empty() => Err(anyhow::Error::new(err)
            .context("invalid agent configuration: no join token and no usable credential")),
        Err(err) => {
            tracing::warn!(error = %err, "the stored node credential is unusable; the join token will be used");
            Ok(None)
        }
    }
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch SIGTERM; only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping the agent; VMs keep running");
}

/// Total memory from /proc/meminfo, in MiB (0 when unreadable).
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}
