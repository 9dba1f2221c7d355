#!/usr/bin/env bash
# Prepare a Debian-like machine (Debian 12 is the reference) to build, test
# and demo meshlet.  Run as root from anywhere; every step first checks
# whether its work is already done, so a second run takes a few seconds.
#
# Steps: Debian packages -> kernel headers for bcc -> bpffs -> cgroup v2
#        -> .venv with meshlet installed in editable mode.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
VENV=$REPO/.venv
STAMP=$VENV/.meshlet-installed   # sha256 of pyproject.toml at the last pip install
START=$SECONDS

step() { printf '==> %s\n' "$*"; }
ok()   { printf '    %s\n' "$*"; }
die()  { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

# --- preconditions -----------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "must run as root (eBPF, bpffs and apt need it); try: sudo bash scripts/bootstrap.sh"
[ -r /etc/os-release ] || die "/etc/os-release is missing; meshlet's bootstrap supports Debian-like systems only"
# shellcheck disable=SC1091
os_id=$(. /etc/os-release && echo "${ID:-} ${ID_LIKE:-}")
case " $os_id " in
    *" debian "*) ;;
    *) die "this is not a Debian-like system (ID/ID_LIKE: '$os_id'); install the equivalents of the packages listed in scripts/bootstrap.sh by hand" ;;
esac
command -v apt-get >/dev/null && command -v dpkg-query >/dev/null \
    || die "apt-get/dpkg-query not found; is this really a Debian-like system?"

ARCH=$(dpkg --print-architecture)
KREL=$(uname -r)

# --- 1. Debian packages ----------------------------------------------------
# python3-bpfcc: bcc (Python module + libbcc); linux-headers-<arch>: what bcc
# compiles against; iproute2/util-linux: ip, nsenter for the simulated nodes;
# iperf3/nginx-light/wrk/curl: test and benchmark traffic; nghttp2-client:
# h2load (HTTP/2 load and tests).
PACKAGES=(
    python3-bpfcc "linux-headers-$ARCH" python3-venv python3-dev
    iproute2 util-linux iperf3 nginx-light wrk curl nghttp2-client tcpdump procps psmisc make
)

step "Debian packages"
missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    [ "${status:0:2}" = "ii" ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
    ok "all ${#PACKAGES[@]} packages already installed"
else
    ok "installing: ${missing[*]}"
    # nginx is started only by tests, inside pod namespaces: keep the package
    # from starting it as a service (policy-rc.d exit 101 = "not allowed").
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        own_policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\n# temporary, from meshlet scripts/bootstrap.sh\nexit 101\n' > "$own_policy"
        chmod 755 "$own_policy"
        trap 'rm -f "$own_policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    if [ -n "$own_policy" ]; then
        rm -f "$own_policy"
        trap - EXIT
    fi
    # ...and from starting at the next boot.
    if [ -e /lib/systemd/system/nginx.service ] && command -v systemctl >/dev/null; then
        systemctl disable --now nginx.service >/dev/null 2>&1 \
            || systemctl disable nginx.service >/dev/null 2>&1 || true
    elif [ -e /etc/init.d/nginx ] && command -v update-rc.d >/dev/null; then
        update-rc.d nginx disable >/dev/null 2>&1 || true
    fi
    ok "installed"
fi

# kubectl renders deploy/'s kustomization offline in the tests.  Any kubectl
# will do (one from Kubernetes' own repository may already be there); Debian
# packages it as kubernetes-client.
step "kubectl (kubectl kustomize deploy/)"
if command -v kubectl >/dev/null; then
    ok "present: $(command -v kubectl)"
else
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends kubernetes-client \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends kubernetes-client; }
    ok "installed kubernetes-client"
fi

# --- 2. kernel headers for bcc -----------------------------------------------
# bcc compiles against /lib/modules/<release>/build.  When no headers exist for
# the running kernel, Debian's linux-headers-<arch> work if build points at the
# arch directory AND source at its -common sibling (DESIGN.md, verified facts).
step "kernel headers for bcc (/lib/modules/$KREL/build)"
MODDIR=/lib/modules/$KREL
if [ -d "$MODDIR/build/include" ]; then
    ok "present -> $(readlink -f "$MODDIR/build")"
else
    arch_dir=$(ls -d /usr/src/linux-headers-*-"$ARCH" 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$arch_dir" ] || die "no /usr/src/linux-headers-*-$ARCH found; install them: apt-get install linux-headers-$ARCH"
    common_dir=${arch_dir%-"$ARCH"}-common
    [ -d "$common_dir" ] || die "$arch_dir has no sibling $common_dir; reinstall: apt-get install --reinstall linux-headers-$ARCH"
    mkdir -p "$MODDIR"
    for pair in "build:$arch_dir" "source:$common_dir"; do
        link=$MODDIR/${pair%%:*} target=${pair#*:}
        if [ -d "$link" ] && [ ! -L "$link" ]; then
            die "$link is a real directory without include/; not touching it. Fix or remove it, then re-run"
        fi
        ln -sfn "$target" "$link"   # creates, or replaces a stale symlink
        ok "linked $link -> $target"
    done
    [ -d "$MODDIR/build/include" ] || die "$MODDIR/build/include still missing after linking"
fi

# --- 3. bpffs ----------------------------------------------------------------
# Field 5 of mountinfo is the mount point; the fs type follows the " - ".
mounted_fstype() {  # mounted_fstype <fstype> [<mountpoint>] -> prints mount points
    awk -v t="$1" -v m="${2:-}" '{
        for (i = 7; i <= NF && $i != "-"; i++) ;
        if ($(i + 1) == t && (m == "" || $5 == m)) print $5
    }' /proc/self/mountinfo
}

step "bpffs at /sys/fs/bpf"
if [ -n "$(mounted_fstype bpf /sys/fs/bpf)" ]; then
    ok "already mounted"
else
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs: mount -t bpf bpf /sys/fs/bpf failed (kernel without CONFIG_BPF_SYSCALL?)"
    ok "mounted"
fi

# --- 4. cgroup v2 ------------------------------------------------------------
step "cgroup v2 hierarchy"
cg2=$(mounted_fstype cgroup2 | head -n 1)
[ -n "$cg2" ] || die "no cgroup v2 hierarchy is mounted; mount one: mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified (or boot with systemd.unified_cgroup_hierarchy=1)"
ok "mounted at $cg2"

# --- 5. virtualenv -----------------------------------------------------------
# bcc is not on PyPI: it comes from Debian's dist-packages, hence the system
# interpreter and --system-site-packages.
step "Python virtualenv ($VENV)"
if [ -x "$VENV/bin/python" ] && grep -qx 'include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null; then
    ok "exists"
else
    /usr/bin/python3 -m venv --system-site-packages "$VENV"   # also repairs an existing one
    ok "created with /usr/bin/python3 --system-site-packages"
fi

want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" = "$want" ]; then
    ok "meshlet[test] installed for this pyproject.toml"
else
    ok "pip install -e '.[test]' (pyproject.toml changed since the last install)"
    # Quiet on success (build-backend warnings are noise here); all on failure.
    log=$(mktemp)
    if ! "$VENV/bin/pip" install --disable-pip-version-check -e '.[test]' >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"
        die "pip install -e '.[test]' failed (output above)"
    fi
    rm -f "$log"
    echo "$want" > "$STAMP"
fi

bcc_version=$("$VENV/bin/python" -c 'import bcc; print(bcc.__version__)' 2>&1) \
    || die "the venv cannot import bcc: $bcc_version
    (is python3-bpfcc installed for /usr/bin/python3? apt-get install python3-bpfcc)"
ok "bcc $bcc_version importable from the venv"

printf '==> everything is in place (%ds)\n' "$((SECONDS - START))"
