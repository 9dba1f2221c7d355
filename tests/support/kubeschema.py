"""Kubernetes schemas for tests: the official OpenAPI schemas of recent minor
versions (PyPI ``kubernetes-validate``), meshlet's CRD schemas as JSON
Schema, and the API server's rules for structural schemas that no OpenAPI
document spells out."""

from __future__ import annotations

import copy
import functools
import pathlib
from collections.abc import Iterator
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD_DIR = DEPLOY / "crds"


def last_minor_versions(n: int = 3) -> list[str]:
    """The newest ``n`` Kubernetes minor versions the installed
    kubernetes-validate has schemas for, newest first (e.g. 1.37.0, 1.36.0, 1.35.0)."""
    from kubernetes_validate import utils

    by_minor: dict[tuple[int, int], str] = {}
    for v in utils.all_versions():
        major, minor, *_ = (int(x) for x in v.split("."))
        by_minor.setdefault((major, minor), v)
    return [by_minor[k] for k in sorted(by_minor, reverse=True)[:n]]


def validate_k8s(doc: dict, version: str) -> None:
    """Raise kubernetes_validate's ValidationError if ``doc`` is not a valid
    object of its kind in ``version`` (strict: unknown fields are errors)."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


def load_docs(path: pathlib.Path) -> Iterator[dict]:
    with open(path) as f:
        for d in yaml.safe_load_all(f):
            if d is not None:
                yield d


def crds() -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) -> that version's openAPIV3Schema."""
    out = {}
    for f in sorted(CRD_DIR.glob("*.yaml")):
        for crd in load_docs(f):
            spec = crd["spec"]
            for v in spec["versions"]:
                out[(spec["group"], v["name"], spec["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


def to_json_schema(s: Any) -> Any:
    """A CRD's OpenAPI v3 schema as the JSON Schema the API server applies:
    ``x-kubernetes-int-or-string`` is "integer or string"; an object with
    ``properties`` and without ``x-kubernetes-preserve-unknown-fields`` would
    have unknown fields *pruned*, which a test treats as an error (a field
    an example relies on must not silently vanish)."""
    if isinstance(s, list):
        return [to_json_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {k: to_json_schema(v) for k, v in s.items() if not k.startswith("x-kubernetes-")}
    if s.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        s.get("type") == "object"
        and "properties" in s
        and "additionalProperties" not in s
        and not s.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate_cr(doc: dict) -> None:
    """Raise jsonschema.ValidationError (or KeyError for an unknown kind) for a
    custom resource that meshlet's CRDs would not admit."""
    group, _, version = doc["apiVersion"].partition("/")
    _cr_validator(group, version, doc["kind"]).validate(doc)


@functools.cache
def _cr_validator(group: str, version: str, kind: str):
    """Read and converted once per test run (the CRD files do not change
    during one; the test API server validates every object it stores)."""
    import jsonschema

    schema = to_json_schema(copy.deepcopy(crds()[(group, version, kind)]))
    return jsonschema.Draft4Validator(schema)


def structural_problems(s: dict, path: str = "") -> list[str]:
    """Where a CRD schema breaks the API server's structural-schema rules
    (apiextensions.k8s.io/v1 refuses such a CRD): every node has a type
    unless it is int-or-string or preserves unknown fields; no
    ``additionalProperties`` beside ``properties``; metadata only
    ``type: object``; no ``$ref``."""
    problems: list[str] = []
    typed = (
        "type" in s or s.get("x-kubernetes-int-or-string") or s.get("x-kubernetes-preserve-unknown-fields")
    )
    if not typed:
        problems.append(f"{path or '<root>'}: no type")
    if "properties" in s and "additionalProperties" in s:
        problems.append(f"{path}: properties and additionalProperties together")
    if "$ref" in s:
        problems.append(f"{path}: $ref is not allowed")
    if s.get("x-kubernetes-int-or-string") and "type" in s:
        problems.append(f"{path}: int-or-string must not have a type")
    for name, sub in (s.get("properties") or {}).items():
        if path == "" and name == "metadata" and sub != {"type": "object"}:
            problems.append("metadata: only `type: object` is allowed at the root")
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(s.get("items"), dict):
        problems += structural_problems(s["items"], f"{path}[]")
    if isinstance(s.get("additionalProperties"), dict):
        problems += structural_problems(s["additionalProperties"], f"{path}{{}}")
    if s.get("type") == "array" and "items" not in s:
        problems.append(f"{path}: an array needs items")
    return problems
