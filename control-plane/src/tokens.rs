//! Join-token secrets: generated on the leader when a token is created,
//! shown once in the create reply, and stored only as a SHA-256 hash.
//!
//! A secret reads `NAME.HEX`: the token's name (so registration finds the
//! token without scanning), a dot (never part of a name), and 32 random
//! bytes in hex.
//!
//! Invariants: no log entry and no stored object carries a secret in
//! clear; a token's hash, expiry and use count are set by the control
//! plane only (creates and updates cannot set them).

use std::fmt::Write as _;

use basalt_api::{ApiError, Object, TokenSecret};
use rand::Rng as _;
use sha2::{Digest as _, Sha256};

use crate::state::Command;

/// Random bytes in a secret.
const SECRET_BYTES: usize = 32;

/// Hex SHA-256 of `secret`.
pub fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// The token name a secret names, and the secret itself; `None` when the
/// secret is not `NAME.HEX`.
pub fn token_name(secret: &str) -> Option<&str> {
    let (name, random) = secret.split_once('.')?;
    (!name.is_empty() && !random.is_empty()).then_some(name)
}

/// A new random secret for token `name`.
pub fn generate(name: &str) -> TokenSecret {
    let bytes: [u8; SECRET_BYTES] = rand::rng().random();
    TokenSecret::new(format!("{name}.{}", hex(&bytes)))
}

/// A new random node credential (hex), issued when a node registers with
/// a join token; only its hash is stored, on the node.
pub fn generate_node_credential() -> TokenSecret {
    let bytes: [u8; SECRET_BYTES] = rand::rng().random();
    TokenSecret::new(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Prepares a stamped command on the leader: a new token gets a secret,
/// its hash and its expiry (creation time + TTL); the secret is returned
/// to put in the reply and removed from the command. A token in an update
/// loses any secret (the state machine keeps the stored status).
pub fn seal(command: Command) -> Result<(Command, Option<TokenSecret>), ApiError> {
    match command {
        Command::Create(Object::Token(mut token)) => {
            if token.secret.is_some() {
                return Err(ApiError::invalid(
                    "secret",
                    "the control plane generates a token's secret; leave it unset",
                ));
            }
            let secret = generate(&token.meta.name);
            token.status.secret_sha256 = hash(secret.expose());
            token.status.uses = 0;
            token.status.expires_at_unix_ms = token
                .meta
                .created_at_unix_ms
                .saturating_add(token.spec.ttl_seconds.saturating_mul(1000));
            Ok((Command::Create(Object::Token(token)), Some(secret)))
        }
        Command::Update(Object::Token(mut token)) => {
            token.secret = None;
            Ok((Command::Update(Object::Token(token)), None))
        }
        other => Ok((other, None)),
    }
}

#[cfg(test)]
mod tests {
    use basalt_api::{JoinToken, ObjectMeta};

    use super::*;

    #[test]
    fn a_sealed_token_keeps_only_the_hash() {
        let mut token = JoinToken {
            meta: ObjectMeta::named("join-1"),
            ..JoinToken::default()
        };
        token.spec.ttl_seconds = 60;
        token.meta.created_at_unix_ms = 1_000;
        let (command, secret) = seal(Command::Create(Object::Token(token.clone()))).unwrap();
        let secret = secret.expect("a secret for a new token");
        assert_eq!(token_name(secret.expose()), Some("join-1"));
        let Command::Create(Object::Token(sealed)) = command else {
            panic!("not a token create: {command:?}")
        };
        assert_eq!(sealed.secret, None);
        assert_eq!(sealed.status.secret_sha256, hash(secret.expose()));
        assert_eq!(sealed.status.secret_sha256.len(), 64);
        assert_eq!(sealed.status.expires_at_unix_ms, 61_000);
        assert!(!format!("{sealed:?}").contains(secret.expose()));
        assert_ne!(generate("a"), generate("a"));

        token.secret = Some(TokenSecret::new("chosen"));
        assert!(matches!(
            seal(Command::Create(Object::Token(token))),
            Err(ApiError::InvalidArgument { field, .. }) if field == "secret"
        ));
        assert_eq!(token_name("no-dot"), None);
        assert_eq!(token_name(".x"), None);
    }
}
