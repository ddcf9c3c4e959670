#!/usr/bin/env bash
# The main job: set up on a fresh machine, then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
python -m unsloth_ext demo "$@"
