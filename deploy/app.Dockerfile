# The runner's API, worker and migration image.
# Here: FROM the locally built runner-base/python:local, dependencies installed offline
# from the host-built wheelhouse var/compose/wheels (deploy/build-local-images.sh).
# Elsewhere: --build-arg BASE_IMAGE=python:3.11-slim --build-arg WHEELS=deploy/no-wheels
# installs the same dependencies from PyPI (docker-compose.public.yml sets both).
ARG BASE_IMAGE=runner-base/python:local
FROM ${BASE_IMAGE}
ARG WHEELS=var/compose/wheels
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app \
    PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    RUNNER_API_HOST=0.0.0.0 RUNNER_API_PORT=8080 RUNNER_LOG_FORMAT=json
COPY pyproject.toml deploy/install-app.sh /tmp/build/
COPY ${WHEELS}/ /tmp/build/wheels/
RUN sh /tmp/build/install-app.sh && rm -rf /tmp/build
# runner (the CLI), runner-healthcheck, runner-worker-entrypoint
COPY deploy/bin/ /usr/local/bin/
# The app runs unprivileged; the worker service starts as root only long enough to join
# the Docker socket's group (runner-worker-entrypoint), then drops to this account.
USER 10001:10001
WORKDIR /app
EXPOSE 8080
ENTRYPOINT ["runner"]
CMD ["--help"]
# The code last: a code change rebuilds only these layers (owned by root, read-only).
COPY migrations /app/migrations
COPY api /app/api
COPY runner /app/runner
