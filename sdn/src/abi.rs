//! The datapath's ABI: map keys, values and events, mirrored field for
//! field from `ebpf/basalt.h`.
//!
//! Invariants: every struct here is `#[repr(C)]` with explicit padding and
//! the size of its C twin (checked below at compile time); IPv4 addresses
//! are stored as the wire's bytes (`u32::from_ne_bytes(addr.octets())`),
//! ports, identities, VNIs and ifindexes in host order.

use std::net::Ipv4Addr;

/// The on-link gateway every guest routes through.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The gateway's MAC on every node and every tap (locally administered), so
/// a guest's ARP entry stays valid when it moves.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0xba, 0x5a, 0x17, 0x00, 0x01];

/// `endpoint.flags`: the endpoint lives on this node (`ifindex` is valid).
pub const EP_LOCAL: u16 = 1 << 0;
/// `endpoint.flags`: a policy selects the endpoint's identity for ingress
/// (the programs look up connection tracking and policy only for packets
/// whose endpoints carry a selection flag).
pub const EP_SEL_INGRESS: u16 = 1 << 1;
/// `endpoint.flags`: a policy selects the endpoint's identity for egress.
pub const EP_SEL_EGRESS: u16 = 1 << 2;
/// `endpoint.flags`: local, and its tap is a veth: packets arriving on a
/// TC ingress are handed straight to the other end (`bpf_redirect_peer`).
pub const EP_PEER: u16 = 1 << 3;
/// `endpoint.flags`: packets for it leave this node natively (its
/// network's routing mode, else the node's); without it, over the
/// overlay. Only read for remote endpoints.
pub const EP_NATIVE: u16 = 1 << 4;
/// `config.flags`: the node's default routing is native (for networks
/// that do not say). The programs follow each endpoint's [`EP_NATIVE`];
/// this one is for the operator's view.
pub const CFG_NATIVE: u16 = 1 << 0;
/// `iface.flags`: the tap waits for the guest (a migration target).
pub const IFACE_STANDBY: u32 = 1 << 0;
/// `subject.flags`: a policy selects the identity for ingress.
pub const SUBJ_INGRESS: u32 = 1 << 0;
/// `subject.flags`: a policy selects the identity for egress.
pub const SUBJ_EGRESS: u32 = 1 << 1;
/// Policy direction: traffic to the subject.
pub const DIR_INGRESS: u8 = 0;
/// Policy direction: traffic from the subject.
pub const DIR_EGRESS: u8 = 1;
/// Rule action: allow.
pub const ACT_ALLOW: u8 = 1;
/// Rule action: deny.
pub const ACT_DENY: u8 = 2;
/// Rules per map value (per subject, direction and peer).
pub const MAX_RULES: usize = 16;
/// Event kind: a drop.
pub const EVENT_DROP: u32 = 1;
/// Event kind: an activation (first frame on a standby tap).
pub const EVENT_ACTIVATION: u32 = 2;

/// The wire representation of an IPv4 address in a map.
pub fn ip_key(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The address a map's wire representation stands for.
pub fn ip_from_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

/// Why the datapath dropped a packet: the index into the `drops` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum DropReason {
    /// The program ran on an interface no endpoint owns.
    UnknownIface = 1,
    /// The source MAC is not the endpoint's.
    SpoofMac = 2,
    /// The source IP (or ARP sender) is not the endpoint's.
    SpoofIp = 3,
    /// An ARP request for anything but the gateway.
    ArpNotGateway = 4,
    /// Denied by policy.
    Policy = 5,
    /// The destination is in a VM network but no endpoint has it.
    NoEndpoint = 6,
    /// Truncated or unparsable headers.
    Malformed = 7,
    /// Neither IPv4 nor ARP.
    UnsupportedL3 = 8,
    /// Setting or reading the tunnel key failed, or (native routing) no
    /// path to the destination's owner node.
    Tunnel = 9,
    /// An overlay or native packet from a node that does not own its
    /// source.
    NotOwner = 10,
    /// A frame on a standby tap.
    Standby = 11,
    /// A native packet whose source's owner node (its next hop from
    /// here) this node has not resolved, so the sender cannot be told.
    NoNeighbour = 12,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; 12] = [
        DropReason::UnknownIface,
        DropReason::SpoofMac,
        DropReason::SpoofIp,
        DropReason::ArpNotGateway,
        DropReason::Policy,
        DropReason::NoEndpoint,
        DropReason::Malformed,
        DropReason::UnsupportedL3,
        DropReason::Tunnel,
        DropReason::NotOwner,
        DropReason::Standby,
        DropReason::NoNeighbour,
    ];

    /// Length of the `drops` array (`DROP_MAX`).
    pub const COUNT: u32 = 13;

    /// The reason with index `n`, if any.
    pub fn from_index(n: u32) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| *r as u32 == n)
    }

    /// A short, stable name (`spoof-mac`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::UnknownIface => "unknown-iface",
            DropReason::SpoofMac => "spoof-mac",
            DropReason::SpoofIp => "spoof-ip",
            DropReason::ArpNotGateway => "arp-not-gateway",
            DropReason::Policy => "policy",
            DropReason::NoEndpoint => "no-endpoint",
            DropReason::Malformed => "malformed",
            DropReason::UnsupportedL3 => "unsupported-l3",
            DropReason::Tunnel => "tunnel",
            DropReason::NotOwner => "not-owner",
            DropReason::Standby => "standby",
            DropReason::NoNeighbour => "no-neighbour",
        }
    }
}

/// `struct config`: the node's datapath configuration (array key 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Config {
    /// The gateway's MAC.
    pub gateway_mac: [u8; 6],
    /// `CFG_*` flags.
    pub flags: u16,
    /// This node's underlay address (wire order).
    pub node_ip: u32,
    /// The node's VXLAN device, 0 if none.
    pub vxlan_ifindex: u32,
}

/// `struct endpoint`: value of the `endpoints` map (key: IPv4, wire order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct EndpointValue {
    /// The local tap, when [`EP_LOCAL`].
    pub ifindex: u32,
    /// The owner node's underlay address (wire order).
    pub node_ip: u32,
    /// Label identity, 0 = none.
    pub identity: u32,
    /// The network's VXLAN VNI.
    pub vni: u32,
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// `EP_*` flags.
    pub flags: u16,
}

/// `struct iface`: value of the `ifaces` map (key: ifindex).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct IfaceValue {
    /// The endpoint's IPv4 (wire order).
    pub ip: u32,
    /// `IFACE_*` flags.
    pub flags: u32,
    /// Set by the program once a standby tap saw its first frame.
    pub activated: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct subject`: value of the `subjects` map (key: identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct SubjectValue {
    /// `SUBJ_*` flags.
    pub flags: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct RuleValue {
    /// IP protocol number, 0 = any.
    pub proto: u8,
    /// [`ACT_ALLOW`] or [`ACT_DENY`].
    pub action: u8,
    /// Lowest destination port matched (host order).
    pub port_lo: u16,
    /// Highest destination port matched.
    pub port_hi: u16,
    /// Padding.
    pub pad: u16,
}

/// `struct rules`: value of the policy maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct RulesValue {
    /// How many of `rule` are used.
    pub count: u32,
    /// Padding.
    pub pad: u32,
    /// The rules.
    pub rule: [RuleValue; MAX_RULES],
}

/// The data part (after `prefixlen`) of `struct policy_cidr_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct PolicyCidrData {
    /// Identity of the selected endpoint.
    pub subject: u32,
    /// `DIR_*`.
    pub direction: u8,
    /// Padding.
    pub pad: [u8; 3],
    /// Peer prefix (wire order).
    pub peer: u32,
}

/// `struct policy_id_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct PolicyIdKey {
    /// Identity of the selected endpoint.
    pub subject: u32,
    /// Identity of the peer.
    pub peer: u32,
    /// `DIR_*`.
    pub direction: u8,
    /// Padding.
    pub pad: [u8; 3],
}

/// `struct ct_key`: a flow's two ends, the lower (address, port) first
/// (addresses compared as the `u32` the maps store), so that one lookup
/// finds the flow from either direction ([`CtKey::canonical`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[repr(C)]
pub struct CtKey {
    /// Source (wire order).
    pub saddr: u32,
    /// Destination (wire order).
    pub daddr: u32,
    /// Source port (host order).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Padding.
    pub pad: [u8; 3],
}

/// `ct_value.flags`: a packet went the other way (the flow is answered).
pub const CT_REPLY: u32 = 1 << 0;
/// `ct_value.flags`: TCP sent a FIN or RST (the flow is closing).
pub const CT_CLOSING: u32 = 1 << 1;
/// `ct_value.flags`: the flow's first packet came from the key's second
/// end (`daddr`, `dport`).
pub const CT_ORIG_HIGH: u32 = 1 << 2;
/// `ct_value.flags`: TCP, the first FIN came from the key's second end
/// (the closing states tell the first closer's packets from the other's).
pub const CT_FIN_HIGH: u32 = 1 << 3;

/// `ct_value.tcp_state`: none kept (not TCP, or an entry made before
/// states were): the entry ages by its flags.
pub const CT_TCP_NONE: u8 = 0;
/// `ct_value.tcp_state`: the opener's SYN was seen.
pub const CT_TCP_SYN_SENT: u8 = 1;
/// `ct_value.tcp_state`: the other end's SYN+ACK was seen.
pub const CT_TCP_SYN_RECV: u8 = 2;
/// `ct_value.tcp_state`: the opener acknowledged the SYN+ACK (or the flow
/// was picked up mid-way).
pub const CT_TCP_ESTABLISHED: u8 = 3;
/// `ct_value.tcp_state`: a FIN from either end (the first closer).
pub const CT_TCP_FIN_WAIT: u8 = 4;
/// `ct_value.tcp_state`: a RST.
pub const CT_TCP_CLOSE: u8 = 5;
/// `ct_value.tcp_state`: the other end acknowledged the first FIN.
pub const CT_TCP_CLOSE_WAIT: u8 = 6;
/// `ct_value.tcp_state`: the other end sent its FIN too, not yet
/// acknowledged.
pub const CT_TCP_LAST_ACK: u8 = 7;
/// `ct_value.tcp_state`: the first closer acknowledged the other end's
/// FIN: closed both ways.
pub const CT_TCP_TIME_WAIT: u8 = 8;

/// The name of a `CT_TCP_*` state, as the kernel's conntrack spells it.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        CT_TCP_NONE => "NONE",
        CT_TCP_SYN_SENT => "SYN_SENT",
        CT_TCP_SYN_RECV => "SYN_RECV",
        CT_TCP_ESTABLISHED => "ESTABLISHED",
        CT_TCP_FIN_WAIT => "FIN_WAIT",
        CT_TCP_CLOSE => "CLOSE",
        CT_TCP_CLOSE_WAIT => "CLOSE_WAIT",
        CT_TCP_LAST_ACK => "LAST_ACK",
        CT_TCP_TIME_WAIT => "TIME_WAIT",
        _ => "UNKNOWN",
    }
}

/// `struct ct_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct CtValue {
    /// When the flow was first seen (`CLOCK_MONOTONIC`, coarse, ns).
    pub created_ns: u64,
    /// Packets seen (counted for flows under policy only).
    pub packets: u64,
    /// When the flow's latest packet was seen (same clock).
    pub last_seen_ns: u64,
    /// `CT_*` flags.
    pub flags: u32,
    /// `CT_TCP_*`: the TCP flow's state ([`CT_TCP_NONE`] for other
    /// protocols, and for entries made before states were kept).
    pub tcp_state: u8,
    /// Padding.
    pub pad: [u8; 3],
}

impl CtKey {
    /// The same flow with its ends in the order the programs key it: the
    /// lower (address, port) first.
    pub fn canonical(self) -> CtKey {
        if (self.saddr, self.sport) <= (self.daddr, self.dport) {
            return self;
        }
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            pad: [0; 3],
        }
    }
}

impl CtValue {
    /// An answered flow of protocol `proto` seen at `now_ns` (established,
    /// for TCP): what a flow carried from another node (live migration)
    /// or kept across a datapath upgrade starts as.
    pub fn established(proto: u8, now_ns: u64) -> CtValue {
        CtValue {
            created_ns: now_ns,
            packets: 0,
            last_seen_ns: now_ns,
            flags: CT_REPLY,
            tcp_state: if proto == 6 {
                CT_TCP_ESTABLISHED
            } else {
                CT_TCP_NONE
            },
            pad: [0; 3],
        }
    }
}

/// `struct event`: one entry of the `events` ring buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct EventRecord {
    /// [`EVENT_DROP`] or [`EVENT_ACTIVATION`].
    pub kind: u32,
    /// A [`DropReason`] index for drops.
    pub reason: u32,
    /// The interface the frame arrived on.
    pub ifindex: u32,
    /// Source IPv4 (wire order), 0 if none.
    pub saddr: u32,
    /// Destination IPv4 (wire order), 0 if none.
    pub daddr: u32,
    /// Source MAC.
    pub smac: [u8; 6],
    /// Ethertype (host order).
    pub eth_proto: u16,
}

/// Marks `#[repr(C)]` map types as plain old data for aya.
macro_rules! pod {
    ($($ty:ty),* $(,)?) => {$(
        // SAFETY: the type is `#[repr(C)]`, `Copy`, and made only of
        // integers and integer arrays with explicit padding fields (sizes
        // checked below), so it has no implicit padding and every bit
        // pattern is a valid value.
        unsafe impl aya::Pod for $ty {}
    )*};
}

pod!(
    Config,
    EndpointValue,
    IfaceValue,
    SubjectValue,
    RulesValue,
    PolicyCidrData,
    PolicyIdKey,
    CtKey,
    CtValue,
);

const _: () = {
    assert!(size_of::<Config>() == 16);
    assert!(size_of::<EndpointValue>() == 24);
    assert!(size_of::<IfaceValue>() == 16);
    assert!(size_of::<SubjectValue>() == 8);
    assert!(size_of::<RuleValue>() == 8);
    assert!(size_of::<RulesValue>() == 8 + 8 * MAX_RULES);
    assert!(size_of::<PolicyCidrData>() == 12);
    assert!(size_of::<PolicyIdKey>() == 12);
    assert!(size_of::<CtKey>() == 16);
    assert!(size_of::<CtValue>() == 32);
    assert!(size_of::<EventRecord>() == 28);
};

impl EventRecord {
    /// Decodes a ring buffer entry; `None` if it is too short.
    pub fn parse(bytes: &[u8]) -> Option<EventRecord> {
        if bytes.len() < size_of::<EventRecord>() {
            return None;
        }
        let u32_at =
            |o: usize| u32::from_ne_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let mut smac = [0u8; 6];
        smac.copy_from_slice(&bytes[20..26]);
        Some(EventRecord {
            kind: u32_at(0),
            reason: u32_at(4),
            ifindex: u32_at(8),
            saddr: u32_at(12),
            daddr: u32_at(16),
            smac,
            eth_proto: u16::from_ne_bytes([bytes[26], bytes[27]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_keys_put_the_lower_end_first() {
        let (a, b) = (
            ip_key(Ipv4Addr::new(10, 77, 0, 1)),
            ip_key(Ipv4Addr::new(10, 77, 0, 2)),
        );
        let forward = CtKey {
            saddr: a,
            daddr: b,
            sport: 40000,
            dport: 7000,
            proto: 6,
            pad: [0; 3],
        };
        let reverse = CtKey {
            saddr: b,
            daddr: a,
            sport: 7000,
            dport: 40000,
            proto: 6,
            pad: [0; 3],
        };
        assert_eq!(forward.canonical(), reverse.canonical());
        assert_eq!(forward.canonical().canonical(), forward.canonical());
        // One address: the ports decide.
        let same = CtKey {
            saddr: a,
            daddr: a,
            sport: 9,
            dport: 8,
            proto: 17,
            pad: [0; 3],
        };
        assert_eq!((same.canonical().sport, same.canonical().dport), (8, 9));
    }
}
