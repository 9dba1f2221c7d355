"""Policies as Kubernetes custom resources: what a node does with the
``AuthorizationPolicy`` (meshlet's and Istio's) and ``TrafficPolicy``
objects the API server hands it.  *Pure*: objects in, policy sets and
status conditions out; the watching is the caller's.

Rules (issue #11):

* An object is read by the same loaders as ``meshlet policy apply`` reads
  files, so the cluster and the CLI accept exactly the same documents.
* Server-set metadata (uid, resourceVersion, generation, managedFields,
  timestamps, finalizers, ownerReferences) and ``status`` are not part of
  the policy and are dropped first; anything else unknown is the loader's
  to refuse.
* A refused object **never weakens what is enforced**: its last accepted
  generation stays in force (a broken edit of a DENY policy keeps the old
  DENY), and the status condition says so.  A refused object never
  accepted before is simply not enforced: nothing of it applies.
* Every node reads the same objects with the same rules, so every node
  enforces the same set.

The condition written to ``status.conditions`` is ``Accepted``: ``True``
with reason ``Loaded``, or ``False`` with reason ``Invalid`` and the
loader's messages, one per line, as field paths of the object.

``status.lastAccepted`` (``{generation, spec}``) is the cluster's memory of
the last accepted generation: a node that starts after a broken edit never
saw the generation before it, so it reads that one from the status and
enforces what every other node enforces (:meth:`PolicyObjects.sync`).  The
status of the node agents is as trusted as the spec: only they (and cluster
admins) may write ``/status`` (deploy/rbac.yaml).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from agent import yamlsrc as y
from agent.policy.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, PolicySet
from agent.traffic.trafficpolicy import TrafficPolicySet, parse_all_sources

__all__ = [
    "Verdict",
    "PolicyDoc",
    "PolicyObjects",
    "document_from_object",
    "object_key",
    "accepted_condition",
    "desired_status",
]

#: metadata fields a loader reads; the API server's own fields are dropped.
_META_KEPT = ("name", "namespace", "labels", "annotations")
#: annotations kubectl adds that are not part of the policy.
_ANNOTATIONS_DROPPED = ("kubectl.kubernetes.io/last-applied-configuration",)


def object_key(obj: dict[str, Any]) -> str:
    """``<apiVersion>/<kind>/<namespace>/<name>``: one object, whichever generation."""
    meta = obj.get("metadata") or {}
    return f"{obj.get('apiVersion')}/{obj.get('kind')}/{meta.get('namespace')}/{meta.get('name')}"


def document_from_object(obj: dict[str, Any]) -> dict[str, Any]:
    """The document a loader reads, from an API object: apiVersion, kind,
    spec, and the metadata a policy may carry."""
    meta = obj.get("metadata") or {}
    kept = {k: meta[k] for k in _META_KEPT if k in meta}
    if isinstance(kept.get("annotations"), dict):
        ann = {k: v for k, v in kept["annotations"].items() if k not in _ANNOTATIONS_DROPPED}
        if ann:
            kept["annotations"] = ann
        else:
            del kept["annotations"]
    doc: dict[str, Any] = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": kept}
    if "spec" in obj:
        doc["spec"] = obj["spec"]
    return doc


def accepted_condition(
    generation: int | None, problems: Iterable[str], now: str, previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``Accepted`` condition for ``status.conditions``.
    ``lastTransitionTime`` moves only when the status flips (Kubernetes'
    convention); ``now`` is an RFC 3339 time."""
    msgs = list(problems)
    status = "False" if msgs else "True"
    cond: dict[str, Any] = {
        "type": "Accepted",
        "status": status,
        "reason": "Invalid" if msgs else "Loaded",
        "message": "\n".join(msgs) if msgs else "enforced on every node",
        "lastTransitionTime": now,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    if previous and previous.get("status") == status and previous.get("lastTransitionTime"):
        cond["lastTransitionTime"] = previous["lastTransitionTime"]
    return cond


@dataclass(frozen=True)
class Verdict:
    """What became of one generation of one object."""

    key: str
    generation: int | None
    accepted: bool
    problems: tuple[str, ...]
    """The loader's messages (field path: what is wrong), empty when accepted."""
    in_force: int | None
    """The generation enforced now: this one, an earlier accepted one
    (refused update), or None (nothing of this object is enforced)."""

    def message_lines(self) -> list[str]:
        if self.accepted:
            return []
        tail = (
            f"generation {self.in_force} stays in force"
            if self.in_force is not None
            else "nothing of this resource is enforced"
        )
        return [*self.problems, tail]


@dataclass(frozen=True)
class PolicyDoc:
    """One object as :meth:`PolicyObjects.sync` reads it: the loader's text of
    its current generation and, if its status remembers one, of the last
    accepted generation (``status.lastAccepted``)."""

    key: str
    generation: int | None
    text: str
    last_accepted: tuple[int, str] | None = None
    """(generation, document text) from ``status.lastAccepted``, or None."""

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> PolicyDoc:
        gen = (obj.get("metadata") or {}).get("generation")
        doc = document_from_object(obj)
        last = None
        la = (obj.get("status") or {}).get("lastAccepted") if isinstance(obj.get("status"), dict) else None
        if (
            isinstance(la, dict)
            and isinstance(la.get("generation"), int)
            and isinstance(la.get("spec"), dict)
        ):
            if la["generation"] != gen:
                prev = {**doc, "spec": la["spec"]}
                last = (la["generation"], yaml.safe_dump(prev, sort_keys=False))
        return cls(
            object_key(obj), gen if isinstance(gen, int) else None, yaml.safe_dump(doc, sort_keys=False), last
        )


def _comparable(cond: dict[str, Any] | None) -> tuple | None:
    if not isinstance(cond, dict):
        return None
    return tuple(cond.get(k) for k in ("status", "reason", "message", "observedGeneration"))


def desired_status(
    verdict: Verdict, current: dict[str, Any] | None, in_force_spec: dict[str, Any] | None, now: str
) -> dict[str, Any] | None:
    """The merge patch of ``/status`` that makes ``current`` (the object's
    status as served) say what ``verdict`` says, or None when it already
    does (the transition time aside).  Every node computes the same patch
    from the same objects, so N nodes converge on one status instead of
    rewriting each other's.  ``in_force_spec``: the spec of the generation
    in force, kept as ``status.lastAccepted``."""
    current = current if isinstance(current, dict) else {}
    conds: list[Any] = current["conditions"] if isinstance(current.get("conditions"), list) else []
    prev = next((c for c in conds if isinstance(c, dict) and c.get("type") == "Accepted"), None)
    cond = accepted_condition(verdict.generation, verdict.message_lines(), now, prev)
    want: dict[str, Any] = {"conditions": [cond]}
    if verdict.generation is not None:
        want["observedGeneration"] = verdict.generation
    if verdict.in_force is not None and in_force_spec is not None:
        want["lastAccepted"] = {"generation": verdict.in_force, "spec": in_force_spec}
    same = (
        _comparable(prev) == _comparable(cond)
        and len(conds) == 1
        and current.get("observedGeneration") == want.get("observedGeneration")
        and ("lastAccepted" not in want or current.get("lastAccepted") == want["lastAccepted"])
    )
    return None if same else {"status": want}


class PolicyObjects:
    """The policy objects a node has seen and the last accepted generation of
    each (see the module docstring)."""

    def __init__(
        self, trust_domain: str = DEFAULT_TRUST_DOMAIN, root_namespace: str = DEFAULT_ROOT_NAMESPACE
    ) -> None:
        self.trust_domain, self.root_namespace = trust_domain, root_namespace
        self._accepted: dict[str, tuple[int | None, str]] = {}  # key -> (generation, document text)

    def _parse(self, texts: list[tuple[str, str]]) -> tuple[PolicySet, TrafficPolicySet]:
        return parse_all_sources(texts, trust_domain=self.trust_domain, root_namespace=self.root_namespace)

    def upsert(self, obj: dict[str, Any]) -> Verdict:
        """Read one object (added or modified); accept it if it loads, alone
        and beside every other accepted object."""
        key = object_key(obj)
        gen = (obj.get("metadata") or {}).get("generation")
        text = yaml.safe_dump(document_from_object(obj), sort_keys=False)
        others = [(k, t) for k, (_g, t) in sorted(self._accepted.items()) if k != key]
        try:
            self._parse([*others, (key, text)])
        except y.SourceError as e:
            mine = [p for p in e.errors if p.file == key] or e.errors
            problems = tuple(f"{p.path}: {p.message}" if p.path else p.message for p in mine)
            prev = self._accepted.get(key)
            return Verdict(key, gen, False, problems, prev[0] if prev else None)
        self._accepted[key] = (gen, text)
        return Verdict(key, gen, True, (), gen)

    def delete(self, obj: dict[str, Any]) -> None:
        """The object is gone: nothing of it is enforced any more."""
        self._accepted.pop(object_key(obj), None)

    def in_force(self, key: str) -> tuple[int | None, str] | None:
        """(generation, document text) enforced for ``key``, or None."""
        return self._accepted.get(key)

    def sync(self, docs: Iterable[PolicyDoc]) -> dict[str, Verdict]:
        """Make the objects exactly ``docs`` (a list, or the state after a
        burst of events): objects not among them are gone; a verdict for
        every one.  Equivalent to :meth:`upsert` of each in key order, but
        the set is read once or a few times, not once per object (a 1,000
        object list is one read, plus one more per round of refusals).

        An object refused now and never accepted by this node is enforced
        at its ``last_accepted`` generation when that one loads: what the
        nodes that saw it enforce."""
        by_key = {d.key: d for d in docs}
        for k in [k for k in self._accepted if k not in by_key]:
            del self._accepted[k]
        candidates: dict[str, tuple[int | None, str]] = {}
        for k in sorted(by_key):
            d = by_key[k]
            acc = self._accepted.get(k)
            if acc is not None and acc[1] == d.text:
                self._accepted[k] = (
                    d.generation,
                    d.text,
                )  # same document (a reverted edit: newer generation)
            else:
                candidates[k] = (d.generation, d.text)
        problems = self._admit(candidates)
        # refused, never accepted here: the generation the cluster remembers
        fallback = {
            k: by_key[k].last_accepted
            for k in problems
            if k not in self._accepted and by_key[k].last_accepted is not None
        }
        if fallback:
            self._admit({k: v for k, v in fallback.items() if v is not None})
        verdicts = {}
        for k, d in by_key.items():
            acc = self._accepted.get(k)
            if k in problems:
                verdicts[k] = Verdict(k, d.generation, False, problems[k], acc[0] if acc else None)
            else:
                verdicts[k] = Verdict(k, d.generation, True, (), d.generation)
        return verdicts

    def _admit(self, candidates: dict[str, tuple[int | None, str]]) -> dict[str, tuple[str, ...]]:
        """Accept every candidate that loads beside the accepted objects;
        the problems of the others (which keep what they had)."""
        refused: dict[str, tuple[str, ...]] = {}
        todo = dict(candidates)
        while todo:
            texts = [(k, t) for k, (_g, t) in self._accepted.items() if k not in todo]
            texts += [(k, t) for k, (_g, t) in todo.items()]
            try:
                self._parse(sorted(texts))
            except y.SourceError as e:
                mine: dict[str, list[str]] = {}
                for p in e.errors:
                    if p.file in todo:
                        mine.setdefault(p.file, []).append(f"{p.path}: {p.message}" if p.path else p.message)
                if not mine:
                    # the loader blamed an accepted object (e.g. the second of two
                    # policies with one name): find the culprits one at a time
                    refused.update(self._admit_each(todo))
                    return refused
                for k, msgs in mine.items():
                    refused[k] = tuple(msgs)
                    del todo[k]
                continue
            self._accepted.update(todo)
            break
        return refused

    def _admit_each(self, todo: dict[str, tuple[int | None, str]]) -> dict[str, tuple[str, ...]]:
        refused: dict[str, tuple[str, ...]] = {}
        for k in sorted(todo):
            others = [(o, t) for o, (_g, t) in self._accepted.items() if o != k]
            try:
                self._parse(sorted([*others, (k, todo[k][1])]))
            except y.SourceError as e:
                mine = [p for p in e.errors if p.file == k] or e.errors
                refused[k] = tuple(f"{p.path}: {p.message}" if p.path else p.message for p in mine)
                continue
            self._accepted[k] = todo[k]
        return refused

    def texts(self) -> list[tuple[str, str]]:
        """(key, document text) of every object in force, in key order: the
        sources the agent's policy store applies."""
        return [(k, t) for k, (_g, t) in sorted(self._accepted.items())]

    def sets(self) -> tuple[PolicySet, TrafficPolicySet]:
        """What every node enforces: the accepted generation of every object."""
        return self._parse([(k, t) for k, (_g, t) in sorted(self._accepted.items())])
