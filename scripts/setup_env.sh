#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with a CUDA build of torch
# and the other dependencies, then unsloth_ext installed in place with its CUDA extension built.
#   TORCH_SPEC              torch requirement (default torch==2.11.0, a CUDA 13.0 build)
#   TORCH_CUDA_ARCH_LIST    archs to build (default: this machine's GPU, or 9.0 without one)
#   UNSLOTH_EXT_REQUIRE_CUDA_BUILD=1 (default here) fails instead of a pure-Python install
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip "setuptools>=68" wheel
python -m pip install -q "${TORCH_SPEC:-torch==2.11.0}"
python -m pip install -q ninja pybind11 pytest tqdm "transformers==5.17.0" "peft==0.21.0" \
  "bitsandbytes==0.50.2" "accelerate>=1.10" trl

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python - <<'PY'
import torch
if torch.cuda.is_available():
    print(".".join(map(str, torch.cuda.get_device_capability())))
else:
    print("9.0")
PY
)
  export TORCH_CUDA_ARCH_LIST
fi
export UNSLOTH_EXT_REQUIRE_CUDA_BUILD=${UNSLOTH_EXT_REQUIRE_CUDA_BUILD:-1}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "building unsloth_ext for archs $TORCH_CUDA_ARCH_LIST with $MAX_JOBS jobs"
start=$(date +%s)
python -m pip install -q --no-build-isolation --no-deps -e .
echo "build took $(( $(date +%s) - start )) s"
