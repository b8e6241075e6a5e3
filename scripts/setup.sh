#!/usr/bin/env bash
# Installs what building target-rdma needs on Debian 12 and builds the
# release binary. Idempotent; quiet when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# libclang-dev for rdma-sys's bindgen; libibverbs-dev and librdmacm-dev for
# the iSER transport (the binary links libibverbs1 and librdmacm1, and
# serves TCP alone when the machine has no RDMA device).
for pkg in build-essential pkg-config libclang-dev libibverbs-dev librdmacm-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi
cargo build --release -p target-rdma
