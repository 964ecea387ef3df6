# flux-fp8-api on a CUDA runtime. `docker run` with no arguments serves the tiny CPU demo (no GPU, no download);
# pass a config for the real model, e.g. `--config-path configs/config-dev-1-H100.json` with HF_TOKEN set.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 flux \
    && python3 -m venv /opt/venv && chown -R flux /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY --chown=flux . /app
USER flux
# the README's own install: CUDA torch first, then the project (`pip install .`)
RUN pip install torch --index-url https://download.pytorch.org/whl/cu128 \
    && pip install ".[fp8-attention]"

# model downloads (HF_TOKEN for the gated FLUX.1-dev) and compile caches outlive the container
ENV HF_HOME=/data/hf FLUX_CACHE_DIR=/data/cache
VOLUME ["/data/hf", "/data/cache"]
EXPOSE 8088
# ready = loaded, warmed up, worker alive, no fatal CUDA error: a real model takes minutes to get there
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8088/health/ready || exit 1
ENTRYPOINT ["flux-fp8-api", "--host", "0.0.0.0", "--port", "8088"]
CMD ["--config-path", "configs/config-tiny-cpu.json"]
