"""nginx in a simulated pod: an API gateway (or a small app) for the demo and
the gateway e2e test.

The gateway's routes are written once, as Kubernetes Gateway API
``HTTPRoute`` documents (the files ``meshlet policy lint --gateway`` reads),
and rendered here into an nginx ``server`` block: one ``location`` per path
match, ``proxy_pass`` to the backend Service's VIP (what a gateway resolves a
Service to).  nginx runs in the pod's network namespace and cgroup like any
workload, so when the pod is enrolled its upstream connections are
redirected to the node proxy and carry the pod's SPIFFE identity; nginx
itself knows nothing of the mesh.

Only what the simulated cluster needs is rendered: ``PathPrefix`` and
``Exact`` matches, Service backends (several: one nginx upstream with a
server each), ``timeouts``.  Anything else (regular expressions, method or
header matches, filters, retries) is refused with a ValueError naming the
route, rather than routed differently from what the file says.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.policy.gatewaylint import GatewayConfig

from .topology import Pod

__all__ = ["LOG_FORMAT", "Location", "access_log", "locations_from_routes", "nginx_conf", "start_nginx"]

#: nginx's access log line: client, request, status, the upstream it used and
#: what that upstream answered (``-`` when nginx answered itself).
LOG_FORMAT = '$remote_addr "$request" $status upstream=$upstream_addr upstream_status=$upstream_status'


@dataclass(frozen=True)
class Location:
    """One nginx ``location``: requests whose path is ``path`` (``exact``) or
    starts with it go to ``upstreams`` (``host:port`` each) or, with no
    upstreams, get 200 with ``body``."""

    path: str
    exact: bool = False
    upstreams: tuple[str, ...] = ()
    body: str = ""
    timeout: float | None = None
    name: str = ""
    """Where it comes from (the HTTPRoute's ``namespace/name``), for errors and the config's comments."""


def locations_from_routes(cfg: GatewayConfig, vip_of: Callable[[str, str, int], str]) -> list[Location]:
    """The gateway's locations for ``cfg``'s HTTPRoutes; ``vip_of(namespace,
    service, port)`` -> ``host:port`` of the Service (raises KeyError if unknown)."""
    out: list[Location] = []
    for route in cfg.routes:
        for rule in route.rules:
            if rule.retry_attempts:
                raise ValueError(f"HTTPRoute {route.key} ({rule.origin}): retries are the mesh's job here")
            if not rule.backends:
                raise ValueError(f"HTTPRoute {route.key} ({rule.origin}): no Service backend")
            ups = tuple(vip_of(b.namespace, b.name, b.port) for b in rule.backends)
            for m in rule.matches:
                if m.path_type not in ("PathPrefix", "Exact") or m.method is not None:
                    raise ValueError(
                        f"HTTPRoute {route.key} ({m.origin}): only PathPrefix and Exact "
                        "path matches without a method are rendered for nginx"
                    )
                out.append(Location(m.path, m.path_type == "Exact", ups, "", rule.timeout, route.key))
    return out


def _location_blocks(loc: Location, index: int) -> str:
    if loc.upstreams:
        body = (
            f"proxy_pass http://up{index};\n"
            "            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";\n'
            "            proxy_next_upstream off;\n"
        )
        if loc.timeout:
            body += f"            proxy_read_timeout {max(1, round(loc.timeout * 1000))}ms;\n"
    else:
        if any(c in loc.body for c in '"\\$'):
            raise ValueError(f"location {loc.path}: body {loc.body!r} must not hold quotes, $ or backslashes")
        text = loc.body.replace("\n", "\\n")
        body = f'default_type text/plain;\n            return 200 "{text}";\n'
    if any(c in loc.path for c in " ;{}\"'\\"):
        raise ValueError(f"location path {loc.path!r} has characters nginx would read as syntax")
    if loc.exact:
        heads = [f"location = {loc.path}"]
    elif loc.path == "/" or loc.path.endswith("/"):
        heads = [f"location ^~ {loc.path}" if loc.path != "/" else "location /"]
    else:  # Gateway API prefixes match whole path elements: /api is /api and /api/..., not /apix
        heads = [f"location = {loc.path}", f"location ^~ {loc.path}/"]
    comment = f"        # {loc.name}\n" if loc.name else ""
    return "".join(f"{comment}        {h} {{\n            {body}        }}\n" for h in heads)


def nginx_conf(directory: str, port: int, locations: Sequence[Location]) -> str:
    """nginx.conf for a pod: listens on ``port`` (IPv4 and IPv6), writes its
    pid, logs and temporary files under ``directory``; access log
    ``<directory>/access.log`` in :data:`LOG_FORMAT`."""
    d = directory
    upstreams = "".join(
        f"    upstream up{i} {{\n"
        + "".join(f"        server {u};\n" for u in loc.upstreams)
        + "        keepalive 8;\n    }\n"
        for i, loc in enumerate(locations)
        if loc.upstreams
    )
    blocks = "".join(_location_blocks(loc, i) for i, loc in enumerate(locations))
    if not any(loc.path == "/" and not loc.exact for loc in locations):
        blocks += (
            "        location / {\n"
            "            default_type text/plain;\n"
            '            return 404 "no route\\n";\n'
            "        }\n"
        )
    return (
        "worker_processes 1;\n"
        "daemon off;\n"
        f"pid {d}/nginx.pid;\n"
        f"error_log {d}/error.log warn;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    log_format mesh '{LOG_FORMAT}';\n"
        f"    access_log {d}/access.log mesh;\n"
        f"    client_body_temp_path {d}/body;\n"
        f"    proxy_temp_path {d}/proxy;\n"
        f"    fastcgi_temp_path {d}/fastcgi;\n"
        f"    uwsgi_temp_path {d}/uwsgi;\n"
        f"    scgi_temp_path {d}/scgi;\n"
        f"{upstreams}"
        "    server {\n"
        f"        listen {port};\n"
        f"        listen [::]:{port};\n"
        f"{blocks}"
        "    }\n"
        "}\n"
    )


def start_nginx(pod: Pod, directory: str, port: int, locations: Sequence[Location], *, timeout: float = 10.0):
    """Write the config under ``directory`` (made if needed) and run nginx in
    ``pod`` until it accepts connections on ``port``; returns the Popen (the
    cluster stops it with the pod's other processes)."""
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)  # nginx's workers run as nobody and use the temp paths in it
    conf = os.path.join(directory, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_conf(directory, port, locations))
    p = pod.popen(
        ["nginx", "-e", os.path.join(directory, "error.log"), "-p", directory, "-c", conf],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(
                f"nginx in {pod.name} exited {p.returncode}: {p.stderr.read() if p.stderr else ''}"
            )
        r = pod.run(["ss", "-Hltn", f"sport = :{port}"], check=False)
        if r.stdout.strip():
            return p
        time.sleep(0.1)
    raise RuntimeError(f"nginx in {pod.name} did not listen on {port} within {timeout}s")


def access_log(directory: str) -> list[str]:
    """nginx's access log lines (see :data:`LOG_FORMAT`)."""
    try:
        with open(os.path.join(directory, "access.log")) as f:
            return [ln.rstrip("\n") for ln in f]
    except FileNotFoundError:
        return []
