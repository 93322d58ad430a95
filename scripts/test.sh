#!/usr/bin/env bash
# Set up (package, WordNet data for synonym augmentation, headless Chromium for the report test), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_wordnet.sh
bash .ci/setup-chromium.sh
. .venv/bin/activate
python -m pytest -q "$@"
