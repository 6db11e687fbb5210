#!/usr/bin/env bash
# Install everything, make sure a Docker Engine answers (starting a private one if needed), then
# run the daemon in the foreground with config/stablenet.toml. Extra arguments go to
# `stablenet run` (e.g. --log-format json). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/engine.sh
engine_up
trap engine_down EXIT
export DOCKER_HOST
.venv/bin/stablenet check-config --config config/stablenet.toml
.venv/bin/stablenet run --config config/stablenet.toml "$@"
