"""What the traffic of this node does, from the running agent: ``flows`` (TCP
flows from the kernel), ``stats`` (per workload pair), ``services`` (VIPs and
their endpoints)."""

from __future__ import annotations

import json

import click

from .common import OUTPUT, admin_get, admin_socket, agent_opts, die, echo_json, table_lines, unreachable


@click.command()
@agent_opts
@click.option("--pod", help="Only flows from or to this pod (namespace/name or name).")
@click.option("--namespace", help="Only flows from or to pods of this namespace.")
@click.option(
    "--identity", help="Only flows from or to this SPIFFE ID (spiffe://<trust domain>/ns/<ns>/sa/<sa>)."
)
@click.option("--port", type=click.IntRange(0, 65535), help="Only flows with this port at either end.")
@click.option("--state", help="open, closed, or a TCP state (established, close_wait, ...).")
@click.option("--since", help="Only flows alive during the last DURATION (30s, 5m, 2h).")
@click.option(
    "--sort",
    type=click.Choice(["start", "srtt", "bytes", "age", "retrans"]),
    default="start",
    show_default=True,
    help="start: oldest first; srtt, bytes, retrans: largest first; age: longest-lived first.",
)
@click.option("--limit", type=click.IntRange(0), default=0, help="At most N rows (0: all).")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "wide", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option("--follow", "-f", is_flag=True, help="Stream new and closed flows as they happen.")
@click.option(
    "--max-seconds",
    type=click.FloatRange(0, min_open=True),
    default=3600.0,
    show_default=True,
    help="Stop following after this long.",
)
def flows(
    sock, node, pod, namespace, identity, port, state, since, sort, limit, output, follow, max_seconds
) -> None:
    """TCP flows of this node's meshed pods and proxy, from the kernel.

    One row per socket: a pod's client leg, the proxy's accepted, tunnel and
    upstream legs, a pod's server leg. SENT/RECEIVED are the source's bytes
    (kernel tcp_info counters: SYN and FIN count one byte each). Closed flows
    stay listed (the agent keeps the most recent ones).
    """
    from urllib.parse import urlencode

    from ..observe.flowviews import FlowFilter, format_table, parse_since

    try:
        flt = FlowFilter(
            pod=pod,
            namespace=namespace,
            identity=identity,
            port=port,
            state=state,
            since=parse_since(since) if since else None,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    params = flt.to_params()
    if since:
        params["since"] = since
    params["sort"] = sort
    if limit:
        params["limit"] = str(limit)
    sock_path = admin_socket(sock, node)
    if follow:
        params["max_seconds"] = str(max_seconds)
        _follow_flows(sock_path, "/v1/flows/follow?" + urlencode(params), output, max_seconds)
        return
    data = admin_get("/v1/flows?" + urlencode(params), sock_path)
    if output == "json":
        echo_json(data["flows"])
        return
    if not data["flows"]:
        click.echo("no flows match", err=True)
        return
    click.echo(format_table(data["flows"], wide=output == "wide"))
    c = data.get("counters", {})
    if c.get("flow_evicted") or c.get("flow_ringbuf_full") or c.get("flow_table_full"):
        click.echo(
            f"warning: flow records lost to map pressure: {c.get('flow_evicted', 0)} "
            f"evicted, {c.get('flow_ringbuf_full', 0)} ring buffer full, "
            f"{c.get('flow_table_full', 0)} table full",
            err=True,
        )


def _follow_flows(sock_path: str, path: str, output: str, max_seconds: float) -> None:
    """Print the agent's flow events (JSON lines) as they arrive."""
    import socket
    import time

    from ..observe.flowviews import format_table

    deadline = time.monotonic() + max_seconds
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    except OSError as e:
        unreachable(sock_path, e)
    with s:
        f = s.makefile("rb")
        try:
            status = f.readline().split()
            while f.readline() not in (b"\r\n", b"\n", b""):
                pass
            if len(status) < 2 or status[1] != b"200":
                body = f.read()
                die(
                    f"agent answered {status[1].decode() if len(status) > 1 else '?'}: "
                    f"{json.loads(body).get('error') if body else ''}"
                )
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
                    echo_json(ev, indent=None)
                else:
                    mark = "+new" if ev["event"] == "new" else "-closed"
                    click.echo(
                        format_table(
                            [ev["flow"]], wide=output == "wide", header=header, prefix=[mark], fixed=True
                        )
                    )
                    header = False
        except KeyboardInterrupt:
            pass
        except OSError as e:
            die(f"lost the agent at {sock_path}: {e.strerror or e}")


@click.command()
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

    from ..observe.pairstats import format_table

    params = {k: v for k, v in (("from", src), ("to", dst)) if v}
    data = admin_get("/v1/stats" + (f"?{urlencode(params)}" if params else ""), admin_socket(sock, node))
    if output == "json":
        echo_json(data["rows"])
        return
    if not data["rows"]:
        click.echo("no traffic matches", err=True)
        return
    click.echo(format_table(data["rows"]))


@click.command()
@agent_opts
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "wide", "json"]),
    default="table",
    show_default=True,
    help="table: one row per service port; wide: one row per "
    "endpoint; json: everything, as GET /v1/services.",
)
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
    data = admin_get("/v1/services", admin_socket(sock, node))
    if output == "json":
        echo_json(data)
        return
    if data.get("inventory_error"):
        click.echo(
            f"INVENTORY RELOAD FAILED (the previous services stay in force):\n{data['inventory_error']}\n",
            err=True,
        )
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
                    rows.append(
                        base
                        + (
                            [
                                e["pod"],
                                e["node"],
                                f"{addr}:{e['port']}",
                                "yes" if e.get("mesh", True) else "no",
                            ]
                            if e
                            else ["<none>", "", "", ""]
                        )
                    )
            else:
                pods = {e["pod"] for e in eps}  # a dual-stack pod has two endpoints
                here = {e["pod"] for e in eps if e.get("local")}
                rows.append(base + [f"{len(pods)} ({len(here)} here)" if eps else "0 (no pod matches)"])
    head = ["SERVICE", "VIPS", "PORT", "PROTOCOL"] + (
        ["ENDPOINT", "NODE", "ADDRESS", "MESH"] if output == "wide" else ["ENDPOINTS"]
    )
    if not rows:
        click.echo(
            f"no services on node {data.get('node')} (add a services: section to the "
            "inventory; see meshlet services --help)"
        )
        return
    for line in table_lines([head] + rows):
        click.echo(line)


COMMANDS = [flows, stats, services]
