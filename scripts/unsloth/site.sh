#!/usr/bin/env bash
# Unsloth and what it needs beside qlora_exp's own environment, in a folder of its own (not the environment: Unsloth
# 2026.10 pins trl <= 1.15 and datasets < 5, which the hf engine's tests do not run on): the real Unsloth for
# tests/test_engines.py, which puts this folder first on a trial's PYTHONPATH (Unsloth 2026.10 trains on a CPU).
# Usage: bash scripts/unsloth/site.sh DIR      (~20 s; then QLORA_EXP_TEST_UNSLOTH_SITE=DIR)
set -euo pipefail
DIR=$1
rm -rf "$DIR.tmp"
python -m pip install -q --no-deps --no-compile --target "$DIR.tmp" \
  unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 torchao==0.18.0 cut-cross-entropy==25.1.1 \
  tyro docstring-parser typeguard shtab structlog json5 nest-asyncio msgspec hf-transfer \
  httpx httpcore h11 anyio 2>&1 | grep -v -i "warning" || true
python - "$DIR.tmp" <<'PY'
import sys, pathlib
assert (pathlib.Path(sys.argv[1]) / "unsloth" / "__init__.py").is_file(), "unsloth did not install"
PY
rm -rf "$DIR.tmp/studio" "$DIR.tmp/test"   # its web UI; a top-level `test` would hide the standard library's
rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
