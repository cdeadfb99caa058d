//! Disaster recovery: backups of the whole state, restoring one into a
//! new one-member cluster, and forcing a new one-member cluster from a
//! survivor's data directory when quorum is lost for good
//! (`docs/control-plane-recovery.md` is the operator's guide).
//!
//! Invariants:
//! - a backup is the state at one applied index (every kind read in one
//!   linearizable read), written to a temporary file, synced, then renamed
//!   into place: a backup file is whole or absent;
//! - a restored or forced cluster's log continues after the seed's index,
//!   so every stored `resource_version` stays below every new one and
//!   compare-and-swap keeps working for clients that hold old versions;
//! - forcing never destroys the survivor's data: the old directory is
//!   renamed aside, not deleted.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use basalt_api::{AdminClient, ApiError, Object, ObjectList};
use serde::{Deserialize, Serialize};

use crate::raft_types::NodeId;
use crate::store::{self, Seed, SeedError};

/// The `format` field of a backup file this version writes and reads.
pub const BACKUP_FORMAT: &str = "basalt-backup/1";

/// A backup file: every object at one resource version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// [`BACKUP_FORMAT`].
    pub format: String,
    /// The applied index the state was read at.
    pub resource_version: u64,
    /// When the backup was taken (Unix milliseconds).
    pub taken_at_unix_ms: u64,
    /// Every object. Join tokens and nodes carry only secret hashes; keep
    /// the file as private as the cluster's data directories.
    pub objects: Vec<Object>,
}

/// A recovery step failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The cluster could not be read.
    #[error("reading the state from {server}")]
    Read {
        /// The member asked.
        server: String,
        /// Its answer.
        #[source]
        source: ApiError,
    },
    /// A file could not be written or read.
    #[error("{what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A backup file is not one this version reads.
    #[error("{path}: not a Basalt backup: {reason}")]
    NotABackup {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data directory could not be seeded or read.
    #[error(transparent)]
    Seed(#[from] SeedError),
    /// The member's id is not in the survivor's membership and no address
    /// was given.
    #[error(
        "member {id} is not in the membership recorded in {path} (members: {members}); give --advertise"
    )]
    UnknownMember {
        /// The id asked for.
        id: NodeId,
        /// The data directory.
        path: PathBuf,
        /// The ids it knows.
        members: String,
    },
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads the whole state from the member at `server` (any member: a
/// follower forwards the read to the leader) and writes it to `out`.
pub async fn backup(server: &str, out: &Path) -> Result<Backup, RecoveryError> {
    let read = |source| RecoveryError::Read {
        server: server.to_owned(),
        source,
    };
    let client = AdminClient::connect(server).await.map_err(read)?;
    let ObjectList {
        objects,
        resource_version,
    } = client.list_all().await.map_err(read)?;
    let backup = Backup {
        format: BACKUP_FORMAT.into(),
        resource_version,
        taken_at_unix_ms: now_unix_ms(),
        objects,
    };
    write_backup(&backup, out)?;
    Ok(backup)
}

/// Writes `backup` to `path` whole or not at all (temporary file, sync,
/// rename, sync of the directory).
pub fn write_backup(backup: &Backup, path: &Path) -> Result<(), RecoveryError> {
    let file_error = |what| {
        move |source| RecoveryError::File {
            what,
            path: path.to_owned(),
            source,
        }
    };
    let text = serde_json::to_vec_pretty(backup)
        .map_err(|e| file_error("encoding")(std::io::Error::other(e)))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp).map_err(file_error("creating"))?;
    file.write_all(&text).map_err(file_error("writing"))?;
    file.sync_all().map_err(file_error("syncing"))?;
    std::fs::rename(&tmp, path).map_err(file_error("renaming into"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(file_error("syncing the directory of"))?;
    }
    Ok(())
}

/// Reads and checks a backup file.
pub fn read_backup(path: &Path) -> Result<Backup, RecoveryError> {
    let text = std::fs::read(path).map_err(|source| RecoveryError::File {
        what: "reading",
        path: path.to_owned(),
        source,
    })?;
    let not = |reason: String| RecoveryError::NotABackup {
        path: path.to_owned(),
        reason,
    };
    let backup: Backup = serde_json::from_slice(&text).map_err(|e| not(e.to_string()))?;
    if backup.format != BACKUP_FORMAT {
        return Err(not(format!(
            "format {:?}, this version reads {BACKUP_FORMAT:?}",
            backup.format
        )));
    }
    for object in &backup.objects {
        object
            .validate()
            .map_err(|e| not(format!("{}/{}: {e}", object.kind(), object.name())))?;
    }
    Ok(backup)
}

/// Seeds the empty directory `data_dir` with `backup` as a new cluster
/// whose only member is `id`, reachable at `address`.
pub fn restore(
    backup: Backup,
    data_dir: &Path,
    id: NodeId,
    address: &str,
) -> Result<(), RecoveryError> {
    store::seed_new_cluster(
        data_dir,
        id,
        address,
        Seed {
            objects: backup.objects,
            index: backup.resource_version,
            term: 1,
        },
    )?;
    Ok(())
}

/// What [`force_new_cluster`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forced {
    /// Where the survivor's original data now is.
    pub kept_at: PathBuf,
    /// The index the new cluster starts after.
    pub index: u64,
    /// The address the member is recorded at.
    pub address: String,
}

/// Turns the stopped member's `data_dir` into a new one-member cluster of
/// member `id`: its committed state is kept, every other member is
/// dropped. The original directory is renamed to
/// `DIR.before-force-new-cluster-<unix ms>`. `advertise` overrides the
/// address the survivor's membership records for `id`.
pub fn force_new_cluster(
    data_dir: &Path,
    id: NodeId,
    advertise: Option<&str>,
) -> Result<Forced, RecoveryError> {
    let (seed, members) = store::read_for_recovery(data_dir)?;
    let address = match advertise {
        Some(address) => address.to_owned(),
        None => members
            .get(&id)
            .cloned()
            .ok_or_else(|| RecoveryError::UnknownMember {
                id,
                path: data_dir.to_owned(),
                members: members
                    .keys()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
    };
    let mut kept = data_dir.as_os_str().to_owned();
    kept.push(format!(".before-force-new-cluster-{}", now_unix_ms()));
    let kept = PathBuf::from(kept);
    std::fs::rename(data_dir, &kept).map_err(|source| RecoveryError::File {
        what: "moving aside",
        path: data_dir.to_owned(),
        source,
    })?;
    let index = seed.index;
    store::seed_new_cluster(data_dir, id, &address, seed)?;
    Ok(Forced {
        kept_at: kept,
        index,
        address,
    })
}
