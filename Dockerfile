# stablenet daemon image.
#
#   docker build -t stablenet .
#   docker run -d --name stablenet --network host --cap-add NET_ADMIN \
#       -v /var/run/docker.sock:/var/run/docker.sock stablenet
#
# The container runs as root on purpose: it reads the Docker socket (root-equivalent anyway),
# binds DNS on port 53 and the proxy on port 80, and adds the proxy's virtual address to lo
# (NET_ADMIN). Works on the official python:3.11-slim (Python in /usr/local) and on a plain
# Debian root with python3 and python3-venv (Python in /usr): stablenet lives in its own venv.
#
# Two stages. "build" has the C toolchain and mypyc: it installs stablenet into a venv in
# /opt/stablenet, compiles the proxy's request path (stablenet.native.COMPILED) with
# scripts/native.py into that venv's site-packages/.native, and fails unless the compiled modules
# load. The final stage starts again from the slim base and copies only that venv: the package,
# its dependencies and the compiled modules; no compiler, headers, mypy, setuptools or pip.
#
# pip uses its defaults (PyPI). To build from a mirror, or offline from a wheelhouse put in
# ./wheels (see README), pass the usual pip settings as build arguments, e.g.
#   --build-arg PIP_INDEX_URL=https://mirror.example/simple
#   --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/wheels

FROM python:3.11-slim AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# gcc and libc6-dev compile mypyc's C. Python.h: the official image has it in /usr/local; Debian's
# python3 (the plain Debian root) needs libpython3-dev.
RUN include=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])') \
    && headers=$([ -e "$include/Python.h" ] || echo libpython3-dev) \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc libc6-dev $headers \
    && rm -rf /var/lib/apt/lists/*
# .dockerignore lets in only the package sources, the README, the default config,
# scripts/native.py and wheels/.
COPY . /src
# mypy and setuptools go into a venv of their own that sees the installed package through a .pth
# file, so they never enter /opt/stablenet; pip and setuptools, which stablenet does not use at
# run time, leave it once stablenet is installed.
RUN python3 -m venv /opt/stablenet \
    && /opt/stablenet/bin/python -m pip install /src \
    && python3 -m venv /opt/mypyc \
    && /opt/mypyc/bin/python -m pip install 'mypy>=1.10' 'setuptools>=68' \
    && purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    && /opt/stablenet/bin/python -c "$purelib" > "$(/opt/mypyc/bin/python -c "$purelib")/stablenet.pth" \
    && /opt/mypyc/bin/python /src/scripts/native.py --force \
    && /opt/stablenet/bin/python -m pip uninstall --yes --quiet pip setuptools \
    && /opt/stablenet/bin/stablenet version | tee /dev/stderr | grep -q 'request path: compiled'

FROM python:3.11-slim
# iproute2: `ip`, which the proxy uses to put its virtual address on lo. apt-get clean drops the
# downloaded packages and apt's caches, which a plain Debian root (unlike the official image)
# keeps.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/stablenet /opt/stablenet
COPY config/stablenet.toml /etc/stablenet/stablenet.toml
ENV PATH=/opt/stablenet/bin:$PATH \
    STABLENET_CONFIG=/etc/stablenet/stablenet.toml \
    PYTHONDONTWRITEBYTECODE=1
# stablenet.enable=false: the daemon is not a service of its own (containers inherit image labels).
LABEL stablenet.enable="false" \
      org.opencontainers.image.title="stablenet" \
      org.opencontainers.image.description="Service discovery and stable endpoints for Docker hosts" \
      org.opencontainers.image.licenses="Apache-2.0"
# DNS, proxy, admin API (with --network host these are the host's ports).
EXPOSE 53/udp 53/tcp 80/tcp 9180/tcp
# Alive = the admin API answers /healthz at admin.listen, read from the same config and
# STABLENET_* variables the daemon uses (wildcard addresses are asked on loopback).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["python3", "-c", "import urllib.request; from stablenet.config import load; from stablenet.units import parse_hostport; h, p = parse_hostport(load().admin.listen); h = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); h = f'[{h}]' if ':' in h else h; urllib.request.urlopen(f'http://{h}:{p}/healthz', timeout=4)"]
ENTRYPOINT ["stablenet"]
CMD ["run", "--config", "/etc/stablenet/stablenet.toml"]
