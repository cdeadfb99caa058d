//! [`Object`], [`Kind`] and [`ObjectList`] ⇄ protobuf.

use super::{enum_value, required};
use crate::pb;
use crate::pb::object::Kind as PbObject;
use crate::{ApiError, Kind, Object, ObjectList};

impl From<Object> for pb::Object {
    fn from(object: Object) -> Self {
        let kind = match object {
            Object::Node(o) => PbObject::Node(o.into()),
            Object::Vm(o) => PbObject::Vm(o.into()),
            Object::Placement(o) => PbObject::Placement(o.into()),
            Object::Token(o) => PbObject::Token(o.into()),
            Object::Member(o) => PbObject::Member(o.into()),
            Object::Network(o) => PbObject::Network(o.into()),
            Object::Endpoint(o) => PbObject::Endpoint(o.into()),
            Object::Policy(o) => PbObject::Policy(o.into()),
            Object::Migration(o) => PbObject::Migration(o.into()),
            Object::Image(o) => PbObject::Image(o.into()),
            Object::Volume(o) => PbObject::Volume(o.into()),
        };
        Self { kind: Some(kind) }
    }
}

impl TryFrom<pb::Object> for Object {
    type Error = ApiError;

    fn try_from(object: pb::Object) -> Result<Self, ApiError> {
        Ok(match required(object.kind, "object.kind")? {
            PbObject::Node(o) => Object::Node(o.try_into()?),
            PbObject::Vm(o) => Object::Vm(o.try_into()?),
            PbObject::Placement(o) => Object::Placement(o.try_into()?),
            PbObject::Token(o) => Object::Token(o.try_into()?),
            PbObject::Member(o) => Object::Member(o.try_into()?),
            PbObject::Network(o) => Object::Network(o.try_into()?),
            PbObject::Endpoint(o) => Object::Endpoint(o.try_into()?),
            PbObject::Policy(o) => Object::Policy(o.try_into()?),
            PbObject::Migration(o) => Object::Migration(o.try_into()?),
            PbObject::Image(o) => Object::Image(o.try_into()?),
            PbObject::Volume(o) => Object::Volume(o.try_into()?),
        })
    }
}

impl From<Kind> for pb::Kind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Node => pb::Kind::Node,
            Kind::Vm => pb::Kind::Vm,
            Kind::Placement => pb::Kind::Placement,
            Kind::Token => pb::Kind::Token,
            Kind::Member => pb::Kind::Member,
            Kind::Network => pb::Kind::Network,
            Kind::Endpoint => pb::Kind::Endpoint,
            Kind::Policy => pb::Kind::Policy,
            Kind::Migration => pb::Kind::Migration,
            Kind::Image => pb::Kind::Image,
            Kind::Volume => pb::Kind::Volume,
        }
    }
}

/// Encodes an optional kind; `None` (every kind) is `KIND_UNSPECIFIED`.
pub(crate) fn kind_to_pb(kind: Option<Kind>) -> i32 {
    kind.map_or(pb::Kind::Unspecified, pb::Kind::from).into()
}

/// Decodes an optional kind; `KIND_UNSPECIFIED` is `None` (every kind).
pub(crate) fn kind_from_pb(kind: i32, field: &str) -> Result<Option<Kind>, ApiError> {
    Ok(match enum_value(kind, field)? {
        pb::Kind::Unspecified => None,
        pb::Kind::Node => Some(Kind::Node),
        pb::Kind::Vm => Some(Kind::Vm),
        pb::Kind::Placement => Some(Kind::Placement),
        pb::Kind::Token => Some(Kind::Token),
        pb::Kind::Member => Some(Kind::Member),
        pb::Kind::Network => Some(Kind::Network),
        pb::Kind::Endpoint => Some(Kind::Endpoint),
        pb::Kind::Policy => Some(Kind::Policy),
        pb::Kind::Migration => Some(Kind::Migration),
        pb::Kind::Image => Some(Kind::Image),
        pb::Kind::Volume => Some(Kind::Volume),
    })
}

/// Decodes a kind that must be set.
pub(crate) fn required_kind(kind: i32, field: &str) -> Result<Kind, ApiError> {
    kind_from_pb(kind, field)?.ok_or_else(|| ApiError::missing(field))
}

impl From<ObjectList> for pb::ListResponse {
    fn from(list: ObjectList) -> Self {
        Self {
            objects: list.objects.into_iter().map(Into::into).collect(),
            resource_version: list.resource_version,
        }
    }
}

impl TryFrom<pb::ListResponse> for ObjectList {
    type Error = ApiError;

    fn try_from(list: pb::ListResponse) -> Result<Self, ApiError> {
        Ok(ObjectList {
            objects: list
                .objects
                .into_iter()
                .map(Object::try_from)
                .collect::<Result<_, _>>()?,
            resource_version: list.resource_version,
        })
    }
}
