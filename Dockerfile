# syntax=docker/dockerfile:1
# CDT tokenizer service image.
#   CPU (default):  docker build -t cdt-tokenizer .
#   CUDA:           docker build -t cdt-tokenizer:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#                   and run with CDT_DEVICE=cuda (bf16 autocast is then the default dtype).
# The shipped checkpoint (checkpoints/cdt-tiny) is baked in; serve another one by mounting
# it read-only: docker run -v /models/mine:/models/mine:ro -e CDT_CHECKPOINT=/models/mine ...

ARG BASE_IMAGE=python:3.11-slim

# --- base: a Python interpreter, whatever the base image (CUDA images ship none) ------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The distro's python3 for whichever base was chosen: no one version pin fits every base.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# --- builder: dependencies into a venv; compilers and pip caches stay in this stage ----
FROM base AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Same pin as pyproject.toml: the default PyPI torch wheel is the multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
# Dependencies first, from pyproject.toml alone, so code edits do not re-run this layer.
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# --- runtime: venv + source + checkpoint, non-root --------------------------------------
FROM base AS runtime
RUN groupadd --system --gid 10001 cdt && useradd --system --uid 10001 --gid cdt --home-dir /app --shell /usr/sbin/nologin cdt
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Code runs from /app (PYTHONPATH), so the default checkpoint path the code derives from
# its own location, /app/checkpoints/cdt-tiny, is the baked-in one; /app/client holds the
# formats package (cdt_client) the server shares with the client.
COPY --chown=root:root . /app
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app:/app/client \
    CDT_CHECKPOINT=/app/checkpoints/cdt-tiny CDT_DEVICE=cpu \
    HOME=/tmp
# Fail the build, not the first request, if the checkpoint or the app cannot load.
RUN test -f "${CDT_CHECKPOINT}/config.json" && test -f "${CDT_CHECKPOINT}/model.safetensors" \
    && python -c "import service, model, media"
USER 10001:10001
EXPOSE 8000
# Liveness only: readiness (/readyz) also needs Redis, and an unhealthy container would
# be restarted for an outage of another service.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["python", "-m", "cli.main", "serve", "--host", "0.0.0.0", "--port", "8000"]
