/* meshlet kernel/user contract: every map key and value layout lives here,
 * once.  agent/datapath/abi.py mirrors these structs with ctypes and a
 * privileged test compares sizes and offsets with what bcc compiled.
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

#define ML_ABI_VERSION 1
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
};

/* ml_enrolled: cgroup id -> workload; ml_pod_ips: pod address -> workload */
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
	__u64 cgroup_id;            /* cgroup of the task that called connect() */
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
BPF_TABLE_PINNED("lru_hash", u64, struct ml_origdst, ml_origdst, ML_MAX_FLOWS, ML_PIN(ml_origdst));
BPF_TABLE_PINNED("lru_hash", struct ml_flow_key, struct ml_origdst, ml_flows, ML_MAX_FLOWS, ML_PIN(ml_flows));

static __always_inline void ml_count(u32 stat)
{
	u64 *v = ml_stats.lookup(&stat);
	if (v)
		*v += 1;
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
