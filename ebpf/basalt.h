/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Basalt datapath ABI: the map keys, values and events shared between the
 * TC programs (datapath.c) and user space. Mirrored once, field for field,
 * in sdn/src/abi.rs; a change here is a change there, and the sizes are
 * checked by static asserts on both sides.
 *
 * Byte order: every IPv4 address is in network order (as on the wire),
 * every port in host order, every identity, VNI and ifindex in host order.
 */
#ifndef BASALT_H
#define BASALT_H

#include <linux/types.h>

/* The on-link gateway every guest routes through. */
#define BASALT_GATEWAY_IP_HOST 0xA9FE0101u /* 169.254.1.1 */

/* Flags of struct endpoint. */
#define EP_LOCAL (1u << 0) /* on this node: ifindex is valid */
/* A policy selects the endpoint's identity for ingress / egress: the
 * programs skip connection-tracking lookups and policy for packets whose
 * endpoints have neither (subjects stays the authority when set). */
#define EP_SEL_INGRESS (1u << 1)
#define EP_SEL_EGRESS  (1u << 2)
/* Local, and its "tap" is a veth: a packet on a TC ingress goes straight
 * to the other end (bpf_redirect_peer), sparing the veth's queue. */
#define EP_PEER        (1u << 3)
/* Remote endpoints: packets for it leave natively (unencapsulated, to its
 * owner node as the next hop), as its network's routing mode says, or the
 * node's when the network says nothing; else over the overlay. */
#define EP_NATIVE      (1u << 4)

/* Flags of struct config. */
#define CFG_NATIVE (1u << 0) /* the node's default routing is native (for
			      * networks that do not say); the programs
			      * follow each endpoint's EP_NATIVE, this is
			      * for the operator's view */

/* Flags of struct iface. */
#define IFACE_STANDBY (1u << 0) /* tap waits for the guest (migration target) */

/* Flags of struct subject (per identity). */
#define SUBJ_INGRESS (1u << 0) /* a policy selects it for ingress */
#define SUBJ_EGRESS  (1u << 1) /* a policy selects it for egress */

/* Policy directions (struct policy_*_key.direction). */
#define DIR_INGRESS 0
#define DIR_EGRESS  1

/* Policy rule actions. */
#define ACT_ALLOW 1
#define ACT_DENY  2

#define MAX_RULES 16

/* Drop reasons: index into the drops per-CPU array. */
enum drop_reason {
	DROP_NONE = 0,
	DROP_UNKNOWN_IFACE = 1, /* program runs on an interface no endpoint owns */
	DROP_SPOOF_MAC = 2,     /* source MAC is not the endpoint's */
	DROP_SPOOF_IP = 3,      /* source IP (or ARP sender) is not the endpoint's */
	DROP_ARP_NOT_GATEWAY = 4, /* ARP request for anything but the gateway */
	DROP_POLICY = 5,        /* denied by policy */
	DROP_NO_ENDPOINT = 6,   /* destination in a VM network, no such endpoint */
	DROP_MALFORMED = 7,     /* truncated or unparsable headers */
	DROP_UNSUPPORTED_L3 = 8, /* neither IPv4 nor ARP */
	DROP_TUNNEL = 9,        /* setting or reading the tunnel key failed, or
				 * (native routing) no path to the owner node */
	DROP_NOT_OWNER = 10,    /* overlay or native packet from a node that does not own its source */
	DROP_STANDBY = 11,      /* frame on a standby tap (after its activation event) */
	DROP_NO_NEIGHBOUR = 12, /* native packet whose source's owner node (its next
				 * hop from here) this node has not resolved: the
				 * sender cannot be told, so it is not let in */
	DROP_MAX = 13,
};

/* Event kinds on the events ring buffer. */
#define EVENT_DROP       1
#define EVENT_ACTIVATION 2

/* Per-node configuration: array map, key 0. */
struct config {
	__u8 gateway_mac[6];
	__u16 flags;          /* CFG_* */
	__u32 node_ip;        /* this node's underlay address (network order) */
	__u32 vxlan_ifindex;  /* the node's collect-metadata VXLAN device, 0 = none */
};

/* endpoints: IPv4 (network order) -> endpoint. Every endpoint of every
 * network; ifindex only for local ones. */
struct endpoint {
	__u32 ifindex;
	__u32 node_ip;   /* owner node's underlay address (network order) */
	__u32 identity;  /* label identity, 0 = none */
	__u32 vni;       /* the network's VXLAN VNI */
	__u8 mac[6];
	__u16 flags;     /* EP_* */
};

/* ifaces: ifindex of a local tap -> the IP of the endpoint it serves. */
struct iface {
	__u32 ip;        /* network order */
	__u32 flags;     /* IFACE_* */
	__u32 activated; /* set by the program on a standby tap's first frame */
	__u32 pad;
};

/* networks: LPM trie of VM network CIDRs -> VNI. */
struct network_key {
	__u32 prefixlen;
	__u32 addr;      /* network order */
};

/* subjects: identity -> SUBJ_* flags. */
struct subject {
	__u32 flags;
	__u32 pad;
};

struct rule {
	__u8 proto;      /* IPPROTO_*, 0 = any */
	__u8 action;     /* ACT_* */
	__u16 port_lo;   /* host order; 0..65535 = any */
	__u16 port_hi;
	__u16 pad;
};

struct rules {
	__u32 count;
	__u32 pad;
	struct rule rule[MAX_RULES];
};

/* policy_cidr: LPM trie. prefixlen covers subject and direction (64 bits,
 * always) plus the peer prefix. */
struct policy_cidr_key {
	__u32 prefixlen;
	__u32 subject;   /* identity of the selected endpoint */
	__u8 direction;  /* DIR_* */
	__u8 pad[3];
	__u32 peer;      /* network order */
};

/* policy_id: (subject, peer identity, direction) -> rules. */
struct policy_id_key {
	__u32 subject;
	__u32 peer;
	__u8 direction;
	__u8 pad[3];
};

/* Flags of struct ct_value. */
#define CT_REPLY     (1u << 0) /* a packet went the other way: the flow is answered */
#define CT_CLOSING   (1u << 1) /* TCP: a FIN or RST was seen */
#define CT_ORIG_HIGH (1u << 2) /* the first packet came from the key's second end */
#define CT_FIN_HIGH  (1u << 3) /* TCP: the first FIN came from the key's second end */

/* TCP states of struct ct_value.tcp_state, a subset of the kernel's
 * conntrack (each has its timeout, see sdn/src/conntrack.rs). An entry
 * made before states were kept has CT_TCP_NONE and ages by its flags. */
#define CT_TCP_NONE        0
#define CT_TCP_SYN_SENT    1 /* the opener's SYN */
#define CT_TCP_SYN_RECV    2 /* the answer's SYN+ACK */
#define CT_TCP_ESTABLISHED 3 /* the opener's ACK of it, or a flow picked up mid-way */
#define CT_TCP_FIN_WAIT    4 /* a FIN from either end (the first closer) */
#define CT_TCP_CLOSE       5 /* a RST */
#define CT_TCP_CLOSE_WAIT  6 /* the other end acknowledged that FIN */
#define CT_TCP_LAST_ACK    7 /* the other end's FIN too, not yet acknowledged */
#define CT_TCP_TIME_WAIT   8 /* the first closer acknowledged it: closed both ways */

/* conntrack: LRU hash. The key holds the flow's two ends in a fixed
 * order, the lower (address, port) first — addresses compared as the
 * 32-bit values the maps store — so one lookup finds the flow from
 * either direction; CT_ORIG_HIGH says which end spoke first.
 * Entries age: every packet of the flow stamps last_seen_ns, and user
 * space (basalt-sdn's conntrack sweep) removes an entry idle for longer
 * than its protocol's and state's timeout. */
struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ct_value {
	__u64 created_ns;   /* CLOCK_MONOTONIC, coarse */
	__u64 packets;      /* counted for flows under policy only */
	__u64 last_seen_ns; /* the flow's latest packet, same clock */
	__u32 flags;        /* CT_* */
	__u8 tcp_state;     /* CT_TCP_*, TCP only */
	__u8 pad[3];
};

/* events ring buffer entry. */
struct event {
	__u32 kind;      /* EVENT_* */
	__u32 reason;    /* drop_reason for EVENT_DROP */
	__u32 ifindex;
	__u32 saddr;     /* network order */
	__u32 daddr;     /* network order */
	__u8 smac[6];
	__u16 eth_proto; /* host order */
};

#endif
