"""``meshlet policy apply|diff|delete`` in Kubernetes mode: the documents
are written as custom resources (``--kubeconfig FILE`` or
``--in-cluster``), every node's agent enforces them and reports in each
object's ``status.conditions`` whether its loader accepted them.

Files are checked by the same loader first: a file the agents would refuse
is refused here, with file:line, before anything is written.  Documents
of ``meshlet.io/v1alpha1`` become meshlet's kinds; ``security.istio.io``
AuthorizationPolicies become Istio's (``security.istio.io/v1``; that CRD
must be installed).  ``apply`` then waits (``--timeout``) until the nodes
have reported on the generation it wrote, for meshlet's kinds (Istio's
objects carry Istio's status, not meshlet's).
"""

from __future__ import annotations

import difflib
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import click
import yaml

from .common import die, echo_json

#: (group, kind) -> (apiVersion written, plural); only these are written.
RESOURCES = {
    ("meshlet.io", "AuthorizationPolicy"): ("meshlet.io/v1alpha1", "authorizationpolicies"),
    ("meshlet.io", "TrafficPolicy"): ("meshlet.io/v1alpha1", "trafficpolicies"),
    ("meshlet.io", "RequestAuthentication"): ("meshlet.io/v1alpha1", "requestauthentications"),
    ("security.istio.io", "AuthorizationPolicy"): ("security.istio.io/v1", "authorizationpolicies"),
    ("security.istio.io", "RequestAuthentication"): ("security.istio.io/v1", "requestauthentications"),
}
PROGRESS_EVERY = 5.0


def kube_opts(f):
    """``--kubeconfig``, ``--context``, ``--in-cluster``: write the custom
    resources of a cluster instead of talking to a local agent."""
    f = click.option(
        "--in-cluster",
        is_flag=True,
        help="Kubernetes mode with this pod's service account (KUBERNETES_SERVICE_HOST).",
    )(f)
    f = click.option("--context", help="The kubeconfig context (default: its current-context).")(f)
    f = click.option(
        "--kubeconfig",
        type=click.Path(dir_okay=False),
        help="Kubernetes mode: write the cluster's custom resources (every node enforces them) "
        "instead of one local agent's store.  Agents with `workloads.source: kubernetes` refuse "
        "local applies and deletes.",
    )(f)
    return f


def client_from(kubeconfig: str | None, context: str | None, in_cluster: bool):
    """The Kubernetes client, or None (local agent mode)."""
    from ..workloads.kubeclient import KubeClient, KubeConfigError

    if kubeconfig and in_cluster:
        raise click.UsageError("give --kubeconfig or --in-cluster, not both")
    if context and not kubeconfig:
        raise click.UsageError("--context needs --kubeconfig")
    try:
        if kubeconfig:
            return KubeClient.from_kubeconfig(kubeconfig, context)
        if in_cluster:
            return KubeClient.in_cluster()
    except KubeConfigError as e:
        die(str(e), 2)
    return None


@dataclass
class Target:
    """One document of the files and where it lives in the cluster."""

    doc: dict[str, Any]
    api_version: str
    plural: str
    origin: str

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def namespace(self) -> str:
        return str(self.doc["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def collection(self) -> str:
        return f"/apis/{self.api_version}/namespaces/{quote(self.namespace, safe='')}/{self.plural}"

    @property
    def path(self) -> str:
        return f"{self.collection}/{quote(self.name, safe='')}"

    @property
    def has_status(self) -> bool:
        return self.api_version.startswith("meshlet.io/")

    def label(self) -> str:
        group = self.api_version.split("/")[0]
        return f"{self.kind.lower()}.{group} {self.namespace}/{self.name}"

    def body(self) -> dict[str, Any]:
        out = {**self.doc, "apiVersion": self.api_version}
        out["metadata"] = {k: v for k, v in self.doc["metadata"].items() if k in _META_WRITTEN}
        return out


_META_WRITTEN = ("name", "namespace", "labels", "annotations")


@dataclass
class Row:
    """What became of one target."""

    target: Target
    result: str
    generation: int | None
    accepted: bool | None = None
    message: str | None = None


def targets(files: list[dict]) -> list[Target]:
    """The documents of files the loader has accepted, as targets."""
    out = []
    for f in files:
        for i, doc in enumerate(d for d in yaml.safe_load_all(f["text"]) if d is not None):
            group = str(doc.get("apiVersion", "")).split("/")[0]
            res = RESOURCES.get((group, str(doc.get("kind"))))
            if res is None:  # the loader refuses these before we get here
                what = f"{doc.get('apiVersion')} {doc.get('kind')}"
                die(f"{f['filename']}: document {i + 1}: {what} is not written")
            out.append(Target(doc, res[0], res[1], f"{f['filename']}#{i + 1}"))
    return out


def _hint(e: Exception) -> str:
    if getattr(e, "status", None) == 404 and "could not find the requested resource" in str(e):
        if "security.istio.io" in str(e):
            return (
                "; is Istio's AuthorizationPolicy CRD installed? (or write apiVersion: meshlet.io/v1alpha1)"
            )
        return "; are meshlet's CRDs installed (deploy/crds)?"
    return ""


def _api(call, what: str, code: int):
    from ..workloads.kubeclient import ApiError

    try:
        return call()
    except ApiError as e:
        die(f"{what}: {e}{_hint(e)}", code)


def _get(client, t: Target, code: int) -> dict | None:
    """The object, None if there is none (its kind is served)."""
    from ..workloads.kubeclient import ApiError

    try:
        return client.get(t.path)
    except ApiError as e:
        if e.status == 404 and not _hint(e):
            return None
        die(f"{t.label()}: {e}{_hint(e)}", code)


def _same(existing: dict, t: Target) -> bool:
    from ..policycrs import document_from_object

    have = document_from_object(existing)
    want = document_from_object(t.body())
    have["apiVersion"] = want["apiVersion"]
    return have == want


def apply(client, files: list[dict], output: str, wait: bool, timeout: float) -> None:
    ts = targets(files)
    rows: list[Row] = []
    for t in ts:
        existing = _get(client, t, 1)
        if existing is None:
            made = _api(lambda t=t: client.create(t.collection, t.body()), t.label(), 1)
            result = "created"
        elif _same(existing, t):
            made, result = existing, "unchanged"
        else:
            body = t.body()
            meta = existing.get("metadata") or {}
            # what others attached to the object stays (kubectl apply keeps them too)
            body["metadata"].update({k: meta[k] for k in ("finalizers", "ownerReferences") if k in meta})
            body["metadata"]["resourceVersion"] = meta["resourceVersion"]
            made = _api(lambda t=t, body=body: client.replace(t.path, body), t.label(), 1)
            result = "configured"
        gen = (made.get("metadata") or {}).get("generation")
        rows.append(Row(t, result, gen))
        if output != "json":
            click.echo(f"{t.label()} {result}")
    if wait:
        _wait(client, rows, timeout, output)
    refused = [r for r in rows if r.accepted is False]
    late = [r for r in rows if wait and r.target.has_status and r.accepted is None]
    if output == "json":
        echo_json(
            {
                "server": client.server,
                "changes": [
                    {
                        "apiVersion": r.target.api_version,
                        "kind": r.target.kind,
                        "namespace": r.target.namespace,
                        "name": r.target.name,
                        "result": r.result,
                        "generation": r.generation,
                        "accepted": r.accepted,
                        "message": r.message,
                    }
                    for r in rows
                ],
            }
        )
    else:
        for r in rows:
            if r.accepted is True:
                click.echo(f"{r.target.label()} accepted (generation {r.generation})")
            elif r.accepted is False:
                click.echo(f"{r.target.label()} REFUSED (generation {r.generation}):", err=True)
                for line in str(r.message or "").splitlines():
                    click.echo(f"  {line}", err=True)
    if late:
        click.echo(
            f"error: no node reported on {len(late)} object(s) within {timeout:g}s "
            "(are the meshlet agents running? `kubectl get mlap,mltp -A` shows their status)",
            err=True,
        )
    sys.exit(1 if refused or late else 0)


def _condition(obj: dict) -> dict | None:
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conds if isinstance(c, dict) and c.get("type") == "Accepted"), None)


def _wait(client, rows: list[Row], timeout: float, output: str) -> None:
    from ..workloads.kubeclient import ApiError

    todo = [r for r in rows if r.target.has_status]
    start = last = time.monotonic()
    while todo:
        for r in list(todo):
            try:
                obj = client.get(r.target.path)
            except ApiError:
                continue  # the next round asks again; the deadline bounds it
            c = _condition(obj)
            if c is not None and c.get("observedGeneration") == r.generation:
                r.accepted = c.get("status") == "True"
                r.message = c.get("message")
                todo.remove(r)
        if not todo:
            return
        now = time.monotonic()
        if now - start >= timeout:
            return
        if now - last >= PROGRESS_EVERY:
            last = now
            click.echo(
                f"waiting for the nodes to report on {len(todo)} object(s) ({now - start:.0f} s)...", err=True
            )
        time.sleep(0.2)


def diff(client, files: list[dict]) -> None:
    from ..policycrs import document_from_object

    changed = False
    for t in targets(files):
        existing = _get(client, t, 3)
        want = yaml.safe_dump(document_from_object(t.body()), sort_keys=False)
        have = ""
        if existing is not None:
            doc = document_from_object(existing)
            doc["apiVersion"] = t.api_version
            have = yaml.safe_dump(doc, sort_keys=False)
        if have == want:
            continue
        changed = True
        shown = f"{t.kind.lower()}.{t.api_version.split('/')[0]}/{t.namespace}/{t.name}"
        click.echo(
            "".join(
                difflib.unified_diff(
                    have.splitlines(keepends=True),
                    want.splitlines(keepends=True),
                    fromfile=f"a/{shown}" if have else "/dev/null",
                    tofile=f"b/{shown}",
                )
            ),
            nl=False,
        )
    sys.exit(1 if changed else 0)


def delete(client, name: str, namespace: str, kind: str | None) -> None:
    """Delete meshlet's object (either kind), or Istio's AuthorizationPolicy
    of that name where Istio's CRD is installed; refuse a name that several
    of them have unless the kind says which."""
    from ..workloads.kubeclient import ApiError

    found = []
    for (group, k), (api_version, plural) in RESOURCES.items():
        if kind is not None and k != kind:
            continue
        path = f"/apis/{api_version}/namespaces/{quote(namespace, safe='')}/{plural}/{quote(name, safe='')}"
        try:
            client.get(path)
        except ApiError as e:
            if e.status == 404 and (group != "meshlet.io" or not _hint(e)):
                continue  # no such object (or Istio's CRD is not installed)
            die(f"{k} {namespace}/{name}: {e}{_hint(e)}")
        found.append((f"{k.lower()}.{group}", path))
    if not found:
        die(f"no {kind or 'policy'} {namespace}/{name} in the cluster ({client.server})")
    if len(found) > 1:
        die(
            f"{namespace}/{name} names several objects ({', '.join(w for w, _ in found)}); "
            "say which one (--kind, or KIND/NAME)"
            + ("; to delete Istio's, use kubectl" if kind == "AuthorizationPolicy" else "")
        )
    what, path = found[0]
    _api(lambda: client.delete(path), f"{what} {namespace}/{name}", 1)
    click.echo(f"{what} {namespace}/{name} deleted (from {client.server}; every node drops it)")


def status_lines(cluster: dict | None) -> list[str]:
    """What ``meshlet status`` says about policies from the cluster (the
    agent's ``policy.cluster``): in sync or how stale, kinds not installed,
    refused objects and what stays in force."""
    if not cluster:
        return []
    out = []
    head = f"from the cluster ({cluster.get('server')}): {cluster.get('objects')} objects"
    if cluster.get("in_sync"):
        out.append(head + ", in sync")
    else:
        stale = cluster.get("stale_s")
        out.append(
            head + ", NOT IN SYNC, last set kept" + (f"; stale {stale:.0f}s" if stale is not None else "")
        )
    missing = [r["kind"] for r in cluster.get("resources") or () if not r.get("installed", True)]
    if missing:
        out.append("not installed (checked again periodically): " + ", ".join(missing))
    if cluster.get("apply_error"):
        out.append(f"LAST APPLY FAILED (last set kept): {cluster['apply_error']}")
    for r in cluster.get("refused") or ():
        kept = (
            f"generation {r['in_force']} stays" if r.get("in_force") is not None else "nothing of it enforced"
        )
        first = (r.get("problems") or ["?"])[0]
        out.append(f"REFUSED {r['object']} generation {r.get('generation')} ({kept}): {first}")
    more = cluster.get("refused_total", 0) - len(cluster.get("refused") or ())
    if more > 0:
        out.append(f"... {more} more refused")
    if cluster.get("status_pending"):
        out.append(
            f"status writes pending: {cluster['status_pending']} (errors {cluster.get('status_errors')})"
        )
    return out
