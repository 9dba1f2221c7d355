"""Policies as custom resources (agent/policycrs.py): API objects load with
the same loaders as files, a refused object never weakens what is enforced,
and the status condition says what happened."""

from __future__ import annotations

import copy
import pathlib

import pytest
import yaml

from agent.identity.spiffe import parse_spiffe_id
from agent.policy.evaluate import Request, evaluate
from agent.policycrs import PolicyObjects, accepted_condition, document_from_object, object_key
from agent.traffic.trafficpolicy import load_all
from tests.support.kubeschema import load_docs

ROOT = pathlib.Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"


def as_api_object(doc: dict, generation: int = 1, uid: str = "0f6c-1") -> dict:
    """What the API server hands back: the document plus server-set fields."""
    obj = copy.deepcopy(doc)
    meta = obj["metadata"]
    meta.update(
        uid=uid, resourceVersion="4242", generation=generation,
        creationTimestamp="2026-12-06T16:00:00Z",
        managedFields=[{"manager": "kubectl", "operation": "Apply", "apiVersion": obj["apiVersion"]}],
    )
    meta.setdefault("annotations", {})["kubectl.kubernetes.io/last-applied-configuration"] = "{}"
    obj["status"] = {"conditions": [{"type": "Accepted", "status": "True"}]}
    return obj


DENY_ADMIN = {
    "apiVersion": "meshlet.io/v1alpha1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-admin", "namespace": "shop"},
    "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [8080]}}]}]},
}


def denied(objs: PolicyObjects) -> bool:
    ps, _ = objs.sets()
    req = Request(
        destination_namespace="shop", destination_labels={}, destination_port=8080,
        source_principal=parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/storefront"),
    )
    return not evaluate(ps, req).allowed


def test_server_metadata_is_dropped_and_the_rest_kept():
    obj = as_api_object(DENY_ADMIN)
    obj["metadata"]["labels"] = {"team": "shop"}
    doc = document_from_object(obj)
    assert doc == {**DENY_ADMIN, "metadata": {**DENY_ADMIN["metadata"], "labels": {"team": "shop"}}}


def test_an_accepted_object_is_enforced_and_deleting_it_lifts_it():
    objs = PolicyObjects()
    v = objs.upsert(as_api_object(DENY_ADMIN))
    assert v.accepted and v.in_force == 1 and v.message_lines() == []
    assert denied(objs)
    objs.delete(as_api_object(DENY_ADMIN))
    assert not denied(objs)


def test_a_broken_update_keeps_the_previous_generation_in_force():
    objs = PolicyObjects()
    objs.upsert(as_api_object(DENY_ADMIN, generation=1))
    broken = copy.deepcopy(DENY_ADMIN)
    broken["spec"]["rules"][0]["from"] = [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]
    v = objs.upsert(as_api_object(broken, generation=2))
    assert not v.accepted and v.in_force == 1
    assert any("remoteIpBlocks" in p for p in v.problems)
    assert v.message_lines()[-1] == "generation 1 stays in force"
    assert denied(objs)  # the DENY did not go away with the broken edit


def test_a_refused_new_object_enforces_nothing_of_itself():
    objs = PolicyObjects()
    allow_custom = {**DENY_ADMIN, "spec": {"action": "CUSTOM", "provider": {"name": "ext"}}}
    v = objs.upsert(as_api_object(allow_custom))
    assert not v.accepted and v.in_force is None
    assert v.message_lines()[-1] == "nothing of this resource is enforced"
    ps, _ = objs.sets()
    assert ps.policies == ()


def test_a_second_traffic_policy_for_the_same_service_is_refused_and_the_first_stays():
    tp = {
        "apiVersion": "meshlet.io/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "a", "namespace": "shop"}, "spec": {"service": "backend"},
    }
    objs = PolicyObjects()
    assert objs.upsert(as_api_object(tp)).accepted
    other = {**tp, "metadata": {"name": "b", "namespace": "shop"}}
    v = objs.upsert(as_api_object(other))
    assert not v.accepted and any("already has a traffic policy" in p for p in v.problems)
    _, ts = objs.sets()
    assert [p.name for p in ts.policies] == ["a"]


def test_the_examples_as_objects_mean_what_the_files_mean():
    objs = PolicyObjects()
    for f in sorted(POLICIES.rglob("*.yaml")):
        if "unsupported" in f.parts or "istio-docs" in f.parts or "routes" in f.parts:
            continue
        for i, doc in enumerate(load_docs(f)):
            v = objs.upsert(as_api_object(doc, uid=f"{f.name}-{i}"))
            assert v.accepted, (f, v.problems)
    files_ps, files_ts = load_all([POLICIES, POLICIES / "traffic", POLICIES / "gateway"])
    ps, ts = objs.sets()
    assert ps.policies and ps.version == files_ps.version
    assert ts.policies and ts.version == files_ts.version


UNSUPPORTED = sorted((POLICIES / "istio-docs" / "unsupported").glob("*.yaml"))


@pytest.mark.parametrize("f", UNSUPPORTED, ids=lambda p: p.name)
def test_what_files_refuse_objects_refuse(f):
    objs = PolicyObjects()
    verdicts = [objs.upsert(as_api_object(d)) for d in load_docs(f)]
    assert not all(v.accepted for v in verdicts)


def test_the_condition_moves_its_transition_time_only_on_a_flip():
    t1, t2 = "2026-12-06T16:00:00Z", "2026-12-06T16:05:00Z"
    ok = accepted_condition(3, [], t1)
    assert ok == {
        "type": "Accepted", "status": "True", "reason": "Loaded", "message": "enforced on every node",
        "lastTransitionTime": t1, "observedGeneration": 3,
    }
    assert accepted_condition(4, [], t2, ok)["lastTransitionTime"] == t1
    bad = accepted_condition(5, ["spec.action: CUSTOM is not supported"], t2, ok)
    assert (bad["status"], bad["reason"], bad["lastTransitionTime"]) == ("False", "Invalid", t2)
    assert bad["message"] == "spec.action: CUSTOM is not supported"


def test_the_condition_validates_against_the_crd_status_schema():
    import jsonschema

    from tests.support.kubeschema import crds, to_json_schema

    schema = crds()[("meshlet.io", "v1alpha1", "AuthorizationPolicy")]["properties"]["status"]
    cond = accepted_condition(2, ["x: y"], "2026-12-06T16:00:00Z")
    status = {"observedGeneration": 2, "conditions": [cond]}
    jsonschema.validate(status, to_json_schema(schema))
    yaml.safe_dump(status)


ISTIO_DOCS = sorted((POLICIES / "istio-docs").glob("*.yaml"))


@pytest.mark.parametrize("f", ISTIO_DOCS, ids=lambda p: p.name)
def test_istio_objects_load_as_their_files_do(f):
    """security.istio.io/v1 objects (where Istio's CRD is installed) are read
    by the same loader as Istio's documents in files."""
    from agent.policy.load import load_policies

    objs = PolicyObjects()
    for i, doc in enumerate(load_docs(f)):
        assert objs.upsert(as_api_object(doc, uid=f"{f.name}-{i}")).accepted
    assert objs.sets()[0].version == load_policies(f).version


# --- sync: a whole burst at once, and the cluster's memory in status.lastAccepted -------


def _doc(obj: dict, generation: int, last: tuple[int, dict] | None = None):
    from agent.policycrs import PolicyDoc

    o = as_api_object(obj, generation=generation)
    if last is not None:
        o["status"]["lastAccepted"] = {"generation": last[0], "spec": last[1]["spec"]}
    return PolicyDoc.from_object(o)


def _broken(obj: dict) -> dict:
    b = copy.deepcopy(obj)
    b["spec"]["rules"][0]["from"] = [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]
    return b


def test_sync_reads_a_burst_as_upserts_in_key_order_would():
    tp = {"apiVersion": "meshlet.io/v1alpha1", "kind": "TrafficPolicy",
          "metadata": {"name": "a", "namespace": "shop"}, "spec": {"service": "backend"}}
    objs = [DENY_ADMIN, {**tp}, {**tp, "metadata": {"name": "b", "namespace": "shop"}},
            {**DENY_ADMIN, "metadata": {"name": "custom", "namespace": "shop"},
             "spec": {"action": "CUSTOM", "provider": {"name": "x"}}}]
    one = PolicyObjects()
    verdicts = one.sync(_doc(o, 1) for o in objs)
    each = PolicyObjects()
    by_upsert = {v.key: v for v in (each.upsert(as_api_object(o)) for o in
                                    sorted(objs, key=lambda o: object_key(o)))}
    assert {k: v.accepted for k, v in verdicts.items()} == {k: v.accepted for k, v in by_upsert.items()}
    # custom (refused), deny-admin, TrafficPolicy a, b (a second one for the same service: refused)
    assert [v.accepted for _, v in sorted(verdicts.items())] == [False, True, True, False]
    assert one.sets()[0].version == each.sets()[0].version and one.texts() == sorted(one.texts())


def test_sync_keeps_the_accepted_generation_and_forgets_deleted_objects():
    objs = PolicyObjects()
    assert objs.sync([_doc(DENY_ADMIN, 1)])[object_key(DENY_ADMIN)].accepted
    v = objs.sync([_doc(_broken(DENY_ADMIN), 2)])[object_key(DENY_ADMIN)]
    assert not v.accepted and v.in_force == 1 and denied(objs)
    assert objs.sync([]) == {} and not denied(objs)


def test_a_fresh_node_enforces_the_last_accepted_generation_from_the_status():
    fresh = PolicyObjects()
    v = fresh.sync([_doc(_broken(DENY_ADMIN), 2, last=(1, DENY_ADMIN))])[object_key(DENY_ADMIN)]
    assert not v.accepted and v.in_force == 1
    assert v.message_lines()[-1] == "generation 1 stays in force"
    assert denied(fresh)
    # without that memory: nothing of it
    bare = PolicyObjects()
    assert bare.sync([_doc(_broken(DENY_ADMIN), 2)])[object_key(DENY_ADMIN)].in_force is None
    assert not denied(bare)


def test_desired_status_is_none_when_the_status_already_says_it():
    from agent.policycrs import Verdict, desired_status

    now, later = "2026-12-06T16:00:00Z", "2026-12-06T17:00:00Z"
    ok = Verdict("k", 2, True, (), 2)
    patch = desired_status(ok, {}, DENY_ADMIN["spec"], now)
    assert patch == {"status": {
        "conditions": [accepted_condition(2, [], now)], "observedGeneration": 2,
        "lastAccepted": {"generation": 2, "spec": DENY_ADMIN["spec"]}}}
    assert desired_status(ok, patch["status"], DENY_ADMIN["spec"], later) is None  # time aside: equal
    refused = Verdict("k", 3, False, ("spec.x: bad",), 2)
    again = desired_status(refused, patch["status"], DENY_ADMIN["spec"], later)
    assert again["status"]["conditions"][0]["status"] == "False"
    assert again["status"]["lastAccepted"]["generation"] == 2
