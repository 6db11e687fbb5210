#!/usr/bin/env bash
# Find a Docker Engine that answers, or start a private one.
#
#   source scripts/engine.sh && engine_up     # exports DOCKER_HOST; starts dockerd if needed
#   engine_down                                # stops the engine only if engine_up started it
#
# An engine that already answers (DOCKER_HOST, else /var/run/docker.sock) is used as it is and
# never stopped. Otherwise docker.io is installed when missing and a private dockerd is started
# with its own data root, exec root, pid file and socket under $STABLENET_ENGINE_DIR.

STABLENET_ENGINE_DIR="${STABLENET_ENGINE_DIR:-/tmp/stablenet-engine}"
_ENGINE_OWNED=0

_engine_answers() {
    timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

# With no DOCKER_HOST, use the system's engine at /var/run/docker.sock if it answers.
_use_system_engine() {
    if [ -z "${DOCKER_HOST:-}" ] && [ -S /var/run/docker.sock ] \
        && DOCKER_HOST=unix:///var/run/docker.sock _engine_answers; then
        export DOCKER_HOST=unix:///var/run/docker.sock
        echo "engine: using $DOCKER_HOST$1" >&2
        return 0
    fi
    return 1
}

engine_up() {
    if command -v docker >/dev/null 2>&1; then
        if [ -n "${DOCKER_HOST:-}" ] && _engine_answers; then
            echo "engine: using DOCKER_HOST=$DOCKER_HOST" >&2
            return 0
        fi
        _use_system_engine "" && return 0
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        echo "engine: installing docker.io" >&2
        _apt_install docker.io || return 1
        # Where the package's own service started an engine, use that one.
        _use_system_engine " (started by the docker.io package)" && return 0
    fi
    local dir="$STABLENET_ENGINE_DIR"
    mkdir -p "$dir/data" "$dir/exec"
    export DOCKER_HOST="unix://$dir/docker.sock"
    if [ -f "$dir/dockerd.pid" ] && kill -0 "$(cat "$dir/dockerd.pid")" 2>/dev/null \
        && _engine_answers; then
        echo "engine: reusing private dockerd pid $(cat "$dir/dockerd.pid")" >&2
        return 0
    fi
    echo "engine: starting private dockerd at $DOCKER_HOST (log $dir/dockerd.log)" >&2
    dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
        -H "$DOCKER_HOST" >"$dir/dockerd.log" 2>&1 &
    local pid=$!
    _ENGINE_OWNED=1
    echo "$pid" >"$dir/owner.pid"
    local i
    for i in $(seq 1 120); do
        if _engine_answers; then
            echo "engine: ready after ${i} tries" >&2
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "engine: dockerd exited; last log lines:" >&2
            tail -20 "$dir/dockerd.log" >&2
            return 1
        fi
        sleep 0.5
    done
    echo "engine: dockerd did not answer within 60 s; see $dir/dockerd.log" >&2
    return 1
}

engine_down() {
    [ "$_ENGINE_OWNED" = 1 ] || return 0
    local dir="$STABLENET_ENGINE_DIR" pid
    pid="$(cat "$dir/owner.pid" 2>/dev/null)" || return 0
    [ -n "$pid" ] || return 0
    echo "engine: stopping private dockerd pid $pid" >&2
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    rm -f "$dir/owner.pid"
    _ENGINE_OWNED=0
}

_apt_install() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ ! -f /tmp/.stablenet-apt-updated ]; then
        apt-get update -qq && touch /tmp/.stablenet-apt-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
