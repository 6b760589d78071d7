# The tokenmill operator: kopf, the Kubernetes client, prometheus-client. No torch, Ray or vLLM.
# Build from the repository root: docker build -f images/operator.Dockerfile -t tokenmill-operator .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY tokenmill ./tokenmill
COPY operator ./operator
COPY trainer ./trainer
RUN pip install ".[operator]" && rm -rf /src

RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin tokenmill
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["tokenmill", "operator"]
