//! Supervised host processes: daemons a test or the lab starts, with their
//! output in a log file and their pid in a pid file under the prefix.
//!
//! Invariants:
//! - every process is started marked with its prefix
//!   ([`Prefix::mark`]), in a session of its own (`setsid`), with stdin
//!   closed and stdout and stderr appended to `<log dir>/<name>.log`;
//! - while it may be alive, `<pid dir>/<name>.pid` holds its pid, so a sweep
//!   can kill it if its owner dies; `<pid dir>/<name>.spec.json` holds the
//!   spec, so a handle re-adopted from the pid file can restart it;
//! - a [`Process`] kills its whole process group on drop and removes its
//!   pid file, unless [`Process::detach`]ed: then it outlives the handle
//!   (and the creating process) until [`Process::from_pid_file`] adopts it
//!   again or a tear-down kills it;
//! - a process group is only signalled while its leader is known not to
//!   have been reaped (or, for an adopted process, still has the start time
//!   seen at adoption), or right after [`Process::stop`] saw the leader
//!   exit (the group's other members keep its id from being reused), so a
//!   recycled pid is never signalled.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::cmd;
use crate::netns::Node;
use crate::prefix::Prefix;
use crate::sweep;

/// How long [`Process::restart`] lets a running process shut down on
/// SIGTERM before killing it.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long to wait for a SIGKILLed process to be gone.
const KILL_WAIT: Duration = Duration::from_secs(20);

/// How many log lines an error quotes.
const LOG_TAIL_LINES: usize = 30;

/// How often waits poll.
const POLL: Duration = Duration::from_millis(50);

/// A process could not be started, adopted, stopped or waited for.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Names become file names: `[A-Za-z0-9._-]`, not starting with `.`.
    #[error("invalid process name {name:?}")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// The pid file names a live process of this prefix.
    #[error("process {name} is already running (pid {pid})")]
    AlreadyRunning {
        /// The process name.
        name: String,
        /// Its pid.
        pid: i32,
    },
    /// The log file could not be opened.
    #[error("could not open log {path}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The pid or spec file could not be written.
    #[error("could not write {path}")]
    PidFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The program could not be started.
    #[error("could not start `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `from_pid_file`: no pid file, or its process is gone.
    #[error("process {name} is not running (no live pid in {path})")]
    NotRunning {
        /// The process name.
        name: String,
        /// The pid file.
        path: PathBuf,
    },
    /// `from_pid_file`: the pid is alive but not marked with the prefix.
    #[error("pid {pid} in the pid file of {name} is not one of the prefix's processes")]
    NotOurs {
        /// The process name.
        name: String,
        /// The pid found.
        pid: i32,
    },
    /// `restart` of an adopted process whose spec file is missing.
    #[error("process {name} has no recorded spec to restart from")]
    NoSpec {
        /// The process name.
        name: String,
    },
    /// The process was still alive after SIGKILL and a wait.
    #[error("process {name} (pid {pid}) survived SIGKILL")]
    Survived {
        /// The process name.
        name: String,
        /// Its pid.
        pid: i32,
    },
    /// The process exited while something waited for it to be ready.
    #[error("process {name} exited ({exit}) while waiting for it; last log lines:\n{log_tail}")]
    Died {
        /// The process name.
        name: String,
        /// How it exited.
        exit: Exit,
        /// The end of its log.
        log_tail: String,
    },
    /// A TCP port did not accept connections in time.
    #[error(
        "{addr} did not accept connections within {waited:?} (process {name}); last log lines:\n{log_tail}"
    )]
    TcpTimeout {
        /// The process name.
        name: String,
        /// The address polled.
        addr: SocketAddr,
        /// How long it was polled.
        waited: Duration,
        /// The end of the process's log.
        log_tail: String,
    },
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A child of this process: its exit status.
    Status(ExitStatus),
    /// An adopted process (not our child): it is gone, its status unknown.
    Unobserved,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Status(status) => write!(f, "{status}"),
            Exit::Unobserved => f.write_str("status unknown"),
        }
    }
}

/// What to run: program, arguments, environment, namespace, directory.
///
/// Arguments, environment and paths are kept as UTF-8 (lossily converted)
/// so the spec can be recorded next to the pid file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessSpec {
    name: String,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    netns: Option<PathBuf>,
    cwd: Option<PathBuf>,
}

impl ProcessSpec {
    /// Runs `program` as process `name` (the stem of its pid and log files,
    /// unique within a prefix).
    pub fn new(name: impl Into<String>, program: impl AsRef<OsStr>) -> ProcessSpec {
        ProcessSpec {
            name: name.into(),
            program: lossy(program),
            args: Vec::new(),
            env: Vec::new(),
            netns: None,
            cwd: None,
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> ProcessSpec {
        self.args.push(lossy(arg));
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> ProcessSpec
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(lossy));
        self
    }

    /// Sets an environment variable (on top of the inherited environment).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> ProcessSpec {
        self.env.push((lossy(key), lossy(value)));
        self
    }

    /// Runs the process inside `node`'s network namespace.
    pub fn netns(self, node: &Node) -> ProcessSpec {
        self.netns_path(node.netns_path())
    }

    /// Runs the process inside the network namespace mounted at `path`
    /// (through `nsenter --net=`, which keeps `/sys` as it is).
    pub fn netns_path(mut self, path: impl Into<PathBuf>) -> ProcessSpec {
        self.netns = Some(path.into());
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> ProcessSpec {
        self.cwd = Some(dir.into());
        self
    }

    /// The process name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn command(&self, prefix: &Prefix) -> Command {
        let mut cmd = match &self.netns {
            Some(path) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", path.display()))
                    .arg("--")
                    .arg(&self.program);
                cmd
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        prefix.mark(&mut cmd);
        cmd
    }
}

fn lossy(s: impl AsRef<OsStr>) -> String {
    s.as_ref().to_string_lossy().into_owned()
}

/// A supervised process. See the module doc.
#[derive(Debug)]
pub struct Process {
    prefix: Prefix,
    name: String,
    spec: Option<ProcessSpec>,
    pid: i32,
    /// Start time at spawn or adoption, telling it apart from a recycled pid.
    start_time: Option<u64>,
    /// `None` for an adopted process.
    child: Option<Child>,
    /// Set once the process is seen gone (and, for a child, reaped).
    exit: Option<Exit>,
    detached: bool,
}

impl Process {
    /// Starts `spec` under `prefix`. Fails if the prefix already has a live
    /// process of that name.
    pub fn start(prefix: &Prefix, spec: ProcessSpec) -> Result<Process, ProcessError> {
        check_name(&spec.name)?;
        let pid_file = pid_path(prefix, &spec.name);
        if let Some(pid) = sweep::read_pid_file(&pid_file)
            && sweep::is_alive(pid)
            && sweep::is_marked(pid, prefix.name())
        {
            return Err(ProcessError::AlreadyRunning {
                name: spec.name,
                pid,
            });
        }
        let child = spawn(prefix, &spec)?;
        let process = Process {
            prefix: prefix.clone(),
            name: spec.name.clone(),
            pid: child.id() as i32,
            start_time: sweep::start_time(child.id() as i32),
            child: Some(child),
            exit: None,
            spec: Some(spec),
            detached: false,
        };
        // On failure, dropping `process` kills the child.
        process.write_files()?;
        tracing::debug!(prefix = %prefix.name(), name = %process.name, pid = process.pid, "process started");
        Ok(process)
    }

    /// Adopts the live process recorded in `<pid dir>/<name>.pid` (started
    /// and detached by an earlier handle, perhaps in another process). The
    /// handle owns it again: dropping it kills the process unless detached.
    /// Its exit status will not be observable (it is not our child).
    pub fn from_pid_file(prefix: &Prefix, name: &str) -> Result<Process, ProcessError> {
        check_name(name)?;
        let path = pid_path(prefix, name);
        let not_running = || ProcessError::NotRunning {
            name: name.to_owned(),
            path: path.clone(),
        };
        let pid = sweep::read_pid_file(&path).ok_or_else(not_running)?;
        if !sweep::is_alive(pid) {
            return Err(not_running());
        }
        if !sweep::is_marked(pid, prefix.name()) {
            return Err(ProcessError::NotOurs {
                name: name.to_owned(),
                pid,
            });
        }
        let spec = fs::read(spec_path(prefix, name))
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok());
        Ok(Process {
            prefix: prefix.clone(),
            name: name.to_owned(),
            spec,
            pid,
            start_time: sweep::start_time(pid),
            child: None,
            exit: None,
            detached: false,
        })
    }

    /// The process name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pid (of the current run, after a restart).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The log file: `<log dir>/<name>.log`.
    pub fn log_path(&self) -> PathBuf {
        log_path(&self.prefix, &self.name)
    }

    /// The pid file: `<pid dir>/<name>.pid`.
    pub fn pid_path(&self) -> PathBuf {
        pid_path(&self.prefix, &self.name)
    }

    /// Everything the process (every run of it) wrote to stdout and stderr.
    pub fn logs(&self) -> String {
        fs::read(self.log_path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of [`Process::logs`].
    pub fn log_tail(&self, lines: usize) -> String {
        let logs = self.logs();
        let all: Vec<&str> = logs.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process is still alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        let exit = match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(None) => return true,
                Ok(Some(status)) => Exit::Status(status),
                // ECHILD: someone else reaped it; it is gone either way.
                Err(_) => Exit::Unobserved,
            },
            None => {
                if sweep::is_alive(self.pid) && sweep::start_time(self.pid) == self.start_time {
                    return true;
                }
                Exit::Unobserved
            }
        };
        self.exit = Some(exit);
        false
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still
    /// running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return self.exit;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` to the process group, if the process is still ours to
    /// signal (see the module doc).
    fn signal_group(&mut self, signal: Signal) {
        if !self.is_running() {
            return;
        }
        // The process called setsid(), so its group id is its pid.
        if let Err(e) = killpg(Pid::from_raw(self.pid), signal)
            && e != nix::errno::Errno::ESRCH
        {
            tracing::warn!(name = %self.name, pid = self.pid, ?signal, error = %e, "could not signal");
        }
    }

    /// Kills the process group with SIGKILL (a crash, as far as the process
    /// can tell) and waits until the process is gone. The pid file stays;
    /// [`Process::restart`] starts it again.
    pub fn kill9(&mut self) -> Result<Exit, ProcessError> {
        self.signal_group(Signal::SIGKILL);
        self.wait_exit(KILL_WAIT)
            .ok_or_else(|| ProcessError::Survived {
                name: self.name.clone(),
                pid: self.pid,
            })
    }

    /// Sends SIGTERM to the process group, waits up to `grace` for the
    /// process to exit, then SIGKILLs the group. Returns at once if the
    /// process had already exited.
    pub fn stop(&mut self, grace: Duration) -> Result<Exit, ProcessError> {
        if !self.is_running() {
            return Ok(self.exit.unwrap_or(Exit::Unobserved));
        }
        self.signal_group(Signal::SIGTERM);
        if let Some(exit) = self.wait_exit(grace) {
            // Group members that outlive the leader keep the group id (and
            // so the pid) from being reused: signalling it right after the
            // leader's exit reaches only them.
            if let Err(e) = killpg(Pid::from_raw(self.pid), Signal::SIGKILL)
                && e != nix::errno::Errno::ESRCH
            {
                tracing::warn!(name = %self.name, pid = self.pid, error = %e, "could not kill the group's leftovers");
            }
            return Ok(exit);
        }
        tracing::debug!(name = %self.name, pid = self.pid, "no exit after SIGTERM; killing");
        self.kill9()
    }

    /// Starts the process again from the same spec, appending to the same
    /// log. A running process is stopped first ([`STOP_GRACE`]).
    pub fn restart(&mut self) -> Result<(), ProcessError> {
        let spec = self.spec.clone().ok_or_else(|| ProcessError::NoSpec {
            name: self.name.clone(),
        })?;
        if self.is_running() {
            self.stop(STOP_GRACE)?;
        }
        let child = spawn(&self.prefix, &spec)?;
        self.pid = child.id() as i32;
        self.start_time = sweep::start_time(self.pid);
        self.child = Some(child);
        self.exit = None;
        self.write_files()?;
        tracing::debug!(name = %self.name, pid = self.pid, "process restarted");
        Ok(())
    }

    /// Polls until `addr` accepts a TCP connection — from inside `netns`
    /// when given — or `deadline` passes. Fails early, quoting the end of
    /// the log, if the process exits meanwhile.
    pub fn wait_for_tcp(
        &mut self,
        addr: SocketAddr,
        netns: Option<&Node>,
        deadline: Duration,
    ) -> Result<(), ProcessError> {
        let started = Instant::now();
        loop {
            if probe_tcp(addr, netns, Duration::from_millis(500)) {
                return Ok(());
            }
            if !self.is_running() {
                return Err(ProcessError::Died {
                    name: self.name.clone(),
                    exit: self.exit.unwrap_or(Exit::Unobserved),
                    log_tail: self.log_tail(LOG_TAIL_LINES),
                });
            }
            if started.elapsed() >= deadline {
                return Err(ProcessError::TcpTimeout {
                    name: self.name.clone(),
                    addr,
                    waited: started.elapsed(),
                    log_tail: self.log_tail(LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Lets the process outlive the handle (and the creating process): the
    /// pid and spec files stay, [`Process::from_pid_file`] adopts it again.
    /// Returns the pid.
    pub fn detach(mut self) -> u32 {
        self.detached = true;
        self.pid as u32
    }

    fn write_files(&self) -> Result<(), ProcessError> {
        write_atomically(&self.pid_path(), format!("{}\n", self.pid).as_bytes())?;
        if let Some(spec) = &self.spec {
            // Serializing plain strings and paths cannot fail.
            let json = serde_json::to_vec_pretty(spec).unwrap_or_default();
            write_atomically(&spec_path(&self.prefix, &self.name), &json)?;
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if self.kill9().is_err() {
            tracing::warn!(name = %self.name, pid = self.pid, "process survived SIGKILL");
        }
        sweep::remove_file_logged(&self.pid_path());
        sweep::remove_file_logged(&spec_path(&self.prefix, &self.name));
    }
}

/// Whether `addr` accepts a TCP connection within `timeout`, tried from
/// inside `netns` when given (from this thread's namespace otherwise).
pub fn probe_tcp(addr: SocketAddr, netns: Option<&Node>, timeout: Duration) -> bool {
    let connect = || TcpStream::connect_timeout(&addr, timeout).is_ok();
    match netns {
        Some(node) => node.run_in(connect).unwrap_or(false),
        None => connect(),
    }
}

fn check_name(name: &str) -> Result<(), ProcessError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ProcessError::InvalidName {
            name: name.to_owned(),
        })
    }
}

fn pid_path(prefix: &Prefix, name: &str) -> PathBuf {
    prefix.pid_dir().join(format!("{name}.pid"))
}

fn spec_path(prefix: &Prefix, name: &str) -> PathBuf {
    prefix.pid_dir().join(format!("{name}.spec.json"))
}

fn log_path(prefix: &Prefix, name: &str) -> PathBuf {
    prefix.log_dir().join(format!("{name}.log"))
}

/// Starts `spec` in a session of its own with output appended to its log.
fn spawn(prefix: &Prefix, spec: &ProcessSpec) -> Result<Child, ProcessError> {
    let path = log_path(prefix, &spec.name);
    let log_err = |source| ProcessError::Log {
        path: path.clone(),
        source,
    };
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(log_err)?;
    let mut cmd = spec.command(prefix);
    let command = cmd::describe(&cmd);
    writeln!(log, "--- basalt-testkit: starting {command}").map_err(log_err)?;
    let stderr = log.try_clone().map_err(log_err)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr));
    // SAFETY: the closure runs in the forked child before exec; it only
    // calls setsid(2), which is async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    cmd.spawn()
        .map_err(|source| ProcessError::Spawn { command, source })
}

/// Writes `path` through a temporary file and a rename, so a reader never
/// sees it half-written.
fn write_atomically(path: &Path, content: &[u8]) -> Result<(), ProcessError> {
    let tmp = path.with_extension("tmp");
    let write = || -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(content)?;
        fs::rename(&tmp, path)
    };
    write().map_err(|source| ProcessError::PidFile {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("libvirtd-node1").is_ok());
        assert!(check_name("a.b_c").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(".hidden").is_err());
        assert!(check_name("a/b").is_err());
    }

    #[test]
    fn specs_round_trip_through_json() {
        let spec = ProcessSpec::new("web", "busybox")
            .args(["httpd", "-f"])
            .env("K", "V")
            .netns_path("/run/netns/x")
            .cwd("/tmp");
        let json = serde_json::to_string(&spec).unwrap_or_default();
        let back: Option<ProcessSpec> = serde_json::from_str(&json).ok();
        assert_eq!(back.as_ref(), Some(&spec));
    }
}
