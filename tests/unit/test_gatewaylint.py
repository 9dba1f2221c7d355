"""``meshlet policy lint --gateway``: HTTPRoutes (and Envoy Gateway
SecurityPolicies) against the mesh's policies.  tests/unit/gateway_lint/
has a set with each finding once and the same set with every conflict
resolved; the pure module, then the CLI and its exit codes."""

from __future__ import annotations

import json
import pathlib

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.policy.gatewaylint import MeshTraffic, lint_gateway, parse_duration, parse_gateway
from agent.policy.load import read_sources
from agent.traffic.trafficpolicy import load_all
from agent.yamlsrc import SourceError

HERE = pathlib.Path(__file__).resolve().parent / "gateway_lint"
GW = "spiffe://cluster.local/ns/ingress/sa/gateway"
ROUTE_HEAD = (
    "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\n"
)
KINDS = [
    "route-denied",
    "deny-covers-route",
    "unexposed-allow",
    "double-retries",
    "timeout-shorter",
    "jwt-mismatch",
]


def findings(which: str, gateway: str = GW):
    ps, ts = load_all(str(HERE / which / "mesh.yaml"))
    cfg = read_sources(str(HERE / which / "routes.yaml"), parse_gateway)

    def traffic(ns, svc, port):
        p = ts.policy_for(ns, svc, port)
        if p is None:
            return None
        return MeshTraffic(
            p.settings.retries.attempts,
            p.settings.retries.per_try_timeout,
            p.settings.timeouts.request,
            p.origin,
        )

    return lint_gateway(
        cfg, ps, gateway, workload=lambda ns, svc, port: ({"app": svc}, port), traffic=traffic
    )


def test_each_finding_once_with_its_position():
    got = findings("findings")
    assert sorted(f.kind for f in got) == sorted(KINDS)
    at = {f.kind: f.origin.split("gateway_lint/")[1] for f in got}
    assert at == {
        "route-denied": "findings/routes.yaml:22:19",  # the backendRef to billing
        "deny-covers-route": "findings/routes.yaml:12:15",  # the Exact /orders/admin match
        "unexposed-allow": "findings/mesh.yaml:8:5",  # the ALLOW rule naming /legacy/*
        "double-retries": "findings/routes.yaml:10:12",  # the route's retry
        "timeout-shorter": "findings/routes.yaml:11:25",  # the route's request timeout
        "jwt-mismatch": "findings/routes.yaml:24:1",  # the SecurityPolicy
    }
    msg = {f.kind: f.message for f in got}
    assert "up to 12 attempts" in msg["double-retries"]  # (1 + 3) x (1 + 2)
    assert "6s (2s per try x 3 attempts)" in msg["timeout-shorter"]
    assert "shop/orders-deny-admin rule 0" in msg["deny-covers-route"]
    assert "['/legacy/*']" in msg["unexposed-allow"]


def test_clean_set_has_no_finding():
    assert findings("clean") == []


def test_another_gateway_identity_is_denied_everywhere():
    got = findings("clean", "spiffe://cluster.local/ns/ingress/sa/other")
    assert sorted({f.kind for f in got}) == ["route-denied"]
    assert len(got) == 2  # orders and billing: no ALLOW rule names this identity


def test_durations():
    assert parse_duration("1m30s") == 90 and parse_duration("500ms") == 0.5 and parse_duration("1h") == 3600
    for bad in ("10", "1.5s", "-1s", "1d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            ROUTE_HEAD
            + "spec:\n  rules:\n  - backendRefs: [{name: a, port: 80}]\n    timeouts: {request: 10x}\n",
            "r.yaml:7:25: spec.rules[0].timeouts.request: '10x' is not a Gateway API duration",
        ),
        (
            ROUTE_HEAD
            + "spec:\n  rules:\n  - backendRefs: [{name: a, port: 80}]\n    retries: {attempts: 2}\n",
            "r.yaml:7:5: spec.rules[0].retries: unknown field 'retries' (did you mean 'retry'?)",
        ),
        (
            ROUTE_HEAD.replace("HTTPRoute", "GRPCRoute"),
            "r.yaml:2:7: kind: 'GRPCRoute' is not one of: HTTPRoute, SecurityPolicy",
        ),
    ],
)
def test_gateway_errors_name_file_line_field(text, expected):
    with pytest.raises(SourceError) as ei:
        parse_gateway([("r.yaml", text)])
    assert str(ei.value.errors[0]).startswith(expected), str(ei.value)


# --- the CLI


def run(*args):
    return CliRunner().invoke(main, ["policy", "lint", *map(str, args)])


def test_cli_exit_codes_and_json():
    base = ["--gateway-identity", "ns/ingress/sa/gateway"]
    r = run(HERE / "findings" / "mesh.yaml", "--gateway", HERE / "findings" / "routes.yaml", *base)
    assert r.exit_code == 1, r.output
    assert all(f"{k}:" in r.output for k in KINDS)
    r = run(
        HERE / "findings" / "mesh.yaml", "--gateway", HERE / "findings" / "routes.yaml", *base, "-o", "json"
    )
    assert r.exit_code == 1
    assert sorted(f["kind"] for f in json.loads(r.output)["findings"]) == sorted(KINDS)
    r = run(HERE / "clean" / "mesh.yaml", "--gateway", HERE / "clean" / "routes.yaml", *base)
    assert r.exit_code == 0, r.output
    assert "0 finding(s)" in r.output


def test_cli_unreadable_input_is_2(tmp_path):
    bad = tmp_path / "routes.yaml"
    bad.write_text("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n")
    r = run(HERE / "clean" / "mesh.yaml", "--gateway", bad, "--gateway-identity", "ns/ingress/sa/gateway")
    assert r.exit_code == 2 and "routes.yaml:3:11: metadata.namespace: required field is missing" in r.output
    r = run(
        HERE / "clean" / "mesh.yaml",
        "--gateway",
        tmp_path / "missing.yaml",
        "--gateway-identity",
        "ns/x/sa/y",
    )
    assert r.exit_code == 2
    r = run(HERE / "clean" / "mesh.yaml", "--gateway", HERE / "clean" / "routes.yaml")
    assert r.exit_code == 2 and "--gateway-identity" in r.output
    # the mesh's files not loading is also unreadable input with --gateway
    r = run(bad, "--gateway", HERE / "clean" / "routes.yaml", "--gateway-identity", "ns/ingress/sa/gateway")
    assert r.exit_code == 2
