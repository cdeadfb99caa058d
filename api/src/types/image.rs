//! [`Image`]: a disk image that VM disks are cloned from. Each node that
//! runs a VM needing it imports it once into its pool and reports its
//! progress in [`ImageStatus::nodes`].

use serde::{Deserialize, Serialize};

use super::validate;
use super::{ObjectMeta, validate::MAX_NAME_LEN};
use crate::ApiError;

/// A disk image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Image {
    /// Name, labels and versions.
    pub meta: ObjectMeta,
    /// What the operator declares.
    pub spec: ImageSpec,
    /// What the nodes observed.
    pub status: ImageStatus,
}

/// The format of an image's source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// A raw disk.
    #[default]
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl ImageFormat {
    /// The name `qemu-img` knows it by.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// What the operator declares about an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageSpec {
    /// An absolute path present on every node that imports it, or an
    /// `http://` / `https://` URL.
    pub source: String,
    /// The source's format.
    pub format: ImageFormat,
}

/// How far one node got with an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImagePhase {
    /// Being copied into the node's pool.
    #[default]
    Importing,
    /// In the pool: disks clone it.
    Ready,
    /// The import failed (see the message); retried after a while.
    Failed,
}

/// An image on one node's pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageNodeStatus {
    /// The node.
    pub node: String,
    /// How far it got.
    pub phase: ImagePhase,
    /// Bytes copied so far.
    pub bytes_done: u64,
    /// Bytes to copy (the image's virtual size).
    pub bytes_total: u64,
    /// Why it failed, when it did.
    pub message: String,
}

/// What the nodes observed about an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageStatus {
    /// The image's virtual size, once a node has read it.
    pub size_bytes: u64,
    /// One entry per node that imported it or is importing it.
    pub nodes: Vec<ImageNodeStatus>,
}

impl ImageStatus {
    /// The entry of `node`, created when missing.
    pub fn node_mut(&mut self, node: &str) -> &mut ImageNodeStatus {
        if let Some(at) = self.nodes.iter().position(|n| n.node == node) {
            return &mut self.nodes[at];
        }
        self.nodes.push(ImageNodeStatus {
            node: node.to_owned(),
            ..ImageNodeStatus::default()
        });
        self.nodes.sort_by(|a, b| a.node.cmp(&b.node));
        let at = self
            .nodes
            .iter()
            .position(|n| n.node == node)
            .unwrap_or_default();
        &mut self.nodes[at]
    }
}

impl Image {
    /// Checks every field; errors name the field's path, e.g. `spec.source`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        let source = &self.spec.source;
        let is_url = source.starts_with("http://") || source.starts_with("https://");
        if source.is_empty() {
            return Err(ApiError::missing("spec.source"));
        }
        if !is_url && !source.starts_with('/') {
            return Err(ApiError::invalid(
                "spec.source",
                format!("{source:?} is neither an absolute path nor an http(s) URL"),
            ));
        }
        if source.len() > 4096 || source.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "spec.source",
                "at most 4096 characters, no control characters",
            ));
        }
        for (i, node) in self.status.nodes.iter().enumerate() {
            validate::name(&format!("status.nodes[{i}].node"), &node.node)?;
            if node.message.len() > 4 * MAX_NAME_LEN * 16 {
                return Err(ApiError::invalid(
                    format!("status.nodes[{i}].message"),
                    "too long",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image {
            meta: ObjectMeta::named("debian"),
            spec: ImageSpec {
                source: "/var/lib/images/debian.qcow2".into(),
                format: ImageFormat::Qcow2,
            },
            ..Image::default()
        }
    }

    #[test]
    fn images_validate_by_field() {
        image().validate().unwrap();
        let mut url = image();
        url.spec.source = "https://example.invalid/d.img".into();
        url.validate().unwrap();
        let field = |i: Image| match i.validate() {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut bad = image();
        bad.spec.source = "relative.img".into();
        assert_eq!(field(bad), "spec.source");
        let mut bad = image();
        bad.spec.source = String::new();
        assert_eq!(field(bad), "spec.source");
        let mut bad = image();
        bad.status.node_mut("Bad Node");
        assert_eq!(field(bad), "status.nodes[0].node");
    }

    #[test]
    fn node_entries_are_kept_sorted_and_unique() {
        let mut status = ImageStatus::default();
        status.node_mut("n2").bytes_done = 2;
        status.node_mut("n1").bytes_done = 1;
        status.node_mut("n2").bytes_total = 9;
        let nodes: Vec<_> = status
            .nodes
            .iter()
            .map(|n| (n.node.as_str(), n.bytes_done, n.bytes_total))
            .collect();
        assert_eq!(nodes, [("n1", 1, 0), ("n2", 2, 9)]);
    }
}
