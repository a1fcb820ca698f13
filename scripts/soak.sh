#!/usr/bin/env bash
# `make soak`: the reliability tests of `make test`, the same code, run
# longer and harder, with a report and an RSS plot. About 45 minutes with the
# defaults (30 of them under load). Everything lands in $SOAK_DIR:
#   report.txt  one line per test with what it injected and measured
#   load.csv    RSS, throughput and checkpoint duration, one sample a second
#   rss.png     load.csv plotted (matplotlib, installed here in a venv)
#   test.log    the full test output
# Knobs (environment): SOAK_KILLS (20), SOAK_LOAD_SECS (1800), SOAK_FUZZ_CASES
# (50000), SOAK_DIR, PROFILE (dev; `release` builds an optimised binary first).
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-dev}
SOAK_DIR=${SOAK_DIR:-soak/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$SOAK_DIR"
SOAK_DIR=$(cd "$SOAK_DIR" && pwd)

# matplotlib from PyPI, in a venv of our own (nothing installed system-wide).
VENV=${SOAK_VENV:-$HOME/.cache/shardflow/soak-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check matplotlib
fi

export SHARDFLOW_REPORT_DIR="$SOAK_DIR"
export SHARDFLOW_CRASH_KILLS=${SOAK_KILLS:-20}
export SHARDFLOW_CRASH_RECORDS=${SOAK_CRASH_RECORDS:-40000}
export SHARDFLOW_CRASH_PRODUCE_SECS=${SOAK_CRASH_PRODUCE_SECS:-120}
export SHARDFLOW_FUZZ_CASES=${SOAK_FUZZ_CASES:-50000}
export SHARDFLOW_KINESIS_FAULT_RECORDS=${SOAK_KINESIS_FAULT_RECORDS:-40000}
export SHARDFLOW_KINESIS_FAULT_SECS=${SOAK_KINESIS_FAULT_SECS:-120}
export SHARDFLOW_INFERENCE_FAULT_RECORDS=${SOAK_INFERENCE_FAULT_RECORDS:-60000}
export SHARDFLOW_LOAD_SECS=${SOAK_LOAD_SECS:-1800}
: > "$SOAK_DIR/report.txt"

echo "soak: results in $SOAK_DIR (profile $PROFILE)"
status=0
# One test binary at a time, one test at a time: the load test must have
# the machine to itself for its numbers to mean anything.
cargo test --profile "$PROFILE" \
    --test reliability_fuzz --test reliability_disk --test reliability_kinesis \
    --test reliability_inference --test reliability_crash --test reliability_load \
    -- --test-threads=1 2>&1 | tee "$SOAK_DIR/test.log" || status=$?

if [ -s "$SOAK_DIR/load.csv" ]; then
    "$VENV/bin/python" scripts/plot_load.py "$SOAK_DIR/load.csv" "$SOAK_DIR/rss.png"
fi
echo
echo "== soak report ($SOAK_DIR/report.txt) =="
cat "$SOAK_DIR/report.txt"
exit $status
