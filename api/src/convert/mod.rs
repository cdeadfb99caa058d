//! Conversions between the domain types and the generated protobuf types,
//! one file per type. Domain → wire never fails; wire → domain checks the
//! message's shape (required fields, enum values, addresses) and then the
//! domain type's `validate`, so every error names a field.

mod agent;
mod error;
mod image;
mod member;
mod meta;
mod migration;
mod network;
mod node;
mod object;
mod placement;
mod policy;
mod storage;
mod token;
mod vm;
mod volume;
mod watch;

#[cfg(test)]
mod tests;

pub(crate) use object::{kind_from_pb, kind_to_pb, required_kind};

use crate::ApiError;

/// Unwraps a message field that the contract requires.
pub(crate) fn required<T>(value: Option<T>, field: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::missing(field))
}

/// Decodes an enum field, refusing values this version does not know.
pub(crate) fn enum_value<E: TryFrom<i32>>(value: i32, field: &str) -> Result<E, ApiError> {
    E::try_from(value).map_err(|_| ApiError::invalid(field, format!("unknown value {value}")))
}

/// Parses an optional IP address field.
pub(crate) fn parse_ip(
    value: Option<String>,
    field: &str,
) -> Result<Option<std::net::IpAddr>, ApiError> {
    value
        .map(|ip| {
            ip.parse()
                .map_err(|_| ApiError::invalid(field, format!("{ip:?} is not an IP address")))
        })
        .transpose()
}
