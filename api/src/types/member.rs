//! [`Member`]: one control-plane member, as the desired Raft membership.

use serde::{Deserialize, Serialize};

use super::ObjectMeta;
use crate::ApiError;

/// A control-plane member. The set of `Member` objects is the desired
/// Raft membership: the leader adds each new one as a learner, promotes
/// it to voter once it has caught up, and removes the voters whose object
/// was deleted — one change at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Member {
    /// Name and versions.
    pub meta: ObjectMeta,
    /// Raft node id: unique among members, at least 1.
    pub id: u64,
    /// Where the member serves Raft and the admin API: "host:port".
    pub address: String,
    /// Status, set by the leader: whether the member is a Raft voter now
    /// (false while it is added as a learner and catches up).
    pub voter: bool,
    /// Whether the member leads the cluster, as the leader answering a get
    /// or a list knows it. Filled on those reads only: never stored,
    /// false in watch events and ignored in writes.
    pub leader: bool,
}

impl Member {
    /// Checks every field; errors name the field's path, e.g. `address`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        if self.id == 0 {
            return Err(ApiError::invalid("id", "must be at least 1"));
        }
        validate_address(&self.address)
    }
}

/// A "host:port" with a non-empty host and a non-zero port.
fn validate_address(address: &str) -> Result<(), ApiError> {
    let invalid = |reason: &str| ApiError::invalid("address", format!("{address:?}: {reason}"));
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| invalid("expected host:port"))?;
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
        return Err(invalid("the host is empty or malformed"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid("the port must be 1-65535")),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, address: &str) -> Member {
        Member {
            meta: ObjectMeta::named("member-1"),
            id,
            address: address.into(),
            voter: false,
            leader: false,
        }
    }

    #[test]
    fn members_are_checked() {
        assert_eq!(member(1, "127.0.0.1:7400").validate(), Ok(()));
        assert_eq!(member(2, "cp-2.example:7400").validate(), Ok(()));
        for (id, address, field) in [
            (0, "127.0.0.1:7400", "id"),
            (1, "127.0.0.1", "address"),
            (1, "127.0.0.1:0", "address"),
            (1, ":7400", "address"),
            (1, "127.0.0.1:http", "address"),
        ] {
            assert!(
                matches!(member(id, address).validate(),
                    Err(ApiError::InvalidArgument { field: f, .. }) if f == field),
                "{id} {address}"
            );
        }
    }
}
