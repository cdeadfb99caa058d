//! A domain on a private [`Libvirtd`], defined from XML (which
//! `basalt-agent` writes) and undefined again when the handle drops.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::libvirtd::{Libvirtd, LibvirtdError};

/// A domain could not be defined, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The XML file for `virsh define` could not be written.
    #[error("could not write domain XML to {path}")]
    WriteXml {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A `virsh` command failed.
    #[error("virsh {action} of domain {domain}")]
    Virsh {
        /// `define`, `start`, `destroy`, ...
        action: &'static str,
        /// The domain.
        domain: String,
        /// What failed.
        #[source]
        source: Box<LibvirtdError>,
    },
}

/// A defined domain. Dropping it destroys (if running) and undefines it.
#[derive(Debug)]
pub struct LibvirtDomain<'d> {
    libvirtd: &'d Libvirtd,
    name: String,
}

impl<'d> LibvirtDomain<'d> {
    /// Writes `xml` to `<xml_dir>/<name>.xml` and runs `virsh define` on it.
    pub fn define(
        libvirtd: &'d Libvirtd,
        name: &str,
        xml: &str,
        xml_dir: &Path,
    ) -> Result<LibvirtDomain<'d>, DomainError> {
        let path = xml_dir.join(format!("{name}.xml"));
        fs::write(&path, xml).map_err(|source| DomainError::WriteXml {
            path: path.clone(),
            source,
        })?;
        let domain = LibvirtDomain {
            libvirtd,
            name: name.to_owned(),
        };
        // A domain of that name left by an earlier run of this prefix is
        // replaced: `define` updates it in place.
        domain.virsh("define", &["define", &path.to_string_lossy()])?;
        Ok(domain)
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `virsh start`: returns once QEMU runs (the guest then boots).
    pub fn start(&self) -> Result<(), DomainError> {
        self.virsh("start", &["start", &self.name])
    }

    /// `virsh destroy`: pulls the plug.
    pub fn destroy(&self) -> Result<(), DomainError> {
        self.virsh("destroy", &["destroy", &self.name])
    }

    /// `virsh domstate`, e.g. `running` or `shut off`.
    pub fn state(&self) -> Result<String, DomainError> {
        self.virsh_out("domstate", &["domstate", &self.name])
            .map(|s| s.trim().to_owned())
    }

    fn virsh(&self, action: &'static str, args: &[&str]) -> Result<(), DomainError> {
        self.virsh_out(action, args).map(drop)
    }

    fn virsh_out(&self, action: &'static str, args: &[&str]) -> Result<String, DomainError> {
        self.libvirtd
            .virsh(args)
            .map_err(|source| DomainError::Virsh {
                action,
                domain: self.name.clone(),
                source: Box::new(source),
            })
    }
}

impl Drop for LibvirtDomain<'_> {
    fn drop(&mut self) {
        if self.state().is_ok_and(|s| s != "shut off") {
            let _ = self.destroy();
        }
        if let Err(e) = self.virsh("undefine", &["undefine", &self.name]) {
            tracing::warn!(domain = %self.name, error = %e, "could not undefine domain");
        }
    }
}
