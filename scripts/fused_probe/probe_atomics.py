# ruff: noqa  (throwaway GPU probes, removed in the next commit; kept in history for BENCHMARKS.md)
import functools
import sys

import torch

sys.path.insert(0, "scripts/fused_probe")
import td_knobs as td

from tca_flex import bench
from tca_flex.config import TCAConfig

device, dtype = torch.device("cuda"), torch.bfloat16
length = 131072
layer = bench.build_cache_layer(length, 32, 8, 128, bench.head_fractions(0.39, length, 4096, 8),
                                TCAConfig(block_size=128, window=4096), dtype, device)
q = torch.randn(1, 32, 128, device=device, dtype=dtype)
seg = layer.segments
live = (layer.var_len, layer.next_pos, layer.base, layer.ring)
counters = torch.zeros(seg.start.numel(), dtype=torch.int32, device=device)
td.DBG = torch.zeros(seg.start.numel(), dtype=torch.int32, device=device)
def run(schedule, programs=None):
    return td.launch(q, layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length, seg.max_length,
                     128 ** -0.5, total_slots=seg.total_length, live=live, schedule=schedule,
                     counters=counters if schedule == "fused" else None, programs=programs)
td.MERGE = False
for sem, bar, only in (("acq_rel", True, False), ("relaxed", False, True), ("relaxed", False, False),
                       ("acq_rel", False, True), ("release", True, False)):
    td.SEM, td.BAR, td.ONLY_ATOMIC = sem, bar, only
    counters.zero_()
    print(sem, "barrier", bar, "only atomic", only, bench.graph_timed(functools.partial(run, "fused"), device), flush=True)
print("balanced", bench.graph_timed(functools.partial(run, "balanced"), device), flush=True)
# what the kernel is, for the slowest variant
td.SEM, td.BAR, td.ONLY_ATOMIC = "relaxed", False, True
