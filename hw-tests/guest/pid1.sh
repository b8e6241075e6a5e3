#!/bin/bash
# PID 1 of the test VM: runs the guest script named by vm.sh's run directory
# under a time limit, prints "VMTEST-EXIT <status>" and powers the VM off.
# Deliberately no `set -e`: PID 1 exiting panics the kernel instead of leaving
# a verdict in the serial log.
set -uo pipefail
exec </dev/null >/dev/console 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8

# Waits with bash builtins only: once power-off starts, 9p may be gone and
# no binary can be loaded. (A pipe opened read-write never sees EOF.)
pause() { read -r -t "$1" _ <> <(:) || true; }

poweroff_now() {
    sync
    echo o >/proc/sysrq-trigger
    pause 20
    # Power-off did not take: a reboot ends QEMU as well (-no-reboot).
    echo b >/proc/sysrq-trigger
    pause 20
}

RUN=${1:-}
if [ -z "$RUN" ] || [ ! -r "$RUN/env" ]; then
    echo "VMTEST-BOOT-FAILED: run directory '$RUN' not readable"
    poweroff_now
fi
mount -t tmpfs -o mode=0755,size=64m tmpfs /run
# No udev: bash's process substitution (pause, below) needs /dev/fd.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# /tmp stays the host's (read-only below, writes in RAM): the repository,
# the binary under test and vm.sh's run directory may all live there.
hostname vmtest

# shellcheck source=/dev/null
. "$RUN/env"
echo "VMTEST-BOOTED $(cut -d' ' -f1 /proc/uptime) s after kernel start; kernel $(uname -r)"
echo "VMTEST-RUN $VMTEST_SCRIPT ${VMTEST_ARGS[*]}"
rc=0
timeout -k 10 "$VMTEST_GUEST_TIMEOUT" bash "$VMTEST_SCRIPT" "${VMTEST_ARGS[@]}" || rc=$?
[ "$rc" = 124 ] && echo "FAIL guest script: timed out after $VMTEST_GUEST_TIMEOUT s"
echo "VMTEST-EXIT $rc at $(cut -d' ' -f1 /proc/uptime) s"
poweroff_now
