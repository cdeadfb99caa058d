//! [`JoinToken`]: what lets a new node register with the cluster.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ObjectMeta;
use crate::ApiError;

/// A join token. Its [`TokenSecret`] is returned only by create; the store
/// keeps no copy of it in clear.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JoinToken {
    /// Name and versions.
    pub meta: ObjectMeta,
    /// What the operator declares.
    pub spec: JoinTokenSpec,
    /// How the token has been used.
    pub status: JoinTokenStatus,
    /// The bearer secret: set only in the object create returns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<TokenSecret>,
}

/// What the operator declares about a join token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JoinTokenSpec {
    /// How long the token is valid after creation (at least 1 s).
    pub ttl_seconds: u64,
    /// How many registrations it allows; 0 means unlimited.
    pub max_uses: u32,
    /// A revoked token allows no more registrations.
    pub revoked: bool,
}

/// How a join token has been used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JoinTokenStatus {
    /// Registrations it allowed so far.
    pub uses: u32,
    /// When it stops being valid (Unix milliseconds).
    pub expires_at_unix_ms: u64,
    /// Hex SHA-256 of the secret, set by the control plane when it creates
    /// the token: registration compares against it, so the secret itself
    /// is never stored.
    pub secret_sha256: String,
}

/// A join token's bearer secret. `Debug` does not print it; `Display`,
/// [`TokenSecret::expose`] and serde do, so the CLI can show it once.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenSecret(String);

impl TokenSecret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

impl fmt::Display for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JoinToken {
    /// Checks every field; errors name the field's path, e.g. `spec.ttl_seconds`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        if self.spec.ttl_seconds == 0 {
            return Err(ApiError::invalid("spec.ttl_seconds", "must be at least 1"));
        }
        if let Some(secret) = &self.secret
            && secret.expose().is_empty()
        {
            return Err(ApiError::invalid("secret", "must not be empty when set"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_secret() {
        let token = JoinToken {
            secret: Some(TokenSecret::new("hunter2")),
            ..JoinToken::default()
        };
        assert!(!format!("{token:?}").contains("hunter2"));
        assert!(serde_json::to_string(&token).unwrap().contains("hunter2"));
    }
}
