"""meshlet doctor's check engine on fake inputs: no root, no real kernel."""

from __future__ import annotations

import errno
import gzip
import json
import os

import pytest

from agent import doctor
from agent.datapath.bpfsys import BPFError
from agent.config import parse_config
from agent.doctor import Check, Environment

# /proc/self/mountinfo lines, hybrid layout like the dev machines.
CGROUP2_LINE = "35 24 0:30 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
BPFFS_LINE = "59 47 0:41 / /sys/fs/bpf rw,relatime - bpf bpf rw\n"
ROOT_LINE = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"

FULL_CAPS = "000001fffeffffff"   # root on the dev machine (no CAP_SYS_RESOURCE)
BPF_ONLY_CAPS = f"{(1 << 39) | (1 << 38) | (1 << 12):016x}"  # BPF, PERFMON, NET_ADMIN


def write(path, text: str):
    path.write_text(text)
    return str(path)


def status_file(tmp_path, cap_eff: str, uid: int = 0) -> str:
    return write(tmp_path / f"status-{cap_eff}-{uid}",
                 f"Name:\tpython3\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
                 f"CapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")


def config_gz(tmp_path, options: dict[str, str], name: str = "config.gz") -> str:
    path = tmp_path / name
    lines = ["# Automatically generated file; DO NOT EDIT."]
    for key, value in options.items():
        lines.append(f"# {key} is not set" if value == "n" else f"{key}={value}")
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


ALL_OPTIONS = {o: "y" for o in doctor.KERNEL_CONFIG_REQUIRED + doctor.KERNEL_CONFIG_OPTIONAL}


def headers_tree(tmp_path, release: str, *, split: bool = True, link_source: bool = True) -> str:
    """/lib/modules/<release>/{build,source} like Debian's linux-headers packages."""
    src = tmp_path / "usr-src"
    arch = src / "linux-headers-6.1.0-56-amd64"
    common = src / "linux-headers-6.1.0-56-common"
    (arch / "include" / "generated").mkdir(parents=True)
    (common / "include" / "linux").mkdir(parents=True)
    if not split:
        (arch / "include" / "linux").mkdir()
    mod = tmp_path / "modules" / release
    mod.mkdir(parents=True)
    (mod / "build").symlink_to(arch)
    if link_source:
        (mod / "source").symlink_to(common)
    return str(tmp_path / "modules")


def fake_python(tmp_path, script: str) -> str:
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return str(path)


# --- host checks ------------------------------------------------------------

def test_privileges_root_passes(tmp_path):
    c = doctor.check_privileges(status_file(tmp_path, FULL_CAPS))
    assert c.ok and c.name == "privileges"
    assert "euid 0" in c.detail and "CAP_SYS_ADMIN" in c.detail and "CAP_BPF" in c.detail
    assert c.fix is None


def test_privileges_without_sys_admin_fails_with_root_fix(tmp_path):
    c = doctor.check_privileges(status_file(tmp_path, BPF_ONLY_CAPS, uid=1000))
    assert not c.ok and c.required
    assert "euid 1000" in c.detail and "CAP_SYS_ADMIN" not in c.detail
    assert "sudo" in c.fix


def test_privileges_no_caps(tmp_path):
    c = doctor.check_privileges(status_file(tmp_path, "0000000000000000", uid=1000))
    assert not c.ok and "no BPF-related capabilities" in c.detail


@pytest.mark.parametrize("value,ok", [("1", True), ("2", True), ("0", False)])
def test_jit(tmp_path, value, ok):
    c = doctor.check_jit(write(tmp_path / "jit", value + "\n"))
    assert c.ok is ok
    assert not c.required
    if not ok:
        assert c.fix == "sysctl -w net.core.bpf_jit_enable=1"


def test_jit_missing_sysctl(tmp_path):
    c = doctor.check_jit(str(tmp_path / "nope"))
    assert not c.ok and "CONFIG_BPF_JIT" in c.detail


def test_cgroup2_found_in_hybrid_layout(tmp_path):
    c = doctor.check_cgroup2(write(tmp_path / "mi", ROOT_LINE + CGROUP2_LINE))
    assert c.ok and c.detail == "mounted at /sys/fs/cgroup/unified"


def test_cgroup2_missing(tmp_path):
    c = doctor.check_cgroup2(write(tmp_path / "mi", ROOT_LINE + BPFFS_LINE))
    assert not c.ok and c.required
    assert "mount -t cgroup2" in c.fix


def test_bpffs_mounted(tmp_path):
    c = doctor.check_bpffs(write(tmp_path / "mi", ROOT_LINE + BPFFS_LINE), "/sys/fs/bpf")
    assert c.ok and c.fix is None


def test_bpffs_not_mounted(tmp_path):
    c = doctor.check_bpffs(write(tmp_path / "mi", ROOT_LINE + CGROUP2_LINE), "/sys/fs/bpf")
    assert not c.ok and c.fix == "mount -t bpf bpf /sys/fs/bpf"


def test_bpffs_wrong_filesystem_at_path(tmp_path):
    tmpfs = "60 47 0:42 / /sys/fs/bpf rw - tmpfs tmpfs rw\n"
    c = doctor.check_bpffs(write(tmp_path / "mi", ROOT_LINE + tmpfs), "/sys/fs/bpf")
    assert not c.ok and "tmpfs" in c.detail


def test_bpffs_elsewhere_does_not_count(tmp_path):
    other = "59 47 0:41 / /mnt/bpf rw,relatime - bpf bpf rw\n"
    c = doctor.check_bpffs(write(tmp_path / "mi", other), "/sys/fs/bpf")
    assert not c.ok


def test_btf(tmp_path):
    assert doctor.check_btf(write(tmp_path / "vmlinux", "")).ok
    c = doctor.check_btf(str(tmp_path / "missing"))
    assert not c.ok and not c.required and "CONFIG_DEBUG_INFO_BTF" in c.fix


# --- kernel config ------------------------------------------------------------

def test_kernel_config_complete(tmp_path):
    c = doctor.check_kernel_config([config_gz(tmp_path, ALL_OPTIONS)])
    assert c.ok, c


def test_kernel_config_reports_each_missing_required_option(tmp_path):
    opts = dict(ALL_OPTIONS, CONFIG_CGROUP_BPF="n")
    del opts["CONFIG_BPF_STREAM_PARSER"]
    c = doctor.check_kernel_config([config_gz(tmp_path, opts)])
    assert not c.ok and c.required
    assert "CONFIG_CGROUP_BPF" in c.detail and "CONFIG_BPF_STREAM_PARSER" in c.detail
    assert "CONFIG_NET_CLS_BPF" not in c.detail
    assert "CONFIG_CGROUP_BPF=y" in c.fix


def test_kernel_config_missing_optional_only_is_not_required(tmp_path):
    c = doctor.check_kernel_config([config_gz(tmp_path, dict(ALL_OPTIONS, CONFIG_VETH="n"))])
    assert not c.ok and not c.required
    assert "CONFIG_VETH" in c.detail


def test_kernel_config_module_counts_as_present(tmp_path):
    c = doctor.check_kernel_config([config_gz(tmp_path, dict(ALL_OPTIONS, CONFIG_NET_CLS_BPF="m"))])
    assert c.ok


def test_kernel_config_falls_back_to_plain_boot_config(tmp_path):
    boot = tmp_path / "config-6.1.0"
    boot.write_text("\n".join(f"{k}=y" for k in ALL_OPTIONS) + "\n")
    c = doctor.check_kernel_config([str(tmp_path / "config.gz"), str(boot)])
    assert c.ok and str(boot) in c.detail


def test_kernel_config_unreadable_is_a_warning(tmp_path):
    c = doctor.check_kernel_config([str(tmp_path / "config.gz")])
    assert not c.ok and not c.required


# --- headers, bcc, tools --------------------------------------------------------

def test_kernel_headers_debian_split_layout(tmp_path):
    modules = headers_tree(tmp_path, "6.18.44")
    c = doctor.check_kernel_headers("6.18.44", modules)
    assert c.ok and "linux-headers-6.1.0-56-amd64" in c.detail


def test_kernel_headers_missing_build(tmp_path):
    c = doctor.check_kernel_headers("6.18.44", str(tmp_path))
    assert not c.ok and c.required and "bootstrap.sh" in c.fix


def test_kernel_headers_split_layout_without_source_link(tmp_path):
    modules = headers_tree(tmp_path, "6.18.44", link_source=False)
    c = doctor.check_kernel_headers("6.18.44", modules)
    assert not c.ok and "source" in c.detail and "bootstrap.sh" in c.fix


def test_kernel_headers_single_tree_needs_no_source(tmp_path):
    modules = headers_tree(tmp_path, "6.1.0-56-amd64", split=False, link_source=False)
    assert doctor.check_kernel_headers("6.1.0-56-amd64", modules).ok


def test_bcc_importable(tmp_path):
    c = doctor.check_bcc(fake_python(tmp_path, "echo 0.26.0"))
    assert c.ok and "bcc 0.26.0" in c.detail


def test_bcc_not_importable(tmp_path):
    py = fake_python(tmp_path, "echo \"ModuleNotFoundError: No module named 'bcc'\" >&2; exit 1")
    c = doctor.check_bcc(py)
    assert not c.ok and "No module named 'bcc'" in c.detail
    assert "python3-bpfcc" in c.fix and "--system-site-packages" in c.fix


def test_bcc_python_missing(tmp_path):
    c = doctor.check_bcc(str(tmp_path / "no-python"))
    assert not c.ok


def test_tools(tmp_path):
    for tool in ("ip", "nsenter"):
        fake_python(tmp_path, "true")
        os.rename(tmp_path / "python", tmp_path / tool)
    assert doctor.check_tools(doctor.TOOLS, str(tmp_path)).ok
    os.remove(tmp_path / "nsenter")
    c = doctor.check_tools(doctor.TOOLS, str(tmp_path))
    assert not c.ok and c.detail == "not found: nsenter"
    assert c.fix == "apt-get install -y util-linux"


# --- probes (the kernel side is faked) -------------------------------------------

def raising(exc: BaseException):
    def probe():
        raise exc
    return probe


def test_probe_passes():
    c = doctor.check_probe("hook x", lambda: None, "fix it")
    assert c == Check("hook x", True, "works", None, True)


def test_probe_permission_error_asks_for_root():
    c = doctor.check_probe("hook x", raising(BPFError(errno.EPERM, "no")), "kernel fix")
    assert not c.ok and "sudo" in c.fix


def test_probe_einval_gets_the_feature_fix():
    c = doctor.check_probe("hook x", raising(BPFError(errno.EINVAL, "bad")), "kernel fix")
    assert not c.ok and c.fix == "kernel fix"


def test_probe_enosys_means_no_bpf_syscall():
    c = doctor.check_probe("hook x", raising(BPFError(errno.ENOSYS, "nosys")), "x")
    assert not c.ok and "CONFIG_BPF_SYSCALL" in c.fix


def test_a_crashing_check_is_reported_not_raised():
    c = doctor.check_probe("hook x", raising(ValueError("oops")), "x")
    assert not c.ok and "ValueError: oops" in c.detail and "bug" in c.fix


def test_tcx_skipped_on_old_kernel_without_probing():
    c = doctor.check_tcx("6.1.0-56-amd64", raising(AssertionError("must not probe")))
    assert not c.ok and not c.required and "6.6" in c.detail


def test_tcx_probed_on_new_kernel():
    called = []
    c = doctor.check_tcx("6.18.44-fc-v857", lambda: called.append(1))
    assert c.ok and called == [1]


def test_tcx_probe_failure_is_optional():
    c = doctor.check_tcx("6.6.0", raising(BPFError(errno.EINVAL, "x")))
    assert not c.ok and not c.required


def test_tcx_required_on_request():
    c = doctor.check_tcx("6.1.0-56-amd64", lambda: None, required=True)
    assert not c.ok and c.required and "permissive" in c.fix


def test_tcx_on_old_kernel_says_clsact_takes_over():
    c = doctor.check_tcx("6.1.0-56-amd64", raising(AssertionError("must not probe")))
    assert "clsact instead" in c.detail


OK_TCX = doctor.Check("tcx links", True, "works")
NO_TCX = doctor.Check("tcx links", False, "kernel 6.1.0 < 6.6 has no tcx", "x", False)
OK_CLSACT = doctor.Check("clsact (cls_bpf)", True, "works")
NO_CLSACT = doctor.Check("clsact (cls_bpf)", False, "EOPNOTSUPP",
                         "a kernel with CONFIG_NET_CLS_BPF=y and CONFIG_NET_SCH_INGRESS=y, "
                         "or mesh.mode: permissive", False)


@pytest.mark.parametrize("tcx,clsact,want,detail", [
    (OK_TCX, OK_CLSACT, "auto", "tcx links"),
    (NO_TCX, OK_CLSACT, "auto", "clsact/cls_bpf (no tcx on this kernel)"),
    (OK_TCX, OK_CLSACT, "clsact", "clsact/cls_bpf (bpf.tcAttach: clsact)"),
    (OK_TCX, NO_CLSACT, "tcx", "tcx links"),
])
def test_strict_attach_picks_tcx_then_clsact(tcx, clsact, want, detail):
    c = doctor.check_strict_attach(tcx, clsact, want, required=True)
    assert c.ok and c.detail == detail and c.fix is None


@pytest.mark.parametrize("tcx,clsact,want,words", [
    (NO_TCX, NO_CLSACT, "auto", ["neither tcx", "nor clsact", "EOPNOTSUPP", "cannot be enforced"]),
    (NO_TCX, OK_CLSACT, "tcx", ["bpf.tcAttach is tcx", "6.1.0 < 6.6"]),
    (OK_TCX, NO_CLSACT, "clsact", ["bpf.tcAttach is clsact", "EOPNOTSUPP"]),
])
def test_strict_attach_failure_says_why_and_how_to_fix(tcx, clsact, want, words):
    c = doctor.check_strict_attach(tcx, clsact, want, required=True)
    assert not c.ok and c.required
    assert all(w in c.detail for w in words), c.detail
    assert "permissive" in c.fix and c.fix.count("permissive") == 1
    assert not doctor.ready([c])
    assert doctor.ready([doctor.check_strict_attach(tcx, clsact, want, required=False)])


@pytest.mark.parametrize("release,version", [("6.18.44-fc-v857", (6, 18)),
                                             ("6.1.0-56-amd64", (6, 1)), ("5.10.0", (5, 10))])
def test_kernel_version(release, version):
    assert doctor.kernel_version(release) == version


# --- the whole run, formatting ----------------------------------------------------

def fake_env(tmp_path, **overrides) -> Environment:
    (tmp_path / "bin").mkdir()
    for tool in ("ip", "nsenter"):
        (tmp_path / "bin" / tool).write_text("#!/bin/sh\n")
        (tmp_path / "bin" / tool).chmod(0o755)
    values = dict(
        proc_status=status_file(tmp_path, FULL_CAPS),
        mountinfo=write(tmp_path / "mountinfo", ROOT_LINE + CGROUP2_LINE + BPFFS_LINE),
        jit_sysctl=write(tmp_path / "jit", "1\n"),
        btf_vmlinux=write(tmp_path / "vmlinux", ""),
        kernel_release="6.18.44",
        proc_config=config_gz(tmp_path, ALL_OPTIONS),
        boot_dir=str(tmp_path / "boot"),
        modules_dir=headers_tree(tmp_path, "6.18.44"),
        python=fake_python(tmp_path, "echo 0.26.0"),
        tool_path=str(tmp_path / "bin"),
        probe_kernel=False,
    )
    values.update(overrides)
    return Environment(**values)


def test_run_checks_on_a_healthy_fake_machine(tmp_path):
    checks = doctor.run_checks(env=fake_env(tmp_path))
    assert [c for c in checks if not c.ok] == []
    assert {"privileges", "cgroup v2", "bpffs", "bpf JIT", "BTF", "kernel config",
            "kernel headers", "bcc", "tools"} == {c.name for c in checks}
    assert doctor.ready(checks)


def test_run_checks_skips_kernel_probes_without_privileges(tmp_path):
    env = fake_env(tmp_path, proc_status=status_file(tmp_path, BPF_ONLY_CAPS, 1000),
                   probe_kernel=True)
    checks = doctor.run_checks(env=env)
    probes = [c for c in checks if c.name == "kernel probes"]
    assert len(probes) == 1 and not probes[0].ok and "sudo" in probes[0].fix
    assert not any(c.name.startswith("hook ") for c in checks)


def test_ensure_ready_lists_the_fixes(tmp_path):
    env = fake_env(tmp_path, mountinfo=write(tmp_path / "mi2", ROOT_LINE + CGROUP2_LINE))
    with pytest.raises(doctor.DoctorError) as exc:
        doctor.ensure_ready(env=env)
    msg = str(exc.value)
    assert "bpffs" in msg and "mount -t bpf bpf /sys/fs/bpf" in msg
    assert "kernel headers" not in msg  # only the failures


def test_ensure_ready_ignores_optional_failures(tmp_path):
    env = fake_env(tmp_path, btf_vmlinux=str(tmp_path / "no-btf"))
    checks = doctor.ensure_ready(env=env)
    assert [c.name for c in checks if not c.ok] == ["BTF"]


# --- what an agent config needs ----------------------------------------------------

def agent_config(tmp_path, cgroup: str, pin_dir: str = "/sys/fs/bpf/meshlet/node1",
                 mode: str = "permissive"):
    return parse_config(f"""
node: node1
inventory: inventory.yaml
cgroup: {cgroup}
bpf:
  pinDir: {pin_dir}
proxy:
  redirectIPv4: 10.244.1.1
mesh:
  mode: {mode}
identity: {{bundle: b.pem, caCert: c.pem, caKey: k.pem}}
""", base_dir=str(tmp_path))


def cgroup2_at(tmp_path) -> tuple[str, str]:
    """A fake cgroup v2 mount point (a real directory) and its mountinfo."""
    root = tmp_path / "cg2"
    (root / "meshlet" / "node1").mkdir(parents=True)
    line = f"35 24 0:30 / {root} rw,relatime - cgroup2 cgroup2 rw\n"
    return str(root), write(tmp_path / "mi-cg", ROOT_LINE + line + BPFFS_LINE)


@pytest.mark.parametrize("pin_dir", ["/sys/fs/bpf/meshlet/node1", "/sys/fs/bpf"])
def test_pin_dir_on_bpffs(tmp_path, pin_dir):
    c = doctor.check_pin_dir(pin_dir, write(tmp_path / "mi", ROOT_LINE + BPFFS_LINE))
    assert c.ok and "/sys/fs/bpf" in c.detail


def test_pin_dir_not_on_bpffs(tmp_path):
    mi = write(tmp_path / "mi", ROOT_LINE + BPFFS_LINE)
    c = doctor.check_pin_dir("/sys/fs/bpfx/meshlet", mi)  # a prefix of the name is not enough
    assert not c.ok and "ext4" in c.detail and "bpf.pinDir" in c.fix


def test_pin_dir_shadowed_by_a_later_mount(tmp_path):
    tmpfs = "60 47 0:42 / /sys/fs/bpf rw - tmpfs tmpfs rw\n"
    c = doctor.check_pin_dir("/sys/fs/bpf/m", write(tmp_path / "mi", ROOT_LINE + BPFFS_LINE + tmpfs))
    assert not c.ok and "tmpfs" in c.detail


def test_node_cgroup_relative_and_absolute(tmp_path):
    root, mi = cgroup2_at(tmp_path)
    rel = doctor.check_node_cgroup("meshlet/node1", mi)
    assert rel.ok and rel.detail == f"{root}/meshlet/node1"
    assert doctor.check_node_cgroup(f"{root}/meshlet/node1", mi).ok


def test_node_cgroup_missing_gets_mkdir(tmp_path):
    root, mi = cgroup2_at(tmp_path)
    c = doctor.check_node_cgroup("meshlet/node2", mi)
    assert not c.ok and c.fix == f"mkdir -p {root}/meshlet/node2"


def test_node_cgroup_outside_the_mount(tmp_path):
    _, mi = cgroup2_at(tmp_path)
    c = doctor.check_node_cgroup(str(tmp_path), mi)
    assert not c.ok and "not under the cgroup v2 mount" in c.detail


def test_run_checks_with_agent_config(tmp_path):
    root, mi = cgroup2_at(tmp_path)
    env = fake_env(tmp_path, mountinfo=mi)
    checks = doctor.run_checks(agent_config(tmp_path, "meshlet/node1"), env)
    assert [c for c in checks if not c.ok] == []
    assert {"pin dir", "node cgroup"} <= {c.name for c in checks}
    (pinned,) = [c for c in checks if c.name == "pinned datapath"]
    assert "nothing pinned" in pinned.detail and not pinned.required
    with pytest.raises(doctor.DoctorError, match="mkdir -p"):
        doctor.ensure_ready(agent_config(tmp_path, "meshlet/nope"), env)


SAMPLE = [
    Check("privileges", True, "euid 0"),
    Check("bpffs", False, "no bpf filesystem at /sys/fs/bpf", "mount -t bpf bpf /sys/fs/bpf"),
    Check("BTF", False, "missing", "use a kernel with BTF", required=False),
]


def test_format_checks_table():
    lines = doctor.format_checks(SAMPLE).splitlines()
    assert lines[0] == "✓ privileges  euid 0"
    assert lines[1] == "✗ bpffs       no bpf filesystem at /sys/fs/bpf"
    assert lines[2] == "              fix: mount -t bpf bpf /sys/fs/bpf"
    assert lines[3] == "! BTF         missing"
    assert lines[4].strip() == "fix: use a kernel with BTF"
    assert lines[5] == "2 of 3 checks failed, 1 of them required"


def test_format_checks_all_passed():
    assert doctor.format_checks(SAMPLE[:1]).splitlines()[-1] == "all 1 checks passed"


def test_checks_to_json():
    data = json.loads(json.dumps(doctor.checks_to_json(SAMPLE)))
    assert data["ready"] is False
    assert data["checks"][1] == {"name": "bpffs", "ok": False,
                                 "detail": "no bpf filesystem at /sys/fs/bpf",
                                 "fix": "mount -t bpf bpf /sys/fs/bpf", "required": True}
    assert [Check(**c) for c in data["checks"]] == SAMPLE


# --- Kubernetes mode (#11) ---------------------------------------------------------------


def kube_config(tmp_path, kubeconfig: str, cgroup_root: str = "kubelet"):
    return parse_config(f"""
node: node1
cgroup: meshlet/node1
proxy: {{redirectIPv4: 10.244.1.1}}
identity: {{bundle: b.pem, caCert: c.pem, caKey: k.pem}}
workloads: {{source: kubernetes, kubeconfig: {kubeconfig}, kubeletCgroupRoot: {cgroup_root}}}
""", str(tmp_path / "config.yaml"))


def test_kubelet_cgroups_detected_or_explained(tmp_path):
    root, mi = cgroup2_at(tmp_path)
    c = doctor.check_kubelet_cgroups("kubelet", mi)
    assert not c.ok and not c.required and "neither kubepods.slice" in c.detail
    assert "kubeletCgroupRoot" in c.fix
    os.makedirs(f"{root}/kubelet/kubepods")
    c = doctor.check_kubelet_cgroups("kubelet", mi)
    assert c.ok and c.detail == f"cgroupfs driver under {root}/kubelet"


def test_kube_api_check_against_the_test_server(tmp_path):
    from tests.support.kubeapi import FakeKubeAPI, node

    with FakeKubeAPI(workdir=str(tmp_path)) as api:
        api.apply(node("node1", "198.18.0.1"))
        good = kube_config(tmp_path, api.kubeconfig(str(tmp_path / "kc")))
        c = doctor.check_kube_api(good)
        assert c.ok and c.detail == f"{api.url} answers (resourceVersion {api.rv})"
        bad = kube_config(tmp_path, api.kubeconfig(str(tmp_path / "kc-bad"), token="nope"))
        c = doctor.check_kube_api(bad)
        assert not c.ok and not c.required and "401" in c.detail and "token" in c.fix
    c = doctor.check_kube_api(good, timeout=1)  # the server is gone
    assert not c.ok and "reachable" in c.fix
    c = doctor.check_kube_api(kube_config(tmp_path, "missing-kc"))
    assert not c.ok and "cannot read kubeconfig" in c.detail


# --- the running agent's node CA by CSR (identity.nodeCA: csr) ---------------------------

class _Agent:
    """A Unix socket answering GET /v1/status with ``doc``, like the agent's admin API."""

    def __init__(self, path: str, doc: dict):
        import socket
        import threading

        self.path, self.body = path, json.dumps(doc).encode()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.requests.append(conn.recv(65536).split(b"\r\n")[0])
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + self.body)

    def close(self):
        self.sock.close()
        self.thread.join(5)


WAITING = {"mode": "csr", "signer": "meshlet.io/node-intermediate", "state": "waiting", "csr": "meshlet-node-a-x1y2z",
           "message": "waiting for CSR meshlet-node-a-x1y2z to be approved (by meshlet ca controller); "
                      "no workload certificates until then", "counters": {}}


@pytest.mark.parametrize("ident,want", [
    ({"node_ca_csr": WAITING, "error": "no node intermediate yet"}, (False, False)),
    ({"node_ca_csr": {**WAITING, "state": "denied", "message": "CSR meshlet-node-a-x1y2z was denied: "
                      "WrongNode: bound to node 'node-b'; asking again in 40s"}}, (False, True)),
    ({"node_ca_csr": {**WAITING, "state": "error", "message": "cannot reach the API"}}, (False, False)),
    ({"node_ca_csr": {**WAITING, "state": "valid", "message": "the node intermediate is valid"},
      "node_ca": {"subject": "O=meshlet,CN=node-a", "not_after": "2027-01-01T00:00:00+00:00"}}, (True, False)),
    ({"trust_domain": "td"}, None),  # files mode: the agent gets no CA by CSR, no check
], ids=["waiting", "denied", "api-error", "loaded", "files"])
def test_doctor_asks_the_running_agent_about_its_node_ca_csr(tmp_path, ident, want):
    agent = _Agent(str(tmp_path / "admin.sock"), {"node": "node-a", "identity": ident})
    try:
        c = doctor.check_agent_node_ca(agent.path)
    finally:
        agent.close()
    assert agent.requests == [b"GET /v1/status HTTP/1.0"]
    if want is None:
        assert c is None
        return
    assert (c.name, c.ok, c.required) == ("node CA by CSR", *want)
    if not c.ok:
        assert "meshlet-node-a-x1y2z" in c.fix or "Kubernetes API" in c.fix
        assert ident["node_ca_csr"]["message"] in c.detail
    out = doctor.checks_to_json([c])  # `meshlet doctor -o json`: as the other checks
    assert out["checks"] == [{"name": "node CA by CSR", "ok": c.ok, "detail": c.detail, "fix": c.fix,
                              "required": c.required}]
    assert out["ready"] == (not c.required or c.ok)
    table = doctor.format_checks([c])
    assert table.startswith({(False, False): "! ", (False, True): "✗ ", (True, False): "✓ "}[want])


def test_doctor_without_an_answering_agent(tmp_path):
    path = str(tmp_path / "none.sock")
    assert doctor.check_agent_node_ca(path, expected=False) is None  # just not running: kernel checks only
    c = doctor.check_agent_node_ca(path)  # asked for, or the config says CSR
    assert not c.ok and not c.required and path in c.detail and "meshlet run" in c.fix


def _hooks(ok: bool) -> list[Check]:
    return [
        Check("hook sock_ops", True, "works"),
        Check("hook sk_msg", ok, "works" if ok else "Invalid argument"),
        Check("sockhash map", ok, "works" if ok else "Invalid argument"),
    ]


def test_splice_line_where_the_kernel_has_the_hooks():
    for mode in ("auto", True):
        c = doctor.check_splice(mode, _hooks(True))
        assert c.ok and "spliced in the kernel" in c.detail


def test_splice_auto_on_an_older_kernel_is_a_warning_not_a_blocker():
    c = doctor.check_splice("auto", _hooks(False))
    assert not c.ok and not c.required
    assert "userspace relay" in c.detail and "hook sk_msg: Invalid argument" in c.detail
    assert "CONFIG_BPF_STREAM_PARSER" in c.fix and doctor.ready([c])


def test_splice_true_on_an_older_kernel_blocks_the_start_with_the_fix():
    c = doctor.check_splice(True, _hooks(False))
    assert not c.ok and c.required and not doctor.ready([c])
    assert "proxy.splice is true" in c.detail and "proxy.splice: auto or false" in c.fix


def test_splice_off_needs_nothing():
    c = doctor.check_splice(False, _hooks(False))
    assert c.ok and "off" in c.detail
