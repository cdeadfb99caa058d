//! cloud-init NoCloud seeds: for every VM whose spec has a
//! [`CloudInit`] section, a small ISO 9660 volume labelled `cidata` in the
//! node's pool, which the domain gets as a read-only CD-ROM over NBD.
//!
//! The seed holds three files cloud-init's NoCloud data source reads:
//! - `meta-data`: `instance-id` = the VM's uid (a VM created again under
//!   an old name is a new instance), `local-hostname` = the VM's name, and
//!   `public-keys` = the spec's SSH keys;
//! - `user-data`: the spec's, as is; when empty, a `#cloud-config` that
//!   installs the SSH keys;
//! - `network-config`: the spec's, only when given.
//!
//! `meta-data` and the generated `user-data` are written as JSON, which is
//! YAML too, so no value ever needs hand quoting.
//!
//! Invariants:
//! - the volume's name ([`seed_volume`]) carries the VM's UUID and a hash
//!   of the three files, so a changed seed is a new volume (the domain is
//!   redefined onto it; the guest reads it at its next boot) and an
//!   unchanged one is never rebuilt; the same spec gives the same name on
//!   every node, so a VM that moves finds (or rebuilds) the same seed;
//! - a seed appears whole or not at all: it is written to a staging volume
//!   (`<name>.import`) with `qemu-img` over NBD, then snapshotted (read
//!   only) under its name, as image imports do; a crash mid-way leaves a
//!   staging volume that the next attempt replaces;
//! - seeds of deleted VMs, and seeds a VM no longer uses, are garbage
//!   ([`super::garbage`]); nothing else is ever named `seed-...`.

use std::path::Path;
use std::process::Stdio;

use basalt_api::{ApiError, CloudInit, EnsureVolume, StorageClient, Vm};
use uuid::Uuid;

use crate::vm_domain::vm_uuid;

/// Prefix of every seed volume's name.
const PREFIX: &str = "seed-";
/// Suffix of a seed's staging volume.
const STAGING: &str = ".import";
/// Hex digits of the content hash in a seed volume's name.
const HASH_DIGITS: usize = 12;
/// The ISO 9660 volume label cloud-init looks for.
pub const SEED_LABEL: &str = "cidata";

/// A seed could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The storage process did not answer.
    #[error("the node's storage process is unreachable")]
    Unavailable(#[source] ApiError),
    /// The storage process refused a step.
    #[error("{step}")]
    Storage {
        /// What was being done.
        step: &'static str,
        /// Its answer.
        #[source]
        source: ApiError,
    },
    /// A local file step failed (the scratch directory, the seed files).
    #[error("{step}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `xorriso` or `qemu-img` could not be run or failed.
    #[error("{tool} failed: {message}")]
    Tool {
        /// The program.
        tool: &'static str,
        /// Its exit status and error output, or why it did not start.
        message: String,
    },
}

impl SeedError {
    /// The error and its causes on one line, for a VM's status.
    pub fn describe(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    fn storage(step: &'static str, err: ApiError) -> SeedError {
        match err {
            ApiError::Unavailable { .. } => SeedError::Unavailable(err),
            source => SeedError::Storage { step, source },
        }
    }
}

/// The files of a seed, as they go on the ISO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    /// `meta-data`.
    pub meta_data: String,
    /// `user-data`.
    pub user_data: String,
    /// `network-config`, when the spec gives one.
    pub network_config: Option<String>,
}

impl SeedFiles {
    /// The files for `vm`; `None` when its spec has no cloud-init section.
    pub fn for_vm(vm: &Vm) -> Option<SeedFiles> {
        let cloud_init: &CloudInit = vm.spec.cloud_init.as_ref()?;
        let keys = &cloud_init.ssh_authorized_keys;
        let mut meta = serde_json::Map::new();
        meta.insert("instance-id".into(), vm.meta.uid.clone().into());
        meta.insert("local-hostname".into(), vm.meta.name.clone().into());
        if !keys.is_empty() {
            meta.insert("public-keys".into(), keys.clone().into());
        }
        let user_data = if cloud_init.user_data.is_empty() {
            let mut config = serde_json::Map::new();
            if !keys.is_empty() {
                config.insert("ssh_authorized_keys".into(), keys.clone().into());
            }
            format!("#cloud-config\n{}\n", pretty(&config))
        } else {
            cloud_init.user_data.clone()
        };
        Some(SeedFiles {
            meta_data: format!("{}\n", pretty(&meta)),
            user_data,
            network_config: cloud_init.network_config.clone(),
        })
    }

    /// A hash of the three files, [`HASH_DIGITS`] hex digits.
    fn hash(&self) -> String {
        let mut bytes = Vec::new();
        for part in [
            Some(&self.meta_data),
            Some(&self.user_data),
            self.network_config.as_ref(),
        ] {
            // Length-prefixed, so no two different sets of files collide
            // by shifting bytes from one file to the next.
            match part {
                Some(text) => {
                    bytes.extend_from_slice(&(text.len() as u64 + 1).to_le_bytes());
                    bytes.extend_from_slice(text.as_bytes());
                }
                None => bytes.extend_from_slice(&0u64.to_le_bytes()),
            }
        }
        let digest = Uuid::new_v5(&Uuid::NAMESPACE_OID, &bytes)
            .simple()
            .to_string();
        digest[..HASH_DIGITS].to_owned()
    }

    /// Writes the files into `dir`.
    fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join("meta-data"), &self.meta_data)?;
        std::fs::write(dir.join("user-data"), &self.user_data)?;
        if let Some(config) = &self.network_config {
            std::fs::write(dir.join("network-config"), config)?;
        }
        Ok(())
    }
}

fn pretty(map: &serde_json::Map<String, serde_json::Value>) -> String {
    // A map of strings always serializes.
    serde_json::to_string_pretty(map).unwrap_or_else(|_| "{}".to_owned())
}

/// The volume (and NBD export) holding `vm`'s seed: `seed-<VM UUID>-<hash
/// of the files>`; `None` when the VM has no cloud-init section.
pub fn seed_volume(vm: &Vm) -> Option<String> {
    let files = SeedFiles::for_vm(vm)?;
    Some(volume_name(vm, &files))
}

fn volume_name(vm: &Vm, files: &SeedFiles) -> String {
    format!("{PREFIX}{}-{}", vm_uuid(&vm.meta.uid), files.hash())
}

/// Whether `name` is a seed volume (or a seed's staging volume).
pub fn is_seed_volume(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    let rest = rest.strip_suffix(STAGING).unwrap_or(rest);
    let Some((uuid, hash)) = rest.split_at_checked(36) else {
        return false;
    };
    Uuid::parse_str(uuid).is_ok()
        && hash.len() == HASH_DIGITS + 1
        && hash.starts_with('-')
        && hash[1..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Makes `vm`'s seed volume unless it exists; returns its name, or `None`
/// when the VM has no cloud-init section. Idempotent.
pub async fn ensure(storage: &StorageClient, vm: &Vm) -> Result<Option<String>, SeedError> {
    let Some(files) = SeedFiles::for_vm(vm) else {
        return Ok(None);
    };
    let name = volume_name(vm, &files);
    match storage.export_address(&name).await {
        Ok(_) => return Ok(Some(name)),
        Err(ApiError::FailedPrecondition { .. }) => {}
        Err(err) => return Err(SeedError::storage("looking up the seed volume", err)),
    }
    let scratch = tempfile::Builder::new()
        .prefix("basalt-seed-")
        .tempdir()
        .map_err(|source| SeedError::Io {
            step: "making a scratch directory",
            source,
        })?;
    let files_dir = scratch.path().join("files");
    let iso = scratch.path().join("seed.iso");
    std::fs::create_dir(&files_dir)
        .and_then(|()| files.write_to(&files_dir))
        .map_err(|source| SeedError::Io {
            step: "writing the seed files",
            source,
        })?;
    run(
        "xorriso",
        tokio::process::Command::new("xorriso")
            .args([
                "-as", "mkisofs", "-quiet", "-V", SEED_LABEL, "-J", "-R", "-o",
            ])
            .arg(&iso)
            .arg(&files_dir),
    )
    .await?;
    let size = std::fs::metadata(&iso)
        .map_err(|source| SeedError::Io {
            step: "reading the seed image's size",
            source,
        })?
        .len()
        .div_ceil(512)
        * 512;
    let staging = format!("{name}{STAGING}");
    storage
        .delete_volume(&staging)
        .await
        .map_err(|e| SeedError::storage("removing an earlier staging volume", e))?;
    storage
        .ensure_volume(EnsureVolume {
            name: staging.clone(),
            size_bytes: size,
            source: None,
        })
        .await
        .map_err(|e| SeedError::storage("creating the staging volume", e))?;
    let export = storage
        .export_address(&staging)
        .await
        .map_err(|e| SeedError::storage("locating the staging volume", e))?;
    run(
        "qemu-img",
        tokio::process::Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&iso)
            .arg(export.uri()),
    )
    .await?;
    storage
        .snapshot_volume(&staging, &name)
        .await
        .map_err(|e| SeedError::storage("snapshotting the seed", e))?;
    storage
        .delete_volume(&staging)
        .await
        .map_err(|e| SeedError::storage("removing the staging volume", e))?;
    tracing::info!(vm = %vm.meta.name, volume = %name, bytes = size, "cloud-init seed written");
    Ok(Some(name))
}

/// Runs a tool to its end; its error output becomes the error.
async fn run(tool: &'static str, command: &mut tokio::process::Command) -> Result<(), SeedError> {
    let out = command
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| SeedError::Tool {
            tool,
            message: format!("cannot run it: {e}"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(SeedError::Tool {
        tool,
        message: format!("{}: {}", out.status, stderr.trim()),
    })
}

#[cfg(test)]
mod tests {
    use basalt_api::{ObjectMeta, VmSpec};

    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEdlJ2DMaM8vSRNI8QO9fsnhdbxgZaBeCtgvmzRo7xYh ops@example";

    fn vm(cloud_init: Option<CloudInit>) -> Vm {
        let mut meta = ObjectMeta::named("web-1");
        meta.uid = "5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b".into();
        Vm {
            meta,
            spec: VmSpec {
                cloud_init,
                ..VmSpec::default()
            },
            ..Vm::default()
        }
    }

    fn keys_only() -> CloudInit {
        CloudInit {
            user_data: String::new(),
            network_config: None,
            ssh_authorized_keys: vec![KEY.into()],
        }
    }

    #[test]
    fn meta_data_names_the_instance_and_host_and_carries_the_keys() {
        let files = SeedFiles::for_vm(&vm(Some(keys_only()))).unwrap();
        let meta: serde_json::Value = serde_json::from_str(&files.meta_data).unwrap();
        assert_eq!(meta["instance-id"], "5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b");
        assert_eq!(meta["local-hostname"], "web-1");
        assert_eq!(meta["public-keys"][0], KEY);
        // Without user data: a #cloud-config installing the keys.
        let (header, body) = files.user_data.split_once('\n').unwrap();
        assert_eq!(header, "#cloud-config");
        let config: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(config["ssh_authorized_keys"][0], KEY);
        assert_eq!(files.network_config, None);
        assert!(SeedFiles::for_vm(&vm(None)).is_none());
        assert!(seed_volume(&vm(None)).is_none());
    }

    #[test]
    fn user_data_and_network_config_go_as_given() {
        let mut ci = keys_only();
        ci.user_data = "#!/bin/sh\necho hi \"there\"\n".into();
        ci.network_config = Some("version: 2\n".into());
        let files = SeedFiles::for_vm(&vm(Some(ci))).unwrap();
        assert_eq!(files.user_data, "#!/bin/sh\necho hi \"there\"\n");
        assert_eq!(files.network_config.as_deref(), Some("version: 2\n"));
    }

    #[test]
    fn the_name_changes_with_the_content_and_nothing_else() {
        let a = seed_volume(&vm(Some(keys_only()))).unwrap();
        assert_eq!(a, seed_volume(&vm(Some(keys_only()))).unwrap());
        assert!(
            a.starts_with("seed-5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b-"),
            "{a}"
        );
        assert!(is_seed_volume(&a));
        assert!(is_seed_volume(&format!("{a}{STAGING}")));
        assert!(format!("{a}{STAGING}").len() <= basalt_api::MAX_VOLUME_NAME_LEN);

        let mut changed = keys_only();
        changed.user_data = "#cloud-config\n".into();
        assert_ne!(a, seed_volume(&vm(Some(changed))).unwrap());
        let mut with_net = keys_only();
        with_net.network_config = Some(String::new() + "version: 2\n");
        assert_ne!(a, seed_volume(&vm(Some(with_net))).unwrap());
        let mut renamed = vm(Some(keys_only()));
        renamed.meta.name = "web-2".into();
        assert_ne!(a, seed_volume(&renamed).unwrap(), "the hostname is in it");

        for not_seed in [
            "seed-x",
            "img-5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b",
            "5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b",
            "seed-5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b-zzzzzzzzzzzz",
            "seed-5f0c6a3e-8d4b-4b8e-9a77-0d2c1f3e4a5b-0123",
        ] {
            assert!(!is_seed_volume(not_seed), "{not_seed}");
        }
    }

    /// Builds a real ISO from the files with the same xorriso arguments
    /// and reads it back with xorriso: label and contents survive.
    #[test]
    fn xorriso_makes_a_cidata_iso_that_reads_back() {
        if std::process::Command::new("xorriso")
            .arg("-version")
            .output()
            .is_err()
        {
            eprintln!("skipping: no xorriso");
            return;
        }
        let mut ci = keys_only();
        ci.network_config = Some("version: 2\nethernets: {}\n".into());
        let files = SeedFiles::for_vm(&vm(Some(ci))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        files.write_to(&src).unwrap();
        let iso = dir.path().join("seed.iso");
        let out = std::process::Command::new("xorriso")
            .args([
                "-as", "mkisofs", "-quiet", "-V", SEED_LABEL, "-J", "-R", "-o",
            ])
            .arg(&iso)
            .arg(&src)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let back = dir.path().join("back");
        let out = std::process::Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(&iso)
            .args(["-pvd_info", "-extract", "/"])
            .arg(&back)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let info = String::from_utf8_lossy(&out.stdout);
        assert!(
            info.lines()
                .any(|l| l.starts_with("Volume Id") && l.trim_end().ends_with("cidata")),
            "{info}"
        );
        let read = |f: &str| std::fs::read_to_string(back.join(f)).unwrap();
        assert_eq!(read("meta-data"), files.meta_data);
        assert_eq!(read("user-data"), files.user_data);
        assert_eq!(Some(read("network-config")), files.network_config.clone());
    }
}
