#!/usr/bin/env bash
# The optional FlashAttention-4 (CuTe-DSL) backend of FlexAttention on the GPU machine,
# which has no network: its wheels (~102 MB, one of 92 MB) travel in pieces over calls made
# back to back (files stay on the machine while it is warm; a call carries at most 64 MiB
# together with the tracked tree, ~20 MB):
#   bash scripts/gpu_fa4.sh part .dev/fa1   # carry .dev/fa1: park its pieces in /root/fa
#   bash scripts/gpu_fa4.sh part .dev/fa3   # (as many parts as the pieces need)
#   bash scripts/gpu_fa4.sh run CMD...      # carry .dev/fa2 the first time: join, install, run CMD
# Make the parts here with (wheels from `pip download --no-deps --python-version 3.12
# --platform manylinux_2_28_x86_64 --only-binary=:all:` of flash-attn-4==4.0.0b36,
# nvidia-cutlass-dsl{,-libs-base,-libs-core,-libs-cu13}==4.8.1, apache-tvm-ffi,
# torch-c-dlpack-ext, quack-kernels, einops):
#   split -b 40M nvidia_cutlass_dsl_libs_cu13-*.whl cu13part.   # then cu13part.aa into .dev/fa1,
#   cu13part.ab into .dev/fa3, cu13part.ac and every other wheel into .dev/fa2
# The wheels go into the machine's Python environment, not a --target folder: the
# cutlass DSL is found through a .pth file, which --target installs skip.
set -euo pipefail
FA=/root/fa
stage=$1
shift
case $stage in
  part)
    mkdir -p $FA && cp "$1"/cu13part.* $FA/ && ls -la $FA ;;
  run)
    if ! python3 -c "import flash_attn.cute" 2>/dev/null; then
      whl=$FA/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
      [ -f "$whl" ] || { cp .dev/fa2/cu13part.* $FA/ && cat $FA/cu13part.* > "$whl"; }  # the glob sorts them
      python3 -m pip install -q --no-index --no-deps --no-compile "$whl" .dev/fa2/*.whl
    fi
    export PYTHONPATH=.
    "$@" ;;
  *)
    echo "usage: $0 part DIR | run CMD..." >&2; exit 2 ;;
esac
