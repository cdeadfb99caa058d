//! [`Network`] and [`Endpoint`] ⇄ protobuf.

use super::required;
use crate::pb;
use crate::{ApiError, Endpoint, Network, NetworkRouting, NetworkSpec};

impl From<Network> for pb::Network {
    fn from(network: Network) -> Self {
        Self {
            meta: Some(network.meta.into()),
            spec: Some(pb::NetworkSpec {
                cidr: network.spec.cidr,
                vni: network.spec.vni,
                routing: network
                    .spec
                    .routing
                    .map(|r| r.as_str().to_owned())
                    .unwrap_or_default(),
            }),
        }
    }
}

impl TryFrom<pb::Network> for Network {
    type Error = ApiError;

    fn try_from(network: pb::Network) -> Result<Self, ApiError> {
        let spec = required(network.spec, "network.spec")?;
        let network = Network {
            meta: required(network.meta, "network.meta")?.into(),
            spec: NetworkSpec {
                cidr: spec.cidr,
                vni: spec.vni,
                routing: NetworkRouting::parse("spec.routing", &spec.routing)?,
            },
        };
        network.validate()?;
        Ok(network)
    }
}

impl From<Endpoint> for pb::Endpoint {
    fn from(endpoint: Endpoint) -> Self {
        Self {
            meta: Some(endpoint.meta.into()),
            network: endpoint.network,
            ip: endpoint.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            mac: endpoint.mac,
            vm: endpoint.vm,
            vm_uid: endpoint.vm_uid,
            nic: endpoint.nic,
            node: endpoint.node,
            epoch: endpoint.epoch,
            identity: endpoint.identity,
            release_at_unix_ms: endpoint.release_at_unix_ms,
        }
    }
}

impl TryFrom<pb::Endpoint> for Endpoint {
    type Error = ApiError;

    fn try_from(endpoint: pb::Endpoint) -> Result<Self, ApiError> {
        let ip = if endpoint.ip.is_empty() {
            None
        } else {
            Some(endpoint.ip.parse().map_err(|_| {
                ApiError::invalid("ip", format!("{:?} is not an IPv4 address", endpoint.ip))
            })?)
        };
        let endpoint = Endpoint {
            meta: required(endpoint.meta, "endpoint.meta")?.into(),
            network: endpoint.network,
            ip,
            mac: endpoint.mac,
            vm: endpoint.vm,
            vm_uid: endpoint.vm_uid,
            nic: endpoint.nic,
            node: endpoint.node,
            epoch: endpoint.epoch,
            identity: endpoint.identity,
            release_at_unix_ms: endpoint.release_at_unix_ms,
        };
        endpoint.validate()?;
        Ok(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::ObjectMeta;

    #[test]
    fn networks_and_endpoints_survive_the_wire() {
        let mut network = Network {
            meta: ObjectMeta::named("blue"),
            spec: NetworkSpec {
                cidr: "10.2.0.0/16".into(),
                vni: 42,
                routing: None,
            },
        };
        let wire = pb::Network::from(network.clone());
        assert_eq!(wire.spec.as_ref().unwrap().routing, "");
        assert_eq!(Network::try_from(wire), Ok(network.clone()));
        for routing in [NetworkRouting::Overlay, NetworkRouting::Native] {
            network.spec.routing = Some(routing);
            let wire = pb::Network::from(network.clone());
            assert_eq!(wire.spec.as_ref().unwrap().routing, routing.as_str());
            assert_eq!(Network::try_from(wire), Ok(network.clone()));
        }
        let mut wire = pb::Network::from(network.clone());
        wire.spec.as_mut().unwrap().routing = "vxlan".into();
        let err = Network::try_from(wire).unwrap_err();
        assert!(err.to_string().contains("spec.routing"), "{err}");
        let ip = Ipv4Addr::new(10, 2, 0, 9);
        let endpoint = Endpoint {
            meta: ObjectMeta::named(Endpoint::name_for(ip)),
            network: "blue".into(),
            ip: Some(ip),
            mac: "02:aa:bb:cc:dd:ee".into(),
            vm: "web".into(),
            vm_uid: "uid".into(),
            nic: 1,
            node: "n1".into(),
            epoch: 3,
            identity: 77,
            release_at_unix_ms: 0,
        };
        let wire = pb::Endpoint::from(endpoint.clone());
        assert_eq!(Endpoint::try_from(wire), Ok(endpoint));
        let bad = pb::Endpoint {
            ip: "10.2.0.300".into(),
            ..pb::Endpoint::default()
        };
        assert!(matches!(
            Endpoint::try_from(bad),
            Err(ApiError::InvalidArgument { field, .. }) if field == "ip"
        ));
    }
}
