# dlrm on GPU clusters (default) or CPU hosts. The versions live in one place,
# scripts/install.sh, which this image runs exactly as `make install` does.
#
#   docker build -t dlrm:latest .                                   # CUDA: torch + fbgemm-gpu
#   docker build -t dlrm:cpu --build-arg BASE=python:3.11-slim \
#       --build-arg STACK=cpu \
#       --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker run --gpus all --ipc=host -v /data:/data dlrm:latest train --config ...
#
# Multi-process: the entry point is `dlrm`; torchrun and torchx's dist.ddp run
# `python -m dlrm ...` in this image (see dlrm/components.py).
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}

ARG STACK=cuda
ARG PIP_EXTRA_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PYTHONUNBUFFERED=1

# Python with venv (the CUDA base image has none; python:3.11-slim has it already).
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /opt/dlrm
# The install step first (cached while only code changes), then the code.
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
COPY dlrm dlrm
RUN DLRM_STACK=${STACK} VENV=/opt/dlrm/.venv PYTHON=python3 bash scripts/install.sh
COPY configs configs
COPY scripts scripts

ENV PATH=/opt/dlrm/.venv/bin:${PATH}
ENTRYPOINT ["dlrm"]
CMD ["--help"]
