//! A fake node agent for the control-plane tests that register nodes
//! through the agent API without running `basaltd agent`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use basalt_api::{AgentClient, Heartbeat};

/// Heartbeats for node `node` (uid `uid`) every 300 ms until `stop` is
/// set, as its agent would.
pub fn heartbeats(agent: AgentClient, node: String, uid: String, stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let beat = Heartbeat {
                node: node.clone(),
                node_uid: uid.clone(),
                allocatable: None,
            };
            let _ = agent.heartbeat(beat).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
}
