//! The test guest's boot files: the host's Debian kernel and an initramfs
//! built here from its virtio modules, the static busybox and `/init`.
//!
//! The initramfs is an uncompressed `newc` cpio archive (which the kernel
//! unpacks as is), written by [`CpioWriter`] without any external tool. It
//! is cached under `/var/tmp/basalt-guest/<hash>/initramfs.cpio`, where the
//! hash covers every input byte, and published with a rename, so tests
//! that build it at the same time each see either nothing or a whole file.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{BIN_SCRIPTS, INIT_SCRIPT, MODULES};

/// Where built images are cached.
pub const CACHE_ROOT: &str = "/var/tmp/basalt-guest";

/// Where the static busybox comes from (`busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";

/// Bumped whenever the archive layout changes, so old caches are not used.
const LAYOUT_VERSION: &str = "basalt-guest-initramfs-v1";

/// The guest image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No `/boot/vmlinuz-<ver>` with modules in `/lib/modules/<ver>`.
    #[error(
        "no guest kernel: no /boot/vmlinuz-<ver> with /lib/modules/<ver>/kernel (install linux-image-amd64)"
    )]
    NoKernel,
    /// A module of the required list is missing for this kernel.
    #[error("kernel {version} has no module {module} (neither built in nor under /lib/modules)")]
    MissingModule {
        /// The kernel version.
        version: String,
        /// The module name.
        module: String,
    },
    /// A compressed module could not be decompressed.
    #[error("could not decompress {path} with `{tool}`: {detail}")]
    Decompress {
        /// The module file.
        path: PathBuf,
        /// The tool used.
        tool: String,
        /// What went wrong.
        detail: String,
    },
    /// Reading an input or writing the archive failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError + use<> {
    let path = path.to_owned();
    move |source| ImageError::Io { op, path, source }
}

/// The test guest's kernel and initramfs, ready to boot.
#[derive(Debug, Clone)]
pub struct GuestImage {
    kernel: PathBuf,
    initrd: PathBuf,
    kernel_version: String,
}

impl GuestImage {
    /// Finds the newest kernel in `/boot` that has modules and builds (or
    /// reuses from the cache) its initramfs.
    pub fn build() -> Result<GuestImage, ImageError> {
        let (kernel, version) = find_kernel()?;
        let inputs = Inputs::gather(&version)?;
        let dir = Path::new(CACHE_ROOT).join(format!("{:016x}", inputs.hash(&kernel)));
        let initrd = dir.join("initramfs.cpio");
        if !initrd.exists() {
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
            let archive = inputs.archive().map_err(io_err("building", &initrd))?;
            write_atomically(&initrd, &archive)?;
            tracing::debug!(initrd = %initrd.display(), bytes = archive.len(), "built guest initramfs");
        }
        Ok(GuestImage {
            kernel,
            initrd,
            kernel_version: version,
        })
    }

    /// The kernel image (`/boot/vmlinuz-<ver>`).
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    /// The initramfs (`newc` cpio, uncompressed).
    pub fn initrd(&self) -> &Path {
        &self.initrd
    }

    /// The kernel version the image was built for.
    pub fn kernel_version(&self) -> &str {
        &self.kernel_version
    }
}

/// The newest `/boot/vmlinuz-<ver>` whose `/lib/modules/<ver>/kernel` exists.
fn find_kernel() -> Result<(PathBuf, String), ImageError> {
    let boot = Path::new("/boot");
    let entries = fs::read_dir(boot).map_err(io_err("listing", boot))?;
    let mut found: Vec<(Vec<u64>, String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            Path::new("/lib/modules")
                .join(&version)
                .join("kernel")
                .is_dir()
                .then(|| (version_key(&version), version, e.path()))
        })
        .collect();
    found.sort();
    let (_, version, path) = found.pop().ok_or(ImageError::NoKernel)?;
    Ok((path, version))
}

/// `6.1.0-56-amd64` → `[6, 1, 0, 56]`: numeric order of versions.
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Everything that goes into the archive, read into memory.
struct Inputs {
    busybox: Vec<u8>,
    /// `(name, module bytes)`, in load order.
    modules: Vec<(String, Vec<u8>)>,
}

impl Inputs {
    fn gather(version: &str) -> Result<Inputs, ImageError> {
        let busybox = fs::read(BUSYBOX).map_err(io_err("reading", Path::new(BUSYBOX)))?;
        let root = Path::new("/lib/modules").join(version);
        let builtin = fs::read_to_string(root.join("modules.builtin")).unwrap_or_default();
        let mut modules = Vec::new();
        for &name in MODULES {
            match find_module(&root.join("kernel"), name)? {
                Some(path) => modules.push((name.to_owned(), read_module(&path)?)),
                None if is_builtin(&builtin, name) => {}
                // Older kernels lack some (virtio_pci_modern_dev, ...):
                // what the running guest needs is there or the boot shows it.
                None => tracing::debug!(module = name, version, "module not found; skipped"),
            }
        }
        if !modules.iter().any(|(n, _)| n == "virtio_net") && !is_builtin(&builtin, "virtio_net") {
            return Err(ImageError::MissingModule {
                version: version.to_owned(),
                module: "virtio_net".to_owned(),
            });
        }
        Ok(Inputs { busybox, modules })
    }

    /// FNV-1a over every input, delimited: stable across Rust versions.
    fn hash(&self, kernel: &Path) -> u64 {
        let mut h = Fnv::default();
        h.field(LAYOUT_VERSION.as_bytes());
        h.field(kernel.as_os_str().as_encoded_bytes());
        h.field(&self.busybox);
        h.field(INIT_SCRIPT.as_bytes());
        for (name, script) in BIN_SCRIPTS {
            h.field(name.as_bytes());
            h.field(script.as_bytes());
        }
        for (name, bytes) in &self.modules {
            h.field(name.as_bytes());
            h.field(bytes);
        }
        h.0
    }

    fn archive(&self) -> io::Result<Vec<u8>> {
        let mut cpio = CpioWriter::new(Vec::new());
        for dir in [
            "bin",
            "dev",
            "etc",
            "lib",
            "lib/modules",
            "proc",
            "sys",
            "tmp",
            "run",
        ] {
            cpio.dir(dir)?;
        }
        // The kernel opens /dev/console for init before devtmpfs is mounted.
        cpio.char_device("dev/console", 5, 1)?;
        cpio.char_device("dev/null", 1, 3)?;
        cpio.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
        cpio.file("bin/busybox", 0o755, &self.busybox)?;
        cpio.symlink("bin/sh", "busybox")?;
        for (name, script) in BIN_SCRIPTS {
            cpio.file(&format!("bin/{name}"), 0o755, script.as_bytes())?;
        }
        let mut order = String::new();
        for (name, bytes) in &self.modules {
            cpio.file(&format!("lib/modules/{name}.ko"), 0o644, bytes)?;
            order.push_str(name);
            order.push('\n');
        }
        cpio.file("etc/basalt-modules", 0o644, order.as_bytes())?;
        cpio.finish()
    }
}

/// `name.ko` (or `.ko.xz`, `.ko.zst`, `.ko.gz`) anywhere under `kernel_dir`;
/// module files may spell `_` as `-`.
fn find_module(kernel_dir: &Path, name: &str) -> Result<Option<PathBuf>, ImageError> {
    let names: Vec<String> = [name.to_owned(), name.replace('_', "-")]
        .into_iter()
        .flat_map(|n| ["ko", "ko.xz", "ko.zst", "ko.gz"].map(|ext| format!("{n}.{ext}")))
        .collect();
    let mut stack = vec![kernel_dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(io_err("listing", &dir))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if entry
                .file_name()
                .to_str()
                .is_some_and(|f| names.iter().any(|n| n == f))
            {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}

fn is_builtin(modules_builtin: &str, name: &str) -> bool {
    modules_builtin.lines().any(|l| {
        l.rsplit('/')
            .next()
            .and_then(|f| f.strip_suffix(".ko"))
            .is_some_and(|f| f.replace('-', "_") == name)
    })
}

/// A module's bytes, decompressed: busybox `insmod` loads plain ELF only.
fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    let tool: &[&str] = if name.ends_with(".ko.xz") {
        &[BUSYBOX, "xzcat"]
    } else if name.ends_with(".ko.gz") {
        &[BUSYBOX, "zcat"]
    } else if name.ends_with(".ko.zst") {
        &["zstd", "-dc"]
    } else {
        return fs::read(path).map_err(io_err("reading", path));
    };
    let decompress_err = |detail: String| ImageError::Decompress {
        path: path.to_owned(),
        tool: tool.join(" "),
        detail,
    };
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .arg(path)
        .output()
        .map_err(|e| decompress_err(e.to_string()))?;
    if !out.status.success() {
        return Err(decompress_err(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(out.stdout)
}

/// Writes `path` through a temporary file in the same directory and a
/// rename: readers never see a partial file, and concurrent builders of
/// the same content simply replace each other.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name()
            .map_or("file".into(), |f| f.to_string_lossy()),
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(ImageError::Io {
            op: "writing",
            path: path.to_owned(),
            source,
        });
    }
    Ok(())
}

/// 64-bit FNV-1a, fed with length-prefixed fields.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }
}

/// A minimal writer of `newc` ("070701") cpio archives, the format the
/// kernel unpacks into its initial root file system.
#[derive(Debug)]
pub struct CpioWriter<W: io::Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl<W: io::Write> CpioWriter<W> {
    /// Starts an archive written to `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Adds a directory (mode 0755). Parents must be added first.
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, S_IFDIR | 0o755, 2, (0, 0), &[])
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node (mode 0600).
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | 0o600, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, 1, (0, 0), 0)?;
        self.pad()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, ino, mode, nlink, rdev, size)?;
        self.write(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        (rdev_major, rdev_minor): (u32, u32),
        size: u32,
    ) -> io::Result<()> {
        let name_size = name.len() as u32 + 1;
        let fields = [
            ino, mode, 0, /* uid */
            0, /* gid */
            nlink, 0, /* mtime: fixed, so archives are reproducible */
            size, 0, /* devmajor */
            0, /* devminor */
            rdev_major, rdev_minor, name_size, 0, /* check */
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Pads to the next multiple of four bytes.
    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin").unwrap();
        w.file("bin/x", 0o755, b"hello").unwrap();
        w.symlink("bin/y", "x").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // Header (110 bytes) + "bin\0" = 114, padded to 116.
        let second = &out[116..];
        assert!(second.starts_with(b"070701"));
        let mode = u32::from_str_radix(std::str::from_utf8(&second[14..22]).unwrap(), 16).unwrap();
        assert_eq!(mode, S_IFREG | 0o755);
        let size = u32::from_str_radix(std::str::from_utf8(&second[54..62]).unwrap(), 16).unwrap();
        assert_eq!(size, 5);
        // Name "bin/x\0" ends at 116 + 110 + 6 = 232, already aligned.
        assert_eq!(&out[232..237], b"hello");
        let tail = String::from_utf8_lossy(&out[out.len() - 16..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");
    }

    #[test]
    fn cpio_round_trips_through_busybox() {
        if !Path::new(BUSYBOX).exists() {
            eprintln!("skipping: no {BUSYBOX}");
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.dir("d").unwrap();
        w.file("d/f", 0o644, b"content\n").unwrap();
        w.symlink("d/l", "f").unwrap();
        let archive = w.finish().unwrap();
        let dir =
            std::env::temp_dir().join(format!("basalt-cpio-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir(&dir).unwrap();
        let mut child = Command::new(BUSYBOX)
            .args(["cpio", "-i", "-d"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let content = fs::read(dir.join("d/f"));
        let link = fs::read_link(dir.join("d/l"));
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(content.unwrap(), b"content\n");
        assert_eq!(link.unwrap(), Path::new("f"));
    }

    #[test]
    fn versions_sort_numerically() {
        assert!(version_key("6.1.0-56-amd64") > version_key("6.1.0-9-amd64"));
        assert!(version_key("6.10.0-1-amd64") > version_key("6.9.0-1-amd64"));
    }

    #[test]
    fn builtin_modules_are_recognised() {
        let list = "kernel/drivers/virtio/virtio.ko\nkernel/net/core/fail-over.ko\n";
        assert!(is_builtin(list, "virtio"));
        assert!(is_builtin(list, "fail_over"));
        assert!(!is_builtin(list, "virtio_net"));
    }
}
