//! [`Registry`]: the pools of every network, which never overlap.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{IpamError, Pool};

/// Every network's pool, by network name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pools: BTreeMap<String, Pool>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds network `name`; refused when the name is taken or its CIDR
    /// overlaps another network's.
    pub fn add(&mut self, name: impl Into<String>, pool: Pool) -> Result<(), IpamError> {
        let name = name.into();
        if self.pools.contains_key(&name) {
            return Err(IpamError::DuplicateNetwork(name));
        }
        if let Some((other, existing)) = self
            .pools
            .iter()
            .find(|(_, p)| p.cidr().overlaps(&pool.cidr()))
        {
            return Err(IpamError::Overlap {
                network: name,
                cidr: pool.cidr(),
                other: other.clone(),
                other_cidr: existing.cidr(),
            });
        }
        self.pools.insert(name, pool);
        Ok(())
    }

    /// Removes network `name`; returns its pool.
    pub fn remove(&mut self, name: &str) -> Result<Pool, IpamError> {
        self.pools
            .remove(name)
            .ok_or_else(|| IpamError::UnknownNetwork(name.to_owned()))
    }

    /// Network `name`'s pool.
    pub fn get(&self, name: &str) -> Result<&Pool, IpamError> {
        self.pools
            .get(name)
            .ok_or_else(|| IpamError::UnknownNetwork(name.to_owned()))
    }

    /// Network `name`'s pool, to lease from.
    pub fn get_mut(&mut self, name: &str) -> Result<&mut Pool, IpamError> {
        self.pools
            .get_mut(name)
            .ok_or_else(|| IpamError::UnknownNetwork(name.to_owned()))
    }

    /// Every network, by name.
    pub fn pools(&self) -> impl Iterator<Item = (&str, &Pool)> {
        self.pools.iter().map(|(name, pool)| (name.as_str(), pool))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_overlaps_and_duplicates() {
        let pool = |cidr: &str| Pool::new(cidr.parse().unwrap(), None, 0);
        let mut registry = Registry::new();
        registry.add("a", pool("10.0.0.0/16")).unwrap();
        registry.add("b", pool("10.1.0.0/16")).unwrap();
        let err = registry.add("c", pool("10.0.128.0/17")).unwrap_err();
        assert!(
            matches!(&err, IpamError::Overlap { other, .. } if other == "a"),
            "{err}"
        );
        assert!(matches!(
            registry.add("a", pool("192.168.0.0/24")),
            Err(IpamError::DuplicateNetwork(_))
        ));
        assert!(registry.get("c").is_err());
        registry.remove("a").unwrap();
        registry.add("c", pool("10.0.128.0/17")).unwrap();
    }
}
