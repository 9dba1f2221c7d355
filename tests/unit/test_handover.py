"""The hand-over lease (agent/handover.py): the pure decision as a table of
scripted beats, and the file + lock with real files and processes."""

from __future__ import annotations

import json
import multiprocessing
import os

from agent.handover import STALE_AFTER, Beat, Lease, LeaseDoc, Member, resign, step
from agent.probe import verdict

T = 1000.0


def beat(inst: str, role: str, *, ready: bool = True, cg: str = "", **kw) -> Beat:
    return Beat(inst, role, ready, (cg or f"/cg/{inst}",), **kw)


def run(doc: LeaseDoc, *beats: tuple[Beat, float]) -> tuple[LeaseDoc, list[str]]:
    roles = []
    for b, now in beats:
        doc, role = step(doc, b, now)
        roles.append(role)
    return doc, roles


def test_an_agent_alone_claims_the_free_lease():
    doc, role = step(LeaseDoc(), beat("a", "successor", ready=False), T)
    assert role == "owner" and doc.owner == "a" and doc.epoch == 1
    assert doc.members["a"].cgroups == ("/cg/a",)


def test_a_newcomer_waits_for_admission_and_ready_workers_then_claims():
    doc, _ = step(LeaseDoc(), beat("a", "successor"), T)
    # B arrives: successor; not allowed yet, so not even ready workers let it claim
    doc, roles = run(doc, (beat("b", "successor", ready=True), T + 1))
    assert roles == ["successor"] and doc.owner == "a"
    # A's guard sync allowed B's cgroups: A publishes it
    doc, roles = run(doc, (beat("a", "owner", admitted=("b",)), T + 2))
    assert roles == ["owner"] and doc.allowed == ("b",)
    # B's workers are not ready yet: no claim
    doc, roles = run(doc, (beat("b", "successor", ready=False), T + 3))
    assert roles == ["successor"] and doc.owner == "a"
    # ready: B claims; A learns it is superseded on its next beat
    doc, roles = run(doc, (beat("b", "successor", ready=True), T + 4), (beat("a", "owner"), T + 5))
    assert roles == ["owner", "superseded"]
    assert doc.owner == "b" and doc.epoch == 2 and doc.allowed == ()
    assert doc.members["a"].role == "superseded"  # still a member: B's guard keeps allowing it


def test_a_successor_that_goes_silent_is_dropped_and_the_owner_never_changes():
    doc, _ = run(LeaseDoc(), (beat("a", "successor"), T), (beat("b", "successor", ready=False), T + 1),
                 (beat("a", "owner", admitted=("b",)), T + 2))
    doc, roles = run(doc, (beat("a", "owner", admitted=("b",)), T + 1.5 + STALE_AFTER))
    assert roles == ["owner"] and doc.owner == "a" and doc.epoch == 1
    assert set(doc.members) == {"a"} and doc.allowed == ()  # no allowance for a gone member


def test_a_superseded_agent_takes_the_node_back_when_its_successor_vanishes():
    members = {"a": Member("superseded", True, ("/cg/a",), T), "b": Member("owner", True, (), T)}
    doc = LeaseDoc("b", 2, members)
    doc, roles = run(doc, (beat("a", "superseded"), T + 1))
    assert roles == ["superseded"]
    doc, roles = run(doc, (beat("a", "superseded"), T + 2 + STALE_AFTER))
    assert roles == ["owner"] and doc.owner == "a" and doc.epoch == 3


def test_a_draining_agent_never_claims():
    doc = LeaseDoc(None, 4, {"a": Member("superseded", True, (), T)})
    doc, roles = run(doc, (beat("a", "draining"), T + 1))
    assert roles == ["draining"] and doc.owner is None and doc.members["a"].role == "draining"


def test_leaving_drops_the_entry_and_frees_an_owned_lease():
    doc, _ = run(LeaseDoc(), (beat("a", "successor"), T), (beat("b", "successor", ready=False), T + 1))
    doc, roles = run(doc, (beat("a", "owner", leaving=True), T + 2))
    assert roles == ["leaving"] and doc.owner is None and set(doc.members) == {"b"}
    # the waiting successor finds no owner: it claims, ready or not (someone must write)
    doc, roles = run(doc, (beat("b", "successor", ready=False), T + 3))
    assert roles == ["owner"] and doc.owner == "b"


def test_a_restarted_process_of_the_same_pod_replaces_its_predecessor_at_once():
    doc, _ = run(LeaseDoc(), (beat("a1", "successor", home="7:42"), T))
    # a1 was SIGKILLed; a2 starts in the same run dir long before a1's entry is stale
    doc, roles = run(doc, (beat("a2", "successor", ready=False, home="7:42"), T + 1))
    assert roles == ["owner"] and doc.owner == "a2" and set(doc.members) == {"a2"}
    # another pod (another run dir) is not mistaken for a predecessor
    doc, roles = run(doc, (beat("b", "successor", ready=False, home="7:99"), T + 2))
    assert roles == ["successor"] and set(doc.members) == {"a2", "b"}


def test_resign_gives_the_node_back():
    doc, _ = run(LeaseDoc(), (beat("a", "successor"), T), (beat("b", "successor"), T),
                 (beat("a", "owner", admitted=("b",)), T), (beat("b", "successor"), T))
    assert doc.owner == "b"
    doc, role = resign(doc, "b", T + 1)
    assert role == "successor" and doc.owner is None
    assert doc.members["b"].role == "successor" and doc.members["b"].ready is False
    doc, roles = run(doc, (beat("a", "superseded"), T + 2))
    assert roles == ["owner"] and doc.owner == "a"


def test_the_document_round_trips_and_a_broken_member_is_left_out():
    doc, _ = run(LeaseDoc(), (beat("a", "successor", pod="meshlet-node-x", home="1:2"), T))
    again = LeaseDoc.from_json(json.loads(json.dumps(doc.to_json())))
    assert again == doc
    raw = doc.to_json()
    raw["members"]["zz"] = {"role": "owner"}  # no renewed/cgroups
    assert set(LeaseDoc.from_json(raw).members) == {"a"}
    assert LeaseDoc.from_json("garbage") == LeaseDoc()


def _claim_many(directory: str, name: str, n: int) -> None:
    lease = Lease(directory, name)
    for _ in range(n):
        lease.update(lambda doc: (LeaseDoc(name, doc.epoch + 1, doc.members, doc.allowed), "owner"))


def test_updates_from_processes_never_interleave(tmp_path):
    """Two processes bump the epoch 200 times each under the lock: none is lost."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_claim_many, args=(str(tmp_path), n, 200)) for n in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert Lease(str(tmp_path), "c").read().epoch == 400


def test_the_lease_file_is_private_and_a_garbled_one_reads_as_free(tmp_path):
    lease = Lease(str(tmp_path / "h"), "a")
    doc, role = lease.beat(beat("a", "successor"))
    assert role == "owner" and lease.read() == doc
    assert os.stat(lease.path).st_mode & 0o777 == 0o600
    with open(lease.path, "w") as f:
        f.write("{not json")
    assert lease.read() == LeaseDoc()
    assert lease.describe("owner")["owner"] is None


def test_probe_verdicts():
    assert verdict("live", {"tick": T, "ready": False, "why": "x"}, T + 5) == (True, "ok")
    assert verdict("ready", {"tick": T, "ready": False, "why": "hand-over: superseded"}, T + 5) == (
        False, "hand-over: superseded")
    assert verdict("ready", {"tick": T, "ready": True}, T + 5) == (True, "ok")
    ok, why = verdict("ready", {"tick": T, "ready": True}, T + 61)
    assert not ok and "not ticked for 61s" in why
    assert verdict("live", {}, T) == (False, "health file without a tick time")


def test_probe_main_reads_the_run_dirs_health_file(tmp_path, capsys):
    from agent.probe import main

    assert main(["ready", "--run-dir", str(tmp_path)]) == 1
    assert "does not exist yet" in capsys.readouterr().out
    (tmp_path / "health.json").write_text(json.dumps({"tick": __import__("time").time(), "ready": False,
                                                      "why": "hand-over: superseded by agent x"}))
    assert main(["live", "--run-dir", str(tmp_path)]) == 0
    assert main(["ready", "--run-dir", str(tmp_path)]) == 1
    assert "superseded by agent x" in capsys.readouterr().out


def test_status_lines_only_when_there_is_a_hand_over():
    from agent.handover import status_lines

    alone = {"instance": "a", "role": "owner", "owner": "a", "epoch": 1, "lease": "/l", "members": {"a": {}}}
    assert status_lines(alone) == [] and status_lines(None) == []
    two = {**alone, "role": "superseded", "owner": "b",
           "members": {"a": {}, "b": {"pod": "meshlet-node-x", "role": "owner", "ready": True, "age_s": 0.3}}}
    assert status_lines(two) == [
        "hand-over: this agent (a) is superseded; owner b, epoch 1 (/l)",
        "  agent b (meshlet-node-x): owner, workers ready, seen 0.3s ago",
    ]


def test_a_successor_without_the_owners_policies_never_takes_over():
    """File mode with two run dirs: the newcomer did not get the policies
    applied to the old agent.  Taking over would weaken what is enforced."""
    doc, _ = run(LeaseDoc(), (beat("a", "successor", policy="v2"), T),
                 (beat("b", "successor", policy="v1"), T),
                 (beat("a", "owner", admitted=("b",), policy="v2"), T))
    doc, roles = run(doc, (beat("b", "successor", ready=True, policy="v1"), T + 1))
    assert roles == ["successor"] and doc.owner == "a"
    doc, roles = run(doc, (beat("b", "successor", ready=True, policy="v2"), T + 2))
    assert roles == ["owner"] and doc.owner == "b"
