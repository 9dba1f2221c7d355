/* meshlet kernel/user contract: every map key and value layout lives here,
 * once.  agent/datapath/abi.py mirrors these structs with ctypes and a
 * privileged test compares sizes and offsets with what bcc compiled; the
 * constants below (ML_ABI_VERSION, ML_AF_*, ML_MODE_*, ML_ROLE_*,
 * ML_FLOW_F_*, ML_L4_*, enum ml_stat) are mirrored in abi.CONSTANTS and
 * checked with _Static_assert against this header in the same compiler.
 *
 * Byte order is in the name: *_be fields are network order, everything else
 * is host order.  IPv4 addresses sit in addr_be[0] with the rest zero.
 */
#ifndef MESHLET_H
#define MESHLET_H

#ifndef ML_PIN_DIR
#error "ML_PIN_DIR must be set (-DML_PIN_DIR=\"/sys/fs/bpf/meshlet/<node>\")"
#endif
#ifndef ML_MAX_WORKLOADS
#define ML_MAX_WORKLOADS 4096
#endif
#ifndef ML_MAX_FLOWS
#define ML_MAX_FLOWS 65536
#endif
#ifndef ML_MAX_EXCLUDES
#define ML_MAX_EXCLUDES 256
#endif
#ifndef ML_MAX_LIVE_FLOWS
#define ML_MAX_LIVE_FLOWS 65536
#endif
#ifndef ML_FLOW_RINGBUF_BYTES       /* power of two, a multiple of the page size */
#define ML_FLOW_RINGBUF_BYTES (1 << 20)
#endif
#ifndef ML_MAX_L4_RULES             /* ml_l4_policy entries (kernel L4 authorization) */
#define ML_MAX_L4_RULES 16384
#endif
#ifndef ML_MAX_L4_POLICIES          /* ml_l4_denied: per-policy refusal counters */
#define ML_MAX_L4_POLICIES 1024
#endif
#ifndef ML_SPLICE                   /* 1: splice.c and its maps (the kernel has sock_ops, sk_msg + sockhash) */
#define ML_SPLICE 0
#endif
#ifndef ML_MAX_SPLICED              /* entries of each splice map (two per spliced connection) */
#define ML_MAX_SPLICED 65536
#endif
#ifndef ML_SPLICE_WINDOW            /* bytes a target socket may hold unacked before pods' messages go to the proxy */
#define ML_SPLICE_WINDOW (4 << 20)
#endif
#ifndef ML_MAX_GUARDS               /* ml_cgroup_guard entries */
#define ML_MAX_GUARDS (ML_MAX_WORKLOADS + 256)
#endif
#ifndef ML_MAX_CGROUP_DEPTH         /* cgroup levels connect4/6 walk up from a task (sock.c ml_task_pod) */
#define ML_MAX_CGROUP_DEPTH 16
#endif
#ifndef ML_FLOW_TRACKING            /* 0: compile without the ml_flows program */
#define ML_FLOW_TRACKING 1
#endif

#define ML_ABI_VERSION 4
#define ML_PIN(name) ML_PIN_DIR "/" #name

#define ML_AF_INET 2
#define ML_AF_INET6 10
#define ML_SOCK_STREAM 1

/* inbound modes for plaintext from outside the mesh */
#define ML_MODE_PERMISSIVE 0
#define ML_MODE_STRICT 1

/* ml_config: one entry, written by the agent */
struct ml_config {
	__u32 redirect_ip4_be;      /* node proxy address for connect4 */
	__u32 redirect_ip6_be[4];   /* node proxy address for connect6 */
	__u16 outbound_port;        /* node proxy outbound listener */
	__u8 has_ip6;               /* 0: IPv6 connects are not redirected */
	__u8 enabled;               /* 0: datapath passes everything (drain) */
	__u32 mesh_mark;            /* SO_MARK of the proxy's own sockets */
	__u16 tunnel_port;          /* node proxy tunnel listener (0: none) */
	__u16 pad;
};

/* ml_enrolled: pod cgroup id -> workload (a task in that cgroup or below it
 * belongs to the pod: see ml_task_pod in sock.c); ml_pod_ips: pod address ->
 * workload */
struct ml_workload {
	__u32 workload_id;
	__u8 mode;                  /* ML_MODE_* for inbound plaintext */
	__u8 pad[3];
};

struct ml_ip_key {
	__u32 addr_be[4];
	__u8 family;                /* ML_AF_INET or ML_AF_INET6 */
	__u8 pad[3];
};

struct ml_cidr4_key {
	__u32 prefixlen;
	__u32 addr_be;
};

struct ml_cidr6_key {
	__u32 prefixlen;
	__u32 addr_be[4];
};

/* ml_origdst: socket cookie -> where the app wanted to go (connect hook);
 * kept until the socket closes so getpeername() can answer it */
struct ml_origdst {
	__u32 dst_be[4];
	__u64 cgroup_id;            /* pod cgroup (ml_enrolled key) of the task that called connect() */
	__u16 dst_port;
	__u8 family;
	__u8 pad;
	__u32 workload_id;
};

/* ml_flows: the 4-tuple the proxy sees on accept -> ml_origdst (sockops) */
struct ml_flow_key {
	__u32 saddr_be[4];          /* client (pod) address */
	__u32 daddr_be[4];          /* proxy address it was redirected to */
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 pad[3];
};

/* flow roles: which of the sockets of a meshed connection this is */
#define ML_ROLE_NONE 0
#define ML_ROLE_CLIENT 1            /* pod's redirected connect (cookie in ml_origdst) */
#define ML_ROLE_SERVER 2            /* accepted by a pod (local address in ml_pod_ips) */
#define ML_ROLE_PROXY_OUTBOUND 3    /* accepted by the proxy on its outbound port */
#define ML_ROLE_PROXY_TUNNEL 4      /* accepted by the proxy on its tunnel port */
#define ML_ROLE_PROXY_UPSTREAM 5    /* connected by the proxy (carries the mesh mark) */

#define ML_FLOW_F_EVICTED 1         /* close record of a flow whose live entry was evicted */

/* ml_live_flows: socket cookie -> flow (flowtrack.c); the same record, with
 * end_ns set, is what a closed flow emits into the ml_flow_events ring.
 * Times are CLOCK_MONOTONIC ns; byte and RTT fields are the kernel's
 * tcp_sock counters as sock_ops sees them. */
struct ml_flow {
	__u64 cookie;
	__u64 peer_cookie;          /* from ml_flow_links at close (0: none) */
	__u64 start_ns;             /* established */
	__u64 update_ns;            /* last callback that refreshed the counters */
	__u64 end_ns;               /* closed; 0 while open */
	__u64 bytes_acked;          /* sent and acknowledged by the peer */
	__u64 bytes_received;
	__u64 cgroup_id;            /* client legs: pod cgroup of the task that connected */
	__u32 saddr_be[4];          /* local address (IPv4-mapped folded into IPv4) */
	__u32 daddr_be[4];          /* remote address */
	__u32 orig_dst_be[4];       /* client legs: where the app wanted to go */
	__u32 workload_id;          /* client and server legs: the pod's workload */
	__u32 srtt_us;              /* smoothed RTT, us (tcp srtt_us >> 3) */
	__u32 rtt_min_us;           /* minimum RTT seen, us */
	__u32 total_retrans;
	__u16 sport;                /* local port */
	__u16 dport;                /* remote port */
	__u16 orig_dport;           /* client legs */
	__u8 family;
	__u8 role;                  /* ML_ROLE_* */
	__u8 state;                 /* BPF_TCP_*, BPF_TCP_CLOSE once closed */
	__u8 flags;                 /* ML_FLOW_F_* */
	__u8 orig_family;
	__u8 pad[5];
};

/* ml_l4_policy: connect-time L4 authorization (agent/policy/kernel.py).
 * Key: the connecting workload (ml_enrolled's workload_id) and where it
 * connects to; dst_port 0 stands for "any port without an entry of its own".
 * connect4/connect6 look up the exact port, then port 0.  A DENY verdict
 * refuses the connect() (the app gets EPERM); a PASS verdict (an exception
 * under a port-0 DENY) leaves the decision to the proxy.  The agent writes
 * an entry only where the proxy would refuse every connection it covers;
 * the destination proxy still decides everything it receives. */
#define ML_L4_PASS 0
#define ML_L4_DENY 1

struct ml_l4_key {
	__u32 dst_be[4];
	__u32 workload_id;          /* source workload (ml_enrolled) */
	__u16 dst_port;             /* host order; 0: any other port */
	__u8 family;                /* ML_AF_INET or ML_AF_INET6 */
	__u8 pad;
};

struct ml_l4_verdict {
	__u32 policy_id;            /* deciding policy (key of ml_l4_denied); 0: no ALLOW rule matched */
	__u8 action;                /* ML_L4_PASS or ML_L4_DENY */
	__u8 pad[3];
};

/* ml_cgroup_guard: cgroup id -> ML_GUARD_*.  Pods started while the agent
 * is down (or before it has seen them) must not get a plaintext path: a TCP
 * connect() from a task that is not enrolled is refused (EPERM) when the
 * nearest of its cgroup and that cgroup's ancestors found here or in
 * ml_enrolled is a DENY_UNKNOWN entry (the directories the node's pod
 * cgroups are created in); an ALLOW entry (a pod the inventory lists with mesh: false) lets it
 * through.  Loopback and excluded ports/CIDRs pass as they do for enrolled
 * pods.  Kept in bpffs, so it holds while no agent runs. */
#define ML_GUARD_DENY_UNKNOWN 1
#define ML_GUARD_ALLOW 2

struct ml_meta {
	__u64 source_hash;          /* hash of the compiled text + cflags */
	__u32 abi_version;
	__u32 pad;
};

/* ml_stats: per-CPU counters, indexed by these (keep abi.py in step) */
enum ml_stat {
	ML_STAT_REDIRECT4 = 0,
	ML_STAT_REDIRECT6,
	ML_STAT_BYPASS_PORT,
	ML_STAT_BYPASS_CIDR,
	ML_STAT_BYPASS_LOCAL,       /* loopback or the proxy address itself */
	ML_STAT_BYPASS_NO_IP6,      /* connect6 with no IPv6 redirect address */
	ML_STAT_FLOW_RECORDED,      /* sockops filed the 4-tuple */
	ML_STAT_ORIGDST_FULL,       /* could not record the original dst */
	ML_STAT_STRICT_DROP,        /* plaintext SYN to a strict pod dropped */
	ML_STAT_STRICT_MESH,        /* SYN from the mesh to a strict pod */
	ML_STAT_FLOW_TRACKED,       /* flowtrack.c started tracking a TCP flow */
	ML_STAT_FLOW_CLOSED,        /* a closed flow went into the ring buffer */
	ML_STAT_FLOW_TABLE_FULL,    /* could not add a flow to ml_live_flows */
	ML_STAT_FLOW_EVICTED,       /* a tracked flow's live entry was gone at close (LRU) */
	ML_STAT_FLOW_RINGBUF_FULL,  /* a closed flow was lost: ring buffer reserve failed */
	ML_STAT_POLICY_DENIED,      /* connect() refused by an ml_l4_policy DENY entry */
	ML_STAT_UNKNOWN_DENIED,     /* connect() refused: a cgroup under the pods' subtree not enrolled */
	ML_STAT_SPLICE_REDIRECTED,  /* splice.c: a pod's message went straight out of the proxy's far socket */
	ML_STAT_SPLICE_MISS,        /* splice.c: an armed pod socket's message went to the proxy (not in step yet, or no target) */
	ML_STAT_MAX,
};

BPF_TABLE_PINNED("array", u32, struct ml_config, ml_config, 1, ML_PIN(ml_config));
BPF_TABLE_PINNED("array", u32, struct ml_meta, ml_meta, 1, ML_PIN(ml_meta));
BPF_TABLE_PINNED("percpu_array", u32, u64, ml_stats, ML_STAT_MAX, ML_PIN(ml_stats));
BPF_TABLE_PINNED("hash", u64, struct ml_workload, ml_enrolled, ML_MAX_WORKLOADS, ML_PIN(ml_enrolled));
BPF_TABLE_PINNED("hash", struct ml_ip_key, struct ml_workload, ml_pod_ips, ML_MAX_WORKLOADS, ML_PIN(ml_pod_ips));
BPF_TABLE_PINNED("hash", u16, u8, ml_excl_ports, ML_MAX_EXCLUDES, ML_PIN(ml_excl_ports));
BPF_TABLE_PINNED7("lpm_trie", struct ml_cidr4_key, u8, ml_excl_cidr4, ML_MAX_EXCLUDES, ML_PIN(ml_excl_cidr4), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED7("lpm_trie", struct ml_cidr6_key, u8, ml_excl_cidr6, ML_MAX_EXCLUDES, ML_PIN(ml_excl_cidr6), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", u64, u32, ml_cgroup_guard, ML_MAX_GUARDS, ML_PIN(ml_cgroup_guard));
BPF_TABLE_PINNED("hash", struct ml_l4_key, struct ml_l4_verdict, ml_l4_policy, ML_MAX_L4_RULES, ML_PIN(ml_l4_policy));
/* ml_l4_denied: policy_id -> connects refused (kept across policy changes;
 * ids are the agent's stable hash of "namespace/name") */
BPF_TABLE_PINNED("hash", u32, u64, ml_l4_denied, ML_MAX_L4_POLICIES, ML_PIN(ml_l4_denied));
BPF_TABLE_PINNED("lru_hash", u64, struct ml_origdst, ml_origdst, ML_MAX_FLOWS, ML_PIN(ml_origdst));
BPF_TABLE_PINNED("lru_hash", struct ml_flow_key, struct ml_origdst, ml_flows, ML_MAX_FLOWS, ML_PIN(ml_flows));
BPF_TABLE_PINNED("lru_hash", u64, struct ml_flow, ml_live_flows, ML_MAX_LIVE_FLOWS, ML_PIN(ml_live_flows));
/* ml_flow_links: socket cookie -> the cookie of the socket the proxy relays
 * it to (written by the proxy, both ways; flowtrack.c forgets a cookie at close) */
BPF_TABLE_PINNED("lru_hash", u64, u64, ml_flow_links, ML_MAX_LIVE_FLOWS, ML_PIN(ml_flow_links));

/* ml_flow_events: closed flows (struct ml_flow records) for the agent.
 * bcc 0.26 has no pinned variant of BPF_RINGBUF_OUTPUT; this is that macro
 * with the "type:pin path" section BPF_TABLE_PINNED uses.  The pin lives in
 * a subdirectory because a ring buffer has no keys to list (get_next_key
 * fails), so tools that walk the pinned hash maps must not meet it. */
#define ML_RINGBUF_PINNED(_name, _bytes, _pinned) \
struct _name##_table_t { \
	int key; \
	u32 leaf; \
	int (*ringbuf_output)(void *, u64, u64); \
	void *(*ringbuf_reserve)(u64); \
	void (*ringbuf_discard)(void *, u64); \
	void (*ringbuf_submit)(void *, u64); \
	u32 max_entries; \
}; \
__attribute__((section("maps/ringbuf:" _pinned))) \
struct _name##_table_t _name = { .max_entries = (_bytes) }
#define ML_EVENTS_DIR "events"
ML_RINGBUF_PINNED(ml_flow_events, ML_FLOW_RINGBUF_BYTES, ML_PIN_DIR "/" ML_EVENTS_DIR "/ml_flow_events");

/* ml_splice_peers: socket cookie of one of the proxy's two sockets of a
 * spliced connection -> the proxy's other socket and how many bytes the
 * kernel sent out of this one straight from a pod (written by the proxy,
 * counted by splice.c; LRU: the proxy reads it after the pod may be gone). */
struct ml_splice_peer {
	__u64 peer_cookie;          /* the proxy's socket on the other side */
	__u64 bytes;                /* bytes redirected into this socket so far */
	__u64 acked;                /* its tcp bytes_acked, as of its last RTT sample (sock_ops) */
};

/* ml_splice_arm: a pod socket (its own 4-tuple, struct ml_flow_key) -> where
 * splice.c may send its bytes (written by the proxy only). */
struct ml_splice_arm {
	__u64 target_cookie;        /* the proxy's socket facing the other pod (in ml_splice_tgt) */
	__u64 relayed;              /* bytes of this pod socket the proxy has read and fully handed to the target */
};

/* ml_splice_cnt: a pod socket -> what splice.c did with its bytes (written
 * by BPF only: sock_ops creates it, splice.c counts, sock_ops removes it). */
struct ml_splice_cnt {
	__u64 passed;               /* bytes sent through the pod's own TCP connection to the proxy */
	__u64 redirected;           /* bytes sent out of the proxy's target socket instead */
};

#if ML_SPLICE
/* The same-node fast path's maps (bpf/splice.c).  bcc 0.26 has no pinned
 * BPF_SOCKHASH: this is its struct with the "type:pin path" section
 * BPF_TABLE_PINNED uses.  All live in a subdirectory: a SOCKHASH cannot be
 * read back (values are sockets), so tools that walk the pinned maps must
 * not meet it, and the set is optional.
 * - ml_splice: pod sockets of proxied connections by 4-tuple (sock_ops puts
 *   them in; splice.c's sk_msg program is attached to this map);
 * - ml_splice_tgt: the proxy's own sockets by cookie (redirect targets only,
 *   no program). */
#define ML_SPLICE_DIR "splice"
#define ML_SOCKHASH_PINNED(_name, _key_type, _max, _pinned) \
struct _name##_table_t { \
	_key_type key; \
	int leaf; \
	int (*update)(_key_type *, int *); \
	int (*delete)(_key_type *); \
	int (*sock_hash_update)(void *, void *, u64); \
	int (*msg_redirect_hash)(void *, void *, u64); \
	int (*sk_redirect_hash)(void *, void *, u64); \
	u32 max_entries; \
}; \
__attribute__((section("maps/sockhash:" _pinned))) \
struct _name##_table_t _name = { .max_entries = (_max) }
ML_SOCKHASH_PINNED(ml_splice, struct ml_flow_key, ML_MAX_SPLICED, ML_PIN_DIR "/" ML_SPLICE_DIR "/ml_splice");
ML_SOCKHASH_PINNED(ml_splice_tgt, u64, ML_MAX_SPLICED, ML_PIN_DIR "/" ML_SPLICE_DIR "/ml_splice_tgt");
BPF_TABLE_PINNED("lru_hash", u64, struct ml_splice_peer, ml_splice_peers, ML_MAX_SPLICED,
		 ML_PIN_DIR "/" ML_SPLICE_DIR "/ml_splice_peers");
BPF_TABLE_PINNED("lru_hash", struct ml_flow_key, struct ml_splice_arm, ml_splice_arm, ML_MAX_SPLICED,
		 ML_PIN_DIR "/" ML_SPLICE_DIR "/ml_splice_arm");
BPF_TABLE_PINNED("lru_hash", struct ml_flow_key, struct ml_splice_cnt, ml_splice_cnt, ML_MAX_SPLICED,
		 ML_PIN_DIR "/" ML_SPLICE_DIR "/ml_splice_cnt");
/* Upstream sockets of the proxy to a pod of this node, by the 4-tuple the
 * pod's accepted socket will have: sock_ops files it when the proxy's side
 * is established (before its ACK leaves) and takes it back when the pod's
 * side is. */
BPF_TABLE_PINNED("lru_hash", struct ml_flow_key, u8, ml_splice_pending, ML_MAX_SPLICED,
		 ML_PIN_DIR "/" ML_SPLICE_DIR "/ml_splice_pending");
#endif

static __always_inline void ml_count(u32 stat)
{
	u64 *v = ml_stats.lookup(&stat);
	if (v)
		*v += 1;
}

/* Bytes a pod socket's app sent that splice.c redirected out of the proxy's
 * far socket instead of its own TCP connection (0 without the splice): the
 * flow table adds them to the socket's bytes_acked, so that it counts what
 * the app sent whichever way the bytes went. */
static __always_inline u64 ml_splice_redirected(const __u32 *saddr_be, const __u32 *daddr_be,
						u16 sport, u16 dport, u8 family)
{
#if ML_SPLICE
	struct ml_flow_key k = {};
	struct ml_splice_cnt *c;

	k.saddr_be[0] = saddr_be[0];
	k.saddr_be[1] = saddr_be[1];
	k.saddr_be[2] = saddr_be[2];
	k.saddr_be[3] = saddr_be[3];
	k.daddr_be[0] = daddr_be[0];
	k.daddr_be[1] = daddr_be[1];
	k.daddr_be[2] = daddr_be[2];
	k.daddr_be[3] = daddr_be[3];
	k.sport = sport;
	k.dport = dport;
	k.family = family;
	c = ml_splice_cnt.lookup(&k);
	return c ? c->redirected : 0;
#else
	return 0;
#endif
}

static __always_inline struct ml_config *ml_get_config(void)
{
	u32 zero = 0;
	return ml_config.lookup(&zero);
}

static __always_inline int ml_port_excluded(u16 port)
{
	return ml_excl_ports.lookup(&port) != NULL;
}

#endif /* MESHLET_H */
