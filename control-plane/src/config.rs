//! A member's configuration: a TOML file, overridden by flags.
//!
//! Invariants: unknown fields are rejected; every error names the file
//! (when there is one) and the field; [`ControlConfig::validate`] runs
//! before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The default port of the admin API and Raft.
pub const DEFAULT_PORT: u16 = 7400;
/// The default `worker_threads`.
pub const DEFAULT_WORKER_THREADS: usize = 2;
/// The most `worker_threads` a member takes.
pub const MAX_WORKER_THREADS: usize = 64;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("reading the config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration (toml names the
    /// field and line).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the field.
        message: String,
    },
    /// A field has a value that cannot work.
    #[error("{}invalid {field}: {reason}", origin(.path))]
    Invalid {
        /// The file it came from, when it came from a file.
        path: Option<PathBuf>,
        /// The field's name, e.g. `raft.election_timeout_min_ms`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn origin(path: &Option<PathBuf>) -> String {
    match path {
        Some(path) => format!("config file {}: ", path.display()),
        None => String::new(),
    }
}

/// A control-plane member's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Raft node id: unique in the cluster, at least 1.
    pub node_id: u64,
    /// Name of this member's `Member` object; `member-<node_id>` when unset.
    pub name: Option<String>,
    /// Address the admin API and Raft listen on.
    pub listen: SocketAddr,
    /// Address other members and clients reach this one at; `listen`
    /// when unset (which then must not be a wildcard address).
    pub advertise: Option<String>,
    /// Where the Raft log, vote and state machine live.
    pub data_dir: PathBuf,
    /// Start a new cluster with this member as its only voter (ignored
    /// when the data directory already holds a cluster).
    pub bootstrap: bool,
    /// Join the cluster that a member at this address belongs to (ignored
    /// when the data directory already holds a cluster).
    pub join: Option<String>,
    /// Raft timing and log retention.
    pub raft: RaftTuning,
    /// Node leases and the HA controller.
    pub nodes: NodeTuning,
    /// The IPAM controller.
    pub ipam: IpamTuning,
    /// Threads of the member's async runtime (its gRPC services, Raft and
    /// controllers). `0` runs them all on one thread (tokio's
    /// current-thread scheduler): no work stealing, no waking of a
    /// parked second worker for a message one task hands another
    /// (decision 67). The log's group-commit fsync and snapshot builds
    /// have threads of their own either way.
    pub worker_threads: usize,
}

/// Node leases (kept in memory by the leader) and when the HA controller
/// moves a lost node's VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeTuning {
    /// How long a lease lasts after an acknowledged heartbeat; a node
    /// whose lease runs out is marked not ready.
    pub lease_seconds: u32,
    /// How often agents are told to heartbeat.
    pub heartbeat_interval_ms: u64,
    /// How long after a node's last acknowledged heartbeat the HA
    /// controller moves its VMs elsewhere (at least the lease).
    pub ha_after_ms: u64,
    /// How often the leader's controllers run when nothing changes.
    pub controller_period_ms: u64,
    /// How long a replica node of a VM's replicated disks may stay lost
    /// (not ready since its last acknowledged heartbeat) before the
    /// control plane puts a replacement copy on another node. A removed
    /// node's copies are replaced at once.
    pub replica_replace_after_ms: u64,
}

impl Default for NodeTuning {
    fn default() -> Self {
        Self {
            lease_seconds: 10,
            heartbeat_interval_ms: 2_000,
            ha_after_ms: 15_000,
            controller_period_ms: 200,
            replica_replace_after_ms: 300_000,
        }
    }
}

/// The IPAM controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IpamTuning {
    /// How long a deleted VM's addresses stay held before another VM may
    /// get them.
    pub release_grace_ms: u64,
}

impl Default for IpamTuning {
    fn default() -> Self {
        Self {
            release_grace_ms: 60_000,
        }
    }
}

/// Raft timing, snapshots and watch history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTuning {
    /// How often the leader sends heartbeats.
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time between these
    /// two starts an election. openraft adds `election_timeout_max_ms`
    /// (the leader lease a follower grants its leader) for a follower
    /// that followed a leader, so after a leader's death the first
    /// election starts between `max + min` and `2 × max` after its last
    /// heartbeat, and a member that lost an election to a longer log
    /// waits another `2 × max` before its next one (until it starts one).
    /// The defaults (40 / 60–120 ms) suit loopback and a LAN: a dead
    /// leader is replaced in 0.2–0.7 s (decisions 42 and 90).
    pub election_timeout_min_ms: u64,
    /// See `election_timeout_min_ms`.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_threshold: u64,
    /// Log entries kept behind a snapshot, so briefly lagging members
    /// catch up from the log instead of a snapshot.
    pub logs_to_keep: u64,
    /// Changes each member keeps in memory for watches.
    pub watch_history: usize,
    /// Acknowledge the leader's own new log entries to openraft before
    /// their fsync, so they go to the followers while it runs (faster
    /// writes, decisions 56 and 57). On by default: the commit index the
    /// leader sends is clamped to its own fsynced log, so no member
    /// applies an entry before a majority holds it durably, and a
    /// membership entry is always fsynced first. `false` fsyncs every
    /// append before openraft replicates it.
    pub leader_parallel_fsync: bool,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            node_id: 0,
            name: None,
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            advertise: None,
            data_dir: PathBuf::from("/var/lib/basalt/control"),
            bootstrap: false,
            join: None,
            raft: RaftTuning::default(),
            nodes: NodeTuning::default(),
            ipam: IpamTuning::default(),
            worker_threads: DEFAULT_WORKER_THREADS,
        }
    }
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: 40,
            election_timeout_min_ms: 60,
            election_timeout_max_ms: 120,
            snapshot_threshold: 10_000,
            logs_to_keep: 1_000,
            watch_history: 10_000,
            leader_parallel_fsync: true,
        }
    }
}

impl ControlConfig {
    /// Reads `path` (not yet validated: flags may still override it).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`, read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })
    }

    /// The name of this member's `Member` object.
    pub fn member_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("member-{}", self.node_id))
    }

    /// The address others reach this member at.
    pub fn advertise_address(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// Checks every field; `path` is the file the config came from, for
    /// the error message.
    pub fn validate(&self, path: Option<&Path>) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid {
            path: path.map(Path::to_owned),
            field,
            reason,
        };
        if self.node_id == 0 {
            return Err(invalid(
                "node_id",
                "must be at least 1 (set --node-id or node_id)".into(),
            ));
        }
        let member = basalt_api::Member {
            meta: basalt_api::ObjectMeta::named(self.member_name()),
            id: self.node_id,
            address: self.advertise_address(),
            voter: false,
            leader: false,
        };
        if let Err(basalt_api::ApiError::InvalidArgument { field, reason }) = member.validate() {
            let field = if field == "address" {
                "advertise"
            } else {
                "name"
            };
            return Err(invalid(field, reason));
        }
        if self.advertise.is_none() && self.listen.ip().is_unspecified() {
            return Err(invalid(
                "advertise",
                format!(
                    "required when listen is the wildcard address {}",
                    self.listen
                ),
            ));
        }
        if self.bootstrap && self.join.is_some() {
            return Err(invalid(
                "join",
                "a member either bootstraps a cluster or joins one, not both".into(),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".into()));
        }
        let raft = &self.raft;
        if raft.heartbeat_ms == 0 {
            return Err(invalid("raft.heartbeat_ms", "must be at least 1".into()));
        }
        if raft.election_timeout_min_ms <= raft.heartbeat_ms {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                format!("must exceed raft.heartbeat_ms ({})", raft.heartbeat_ms),
            ));
        }
        if raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                format!(
                    "must exceed raft.election_timeout_min_ms ({})",
                    raft.election_timeout_min_ms
                ),
            ));
        }
        if raft.snapshot_threshold == 0 {
            return Err(invalid(
                "raft.snapshot_threshold",
                "must be at least 1".into(),
            ));
        }
        if raft.watch_history == 0 {
            return Err(invalid("raft.watch_history", "must be at least 1".into()));
        }
        let nodes = &self.nodes;
        if nodes.lease_seconds == 0 {
            return Err(invalid("nodes.lease_seconds", "must be at least 1".into()));
        }
        let lease_ms = u64::from(nodes.lease_seconds) * 1000;
        if nodes.heartbeat_interval_ms == 0 || nodes.heartbeat_interval_ms * 2 > lease_ms {
            return Err(invalid(
                "nodes.heartbeat_interval_ms",
                format!("must be at least 1 and at most half the lease ({lease_ms} ms)"),
            ));
        }
        if nodes.ha_after_ms < lease_ms {
            return Err(invalid(
                "nodes.ha_after_ms",
                format!("must be at least the lease ({lease_ms} ms)"),
            ));
        }
        if nodes.controller_period_ms == 0 {
            return Err(invalid(
                "nodes.controller_period_ms",
                "must be at least 1".into(),
            ));
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "worker_threads",
                format!("must be at most {MAX_WORKER_THREADS} (0: one thread)"),
            ));
        }
        Ok(())
    }

    /// openraft's configuration for these settings.
    pub fn openraft_config(&self) -> Result<openraft::Config, ConfigError> {
        let raft = &self.raft;
        let config = openraft::Config {
            cluster_name: "basalt".into(),
            heartbeat_interval: raft.heartbeat_ms,
            election_timeout_min: raft.election_timeout_min_ms,
            election_timeout_max: raft.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(raft.snapshot_threshold),
            max_in_snapshot_log_to_keep: raft.logs_to_keep,
            install_snapshot_timeout: 10_000,
            ..openraft::Config::default()
        };
        config.validate().map_err(|err| ConfigError::Invalid {
            path: None,
            field: "raft",
            reason: err.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file_and_names_bad_fields() {
        let text = r#"
            node_id = 2
            listen = "0.0.0.0:7400"
            advertise = "10.0.0.2:7400"
            data_dir = "/var/lib/basalt/control"
            join = "10.0.0.1:7400"
            [raft]
            heartbeat_ms = 50
            election_timeout_min_ms = 300
            election_timeout_max_ms = 600
        "#;
        let path = Path::new("control.toml");
        let config = ControlConfig::parse(text, path).unwrap();
        assert_eq!(config.node_id, 2);
        assert_eq!(config.member_name(), "member-2");
        config.validate(Some(path)).unwrap();
        config.openraft_config().unwrap();

        let err = ControlConfig::parse("node_id = 1\nlisten_addr = \"x\"\n", path).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("control.toml") && text.contains("listen_addr"),
            "{text}"
        );

        let err = ControlConfig::parse("[raft]\nheartbeat = 5\n", path).unwrap_err();
        assert!(err.to_string().contains("heartbeat"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let path = Path::new("c.toml");
        let check = |config: ControlConfig, field: &str| match config.validate(Some(path)) {
            Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected {field} to be refused, got {other:?}"),
        };
        check(ControlConfig::default(), "node_id");
        let ok = ControlConfig {
            node_id: 1,
            ..ControlConfig::default()
        };
        ok.validate(None).unwrap();
        check(
            ControlConfig {
                listen: "0.0.0.0:7400".parse().unwrap(),
                ..ok.clone()
            },
            "advertise",
        );
        check(
            ControlConfig {
                bootstrap: true,
                join: Some("a:1".into()),
                ..ok.clone()
            },
            "join",
        );
        let mut bad = ok.clone();
        bad.raft.election_timeout_max_ms = bad.raft.election_timeout_min_ms;
        check(bad, "raft.election_timeout_max_ms");
        let mut bad = ok.clone();
        bad.nodes.ha_after_ms = 5_000;
        check(bad, "nodes.ha_after_ms");
        let mut bad = ok.clone();
        bad.nodes.heartbeat_interval_ms = 6_000;
        check(bad, "nodes.heartbeat_interval_ms");
        let mut bad = ok.clone();
        bad.worker_threads = MAX_WORKER_THREADS + 1;
        check(bad, "worker_threads");
        let message = ControlConfig::default()
            .validate(Some(path))
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("config file c.toml: invalid node_id"),
            "{message}"
        );
    }
}
