# syntax=docker/dockerfile:1
#
# meter: one process per container (`meter serve`), non-root, journal on a volume.
#
#   docker build -t meter .
#   docker run --rm meter db upgrade --database postgresql+asyncpg://...   # migrations: a separate command
#   docker run -p 8787:8787 -v meter-data:/var/lib/meter meter              # meter serve (the default command)
#
# Configuration is the METER_* environment (README: "Environment variables"); see deploy/README.md.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY meter ./meter
COPY migrations ./migrations
# A non-editable install: the wheel carries the migrations as meter/_migrations.
RUN python -m venv /opt/meter && /opt/meter/bin/pip install --no-compile . \
    && /opt/meter/bin/python -m compileall -q /opt/meter/lib

FROM python:${PYTHON_VERSION}-slim-bookworm
RUN groupadd --system --gid 10001 meter \
    && useradd --system --uid 10001 --gid meter --home-dir /var/lib/meter --no-create-home meter \
    && mkdir -p /var/lib/meter/journal \
    && chown -R meter:meter /var/lib/meter
COPY --from=build /opt/meter /opt/meter
# MALLOC_ARENA_MAX=2: glibc gives each thread that mallocs (the SQLite writer's, the journal reader's)
# an arena of its own, which keeps memory it freed; two arenas took 5-8 MB off peak RSS under load.
ENV PATH=/opt/meter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    METER_HOST=0.0.0.0 \
    METER_PORT=8787 \
    METER_DATABASE_URL=sqlite:////var/lib/meter/meter.db \
    METER_JOURNAL_DIR=/var/lib/meter/journal \
    METER_LOG_FORMAT=json \
    MALLOC_ARENA_MAX=2
USER 10001:10001
WORKDIR /var/lib/meter
# The SQLite database, its key file and the journal. With PostgreSQL only the journal matters here:
# keep it on a volume that outlives the container, one per replica.
VOLUME ["/var/lib/meter"]
EXPOSE 8787
# /healthz answers while the process runs; readiness (/readyz) is for load balancers and Kubernetes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METER_PORT', '8787'), timeout=2)"]
# SIGTERM drains: in-flight requests get METER_SHUTDOWN_GRACE seconds, then the journal is flushed.
# Give `docker stop` more than that: docker stop --time 45 (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["meter"]
CMD ["serve"]
