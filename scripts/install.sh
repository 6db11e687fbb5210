#!/usr/bin/env bash
# Install what stablenet needs on a Debian host (as root): system packages, then a virtualenv in
# .venv with stablenet and its test tools. Safe to run again; it only adds what is missing.
#
#   bash scripts/install.sh            # runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/engine.sh

# docker.io: the engine (started privately only when none answers); busybox-static: test images;
# bind9-dnsutils: dig; dnsmasq-base: a local upstream for DNS forwarding tests; curl: HTTP client;
# debootstrap: the local stand-in for python:3.11-slim that the image test builds the Dockerfile on.
_apt_install ca-certificates docker.io busybox-static bind9-dnsutils dnsmasq-base curl iproute2 \
    debootstrap
# etcd-server: the store of the cluster layer ([cluster] etcd), for its tests and benchmark.
_apt_install etcd-server
# nftables, python3-nftables, conntrack: the kernel data path of per-service virtual addresses
# (libnftables through Debian's binding; the conntrack tool forgets stale UDP flows).
_apt_install nftables python3-nftables conntrack
# chromium: the headless browser the status page test drives (Playwright uses it, never its own).
_apt_install chromium

# gcc: mypyc compiles the proxy's request path into C (scripts/native.py).
_apt_install gcc libc6-dev || echo "install: no C compiler; the data plane will run as Python" >&2

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "install: stablenet needs Python >= 3.11 as $PYTHON" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv 2>/dev/null || { _apt_install python3-venv && "$PYTHON" -m venv .venv; }
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
# Debian's libnftables binding is installed for the system Python: link that one package (not the
# whole of dist-packages) into the virtualenv. stablenet also finds it there by itself.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/nftables ] && [ ! -e "$site/nftables" ]; then
    ln -s /usr/lib/python3/dist-packages/nftables "$site/nftables"
fi
# The compiler needs the headers of the Python the venv was made from (Debian's python3-dev).
if ! .venv/bin/python -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' 2>/dev/null; then
    _apt_install python3-dev || echo "install: no Python headers; the data plane will run as Python" >&2
fi
.venv/bin/python scripts/native.py
