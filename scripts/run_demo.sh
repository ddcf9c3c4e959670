#!/usr/bin/env bash
# The main job: set up on a fresh machine, then the fine-tuning demo (or, with arguments, a
# fine-tune: scripts/run_demo.sh --model PATH --data FILE.jsonl ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
python -m unsloth_ext finetune "$@"
