"""agent/traffic/trafficpolicy.py: defaults, durations, matching, every example
file, and errors with their exact file:line:column."""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.traffic.trafficpolicy import (
    DEFAULTS, Retries, TrafficSettings, lint_traffic, load_all, load_traffic_policies,
    parse_all_sources, parse_duration, parse_traffic_policies, traffic_policy_files,
)
from agent.yamlsrc import SourceError

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "policies" / "traffic"

HEAD = "apiVersion: meshlet.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: shop}\n"


def errors(text: str, filename: str = "t.yaml") -> list[str]:
    with pytest.raises(SourceError) as ei:
        parse_traffic_policies(text, filename)
    return [str(p) for p in ei.value.errors]


def test_minimal_policy_takes_every_default():
    ps = parse_traffic_policies(HEAD + "spec: {service: backend}\n", "t.yaml")
    (p,) = ps.policies
    assert (p.key, p.service, p.port, p.origin) == ("shop/p", "backend", None, "t.yaml:1:1")
    assert p.settings == DEFAULTS == TrafficSettings()
    r = DEFAULTS.retries
    assert (r.attempts, r.per_try_timeout, r.on, r.statuses, r.non_idempotent, r.max_body_bytes) == (
        2, None, {"connect-failure", "reset"}, {503}, False, 65536)
    assert (DEFAULTS.budget.percent, DEFAULTS.budget.min_per_second) == (20, 10)
    assert DEFAULTS.timeouts.connect == 5 and DEFAULTS.timeouts.request == 15


def test_full_policy_and_retry_on_expansion():
    ps = parse_traffic_policies(HEAD + """\
spec:
  service: backend
  port: 80
  retries:
    attempts: 4
    perTryTimeout: 250ms
    retryOn: [connect-failure, timeout, gateway-error, "409", 429]
    retryNonIdempotent: true
    maxBodyBytes: 0
  budget: {percent: 50, minPerSecond: 1.5}
  timeouts: {connect: 1m30s, request: 0s, idle: 1h, streamIdle: 2.5s, requestHeaders: 100ms}
  circuitBreaker: {maxConnections: 1, maxPendingRequests: 2, maxRequests: 3}
  outlierDetection: {consecutive5xx: 0, consecutiveConnectFailures: 1, interval: 1s,
                     baseEjectionTime: 5s, maxEjectionTime: 20s, maxEjectionPercent: 100}
""", "t.yaml")
    s = ps.policies[0].settings
    assert s.retries == Retries(4, 0.25, frozenset({"connect-failure", "timeout"}),
                                frozenset({409, 429, 502, 503, 504}), True, 0)
    assert (s.budget.percent, s.budget.min_per_second) == (50, 1.5)
    t = s.timeouts
    assert (t.connect, t.request, t.idle, t.stream_idle, t.request_headers) == (90, None, 3600, 2.5, 0.1)
    assert (s.circuit_breaker.max_connections, s.circuit_breaker.max_requests) == (1, 3)
    o = s.outlier_detection
    assert (o.consecutive_5xx, o.consecutive_connect_failures, o.base_ejection_time,
            o.max_ejection_time, o.max_ejection_percent) == (0, 1, 5, 20, 100)


def test_grpc_retry_conditions():
    ps = parse_traffic_policies(HEAD + """\
spec:
  service: backend
  retries: {retryOn: [unavailable, resource-exhausted, cancelled, deadline-exceeded, internal, reset]}
""", "t.yaml")
    r = ps.policies[0].settings.retries
    assert r.grpc_statuses == {14, 8, 1, 4, 13}
    assert (r.on, r.statuses) == ({"reset"}, frozenset())
    assert DEFAULTS.retries.grpc_statuses == frozenset()  # opt-in


def test_port_specific_policy_wins_whole():
    ps = parse_traffic_policies(HEAD + "spec: {service: b, retries: {attempts: 5}}\n---\n"
                                + HEAD.replace("name: p", "name: q")
                                + "spec: {service: b, port: 80, timeouts: {connect: 1s}}\n", "t.yaml")
    assert ps.policy_for("shop", "b", 80).name == "q"
    assert ps.settings_for("shop", "b", 80).retries.attempts == 2  # not inherited from p
    assert ps.settings_for("shop", "b", 81).retries.attempts == 5
    assert ps.settings_for("other", "b", 80) is DEFAULTS


@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25), ("2s", 2), ("1.5s", 1.5), ("5m", 300), ("1h", 3600), ("1m30s", 90),
    ("1h1m1s1ms", 3661.001), ("0s", 0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["2", "2 s", "s", "-1s", "1d", "1.s", "", "ms1"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["ms", "s", "m", "h"])),
                min_size=1, max_size=4))
@settings(max_examples=200)
def test_duration_sums_its_parts(parts):
    text = "".join(f"{n}{u}" for n, u in parts)
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    assert parse_duration(text) == pytest.approx(sum(n * scale[u] for n, u in parts))


@pytest.mark.parametrize("spec, expected", [
    ("spec:\n  service: b\n  retries: {perTryTimeout: 250}\n",
     ["t.yaml:6:28: spec.retries.perTryTimeout: '250' has no unit; write e.g. '250s' or "
      "'250ms' (quoted or not)"]),
    ("spec:\n  service: b\n  retries:\n    retryOn: [reset, 5xxx, 200]\n",
     ["t.yaml:7:22: spec.retries.retryOn[1]: unknown retry condition '5xxx' (did you mean '5xx'?)",
      "t.yaml:7:28: spec.retries.retryOn[2]: 200 cannot be retried on; status codes 400..599 can"]),
    ("spec:\n  service: b\n  retries:\n    retryOn: [unavailabel]\n",
     ["t.yaml:7:15: spec.retries.retryOn[0]: unknown retry condition 'unavailabel' (did you mean "
      "'unavailable'?)"]),
    ("spec:\n  service: b\n  retries: {retryOnn: [reset]}\n",
     ["t.yaml:6:13: spec.retries.retryOnn: unknown field 'retryOnn' (did you mean 'retryOn'?)"]),
    ("spec:\n  service: b\n  timeouts: {connect: 0s}\n",
     ["t.yaml:6:23: spec.timeouts.connect: '0s' must be longer than 0 (this timeout cannot "
      "be disabled)"]),
    ("spec:\n  service: b\n  budget: {percent: 101}\n",
     ["t.yaml:6:21: spec.budget.percent: 101 is out of range (0..100)"]),
    ("spec:\n  service: b\n  circuitBreaker: {maxRequests: 0}\n",
     ["t.yaml:6:33: spec.circuitBreaker.maxRequests: 0 is out of range (1..4294967295)"]),
    ("spec:\n  service: b\n  outlierDetection: {baseEjectionTime: 1m, maxEjectionTime: 30s}\n",
     ["t.yaml:6:61: spec.outlierDetection.maxEjectionTime: maxEjectionTime (30s) is shorter "
      "than baseEjectionTime (60s)"]),
    ("spec:\n  port: 80\n",
     ["t.yaml:5:3: spec.service: required field is missing"]),
    ("spec:\n  service: b\n  mirror: x\n",
     ["t.yaml:6:3: spec.mirror: unknown field 'mirror'; known fields: service, port, retries, "
      "budget, timeouts, circuitBreaker, outlierDetection"]),
])
def test_errors_with_exact_positions(spec, expected):
    assert errors(HEAD + spec) == expected


def test_document_level_errors():
    assert errors("apiVersion: meshlet.io/v1alpha1\nkind: TrafficPolicy\nspec: {service: b}\n") == [
        "t.yaml:1:1: metadata: required field is missing (name and namespace)"]
    assert errors("apiVersion: meshlet.io/v1\nkind: TrafficPolicy\n")[0].startswith(
        "t.yaml:1:13: apiVersion: 'meshlet.io/v1' is not one of: meshlet.io/v1alpha1")
    assert errors("") == ["t.yaml:1:1: no policy documents in this file; expected TrafficPolicy documents"]
    assert errors("- a\n") == ["t.yaml:1:1: a TrafficPolicy document must be a mapping, got a list"]
    assert errors(HEAD + "spec: {service: b}\n---\n" + HEAD + "spec: {service: c}\n") == [
        "t.yaml:8:18: metadata.name: traffic policy shop/p is defined twice (first at t.yaml:1:1)"]
    assert errors(HEAD + "spec: {service: b, port: 80}\n---\n"
                  + HEAD.replace("name: p", "name: q") + "spec: {service: b, port: 80}\n") == [
        "t.yaml:9:26: spec.port: port 80 of service shop/b already has a traffic policy, "
        "shop/p (t.yaml:1:1); merge the two"]


def test_every_example_file_loads():
    files = traffic_policy_files(EXAMPLES)
    assert len(files) >= 2
    for f in files:
        assert load_traffic_policies(f).policies, f
    ps = load_traffic_policies(EXAMPLES)
    assert ps.settings_for("shop", "backend", 8443).retries.on == {"connect-failure"}
    assert ps.settings_for("shop", "backend", 80).retries.statuses == {502, 503, 504}
    assert ps.settings_for("data", "postgres", 5432).timeouts.idle is None


def test_directory_errors(tmp_path):
    with pytest.raises(SourceError, match="directory has no .yaml or .yml files"):
        load_traffic_policies(tmp_path)
    (tmp_path / "a.yaml").write_text(HEAD + "spec: {service: b}\n")
    (tmp_path / "b.yaml").write_text(HEAD + "spec: {service: b}\n")
    with pytest.raises(SourceError) as ei:
        load_traffic_policies(tmp_path)
    assert str(ei.value) == (f"{tmp_path}/b.yaml:3:18: metadata.name: traffic policy shop/p is "
                             f"defined twice (first at {tmp_path}/a.yaml:1:1)")


@given(st.text(max_size=200))
@settings(max_examples=150, deadline=None)
def test_fuzz_only_source_errors(text):
    try:
        parse_traffic_policies(HEAD + "spec:\n  service: b\n  retries: " + text + "\n", "f.yaml")
    except SourceError:
        pass


# --- both kinds in the same files (the CLI's validate, the agent's store) -------------------

AUTHZ = ("apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
         "metadata: {name: p, namespace: shop}\nspec: {action: ALLOW}\n")


def test_mixed_documents_each_read_by_kind(tmp_path):
    ps, ts = parse_all_sources([("m.yaml", AUTHZ + "---\n" + HEAD + "spec: {service: backend}\n")])
    assert [p.key for p in ps.policies] == ["shop/p"] and [p.key for p in ts.policies] == ["shop/p"]
    assert ts.policies[0].origin == "m.yaml:6:1"
    # the repo's examples: policies/ and policies/traffic/ together
    ps, ts = load_all([EXAMPLES.parent, EXAMPLES])
    assert len(ps) >= 6 and len(ts) == len(load_traffic_policies(EXAMPLES))


def test_mixed_errors_name_file_line_column_and_fail_closed():
    def errs(text):
        with pytest.raises(SourceError) as ei:
            parse_all_sources([("m.yaml", text)])
        return [str(p) for p in ei.value.errors]

    assert errs("apiVersion: meshlet.io/v1alpha1\nkind: Gateway\nmetadata: {name: g, namespace: n}\n") == [
        "m.yaml:2:7: kind: 'Gateway' is not one of: AuthorizationPolicy, RequestAuthentication, TrafficPolicy"]
    assert errs("apiVersion: meshlet.io/v1alpha1\nmetadata: {name: g, namespace: n}\n") == [
        "m.yaml:1:1: kind: required field is missing (one of: AuthorizationPolicy, RequestAuthentication, TrafficPolicy)"]
    # problems of both kinds, all reported, in file order
    assert errs(AUTHZ.replace("ALLOW", "ALOW") + "---\n" + HEAD + "spec: {service: b, retry: {}}\n") == [
        "m.yaml:4:16: spec.action: 'ALOW' is not one of: ALLOW, DENY, AUDIT, CUSTOM "
        "(did you mean 'ALLOW'?)",
        "m.yaml:9:20: spec.retry: unknown field 'retry' (did you mean 'retries'?)"]
    assert errs("") == ["m.yaml:1:1: no policy documents in this file; expected "
                        "AuthorizationPolicy or RequestAuthentication or TrafficPolicy documents"]
    # a TrafficPolicy has only meshlet's apiVersion
    assert errs(HEAD.replace("meshlet.io/v1alpha1", "security.istio.io/v1") + "spec: {service: b}\n") == [
        "m.yaml:1:13: apiVersion: 'security.istio.io/v1' is not one of: meshlet.io/v1alpha1"]
    # same name in both kinds is fine; twice in one kind is not
    parse_all_sources([("a.yaml", AUTHZ), ("b.yaml", HEAD + "spec: {service: b}\n")])
    assert errs(AUTHZ + "---\n" + AUTHZ)[0].endswith("policy shop/p is defined twice (first at m.yaml:1:1)")


def test_traffic_lint_warns_on_unknown_services():
    ts = load_traffic_policies(EXAMPLES)
    found = lint_traffic(ts, [("shop", "backend", (80,))])
    kinds = sorted((k, key) for k, key, _, _ in found)
    assert kinds == [("no-port", "shop/backend-checkout"), ("no-service", "data/postgres")]
    assert all(origin.startswith(str(EXAMPLES)) for _, _, origin, _ in found)
    assert lint_traffic(ts, [("shop", "backend", (80, 8443)), ("data", "postgres", (5432,))]) == []


def test_the_version_is_the_meaning():
    a = parse_traffic_policies(HEAD + "spec: {service: b, retries: {retryOn: [reset, '503']}}\n")
    b = parse_traffic_policies("# reformatted\n" + HEAD + "spec:\n  retries:\n    retryOn: [\"503\", reset]\n"
                               "  service: b\n", "other.yaml")
    c = parse_traffic_policies(HEAD + "spec: {service: b, retries: {retryOn: [reset, '502']}}\n")
    assert a.version == b.version != c.version and len(a.version) == 16
