"""``meshlet policy``: AuthorizationPolicy and TrafficPolicy documents, checked
offline (validate, explain, lint) or kept by the running agent (apply, diff,
list, get, delete).

Exit codes: validate 0 valid / 1 invalid; explain 0 allowed / 1 denied (or the
request itself is refused, e.g. 400) / 3 the policies or inventory do not load;
lint 0 clean / 1 findings / 3 inputs do not load.  With the agent: apply 0
applied / 1 invalid input (nothing changed) or agent error; diff 0 no
differences / 1 differences / 3 invalid input or agent error; list 0 / 1 agent
error; get, delete 0 / 1 no such policy or agent error.  2 is always a usage
error.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from .common import OUTPUT, admin_socket, agent_opts, die, echo_json, table_lines, unreachable
from .policykube import client_from, kube_opts


def _policy_opts(f):
    """``--trust-domain`` and ``--root-namespace``, as the agent's policy store reads them."""
    f = click.option(
        "--root-namespace",
        default="istio-system",
        show_default=True,
        help="Policies in this namespace apply to every namespace.",
    )(f)
    f = click.option(
        "--trust-domain",
        default="cluster.local",
        show_default=True,
        help="The mesh's trust domain (for ns/<ns>/sa/<sa> and cluster.local principals).",
    )(f)
    return f


def _load_policy_set(paths, trust_domain, root_namespace, output, code):
    """The AuthorizationPolicies of ``paths`` (TrafficPolicy documents there are
    checked too, then left out)."""
    return _load_documents(paths, trust_domain, root_namespace, output, code)[0]


def _load_documents(paths, trust_domain, root_namespace, output, code):
    """(PolicySet, TrafficPolicySet) of ``paths``: both kinds, mixed in any file."""
    from ..traffic.trafficpolicy import load_all
    from ..yamlsrc import SourceError

    try:
        return load_all(list(paths), trust_domain=trust_domain, root_namespace=root_namespace)
    except SourceError as e:
        if output == "json":
            echo_json(
                {
                    "valid": False,
                    "errors": [p.as_dict() for p in e.errors],
                },
                indent=None,
            )
            sys.exit(code)
        die(f"invalid policies:\n{e}", code)
    except ValueError as e:  # bad --trust-domain / --root-namespace
        raise click.UsageError(str(e)) from None


def _load_inventory_pods(path):
    """The inventory at ``path`` (for pod names), or exit 3."""
    from ..workloads.yamlfile import load_inventory
    from ..yamlsrc import SourceError

    try:
        return load_inventory(path)
    except SourceError as e:
        die(f"invalid inventory:\n{e}", 3)


def _find_pod(inv, ref: str, opt: str):
    ns, _, name = ref.rpartition("/")
    hits = [p for p in inv.pods if p.name == name and (not ns or p.namespace == ns)]
    if len(hits) != 1:
        raise click.BadParameter(
            f"{'no' if not hits else 'more than one'} pod {ref!r} in the inventory"
            + ("" if hits else "; write namespace/name"),
            param_hint=opt,
        )
    return hits[0]


@click.group()
def policy() -> None:
    """Policies: AuthorizationPolicy (Istio semantics) and TrafficPolicy
    (retries, timeouts, circuit breaking per service), in the same files.

    \b
      meshlet policy validate PATH...          load and check files or directories
      meshlet policy explain -f PATH ...       would this connection/request be allowed, and why?
      meshlet policy lint PATH...              shadowed rules, contradictions, unused selectors,
                                               traffic policies for unknown services

    With the running agent (--socket/--node pick it), or, with --kubeconfig
    FILE (or --in-cluster), with the cluster: apply, diff and delete then
    write meshlet's custom resources, which every node enforces (agents with
    `workloads.source: kubernetes` refuse local applies and deletes):

    \b
      meshlet policy apply -f FILE|DIR...      create or update documents, all or none
      meshlet policy diff -f FILE|DIR...       what apply would change
      meshlet policy list                      the applied documents and their version
      meshlet policy get [KIND/]NAME -n NS     one applied document, as YAML or JSON
      meshlet policy delete [KIND/]NAME -n NS  remove one applied document

    KIND (or --kind) is authorizationpolicy or trafficpolicy, any case; it is
    needed only when documents of both kinds have that namespace/name.
    """


@policy.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@_policy_opts
@OUTPUT
def policy_validate(paths, trust_domain, root_namespace, output) -> None:
    """Check policy files (or directories of *.yaml): AuthorizationPolicy,
    RequestAuthentication and TrafficPolicy documents; errors name file:line:column and field.  The
    version is the one the agent's store would have with exactly these."""
    from ..policy.store import store_version
    from ..traffic.trafficpolicy import KIND as TRAFFIC

    ps, ts = _load_documents(paths, trust_domain, root_namespace, output, 1)
    version = store_version(ps.version, {TRAFFIC: (ts.version, len(ts))})
    if output == "json":
        echo_json(
            {
                "valid": True,
                "version": version,
                "policies": [
                    {
                        "namespace": p.namespace,
                        "name": p.name,
                        "action": p.action.value,
                        "rules": len(p.rules),
                        "origin": p.origin,
                    }
                    for p in ps.policies
                ],
                "requestAuthentications": [
                    {
                        "namespace": a.namespace,
                        "name": a.name,
                        "issuers": [r.issuer for r in a.jwt_rules],
                        "origin": a.origin,
                    }
                    for a in ps.authentications
                ],
                "trafficPolicies": [
                    {
                        "namespace": p.namespace,
                        "name": p.name,
                        "service": p.service,
                        "port": p.port,
                        "origin": p.origin,
                    }
                    for p in ts.policies
                ],
            },
            indent=None,
        )
        return
    for p in ps.policies:
        sel = ",".join(f"{k}={v}" for k, v in p.selector) or "*"
        click.echo(f"{p.action.value:<6} {p.key:<40} selector {sel:<24} {len(p.rules)} rule(s)  {p.origin}")
    for a in ps.authentications:
        sel = ",".join(f"{k}={v}" for k, v in a.selector) or "*"
        issuers = ",".join(r.issuer for r in a.jwt_rules)
        click.echo(f"{'JWT':<6} {a.key:<40} selector {sel:<24} {issuers}  {a.origin}")
    for t in ts.policies:
        target = f"{t.namespace}/{t.service}" + (f":{t.port}" if t.port is not None else "")
        click.echo(f"{'TRAFFIC':<6} {t.key:<40} service  {target:<24} {'':9}  {t.origin}")
    files = len(dict.fromkeys(ps.sources + ts.files))
    traffic = f", {len(ts)} traffic policies" if len(ts) else ""
    authn = f", {len(ps.authentications)} request authentications" if ps.authentications else ""
    click.echo(f"valid: {len(ps)} policies from {files} file(s){authn}{traffic}, version {version}")


@policy.command("explain")
@click.option(
    "-f",
    "--file",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(),
    help="Policy file or directory (repeatable).",
)
@click.option(
    "--from",
    "src",
    help="Source identity: spiffe://td/ns/N/sa/S, td/ns/N/sa/S or "
    "ns/N/sa/S. Omit for a plaintext (unauthenticated) peer.",
)
@click.option("--from-pod", help="Source pod namespace/name (needs --inventory).")
@click.option("--source-ip", help="Source IP address (default: the --from-pod's).")
@click.option("--to-pod", help="Destination pod namespace/name (needs --inventory).")
@click.option("--to-namespace", help="Destination namespace.")
@click.option("--to-labels", default="", help="Destination labels k=v,k2=v2.")
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="Destination port.")
@click.option("--method", help="HTTP method (makes it an HTTP request; default GET).")
@click.option("--path", "req_path", help="HTTP request target, normalized as the proxy would.")
@click.option("--host", help="HTTP Host.")
@click.option("--header", "headers", multiple=True, help="HTTP header 'name: value' (repeatable).")
@click.option("--merge-slashes/--no-merge-slashes", default=True, show_default=True)
@click.option(
    "--escaped-slash",
    type=click.Choice(["reject", "keep", "decode_and_merge"]),
    default="reject",
    show_default=True,
    help="What %2F, %5C and '\\' in a path do.",
)
@click.option(
    "--inventory",
    "inventory_path",
    type=click.Path(dir_okay=False),
    help="Inventory file, to name pods instead of identities and labels.",
)
@_policy_opts
@OUTPUT
def policy_explain(
    paths,
    src,
    from_pod,
    source_ip,
    to_pod,
    to_namespace,
    to_labels,
    port,
    method,
    req_path,
    host,
    headers,
    merge_slashes,
    escaped_slash,
    inventory_path,
    trust_domain,
    root_namespace,
    output,
) -> None:
    """Would a connection or request be allowed, and which policy and rule decided?"""
    import ipaddress

    from ..identity.spiffe import SpiffeIdError, parse_spiffe_id, workload_id
    from ..policy.evaluate import Request, explain
    from ..policy.http import HttpError, normalize_host, normalize_path

    if (from_pod or to_pod) and not inventory_path:
        raise click.UsageError("--from-pod and --to-pod need --inventory")
    if src and from_pod:
        raise click.UsageError("give --from or --from-pod, not both")
    if bool(to_pod) == bool(to_namespace):
        raise click.UsageError("give exactly one of --to-pod or --to-namespace")
    ps = _load_policy_set(paths, trust_domain, root_namespace, output, 3)
    inv = _load_inventory_pods(inventory_path) if inventory_path else None

    principal = None
    sip = None
    try:
        if src:
            if src.startswith("spiffe://"):
                principal = parse_spiffe_id(src)
            elif src.startswith("ns/"):
                parts = src.split("/")
                if len(parts) != 4 or parts[2] != "sa":
                    raise SpiffeIdError("expected ns/<namespace>/sa/<serviceaccount>")
                principal = workload_id(trust_domain, parts[1], parts[3])
            else:
                principal = parse_spiffe_id("spiffe://" + src)
    except SpiffeIdError as e:
        raise click.BadParameter(str(e), param_hint="--from") from None
    if principal is not None and not principal.path:
        raise click.BadParameter(
            f"{src!r} names a trust domain, not a workload; write ns/<namespace>/sa/<serviceaccount>",
            param_hint="--from",
        )
    if from_pod:
        pod = _find_pod(inv, from_pod, "--from-pod")
        principal = workload_id(trust_domain, pod.namespace, pod.service_account)
        sip = sorted(pod.ips, key=lambda a: a.version)[0]
    if source_ip:
        try:
            sip = ipaddress.ip_address(source_ip)
        except ValueError:
            raise click.BadParameter(
                f"{source_ip!r} is not an IP address", param_hint="--source-ip"
            ) from None
    if to_pod:
        pod = _find_pod(inv, to_pod, "--to-pod")
        dst_ns, labels = pod.namespace, dict(pod.labels)
    else:
        dst_ns, labels = to_namespace, {}
        for item in filter(None, (x.strip() for x in to_labels.split(","))):
            k, eq, v = item.partition("=")
            if not eq or not k:
                raise click.BadParameter(f"{item!r} is not k=v", param_hint="--to-labels")
            labels[k] = v

    is_http = any(x is not None for x in (method, req_path, host)) or bool(headers)
    norm = None
    hdrs: dict[str, list[str]] = {}
    try:
        if is_http:
            norm = normalize_path(req_path or "/", merge_slashes=merge_slashes, escaped_slash=escaped_slash)
            host = normalize_host(host) if host is not None else None
            for h in headers:
                name, colon, value = h.partition(":")
                if not colon or not name.strip():
                    raise click.BadParameter(f"{h!r} is not 'name: value'", param_hint="--header")
                hdrs.setdefault(name.strip().lower(), []).append(value.strip())
    except HttpError as e:
        if output == "json":
            echo_json(
                {"allowed": False, "action": "REJECTED", "status": e.status, "reason": e.reason}, indent=None
            )
        else:
            click.echo(f"REJECTED  with {e.status} before any policy is consulted: {e.reason}")
        sys.exit(1)
    req = Request(
        dst_ns,
        labels,
        port,
        principal,
        sip,
        is_http,
        (method or "GET") if is_http else None,
        norm.path if norm else None,
        host,
        {k: tuple(v) for k, v in hdrs.items()},
    )
    decision, traces = explain(ps, req)
    if output == "json":
        d = decision.to_dict()
        d.update(
            version=ps.version,
            request=req.describe(),
            normalizedTarget=norm.target if norm else None,
            trace=[
                {
                    "policy": t.policy,
                    "action": t.action.value,
                    "rule": t.rule,
                    "outcome": t.outcome,
                    "detail": t.detail,
                    "origin": t.origin,
                }
                for t in traces
            ],
        )
        echo_json(d)
    else:
        verdict = "ALLOWED" if decision.allowed else "DENIED"
        click.echo(f"{verdict:<9} {decision.reason}" + (f"  [{decision.origin}]" if decision.origin else ""))
        click.echo(f"request   {req.describe()}")
        if norm is not None and norm.target != req_path:
            click.echo(f"target    {req_path or '/'!r} normalized to {norm.target!r} (matched and forwarded)")
        for a in decision.audited:
            click.echo(f"audited   {a}  [{a.origin}]")
        click.echo(f"policies  {len({t.policy for t in traces})} apply, set version {ps.version}")
        for t in traces:
            rule = f"rule {t.rule}" if t.rule >= 0 else "-"
            click.echo(f"  {t.action.value:<6} {t.policy:<36} {rule:<8} {t.outcome:<9} {t.detail}")
    sys.exit(0 if decision.allowed else 1)


@policy.command("lint")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option(
    "--inventory",
    "inventory_path",
    type=click.Path(dir_okay=False),
    help="Inventory file: report selectors that match no pod.",
)
@click.option("--http-ports", default=None, help="Ports known to carry HTTP, e.g. 80,8080.")
@click.option(
    "--gateway",
    "gateway_paths",
    multiple=True,
    type=click.Path(),
    help="Gateway API HTTPRoute (and Envoy Gateway SecurityPolicy) files or directories to check "
    "against the mesh's policies (repeatable). Exit 2 if they do not load.",
)
@click.option(
    "--gateway-identity",
    default=None,
    help="The gateway's identity (spiffe://td/ns/N/sa/S, td/ns/N/sa/S or ns/N/sa/S); needed with --gateway.",
)
@_policy_opts
@OUTPUT
def policy_lint(
    paths, inventory_path, http_ports, gateway_paths, gateway_identity, trust_domain, root_namespace, output
) -> None:
    """Shadowed rules, contradicting ALLOW/DENY pairs, unused selectors, HTTP rules on non-HTTP ports.

    With --gateway: also the gateway's routes against the mesh (route-denied,
    deny-covers-route, unexposed-allow, double-retries, timeout-shorter,
    jwt-mismatch), each with file:line:column.  Exit 0 clean, 1 findings,
    2 unreadable input."""
    from ..policy.lint import lint

    if gateway_paths and not gateway_identity:
        raise click.UsageError("--gateway needs --gateway-identity (the gateway's SPIFFE ID)")

    ports = None
    if http_ports is not None:
        try:
            ports = [int(x) for x in http_ports.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(
                f"{http_ports!r} is not a list of ports", param_hint="--http-ports"
            ) from None
    from ..policy.lint import Finding
    from ..traffic.trafficpolicy import lint_traffic

    ps, ts = _load_documents(paths, trust_domain, root_namespace, output, 2 if gateway_paths else 3)
    pods = None
    found: list = []
    inv = None
    if inventory_path:
        inv = _load_inventory_pods(inventory_path)
        pods = [(p.namespace, dict(p.labels)) for p in inv.pods]
        services = [(sv.namespace, sv.name, tuple(pt.port for pt in sv.ports)) for sv in inv.services]
        found += [
            Finding(kind, key, None, origin, msg) for kind, key, origin, msg in lint_traffic(ts, services)
        ]
    found = lint(ps, pods=pods, http_ports=ports) + found
    if gateway_paths:
        found += _gateway_findings(gateway_paths, gateway_identity, ps, ts, inv, trust_domain, output)
    if output == "json":
        echo_json({"version": ps.version, "findings": [f.to_dict() for f in found]})
    else:
        for f in found:
            click.echo(str(f))
        click.echo(f"{len(found)} finding(s) in {len(ps)} policies")
    sys.exit(1 if found else 0)


def _gateway_findings(gateway_paths, identity, ps, ts, inv, trust_domain, output) -> list:
    """``lint --gateway``: read the gateway's files (exit 2 if they do not
    load) and check them against the mesh's sets (agent/policy/gatewaylint.py)."""
    from ..policy.gatewaylint import MeshTraffic, lint_gateway, parse_gateway
    from ..policy.load import read_sources
    from ..yamlsrc import SourceError

    try:
        cfg = read_sources(list(gateway_paths), parse_gateway)
    except SourceError as e:
        if output == "json":
            echo_json({"valid": False, "errors": [p.as_dict() for p in e.errors]}, indent=None)
            sys.exit(2)
        die(f"gateway files do not load:\n{e}", 2)
    if identity.startswith("spiffe://"):
        gw = identity
    elif identity.startswith("ns/"):
        gw = f"spiffe://{trust_domain}/{identity}"
    else:
        gw = "spiffe://" + identity
    services = {(sv.namespace, sv.name): sv for sv in inv.services} if inv is not None else {}

    def workload(ns: str, name: str, port: int):
        sv = services.get((ns, name))
        if sv is None:
            return {"app": name}, port  # without an inventory: the usual app=<service> label
        sp = sv.port(port)
        return dict(sv.selector), sp.target_port if sp is not None else port

    def traffic(ns: str, name: str, port: int):
        p = ts.policy_for(ns, name, port)
        if p is None:
            return None
        r, t = p.settings.retries, p.settings.timeouts
        return MeshTraffic(r.attempts, r.per_try_timeout, t.request, p.origin)

    try:
        return lint_gateway(cfg, ps, gw, workload=workload, traffic=traffic)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--gateway-identity") from None


# --- policies through the agent (apply/diff/list/get/delete) ---------------------------
# AuthorizationPolicy and TrafficPolicy share the store and these commands.

POLICY_KINDS = {
    "authorizationpolicy": "AuthorizationPolicy",
    "requestauthentication": "RequestAuthentication",
    "trafficpolicy": "TrafficPolicy",
}


def _kind_and_name(name: str, kind: str | None) -> tuple[str | None, str]:
    """``[KIND/]NAME`` and ``--kind`` -> (kind as the agent spells it or None, name)."""
    prefix, slash, rest = name.partition("/")
    if slash:
        if prefix.lower() not in POLICY_KINDS:
            raise click.BadParameter(
                f"{prefix!r} is not a kind; use {' or '.join(POLICY_KINDS)}", param_hint="NAME"
            )
        if kind is not None and kind.lower() != prefix.lower():
            raise click.BadParameter(f"{name!r} and --kind {kind} disagree", param_hint="NAME")
        kind, name = prefix, rest
    if kind is not None:
        if kind.lower() not in POLICY_KINDS:
            raise click.BadParameter(
                f"{kind!r} is not a kind; use {' or '.join(POLICY_KINDS)}", param_hint="--kind"
            )
        kind = POLICY_KINDS[kind.lower()]
    return kind, name


def _policy_path(name: str, namespace: str, kind: str | None) -> str:
    from urllib.parse import quote

    kind, name = _kind_and_name(name, kind)
    path = f"/v1/policies/{quote(namespace, safe='')}/{quote(name, safe='')}"
    return path + (f"?kind={kind}" if kind else "")


KIND_OPT = click.option(
    "--kind",
    default=None,
    help="authorizationpolicy, requestauthentication or trafficpolicy (or write KIND/NAME); "
    "needed only when both kinds have this name.",
)


def _policy_sources(paths) -> list[dict]:
    """Every file of ``-f`` paths, read here: the agent gets their text and names."""
    from ..policy.load import policy_files
    from ..yamlsrc import SourceError, read_text

    files, problems = [], []
    for path in paths:
        found = policy_files(path)
        if not found:
            problems.append(f"{path}: directory has no .yaml or .yml files")
        for f in found:
            try:
                files.append({"filename": f, "text": read_text(f)})
            except SourceError as e:
                problems.append(str(e))
    if problems:
        die("cannot read the policies:\n" + "\n".join(problems))
    return files


#: How long `apply`/`diff`/`delete` wait for the agent's answer.  The agent
#: answers when the change is in its store and this node's kernel; a large set
#: takes seconds, and giving up early would report a failure for an apply that
#: then succeeds.
POLICY_CALL_TIMEOUT = 600.0
#: Seconds between "still waiting" lines on stderr.
PROGRESS_EVERY = 5.0


def _policy_call(
    sock: str, method: str, path: str, body: dict | None = None, fail: int = 1
) -> tuple[int, dict]:
    """Call the agent and wait for its real answer (up to
    :data:`POLICY_CALL_TIMEOUT`), saying on stderr every
    :data:`PROGRESS_EVERY` seconds that it is still waiting; exit ``fail``
    when the agent cannot be reached, answers garbage or never answers."""
    import threading
    import time

    from ..adminclient import admin_request

    got: list = []

    def call() -> None:
        try:
            got.append(admin_request(sock, method, path, body, timeout=POLICY_CALL_TIMEOUT))
        except (OSError, ValueError) as e:
            got.append(e)

    worker = threading.Thread(target=call, name="meshlet-admin-call", daemon=True)
    started = time.monotonic()
    worker.start()
    while True:
        worker.join(PROGRESS_EVERY)
        if not worker.is_alive():
            break
        click.echo(f"waiting for the agent ({time.monotonic() - started:.0f} s)...", err=True)
    answer = got[0]
    if isinstance(answer, OSError):
        if isinstance(answer, TimeoutError):
            die(
                f"the agent at {sock} did not answer within {POLICY_CALL_TIMEOUT:.0f} s; "
                "check `meshlet status` and `meshlet policy list` for what it applied",
                fail,
            )
        unreachable(sock, answer, fail)
    if isinstance(answer, ValueError):
        die(f"unexpected answer from {sock}: {answer}", fail)
    return answer


def _invalid(data: dict, output: str, code: int) -> NoReturn:
    """The agent refused the documents: its errors, then exit ``code``."""
    if output == "json":
        echo_json({"valid": False, "errors": data.get("errors", []), "error": data.get("error")}, indent=None)
        sys.exit(code)
    die(("invalid policies, nothing changed:\n" if data.get("errors") else "") + str(data.get("error")), code)


FILES = click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="A policy file or a directory of *.yaml/*.yml (repeatable).",
)
NAMESPACE = click.option(
    "-n", "--namespace", default="default", show_default=True, help="The policy's namespace."
)


@policy.command("apply")
@FILES
@agent_opts
@kube_opts
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Kubernetes mode: wait until the nodes report on the written generation.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="Kubernetes mode: seconds --wait waits.",
)
@_policy_opts
@OUTPUT
def policy_apply(
    paths, sock, node, kubeconfig, context, in_cluster, wait, timeout, trust_domain, root_namespace, output
) -> None:
    """Create or update policies (AuthorizationPolicy, TrafficPolicy) in the
    agent, all or none.

    Prints created / configured / unchanged per document; warnings (a
    TrafficPolicy for a service the agent's inventory does not have) go to
    stderr and do not fail the apply.  Exit codes: 0 applied;
    1 invalid input (file:line:column: field: what; nothing was changed) or the
    agent could not be reached; 2 usage.

    \b
    Kubernetes mode (--kubeconfig FILE, or --in-cluster): the files are
    checked here first (nothing is written if one is invalid), then each
    document is created, or replaced at the resourceVersion read, as a
    custom resource; meshlet.io/v1alpha1 documents as meshlet's kinds,
    security.istio.io ones as Istio's AuthorizationPolicy.  With --wait
    (default) it then waits up to --timeout seconds until the nodes report
    Accepted or refused on the written generation of each meshlet object,
    and prints it.  Exit codes: 0 written and accepted; 1 invalid input,
    an API error, an object refused by the nodes, or no report in time.
    """
    files = _policy_sources(paths)
    client = client_from(kubeconfig, context, in_cluster)
    if client is not None:
        from . import policykube

        _load_documents(paths, trust_domain, root_namespace, output, 1)
        policykube.apply(client, files, output, wait, timeout)
    code, data = _policy_call(admin_socket(sock, node), "POST", "/v1/policies:apply", {"files": files})
    if code == 400 and "errors" in data:
        _invalid(data, output, 1)
    if code != 200:
        die(f"agent answered {code}: {data.get('error')}")
    for w in data.get("warnings") or []:
        click.echo(f"warning: {w}", err=True)
    if output == "json":
        echo_json(data)
        return
    for c in data["changes"]:
        kind = c.get("kind", "AuthorizationPolicy").lower()
        click.echo(f"{kind} {c['namespace']}/{c['name']} {c['result']}")
    click.echo(f"version {data['version']} ({data['count']} policies)")


@policy.command("diff")
@FILES
@agent_opts
@kube_opts
@_policy_opts
def policy_diff(paths, sock, node, kubeconfig, context, in_cluster, trust_domain, root_namespace) -> None:
    """What `apply` would change, as a unified diff per policy (the agent's
    stored YAML against the new).  Changes nothing.

    Kubernetes mode (--kubeconfig FILE, or --in-cluster): the cluster's
    objects (their policy fields) against the files.

    Exit codes: 0 no differences; 1 differences; 2 usage; 3 invalid input or
    the agent (or the API) could not be reached.
    """
    files = _policy_sources(paths)
    client = client_from(kubeconfig, context, in_cluster)
    if client is not None:
        from . import policykube

        _load_documents(paths, trust_domain, root_namespace, "table", 3)
        policykube.diff(client, files)
    code, data = _policy_call(admin_socket(sock, node), "POST", "/v1/policies:diff", {"files": files}, fail=3)
    if code == 400 and "errors" in data:
        _invalid(data, "table", 3)
    if code != 200:
        die(f"agent answered {code}: {data.get('error')}", 3)
    if data["diff"]:
        click.echo(data["diff"], nl=False)
    sys.exit(1 if any(c["result"] != "unchanged" for c in data["changes"]) else 0)


@policy.command("list")
@agent_opts
@OUTPUT
def policy_list(sock, node, output) -> None:
    """The policies the agent holds, and their version.  Exit codes: 0; 1 the
    agent could not be reached; 2 usage."""
    code, data = _policy_call(admin_socket(sock, node), "GET", "/v1/policies")
    if code != 200:
        die(f"agent answered {code}: {data.get('error')}")
    if output == "json":
        echo_json(data)
        return

    def row(p: dict) -> tuple[str, ...]:
        if p.get("kind", "AuthorizationPolicy") == "AuthorizationPolicy":
            sel = ",".join(f"{k}={v}" for k, v in p["selector"].items()) or "*"
            return (
                "AuthorizationPolicy",
                p["namespace"],
                p["name"],
                f"{p['action']} selector {sel}, {p['rules']} rule(s)",
            )
        if p["kind"] == "RequestAuthentication":
            sel = ",".join(f"{k}={v}" for k, v in p["selector"].items()) or "*"
            return (
                p["kind"],
                p["namespace"],
                p["name"],
                f"selector {sel}, issuers {', '.join(p['issuers'])}",
            )
        port = f":{p['port']}" if p.get("port") is not None else ""
        return (
            p["kind"],
            p["namespace"],
            p["name"],
            f"service {p.get('service')}{port}, {p.get('retries')} retries",
        )

    for line in table_lines([("KIND", "NAMESPACE", "NAME", "WHAT")] + [row(p) for p in data["policies"]]):
        click.echo(line)
    click.echo(f"{data['count']} policies, version {data['version']}")


@policy.command("get")
@click.argument("name")
@NAMESPACE
@KIND_OPT
@agent_opts
@click.option(
    "-o",
    "--output",
    type=click.Choice(["yaml", "json"]),
    default="yaml",
    show_default=True,
    help="Output format.",
)
def policy_get(name, namespace, kind, sock, node, output) -> None:
    """One document as the agent stores it; NAME may be KIND/NAME
    (trafficpolicy/backend).  Exit codes: 0; 1 no such policy, a name both
    kinds have without a kind, or the agent could not be reached; 2 usage."""
    path = _policy_path(name, namespace, kind)
    code, data = _policy_call(admin_socket(sock, node), "GET", path)
    if code != 200:
        die(data.get("error") or f"agent answered {code}")
    if output == "json":
        echo_json(data["document"])
    else:
        click.echo(data["yaml"], nl=False)


@policy.command("delete")
@click.argument("name")
@NAMESPACE
@KIND_OPT
@agent_opts
@kube_opts
def policy_delete(name, namespace, kind, sock, node, kubeconfig, context, in_cluster) -> None:
    """Remove one document from the agent; NAME may be KIND/NAME.  Exit codes:
    0 deleted; 1 no such policy, a name both kinds have without a kind, or
    the agent could not be reached; 2 usage.

    Kubernetes mode (--kubeconfig FILE, or --in-cluster): deletes the
    custom resource, meshlet's or, where Istio's CRD is installed, Istio's
    AuthorizationPolicy (every node drops it); a name several of them have
    needs the kind, and kubectl for Istio's."""
    client = client_from(kubeconfig, context, in_cluster)
    if client is not None:
        from . import policykube

        k, n = _kind_and_name(name, kind)
        policykube.delete(client, n, namespace, k)
        return
    path = _policy_path(name, namespace, kind)
    code, data = _policy_call(admin_socket(sock, node), "DELETE", path)
    if code != 200:
        die(data.get("error") or f"agent answered {code}")
    kind = data.get("kind", "AuthorizationPolicy").lower()
    click.echo(f"{kind} {data['deleted']} deleted (version {data['version']})")


COMMANDS = [policy]
