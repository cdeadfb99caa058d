//! Every `ApiError` survives the trip through `tonic::Status` unchanged,
//! with the gRPC code the contract promises; statuses that did not come
//! from Basalt map by their code.

use basalt_api::{ApiError, Kind};
use tonic::{Code, Status};

fn every_error() -> Vec<(ApiError, Code)> {
    vec![
        (
            ApiError::InvalidArgument {
                field: "spec.memory_mib".into(),
                reason: "must be at least 16".into(),
            },
            Code::InvalidArgument,
        ),
        (
            ApiError::NotFound {
                kind: Kind::Vm,
                name: "web-1".into(),
            },
            Code::NotFound,
        ),
        (
            ApiError::AlreadyExists {
                kind: Kind::Token,
                name: "join-1".into(),
            },
            Code::AlreadyExists,
        ),
        (
            ApiError::Aborted {
                expected: 4,
                actual: 9,
            },
            Code::Aborted,
        ),
        (
            ApiError::FailedPrecondition {
                reason: "the token expired".into(),
            },
            Code::FailedPrecondition,
        ),
        (
            ApiError::OutOfRange {
                requested: 3,
                oldest: 120,
            },
            Code::OutOfRange,
        ),
        (
            ApiError::NotLeader {
                leader: Some("10.0.0.2:7000".into()),
            },
            Code::Unavailable,
        ),
        (ApiError::NotLeader { leader: None }, Code::Unavailable),
        (
            ApiError::Unavailable {
                reason: "no quorum".into(),
            },
            Code::Unavailable,
        ),
        (
            ApiError::Unauthenticated {
                reason: "unknown join token".into(),
            },
            Code::Unauthenticated,
        ),
        (
            ApiError::Internal {
                reason: "the store failed: disk full".into(),
            },
            Code::Internal,
        ),
    ]
}

#[test]
fn every_error_survives_a_status() {
    for (err, code) in every_error() {
        let status = Status::from(err.clone());
        assert_eq!(status.code(), code, "{err:?}");
        assert_eq!(status.message(), err.to_string());
        assert_eq!(ApiError::from(status), err);
    }
}

#[test]
fn not_leader_names_the_leader_in_metadata() {
    let status = Status::from(ApiError::NotLeader {
        leader: Some("10.0.0.2:7000".into()),
    });
    let leader = status
        .metadata()
        .get("basalt-leader")
        .expect("metadata set");
    assert_eq!(leader.to_str().unwrap(), "10.0.0.2:7000");

    // Without the typed detail, the metadata alone still tells the leader.
    let bare = Status::with_metadata(Code::Unavailable, "not leader", status.metadata().clone());
    assert_eq!(
        ApiError::from(bare),
        ApiError::NotLeader {
            leader: Some("10.0.0.2:7000".into())
        }
    );
}

#[test]
fn foreign_statuses_map_by_code() {
    let cases = [
        (Status::unavailable("connection refused"), "Unavailable"),
        (Status::deadline_exceeded("too slow"), "Unavailable"),
        (Status::cancelled("gone"), "Unavailable"),
        (Status::unauthenticated("who?"), "Unauthenticated"),
        (Status::failed_precondition("nope"), "FailedPrecondition"),
        (Status::invalid_argument("bad"), "InvalidArgument"),
        (Status::unimplemented("no such method"), "Internal"),
        (Status::unknown("boom"), "Internal"),
        (Status::not_found("no detail"), "Internal"),
        (Status::data_loss("bits"), "Internal"),
    ];
    for (status, variant) in cases {
        let message = status.message().to_owned();
        let err = ApiError::from(status);
        assert!(
            format!("{err:?}").starts_with(variant),
            "{message}: {err:?}"
        );
        assert!(
            err.to_string().contains(&message),
            "{err} lacks {message:?}"
        );
    }
}

#[test]
fn garbage_details_fall_back_to_the_code() {
    let status = Status::with_details(
        Code::FailedPrecondition,
        "cordoned",
        vec![0xff, 0x01, 0x02].into(),
    );
    assert_eq!(
        ApiError::from(status),
        ApiError::FailedPrecondition {
            reason: "cordoned".into()
        }
    );
}
