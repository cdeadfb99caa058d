//! [`Object`]: any stored object, and [`Kind`]: which sort it is.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Image;
use super::{Endpoint, JoinToken, Member, Migration, Network, Node, ObjectMeta, Placement, Vm};
use crate::ApiError;

/// The sorts of stored objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// [`Node`].
    Node,
    /// [`Vm`].
    Vm,
    /// [`Placement`].
    Placement,
    /// [`JoinToken`].
    Token,
    /// [`Member`].
    Member,
    /// [`Network`].
    Network,
    /// [`Endpoint`].
    Endpoint,
    /// [`Policy`](super::Policy).
    Policy,
    /// [`Image`].
    Image,
    /// [`Migration`].
    Migration,
    /// [`Volume`](super::Volume).
    Volume,
}

impl Kind {
    /// Every kind, in a stable order.
    pub const ALL: [Kind; 11] = [
        Kind::Node,
        Kind::Vm,
        Kind::Placement,
        Kind::Token,
        Kind::Member,
        Kind::Network,
        Kind::Endpoint,
        Kind::Policy,
        Kind::Image,
        Kind::Migration,
        Kind::Volume,
    ];

    /// The lowercase singular name: "node", "vm", "placement", "token",
    /// "member", "network", "endpoint", "image", "migration", "volume".
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Vm => "vm",
            Kind::Placement => "placement",
            Kind::Token => "token",
            Kind::Member => "member",
            Kind::Network => "network",
            Kind::Endpoint => "endpoint",
            Kind::Policy => "policy",
            Kind::Migration => "migration",
            Kind::Image => "image",
            Kind::Volume => "volume",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = ApiError;

    /// Accepts the singular or plural name, in any case ("vm", "VMs").
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        Kind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == singular || kind.as_str() == lower)
            .ok_or_else(|| {
                ApiError::invalid(
                    "kind",
                    format!("unknown kind {s:?}; expected node, vm, placement, token, member, network, endpoint, image, migration or volume"),
                )
            })
    }
}

/// Any stored object. Serialized with its kind as a tag:
/// `{"kind": "vm", "meta": {..}, "spec": {..}, "status": {..}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Object {
    /// A node.
    Node(Node),
    /// A VM.
    Vm(Vm),
    /// A placement.
    Placement(Placement),
    /// A join token.
    Token(JoinToken),
    /// A control-plane member.
    Member(Member),
    /// A VM network.
    Network(Network),
    /// A VM NIC's leased address.
    Endpoint(Endpoint),
    /// A network policy.
    Policy(super::Policy),
    /// A live migration of a VM.
    Migration(Migration),
    /// A disk image.
    Image(Image),
    /// A replicated block device.
    Volume(super::Volume),
}

impl Object {
    /// Which sort of object this is.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::Vm(_) => Kind::Vm,
            Object::Placement(_) => Kind::Placement,
            Object::Token(_) => Kind::Token,
            Object::Member(_) => Kind::Member,
            Object::Network(_) => Kind::Network,
            Object::Endpoint(_) => Kind::Endpoint,
            Object::Policy(_) => Kind::Policy,
            Object::Migration(_) => Kind::Migration,
            Object::Image(_) => Kind::Image,
            Object::Volume(_) => Kind::Volume,
        }
    }

    /// Its metadata.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Node(o) => &o.meta,
            Object::Vm(o) => &o.meta,
            Object::Placement(o) => &o.meta,
            Object::Token(o) => &o.meta,
            Object::Member(o) => &o.meta,
            Object::Network(o) => &o.meta,
            Object::Endpoint(o) => &o.meta,
            Object::Policy(o) => &o.meta,
            Object::Migration(o) => &o.meta,
            Object::Image(o) => &o.meta,
            Object::Volume(o) => &o.meta,
        }
    }

    /// Its metadata, to change.
    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Node(o) => &mut o.meta,
            Object::Vm(o) => &mut o.meta,
            Object::Placement(o) => &mut o.meta,
            Object::Token(o) => &mut o.meta,
            Object::Member(o) => &mut o.meta,
            Object::Network(o) => &mut o.meta,
            Object::Endpoint(o) => &mut o.meta,
            Object::Policy(o) => &mut o.meta,
            Object::Migration(o) => &mut o.meta,
            Object::Image(o) => &mut o.meta,
            Object::Volume(o) => &mut o.meta,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.meta().name
    }

    /// Checks every field; errors name the field's path inside the object,
    /// e.g. `meta.name`.
    pub fn validate(&self) -> Result<(), ApiError> {
        match self {
            Object::Node(o) => o.validate(),
            Object::Vm(o) => o.validate(),
            Object::Placement(o) => o.validate(),
            Object::Token(o) => o.validate(),
            Object::Member(o) => o.validate(),
            Object::Network(o) => o.validate(),
            Object::Endpoint(o) => o.validate(),
            Object::Policy(o) => o.validate(),
            Object::Migration(o) => o.validate(),
            Object::Image(o) => o.validate(),
            Object::Volume(o) => o.validate(),
        }
    }
}

/// Objects of one kind, as read at one resource version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectList {
    /// The objects, ordered by name.
    pub objects: Vec<Object>,
    /// The store's resource version the list was read at: watch from here
    /// to see every later change.
    pub resource_version: u64,
}

macro_rules! object_variant {
    ($variant:ident, $ty:ty) => {
        impl From<$ty> for Object {
            fn from(object: $ty) -> Self {
                Object::$variant(object)
            }
        }

        impl TryFrom<Object> for $ty {
            /// The object, when it is of another kind.
            type Error = Object;

            fn try_from(object: Object) -> Result<Self, Object> {
                match object {
                    Object::$variant(o) => Ok(o),
                    other => Err(other),
                }
            }
        }
    };
}

object_variant!(Node, Node);
object_variant!(Vm, Vm);
object_variant!(Placement, Placement);
object_variant!(Token, JoinToken);
object_variant!(Member, Member);
object_variant!(Network, Network);
object_variant!(Endpoint, Endpoint);
object_variant!(Policy, super::Policy);
object_variant!(Migration, Migration);
object_variant!(Image, Image);
object_variant!(Volume, super::Volume);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_from_their_names() {
        for kind in Kind::ALL {
            assert_eq!(kind.to_string().parse::<Kind>(), Ok(kind));
            assert_eq!(format!("{kind}s").parse::<Kind>(), Ok(kind));
        }
        assert_eq!("VMs".parse::<Kind>(), Ok(Kind::Vm));
        assert!(matches!(
            "disk".parse::<Kind>(),
            Err(ApiError::InvalidArgument { field, .. }) if field == "kind"
        ));
    }

    #[test]
    fn objects_serialize_with_their_kind() {
        let object = Object::Placement(Placement {
            meta: ObjectMeta::named("web-1"),
            vm: "web-1".into(),
            node: "node-2".into(),
            epoch: 3,
            replica_nodes: Vec::new(),
        });
        let json = serde_json::to_value(&object).unwrap();
        assert_eq!(json["kind"], "placement");
        assert_eq!(json["node"], "node-2");
        let back: Object = serde_json::from_value(json).unwrap();
        assert_eq!(back, object);

        let typo = serde_json::json!({"kind": "placement", "nod": "node-2"});
        assert!(serde_json::from_value::<Object>(typo).is_err());
    }
}
