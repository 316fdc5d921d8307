"""Where the Triton decode kernel's time goes, on the GPU (CUDA-graph replay, microseconds).

    PYTHONPATH=. python scripts/gpu_decode_parts.py

Over a TCACache layer of LLaMA-3.1-8B attention shapes at 32K and 128K tokens, 39% and 15% kept
(``bench.build_cache_layer``, as the decode sweep), without and with a token for the merge to
append (what a decode step's merge does since 2026-12-05): the whole ``triton_decode.launch``,
the balanced kernel alone (the merge kernel replaced by a no-op), the merge alone (after one tiny
kernel in the balanced kernel's place, ``_CopyOnly``), and one and two empty Triton kernels (the
floor a replayed graph of one and of two launches costs).
"""

from unittest import mock

import torch
import triton
import triton.language as tl

from tca_flex import bench
from tca_flex import triton_decode as td


@triton.jit
def _empty(x_ptr):
    pass


class _Skipped:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@triton.jit
def _copy_next_pos(copy_ptr, next_pos_ptr, TOKEN: tl.constexpr):
    if TOKEN:
        tl.store(copy_ptr, tl.load(next_pos_ptr))


class _CopyOnly:
    """Stands in for the balanced kernel when the merge is timed alone: it only makes the copy of
    ``next_pos`` a merge that appends a token reads (garbage there would send the token's writes
    anywhere); one tiny launch, the same with and without a token."""

    def __getitem__(self, grid):
        return lambda **kw: _copy_next_pos[(1,)](kw["copy_ptr"], kw["next_pos_ptr"], kw["TOKEN"])


def main() -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = torch.empty(1, device=device)
    empty = bench.graph_timed(lambda: _empty[(1,)](x), device)
    empty2 = bench.graph_timed(lambda: (_empty[(1,)](x), _empty[(1,)](x)), device)
    for length in (32768, 131072):
        for target in (0.39, 0.15):
            for token in (False, True):
                launch = bench.kernel_launch(length, target, device, dtype, token=token)
                full = bench.graph_timed(launch, device)
                with mock.patch.object(td, "_combine_kernel", _Skipped()):
                    main_only = bench.graph_timed(launch, device)
                with mock.patch.object(td, "_balanced_kernel", _CopyOnly()):
                    merge_only = bench.graph_timed(launch, device)
                print(f"{length} {target:.0%}{', the merge appending a token' if token else ''}: full {full:.1f} "
                      f"us, main kernel alone {main_only:.1f}, merge alone {merge_only:.1f}, empty kernel "
                      f"{empty:.1f}, two empty kernels {empty2:.1f}", flush=True)


if __name__ == "__main__":
    main()
