//! The per-test name prefix and the state directory that goes with it.
//!
//! Every host object a fixture makes (namespace, link, pid file, log) is
//! named after one [`Prefix`]: `bt` and four hex digits for a test, `bl0000`
//! for the lab. The prefix owns `/run/basalt-testkit/<prefix>/`, which
//! records who owns it (`owner`: pid and start time, held under an
//! exclusive `flock` while the owner lives) and holds every pid file and log
//! of the prefix. That is what lets [`crate::sweep`] find and remove what a
//! killed test left behind, and only that.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Once};

use nix::fcntl::{Flock, FlockArg};

use crate::sweep;

/// Where every prefix keeps its state directory.
pub const STATE_ROOT: &str = "/run/basalt-testkit";

/// Environment variable set on every process the testkit starts, naming its
/// prefix: how a sweep recognises a pid as one of ours before killing it.
pub const PREFIX_ENV: &str = "BASALT_TESTKIT_PREFIX";

/// The lab's prefix. Tests and sweeps never touch it; only an explicit
/// [`sweep::tear_down`] of this name (`basaltd lab down`) removes it.
pub const LAB_PREFIX: &str = "bl0000";

/// First two letters of every test prefix.
pub(crate) const TEST_KIND: &str = "bt";
const LAB_KIND: &str = "bl";

/// Linux limit on interface names (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// A prefix could not be set up, or a name derived from it is invalid.
#[derive(Debug, thiserror::Error)]
pub enum PrefixError {
    /// The state directory (or a file in it) could not be created.
    #[error("could not create {path}")]
    StateDir {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Could not lock the owner file of a fresh prefix.
    #[error("could not lock {path}")]
    Lock {
        /// The owner file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Every random name tried was taken (absurdly unlikely).
    #[error("no free test prefix after {tries} tries")]
    Exhausted {
        /// How many names were tried.
        tries: usize,
    },
    /// A name built from the prefix would exceed the kernel's limit.
    #[error("interface name {name:?} is longer than {MAX_IFNAME} characters")]
    NameTooLong {
        /// The rejected name.
        name: String,
    },
}

/// A per-test (or lab) name prefix and its state directory.
///
/// Cheap to clone; every fixture keeps a clone. When the last clone of a
/// test prefix drops, whatever fixtures did not remove themselves is torn
/// down (processes from pid files, namespaces and links with the prefix,
/// the subnet claim) and the state directory is deleted — unless the thread
/// is panicking, in which case the logs stay for reading until the next
/// sweep. A lab prefix is never torn down on drop.
#[derive(Clone, Debug)]
pub struct Prefix {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    dir: PathBuf,
    lab: bool,
    /// Held for the prefix's lifetime: a sweep that can take this lock (and
    /// finds the recorded pid gone) knows the owner is dead.
    _owner_lock: Option<Flock<File>>,
}

impl Prefix {
    /// A fresh, unique test prefix (`bt` + 4 hex digits) owned by this
    /// process. The first call in a process sweeps stale prefixes first.
    pub fn for_test() -> Result<Prefix, PrefixError> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            sweep::sweep_stale();
        });

        let root = Path::new(STATE_ROOT);
        fs::create_dir_all(root).map_err(|source| PrefixError::StateDir {
            path: root.to_owned(),
            source,
        })?;
        const TRIES: usize = 64;
        for _ in 0..TRIES {
            let random = uuid::Uuid::new_v4();
            let bytes = random.as_bytes();
            let name = format!("{TEST_KIND}{:02x}{:02x}", bytes[0], bytes[1]);
            let dir = root.join(&name);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(PrefixError::StateDir { path: dir, source }),
            }
            let lock = write_owner(&dir, true)?;
            create_subdirs(&dir)?;
            tracing::debug!(prefix = %name, "created test prefix");
            return Ok(Prefix {
                inner: Arc::new(Inner {
                    name,
                    dir,
                    lab: false,
                    _owner_lock: lock,
                }),
            });
        }
        Err(PrefixError::Exhausted { tries: TRIES })
    }

    /// The lab's prefix ([`LAB_PREFIX`]); its state directory is created if
    /// missing and kept on drop. `basaltd lab down` removes everything with
    /// [`sweep::tear_down`]`(LAB_PREFIX)`.
    pub fn lab() -> Result<Prefix, PrefixError> {
        let dir = Path::new(STATE_ROOT).join(LAB_PREFIX);
        fs::create_dir_all(&dir).map_err(|source| PrefixError::StateDir {
            path: dir.clone(),
            source,
        })?;
        write_owner(&dir, false)?;
        create_subdirs(&dir)?;
        Ok(Prefix {
            inner: Arc::new(Inner {
                name: LAB_PREFIX.to_owned(),
                dir,
                lab: true,
                _owner_lock: None,
            }),
        })
    }

    /// The prefix itself, e.g. `bt3fa2`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether this is the lab's prefix.
    pub fn is_lab(&self) -> bool {
        self.inner.lab
    }

    /// The state directory, `/run/basalt-testkit/<prefix>/`.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Where pid files go. Any `*.pid` file anywhere under [`Prefix::dir`]
    /// is killed by a sweep, once the pid is verified to be ours.
    pub fn pid_dir(&self) -> PathBuf {
        self.inner.dir.join("pids")
    }

    /// Where process logs go.
    pub fn log_dir(&self) -> PathBuf {
        self.inner.dir.join("logs")
    }

    /// `<prefix><suffix>`, checked against the kernel's 15-character limit
    /// on interface names (taps made in the root namespace must use this).
    pub fn ifname(&self, suffix: &str) -> Result<String, PrefixError> {
        let name = format!("{}{suffix}", self.inner.name);
        if name.len() > MAX_IFNAME {
            return Err(PrefixError::NameTooLong { name });
        }
        Ok(name)
    }

    /// Marks a command that the caller starts itself (not through
    /// [`crate::process`]) as belonging to this prefix, so that a sweep may
    /// kill it if its pid file lies under [`Prefix::dir`].
    pub fn mark(&self, cmd: &mut Command) {
        cmd.env(PREFIX_ENV, &self.inner.name);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.lab {
            return;
        }
        let keep = std::thread::panicking();
        sweep::tear_down_dir(&self.name, &self.dir, keep);
        if keep {
            eprintln!(
                "basalt-testkit: keeping {} for inspection (removed by the next sweep)",
                self.dir.display()
            );
        }
    }
}

/// Whether `name` has the shape of a test prefix (`bt` + 4 lowercase hex).
pub fn is_test_prefix(name: &str) -> bool {
    has_shape(name, TEST_KIND)
}

/// Whether `name` has the shape of any prefix, test or lab.
pub fn is_prefix(name: &str) -> bool {
    has_shape(name, TEST_KIND) || has_shape(name, LAB_KIND)
}

fn has_shape(name: &str, kind: &str) -> bool {
    name.len() == 6
        && name.starts_with(kind)
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Writes `<dir>/owner` = "PID STARTTIME" and, for a test prefix, locks it
/// first (the lock is what a concurrent sweep checks before the content).
fn write_owner(dir: &Path, lock: bool) -> Result<Option<Flock<File>>, PrefixError> {
    let path = dir.join("owner");
    let state_dir_err = |source| PrefixError::StateDir {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(state_dir_err)?;
    let pid = std::process::id();
    let start = sweep::start_time(pid as i32).unwrap_or(0);
    if lock {
        // Blocking: a concurrent sweep may hold the lock for a moment while
        // it finds this young directory alive.
        let mut locked = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| {
            PrefixError::Lock {
                path: path.clone(),
                source,
            }
        })?;
        writeln!(locked, "{pid} {start}").map_err(state_dir_err)?;
        Ok(Some(locked))
    } else {
        let mut file = file;
        writeln!(file, "{pid} {start}").map_err(state_dir_err)?;
        Ok(None)
    }
}

fn create_subdirs(dir: &Path) -> Result<(), PrefixError> {
    for sub in ["pids", "logs"] {
        let path = dir.join(sub);
        fs::create_dir_all(&path).map_err(|source| PrefixError::StateDir { path, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_shapes() {
        assert!(is_test_prefix("bt3fa2"));
        assert!(!is_test_prefix("bl0000"));
        assert!(is_prefix("bl0000"));
        assert!(!is_prefix("bt3fa"));
        assert!(!is_prefix("bt3FA2"));
        assert!(!is_prefix("bt3fa2x"));
        assert!(!is_prefix("eth0"));
    }
}
