//! [`Member`] ⇄ protobuf.

use super::required;
use crate::pb;
use crate::{ApiError, Member};

impl From<Member> for pb::Member {
    fn from(member: Member) -> Self {
        Self {
            meta: Some(member.meta.into()),
            id: member.id,
            address: member.address,
            voter: member.voter,
            leader: member.leader,
        }
    }
}

impl TryFrom<pb::Member> for Member {
    type Error = ApiError;

    fn try_from(member: pb::Member) -> Result<Self, ApiError> {
        let member = Member {
            meta: required(member.meta, "member.meta")?.into(),
            id: member.id,
            address: member.address,
            voter: member.voter,
            leader: member.leader,
        };
        member.validate()?;
        Ok(member)
    }
}
