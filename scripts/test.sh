#!/usr/bin/env bash
# Install everything, make sure a Docker Engine answers (starting a private one if needed), then
# run lint, type checks and the whole test suite. Extra arguments go to pytest.
#
#   bash scripts/test.sh
#   bash scripts/test.sh -k registry -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/engine.sh
engine_up
trap engine_down EXIT
export DOCKER_HOST
.venv/bin/ruff check stablenet tests benchmarks scripts
.venv/bin/ruff format --check stablenet tests benchmarks scripts
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
# The request path also as plain Python, as it runs where nothing compiled it (the Docker image).
if [ "$#" -eq 0 ]; then
    STABLENET_PURE=1 .venv/bin/python -m pytest -q tests/test_proxy_http.py tests/test_proxy_core.py \
        tests/test_proxy_fuzz.py tests/test_proxy_hostile.py tests/test_proxy_exchange.py \
        tests/test_proxy_budget.py tests/test_budget.py tests/test_routes.py
fi
