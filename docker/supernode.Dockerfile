# A SuperNode running the Fed-Grow ClientApp as its subprocess, CPU only, on Flower's official image.
#   docker build -f docker/supernode.Dockerfile -t fedgrow-supernode .
FROM flwr/supernode:1.41.0
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
ENTRYPOINT ["flower-supernode"]
