# ruff: noqa: B023, E402, E731, I001  (a one-off probe, as run on the H200; the closures run inside their iteration)
"""A/B alternation: shipped balanced kernel vs its TMA-load twin (b64 w4 s2 p396), CUDA-graph replay."""
import sys
import torch
sys.path.insert(0, "scripts/tma_probe")
from sweep import make_tma_launch  # noqa: E402
from tca_flex import bench, triton_decode as td  # noqa: E402
from tca_flex.config import TCAConfig  # noqa: E402

device, dtype = torch.device("cuda"), torch.bfloat16
for length in (32768, 131072):
    for target in (0.39, 0.15):
        layer = bench.build_cache_layer(length, 32, 8, 128, bench.head_fractions(target, length, 4096, 8),
                                        TCAConfig(block_size=128, window=4096), dtype, device)
        q = torch.randn(1, 32, 128, device=device, dtype=dtype)
        seg, live = layer.segments, (layer.var_len, layer.next_pos, layer.base, layer.ring)
        shipped = lambda: td.launch(q, layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length,  # noqa: E731
                                    seg.max_length, 128 ** -0.5, total_slots=seg.total_length, live=live)
        tma = make_tma_launch(layer, q, 64, 4, 2, 396)
        a, b = [], []
        for _ in range(5):
            a.append(bench.graph_timed(shipped, device))
            b.append(bench.graph_timed(tma, device))
        print(f"L={length} kept~{target:.0%}: shipped {[round(x, 1) for x in a]} tma {[round(x, 1) for x in b]} "
              f"medians {sorted(a)[2]:.1f} / {sorted(b)[2]:.1f} us", flush=True)
