//! [`ApiError`] ⇄ [`tonic::Status`]: the one place errors cross the wire.
//!
//! The status carries the gRPC code, the error's `Display` as its message,
//! and the error's fields as an `ErrorDetail` packed like a
//! `google.rpc.Status` in `grpc-status-details-bin`, so the client rebuilds
//! the very same [`ApiError`]. A status without that detail (from a proxy,
//! from tonic itself, or from a transport failure) maps by its code.

use prost::Message;
use prost::bytes::Bytes;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use super::object::required_kind;
use crate::pb;
use crate::pb::error_detail::Error as Detail;
use crate::{ApiError, Kind};

/// Metadata key naming the Raft leader's address on a `NotLeader` error.
pub(crate) const LEADER_METADATA: &str = "basalt-leader";

/// Type URL of the packed `ErrorDetail`.
const DETAIL_TYPE_URL: &str = "type.googleapis.com/basalt.v1.ErrorDetail";

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let code = code(&err);
        let message = err.to_string();
        let mut metadata = MetadataMap::new();
        if let ApiError::NotLeader {
            leader: Some(leader),
        } = &err
            && let Ok(value) = MetadataValue::try_from(leader.as_str())
        {
            metadata.insert(LEADER_METADATA, value);
        }
        let detail = pb::ErrorDetail {
            error: Some(detail(err)),
        };
        let details = pb::RpcStatus {
            code: code.into(),
            message: message.clone(),
            details: vec![pb::AnyDetail {
                type_url: DETAIL_TYPE_URL.to_owned(),
                value: detail.encode_to_vec(),
            }],
        };
        Status::with_details_and_metadata(
            code,
            message,
            Bytes::from(details.encode_to_vec()),
            metadata,
        )
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        if let Some(err) = decode_detail(status.details()) {
            return err;
        }
        let message = status.message().to_owned();
        match status.code() {
            Code::Unavailable => match status
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|leader| leader.to_str().ok())
            {
                Some(leader) => ApiError::NotLeader {
                    leader: Some(leader.to_owned()),
                },
                None => ApiError::Unavailable {
                    reason: with_source(&status),
                },
            },
            Code::Cancelled | Code::DeadlineExceeded | Code::ResourceExhausted => {
                ApiError::Unavailable {
                    reason: format!("{}: {}", status.code().description(), with_source(&status)),
                }
            }
            Code::InvalidArgument => ApiError::InvalidArgument {
                field: "request".to_owned(),
                reason: message,
            },
            Code::FailedPrecondition => ApiError::FailedPrecondition { reason: message },
            Code::Unauthenticated | Code::PermissionDenied => {
                ApiError::Unauthenticated { reason: message }
            }
            // The rest either cannot be rebuilt without their fields or are
            // not codes this contract uses.
            code => ApiError::Internal {
                reason: format!("{}: {}", code.description(), with_source(&status)),
            },
        }
    }
}

fn code(err: &ApiError) -> Code {
    match err {
        ApiError::InvalidArgument { .. } => Code::InvalidArgument,
        ApiError::NotFound { .. } => Code::NotFound,
        ApiError::AlreadyExists { .. } => Code::AlreadyExists,
        ApiError::Aborted { .. } => Code::Aborted,
        ApiError::FailedPrecondition { .. } => Code::FailedPrecondition,
        ApiError::OutOfRange { .. } => Code::OutOfRange,
        ApiError::NotLeader { .. } | ApiError::Unavailable { .. } => Code::Unavailable,
        ApiError::Unauthenticated { .. } => Code::Unauthenticated,
        ApiError::Internal { .. } => Code::Internal,
    }
}

fn detail(err: ApiError) -> Detail {
    let object = |kind: Kind, name: String| pb::ObjectRef {
        kind: pb::Kind::from(kind).into(),
        name,
    };
    match err {
        ApiError::InvalidArgument { field, reason } => {
            Detail::InvalidArgument(pb::InvalidArgument { field, reason })
        }
        ApiError::NotFound { kind, name } => Detail::NotFound(object(kind, name)),
        ApiError::AlreadyExists { kind, name } => Detail::AlreadyExists(object(kind, name)),
        ApiError::Aborted { expected, actual } => {
            Detail::Aborted(pb::VersionMismatch { expected, actual })
        }
        ApiError::FailedPrecondition { reason } => Detail::FailedPrecondition(reason),
        ApiError::OutOfRange { requested, oldest } => {
            Detail::OutOfRange(pb::Compacted { requested, oldest })
        }
        ApiError::NotLeader { leader } => Detail::NotLeader(pb::NotLeader { leader }),
        ApiError::Unavailable { reason } => Detail::Unavailable(reason),
        ApiError::Unauthenticated { reason } => Detail::Unauthenticated(reason),
        ApiError::Internal { reason } => Detail::Internal(reason),
    }
}

/// Rebuilds the error from a packed `ErrorDetail`, if there is a valid one.
fn decode_detail(details: &[u8]) -> Option<ApiError> {
    if details.is_empty() {
        return None;
    }
    let status = pb::RpcStatus::decode(details).ok()?;
    let any = status
        .details
        .into_iter()
        .find(|any| any.type_url == DETAIL_TYPE_URL)?;
    let object = |object: pb::ObjectRef| -> Option<(Kind, String)> {
        Some((required_kind(object.kind, "kind").ok()?, object.name))
    };
    Some(
        match pb::ErrorDetail::decode(any.value.as_slice()).ok()?.error? {
            Detail::InvalidArgument(pb::InvalidArgument { field, reason }) => {
                ApiError::InvalidArgument { field, reason }
            }
            Detail::NotFound(o) => {
                let (kind, name) = object(o)?;
                ApiError::NotFound { kind, name }
            }
            Detail::AlreadyExists(o) => {
                let (kind, name) = object(o)?;
                ApiError::AlreadyExists { kind, name }
            }
            Detail::Aborted(pb::VersionMismatch { expected, actual }) => {
                ApiError::Aborted { expected, actual }
            }
            Detail::FailedPrecondition(reason) => ApiError::FailedPrecondition { reason },
            Detail::OutOfRange(pb::Compacted { requested, oldest }) => {
                ApiError::OutOfRange { requested, oldest }
            }
            Detail::NotLeader(pb::NotLeader { leader }) => ApiError::NotLeader { leader },
            Detail::Unavailable(reason) => ApiError::Unavailable { reason },
            Detail::Unauthenticated(reason) => ApiError::Unauthenticated { reason },
            Detail::Internal(reason) => ApiError::Internal { reason },
        },
    )
}

/// The status message followed by its source chain: tonic puts the
/// transport's reason (e.g. "connection refused") in the sources.
fn with_source(status: &Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let cause = err.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
        source = err.source();
    }
    text
}
