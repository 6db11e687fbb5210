#!/usr/bin/env bash
# Virtual address benchmark: installs wrk, nginx and its stream module, nftables and conntrack
# from Debian's packages when missing, runs the data path (benchmarks.vips) and the control
# plane (benchmarks.vips.updates, inside a network namespace made here and deleted at the end).
set -euo pipefail
cd "$(dirname "$0")/../.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v nft >/dev/null || need+=(nftables python3-nftables)
command -v conntrack >/dev/null || need+=(conntrack)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
.venv/bin/python -m benchmarks.vips "$@"
ns="snt-vips-bench-$$"
ip netns add "$ns"
trap 'ip netns delete "$ns"' EXIT
nsenter --net="/var/run/netns/$ns" .venv/bin/python -m benchmarks.vips.updates
