# A SuperNode running the Fed-Grow ClientApp on an NVIDIA GPU. Flower's official
# SuperNode images are CPU-only, so this one starts from NVIDIA's CUDA runtime
# and installs flwr (which provides `flower-supernode`) with the app and CUDA torch.
# Run it with the GPU requested (docker/compose.gpu.yaml, or `docker run --gpus all`).
#   docker build -f docker/supernode-cuda.Dockerfile -t fedgrow-supernode-cuda .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedgrow_core ./fedgrow_core
COPY server_app ./server_app
COPY client_app ./client_app
COPY experiments ./experiments
COPY benchmarks ./benchmarks
COPY deploy ./deploy
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 torch==2.14.1 torchvision==0.29.1 \
 && python -m pip install --no-cache-dir .
ENTRYPOINT ["flower-supernode"]
