"""meshlet doctor on the real kernel: on a machine set up by
scripts/bootstrap.sh every check passes, and the probes leave nothing behind."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from agent import cgroup, doctor
from agent.datapath import bpfsys, probe

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads bpf programs, "
                       "creates cgroups and network namespaces"),
]


def leftovers() -> tuple[list[str], list[str]]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    root = cgroup.cgroup2_mount()
    return ([line.split()[0] for line in netns.splitlines() if "meshlet-probe" in line],
            [d for d in os.listdir(root) if d.startswith("meshlet-probe")])


def test_every_check_passes_here():
    """Everything passes; on a kernel older than 6.6 (the VM's 6.1) tcx is
    the one expected, optional failure and strict mode goes through clsact."""
    checks = doctor.run_checks()
    by_name = {c.name: c for c in checks}
    old_kernel = doctor.kernel_version(os.uname().release) < doctor.TCX_MIN_KERNEL
    expected = {"tcx links"} if old_kernel else set()
    failed = [c for c in checks if not c.ok and c.name not in expected]
    assert failed == [], "\n" + doctor.format_checks(failed)
    assert {"hook cgroup/connect4", "hook cgroup/connect6", "hook sock_ops",
            "hook sched_cls (tc)", "bpf links (cgroup)", "tcx links", "clsact (cls_bpf)",
            "strict mode attach", "tunnel least-loaded"} <= by_name.keys()
    assert by_name["tunnel least-loaded"].ok  # Linux >= 5.12: here and in the VM (6.1)
    assert by_name["clsact (cls_bpf)"].ok
    attach = by_name["strict mode attach"]
    assert attach.ok and attach.detail.startswith("clsact" if old_kernel else "tcx"), attach
    if old_kernel:
        assert not by_name["tcx links"].ok and not by_name["tcx links"].required
    print(f"kernel {os.uname().release}: strict mode attach = {attach.detail}")
    assert leftovers() == ([], [])


def test_ensure_ready_passes_here():
    doctor.ensure_ready()


def test_probes_clean_up_on_failure(monkeypatch):
    """A link that cannot be created must not leave its cgroup or netns behind."""
    def refuse(*args, **kwargs):
        raise bpfsys.BPFError(errno.EINVAL, "refused by test")
    monkeypatch.setattr(bpfsys, "link_create", refuse)
    with pytest.raises(bpfsys.BPFError):
        probe.cgroup_link_works(cgroup.cgroup2_mount())
    with pytest.raises(bpfsys.BPFError):
        probe.tcx_link_works()
    monkeypatch.setattr(bpfsys, "prog_load", refuse)
    with pytest.raises(bpfsys.BPFError):
        probe.clsact_works()
    assert leftovers() == ([], [])


def test_clsact_probe_works_and_keeps_the_process_in_its_netns():
    before = os.readlink("/proc/self/ns/net")
    probe.clsact_works()
    assert os.readlink("/proc/self/ns/net") == before
    assert leftovers() == ([], [])


@pytest.mark.skipif(doctor.kernel_version(os.uname().release) < doctor.TCX_MIN_KERNEL,
                    reason="no tcx before 6.6 (strict mode uses clsact there: "
                    "test_clsact_probe_works_and_keeps_the_process_in_its_netns)")
def test_tcx_probe_keeps_the_process_in_its_netns():
    before = os.readlink("/proc/self/ns/net")
    probe.tcx_link_works()
    assert os.readlink("/proc/self/ns/net") == before


def test_connect_prog_without_attach_type_is_rejected():
    """The fact DESIGN.md records: cgroup_sock_addr needs expected_attach_type.
    Also shows the probes can fail, i.e. they really ask the kernel."""
    with pytest.raises(bpfsys.BPFError) as exc:
        probe.prog_loads(bpfsys.PROG_TYPE_CGROUP_SOCK_ADDR)
    assert exc.value.errno == errno.EINVAL
