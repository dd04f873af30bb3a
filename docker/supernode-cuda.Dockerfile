# A SuperNode running the Fed-Grow ClientApp on an NVIDIA GPU. PyTorch's CUDA wheels bring the CUDA
# runtime libraries, so the image needs only the host's driver (run it with the GPU requested:
# docker/compose.gpu.yaml, or `docker run --gpus all`).
#
# Python 3.11 on Debian (glibc: torch has no wheels for Alpine, and the project needs 3.11) with flwr
# from the package registry, without its simulation extra (no Ray). It runs as the non-root user
# `app` (uid 49999, as Flower's own images), whose HOME, FLWR_HOME, /state and /outputs are its own;
# runtime dependency installation is off, since everything a run needs is installed here.
#   docker build -f docker/supernode-cuda.Dockerfile -t fedgrow-supernode-cuda .
FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/home/app \
    FLWR_HOME=/home/app/.flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN groupadd --gid 49999 app \
 && useradd --uid 49999 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
 && mkdir -p /home/app/.flwr /state /outputs /app/outputs \
 && chown -R app:app /home/app /state /outputs /app
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedgrow_core ./fedgrow_core
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 torch==2.14.1 torchvision==0.29.1 \
 && python -m pip install --no-cache-dir .
USER 49999:49999
ENTRYPOINT ["flower-supernode"]
