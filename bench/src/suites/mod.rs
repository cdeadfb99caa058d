//! The suites, each a function from options to a report.

use crate::report::Report;

mod guest_boot;
mod nbd;
mod replication;

/// Options every suite may use.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Repetitions of a whole operation, when the suite has one.
    pub runs: Option<usize>,
}

/// A named suite.
#[derive(Debug)]
pub struct Suite {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Options) -> anyhow::Result<Report>,
}

pub const ALL: &[Suite] = &[
    Suite {
        name: "guest-boot",
        about: "libvirt define to the test guest answering, against plain QEMU booting the same guest",
        run: guest_boot::run,
    },
    Suite {
        name: "nbd",
        about: "fio through NBD: Basalt against qemu-nbd, nbdkit file, nbdkit null and local O_DIRECT",
        run: nbd::run,
    },
    Suite {
        name: "replication",
        about: "4 KiB random writes through NBD with 2 replicas (protocol C, loopback) against 1, and the bytes and speed of a dirty-chunk resync",
        run: replication::run,
    },
];
