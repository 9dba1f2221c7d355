"""Kubernetes objects to the workload model (agent/workloads/kubeobjects.py)
and kubelet cgroup paths (agent/workloads/kubecgroup.py): pure, no server.
The objects come from the test API server's factories and are validated
against the official schema, as the server would serve them."""

from __future__ import annotations

import ipaddress

import pytest

from agent.workloads import kubecgroup
from agent.workloads.kubeobjects import build_inventory, pod_enrolled, slim
from tests.support import kubeapi as k

UID = "0b8e3f2a-1c4d-4e5f-8a9b-0c1d2e3f4a5b"


def recs(kind, *objs):
    out = []
    for o in objs:
        k.validate(o)
        out.append(slim(kind, o))
    return out


def inventory(pods=(), nodes=None, namespaces=(), services=(), slices=(), this_node="node1"):
    nodes = nodes if nodes is not None else [k.node("node1", "198.18.0.1"), k.node("node2", "198.18.0.2")]
    return build_inventory(
        pods=recs("Pod", *pods),
        nodes=recs("Node", *nodes),
        namespaces=recs("Namespace", *namespaces),
        services=recs("Service", *services),
        slices=recs("EndpointSlice", *slices),
        this_node=this_node,
        cgroup_of=lambda p: f"/cg/{p.uid}",
    )


ENABLED = {"meshlet.io/dataplane-mode": "enabled"}
DISABLED = {"meshlet.io/dataplane-mode": "disabled"}


@pytest.mark.parametrize(
    "ns_labels,pod_labels,phase,host,enrolled",
    [
        ({}, {}, "Running", False, False),  # nothing asks for it
        (ENABLED, {}, "Running", False, True),  # the namespace enrolls
        ({}, ENABLED, "Running", False, True),  # the pod enrolls itself
        (ENABLED, DISABLED, "Running", False, False),  # the pod opts out
        (ENABLED, {}, "Pending", False, False),  # not Running
        (ENABLED, ENABLED, "Pending", False, False),
        (ENABLED, ENABLED, "Running", True, False),  # hostNetwork: never
        ({"meshlet.io/dataplane-mode": "yes"}, {}, "Running", False, False),  # only "enabled" enrolls
    ],
)
def test_enrollment_rules(ns_labels, pod_labels, phase, host, enrolled):
    ns = recs("Namespace", k.namespace("shop", ns_labels))[0]
    p = recs("Pod", k.pod("web", "shop", "node1", ["10.244.1.10"], labels=pod_labels, phase=phase,
                          host_network=host))[0]
    assert pod_enrolled(p, ns) is enrolled


def test_pods_nodes_and_cgroups():
    inv, notes = inventory(
        pods=[
            k.pod("web", "shop", "node1", ["10.244.1.10", "fd00:244:1::10"], labels={"app": "web"}, sa="web",
                  uid=UID),
            k.pod("db", "shop", "node2", ["10.244.2.10"], labels={"app": "db"}),
            k.pod("pending", "shop", "node1", []),  # no IP yet: not in the inventory
            k.pod("done", "shop", "node1", ["10.244.1.99"], phase="Succeeded"),  # its IP may be reused
            k.pod("hostnet", "kube-system", "node1", ["198.18.0.1"], host_network=True),  # the node's IP
        ],
        nodes=[k.node("node1", "198.18.0.1", "fd00:198:18::1"), k.node("node2", "198.18.0.2"),
               k.node("v6only", "fd00:198:18::3")],
        namespaces=[k.namespace("shop", ENABLED)],
    )
    assert [n.name for n in inv.nodes] == ["node1", "node2"]
    assert inv.node("node1").address6 == ipaddress.ip_address("fd00:198:18::1")
    assert notes == ["node v6only: no IPv4 InternalIP; left out (meshlet tunnels to an IPv4 address)"]
    assert [p.key for p in inv.pods] == ["shop/db", "shop/web"]
    web = inv.pod("shop/web")
    assert (web.service_account, web.node, web.mesh, dict(web.labels)) == ("web", "node1", True, {"app": "web"})
    assert [str(a) for a in web.ips] == ["10.244.1.10", "fd00:244:1::10"]
    assert web.cgroup == f"/cg/{UID}"
    assert inv.pod("shop/db").cgroup == ""  # another node's pod: routing and endpoints only


def test_namespace_mode_label_annotation_and_typo():
    inv, notes = inventory(
        namespaces=[
            k.namespace("a", {"meshlet.io/mode": "strict"}),
            k.namespace("b", annotations={"meshlet.io/mode": "permissive"}),
            k.namespace("c", {"meshlet.io/mode": "permissive"}, annotations={"meshlet.io/mode": "strict"}),
            k.namespace("d", {"meshlet.io/mode": "strikt"}),
            k.namespace("e"),
        ]
    )
    modes = {n: s.mode for n, s in inv.namespaces.items()}
    assert modes == {"a": "strict", "b": "permissive", "c": "permissive", "d": "strict"}
    assert notes == ["namespace d: meshlet.io/mode='strikt' is neither strict nor permissive; "
                     "enforcing strict until it is fixed"]


def test_services_vips_ports_app_protocol_and_named_target_ports():
    inv, notes = inventory(
        pods=[k.pod("db-0", "shop", "node2", ["10.244.2.10"], labels={"app": "db"})],
        services=[
            k.service("db", "shop", ["10.96.0.10", "fd00:96::10"], {"app": "db"}, [
                {"name": "pg", "port": 5432, "targetPort": "pg"},
                {"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "HTTP"},
                {"name": "h2c", "port": 81, "targetPort": 8081, "appProtocol": "kubernetes.io/h2c"},
                {"name": "raw", "port": 82, "targetPort": 8082, "appProtocol": "tcp"},
                {"name": "unresolved", "port": 83, "targetPort": "nope"},
            ], ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="PreferDualStack"),
            k.service("headless", "shop", ["None"], {"app": "db"}, [{"port": 80}], clusterIP="None",
                      ipFamilies=["IPv4"]),
            k.service("noselector", "shop", ["10.96.0.11"], {}, [{"port": 80}]),
        ],
        slices=[k.endpointslice("db-x1", "shop", "db", [{"name": "pg", "port": 15432}], ["10.244.2.10"])],
    )
    assert [s.key for s in inv.services] == ["shop/db"]
    db = inv.services[0]
    assert [str(v) for v in db.vips] == ["10.96.0.10", "fd00:96::10"]
    assert [(p.name, p.port, p.target_port, p.app_protocol) for p in db.ports] == [
        ("pg", 5432, 15432, None),
        ("http", 80, 8080, "http"),
        ("h2c", 81, 8081, "opaque"),
        ("raw", 82, 8082, "tcp"),
    ]
    assert notes == ["service shop/db port unresolved: targetPort 'nope' is not resolved by an EndpointSlice "
                     "yet; port left out"]
    eps = inv.service_index.endpoints(db, 5432)
    assert [(e.pod, str(e.ip), e.port, e.node) for e in eps] == [("shop/db-0", "10.244.2.10", 15432, "node2")]


def test_duplicate_pod_ip_is_reported_not_fatal():
    inv, notes = inventory(pods=[
        k.pod("a", "x", "node1", ["10.244.1.10"]),
        k.pod("b", "x", "node1", ["10.244.1.10"]),
    ])
    assert [p.key for p in inv.pods] == ["x/a"]
    assert notes == ["pod x/b: IP 10.244.1.10 is also pod x/a's; left out"]


def test_slim_keeps_only_what_meshlet_uses():
    p = k.pod("web", "shop", "node1", ["10.244.1.10"], labels={"app": "web"}, uid=UID)
    p["metadata"]["resourceVersion"] = "42"
    p["metadata"]["annotations"] = {"big": "x" * 10000}
    r = slim("Pod", p)
    assert (r.uid, r.name, r.namespace, r.node, r.phase, r.ips, r.qos, r.rv) == (
        UID, "web", "shop", "node1", "Running", ("10.244.1.10",), "BestEffort", "42")
    assert not hasattr(r, "__dict__")  # slots: no per-object dict
    with pytest.raises(ValueError, match="metadata.name"):
        slim("Pod", {"metadata": {}})


# --- kubelet cgroup layout ---------------------------------------------------------------


@pytest.mark.parametrize(
    "driver,qos,path",
    [
        ("systemd", "Guaranteed", f"kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice"),
        ("systemd", "Burstable",
         f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"),
        ("systemd", "BestEffort",
         f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice"),
        ("systemd", None,
         f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice"),
        ("cgroupfs", "Guaranteed", f"kubepods/pod{UID}"),
        ("cgroupfs", "Burstable", f"kubepods/burstable/pod{UID}"),
        ("cgroupfs", "BestEffort", f"kubepods/besteffort/pod{UID}"),
    ],
)
def test_pod_cgroup_paths(driver, qos, path):
    assert kubecgroup.pod_cgroup("/sys/fs/cgroup", driver, UID, qos) == f"/sys/fs/cgroup/{path}"


def test_pod_cgroup_unknown_driver():
    with pytest.raises(ValueError, match="unknown cgroup driver 'x'"):
        kubecgroup.pod_cgroup("/", "x", UID, None)


def test_detect_driver(tmp_path):
    assert kubecgroup.detect_driver(str(tmp_path)) is None
    (tmp_path / "kubepods").mkdir()
    assert kubecgroup.detect_driver(str(tmp_path)) == "cgroupfs"
    (tmp_path / "kubepods.slice").mkdir()
    assert kubecgroup.detect_driver(str(tmp_path)) == "systemd"


def _last_three_minors() -> list[str]:
    from kubernetes_validate.utils import all_versions

    return all_versions()[-3:]


@pytest.mark.parametrize("version", _last_three_minors())
def test_factories_make_objects_every_recent_api_server_serves(version):
    objs = [
        k.namespace("shop", ENABLED, annotations={"meshlet.io/mode": "strict"}),
        k.node("node1", "198.18.0.1", "fd00:198:18::1"),
        k.pod("web", "shop", "node1", ["10.244.1.10", "fd00:244:1::10"], labels={"app": "web"}, qos="Burstable"),
        k.pod("host", "kube-system", "node1", ["198.18.0.1"], host_network=True),
        k.service("db", "shop", ["10.96.0.10"], {"app": "db"}, [{"name": "pg", "port": 5432, "targetPort": "pg",
                                                                 "appProtocol": "tcp"}]),
        k.endpointslice("db-x", "shop", "db", [{"name": "pg", "port": 15432}], ["10.244.2.10"]),
    ]
    for o in objs:
        k.validate(o, version)
