# ruff: noqa  (throwaway GPU probes, removed in the next commit; kept in history for BENCHMARKS.md)
import functools

import torch

from tca_flex import bench
from tca_flex import triton_decode as td
from tca_flex.config import TCAConfig

device, dtype = torch.device("cuda"), torch.bfloat16
for length in (32768, 131072):
    layer = bench.build_cache_layer(length, 32, 8, 128, bench.head_fractions(0.39, length, 4096, 8),
                                    TCAConfig(block_size=128, window=4096), dtype, device)
    q = torch.randn(1, 32, 128, device=device, dtype=dtype)
    seg = layer.segments
    live = (layer.var_len, layer.next_pos, layer.base, layer.ring)
    counters = torch.zeros(seg.start.numel(), dtype=torch.int32, device=device)
    def run(schedule, programs=None, warps=None):
        return td.launch(q, layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length, seg.max_length,
                         128 ** -0.5, total_slots=seg.total_length, live=live, schedule=schedule,
                         counters=counters if schedule == "fused" else None, programs=programs, num_warps=warps)
    res = []
    for chunk in (16, 32, 64, 128):
        td.FUSED_CHUNK = chunk
        for programs in (264, 396, 528):
            res.append((chunk, programs, bench.graph_timed(functools.partial(run, "fused", programs), device)))
    res.append(("balanced", 396, bench.graph_timed(functools.partial(run, "balanced"), device)))
    for r in res:
        print(length, r, flush=True)
