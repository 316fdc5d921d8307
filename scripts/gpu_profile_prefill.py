"""Where the sparse prefill's time goes outside the attention kernel (GPU machine).

    PYTHONPATH=. python scripts/gpu_profile_prefill.py --lengths 32768 --out DIR

For each length: the whole ``tca_prefill_attention`` call (CUDA events), its two
compiled graphs timed alone, the host time of one call, and a torch.profiler table
of the GPU kernels of a few calls (plus the trace), so the selection and packing
overhead can be split kernel by kernel. LLaMA-3.1-8B attention shapes, bf16, TCA
25% + window 4096, uniform budgets, the backend ``TCA_FLEX_PREFILL_BACKEND`` picks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tca_flex.attention import _packed_attention, _select_positions, tca_prefill_attention
from tca_flex.bench import back_to_back
from tca_flex.budgets import HeadBudgets
from tca_flex.compile import length_generic, prefill_backend, prefill_kernel_options
from tca_flex.config import TCAConfig
from tca_flex.masks import KERNEL_BLOCK, tiled, whole_tiles
from tca_flex.selection import observed_queries


def host_ms(fn, reps: int = 10) -> float:
    """Host time per call when the GPU is never waited on inside the loop."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / reps


def profile_length(length: int, frac: float, out: Path) -> dict:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(length)
    q, k, v = (torch.randn(1, h, length, 128, device=dev, dtype=torch.bfloat16, generator=gen) for h in (32, 8, 8))
    config = TCAConfig(block_size=128, window=4096)
    cdf = HeadBudgets.uniform(1, 8, frac, config).cdf(0).to(dev)
    scale = 128 ** -0.5
    options = prefill_kernel_options(dev)

    def whole():
        return tca_prefill_attention(q, k, v, cdf, config, scale)

    q_obs = observed_queries(q, config.num_observation_queries, config.spread_observation_queries, config.window)
    select_fn = length_generic(_select_positions, (1, 2))
    positions, _, table, _, _ = select_fn(q_obs, k, cdf, config, scale)
    padded = whole_tiles(length)
    args = [tiled(t, padded, True) for t in (q, k, v)] + [positions.unflatten(-1, (-1, KERNEL_BLOCK))]
    attend = length_generic(_packed_attention, (0, 2), (1, 2), (2, 2), (3, 2), (4, 0))

    row = {
        "length": length, "keep": frac, "backend": prefill_backend(dev),
        "whole_ms": back_to_back(whole, dev),
        "select_ms": back_to_back(lambda: select_fn(q_obs, k, cdf, config, scale), dev),
        "attend_ms": back_to_back(lambda: attend(*args, table, config.window, scale, False, options), dev),
        "host_ms_per_call": host_ms(whole),
        "capacity": int(positions.shape[-1]),
    }
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            whole()
        torch.cuda.synchronize()
    table_txt = prof.key_averages().table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=90)
    (out / f"profile-{length}.txt").write_text(table_txt)
    prof.export_chrome_trace(str(out / f"trace-{length}.json"))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    row["gpu_busy_ms_per_call"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / 5
    row["kernels_per_call"] = len(kernels) / 5
    print(json.dumps(row), flush=True)
    print(table_txt, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [profile_length(n, args.keep, args.out) for n in args.lengths]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    (args.out / "profile.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
