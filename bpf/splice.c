/* Same-node fast path: the kernel splices the two sockets of a plaintext L4
 * relay (sk_skb stream verdict on the ml_splice SOCKHASH).
 *
 * Once the proxy has decided a connection between two pods of this node
 * (policy passed, no L7), it puts both of its sockets in ml_splice, keyed by
 * socket cookie, and files each one's peer in ml_splice_peers.  From then on
 * every skb arriving on one socket is sent out of the other by the kernel
 * (bpf_sk_redirect_hash, egress) without waking the proxy for the bytes; the
 * proxy still owns both sockets (EOF, resets, policy re-checks, close).
 * Each redirect adds the skb's length to the socket's entry, so the proxy's
 * byte counts stay exact.  A socket without a peer entry, or whose peer left
 * the SOCKHASH, passes its bytes to the proxy (SK_PASS), which relays them
 * in userspace: never a silent drop.
 */

/* The loader renders meshlet.h ahead of every .c file (one text, `meshlet bpf
 * render`); compiled on its own (bcc: -I bpf), this file includes it itself. */
#ifndef MESHLET_H
#include "include/meshlet.h"
#endif

#if ML_SPLICE

int ml_splice_verdict(struct __sk_buff *skb)
{
	u64 cookie = bpf_get_socket_cookie(skb);
	struct ml_splice_peer *p = ml_splice_peers.lookup(&cookie);
	u64 peer;

	/* A bare FIN reaches the verdict as an empty skb: the proxy sees the
	 * EOF itself and half-closes the peer once the bytes before it are
	 * out.  Redirected, the kernel's send of 0 bytes would fail and break
	 * the peer with EPIPE. */
	if (!skb->len)
		return SK_PASS;
	if (!p) {
		ml_count(ML_STAT_SPLICE_MISS);
		return SK_PASS;
	}
	peer = p->peer_cookie;
	if (ml_splice.sk_redirect_hash(skb, &peer, 0) != SK_PASS) {
		ml_count(ML_STAT_SPLICE_MISS);
		return SK_PASS;  /* no redirect set: the proxy reads these bytes */
	}
	__sync_fetch_and_add(&p->bytes, skb->len);
	ml_count(ML_STAT_SPLICE_REDIRECTED);
	return SK_PASS;
}

#endif /* ML_SPLICE */
