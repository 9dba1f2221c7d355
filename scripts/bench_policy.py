#!/usr/bin/env python3
"""Authorization policy benchmark (issues #4, #12): policy scale, evaluation cost, apply latency.

1. **Policy scale** (pure, no root): sets of 10, 1,000 and 10,000 rules, all
   selecting the destination workload (the worst case for a walk over every
   rule).  Rules look like real ones: a principal or namespace source,
   methods, path prefixes, a port.  Per size: what an apply costs the agent
   (``PolicyStore.apply``: parse once, compile, write policies.yaml and
   policies.json), what a proxy worker's reload costs in its loader thread
   (policies.json -> the set -> the workload's rule index), and the
   per-request cost of ``evaluate()`` for three requests: one allowed by the
   last ALLOW rule, one that matches nothing (denied), one stopped by a DENY
   rule, with its ratio to the 10-rule set (the target: <= 1.2).  Also the
   cost of normalizing the request target, which every request pays once.
   With root, the end-to-end apply: ``meshlet policy apply`` of the
   10,000-rule file to both agents of a 2-node mesh, until the CLI returns
   and until every proxy worker runs the new set.

2. **Apply latency to enforcement** (root; a real 2-node simulated mesh):
   a client pod polls an echo server on the other node over fresh
   connections, back to back; the benchmark POSTs a DENY policy to both
   agents' admin API and notes the time until the first refused connection
   (the source node's kernel map or the destination proxy, whichever is
   first); then deletes it and notes the time until a connection goes
   through again.  Median and max of ``--runs`` runs.  CLOCK_MONOTONIC is
   shared by every network namespace, so the poller's timestamps and ours
   compare directly.

    scripts/bench_policy.py [--runs 5] [--skip-apply] [--sizes 10,1000,10000] [--json FILE]

Importable: ``run(runs=5, apply=True) -> dict`` (for scripts/bench.py).
This is a benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import sys
import tempfile
import time
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from agent.identity.spiffe import parse_spiffe_id  # noqa: E402
from agent.policy.evaluate import Request, evaluate  # noqa: E402
from agent.policy.http import header_multimap, normalize_host, normalize_path  # noqa: E402
from agent.policy.load import parse_policies  # noqa: E402
from agent.policy.store import COMPILED_FILE, PolicyStore  # noqa: E402
from agent.proxy.authz import load_policy_file, warm  # noqa: E402
from agent.traffic.trafficpolicy import TRAFFIC_KIND  # noqa: E402
from agent.yamlsrc import gc_paused  # noqa: E402

SIZES = (10, 1_000, 10_000)
LABELS = {"app": "backend", "version": "v1"}
RULES_PER_POLICY = 100
TARGET = "/api/v1/orders/12345/items?limit=20&offset=40"
HEADERS = [(b"Host", b"backend.shop:8080"), (b"User-Agent", b"bench/1"), (b"Accept", b"*/*"),
           (b"X-Request-Id", b"1f0c9a7e-2d41-4c55-9d7e-6a3b1c2d3e4f"), (b"X-Tenant", b"acme")]


# --------------------------------------------------------------------------
# 1. evaluation cost


def policy_text(n_rules: int) -> str:
    """``n_rules`` ALLOW rules in policies of at most RULES_PER_POLICY, all
    selecting app=backend in shop, plus one DENY policy with one rule (not
    counted).  Rule i allows service account ``client-i`` (or namespace
    ``ns-i``) GET/HEAD on ``/svc-i/*`` port 8080; the last rule allows the
    benchmark's request."""
    docs = [
        "apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-admin, namespace: shop}\n"
        "spec:\n  selector: {matchLabels: {app: backend}}\n  action: DENY\n  rules:\n"
        "  - to: [{operation: {paths: ['/admin*']}}]\n"
    ]
    i = 0
    p = 0
    while i < n_rules:
        lines = ["apiVersion: security.istio.io/v1", "kind: AuthorizationPolicy",
                 f"metadata: {{name: allow-{p}, namespace: shop}}",
                 "spec:", "  selector: {matchLabels: {app: backend}}", "  action: ALLOW", "  rules:"]
        for _ in range(min(RULES_PER_POLICY, n_rules - i)):
            last = i == n_rules - 1
            src = ("principals: ['cluster.local/ns/shop/sa/storefront']" if last else
                   f"principals: ['cluster.local/ns/shop/sa/client-{i}']" if i % 2 else
                   f"namespaces: ['ns-{i}']")
            path = "/api/v1/*" if last else f"/svc-{i}/*"
            op = f"methods: [GET, HEAD], paths: ['{path}'], ports: ['8080']"
            lines += [f"  - from: [{{source: {{{src}}}}}]", f"    to: [{{operation: {{{op}}}}}]"]
            i += 1
        docs.append("\n".join(lines) + "\n")
        p += 1
    return "---\n".join(docs)


def http_request(target: str = TARGET, principal: str = "spiffe://cluster.local/ns/shop/sa/storefront"
                 ) -> Request:
    return Request("shop", LABELS, 8080, parse_spiffe_id(principal),
                   ipaddress.ip_address("10.244.1.10"), True, "GET", normalize_path(target).path,
                   normalize_host(b"backend.shop:8080"), header_multimap(HEADERS))


def _per_call_us(fn, budget: float = 0.5) -> float:
    """Microseconds of CPU time per call: timeit's autorange bounded by
    ``budget`` seconds, best of 3 (the usual way to read a micro-benchmark;
    CPU time, so other load on the machine distorts it less than wall time)."""
    t = timeit.Timer(fn, timer=time.process_time)
    n, took = t.autorange()
    if took > budget:       # slow calls: what autorange measured is enough
        return took / n * 1e6
    reps = max(1, int(n * budget / max(took, 1e-9) / 3))
    return min(t.repeat(3, reps)) / reps * 1e6


def eval_cost(sizes=SIZES) -> list[dict]:
    """One row per size: apply (agent), reload (proxy worker), evaluate (per
    request); all CPU time of this process."""
    rows = []
    for n in sizes:
        text = policy_text(n)
        t0 = time.process_time()
        parse_policies(text, f"bench-{n}.yaml")
        load_s = time.process_time() - t0
        with tempfile.TemporaryDirectory() as d:
            store = PolicyStore(d, kinds=[TRAFFIC_KIND])
            t0 = time.process_time()
            store.apply([(f"bench-{n}.yaml", text)])
            apply_s = time.process_time() - t0
            with gc_paused():  # as a worker's loader thread does (PolicyWatcher)
                t0 = time.process_time()
                ps = load_policy_file(os.path.join(d, COMPILED_FILE))
                file_s = time.process_time() - t0
                t0 = time.process_time()
                warm(ps, [("shop", LABELS)])
                index_s = time.process_time() - t0
        allowed = http_request()
        nomatch = http_request(principal="spiffe://cluster.local/ns/other/sa/nobody")
        denied = http_request("/admin/users")
        assert evaluate(ps, allowed).allowed, evaluate(ps, allowed).reason
        assert not evaluate(ps, nomatch).allowed
        assert evaluate(ps, denied).policy == "shop/deny-admin"
        rows.append({
            "rules": n,
            "policies": len(ps),
            "load_ms": round(load_s * 1000, 1),
            "apply_ms": round(apply_s * 1000, 1),
            "reload_ms": round((file_s + index_s) * 1000, 1),
            "index_ms": round(index_s * 1000, 1),
            "allowed_us": round(_per_call_us(lambda ps=ps, r=allowed: evaluate(ps, r)), 2),
            "no_match_us": round(_per_call_us(lambda ps=ps, r=nomatch: evaluate(ps, r)), 2),
            "denied_us": round(_per_call_us(lambda ps=ps, r=denied: evaluate(ps, r)), 2),
        })
    base = rows[0]
    for r in rows:
        r["vs_first"] = {k: round(r[k] / base[k], 2) if base[k] else None
                         for k in ("allowed_us", "no_match_us", "denied_us")}
    return rows


def normalize_cost() -> dict:
    return {
        "normalize_path_us": round(_per_call_us(lambda: normalize_path(TARGET)), 2),
        "normalize_path_tricky_us": round(_per_call_us(
            lambda: normalize_path("/api/./v1//orders/%31%32/../12345/items?limit=20")), 2),
        "request_build_us": round(_per_call_us(http_request), 2),
    }


# --------------------------------------------------------------------------
# 2. apply latency on a real mesh

# Runs in the client pod: one probe after another over fresh connections,
# for at most argv[4] seconds.  Mode "tcp": send a byte, expect the echo.
# Mode "http": GET /admin/x, allowed unless the answer is 403.  Prints one
# JSON line per change of outcome {"t": monotonic, "ok": bool, "how": ...};
# the first line is the starting state.  Stopped by the benchmark.
POLLER = r"""
import json, socket, sys, time
host, port, mode, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
end = time.monotonic() + limit
last = None
req = b"GET /admin/x HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
while time.monotonic() < end:
    t = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            if mode == "tcp":
                s.sendall(b"x")
                ok, how = s.recv(1) == b"x", "echo"
            else:
                s.sendall(req)
                line = s.recv(64).split(b"\r\n", 1)[0]
                ok = bool(line) and b" 403 " not in line + b" "
                how = line.decode("latin-1") or "eof"
    except ConnectionResetError:
        ok, how = False, "reset"
    except OSError as e:
        ok, how = False, f"errno {e.errno}"
    if ok != last:
        print(json.dumps({"t": t, "ok": ok, "how": how}), flush=True)
        last = ok
    time.sleep(0.002)
"""

DENY_L4 = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bench-deny, namespace: default}
spec:
  selector: {matchLabels: {app: pod2-1}}
  action: DENY
  rules:
  - from: [{source: {principals: [ns/default/sa/pod1-1]}}]
"""

DENY_L7 = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bench-deny, namespace: default}
spec:
  selector: {matchLabels: {app: pod2-1}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"""

# kind -> (what enforces it, policy, poller mode, server, mesh settings, agent env)
KINDS = {
    "kernel": ("L4 DENY by principal; the source node's kernel (connect4) refuses", DENY_L4, "tcp",
               "echo", {}, {}),
    "proxy": ("the same, MESHLET_KERNEL_POLICY=0: the destination proxy refuses", DENY_L4, "tcp",
              "echo", {}, {"MESHLET_KERNEL_POLICY": "0"}),
    "l7": ("HTTP DENY /admin*; the destination proxy answers 403 (proxy.l7)", DENY_L7, "http",
           "http", {"l7": True}, {}),
}


def _admin(mesh, node: str, method: str, path: str, body: dict | None = None) -> dict:
    from agent.adminclient import admin_request

    code, data = admin_request(os.path.join(mesh.agents[node].run_dir, "admin.sock"), method, path,
                               body, timeout=30)
    if code != 200:
        raise RuntimeError(f"{node}: {method} {path} answered {code}: {data}")
    return data


def _next_state(poller, want_ok: bool, timeout: float) -> dict:
    import select

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([poller.stdout], [], [], max(0.0, end - time.monotonic()))
        if not r:
            break
        line = poller.stdout.readline()
        if not line:
            break
        ev = json.loads(line)
        if ev["ok"] is want_ok:
            return ev
    raise TimeoutError(f"the poller did not see ok={want_ok} within {timeout}s")


def apply_latency(kind: str = "kernel", runs: int = 5, timeout: float = 10.0) -> dict:
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from agent.sim import Cluster
    from agent.sim.mesh import Mesh

    what, policy, mode, server, settings, agent_env = KINDS[kind]
    saved = {k: os.environ.get(k) for k in agent_env}
    os.environ.update(agent_env)   # the agents inherit the environment (Mesh._env)
    cluster = Cluster(nodes=2, pods_per_node=1).up()
    mesh = Mesh(cluster, **settings)
    applies, deletes, api_ms, hows = [], [], [], []
    port = 7001 if server == "echo" else 8080
    try:
        argv = ([sys.executable, "-m", "agent.sim.tools", "echo", "--port", "7001", "--max-seconds", "600"]
                if server == "echo" else
                [sys.executable, "-u", "-c", "import http.server as h, sys; print('listening', flush=True); "
                 "h.ThreadingHTTPServer(('0.0.0.0', 8080), h.SimpleHTTPRequestHandler).serve_forever()"])
        srv = cluster.pod("pod2-1").popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True, cwd=tempfile.gettempdir())
        if "listening" not in srv.stdout.readline():
            raise RuntimeError("the server did not start")
        mesh.start()
        body = {"files": [{"filename": "bench-deny.yaml", "text": policy}]}
        with ThreadPoolExecutor(2) as pool:
            for _ in range(runs):
                poller = cluster.pod("pod1-1").popen(
                    [sys.executable, "-c", POLLER, cluster.pod("pod2-1").ip4, str(port), mode,
                     str(4 * timeout)], stdout=subprocess.PIPE, text=True)
                try:
                    _next_state(poller, True, timeout)         # reachable before
                    t0 = time.monotonic()
                    list(pool.map(lambda n: _admin(mesh, n, "POST", "/v1/policies:apply", body),
                                  mesh.agents))
                    api_ms.append((time.monotonic() - t0) * 1000)
                    ev = _next_state(poller, False, timeout)
                    applies.append((ev["t"] - t0) * 1000)
                    hows.append(ev["how"])
                    t1 = time.monotonic()
                    list(pool.map(lambda n: _admin(mesh, n, "DELETE", "/v1/policies/default/bench-deny"),
                                  mesh.agents))
                    ev = _next_state(poller, True, timeout)
                    deletes.append((ev["t"] - t1) * 1000)
                finally:
                    poller.kill()
                    poller.wait()
    finally:
        mesh.down()
        cluster.down()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def stats(xs):
        return {"median_ms": round(statistics.median(xs), 1), "max_ms": round(max(xs), 1),
                "runs": [round(x, 1) for x in xs]}
    return {"what": what, "apply_to_refused": stats(applies), "delete_to_allowed": stats(deletes),
            "admin_api_apply": stats(api_ms), "refused_as": sorted(set(hows))}


# --------------------------------------------------------------------------


def cli_apply(n_rules: int = 10_000, runs: int = 1, timeout: float = 600.0) -> dict:
    """``meshlet policy apply`` of an ``n_rules`` file to both agents of a 2-node
    mesh at once (a new set each run: the same names, other paths, so the
    store holds ``n_rules`` rules each time), timed until both CLIs return and
    until every proxy worker of both nodes runs the new version.  Also where
    the time went: the agents' stages (from the apply answers) and the
    workers' loads (from their stats), wall and CPU ms, medians over runs and
    nodes; and the load average (the machine may be shared)."""
    import subprocess

    from agent.sim import Cluster
    from agent.sim.mesh import Mesh, _env

    cluster = Cluster(nodes=2, pods_per_node=1).up()
    mesh = Mesh(cluster)
    cli_s, enforced_s = [], []
    stages: dict[str, list[tuple[float, float]]] = {}
    loads = [os.getloadavg()[0]]
    try:
        mesh.start()
        with tempfile.TemporaryDirectory() as d:
            for run_i in range(runs):
                path = os.path.join(d, f"set-{run_i}.yaml")
                with open(path, "w") as f:
                    f.write(policy_text(n_rules).replace("'/svc-", f"'/run{run_i}-svc-"))
                t0 = time.monotonic()
                procs = [subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "policy", "apply", "-o", "json", "-f", path,
                     "--socket", os.path.join(ap.run_dir, "admin.sock")], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, env=_env()) for ap in mesh.agents.values()]
                for p in procs:
                    out, err = p.communicate(timeout=timeout)
                    if p.returncode != 0:
                        raise RuntimeError(f"apply failed: {err}")
                    for stage, t in (json.loads(out).get("timings") or {}).items():
                        stages.setdefault(f"agent: {stage}", []).append((t["ms"], t["cpu_ms"]))
                cli_s.append(time.monotonic() - t0)
                want = {n: mesh.status(n)["policy"]["version"] for n in mesh.agents}
                end = t0 + timeout
                while time.monotonic() < end:
                    got = {n: {(w.get("stats") or {}).get("policy", {}).get("version")
                               for w in mesh.status(n)["proxy"]} for n in mesh.agents}
                    if all(got[n] == {want[n]} for n in want):
                        break
                    time.sleep(0.05)
                enforced_s.append(time.monotonic() - t0)
                for n in mesh.agents:
                    for w in mesh.status(n)["proxy"]:
                        t = (w.get("stats") or {}).get("policy", {}).get("last_load")
                        if t:
                            stages.setdefault("worker: load + index", []).append((t["ms"], t["cpu_ms"]))
                loads.append(os.getloadavg()[0])
    finally:
        mesh.down()
        cluster.down()

    def stats(xs):
        return {"median_s": round(statistics.median(xs), 2), "max_s": round(max(xs), 2),
                "runs": [round(x, 2) for x in xs]}
    return {"rules": n_rules, "cli_returned": stats(cli_s), "proxies_on_new_set": stats(enforced_s),
            "stages_ms": {k: {"ms": round(statistics.median(w for w, _ in v), 1),
                              "cpu_ms": round(statistics.median(c for _, c in v), 1)}
                          for k, v in stages.items()},
            "loadavg_1m": [round(x, 1) for x in loads]}


def run(runs: int = 5, apply: bool = True, kinds=tuple(KINDS), sizes=SIZES) -> dict:
    out: dict = {"evaluate": eval_cost(sizes), "normalize": normalize_cost()}
    if apply:
        out["cli_apply"] = cli_apply(max(sizes), runs=min(runs, 3))
        out["apply"] = {k: apply_latency(k, runs) for k in kinds}
    return out


def print_tables(res: dict) -> None:
    print("Policy scale: every rule selects the destination workload (one worker; CPU ms, CPU µs)")
    print(f"{'rules':>7} {'policies':>9} {'apply ms':>9} {'reload ms':>10} {'allowed µs':>11} "
          f"{'no match µs':>12} {'denied µs':>10} {'vs first (allowed/no match/denied)':>36}")
    for r in res["evaluate"]:
        v = r["vs_first"]
        vs = f"{v['allowed_us']} / {v['no_match_us']} / {v['denied_us']}"
        print(f"{r['rules']:>7,} {r['policies']:>9} {r['apply_ms']:>9,.1f} {r['reload_ms']:>10,.1f} "
              f"{r['allowed_us']:>11,.2f} {r['no_match_us']:>12,.2f} {r['denied_us']:>10,.2f} {vs:>36}")
    print("  apply: the agent's store (parse once, compile, write); reload: a proxy worker's loader "
          "thread (policies.json -> set -> rule index)")
    n = res["normalize"]
    print(f"normalize_path: {n['normalize_path_us']} µs (with dot segments and escapes: "
          f"{n['normalize_path_tricky_us']} µs); building the Request: {n['request_build_us']} µs")
    if "cli_apply" in res:
        c = res["cli_apply"]
        print(f"\nEnd to end, `meshlet policy apply` of {c['rules']:,} rules to both agents "
              "of a 2-node mesh:")
        print(f"  CLI returned        median {c['cli_returned']['median_s']:>6.2f} s   "
              f"runs {c['cli_returned']['runs']}")
        print(f"  proxies on new set  median {c['proxies_on_new_set']['median_s']:>6.2f} s   "
              f"runs {c['proxies_on_new_set']['runs']}")
        if c.get("stages_ms"):
            print("  where the time went (medians; wall ms / CPU ms, CPU is what the code costs):")
            for k, v in c["stages_ms"].items():
                print(f"    {k:<22} {v['ms']:>8,.0f} / {v['cpu_ms']:>6,.0f}")
        print(f"  1-minute load average during the runs: {c.get('loadavg_1m')} ({os.cpu_count()} CPUs)")
    for kind, a in res.get("apply", {}).items():
        print(f"\nApply latency, {kind}: {a['what']}")
        print("  (admin API POST to both agents of a 2-node mesh -> first refused connection/request)")
        for k, label in (("apply_to_refused", "apply -> refused"), ("delete_to_allowed", "delete -> allowed"),
                         ("admin_api_apply", "admin API round trip")):
            print(f"  {label:<22} median {a[k]['median_ms']:>7.1f} ms   max {a[k]['max_ms']:>7.1f} ms   "
                  f"runs {a[k]['runs']}")
        print(f"  refused as: {', '.join(a['refused_as'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-apply", action="store_true", help="only the pure part (no root needed)")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"apply-latency cases, comma-separated (default: all of {', '.join(KINDS)})")
    ap.add_argument("--sizes", default=",".join(str(n) for n in SIZES),
                    help="policy-scale rule counts, comma-separated (the first is the baseline)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    if not 1 <= a.runs <= 50:
        ap.error("--runs must be 1..50")
    kinds = tuple(k for k in a.kinds.split(",") if k)
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--kinds: choose from {', '.join(KINDS)}")
    try:
        sizes = tuple(int(x) for x in a.sizes.split(",") if x)
    except ValueError:
        ap.error("--sizes: integers, comma-separated")
    if not sizes or any(not 1 <= n <= 20_000 for n in sizes):
        ap.error("--sizes: 1..20000 rules each")
    res = run(a.runs, apply=not a.skip_apply, kinds=kinds, sizes=sizes)
    print_tables(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
