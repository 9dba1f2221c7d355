"""What a policy set means, as data: the canonical JSON form of policy
objects and the fingerprint (``version``) computed from it.

Pure and free of YAML: the proxy workers read the agent's compiled policy
files with these (agent/policy/compiled.py) and never load a YAML parser;
:mod:`agent.policy.load` (the YAML front end) builds its sets with the same
functions, so a set has one version whichever way it was read.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .model import Policy, PolicySet, PrincipalMatch, RequestAuthentication, StringMatch

__all__ = ["KIND", "AUTHN_KIND", "fingerprint", "policy_set", "canonical"]

KIND = "AuthorizationPolicy"
AUTHN_KIND = "RequestAuthentication"


_COMPARED_FIELDS: dict[type, tuple[str, ...]] = {}


def _compared_fields(cls: type) -> tuple[str, ...]:
    """The fields of a dataclass that take part in equality (cached: asking
    ``dataclasses.fields`` for each of 250k objects of a large set cost ~1 s)."""
    names = _COMPARED_FIELDS.get(cls)
    if names is None:
        names = _COMPARED_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls) if f.compare)
    return names


def _canon(x: Any) -> Any:
    """``x`` as JSON data that says what it means and nothing else: the
    fields that take part in equality (never ``origin``, nor a principal as
    written), empty lists left out (a field's absence and its empty default
    mean the same; keys are field names, so nothing is ambiguous), in field
    order, so the JSON text needs no key sorting.  Dispatch is by exact
    type: this walks every value of a set once per apply and once per
    worker reload, and for 10,000 rules the generic walk it replaced took
    most of the version's cost."""
    t = type(x)
    if t is str or t is int or t is bool or x is None or t is float:
        return x
    enc = _CANON.get(t)
    if enc is None:
        enc = _CANON[t] = _canon_for(t)
    return enc(x)


def _canon_for(t: type) -> Callable[[Any], Any]:
    """The encoder of values of type ``t`` (see :func:`_canon`)."""
    if t is StringMatch:
        return lambda m: [m.kind._value_, m.value, m.ignore_case]
    if t is PrincipalMatch:
        return lambda m: _canon(m.match)
    if issubclass(t, enum.Enum):
        return lambda e: e._value_
    if issubclass(t, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str
    if dataclasses.is_dataclass(t):
        names = _compared_fields(t)

        def fields(obj: Any) -> dict:
            out = {}
            for name in names:
                v = getattr(obj, name)
                if v != ():
                    out[name] = _canon(v)
            return out

        return fields
    if issubclass(t, (tuple, list)):
        return lambda xs: [_canon(i) for i in xs]
    if issubclass(t, (set, frozenset)):
        return lambda xs: sorted((_canon(i) for i in xs), key=lambda i: json.dumps(i, sort_keys=True))
    if issubclass(t, dict):
        return lambda d: sorted([_canon(k), _canon(v)] for k, v in d.items())
    if issubclass(t, (str, int, float)):  # other subclasses (not enums): their plain value
        return lambda v: v
    raise TypeError(f"no canonical form for {t.__name__} values")


_CANON: dict[type, Callable[[Any], Any]] = {}

#: Changes when :func:`_canon`'s form changes, so old and new versions never collide.
_FINGERPRINT_FORM = 2


def fingerprint(policies: Iterable[Policy], trust_domain: str, root_namespace: str) -> str:
    """A short hash of what the policies mean: reformatting, reordering files or
    renaming them leaves it unchanged; any change of meaning changes it."""
    body = [
        _FINGERPRINT_FORM,
        trust_domain,
        root_namespace,
        [_canon(p) for p in sorted(policies, key=lambda p: (p.namespace, p.name))],
    ]
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, check_circular=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


#: The public name of :func:`_canon` (other packages hash their own policy kinds with it).
canonical = _canon


def policy_set(
    policies: Sequence[Policy],
    trust_domain: str,
    root_namespace: str,
    files: Sequence[str] = (),
    authentications: Sequence[RequestAuthentication] = (),
) -> PolicySet:
    """A :class:`PolicySet` of already-read policies, with its fingerprint."""
    ordered = tuple(sorted(policies, key=lambda p: (p.namespace, p.name)))
    authn = tuple(sorted(authentications, key=lambda a: (a.namespace, a.name)))
    version = fingerprint(ordered, trust_domain, root_namespace)
    if authn:
        # only a set with RequestAuthentications hashes them: versions of sets without stay as they were
        body = json.dumps([version, [_canon(a) for a in authn]], sort_keys=True, separators=(",", ":"))
        version = hashlib.sha256(body.encode()).hexdigest()[:16]
    return PolicySet(
        ordered,
        trust_domain,
        root_namespace,
        version,
        tuple(files),
        authentications=authn,
    )
