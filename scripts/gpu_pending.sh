#!/usr/bin/env bash
# What the GPU still has to time (issue: decode faster end to end), one part per device call
# (no model files needed: random-weight 8B-shaped layers); each stage bounded in time, its log
# and JSON under $OUT:
#   run(command="bash scripts/gpu_pending.sh tests decode e2e-32k", timeout_s=600)
# Parts, run in the order given (each stage's limit below; keep a call under 600 s):
# tests: the Triton kernel tests compiled on the GPU. decode: per-layer decode rows (the step with
#   the merge appending against the append's own kernel). parts: the decode launch, its main kernel
#   and its merge alone, without and with a token to append. profile: the 4-layer compiled step
#   kernel by kernel, both ways. launch: the 32-layer step at 128K timed without a profiler session
#   in the process (TCA's graph launch is as quick as dense's there: BENCHMARKS.md, thirteenth session).
# generate / generate-steps: plain model.generate at 32 layers, 32K, TCA 25% + 4096 with a reserved
#   TCACache (transformers compiles the step, reduce-overhead) against dense's static cache; the
#   per-step times of TCA's (its graphs replay since the thirteenth session's fix: 8.66 ms steady
#   steps on one H100 machine, 9-12 on machines with slower hosts; BENCHMARKS.md, fourteenth),
#   with a cProfile of the host's time in the last call (generate-steps-cprofile.txt).
# requests: 150 requests of one length in a row through generate (2 layers, 8K), each with a new
#   TCACache, then 150 through one TCACache reset between requests: what a new cache's first step
#   (recording) costs against a reset one's (replay), and whether steps slow down as the graphs of
#   earlier caches pile up (PyTorch keeps them and checks them before each replay).
# buckets: six prompts of distinct lengths in one size bucket through generate (32 layers, 32K), each
#   with a new cache of a layout per length, then through one reset cache of bucketed layouts.
# mask-cost: generate's per-step input preparation at 32K as generate calls it, through the class's
#   method (no tca_flex wrapper: the 4-D decode mask built) and with no mask (prepare_inputs_mask_cost.py).
# generate-mask: plain generate at 32 layers, 32K, with that mask built every step and spared, alternating;
#   generate-mask-eager: the same over unreserved caches (generate decodes eagerly).
# e2e-32k / e2e-128k: 32 layers, compiled and graph-replayed TPOT, dense against TCA at the
#   issue's settings (25% + 4096 at 32K, 37% + 4096 at 128K).
# combo-profile / combo-32k / combo-128k: the profile and the e2e parts with Inductor's combo kernels
#   (independent pointwise kernels, e.g. q's and k's RoPE, horizontally fused into one launch) on for
#   the whole process, dense and TCA alike (scripts/with_inductor.py).
# freeze-profile / freeze-32k / freeze-128k: the same with Inductor's freezing (weights as constants:
#   on CUDA, q/k/v and gate/up projections of one input fused into one matmul each), dense and TCA
#   alike; fast-32k / fast-128k: freezing and combo kernels together.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
stage() {  # stage SECONDS NAME COMMAND...: bounded, its output in NAME.log
  local limit=$1 name=$2
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?" | tee -a "$OUT/stages.txt"
  tail -n 4 "$OUT/$name.log"
}
# Each e2e part writes its JSON to a folder of its own (the bench names the file by device, date, phases).
E2E=(-m tca_flex.bench --phases e2e --e2e-layers 32 --no-e2e-static --ttft-reps 1
     --tpot-variants two-graph+fused --compile-tpot inductor --compiled-variants two-graph+fused)
python_with() {  # python_with SET: RUN, the Python command line of that Inductor option set (a part's prefix)
  case "$1" in
    e2e) RUN=(python -u) ;;
    combo) RUN=(python -u scripts/with_inductor.py combo_kernels=1 --) ;;
    freeze) RUN=(python -u scripts/with_inductor.py freezing=1 --) ;;
    fast) RUN=(python -u scripts/with_inductor.py freezing=1 combo_kernels=1 --) ;;
  esac
}
[ $# -gt 0 ] || { echo "parts: tests decode parts profile launch mask-cost generate-mask generate-mask-eager generate generate-steps requests buckets e2e-32k e2e-128k combo-profile combo-32k combo-128k" \
                       "freeze-profile freeze-32k freeze-128k fast-32k fast-128k" >&2
                  exit 2; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/env.txt"
for part in "$@"; do
  case "$part" in
    tests) stage 200 tests python -m pytest -q -p no:cacheprovider tests/test_triton_decode.py \
             tests/test_triton_append.py ;;
    decode) stage 100 decode python -u -m tca_flex.bench --out "$OUT" --phases decode --lengths 32768 131072 \
              --decode-backends triton --no-compile-step ;;
    parts) stage 150 parts python -u scripts/gpu_decode_parts.py ;;
    profile)
      stage 110 profile-merged python -u scripts/gpu_step_profile.py 4 0.25 32768 131072
      TCA_PROBE_APPEND=triton stage 110 profile-append-kernel python -u scripts/gpu_step_profile.py 4 0.25 32768 \
        131072 ;;
    e2e-32k|combo-32k|freeze-32k|fast-32k)
      python_with "${part%-*}"
      stage 560 "$part" "${RUN[@]}" "${E2E[@]}" --out "$OUT/$part" --lengths 32768 --e2e-keep 0.25 ;;
    e2e-128k|combo-128k|freeze-128k|fast-128k)
      python_with "${part%-*}"
      stage 560 "$part" "${RUN[@]}" "${E2E[@]}" --out "$OUT/$part" --lengths 131072 --e2e-keep 0.37 ;;
    generate) stage 450 generate python -u -m tca_flex.bench --out "$OUT/generate" --phases generate \
                --generate-compile --e2e-layers 32 --lengths 32768 --e2e-keep 0.25 ;;
    generate-steps) TCA_PROBE_CPROFILE="$OUT/generate-steps-cprofile.txt" stage 300 generate-steps \
                      python -u scripts/gpu_generate_steps.py 32 32768 0.25 ;;
    mask-cost) stage 120 mask-cost python -u scripts/prepare_inputs_mask_cost.py 32768 ;;
    generate-mask) TCA_PROBE_MASK=1 stage 450 generate-mask python -u scripts/gpu_generate_steps.py 32 32768 0.25 ;;
    generate-mask-eager) TCA_PROBE_MASK=1 TCA_PROBE_EAGER=1 stage 300 generate-mask-eager \
                           python -u scripts/gpu_generate_steps.py 32 32768 0.25 ;;
    launch) TCA_PROBE_PROFILE=0 stage 300 launch python -u scripts/gpu_step_profile.py 32 0.37 131072 ;;
    requests) TCA_PROBE_REQUESTS=150 stage 300 requests python -u scripts/gpu_generate_steps.py 2 8192 0.25 ;;
    buckets) TCA_PROBE_BUCKETS=6 stage 540 buckets python -u scripts/gpu_generate_steps.py 32 32768 0.25 ;;
    combo-profile) python_with combo; stage 110 "$part" "${RUN[@]}" scripts/gpu_step_profile.py 4 0.25 32768 ;;
    freeze-profile) python_with freeze; stage 150 "$part" "${RUN[@]}" scripts/gpu_step_profile.py 4 0.25 32768 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
