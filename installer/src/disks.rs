//! The machine's disks (as `lsblk --json` describes them) and the choice
//! of one by a [`DiskFilter`].
//!
//! Invariants: only whole, writable disks are candidates; excluded disks
//! (the boot medium, a disk already chosen) are never chosen; when nothing
//! matches, the error lists every disk with the reason it was passed over.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::answer::{DiskFilter, Prefer};

/// One GiB in bytes.
pub const GIB: u64 = 1 << 30;

/// The `lsblk` command line whose JSON output [`Disk::parse_lsblk`] reads.
pub const LSBLK_ARGS: &[&str] = &[
    "--json",
    "--bytes",
    "--nodeps",
    "--output",
    "PATH,SIZE,MODEL,SERIAL,TYPE,RO,RM,TRAN",
];

/// A block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Its device path, e.g. `/dev/vda`.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// The model string the device reports.
    pub model: Option<String>,
    /// The serial number the device reports.
    pub serial: Option<String>,
    /// `disk`, `rom`, `loop`, `part`, ...
    pub kind: String,
    /// Read-only.
    pub read_only: bool,
    /// Removable media.
    pub removable: bool,
}

/// The disks could not be read or none fits.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `lsblk`'s JSON did not parse.
    #[error("reading the disk list (lsblk --json): {reason}")]
    Inventory {
        /// What was wrong.
        reason: String,
    },
    /// No disk satisfies the filter.
    #[error("{field}: no disk matches the filter{}", format_reasons(.passed_over))]
    NoMatch {
        /// The answer-file field of the filter.
        field: String,
        /// Each disk and why it was passed over.
        passed_over: Vec<(PathBuf, String)>,
    },
}

fn format_reasons(list: &[(PathBuf, String)]) -> String {
    if list.is_empty() {
        return " (the machine has no disks)".into();
    }
    list.iter()
        .map(|(path, why)| format!("\n  {}: {why}", path.display()))
        .collect()
}

#[derive(Deserialize)]
struct LsblkOutput {
    blockdevices: Vec<LsblkDevice>,
}

#[derive(Deserialize)]
struct LsblkDevice {
    path: Option<String>,
    size: Option<Number>,
    model: Option<String>,
    serial: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    ro: Option<Flag>,
    rm: Option<Flag>,
}

/// lsblk prints numbers as numbers or strings, flags as booleans or "0"/"1",
/// depending on its version.
#[derive(Deserialize)]
#[serde(untagged)]
enum Number {
    Int(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Flag {
    Bool(bool),
    Int(u64),
    Text(String),
}

impl Flag {
    fn is_set(&self) -> bool {
        match self {
            Flag::Bool(b) => *b,
            Flag::Int(n) => *n != 0,
            Flag::Text(s) => s == "1" || s == "true",
        }
    }
}

impl Disk {
    /// Reads `lsblk --json --bytes --nodeps --output PATH,SIZE,MODEL,SERIAL,TYPE,RO,RM,TRAN`.
    pub fn parse_lsblk(json: &str) -> Result<Vec<Disk>, DiskError> {
        let output: LsblkOutput =
            serde_json::from_str(json).map_err(|err| DiskError::Inventory {
                reason: err.to_string(),
            })?;
        output
            .blockdevices
            .into_iter()
            .enumerate()
            .map(|(i, dev)| {
                let path = dev.path.ok_or_else(|| DiskError::Inventory {
                    reason: format!("blockdevices[{i}] has no path (lsblk needs --output PATH)"),
                })?;
                let size_bytes = match dev.size {
                    Some(Number::Int(n)) => n,
                    Some(Number::Text(t)) => {
                        t.trim().parse().map_err(|_| DiskError::Inventory {
                            reason: format!(
                                "{path}: size {t:?} is not a byte count (lsblk needs --bytes)"
                            ),
                        })?
                    }
                    None => 0,
                };
                let clean =
                    |s: Option<String>| s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
                Ok(Disk {
                    path: PathBuf::from(path),
                    size_bytes,
                    model: clean(dev.model),
                    serial: clean(dev.serial),
                    kind: dev.kind.unwrap_or_default(),
                    read_only: dev.ro.is_some_and(|f| f.is_set()),
                    removable: dev.rm.is_some_and(|f| f.is_set()),
                })
            })
            .collect()
    }

    /// A one-line description: path, size, model, serial.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, model {}, serial {})",
            self.path.display(),
            human_size(self.size_bytes),
            self.model.as_deref().unwrap_or("-"),
            self.serial.as_deref().unwrap_or("-"),
        )
    }

    /// Why the filter passes over this disk, or `None` when it matches.
    /// `resolve` turns the filter's path (maybe a `/dev/disk/by-*` link)
    /// into the device path.
    pub fn mismatch(
        &self,
        filter: &DiskFilter,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Option<String> {
        if self.kind != "disk" {
            return Some(format!("a {} device, not a disk", self.kind));
        }
        if self.read_only {
            return Some("read-only".into());
        }
        if self.size_bytes == 0 {
            return Some("no medium (size 0)".into());
        }
        if let Some(path) = &filter.path
            && resolve(path.as_path()) != self.path
        {
            return Some(format!("path is not {path}"));
        }
        if let Some(pattern) = &filter.model
            && !pattern.matches(self.model.as_deref().unwrap_or(""))
        {
            return Some(format!(
                "model {:?} does not match {pattern:?}",
                self.model.as_deref().unwrap_or("")
            ));
        }
        if let Some(pattern) = &filter.serial
            && !pattern.matches(self.serial.as_deref().unwrap_or(""))
        {
            return Some(format!(
                "serial {:?} does not match {pattern:?}",
                self.serial.as_deref().unwrap_or("")
            ));
        }
        if let Some(min) = filter.min_size_gib
            && self.size_bytes < min.saturating_mul(GIB)
        {
            return Some(format!(
                "{} is below min_size_gib {min}",
                human_size(self.size_bytes)
            ));
        }
        if let Some(max) = filter.max_size_gib
            && self.size_bytes > max.saturating_mul(GIB)
        {
            return Some(format!(
                "{} is above max_size_gib {max}",
                human_size(self.size_bytes)
            ));
        }
        None
    }
}

/// Chooses the disk `filter` (the answer file's `field`) picks among
/// `disks`, never one in `exclude` (with the reason given there).
pub fn select<'a>(
    field: &str,
    filter: &DiskFilter,
    disks: &'a [Disk],
    exclude: &[(PathBuf, String)],
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<&'a Disk, DiskError> {
    let mut passed_over = Vec::new();
    let mut matches: Vec<&Disk> = Vec::new();
    for disk in disks {
        if let Some((_, why)) = exclude.iter().find(|(path, _)| *path == disk.path) {
            passed_over.push((disk.path.clone(), why.clone()));
        } else if let Some(why) = disk.mismatch(filter, resolve) {
            passed_over.push((disk.path.clone(), why));
        } else {
            matches.push(disk);
        }
    }
    matches.sort_by(|a, b| {
        let by_size = a.size_bytes.cmp(&b.size_bytes);
        let by_size = match filter.prefer {
            Prefer::Smallest => by_size,
            Prefer::Largest => by_size.reverse(),
        };
        by_size.then_with(|| a.path.cmp(&b.path))
    });
    matches.first().copied().ok_or_else(|| DiskError::NoMatch {
        field: field.to_owned(),
        passed_over,
    })
}

/// `20 GiB`, `512 MiB`, `1.5 TiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LSBLK: &str = r#"{"blockdevices": [
        {"path":"/dev/sr0","size":241172480,"model":"QEMU DVD-ROM","serial":"QM00003","type":"rom","ro":false,"rm":true,"tran":"ata"},
        {"path":"/dev/vda","size":21474836480,"model":null,"serial":"sys-1","type":"disk","ro":false,"rm":false,"tran":"virtio"},
        {"path":"/dev/vdb","size":"107374182400","model":"Fast SSD","serial":"pool-1","type":"disk","ro":"0","rm":"0","tran":"virtio"},
        {"path":"/dev/vdc","size":10737418240,"model":"Fast SSD","serial":"small","type":"disk","ro":true,"rm":false,"tran":"virtio"}
    ]}"#;

    fn identity(p: &Path) -> PathBuf {
        p.to_owned()
    }

    #[test]
    fn lsblk_json_of_either_flavour_parses() {
        let disks = Disk::parse_lsblk(LSBLK).unwrap();
        assert_eq!(disks.len(), 4);
        assert_eq!(disks[2].size_bytes, 100 * GIB);
        assert!(disks[3].read_only && !disks[2].read_only);
        assert_eq!(disks[1].model, None);
        assert!(Disk::parse_lsblk(r#"{"blockdevices":[{"size":1}]}"#).is_err());
    }

    #[test]
    fn smallest_and_largest_and_why_not() {
        let disks = Disk::parse_lsblk(LSBLK).unwrap();
        let any = DiskFilter::default();
        let chosen = select("install_disk", &any, &disks, &[], &identity).unwrap();
        assert_eq!(
            chosen.path,
            Path::new("/dev/vda"),
            "the ROM and the read-only disk never count"
        );
        let largest = DiskFilter {
            prefer: Prefer::Largest,
            ..DiskFilter::default()
        };
        let chosen = select("install_disk", &largest, &disks, &[], &identity).unwrap();
        assert_eq!(chosen.path, Path::new("/dev/vdb"));
        let excluded = [(PathBuf::from("/dev/vda"), "the install disk".to_owned())];
        let chosen = select("storage.pool_disk", &any, &disks, &excluded, &identity).unwrap();
        assert_eq!(chosen.path, Path::new("/dev/vdb"));

        let big = DiskFilter {
            min_size_gib: Some(200),
            ..DiskFilter::default()
        };
        let err = select("install_disk", &big, &disks, &[], &identity)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("install_disk: no disk matches"), "{err}");
        assert!(err.contains("/dev/sr0: a rom device"), "{err}");
        assert!(
            err.contains("/dev/vdb: 100 GiB is below min_size_gib 200"),
            "{err}"
        );
        assert!(err.contains("/dev/vdc: read-only"), "{err}");
    }

    #[test]
    fn model_and_serial_patterns() {
        let disks = Disk::parse_lsblk(LSBLK).unwrap();
        let filter = DiskFilter {
            model: Some("Fast*".parse().unwrap()),
            serial: Some("pool-?".parse().unwrap()),
            ..DiskFilter::default()
        };
        let chosen = select("f", &filter, &disks, &[], &identity).unwrap();
        assert_eq!(chosen.path, Path::new("/dev/vdb"));
        let by_path = DiskFilter {
            path: Some("/dev/disk/by-id/virtio-sys-1".parse().unwrap()),
            ..DiskFilter::default()
        };
        let resolve = |p: &Path| {
            if p == Path::new("/dev/disk/by-id/virtio-sys-1") {
                PathBuf::from("/dev/vda")
            } else {
                p.to_owned()
            }
        };
        let chosen = select("f", &by_path, &disks, &[], &resolve).unwrap();
        assert_eq!(chosen.path, Path::new("/dev/vda"));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(20 * GIB), "20 GiB");
        assert_eq!(human_size(512 << 20), "512 MiB");
        assert_eq!(human_size(3 * GIB / 2), "1.5 GiB");
    }
}
