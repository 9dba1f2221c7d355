"""The privileged tier (root + real kernel features): its guards, and the
simulated clusters (agent.sim) the end-to-end files share — a mesh brought
up and always torn down, the pod traffic tools, the CLI against a node."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest


def missing_privileges() -> list[str]:
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            reasons.append(f"needs `{tool}` (apt-get install iproute2 util-linux)")
    if not os.path.ismount("/sys/fs/bpf"):
        reasons.append("needs bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)")
    try:
        from agent.cgroup import cgroup2_mount
        cgroup2_mount()
    except Exception as e:  # noqa: BLE001
        reasons.append(f"needs a cgroup v2 mount ({e})")
    return reasons


def require_privileged() -> None:
    """Skip the calling module (with the reason) unless root + kernel bits."""
    reasons = missing_privileges()
    if reasons:
        pytest.skip("privileged tier: " + "; ".join(reasons), allow_module_level=True)


# --- shared by the end-to-end files ------------------------------------------------

TOOLS = [sys.executable, "-m", "agent.sim.tools"]


def wait_for(pred, what: str, timeout: float = 30.0, interval: float = 0.1):
    """Poll ``pred`` until it returns something truthy (returned) or fail
    after ``timeout`` seconds — a bound, never a timing claim."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


#: Shared objects that mean LLVM is in a process (bcc's libbcc embeds it).
LLVM_LIBS = ("libbcc", "libllvm", "libclang")


def worker_stats(mesh, node: str) -> list[dict]:
    """Every proxy worker's stats of ``node``.  ``meshlet status`` leaves out
    a worker that did not answer its stats socket within 0.5 s (busy closing
    thousands of connections, or just descheduled on a loaded machine): such
    a worker is asked again rather than summed as zero."""
    def answered():
        st = [w["stats"] for w in mesh.status(node)["proxy"]]
        return all(st) and st
    return wait_for(answered, f"every worker of {node} answers its stats socket")


def worker_counters(mesh, node: str) -> dict[str, int]:
    """The counters of every proxy worker of ``node``, summed."""
    total: dict[str, int] = {}
    for st in worker_stats(mesh, node):
        for k, v in (st.get("counters") or {}).items():
            total[k] = total.get(k, 0) + v
    return total


def llvm_mappings(pid: int) -> list[str]:
    """Files mapped by ``pid`` that carry LLVM (libbcc, libLLVM, libclang*):
    the long-running agent must map none (the loader step carries them)."""
    found = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            path = parts[5].strip() if len(parts) == 6 else ""
            if any(lib in os.path.basename(path).lower() for lib in LLVM_LIBS):
                found.add(path)
    return sorted(found)


def agent_llvm(mesh, node: str) -> list[str]:
    """:func:`llvm_mappings` of ``node``'s running agent (the exec wrapper
    keeps its pid, and so does `meshlet run`'s exec of the daemon, so the
    Popen's pid is the agent itself, running as ``agent.daemon``)."""
    p = mesh.agents[node].popen
    assert p is not None and p.poll() is None, f"no agent running on {node}"
    with open(f"/proc/{p.pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[1:5] == [b"-S", b"-P", b"-m", b"agent.daemon"], f"pid {p.pid} is not {node}'s agent daemon: {argv}"
    return llvm_mappings(p.pid)


def start_servers(cluster, servers=(("serve", 7000), ("echo", 7001)), max_seconds: int = 900):
    """Start the pod traffic tools in every pod and wait until they listen."""
    for pod in cluster.pods:
        for kind, port in servers:
            p = pod.popen(TOOLS + [kind, "--port", str(port), "--max-seconds", str(max_seconds)],
                          stdout=subprocess.PIPE, text=True)
            assert "listening" in p.stdout.readline(), f"{kind} on {pod.name}:{port}"


def start_listening(cluster, pods, argv: list[str]) -> None:
    """Run ``argv`` in each of ``pods`` (names) and wait until each prints a
    first line saying "listening"."""
    for name in pods:
        p = cluster.pod(name).popen(argv, stdout=subprocess.PIPE, text=True)
        assert "listening" in p.stdout.readline(), name


@contextlib.contextmanager
def running_mesh(cluster, servers=None, *, max_seconds: int = 900,
                 pod_servers: tuple[tuple[str, ...], list[str]] | None = None, **mesh_kw) -> Iterator:
    """Bring ``cluster`` (an agent.sim.Cluster, not yet up) up, start the pod
    traffic tools ``servers`` (see :func:`start_servers`; None: none), then
    ``pod_servers`` ((pod names, argv): a server of the test's own in each of
    those pods, see :func:`start_listening`), then a Mesh(cluster, **mesh_kw)
    over it; yields the Mesh.  Mesh and cluster are torn down whatever
    happens, in that order (the cluster stops every process in its pods)."""
    from agent.sim.mesh import Mesh

    with cluster:
        m = Mesh(cluster, **mesh_kw)
        try:
            if servers is not None:
                start_servers(cluster, servers, max_seconds=max_seconds)
            if pod_servers is not None:
                start_listening(cluster, *pod_servers)
            m.start()
            yield m
        finally:
            m.down()


def meshlet(mesh, node: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``meshlet <args> --socket <node's admin socket>``, as a user runs it."""
    from agent.sim.mesh import _env

    sock = os.path.join(mesh.agents[node].run_dir, "admin.sock")
    return subprocess.run([sys.executable, "-m", "agent.cli", *args, "--socket", sock],
                          capture_output=True, text=True, env=_env(), timeout=timeout)


def policy_cli(mesh, node: str, *args: str) -> subprocess.CompletedProcess:
    """``meshlet policy <args>`` against ``node``'s agent."""
    return mesh.policy(node, *args)


def ip_of(mesh, pod: str, v6: bool = False) -> str:
    p = mesh.cluster.pod(pod)
    return p.ip6 if v6 else p.ip4


def gateway(mesh, node: str, v6: bool = False) -> str:
    """The node's address on its pods' side: the peer a pod sees when the node's proxy delivers."""
    n = mesh.cluster.node(node)
    return n.gateway6 if v6 else n.gateway4


def transfer(mesh, src: str, dst_ip: str, port: int = 7000, up: int = 3 << 20,
             down: int = 2 << 20) -> dict:
    """One ``transfer`` from pod ``src`` to a ``serve`` tool; its JSON report."""
    pod = mesh.cluster.pod(src)
    r = pod.run(TOOLS + ["transfer", dst_ip, str(port), "--up", str(up), "--down", str(down),
                         "--timeout", "20"], check=False, timeout=60)
    assert r.stdout, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def probe(mesh, src: str, dst_ip: str, port: int, timeout: float = 3.0) -> dict:
    """One ``probe`` (connect, exchange a line) from pod ``src``; its JSON report."""
    r = mesh.cluster.pod(src).run(TOOLS + ["probe", dst_ip, str(port), "--timeout",
                                           str(timeout)], check=False, timeout=30)
    return json.loads(r.stdout.strip().splitlines()[-1])


def wait_policies_enforced(mesh, timeout: float = 20.0) -> None:
    """Until every proxy worker of every node of ``mesh`` (agent.sim.mesh.Mesh)
    reports its agent's policy version."""

    wait_for(mesh.policies_enforced, "the proxies to load the applied policies", timeout=timeout, interval=0.1)


class EchoSession:
    """A long-lived connection from pod ``src`` to an echo server (the
    ``session`` tool of agent.sim.tools), driven line by line: ``say``
    sends a line and returns the echo's JSON answer; ``hello`` is what the
    tool printed once connected (its ``connected`` and ``peer`` addresses)."""

    def __init__(self, mesh, src: str, dst_ip: str, port: int = 7001):
        self.p = mesh.cluster.pod(src).popen(
            TOOLS + ["session", dst_ip, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = json.loads(self.p.stdout.readline() or '{"error": "tool exited"}')
        assert "connected" in self.hello, self.hello

    def say(self, msg: str) -> dict:
        self.p.stdin.write(msg + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline() or '{"error": "tool exited"}')

    def close(self) -> int:
        self.p.stdin.close()
        return self.p.wait(timeout=30)


def ask_node_ca(mesh, node: str, identity: str) -> dict:
    """Ask ``node``'s agent to sign a fresh CSR for ``identity`` over its CA
    socket (as a proxy worker does); its JSON answer."""
    import socket

    from agent.identity.spiffe import parse_spiffe_id
    from agent.identity.svid import generate_key, make_csr

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(os.path.join(mesh.agents[node].run_dir, "ca.sock"))
        csr = make_csr(parse_spiffe_id(identity), generate_key()).decode()
        s.sendall(json.dumps({"op": "sign", "identity": identity, "csr": csr}).encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data)
