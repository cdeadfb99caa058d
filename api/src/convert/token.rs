//! [`JoinToken`] ⇄ protobuf.

use super::required;
use crate::pb;
use crate::{ApiError, JoinToken, JoinTokenSpec, JoinTokenStatus, TokenSecret};

impl From<JoinToken> for pb::JoinToken {
    fn from(token: JoinToken) -> Self {
        Self {
            meta: Some(token.meta.into()),
            spec: Some(pb::JoinTokenSpec {
                ttl_seconds: token.spec.ttl_seconds,
                max_uses: token.spec.max_uses,
                revoked: token.spec.revoked,
            }),
            status: Some(pb::JoinTokenStatus {
                uses: token.status.uses,
                expires_at_unix_ms: token.status.expires_at_unix_ms,
                secret_sha256: token.status.secret_sha256,
            }),
            secret: token.secret.map(|secret| secret.expose().to_owned()),
        }
    }
}

/// Requires `meta` and `spec`; an unset `status` is an empty one.
impl TryFrom<pb::JoinToken> for JoinToken {
    type Error = ApiError;

    fn try_from(token: pb::JoinToken) -> Result<Self, ApiError> {
        let spec = required(token.spec, "token.spec")?;
        let status = token.status.unwrap_or_default();
        let token = JoinToken {
            meta: required(token.meta, "token.meta")?.into(),
            spec: JoinTokenSpec {
                ttl_seconds: spec.ttl_seconds,
                max_uses: spec.max_uses,
                revoked: spec.revoked,
            },
            status: JoinTokenStatus {
                uses: status.uses,
                expires_at_unix_ms: status.expires_at_unix_ms,
                secret_sha256: status.secret_sha256,
            },
            secret: token.secret.map(TokenSecret::new),
        };
        token.validate()?;
        Ok(token)
    }
}
