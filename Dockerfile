# syntax=docker/dockerfile:1
# CoNeTTE captioning server: TorchServe 0.12 + the project's handler, non-root, one process tree.
#
# CPU image (the default):
#   docker build -t conette-serve:cpu .
# GPU image (same file, CUDA build of torch):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 -t conette-serve:gpu .
#   PyTorch's CUDA wheels carry the CUDA runtime, cuBLAS, cuDNN and NCCL as nvidia-* pip packages; the node's
#   NVIDIA container toolkit adds the driver (NVIDIA_DRIVER_CAPABILITIES below). An nvidia/cuda base would
#   only duplicate those libraries, and its Ubuntu has no Python 3.11 (BASE_IMAGE must provide python3 3.11).
#   The cu130 wheels need an NVIDIA driver >= 580 on the node (CUDA 13.0's minimum on Linux; older drivers
#   fail at the first CUDA call, "driver version is insufficient").
#
# The model: every archive or no-archive directory in model_store/ at build time is baked into
# /opt/conette/model-store (run `make mar` first). Built from a clean checkout the store is empty and the
# container expects a volume there (PVC, init container, KServe storage initializer). config.properties
# loads conette.mar; mount another config over /opt/conette/config to load a no-archive directory.
#
# On machines without a Docker engine or registry access, scripts/build_image.sh builds this file with podman
# from a locally debootstrapped Debian bookworm (BASE_IMAGE), with PIP_EXTRA_ARGS for the local CA and wheels.

# Pinned by digest (the tag alone moves with every Debian point release): a rebuild gets the same base until
# this line is changed on purpose. Refresh with `docker buildx imagetools inspect debian:bookworm-slim`.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251
FROM ${BASE_IMAGE}

# PyTorch index for the torch wheel only. PyPI's Linux x86_64 torch is the CUDA build (several GB of
# nvidia-* wheels); the CPU index has the same version without them.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extra pip arguments for every pip call, e.g. "--find-links /wheels --cert /ca.crt" for offline or
# proxied builds. Paths only: build arguments are visible in the image history.
ARG PIP_EXTRA_ARGS=""
# Fixed IDs so that Kubernetes runAsUser/fsGroup and volume ownership can name them.
ARG APP_UID=1000
ARG APP_GID=1000

# Python 3.11 (Debian bookworm's python3), Java 17 for the TorchServe frontend, FFmpeg libraries for
# TorchCodec's audio decoding, tini as PID 1 (reaps zombies, forwards signals).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv openjdk-17-jre-headless ffmpeg tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from TORCH_INDEX_URL, at the version requirements.txt pins (the one source of versions);
# then the rest of requirements.txt, which that torch already satisfies (2.14.1+cpu matches ==2.14.1).
COPY requirements.txt /opt/conette/requirements.txt
RUN python3 -m venv "$VIRTUAL_ENV" \
    && torch_pin="$(grep -E '^torch==' /opt/conette/requirements.txt)" \
    && pip install $PIP_EXTRA_ARGS --index-url "$TORCH_INDEX_URL" "$torch_pin" \
    && pip install $PIP_EXTRA_ARGS -r /opt/conette/requirements.txt \
    && python -c 'import torch, torchaudio, torchcodec, ts; print("torch", torch.__version__)'

# Sources: the handler (also packed inside every .mar), the build scripts and the installed packages
# (conette_engine, conette_client with conette-fetch-weights / conette-manage), so that the same image can run
# as an init container that fetches, converts and archives the weights into the model-store volume.
# tools/ holds the test-checkpoint maker that scripts/build_image.sh runs inside the image.
COPY pyproject.toml README.md /opt/conette/
COPY handler/ /opt/conette/handler/
COPY client/ /opt/conette/client/
COPY scripts/ /opt/conette/scripts/
COPY tools/make_test_checkpoint.py /opt/conette/tools/make_test_checkpoint.py
RUN pip install $PIP_EXTRA_ARGS --no-deps /opt/conette \
    && conette-manage --help >/dev/null
COPY metrics.yaml /opt/conette/config/metrics.yaml
COPY kubernetes/base/config.properties kubernetes/base/log4j2.xml /opt/conette/config/
COPY kubernetes/image/torchserve_pod.py /opt/conette/bin/torchserve_pod.py
COPY model_store/ /opt/conette/model-store/

# Writable places, all outside the image's read-only content, each an emptyDir in Kubernetes:
#   /home/model-server  HOME and working directory (key_file.json when token auth is on; logs/)
#   /tmp                TEMP: .mar extraction and the worker sockets
RUN groupadd --gid "$APP_GID" model-server \
    && useradd --uid "$APP_UID" --gid "$APP_GID" --home-dir /home/model-server --create-home \
        --shell /usr/sbin/nologin model-server \
    && mkdir -p /opt/conette/workflow-store \
    && rm -f /opt/conette/model-store/.gitkeep \
    && chmod -R a+rX /opt/conette

ENV TEMP=/tmp \
    LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER ${APP_UID}:${APP_GID}
WORKDIR /home/model-server
# 8080 inference, 8082 Prometheus metrics. The management API (8081) is bound to 127.0.0.1 by
# config.properties: use it with `kubectl exec` / `docker exec`, never through a published port.
EXPOSE 8080 8082

# PID 1 is tini (reaps zombies, forwards SIGTERM); its child is torchserve_pod.py serve, which runs
# `torchserve --foreground` in its own session and, on SIGTERM (`docker stop -t`, `podman stop -t`, the
# kubelet), lets the queue and the running batch finish before stopping TorchServe: a plain SIGTERM to the
# Java frontend resets every request in flight. tini without -g: a signal to the whole group is what the
# entry point's own session keeps away from the frontend anyway. If TorchServe dies the container ends.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/usr/bin/python3", "/opt/conette/bin/torchserve_pod.py", "serve", "--", \
     "torchserve", "--foreground", "--ncs", \
     "--ts-config", "/opt/conette/config/config.properties", \
     "--log-config", "/opt/conette/config/log4j2.xml"]
