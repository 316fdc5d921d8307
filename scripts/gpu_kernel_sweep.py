"""Sweep FlexAttention kernel options for TCA's packed prefill on CUDA (GPU diagnostic).

    PYTHONPATH=. python scripts/gpu_kernel_sweep.py 32768 131072
"""
import json
import sys

import torch

from tca_flex import HeadBudgets, TCAConfig
from tca_flex.bench import timed
from tca_flex.compile import flex
from tca_flex.masks import tca_block_mask
from tca_flex.selection import select

OPTIONS = [
    {},
    {"USE_TMA": True},
    {"USE_TMA": True, "num_stages": 3},
    {"USE_TMA": True, "num_warps": 4},
    {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"USE_TMA": True, "BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
]
dev = torch.device("cuda")
results = []
for length in [int(a) for a in sys.argv[1:]] or [32768, 131072]:
    q = torch.randn(1, 32, length, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, length, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cfg = TCAConfig(window=4096)
    cdf = HeadBudgets.uniform(1, 8, 0.25, cfg).cdf(0).to(dev)
    sel = select(q, k, cdf, cfg.selection, scaling=128 ** -0.5)
    idx = sel.positions.clamp(max=length - 1).unsqueeze(-1).expand(-1, -1, -1, 128)
    k_all, v_all = torch.cat([k.gather(2, idx), k], 2), torch.cat([v.gather(2, idx), v], 2)
    bm = tca_block_mask(sel.positions, length, 4096, 32)
    ref = None
    for opts in OPTIONS:
        try:
            out = flex(q, k_all, v_all, bm, scale=128 ** -0.5, enable_gqa=True, kernel_options=opts)
            ref = out if ref is None else ref
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            ms = timed(lambda o=opts, a=(q, k_all, v_all, bm): flex(*a, scale=128 ** -0.5, enable_gqa=True,
                                                                    kernel_options=o), dev, reps=15)
            results.append({"length": length, "options": opts, "ms": ms, "rel_diff_vs_default": err})
            print(f"SWEEP L={length} {ms:8.3f} ms err {err:.2e} {opts}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a sweep records every failure
            print(f"SWEEP L={length} FAIL {opts}: {str(exc).splitlines()[0][:150]}", flush=True)
print(json.dumps(results))
