//! Waiting for the cluster to reach a state (`--wait`): a deadline and
//! the polling period. Polling `get` (linearizable) instead of a watch
//! keeps working across leader changes and follower restarts.

use std::time::{Duration, Instant};

use anyhow::bail;

/// How often a waiting command looks again.
pub const POLL: Duration = Duration::from_millis(250);

/// When a waiting command gives up.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    /// Whether the deadline passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The time left until the deadline (zero once it passed).
    pub fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Fails with `what()` (where things are) once the deadline passed.
    pub fn check(&self, what: impl FnOnce() -> String) -> anyhow::Result<()> {
        if Instant::now() >= self.at {
            bail!("timed out after {:?}: {}", self.timeout, what());
        }
        Ok(())
    }
}
