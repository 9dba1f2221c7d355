/* cgroup socket hooks: steer enrolled workloads' TCP connects into the node
 * proxy (connect4/connect6), file each redirected connection under the
 * 4-tuple the proxy will see on accept (sockops), and keep the redirect
 * invisible to the app (getpeername4/getpeername6).
 *
 * Attached once per node, on the cgroup subtree holding the node's pods and
 * its proxy.  Enrollment is data: a task is redirected only when its cgroup,
 * or the nearest ancestor of it that ml_enrolled or ml_cgroup_guard holds,
 * is in ml_enrolled (a pod's containers run in child cgroups of the pod
 * cgroup), so the proxy's own sockets (never enrolled) are not redirected
 * again.  The programs return 1 (allow) except where the agent put a DENY
 * in ml_l4_policy for a connection the proxy would refuse anyway, and
 * where a task that is not enrolled sits under the pods' cgroup subtree
 * (ml_cgroup_guard: a pod the agent does not know yet gets no plaintext
 * path): then connect() fails with EPERM at once (return 0).  Connections
 * that bypass the redirect are never refused: the proxy would not see them.
 */

/* The loader renders meshlet.h ahead of every .c file (one text, `meshlet bpf
 * render`); compiled on its own (bcc: -I bpf), this file includes it itself. */
#ifndef MESHLET_H
#include "include/meshlet.h"
#endif

/* 1: the connect must be refused (counted); 0: carry on. */
static __always_inline int ml_l4_refused(u32 workload_id, u32 family, const u32 *dst_be, u16 port)
{
	struct ml_l4_key k = {};
	struct ml_l4_verdict *v;
	u32 policy_id;

	k.dst_be[0] = dst_be[0];
	k.dst_be[1] = dst_be[1];
	k.dst_be[2] = dst_be[2];
	k.dst_be[3] = dst_be[3];
	k.workload_id = workload_id;
	k.family = family;
	k.dst_port = port;
	v = ml_l4_policy.lookup(&k);
	if (!v) {
		k.dst_port = 0;
		v = ml_l4_policy.lookup(&k);
	}
	if (!v || v->action != ML_L4_DENY)
		return 0;
	policy_id = v->policy_id;
	ml_count(ML_STAT_POLICY_DENIED);
	ml_l4_denied.atomic_increment(policy_id);
	return 1;
}

static __always_inline int ml_record(void *ctx, u32 family, const u32 *dst_be,
				     u16 dst_port, u64 cgid, u32 workload_id)
{
	struct ml_origdst od = {};
	u64 cookie = bpf_get_socket_cookie(ctx);

	od.dst_be[0] = dst_be[0];
	od.dst_be[1] = dst_be[1];
	od.dst_be[2] = dst_be[2];
	od.dst_be[3] = dst_be[3];
	od.dst_port = dst_port;
	od.family = family;
	od.cgroup_id = cgid;
	od.workload_id = workload_id;
	if (ml_origdst.update(&cookie, &od) != 0) {
		ml_count(ML_STAT_ORIGDST_FULL);
		return -1;
	}
	return 0;
}

/* The pod of the task calling connect(): the nearest of its cgroup and that
 * cgroup's ancestors found in ml_enrolled or ml_cgroup_guard decides.  A
 * container runtime runs a pod's processes (its pause container too) in
 * child cgroups of the pod cgroup the kubelet made, which is what the agent
 * enrolls, so the exact cgroup alone would match nothing on a real node.
 * Deepest wins: the task's own cgroup first, then its ancestors from the
 * nearest up.  An ml_enrolled entry returns that pod's workload and sets
 * *pod_cgid to the pod's cgroup (recorded in ml_origdst: the proxy knows
 * pods by that id); a guard entry (or nothing) returns NULL and sets
 * *refuse to 1 under a DENY_UNKNOWN directory, to 0 for an ALLOW entry or a
 * task outside the guarded directories.
 *
 * No cache: removing a pod from ml_enrolled stops matching its cgroups at
 * once.  Cost for a task in a container cgroup: three hash lookups and
 * six ancestor-helper calls, four of them for a binary search of the task's
 * level (scripts/bench_cgroup_walk.py measures it).
 * Levels at or beyond ML_MAX_CGROUP_DEPTH are not walked. */
_Static_assert(ML_MAX_CGROUP_DEPTH >= 1 && ML_MAX_CGROUP_DEPTH <= 64,
	       "ML_MAX_CGROUP_DEPTH: 1..64 (the level search below takes 6 steps)");

static __always_inline struct ml_workload *ml_task_pod(u64 *pod_cgid, int *refuse)
{
	u64 own = bpf_get_current_cgroup_id(), id = own;
	struct ml_workload *w;
	u32 *g;
	u32 lo = 0, hi = ML_MAX_CGROUP_DEPTH - 1;
	int i;

	*refuse = 0;
	w = ml_enrolled.lookup(&id);
	if (w) {
		*pod_cgid = id;
		return w;
	}
	g = ml_cgroup_guard.lookup(&id);
	if (g) {
		*refuse = *g == ML_GUARD_DENY_UNKNOWN;
		return NULL;
	}
	/* The deepest level below ML_MAX_CGROUP_DEPTH the task has (the helper
	 * returns 0 past the task's own level; level 0, the root, always is). */
#pragma unroll
	for (i = 0; i < 6; i++) {
		u32 mid = (lo + hi + 1) / 2;

		if (lo >= hi)
			break;
		if (bpf_get_current_ancestor_cgroup_id(mid))
			lo = mid;
		else
			hi = mid - 1;
	}
#pragma unroll
	for (i = 0; i < ML_MAX_CGROUP_DEPTH; i++) {
		int level = (int)lo - i;

		if (level < 0)
			break;
		id = bpf_get_current_ancestor_cgroup_id(level);
		if (id == own)
			continue;  /* looked up above */
		w = ml_enrolled.lookup(&id);
		if (w) {
			*pod_cgid = id;
			return w;
		}
		g = ml_cgroup_guard.lookup(&id);
		if (g) {
			*refuse = *g == ML_GUARD_DENY_UNKNOWN;
			return NULL;
		}
	}
	return NULL;
}

/* The workload of the task calling connect() on a TCP socket, when its pod
 * is enrolled and the datapath is enabled; NULL means "not enrolled" (then
 * *cfg is set only for a TCP connect with the datapath enabled, and
 * *refuse says whether the guard refuses the task: see ml_task_pod). */
static __always_inline struct ml_workload *ml_enrolled_task(struct bpf_sock_addr *ctx,
							    struct ml_config **cfg, u64 *pod_cgid,
							    int *refuse)
{
	struct ml_config *c;

	if (ctx->type != ML_SOCK_STREAM)
		return NULL;
	c = ml_get_config();
	if (!c || !c->enabled)
		return NULL;
	*cfg = c;
	return ml_task_pod(pod_cgid, refuse);
}

/* The verdict for a task that is not enrolled: 1 allow, 0 refuse (EPERM).
 * ``bypass`` is why an enrolled pod's connect would not be redirected
 * (0: it would be): what passes the mesh for its pods passes here too. */
static __always_inline int ml_unenrolled_verdict(struct ml_config *cfg, int refuse, int bypass)
{
	if (!cfg || bypass || !refuse)
		return 1;
	ml_count(ML_STAT_UNKNOWN_DENIED);
	return 0;
}

/* Why an IPv4 destination must not be redirected (0 = redirect it).  Shared
 * by connect4 and the IPv4-mapped branch of connect6. */
static __always_inline int ml_v4_bypass(struct ml_config *cfg, u32 dst_be, u16 port)
{
	struct ml_cidr4_key ck = {};

	if ((bpf_ntohl(dst_be) >> 24) == 127 || dst_be == cfg->redirect_ip4_be)
		return ML_STAT_BYPASS_LOCAL;
	if (ml_port_excluded(port))
		return ML_STAT_BYPASS_PORT;
	ck.prefixlen = 32;
	ck.addr_be = dst_be;
	if (ml_excl_cidr4.lookup(&ck))
		return ML_STAT_BYPASS_CIDR;
	return 0;
}

int ml_connect4(struct bpf_sock_addr *ctx)
{
	struct ml_config *cfg = NULL;
	struct ml_workload *w;
	u64 cgid = 0;
	u32 dst[4] = {};
	u16 port;
	int bypass, refuse = 0;

	w = ml_enrolled_task(ctx, &cfg, &cgid, &refuse);
	if (!w) {
		if (!cfg)
			return 1;
		return ml_unenrolled_verdict(cfg, refuse, ml_v4_bypass(cfg, ctx->user_ip4,
								     bpf_ntohs((u16)ctx->user_port)));
	}

	dst[0] = ctx->user_ip4;
	port = bpf_ntohs((u16)ctx->user_port);
	bypass = ml_v4_bypass(cfg, dst[0], port);
	if (bypass) {
		ml_count(bypass);
		return 1;
	}
	if (ml_l4_refused(w->workload_id, ML_AF_INET, dst, port))
		return 0;
	if (ml_record(ctx, ML_AF_INET, dst, port, cgid, w->workload_id) != 0)
		return 1;  /* fail open to the original dst: never break the app */

	ctx->user_ip4 = cfg->redirect_ip4_be;
	ctx->user_port = bpf_htons(cfg->outbound_port);
	ml_count(ML_STAT_REDIRECT4);
	return 1;
}

/* Why an IPv6 destination must not be redirected (0 = redirect it). */
static __always_inline int ml_v6_bypass(struct ml_config *cfg, const u32 *dst, u16 port)
{
	struct ml_cidr6_key ck = {};

	if (dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == bpf_htonl(1))
		return ML_STAT_BYPASS_LOCAL;
	if (!cfg->has_ip6)
		return ML_STAT_BYPASS_NO_IP6;
	if (dst[0] == cfg->redirect_ip6_be[0] && dst[1] == cfg->redirect_ip6_be[1] &&
	    dst[2] == cfg->redirect_ip6_be[2] && dst[3] == cfg->redirect_ip6_be[3])
		return ML_STAT_BYPASS_LOCAL;
	if (ml_port_excluded(port))
		return ML_STAT_BYPASS_PORT;
	ck.prefixlen = 128;
	ck.addr_be[0] = dst[0];
	ck.addr_be[1] = dst[1];
	ck.addr_be[2] = dst[2];
	ck.addr_be[3] = dst[3];
	if (ml_excl_cidr6.lookup(&ck))
		return ML_STAT_BYPASS_CIDR;
	return 0;
}

int ml_connect6(struct bpf_sock_addr *ctx)
{
	struct ml_config *cfg = NULL;
	struct ml_workload *w;
	u64 cgid = 0;
	u32 dst[4];
	u16 port;
	int mapped, bypass, refuse = 0;

	w = ml_enrolled_task(ctx, &cfg, &cgid, &refuse);
	if (!w && !cfg)
		return 1;

	dst[0] = ctx->user_ip6[0];
	dst[1] = ctx->user_ip6[1];
	dst[2] = ctx->user_ip6[2];
	dst[3] = ctx->user_ip6[3];
	port = bpf_ntohs((u16)ctx->user_port);
	/* ::ffff:a.b.c.d — an IPv4 connection made through an AF_INET6 socket */
	mapped = dst[0] == 0 && dst[1] == 0 && dst[2] == bpf_htonl(0x0000ffff);
	bypass = mapped ? ml_v4_bypass(cfg, dst[3], port) : ml_v6_bypass(cfg, dst, port);
	if (!w)
		return ml_unenrolled_verdict(cfg, refuse, bypass);
	if (bypass) {
		ml_count(bypass);
		return 1;
	}

	if (mapped) {
		u32 v4[4] = {dst[3], 0, 0, 0};

		if (ml_l4_refused(w->workload_id, ML_AF_INET, v4, port))
			return 0;
		if (ml_record(ctx, ML_AF_INET, v4, port, cgid, w->workload_id) != 0)
			return 1;
		ctx->user_ip6[3] = cfg->redirect_ip4_be;
		ctx->user_port = bpf_htons(cfg->outbound_port);
		ml_count(ML_STAT_REDIRECT4);
		return 1;
	}

	if (ml_l4_refused(w->workload_id, ML_AF_INET6, dst, port))
		return 0;
	if (ml_record(ctx, ML_AF_INET6, dst, port, cgid, w->workload_id) != 0)
		return 1;

	ctx->user_ip6[0] = cfg->redirect_ip6_be[0];
	ctx->user_ip6[1] = cfg->redirect_ip6_be[1];
	ctx->user_ip6[2] = cfg->redirect_ip6_be[2];
	ctx->user_ip6[3] = cfg->redirect_ip6_be[3];
	ctx->user_port = bpf_htons(cfg->outbound_port);
	ml_count(ML_STAT_REDIRECT6);
	return 1;
}

/* When a redirected connect completes, the source port is known: file the
 * original destination under the 4-tuple the proxy sees from accept().  This
 * runs when the SYN-ACK arrives, before the client's ACK can complete the
 * proxy's accept, so the entry is always there first. */
/* The verifier only allows 4-byte loads of the address fields; volatile
 * stops clang from merging neighbouring words into one 8-byte load. */
#define ML_CTX_U32(field) (*(volatile __u32 *)&(field))

int ml_sockops(struct bpf_sock_ops *skops)
{
	struct ml_flow_key key = {};
	struct ml_origdst *od;
	u64 cookie;
	int v4;

	if (skops->op == BPF_SOCK_OPS_STATE_CB) {
		/* args[1] is the new state: forget the socket when it closes */
		if (skops->args[1] == BPF_TCP_CLOSE) {
			cookie = bpf_get_socket_cookie(skops);
			ml_origdst.delete(&cookie);
		}
		return 1;
	}
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	od = ml_origdst.lookup(&cookie);
	if (!od)
		return 1;

	v4 = skops->family == ML_AF_INET ||
	     (ML_CTX_U32(skops->remote_ip6[0]) == 0 && ML_CTX_U32(skops->remote_ip6[1]) == 0 &&
	      ML_CTX_U32(skops->remote_ip6[2]) == bpf_htonl(0x0000ffff));
	if (v4) {
		key.family = ML_AF_INET;
		key.saddr_be[0] = ML_CTX_U32(skops->local_ip4);
		key.daddr_be[0] = ML_CTX_U32(skops->remote_ip4);
	} else {
		key.family = ML_AF_INET6;
		key.saddr_be[0] = ML_CTX_U32(skops->local_ip6[0]);
		key.saddr_be[1] = ML_CTX_U32(skops->local_ip6[1]);
		key.saddr_be[2] = ML_CTX_U32(skops->local_ip6[2]);
		key.saddr_be[3] = ML_CTX_U32(skops->local_ip6[3]);
		key.daddr_be[0] = ML_CTX_U32(skops->remote_ip6[0]);
		key.daddr_be[1] = ML_CTX_U32(skops->remote_ip6[1]);
		key.daddr_be[2] = ML_CTX_U32(skops->remote_ip6[2]);
		key.daddr_be[3] = ML_CTX_U32(skops->remote_ip6[3]);
	}
	key.sport = (u16)skops->local_port;
	key.dport = (u16)bpf_ntohl(skops->remote_port);
	if (ml_flows.update(&key, od) == 0)
		ml_count(ML_STAT_FLOW_RECORDED);
	else
		ml_count(ML_STAT_ORIGDST_FULL);
	/* Keep the cookie's record for getpeername() until the socket closes. */
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}

/* getpeername() on a redirected socket answers the address the app
 * connected to, not the node proxy's: the redirect stays invisible. */
int ml_getpeername4(struct bpf_sock_addr *ctx)
{
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct ml_origdst *od = ml_origdst.lookup(&cookie);

	if (!od || od->family != ML_AF_INET)
		return 1;
	ctx->user_ip4 = od->dst_be[0];
	ctx->user_port = bpf_htons(od->dst_port);
	return 1;
}

int ml_getpeername6(struct bpf_sock_addr *ctx)
{
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct ml_origdst *od = ml_origdst.lookup(&cookie);

	if (!od)
		return 1;
	if (od->family == ML_AF_INET) {  /* IPv4 through an AF_INET6 socket */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = od->dst_be[0];
	} else {
		ctx->user_ip6[0] = od->dst_be[0];
		ctx->user_ip6[1] = od->dst_be[1];
		ctx->user_ip6[2] = od->dst_be[2];
		ctx->user_ip6[3] = od->dst_be[3];
	}
	ctx->user_port = bpf_htons(od->dst_port);
	return 1;
}
