#!/usr/bin/env bash
# The test command: set up on a fresh machine, prove the extension imports and registers its
# ops, then run the tests (the cuda-marked ones run only where a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
python - <<'PY'
import torch
import unsloth_ext
from unsloth_ext.ops import KERNEL_OPS

assert unsloth_ext.STATE.loaded, unsloth_ext.STATE.reason
missing = [name for ops in KERNEL_OPS.values() for name in ops
           if not hasattr(torch.ops.unsloth_ext, name)]
assert not missing, f"ops not registered: {missing}"
print(f"extension loaded; {sum(map(len, KERNEL_OPS.values()))} ops registered")
PY
python -m pytest python_tests -q -rs "$@"
