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
               f"datapath {dp['how']} ({dp['pin_dir']})")
    inv = st["inventory"]
    click.echo(f"inventory {inv['path']}: {inv['pods']} pods"
               + (f"\n  LAST RELOAD FAILED (previous state kept):\n  {inv['error']}"
                  if inv["error"] else ""))
    click.echo(f"enrolled {len(st['enrolled'])} pods; pending {len(st['pending'])}")
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
    TCP RTT from the kernel, and (once L7 lands, #5) requests, success rate
    and latency percentiles, shown as "-" until then.

    A workload is a pod's `app` label, else its name. SENT is what the
    source sent. Bytes are the proxy's application bytes, the same numbers
    /metrics serves as istio_tcp_*_bytes_total."""
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
        click.echo(json.dumps({"valid": True, "nodes": len(inv.nodes), "pods": len(inv.pods)}))
    else:
        click.echo(f"{path}: valid ({len(inv.nodes)} nodes, {len(inv.pods)} pods)")


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


if __name__ == "__main__":
    main()
