"""The destination side's admission decisions (agent/proxy/admission.py),
as tables, without sockets: what a decoded tunnel request may reach, and
the policy decision on a new connection.  The refusal strings are the ones
the tunnel response, the metrics (deny_reason) and the access log carry."""

from __future__ import annotations

import ast
import pathlib
import socket

import pytest

from agent.policy.evaluate import Decision
from agent.policy.load import parse_policies
from agent.proxy import admission
from agent.proxy.admission import Refusal, admit_tunnel, authorize_connection, decided_by
from agent.proxy.authz import empty_set
from agent.proxy.state import parse_state
from agent.proxy.tunnel import Address, Status, TunnelRequest
from tests.support.mesh import CLIENT_IP
from tests.unit.test_proxy_server import state_doc

TD = "cluster.local"
CLIENT = f"spiffe://{TD}/ns/default/sa/client"  # pod default/client, node1
WEB = f"spiffe://{TD}/ns/default/sa/web"  # pod default/web-1 (127.0.0.5), node1
DB = f"spiffe://{TD}/ns/data/sa/db"  # pod data/db-1 (127.0.0.7), node2
MALLORY = f"spiffe://{TD}/ns/evil/sa/mallory"


def state():
    doc = state_doc("node1", "127.0.0.1", 15001, 15008)
    doc["pods"][1]["labels"] = {"app": "web"}
    doc["pods"].append({"name": "legacy", "namespace": "default", "service_account": "legacy", "node": "node1",
                        "ips": ["127.0.0.9"], "cgroup_id": 1009, "mesh": False})
    return parse_state(doc)


STATE = state()


def req(dst: str, identity: str = CLIENT, port: int = 8080) -> TunnelRequest:
    return TunnelRequest(dst=Address(socket.AF_INET, dst, port), identity=identity, namespace="default",
                         name="client", src=Address(socket.AF_INET, CLIENT_IP, 40000))  # pod default/client


# (case, dst, header identity, verified cert, mtls, sni_named, local identity) -> admitted pod key or
# (code, status, reason, pod named on the record)
ADMIT = [
    ("mtls: all agree", "127.0.0.5", CLIENT, CLIENT, True, True, WEB, "default/web-1"),
    ("plaintext: the header is taken on trust", "127.0.0.5", MALLORY, None, False, False, None, "default/web-1"),
    ("header claims another identity than the certificate", "127.0.0.5", MALLORY, CLIENT, True, True, WEB,
     ("identity_mismatch", Status.FORBIDDEN,
      f"the tunnel header claims identity {MALLORY!r}, but the client certificate is {CLIENT}", None)),
    ("no verified identity at all", "127.0.0.5", CLIENT, None, True, True, WEB,
     ("key_scope", Status.FORBIDDEN, "key scope: the client certificate proved no identity", None)),
    ("identity is checked before the destination", "10.9.9.9", MALLORY, CLIENT, True, True, WEB,
     ("identity_mismatch", Status.FORBIDDEN,
      f"the tunnel header claims identity {MALLORY!r}, but the client certificate is {CLIENT}", None)),
    ("unknown destination", "10.9.9.9", CLIENT, CLIENT, True, True, WEB,
     ("not_local", Status.NOT_LOCAL, "10.9.9.9 is not a mesh pod on node node1", None)),
    ("unknown destination, plaintext", "10.9.9.9", CLIENT, None, False, False, None,
     ("not_local", Status.NOT_LOCAL, "10.9.9.9 is not a mesh pod on node node1", None)),
    ("a pod outside the mesh: never an open relay", "127.0.0.9", CLIENT, CLIENT, True, True, WEB,
     ("not_local", Status.NOT_LOCAL, "127.0.0.9 is not a mesh pod on node node1", None)),
    ("a mesh pod of another node", "127.0.0.7", CLIENT, CLIENT, True, True, DB,
     ("not_local", Status.NOT_LOCAL,
      "127.0.0.7 is pod data/db-1 on node node2, not on node node1 (the sending node's state may be stale)",
      None)),
    ("no SNI", "127.0.0.5", CLIENT, CLIENT, True, False, None,
     ("identity_mismatch", Status.FORBIDDEN,
      f"the client authenticated this node as nobody (no SNI), but asks for pod default/web-1, which is {WEB}",
      "default/web-1")),
    ("SNI named another pod of this node", "127.0.0.5", CLIENT, CLIENT, True, True, CLIENT,
     ("identity_mismatch", Status.FORBIDDEN,
      f"the client authenticated this node as {CLIENT}, but asks for pod default/web-1, which is {WEB}",
      "default/web-1")),
    ("SNI sent but no identity chosen", "127.0.0.5", CLIENT, CLIENT, True, True, None,
     ("identity_mismatch", Status.FORBIDDEN,
      f"the client authenticated this node as nobody (no SNI), but asks for pod default/web-1, which is {WEB}",
      "default/web-1")),
    ("plaintext ignores SNI", "127.0.0.5", CLIENT, None, False, False, None, "default/web-1"),
]


@pytest.mark.parametrize("case,dst,claimed,verified,mtls,sni_named,local_id,want", ADMIT,
                         ids=[row[0] for row in ADMIT])
def test_admit_tunnel(case, dst, claimed, verified, mtls, sni_named, local_id, want):
    # the client pod is on node1: the tunnel comes from node1 with node1's certificate
    got = admit_tunnel(STATE, req(dst, claimed), dst, verified=verified, mtls=mtls, sni_named=sni_named,
                       local_identity=local_id, peer_node="node1", issuer_node="node1")
    if isinstance(want, str):
        assert got is STATE.pod_by_key[want]  # the pod itself: nothing new allocated
        return
    code, status, reason, named = want
    assert isinstance(got, Refusal)
    assert (got.code, got.status, got.reason) == (code, status, reason)
    assert (got.pod.key if got.pod is not None else None) == named
    assert got.decision is None


# Key scope, checked first with mTLS: (case, verified, peer node, issuing node[, header source]) -> None
# (passes) or the reason's tail.  The source defaults to db-1's address (node2).
KEY_SCOPE = [
    ("a node for its own pod", DB, "node2", "node2", None),
    ("a node for its own pod, from another pod's address", DB, "node2", "node2",
     f"the tunnel header's source address {CLIENT_IP} is no address of a mesh pod of node node2 "
     f"with identity {DB}", CLIENT_IP),
    ("no source address", DB, "node2", "node2",
     f"the tunnel header's source address (none) is no address of a mesh pod of node node2 with identity {DB}",
     None),
    ("a source address of no pod", DB, "node2", "node2",
     f"the tunnel header's source address 10.1.2.3 is no address of a mesh pod of node node2 with identity {DB}",
     "10.1.2.3"),
    ("a node's key for another node's identity", DB, "node1", "node1",
     f"node node1 has no mesh pod with identity {DB}, so it may not speak for it (a compromised node, or this node's state is stale)"),
    ("another node's certificate", DB, "node1", "node2",
     f"the client certificate ({DB}) was issued by node node2's intermediate CA, but the connection comes "
     "from node node1: a node's key may only sign for that node"),
    ("a CA that names no node", DB, "node2", None,
     f"the client certificate ({DB}) was issued by a CA that is no node's intermediate, but the connection "
     "comes from node node2: a node's key may only sign for that node"),
    ("from no node address", DB, None, "node2", "the connection comes from no node address of the state"),
    ("an identity of no pod at all", MALLORY, "node2", "node2",
     f"node node2 has no mesh pod with identity {MALLORY}, so it may not speak for it (a compromised node, or this node's state is stale)"),
    ("a pod outside the mesh does not count", f"spiffe://{TD}/ns/default/sa/legacy", "node1", "node1",
     f"node node1 has no mesh pod with identity spiffe://{TD}/ns/default/sa/legacy, "
     "so it may not speak for it (a compromised node, or this node's state is stale)"),
]


@pytest.mark.parametrize("row", KEY_SCOPE, ids=[k[0] for k in KEY_SCOPE])
def test_key_scope(row):
    _case, verified, peer, issuer, why = row[:5]
    src = row[5] if len(row) > 5 else "127.0.0.7"
    got = admission.check_key_scope(STATE, verified, peer_node=peer, issuer_node=issuer, src_ip=src)
    if why is None:
        assert got is None
        return
    assert isinstance(got, Refusal)
    assert (got.code, got.status, got.reason) == ("key_scope", Status.FORBIDDEN, f"key scope: {why}")


def test_key_scope_comes_first_and_plaintext_skips_it():
    # a certificate from the wrong node is refused before the header's identity or the destination
    got = admit_tunnel(STATE, req("10.9.9.9", MALLORY), "10.9.9.9", verified=DB, mtls=True, sni_named=True,
                       local_identity=WEB, peer_node="node1", issuer_node="node1")
    assert isinstance(got, Refusal) and got.code == "key_scope"
    got = admit_tunnel(STATE, req("127.0.0.5", MALLORY), "127.0.0.5", verified=None, mtls=False)
    assert got is STATE.pod_by_key["default/web-1"]


def test_node_at():
    assert admission.node_at(STATE, "127.0.0.1") == "node1"
    assert admission.node_at(STATE, "127.0.0.2") == "node2"
    assert admission.node_at(STATE, "127.0.0.5") is None  # a pod, not a node


def policies(*docs: str):
    return parse_policies("---\n".join(docs), "t.yaml")


def policy(name: str, action: str, rules: str) -> str:
    return (f"apiVersion: meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: default}}\n"
            f"spec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: {action}\n  rules: {rules}\n")


ALLOW_CLIENT = policy("allow-client", "ALLOW",
                      '[{from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]}]')
DENY_MALLORY = policy("deny-mallory", "DENY", '[{from: [{source: {namespaces: ["evil"]}}]}]')
DENY_9000 = policy("deny-9000", "DENY", "[{to: [{operation: {ports: [9000]}}]}]")
DENY_ADMIN = policy("deny-admin", "DENY", '[{to: [{operation: {paths: ["/admin"]}}]}]')

# (case, policies, identity, source ip, port, http) -> (allowed, deciding policy, rule) or a refusal
# (policy, rule) — a refusal's reason is always "policy: " + the decision's reason.
AUTHZ = [
    ("no policy: allowed", (), CLIENT, "127.0.0.3", 8080, False, (True, None, None)),
    ("ALLOW matches", (ALLOW_CLIENT,), CLIENT, "127.0.0.3", 8080, False, (True, "default/allow-client", 0)),
    ("ALLOW exists, no match", (ALLOW_CLIENT,), MALLORY, "127.0.0.3", 8080, False, ("refused", None, None)),
    ("no identity under an ALLOW", (ALLOW_CLIENT,), None, "127.0.0.3", 8080, False, ("refused", None, None)),
    ("DENY matches", (DENY_MALLORY,), MALLORY, "127.0.0.3", 8080, False, ("refused", "default/deny-mallory", 0)),
    ("DENY wins over ALLOW", (ALLOW_CLIENT, DENY_9000), CLIENT, None, 9000, False,
     ("refused", "default/deny-9000", 0)),
    ("DENY on another port", (DENY_9000,), CLIENT, "127.0.0.3", 8080, False, (True, None, None)),
    ("HTTP: a TCP deny is decided per request", (DENY_ADMIN,), CLIENT, "127.0.0.3", 8080, True,
     (False, "default/deny-admin", 0)),
    ("HTTP: an ALLOW miss too", (ALLOW_CLIENT,), MALLORY, "127.0.0.3", 8080, True, (False, None, None)),
    ("HTTP fields deny TCP whole", (DENY_ADMIN,), CLIENT, "127.0.0.3", 8080, False,
     ("refused", "default/deny-admin", 0)),
]


@pytest.mark.parametrize("case,docs,identity,src_ip,port,http,want", AUTHZ, ids=[row[0] for row in AUTHZ])
def test_authorize_connection(case, docs, identity, src_ip, port, http, want):
    ps = policies(*docs) if docs else empty_set()
    pod = STATE.pod_by_key["default/web-1"]
    got = authorize_connection(ps, identity, src_ip, pod, port, http=http)
    allowed, pol, rule = want
    if allowed == "refused":
        assert isinstance(got, Refusal)
        assert (got.code, got.status) == ("policy", Status.FORBIDDEN)
        d = got.decision
        assert d is not None and not d.allowed
        assert got.reason == f"policy: {d.reason}"
        assert got.pod is None
    else:
        assert isinstance(got, Decision)
        d = got
        assert d.allowed is allowed
    assert (d.policy, d.rule) == (pol, rule)


def test_memoized_decisions_equal_the_direct_ones():
    """Every row of AUTHZ, asked twice through one memo: the same answers as
    authorize_connection, the second time from the memo."""
    memo = admission.ConnectionDecisions()
    pod = STATE.pod_by_key["default/web-1"]
    for _case, docs, identity, src_ip, port, http, _want in AUTHZ:
        ps = policies(*docs) if docs else empty_set()
        want = authorize_connection(ps, identity, src_ip, pod, port, http=http)
        first = memo.decide(ps, identity, src_ip, pod, port, http=http)
        again = memo.decide(ps, identity, src_ip, pod, port, http=http)
        assert first == want and again is first
    assert memo.hits == memo.misses == len(AUTHZ)


def test_memoized_decisions_miss_after_a_policy_reload():
    """A reload (a new policy set) must be decided again: allowed under the
    first set, refused under the second, for the same connection tuple."""
    memo = admission.ConnectionDecisions()
    pod = STATE.pod_by_key["default/web-1"]
    allow = policies(ALLOW_CLIENT)
    deny = policies(ALLOW_CLIENT, DENY_9000)
    assert memo.decide(allow, CLIENT, "127.0.0.3", pod, 9000).allowed
    got = memo.decide(deny, CLIENT, "127.0.0.3", pod, 9000)
    assert isinstance(got, Refusal) and got.decision.policy == "default/deny-9000"
    assert memo.decide(allow, CLIENT, "127.0.0.3", pod, 9000).allowed  # and back


def test_memoized_decisions_key_the_source_the_port_and_the_pod():
    memo = admission.ConnectionDecisions()
    pod = STATE.pod_by_key["default/web-1"]
    ps = policies(ALLOW_CLIENT, DENY_9000)
    assert memo.decide(ps, CLIENT, "127.0.0.3", pod, 8080).allowed
    assert isinstance(memo.decide(ps, MALLORY, "127.0.0.3", pod, 8080), Refusal)  # identity
    assert isinstance(memo.decide(ps, CLIENT, "127.0.0.3", pod, 9000), Refusal)  # port
    assert memo.decide(ps, CLIENT, "127.0.0.3", pod, 9000, http=True).allowed is False  # http: a decision
    # a relabelled pod (a new state snapshot) is decided again: no longer selected by the policy
    relabelled = parse_state({**state_doc("node1", "127.0.0.1", 15001, 15008)}).pod_by_key["default/web-1"]
    assert relabelled is not pod and "app" not in relabelled.label_map
    assert memo.decide(ps, MALLORY, "127.0.0.3", relabelled, 8080).allowed  # no policy selects it


@pytest.mark.parametrize("policy_name,rule,want", [
    (None, None, "no ALLOW policy match"),
    ("shop/deny-admin", 2, "policy shop/deny-admin rule 2"),
])
def test_decided_by(policy_name, rule, want):
    class D:
        policy = policy_name

    D.rule = rule
    assert decided_by(D) == want


def test_admission_is_pure():
    """No event loop, sockets or TLS in the admission module itself."""
    tree = ast.parse(pathlib.Path(admission.__file__).read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    assert not mods & {"asyncio", "socket", "ssl", "uvloop", "selectors"}, mods
