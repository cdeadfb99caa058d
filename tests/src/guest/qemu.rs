//! The test guest under plain QEMU, without libvirt: the peer that
//! benchmarks measure Basalt's libvirt path against, booting the same
//! kernel, initramfs, NBD disk and tap.
//!
//! QEMU runs inside the node's namespace as a supervised [`Process`]
//! (killed with its handle), TCG only, with `-nodefaults` so its device
//! set is as small as the libvirt domain's. It creates the tap itself;
//! wire it with [`super::tap::wire_tap`] once it appears.

use std::path::{Path, PathBuf};

use super::initramfs::GuestImage;
use crate::netns::Node;
use crate::prefix::Prefix;
use crate::process::{Process, ProcessError, ProcessSpec};

/// QEMU could not be started.
#[derive(Debug, thiserror::Error)]
#[error("plain QEMU guest {name} in {netns}")]
pub struct QemuError {
    /// The guest's name.
    pub name: String,
    /// The node's namespace.
    pub netns: String,
    /// What failed.
    #[source]
    pub source: Box<ProcessError>,
}

/// What plain QEMU boots.
#[derive(Debug, Clone)]
pub struct QemuGuestSpec {
    /// The guest's name: QEMU's `-name` and the process name (so
    /// `[A-Za-z0-9._-]`, unique within the prefix).
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// The disk as an NBD URI (`nbd://127.0.0.1:10809/EXPORT`), if any.
    pub disk_uri: Option<String>,
    /// The tap QEMU creates for the guest's NIC.
    pub tap: String,
    /// The guest's MAC address (`52:54:00:...`).
    pub mac: String,
    /// Where the serial console is written.
    pub serial_log: PathBuf,
}

impl QemuGuestSpec {
    /// A spec for `image` with 256 MiB, no disk.
    pub fn new(
        name: &str,
        image: &GuestImage,
        cmdline: &str,
        tap: &str,
        mac: &str,
        serial_log: &Path,
    ) -> QemuGuestSpec {
        QemuGuestSpec {
            name: name.to_owned(),
            memory_mib: 256,
            kernel: image.kernel().to_owned(),
            initrd: image.initrd().to_owned(),
            cmdline: cmdline.to_owned(),
            disk_uri: None,
            tap: tap.to_owned(),
            mac: mac.to_owned(),
            serial_log: serial_log.to_owned(),
        }
    }

    /// `qemu-system-x86_64`'s arguments.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-name",
            &self.name,
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            &format!("file:{}", self.serial_log.display()),
            "-kernel",
            &self.kernel.to_string_lossy(),
            "-initrd",
            &self.initrd.to_string_lossy(),
            "-append",
            &self.cmdline,
            "-netdev",
            &format!("tap,id=net0,ifname={},script=no,downscript=no", self.tap),
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", self.mac),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        if let Some(uri) = &self.disk_uri {
            args.push("-drive".to_owned());
            args.push(format!("file={uri},format=raw,if=virtio,cache=none"));
        }
        args
    }
}

/// A guest running under plain QEMU; killed when dropped.
#[derive(Debug)]
pub struct QemuGuest {
    process: Process,
    serial_log: PathBuf,
}

impl QemuGuest {
    /// Starts `spec` inside `node`. Returns as soon as QEMU is spawned;
    /// the guest boots in the background.
    pub fn start(
        prefix: &Prefix,
        node: &Node,
        spec: &QemuGuestSpec,
    ) -> Result<QemuGuest, QemuError> {
        let process_spec = ProcessSpec::new(&spec.name, "qemu-system-x86_64")
            .args(spec.args())
            .netns(node);
        let process = Process::start(prefix, process_spec).map_err(|source| QemuError {
            name: spec.name.clone(),
            netns: node.netns().to_owned(),
            source: Box::new(source),
        })?;
        Ok(QemuGuest {
            process,
            serial_log: spec.serial_log.clone(),
        })
    }

    /// The guest's serial console log.
    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    /// QEMU's process: its log (QEMU's own errors), pid, `kill9`.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Whether QEMU still runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}
