"""Where the Triton decode kernel's time goes, on the GPU (CUDA-graph replay, microseconds).

    PYTHONPATH=. python scripts/gpu_decode_parts.py

Over a TCACache layer of LLaMA-3.1-8B attention shapes at 32K and 128K tokens, 39% and 15% kept
(``bench.build_cache_layer``, as the decode sweep): the whole ``triton_decode.launch``, the
balanced kernel alone (the merge kernel replaced by a no-op), the merge alone, one and two
empty Triton kernels (the floor a replayed graph of one and of two launches costs), and the
"fused" schedule (the merge done by the last program of each segment) with persistent counters
and with counters zeroed by each call, alternating with "balanced" three times; each schedule's
largest error against the float32 "math" backend.
"""

import functools
from unittest import mock

import torch
import triton

from tca_flex import bench, decode
from tca_flex import triton_decode as td
from tca_flex.config import TCAConfig


@triton.jit
def _empty(x_ptr):
    pass


class _Skipped:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = torch.empty(1, device=device)
    empty = bench.graph_timed(lambda: _empty[(1,)](x), device)
    empty2 = bench.graph_timed(lambda: (_empty[(1,)](x), _empty[(1,)](x)), device)
    for length in (32768, 131072):
        for target in (0.39, 0.15):
            layer = bench.build_cache_layer(length, 32, 8, 128, bench.head_fractions(target, length, 4096, 8),
                                            TCAConfig(block_size=128, window=4096), dtype, device)
            q = torch.randn(1, 32, 128, device=device, dtype=dtype)
            seg = layer.segments
            live = (layer.var_len, layer.next_pos, layer.base, layer.ring)

            counters = torch.zeros(seg.start.numel(), dtype=torch.int32, device=device)

            def run(schedule=None, counters=None, q=q, layer=layer, seg=seg, live=live):
                return td.launch(q, layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length, seg.max_length,
                                 128 ** -0.5, total_slots=seg.total_length, live=live, schedule=schedule,
                                 counters=counters)

            launch = run
            fused = functools.partial(run, "fused", counters)
            fused_zeroed = functools.partial(run, "fused")
            reference = decode._math_decode(q[:, :, None], layer.k_buf, layer.v_buf, layer.owner, 4, 128 ** -0.5)
            errors = {}
            for name, fn in (("balanced", launch), ("fused", fused)):
                for _ in range(3):  # the counters must be back at zero after every launch
                    out, lse = fn()
                errors[name] = ((out.float() - reference[0][:, :, 0].float()).abs().max().item(),
                                (lse - reference[1]).abs().max().item())
            assert int(counters.abs().sum()) == 0, "fused: counters not reset"
            # Alternating, so drift (clocks, heat) falls on both.
            rows = {"full": [], "fused": [], "fused, counters zeroed per call": []}
            for _ in range(3):
                rows["full"].append(bench.graph_timed(launch, device))
                rows["fused"].append(bench.graph_timed(fused, device))
                rows["fused, counters zeroed per call"].append(bench.graph_timed(fused_zeroed, device))
            full = min(rows["full"])
            with mock.patch.object(td, "_balanced_combine_kernel", _Skipped()):
                main_only = bench.graph_timed(launch, device)
            with mock.patch.object(td, "_balanced_kernel", _Skipped()):
                merge_only = bench.graph_timed(launch, device)
            print(f"{length} {target:.0%}: full {full:.1f} us, main kernel alone {main_only:.1f}, merge alone "
                  f"{merge_only:.1f}, empty kernel {empty:.1f}, two empty kernels {empty2:.1f}; "
                  + ", ".join(f"{k} {' / '.join(f'{t:.1f}' for t in v)}" for k, v in rows.items())
                  + f"; max |error| vs math (out, lse): {errors}", flush=True)


if __name__ == "__main__":
    main()
