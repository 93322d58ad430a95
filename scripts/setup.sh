#!/usr/bin/env bash
# Create .venv and install budgetlora with its test tools. Torch is pinned to the CPU wheel 2.13.0 first, so that
# nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
