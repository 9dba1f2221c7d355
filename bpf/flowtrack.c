/* Flow table: per-connection TCP telemetry for enrolled workloads and the
 * node proxy (sock_ops, attached as its own cgroup link next to ml_sockops).
 *
 * Tracked sockets, decided once when the connection is established:
 *   client          a pod's redirected connect (its cookie is in ml_origdst)
 *   server          a connection accepted on a pod address (ml_pod_ips)
 *   proxy outbound  accepted by the node proxy on its outbound port
 *   proxy tunnel    accepted by the node proxy on its tunnel port
 *   proxy upstream  connected by the node proxy (socket carries the mesh mark)
 * Only tracked sockets get the RTT/STATE/RETRANS callbacks, so untracked
 * traffic costs one call per established connection and nothing after.
 *
 * Live flows sit in ml_live_flows (LRU, keyed by socket cookie) and are
 * refreshed on every callback.  At TCP_CLOSE the final record goes into the
 * ml_flow_events ring buffer and leaves the map, so a flow that opened and
 * closed between two reads of the agent is still reported.
 *
 * ml_sockops runs first (attached first) and sets the callback flags to
 * STATE only; this program ORs its flags onto the current ones.
 */

/* The loader renders meshlet.h ahead of every .c file (one text, `meshlet bpf
 * render`); compiled on its own (bcc: -I bpf), this file includes it itself. */
#ifndef MESHLET_H
#include "include/meshlet.h"
#endif

#if ML_FLOW_TRACKING

#ifndef ML_CTX_U32
#define ML_CTX_U32(field) (*(volatile __u32 *)&(field))
#endif

#define ML_FLOW_CB_FLAGS (BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG | \
			  BPF_SOCK_OPS_RETRANS_CB_FLAG)

/* Local and remote address and port; IPv4-mapped IPv6 folds into IPv4 so a
 * flow has one spelling whatever socket family the app used. */
static __always_inline void ml_flow_addrs(struct bpf_sock_ops *skops, struct ml_flow *f)
{
	if (skops->family == ML_AF_INET) {
		f->family = ML_AF_INET;
		f->saddr_be[0] = ML_CTX_U32(skops->local_ip4);
		f->daddr_be[0] = ML_CTX_U32(skops->remote_ip4);
	} else {
		u32 l0 = ML_CTX_U32(skops->local_ip6[0]), l1 = ML_CTX_U32(skops->local_ip6[1]);
		u32 l2 = ML_CTX_U32(skops->local_ip6[2]), l3 = ML_CTX_U32(skops->local_ip6[3]);
		u32 r0 = ML_CTX_U32(skops->remote_ip6[0]), r1 = ML_CTX_U32(skops->remote_ip6[1]);
		u32 r2 = ML_CTX_U32(skops->remote_ip6[2]), r3 = ML_CTX_U32(skops->remote_ip6[3]);

		if (r0 == 0 && r1 == 0 && r2 == bpf_htonl(0x0000ffff)) {
			f->family = ML_AF_INET;
			f->saddr_be[0] = l3;
			f->daddr_be[0] = r3;
		} else {
			f->family = ML_AF_INET6;
			f->saddr_be[0] = l0;
			f->saddr_be[1] = l1;
			f->saddr_be[2] = l2;
			f->saddr_be[3] = l3;
			f->daddr_be[0] = r0;
			f->daddr_be[1] = r1;
			f->daddr_be[2] = r2;
			f->daddr_be[3] = r3;
		}
	}
	f->sport = (u16)skops->local_port;
	f->dport = (u16)bpf_ntohl(skops->remote_port);
}

/* The counters sock_ops exposes from tcp_sock. */
static __always_inline void ml_flow_sample(struct bpf_sock_ops *skops, struct ml_flow *f)
{
	f->bytes_acked = skops->bytes_acked;
	f->bytes_received = skops->bytes_received;
	f->srtt_us = skops->srtt_us >> 3;
	f->rtt_min_us = skops->rtt_min;
	f->total_retrans = skops->total_retrans;
	f->state = (u8)skops->state;
	f->update_ns = bpf_ktime_get_ns();
}

/* Which tracked role an established socket plays (ML_ROLE_NONE: ignore it);
 * fills the role's extra fields. */
static __always_inline int ml_flow_role(struct bpf_sock_ops *skops, struct ml_config *cfg,
					struct ml_flow *f, int active)
{
	if (active) {
		struct ml_origdst *od = ml_origdst.lookup(&f->cookie);
		struct bpf_sock *sk;

		if (od) {
			f->orig_dst_be[0] = od->dst_be[0];
			f->orig_dst_be[1] = od->dst_be[1];
			f->orig_dst_be[2] = od->dst_be[2];
			f->orig_dst_be[3] = od->dst_be[3];
			f->orig_dport = od->dst_port;
			f->orig_family = od->family;
			f->cgroup_id = od->cgroup_id;
			f->workload_id = od->workload_id;
			return ML_ROLE_CLIENT;
		}
		sk = skops->sk;
		if (sk && cfg->mesh_mark && (sk->mark & cfg->mesh_mark) == cfg->mesh_mark)
			return ML_ROLE_PROXY_UPSTREAM;
		return ML_ROLE_NONE;
	}
	{
		struct ml_ip_key k = {};
		struct ml_workload *w;

		k.family = f->family;
		k.addr_be[0] = f->saddr_be[0];
		k.addr_be[1] = f->saddr_be[1];
		k.addr_be[2] = f->saddr_be[2];
		k.addr_be[3] = f->saddr_be[3];
		w = ml_pod_ips.lookup(&k);
		if (w) {
			f->workload_id = w->workload_id;
			return ML_ROLE_SERVER;
		}
	}
	if (f->sport == cfg->outbound_port)
		return ML_ROLE_PROXY_OUTBOUND;
	if (cfg->tunnel_port && f->sport == cfg->tunnel_port)
		return ML_ROLE_PROXY_TUNNEL;
	return ML_ROLE_NONE;
}

static __always_inline void ml_flow_start(struct bpf_sock_ops *skops, int active)
{
	struct ml_config *cfg = ml_get_config();
	struct ml_flow f = {};

	if (!cfg || !cfg->enabled)
		return;
	f.cookie = bpf_get_socket_cookie(skops);
	ml_flow_addrs(skops, &f);
	f.role = ml_flow_role(skops, cfg, &f, active);
	if (f.role == ML_ROLE_NONE)
		return;
	ml_flow_sample(skops, &f);
	f.start_ns = f.update_ns;
	if (ml_live_flows.update(&f.cookie, &f) != 0) {
		ml_count(ML_STAT_FLOW_TABLE_FULL);
		return;
	}
	ml_count(ML_STAT_FLOW_TRACKED);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | ML_FLOW_CB_FLAGS);
}

static __always_inline void ml_flow_emit(struct ml_flow *f)
{
	if (ml_flow_events.ringbuf_output(f, sizeof(*f), 0) != 0)
		ml_count(ML_STAT_FLOW_RINGBUF_FULL);
	else
		ml_count(ML_STAT_FLOW_CLOSED);
}

static __always_inline void ml_flow_close(struct bpf_sock_ops *skops)
{
	u64 cookie = bpf_get_socket_cookie(skops);
	struct ml_flow *f = ml_live_flows.lookup(&cookie);
	u64 *peer = ml_flow_links.lookup(&cookie);
	u64 peer_cookie = peer ? *peer : 0;

	if (peer)
		ml_flow_links.delete(&cookie);
	if (!f) {
		/* Tracked (only this program sets the RTT flag) but its entry is
		 * gone: the LRU evicted it.  Report what the socket still knows. */
		struct ml_flow e = {};

		ml_count(ML_STAT_FLOW_EVICTED);
		e.cookie = cookie;
		e.peer_cookie = peer_cookie;
		e.flags = ML_FLOW_F_EVICTED;
		ml_flow_addrs(skops, &e);
		ml_flow_sample(skops, &e);
		e.bytes_acked += ml_splice_redirected(e.saddr_be, e.daddr_be, e.sport, e.dport, e.family);
		e.state = BPF_TCP_CLOSE;
		e.end_ns = e.update_ns;
		ml_flow_emit(&e);
		return;
	}
	ml_flow_sample(skops, f);
	/* What the app sent past its own TCP connection (splice.c) counts too;
	 * at close only, to keep the per-ACK callback lean. */
	f->bytes_acked += ml_splice_redirected(f->saddr_be, f->daddr_be, f->sport, f->dport, f->family);
	f->state = BPF_TCP_CLOSE;
	f->end_ns = f->update_ns;
	f->peer_cookie = peer_cookie;
	ml_flow_emit(f);
	ml_live_flows.delete(&cookie);
}

int ml_flow_ops(struct bpf_sock_ops *skops)
{
	u32 op = skops->op;

	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		ml_flow_start(skops, 1);
		return 1;
	}
	if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		ml_flow_start(skops, 0);
		return 1;
	}
	if (op != BPF_SOCK_OPS_RTT_CB && op != BPF_SOCK_OPS_STATE_CB &&
	    op != BPF_SOCK_OPS_RETRANS_CB)
		return 1;
	if (!(skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_RTT_CB_FLAG))
		return 1;  /* not ours: ml_sockops asked for STATE only */
	if (op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == BPF_TCP_CLOSE) {
		ml_flow_close(skops);
		return 1;
	}
	{
		u64 cookie = bpf_get_socket_cookie(skops);
		struct ml_flow *f = ml_live_flows.lookup(&cookie);

		if (f) {
			ml_flow_sample(skops, f);
			if (op == BPF_SOCK_OPS_STATE_CB)
				f->state = (u8)skops->args[1];  /* the state it moves to */
		}
	}
	return 1;
}

#endif /* ML_FLOW_TRACKING */
