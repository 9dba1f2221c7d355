#!/usr/bin/env bash
# The VM test (`bash scripts/run vm`, also the last step of `scripts/run
# test`): meshlet's demo and privileged tests on a second kernel, Debian 12's
# 6.1, inside a Vagrant VM (libvirt, software emulation unless KVM works).
#
#   bash scripts/vm.sh [--full] [-- PYTEST_ARGS...]
#
#   --full       the whole privileged tier in the guest (about 25-35 min
#                under emulation) instead of the datapath selection below
#   MESHLET_VM_DRIVER   qemu (default here: nested KVM does not work on these
#                       machines) or kvm
#   MESHLET_VM_CACHE    where the box and Vagrant's state live
#                       (default /var/cache/meshlet/vagrant)
#
# Steps: host packages -> box (vagrant/build-box.sh, cached) -> libvirt
# daemons -> vagrant up (provisioning = scripts/bootstrap.sh in the guest) ->
# scripts/vm-guest.sh in the guest (doctor, demo, pytest) -> results copied to
# vm-results/<time>/ -> summary.  Whatever happens (failure, Ctrl-C), the VM
# is destroyed, the daemons this script started are stopped, and /dev/kvm's
# mode, the firewall tables and libvirt networks it changed are restored.
#
# Network: the guest sits on an isolated libvirt network, 198.19.250.0/24
# (benchmarking range, no NAT, no route out): it reaches only this host, and
# needs nothing else because the box carries every package and wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

FULL=0
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --full) FULL=1 ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        *) echo "usage: bash scripts/run vm [--full] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
    esac
    shift
done

CACHE=${MESHLET_VM_CACHE:-/var/cache/meshlet/vagrant}
export MESHLET_VM_DRIVER=${MESHLET_VM_DRIVER:-qemu}
export MESHLET_VM_CPUS=${MESHLET_VM_CPUS:-2}
export MESHLET_VM_MEMORY=${MESHLET_VM_MEMORY:-4096}
export MESHLET_VM_ISOLATED=1
export MESHLET_VM_NETWORK=${MESHLET_VM_NETWORK:-198.19.250.0/24}
export MESHLET_VM_PREFIX="meshlet-vmtest-$$-"
NETWORK_NAME=meshlet-vagrant
export VAGRANT_HOME=$CACHE/home            # boxes live here, not in ~/.vagrant.d
export VAGRANT_CWD=$REPO/vagrant
export VAGRANT_CHECKPOINT_DISABLE=1        # no version check against HashiCorp
export VAGRANT_DEFAULT_PROVIDER=libvirt
export LIBVIRT_DEFAULT_URI=qemu:///system
RUN=$REPO/vm-results/$(date -u +%Y%m%dT%H%M%SZ)
export VAGRANT_DOTFILE_PATH=$RUN/.vagrant  # this run's machine state
export MESHLET_VM_SERIAL_LOG=$RUN/serial.log
mkdir -p "$RUN"
LOG=$RUN/host.log

T0=$SECONDS
declare -A TIMES=()
say()  { printf '==> vm: %s\n' "$*"; }
die()  { printf 'vm: error: %s\n' "$*" >&2; exit 1; }
CHILD=""
timed() {  # timed NAME CMD...: run, record its duration.  In the background
    # so that a signal to this script runs the cleanup at once (bash defers
    # traps until a foreground child exits); the cleanup stops the child.
    local name=$1 t=$SECONDS rc=0; shift
    "$@" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    TIMES[$name]=$((SECONDS - t))
    return $rc
}

[ "$(id -u)" -eq 0 ] || die "must run as root (libvirt system daemon, loop devices for the box)"

# /dev/kvm as found, before anything (installing qemu changes it to root:kvm 0660).
KVM_BEFORE=""
[ -c /dev/kvm ] && KVM_BEFORE="$(stat -c %g:%a /dev/kvm)"

# --- host packages -----------------------------------------------------------------
HOST_PACKAGES=(vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils
               debootstrap dnsmasq-base rsync openssh-client fdisk e2fsprogs nftables)
missing=()
for p in "${HOST_PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | cut -c1-2)" = ii ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    t=$SECONDS
    { apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }
    } >"$RUN/apt.log" 2>&1 || { tail -n 20 "$RUN/apt.log" >&2; die "apt-get install failed (log: $RUN/apt.log)"; }
    TIMES[apt]=$((SECONDS - t))
fi

# --- cleanup, armed before anything is started -------------------------------------
STARTED_PIDS=()     # "name:pid" of daemons this script started
NET_EXISTED=1
FW_BEFORE=$RUN/firewall-before.txt
nft list tables >"$FW_BEFORE" 2>/dev/null || true

fw_restore() {
    # libvirt's network driver adds LIBVIRT_* chains, and on a machine
    # without a ruleset whole ip/ip6 filter/nat/mangle tables.  Only when this
    # run started libvirtd: tables that did not exist before are removed; in
    # tables that did, only libvirt's chains and the rules jumping to them.
    [ ${#STARTED_PIDS[@]} -gt 0 ] || return 0
    local fam tbl
    while read -r _ fam tbl; do
        [ -n "$tbl" ] || continue
        grep -qx "table $fam $tbl" "$FW_BEFORE" && continue
        nft delete table "$fam" "$tbl" && echo "removed firewall table $fam $tbl (libvirt's)"
    done < <(nft list tables 2>/dev/null)
    local ipt t chain
    for ipt in iptables ip6tables; do
        for t in filter nat mangle; do
            while read -r chain; do
                [ -n "$chain" ] || continue
                "$ipt" -t "$t" -S 2>/dev/null | grep -- "-j $chain\$" | sed 's/^-A/-D/' |
                    while read -r rule; do eval "$ipt -t $t $rule"; done
                "$ipt" -t "$t" -F "$chain" 2>/dev/null && "$ipt" -t "$t" -X "$chain" 2>/dev/null \
                    && echo "removed $ipt chain $t/$chain (libvirt's)"
            done < <("$ipt" -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^LIBVIRT_/ {print $2}')
        done
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    local t=$SECONDS
    say "cleanup (exit status $rc)"
    if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
        kill -INT "$CHILD"    # vagrant up cleans up after itself on SIGINT
        for _ in $(seq 150); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$CHILD" 2>/dev/null && kill -9 "$CHILD"
        wait "$CHILD" 2>/dev/null
    fi
    if [ -s "$VAGRANT_DOTFILE_PATH/machines/default/libvirt/id" ]; then
        timeout 300 vagrant destroy -f >>"$LOG" 2>&1 || echo "vagrant destroy failed (see $LOG)"
    fi
    if pgrep -x libvirtd >/dev/null; then
        # Whatever vagrant left: our domains (by prefix) and, if we made it, the network.
        local d
        for d in $(virsh list --all --name 2>/dev/null | grep "^$MESHLET_VM_PREFIX"); do
            virsh destroy "$d" >/dev/null 2>&1
            virsh undefine "$d" --remove-all-storage >/dev/null 2>&1
            echo "removed leftover domain $d"
        done
        if [ "$NET_EXISTED" = 0 ] && virsh net-info "$NETWORK_NAME" >/dev/null 2>&1; then
            virsh net-destroy "$NETWORK_NAME" >/dev/null 2>&1
            virsh net-undefine "$NETWORK_NAME" >/dev/null 2>&1
            echo "removed libvirt network $NETWORK_NAME"
        fi
    fi
    local entry name pid i
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        entry=${STARTED_PIDS[$i]} name=${entry%%:*} pid=${entry#*:}
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
            echo "stopped $name (pid $pid, started by this run)"
        fi
    done
    if [ -n "$KVM_BEFORE" ] && [ "$(stat -c %g:%a /dev/kvm)" != "$KVM_BEFORE" ]; then
        chgrp "${KVM_BEFORE%%:*}" /dev/kvm && chmod "${KVM_BEFORE#*:}" /dev/kvm \
            && echo "restored /dev/kvm to gid ${KVM_BEFORE%%:*}, mode ${KVM_BEFORE#*:}"
    fi
    fw_restore
    # Check, don't trust: nothing of this run may be left on the host.
    local left=()
    for entry in "${STARTED_PIDS[@]}"; do
        kill -0 "${entry#*:}" 2>/dev/null && left+=("${entry%%:*} (pid ${entry#*:}) still running")
    done
    pgrep -f "guest=$MESHLET_VM_PREFIX" >/dev/null && left+=("a qemu process of $MESHLET_VM_PREFIX*")
    ls /etc/libvirt/qemu/"$MESHLET_VM_PREFIX"*.xml >/dev/null 2>&1 && left+=("a libvirt domain $MESHLET_VM_PREFIX*")
    if [ -n "$KVM_BEFORE" ] && [ "$(stat -c %g:%a /dev/kvm)" != "$KVM_BEFORE" ]; then
        left+=("/dev/kvm is $(stat -c %g:%a /dev/kvm), was $KVM_BEFORE")
    fi
    if [ ${#STARTED_PIDS[@]} -gt 0 ] && ! nft list tables 2>/dev/null | cmp -s - "$FW_BEFORE"; then
        left+=("firewall tables differ: $(nft list tables 2>/dev/null | tr '\n' ' ')")
    fi
    if [ ${#left[@]} -gt 0 ]; then
        printf 'vm: LEFT BEHIND: %s\n' "${left[@]}" >&2
        [ $rc -eq 0 ] && rc=1
    else
        echo "nothing left behind (daemons, domains, /dev/kvm, firewall checked)"
    fi
    TIMES[cleanup]=$((SECONDS - t))
    say "total $((SECONDS - T0)) s; timings (s): $(for k in "${!TIMES[@]}"; do printf '%s=%s ' "$k" "${TIMES[$k]}"; done)"
    say "results in $RUN"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- box ---------------------------------------------------------------------------
say "box (vagrant/build-box.sh; cached in $CACHE)"
t=$SECONDS
BOX_FILE=$(bash vagrant/build-box.sh) || die "building the box failed"
TIMES[box]=$((SECONDS - t))
BOX_NAME=meshlet/$(basename "$BOX_FILE" .box)
export MESHLET_VM_BOX=$BOX_NAME
if ! vagrant box list 2>/dev/null | grep -q "^$BOX_NAME "; then
    timed box_add vagrant box add --force --name "$BOX_NAME" "$BOX_FILE" >>"$LOG" 2>&1 \
        || die "vagrant box add failed (see $LOG)"
    # Boxes of older builder versions only take space.
    vagrant box list 2>/dev/null | awk '$1 ~ /^meshlet\/meshlet-bookworm-/ {print $1}' |
        { grep -vx "$BOX_NAME" || true; } | while read -r old; do
            vagrant box remove --force --all "$old" >>"$LOG" 2>&1 || true
        done
fi

# --- libvirt -------------------------------------------------------------------------
if [ -c /dev/kvm ] && [ "$(stat -c %a /dev/kvm)" = 600 ] && getent group kvm >/dev/null; then
    # At 0600 libvirt re-probes QEMU on every call (~7 s each); 0660 root:kvm
    # is Debian's usual setting.  Restored at exit.
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm
fi
# libvirt's own 'default' network (192.168.122.0/24, NAT) must not start with it.
rm -f /etc/libvirt/qemu/networks/autostart/default.xml
start_daemon() {  # start_daemon NAME PIDFILE
    local name=$1 pidfile=$2
    if pgrep -x "$name" >/dev/null; then
        say "$name already running (left alone)"
        return
    fi
    rm -f "$pidfile"
    "$name" -d
    for _ in $(seq 50); do [ -s "$pidfile" ] && break; sleep 0.1; done
    [ -s "$pidfile" ] || die "$name did not start (no $pidfile)"
    STARTED_PIDS+=("$name:$(cat "$pidfile")")
    say "started $name (pid $(cat "$pidfile"))"
}
start_daemon virtlogd /run/virtlogd.pid
start_daemon libvirtd /run/libvirtd.pid
for _ in $(seq 100); do virsh -q uri >/dev/null 2>&1 && break; sleep 0.2; done
virsh net-info "$NETWORK_NAME" >/dev/null 2>&1 || NET_EXISTED=0
# The box image vagrant-libvirt uploaded to the default pool for an older box.
for vol in $(virsh vol-list default 2>/dev/null | awk '$1 ~ /^meshlet-VAGRANTSLASH-meshlet-bookworm-/ {print $1}'); do
    case "$vol" in
        "meshlet-VAGRANTSLASH-$(basename "$BOX_FILE" .box)_"*) ;;
        *) virsh vol-delete --pool default "$vol" >/dev/null && say "removed old box image $vol" ;;
    esac
done

# --- up ------------------------------------------------------------------------------
say "vagrant up (driver $MESHLET_VM_DRIVER, $MESHLET_VM_CPUS CPUs, $MESHLET_VM_MEMORY MiB, network $MESHLET_VM_NETWORK isolated)"
timed up vagrant up --no-provision >>"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; die "vagrant up failed (log: $LOG, console: $MESHLET_VM_SERIAL_LOG)"; }
say "provisioning: scripts/bootstrap.sh in the guest"
timed bootstrap vagrant provision >>"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; die "provisioning failed (log: $LOG)"; }
vagrant ssh-config >"$RUN/ssh_config" 2>>"$LOG" || die "vagrant ssh-config failed"
SSH=(ssh -F "$RUN/ssh_config" -o LogLevel=ERROR default)

# --- in the guest --------------------------------------------------------------------
GUEST_ARGS=()
[ "$FULL" = 1 ] && GUEST_ARGS+=(--full)
[ ${#PYTEST_ARGS[@]} -gt 0 ] && GUEST_ARGS+=(-- "${PYTEST_ARGS[@]}")
say "in the guest: doctor, demo, privileged tests ($([ "$FULL" = 1 ] && echo "whole tier" || echo "datapath selection"))"
guest_rc=0
timed guest "${SSH[@]}" sudo bash /vagrant/scripts/vm-guest.sh "${GUEST_ARGS[@]}" \
    > >(tee "$RUN/guest.log") 2>&1 || guest_rc=$?
"${SSH[@]}" sudo tar -C /var/tmp/meshlet-vm -cf - . 2>>"$LOG" | tar -C "$RUN" -xf - \
    || echo "vm: could not copy the guest's results" >&2

# --- summary -------------------------------------------------------------------------
.venv/bin/python -m agent.doctor --json >"$RUN/host-doctor.json" 2>/dev/null || true
.venv/bin/python scripts/vm_summary.py "$RUN" || guest_rc=${guest_rc:-1}
[ "$guest_rc" -eq 0 ] || die "the demo or the tests failed in the guest (exit $guest_rc); see $RUN"
say "passed"
