//! Removing what killed tests left behind, and tearing a prefix down.
//!
//! A test killed mid-way (SIGKILL, a crashed runner) cannot run its drops:
//! its namespaces, bridge, veths and daemons stay. [`sweep_stale`] finds
//! test prefixes whose owner is dead and removes their objects:
//!
//! - processes: only pids read from `*.pid` files under the prefix's state
//!   directory, and only once the pid is shown to be ours — its environment
//!   carries [`PREFIX_ENV`], its command line
//!   names the state directory, or it lives in one of the prefix's network
//!   namespaces — so a recycled pid is never killed;
//! - network namespaces and root-namespace links whose name starts with the
//!   prefix;
//! - the prefix's subnet claim and its state directory.
//!
//! The owner is dead when its `flock` on `owner` can be taken and the pid
//! and start time recorded there no longer match a live process. The lab's
//! prefix is never swept; [`tear_down`] removes it on request.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd;
use crate::prefix::{PREFIX_ENV, STATE_ROOT, is_prefix, is_test_prefix};

/// Where network namespaces named with `ip netns` are mounted.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Directory of subnet claim files (see [`crate::netns::Fabric`]).
pub(crate) fn claims_dir() -> PathBuf {
    Path::new(STATE_ROOT).join("subnets")
}

/// A state directory younger than this is never judged stale without an
/// owner record: its creator may be between `mkdir` and writing `owner`.
const GRACE: Duration = Duration::from_secs(60);

/// How long to wait for killed processes to disappear.
const KILL_WAIT: Duration = Duration::from_secs(20);

/// A prefix could not be torn down.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The name is not a prefix the testkit makes; nothing was touched.
    #[error("{name:?} is not a basalt-testkit prefix")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
}

/// What one sweep removed.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Stale prefixes torn down.
    pub prefixes: Vec<String>,
    /// Namespaces and links removed because no prefix directory owns them.
    pub orphans: Vec<String>,
}

/// Tears down every test prefix whose owner is dead, and test-named
/// namespaces and links whose prefix has no state directory at all.
/// Best effort: failures are logged, never returned.
pub fn sweep_stale() -> SweepReport {
    let mut report = SweepReport::default();
    let root = Path::new(STATE_ROOT);
    for name in list_dir_names(root) {
        if !is_test_prefix(&name) {
            continue;
        }
        let dir = root.join(&name);
        // Hold the owner's lock while tearing down, so that two sweeping
        // processes do not work on the same prefix.
        let Some(_lock) = claim_if_dead(&dir) else {
            continue;
        };
        tracing::info!(prefix = %name, "sweeping stale test prefix");
        tear_down_dir(&name, &dir, false);
        report.prefixes.push(name);
    }

    let live: HashSet<String> = list_dir_names(root)
        .into_iter()
        .filter(|n| is_prefix(n))
        .collect();
    let orphaned = |object: &str| {
        object
            .get(..6)
            .is_some_and(|p| is_test_prefix(p) && !live.contains(p))
    };
    for ns in list_netns() {
        if orphaned(&ns) {
            delete_netns(&ns);
            report.orphans.push(ns);
        }
    }
    for link in list_links() {
        if orphaned(&link) {
            delete_link(&link);
            report.orphans.push(link);
        }
    }
    for (claim, owner) in list_claims() {
        if !live.contains(&owner) {
            remove_file_logged(&claim);
        }
    }
    report
}

/// The host objects of one prefix, as [`objects`] finds them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PrefixObjects {
    /// Network namespaces whose name starts with the prefix.
    pub namespaces: Vec<String>,
    /// Root-namespace links whose name starts with the prefix.
    pub links: Vec<String>,
    /// Live processes shown to be the prefix's (marked with it, naming its
    /// state directory, or inside one of its namespaces), pid files or not.
    pub processes: Vec<u32>,
}

impl PrefixObjects {
    /// Whether nothing of the prefix is left.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.links.is_empty() && self.processes.is_empty()
    }
}

/// Lists what prefix `name` has on the host right now (for `lab status`,
/// and for tests that check a tear-down). Scans every process.
pub fn objects(name: &str) -> PrefixObjects {
    let owner = Ownership::new(name, &Path::new(STATE_ROOT).join(name));
    let me = std::process::id();
    let processes = list_dir_names(Path::new("/proc"))
        .iter()
        .filter_map(|n| n.parse::<u32>().ok())
        .filter(|pid| *pid != me && is_alive(*pid as i32) && owner.owns(*pid as i32))
        .collect();
    PrefixObjects {
        namespaces: list_netns()
            .into_iter()
            .filter(|n| n.starts_with(name))
            .collect(),
        links: list_links()
            .into_iter()
            .filter(|l| l.starts_with(name))
            .collect(),
        processes,
    }
}

/// Tears down prefix `name` (a test prefix or the lab's): kills the
/// processes of its pid files (verified), deletes its namespaces, links and
/// subnet claim, and removes its state directory. This is `basaltd lab
/// down`. Never call it for a prefix that a live test is using.
pub fn tear_down(name: &str) -> Result<(), SweepError> {
    if !is_prefix(name) {
        return Err(SweepError::InvalidName {
            name: name.to_owned(),
        });
    }
    tear_down_dir(name, &Path::new(STATE_ROOT).join(name), false);
    Ok(())
}

/// Kills the process named by `pid_file` with SIGKILL if it belongs to
/// prefix `name` (see the module doc), and waits for it to be gone.
/// Returns the pid killed, if any.
pub fn kill_pid_file(name: &str, pid_file: &Path) -> Option<u32> {
    let owner = Ownership::new(name, &Path::new(STATE_ROOT).join(name));
    let pid = owner.kill(pid_file)?;
    wait_gone(&[pid], KILL_WAIT);
    Some(pid as u32)
}

/// The tear-down behind [`tear_down`], [`sweep_stale`] and a test prefix's
/// drop. `keep_dir` leaves the state directory (logs) in place.
pub(crate) fn tear_down_dir(name: &str, dir: &Path, keep_dir: bool) {
    debug_assert!(is_prefix(name));
    let owner = Ownership::new(name, dir);
    let mut pid_files = Vec::new();
    collect_pid_files(dir, &mut pid_files);
    // Several pid files may name one process (libvirtd writes one per
    // driver): kill each pid once, so a dying process is not re-examined.
    let mut killed: Vec<i32> = Vec::new();
    for file in &pid_files {
        if read_pid_file(file).is_some_and(|pid| killed.contains(&pid)) {
            continue;
        }
        killed.extend(owner.kill(file));
    }
    wait_gone(&killed, KILL_WAIT);

    // Ports first (deleting a root-side veth also removes its peer inside
    // the namespace), then namespaces, bridges last.
    let (bridges, ports): (Vec<_>, Vec<_>) = list_links()
        .into_iter()
        .filter(|l| l.starts_with(name))
        .partition(|l| is_bridge(l));
    for link in &ports {
        delete_link(link);
    }
    for ns in list_netns().iter().filter(|n| n.starts_with(name)) {
        delete_netns(ns);
    }
    for link in &bridges {
        delete_link(link);
    }
    for (claim, owner_name) in list_claims() {
        if owner_name == name {
            remove_file_logged(&claim);
        }
    }
    if !keep_dir {
        match fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove state dir")
            }
        }
    }
}

/// Takes the owner lock of `dir` if its owner is dead; `None` if the owner
/// lives (or the directory is too young to judge).
fn claim_if_dead(dir: &Path) -> Option<Flock<File>> {
    let path = dir.join("owner");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if is_young(dir) {
                return None;
            }
            // No owner record in an old directory: create one to lock.
            File::create(&path).ok()?
        }
        Err(_) => return None,
    };
    let locked = Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()?;
    let record = fs::read_to_string(&path).unwrap_or_default();
    let mut fields = record.split_whitespace();
    let pid = fields.next().and_then(|p| p.parse::<i32>().ok());
    let start = fields.next().and_then(|s| s.parse::<u64>().ok());
    match (pid, start) {
        (Some(pid), Some(start)) => {
            if is_alive(pid) && start_time(pid) == Some(start) {
                None
            } else {
                Some(locked)
            }
        }
        // Being written right now, or garbage left long ago.
        _ if is_young(dir) => None,
        _ => Some(locked),
    }
}

fn is_young(dir: &Path) -> bool {
    fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_none_or(|age| age < GRACE)
}

/// How to tell that a pid is one of a prefix's processes.
struct Ownership {
    name: String,
    dir: String,
    netns_inodes: Vec<u64>,
}

impl Ownership {
    fn new(name: &str, dir: &Path) -> Ownership {
        let netns_inodes = list_netns()
            .iter()
            .filter(|n| n.starts_with(name))
            .filter_map(|n| fs::metadata(Path::new(NETNS_DIR).join(n)).ok())
            .map(|m| m.ino())
            .collect();
        Ownership {
            name: name.to_owned(),
            dir: dir.to_string_lossy().into_owned(),
            netns_inodes,
        }
    }

    fn owns(&self, pid: i32) -> bool {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        if is_marked(pid, &self.name) {
            return true;
        }
        if let Ok(cmdline) = fs::read(proc.join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(&self.dir)
        {
            return true;
        }
        netns_inode(pid).is_some_and(|inode| self.netns_inodes.contains(&inode))
    }

    /// SIGKILLs the pid in `pid_file` if it is alive and ours.
    fn kill(&self, pid_file: &Path) -> Option<i32> {
        let pid = read_pid_file(pid_file)?;
        if pid <= 1 || pid as u32 == std::process::id() || !is_alive(pid) {
            return None;
        }
        if !self.owns(pid) {
            tracing::warn!(pid, file = %pid_file.display(), "pid is not ours; not killing it");
            return None;
        }
        tracing::debug!(pid, file = %pid_file.display(), "killing");
        match kill(Pid::from_raw(pid), Signal::SIGKILL) {
            Ok(()) => Some(pid),
            Err(e) => {
                tracing::warn!(pid, error = %e, "could not kill");
                None
            }
        }
    }
}

/// Whether `pid`'s environment carries the marker of prefix `name`
/// ([`PREFIX_ENV`]), i.e. the testkit started it (or its ancestor) for
/// that prefix.
pub(crate) fn is_marked(pid: i32, name: &str) -> bool {
    let marker = format!("{PREFIX_ENV}={name}");
    fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|environ| environ.split(|b| *b == 0).any(|e| e == marker.as_bytes()))
}

/// The inode of `pid`'s network namespace (`/proc/PID/ns/net` reads
/// `net:[INODE]`); equal to the inode of the namespace's `/run/netns` file.
pub(crate) fn netns_inode(pid: i32) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The pid in a pid file ("PID", with or without a newline).
pub(crate) fn read_pid_file(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live (not zombie) process.
pub(crate) fn is_alive(pid: i32) -> bool {
    proc_stat_fields(pid).is_some_and(|f| f.first().is_some_and(|state| *state != "Z"))
}

/// The start time of `pid` in clock ticks since boot (`/proc/PID/stat`
/// field 22), which tells a process apart from a later one with its pid.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    // Fields after the command name start at field 3 (state).
    proc_stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

fn proc_stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Waits until none of `pids` is alive, or `timeout` passes.
pub(crate) fn wait_gone(pids: &[i32], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|p| is_alive(*p)) {
        if Instant::now() > deadline {
            tracing::warn!(?pids, "processes still alive after SIGKILL");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn collect_pid_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() {
            collect_pid_files(&path, out);
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "pid") {
            out.push(path);
        }
    }
}

fn list_dir_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Named network namespaces (`ip netns list`, from the mount directory).
pub(crate) fn list_netns() -> Vec<String> {
    list_dir_names(Path::new(NETNS_DIR))
}

/// Names of the links in the calling thread's network namespace.
pub(crate) fn list_links() -> Vec<String> {
    match cmd::ip(&["-o", "link", "show"]) {
        Ok(out) => out.lines().filter_map(parse_link_name).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "could not list links");
            Vec::new()
        }
    }
}

/// `"12: bt3fa2v0@if2: <BROADCAST,..."` → `"bt3fa2v0"`.
fn parse_link_name(line: &str) -> Option<String> {
    let name = line.split(": ").nth(1)?;
    Some(name.split('@').next()?.to_owned())
}

fn is_bridge(link: &str) -> bool {
    Path::new(&format!("/sys/class/net/{link}/bridge")).exists()
}

/// `(claim file, owning prefix)` for every subnet claim.
fn list_claims() -> Vec<(PathBuf, String)> {
    let dir = claims_dir();
    list_dir_names(&dir)
        .into_iter()
        .filter_map(|n| {
            let path = dir.join(n);
            let owner = fs::read_to_string(&path).ok()?.trim().to_owned();
            Some((path, owner))
        })
        .collect()
}

/// Deletes a root-namespace link; "not found" is not a failure.
pub(crate) fn delete_link(link: &str) {
    if let Err(e) = cmd::ip(&["link", "del", "dev", link]) {
        log_cleanup_failure("link", link, &e);
    }
}

/// Deletes a named network namespace; "not found" is not a failure.
pub(crate) fn delete_netns(ns: &str) {
    if let Err(e) = cmd::ip(&["netns", "del", ns]) {
        log_cleanup_failure("netns", ns, &e);
    }
}

fn log_cleanup_failure(kind: &str, object: &str, e: &cmd::CommandError) {
    let stderr = e.stderr();
    if stderr.contains("Cannot find device") || stderr.contains("No such file") {
        tracing::debug!(kind, object, "already gone");
    } else {
        tracing::warn!(kind, object, error = %e, "could not delete");
    }
}

pub(crate) fn remove_file_logged(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "could not remove"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_are_parsed() {
        assert_eq!(
            parse_link_name("12: bt3fa2v0@if2: <BROADCAST,MULTICAST,UP> mtu 1500").as_deref(),
            Some("bt3fa2v0")
        );
        assert_eq!(
            parse_link_name("3: bt3fa2br: <BROADCAST,MULTICAST> mtu 1500").as_deref(),
            Some("bt3fa2br")
        );
    }

    #[test]
    fn own_process_is_alive_with_a_start_time() {
        let me = std::process::id() as i32;
        assert!(is_alive(me));
        assert!(start_time(me).is_some_and(|t| t > 0));
    }
}
