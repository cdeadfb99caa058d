// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Basalt's VM datapath: two TC programs.
 *
 * from_vm      on the TCX ingress of every VM tap (host side): anti-spoofing,
 *              the gateway's ARP answer, connection tracking, egress and
 *              ingress policy, then a redirect to the local destination tap,
 *              to the node's VXLAN device with a tunnel key, or up the host
 *              stack (the gateway itself, DHCP, the outside through SNAT).
 * from_overlay on the TCX ingress of the node's collect-metadata VXLAN
 *              device: checks the sender node owns the source, ingress
 *              policy, then a redirect to the local destination tap.
 * from_uplink  on the TCX ingress of the node's underlay interface: the
 *              same for single packets without TCP data, decapsulated in
 *              place (the fast path); the rest goes on to from_overlay.
 *              And native routing's receive side: a packet between two
 *              endpoints that came unencapsulated from the owner node of
 *              its source gets ingress policy and goes to its tap.
 *
 * With native routing (EP_NATIVE on the destination's endpoint entry: its
 * network's mode, else the node's) from_vm sends a packet for a remote
 * endpoint as it is, to the owner node's underlay address as the
 * next hop (a FIB lookup, then a redirect to the uplink with the
 * neighbour's MAC); without it, through the overlay. Every node receives
 * both ways whatever its own setting.
 *
 * Every entry point calls a try_* style function that returns a verdict;
 * anything unexpected ends in a counted drop, never in TC_ACT_OK by default.
 * The ABI shared with user space is in basalt.h.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "basalt.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define LIBBPF_PIN_BY_NAME 1

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct iface);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct network_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} networks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct subject);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} subjects SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__type(key, struct policy_cidr_key);
	__type(value, struct rules);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_cidr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct policy_id_key);
	__type(value, struct rules);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_id SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

/*
 * Native routing's next hops, by node underlay address (network order):
 * what the last FIB lookup towards that node said (output interface and
 * the frame's MACs), reused for NEXTHOP_TTL_NS so that a packet costs one
 * hash lookup instead of a FIB lookup on each node. A cache the programs
 * keep themselves (not pinned: a new loader starts it empty): the sender
 * uses a fresh entry as it is; the receiver trusts one only when the
 * frame's source MAC matches it, and looks the FIB up again before it
 * drops anything, so a stale entry never refuses a legitimate frame.
 */
struct nexthop {
	__u64 checked_ns; /* coarse CLOCK_MONOTONIC of the lookup */
	__u32 ifindex;
	__u8 smac[6];
	__u8 dmac[6];
};

#define NEXTHOP_TTL_NS 500000000ull

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct nexthop);
} nexthops SEC(".maps");

/* From linux/if_arp.h, which drags in libc headers. */
#define ARPHRD_ETHER 1
#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2

struct arphdr {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
};

struct arp_eth {
	struct arphdr hdr;
	__u8 sha[ETH_ALEN];
	__u8 sip[4];
	__u8 tha[ETH_ALEN];
	__u8 tip[4];
} __attribute__((packed));

/* What the parser learnt about an IPv4 packet. */
struct flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 tcp_flags;  /* byte 13 of the TCP header, 0 otherwise */
	__u16 tcp_payload; /* TCP segment data bytes, 0 otherwise */
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] &&
	       a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
	dst[4] = src[4];
	dst[5] = src[5];
}

static __always_inline void emit(__u32 kind, __u32 reason, __u32 ifindex,
				 const struct flow *f, const __u8 *smac, __u16 proto)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e)
		return;
	e->kind = kind;
	e->reason = reason;
	e->ifindex = ifindex;
	e->saddr = f ? f->saddr : 0;
	e->daddr = f ? f->daddr : 0;
	if (smac)
		mac_copy(e->smac, smac);
	else
		__builtin_memset(e->smac, 0, sizeof(e->smac));
	e->eth_proto = proto;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int drop(__u32 ifindex, __u32 reason,
				const struct flow *f, const __u8 *smac, __u16 proto)
{
	__u32 key = reason;
	__u64 *count = bpf_map_lookup_elem(&drops, &key);

	if (count)
		*count += 1;
	emit(EVENT_DROP, reason, ifindex, f, smac, proto);
	return TC_ACT_SHOT;
}

/* Whether the rules allow (1), deny (-1) or say nothing (0) about a flow. */
static __always_inline int eval_rules(const struct rules *r, __u8 proto, __u16 port)
{
	int verdict = 0;

#pragma unroll
	for (int i = 0; i < MAX_RULES; i++) {
		if ((__u32)i >= r->count)
			break;
		const struct rule *rule = &r->rule[i];
		if (rule->proto && rule->proto != proto)
			continue;
		if (port < rule->port_lo || port > rule->port_hi)
			continue;
		if (rule->action == ACT_DENY)
			return -1;
		if (rule->action == ACT_ALLOW)
			verdict = 1;
	}
	return verdict;
}

/*
 * Whether `subject` may talk to `peer` in `dir`: allowed until a policy
 * selects the subject for that direction; then only what a rule allows,
 * and a matching deny beats any allow.
 */
static __always_inline int policy_allows(__u32 subject, __u8 dir, __u32 peer_ip,
					 __u32 peer_id, __u8 proto, __u16 dport)
{
	struct subject *s = bpf_map_lookup_elem(&subjects, &subject);
	__u32 bit = dir == DIR_INGRESS ? SUBJ_INGRESS : SUBJ_EGRESS;
	int allowed = 0, v;

	if (!s || !(s->flags & bit))
		return 1;

	struct policy_cidr_key ck = {
		.prefixlen = 64 + 32,
		.subject = subject,
		.direction = dir,
		.peer = peer_ip,
	};
	struct rules *r = bpf_map_lookup_elem(&policy_cidr, &ck);
	if (r) {
		v = eval_rules(r, proto, dport);
		if (v < 0)
			return 0;
		allowed |= v;
	}
	if (peer_id) {
		struct policy_id_key ik = {
			.subject = subject,
			.peer = peer_id,
			.direction = dir,
		};
		r = bpf_map_lookup_elem(&policy_id, &ik);
		if (r) {
			v = eval_rules(r, proto, dport);
			if (v < 0)
				return 0;
			allowed |= v;
		}
	}
	return allowed;
}

static __always_inline int tcp_opening(const struct flow *f)
{
	return f->proto == IPPROTO_TCP &&
	       (f->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/*
 * The packet's flow as conntrack keys it (see basalt.h): its two ends,
 * the lower (address, port) first. Returns 1 when the packet comes from
 * the key's second end, 0 otherwise.
 */
static __always_inline int ct_key_of(const struct flow *f, struct ct_key *k)
{
	int high = f->saddr > f->daddr || (f->saddr == f->daddr && f->sport > f->dport);

	k->saddr = high ? f->daddr : f->saddr;
	k->daddr = high ? f->saddr : f->daddr;
	k->sport = high ? f->dport : f->sport;
	k->dport = high ? f->sport : f->dport;
	k->proto = f->proto;
	return high;
}

/*
 * The TCP state a packet moves its flow to (see basalt.h), from `state`;
 * `orig` says the packet comes from the end that opened the flow,
 * `closer` that it comes from the end that sent the flow's first FIN
 * (read in the closing states only). A RST closes. The close, as the
 * kernel's conntrack follows it: a first FIN makes FIN_WAIT; the other
 * end's acknowledgement (or data) CLOSE_WAIT; its own FIN LAST_ACK (from
 * FIN_WAIT too: both closing at once); the first closer's acknowledgement
 * of it TIME_WAIT. The closer's own retransmissions change nothing. The
 * opener's SYN (re)starts the flow (ct_touch reopens a closed one), the
 * other end's SYN+ACK answers it, and the opener's next packet without
 * SYN establishes it.
 */
static __always_inline __u8 tcp_next(__u8 state, const struct flow *f, int orig, int closer)
{
	__u8 fl = f->tcp_flags;

	if (fl & TCP_FLAG_RST)
		return CT_TCP_CLOSE;
	if (state == CT_TCP_FIN_WAIT || state == CT_TCP_CLOSE_WAIT) {
		if (closer)
			return state;
		if (fl & TCP_FLAG_FIN)
			return CT_TCP_LAST_ACK;
		if (fl & TCP_FLAG_ACK)
			return CT_TCP_CLOSE_WAIT;
		return state;
	}
	if (state == CT_TCP_LAST_ACK) {
		if (closer && (fl & (TCP_FLAG_ACK | TCP_FLAG_FIN)) == TCP_FLAG_ACK)
			return CT_TCP_TIME_WAIT;
		return state;
	}
	if (state == CT_TCP_TIME_WAIT || state == CT_TCP_CLOSE)
		return state;
	if (fl & TCP_FLAG_FIN)
		return CT_TCP_FIN_WAIT;
	if ((fl & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return orig ? CT_TCP_SYN_SENT : state;
	if (fl & TCP_FLAG_SYN)
		return !orig && state == CT_TCP_SYN_SENT ? CT_TCP_SYN_RECV : state;
	if (orig && state == CT_TCP_SYN_RECV)
		return CT_TCP_ESTABLISHED;
	return state;
}

/*
 * Brings a flow's entry up to date with one of its packets, which comes
 * from the key's second end when `high`: last seen now (the coarse clock,
 * written only when it moved, so a busy flow does not dirty the entry on
 * every packet), answered once a packet goes the other way than the
 * first, closing once TCP sends a FIN or RST, and its TCP state. A SYN on
 * a closing entry is a new connection reusing the tuple: it starts
 * afresh, opened by its sender.
 */
static __always_inline void ct_touch(struct ct_value *v, const struct flow *f, int high)
{
	__u64 now = bpf_ktime_get_coarse_ns();
	__u32 flags = v->flags, want = flags;

	if (v->last_seen_ns != now)
		v->last_seen_ns = now;
	if (high != !!(flags & CT_ORIG_HIGH))
		want |= CT_REPLY;
	if (f->proto == IPPROTO_TCP) {
		__u8 state = v->tcp_state, next;

		if (f->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
			want |= CT_CLOSING;
		else if ((flags & CT_CLOSING) && tcp_opening(f)) {
			want = high ? CT_ORIG_HIGH : 0;
			state = CT_TCP_NONE;
		}
		next = tcp_next(state, f, high == !!(want & CT_ORIG_HIGH),
				high == !!(want & CT_FIN_HIGH));
		/* The first FIN: remember which end closes first. */
		if (next == CT_TCP_FIN_WAIT && state != CT_TCP_FIN_WAIT)
			want = (want & ~CT_FIN_HIGH) | (high ? CT_FIN_HIGH : 0);
		if (next != v->tcp_state)
			v->tcp_state = next;
	}
	if (want != flags)
		v->flags = want;
}

/* The entry of the packet's flow (one lookup, either direction), brought
 * up to date (see ct_touch); NULL if the flow is not tracked. */
static __always_inline struct ct_value *ct_find(const struct flow *f)
{
	struct ct_key k = {};
	int high = ct_key_of(f, &k);
	struct ct_value *v = bpf_map_lookup_elem(&conntrack, &k);

	if (v)
		ct_touch(v, f, high);
	return v;
}

/*
 * A new entry for the packet's flow, opened by the packet's sender. A TCP
 * flow seen first by anything but its opening SYN (tracking picking it
 * up mid-way: after an agent upgrade, or once its entry expired) is taken
 * as answered.
 */
static __always_inline void ct_create(const struct flow *f)
{
	struct ct_key k = {};
	int high = ct_key_of(f, &k);
	__u64 now = bpf_ktime_get_coarse_ns();
	struct ct_value v = { .created_ns = now, .last_seen_ns = now, .packets = 1 };

	if (high)
		v.flags |= CT_ORIG_HIGH;
	if (f->proto == IPPROTO_TCP) {
		if (!tcp_opening(f))
			v.flags |= CT_REPLY;
		if (f->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
			v.flags |= CT_CLOSING;
		/* Picked up mid-way: as the kernel's loose pick-up, established
		 * (unless the packet already closes). */
		v.tcp_state = tcp_next(tcp_opening(f) ? CT_TCP_NONE : CT_TCP_ESTABLISHED, f, 1, 0);
		if (v.tcp_state == CT_TCP_FIN_WAIT && high)
			v.flags |= CT_FIN_HIGH;
	}
	bpf_map_update_elem(&conntrack, &k, &v, BPF_NOEXIST);
}

/*
 * Tracking without enforcement (no policy selects either endpoint): the
 * flow only has to be known if a policy comes later, so that it leaves
 * established flows alone, and stay known while it is alive. Every packet
 * finds and refreshes its flow's entry (one lookup, no counting) and
 * makes it when missing.
 */
static __always_inline void ct_remember(const struct flow *f)
{
	if (!ct_find(f))
		ct_create(f);
}

/*
 * Connection tracking and policy for a packet between two endpoints: 1 if
 * it may pass. `egress` / `ingress` say which sides this hook enforces
 * (the source's egress on the sending node, the destination's ingress on
 * the node that holds it). Known flows pass without a policy check; new
 * ones need every enforcing side's policy, then get an entry. A TCP SYN
 * on a closing or closed flow's entry is a new connection that reuses the
 * tuple (a client that binds its port, or one whose ports came round): it
 * is judged as a new flow, as the kernel's conntrack takes it, and only
 * once allowed restarts the entry; refused, it leaves the entry as it was.
 */
static __always_inline int admit(const struct flow *f, const struct endpoint *src,
				 const struct endpoint *dst, int egress, int ingress)
{
	struct ct_key k = {};
	struct ct_value *v;
	int high;

	egress = egress && (src->flags & EP_SEL_EGRESS);
	ingress = ingress && (dst->flags & EP_SEL_INGRESS);
	if (!egress && !ingress) {
		ct_remember(f);
		return 1;
	}
	high = ct_key_of(f, &k);
	v = bpf_map_lookup_elem(&conntrack, &k);
	if (v && !((v->flags & CT_CLOSING) && tcp_opening(f))) {
		ct_touch(v, f, high);
		__sync_fetch_and_add(&v->packets, 1);
		return 1;
	}
	if (egress && !policy_allows(src->identity, DIR_EGRESS, f->daddr, dst->identity,
				     f->proto, f->dport))
		return 0;
	if (ingress && !policy_allows(dst->identity, DIR_INGRESS, f->saddr, src->identity,
				      f->proto, f->dport))
		return 0;
	if (v) {
		ct_touch(v, f, high);
		__sync_fetch_and_add(&v->packets, 1);
		return 1;
	}
	ct_create(f);
	return 1;
}

/* Parses the IPv4 header at offset `off` and its ports. 0 on success, -1
 * if malformed. */
static __always_inline int parse_ipv4_at(struct __sk_buff *skb, struct flow *f, __u32 off)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + off;

	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->proto = ip->protocol;
	f->sport = 0;
	f->dport = 0;
	f->tcp_flags = 0;
	f->tcp_payload = 0;
	/* Non-first fragments carry no ports. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;
	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
		return 0;
	__u16 *ports = (void *)ip + ip->ihl * 4;
	if ((void *)(ports + 2) > data_end)
		return -1;
	f->sport = bpf_ntohs(ports[0]);
	f->dport = bpf_ntohs(ports[1]);
	if (f->proto == IPPROTO_TCP) {
		__u8 *l4 = (void *)ports;
		if ((void *)(l4 + 14) > data_end)
			return -1;
		f->tcp_flags = l4[13];
		__u32 headers = ip->ihl * 4 + (l4[12] >> 4) * 4;
		__u32 total = bpf_ntohs(ip->tot_len);
		f->tcp_payload = total > headers ? total - headers : 0;
	}
	return 0;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct flow *f)
{
	return parse_ipv4_at(skb, f, sizeof(struct ethhdr));
}

/* Rewrites the Ethernet header for a routed hop: from the gateway, to dst. */
static __always_inline int set_l2(struct __sk_buff *skb, const struct config *cfg,
				  const __u8 *dst_mac)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	mac_copy(eth->h_source, cfg->gateway_mac);
	mac_copy(eth->h_dest, dst_mac);
	return 0;
}

static __always_inline int answer_arp(struct __sk_buff *skb, __u32 ifindex,
				      const struct config *cfg,
				      const struct endpoint *ep, __u32 ep_ip)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct arp_eth *arp = data + sizeof(*eth);
	__u32 sip, tip;

	if ((void *)(arp + 1) > data_end)
		return drop(ifindex, DROP_MALFORMED, 0, 0, ETH_P_ARP);
	if (arp->hdr.ar_hrd != bpf_htons(ARPHRD_ETHER) ||
	    arp->hdr.ar_pro != bpf_htons(ETH_P_IP) ||
	    arp->hdr.ar_hln != ETH_ALEN || arp->hdr.ar_pln != 4)
		return drop(ifindex, DROP_MALFORMED, 0, eth->h_source, ETH_P_ARP);

	__builtin_memcpy(&sip, arp->sip, 4);
	__builtin_memcpy(&tip, arp->tip, 4);
	struct flow f = { .saddr = sip, .daddr = tip };

	if (!mac_eq(arp->sha, ep->mac))
		return drop(ifindex, DROP_SPOOF_MAC, &f, eth->h_source, ETH_P_ARP);
	/* 0.0.0.0 is an ARP probe (address conflict detection). */
	if (sip != ep_ip && sip != 0)
		return drop(ifindex, DROP_SPOOF_IP, &f, eth->h_source, ETH_P_ARP);

	if (arp->hdr.ar_op == bpf_htons(ARPOP_REPLY))
		/* The node resolving the guest for return traffic. */
		return TC_ACT_OK;
	if (arp->hdr.ar_op != bpf_htons(ARPOP_REQUEST))
		return drop(ifindex, DROP_MALFORMED, &f, eth->h_source, ETH_P_ARP);
	if (tip != bpf_htonl(BASALT_GATEWAY_IP_HOST))
		return drop(ifindex, DROP_ARP_NOT_GATEWAY, &f, eth->h_source, ETH_P_ARP);

	/* Turn the request into the gateway's reply, in place. */
	arp->hdr.ar_op = bpf_htons(ARPOP_REPLY);
	mac_copy(arp->tha, arp->sha);
	__builtin_memcpy(arp->tip, &sip, 4);
	mac_copy(arp->sha, cfg->gateway_mac);
	__builtin_memcpy(arp->sip, &tip, 4);
	mac_copy(eth->h_dest, eth->h_source);
	mac_copy(eth->h_source, cfg->gateway_mac);
	return bpf_redirect(ifindex, 0);
}

static __always_inline int to_overlay(struct __sk_buff *skb, const struct config *cfg,
				      const struct endpoint *dst)
{
	struct bpf_tunnel_key key = {};

	if (!cfg->vxlan_ifindex)
		return -1;
	key.tunnel_id = dst->vni;
	key.remote_ipv4 = bpf_ntohl(dst->node_ip);
	key.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return -1;
	return 0;
}

/*
 * Hands a packet, already addressed to the local endpoint `dst` at L2,
 * to its tap; called on a TC ingress only. A veth's other end takes it
 * at once (bpf_redirect_peer: no pass through the veth's queue); a real
 * tap through its transmit.
 */
static __always_inline int deliver(const struct endpoint *dst)
{
	if (dst->flags & EP_PEER)
		return bpf_redirect_peer(dst->ifindex, 0);
	return bpf_redirect(dst->ifindex, 0);
}

/* AF_INET, from linux/socket.h (which drags in libc headers). */
#define BASALT_AF_INET 2

static __always_inline void nexthop_remember(__u32 node_ip, const struct bpf_fib_lookup *fib)
{
	struct nexthop nh = {
		.checked_ns = bpf_ktime_get_coarse_ns(),
		.ifindex = fib->ifindex,
	};

	mac_copy(nh.smac, fib->smac);
	mac_copy(nh.dmac, fib->dmac);
	bpf_map_update_elem(&nexthops, &node_ip, &nh, BPF_ANY);
}

/* The cached next hop towards `node_ip` if it is fresh, else NULL. */
static __always_inline struct nexthop *nexthop_fresh(__u32 node_ip)
{
	struct nexthop *nh = bpf_map_lookup_elem(&nexthops, &node_ip);

	if (!nh || bpf_ktime_get_coarse_ns() - nh->checked_ns > NEXTHOP_TTL_NS)
		return 0;
	return nh;
}

/*
 * Native routing: sends the packet, already addressed to its endpoint at
 * L2 by set_l2, to its owner node as the next hop, without encapsulation.
 * The FIB says which interface and next hop lead to the node's underlay
 * address (the node itself on a shared segment, a router otherwise); with
 * the neighbour resolved, the frame gets its MACs here and is redirected
 * at once, else bpf_redirect_neigh resolves it. A fresh cached next hop
 * (nexthops) spares the lookup. Returns the verdict, or -1 when there is
 * no path.
 */
static __always_inline int to_native(struct __sk_buff *skb, const struct endpoint *dst)
{
	struct bpf_fib_lookup fib = {};
	void *data, *data_end;
	struct ethhdr *eth;
	struct nexthop *nh = nexthop_fresh(dst->node_ip);
	__u32 ifindex;
	long rc;

	if (nh) {
		ifindex = nh->ifindex;
		mac_copy(fib.smac, nh->smac);
		mac_copy(fib.dmac, nh->dmac);
	} else {
		fib.family = BASALT_AF_INET;
		fib.ipv4_dst = dst->node_ip;
		fib.ifindex = skb->ifindex;
		rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
		if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
			struct bpf_redir_neigh neigh = {
				.nh_family = BASALT_AF_INET,
				.ipv4_nh = fib.ipv4_dst,
			};
			return bpf_redirect_neigh(fib.ifindex, &neigh, sizeof(neigh), 0);
		}
		if (rc != BPF_FIB_LKUP_RET_SUCCESS)
			return -1;
		nexthop_remember(dst->node_ip, &fib);
		ifindex = fib.ifindex;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return -1;
	mac_copy(eth->h_source, fib.smac);
	mac_copy(eth->h_dest, fib.dmac);
	return bpf_redirect(ifindex, 0);
}

static __always_inline int handle_ipv4(struct __sk_buff *skb, __u32 ifindex,
				       const struct config *cfg,
				       const struct endpoint *src, __u32 src_ip)
{
	struct flow f = {};

	if (parse_ipv4(skb, &f) < 0)
		return drop(ifindex, DROP_MALFORMED, 0, 0, ETH_P_IP);

	if (f.saddr != src_ip) {
		/* A DHCP client has no address yet. */
		if (f.saddr == 0 && f.proto == IPPROTO_UDP && f.sport == 68 && f.dport == 67)
			return TC_ACT_OK;
		return drop(ifindex, DROP_SPOOF_IP, &f, src->mac, ETH_P_IP);
	}
	/* The gateway itself (DHCP renewals, ping) and broadcast DHCP. */
	if (f.daddr == bpf_htonl(BASALT_GATEWAY_IP_HOST))
		return TC_ACT_OK;
	if (f.daddr == 0xffffffff && f.proto == IPPROTO_UDP && f.dport == 67)
		return TC_ACT_OK;

	struct endpoint *dst = bpf_map_lookup_elem(&endpoints, &f.daddr);
	if (!dst) {
		struct network_key nk = { .prefixlen = 32, .addr = f.daddr };
		if (bpf_map_lookup_elem(&networks, &nk))
			return drop(ifindex, DROP_NO_ENDPOINT, &f, src->mac, ETH_P_IP);
		/* Outside the VM networks: up the node's stack (SNAT). */
		if ((src->flags & EP_SEL_EGRESS) &&
		    !policy_allows(src->identity, DIR_EGRESS, f.daddr, 0, f.proto, f.dport))
			return drop(ifindex, DROP_POLICY, &f, src->mac, ETH_P_IP);
		return TC_ACT_OK;
	}

	if (!admit(&f, src, dst, 1, dst->flags & EP_LOCAL))
		return drop(ifindex, DROP_POLICY, &f, src->mac, ETH_P_IP);

	if (set_l2(skb, cfg, dst->mac) < 0)
		return drop(ifindex, DROP_MALFORMED, &f, 0, ETH_P_IP);
	if (dst->flags & EP_LOCAL)
		return deliver(dst);
	if (dst->flags & EP_NATIVE) {
		int verdict = to_native(skb, dst);

		if (verdict < 0)
			return drop(ifindex, DROP_TUNNEL, &f, 0, ETH_P_IP);
		return verdict;
	}
	if (to_overlay(skb, cfg, dst) < 0)
		return drop(ifindex, DROP_TUNNEL, &f, 0, ETH_P_IP);
	return bpf_redirect(cfg->vxlan_ifindex, 0);
}

SEC("classifier")
int from_vm(struct __sk_buff *skb)
{
	__u32 zero = 0, ifindex = skb->ifindex;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct iface *ifc = bpf_map_lookup_elem(&ifaces, &ifindex);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 ep_ip;

	if ((void *)(eth + 1) > data_end)
		return drop(ifindex, DROP_MALFORMED, 0, 0, 0);
	if (!cfg || !ifc)
		return drop(ifindex, DROP_UNKNOWN_IFACE, 0, eth->h_source, bpf_ntohs(eth->h_proto));
	ep_ip = ifc->ip;
	struct endpoint *ep = bpf_map_lookup_elem(&endpoints, &ep_ip);
	if (!ep)
		return drop(ifindex, DROP_UNKNOWN_IFACE, 0, eth->h_source, bpf_ntohs(eth->h_proto));
	if (!mac_eq(eth->h_source, ep->mac))
		return drop(ifindex, DROP_SPOOF_MAC, 0, eth->h_source, bpf_ntohs(eth->h_proto));

	if (ifc->flags & IFACE_STANDBY) {
		/* The guest's first frame here (QEMU's announce after a move):
		 * report it once; the agent moves the endpoint. */
		if (__sync_fetch_and_or(&ifc->activated, 1) == 0)
			emit(EVENT_ACTIVATION, 0, ifindex, 0, eth->h_source,
			     bpf_ntohs(eth->h_proto));
		/* The gateway is the same on every node: its ARP answer is
		 * right here already. A guest whose cache lost it (a link
		 * that went down with the move) would otherwise wait for its
		 * next ARP retry, a second later, before sending anything. */
		if (eth->h_proto == bpf_htons(ETH_P_ARP))
			return answer_arp(skb, ifindex, cfg, ep, ep_ip);
		__u32 key = DROP_STANDBY;
		__u64 *count = bpf_map_lookup_elem(&drops, &key);
		if (count)
			*count += 1;
		return TC_ACT_SHOT;
	}

	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return answer_arp(skb, ifindex, cfg, ep, ep_ip);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return handle_ipv4(skb, ifindex, cfg, ep, ep_ip);
	return drop(ifindex, DROP_UNSUPPORTED_L3, 0, eth->h_source, bpf_ntohs(eth->h_proto));
}

/* A VXLAN packet as Basalt's nodes send it: outer Ethernet, IPv4 without
 * options, UDP, VXLAN, then the inner Ethernet frame. */
#define VXLAN_UDP_PORT 4789
#define OUTER_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr) + 8 + 8)
/* What decapsulation removes after the outer Ethernet header. */
#define DECAP_LEN (sizeof(struct iphdr) + 8 + 8 + sizeof(struct ethhdr))

/*
 * The overlay's fast path, for a packet to this node's underlay address:
 * a single (not GSO) VXLAN packet for a local endpoint that from_overlay
 * would deliver is decapsulated here and redirected to its tap at once,
 * sparing the node's IP and UDP receive, the VXLAN device and its GRO
 * cell. Everything else goes on unchanged (TC_ACT_OK): the node's own
 * traffic, GSO batches, and every packet from_overlay would drop, which
 * then drops and counts it there.
 *
 * TCP segments carrying data never take it: one overtaking an earlier
 * GSO batch of its flow, still in the VXLAN device's GRO cell, would
 * arrive out of order. Segments without data (ACKs, SYN, FIN, RST) may
 * overtake data harmlessly.
 */
static __always_inline int uplink_overlay(struct __sk_buff *skb, const struct config *cfg)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	__be16 *udp = (void *)(ip + 1);
	__u8 *vx = (void *)(udp + 4);
	struct ethhdr *inner = (void *)(vx + 8);
	struct flow f = {};

	if (skb->gso_segs > 1 || skb->gso_size)
		return TC_ACT_OK;
	if ((void *)(inner + 1) > data_end)
		return TC_ACT_OK;
	if (ip->version != 4 || ip->ihl != 5 ||
	    ip->protocol != IPPROTO_UDP || (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_OK;
	if (udp[1] != bpf_htons(VXLAN_UDP_PORT) || !(vx[0] & 0x08) ||
	    inner->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (!cfg->vxlan_ifindex)
		return TC_ACT_OK;
	__u32 outer_saddr = ip->saddr;
	__u32 vni = ((__u32)vx[4] << 16) | ((__u32)vx[5] << 8) | vx[6];

	if (parse_ipv4_at(skb, &f, OUTER_LEN + sizeof(struct ethhdr)) < 0)
		return TC_ACT_OK;
	if (f.proto == IPPROTO_TCP && f.tcp_payload)
		return TC_ACT_OK;
	struct endpoint *dst = bpf_map_lookup_elem(&endpoints, &f.daddr);
	if (!dst || !(dst->flags & EP_LOCAL) || dst->vni != vni)
		return TC_ACT_OK;
	struct endpoint *src = bpf_map_lookup_elem(&endpoints, &f.saddr);
	if (!src || src->node_ip != outer_saddr)
		return TC_ACT_OK;
	if (!admit(&f, src, dst, 0, 1))
		return TC_ACT_OK;

	if (bpf_skb_adjust_room(skb, -(__s32)DECAP_LEN, BPF_ADJ_ROOM_MAC, 0) < 0)
		return TC_ACT_OK;
	if (set_l2(skb, cfg, dst->mac) < 0)
		return drop(skb->ifindex, DROP_MALFORMED, &f, 0, ETH_P_IP);
	return deliver(dst);
}

/* What native_sender tells of a frame's sender. */
#define SENDER_OWNER 0       /* the source's owner node (or its next hop) */
#define SENDER_OTHER 1       /* anyone else */
#define SENDER_UNRESOLVED 2  /* cannot be told: the next hop is not resolved */

/*
 * Whether a frame from the underlay may carry packets of `src`, a remote
 * endpoint: it must come from the owner node, or from the next hop this
 * node's FIB would use towards it (a router). Told by the frame's source
 * MAC against that next hop's. A next hop this node has not resolved
 * cannot be told from anyone else: SENDER_UNRESOLVED, and the caller
 * drops (the agent keeps a managed neighbour entry for every peer node,
 * so the kernel resolves it ahead of traffic and keeps it resolved; a
 * flow's first packets lost meanwhile are retransmitted). No path to the
 * owner at all means the frame cannot be its: SENDER_OTHER. The lookup
 * is made as for output (BPF_FIB_LOOKUP_OUTPUT), so it answers whether
 * forwarding is on for the uplink or not.
 */
static __always_inline int native_sender(struct __sk_buff *skb, const struct endpoint *src,
					 const __u8 *smac)
{
	struct bpf_fib_lookup fib = {};
	struct nexthop *nh = nexthop_fresh(src->node_ip);
	long rc;

	/* A fresh cached next hop that matches: no lookup. Anything else is
	 * looked up afresh before it is judged. */
	if (nh && mac_eq(nh->dmac, smac))
		return SENDER_OWNER;

	fib.family = BASALT_AF_INET;
	fib.ipv4_dst = src->node_ip;
	fib.ifindex = skb->ifindex;
	/* A nonzero length below every MTU: the lookup only names the next
	 * hop, the frame itself goes elsewhere. */
	fib.tot_len = sizeof(struct iphdr);
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return SENDER_UNRESOLVED;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return SENDER_OTHER;
	nexthop_remember(src->node_ip, &fib);
	return mac_eq(fib.dmac, smac) ? SENDER_OWNER : SENDER_OTHER;
}

/*
 * Native routing's receive side, for a packet not addressed to this
 * node: between two endpoints, to a local one, unencapsulated. The sender
 * (the source's owner node) has checked the source's MAC and IP and its
 * egress policy; here its owner is checked (native_sender), the
 * destination's ingress policy applied with the source's identity from
 * the endpoints map (no tunnel carries it), and the packet delivered to
 * the tap. A packet with a source that is no endpoint is not VM-to-VM
 * traffic (the node's own, or a host's routed to a VM): it goes on to
 * the node's stack as it always did.
 */
static __always_inline int uplink_native(struct __sk_buff *skb, const struct config *cfg)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	__u32 ifindex = skb->ifindex, saddr, daddr;
	struct flow f = {};
	__u8 smac[ETH_ALEN];

	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	saddr = ip->saddr;
	daddr = ip->daddr;
	mac_copy(smac, eth->h_source);
	struct endpoint *dst = bpf_map_lookup_elem(&endpoints, &daddr);
	if (!dst)
		return TC_ACT_OK;
	struct endpoint *src = bpf_map_lookup_elem(&endpoints, &saddr);
	if (!src)
		return TC_ACT_OK;
	f.saddr = saddr;
	f.daddr = daddr;
	if (!(dst->flags & EP_LOCAL))
		return drop(ifindex, DROP_NO_ENDPOINT, &f, smac, ETH_P_IP);
	if (src->flags & EP_LOCAL)
		return drop(ifindex, DROP_NOT_OWNER, &f, smac, ETH_P_IP);
	switch (native_sender(skb, src, smac)) {
	case SENDER_OWNER:
		break;
	case SENDER_UNRESOLVED:
		return drop(ifindex, DROP_NO_NEIGHBOUR, &f, smac, ETH_P_IP);
	default:
		return drop(ifindex, DROP_NOT_OWNER, &f, smac, ETH_P_IP);
	}
	if (parse_ipv4(skb, &f) < 0) {
		/* Headers beyond the linear part: pull them in, once. */
		__u32 want = sizeof(struct ethhdr) + 60 + 60;

		if (want > skb->len)
			want = skb->len;
		if (bpf_skb_pull_data(skb, want) < 0 || parse_ipv4(skb, &f) < 0)
			return drop(ifindex, DROP_MALFORMED, &f, smac, ETH_P_IP);
	}
	if (!admit(&f, src, dst, 0, 1))
		return drop(ifindex, DROP_POLICY, &f, smac, ETH_P_IP);
	if (set_l2(skb, cfg, dst->mac) < 0)
		return drop(ifindex, DROP_MALFORMED, &f, 0, ETH_P_IP);
	return deliver(dst);
}

/*
 * from_uplink, on the TCX ingress of the node's underlay interface:
 * packets to the node's own address may be the overlay's (its fast path,
 * uplink_overlay), others may be native routing's (uplink_native).
 * Whatever neither takes goes on to the node's stack untouched.
 */
SEC("classifier")
int from_uplink(struct __sk_buff *skb)
{
	__u32 zero = 0;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return TC_ACT_OK;
	if (ip->daddr == cfg->node_ip)
		return uplink_overlay(skb, cfg);
	return uplink_native(skb, cfg);
}

SEC("classifier")
int from_overlay(struct __sk_buff *skb)
{
	__u32 zero = 0, ifindex = skb->ifindex;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct bpf_tunnel_key key = {};
	struct flow f = {};
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return drop(ifindex, DROP_MALFORMED, 0, 0, 0);
	if (!cfg)
		return drop(ifindex, DROP_UNKNOWN_IFACE, 0, 0, 0);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return drop(ifindex, DROP_UNSUPPORTED_L3, 0, eth->h_source, bpf_ntohs(eth->h_proto));
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return drop(ifindex, DROP_TUNNEL, 0, 0, ETH_P_IP);
	if (parse_ipv4(skb, &f) < 0)
		return drop(ifindex, DROP_MALFORMED, 0, 0, ETH_P_IP);

	struct endpoint *dst = bpf_map_lookup_elem(&endpoints, &f.daddr);
	if (!dst || !(dst->flags & EP_LOCAL) ||
	    dst->vni != key.tunnel_id)
		return drop(ifindex, DROP_NO_ENDPOINT, &f, 0, ETH_P_IP);
	struct endpoint *src = bpf_map_lookup_elem(&endpoints, &f.saddr);
	if (!src || src->node_ip != bpf_htonl(key.remote_ipv4))
		return drop(ifindex, DROP_NOT_OWNER, &f, 0, ETH_P_IP);

	if (!admit(&f, src, dst, 0, 1))
		return drop(ifindex, DROP_POLICY, &f, 0, ETH_P_IP);
	if (set_l2(skb, cfg, dst->mac) < 0)
		return drop(ifindex, DROP_MALFORMED, &f, 0, ETH_P_IP);
	return deliver(dst);
}
