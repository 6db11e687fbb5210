#!/usr/bin/env bash
# DNS benchmark: stablenet against dnsmasq with dnsperf, each server pinned to CPU 0 and the load
# to CPU 1, loopback only. Installs what it needs when missing. Extra arguments go to run.py.
#
#   bash benchmarks/dns/run.sh                  # 10 s per run, 3 repeats
#   bash benchmarks/dns/run.sh --seconds 5 --repeat 2
set -euo pipefail
cd "$(dirname "$0")/../.."
missing=()
command -v dnsperf >/dev/null 2>&1 || missing+=(dnsperf)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
command -v dig >/dev/null 2>&1 || missing+=(bind9-dnsutils)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
[ -x .venv/bin/python ] || bash scripts/install.sh
exec .venv/bin/python -m benchmarks.dns.run "$@"
