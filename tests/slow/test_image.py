"""The container image (deploy/Containerfile), built here and run against the
simulated cluster.  Opt-in: ``pytest -m slow tests/slow`` (root; buildah,
podman and debootstrap from Debian; about 5 minutes).

No registry can be pulled from, so the base is made with debootstrap and
imported with podman.  buildah builds with ``--isolation chroot``: Debian's
crun refuses this host's hybrid cgroup layout ("cgroups in hybrid mode not
supported"), and runc fails to start any container here (it sets
RLIMIT_NPROC/NOFILE, which needs CAP_SYS_RESOURCE, a capability this
machine withholds even from root).

So the agents run from the image's root filesystem the way a container
runtime would start the DaemonSet's container, by hand: a private mount
namespace, the DaemonSet's host mounts (host /sys with its bpffs and cgroup
v2 hierarchy, /run/meshlet for the admin socket), chroot into the image, and
the bounding set cut to the DaemonSet's capabilities.  They share the node's
network namespace, as hostNetwork does.  Not emulated: the runtime's pid and
cgroup namespaces, seccomp and AppArmor."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile

import pytest

from tests.support.kubeschema import DEPLOY, ROOT
from tests.support.privileged import gateway, ip_of, require_privileged, start_servers, transfer

pytestmark = [pytest.mark.slow, pytest.mark.privileged]

require_privileged()

from agent.sim import Cluster  # noqa: E402
from agent.sim.mesh import Mesh  # noqa: E402

BASE = "localhost/debian:12"
TOOLS = ("buildah", "podman", "debootstrap")
# CAP_SYS_RESOURCE is in the DaemonSet too; this machine has none to give.
CAPS = ("bpf", "perfmon", "net_admin", "sys_admin", "sys_resource")


def _run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if out.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out


def _bounding_set() -> str:
    with open("/proc/self/status") as f:
        have = int(next(ln for ln in f if ln.startswith("CapBnd:")).split()[1], 16)
    bits = {"bpf": 39, "perfmon": 38, "net_admin": 12, "sys_admin": 21, "sys_resource": 24, "dac_override": 1}
    want = [c for c in CAPS if have & (1 << bits[c])]
    # See tests/privileged/test_capabilities.py: this machine's cgroup2 root is 0555.
    from tests.privileged.test_capabilities import cgroup_root_needs_dac_override

    if cgroup_root_needs_dac_override():
        want.append("dac_override")
    return "-all," + ",".join(f"+{c}" for c in want)


@pytest.fixture(scope="module")
def image():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: apt-get install buildah podman debootstrap")
    tag = f"localhost/meshlet:test-{os.getpid()}"
    made_base = False
    tmp = tempfile.mkdtemp(prefix="meshlet-image-")
    ctr = None
    try:
        if subprocess.run(["podman", "image", "exists", BASE], check=False).returncode != 0:
            rootfs = os.path.join(tmp, "rootfs")
            mirror = "http://deb.debian.org/debian"
            _run(["debootstrap", "--variant=minbase", "bookworm", rootfs, mirror], 900)
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            _run(["podman", "import", "-", BASE], 300, stdin=tar.stdout)
            tar.wait(60)
            made_base = True
            shutil.rmtree(rootfs, ignore_errors=True)
        build = ["buildah", "bud", "--isolation", "chroot", "--network", "host"]
        build += ["--build-arg", f"BASE={BASE}"]
        if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):  # pip behind a TLS-intercepting proxy
            build += ["--volume", "/etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro",
                      "--build-arg", "PIP_CERT=/run/host-ca.crt"]
        _run([*build, "-f", str(DEPLOY / "Containerfile"), "-t", tag, str(ROOT)], 1500)
        ctr = _run(["buildah", "from", tag], 120).stdout.strip()
        rootfs = _run(["buildah", "mount", ctr], 60).stdout.strip()
        yield rootfs
    finally:
        if ctr:
            subprocess.run(["buildah", "umount", ctr], capture_output=True, check=False)
            subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False)
        subprocess.run(["buildah", "rmi", "-f", tag], capture_output=True, check=False)
        if made_base:
            subprocess.run(["podman", "rmi", "-f", BASE], capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def container_argv(rootfs: str, workdir: str, argv: list[str]) -> list[str]:
    """``argv`` run from the image the way the DaemonSet's container runs."""
    script = f"""
set -e
R={shlex.quote(rootfs)}
mount --rbind /sys "$R/sys"; mount --rbind /proc "$R/proc"; mount --rbind /dev "$R/dev"
mkdir -p "$R/run/meshlet" "$R"{shlex.quote(workdir)}
mount --bind /run/meshlet "$R/run/meshlet"; mount --bind {shlex.quote(workdir)} "$R"{shlex.quote(workdir)}
exec chroot "$R" setpriv --bounding-set={_bounding_set()} \\
  env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin MESHLET_BPF_DIR=/opt/meshlet/src/bpf \\
  PYTHONUNBUFFERED=1 {shlex.join(argv)}
"""
    return ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script]


class ImageMesh(Mesh):
    rootfs = ""

    def start_agent(self, name, *, keep_datapath=True, wait=True, timeout=180):
        ap = self.agents[name]
        os.makedirs("/run/meshlet", exist_ok=True)
        argv = ["/usr/local/bin/meshlet", "run", "--config", ap.config]
        if keep_datapath:
            argv.append("--keep-datapath")
        with open(ap.log_path, "ab") as logf:
            ap.popen = ap.node.popen(container_argv(self.rootfs, self.workdir, argv),
                                     stdout=logf, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(name, timeout=timeout)
        return ap.popen


def test_the_image_has_bcc_meshlet_and_headers(image):
    out = _run(["chroot", image, "/opt/meshlet/venv/bin/python", "-c",
                "import bcc, agent.app, sys; print(bcc.__version__, sys.executable)"], 120)
    assert out.stdout.split()[0].startswith("0.")
    assert any(n.startswith("linux-headers-") for n in os.listdir(os.path.join(image, "usr/src")))
    assert os.access(os.path.join(image, "usr/local/bin/meshlet-node"), os.X_OK)


def test_the_agent_from_the_image_carries_mesh_traffic(image):
    # bcc compiles against /lib/modules/<release>/build: the entrypoint's links
    krel = os.uname().release
    mod = os.path.join(image, "lib/modules", krel)
    os.makedirs(mod, exist_ok=True)
    arch = sorted(n for n in os.listdir(os.path.join(image, "usr/src")) if n.endswith("-amd64"))[-1]
    common = f"/usr/src/{arch.removesuffix('-amd64')}-common"
    for link, target in (("build", f"/usr/src/{arch}"), ("source", common)):
        if not os.path.lexists(os.path.join(mod, link)):
            os.symlink(target, os.path.join(mod, link))
    cluster = Cluster(nodes=2, pods_per_node=2).up()
    m = ImageMesh(cluster, mode="strict")
    m.rootfs = image
    try:
        start_servers(cluster)
        m.start(timeout=240)
        for name, ap in m.agents.items():
            assert os.readlink(f"/proc/{ap.popen.pid}/root") == image, name  # really chrooted
        r = transfer(m, "pod1-1", ip_of(m, "pod1-2"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(m, "node1"), r
        r = transfer(m, "pod1-1", ip_of(m, "pod2-1"), up=1 << 20, down=1 << 20)
        assert r["ok"] and r["server_saw_peer"] == gateway(m, "node2"), r
    finally:
        m.down()
        cluster.down()
