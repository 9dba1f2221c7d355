/* tc (tcx) program on the node side of each enrolled pod's veth, egress,
 * i.e. on packets about to enter the pod.  It enforces the inbound mode:
 * in strict mode a new plaintext TCP connection (a SYN) to an enrolled pod
 * is dropped unless it comes from the mesh's own proxy, whose sockets carry
 * the mesh mark.  Permissive mode and everything that is not a new TCP
 * connection pass.  Returns TC_ACT_UNSPEC (tcx: next) to stay out of the way
 * of other programs, TC_ACT_SHOT to drop.
 */

/* The loader renders meshlet.h ahead of every .c file (one text, `meshlet bpf
 * render`); compiled on its own (bcc: -I bpf), this file includes it itself. */
#ifndef MESHLET_H
#include "include/meshlet.h"
#endif

#define ML_TC_NEXT -1
#define ML_TC_DROP 2
#define ML_ETH_HLEN 14
#define ML_ETH_P_IP 0x0800
#define ML_ETH_P_IPV6 0x86DD
#define ML_IPPROTO_TCP 6
#define ML_TCP_SYN 0x02
#define ML_TCP_ACK 0x10

static __always_inline int ml_strict_verdict(struct __sk_buff *skb, struct ml_ip_key *dst,
					     u32 l4_off)
{
	struct ml_workload *w;
	struct ml_config *cfg;
	u8 flags;
	u16 dport_be;

	if (bpf_skb_load_bytes(skb, l4_off + 13, &flags, 1) < 0)
		return ML_TC_NEXT;
	if ((flags & (ML_TCP_SYN | ML_TCP_ACK)) != ML_TCP_SYN)
		return ML_TC_NEXT;
	w = ml_pod_ips.lookup(dst);
	if (!w || w->mode != ML_MODE_STRICT)
		return ML_TC_NEXT;
	cfg = ml_get_config();
	if (cfg && cfg->mesh_mark && (skb->mark & cfg->mesh_mark) == cfg->mesh_mark) {
		ml_count(ML_STAT_STRICT_MESH);
		return ML_TC_NEXT;
	}
	if (bpf_skb_load_bytes(skb, l4_off + 2, &dport_be, 2) < 0)
		return ML_TC_DROP;
	if (ml_port_excluded(bpf_ntohs(dport_be)))
		return ML_TC_NEXT;
	ml_count(ML_STAT_STRICT_DROP);
	return ML_TC_DROP;
}

int ml_tc_to_pod(struct __sk_buff *skb)
{
	struct ml_ip_key dst = {};
	u16 proto = bpf_ntohs(skb->protocol);

	if (proto == ML_ETH_P_IP) {
		u8 vihl, l4proto;
		u16 frag_be;

		if (bpf_skb_load_bytes(skb, ML_ETH_HLEN, &vihl, 1) < 0 ||
		    bpf_skb_load_bytes(skb, ML_ETH_HLEN + 9, &l4proto, 1) < 0 ||
		    bpf_skb_load_bytes(skb, ML_ETH_HLEN + 6, &frag_be, 2) < 0)
			return ML_TC_NEXT;
		if (l4proto != ML_IPPROTO_TCP)
			return ML_TC_NEXT;
		if (bpf_ntohs(frag_be) & 0x1fff)  /* not the first fragment */
			return ML_TC_NEXT;
		if (bpf_skb_load_bytes(skb, ML_ETH_HLEN + 16, &dst.addr_be[0], 4) < 0)
			return ML_TC_NEXT;
		dst.family = ML_AF_INET;
		return ml_strict_verdict(skb, &dst, ML_ETH_HLEN + (vihl & 0x0f) * 4);
	}
	if (proto == ML_ETH_P_IPV6) {
		u8 nexthdr;

		if (bpf_skb_load_bytes(skb, ML_ETH_HLEN + 6, &nexthdr, 1) < 0 ||
		    bpf_skb_load_bytes(skb, ML_ETH_HLEN + 24, &dst.addr_be, 16) < 0)
			return ML_TC_NEXT;
		dst.family = ML_AF_INET6;
		if (nexthdr != ML_IPPROTO_TCP) {
			/* Extension headers could hide a SYN: to a strict pod,
			 * fail closed on anything that is not plain TCP, UDP or ICMPv6. */
			struct ml_workload *w = ml_pod_ips.lookup(&dst);

			if (w && w->mode == ML_MODE_STRICT && nexthdr != 17 && nexthdr != 58) {
				ml_count(ML_STAT_STRICT_DROP);
				return ML_TC_DROP;
			}
			return ML_TC_NEXT;
		}
		return ml_strict_verdict(skb, &dst, ML_ETH_HLEN + 40);
	}
	return ML_TC_NEXT;
}
