"""Tune the Triton decode kernel on the GPU, then run the benchmark with the best setting.

    PYTHONPATH=. python scripts/gpu_decode_sweep.py [bench args...]

Times ``triton_decode.launch`` over a 128K-token TCACache layer (LLaMA-3.1-8B
attention shapes, ~39% kept, heads keeping very different amounts; the live
lengths passed as the decode step passes them) for each setting of each
schedule: "split" over (block, programs, warps, stages), "balanced" over
(programs, block, warps, stages). Checks every setting against the "math"
backend, prints one line each, sets the module defaults (schedule
included) to the fastest and runs ``tca_flex.bench`` with the remaining
arguments.
"""

from __future__ import annotations

import itertools
import sys

import torch

from tca_flex import bench, triton_decode
from tca_flex.config import TCAConfig
from tca_flex.decode import decode_attention

# Two programs per SM of the H200 (132 SMs) and more; the split schedule as in BENCHMARKS.md 2026-12-02,
# where more programs only got slower.
BALANCED_PROGRAMS = (132, 264, 396, 528)
SPLIT_PROGRAMS = (256, 512)
TILES = list(itertools.product((64, 128), (4, 8), (2, 3)))  # block, warps, stages


def settings(schedule: str, programs: tuple[int, ...], tiles: list[tuple[int, int, int]]) -> list[dict]:
    return [dict(schedule=schedule, programs=p, block=b, num_warps=w, num_stages=s)
            for p, (b, w, s) in itertools.product(programs, tiles)]


@torch.no_grad()
def sweep(length: int = 131072, target: float = 0.39) -> dict:
    device, dtype = torch.device("cuda"), torch.bfloat16
    hq, hkv, d = 32, 8, 128
    config = TCAConfig(block_size=128, window=4096)
    layer = bench.build_cache_layer(length, hq, hkv, d, bench.head_fractions(target, length, 4096, hkv), config,
                                    dtype, device)
    q = torch.randn(1, hq, 1, d, device=device, dtype=dtype)
    seg = layer.segments
    live = (layer.var_len, layer.next_pos, layer.base, layer.ring)
    ref, _ = decode_attention(q, layer.k_buf, layer.v_buf, layer.owner, group=hq // hkv, scale=d**-0.5,
                              backend="math")

    def run(kw: dict) -> tuple[float, dict] | None:
        def fn():
            return triton_decode.launch(q[:, :, 0], layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length,
                                        seg.max_length, d**-0.5, total_slots=seg.total_length, live=live, **kw)
        label = (f"{kw['schedule']:<8} block {kw['block']:>3} programs {kw['programs']:>4} warps {kw['num_warps']} "
                 f"stages {kw['num_stages']}")
        try:
            err = float((fn()[0].float() - ref[:, :, 0].float()).abs().max())
            us = bench.graph_timed(fn, device)
        except Exception as e:  # e.g. out of shared memory for a large block x stages
            print(f"{label}: {type(e).__name__}")
            return None
        print(f"{label}: {us:8.1f} us  err {err:.2e}", flush=True)
        return (us, kw) if err < 3e-2 else None

    def fastest(candidates: list[dict]) -> list[tuple[float, dict]]:
        timed = [r for r in map(run, candidates) if r is not None]
        return sorted(timed, key=lambda r: r[0])

    split = fastest(settings("split", SPLIT_PROGRAMS, TILES))
    balanced = fastest(settings("balanced", BALANCED_PROGRAMS, TILES))
    for name, ranked in (("split", split), ("balanced", balanced)):
        if ranked:
            print(f"best {name:<8}: {ranked[0][0]:.1f} us  {ranked[0][1]}")
    us, best = min((ranked[0] for ranked in (split, balanced) if ranked), key=lambda r: r[0])
    print(f"\nbest: {us:.1f} us  {best}")
    return best


def set_defaults(best: dict) -> None:
    triton_decode.SCHEDULE = best["schedule"]
    triton_decode.BLOCK_N, triton_decode.NUM_WARPS = best["block"], best["num_warps"]
    triton_decode.NUM_STAGES = best["num_stages"]
    if best["schedule"] == "split":
        triton_decode.TARGET_PROGRAMS = best["programs"]
    else:
        triton_decode.BALANCED_PROGRAMS = best["programs"]


if __name__ == "__main__":
    set_defaults(sweep())
    bench.main(sys.argv[1:])
