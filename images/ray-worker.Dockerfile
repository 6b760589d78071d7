# The Ray image every RayJob runs: CUDA, torch, Ray Train/Data, vLLM and the tokenmill workloads.
# Build from the repository root: docker build -f images/ray-worker.Dockerfile -t tokenmill-ray .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /home/ray/tokenmill
COPY --chown=ray:users pyproject.toml setup.py README.md ./
COPY --chown=ray:users tokenmill ./tokenmill
COPY --chown=ray:users operator ./operator
COPY --chown=ray:users trainer ./trainer
RUN pip install ".[trainer,vllm]"
WORKDIR /home/ray
