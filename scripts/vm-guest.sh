#!/usr/bin/env bash
# Runs inside the Vagrant VM, as root, for scripts/vm.sh: the doctor, the
# demo and the privileged tests on the guest's kernel.  Everything it
# produces goes to /var/tmp/meshlet-vm, which vm.sh copies out.
#
#   bash scripts/vm-guest.sh [--full] [-- PYTEST_ARGS...]
#
# Without --full, pytest runs the tests that prove the datapath on this
# kernel (GUEST_TESTS below); --full runs the whole privileged tier.  Exit
# status: 0 only if the demo and pytest both passed (pytest collecting no
# test is a failure).
set -uo pipefail
cd "$(dirname "$0")/.."

# The datapath on this kernel: redirect and relay, strict mode (clsact on
# 6.1) with adoption after a restart, pods found by cgroup ancestry
# (kubelet layout), the kernel policy map, the same-node kernel splice
# (sk_skb on 6.1), the doctor's probes, the ABI check, the tunnel
# listener's SK_REUSEPORT program (this kernel's verifier).  mTLS between nodes and a policy refused in the
# kernel at connect() are proven by the demo, which runs first.  About 5
# minutes under software emulation; vagrant/README.md lists what is left out.
GUEST_TESTS=(
    tests/privileged/test_abi.py
    tests/privileged/test_doctor_kernel.py
    tests/privileged/test_strict_clsact.py
    tests/privileged/test_mesh.py
    tests/privileged/test_splice.py::test_bulk_both_ways_with_half_close_is_spliced_and_counted
    tests/privileged/test_cgroup_ancestry.py
    tests/privileged/test_policy_kernel.py::test_sync_l4_never_refuses_more_than_the_old_or_the_new_entries
    tests/privileged/test_policy_kernel.py::test_sync_l4_adopts_what_is_pinned
    tests/privileged/test_reuseport.py
)

FULL=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --full) FULL=1 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "usage: vm-guest.sh [--full] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
    esac
    shift
done
[ "$FULL" = 1 ] && TESTS=(tests/privileged) || TESTS=("${GUEST_TESTS[@]}")

OUT=/var/tmp/meshlet-vm
rm -rf "$OUT"
mkdir -p "$OUT"
say() { printf '==> guest: %s\n' "$*"; }

say "kernel $(uname -r)"
uname -r >"$OUT/kernel.txt"
bash scripts/bootstrap.sh >"$OUT/bootstrap.log" 2>&1 || { cat "$OUT/bootstrap.log"; exit 1; }

.venv/bin/python -m agent.doctor --json >"$OUT/doctor.json" 2>&1
.venv/bin/python -m agent.doctor | tee "$OUT/doctor.txt"

# qemu's software emulation (TCG) runs the guest several times slower than
# the host: the simulated mesh waits longer for its agents (bcc's compile
# and the verifier dominate) before it calls one not ready.
export MESHLET_SIM_TIMEOUT_SCALE=${MESHLET_SIM_TIMEOUT_SCALE:-4}

say "demo (scripts/run demo)"
t=$SECONDS
bash scripts/run demo >"$OUT/demo.log" 2>&1
demo_rc=$?
demo_s=$((SECONDS - t))
tail -n 3 "$OUT/demo.log"
say "demo: exit $demo_rc in $demo_s s"

say "pytest ${TESTS[*]} ${EXTRA[*]}"
t=$SECONDS
.venv/bin/pytest "${TESTS[@]}" -m "not slow" -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" --durations=15 "${EXTRA[@]}" >"$OUT/pytest.log" 2>&1
pytest_rc=$?
pytest_s=$((SECONDS - t))
tail -n 25 "$OUT/pytest.log"
if [ "$pytest_rc" -eq 5 ]; then
    echo "guest: pytest collected no tests; that is a failure" >&2
    pytest_rc=1
fi
say "pytest: exit $pytest_rc in $pytest_s s"

printf '{"kernel": "%s", "demo_rc": %d, "demo_s": %d, "pytest_rc": %d, "pytest_s": %d, "full": %s}\n' \
    "$(uname -r)" "$demo_rc" "$demo_s" "$pytest_rc" "$pytest_s" \
    "$([ "$FULL" = 1 ] && echo true || echo false)" >"$OUT/result.json"
[ "$demo_rc" -eq 0 ] && [ "$pytest_rc" -eq 0 ]
