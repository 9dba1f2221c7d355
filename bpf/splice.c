/* Same-node fast path: a pod's bytes go straight out of the proxy's socket
 * facing the other pod (sk_msg egress redirect), so a connection between two
 * pods of this node crosses one TCP connection in the kernel, never
 * userspace, once the proxy has decided it (policy passed, no L7).
 *
 * Pod client  --TCP-->  proxy A | proxy B  --TCP-->  pod server
 *
 * - ml_splice_ops (sock_ops, on the node cgroup) puts the *pods'* sockets of
 *   proxied connections in ml_splice, keyed by their own 4-tuple: a pod's
 *   redirected connect (its peer is the proxy's A) and a pod's accepted
 *   socket whose peer is a proxy upstream socket B (filed in
 *   ml_splice_pending when B got established, before its ACK left).  Each
 *   gets an ml_splice_cnt entry.
 * - The proxy puts its own A and B in ml_splice_tgt (by cookie) and arms each
 *   pod socket in ml_splice_arm with {target: the proxy's far socket,
 *   relayed: bytes of this pod socket it has read and fully handed to that
 *   far socket's kernel send queue}.
 * - ml_splice_msg (sk_msg, attached to ml_splice) runs in the sender's
 *   sendmsg, synchronously.  Armed and passed == relayed: the message is
 *   redirected to the target's *egress*: it joins the far socket's TCP
 *   stream behind everything the proxy wrote to it, so the order holds by
 *   construction.  Otherwise (not armed, not in step yet, target gone): the
 *   message goes through the pod's own TCP connection to the proxy as usual
 *   (SK_PASS, counted as passed), and the proxy relays it and re-arms.
 *   Never a drop.  Once redirected, every later message is (passed no longer
 *   moves) until the proxy disarms or a socket closes.
 * - FIN and RST are not messages: they still reach the proxy through TCP,
 *   which half-closes or resets the far side as for any relay; bytes
 *   redirected before the FIN are already in the far socket's send queue.
 * - Room: a message is redirected only while the target holds at most
 *   ML_SPLICE_WINDOW bytes its peer has not acknowledged (sock_ops keeps the
 *   target's acked count from its RTT samples; the proxy gives targets a
 *   send buffer well above the window).  A redirect into a full target
 *   fails with EAGAIN for a non-blocking sender, and nothing would wake
 *   that sender when the target drains; past the window the bytes go
 *   through the proxy, whose relay has TCP's backpressure, and the
 *   redirect resumes once the proxy is in step again.
 * - Counts: every redirected message is added to the pod socket's
 *   ml_splice_cnt entry (the flow table) and to the target's
 *   ml_splice_peers entry (the proxy's access log).
 */

/* The loader renders meshlet.h ahead of every .c file (one text, `meshlet bpf
 * render`); compiled on its own (bcc: -I bpf), this file includes it itself. */
#ifndef MESHLET_H
#include "include/meshlet.h"
#endif

#if ML_SPLICE

/* The verifier only allows 4-byte loads of the address fields. */
#define ML_SPLICE_U32(field) (*(volatile __u32 *)&(field))

/* A socket's own 4-tuple from a sock_ops or sk_msg context (same field
 * names); IPv4-mapped IPv6 folds into IPv4 as in flowtrack.c, and the proxy
 * spells its keys the same way (agent/datapath/splicemap.py). */
#define ML_SPLICE_KEY(ctx, key) do { \
	if ((ctx)->family == ML_AF_INET) { \
		(key)->family = ML_AF_INET; \
		(key)->saddr_be[0] = ML_SPLICE_U32((ctx)->local_ip4); \
		(key)->daddr_be[0] = ML_SPLICE_U32((ctx)->remote_ip4); \
	} else { \
		u32 r0_ = ML_SPLICE_U32((ctx)->remote_ip6[0]), r1_ = ML_SPLICE_U32((ctx)->remote_ip6[1]); \
		u32 r2_ = ML_SPLICE_U32((ctx)->remote_ip6[2]), r3_ = ML_SPLICE_U32((ctx)->remote_ip6[3]); \
		u32 l0_ = ML_SPLICE_U32((ctx)->local_ip6[0]), l1_ = ML_SPLICE_U32((ctx)->local_ip6[1]); \
		u32 l2_ = ML_SPLICE_U32((ctx)->local_ip6[2]), l3_ = ML_SPLICE_U32((ctx)->local_ip6[3]); \
		if (r0_ == 0 && r1_ == 0 && r2_ == bpf_htonl(0x0000ffff)) { \
			(key)->family = ML_AF_INET; \
			(key)->saddr_be[0] = l3_; \
			(key)->daddr_be[0] = r3_; \
		} else { \
			(key)->family = ML_AF_INET6; \
			(key)->saddr_be[0] = l0_; (key)->saddr_be[1] = l1_; \
			(key)->saddr_be[2] = l2_; (key)->saddr_be[3] = l3_; \
			(key)->daddr_be[0] = r0_; (key)->daddr_be[1] = r1_; \
			(key)->daddr_be[2] = r2_; (key)->daddr_be[3] = r3_; \
		} \
	} \
	(key)->sport = (u16)(ctx)->local_port; \
	(key)->dport = (u16)bpf_ntohl((ctx)->remote_port); \
} while (0)

int ml_splice_msg(struct sk_msg_md *msg)
{
	struct ml_flow_key key = {};
	struct ml_splice_cnt *c;
	struct ml_splice_arm *a;
	struct ml_splice_peer *p;
	u64 size = msg->size;
	u64 tgt, queued;
	int rc;

	ML_SPLICE_KEY(msg, &key);
	c = ml_splice_cnt.lookup(&key);
	if (!c)
		return SK_PASS;  /* not one of ours (or evicted): plain TCP */
	a = ml_splice_arm.lookup(&key);
	if (a) {
		tgt = a->target_cookie;
		p = ml_splice_peers.lookup(&tgt);
		/* In step, and the target has room: everything ever queued on it
		 * (what the proxy relayed, what was redirected) minus what its
		 * peer acknowledged stays within the window, far below the
		 * target's send buffer.  A full target would fail the redirect
		 * with EAGAIN for a non-blocking sender, and nothing would wake
		 * that sender when the target drains (its own socket never stops
		 * being writable): through the proxy instead, whose relay has
		 * TCP's own backpressure. */
		queued = p ? a->relayed + p->bytes : 0;
		/* (acked counts the SYN of the proxy's connecting socket too) */
		queued = p && p->acked < queued ? queued - p->acked : 0;
		if (p && a->relayed == c->passed && queued + size <= ML_SPLICE_WINDOW) {
			/* Without BPF_F_INGRESS: out of the target's send side. */
			rc = ml_splice_tgt.msg_redirect_hash(msg, &tgt, 0);
			if (rc == SK_PASS) {
				__sync_fetch_and_add(&c->redirected, size);
				__sync_fetch_and_add(&p->bytes, size);
				ml_count(ML_STAT_SPLICE_REDIRECTED);
				return SK_PASS;
			}
		}
		ml_count(ML_STAT_SPLICE_MISS);
	}
	/* The pod's socket lock serializes its sendmsg calls: a plain add. */
	c->passed += size;
	return SK_PASS;
}

int ml_splice_ops(struct bpf_sock_ops *skops)
{
	struct ml_flow_key key = {};
	struct ml_splice_cnt zero = {};
	struct ml_config *cfg;
	u32 op = skops->op;
	u64 cookie;
	int rc;

	if (op == BPF_SOCK_OPS_RTT_CB) {
		/* A proxy socket's progress: what its peer acknowledged frees
		 * room in the window of pods redirecting into it. */
		struct ml_splice_peer *p;

		cookie = bpf_get_socket_cookie(skops);
		p = ml_splice_peers.lookup(&cookie);
		if (p)
			p->acked = skops->bytes_acked;
		return 1;
	}
	if (op == BPF_SOCK_OPS_STATE_CB) {
		/* Runs after flowtrack.c (attached after it), which reads the
		 * pod socket's count at close. */
		if (skops->args[1] == BPF_TCP_CLOSE) {
			ML_SPLICE_KEY(skops, &key);
			if (ml_splice_cnt.lookup(&key)) {
				ml_splice_cnt.delete(&key);
				ml_splice_arm.delete(&key);
			}
		}
		return 1;
	}
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	cfg = ml_get_config();
	if (!cfg || !cfg->enabled)
		return 1;
	ML_SPLICE_KEY(skops, &key);
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		cookie = bpf_get_socket_cookie(skops);
		if (!ml_origdst.lookup(&cookie)) {
			/* The proxy's upstream socket to a pod of this node?  File
			 * the 4-tuple the pod's accepted socket will have. */
			struct ml_flow_key pk = {};
			struct ml_ip_key ik = {};
			struct bpf_sock *sk = skops->sk;
			u8 one = 1;

			if (!sk || !cfg->mesh_mark || (sk->mark & cfg->mesh_mark) != cfg->mesh_mark)
				return 1;
			/* RTT samples: its acked count (flowtrack.c tracks it too). */
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_RTT_CB_FLAG);
			ik.family = key.family;
			ik.addr_be[0] = key.daddr_be[0];
			ik.addr_be[1] = key.daddr_be[1];
			ik.addr_be[2] = key.daddr_be[2];
			ik.addr_be[3] = key.daddr_be[3];
			if (!ml_pod_ips.lookup(&ik))
				return 1;
			pk.family = key.family;
			pk.saddr_be[0] = key.daddr_be[0];
			pk.saddr_be[1] = key.daddr_be[1];
			pk.saddr_be[2] = key.daddr_be[2];
			pk.saddr_be[3] = key.daddr_be[3];
			pk.daddr_be[0] = key.saddr_be[0];
			pk.daddr_be[1] = key.saddr_be[1];
			pk.daddr_be[2] = key.saddr_be[2];
			pk.daddr_be[3] = key.saddr_be[3];
			pk.sport = key.dport;
			pk.dport = key.sport;
			ml_splice_pending.update(&pk, &one);
			return 1;
		}
		/* A pod's connect redirected to the proxy: its client socket. */
	} else {
		if (key.sport == cfg->outbound_port) {
			/* The proxy's accepted socket from a pod (a target): RTT
			 * samples, as for its upstream sockets above. */
			bpf_sock_ops_cb_flags_set(skops,
						  skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_RTT_CB_FLAG);
			return 1;
		}
		if (!ml_splice_pending.lookup(&key))
			return 1;  /* not accepted from a proxy upstream socket */
		ml_splice_pending.delete(&key);
	}
	/* (bcc rewrites this call into a statement: no use inside a condition) */
	rc = ml_splice.sock_hash_update(skops, &key, BPF_ANY);
	if (rc != 0)
		return 1;  /* full: this connection stays on the userspace relay */
	ml_splice_cnt.update(&key, &zero);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}

#endif /* ML_SPLICE */
