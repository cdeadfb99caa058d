//! [`Pool`]: the addresses of one network and who holds them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{Cidr, IpamError};

/// Who holds a lease: one NIC of one VM. Addresses belong to VMs, not
/// nodes, so a lease survives rescheduling and migration.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner {
    /// The VM's uid.
    pub vm_uid: String,
    /// The NIC's index in the VM's spec.
    pub nic: u32,
}

impl Owner {
    /// NIC `nic` of the VM with uid `vm_uid`.
    pub fn new(vm_uid: impl Into<String>, nic: u32) -> Self {
        Self {
            vm_uid: vm_uid.into(),
            nic,
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm {} nic {}", self.vm_uid, self.nic)
    }
}

/// Whether a lease is in use or released and waiting out its grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseState {
    /// In use.
    Active,
    /// Released; the address is free again at `until_unix_ms`, and the
    /// owner may take it back before then.
    Releasing {
        /// When the grace period ends (Unix milliseconds).
        until_unix_ms: u64,
    },
}

/// One leased address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The address.
    pub ip: Ipv4Addr,
    /// Who holds it.
    pub owner: Owner,
    /// Active or in its grace period.
    pub state: LeaseState,
}

/// The addresses of one IPv4 network: leases by owner, reservations, and
/// released addresses in their grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    cidr: Cidr,
    gateway: Option<Ipv4Addr>,
    grace_ms: u64,
    reserved: BTreeSet<Ipv4Addr>,
    leases: BTreeMap<Ipv4Addr, Lease>,
    by_owner: BTreeMap<Owner, Ipv4Addr>,
    /// Where the next dynamic allocation starts looking (next fit).
    next: u64,
}

impl Pool {
    /// A pool over `cidr` whose released addresses are held for
    /// `grace_ms`. The network and broadcast addresses (for prefixes up to
    /// /30) and the gateway (when it lies inside) are reserved.
    pub fn new(cidr: Cidr, gateway: Option<Ipv4Addr>, grace_ms: u64) -> Self {
        let mut reserved = BTreeSet::new();
        if cidr.prefix() <= 30 {
            reserved.insert(cidr.network());
            reserved.insert(cidr.last());
        }
        if let Some(gateway) = gateway.filter(|g| cidr.contains(*g)) {
            reserved.insert(gateway);
        }
        Self {
            cidr,
            gateway,
            grace_ms,
            reserved,
            leases: BTreeMap::new(),
            by_owner: BTreeMap::new(),
            next: 0,
        }
    }

    /// The pool's network.
    pub fn cidr(&self) -> Cidr {
        self.cidr
    }

    /// The gateway it was created with.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.gateway
    }

    /// Reserves `ip` so it is never leased.
    pub fn reserve(&mut self, ip: Ipv4Addr) -> Result<(), IpamError> {
        self.check_inside(ip)?;
        if let Some(lease) = self.leases.get(&ip) {
            return Err(IpamError::InUse {
                ip,
                owner: lease.owner.clone(),
            });
        }
        self.reserved.insert(ip);
        Ok(())
    }

    /// Whether `ip` is reserved.
    pub fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        self.reserved.contains(&ip)
    }

    /// The lease `owner` holds (active or in grace).
    pub fn lease_of(&self, owner: &Owner) -> Option<&Lease> {
        self.leases.get(self.by_owner.get(owner)?)
    }

    /// Who holds `ip`.
    pub fn holder(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.leases.get(&ip)
    }

    /// Every lease, by address.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// How many addresses could still be leased.
    pub fn free(&self) -> u64 {
        let reserved_inside = self.reserved.len() as u64;
        self.cidr
            .size()
            .saturating_sub(reserved_inside + self.leases.len() as u64)
    }

    /// Leases an address to `owner` — `requested` when given, else any free
    /// one — first freeing addresses whose grace ended by `now_unix_ms`.
    /// Idempotent: an owner that already holds an address gets it again
    /// (and a released one back, active).
    pub fn allocate(
        &mut self,
        owner: Owner,
        requested: Option<Ipv4Addr>,
        now_unix_ms: u64,
    ) -> Result<Ipv4Addr, IpamError> {
        self.expire(now_unix_ms);
        if let Some(&held) = self.by_owner.get(&owner) {
            if let Some(requested) = requested.filter(|r| *r != held) {
                return Err(IpamError::OwnerHoldsOther {
                    owner,
                    held,
                    requested,
                });
            }
            if let Some(lease) = self.leases.get_mut(&held) {
                lease.state = LeaseState::Active;
            }
            return Ok(held);
        }
        let ip = match requested {
            Some(ip) => {
                self.check_inside(ip)?;
                if self.reserved.contains(&ip) {
                    return Err(IpamError::Reserved {
                        ip,
                        cidr: self.cidr,
                    });
                }
                if let Some(lease) = self.leases.get(&ip) {
                    return Err(IpamError::InUse {
                        ip,
                        owner: lease.owner.clone(),
                    });
                }
                ip
            }
            None => self.find_free()?,
        };
        self.leases.insert(
            ip,
            Lease {
                ip,
                owner: owner.clone(),
                state: LeaseState::Active,
            },
        );
        self.by_owner.insert(owner, ip);
        Ok(ip)
    }

    /// Releases `owner`'s address: it is held for the grace period, then
    /// freed. Returns the address, if the owner held one.
    pub fn release(&mut self, owner: &Owner, now_unix_ms: u64) -> Option<Ipv4Addr> {
        let ip = *self.by_owner.get(owner)?;
        let lease = self.leases.get_mut(&ip)?;
        if lease.state == LeaseState::Active {
            lease.state = LeaseState::Releasing {
                until_unix_ms: now_unix_ms.saturating_add(self.grace_ms),
            };
        }
        Some(ip)
    }

    /// Frees every released address whose grace ended by `now_unix_ms`;
    /// returns them.
    pub fn expire(&mut self, now_unix_ms: u64) -> Vec<Ipv4Addr> {
        let done: Vec<Ipv4Addr> = self
            .leases
            .values()
            .filter(|l| matches!(l.state, LeaseState::Releasing { until_unix_ms } if until_unix_ms <= now_unix_ms))
            .map(|l| l.ip)
            .collect();
        for ip in &done {
            if let Some(lease) = self.leases.remove(ip) {
                self.by_owner.remove(&lease.owner);
            }
        }
        done
    }

    fn check_inside(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        if self.cidr.contains(ip) {
            Ok(())
        } else {
            Err(IpamError::OutOfRange {
                ip,
                cidr: self.cidr,
            })
        }
    }

    /// Next fit: the first address neither reserved nor leased, starting
    /// after the last one handed out and wrapping around once.
    fn find_free(&mut self) -> Result<Ipv4Addr, IpamError> {
        let size = self.cidr.size();
        if self.free() > 0 {
            for step in 0..size {
                let offset = (self.next + step) % size;
                let Some(ip) = self.cidr.nth(offset) else {
                    continue;
                };
                if !self.reserved.contains(&ip) && !self.leases.contains_key(&ip) {
                    self.next = (offset + 1) % size;
                    return Ok(ip);
                }
            }
        }
        Err(IpamError::Exhausted {
            cidr: self.cidr,
            leased: self.leases.len(),
            reserved: self.reserved.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str) -> Pool {
        Pool::new(
            cidr.parse().unwrap(),
            Some(Ipv4Addr::new(10, 0, 0, 1)),
            1_000,
        )
    }

    #[test]
    fn leases_skip_reservations_and_are_idempotent() {
        let mut pool = pool("10.0.0.0/29");
        let a = Owner::new("vm-a", 0);
        let ip = pool.allocate(a.clone(), None, 0).unwrap();
        assert_eq!(
            ip,
            Ipv4Addr::new(10, 0, 0, 2),
            "network and gateway are skipped"
        );
        assert_eq!(pool.allocate(a.clone(), None, 0).unwrap(), ip);
        assert!(matches!(
            pool.allocate(a, Some(Ipv4Addr::new(10, 0, 0, 5)), 0),
            Err(IpamError::OwnerHoldsOther { .. })
        ));
        // 8 addresses - network - broadcast - gateway = 5; one is used.
        for nic in 1..5 {
            pool.allocate(Owner::new("vm-a", nic), None, 0).unwrap();
        }
        let err = pool.allocate(Owner::new("vm-b", 0), None, 0).unwrap_err();
        assert!(
            matches!(
                err,
                IpamError::Exhausted {
                    leased: 5,
                    reserved: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("10.0.0.0/29 is exhausted"));
    }

    #[test]
    fn static_requests_are_checked() {
        let mut pool = pool("10.0.0.0/24");
        let ip = Ipv4Addr::new(10, 0, 0, 50);
        assert_eq!(pool.allocate(Owner::new("a", 0), Some(ip), 0), Ok(ip));
        assert!(matches!(
            pool.allocate(Owner::new("b", 0), Some(ip), 0),
            Err(IpamError::InUse { .. })
        ));
        for reserved in [
            Ipv4Addr::new(10, 0, 0, 0),
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 255),
        ] {
            assert!(matches!(
                pool.allocate(Owner::new("b", 0), Some(reserved), 0),
                Err(IpamError::Reserved { .. })
            ));
        }
        assert!(matches!(
            pool.allocate(Owner::new("b", 0), Some(Ipv4Addr::new(10, 0, 1, 1)), 0),
            Err(IpamError::OutOfRange { .. })
        ));
        pool.reserve(Ipv4Addr::new(10, 0, 0, 60)).unwrap();
        assert!(
            pool.reserve(ip).is_err(),
            "a leased address cannot be reserved"
        );
    }

    #[test]
    fn released_addresses_wait_out_the_grace_period() {
        let mut pool = pool("10.0.0.0/30"); // one usable address: .2
        let a = Owner::new("a", 0);
        let ip = pool.allocate(a.clone(), None, 0).unwrap();
        assert_eq!(pool.release(&a, 100), Some(ip));
        assert!(matches!(
            pool.allocate(Owner::new("b", 0), None, 500),
            Err(IpamError::Exhausted { .. })
        ));
        // The owner may take it back during the grace period.
        assert_eq!(pool.allocate(a.clone(), None, 600), Ok(ip));
        assert_eq!(pool.lease_of(&a).map(|l| l.state), Some(LeaseState::Active));
        pool.release(&a, 700);
        assert_eq!(pool.allocate(Owner::new("b", 0), None, 1_700), Ok(ip));
        assert!(pool.lease_of(&a).is_none());
    }
}
