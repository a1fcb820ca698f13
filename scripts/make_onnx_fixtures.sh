#!/usr/bin/env bash
# Regenerates tests/fixtures/onnx/ (the ONNX models the tests score and
# onnxruntime's reference scores for them). Not needed by `make test`: the
# fixtures are committed. Needs python3 with venv and PyPI; the venv is kept
# in ~/.cache/shardflow/onnx-venv so later runs skip the installs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${SHARDFLOW_ONNX_VENV:-$HOME/.cache/shardflow/onnx-venv}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# The exporters' output changes between versions (opsets, attribute
# spellings): pinned, so that regenerating gives the same graphs. protobuf
# below 6 and onnx 1.18: later ones refuse the booleans skl2onnx writes for
# HistGradientBoosting's missing-value directions.
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    "numpy==2.4.6" \
    "scikit-learn==1.9.1" \
    "skl2onnx==1.20.0" \
    "onnxmltools==1.16.0" \
    "xgboost==3.2.0" \
    "lightgbm==4.7.0" \
    "onnxruntime==1.32.0" \
    "onnx==1.18.0" \
    "protobuf==5.29.6"

exec "$venv/bin/python" "$here/make_onnx_fixtures.py" "$@"
