"""Evaluate dense vs TCA vs StreamingLLM vs SnapKV on the bundled SmolLM2-135M-Instruct.

Generates the long-context suite locally (passkey + RULER-style tasks +
perplexity on Python's pydoc topics), runs every method on the same prompts
and writes a table, a JSON file and an accuracy-vs-KV plot.

    python examples/evaluate.py                    # 2K tokens, 2 samples per task (CPU: ~1 h)
    python examples/evaluate.py --lengths 2048 4096 8192 --samples 20 --device cuda \
        --dtype bfloat16 --workers 15      # the full suite, 15 processes sharing the GPU (EVALUATION.md)

The same options are available as ``python -m tca_flex.eval --help``.
"""

from __future__ import annotations

import sys

from tca_flex.eval.cli import main

if __name__ == "__main__":
    defaults = ["--lengths", "2048", "--samples", "2", "--keep", "0.25", "0.5"]
    main(defaults + sys.argv[1:])
