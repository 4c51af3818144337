#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs the whole suite on the CPU.
#   bash scripts/test.sh            # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"   # skip the multi-process and long tests
#   TEST_WORKERS=1 bash scripts/test.sh  # one process (default: one per core, each test file on one of them)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The web chat test drives Debian's Chromium through selenium (no browser download works offline);
# install it when missing and apt is usable, else that one test is skipped and says why.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -q && apt-get install -y -q chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "could not install chromium + chromium-driver: the browser test will be skipped"
fi
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# tests/conftest.py puts .venv/bin first on PATH and keeps DeepSpeed's CPU op in .torch_extensions/.
# Most tests (and every rank they launch) use one core, so one worker per core nearly halves the wall time;
# --dist loadfile keeps each file, and its module-scoped fixtures (one trained run shared by several tests), in
# one worker.
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-$(nproc)}" --dist loadfile "$@"
