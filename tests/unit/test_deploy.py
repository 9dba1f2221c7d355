"""deploy/: every manifest is a valid object of the last three Kubernetes minor
versions; the CRDs are structural and admit every example in policies/; the
rules the API server enforces beyond its OpenAPI schema hold (Bidirectional
only when privileged); the DaemonSet and RBAC are what the README promises;
`kubectl kustomize` renders offline; the entrypoint fills in the node."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from agent.policy.gatewaylint import parse_gateway
from agent.policy.load import parse_policies
from agent.traffic.trafficpolicy import parse_traffic_policies
from agent.yamlsrc import SourceError
from tests.support.kubeschema import (
    CRD_DIR,
    DEPLOY,
    ROOT,
    crds,
    last_minor_versions,
    load_docs,
    structural_problems,
    validate_cr,
    validate_k8s,
)

VERSIONS = last_minor_versions(3)
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")
POLICY_FILES = sorted((ROOT / "policies").rglob("*.yaml"))
AGENT_CAPS = {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"}


def all_docs() -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(ROOT)}#{i}", d) for p in MANIFESTS for i, d in enumerate(load_docs(p))]


def one(kind: str, name: str) -> dict:
    found = [d for _, d in all_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def test_three_versions_and_manifests_exist():
    assert len(VERSIONS) == 3 and len(set(VERSIONS)) == 3
    kinds = {d["kind"] for _, d in all_docs()}
    assert kinds >= {
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
        "ConfigMap", "Deployment", "DaemonSet",
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(version):
    for where, doc in all_docs():
        try:
            validate_k8s(doc, version)
        except Exception as e:  # re-raised with the document's place
            raise AssertionError(f"{where} ({doc['kind']}) is not valid in Kubernetes {version}: {e}") from e


@pytest.mark.parametrize("version", VERSIONS)
def test_the_validator_does_refuse_a_broken_daemonset(version):
    import kubernetes_validate

    ds = one("DaemonSet", "meshlet-node")
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitiez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(bad, version)


def test_crd_schemas_are_structural_with_status_and_printer_columns():
    names = set()
    for f in sorted(CRD_DIR.glob("*.yaml")):
        for crd in load_docs(f):
            assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}"
            names.add(crd["spec"]["names"]["kind"])
            for v in crd["spec"]["versions"]:
                assert structural_problems(v["schema"]["openAPIV3Schema"]) == [], f.name
                assert v["subresources"] == {"status": {}}
                cols = {c["name"]: c["jsonPath"] for c in v["additionalPrinterColumns"]}
                assert cols["Accepted"] == '.status.conditions[?(@.type=="Accepted")].status'
                cond = v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
                assert set(cond["items"]["required"]) >= {"type", "status", "reason", "message"}
    assert names == {"AuthorizationPolicy", "TrafficPolicy", "RequestAuthentication"}


def test_the_structural_checker_finds_what_the_api_server_refuses():
    assert structural_problems({"type": "object", "properties": {"a": {}}}) == [".a: no type"]
    string = {"type": "string"}
    both = {"type": "object", "properties": {"a": string}, "additionalProperties": string}
    assert structural_problems(both)
    meta = {"type": "object", "properties": {"metadata": {"type": "object", "properties": {}}}}
    assert structural_problems(meta)


def _policy_docs():
    for p in POLICY_FILES:
        for i, d in enumerate(load_docs(p)):
            yield pytest.param(p, d, id=f"{p.relative_to(ROOT / 'policies')}#{i}")


@pytest.mark.parametrize(("path", "doc"), list(_policy_docs()))
def test_every_policy_example_is_a_valid_custom_resource(path, doc):
    """meshlet.io documents against meshlet's CRDs; Istio's (security.istio.io)
    need Istio's CRD, which meshlet does not ship: checked for the shape every
    Kubernetes object has."""
    meta = doc["metadata"]
    assert set(meta) <= {"name", "namespace", "labels", "annotations"}, path
    assert meta["name"] and meta["namespace"]
    if doc["apiVersion"].startswith("meshlet.io/"):
        validate_cr(doc)
    elif doc["apiVersion"].startswith("gateway.networking.k8s.io/"):  # policies/gateway/routes/
        assert doc["kind"] == "HTTPRoute"
        parse_gateway([(str(path), path.read_text())])
    else:
        assert doc["apiVersion"] in ("security.istio.io/v1", "security.istio.io/v1beta1")
        assert doc["kind"] in ("AuthorizationPolicy", "RequestAuthentication")


def test_the_crd_schema_refuses_wrong_types():
    ap = {
        "apiVersion": "meshlet.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "x", "namespace": "shop"},
        "spec": {"rules": [{"to": [{"operation": {"ports": [True]}}]}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        validate_cr(ap)
    ap["spec"]["rules"][0]["to"][0]["operation"]["ports"] = [8080, "9090"]  # both forms, as the loader takes
    validate_cr(ap)
    tp = {
        "apiVersion": "meshlet.io/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "x", "namespace": "shop"}, "spec": {"port": 80},
    }
    with pytest.raises(jsonschema.ValidationError, match="service"):
        validate_cr(tp)


def test_unknown_fields_reach_the_loader_which_refuses_them():
    """Fail closed: the schema keeps a field meshlet does not implement (the API
    server would otherwise prune it and widen the rule), and meshlet's loader
    refuses the whole resource, naming the field."""
    text = """\
apiVersion: meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: jwt-only, namespace: shop}
spec:
  rules:
    - from:
        - source:
            remoteIpBlocks: ["1.2.3.4"]
"""
    validate_cr(yaml.safe_load(text))
    with pytest.raises(SourceError, match="remoteIpBlocks"):
        parse_policies(text, "jwt-only.yaml")
    typo = """\
apiVersion: meshlet.io/v1alpha1
kind: TrafficPolicy
metadata: {name: t, namespace: shop}
spec:
  service: backend
  retries: {atempts: 0}
"""
    validate_cr(yaml.safe_load(typo))
    with pytest.raises(SourceError, match="atempts"):
        parse_traffic_policies(typo, "t.yaml")


def test_every_crd_kind_has_an_example_that_the_loader_accepts():
    kinds = {(g, k) for (g, _v, k) in crds()}
    seen = set()
    for p in POLICY_FILES:
        if "unsupported" in p.parts:
            continue
        for d in load_docs(p):
            g = d["apiVersion"].split("/")[0]
            seen.add((g, d["kind"]))
        text = p.read_text()
        if "kind: TrafficPolicy" in text:
            parse_traffic_policies(text, str(p))
        elif "kind: HTTPRoute" in text:
            parse_gateway([(str(p), text)])
        else:
            parse_policies(text, str(p))
    assert kinds <= seen


# --- rules the API server checks that no OpenAPI document spells out ----------------


def test_bidirectional_propagation_only_in_privileged_containers():
    for where, doc in all_docs():
        if doc["kind"] not in ("DaemonSet", "Deployment"):
            continue
        for c in containers(doc["spec"]["template"]["spec"]):
            privileged = (c.get("securityContext") or {}).get("privileged", False)
            for m in c.get("volumeMounts", []):
                if m.get("mountPropagation") == "Bidirectional":
                    assert privileged, f"{where} {c['name']}: the API server refuses Bidirectional here"


def test_the_agent_runs_with_capabilities_not_privileged():
    pod = one("DaemonSet", "meshlet-node")["spec"]["template"]["spec"]
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    sc = agent["securityContext"]
    assert sc.get("privileged") is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPS
    # a container that drops privilege escalation cannot be granted CAP_SYS_ADMIN
    assert "allowPrivilegeEscalation" not in sc
    (init,) = pod["initContainers"]
    assert init["securityContext"] == {"privileged": True}
    assert [m["mountPropagation"] for m in init["volumeMounts"]] == ["Bidirectional"]


def test_the_daemonset_is_a_node_agent():
    ds = one("DaemonSet", "meshlet-node")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    # an upgrade starts the new agent beside the old one, which it takes over from (agent/handover.py)
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}
    }
    assert pod["serviceAccountName"] == "meshlet-node"
    agent = pod["containers"][0]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "HOST_IP": "status.hostIP", "POD_NAME": "metadata.name"}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert mounts["/sys/fs/cgroup"]["mountPropagation"] == "HostToContainer"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert vols[mounts["/sys/fs/cgroup"]["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    res = agent["resources"]
    assert set(res) == {"requests", "limits"} and set(res["limits"]) == {"cpu", "memory"}
    # the pod template carries the opt-out label: the mesh never enrolls its own agent
    assert ds["spec"]["template"]["metadata"]["labels"]["meshlet.io/dataplane-mode"] == "disabled"


def test_probes_ask_the_pods_own_agent_and_the_ports_match_the_config():
    """Exec probes of the agent's own health file: on the host network two
    agent pods of a node share the metrics port during an upgrade, so an
    HTTP probe could be answered by the other pod's agent."""
    pod = one("DaemonSet", "meshlet-node")["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert agent["readinessProbe"]["exec"]["command"][-3:] == ["-m", "agent.probe", "ready"]
    assert agent["livenessProbe"]["exec"]["command"][-3:] == ["-m", "agent.probe", "live"]
    assert all("httpGet" not in agent[p] for p in ("readinessProbe", "livenessProbe"))
    cfg = yaml.safe_load(one("ConfigMap", "meshlet-config")["data"]["config.yaml"])
    assert ports["metrics"] == cfg["metrics"]["port"]
    assert (ports["outbound"], ports["tunnel"]) == (15001, 15008)
    # the probe reads <runDir>/health.json: its default run dir is the config's
    from agent.probe import DEFAULT_RUN_DIR

    assert cfg["runDir"] == DEFAULT_RUN_DIR


def test_the_handover_lease_is_shared_and_the_rest_is_per_pod():
    """Two agent pods of a node see the same handoverDir (a hostPath) and
    each its own runDir (an emptyDir); the grace period covers the drain."""
    from agent.supervisor import DRAIN_TIMEOUT, KILL_MARGIN

    pod = one("DaemonSet", "meshlet-node")["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    cfg = yaml.safe_load(one("ConfigMap", "meshlet-config")["data"]["config.yaml"])
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert "hostPath" in vols[mounts[cfg["handoverDir"]]]
    assert "emptyDir" in vols[mounts[cfg["runDir"]]]
    assert pod["terminationGracePeriodSeconds"] >= DRAIN_TIMEOUT + KILL_MARGIN + 5


# --- RBAC: least privilege ----------------------------------------------------------


def _rules(name: str) -> list[dict]:
    return one("ClusterRole", name)["rules"]


def _grants(name: str) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in _rules(name)
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_rbac_has_no_wildcards_and_no_secrets():
    for name in ("meshlet-node", "meshlet-ca"):
        for g, r, v in _grants(name):
            assert "*" not in (g, r, v), name
            assert r != "secrets", name


def test_the_node_agent_only_reads_except_csr_create_and_policy_status():
    writes = {(g, r, v) for g, r, v in _grants("meshlet-node") if v not in ("get", "list", "watch")}
    assert writes == {
        ("certificates.k8s.io", "certificatesigningrequests", "create"),
        ("meshlet.io", "authorizationpolicies/status", "patch"),
        ("meshlet.io", "trafficpolicies/status", "patch"),
        ("meshlet.io", "requestauthentications/status", "patch"),
    }
    reads = {(g, r) for g, r, v in _grants("meshlet-node") if v == "watch"}
    assert reads == {
        ("", "pods"), ("", "nodes"), ("", "namespaces"), ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("meshlet.io", "authorizationpolicies"), ("meshlet.io", "trafficpolicies"),
        ("meshlet.io", "requestauthentications"),
        ("security.istio.io", "authorizationpolicies"), ("security.istio.io", "requestauthentications"),
    }


def test_the_ca_may_sign_only_for_meshlets_signer():
    signers = [r for r in _rules("meshlet-ca") if r["resources"] == ["signers"]]
    assert signers == [
        {
            "apiGroups": ["certificates.k8s.io"],
            "resources": ["signers"],
            "resourceNames": ["meshlet.io/node-intermediate"],
            "verbs": ["approve", "sign"],
        }
    ]
    ca = one("Deployment", "meshlet-ca")
    assert ca["spec"]["replicas"] == 2  # one leader signs (the Lease, below); the other stands by
    pod = ca["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "meshlet-ca"
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_ca_replicas_may_touch_only_their_own_lease():
    """Leader election needs get/update of one Lease (by name) and create
    (which RBAC cannot narrow to a name), in meshlet-system only; no list,
    watch, patch or delete, and nothing in any other namespace."""
    (role,) = [d for _, d in all_docs() if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "meshlet-system"
    grants = {
        (g, r, v, tuple(rule.get("resourceNames") or ()))
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert grants == {
        ("coordination.k8s.io", "leases", "get", ("meshlet-ca",)),
        ("coordination.k8s.io", "leases", "update", ("meshlet-ca",)),
        ("coordination.k8s.io", "leases", "create", ()),
    }
    (binding,) = [d for _, d in all_docs() if d["kind"] == "RoleBinding"]
    assert binding["metadata"]["namespace"] == "meshlet-system"
    sa = {"kind": "ServiceAccount", "name": "meshlet-ca", "namespace": "meshlet-system"}
    assert binding["subjects"] == [sa]
    assert not any("leases" in r["resources"] for r in _rules("meshlet-ca") + _rules("meshlet-node"))
    # the lease the controller is told to use is the one the Role names
    (c,) = one("Deployment", "meshlet-ca")["spec"]["template"]["spec"]["containers"]
    assert "--leader-elect" in c["args"] and "--lease-name=meshlet-ca" in c["args"]


def test_bindings_name_existing_roles_and_accounts():
    accounts = {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for _, d in all_docs()
        if d["kind"] == "ServiceAccount"
    }
    roles = {
        (d["kind"], d["metadata"]["name"]) for _, d in all_docs() if d["kind"] in ("ClusterRole", "Role")
    }
    for _, b in all_docs():
        if b["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            assert (b["roleRef"]["kind"], b["roleRef"]["name"]) in roles
            for s in b["subjects"]:
                assert (s["namespace"], s["name"]) in accounts
    for _, d in all_docs():
        if d["kind"] in ("DaemonSet", "Deployment"):
            sa = d["spec"]["template"]["spec"]["serviceAccountName"]
            assert (d["metadata"]["namespace"], sa) in accounts


# --- kustomize, the config, the entrypoint ------------------------------------------


def test_kubectl_kustomize_renders_everything_offline():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing; bash scripts/bootstrap.sh installs it")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "KUBECONFIG": "/dev/null"}, check=False,
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for _, d in all_docs()
    )
    for d in rendered:  # anchors expanded, nothing lost
        validate_k8s(d, VERSIONS[0])


def _render(tmp_path: pathlib.Path, node: str, host_ip: str) -> subprocess.CompletedProcess:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "meshlet"  # stands in for the agent: shows what it was started with
    fake.write_text('#!/bin/sh\necho "ARGS $*"\n')
    fake.chmod(0o755)
    src = tmp_path / "config.yaml"
    src.write_text(one("ConfigMap", "meshlet-config")["data"]["config.yaml"])
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin", "NODE_NAME": node, "HOST_IP": host_ip,
        "MESHLET_RENDERED_CONFIG": str(tmp_path / "run" / "config.yaml"),
    }
    return subprocess.run(
        ["sh", str(DEPLOY / "image" / "meshlet-node"), "--config", str(src)],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )


def test_the_entrypoint_fills_in_the_node_and_keeps_the_datapath(tmp_path):
    out = _render(tmp_path, "worker-7", "10.0.3.7")
    assert out.returncode == 0, out.stderr
    rendered = tmp_path / "run" / "config.yaml"
    assert out.stdout.split() == ["ARGS", "run", "--config", str(rendered)]
    cfg = yaml.safe_load(rendered.read_text())
    assert cfg["node"] == "worker-7"
    assert cfg["proxy"]["redirectIPv4"] == "10.0.3.7"
    assert cfg["bpf"]["pinDir"] == "/sys/fs/bpf/meshlet/worker-7"
    assert "${" not in rendered.read_text()


def test_the_entrypoint_refuses_odd_values(tmp_path):
    out = _render(tmp_path, "a/b;rm", "10.0.0.1")
    assert out.returncode != 0 and "unexpected characters" in out.stderr
    out = _render(tmp_path, "", "10.0.0.1")
    assert out.returncode != 0 and "NODE_NAME" in out.stderr


def test_the_configmap_config_validates(tmp_path):
    from agent.config import AgentConfig, parse_config

    if "workloads" not in AgentConfig.__dataclass_fields__:
        pytest.skip("agent.config has no `workloads` section yet (the Kubernetes source, issue #11 part A)")
    assert _render(tmp_path, "worker-7", "10.0.3.7").returncode == 0
    rendered = tmp_path / "run" / "config.yaml"
    cfg = parse_config(rendered.read_text(), str(rendered))
    assert cfg.node == "worker-7"
    assert cfg.metrics.port == 15020
