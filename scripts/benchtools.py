"""What the benchmark scripts (scripts/bench.py, scripts/bench_l7.py) share:
the nginx upstream (one worker, no access log, a fixed 200 answer, keep-alive
without a request limit, every temporary path under one directory, no
root-owned defaults) and the parsing of ``wrk --latency`` output."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable


def parse_wrk(out: str) -> dict:
    """req/s, p50/p99 (ms), the request count and any error lines from ``wrk --latency`` output."""

    def lat(label: str) -> float | None:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return None
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    errors = re.findall(r"Non-2xx or 3xx responses: \d+|Socket errors: .*", out)
    return {
        "rps": float(rps.group(1)) if rps else None,
        "p50_ms": lat("50"),
        "p99_ms": lat("99"),
        "requests": int(count.group(1)) if count else None,
        "errors": "; ".join(errors) or None,
    }


def run_wrk(cluster, src, url, duration, connections) -> dict:
    """wrk -t1 -c``connections`` for ``duration`` s from pod ``src``: parse_wrk's dict, with
    ``error`` when it gave no rate."""
    r = cluster.pod(src).run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
                              url], check=False, timeout=duration + 30)
    res = parse_wrk(r.stdout)
    if res["rps"] is None:
        res["error"] = (r.stderr or r.stdout).strip()[-300:]
    return res


def nginx_conf(directory: str, listen: list[str], body: str, *, worker_connections: int = 1024,
               keepalive_timeout: str | None = None) -> str:
    """nginx.conf text: ``listen`` holds the arguments of each ``listen``
    directive ("8080 reuseport", "127.0.0.1:8081"); every request gets 200
    with ``body`` (a literal, no quotes or backslashes)."""
    if any(c in body for c in '"\\'):
        raise ValueError(f"nginx_conf: body {body!r} must not hold quotes or backslashes")
    d = directory
    keepalive = f"    keepalive_timeout {keepalive_timeout};\n" if keepalive_timeout else ""
    listens = "".join(f"        listen {arg};\n" for arg in listen)
    body_escaped = body.replace("\n", "\\n")
    return (
        f"worker_processes 1;\n"
        f"daemon off;\n"
        f"pid {d}/nginx.pid;\n"
        f"error_log {d}/error.log warn;\n"
        f"events {{ worker_connections {worker_connections}; }}\n"
        f"http {{\n"
        f"    access_log off;\n"
        f"    client_body_temp_path {d}/body;\n"
        f"    proxy_temp_path {d}/proxy;\n"
        f"    fastcgi_temp_path {d}/fastcgi;\n"
        f"    uwsgi_temp_path {d}/uwsgi;\n"
        f"    scgi_temp_path {d}/scgi;\n"
        f"    keepalive_requests 1000000;\n"
        f"{keepalive}"
        f"    server {{\n"
        f"{listens}"
        f"        location / {{ return 200 \"{body_escaped}\"; }}\n"
        f"    }}\n"
        f"}}\n"
    )


def write_nginx_conf(directory: str, listen: list[str], body: str, **kw) -> str:
    """Write :func:`nginx_conf` to ``<directory>/nginx.conf``; returns its path."""
    path = os.path.join(directory, "nginx.conf")
    with open(path, "w") as f:
        f.write(nginx_conf(directory, listen, body, **kw))
    return path


def ab_parser(doc: str, seconds: str) -> argparse.ArgumentParser:
    """The A/B drivers' common options (--seconds per round, --rounds); each
    adds its own, its hidden --serve and its sides."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", default=seconds)
    ap.add_argument("--rounds", type=int, default=4)
    return ap


def drive_sides(script: str, sides: dict[str, list[str]], rounds: int,
                command: Callable[[int, int], str], alternate: bool = False) -> None:
    """The A/B drivers' loop (scripts/bulk_ab.py, scripts/conn_ab.py): one
    ``script --serve ARGS...`` child per side, each with its own simulated
    cluster, which prints one line when ready and one JSON line per command.
    ``rounds`` rounds send ``command(round, position)`` to every side in turn
    (in reverse order on odd rounds when ``alternate``: A B, B A, ...) and
    print each answer; ``quit`` ends every child, also on an error."""
    procs = {}
    try:
        for label, args in sides.items():
            procs[label] = subprocess.Popen([sys.executable, script, "--serve", *args],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for label, p in procs.items():
            print(label, p.stdout.readline().strip(), flush=True)  # type: ignore[union-attr]
        for r in range(rounds):
            order = list(procs.items())
            if alternate and r % 2:
                order.reverse()
            for i, (label, p) in enumerate(order):
                p.stdin.write(command(r, i) + "\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
                print(r, label, p.stdout.readline().strip(), flush=True)  # type: ignore[union-attr]
    finally:
        for p in procs.values():
            try:
                p.stdin.write("quit\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            except OSError:
                pass
        for p in procs.values():
            p.wait(timeout=120)
