# syntax=docker/dockerfile:1
# posfleet collector image. Build from the repository root:
#   docker build -t posfleet:latest .
# (docker-compose builds it as service `collector`; see docs/deploy.md.)

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY collector ./collector
COPY exporters ./exporters
# Shipped inside the wheel as package data: `posfleet rules check` / `dashboards check` work in the image.
COPY alert_rules ./alert_rules
COPY dashboards ./dashboards
COPY docs/runbooks ./docs/runbooks
# Wheels for posfleet and every dependency, so the runtime stage needs no compiler and no network.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/posfleet --create-home posfleet
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels posfleet && rm -rf /wheels
USER posfleet
WORKDIR /var/lib/posfleet
# State snapshot and the InfluxDB write spool live here: mount a volume so restarts keep them.
VOLUME ["/var/lib/posfleet"]
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=2)"]
# SIGTERM lets the collector flush its buffers (docker stop waits stop_grace_period, see docker-compose.yml).
STOPSIGNAL SIGTERM
ENTRYPOINT ["posfleet"]
CMD ["run", "--config", "/etc/posfleet/collector.yaml"]
