# Two images from one file:
#   relay   - `fedrelay serve` only (websockets, pydantic, aiosqlite): small.
#   trainer - adds CPU-only torch, Flower (Ray) and Lightning for the demo.
FROM python:3.11-slim AS relay
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 1000 fedrelay && mkdir /data && chown fedrelay /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install '.[server]'
USER fedrelay
EXPOSE 8765
VOLUME ["/data"]
# Inside a container the relay must listen on every interface to be reachable.
CMD ["fedrelay", "serve", "--host", "0.0.0.0", "--port", "8765", "--db", "/data/relay.db"]

FROM relay AS trainer
USER root
# The CPU build of torch from PyTorch's own index: from PyPI, torch is a multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install '.[server,flower,lightning]'
USER fedrelay
ENV FLWR_TELEMETRY_ENABLED=0 RAY_DEDUP_LOGS=0
CMD ["python", "-m", "fedrelay.demo", "--no-browser", "--relay", "ws://relay:8765"]
