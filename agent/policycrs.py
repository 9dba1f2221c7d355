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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from agent import yamlsrc as y
from agent.policy.model import DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, PolicySet
from agent.traffic.trafficpolicy import TrafficPolicySet, parse_all_sources

__all__ = ["Verdict", "PolicyObjects", "document_from_object", "object_key", "accepted_condition"]

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

    def sets(self) -> tuple[PolicySet, TrafficPolicySet]:
        """What every node enforces: the accepted generation of every object."""
        return self._parse([(k, t) for k, (_g, t) in sorted(self._accepted.items())])
