//! Image import: copies an [`Image`]'s source into this node's pool once,
//! as a read-only snapshot that VM disks clone.
//!
//! An import writes a staging volume (`img-<uuid>.import`) through the NBD
//! server with `qemu-img convert` (raw or qcow2, from a path or an http(s)
//! URL), then snapshots it as `img-<uuid>` and deletes the staging volume:
//! the snapshot exists only once the whole image is in, so a crash mid-way
//! (of the agent or of `qemu-img`) leaves only a staging volume, which the
//! next attempt replaces. Progress goes to the image's status, one entry
//! per node, written by compare-and-swap. Every importer of a node shares
//! which imports run there, so an image is imported once at a time per
//! node whichever volume (a VM disk, a standalone volume) asks for it.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use basalt_api::{
    AdminClient, ApiError, EnsureVolume, Image, ImagePhase, Kind, Object, StorageClient,
};
use tokio::io::AsyncReadExt as _;

use crate::vm_domain::vm_uuid;

/// How long a failed import waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How often progress is written to the image's status.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The read-only snapshot that holds image `uid` in a pool.
pub fn image_volume(image_uid: &str) -> String {
    format!("img-{}", vm_uuid(image_uid))
}

/// The staging volume an import of image `uid` writes.
pub fn staging_volume(image_uid: &str) -> String {
    format!("{}.import", image_volume(image_uid))
}

/// Whether `name` is a volume [`image_volume`] or [`staging_volume`] makes.
pub fn is_image_volume(name: &str) -> bool {
    name.strip_prefix("img-")
        .map(|rest| rest.strip_suffix(".import").unwrap_or(rest))
        .is_some_and(|uuid| uuid.len() == 36 && uuid::Uuid::parse_str(uuid).is_ok())
}

/// An import that did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportState {
    /// Copying: bytes done of total (0 of 0 before the size is known).
    Running {
        /// Bytes copied.
        done: u64,
        /// Bytes to copy.
        total: u64,
    },
    /// Failed at that time, with why.
    Failed {
        /// When.
        at: Instant,
        /// Why.
        message: String,
    },
}

/// The imports this agent runs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Importer {
    node: String,
    storage: StorageClient,
    admin: AdminClient,
    /// By image uid; shared by every importer of the node ([`imports_of`]).
    imports: Arc<Mutex<BTreeMap<String, ImportState>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Node `node`'s imports, shared by every [`Importer`] this process makes
/// for it (the VM disks' reconciler, the migration target's, the
/// standalone volumes' loop): one import of an image at a time per node.
/// Two would share its staging volume, each deleting it under the other.
fn imports_of(node: &str) -> Arc<Mutex<BTreeMap<String, ImportState>>> {
    type Imports = Arc<Mutex<BTreeMap<String, ImportState>>>;
    static BY_NODE: LazyLock<Mutex<BTreeMap<String, Imports>>> = LazyLock::new(Mutex::default);
    lock(&BY_NODE).entry(node.to_owned()).or_default().clone()
}

impl Importer {
    /// Imports into the pool behind `storage`, reporting as `node`.
    pub fn new(node: String, storage: StorageClient, admin: AdminClient) -> Importer {
        Importer {
            imports: imports_of(&node),
            node,
            storage,
            admin,
        }
    }

    /// Image uids with an import running now.
    pub fn running(&self) -> Vec<String> {
        lock(&self.imports)
            .iter()
            .filter(|(_, s)| matches!(s, ImportState::Running { .. }))
            .map(|(uid, _)| uid.clone())
            .collect()
    }

    /// Where `image` stands on this node: `Ok(())` once it is in the pool
    /// (and may be cloned from [`image_volume`]), otherwise why not; an
    /// import is started when none runs (nor failed recently).
    pub async fn ensure(&self, image: &Image) -> Result<(), String> {
        let uid = &image.meta.uid;
        match self.storage.export_address(&image_volume(uid)).await {
            Ok(_) => {
                lock(&self.imports).remove(uid);
                return Ok(());
            }
            Err(ApiError::FailedPrecondition { .. }) => {}
            Err(err) => return Err(format!("cannot ask the storage process: {err}")),
        }
        let mut imports = lock(&self.imports);
        match imports.get(uid) {
            Some(ImportState::Running { done, total }) => {
                let pct = (done * 100).checked_div(*total).unwrap_or(0);
                return Err(format!(
                    "image {} is being imported ({pct}%)",
                    image.meta.name
                ));
            }
            Some(ImportState::Failed { at, message }) if at.elapsed() < RETRY_AFTER => {
                return Err(format!(
                    "importing image {} failed: {message}",
                    image.meta.name
                ));
            }
            _ => {}
        }
        imports.insert(uid.clone(), ImportState::Running { done: 0, total: 0 });
        drop(imports);
        let this = self.clone();
        let name = image.meta.name.clone();
        let image = image.clone();
        tokio::spawn(async move {
            let uid = image.meta.uid.clone();
            let result = this.import(&image).await;
            let message = match &result {
                Ok(()) => {
                    tracing::info!(image = %image.meta.name, "image imported");
                    lock(&this.imports).remove(&uid);
                    None
                }
                Err(message) => {
                    tracing::warn!(image = %image.meta.name, error = %message, "image import failed");
                    let _ = this.storage.delete_volume(&staging_volume(&uid)).await;
                    lock(&this.imports).insert(
                        uid.clone(),
                        ImportState::Failed {
                            at: Instant::now(),
                            message: message.clone(),
                        },
                    );
                    Some(message.clone())
                }
            };
            this.report(&image.meta.name, |entry, size| match &message {
                None => {
                    entry.phase = ImagePhase::Ready;
                    entry.bytes_total = size;
                    entry.bytes_done = size;
                    entry.message.clear();
                }
                Some(message) => {
                    entry.phase = ImagePhase::Failed;
                    entry.message = message.chars().take(900).collect();
                }
            })
            .await;
        });
        Err(format!("image {name} is being imported (starting)"))
    }

    fn set_progress(&self, uid: &str, done: u64, total: u64) {
        lock(&self.imports).insert(uid.to_owned(), ImportState::Running { done, total });
    }

    async fn import(&self, image: &Image) -> Result<(), String> {
        let uid = &image.meta.uid;
        let format = image.spec.format.as_str();
        let source = &image.spec.source;
        let size = virtual_size(source, format).await?;
        let size = size.div_ceil(512) * 512;
        self.set_progress(uid, 0, size);
        self.report(&image.meta.name, |entry, _| {
            entry.phase = ImagePhase::Importing;
            entry.bytes_done = 0;
            entry.bytes_total = size;
            entry.message.clear();
        })
        .await;
        let staging = staging_volume(uid);
        let api = |what: &str, e: ApiError| format!("{what}: {e}");
        self.storage
            .delete_volume(&staging)
            .await
            .map_err(|e| api("removing an earlier staging volume", e))?;
        self.storage
            .ensure_volume(EnsureVolume {
                name: staging.clone(),
                size_bytes: size,
                source: None,
            })
            .await
            .map_err(|e| api("creating the staging volume", e))?;
        let export = self
            .storage
            .export_address(&staging)
            .await
            .map_err(|e| api("locating the staging volume", e))?;
        let mut child = tokio::process::Command::new("qemu-img")
            .args(["convert", "-p", "-n", "--target-is-zero", "-f", format])
            .args(["-O", "raw", source, &export.uri()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("running qemu-img: {e}"))?;
        let mut stdout = child.stdout.take().ok_or("qemu-img has no stdout")?;
        let mut stderr = child.stderr.take().ok_or("qemu-img has no stderr")?;
        let errors = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        let mut buf = [0u8; 512];
        let mut line = Vec::new();
        let mut last_report = Instant::now();
        loop {
            let n = stdout.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if b != b'\r' && b != b'\n' {
                    line.push(b);
                    continue;
                }
                if let Some(pct) = parse_progress(&String::from_utf8_lossy(&line)) {
                    let done = (size as f64 * pct / 100.0) as u64;
                    self.set_progress(uid, done, size);
                    if last_report.elapsed() >= PROGRESS_EVERY {
                        last_report = Instant::now();
                        self.report(&image.meta.name, |entry, _| {
                            entry.phase = ImagePhase::Importing;
                            entry.bytes_done = done;
                            entry.bytes_total = size;
                        })
                        .await;
                    }
                }
                line.clear();
            }
        }
        let status = child
            .wait()
            .await
            .map_err(|e| format!("waiting for qemu-img: {e}"))?;
        let errors = errors.await.unwrap_or_default();
        if !status.success() {
            return Err(format!("qemu-img convert {status}: {}", errors.trim()));
        }
        self.storage
            .snapshot_volume(&staging, &image_volume(uid))
            .await
            .map_err(|e| api("snapshotting the imported image", e))?;
        self.storage
            .delete_volume(&staging)
            .await
            .map_err(|e| api("removing the staging volume", e))?;
        Ok(())
    }

    /// Changes this node's entry in the image's status (compare-and-swap,
    /// retried on conflicts with other nodes' reports); also records the
    /// image's size. A failure is logged: progress is best effort.
    async fn report(&self, image: &str, change: impl Fn(&mut basalt_api::ImageNodeStatus, u64)) {
        for _ in 0..10 {
            let mut current = match self.admin.get(Kind::Image, image).await {
                Ok(Object::Image(current)) => current,
                Ok(_) | Err(ApiError::NotFound { .. }) => return,
                Err(err) => {
                    tracing::debug!(image, error = %err, "cannot read the image to report progress");
                    return;
                }
            };
            let size = current.status.size_bytes;
            let node = self.node.clone();
            let before = current.status.clone();
            change(current.status.node_mut(&node), size);
            if let Some(total) = current
                .status
                .nodes
                .iter()
                .find(|n| n.node == node)
                .map(|n| n.bytes_total)
                && current.status.size_bytes == 0
            {
                current.status.size_bytes = total;
            }
            if current.status == before {
                return;
            }
            match self.admin.update(Object::Image(current)).await {
                Ok(_) => return,
                Err(ApiError::Aborted { .. }) => continue,
                Err(err) => {
                    tracing::debug!(image, error = %err, "reporting import progress failed");
                    return;
                }
            }
        }
    }
}

/// The virtual size of an image source, from `qemu-img info`.
async fn virtual_size(source: &str, format: &str) -> Result<u64, String> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format, source])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img info {source}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_virtual_size(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| format!("qemu-img info {source}: no virtual size in its answer"))
}

/// `"virtual-size": N` from `qemu-img info --output=json`.
fn parse_virtual_size(json: &str) -> Option<u64> {
    let at = json.find("\"virtual-size\"")?;
    let rest = json[at + "\"virtual-size\"".len()..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The percentage in one of `qemu-img -p`'s lines: `    (42.50/100%)`.
fn parse_progress(line: &str) -> Option<f64> {
    let inner = line.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    inner
        .parse()
        .ok()
        .filter(|p: &f64| (0.0..=100.0).contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn importers_of_a_node_share_its_imports() {
        let one = imports_of("node-x");
        lock(&one).insert("u1".into(), ImportState::Running { done: 0, total: 0 });
        assert!(lock(&imports_of("node-x")).contains_key("u1"));
        assert!(!lock(&imports_of("node-y")).contains_key("u1"));
    }

    #[test]
    fn names_and_parsers() {
        let uid = "5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b";
        assert_eq!(image_volume(uid), format!("img-{uid}"));
        assert!(is_image_volume(&image_volume(uid)));
        assert!(is_image_volume(&staging_volume(uid)));
        assert!(!is_image_volume("img-debian"));
        assert!(staging_volume(uid).len() <= basalt_api::MAX_VOLUME_NAME_LEN);
        assert_eq!(parse_progress("    (42.50/100%)"), Some(42.5));
        assert_eq!(parse_progress("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress("garbage"), None);
        let info = "{\n    \"virtual-size\": 1048576,\n    \"filename\": \"x\"\n}";
        assert_eq!(parse_virtual_size(info), Some(1 << 20));
        assert_eq!(parse_virtual_size("{}"), None);
    }
}
