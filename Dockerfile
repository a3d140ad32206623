# One image for every genq process (api, worker, scheduler, Ray head and GPU Ray workers).
FROM python:3.11-slim
# A CUDA build of torch for GPU nodes; pass e.g. --build-arg TORCH_SPEC=torch==2.13.0+cpu for CPU.
ARG TORCH_SPEC=torch==2.13.0
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY core core
COPY api api
COPY scheduler scheduler
COPY workers workers
COPY stack stack
COPY migrations migrations
# The Python client (genq_client), which the `genq` command line uses.
COPY client client
RUN pip install ".[worker]"
RUN useradd --create-home genq && mkdir -p /data && chown genq /data
USER genq
ENV GENQ_VAR_DIR=/data/var GENQ_ARTIFACT_ROOT=/data/artifacts
EXPOSE 8000
CMD ["genq", "api"]
