#!/usr/bin/env bash
# Builds .venv/ in the repo root from nothing, with the one pinned stack of DESIGN.md.
# CPU host: torch (CPU wheel) + fbgemm-gpu-cpu; host with a working nvidia-smi: the
# CUDA builds of torch + fbgemm-gpu. torchrec is installed without its dependencies
# because its metadata asks for fbgemm-gpu (CUDA), which must not sit beside
# fbgemm-gpu-cpu (both provide the `fbgemm_gpu` module).
# Idempotent: a stamp holds a hash of this file, scripts/torch_build.py and pyproject.toml;
# if it matches, nothing is done.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# DLRM_STACK=cpu|cuda picks the stack (a Docker build has no GPU to detect); auto: cuda
# where nvidia-smi sees a GPU.
STACK=${DLRM_STACK:-auto}
if [ "$STACK" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        STACK=cuda
    else
        STACK=cpu
    fi
fi
case "$STACK" in
    cuda) FBGEMM="fbgemm-gpu==${FBGEMM_VERSION}" ;;
    cpu) FBGEMM="fbgemm-gpu-cpu==${FBGEMM_VERSION}" ;;
    *) echo "install: DLRM_STACK must be cpu, cuda or auto, got '$STACK'" >&2; exit 2 ;;
esac

want="$(cat "$0" scripts/torch_build.py pyproject.toml | sha256sum | cut -d' ' -f1) ${FBGEMM}"
stamp="${VENV}/.dlrm-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "${VENV}/bin/dlrm" ]; then
    echo "install: ${VENV} is up to date (${FBGEMM})"
    exit 0
fi

echo "install: building ${VENV} with torch ${TORCH_VERSION}, ${FBGEMM}, torchrec ${TORCHREC_VERSION}"
[ -x "${VENV}/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="${VENV}/bin/python -m pip --quiet --disable-pip-version-check"
# PyPI's Linux torch wheel is the CUDA build; a CPU-only host points pip at the CPU
# wheels itself (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu, as the
# Dockerfile's CPU stage does) or has them in its local index, as our CI machines do.
# pip takes an installed 2.13.0+cpu for torch==2.13.0 (it ignores the local label), so a
# venv switched from one stack to the other would keep the old torch: ask which build is
# there, and replace it when it is not the wanted one.
torch_build="${VENV}/bin/python scripts/torch_build.py --want ${STACK}"
if [ "$($torch_build)" = reinstall ]; then
    echo "install: replacing the installed torch, which is not the ${STACK} build"
    $pip uninstall -y torch
fi
$pip install "torch==${TORCH_VERSION}"
if [ "$($torch_build)" != keep ]; then
    got=$(${VENV}/bin/python -c "import importlib.metadata as m; print(m.version('torch'))")
    echo "install: wanted the ${STACK} build of torch ${TORCH_VERSION}, pip installed ${got}" >&2
    if [ "$STACK" = cuda ]; then
        echo "install: pip is configured with a CPU-wheel index (PIP_INDEX_URL," \
             "PIP_EXTRA_INDEX_URL or a pip.conf: see 'pip config list'); unset it" \
             "for DLRM_STACK=cuda" >&2
    else
        echo "install: point pip at the CPU wheels (PIP_EXTRA_INDEX_URL, as the" \
             "Dockerfile's CPU stage sets it) for DLRM_STACK=cpu" >&2
    fi
    exit 1
fi
# The other build of fbgemm must not be left behind from an earlier install.
case "$FBGEMM" in
    fbgemm-gpu-cpu*) other=fbgemm-gpu ;;
    *) other=fbgemm-gpu-cpu ;;
esac
if ${VENV}/bin/python -m pip show "$other" >/dev/null 2>&1; then
    $pip uninstall -y "$other"
fi
$pip install "$FBGEMM"
$pip install --no-deps "torchrec==${TORCHREC_VERSION}"
$pip install -e ".[dev,spark]"  # spark: the --engine spark tests run in CI
${VENV}/bin/python -c "import torchrec, fbgemm_gpu, torch; print('install: ok, torch', torch.__version__, 'torchrec', torchrec.__version__)"
echo "$want" > "$stamp"
