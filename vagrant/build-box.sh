#!/usr/bin/env bash
# Build a Debian 12 (bookworm) Vagrant box for the libvirt provider, locally,
# for machines that cannot reach a box catalog.  Run as root.
#
#   bash vagrant/build-box.sh            # prints the path of the .box file
#
# The box has everything `scripts/bootstrap.sh` would install (bcc, the
# kernel headers matching the box's kernel, nginx, iperf3, ...) and a wheel
# directory with meshlet's Python dependencies, so bringing a VM up from it
# needs no apt and no PyPI: the VM test runs with the guest on an isolated
# network.  The result is cached under $MESHLET_VM_CACHE (default
# /var/cache/meshlet/vagrant) by the sha256 of this script, pyproject.toml
# and the Debian snapshot date, so only the first run on a machine builds.
#
# How (verified on these machines, see vagrant/README.md): a 10 GB raw disk
# with one partition, a loop device (+ partx: this kernel has no MSDOS
# partition parser), ext4, debootstrap minbase, packages and grub from a
# chroot, root= by filesystem UUID, the vagrant user with Vagrant's insecure
# key, SSH host keys made at first boot, qemu-img convert to qcow2.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${MESHLET_VM_CACHE:-/var/cache/meshlet/vagrant}
MIRROR=${MESHLET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
DISK_GB=10

# Everything scripts/bootstrap.sh installs, plus what a Vagrant box needs.
BOX_PACKAGES=(
    systemd-sysv udev dbus kmod linux-image-amd64 grub-pc openssh-server sudo
    ifupdown isc-dhcp-client iproute2 ca-certificates rsync python3
    python3-bpfcc linux-headers-amd64 python3-venv python3-dev
    util-linux iperf3 nginx-light wrk curl tcpdump procps psmisc make
    kubernetes-client nghttp2-client
)

die() { printf 'build-box: error: %s\n' "$*" >&2; exit 1; }
say() { printf '==> build-box: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (loop devices, mounts, chroot)"
for t in debootstrap sfdisk losetup partx mkfs.ext4 qemu-img blkid tar; do
    command -v "$t" >/dev/null || die "$t not found; apt-get install --no-install-recommends debootstrap fdisk util-linux e2fsprogs qemu-utils"
done
VAGRANT_PUB=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n 1 || true)
[ -r "$VAGRANT_PUB" ] || die "Vagrant's insecure public key (gems/vagrant-*/keys/vagrant.pub) not found; apt-get install vagrant"

# The cache key: the inputs that decide the box's content.
KEY=$( { cat "$0" pyproject.toml; printf '%s\n' "$MIRROR" "${BOX_PACKAGES[@]}"; } | sha256sum | cut -c1-16)
BOX=$CACHE/boxes/meshlet-bookworm-$KEY.box
if [ -s "$BOX" ]; then
    say "cached: $BOX"
    echo "$BOX"
    exit 0
fi

mkdir -p "$CACHE/boxes"
WORK=$(mktemp -d "$CACHE/build.XXXXXX")
ROOT=$WORK/root
LOOP=""
START=$SECONDS
# Packages in the chroot (udev, systemd) chgrp/chmod /dev/kvm through the
# bind-mounted /dev, with the chroot's gid for 'kvm': put it back at exit.
KVM_BEFORE=""
[ -c /dev/kvm ] && KVM_BEFORE=$(stat -c %g:%a /dev/kvm)

cleanup() {
    local rc=$?
    set +e
    for m in dev/pts dev proc sys; do
        mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m"
    done
    mountpoint -q "$ROOT" && umount "$ROOT"
    if [ -n "$LOOP" ]; then
        partx -d "$LOOP" 2>/dev/null
        losetup -d "$LOOP"
    fi
    rm -rf "$WORK"
    if [ -n "$KVM_BEFORE" ] && [ "$(stat -c %g:%a /dev/kvm)" != "$KVM_BEFORE" ]; then
        chgrp "${KVM_BEFORE%%:*}" /dev/kvm && chmod "${KVM_BEFORE#*:}" /dev/kvm
    fi
    [ $rc -eq 0 ] || say "failed (exit $rc); nothing kept"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "building $BOX (takes about 4 minutes)"
truncate -s "${DISK_GB}G" "$WORK/disk.raw"
echo 'type=83, bootable' | sfdisk -q "$WORK/disk.raw"
LOOP=$(losetup -f --show -P "$WORK/disk.raw")
[ -b "${LOOP}p1" ] || partx -a "$LOOP"
[ -b "${LOOP}p1" ] || die "no partition device ${LOOP}p1 after partx -a $LOOP"
mkfs.ext4 -q -L meshlet-root "${LOOP}p1"
UUID=$(blkid -s UUID -o value "${LOOP}p1")
mkdir -p "$ROOT"
mount "${LOOP}p1" "$ROOT"

say "debootstrap $SUITE (minbase) from $MIRROR"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOT" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"

cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
# No daemon may start inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"

say "packages: ${BOX_PACKAGES[*]}"
in_root() { chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
{
    in_root apt-get update -q
    in_root apt-get install -y -q --no-install-recommends "${BOX_PACKAGES[@]}"
    in_root apt-get clean
} >"$WORK/apt.log" 2>&1 || { tail -n 30 "$WORK/apt.log" >&2; die "apt-get in the chroot failed"; }
rm -f "$ROOT/usr/sbin/policy-rc.d"
KVER=$(ls "$ROOT/lib/modules" | sort -V | tail -n 1)
[ -d "$ROOT/lib/modules/$KVER/build/include" ] \
    || die "the box's kernel $KVER has no matching headers under /lib/modules/$KVER/build"

say "system configuration (kernel $KVER)"
echo meshlet-vm >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 meshlet-vm\n::1 localhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
echo "UUID=$UUID / ext4 errors=remount-ro 0 1" >"$ROOT/etc/fstab"
cat >"$ROOT/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback
auto eth0
iface eth0 inet dhcp
EOF
# nginx runs only inside test pods, never as a service.
in_root systemctl disable nginx.service >/dev/null 2>&1 || true
in_root systemctl disable iperf3.service >/dev/null 2>&1 || true
# SSH host keys are made at first boot: every VM gets its own.
rm -f "$ROOT"/etc/ssh/ssh_host_*
cat >"$ROOT/etc/systemd/system/meshlet-ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Generate SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable meshlet-ssh-hostkeys.service >/dev/null 2>&1
echo 'UseDNS no' >"$ROOT/etc/ssh/sshd_config.d/meshlet.conf"

in_root useradd -m -s /bin/bash vagrant
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$ROOT/etc/sudoers.d/vagrant"
chmod 440 "$ROOT/etc/sudoers.d/vagrant"
install -d -m 700 -o 1000 -g 1000 "$ROOT/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$VAGRANT_PUB" "$ROOT/home/vagrant/.ssh/authorized_keys"

say "Python wheels for meshlet[test] (so the guest needs no PyPI)"
WHEELS=$ROOT/var/cache/meshlet/wheels
mkdir -p "$WHEELS"
reqs=$(/usr/bin/python3 - <<'EOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"]
                + p["project"]["optional-dependencies"]["test"] + ["wheel"]))
EOF
)
mapfile -t reqs <<<"$reqs"
# Same Python (3.11) and architecture as the guest: the host is Debian 12 too.
PYVER=$(chroot "$ROOT" python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
/usr/bin/python3 -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --python-version "$PYVER" --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform linux_x86_64 --implementation cp \
    -d "$WHEELS" "${reqs[@]}" >"$WORK/pip.log" 2>&1 \
    || { tail -n 20 "$WORK/pip.log" >&2; die "pip download of meshlet's dependencies failed"; }
cat >"$ROOT/etc/pip.conf" <<'EOF'
# meshlet's local test box: install only from the wheels baked in at build
# time (vagrant/build-box.sh), never from the network.
[global]
no-index = true
find-links = /var/cache/meshlet/wheels
EOF

# The guest's bootstrap would spend 2-3 minutes of emulated CPU creating the
# venv and installing these wheels on every VM test.  Done here, natively, at
# the path the guest uses (/vagrant/.venv; the rsync of the repository
# excludes .venv/ and so leaves it alone), with the stamp bootstrap.sh checks:
# the guest's bootstrap finds "installed for this pyproject.toml" and skips
# pip.  The install is editable, so it needs the project's metadata and
# package directory now; the sources themselves arrive with the rsync.
say "the guest's venv, prebuilt (/vagrant/.venv, meshlet[test] from the wheels)"
mkdir -p "$ROOT/vagrant"
cp pyproject.toml README.md "$ROOT/vagrant/"
cp -r agent "$ROOT/vagrant/agent"
# env -i: the builder's own PIP_* and PYTHON* variables (a find-links of
# the host's, say) must not reach the guest's pip; /etc/pip.conf above rules.
in_guest_env() { chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 "$@"; }
{
    in_guest_env /usr/bin/python3 -m venv --system-site-packages /vagrant/.venv
    in_guest_env sh -c 'cd /vagrant && .venv/bin/pip install --disable-pip-version-check -e ".[test]"'
} >"$WORK/venv.log" 2>&1 || { tail -n 20 "$WORK/venv.log" >&2; die "the guest venv's pip install failed"; }
sha256sum pyproject.toml | cut -d' ' -f1 >"$ROOT/vagrant/.venv/.meshlet-installed"
find "$ROOT/vagrant" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +

say "grub (console=ttyS0, root=UUID=$UUID)"
sed -i -e 's/^GRUB_TIMEOUT=.*/GRUB_TIMEOUT=0/' \
    -e 's/^GRUB_CMDLINE_LINUX_DEFAULT=.*/GRUB_CMDLINE_LINUX_DEFAULT=""/' \
    -e 's/^GRUB_CMDLINE_LINUX=.*/GRUB_CMDLINE_LINUX="console=ttyS0 net.ifnames=0"/' \
    "$ROOT/etc/default/grub"
printf 'GRUB_TERMINAL="console serial"\nGRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n' \
    >>"$ROOT/etc/default/grub"
{
    in_root grub-install --target=i386-pc "$LOOP"
    in_root update-grub
} >"$WORK/grub.log" 2>&1 || { tail -n 20 "$WORK/grub.log" >&2; die "grub-install/update-grub failed"; }
# grub names the loop device; the VM has a disk with this filesystem UUID.
# Only the kernel command lines: grub's own `set root=` must stay.
sed -i -E "/^[[:space:]]*linux[[:space:]]/ s#root=/dev/[^ ]+#root=UUID=$UUID#" "$ROOT/boot/grub/grub.cfg"
grep -Eq "^[[:space:]]*linux[[:space:]].*root=UUID=$UUID" "$ROOT/boot/grub/grub.cfg" \
    || die "grub.cfg has no kernel line with root=UUID=$UUID"

for m in dev/pts dev proc sys; do umount "$ROOT/$m"; done
umount "$ROOT"
partx -d "$LOOP" 2>/dev/null || true
losetup -d "$LOOP"
LOOP=""

say "qcow2 and box"
qemu-img convert -O qcow2 "$WORK/disk.raw" "$WORK/box.img"
rm -f "$WORK/disk.raw"
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$DISK_GB" >"$WORK/metadata.json"
tar -C "$WORK" -cf "$WORK/box.tar" metadata.json box.img
mv "$WORK/box.tar" "$BOX"
# Older boxes of this builder are superseded by this one.
find "$CACHE/boxes" -name 'meshlet-bookworm-*.box' ! -name "$(basename "$BOX")" -delete
say "built in $((SECONDS - START)) s: $BOX ($(du -h "$BOX" | cut -f1))"
echo "$BOX"
