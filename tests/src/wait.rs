//! Polling until a condition holds, for async tests: one deadline, a
//! short pause between tries, and on time-out a panic that names what was
//! awaited and shows the tail of each given process's log.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::process::Process;

/// The pause between two checks.
const PAUSE: Duration = Duration::from_millis(100);

/// Runs `check` until it answers `true`; panics after `deadline` with
/// `what` and the last 40 log lines of every process in `logs`.
pub async fn until<F, Fut>(what: &str, deadline: Duration, logs: &[&Process], mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > deadline {
            let tails: Vec<String> = logs
                .iter()
                .map(|p| format!("--- {} ---\n{}", p.name(), p.log_tail(40)))
                .collect();
            panic!("timed out waiting until {what}\n{}", tails.join("\n"));
        }
        tokio::time::sleep(PAUSE).await;
    }
}
