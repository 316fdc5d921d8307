"""The decode merge kernel's tile, swept on the GPU (CUDA-graph replay of the whole launch, microseconds).

    PYTHONPATH=. python scripts/gpu_merge_sweep.py

Over a TCACache layer of LLaMA-3.1-8B attention shapes at 32K and 128K tokens, 39% and 25% kept
(``bench.build_cache_layer``): ``triton_decode.launch`` with every (dims a program, partials an
iteration, warps) of the merge (``COMBINE_DIMS``, ``COMBINE_CHUNK``, ``COMBINE_WARPS``), each checked
against the module's defaults (largest difference of output and log-sum-exp), the defaults timed
first and last.
"""
from unittest import mock

import torch

from tca_flex import bench
from tca_flex import triton_decode as td


def main() -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    for length in (32768, 131072):
        for target in (0.39, 0.25):
            launch = bench.kernel_launch(length, target, device, dtype)
            ref_out, ref_lse = launch()
            rows = [("defaults", bench.graph_timed(launch, device), 0.0)]
            for dims in (128, 64, 32, 16):
                for chunk in (32, 64, 128):
                    for warps in (1, 2, 4):
                        with mock.patch.multiple(td, COMBINE_DIMS=dims, COMBINE_CHUNK=chunk, COMBINE_WARPS=warps):
                            out, lse = launch()
                            err = max((out.float() - ref_out.float()).abs().max().item(),
                                      (lse - ref_lse).abs().max().item())
                            rows.append((f"ds{dims} chunk{chunk} w{warps}", bench.graph_timed(launch, device), err))
            rows.append(("defaults again", bench.graph_timed(launch, device), 0.0))
            print(f"{length} {target:.0%}: " + "; ".join(f"{n} {t:.2f} (err {e:.1e})" for n, t, e in rows),
                  flush=True)
            print("  best: " + "; ".join(f"{n} {t:.2f}" for n, t, _ in sorted(rows, key=lambda r: r[1])[:6]),
                  flush=True)


if __name__ == "__main__":
    main()
