#!/usr/bin/env bash
# The package works without its source tree: build the wheel, install it into a fresh virtual environment outside
# the checkout, and from another folder run `plan` on a shipped preset, a tiny `train` and a `predict`.
# Kept small (200 training rows, 5 steps, 32 tokens) so that it takes a couple of minutes on 2 CPU cores.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/budgetlora-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
data="${BUDGETLORA_DATA:-$repo/../shared/data/ag_news}"
[ -f "$data/train.csv.gz" ] || { echo "wheel-check: no AG News copy at $data (set BUDGETLORA_DATA)" >&2; exit 1; }
export BUDGETLORA_DATA="$(cd "$data" && pwd)"

echo "wheel-check: building the wheel"
# the build only needs setuptools; building in an isolated environment would fetch it again for nothing
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo"
wheel="$(ls "$work"/dist/budgetlora-*.whl)"

echo "wheel-check: installing $(basename "$wheel") into a fresh environment"
"$python" -m venv "$work/venv"
# --no-compile: byte-compiling all of torch and transformers up front costs a minute; imports compile what they use
pip=("$work/venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile)
# torch first and exactly pinned: that pin resolves to the local CPU wheel; anything looser downloads a CUDA build
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" "$wheel"
echo "wheel-check: installed after $((SECONDS - start)) s"

cd "$work"  # nothing below may see the checkout
bl="$work/venv/bin/budgetlora"
"$work/venv/bin/python" - "$repo" <<'EOF'
import sys
from pathlib import Path

import budgetlora

where = Path(budgetlora.__file__).resolve()
assert "site-packages" in where.parts and Path(sys.argv[1]).resolve() not in where.parents, where
presets = sorted(p.name for p in (where.parent / "presets").glob("*.yaml"))
assert "minilm-quick.yaml" in presets and "minilm-default.yaml" in presets, presets
print(f"wheel-check: package at {where.parent}; {len(presets)} presets shipped")
EOF

"$bl" plan --config minilm-quick
"$bl" train --config minilm-quick --data.train_limit 200 --data.test_limit 100 --data.val_fraction 0.2 \
    --model.max_length 32 --train.max_steps 5 --train.eval_every 5 --runs "$work/runs"
run="$(dirname "$(ls "$work"/runs/*/metrics.json)")"
echo "wheel-check: trained after $((SECONDS - start)) s"
for f in README.md adapter_model.safetensors verify.json; do
    [ -f "$run/$f" ] || { echo "wheel-check: $run has no $f" >&2; exit 1; }
done

"$work/venv/bin/python" -c "
import pandas as pd, sys
pd.read_csv(sys.argv[1] + '/test.csv.gz').head(20)[['text']].to_csv('texts.csv', index=False)" "$BUDGETLORA_DATA"
"$bl" predict "$run" --input texts.csv --output predictions.csv
rows=$(($(wc -l < predictions.csv) - 1))
[ "$rows" -eq 20 ] || { echo "wheel-check: expected 20 predictions, got $rows" >&2; exit 1; }
echo "wheel-check: ok in $((SECONDS - start)) s (wheel built, installed outside the checkout, plan/train/predict ran)"
