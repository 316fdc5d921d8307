"""Tune the Triton decode kernel on the GPU, then run the benchmark with the best setting.

    PYTHONPATH=. python scripts/gpu_decode_sweep.py [--sweep-lengths N ...] [--schedules ...]
        [--wide] [bench args...]

Times ``triton_decode.launch`` over a TCACache layer of each of
``--sweep-lengths`` tokens (default 128K; LLaMA-3.1-8B attention shapes, ~39%
kept, heads keeping very different amounts; the live lengths passed as the
decode step passes them) for each setting of each schedule: "split" over
(block, programs, warps, stages), "balanced" over (programs, block,
warps, stages); ``--wide`` adds 32-slot blocks, 4 stages, 2 warps, more program
counts and the combine kernel's chunk. Checks every setting against the
"math" backend, prints one line each, sets the module defaults (schedule
included) to the fastest at the last length and runs ``tca_flex.bench`` with
the remaining arguments.
"""

from __future__ import annotations

import argparse
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
# --wide: where the 2026-12-03 sweep's best settings sat (3 programs per SM of 64-slot blocks, or
# one per SM of 128-slot blocks, 2-3 stages), the neighbours it did not try.
WIDE_PROGRAMS = (132, 198, 264, 396, 528, 660)
WIDE_TILES = [(32, 4, 2), (32, 4, 3), (32, 4, 4), (32, 2, 3), (64, 2, 2), (64, 4, 2), (64, 4, 3), (64, 4, 4),
              (64, 8, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3)]
COMBINE_CHUNKS = (16, 32, 64)


def settings(schedule: str, programs: tuple[int, ...], tiles: list[tuple[int, int, int]]) -> list[dict]:
    return [dict(schedule=schedule, programs=p, block=b, num_warps=w, num_stages=s)
            for p, (b, w, s) in itertools.product(programs, tiles)]


@torch.no_grad()
def sweep(length: int = 131072, target: float = 0.39, schedules: tuple[str, ...] = triton_decode.SCHEDULES,
          wide: bool = False) -> dict:
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

    print(f"\n{length} tokens, {target:.0%} kept", flush=True)
    grid = WIDE_PROGRAMS if wide else BALANCED_PROGRAMS  # "balanced" launches a fixed grid
    ranked = {name: fastest(settings(name, SPLIT_PROGRAMS if name == "split" else grid, WIDE_TILES if wide else TILES))
              for name in schedules}
    for name, timed in ranked.items():
        if timed:
            print(f"best {name:<8} at {length}: {timed[0][0]:.1f} us  {timed[0][1]}")
    us, best = min((timed[0] for timed in ranked.values() if timed), key=lambda r: r[0])
    if wide:  # the merge's chunk, for the fastest setting (a module constant, as the bench reads it)
        default = triton_decode.COMBINE_CHUNK
        for chunk in COMBINE_CHUNKS:
            triton_decode.COMBINE_CHUNK = chunk
            timed = run({key: value for key, value in best.items() if key != "chunk"})
            print(f"  combine chunk {chunk}: {timed[0] if timed else float('nan'):.1f} us", flush=True)
            if timed and timed[0] < us:
                us, best = timed[0], {**best, "chunk": chunk}
        triton_decode.COMBINE_CHUNK = default
    print(f"best at {length}: {us:.1f} us  {best}", flush=True)
    return best


def set_defaults(best: dict) -> None:
    triton_decode.SCHEDULE = best["schedule"]
    triton_decode.BLOCK_N, triton_decode.NUM_WARPS = best["block"], best["num_warps"]
    triton_decode.NUM_STAGES = best["num_stages"]
    triton_decode.COMBINE_CHUNK = best.get("chunk", triton_decode.COMBINE_CHUNK)
    if best["schedule"] == "split":
        triton_decode.TARGET_PROGRAMS = best["programs"]
    else:
        triton_decode.BALANCED_PROGRAMS = best["programs"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--sweep-lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--schedules", nargs="+", choices=triton_decode.SCHEDULES,
                        default=list(triton_decode.SCHEDULES))
    parser.add_argument("--wide", action="store_true")
    ours, rest = parser.parse_known_args(sys.argv[1:])
    bests = [sweep(n, schedules=tuple(ours.schedules), wide=ours.wide) for n in ours.sweep_lengths]
    for n, best in zip(ours.sweep_lengths, bests, strict=True):
        print(f"sweep best at {n}: {best}")
    set_defaults(bests[-1])
    bench.main(rest)
