//! [`Image`] ⇄ protobuf.

use super::{enum_value, required};
use crate::pb;
use crate::{ApiError, Image, ImageFormat, ImageNodeStatus, ImagePhase, ImageSpec, ImageStatus};

impl From<Image> for pb::Image {
    fn from(image: Image) -> Self {
        let format = match image.spec.format {
            ImageFormat::Raw => pb::ImageFormat::Raw,
            ImageFormat::Qcow2 => pb::ImageFormat::Qcow2,
        };
        Self {
            meta: Some(image.meta.into()),
            spec: Some(pb::ImageSpec {
                source: image.spec.source,
                format: format.into(),
            }),
            status: Some(pb::ImageStatus {
                size_bytes: image.status.size_bytes,
                nodes: image
                    .status
                    .nodes
                    .into_iter()
                    .map(|n| pb::ImageNodeStatus {
                        node: n.node,
                        phase: match n.phase {
                            ImagePhase::Importing => pb::ImagePhase::Importing,
                            ImagePhase::Ready => pb::ImagePhase::Ready,
                            ImagePhase::Failed => pb::ImagePhase::Failed,
                        }
                        .into(),
                        bytes_done: n.bytes_done,
                        bytes_total: n.bytes_total,
                        message: n.message,
                    })
                    .collect(),
            }),
        }
    }
}

impl TryFrom<pb::Image> for Image {
    type Error = ApiError;

    fn try_from(image: pb::Image) -> Result<Self, ApiError> {
        let spec = required(image.spec, "image.spec")?;
        let status = image.status.unwrap_or_default();
        let format = match enum_value::<pb::ImageFormat>(spec.format, "spec.format")? {
            pb::ImageFormat::Unspecified | pb::ImageFormat::Raw => ImageFormat::Raw,
            pb::ImageFormat::Qcow2 => ImageFormat::Qcow2,
        };
        let nodes = status
            .nodes
            .into_iter()
            .enumerate()
            .map(|(i, n)| {
                let field = format!("status.nodes[{i}].phase");
                let phase = match enum_value::<pb::ImagePhase>(n.phase, &field)? {
                    pb::ImagePhase::Unspecified | pb::ImagePhase::Importing => {
                        ImagePhase::Importing
                    }
                    pb::ImagePhase::Ready => ImagePhase::Ready,
                    pb::ImagePhase::Failed => ImagePhase::Failed,
                };
                Ok(ImageNodeStatus {
                    node: n.node,
                    phase,
                    bytes_done: n.bytes_done,
                    bytes_total: n.bytes_total,
                    message: n.message,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        let image = Image {
            meta: required(image.meta, "image.meta")?.into(),
            spec: ImageSpec {
                source: spec.source,
                format,
            },
            status: ImageStatus {
                size_bytes: status.size_bytes,
                nodes,
            },
        };
        image.validate()?;
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ObjectMeta;

    #[test]
    fn images_round_trip_and_bad_enums_name_their_field() {
        let mut image = Image {
            meta: ObjectMeta::named("tiny"),
            spec: ImageSpec {
                source: "/images/tiny.qcow2".into(),
                format: ImageFormat::Qcow2,
            },
            ..Image::default()
        };
        let entry = image.status.node_mut("n1");
        entry.phase = ImagePhase::Ready;
        entry.bytes_done = 7;
        let back = Image::try_from(pb::Image::from(image.clone())).unwrap();
        assert_eq!(back, image);
        let mut wire = pb::Image::from(image);
        wire.status.as_mut().unwrap().nodes[0].phase = 42;
        assert!(matches!(
            Image::try_from(wire),
            Err(ApiError::InvalidArgument { field, .. }) if field == "status.nodes[0].phase"
        ));
    }
}
