"""The Vagrant box must already hold every Debian package that
scripts/bootstrap.sh installs: the VM test's guest sits on an isolated
network and cannot fetch one (a package added to bootstrap but not to the
box fails the guest's provisioning)."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _array(path: pathlib.Path, name: str) -> set[str]:
    text = path.read_text()
    m = re.search(rf"^{name}=\((.*?)^\)", text, re.S | re.M)
    assert m, f"{path}: no {name}=( ... ) array"
    words = set()
    for line in m.group(1).splitlines():
        words |= set(line.split("#", 1)[0].split())
    return words


def test_the_box_holds_every_package_bootstrap_installs():
    boot = _array(ROOT / "scripts" / "bootstrap.sh", "PACKAGES")
    box = _array(ROOT / "vagrant" / "build-box.sh", "BOX_PACKAGES")
    # bootstrap names the headers by architecture; the box is amd64
    boot = {p.replace('"linux-headers-$ARCH"', "linux-headers-amd64") for p in boot}
    assert boot, "no packages parsed"
    assert boot <= box, f"add to vagrant/build-box.sh BOX_PACKAGES: {sorted(boot - box)}"
