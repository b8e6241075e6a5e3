#!/usr/bin/env bash
# Boot Debian's kernel under QEMU on the host's own root filesystem and run one
# guest script in it as PID 1; the verdict is read back from the serial log.
#
#   hw-tests/vm.sh [options] GUEST_SCRIPT [ARGS...]
#   hw-tests/vm.sh --check          # only say whether the VM can run here
#
# Options:
#   --timeout SEC   hard limit for the whole VM run (default 600)
#   --log FILE      serial log (default: in the run's temporary directory,
#                   kept only on failure)
#   --quiet         do not echo the serial log while the VM runs
#
# Environment: VMTEST_KERNEL (a /boot/vmlinuz-*-amd64; default the newest),
# VMTEST_SMP (2), VMTEST_MEM (2G), TARGET_RDMA_BIN (the binary the guest runs,
# default $CARGO_TARGET_DIR/release/target-rdma). Every VMTEST_* variable and
# TARGET_RDMA_BIN are handed to the guest script.
#
# Exit status: 0 when the guest script exited 0, printed at least one PASS
# line and no FAIL line; 3 when something the VM needs is missing; 124 on
# timeout; 1 otherwise (including a VM that never reached the guest script).
set -euo pipefail

HW_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HW_DIR/.." && pwd)

TIMEOUT=600
LOG=
QUIET=0
CHECK_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) TIMEOUT=$2; shift 2 ;;
        --log) LOG=$2; shift 2 ;;
        --quiet) QUIET=1; shift ;;
        --check) CHECK_ONLY=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        --) shift; break ;;
        -*) echo "vm.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done

say() { printf 'vm.sh: %s\n' "$*" >&2; }

# ------------------------------------------------------------ prerequisites
# Each requirement names the Debian package that provides it, so a missing
# piece turns into one apt-get line instead of a failed boot.
MISSING=()
need_cmd() { command -v "$1" >/dev/null 2>&1 || MISSING+=("$2"); }
need_cmd qemu-system-x86_64 qemu-system-x86
need_cmd cpio cpio
need_cmd gzip gzip
need_cmd modprobe kmod
need_cmd modinfo kmod
# The guest runs these from the host's filesystem.
need_cmd iscsiadm open-iscsi
need_cmd iscsid open-iscsi
need_cmd fio fio
need_cmd mkfs.ext4 e2fsprogs
need_cmd rdma iproute2
need_cmd ibv_devinfo ibverbs-utils
need_cmd python3 python3
# busybox-static, not busybox: the initramfs has no shared libraries.
BUSYBOX=/bin/busybox
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
    MISSING+=(busybox-static)
fi
[ -e /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so ] ||
    compgen -G '/usr/lib/*/libibverbs/librxe-*.so' >/dev/null || MISSING+=(ibverbs-providers)

KERNEL=${VMTEST_KERNEL:-}
if [ -z "$KERNEL" ]; then
    KERNEL=$(find /boot -maxdepth 1 -name 'vmlinuz-*-amd64' 2>/dev/null | sort -V | tail -n 1)
fi
KVER=
if [ -n "$KERNEL" ] && [ -r "$KERNEL" ]; then
    KVER=${KERNEL##*/vmlinuz-}
    if [ ! -e "/lib/modules/$KVER/modules.dep" ]; then
        say "no /lib/modules/$KVER/modules.dep for $KERNEL"
        MISSING+=(linux-image-amd64)
    else
        for m in virtio_pci 9pnet_virtio 9p overlay rdma_rxe rdma_ucm ib_iser iscsi_tcp ib_isert \
                 iscsi_target_mod target_core_iblock brd configfs dummy sd_mod ext4; do
            modinfo -k "$KVER" -F filename "$m" >/dev/null 2>&1 || { say "kernel $KVER lacks module $m"; MISSING+=(linux-image-amd64); break; }
        done
    fi
else
    MISSING+=(linux-image-amd64)
fi
if [ "${#MISSING[@]}" -gt 0 ]; then
    read -r -a MISSING <<<"$(printf '%s\n' "${MISSING[@]}" | sort -u | tr '\n' ' ')"
    say "cannot run the VM: missing Debian packages: ${MISSING[*]}"
    say "install them with: apt-get install --no-install-recommends ${MISSING[*]}"
    exit 3
fi
if [ "$CHECK_ONLY" = 1 ]; then
    echo "vm.sh: ready (kernel $KERNEL, TCG)"
    exit 0
fi

[ $# -ge 1 ] || { echo "usage: vm.sh [--timeout SEC] [--log FILE] GUEST_SCRIPT [ARGS...]" >&2; exit 2; }
SCRIPT=$(realpath "$1"); shift
[ -r "$SCRIPT" ] || { say "no guest script $SCRIPT"; exit 2; }
case "$TIMEOUT" in ''|*[!0-9]*) say "--timeout wants seconds"; exit 2 ;; esac
[ "$TIMEOUT" -ge 60 ] || { say "--timeout below 60 s leaves no time to boot"; exit 2; }

if [ -z "${TARGET_RDMA_BIN:-}" ]; then
    TARGET_RDMA_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/target-rdma
fi
TARGET_RDMA_BIN=$(realpath -m "$TARGET_RDMA_BIN")
export TARGET_RDMA_BIN

# ------------------------------------------------------------ run directory
# It lives on the host's root filesystem, which the guest sees read-only at the
# same path: that is how the command line and environment reach the guest.
RUN=$(mktemp -d "${TMPDIR:-/tmp}/vmtest.XXXXXX")
QEMU_PID=
TAIL_PID=
KEEP_RUN=0
cleanup() {
    local rc=$?
    set +e
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill -TERM "$QEMU_PID" 2>/dev/null
        sleep 1
        kill -KILL "$QEMU_PID" 2>/dev/null
    fi
    [ -n "$TAIL_PID" ] && kill "$TAIL_PID" 2>/dev/null
    if [ "$KEEP_RUN" = 1 ]; then
        # Logs only: the initramfs is rebuilt on every run.
        rm -rf "$RUN/initramfs" "$RUN/initramfs.cpio.gz"
        say "run directory kept: $RUN"
    else
        rm -rf "$RUN"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'say interrupted; exit 130' INT TERM HUP
[ -n "$LOG" ] || LOG=$RUN/serial.log
mkdir -p "$(dirname "$LOG")"
: >"$LOG"

{
    printf 'VMTEST_SCRIPT=%q\n' "$SCRIPT"
    printf 'VMTEST_ARGS=('; printf '%q ' "$@"; printf ')\n'
    # The guest script must end before QEMU is killed, so that its own
    # verdict, not a cut-off log, is what we read.
    printf 'VMTEST_GUEST_TIMEOUT=%q\n' "$((TIMEOUT - 45))"
    printf 'export TARGET_RDMA_BIN=%q\n' "$TARGET_RDMA_BIN"
    printf 'export VMTEST_ROOT=%q\n' "$ROOT"
    while IFS='=' read -r name _; do
        case "$name" in
            VMTEST_*) printf 'export %s=%q\n' "$name" "${!name}" ;;
        esac
    done < <(env)
} >"$RUN/env"

# ------------------------------------------------------------ initramfs
# Just enough to mount the host's / over virtio-9p under a tmpfs overlay and
# hand over to guest/pid1.sh; every other module the tests need is loaded later
# from the host's /lib/modules, which the guest sees through 9p.
IRD=$RUN/initramfs
mkdir -p "$IRD"/{bin,dev,proc,sys,lib/modules,lower,rw,newroot}
cp "$BUSYBOX" "$IRD/bin/busybox"
: >"$IRD/modules.list"
declare -A seen=()
while read -r cmd path _; do
    [ "$cmd" = insmod ] || continue
    [ -z "${seen[$path]:-}" ] || continue
    seen[$path]=1
    base=${path##*/}
    case "$base" in
        *.ko) cp "$path" "$IRD/lib/modules/$base" ;;
        *.ko.xz) xz -dc "$path" >"$IRD/lib/modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$path" >"$IRD/lib/modules/${base%.zst}"; base=${base%.zst} ;;
        *.ko.gz) gzip -dc "$path" >"$IRD/lib/modules/${base%.gz}"; base=${base%.gz} ;;
        *) say "unexpected module file $path"; exit 1 ;;
    esac
    echo "$base" >>"$IRD/modules.list"
done < <(for m in virtio_pci 9pnet_virtio 9p overlay; do modprobe -S "$KVER" --show-depends "$m"; done)
cp "$HW_DIR/guest/initramfs-init" "$IRD/init"
chmod 755 "$IRD/init" "$IRD/bin/busybox"
(cd "$IRD" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$RUN/initramfs.cpio.gz"

# ------------------------------------------------------------ boot
APPEND="console=ttyS0 panic=-1 quiet loglevel=4 vmtest.init=$HW_DIR/guest/pid1.sh vmtest.run=$RUN"
say "booting $KERNEL (TCG, ${VMTEST_SMP:-2} CPUs, ${VMTEST_MEM:-2G}), limit $TIMEOUT s, serial log $LOG"
T0=$SECONDS
# nice: the machine is shared with builds; the VM must not starve them.
nice -n 10 timeout -k 10 "$TIMEOUT" qemu-system-x86_64 \
    -nodefaults -accel tcg,thread=multi -cpu max -smp "${VMTEST_SMP:-2}" -m "${VMTEST_MEM:-2G}" \
    -nic none -display none -serial "file:$LOG" -monitor none -no-reboot \
    -kernel "$KERNEL" -initrd "$RUN/initramfs.cpio.gz" -append "$APPEND" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    </dev/null >"$RUN/qemu.out" 2>&1 &
QEMU_PID=$!
if [ "$QUIET" = 0 ]; then
    tail -n +1 -f --pid="$QEMU_PID" "$LOG" 2>/dev/null | tr -d '\r' &
    TAIL_PID=$!
fi
QRC=0
wait "$QEMU_PID" || QRC=$?
QEMU_PID=
if [ -n "$TAIL_PID" ]; then wait "$TAIL_PID" 2>/dev/null || true; TAIL_PID=; fi
ELAPSED=$((SECONDS - T0))

# ------------------------------------------------------------ verdict
CLEAN=$RUN/serial.clean
tr -d '\r' <"$LOG" >"$CLEAN"
n_pass=$(grep -c '^PASS ' "$CLEAN" || true)
n_fail=$(grep -c '^FAIL ' "$CLEAN" || true)
verdict() {
    KEEP_RUN=1
    [ -s "$RUN/qemu.out" ] && { say "qemu said:"; cat "$RUN/qemu.out" >&2; }
    say "$1"
    echo "hw-vm: $n_pass passed, $((n_fail > 0 ? n_fail : 1)) failed"
    exit "$2"
}
if ! grep -q '^VMTEST-BOOTED' "$CLEAN"; then
    say "last lines of the serial log:"; tail -n 40 "$CLEAN" >&2
    if [ "$QRC" = 124 ]; then
        verdict "FAILED: the VM did not boot to the guest script within $TIMEOUT s" 124
    fi
    verdict "FAILED: the VM did not boot to the guest script (qemu exit $QRC after $ELAPSED s)" 1
fi
if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
    verdict "FAILED: timed out after $TIMEOUT s (the guest script did not finish)" 124
fi
exit_line=$(grep -E '^VMTEST-EXIT [0-9]+' "$CLEAN" | tail -n 1 || true)
if [ -z "$exit_line" ]; then
    say "last lines of the serial log:"; tail -n 40 "$CLEAN" >&2
    verdict "FAILED: the guest ended without reporting an exit status (qemu exit $QRC after $ELAPSED s)" 1
fi
guest_rc=${exit_line#VMTEST-EXIT }
guest_rc=${guest_rc%% *}
say "guest script exited $guest_rc; $n_pass PASS, $n_fail FAIL lines; VM ran $ELAPSED s"
if [ "$guest_rc" != 0 ] || [ "$n_fail" -gt 0 ] || [ "$n_pass" = 0 ]; then
    grep '^FAIL ' "$CLEAN" >&2 || true
    verdict "FAILED (serial log $LOG)" 1
fi
echo "hw-vm: $n_pass passed, 0 failed"
