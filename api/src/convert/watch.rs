//! [`WatchEvent`] ⇄ protobuf, for objects (admin), and placements and
//! volumes (agent).

use super::{enum_value, required};
use crate::pb;
use crate::{ApiError, Object, Placement, Volume, WatchEvent};

/// Splits an event into its wire parts: type, object, resource version.
fn to_parts<T>(event: WatchEvent<T>) -> (pb::EventType, Option<T>, u64) {
    match event {
        WatchEvent::Added {
            object,
            resource_version,
        } => (pb::EventType::Added, Some(object), resource_version),
        WatchEvent::Modified {
            object,
            resource_version,
        } => (pb::EventType::Modified, Some(object), resource_version),
        WatchEvent::Deleted {
            object,
            resource_version,
        } => (pb::EventType::Deleted, Some(object), resource_version),
        WatchEvent::Bookmark { resource_version } => {
            (pb::EventType::Bookmark, None, resource_version)
        }
    }
}

/// Builds an event from its wire parts; `object_field` names the object's
/// field for the error when a change comes without one.
fn from_parts<P, T>(
    event_type: i32,
    object: Option<P>,
    resource_version: u64,
    object_field: &str,
) -> Result<WatchEvent<T>, ApiError>
where
    T: TryFrom<P, Error = ApiError>,
{
    let event_type: pb::EventType = enum_value(event_type, "type")?;
    let object = || -> Result<T, ApiError> { required(object, object_field)?.try_into() };
    Ok(match event_type {
        pb::EventType::Unspecified => return Err(ApiError::missing("type")),
        pb::EventType::Added => WatchEvent::Added {
            object: object()?,
            resource_version,
        },
        pb::EventType::Modified => WatchEvent::Modified {
            object: object()?,
            resource_version,
        },
        pb::EventType::Deleted => WatchEvent::Deleted {
            object: object()?,
            resource_version,
        },
        pb::EventType::Bookmark => WatchEvent::Bookmark { resource_version },
    })
}

impl From<WatchEvent<Object>> for pb::WatchEvent {
    fn from(event: WatchEvent<Object>) -> Self {
        let (event_type, object, resource_version) = to_parts(event);
        Self {
            r#type: event_type.into(),
            object: object.map(Into::into),
            resource_version,
        }
    }
}

impl TryFrom<pb::WatchEvent> for WatchEvent<Object> {
    type Error = ApiError;

    fn try_from(event: pb::WatchEvent) -> Result<Self, ApiError> {
        from_parts(event.r#type, event.object, event.resource_version, "object")
    }
}

impl From<WatchEvent<Placement>> for pb::PlacementEvent {
    fn from(event: WatchEvent<Placement>) -> Self {
        let (event_type, placement, resource_version) = to_parts(event);
        Self {
            r#type: event_type.into(),
            placement: placement.map(Into::into),
            resource_version,
        }
    }
}

impl From<WatchEvent<Volume>> for pb::VolumeEvent {
    fn from(event: WatchEvent<Volume>) -> Self {
        let (event_type, volume, resource_version) = to_parts(event);
        Self {
            r#type: event_type.into(),
            volume: volume.map(Into::into),
            resource_version,
        }
    }
}

impl TryFrom<pb::VolumeEvent> for WatchEvent<Volume> {
    type Error = ApiError;

    fn try_from(event: pb::VolumeEvent) -> Result<Self, ApiError> {
        from_parts(event.r#type, event.volume, event.resource_version, "volume")
    }
}

impl TryFrom<pb::PlacementEvent> for WatchEvent<Placement> {
    type Error = ApiError;

    fn try_from(event: pb::PlacementEvent) -> Result<Self, ApiError> {
        from_parts(
            event.r#type,
            event.placement,
            event.resource_version,
            "placement",
        )
    }
}
