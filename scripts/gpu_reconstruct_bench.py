"""Time ``reconstruct.score_rows`` on the GPU: the eager "math" form against the "triton" path.

    PYTHONPATH=. python scripts/gpu_reconstruct_bench.py --out rows.json [--with-math]

One layer of LLaMA-3.1-8B attention (32 query / 8 KV heads, D = 128, bf16,
batch 1): a repeat pass of ``context + 16`` queries (a 16-token instruction,
then the context again) on top of ``context`` cached keys, scored from query
16. Median of 5 timed calls after a first call, whose time is recorded too
(``first_ms``): the first context's compiles FlexAttention, and every later
context runs under dynamo's ``error_on_recompile``, so the run fails if a new
length compiles again. At 4096 it also checks the "triton" score against
"math" and FlexAttention's log-sum-exp against ``torch.logsumexp``. "math"
at 32768 (~2 s a call) only with ``--with-math``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import torch

from tca_flex.reconstruct import score_rows
from tca_flex.triton_reconstruct import attention_with_lse

HQ, HKV, D, PROMPT = 32, 8, 128, 16
CHECKED = 4096


def inputs(context: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(context)
    lq = context + PROMPT

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    return rand(1, HQ, lq, D), rand(1, HKV, context + lq, D), rand(1, HKV, context + lq, D)


def timed_ms(fn) -> tuple[float, float]:
    """(first call, median of the next 5) in milliseconds."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return first, statistics.median(times)


def lse_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, rows: int = 256) -> float:
    """Max |FlexAttention lse - torch.logsumexp| over the last ``rows`` queries (float32 logits)."""
    _, lse = attention_with_lse(q, k, v, D**-0.5, context)
    lq = q.shape[2]
    tail = q[:, :, lq - rows:].float()
    logits = tail @ k.float().repeat_interleave(HQ // HKV, 1).transpose(-1, -2) * D**-0.5
    visible = torch.arange(k.shape[2], device="cuda") <= torch.arange(lq - rows, lq, device="cuda")[:, None] + context
    want = logits.masked_fill(~visible, float("-inf")).logsumexp(-1)
    return float((lse[:, :, lq - rows:] - want).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file of rows {context, backend, ms, max_rel_err}")
    parser.add_argument("--with-math", action="store_true", help="also time the eager form at 32768")
    parser.add_argument("--contexts", type=int, nargs="+", default=[CHECKED, 32768, 12000],
                        help=f"context lengths, in order (the first compiles; {CHECKED} adds the checks)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_reconstruct_bench.py needs a CUDA GPU")
    rows = []
    for n, context in enumerate(args.contexts):
        q, k, v = inputs(context)
        scores, by_backend = {}, {}
        backends = ["triton"] + (["math"] if context == CHECKED or args.with_math else [])
        for backend in backends:
            call = functools.partial(score_rows, q, k, v, D**-0.5, context, PROMPT, "max", backend=backend)
            with torch._dynamo.config.patch(error_on_recompile=n > 0):
                first, ms = timed_ms(call)
            scores[backend] = call()[1]
            by_backend[backend] = {"context": context, "backend": backend, "ms": round(ms, 3),
                                   "first_ms": round(first, 1), "max_rel_err": None}
            rows.append(by_backend[backend])
            print(f"context {context:>6}  {backend:<6} {ms:10.2f} ms  (first call {first:,.0f} ms)", flush=True)
        if context == CHECKED:  # the score of near-zero probabilities is compared as if it were 1e-12
            want = scores["math"]
            err = float(((scores["triton"] - want).abs() / want.clamp_min(1e-12)).max())
            by_backend["triton"]["max_rel_err"] = err
            print(f"context {context:>6}  triton vs math: max relative error of the score {err:.2e}")
            print(f"context {context:>6}  FlexAttention lse vs torch.logsumexp: max abs error "
                  f"{lse_error(q, k, v, context):.2e}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
