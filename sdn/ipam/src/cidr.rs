//! [`Cidr`]: an IPv4 network.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::IpamError;

/// An IPv4 network: an address with its host bits zero, and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    /// The network of `ip/prefix`; host bits must be zero.
    pub fn new(ip: Ipv4Addr, prefix: u8) -> Result<Self, IpamError> {
        let text = format!("{ip}/{prefix}");
        if prefix > 32 {
            return Err(IpamError::InvalidCidr {
                text,
                reason: "the prefix length must be 0-32".into(),
            });
        }
        let cidr = Cidr {
            network: ip,
            prefix,
        };
        if u32::from(ip) & !cidr.mask() != 0 {
            return Err(IpamError::InvalidCidr {
                text,
                reason: format!(
                    "host bits are set; the network is {}/{prefix}",
                    Ipv4Addr::from(u32::from(ip) & cidr.mask())
                ),
            });
        }
        Ok(cidr)
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The last address (the broadcast address, for prefixes up to /30).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// How many addresses it spans (2^(32-prefix)).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// Whether `ip` lies inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// The `offset`-th address, when inside.
    pub fn nth(&self, offset: u64) -> Option<Ipv4Addr> {
        if offset >= self.size() {
            return None;
        }
        let offset = u32::try_from(offset).ok()?;
        Some(Ipv4Addr::from(u32::from(self.network) + offset))
    }

    /// The offset of `ip` from the network address, when inside.
    pub fn offset_of(&self, ip: Ipv4Addr) -> Option<u64> {
        self.contains(ip)
            .then(|| u64::from(u32::from(ip) - u32::from(self.network)))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = IpamError;

    fn from_str(text: &str) -> Result<Self, IpamError> {
        let invalid = |reason: &str| IpamError::InvalidCidr {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (ip, prefix) = text
            .split_once('/')
            .ok_or_else(|| invalid("missing '/len'"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| invalid("not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| invalid("the prefix length must be 0-32"))?;
        Cidr::new(ip, prefix).map_err(|err| match err {
            IpamError::InvalidCidr { reason, .. } => invalid(&reason),
            other => other,
        })
    }
}

impl TryFrom<String> for Cidr {
    type Error = IpamError;

    fn try_from(text: String) -> Result<Self, IpamError> {
        text.parse()
    }
}

impl From<Cidr> for String {
    fn from(cidr: Cidr) -> Self {
        cidr.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let cidr: Cidr = "10.1.0.0/16".parse().unwrap();
        assert_eq!(cidr.size(), 65536);
        assert_eq!(cidr.last(), Ipv4Addr::new(10, 1, 255, 255));
        assert!(cidr.contains(Ipv4Addr::new(10, 1, 3, 4)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 2, 0, 0)));
        assert_eq!(cidr.to_string(), "10.1.0.0/16");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().size(), 1 << 32);
        assert_eq!("10.0.0.7/32".parse::<Cidr>().unwrap().size(), 1);
        for bad in [
            "10.0.0.0",
            "10.0.0.1/24",
            "10.0.0.0/33",
            "x/8",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let err = "10.0.0.1/24".parse::<Cidr>().unwrap_err().to_string();
        assert!(err.contains("10.0.0.0/24"), "{err}");
    }

    #[test]
    fn overlaps_both_ways() {
        let a: Cidr = "10.0.0.0/8".parse().unwrap();
        let b: Cidr = "10.5.0.0/16".parse().unwrap();
        let c: Cidr = "11.0.0.0/8".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&a));
    }
}
