"""What the cache's own selection (``TCAConfig.cache_spread_observation_queries``) adds to one layer's
TCA prefill on CUDA: the layer with ``TCAConfig.accurate()`` knobs at LLaMA-3.1-8B's shape
(32 query heads, 8 KV heads, head dim 128, bf16), uniform budgets keeping 25% of each block,
with the knob off (the cache keeps the prefill's selection) and at 0 (the last 32 queries'
own selection, in the same compiled graph). Median of 7 timed calls after warm-up.

    PYTHONPATH=. python scripts/gpu_cache_selection_cost.py --out cost.json
"""

import argparse
import json
import platform

import torch

from tca_flex.attention import tca_prefill_attention
from tca_flex.bench import timed
from tca_flex.budgets import HeadBudgets
from tca_flex.config import TCAConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device("cuda")
    rows = []
    for length in args.lengths:
        gen = torch.Generator(device=device).manual_seed(length)
        q = torch.randn(1, 32, length, 128, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, 8, length, 128, device=device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, 8, length, 128, device=device, dtype=torch.bfloat16, generator=gen)
        for knob in (None, 0):
            config = TCAConfig.accurate(block_size=128, window=4096, cache_spread_observation_queries=knob)
            cdf = HeadBudgets.uniform(1, 8, 0.25, config).cdf(0).to(device)

            def layer(q=q, k=k, v=v, c=cdf, cf=config):
                return tca_prefill_attention(q, k, v, c, cf, 128 ** -0.5, return_selection=True)

            ms = timed(layer, device, warmup=3)
            rows.append({"length": length, "cache_spread_observation_queries": knob, "ms": ms})
            print(rows[-1], flush=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
    with open(args.out, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
