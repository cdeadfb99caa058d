//! Replica reports: how the copies of the volumes this node holds stand,
//! as its storage process sees them, sent to the control plane for the
//! volumes' status (`Agent.ReportVolume`, decisions 52 and 61).
//!
//! Every [`REPORT_POLL`] the loop ([`run`]) reads the storage process's
//! status (each primary's peer streams: state, dirty chunks, resync bytes;
//! the pool's disk state) and its volumes (VM disks, and snapshots, clones
//! and standalone volumes: `vol-` names), and turns them into one
//! [`VolumeReport`] per volume ([`reports`]): this node's copy, and each
//! peer by replication address (the control plane maps addresses to
//! nodes). Every node holding a copy reports: the primary's report gives
//! every copy's sync state, another node's report its own copy as its
//! node sees it (in the pool, disk attached or failed, storage process
//! reachable or not), which keeps that copy known when the primary's
//! storage process cannot be asked. The control plane refuses reports
//! from a node that holds no copy (a copy left behind, a volume it does
//! not know); that refusal is remembered until the placements naming
//! this node change, or for [`REFUSED_RETRY`].
//!
//! Invariants:
//! - nothing is sent for a volume whose report equals the last one the
//!   control plane accepted (or refused): an idle node makes no calls,
//!   and the control plane no Raft writes; a change of state is sent at
//!   once, a change of byte counts only (resync progress, dirty bytes) at
//!   most every [`PROGRESS_EVERY`];
//! - a storage process that cannot be asked turns every copy of the
//!   volumes it last reported into `unknown`, with the error;
//! - resync progress counts from the resync bytes a peer had when it was
//!   first seen resyncing: done = sent since then, total = done + what it
//!   still misses.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use basalt_api::{
    AgentClient, ApiError, DiskState, ReplicaPeer, ReplicaPeerState, ReplicaReport, ReplicaState,
    StorageClient, StorageStatus, StorageVolume, VolumeReport,
};

use super::StorageConfig;
use super::is_disk_volume;
use super::replicas::NodePlacements;
use super::seen::{Seen, SeenVolumes};

/// How often the storage process is asked.
pub const REPORT_POLL: Duration = Duration::from_secs(1);
/// Least time between two reports of a volume that differ only in byte
/// counts (resync progress, dirty bytes).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a refused report is not sent again (unless the placements
/// naming this node change): a standalone volume's copies do not move
/// with placements.
pub const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Peer (volume, address) → its resync bytes when it was first seen
/// resyncing (the start of the resync under way).
pub type ResyncStarts = BTreeMap<(String, String), u64>;

/// How one peer stream stands, as a copy's report.
fn peer_report(peer: &ReplicaPeer, chunk_size: u64, starts: &mut ResyncStarts) -> ReplicaReport {
    let key = (peer.volume.clone(), peer.peer.clone());
    let dirty_bytes = peer.dirty_chunks.saturating_mul(chunk_size);
    let mut report = ReplicaReport {
        address: peer.peer.clone(),
        dirty_bytes,
        ..ReplicaReport::default()
    };
    if peer.state != ReplicaPeerState::Resyncing {
        starts.remove(&key);
    }
    report.state = match peer.state {
        ReplicaPeerState::Connected => ReplicaState::UpToDate,
        ReplicaPeerState::Resyncing => {
            let start = *starts.entry(key).or_insert(peer.resync_bytes);
            let done = peer.resync_bytes.saturating_sub(start);
            report.sync_done_bytes = done;
            report.sync_total_bytes = done.saturating_add(dirty_bytes);
            ReplicaState::Syncing
        }
        ReplicaPeerState::Away => ReplicaState::Away,
        ReplicaPeerState::SplitBrain => ReplicaState::SplitBrain,
        ReplicaPeerState::DiskFailed => ReplicaState::DiskFailed,
        ReplicaPeerState::Deposed => {
            report.last_error =
                "deposed: the peer has seen a newer epoch; this primary acknowledges no write"
                    .into();
            ReplicaState::Unknown
        }
    };
    report
}

/// Whether pool volume `name` is one the control plane knows: a VM disk,
/// or a snapshot, clone or standalone volume.
fn is_reported(name: &str) -> bool {
    is_disk_volume(name) || super::snapshots::is_made_volume(name)
}

/// One report per VM disk, snapshot, clone or standalone volume of the
/// pool, from node `node`'s storage `status` and `volumes` (see the
/// module's doc).
pub fn reports(
    node: &str,
    status: &StorageStatus,
    volumes: &[StorageVolume],
    starts: &mut ResyncStarts,
) -> BTreeMap<String, VolumeReport> {
    let local = match status.disk_state {
        DiskState::Attached => ReplicaReport {
            state: ReplicaState::UpToDate,
            ..ReplicaReport::default()
        },
        DiskState::Failed => ReplicaReport {
            state: ReplicaState::DiskFailed,
            last_error: status.disk_error.clone(),
            ..ReplicaReport::default()
        },
    };
    let mut out: BTreeMap<String, VolumeReport> = volumes
        .iter()
        .filter(|v| is_reported(&v.name))
        .map(|v| {
            let mut own = local.clone();
            if v.incomplete && own.state == ReplicaState::UpToDate {
                // A full sync or resync into it did not finish (yet): it holds
                // part of a primary's data.
                own.state = ReplicaState::Syncing;
            }
            let report = VolumeReport {
                node: node.to_owned(),
                storage_name: v.name.clone(),
                local: own,
                peers: Vec::new(),
                seen_version: 0,
            };
            (v.name.clone(), report)
        })
        .collect();
    let chunk_size = u64::from(status.chunk_size);
    let mut streaming = std::collections::BTreeSet::new();
    for peer in &status.replicas {
        streaming.insert((peer.volume.clone(), peer.peer.clone()));
        let report = out
            .entry(peer.volume.clone())
            .or_insert_with(|| VolumeReport {
                node: node.to_owned(),
                storage_name: peer.volume.clone(),
                local: local.clone(),
                peers: Vec::new(),
                seen_version: 0,
            });
        report.peers.push(peer_report(peer, chunk_size, starts));
    }
    starts.retain(|key, _| streaming.contains(key));
    for report in out.values_mut() {
        report.peers.sort_by(|a, b| a.address.cmp(&b.address));
    }
    out
}

/// `report` with what storage cannot tell now: every copy unknown, with
/// `error`.
fn unreachable(report: &VolumeReport, error: &str) -> VolumeReport {
    let unknown = |address: &str| ReplicaReport {
        address: address.to_owned(),
        state: ReplicaState::Unknown,
        last_error: error.to_owned(),
        ..ReplicaReport::default()
    };
    VolumeReport {
        node: report.node.clone(),
        storage_name: report.storage_name.clone(),
        local: unknown(""),
        peers: report.peers.iter().map(|p| unknown(&p.address)).collect(),
        seen_version: report.seen_version,
    }
}

/// `report` without the version it carries.
fn unversioned(report: &VolumeReport) -> VolumeReport {
    VolumeReport {
        seen_version: 0,
        ..report.clone()
    }
}

/// `report` without its byte counts or version: what must be sent at once
/// when it changes.
fn shape(report: &VolumeReport) -> VolumeReport {
    let strip = |r: &ReplicaReport| ReplicaReport {
        sync_done_bytes: 0,
        sync_total_bytes: 0,
        dirty_bytes: 0,
        ..r.clone()
    };
    VolumeReport {
        local: strip(&report.local),
        peers: report.peers.iter().map(strip).collect(),
        ..unversioned(report)
    }
}

/// Whether `now` must be sent, given the `last` one settled (accepted or
/// refused) `since` ago and what is known of the volume: a volume with a
/// copy marked outdated is reported again whenever a newer version of it
/// was seen, so an in-sync report read before the mark (which cannot clear
/// it) is followed by one that can (decision 74).
pub fn due(now: &VolumeReport, last: Option<&(VolumeReport, Instant)>, seen: Seen) -> bool {
    match last {
        None => true,
        Some((last, _)) if shape(last) != shape(now) => true,
        Some((last, _)) if seen.marked && now.seen_version > last.seen_version => true,
        Some((last, at)) => unversioned(last) != unversioned(now) && at.elapsed() >= PROGRESS_EVERY,
    }
}

/// Reports the copies this node holds until aborted (see the module's
/// doc).
pub async fn run(
    node: String,
    config: StorageConfig,
    agent: AgentClient,
    placements: NodePlacements,
    seen: SeenVolumes,
) {
    let storage = match StorageClient::connect_unix(&config.socket) {
        Ok(storage) => storage,
        Err(err) => {
            tracing::error!(error = %err, "no storage client: replica states are not reported");
            return;
        }
    };
    let mut named = placements.subscribe();
    let mut ticker = tokio::time::interval(REPORT_POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut starts = ResyncStarts::new();
    // Volume → the last report the control plane settled, and when.
    let mut settled: BTreeMap<String, (VolumeReport, Instant)> = BTreeMap::new();
    // Volumes whose last report was refused.
    let mut refused: BTreeSet<String> = BTreeSet::new();
    loop {
        ticker.tick().await;
        if named.has_changed().unwrap_or(false) {
            // A VM may have moved here (or away): ask again.
            named.borrow_and_update();
            settled.clear();
        }
        settled.retain(|name, (_, at)| !refused.contains(name) || at.elapsed() < REFUSED_RETRY);
        // Taken before the storage process is read (decision 74): each
        // report's version is one seen before what it says was true.
        let versions = seen.snapshot();
        let mut current = match (storage.status().await, storage.list_volumes().await) {
            (Ok(status), Ok(volumes)) => reports(&node, &status, &volumes, &mut starts),
            (Err(err), _) | (_, Err(err)) => {
                let error = format!("the node's storage process cannot be asked: {err}");
                settled
                    .values()
                    .map(|(r, _)| (r.storage_name.clone(), unreachable(r, &error)))
                    .collect()
            }
        };
        for (name, report) in &mut current {
            report.seen_version = versions.get(name).map_or(0, |s| s.version);
        }
        settled.retain(|name, _| current.contains_key(name));
        refused.retain(|name| current.contains_key(name));
        for (name, report) in current {
            let known = versions.get(&name).copied().unwrap_or_default();
            if !due(&report, settled.get(&name), known) {
                continue;
            }
            match agent.report_volume(report.clone()).await {
                Ok(changed) => {
                    if changed {
                        tracing::debug!(volume = %name, "replica states reported");
                    }
                    refused.remove(&name);
                    settled.insert(name, (report, Instant::now()));
                }
                Err(ApiError::FailedPrecondition { .. } | ApiError::NotFound { .. }) => {
                    // Not this node's to report (a copy left behind, a
                    // volume the control plane does not know yet): asked
                    // again when the placements change, or later.
                    refused.insert(name.clone());
                    settled.insert(name, (report, Instant::now()));
                }
                Err(err) => {
                    tracing::debug!(volume = %name, error = %err, "reporting replica states failed; will retry");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c2a8e-0d7b-5a43-9c1e-2b3d4e5f6a7b";

    fn status(peers: Vec<ReplicaPeer>) -> StorageStatus {
        StorageStatus {
            chunk_size: 65536,
            replicas: peers,
            ..StorageStatus::default()
        }
    }

    fn peer(state: ReplicaPeerState, dirty: u64, resynced: u64) -> ReplicaPeer {
        ReplicaPeer {
            volume: UID.into(),
            peer: "10.0.0.2:7410".into(),
            state,
            dirty_chunks: dirty,
            resync_bytes: resynced,
            acked_frames: 0,
        }
    }

    fn volumes() -> Vec<StorageVolume> {
        vec![
            StorageVolume {
                name: UID.into(),
                ..StorageVolume::default()
            },
            StorageVolume {
                name: "operator-scratch".into(),
                ..StorageVolume::default()
            },
        ]
    }

    #[test]
    fn the_agent_names_disks_as_the_control_plane_does() {
        let uid = "0b1c6f5e-34a4-4c55-9a0c-3f1d2f7e0d11";
        for disk in ["root", "data"] {
            assert_eq!(
                super::super::disk_volume(uid, disk),
                basalt_api::disk_storage_name(uid, disk)
            );
        }
        assert_eq!(
            super::super::disk_volume("not-a-uuid", "root"),
            basalt_api::disk_storage_name("not-a-uuid", "root")
        );
    }

    #[test]
    fn peers_map_to_states_with_progress_from_the_resync_start() {
        let mut starts = ResyncStarts::new();
        let away = reports(
            "a",
            &status(vec![peer(ReplicaPeerState::Away, 3, 100)]),
            &volumes(),
            &mut starts,
        );
        assert_eq!(away.len(), 1, "only VM disk volumes: {away:?}");
        let r = &away[UID];
        assert_eq!(r.local.state, ReplicaState::UpToDate);
        assert_eq!(r.peers[0].state, ReplicaState::Away);
        assert_eq!(r.peers[0].dirty_bytes, 3 * 65536);

        let first = reports(
            "a",
            &status(vec![peer(ReplicaPeerState::Resyncing, 3, 100)]),
            &volumes(),
            &mut starts,
        );
        assert_eq!(first[UID].peers[0].sync_done_bytes, 0);
        assert_eq!(first[UID].peers[0].sync_total_bytes, 3 * 65536);
        let later = reports(
            "a",
            &status(vec![peer(ReplicaPeerState::Resyncing, 1, 100 + 2 * 65536)]),
            &volumes(),
            &mut starts,
        );
        let p = &later[UID].peers[0];
        assert_eq!(
            (p.state, p.sync_done_bytes, p.sync_total_bytes),
            (ReplicaState::Syncing, 2 * 65536, 3 * 65536)
        );

        let done = reports(
            "a",
            &status(vec![peer(ReplicaPeerState::Connected, 0, 100 + 3 * 65536)]),
            &volumes(),
            &mut starts,
        );
        assert_eq!(done[UID].peers[0].state, ReplicaState::UpToDate);
        assert!(starts.is_empty());

        let mut failed = status(Vec::new());
        failed.disk_state = DiskState::Failed;
        failed.disk_error = "EIO".into();
        let lone = reports("a", &failed, &volumes(), &mut starts);
        assert_eq!(lone[UID].local.state, ReplicaState::DiskFailed);
        assert_eq!(lone[UID].local.last_error, "EIO");
        assert!(lone[UID].peers.is_empty());

        // A copy whose full sync did not finish is syncing by its own
        // node's word; a failed disk still says failed.
        let mut half = volumes();
        half[0].incomplete = true;
        let filling = reports("a", &status(Vec::new()), &half, &mut starts);
        assert_eq!(filling[UID].local.state, ReplicaState::Syncing);
        let lone = reports("a", &failed, &half, &mut starts);
        assert_eq!(lone[UID].local.state, ReplicaState::DiskFailed);
    }

    #[test]
    fn only_changes_are_sent_and_progress_is_paced() {
        let mut starts = ResyncStarts::new();
        let syncing = |dirty| {
            reports(
                "a",
                &status(vec![peer(ReplicaPeerState::Resyncing, dirty, 0)]),
                &volumes(),
                &mut ResyncStarts::new(),
            )[UID]
                .clone()
        };
        let first = syncing(10);
        let quiet = Seen::default();
        assert!(due(&first, None, quiet));
        let just_now = (first.clone(), Instant::now());
        assert!(!due(&first, Some(&just_now), quiet));
        // Progress only: not before PROGRESS_EVERY.
        assert!(!due(&syncing(5), Some(&just_now), quiet));
        let long_ago = (first.clone(), Instant::now() - PROGRESS_EVERY);
        assert!(due(&syncing(5), Some(&long_ago), quiet));
        // A new state: at once.
        let up = reports(
            "a",
            &status(vec![peer(ReplicaPeerState::Connected, 0, 0)]),
            &volumes(),
            &mut starts,
        )[UID]
            .clone();
        assert!(due(&up, Some(&just_now), quiet));
        // A newer version of the volume alone: sent again only while a copy
        // carries a mark (the report read before the mark could not clear
        // it; this one may), and never for an older or equal version.
        let settled = (up.clone(), Instant::now());
        let newer = VolumeReport {
            seen_version: up.seen_version + 3,
            ..up.clone()
        };
        assert!(!due(&newer, Some(&settled), quiet));
        let marked = Seen {
            version: newer.seen_version,
            marked: true,
        };
        assert!(due(&newer, Some(&settled), marked));
        assert!(!due(&up, Some(&settled), marked));
        // Nor does a version alone count as progress.
        let old = (up.clone(), Instant::now() - PROGRESS_EVERY);
        assert!(!due(&newer, Some(&old), quiet));
        let gone = unreachable(&up, "down");
        assert_eq!(gone.local.state, ReplicaState::Unknown);
        assert_eq!(gone.peers[0].state, ReplicaState::Unknown);
        assert_eq!(gone.peers[0].address, up.peers[0].address);
    }
}
