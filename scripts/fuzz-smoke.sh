#!/usr/bin/env bash
# Fuzz smoke test of the sans-IO iSCSI core (fuzz/): builds the libFuzzer
# targets on STABLE Rust and runs each one for a short, bounded time.
#
# Engine: libFuzzer through libfuzzer-sys, built and run by cargo-fuzz.
# cargo-fuzz's RUSTFLAGS (-Cpasses=sancov-module, -Cllvm-args=-sanitizer-
# coverage-*, --cfg fuzzing) are all stable flags once the sanitizer is
# off (-s none); RUSTC_BOOTSTRAP=1 is set anyway so nothing nightly-only
# can trip stable rustc. The exact command, per target, from fuzz/:
#
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> corpus/<target> seeds/<target> \
#       -- -max_total_time=20 -timeout=10 -rss_limit_mb=2048
#
# Targets: pdu_decode, login, connection (see fuzz/README.md).
#
#   scripts/fuzz-smoke.sh                    # 20 s per target
#   FUZZ_SECONDS=300 scripts/fuzz-smoke.sh   # longer
#   FUZZ_TARGETS="login" scripts/fuzz-smoke.sh
#   FUZZ_SEED=7 scripts/fuzz-smoke.sh        # libFuzzer's -seed
#
# Seed: under CI (CI=true) every target runs with -seed=1 unless FUZZ_SEED
# says otherwise, so the gate a change must pass is the same for every
# change and a failure can be replayed; elsewhere the seed is libFuzzer's
# own (random, printed in the log as 'Seed:'), so longer runs by hand
# explore. Findings from those become unit tests in iscsi/ and the gate
# then checks them on every change.
#
# Installs cargo-fuzz (cargo install --locked) and a C++ compiler (apt, for
# libFuzzer itself) only when missing. Exits non-zero if any target finds a
# crash, time-out or OOM, printing the input that caused it (under
# fuzz/artifacts/<target>/). The last line reads `fuzz: N passed, N failed`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ_DIR=$ROOT/fuzz
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
FUZZ_TARGETS=${FUZZ_TARGETS:-pdu_decode login connection}
if [ "${CI:-}" = true ]; then
    FUZZ_SEED=${FUZZ_SEED:-1}
else
    FUZZ_SEED=${FUZZ_SEED:-0}
fi
CARGO_FUZZ_VERSION=0.13.2

# The fuzz crate is its own workspace with its own target dir.
export CARGO_TARGET_DIR=$FUZZ_DIR/target
export RUSTC_BOOTSTRAP=1
export PATH=$HOME/.cargo/bin:$PATH

log() { echo "fuzz-smoke: $*" >&2; }

if ! command -v cargo >/dev/null; then
    log "cargo not found"
    exit 1
fi
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null; then
    log "installing g++ (libfuzzer-sys compiles libFuzzer)"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

cd "$FUZZ_DIR"
log "building targets ($(cargo fuzz --version), $(rustc --version))"
cargo fuzz build -s none

passed=0
failed=0
failures=()
for t in $FUZZ_TARGETS; do
    mkdir -p "corpus/$t" "artifacts/$t"
    marker=$(mktemp)
    log "running $t for ${FUZZ_SECONDS}s (seed ${FUZZ_SEED}, 0 = random)"
    rc=0
    # libFuzzer stops itself at max_total_time; the outer timeout only
    # guards against the tool hanging.
    timeout -k 10 $((FUZZ_SECONDS + 120)) \
        cargo fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
        -seed="$FUZZ_SEED" -print_final_stats=1 >"artifacts/$t.log" 2>&1 || rc=$?
    found=$(find "artifacts/$t" -type f -newer "$marker" \
        \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | sort)
    rm -f "$marker"
    grep -E '^INFO: Seed:|^#[0-9]+ +DONE|^stat::number_of_executed_units' "artifacts/$t.log" >&2 || true
    if [ "$rc" -eq 0 ] && [ -z "$found" ]; then
        passed=$((passed + 1))
        log "$t: ok"
    else
        failed=$((failed + 1))
        failures+=("$t")
        log "$t: FAILED (exit $rc); log: $FUZZ_DIR/artifacts/$t.log"
        grep -E 'panicked at|^==[0-9]+== ERROR|SUMMARY' -A3 "artifacts/$t.log" | head -20 >&2 || true
        if [ -n "$found" ]; then
            while read -r f; do
                echo "fuzz: $t crash input: $FUZZ_DIR/$f" >&2
                echo "  reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none $t $f" >&2
                echo "  contents (hex): $(od -An -tx1 -v "$f" | tr -d ' \n' | head -c 4096)" >&2
            done <<<"$found"
        else
            tail -20 "artifacts/$t.log" >&2
        fi
    fi
done

if [ "$failed" -gt 0 ]; then
    log "failed targets: ${failures[*]}"
fi
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
