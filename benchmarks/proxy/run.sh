#!/usr/bin/env bash
# Proxy benchmark: installs the peers (wrk, nginx, haproxy, caddy) from Debian's packages when
# missing, then runs benchmarks.proxy. Arguments are passed on (e.g. --duration 5 --repeat 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
missing=()
for tool in wrk nginx haproxy caddy taskset; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    pkgs=()
    for tool in "${missing[@]}"; do
        case "$tool" in
            taskset) pkgs+=(util-linux) ;;
            *) pkgs+=("$tool") ;;
        esac
    done
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
fi
exec .venv/bin/python -m benchmarks.proxy "$@"
