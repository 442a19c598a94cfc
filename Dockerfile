# The Tether sidecar image; the compose stack's demo agent runs from it too.
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# the lock first (its own layer): exact versions with their hashes, the build backend included
COPY requirements/runtime.txt ./requirements/
RUN pip install --require-hashes -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY sidecar ./sidecar
COPY sdk ./sdk
RUN pip install --no-deps --no-build-isolation .

COPY examples ./examples
COPY deploy/tether.yaml /etc/tether/tether.yaml

# Not root: the journal lives in /data, the one place the sidecar writes.
RUN useradd --system --uid 10001 --no-create-home tether \
    && mkdir /data && chown tether /data
USER tether
VOLUME ["/data"]

# 7700: gRPC (Call, StreamCall, ...); 9464: /metrics, /healthz, /readyz
EXPOSE 7700 9464
CMD ["tether", "serve", "--config", "/etc/tether/tether.yaml"]
