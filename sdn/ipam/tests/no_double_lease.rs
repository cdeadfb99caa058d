//! Property: whatever sequence of allocations (dynamic and static),
//! releases and expiries a pool sees, no address is ever leased to two
//! owners, no owner holds two addresses, and no reserved or outside
//! address is ever leased.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use basalt_ipam::{Cidr, Owner, Pool};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Allocate { vm: u8, nic: u8, ip: Option<u8> },
    Release { vm: u8, nic: u8 },
    Advance { ms: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..12, 0u8..3, proptest::option::of(any::<u8>()))
            .prop_map(|(vm, nic, ip)| Op::Allocate { vm, nic, ip }),
        2 => (0u8..12, 0u8..3).prop_map(|(vm, nic)| Op::Release { vm, nic }),
        1 => (0u16..3_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

proptest! {
    #[test]
    fn no_address_is_ever_leased_twice(prefix in 26u8..=30, ops in proptest::collection::vec(op(), 1..300)) {
        let cidr = Cidr::new(Ipv4Addr::new(10, 9, 0, 0), prefix).unwrap();
        let gateway = Ipv4Addr::new(10, 9, 0, 1);
        let mut pool = Pool::new(cidr, Some(gateway), 1_000);
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Allocate { vm, nic, ip } => {
                    let requested = ip.map(|last| Ipv4Addr::new(10, 9, 0, last));
                    let owner = Owner::new(format!("vm-{vm}"), u32::from(nic));
                    if let Ok(ip) = pool.allocate(owner.clone(), requested, now) {
                        prop_assert!(cidr.contains(ip));
                        prop_assert!(!pool.is_reserved(ip));
                        prop_assert_eq!(pool.holder(ip).map(|l| &l.owner), Some(&owner));
                    }
                }
                Op::Release { vm, nic } => {
                    pool.release(&Owner::new(format!("vm-{vm}"), u32::from(nic)), now);
                }
                Op::Advance { ms } => now += u64::from(ms),
            }
            let mut owners = BTreeMap::new();
            for lease in pool.leases() {
                prop_assert!(cidr.contains(lease.ip));
                prop_assert!(!pool.is_reserved(lease.ip));
                prop_assert!(owners.insert(lease.owner.clone(), lease.ip).is_none(),
                    "{} holds two addresses", lease.owner);
                prop_assert_eq!(pool.lease_of(&lease.owner).map(|l| l.ip), Some(lease.ip));
            }
        }
    }
}
