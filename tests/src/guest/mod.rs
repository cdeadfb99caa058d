//! The test guest: a real VM, small and quick to boot under TCG, that
//! proves a domain runs with its disk and network.
//!
//! It is the host's Debian kernel with a busybox initramfs
//! ([`initramfs::GuestImage`]) whose `/init` (`init.sh`) loads the virtio
//! modules, counts its boots on `/dev/vda`, takes its address from the
//! kernel command line (`basalt.ip=`/`basalt.gw=`, or `basalt.dhcp=1`) and
//! serves five TCP ports ([`client::GuestClient`] speaks to them):
//!
//! | port | service |
//! |---|---|
//! | [`ECHO_PORT`] | echo |
//! | [`READ_PORT`] | prints `boots=N data=TEXT` from the disk |
//! | [`STREAM_PORT`] | a numbered line every ~100 ms, forever |
//! | [`WRITE_PORT`] | stores one line as the disk's data record |
//! | [`DIRTY_PORT`] | rewrites 8 MiB of its memory in a loop while connected |
//!
//! When it serves, it prints [`READY_MARKER`] on the serial console.
//!
//! The guest's disk comes over NBD ([`nbd::NbdServer`], `qemu-nbd` until
//! Basalt's own server exists) and its NIC is a tap routed by the node
//! ([`tap::wire_tap`]); it runs under libvirt ([`libvirt::LibvirtDomain`],
//! with the domain XML that `basalt-agent` writes) or plain QEMU
//! ([`qemu::QemuGuest`], the benchmarks' peer).

pub mod client;
pub mod initramfs;
pub mod libvirt;
pub mod nbd;
pub mod qemu;
pub mod tap;

pub use client::{DiskRecord, GuestClient, check_consecutive};
pub use initramfs::GuestImage;
pub use libvirt::LibvirtDomain;
pub use nbd::NbdServer;
pub use qemu::{QemuGuest, QemuGuestSpec};
pub use tap::wire_tap;

/// Port of the echo service.
pub const ECHO_PORT: u16 = 7;
/// Port of the disk read-back service.
pub const READ_PORT: u16 = 8;
/// Port of the numbered stream.
pub const STREAM_PORT: u16 = 9;
/// Port of the disk write service.
pub const WRITE_PORT: u16 = 10;
/// Port of the memory dirtier: while a client stays connected the guest
/// rewrites 8 MiB of non-zero RAM in a loop (a line per round), so a live
/// migration's pre-copy has pages to send again and again.
pub const DIRTY_PORT: u16 = 11;

/// What the guest prints on its console once it serves.
pub const READY_MARKER: &str = "basalt-guest: ready";

/// The gateway address the guest's host side (the tap) takes: link-local,
/// the same on every node, so that a migrated guest's ARP entry stays valid.
pub const GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);

/// The virtio modules `/init` loads, in this order (dependencies first).
/// Those a kernel lacks are skipped.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
];

/// The guest's `/init`.
pub(crate) const INIT_SCRIPT: &str = include_str!("init.sh");

/// Helper scripts installed in the guest's `/bin`, by name.
pub(crate) const BIN_SCRIPTS: &[(&str, &str)] = &[
    ("basalt-read", include_str!("bin/basalt-read")),
    ("basalt-write", include_str!("bin/basalt-write")),
    ("basalt-stream", include_str!("bin/basalt-stream")),
    ("basalt-dirty", include_str!("bin/basalt-dirty")),
    ("basalt-dhcp", include_str!("bin/basalt-dhcp")),
];

/// The kernel command line for a guest with a static address behind
/// [`GATEWAY`], console on the first serial port.
pub fn static_ip_cmdline(ip: std::net::Ipv4Addr) -> String {
    format!("console=ttyS0 basalt.ip={ip} basalt.gw={GATEWAY}")
}

/// The last `lines` lines of a guest's serial log, for failure messages.
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(no serial log at {}: {e})", path.display()),
    }
}
