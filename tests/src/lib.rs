//! Basalt's test harness: everything a test (or `basaltd lab`) needs to
//! stand up several "nodes" on one machine.
//!
//! - [`prefix`]: the per-test name prefix every host object is named after,
//!   and its state directory (pid files, logs);
//! - [`netns`]: a bridge and one network namespace per node ([`Fabric`],
//!   [`Node`]);
//! - [`process`]: supervised daemons with logs and pid files ([`Process`]);
//! - [`libvirtd`]: a private libvirtd per node ([`Libvirtd`]);
//! - [`guest`]: the test guest (a small VM that boots in seconds);
//! - [`sweep`]: removing what killed tests left behind, and `lab down`;
//! - [`linearizability`]: a checker for histories of a register;
//! - [`cmd`]: the errors of the host tools the fixtures run;
//! - [`wait`]: polling until a condition holds, for async tests;
//! - [`free_port`]: a loopback port for a daemon under test.
//!
//! Invariants: every object a fixture makes carries its prefix; dropping a
//! fixture removes what it made unless it was detached (the lab); a sweep
//! removes only objects of prefixes whose owner is dead, and kills only
//! processes whose pid files it finds under the prefix and that it can show
//! are the prefix's. Everything here needs root.

pub mod cmd;
pub mod guest;
pub mod libvirtd;
pub mod linearizability;
pub mod nbd_client;
pub mod netns;
pub mod prefix;
pub mod process;
pub mod sweep;
pub mod wait;

pub use libvirtd::Libvirtd;
pub use netns::{Fabric, Node};
pub use prefix::Prefix;
pub use process::{Process, ProcessSpec};

/// A TCP port that is free on loopback now (the kernel's pick from its
/// ephemeral range), for a daemon under test to listen on. Nothing holds
/// it: another process could take it before the daemon binds, which the
/// ephemeral range makes rare enough for tests.
///
/// # Panics
/// When loopback has no free port at all.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
