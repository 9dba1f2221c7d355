"""The JSON form of traffic policies (agent/traffic/settings.py) that the
agent publishes in traffic.json and the proxy workers read back, and the
worker's promise that follows from it: reading the agent's compiled files
loads no YAML parser."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from agent.policy.store import PolicyStore
from agent.traffic.settings import (
    DEFAULTS,
    TrafficDataError,
    policies_from_data,
    policies_to_data,
    traffic_set,
)
from agent.traffic.trafficpolicy import TRAFFIC_KIND, parse_traffic_policies
from tests.support.policy import doc

EVERY_FIELD = """\
apiVersion: meshlet.io/v1alpha1
kind: TrafficPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  port: 8080
  retries:
    attempts: 3
    perTryTimeout: 250ms
    retryOn: [connect-failure, timeout, gateway-error, "429", unavailable, cancelled]
    retryNonIdempotent: true
    maxBodyBytes: 1024
  budget: {percent: 12.5, minPerSecond: 3}
  timeouts: {connect: 1s, request: 0s, idle: 1m30s, streamIdle: 2m, requestHeaders: 500ms}
  circuitBreaker: {maxConnections: 7, maxPendingRequests: 8, maxRequests: 9}
  outlierDetection:
    consecutive5xx: 0
    consecutiveConnectFailures: 2
    interval: 3s
    baseEjectionTime: 4s
    maxEjectionTime: 5m
    maxEjectionPercent: 50
---
apiVersion: meshlet.io/v1alpha1
kind: TrafficPolicy
metadata: {name: whole, namespace: shop}
spec: {service: web}
"""


def test_every_field_survives_the_round_trip():
    ts = parse_traffic_policies(EVERY_FIELD, "t.yaml")
    backend = ts.get("shop", "backend")
    assert backend is not None and backend.settings != DEFAULTS
    assert backend.settings.timeouts.request is None and backend.settings.retries.grpc_statuses
    data = json.loads(json.dumps(policies_to_data(ts.policies)))
    back = policies_from_data(data, version=ts.version, source="traffic.json")
    assert back == ts and back.version == ts.version
    assert [p.settings for p in back.policies] == [p.settings for p in ts.policies]
    assert back.get("shop", "backend").origin == "traffic.json: data[0]"
    assert policies_from_data([], version=traffic_set(()).version) == traffic_set(())


@pytest.mark.parametrize("change,why", [
    (lambda d: d[0]["settings"]["retries"].update(on=["reset", 1]), "retries.on: expected frozenset[str]"),
    (lambda d: d[0]["settings"]["retries"].update(attempts=True), "retries.attempts: expected int, got True"),
    (lambda d: d[0]["settings"]["timeouts"].update(idle="90s"), "timeouts.idle: expected float | None"),
    (lambda d: d[0]["settings"]["budget"].update(percent=None), "budget.percent: expected float, got None"),
    (lambda d: d[0].update(port=70000), "data[0].port: expected a port number or null"),
    (lambda d: d[0].update(name=None), "data[0].name: expected a string"),
    (lambda d: d[0].update(settings=[]), "data[0].settings: expected an object"),
    (lambda d: d.append("backend"), "data[2]: expected an object"),
    (lambda d: d[0]["settings"]["retries"].update(statuses=[503, 504]), "the policies have version"),
    (lambda d: d.pop(), "the policies have version"),
])
def test_data_that_does_not_say_exactly_the_version_is_refused(change, why):
    ts = parse_traffic_policies(EVERY_FIELD, "t.yaml")
    data = json.loads(json.dumps(policies_to_data(ts.policies)))
    change(data)
    with pytest.raises(TrafficDataError) as e:
        policies_from_data(data, version=ts.version, source="traffic.json")
    assert why in str(e.value) and str(e.value).startswith("traffic.json: ")


def test_a_worker_reads_the_agents_files_without_a_yaml_parser(tmp_path):
    store = PolicyStore(str(tmp_path), kinds=[TRAFFIC_KIND]).load()
    store.apply([("p.yaml", doc("shop", "deny", "web", "DENY", "[{}]")), ("t.yaml", EVERY_FIELD)])
    code = textwrap.dedent(f"""
        import json, sys
        import agent.proxy.__main__, agent.proxy.server
        from agent.proxy.authz import load_policy_file
        from agent.proxy.watch import load_traffic_file
        ps = load_policy_file({str(tmp_path / "policies.json")!r})
        ts = load_traffic_file({str(tmp_path / "traffic.json")!r})
        yaml = sorted(m for m in sys.modules if m == "yaml" or m.startswith("yaml.")
                      or m in ("agent.yamlsrc", "agent.policy.load", "agent.traffic.trafficpolicy"))
        print(json.dumps({{"policies": len(ps), "traffic": len(ts), "version": ts.version, "yaml": yaml}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout)
    assert got == {"policies": 1, "traffic": 2, "version": parse_traffic_policies(EVERY_FIELD).version,
                   "yaml": []}, out.stderr
