//! A guest disk served over NBD inside a node: `qemu-nbd` on a raw file,
//! until Basalt's own NBD server exists.
//!
//! The server listens on `127.0.0.1` inside the node's namespace, so only
//! that node's QEMUs reach it. It accepts several clients at once
//! (`--shared`), which a live migration needs (the target QEMU connects
//! while the source still holds the export), and keeps serving after a
//! client leaves (`--persistent`), so a guest can be stopped and started.

use std::fs::OpenOptions;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::netns::Node;
use crate::prefix::Prefix;
use crate::process::{Process, ProcessError, ProcessSpec};

/// The IANA port of NBD.
pub const NBD_PORT: u16 = 10809;

/// How long `qemu-nbd` may take to listen.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// The NBD server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The disk file could not be created or sized.
    #[error("could not create disk file {path}")]
    Disk {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Starting `qemu-nbd` or waiting for it failed.
    #[error("qemu-nbd serving {path} in {netns}")]
    Process {
        /// The disk file.
        path: PathBuf,
        /// The node's namespace.
        netns: String,
        /// What failed.
        #[source]
        source: Box<ProcessError>,
    },
}

/// Creates (or resizes) a sparse raw disk file of `size` bytes.
pub fn create_raw_disk(path: &Path, size: u64) -> Result<(), NbdError> {
    let disk_err = |source| NbdError::Disk {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(disk_err)?;
    file.set_len(size).map_err(disk_err)
}

/// A running `qemu-nbd` exporting one raw file inside a node.
#[derive(Debug)]
pub struct NbdServer {
    process: Process,
    file: PathBuf,
    export: String,
    port: u16,
}

impl NbdServer {
    /// Serves `file` as export `export` on `127.0.0.1:`[`NBD_PORT`] inside
    /// `node`; returns once the port accepts connections.
    pub fn start(
        prefix: &Prefix,
        node: &Node,
        file: &Path,
        export: &str,
    ) -> Result<NbdServer, NbdError> {
        Self::start_on_port(prefix, node, file, export, NBD_PORT)
    }

    /// [`NbdServer::start`] on another port (one server per port and node).
    pub fn start_on_port(
        prefix: &Prefix,
        node: &Node,
        file: &Path,
        export: &str,
        port: u16,
    ) -> Result<NbdServer, NbdError> {
        let process_err = |source| NbdError::Process {
            path: file.to_owned(),
            netns: node.netns().to_owned(),
            source: Box::new(source),
        };
        let spec = ProcessSpec::new(format!("qemu-nbd-{}-{port}", node.name()), "qemu-nbd")
            .args(["--shared=4", "--persistent", "--cache=none", "--format=raw"])
            .args(["-x", export, "-b", "127.0.0.1", "-p", &port.to_string()])
            .arg(file)
            .netns(node);
        let mut process = Process::start(prefix, spec).map_err(process_err)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        process
            .wait_for_tcp(addr, Some(node), READY_DEADLINE)
            .map_err(process_err)?;
        tracing::debug!(netns = node.netns(), port, export, file = %file.display(), "qemu-nbd serving");
        Ok(NbdServer {
            process,
            file: file.to_owned(),
            export: export.to_owned(),
            port,
        })
    }

    /// The address QEMU in the node connects to (`127.0.0.1`).
    pub fn host(&self) -> Ipv4Addr {
        Ipv4Addr::LOCALHOST
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The export name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The raw file served.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`, as QEMU's `-drive file=` takes it.
    pub fn uri(&self) -> String {
        format!("nbd://{}:{}/{}", self.host(), self.port, self.export)
    }

    /// The server's process (pid, log).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Leaves the server running after this handle is gone (the lab's
    /// disks outlive `basaltd lab up`); its pid file lets a sweep or a
    /// tear-down of the prefix stop it. Returns its pid.
    pub fn detach(self) -> u32 {
        self.process.detach()
    }
}
