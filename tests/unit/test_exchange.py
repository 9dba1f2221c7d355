"""agent/proxy/exchange.py: scripted conversations with one HttpExchange.

Each script is a table of rows ``(event, now, expected commands)``: feed the
event at ``now``, compare the commands (frozen dataclasses, compared by
value). No sockets, no loop, no clock: what the L7 shell would see and do.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy import exchange as exmod
from agent.proxy.exchange import (
    ATTACHED_NEW, ATTACHED_REUSED, CLIENT_LOST, DEADLINE, FORWARD, REQUEST_END, RESET_CLIENT,
    RESET_UPSTREAM, RESPONSE_END, SWITCH_PROTOCOLS, BadRequest, BadResponse, Connect, Connected,
    ConnectFailed, Exchange, Fail, HttpExchange, Refused, RequestBody, Respond, ResponseStarted, Start,
    State, UpstreamLost, Wake, response_started,
)
from agent.traffic.breaker import Limit, Overloaded
from agent.traffic.upstream_cluster import Cluster
from agent.traffic.trafficpolicy import (
    DEFAULTS, Budget, CircuitBreaker, OutlierDetection, Retries, Timeouts, TrafficSettings,
)

A = ("10.0.0.1", 8080)
B = ("10.0.0.2", 8080)
HEAD = b"GET / HTTP/1.1\r\n\r\n"
END = b"0\r\n\r\n"
GENEROUS = Budget(percent=100, min_per_second=1000)


def head_for(target):
    return HEAD + b"# " + target[0].encode()  # shows which target the head was made for


def traffic(*, retries=None, timeouts=None, budget=GENEROUS, breaker=None, outlier=None) -> TrafficSettings:
    return TrafficSettings(
        retries=dataclasses.replace(DEFAULTS.retries, **(retries or {})),
        budget=budget,
        timeouts=dataclasses.replace(DEFAULTS.timeouts, **(timeouts or {})),
        circuit_breaker=breaker or DEFAULTS.circuit_breaker,
        outlier_detection=outlier or DEFAULTS.outlier_detection,
    )


def single(settings: TrafficSettings | None = None) -> Cluster:
    return Cluster.single(A, settings or traffic())


def play(ex: HttpExchange, script) -> None:
    """Feed each row's event; its commands must be exactly the row's."""
    for i, (event, now, expected) in enumerate(script):
        got = list(ex.handle(event, now))
        assert got == expected, f"row {i}: {event!r} at {now}: got {got!r}, expected {expected!r}"


def start(cluster: Cluster, method=b"GET", body=0, now=0.0, **kw) -> tuple[HttpExchange, list]:
    ex = HttpExchange(method, body, now, **kw)
    return ex, list(ex.handle(Start(cluster, head_for), now))


CONNECT_A = Connect(A, 5.0, (head_for(A),))


# --------------------------------------------------------------------------
# The ordinary path


def test_a_request_goes_out_and_its_response_comes_back():
    c = single()
    ex = HttpExchange(b"GET", 0, 0.0)
    assert ex.state is State.ROUTING
    play(ex, [
        (Start(c, head_for), 0.0, [CONNECT_A]),
        (ATTACHED_REUSED, 0.5, [Wake(0.5 + 300)]),          # stream idle counts from the wire
        (REQUEST_END, 0.5, [Wake(0.5 + 15)]),                # the request timeout starts
        (DEADLINE, 1.0, [Wake(15.5)]),                       # nothing due yet: wake me later
        (ResponseStarted(200), 1.0, [FORWARD]),
        (RESPONSE_END, 1.2, []),
    ])
    assert ex.state is State.DONE and ex.status == 200 and ex.response_done
    assert ex.record() == Exchange(None, A, 1, "-", 0, 0)
    assert c.breaker.active[Limit.REQUESTS] == 1  # held until the shell reports
    ex.release()
    ex.release()  # idempotent
    assert c.breaker.active[Limit.REQUESTS] == 0


def test_states_follow_the_table():
    c = single()
    ex, cmds = start(c)
    assert ex.state is State.CONNECTING
    ex.handle(ATTACHED_NEW, 0.0)
    assert ex.state is State.WAITING and not ex.reused
    ex.handle(ResponseStarted(204), 0.0)
    assert ex.state is State.RESPONDING
    ex.handle(RESPONSE_END, 0.0)
    assert ex.state is State.DONE


def test_per_try_timeout_is_armed_once_the_request_is_complete():
    c = single(traffic(retries={"per_try_timeout": 2.0}, timeouts={"request": None, "stream_idle": None}))
    ex, cmds = start(c)
    assert cmds == [CONNECT_A]
    play(ex, [
        (ATTACHED_NEW, 0.0, []),
        (REQUEST_END, 1.0, [Wake(3.0)]),
    ])


def test_the_head_is_made_once_for_the_first_target_and_replayed_as_is():
    c = Cluster("ns/svc:80", [A, B], traffic(), rng=random.Random(3))
    ex, cmds = start(c)
    first = cmds[0].target
    assert cmds == [Connect(first, 5.0, (head_for(first),))]
    play(ex, [(REQUEST_END, 0.0, [Wake(15.0)])])
    out = list(ex.handle(ConnectFailed("refused"), 0.1))
    other = B if first == A else A
    assert out == [RESET_UPSTREAM, Connect(other, 5.0, (head_for(first),))]  # another endpoint
    assert ex.attempts == 2 and ex.target == other


# --------------------------------------------------------------------------
# Retries and the proxy's own answers


def test_connect_failures_are_retried_then_answered_503_uf_urx():
    ex, _ = start(single())
    play(ex, [
        (ConnectFailed("upstream 10.0.0.1:8080 unreachable: refused"), 0.1, [RESET_UPSTREAM, CONNECT_A]),
        (ConnectFailed("upstream 10.0.0.1:8080 unreachable: refused"), 0.2, [RESET_UPSTREAM, CONNECT_A]),
        (ConnectFailed("upstream 10.0.0.1:8080 unreachable: refused"), 0.3,
         [Fail(503, b"upstream 10.0.0.1:8080 unreachable: refused\n")]),
    ])
    assert ex.state is State.FAILED and ex.status == 503
    assert ex.record() == Exchange(None, A, 3, "UF,URX", 0, 0)


def test_a_post_is_not_retried_and_says_uf_only():
    ex, _ = start(single(), method=b"POST", body=3)
    assert ex.replay is None  # never kept: it could not be replayed
    play(ex, [(ConnectFailed("no"), 0.1, [Fail(503, b"no\n")])])
    assert ex.record().flags == "UF"


def test_retry_non_idempotent_replays_the_body_and_its_end():
    c = single(traffic(retries={"non_idempotent": True}))
    ex, cmds = start(c, method=b"POST", body=None, end=END)  # chunked: length unknown
    assert cmds == [CONNECT_A]
    play(ex, [
        (ATTACHED_NEW, 0.0, [Wake(300.0)]),
        (RequestBody(2, (b"2\r\n", b"ab", b"\r\n")), 0.1, []),
        (RequestBody(2, (b"2\r\n", b"cd", b"\r\n")), 0.1, []),
        (REQUEST_END, 0.2, [Wake(15.2)]),
        (UpstreamLost("reset by peer"), 0.3,
         [RESET_UPSTREAM, Connect(A, 5.0, (head_for(A), b"2\r\n", b"ab", b"\r\n",
                                          b"2\r\n", b"cd", b"\r\n", END))]),
    ])
    assert ex.req_bytes == 4 and ex.attempts == 2


def test_a_body_past_max_body_bytes_stops_being_kept_and_is_never_retried():
    c = single(traffic(retries={"max_body_bytes": 3}))
    ex, _ = start(c, method=b"PUT", body=None)
    play(ex, [
        (ATTACHED_NEW, 0.0, [Wake(300.0)]),
        (RequestBody(2, (b"ab",)), 0.0, []),
        (RequestBody(2, (b"cd",)), 0.0, []),
        (REQUEST_END, 0.0, [Wake(15.0)]),
        (UpstreamLost(None), 0.1, [Fail(503, b"upstream closed the connection before responding\n")]),
    ])
    assert ex.replay is None and ex.record().flags == "UC"


def test_a_listed_status_is_retried_and_its_response_discarded():
    ex, _ = start(single())
    play(ex, [
        (ATTACHED_REUSED, 0.0, [Wake(300.0)]),
        (REQUEST_END, 0.0, [Wake(15.0)]),
        (ResponseStarted(503), 0.1, [RESET_UPSTREAM, CONNECT_A]),
        (ATTACHED_NEW, 0.2, [Wake(300.2)]),
        (ResponseStarted(200), 0.3, [FORWARD]),
    ])
    assert ex.record().attempts == 2 and ex.record().flags == "-"


def test_the_last_listed_status_goes_to_the_client_with_urx():
    c = single(traffic(retries={"attempts": 1}))
    ex, _ = start(c)
    play(ex, [
        (ResponseStarted(503), 0.1, [RESET_UPSTREAM, CONNECT_A]),
        (ResponseStarted(503), 0.2, [FORWARD]),
    ])
    assert ex.status == 503 and ex.record().flags == "URX"


def test_a_stale_pooled_connection_is_retried_once_fresh_and_free():
    ex, _ = start(single())
    play(ex, [
        (ATTACHED_REUSED, 0.0, [Wake(300.0)]),
        (UpstreamLost(None, got_bytes=False), 0.1, [Connect(A, 5.0, (head_for(A),), fresh=True)]),
        (ATTACHED_NEW, 0.1, [Wake(300.1)]),
    ])
    assert ex.attempts == 1  # not an attempt
    play(ex, [(UpstreamLost("gone"), 0.2, [RESET_UPSTREAM, CONNECT_A])])  # now a real retry
    assert ex.attempts == 2


def test_a_connection_that_sent_bytes_is_not_stale():
    ex, _ = start(single(traffic(retries={"attempts": 0})))
    play(ex, [
        (ATTACHED_REUSED, 0.0, [Wake(300.0)]),
        (UpstreamLost("x", got_bytes=True), 0.1,
         [Fail(503, b"upstream closed the connection before responding: x\n")]),
    ])


def test_losing_the_upstream_mid_response_resets_the_client():
    ex, _ = start(single())
    play(ex, [
        (ATTACHED_NEW, 0.0, [Wake(300.0)]),
        (ResponseStarted(200), 0.1, [FORWARD]),
        (UpstreamLost(None), 0.2, [RESET_CLIENT]),
    ])
    assert ex.state is State.FAILED and ex.status == 200 and ex.record().flags == "UC"


@pytest.mark.parametrize("responding, expected", [
    (False, [Fail(502, b"bad response from the upstream: junk\n")]),
    (True, [RESET_CLIENT]),
])
def test_a_bad_response(responding, expected):
    ex, _ = start(single(traffic(retries={"attempts": 0})))
    ex.handle(ATTACHED_NEW, 0.0)
    if responding:
        ex.handle(ResponseStarted(200), 0.0)
    play(ex, [(BadResponse(502, "junk"), 0.1, expected)])
    assert ex.record().flags == "UC"


def test_101_only_when_asked():
    ex, _ = start(single(), upgrade=True)
    play(ex, [(ATTACHED_NEW, 0.0, [Wake(300.0)]), (ResponseStarted(101), 0.1, [SWITCH_PROTOCOLS])])
    assert ex.state is State.UPGRADED and ex.status == 101
    ex, _ = start(single())
    play(ex, [(ResponseStarted(101), 0.1, [Fail(502, b"upstream switched protocols without being asked\n")])])


# --------------------------------------------------------------------------
# Deadlines


def test_request_timeout_answers_504_ut_and_is_not_retried():
    c = single(traffic(timeouts={"request": 1.0, "stream_idle": None}))
    ex, _ = start(c)
    play(ex, [
        (ATTACHED_NEW, 0.0, []),
        (REQUEST_END, 0.0, [Wake(1.0)]),
        (DEADLINE, 0.99, [Wake(1.0)]),
        (DEADLINE, 1.0, [Fail(504, b"upstream did not respond in time (request timeout)\n")]),
    ])
    assert ex.record().flags == "UT"


def test_per_try_timeout_is_retried_when_retry_on_says_timeout():
    c = single(traffic(retries={"per_try_timeout": 1.0, "on": frozenset({"timeout"})},
                       timeouts={"request": 10.0, "stream_idle": None}))
    ex, _ = start(c)
    play(ex, [
        (ATTACHED_NEW, 0.0, []),
        (REQUEST_END, 0.0, [Wake(10.0), Wake(1.0)]),
        (DEADLINE, 1.0, [RESET_UPSTREAM, Wake(2.0), CONNECT_A]),
        (ATTACHED_NEW, 1.0, []),
        (DEADLINE, 2.0, [RESET_UPSTREAM, Wake(3.0), CONNECT_A]),
        (DEADLINE, 3.0, [Fail(504, b"upstream did not respond in time\n")]),
    ])
    assert ex.record() == Exchange(None, A, 3, "UT,URX", 0, 0)


def test_stream_idle_resets_a_started_response():
    c = single(traffic(timeouts={"request": None, "stream_idle": 2.0}))
    ex, _ = start(c)
    play(ex, [
        (ATTACHED_NEW, 0.0, [Wake(2.0)]),
        (ResponseStarted(200), 0.5, [FORWARD]),
    ])
    ex.last_io = 1.5  # the shell saw a byte
    play(ex, [(DEADLINE, 2.0, [Wake(3.5)]), (DEADLINE, 3.5, [RESET_CLIENT])])
    assert ex.record().flags == "UT"


def test_no_deadline_once_answered_or_done():
    ex, _ = start(single())
    ex.handle(ResponseStarted(200), 0.0)
    ex.handle(RESPONSE_END, 0.0)
    play(ex, [(DEADLINE, 1e9, [])])


# --------------------------------------------------------------------------
# Breaker, no endpoint, client errors, the client going away


def test_max_requests_answers_503_uo_and_keeps_the_client():
    c = single(traffic(breaker=CircuitBreaker(max_requests=1)))
    first, _ = start(c)
    second, cmds = start(c)
    assert cmds == [Respond(503, b"overloaded: max-requests (1) reached\n",
                            [(b"x-meshlet-overloaded", b"max-requests")])]
    assert second.state is State.ANSWERED and second.discarding and second.record().flags == "UO"
    first.release()
    third, cmds = start(c)
    assert cmds == [CONNECT_A]


def test_no_connection_slot_first_try_is_a_respond_a_retry_is_a_fail():
    over = Overloaded(Limit.CONNECTIONS, 1)
    body = b"overloaded: max-connections (1) reached\n"
    hdr = [(b"x-meshlet-overloaded", b"max-connections")]
    ex, _ = start(single())
    play(ex, [(Refused(over), 0.0, [Respond(503, body, hdr)])])
    ex, _ = start(single())
    play(ex, [
        (ConnectFailed("no"), 0.0, [RESET_UPSTREAM, CONNECT_A]),
        (Refused(over), 0.0, [Fail(503, body, hdr)]),
    ])
    assert ex.record().flags == "UO"


def test_no_endpoint_is_503_nr():
    ex, cmds = start(Cluster("ns/empty:80", [], traffic()))
    assert cmds == [Respond(503, b"no healthy upstream\n")]
    assert ex.record() == Exchange("ns/empty:80", None, 0, "NR", 0, 0)


def test_a_malformed_request_body():
    ex, _ = start(single())
    play(ex, [(BadRequest(400, "bad chunk"), 0.0, [Fail(400, b"bad chunk\n")])])
    assert ex.record().flags == "DPE"
    ex, _ = start(Cluster("ns/empty:80", [], traffic()))  # answered by the proxy already
    play(ex, [(BadRequest(400, "bad chunk"), 0.0, [RESET_CLIENT])])
    assert ex.record().flags == "DPE,NR"


def test_a_hook_answer_discards_the_body():
    ex = HttpExchange(b"POST", 5, 0.0)
    ex.answer(403)
    play(ex, [(RequestBody(5, (b"hello",)), 0.0, []), (REQUEST_END, 0.0, [])])
    assert ex.req_bytes == 0 and ex.response_done and ex.record() == Exchange(None, None, 0, "-", 0, 0)


def test_the_client_going_away_gives_every_count_back():
    c = Cluster("ns/svc:80", [A, B], traffic(), rng=random.Random(1))
    ex, cmds = start(c)
    assert c.breaker.active[Limit.REQUESTS] == 1 and sum(c.lb.outstanding(t) for t in (A, B)) == 1
    play(ex, [(CLIENT_LOST, 0.1, [])])
    assert c.breaker.active[Limit.REQUESTS] == 0 and sum(c.lb.outstanding(t) for t in (A, B)) == 0
    assert ex.state is State.FAILED


def test_shared_event_instances():
    assert response_started(200) is response_started(200) == ResponseStarted(200)


# --------------------------------------------------------------------------
# Feedback to the cluster


def test_5xx_responses_eject_an_endpoint():
    od = OutlierDetection(consecutive_5xx=2, max_ejection_percent=50)
    c = Cluster("ns/svc:80", [A, B], traffic(retries={"attempts": 0}, outlier=od), rng=random.Random(7))
    now = 0.0
    bad = None
    for _ in range(20):
        ex, cmds = start(c, now=now)
        t = cmds[0].target
        ex.handle(ATTACHED_NEW, now)
        bad = bad or t
        ex.handle(ResponseStarted(500 if t == bad else 200), now)
        ex.release()
        now += 0.01
        if bad not in c.healthy(now):
            break
    assert c.healthy(now) == [B if bad == A else A]


def test_connected_resets_connect_failures():
    od = OutlierDetection(consecutive_connect_failures=2, max_ejection_percent=50)
    c = Cluster("ns/svc:80", [A, B], traffic(retries={"attempts": 0}, outlier=od), rng=random.Random(2))
    for target_fails in (True, False, True):
        ex, cmds = start(c)
        t = cmds[0].target
        if target_fails:
            ex.handle(ConnectFailed("no"), 0.0)
        else:
            ex.handle(Connected(t), 0.0)
        ex.release()
    # never two failures in a row for the same endpoint without a connect between: nobody ejected
    assert sorted(c.healthy(0.0)) == [A, B]


# --------------------------------------------------------------------------
# Properties and layering

EVENTS = st.sampled_from([
    ATTACHED_NEW, ATTACHED_REUSED, REQUEST_END, RESPONSE_END, DEADLINE, ResponseStarted(200),
    ResponseStarted(503), ResponseStarted(101), UpstreamLost(None), UpstreamLost("x", True),
    ConnectFailed("no"), BadResponse(502, "junk"), BadRequest(400, "bad"), RequestBody(1, (b"x",)),
    Refused(Overloaded(Limit.CONNECTIONS, 1)),
])


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENTS, max_size=12), st.booleans(), st.sampled_from([b"GET", b"POST"]))
def test_any_event_order_leaves_no_count_behind(events, multi, method):
    targets = [A, B] if multi else [A]
    c = Cluster("ns/svc:80", targets, traffic(retries={"per_try_timeout": 0.5}), rng=random.Random(0))
    ex, _ = start(c, method=method, body=None)
    now = 0.0
    for ev in events:
        now += 0.3
        for cmd in ex.handle(ev, now):
            assert isinstance(cmd, exmod.Command.__args__)  # type: ignore[attr-defined]
        if ex.state is State.FAILED:
            break
    ex.handle(CLIENT_LOST, now + 1)
    assert c.breaker.active[Limit.REQUESTS] == 0
    assert sum(c.lb.outstanding(t) for t in targets) == 0
    assert ex.attempts <= 1 + c.settings.retries.attempts


def test_the_exchange_does_no_io():
    path = pathlib.Path(exmod.__file__)
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
    assert not mods & {"asyncio", "socket", "ssl", "time", "selectors", "uvloop"}
    assert {m for m in mods if m.startswith("agent.")} <= {
        "agent.traffic.breaker", "agent.traffic.upstream_cluster", "agent.traffic.outcome",
        "agent.traffic.settings", "agent.traffic.retry", "agent.traffic.lb",
        "agent.proxy.tracing"}


# --------------------------------------------------------------------------
# gRPC (the HTTP/2 shell): a trailers-only answer's grpc-status


def test_grpc_status_listed_in_retry_on_is_retried_even_for_post():
    c = Cluster("ns/g:1", [A, B], traffic(retries={"grpc_statuses": frozenset({14})}), 0.0)
    ex, cmds = start(c, method=b"POST", body=None)
    first = cmds[0].target
    ex.request_body(5, [b"hello"])
    ex.handle(ATTACHED_NEW, 0.0)
    ex.request_end(0.0)
    cmds = list(ex.grpc_response(14, 0.1))
    assert cmds[0] == RESET_UPSTREAM and isinstance(cmds[-1], Connect)
    assert cmds[-1].target != first and cmds[-1].data[1:] == (b"hello",)  # the body replayed
    ex.handle(ATTACHED_NEW, 0.1)
    assert list(ex.grpc_response(0, 0.2)) == [FORWARD]
    assert ex.status == 200 and ex.attempts == 2


def test_grpc_status_not_listed_is_forwarded_and_a_post_is_not_retried_on_http_statuses():
    c = Cluster("ns/g:1", [A, B], traffic(retries={"grpc_statuses": frozenset({14})}), 0.0)
    ex, _ = start(c, method=b"POST", body=None)
    ex.handle(ATTACHED_NEW, 0.0)
    ex.request_end(0.0)
    assert list(ex.grpc_response(13, 0.1)) == [FORWARD]  # INTERNAL: not in retryOn
    ex2, _ = start(c, method=b"POST", body=None)
    ex2.handle(ATTACHED_NEW, 0.0)
    ex2.request_end(0.0)
    assert list(ex2.handle(ResponseStarted(503), 0.1)) == [FORWARD]  # a plain POST 503: not idempotent
