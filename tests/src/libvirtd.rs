//! A private libvirtd per node, so that several "hosts" (and live
//! migration between them) fit on one machine. This is MACHINE.md's
//! "Several nodes on one machine" recipe.
//!
//! Each daemon is one supervised [`Process`] running
//! `nsenter --net=<node netns> -- unshare --uts --mount --propagation
//! private sh -c SCRIPT`, where the script sets the hostname to the node's
//! name, bind-mounts private copies of `/etc/libvirt`, `/var/lib/libvirt`,
//! `/run/libvirt`, `/var/log/libvirt`, `/var/cache/libvirt`, `/etc/hosts`
//! (listing every node: without it each migration phase stalls on DNS)
//! and `/etc/resolv.conf`, starts `virtlogd -d` unless this node's virtlogd
//! still runs, and `exec`s `libvirtd --listen` in the foreground — so the
//! process's pid is libvirtd's.
//!
//! Invariants:
//! - all state lives under `<prefix dir>/libvirt/<node>/`
//!   (`etc lib run log cache`, `hosts`, `resolv.conf`, the pid files of
//!   libvirtd and virtlogd, `host_uuid`); QEMU's pid files land in
//!   `run/qemu/*.pid`, so a sweep of the prefix finds every daemon and
//!   every guest;
//! - each node has its own `host_uuid` (libvirt refuses to migrate between
//!   daemons that share one), generated once and kept with the node;
//! - the daemon listens on plain TCP without authentication on the node's
//!   address only: `qemu+tcp://<addr>/system`, reachable from the root
//!   namespace through the fabric's bridge;
//! - stopping (or dropping) destroys the daemon's running domains, then
//!   kills libvirtd, virtlogd, and any QEMU left in the node's namespace
//!   whose pid file is in the private run directory. A detached daemon
//!   keeps running until [`Libvirtd::adopt`]ed and stopped, or torn down.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd::{self, CommandError};
use crate::netns::Node;
use crate::prefix::Prefix;
use crate::process::{Exit, Process, ProcessError, ProcessSpec, STOP_GRACE};
use crate::sweep;

/// How long a daemon may take to answer `virsh version` after it starts.
/// The first connection probes QEMU's capabilities, which under a loaded
/// machine takes tens of seconds.
pub const READY_DEADLINE: Duration = Duration::from_secs(120);

/// How many log lines an error quotes.
const LOG_TAIL_LINES: usize = 30;

/// Host directories replaced by the node's private copies, and the name of
/// each copy under the node's state directory.
const PRIVATE_DIRS: [(&str, &str); 5] = [
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("run", "/run/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

/// Host files replaced by the node's private copies.
const PRIVATE_FILES: [(&str, &str); 2] =
    [("hosts", "/etc/hosts"), ("resolv.conf", "/etc/resolv.conf")];

/// A private libvirtd could not be prepared, started, reached or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtdError {
    /// Creating a private directory or writing a config file failed.
    #[error("could not prepare {path}")]
    Prepare {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Copying `/etc/libvirt` into the private `etc` failed.
    #[error("could not seed the private /etc/libvirt of node {node}")]
    Seed {
        /// The node.
        node: String,
        /// The failed copy.
        #[source]
        source: CommandError,
    },
    /// Starting, adopting, restarting or stopping the daemon's process
    /// failed.
    #[error("libvirtd of node {node}")]
    Process {
        /// The node.
        node: String,
        /// What failed.
        #[source]
        source: ProcessError,
    },
    /// The daemon exited before it answered.
    #[error(
        "libvirtd of node {node} exited ({exit}) before answering; last log lines:\n{log_tail}"
    )]
    Died {
        /// The node.
        node: String,
        /// How it exited.
        exit: Exit,
        /// The end of its log.
        log_tail: String,
    },
    /// The daemon did not answer `virsh version` in time.
    #[error(
        "libvirtd of node {node} did not answer on {uri} within {waited:?}: {last_error}; last log lines:\n{log_tail}"
    )]
    NotReady {
        /// The node.
        node: String,
        /// The URI polled.
        uri: String,
        /// How long it was polled.
        waited: Duration,
        /// The last `virsh` failure.
        last_error: String,
        /// The end of the daemon's log.
        log_tail: String,
    },
    /// A `virsh` command failed.
    #[error("virsh on node {node} failed")]
    Virsh {
        /// The node.
        node: String,
        /// The failed command.
        #[source]
        source: CommandError,
    },
}

/// A node's private libvirtd. See the module doc.
#[derive(Debug)]
pub struct Libvirtd {
    node: Node,
    prefix: Prefix,
    dir: PathBuf,
    /// The node namespace's inode, to recognise QEMUs of this daemon even
    /// after the namespace's name is gone.
    netns_inode: Option<u64>,
    /// `None` once stopped or detached.
    process: Option<Process>,
}

impl Libvirtd {
    /// Prepares the node's private directories and configs and starts its
    /// libvirtd (and virtlogd) inside `node`'s namespace; returns once
    /// `virsh version` answers ([`READY_DEADLINE`]). `all_nodes` goes into
    /// the private `/etc/hosts` (the node itself is added if missing).
    pub fn start(
        prefix: &Prefix,
        node: &Node,
        all_nodes: &[(String, Ipv4Addr)],
    ) -> Result<Libvirtd, LibvirtdError> {
        let dir = node_dir(prefix, node);
        prepare(&dir, node, all_nodes)?;
        let script = startup_script(&dir, node);
        let spec = ProcessSpec::new(process_name(node), "unshare")
            .args(["--uts", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(script)
            .netns(node);
        let process = Process::start(prefix, spec).map_err(|source| LibvirtdError::Process {
            node: node.name().to_owned(),
            source,
        })?;
        tracing::info!(
            node = node.name(),
            pid = process.pid(),
            "private libvirtd starting"
        );
        let mut daemon = Libvirtd {
            node: node.clone(),
            prefix: prefix.clone(),
            dir,
            netns_inode: netns_inode_of(node),
            process: Some(process),
        };
        // On failure, dropping `daemon` stops whatever did start.
        daemon.wait_ready(READY_DEADLINE)?;
        Ok(daemon)
    }

    /// Adopts the running daemon of `node` that an earlier handle started
    /// and [`Libvirtd::detach`]ed (perhaps in another process), once it
    /// answers. The handle owns it again: dropping it stops the daemon.
    pub fn adopt(prefix: &Prefix, node: &Node) -> Result<Libvirtd, LibvirtdError> {
        let process = Process::from_pid_file(prefix, &process_name(node)).map_err(|source| {
            LibvirtdError::Process {
                node: node.name().to_owned(),
                source,
            }
        })?;
        let mut daemon = Libvirtd {
            node: node.clone(),
            prefix: prefix.clone(),
            dir: node_dir(prefix, node),
            netns_inode: netns_inode_of(node),
            process: Some(process),
        };
        daemon.wait_ready(READY_DEADLINE)?;
        Ok(daemon)
    }

    /// The node the daemon serves.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The connection URI, `qemu+tcp://<node addr>/system`.
    pub fn uri(&self) -> String {
        format!("qemu+tcp://{}/system", self.node.addr())
    }

    /// The node's private libvirt state, `<prefix dir>/libvirt/<node>/`.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// Where QEMU's log of domain `domain` goes (the private
    /// `/var/log/libvirt/qemu/<domain>.log`): the guest's serial console
    /// too, if the domain sends it to a `file` or `pty` log.
    pub fn domain_log(&self, domain: &str) -> PathBuf {
        self.dir.join("log/qemu").join(format!("{domain}.log"))
    }

    /// The daemon's process (pid, log), while it is owned by this handle.
    pub fn process(&self) -> Option<&Process> {
        self.process.as_ref()
    }

    /// The daemon's process, e.g. to `kill9` it and simulate a crash.
    pub fn process_mut(&mut self) -> Option<&mut Process> {
        self.process.as_mut()
    }

    /// What libvirtd (and the startup script) printed.
    pub fn logs(&self) -> String {
        self.process.as_ref().map(Process::logs).unwrap_or_default()
    }

    /// A `virsh -c <uri>` command to complete and run.
    pub fn virsh_command(&self) -> Command {
        let mut cmd = Command::new("virsh");
        cmd.args(["-q", "-c", &self.uri()]);
        cmd
    }

    /// Runs `virsh -c <uri> ARGS...` from the root namespace; returns its
    /// stdout.
    pub fn virsh(&self, args: &[&str]) -> Result<String, LibvirtdError> {
        cmd::run(self.virsh_command().args(args)).map_err(|source| LibvirtdError::Virsh {
            node: self.node.name().to_owned(),
            source,
        })
    }

    /// Restarts libvirtd (SIGTERM, then a fresh start with the same
    /// configuration; running domains and virtlogd are left alone) and
    /// waits until it answers again.
    pub fn restart(&mut self) -> Result<(), LibvirtdError> {
        if let Some(process) = &mut self.process {
            process.restart().map_err(|source| LibvirtdError::Process {
                node: self.node.name().to_owned(),
                source,
            })?;
        }
        self.wait_ready(READY_DEADLINE)
    }

    /// Polls `virsh version` until it answers, the daemon exits, or
    /// `deadline` passes.
    fn wait_ready(&mut self, deadline: Duration) -> Result<(), LibvirtdError> {
        let started = Instant::now();
        loop {
            let last_error = match self.virsh(&["version"]) {
                Ok(_) => {
                    tracing::info!(node = self.node.name(), waited = ?started.elapsed(), "private libvirtd answers");
                    return Ok(());
                }
                Err(e) => error_chain(&e),
            };
            let node = self.node.name().to_owned();
            let uri = self.uri();
            let Some(process) = self.process.as_mut() else {
                return Err(LibvirtdError::NotReady {
                    node,
                    uri,
                    waited: started.elapsed(),
                    last_error,
                    log_tail: String::new(),
                });
            };
            if !process.is_running() {
                return Err(LibvirtdError::Died {
                    node,
                    exit: process
                        .wait_exit(Duration::ZERO)
                        .unwrap_or(Exit::Unobserved),
                    log_tail: process.log_tail(LOG_TAIL_LINES),
                });
            }
            if started.elapsed() >= deadline {
                return Err(LibvirtdError::NotReady {
                    node,
                    uri,
                    waited: started.elapsed(),
                    last_error,
                    log_tail: process.log_tail(LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Destroys the daemon's running domains, stops libvirtd (SIGTERM,
    /// then SIGKILL), kills virtlogd and any QEMU of this node left in the
    /// private run directory. Idempotent.
    pub fn stop(&mut self) -> Result<(), LibvirtdError> {
        let Some(mut process) = self.process.take() else {
            return Ok(());
        };
        if process.is_running() {
            self.destroy_domains();
        }
        let stopped = process.stop(STOP_GRACE);
        // Dropping the handle removes its pid file.
        drop(process);
        let virtlogd_pid = self.dir.join("virtlogd.pid");
        sweep::kill_pid_file(self.prefix.name(), &virtlogd_pid);
        sweep::remove_file_logged(&virtlogd_pid);
        self.kill_leftover_qemus();
        tracing::info!(node = self.node.name(), "private libvirtd stopped");
        stopped.map(drop).map_err(|source| LibvirtdError::Process {
            node: self.node.name().to_owned(),
            source,
        })
    }

    fn destroy_domains(&self) {
        let running = match self.virsh(&["list", "--name"]) {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(node = self.node.name(), error = %error_chain(&e), "could not list domains");
                return;
            }
        };
        for domain in running.lines().map(str::trim).filter(|d| !d.is_empty()) {
            if let Err(e) = self.virsh(&["destroy", domain]) {
                tracing::warn!(node = self.node.name(), domain, error = %error_chain(&e), "could not destroy domain");
            }
        }
    }

    /// SIGKILLs the processes of `run/qemu/*.pid` that live in this node's
    /// namespace (what `virsh destroy` missed, e.g. after libvirtd died).
    fn kill_leftover_qemus(&self) {
        let Some(inode) = self.netns_inode else {
            return;
        };
        let Ok(entries) = fs::read_dir(self.dir.join("run/qemu")) else {
            return;
        };
        let mut killed = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let Some(pid) = sweep::read_pid_file(&path) else {
                continue;
            };
            if pid > 1 && sweep::is_alive(pid) && sweep::netns_inode(pid) == Some(inode) {
                tracing::debug!(pid, file = %path.display(), "killing leftover QEMU");
                if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                    killed.push(pid);
                }
            }
        }
        sweep::wait_gone(&killed, Duration::from_secs(20));
    }

    /// Lets the daemon outlive this handle (the lab): nothing is stopped on
    /// drop; [`Libvirtd::adopt`] gets a handle back.
    pub fn detach(mut self) {
        if let Some(process) = self.process.take() {
            process.detach();
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(node = self.node.name(), error = %error_chain(&e), "could not stop libvirtd cleanly");
        }
    }
}

/// `<prefix dir>/libvirt/<node>`.
fn node_dir(prefix: &Prefix, node: &Node) -> PathBuf {
    prefix.dir().join("libvirt").join(node.name())
}

fn process_name(node: &Node) -> String {
    format!("libvirtd-{}", node.name())
}

fn netns_inode_of(node: &Node) -> Option<u64> {
    fs::metadata(node.netns_path()).ok().map(|m| m.ino())
}

/// Creates the private directories (seeding `etc` from `/etc/libvirt`
/// once) and writes the configs, `hosts` and `resolv.conf`.
fn prepare(dir: &Path, node: &Node, all_nodes: &[(String, Ipv4Addr)]) -> Result<(), LibvirtdError> {
    let prepare_err = |path: &Path| {
        let path = path.to_owned();
        move |source| LibvirtdError::Prepare { path, source }
    };
    for (private, host) in PRIVATE_DIRS {
        let path = dir.join(private);
        fs::create_dir_all(&path).map_err(prepare_err(&path))?;
        // The mount points must exist on the host too (a host without the
        // full libvirt-daemon-system package lacks some).
        fs::create_dir_all(host).map_err(prepare_err(Path::new(host)))?;
    }

    let etc = dir.join("etc");
    let seeded = dir.join("etc.seeded");
    if !seeded.exists() {
        if Path::new("/etc/libvirt").is_dir() {
            cmd::run(Command::new("cp").arg("-a").arg("/etc/libvirt/.").arg(&etc)).map_err(
                |source| LibvirtdError::Seed {
                    node: node.name().to_owned(),
                    source,
                },
            )?;
        }
        // The host's default network would start a dnsmasq per node.
        let autostart = etc.join("qemu/networks/autostart");
        match fs::remove_dir_all(&autostart) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(prepare_err(&autostart)(e)),
        }
        fs::write(&seeded, b"").map_err(prepare_err(&seeded))?;
    }

    let uuid_file = dir.join("host_uuid");
    let host_uuid = match fs::read_to_string(&uuid_file)
        .ok()
        .and_then(|s| uuid::Uuid::parse_str(s.trim()).ok())
    {
        Some(uuid) => uuid,
        None => {
            let uuid = uuid::Uuid::new_v4();
            fs::write(&uuid_file, format!("{uuid}\n")).map_err(prepare_err(&uuid_file))?;
            uuid
        }
    };

    let files = [
        (etc.join("libvirtd.conf"), libvirtd_conf(node, host_uuid)),
        (etc.join("qemu.conf"), qemu_conf(node)),
        (dir.join("hosts"), hosts_file(node, all_nodes)),
        (dir.join("resolv.conf"), RESOLV_CONF.to_owned()),
    ];
    for (path, content) in files {
        fs::write(&path, content).map_err(prepare_err(&path))?;
    }
    Ok(())
}

fn libvirtd_conf(node: &Node, host_uuid: uuid::Uuid) -> String {
    format!(
        "# Written by basalt-testkit for node {name}.\n\
         listen_tls = 0\n\
         listen_tcp = 1\n\
         listen_addr = \"{addr}\"\n\
         auth_tcp = \"none\"\n\
         host_uuid = \"{host_uuid}\"\n\
         log_outputs = \"3:stderr\"\n",
        name = node.name(),
        addr = node.addr(),
    )
}

fn qemu_conf(node: &Node) -> String {
    format!(
        "# Written by basalt-testkit for node {name}.\n\
         user = \"root\"\n\
         group = \"root\"\n\
         dynamic_ownership = 0\n\
         remember_owner = 0\n\
         namespaces = [ ]\n\
         cgroup_controllers = [ ]\n\
         security_driver = \"none\"\n\
         migration_host = \"{addr}\"\n\
         migration_address = \"{addr}\"\n",
        name = node.name(),
        addr = node.addr(),
    )
}

fn hosts_file(node: &Node, all_nodes: &[(String, Ipv4Addr)]) -> String {
    let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n");
    let mut listed = false;
    for (name, addr) in all_nodes {
        let _ = writeln!(hosts, "{addr} {name}");
        listed |= name == node.name();
    }
    if !listed {
        let _ = writeln!(hosts, "{} {}", node.addr(), node.name());
    }
    hosts
}

/// No DNS inside a node: lookups of names not in `hosts` fail at once
/// instead of timing out.
const RESOLV_CONF: &str = "# basalt-testkit: no DNS inside a node\n\
                           nameserver 127.0.0.1\n\
                           options timeout:1 attempts:1\n";

/// The script run in the node's fresh UTS and mount namespaces.
fn startup_script(dir: &Path, node: &Node) -> String {
    let q = |p: &Path| sh_quote(&p.to_string_lossy());
    let mut script = String::from("set -e\n");
    let _ = writeln!(
        script,
        "echo {} > /proc/sys/kernel/hostname",
        sh_quote(node.name())
    );
    for (private, host) in PRIVATE_DIRS.iter().chain(&PRIVATE_FILES) {
        let _ = writeln!(
            script,
            "mount --bind {} {}",
            q(&dir.join(private)),
            sh_quote(host)
        );
    }
    // A virtlogd that outlived an earlier libvirtd of this node serves the
    // same private socket, and a second one could not take the pid file:
    // start one only if the recorded pid is not a live (non-zombie)
    // virtlogd.
    let virtlogd_pid = q(&dir.join("virtlogd.pid"));
    let _ = writeln!(
        script,
        "vl=$(cat {virtlogd_pid} 2>/dev/null || true)\n\
         st=$(sed -n 's/^State:[[:space:]]*\\(.\\).*/\\1/p' /proc/${{vl:-0}}/status 2>/dev/null || true)\n\
         case \"$st$(cat /proc/${{vl:-0}}/comm 2>/dev/null || true)\" in\n\
         [!ZX]virtlogd) ;;\n\
         *) virtlogd -d -p {virtlogd_pid} ;;\n\
         esac"
    );
    let _ = writeln!(
        script,
        "exec libvirtd --listen -p {}",
        q(&dir.join("libvirtd.pid"))
    );
    script
}

/// `s` single-quoted for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// An error and its sources on one line, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let _ = write!(line, ": {cause}");
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("/run/x"), "'/run/x'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn error_chains_join_sources() {
        let e = LibvirtdError::Prepare {
            path: PathBuf::from("/x"),
            source: io::Error::other("disk full"),
        };
        assert_eq!(error_chain(&e), "could not prepare /x: disk full");
    }
}
