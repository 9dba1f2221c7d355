"""The ``meshlet`` command line.

Exit codes: 0 success; 1 the command ran and found a problem (failed check,
invalid file, agent unreachable); 2 usage error.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys

import click

from . import __version__

OUTPUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
                      show_default=True, help="Output format.")


def _die(msg: str, code: int = 1) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _load_config(path: str):
    from .config import load_config
    from .yamlsrc import SourceError

    try:
        return load_config(path)
    except SourceError as e:
        _die(f"invalid config:\n{e}")
    except OSError as e:
        _die(f"cannot read config {path}: {e.strerror}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshlet")
def main() -> None:
    """meshlet: a sidecarless, eBPF-accelerated service mesh node agent.

    \b
    Start here:
      meshlet doctor                  does this node have what the datapath needs?
      meshlet run --config FILE       run the node agent (datapath + proxy + admin API)
      meshlet status                  ask a running agent what it is doing
      meshlet bpf status              what is pinned and attached (works without the agent)
      meshlet inventory validate F    check an inventory file offline
      meshlet ca init --out DIR       create the mesh CA (root + per-node intermediates)
      meshlet certs                   workload certificates, expiry and next rotation
      meshlet flows [-f]              TCP flows from the kernel: legs, bytes, RTT
      meshlet stats                   traffic per workload pair; Prometheus on :15020/metrics
      meshlet services                service VIPs, ports and the endpoints behind them
      meshlet policy validate F|DIR   authorization + traffic policies, offline (also explain, lint)
    """


# --- run ------------------------------------------------------------------------

@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Agent config (YAML). See README for the fields.")
@click.option("--keep-datapath", is_flag=True,
              help="On SIGTERM, leave the pinned datapath and the proxy workers running so a "
                   "restarted agent adopts them (traffic keeps flowing meanwhile).")
def run(config_path: str, keep_datapath: bool) -> None:
    """Run the node agent in the foreground until SIGTERM/SIGINT.

    Checks the kernel first (as `meshlet doctor` does) and refuses to start,
    with the fix for each missing piece, rather than attach half a datapath.
    """
    cfg = _load_config(config_path)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {cfg.node} %(name)s %(levelname)s %(message)s")
    from .app import AgentError, run_agent
    from .datapath.loader import DatapathError

    try:
        sys.exit(run_agent(cfg, keep_datapath=keep_datapath))
    except (AgentError, DatapathError) as e:
        _die(str(e))


# --- doctor -----------------------------------------------------------------------

@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Also check what this agent config needs (its cgroup, pin dir).")
@OUTPUT
def doctor(config_path: str | None, output: str) -> None:
    """Check the kernel features the datapath needs; print the fix for each
    missing one. Exit 1 when a required piece is missing (optional ones, such
    as tcx outside strict mode, are reported but do not fail)."""
    from .doctor import checks_to_json, format_checks, ready, run_checks

    cfg = _load_config(config_path) if config_path else None
    checks = run_checks(cfg)
    if output == "json":
        click.echo(json.dumps(checks_to_json(checks), indent=2))
    else:
        click.echo(format_checks(checks))
    sys.exit(0 if ready(checks) else 1)


# --- bpf ---------------------------------------------------------------------------

@main.group()
def bpf() -> None:
    """Inspect the eBPF datapath."""


def _pin_dir(config_path: str | None, pin_dir: str | None, node: str | None) -> tuple[str, str | None]:
    if config_path:
        from . import cgroup as cg
        cfg = _load_config(config_path)
        return cfg.bpf.pin_dir, cg.resolve(cfg.cgroup)
    if pin_dir:
        return pin_dir, None
    if node:
        return f"/sys/fs/bpf/meshlet/{node}", None
    found = sorted(glob.glob("/sys/fs/bpf/meshlet/*"))
    if len(found) == 1:
        return found[0], None
    if not found:
        _die("no meshlet datapath is pinned under /sys/fs/bpf/meshlet (is an agent running?)")
    _die("several nodes are pinned here (" + ", ".join(os.path.basename(f) for f in found)
         + "); pick one with --node or --config")
    raise AssertionError


@bpf.command("status")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Agent config.")
@click.option("--pin-dir", help="bpffs directory of the datapath.")
@click.option("--node", help="Node name (pin dir /sys/fs/bpf/meshlet/<node>).")
@OUTPUT
def bpf_status(config_path, pin_dir, node, output) -> None:
    """Programs, attachments, pinned maps and their fill, kernel counters.

    Reads bpffs directly, so it works while the agent is down."""
    from .datapath.status import datapath_status

    pd, cgdir = _pin_dir(config_path, pin_dir, node)
    st = datapath_status(pd, cgdir)
    if output == "json":
        click.echo(json.dumps(st, indent=2))
        return
    if not st["present"]:
        _die(f"nothing pinned at {pd}")
    click.echo(f"datapath pinned at {pd}")
    click.echo("\nPROGRAMS")
    for p in st["programs"]:
        click.echo(f"  {p['name']:<16} id={p['id']:<6} {p['type']:<18} tag={p['tag']}")
    click.echo("\nATTACHMENTS (bpf links)")
    for li in st["links"]:
        where = f"cgroup_id={li['cgroup_id']}" if "cgroup_id" in li else f"ifindex={li['ifindex']}"
        state = "attached" if li["attached"] else "DETACHED (target gone)"
        click.echo(f"  {li['name']:<24} {li['attach']:<16} prog={li['prog_id']:<6} {where:<18} {state}")
    tc = st["tc"]
    click.echo(f"\nSTRICT MODE ON POD VETHS: {tc['attach']}")
    for f in tc["clsact_filters"]:
        state = "current" if f["current"] else "OLD PROGRAM"
        click.echo(f"  clsact egress {f['ifname']:<16} prog={f['prog_id']!s:<6} "
                   f"ifindex={f['ifindex']:<8} {state}")
    if st["cgroup_attachments"]:
        click.echo(f"\nPROGRAMS ON {st['cgroup']}")
        for k, ids in st["cgroup_attachments"].items():
            click.echo(f"  {k:<16} {ids}")
    click.echo("\nMAPS")
    for m in st["maps"]:
        click.echo(f"  {m['name']:<16} {m['type']:<13} {m['entries']:>7}/{m['max_entries']:<7}"
                   f" key={m['key_size']}B value={m['value_size']}B")
    click.echo("\nCOUNTERS")
    for k, v in st["counters"].items():
        click.echo(f"  {k:<16} {v}")


@bpf.command("render")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Agent config (pin dir and map sizes come from it).")
@click.option("--node", default="node1", show_default=True,
              help="Node name when no config is given.")
def bpf_render(config_path, node) -> None:
    """Print the exact C text handed to bcc, preceded by its -D options."""
    from .datapath.loader import DatapathSpec, render

    if config_path:
        cfg = _load_config(config_path)
        spec = DatapathSpec(node=cfg.node, pin_dir=cfg.bpf.pin_dir, cgroup=cfg.cgroup,
                            redirect_ip4=str(cfg.proxy.redirect_ipv4), redirect_ip6=None,
                            outbound_port=cfg.proxy.outbound_port, mesh_mark=cfg.proxy.mesh_mark)
    else:
        spec = DatapathSpec(node=node, pin_dir=f"/sys/fs/bpf/meshlet/{node}", cgroup="",
                            redirect_ip4="0.0.0.0", redirect_ip6=None, outbound_port=15001,
                            mesh_mark=0)
    r = render(spec)
    click.echo("/* cflags: " + " ".join(r.cflags) + " */")
    click.echo(f"/* source hash: {r.source_hash:016x} */")
    click.echo(r.text)


# --- agent queries --------------------------------------------------------------------

def _admin_socket(sock: str | None, node: str | None) -> str:
    if sock:
        return sock
    if os.environ.get("MESHLET_ADMIN_SOCKET"):
        return os.environ["MESHLET_ADMIN_SOCKET"]
    if node:
        return f"/run/meshlet/{node}/admin.sock"
    found = sorted(glob.glob("/run/meshlet/*/admin.sock"))
    if len(found) == 1:
        return found[0]
    if not found:
        _die("no agent admin socket under /run/meshlet/*/ (is `meshlet run` running?); "
             "pass --socket")
    _die("several agents run here; pick one with --node or --socket")
    raise AssertionError


def admin_get(path: str, sock: str) -> dict:
    from .adminclient import admin_get as get

    try:
        status, data = get(sock, path)
    except OSError as e:
        _die(f"cannot reach the agent at {sock}: {e.strerror or e}; is `meshlet run` running?")
    except ValueError as e:
        _die(f"unexpected answer from {sock}: {e}")
    if status != 200:
        _die(f"agent answered {status}: {data.get('error')}")
    return data


AGENT_OPTS = [
    click.option("--socket", "sock", help="Agent admin socket (default: the only one under "
                 "/run/meshlet, or $MESHLET_ADMIN_SOCKET)."),
    click.option("--node", help="Node name (socket /run/meshlet/<node>/admin.sock)."),
]


def agent_opts(f):
    for opt in reversed(AGENT_OPTS):
        f = opt(f)
    return f


@main.command()
@agent_opts
@OUTPUT
def status(sock, node, output) -> None:
    """What the running agent is doing: datapath, enrolled pods, proxy workers."""
    st = admin_get("/v1/status", _admin_socket(sock, node))
    if output == "json":
        click.echo(json.dumps(st, indent=2))
        return
    dp = st["datapath"]
    click.echo(f"node {st['node']}  mode {st['mode']}  up {st['uptime_s']}s  "
               f"datapath {dp['how']} ({dp['pin_dir']})"
               + (f", strict mode via {dp['tc_attach']}" if dp.get("tc_attach") else ""))
    inv = st["inventory"]
    click.echo(f"inventory {inv['path']}: {inv['pods']} pods"
               + (f"\n  LAST RELOAD FAILED (previous state kept):\n  {inv['error']}"
                  if inv["error"] else ""))
    click.echo(f"enrolled {len(st['enrolled'])} pods; pending {len(st['pending'])}")
    pol = st.get("policy") or {}
    if pol:
        click.echo(f"policies {pol.get('count')}, version {pol.get('version')}")
    for p in st["pending"]:
        click.echo(f"  pending {p['pod']}: {p['reason']}")
    for w in st["proxy"]:
        s = w.get("stats") or {}
        click.echo(f"proxy worker {w['worker']}: pid {w['pid']} "
                   f"{'alive' if w['alive'] else 'DOWN'}{' (adopted)' if w['adopted'] else ''}"
                   f" restarts {w['restarts']}"
                   + (f", {s.get('active_connections')} active connections, "
                      + ", ".join(f"{k}={v}" for k, v in (s.get("counters") or {}).items() if v)
                      if s else ""))
    click.echo("kernel counters: " + ", ".join(f"{k}={v}" for k, v in dp["counters"].items()))
    for e in dp["tc_errors"]:
        click.echo(f"  tc error: {e}")


@main.command()
@agent_opts
@OUTPUT
def workloads(sock, node, output) -> None:
    """Pods on this node and whether the mesh has them."""
    data = admin_get("/v1/workloads", _admin_socket(sock, node))
    if output == "json":
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{'POD':<28} {'ENROLLED':<9} {'MODE':<11} {'IPS':<34} REASON")
    for w in data["workloads"]:
        click.echo(f"{w['pod']:<28} {'yes' if w['enrolled'] else 'no':<9} {w['mode']:<11} "
                   f"{','.join(w['ips']):<34} {w['reason'] or ''}")


@main.command()
@agent_opts
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table",
              show_default=True, help="table: one row per service port; wide: one row per "
              "endpoint; json: everything, as GET /v1/services.")
def services(sock, node, output) -> None:
    """Services (virtual IPs) the node proxy balances, and their endpoints.

    \b
    A service comes from the inventory's services: section:
      services:
        - name: backend
          namespace: shop
          vip: [10.96.0.10, "fd00:96::10"]   # on no interface: the mesh redirects it
          selector: {app: backend}            # endpoints: pods of shop with these labels
          ports: [{port: 80, targetPort: 8080, appProtocol: http}]

    \b
    Endpoints are computed from the pods' labels, one per pod address in
    each family (a connection to the IPv6 VIP goes to IPv6 addresses).  Only
    mesh pods can reach a VIP (there is no kube-proxy); endpoints with
    mesh: false get plain TCP from the proxy, marked "no" under MESH.

    \b
    Columns (table):
      SERVICE    namespace/name          VIPS       its virtual IPs
      PORT       port -> targetPort      PROTOCOL   appProtocol (detect: sniffed)
      ENDPOINTS  how many pods, and how many on this node
    -o wide lists every endpoint (pod, node, address, mesh); -o json is
    the admin API's answer (GET /v1/services).
    """
    data = admin_get("/v1/services", _admin_socket(sock, node))
    if output == "json":
        click.echo(json.dumps(data, indent=2))
        return
    if data.get("inventory_error"):
        click.echo("INVENTORY RELOAD FAILED (the previous services stay in force):\n"
                   f"{data['inventory_error']}\n", err=True)
    rows = []
    for s in data["services"]:
        for p in s["ports"]:
            port = f"{p['port']}" + (f"/{p['name']}" if p.get("name") else "")
            port += f" -> {p['target_port']}"
            base = [s["key"], ",".join(s["vips"]), port, p.get("app_protocol") or "detect"]
            eps = p["endpoints"]
            if output == "wide":
                for e in eps or [None]:
                    addr = f"[{e['ip']}]" if e and ":" in e["ip"] else (e or {}).get("ip")
                    rows.append(base + ([e["pod"], e["node"], f"{addr}:{e['port']}",
                                         "yes" if e.get("mesh", True) else "no"]
                                        if e else ["<none>", "", "", ""]))
            else:
                pods = {e["pod"] for e in eps}  # a dual-stack pod has two endpoints
                here = {e["pod"] for e in eps if e.get("local")}
                rows.append(base + [f"{len(pods)} ({len(here)} here)" if eps
                                    else "0 (no pod matches)"])
    head = ["SERVICE", "VIPS", "PORT", "PROTOCOL"] + (
        ["ENDPOINT", "NODE", "ADDRESS", "MESH"] if output == "wide" else ["ENDPOINTS"])
    if not rows:
        click.echo(f"no services on node {data.get('node')} (add a services: section to the "
                   "inventory; see meshlet services --help)")
        return
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


@main.command()
@agent_opts
@OUTPUT
def certs(sock, node, output) -> None:
    """Workload certificates the node proxy holds: SPIFFE ID, serial, expiry
    and next rotation, plus the trust bundle and this node's CA."""
    st = admin_get("/v1/status", _admin_socket(sock, node))
    ident = st.get("identity", {})
    workers = [{"worker": w["worker"], **((w.get("stats") or {}).get("certs") or {})}
               for w in st["proxy"]]
    if output == "json":
        click.echo(json.dumps({"node": st["node"], "identity": ident, "proxy": workers},
                              indent=2))
        return
    click.echo(f"trust domain {ident.get('trust_domain')}  bundle "
               f"{(ident.get('bundle_fingerprint') or '')[:16]}  "
               f"({len(ident.get('roots', []))} roots)  identity generation "
               f"{ident.get('generation')}")
    ca = ident.get("node_ca") or {}
    click.echo(f"node CA {ca.get('subject')} serial {ca.get('serial')} expires "
               f"{ca.get('not_after')}")
    if ident.get("error"):
        click.echo(f"  LAST RELOAD FAILED (previous CA material kept): {ident['error']}")
    click.echo(f"\n{'WORKER':<7}{'SPIFFE ID':<52}{'SERIAL':<18}{'EXPIRES':<27}NEXT ROTATION")
    for w in workers:
        for c in w.get("identities", []):
            click.echo(f"{w['worker']:<7}{c.get('spiffe_id', ''):<52}"
                       f"{str(c.get('serial', ''))[:16]:<18}{c.get('not_after', ''):<27}"
                       f"{c.get('next_rotation', '')}")


@main.command()
@agent_opts
@click.option("--pod", help="Only flows from or to this pod (namespace/name or name).")
@click.option("--namespace", help="Only flows from or to pods of this namespace.")
@click.option("--identity", help="Only flows from or to this SPIFFE ID "
              "(spiffe://<trust domain>/ns/<ns>/sa/<sa>).")
@click.option("--port", type=click.IntRange(0, 65535), help="Only flows with this port at "
              "either end.")
@click.option("--state", help="open, closed, or a TCP state (established, close_wait, ...).")
@click.option("--since", help="Only flows alive during the last DURATION (30s, 5m, 2h).")
@click.option("--sort", type=click.Choice(["start", "srtt", "bytes", "age", "retrans"]),
              default="start", show_default=True,
              help="start: oldest first; srtt, bytes, retrans: largest first; age: longest-lived "
                   "first.")
@click.option("--limit", type=click.IntRange(0), default=0, help="At most N rows (0: all).")
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--follow", "-f", is_flag=True, help="Stream new and closed flows as they happen.")
@click.option("--max-seconds", type=click.FloatRange(0, min_open=True), default=3600.0,
              show_default=True, help="Stop following after this long.")
def flows(sock, node, pod, namespace, identity, port, state, since, sort, limit, output, follow,
          max_seconds) -> None:
    """TCP flows of this node's meshed pods and proxy, from the kernel.

    One row per socket: a pod's client leg, the proxy's accepted, tunnel and
    upstream legs, a pod's server leg. SENT/RECEIVED are the source's bytes
    (kernel tcp_info counters: SYN and FIN count one byte each). Closed flows
    stay listed (the agent keeps the most recent ones).
    """
    from urllib.parse import urlencode

    from .flows import FlowFilter, format_table, parse_since

    try:
        flt = FlowFilter(pod=pod, namespace=namespace, identity=identity, port=port, state=state,
                         since=parse_since(since) if since else None)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    params = flt.to_params()
    if since:
        params["since"] = since
    params["sort"] = sort
    if limit:
        params["limit"] = str(limit)
    sock_path = _admin_socket(sock, node)
    if follow:
        params["max_seconds"] = str(max_seconds)
        _follow_flows(sock_path, "/v1/flows/follow?" + urlencode(params), output, max_seconds)
        return
    data = admin_get("/v1/flows?" + urlencode(params), sock_path)
    if output == "json":
        click.echo(json.dumps(data["flows"], indent=2))
        return
    if not data["flows"]:
        click.echo("no flows match", err=True)
        return
    click.echo(format_table(data["flows"], wide=output == "wide"))
    c = data.get("counters", {})
    if c.get("flow_evicted") or c.get("flow_ringbuf_full") or c.get("flow_table_full"):
        click.echo(f"warning: flow records lost to map pressure: {c.get('flow_evicted', 0)} "
                   f"evicted, {c.get('flow_ringbuf_full', 0)} ring buffer full, "
                   f"{c.get('flow_table_full', 0)} table full", err=True)


def _follow_flows(sock_path: str, path: str, output: str, max_seconds: float) -> None:
    """Print the agent's flow events (JSON lines) as they arrive."""
    import socket
    import time

    from .flows import format_table

    deadline = time.monotonic() + max_seconds
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    except OSError as e:
        _die(f"cannot reach the agent at {sock_path}: {e.strerror or e}; is `meshlet run` running?")
    with s:
        f = s.makefile("rb")
        try:
            status = f.readline().split()
            while f.readline() not in (b"\r\n", b"\n", b""):
                pass
            if len(status) < 2 or status[1] != b"200":
                body = f.read()
                _die(f"agent answered {status[1].decode() if len(status) > 1 else '?'}: "
                     f"{json.loads(body).get('error') if body else ''}")
            header = output != "json"
            while time.monotonic() < deadline:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    line = f.readline()
                except TimeoutError:
                    break
                if not line:
                    break
                ev = json.loads(line)
                if output == "json":
                    click.echo(json.dumps(ev))
                else:
                    mark = "+new" if ev["event"] == "new" else "-closed"
                    click.echo(format_table([ev["flow"]], wide=output == "wide", header=header,
                                            prefix=[mark], fixed=True))
                    header = False
        except KeyboardInterrupt:
            pass
        except OSError as e:
            _die(f"lost the agent at {sock_path}: {e.strerror or e}")


# --- stats (#6) ---------------------------------------------------------------------------

@main.command()
@agent_opts
@click.option("--from", "src", help="Only traffic from this workload (name or namespace/name).")
@click.option("--to", "dst", help="Only traffic to this workload (name or namespace/name).")
@OUTPUT
def stats(sock, node, src, dst, output) -> None:
    """Traffic per workload pair on this node: connections, bytes each way,
    TCP RTT from the kernel, and HTTP requests, success rate (non-5xx) and
    request latency p50/p95/p99 from the proxy.

    A workload is a pod's `app` label, else its name. SENT is what the
    source sent. Bytes are the proxy's application bytes, the same numbers
    /metrics serves as istio_tcp_*_bytes_total. HTTP requests are counted
    (with proxy.l7 on) by the destination node's proxy, the same numbers as
    istio_requests_total: on the client's node a cross-node pair shows "-"
    (not measured there); ask the destination node."""
    from urllib.parse import urlencode

    from .stats import format_table

    params = {k: v for k, v in (("from", src), ("to", dst)) if v}
    data = admin_get("/v1/stats" + (f"?{urlencode(params)}" if params else ""),
                     _admin_socket(sock, node))
    if output == "json":
        click.echo(json.dumps(data["rows"], indent=2))
        return
    if not data["rows"]:
        click.echo("no traffic matches", err=True)
        return
    click.echo(format_table(data["rows"]))


# --- CA material -----------------------------------------------------------------------

@main.group()
def ca() -> None:
    """Create and rotate the mesh's CA: a root and one intermediate per node.

    \b
    Rotation with overlap, node by node, no connection errors:
      meshlet ca rotate-root --dir D      new root; bundle.pem = old + new roots
      (distribute bundle.pem to every node; agents pick it up live)
      meshlet ca reissue-node --dir D N   node N's intermediate from the new root
      meshlet ca retire-root --dir D OLD  once every node is reissued
    """


def _ca_call(fn, *args, **kw):
    from .identity.ca import CaError

    try:
        return fn(*args, **kw)
    except (CaError, OSError, ValueError) as e:
        _die(str(e))


@ca.command("init")
@click.option("--trust-domain", default="cluster.local", show_default=True,
              help="SPIFFE trust domain (lowercase).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to create (root.pem, bundle.pem, nodes/<node>/ca.pem ...).")
@click.option("--node", "nodes", multiple=True, help="Issue an intermediate for this node "
              "(repeat for each node).")
@click.option("--force", is_flag=True, help="Overwrite an existing CA directory.")
def ca_init(trust_domain, out_dir, nodes, force) -> None:
    """Create a root CA (ECDSA P-256) and per-node intermediates."""
    from .identity.ca import init_ca

    layout = _ca_call(init_ca, out_dir, trust_domain, list(nodes), force=force)
    click.echo(f"root CA and trust bundle for {trust_domain} in {layout.out_dir}")
    for n, d in sorted(layout.node_dirs.items()):
        click.echo(f"  node {n}: {d}/ca.pem, {d}/ca-key.pem")


@ca.command("add-node")
@click.option("--dir", "out_dir", required=True, type=click.Path(file_okay=False))
@click.argument("node")
def ca_add_node(out_dir, node) -> None:
    """Issue an intermediate for one more node from the current root."""
    from .identity.ca import add_node

    p = _ca_call(add_node, out_dir, node)
    click.echo(f"issued node {p.node}: {p.cert}, {p.key}")


@ca.command("reissue-node")
@click.option("--dir", "out_dir", required=True, type=click.Path(file_okay=False))
@click.argument("node")
def ca_reissue_node(out_dir, node) -> None:
    """New intermediate for NODE from the current root (after rotate-root)."""
    from .identity.ca import reissue_node

    p = _ca_call(reissue_node, out_dir, node)
    click.echo(f"reissued node {p.node} from the current root: {p.cert}, {p.key}")


@ca.command("rotate-root")
@click.option("--dir", "out_dir", required=True, type=click.Path(file_okay=False))
def ca_rotate_root(out_dir) -> None:
    """Create a new root; the bundle then trusts both old and new roots."""
    from .identity.ca import rotate_root

    layout = _ca_call(rotate_root, out_dir)
    click.echo(f"new root in {layout.out_dir}; bundle.pem now holds "
               f"{len(layout.bundle.roots)} roots. Next: copy bundle.pem to every node, then "
               "reissue-node each node, then retire-root the old one.")


@ca.command("retire-root")
@click.option("--dir", "out_dir", required=True, type=click.Path(file_okay=False))
@click.argument("root")
def ca_retire_root(out_dir, root) -> None:
    """Drop an old root (serial or fingerprint) from bundle.pem."""
    from .identity.ca import retire_root

    _ca_call(retire_root, out_dir, root)
    click.echo(f"retired {root} from {out_dir}/bundle.pem")


# --- offline validation ---------------------------------------------------------------

@main.group()
def inventory() -> None:
    """Node inventory files (pods, nodes, namespaces)."""


@inventory.command("validate")
@click.argument("path", type=click.Path(dir_okay=False))
@OUTPUT
def inventory_validate(path, output) -> None:
    """Check an inventory file offline; errors name file:line:column and field."""
    from .workloads.inventory import load_inventory
    from .yamlsrc import SourceError

    try:
        inv = load_inventory(path)
    except SourceError as e:
        if output == "json":
            click.echo(json.dumps({"valid": False, "errors": [str(p) for p in e.errors]}))
            sys.exit(1)
        _die(str(e))
    except OSError as e:
        _die(f"cannot read {path}: {e.strerror}")
    if output == "json":
        counts = {"nodes": len(inv.nodes), "pods": len(inv.pods)}
        if inv.services:
            counts["services"] = len(inv.services)
        click.echo(json.dumps({"valid": True, **counts}))
    else:
        more = f", {len(inv.services)} services" if inv.services else ""
        click.echo(f"{path}: valid ({len(inv.nodes)} nodes, {len(inv.pods)} pods{more})")


@main.group()
def config() -> None:
    """Agent config files."""


@config.command("validate")
@click.argument("path", type=click.Path(dir_okay=False))
@OUTPUT
def config_validate(path, output) -> None:
    """Check an agent config offline and print it with defaults filled in."""
    cfg = _load_config(path)
    d = cfg.to_dict()
    if output == "json":
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        click.echo(f"{path}: valid")
        import yaml
        click.echo(yaml.safe_dump(json.loads(json.dumps(d, default=str)), sort_keys=False))


# --- authorization policy -----------------------------------------------------------------
# Exit codes: validate 0 valid / 1 invalid; explain 0 allowed / 1 denied (or the request
# itself is refused, e.g. 400) / 3 the policies or inventory do not load; lint 0 clean /
# 1 findings / 3 inputs do not load.  With the agent: apply 0 applied / 1 invalid input
# (nothing changed) or agent error; diff 0 no differences / 1 differences / 3 invalid
# input or agent error; list 0 / 1 agent error; get, delete 0 / 1 no such policy or agent
# error.  2 is always a usage error.

def _policy_opts(f):
    f = click.option("--root-namespace", default="istio-system", show_default=True,
                     help="Policies in this namespace apply to every namespace.")(f)
    f = click.option("--trust-domain", default="cluster.local", show_default=True,
                     help="The mesh's trust domain (for ns/<ns>/sa/<sa> and cluster.local principals).")(f)
    return f


def _load_policy_set(paths, trust_domain, root_namespace, output, code):
    """The AuthorizationPolicies of ``paths`` (TrafficPolicy documents there are
    checked too, then left out)."""
    return _load_documents(paths, trust_domain, root_namespace, output, code)[0]


def _load_documents(paths, trust_domain, root_namespace, output, code):
    """(PolicySet, TrafficPolicySet) of ``paths``: both kinds, mixed in any file."""
    from .traffic.policy import load_all
    from .yamlsrc import SourceError

    try:
        return load_all(list(paths), trust_domain=trust_domain, root_namespace=root_namespace)
    except SourceError as e:
        if output == "json":
            click.echo(json.dumps({"valid": False, "errors": [
                {"file": p.file, "line": p.line, "column": p.column, "path": p.path,
                 "message": p.message, "text": str(p)} for p in e.errors]}))
            sys.exit(code)
        _die(f"invalid policies:\n{e}", code)
    except ValueError as e:  # bad --trust-domain / --root-namespace
        raise click.UsageError(str(e)) from None


def _load_inventory_pods(path):
    from .workloads.inventory import load_inventory
    from .yamlsrc import SourceError

    try:
        return load_inventory(path)
    except SourceError as e:
        _die(f"invalid inventory:\n{e}", 3)


def _find_pod(inv, ref: str, opt: str):
    ns, _, name = ref.rpartition("/")
    hits = [p for p in inv.pods if p.name == name and (not ns or p.namespace == ns)]
    if len(hits) != 1:
        raise click.BadParameter(f"{'no' if not hits else 'more than one'} pod {ref!r} in the inventory"
                                 + ("" if hits else "; write namespace/name"), param_hint=opt)
    return hits[0]


@main.group()
def policy() -> None:
    """Policies: AuthorizationPolicy (Istio semantics) and TrafficPolicy
    (retries, timeouts, circuit breaking per service), in the same files.

    \b
      meshlet policy validate PATH...          load and check files or directories
      meshlet policy explain -f PATH ...       would this connection/request be allowed, and why?
      meshlet policy lint PATH...              shadowed rules, contradictions, unused selectors,
                                               traffic policies for unknown services

    With the running agent (--socket/--node pick it):

    \b
      meshlet policy apply -f FILE|DIR...      create or update documents, all or none
      meshlet policy diff -f FILE|DIR...       what apply would change
      meshlet policy list                      the applied documents and their version
      meshlet policy get [KIND/]NAME -n NS     one applied document, as YAML or JSON
      meshlet policy delete [KIND/]NAME -n NS  remove one applied document

    KIND (or --kind) is authorizationpolicy or trafficpolicy, any case; it is
    needed only when documents of both kinds have that namespace/name.
    """


@policy.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@_policy_opts
@OUTPUT
def policy_validate(paths, trust_domain, root_namespace, output) -> None:
    """Check policy files (or directories of *.yaml): AuthorizationPolicy and
    TrafficPolicy documents; errors name file:line:column and field.  The
    version is the one the agent's store would have with exactly these."""
    from .policy.store import store_version
    from .traffic.policy import KIND as TRAFFIC

    ps, ts = _load_documents(paths, trust_domain, root_namespace, output, 1)
    version = store_version(ps.version, {TRAFFIC: (ts.version, len(ts))})
    if output == "json":
        click.echo(json.dumps({"valid": True, "version": version, "policies": [
            {"namespace": p.namespace, "name": p.name, "action": p.action.value,
             "rules": len(p.rules), "origin": p.origin} for p in ps.policies],
            "trafficPolicies": [
            {"namespace": p.namespace, "name": p.name, "service": p.service, "port": p.port,
             "origin": p.origin} for p in ts.policies]}))
        return
    for p in ps.policies:
        sel = ",".join(f"{k}={v}" for k, v in p.selector) or "*"
        click.echo(f"{p.action.value:<6} {p.key:<40} selector {sel:<24} {len(p.rules)} rule(s)  {p.origin}")
    for t in ts.policies:
        target = f"{t.namespace}/{t.service}" + (f":{t.port}" if t.port is not None else "")
        click.echo(f"{'TRAFFIC':<6} {t.key:<40} service  {target:<24} {'':9}  {t.origin}")
    files = len(dict.fromkeys(ps.sources + ts.files))
    traffic = f", {len(ts)} traffic policies" if len(ts) else ""
    click.echo(f"valid: {len(ps)} policies from {files} file(s){traffic}, version {version}")


@policy.command("explain")
@click.option("-f", "--file", "paths", multiple=True, required=True, type=click.Path(),
              help="Policy file or directory (repeatable).")
@click.option("--from", "src", help="Source identity: spiffe://td/ns/N/sa/S, td/ns/N/sa/S or "
              "ns/N/sa/S. Omit for a plaintext (unauthenticated) peer.")
@click.option("--from-pod", help="Source pod namespace/name (needs --inventory).")
@click.option("--source-ip", help="Source IP address (default: the --from-pod's).")
@click.option("--to-pod", help="Destination pod namespace/name (needs --inventory).")
@click.option("--to-namespace", help="Destination namespace.")
@click.option("--to-labels", default="", help="Destination labels k=v,k2=v2.")
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="Destination port.")
@click.option("--method", help="HTTP method (makes it an HTTP request; default GET).")
@click.option("--path", "req_path", help="HTTP request target, normalized as the proxy would.")
@click.option("--host", help="HTTP Host.")
@click.option("--header", "headers", multiple=True, help="HTTP header 'name: value' (repeatable).")
@click.option("--merge-slashes/--no-merge-slashes", default=True, show_default=True)
@click.option("--escaped-slash", type=click.Choice(["reject", "keep", "decode_and_merge"]),
              default="reject", show_default=True, help="What %2F, %5C and '\\' in a path do.")
@click.option("--inventory", "inventory_path", type=click.Path(dir_okay=False),
              help="Inventory file, to name pods instead of identities and labels.")
@_policy_opts
@OUTPUT
def policy_explain(paths, src, from_pod, source_ip, to_pod, to_namespace, to_labels, port, method,
                   req_path, host, headers, merge_slashes, escaped_slash, inventory_path,
                   trust_domain, root_namespace, output) -> None:
    """Would a connection or request be allowed, and which policy and rule decided?"""
    import ipaddress

    from .identity.spiffe import SpiffeIdError, parse_spiffe_id, workload_id
    from .policy.evaluate import Request, explain
    from .policy.http import HttpError, normalize_host, normalize_path

    if (from_pod or to_pod) and not inventory_path:
        raise click.UsageError("--from-pod and --to-pod need --inventory")
    if src and from_pod:
        raise click.UsageError("give --from or --from-pod, not both")
    if bool(to_pod) == bool(to_namespace):
        raise click.UsageError("give exactly one of --to-pod or --to-namespace")
    ps = _load_policy_set(paths, trust_domain, root_namespace, output, 3)
    inv = _load_inventory_pods(inventory_path) if inventory_path else None

    principal = None
    sip = None
    try:
        if src:
            if src.startswith("spiffe://"):
                principal = parse_spiffe_id(src)
            elif src.startswith("ns/"):
                parts = src.split("/")
                if len(parts) != 4 or parts[2] != "sa":
                    raise SpiffeIdError("expected ns/<namespace>/sa/<serviceaccount>")
                principal = workload_id(trust_domain, parts[1], parts[3])
            else:
                principal = parse_spiffe_id("spiffe://" + src)
    except SpiffeIdError as e:
        raise click.BadParameter(str(e), param_hint="--from") from None
    if principal is not None and not principal.path:
        raise click.BadParameter(f"{src!r} names a trust domain, not a workload; "
                                 "write ns/<namespace>/sa/<serviceaccount>", param_hint="--from")
    if from_pod:
        pod = _find_pod(inv, from_pod, "--from-pod")
        principal = workload_id(trust_domain, pod.namespace, pod.service_account)
        sip = sorted(pod.ips, key=lambda a: a.version)[0]
    if source_ip:
        try:
            sip = ipaddress.ip_address(source_ip)
        except ValueError:
            raise click.BadParameter(f"{source_ip!r} is not an IP address", param_hint="--source-ip") from None
    if to_pod:
        pod = _find_pod(inv, to_pod, "--to-pod")
        dst_ns, labels = pod.namespace, dict(pod.labels)
    else:
        dst_ns, labels = to_namespace, {}
        for item in filter(None, (x.strip() for x in to_labels.split(","))):
            k, eq, v = item.partition("=")
            if not eq or not k:
                raise click.BadParameter(f"{item!r} is not k=v", param_hint="--to-labels")
            labels[k] = v

    is_http = any(x is not None for x in (method, req_path, host)) or bool(headers)
    norm = None
    hdrs: dict[str, list[str]] = {}
    try:
        if is_http:
            norm = normalize_path(req_path or "/", merge_slashes=merge_slashes, escaped_slash=escaped_slash)
            host = normalize_host(host) if host is not None else None
            for h in headers:
                name, colon, value = h.partition(":")
                if not colon or not name.strip():
                    raise click.BadParameter(f"{h!r} is not 'name: value'", param_hint="--header")
                hdrs.setdefault(name.strip().lower(), []).append(value.strip())
    except HttpError as e:
        if output == "json":
            click.echo(json.dumps({"allowed": False, "action": "REJECTED", "status": e.status,
                                   "reason": e.reason}))
        else:
            click.echo(f"REJECTED  with {e.status} before any policy is consulted: {e.reason}")
        sys.exit(1)
    req = Request(dst_ns, labels, port, principal, sip, is_http,
                  (method or "GET") if is_http else None, norm.path if norm else None, host,
                  {k: tuple(v) for k, v in hdrs.items()})
    decision, traces = explain(ps, req)
    if output == "json":
        d = decision.to_dict()
        d.update(version=ps.version, request=req.describe(),
                 normalizedTarget=norm.target if norm else None,
                 trace=[{"policy": t.policy, "action": t.action.value, "rule": t.rule,
                         "outcome": t.outcome, "detail": t.detail, "origin": t.origin} for t in traces])
        click.echo(json.dumps(d, indent=2))
    else:
        verdict = "ALLOWED" if decision.allowed else "DENIED"
        click.echo(f"{verdict:<9} {decision.reason}" + (f"  [{decision.origin}]" if decision.origin else ""))
        click.echo(f"request   {req.describe()}")
        if norm is not None and norm.target != req_path:
            click.echo(f"target    {req_path or '/'!r} normalized to {norm.target!r} (matched and forwarded)")
        for a in decision.audited:
            click.echo(f"audited   {a}  [{a.origin}]")
        click.echo(f"policies  {len({t.policy for t in traces})} apply, set version {ps.version}")
        for t in traces:
            rule = f"rule {t.rule}" if t.rule >= 0 else "-"
            click.echo(f"  {t.action.value:<6} {t.policy:<36} {rule:<8} {t.outcome:<9} {t.detail}")
    sys.exit(0 if decision.allowed else 1)


@policy.command("lint")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--inventory", "inventory_path", type=click.Path(dir_okay=False),
              help="Inventory file: report selectors that match no pod.")
@click.option("--http-ports", default=None, help="Ports known to carry HTTP, e.g. 80,8080.")
@_policy_opts
@OUTPUT
def policy_lint(paths, inventory_path, http_ports, trust_domain, root_namespace, output) -> None:
    """Shadowed rules, contradicting ALLOW/DENY pairs, unused selectors, HTTP rules on non-HTTP ports."""
    from .policy.lint import lint

    ports = None
    if http_ports is not None:
        try:
            ports = [int(x) for x in http_ports.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"{http_ports!r} is not a list of ports", param_hint="--http-ports") from None
    from .policy.lint import Finding
    from .traffic.policy import lint_traffic

    ps, ts = _load_documents(paths, trust_domain, root_namespace, output, 3)
    pods = None
    found: list = []
    if inventory_path:
        inv = _load_inventory_pods(inventory_path)
        pods = [(p.namespace, dict(p.labels)) for p in inv.pods]
        services = [(sv.namespace, sv.name, tuple(pt.port for pt in sv.ports))
                    for sv in getattr(inv, "services", ())]
        found += [Finding(kind, key, None, origin, msg)
                  for kind, key, origin, msg in lint_traffic(ts, services)]
    found = lint(ps, pods=pods, http_ports=ports) + found
    if output == "json":
        click.echo(json.dumps({"version": ps.version, "findings": [f.to_dict() for f in found]}, indent=2))
    else:
        for f in found:
            click.echo(str(f))
        click.echo(f"{len(found)} finding(s) in {len(ps)} policies")
    sys.exit(1 if found else 0)


# --- policies through the agent (apply/diff/list/get/delete) ---------------------------
# AuthorizationPolicy and TrafficPolicy share the store and these commands.

POLICY_KINDS = {"authorizationpolicy": "AuthorizationPolicy", "trafficpolicy": "TrafficPolicy"}


def _kind_and_name(name: str, kind: str | None) -> tuple[str | None, str]:
    """``[KIND/]NAME`` and ``--kind`` -> (kind as the agent spells it or None, name)."""
    prefix, slash, rest = name.partition("/")
    if slash:
        if prefix.lower() not in POLICY_KINDS:
            raise click.BadParameter(f"{prefix!r} is not a kind; use "
                                     f"{' or '.join(POLICY_KINDS)}", param_hint="NAME")
        if kind is not None and kind.lower() != prefix.lower():
            raise click.BadParameter(f"{name!r} and --kind {kind} disagree", param_hint="NAME")
        kind, name = prefix, rest
    if kind is not None:
        if kind.lower() not in POLICY_KINDS:
            raise click.BadParameter(f"{kind!r} is not a kind; use {' or '.join(POLICY_KINDS)}",
                                     param_hint="--kind")
        kind = POLICY_KINDS[kind.lower()]
    return kind, name


def _policy_path(name: str, namespace: str, kind: str | None) -> str:
    from urllib.parse import quote

    kind, name = _kind_and_name(name, kind)
    path = f"/v1/policies/{quote(namespace, safe='')}/{quote(name, safe='')}"
    return path + (f"?kind={kind}" if kind else "")


KIND_OPT = click.option("--kind", default=None,
                        help="authorizationpolicy or trafficpolicy (or write KIND/NAME); "
                             "needed only when both kinds have this name.")

def _policy_sources(paths) -> list[dict]:
    """Every file of ``-f`` paths, read here: the agent gets their text and names."""
    from .policy.load import policy_files
    from .yamlsrc import SourceError, read_text

    files, problems = [], []
    for path in paths:
        found = policy_files(path)
        if not found:
            problems.append(f"{path}: directory has no .yaml or .yml files")
        for f in found:
            try:
                files.append({"filename": f, "text": read_text(f)})
            except SourceError as e:
                problems.append(str(e))
    if problems:
        _die("cannot read the policies:\n" + "\n".join(problems))
    return files


def _policy_call(sock: str, method: str, path: str, body: dict | None = None,
                 fail: int = 1) -> tuple[int, dict]:
    """Call the agent; exit ``fail`` when it cannot be reached or answers garbage."""
    from .adminclient import admin_request

    try:
        return admin_request(sock, method, path, body, timeout=30)
    except OSError as e:
        _die(f"cannot reach the agent at {sock}: {e.strerror or e}; is `meshlet run` running?", fail)
    except ValueError as e:
        _die(f"unexpected answer from {sock}: {e}", fail)
    raise AssertionError


def _invalid(data: dict, output: str, code: int) -> None:
    if output == "json":
        click.echo(json.dumps({"valid": False, "errors": data.get("errors", []),
                               "error": data.get("error")}))
        sys.exit(code)
    _die(("invalid policies, nothing changed:\n" if data.get("errors") else "")
         + str(data.get("error")), code)


FILES = click.option("-f", "--filename", "paths", multiple=True, required=True,
                     type=click.Path(exists=True),
                     help="A policy file or a directory of *.yaml/*.yml (repeatable).")
NAMESPACE = click.option("-n", "--namespace", default="default", show_default=True,
                         help="The policy's namespace.")


@policy.command("apply")
@FILES
@agent_opts
@OUTPUT
def policy_apply(paths, sock, node, output) -> None:
    """Create or update policies (AuthorizationPolicy, TrafficPolicy) in the
    agent, all or none.

    Prints created / configured / unchanged per document; warnings (a
    TrafficPolicy for a service the agent's inventory does not have) go to
    stderr and do not fail the apply.  Exit codes: 0 applied;
    1 invalid input (file:line:column: field: what; nothing was changed) or the
    agent could not be reached; 2 usage.
    """
    files = _policy_sources(paths)
    code, data = _policy_call(_admin_socket(sock, node), "POST", "/v1/policies:apply",
                              {"files": files})
    if code == 400 and "errors" in data:
        _invalid(data, output, 1)
    if code != 200:
        _die(f"agent answered {code}: {data.get('error')}")
    for w in data.get("warnings") or []:
        click.echo(f"warning: {w}", err=True)
    if output == "json":
        click.echo(json.dumps(data, indent=2))
        return
    for c in data["changes"]:
        kind = c.get("kind", "AuthorizationPolicy").lower()
        click.echo(f"{kind} {c['namespace']}/{c['name']} {c['result']}")
    click.echo(f"version {data['version']} ({data['count']} policies)")


@policy.command("diff")
@FILES
@agent_opts
def policy_diff(paths, sock, node) -> None:
    """What `apply` would change, as a unified diff per policy (the agent's
    stored YAML against the new).  Changes nothing.

    Exit codes: 0 no differences; 1 differences; 2 usage; 3 invalid input or
    the agent could not be reached.
    """
    files = _policy_sources(paths)
    code, data = _policy_call(_admin_socket(sock, node), "POST", "/v1/policies:diff",
                              {"files": files}, fail=3)
    if code == 400 and "errors" in data:
        _invalid(data, "table", 3)
    if code != 200:
        _die(f"agent answered {code}: {data.get('error')}", 3)
    if data["diff"]:
        click.echo(data["diff"], nl=False)
    sys.exit(1 if any(c["result"] != "unchanged" for c in data["changes"]) else 0)


@policy.command("list")
@agent_opts
@OUTPUT
def policy_list(sock, node, output) -> None:
    """The policies the agent holds, and their version.  Exit codes: 0; 1 the
    agent could not be reached; 2 usage."""
    code, data = _policy_call(_admin_socket(sock, node), "GET", "/v1/policies")
    if code != 200:
        _die(f"agent answered {code}: {data.get('error')}")
    if output == "json":
        click.echo(json.dumps(data, indent=2))
        return
    def row(p: dict) -> tuple[str, ...]:
        if p.get("kind", "AuthorizationPolicy") == "AuthorizationPolicy":
            sel = ",".join(f"{k}={v}" for k, v in p["selector"].items()) or "*"
            return ("AuthorizationPolicy", p["namespace"], p["name"],
                    f"{p['action']} selector {sel}, {p['rules']} rule(s)")
        port = f":{p['port']}" if p.get("port") is not None else ""
        return (p["kind"], p["namespace"], p["name"],
                f"service {p.get('service')}{port}, {p.get('retries')} retries")

    rows = [("KIND", "NAMESPACE", "NAME", "WHAT")] + [row(p) for p in data["policies"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    click.echo(f"{data['count']} policies, version {data['version']}")


@policy.command("get")
@click.argument("name")
@NAMESPACE
@KIND_OPT
@agent_opts
@click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml",
              show_default=True, help="Output format.")
def policy_get(name, namespace, kind, sock, node, output) -> None:
    """One document as the agent stores it; NAME may be KIND/NAME
    (trafficpolicy/backend).  Exit codes: 0; 1 no such policy, a name both
    kinds have without a kind, or the agent could not be reached; 2 usage."""
    path = _policy_path(name, namespace, kind)
    code, data = _policy_call(_admin_socket(sock, node), "GET", path)
    if code != 200:
        _die(data.get("error") or f"agent answered {code}")
    if output == "json":
        click.echo(json.dumps(data["document"], indent=2))
    else:
        click.echo(data["yaml"], nl=False)


@policy.command("delete")
@click.argument("name")
@NAMESPACE
@KIND_OPT
@agent_opts
def policy_delete(name, namespace, kind, sock, node) -> None:
    """Remove one document from the agent; NAME may be KIND/NAME.  Exit codes:
    0 deleted; 1 no such policy, a name both kinds have without a kind, or
    the agent could not be reached; 2 usage."""
    path = _policy_path(name, namespace, kind)
    code, data = _policy_call(_admin_socket(sock, node), "DELETE", path)
    if code != 200:
        _die(data.get("error") or f"agent answered {code}")
    kind = data.get("kind", "AuthorizationPolicy").lower()
    click.echo(f"{kind} {data['deleted']} deleted (version {data['version']})")


if __name__ == "__main__":
    main()
