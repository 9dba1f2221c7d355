"""policies/gateway/: the API-gateway example set (HTTPRoute + mesh policies)
lints clean with ``meshlet policy lint --gateway``, its policies decide the
gateway's and other pods' connections as written, and the nginx config the
simulated gateway runs is rendered from its HTTPRoute (agent/sim/gateway.py;
``nginx -t`` checks the result when nginx is installed)."""

from __future__ import annotations

import ipaddress
import pathlib
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.identity.spiffe import parse_spiffe_id
from agent.policy.evaluate import Request, evaluate
from agent.policy.gatewaylint import parse_gateway
from agent.policy.load import load_policies, read_sources
from agent.sim.gateway import Location, locations_from_routes, nginx_conf

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "policies" / "gateway"
ROUTES = EXAMPLE / "routes"
GATEWAY = "spiffe://cluster.local/ns/ingress/sa/gateway"


def lint(*args: str):
    return CliRunner().invoke(main, ["policy", "lint", *args])


def test_the_example_set_lints_clean_against_its_routes():
    r = lint(str(EXAMPLE), "--gateway", str(ROUTES), "--gateway-identity", "ns/ingress/sa/gateway")
    assert r.exit_code == 0, r.output
    assert "0 finding(s)" in r.output


def test_the_lint_sees_a_frontend_policy_that_forgets_the_gateway(tmp_path):
    for f in EXAMPLE.glob("*.yaml"):
        (tmp_path / f.name).write_text(f.read_text().replace("ns/ingress/sa/gateway", "ns/ingress/sa/other"))
    r = lint(str(tmp_path), "--gateway", str(ROUTES), "--gateway-identity", "ns/ingress/sa/gateway")
    assert r.exit_code == 1, r.output
    assert "route-denied" in r.output and "routes/shop.yaml:" in r.output, r.output


def test_the_example_policies_admit_the_gateway_and_no_other_pod():
    ps = load_policies(EXAMPLE)
    assert [a.key for a in ps.authentications] == ["istio-system/end-users"]
    ip = ipaddress.ip_address("10.244.1.10")

    def frontend_from(src: str):
        req = Request("shop", {"app": "frontend"}, 8080, parse_spiffe_id(src), ip, True, "GET", "/")
        return evaluate(ps, req)

    assert frontend_from(GATEWAY).allowed
    assert not frontend_from("spiffe://cluster.local/ns/shop/sa/debug").allowed
    # orders: not the gateway (a request principal is needed too, and only frontend's peer identity)
    req = Request("shop", {"app": "orders"}, 8080, parse_spiffe_id(GATEWAY), ip, True, "GET", "/orders/1")
    assert not evaluate(ps, req).allowed


def vip_of(ns: str, name: str, port: int) -> str:
    return {("shop", "frontend", 80): "10.96.0.1:80"}[(ns, name, port)]


def test_the_gateway_config_is_rendered_from_the_httproute(tmp_path):
    locs = locations_from_routes(read_sources([ROUTES], parse_gateway), vip_of)
    assert locs == [Location("/", False, ("10.96.0.1:80",), "", 10.0, "shop/shop")]
    conf = nginx_conf(str(tmp_path), 8080, locs)
    assert "server 10.96.0.1:80;" in conf and "proxy_pass http://up0;" in conf
    assert "proxy_read_timeout 10000ms;" in conf and "proxy_next_upstream off;" in conf


ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}, {path: {type: Exact, value: /health}}]
    backendRefs: [{name: frontend, port: 80}]
"""


def test_path_matches_become_nginx_locations_with_gateway_api_semantics(tmp_path):
    locs = locations_from_routes(parse_gateway([("r.yaml", ROUTE)]), vip_of)
    conf = nginx_conf(str(tmp_path), 8080, locs)
    # PathPrefix /api: /api and /api/..., not /apix; Exact: only that path; the rest: 404
    assert "location = /api {" in conf and "location ^~ /api/ {" in conf
    assert "location = /health {" in conf
    assert 'return 404 "no route\\n";' in conf


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("type: PathPrefix, value: /api}}", "only PathPrefix and Exact"),
        ("backendRefs: [{name: frontend, port: 80}]", "retries are the mesh's job"),
    ],
)
def test_what_nginx_would_route_differently_is_refused(change, message):
    text = ROUTE
    if "PathPrefix" in change:
        text = text.replace(change, "type: RegularExpression, value: /a.*}}")
    else:
        text = text.replace(change, change + "\n    retry: {attempts: 2}")
    with pytest.raises(ValueError, match=message):
        locations_from_routes(parse_gateway([("r.yaml", text)]), vip_of)


def test_unknown_services_and_bodies_nginx_would_misread_are_refused():
    with pytest.raises(KeyError):
        locations_from_routes(parse_gateway([("r.yaml", ROUTE.replace("frontend", "nope"))]), vip_of)
    with pytest.raises(ValueError, match="quotes"):
        nginx_conf("/tmp/x", 8080, [Location("/", body='say "hi"')])


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_rendered_config(tmp_path):
    locs = locations_from_routes(parse_gateway([("r.yaml", ROUTE)]), vip_of)
    locs.append(Location("/static", body="static\n"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(str(tmp_path), 18080, locs))
    r = subprocess.run(
        ["nginx", "-t", "-q", "-e", str(tmp_path / "error.log"), "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 0, r.stderr
