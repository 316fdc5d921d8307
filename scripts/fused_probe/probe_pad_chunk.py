# ruff: noqa  (throwaway GPU probes, removed in the next commit; kept in history for BENCHMARKS.md)
import functools
import sys

import torch

sys.path.insert(0, "scripts/fused_probe")
import td_knobs as td

from tca_flex import bench, decode
from tca_flex.config import TCAConfig

device, dtype = torch.device("cuda"), torch.bfloat16
for length in (32768, 131072):
    layer = bench.build_cache_layer(length, 32, 8, 128, bench.head_fractions(0.39, length, 4096, 8),
                                    TCAConfig(block_size=128, window=4096), dtype, device)
    q = torch.randn(1, 32, 128, device=device, dtype=dtype)
    seg = layer.segments
    live = (layer.var_len, layer.next_pos, layer.base, layer.ring)
    counters = torch.zeros(seg.start.numel() * 64, dtype=torch.int32, device=device)
    td.DBG = torch.zeros(seg.start.numel(), dtype=torch.int32, device=device)
    ref = decode._math_decode(q[:, :, None], layer.k_buf, layer.v_buf, layer.owner, 4, 128 ** -0.5)
    def run(schedule, programs=None):
        return td.launch(q, layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length, seg.max_length,
                         128 ** -0.5, total_slots=seg.total_length, live=live, schedule=schedule,
                         counters=counters if schedule == "fused" else None, programs=programs)
    for pad in (1, 32, 64):
        for merge in (False, True):
            for chunk in ((64, 128) if merge else (64,)):
                for programs in (264, 396):
                    td.PAD, td.MERGE, td.FUSED_CHUNK = pad, merge, chunk
                    out, lse = run("fused", programs)
                    err = (out.float() - ref[0][:, :, 0].float()).abs().max().item()
                    t = bench.graph_timed(functools.partial(run, "fused", programs), device)
                    print(length, "pad", pad, "merge", merge, "chunk", chunk, "programs", programs, f"{t:.1f} us err {err:.4f}", flush=True)
    for programs in (264, 396):
        print(length, "balanced", programs, bench.graph_timed(functools.partial(run, "balanced", programs), device), flush=True)
