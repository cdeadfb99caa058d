//! [`Network`]: a VM network (CIDR and VXLAN VNI), and [`Endpoint`]: one
//! VM NIC's leased address and where it lives.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{ObjectMeta, validate};
use crate::ApiError;

/// The largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// A VM network. Networks never overlap (the control plane refuses a
/// CIDR that overlaps another network's, naming `spec.cidr`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    /// Name, labels and versions.
    pub meta: ObjectMeta,
    /// What the operator declares.
    pub spec: NetworkSpec,
}

/// What the operator declares about a network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSpec {
    /// IPv4 CIDR, "a.b.c.d/len" with the host bits zero.
    pub cidr: String,
    /// VXLAN network identifier, 1 to [`MAX_VNI`], unique among networks.
    pub vni: u32,
    /// How nodes carry the network's packets between them; `None` leaves
    /// it to each node's default (its agent's `--net-routing`, overlay
    /// unless set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<NetworkRouting>,
}

/// How nodes carry a network's packets between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkRouting {
    /// VXLAN between the nodes, with the network's VNI.
    Overlay,
    /// Unencapsulated, with the owner node's underlay address as the next
    /// hop: the nodes share an L2 segment, or routers route the network's
    /// addresses to them.
    Native,
}

impl NetworkRouting {
    /// The name on the wire and in files: `overlay` or `native`.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkRouting::Overlay => "overlay",
            NetworkRouting::Native => "native",
        }
    }

    /// Parses a wire value: `""` is `None` (the node's default); errors
    /// name `field`.
    pub fn parse(field: &str, text: &str) -> Result<Option<NetworkRouting>, ApiError> {
        match text {
            "" => Ok(None),
            "overlay" => Ok(Some(NetworkRouting::Overlay)),
            "native" => Ok(Some(NetworkRouting::Native)),
            other => Err(ApiError::invalid(
                field,
                format!("{other:?}: must be overlay or native (or empty for the node's default)"),
            )),
        }
    }
}

impl NetworkSpec {
    /// The CIDR's network address and prefix length.
    pub fn parse_cidr(&self) -> Result<(Ipv4Addr, u8), ApiError> {
        parse_cidr("spec.cidr", &self.cidr)
    }
}

/// Parses "a.b.c.d/len" (host bits zero); errors name `field`.
pub(crate) fn parse_cidr(field: &str, text: &str) -> Result<(Ipv4Addr, u8), ApiError> {
    let invalid = |reason: String| ApiError::invalid(field, format!("{text:?}: {reason}"));
    let (ip, prefix) = text
        .split_once('/')
        .ok_or_else(|| invalid("not an IPv4 CIDR (a.b.c.d/len)".into()))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| invalid(format!("{ip:?} is not an IPv4 address")))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| invalid("the prefix length must be 0-32".into()))?;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    if u32::from(ip) & !mask != 0 {
        return Err(invalid(format!(
            "host bits are set; the network is {}/{prefix}",
            Ipv4Addr::from(u32::from(ip) & mask)
        )));
    }
    if !(8..=30).contains(&prefix) {
        return Err(invalid("the prefix length must be 8-30".into()));
    }
    Ok((ip, prefix))
}

impl Network {
    /// Checks every field; errors name the field's path, e.g. `spec.cidr`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        self.spec.parse_cidr()?;
        if self.spec.vni == 0 || self.spec.vni > MAX_VNI {
            return Err(ApiError::invalid(
                "spec.vni",
                format!("must be 1 to {MAX_VNI}"),
            ));
        }
        Ok(())
    }
}

/// One VM NIC's leased address and where it lives now. Named after the
/// address (see [`Endpoint::name_for`]), so an address is leased to at
/// most one NIC. Written by the control plane's IPAM controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Endpoint {
    /// Name and versions.
    pub meta: ObjectMeta,
    /// The network the address belongs to.
    pub network: String,
    /// The leased address.
    pub ip: Option<Ipv4Addr>,
    /// The NIC's MAC, "aa:bb:cc:dd:ee:ff".
    pub mac: String,
    /// The owning VM's name.
    pub vm: String,
    /// The owning VM's uid: the lease belongs to it, not to a node.
    pub vm_uid: String,
    /// The NIC's index in the VM's spec.
    pub nic: u32,
    /// The node the VM is placed on; empty while unplaced or released.
    pub node: String,
    /// The placement's epoch: data paths forward only to the newest.
    pub epoch: u64,
    /// Policy identity of the VM's label set.
    pub identity: u32,
    /// 0 while in use; once released, when the address may be leased
    /// again (Unix milliseconds).
    pub release_at_unix_ms: u64,
}

impl Endpoint {
    /// The name of the endpoint of `ip`: its dotted quad with dashes.
    pub fn name_for(ip: Ipv4Addr) -> String {
        ip.to_string().replace('.', "-")
    }

    /// Checks every field; errors name the field's path, e.g. `mac`.
    pub fn validate(&self) -> Result<(), ApiError> {
        self.meta.validate()?;
        validate::name("network", &self.network)?;
        let Some(ip) = self.ip else {
            return Err(ApiError::missing("ip"));
        };
        if self.meta.name != Self::name_for(ip) {
            return Err(ApiError::invalid(
                "meta.name",
                format!(
                    "an endpoint is named after its address ({:?})",
                    Self::name_for(ip)
                ),
            ));
        }
        validate_mac("mac", &self.mac)?;
        validate::name("vm", &self.vm)?;
        if self.vm_uid.is_empty() {
            return Err(ApiError::missing("vm_uid"));
        }
        if !self.node.is_empty() {
            validate::name("node", &self.node)?;
        }
        Ok(())
    }
}

/// A unicast MAC, six lowercase or uppercase hex pairs separated by ':'.
pub(crate) fn validate_mac(field: &str, mac: &str) -> Result<(), ApiError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let well_formed = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !well_formed {
        return Err(ApiError::invalid(
            field,
            format!("{mac:?} is not a MAC (aa:bb:cc:dd:ee:ff)"),
        ));
    }
    let first = u8::from_str_radix(parts[0], 16).unwrap_or(1);
    if first & 1 != 0 {
        return Err(ApiError::invalid(
            field,
            format!("{mac:?} is a multicast MAC"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(cidr: &str, vni: u32) -> Network {
        Network {
            meta: ObjectMeta::named("net"),
            spec: NetworkSpec {
                cidr: cidr.into(),
                vni,
                routing: None,
            },
        }
    }

    fn field(result: Result<(), ApiError>) -> String {
        match result {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn networks_need_a_clean_cidr_and_a_24_bit_vni() {
        network("10.1.0.0/24", 7).validate().unwrap();
        for bad in [
            "10.1.0.1/24",
            "10.1.0.0",
            "10.1.0.0/33",
            "x/24",
            "10.0.0.0/31",
            "0.0.0.0/0",
        ] {
            assert_eq!(field(network(bad, 7).validate()), "spec.cidr", "{bad}");
        }
        assert_eq!(field(network("10.1.0.0/24", 0).validate()), "spec.vni");
        assert_eq!(
            field(network("10.1.0.0/24", MAX_VNI + 1).validate()),
            "spec.vni"
        );
    }

    #[test]
    fn endpoints_are_named_after_their_address() {
        let ip = Ipv4Addr::new(10, 1, 0, 5);
        let mut endpoint = Endpoint {
            meta: ObjectMeta::named(Endpoint::name_for(ip)),
            network: "net".into(),
            ip: Some(ip),
            mac: "02:00:00:00:00:01".into(),
            vm: "web".into(),
            vm_uid: "u".into(),
            ..Endpoint::default()
        };
        assert_eq!(endpoint.meta.name, "10-1-0-5");
        endpoint.validate().unwrap();
        endpoint.mac = "01:00:00:00:00:01".into();
        assert_eq!(field(endpoint.validate()), "mac");
        endpoint.mac = "02:00:00:00:00:01".into();
        endpoint.meta.name = "other".into();
        assert_eq!(field(endpoint.validate()), "meta.name");
    }
}
