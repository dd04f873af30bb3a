# The SuperLink, on Flower's official image. The ServerApp runs as its subprocess
# (`--isolation subprocess`, Flower's default), so the image also holds the app's
# dependencies (CPU torch: the server only builds and averages the Global-LiGO).
#   docker build -f docker/superlink.Dockerfile -t fedgrow-superlink .
FROM flwr/superlink:1.41.0
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedgrow_core ./fedgrow_core
COPY server_app ./server_app
COPY client_app ./client_app
COPY experiments ./experiments
COPY benchmarks ./benchmarks
COPY deploy ./deploy
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && python -m pip install --no-cache-dir .
ENTRYPOINT ["flower-superlink"]
