//! Carries out an install [`Plan`] on the live ISO: partitions the disk
//! with sfdisk, makes the filesystems, copies the live system's root
//! filesystem (squashfs), installs the Basalt package with dpkg, writes the
//! node's files, creates the storage pool, enables the units and installs
//! GRUB for BIOS and UEFI.
//!
//! Only the ISO test (`installer/test-iso`) exercises this module: it
//! erases disks. Invariant: it runs only after the answer file validated
//! and the plan was made; every command is printed before it runs and a
//! failing one stops the install, naming the command and its output.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::answer::{AfterInstall, AnswerFile};
use crate::disks::{self, Disk};
use crate::plan::{self, Filesystem, Inventory, Link, Plan, PoolPlan};
use crate::source;

/// `basalt-install run` flags.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The answer file (default: find it, see `basalt-install find`).
    #[arg(long)]
    answer: Option<PathBuf>,
    /// Where the live medium is mounted.
    #[arg(long, default_value = source::LIVE_MEDIUM)]
    medium: PathBuf,
    /// The system image to copy (default: MEDIUM/live/filesystem.squashfs).
    #[arg(long)]
    squashfs: Option<PathBuf>,
    /// The Basalt package (default: the one in MEDIUM/basalt/).
    #[arg(long)]
    deb: Option<PathBuf>,
    /// Where the new system is mounted while it is installed.
    #[arg(long, default_value = "/target")]
    target: PathBuf,
    /// Stop after printing the plan.
    #[arg(long)]
    dry_run: bool,
}

/// Lists the machine's disks with lsblk.
pub fn list_disks() -> anyhow::Result<Vec<Disk>> {
    let out = output(Command::new("lsblk").args(disks::LSBLK_ARGS))?;
    Ok(Disk::parse_lsblk(&out)?)
}

fn list_links() -> anyhow::Result<Vec<Link>> {
    let out = output(Command::new("ip").args(["-json", "link", "show"]))?;
    Ok(Link::parse_ip_json(&out)?)
}

/// The disk the live system booted from (never a candidate).
fn boot_medium(medium: &Path) -> Option<PathBuf> {
    let source = output(
        Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(medium),
    )
    .ok()?;
    let source = source.trim();
    if source.is_empty() {
        return None;
    }
    let parent = output(Command::new("lsblk").args(["-n", "-o", "PKNAME", source]))
        .ok()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty());
    Some(match parent {
        Some(parent) => PathBuf::from(format!("/dev/{parent}")),
        None => PathBuf::from(source),
    })
}

/// Runs the install.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let (origin, text) = match &args.answer {
        Some(path) => (
            path.display().to_string(),
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => source::find(&args.medium)?,
    };
    println!("basalt-install: answer file from {origin}");
    let answers = AnswerFile::parse(&text)
        .map_err(|err| anyhow::anyhow!("the answer file from {origin} is not valid:\n{err}"))?;

    let mut exclude = Vec::new();
    if let Some(medium) = boot_medium(&args.medium) {
        exclude.push((medium, "the boot medium".to_owned()));
    }
    let inventory = Inventory {
        disks: list_disks()?,
        links: Some(list_links()?),
        exclude,
        kvm: Path::new("/dev/kvm").exists(),
    };
    let resolve = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let plan = plan::plan(&answers, &inventory, &resolve)?;
    print!("{}", plan.describe());
    if args.dry_run {
        return Ok(());
    }
    let squashfs = args
        .squashfs
        .clone()
        .unwrap_or_else(|| args.medium.join("live/filesystem.squashfs"));
    let deb = match &args.deb {
        Some(deb) => deb.clone(),
        None => find_deb(&args.medium.join("basalt"))?,
    };
    let started = Instant::now();
    let mut mounts = Mounts::default();
    let result = install(&plan, &squashfs, &deb, &args.target, &mut mounts);
    mounts.unmount_all();
    result?;
    println!(
        "basalt-install: installed {} in {} s",
        answers.node_name,
        started.elapsed().as_secs()
    );
    let _ = sh(&mut Command::new("sync"));
    match plan.after_install {
        AfterInstall::Reboot => sh(Command::new("systemctl").arg("reboot")),
        AfterInstall::Poweroff => sh(Command::new("systemctl").arg("poweroff")),
    }
}

fn find_deb(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort();
    debs.pop()
        .with_context(|| format!("no Basalt .deb in {}", dir.display()))
}

/// Mounts made during the install, unmounted in reverse order.
#[derive(Debug, Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, args: &[&str], source: &Path, at: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
        sh(Command::new("mount").args(args).arg(source).arg(at))?;
        self.0.push(at.to_owned());
        Ok(())
    }

    fn unmount_all(&mut self) {
        while let Some(at) = self.0.pop() {
            if let Err(err) = sh(Command::new("umount").arg(&at)) {
                eprintln!("basalt-install: {err:#}; lazy unmount");
                let _ = sh(Command::new("umount").arg("-l").arg(&at));
            }
        }
    }
}

fn install(
    plan: &Plan,
    squashfs: &Path,
    deb: &Path,
    target: &Path,
    mounts: &mut Mounts,
) -> anyhow::Result<()> {
    let disk = &plan.install_disk.path;
    step("partitioning", disk);
    sh(Command::new("wipefs").arg("-a").arg(disk))?;
    sh_input(
        Command::new("sfdisk")
            .args(["--wipe", "always", "--wipe-partitions", "always"])
            .arg(disk),
        &plan.sfdisk_script(),
    )?;
    let _ = sh(Command::new("udevadm").arg("settle"));
    for part in &plan.partitions {
        wait_for(&part.device)?;
        match part.filesystem {
            Some(Filesystem::Vfat) => sh(Command::new("mkfs.vfat")
                .args(["-F", "32", "-n", "EFI"])
                .arg(&part.device))?,
            Some(Filesystem::Ext4) => sh(Command::new("mkfs.ext4")
                .args(["-F", "-q", "-L", "basalt-root"])
                .arg(&part.device))?,
            None => {}
        }
    }
    let root = part_for(plan, "/")?;
    let efi = part_for(plan, "/boot/efi")?;
    mounts.mount(&[], &root, target)?;

    step("copying the system", squashfs);
    sh(Command::new("unsquashfs")
        .args(["-f", "-no-progress", "-d"])
        .arg(target)
        .arg(squashfs))?;
    mounts.mount(&[], &efi, &target.join("boot/efi"))?;
    for (fs, dir) in [
        ("devtmpfs", "dev"),
        ("proc", "proc"),
        ("sysfs", "sys"),
        ("tmpfs", "run"),
    ] {
        mounts.mount(&["-t", fs], Path::new(fs), &target.join(dir))?;
    }
    mounts.mount(
        &["-t", "devpts"],
        Path::new("devpts"),
        &target.join("dev/pts"),
    )?;

    let mut fstab = String::from("# Written by basalt-install.\n");
    for part in &plan.partitions {
        let (Some(fs), Some(mount)) = (part.filesystem, part.mount) else {
            continue;
        };
        let uuid = output(
            Command::new("blkid")
                .args(["-s", "UUID", "-o", "value"])
                .arg(&part.device),
        )?;
        let (options, pass) = match fs {
            Filesystem::Ext4 => ("errors=remount-ro", 1),
            Filesystem::Vfat => ("umask=0077", 2),
        };
        fstab += &format!(
            "UUID={} {mount} {} {options} 0 {pass}\n",
            uuid.trim(),
            fs.name()
        );
    }
    write_file(target, Path::new("/etc/fstab"), 0o644, &fstab)?;

    step("installing the Basalt package", deb);
    std::fs::copy(deb, target.join("tmp/basalt.deb")).context("copying the package")?;
    chroot(target, &["dpkg", "-i", "/tmp/basalt.deb"])?;
    let _ = std::fs::remove_file(target.join("tmp/basalt.deb"));

    step("configuring the node", Path::new("/etc"));
    // Live-only pieces go; the installed node gets its own identity.
    for path in [
        "etc/systemd/system/basalt-installer.service",
        "etc/systemd/system/multi-user.target.wants/basalt-installer.service",
        "etc/systemd/network/99-live-dhcp.network",
    ] {
        let _ = std::fs::remove_file(target.join(path));
    }
    write_file(target, Path::new("/etc/machine-id"), 0o444, "")?;
    for entry in std::fs::read_dir(target.join("etc/ssh")).context("listing /etc/ssh")? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ssh_host_"))
        {
            std::fs::remove_file(&path)?;
        }
    }
    chroot(target, &["ssh-keygen", "-A"])?;
    for file in &plan.files {
        write_file(target, &file.path, file.mode, &file.content)?;
    }
    let password = target.join("var/lib/basalt-install/root-password");
    if password.exists() {
        let line = std::fs::read_to_string(&password)?;
        let result = sh_input(
            Command::new("chroot").arg(target).args(["chpasswd", "-e"]),
            &line,
        );
        std::fs::remove_file(&password)?;
        result?;
    }

    step("creating the storage pool", plan.pool.path());
    if let PoolPlan::Device { path, .. } = &plan.pool {
        sh(Command::new("wipefs").arg("-a").arg(path))?;
    }
    let size = format!("{}", plan.pool.size_bytes());
    let pool = plan.pool.path().to_string_lossy().into_owned();
    chroot(
        target,
        &[
            "basaltd", "storage", "pool", "create", "--path", &pool, "--size", &size, "--force",
        ],
    )?;

    step("enabling units", Path::new("/etc/systemd/system"));
    let mut enable = vec!["systemctl", "enable"];
    enable.extend(plan.units.iter().copied());
    chroot(target, &enable)?;

    step("installing GRUB (BIOS and UEFI)", disk);
    write_file(
        target,
        Path::new("/etc/default/grub.d/basalt.cfg"),
        0o644,
        "GRUB_TIMEOUT=2\nGRUB_CMDLINE_LINUX=\"console=tty0 console=ttyS0,115200n8\"\nGRUB_TERMINAL=\"console serial\"\nGRUB_SERIAL_COMMAND=\"serial --unit=0 --speed=115200\"\n",
    )?;
    let disk_arg = disk.to_string_lossy().into_owned();
    chroot(target, &["grub-install", "--target=i386-pc", &disk_arg])?;
    chroot(
        target,
        &[
            "grub-install",
            "--target=x86_64-efi",
            "--efi-directory=/boot/efi",
            "--removable",
            "--no-nvram",
            &disk_arg,
        ],
    )?;
    chroot(target, &["update-grub"])?;
    Ok(())
}

fn part_for(plan: &Plan, mount: &str) -> anyhow::Result<PathBuf> {
    plan.partitions
        .iter()
        .find(|p| p.mount == Some(mount))
        .map(|p| p.device.clone())
        .with_context(|| format!("the plan has no partition for {mount}"))
}

fn step(what: &str, on: &Path) {
    println!("basalt-install: {what}: {}", on.display());
}

fn wait_for(device: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !device.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear after partitioning", device.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Writes `content` at `path` inside `root` with `mode`, creating parents.
fn write_file(root: &Path, path: &Path, mode: u32, content: &str) -> anyhow::Result<()> {
    let full = root.join(path.strip_prefix("/").unwrap_or(path));
    if let Some(parent) = full.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&full, content).with_context(|| format!("writing {}", full.display()))?;
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", full.display()))
}

fn chroot(target: &Path, args: &[&str]) -> anyhow::Result<()> {
    sh(Command::new("chroot")
        .arg(target)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}

/// Runs a command with its output on the console; fails naming it.
fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let line = describe(cmd);
    println!("+ {line}");
    let status = cmd.status().with_context(|| format!("running {line}"))?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}

fn sh_input(cmd: &mut Command, input: &str) -> anyhow::Result<()> {
    let line = describe(cmd);
    println!("+ {line} <<EOF\n{input}EOF");
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {line}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to {line}"))?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let line = describe(cmd);
    let out = cmd.output().with_context(|| format!("running {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{line} printed non-UTF-8"))
}
