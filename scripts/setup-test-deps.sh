#!/usr/bin/env bash
# Install the Debian packages the test harness (scripts/test.sh) and the build need.
# Idempotent and quiet: does nothing when everything is already installed.
#
#   scripts/setup-test-deps.sh            # test + build deps
#   TARGET_UNDER_TEST=tgt scripts/...     # also installs tgt (validation peer)
#   SETUP_SKIP_BUILD_DEPS=1               # only the test clients
#   SETUP_SKIP_VM_DEPS=1                  # not the VM harness's packages (hw-tests/)
#
# Needs root (or sudo) only when something is missing.
set -euo pipefail

# Clients used by scripts/test.sh: iscsi-test-cu/iscsi-inq (libiscsi-bin),
# qemu-img/qemu-io (qemu-utils) with the iSCSI block driver (qemu-block-extra),
# python3 for the parser and the malformed-PDU script, iproute2 for ss,
# libiscsi-dev and gcc for benches/iobench.c (the no-allocation check),
# glusterd, bricks and the FUSE client for the Gluster backstore's tests
# (scripts/gluster.sh).
TEST_PKGS=(libiscsi-bin libiscsi-dev gcc qemu-utils qemu-block-extra python3 iproute2 procps
    glusterfs-server glusterfs-client)

# Build dependencies of the workspace (see shared notes dependencies.md):
# bindgen needs libclang-dev; the RDMA and Gluster -sys crates need the dev
# headers found through pkg-config. A failure to install these only warns:
# cargo will say clearly what is missing.
BUILD_PKGS=(build-essential pkg-config libclang-dev libibverbs-dev librdmacm-dev libglusterfs-dev)

# The VM harness (hw-tests/vm.sh): QEMU booting Debian's own kernel, whose
# modules give soft-RoCE (rdma_rxe), the kernel's iSER and TCP initiators and
# LIO; a static busybox for the initramfs; the guest runs the host's own
# rdma, ibv_devinfo, iscsiadm/iscsid, fio and mkfs.ext4 over 9p.
VM_PKGS=(qemu-system-x86 linux-image-amd64 busybox-static cpio kmod rdma-core ibverbs-providers
         ibverbs-utils iproute2 open-iscsi fio e2fsprogs python3)

if [ "${TARGET_UNDER_TEST:-target-rdma}" = "tgt" ]; then
    TEST_PKGS+=(tgt)
fi

missing() {
    local p out=()
    for p in "$@"; do
        if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]; then
            out+=("$p")
        fi
    done
    echo "${out[@]:-}"
}

SUDO=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); fi
fi

APT_UPDATED=0
APT_LOG=$(mktemp /tmp/setup-test-deps.XXXXXX.log)
trap 'rm -f "$APT_LOG"' EXIT
apt_install() {
    # $@: packages. Output goes to a log that is shown only on failure.
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" = 0 ]; then
        if ! timeout 600 "${SUDO[@]}" apt-get update -qq >"$APT_LOG" 2>&1; then
            cat "$APT_LOG" >&2
            return 1
        fi
        APT_UPDATED=1
    fi
    if ! timeout 1200 "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@" >"$APT_LOG" 2>&1 </dev/null; then
        cat "$APT_LOG" >&2
        return 1
    fi
}

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "setup-test-deps: not a Debian system (no dpkg-query); install by hand: ${TEST_PKGS[*]}" >&2
    exit 1
fi

read -r -a need_test <<<"$(missing "${TEST_PKGS[@]}")"
if [ "${#need_test[@]}" -gt 0 ]; then
    echo "setup-test-deps: installing ${need_test[*]}"
    apt_install "${need_test[@]}"
    # On a machine running systemd the package starts its own glusterd on
    # every address, port 24007, which the tests' private glusterd
    # (scripts/gluster.sh, 127.0.0.2:24007) then cannot bind. Only the
    # service this run just installed is stopped and disabled.
    if [[ " ${need_test[*]} " == *" glusterfs-server "* ]] && command -v systemctl >/dev/null 2>&1 &&
        systemctl is-active --quiet glusterd 2>/dev/null; then
        echo "setup-test-deps: stopping and disabling the glusterd service glusterfs-server just started (the tests run their own)"
        "${SUDO[@]}" systemctl disable --now glusterd >/dev/null 2>&1 || true
    fi
fi

if [ "${SETUP_SKIP_VM_DEPS:-0}" != 1 ]; then
    read -r -a need_vm <<<"$(missing "${VM_PKGS[@]}")"
    if [ "${#need_vm[@]}" -gt 0 ]; then
        echo "setup-test-deps: installing VM harness deps ${need_vm[*]}"
        # Only a warning: the hw-vm step then names what is missing and fails.
        apt_install "${need_vm[@]}" || echo "setup-test-deps: warning: could not install ${need_vm[*]}" >&2
    fi
fi

if [ "${SETUP_SKIP_BUILD_DEPS:-0}" != 1 ]; then
    read -r -a need_build <<<"$(missing "${BUILD_PKGS[@]}")"
    if [ "${#need_build[@]}" -gt 0 ]; then
        echo "setup-test-deps: installing build deps ${need_build[*]}"
        apt_install "${need_build[@]}" || echo "setup-test-deps: warning: could not install ${need_build[*]}" >&2
    fi
fi

# A package installed above can remove one installed before (a machine
# with a backported qemu-utils loses it to qemu-block-extra's
# dependencies): install again what is missing now.
read -r -a need_test <<<"$(missing "${TEST_PKGS[@]}")"
if [ "${#need_test[@]}" -gt 0 ]; then
    echo "setup-test-deps: installing again ${need_test[*]}"
    apt_install "${need_test[@]}"
fi

# verify the tools are really there
for tool in iscsi-test-cu iscsi-inq qemu-img qemu-io python3 glusterd gluster; do
    command -v "$tool" >/dev/null 2>&1 || { echo "setup-test-deps: $tool still missing" >&2; exit 1; }
done
# qemu's iSCSI driver lives in qemu-block-extra; check it is usable
if ! compgen -G "/usr/lib/*/qemu/block-iscsi.so" >/dev/null; then
    echo "setup-test-deps: qemu-img has no iscsi block driver (qemu-block-extra missing?)" >&2
    exit 1
fi
