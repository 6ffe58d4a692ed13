# Image Service: `gunicorn app:app` on port 8083, as the non-root user 10001, under tini.
#   docker build -t image-service .
#   docker build --build-arg PYTHON_IMAGE=registry.example.com/python:3.11.15-slim-bookworm .
#   docker run -p 8083:8083 -v "$PWD/secrets-dir:/run/secrets:ro" image-service
# Requires BuildKit (the default builder since Docker 23) for RUN --mount and COPY --chmod; its
# built-in frontend has both, so no `# syntax=` line makes the build pull one from a registry.

# The base of both stages; name a mirror of the same image at build time if Docker Hub is out of
# reach.
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

# ---------------------------------------------------------------- build: requirements -> wheels
# Every runtime dependency ships manylinux wheels for CPython 3.11, so no compiler is installed;
# a dependency that ever needs one fails here, loudly, instead of growing the runtime image.
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY requirements.txt ./
RUN pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt \
    && cp requirements.txt /wheels/

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="image-service" \
      org.opencontainers.image.description="Turns a photo of a meal into nutrition facts."

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# netcat-openbsd: the entrypoint's wait for Redis; tini: PID 1 that reaps and forwards signals.
# Versions are those of Debian 12 (bookworm), the base image's release.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        netcat-openbsd=1.219-1 \
        tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# The wheels are bind-mounted from the build stage, so none of them stays in a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels -r /wheels/requirements.txt

# The embedded store (used when no Redis is configured) lives in a folder only the service's user
# can enter; the service checks that at start and refuses a store another user could write.
RUN groupadd --system --gid 10001 appuser \
    && useradd --system --uid 10001 --gid appuser --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin appuser \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/image-service
ENV STORE_PATH=/var/lib/image-service/store.sqlite3

# The code stays owned by root: the service can read it, not change it.
WORKDIR /app
# USDA SR28 (public domain), xz-compressed with its checksums: items are counted from it unless
# NUTRITION_SOURCE=model; USDA_SR28_DIR names another copy (deploy/compose.nutrition.yml).
COPY usda-sr28/ ./usda-sr28/
# The service's modules: gunicorn.conf.py imports app, and app the Flask-free modules beside it.
COPY *.py openapi.yaml ./
COPY --chmod=0755 docker-entrypoint.sh ./

USER 10001:10001
EXPOSE 8083

# Readiness as the contract defines it: 200 healthy (or starting up), 503 unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8083/health', timeout=4).status != 200)"]

ENTRYPOINT ["/usr/bin/tini", "--", "/app/docker-entrypoint.sh"]
CMD ["gunicorn", "app:app"]
