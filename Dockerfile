# syntax=docker/dockerfile:1
# CDT tokenizer service image. Two targets share every layer but torch's:
#   CPU (default, the last stage):
#     docker build -t cdt-tokenizer .
#   CUDA:
#     docker build --target cuda -t cdt-tokenizer:cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 .
#     docker run --gpus all -e CDT_DEVICES=cuda ...  (one process drives every GPU it sees)
# The CUDA index: torch 2.13's stable CUDA builds are 12.6 and 13.0 (13.2 is experimental;
# 12.8 was last built for 2.11), per the release compatibility matrix in PyTorch's
# RELEASE.md. cu130 covers Turing (sm_75) through Blackwell and needs an NVIDIA driver of
# the 580 series or newer; cu126 is the one for Volta or Pascal GPUs and older drivers.
# The wheels bring the CUDA runtime, cuBLAS and cuDNN as pip packages, and the NVIDIA
# container toolkit mounts the host's driver, so the CUDA target keeps the Python base
# image: the interpreter the tests run on, and no second copy of the CUDA libraries.
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
# The CPU wheels by default; the cuda target needs a CUDA index (header).
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
# /snapshots: the mount point of the session snapshots' volume, which a new named volume
# takes its owner from.
RUN groupadd --system --gid 10001 cdt && useradd --system --uid 10001 --gid cdt --home-dir /app --shell /usr/sbin/nologin cdt \
    && mkdir /snapshots && chown cdt:cdt /snapshots
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Code runs from /app (PYTHONPATH), so the default checkpoint path the code derives from
# its own location, /app/checkpoints/cdt-tiny, is the baked-in one; /app/client holds the
# formats package (cdt_client) the server shares with the client.
COPY --chown=root:root . /app
# No CDT_DEVICES: unset, the service takes every GPU it sees, else the CPU; the deploy
# files name the devices they were sized for.
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app:/app/client \
    CDT_CHECKPOINT=/app/checkpoints/cdt-tiny \
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
# One process: with CUDA devices it drives them all (`--workers N` is refused there).
CMD ["python", "-m", "cli.main", "serve", "--host", "0.0.0.0", "--port", "8000"]

# --- cuda: the runtime, refused at build time unless TORCH_INDEX gave a CUDA torch -------
FROM runtime AS cuda
# The driver libraries the NVIDIA container toolkit mounts: CUDA compute, and NVML
# (utility) for nvidia-smi. The devices themselves come from the orchestrator (compose
# device reservations, the k8s device plugin), never from the image: an image that set
# NVIDIA_VISIBLE_DEVICES=all would hand every GPU of a node to a pod that asked for none.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN python -c "import sys, torch; sys.exit(None if torch.version.cuda else \
'torch ' + torch.__version__ + ' is a CPU build: build the cuda target with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130')"

# --- cpu: the default target ------------------------------------------------------------
FROM runtime AS cpu
