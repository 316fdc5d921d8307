"""The decode kernel with and without the owner loads on the packed run, alternating (CUDA-graph replay, us).

    PYTHONPATH=. python scripts/gpu_owner_skip.py

A TCA cache's packed run has no free slot, so ``triton_decode.SKIP_PACKED_OWNER`` (the shipped
setting) lets the kernel load ``owner`` in the ring only. Over ``bench.kernel_launch`` layers of
LLaMA-3.1-8B attention shapes, each launch with a token for the merge to append (as a decode step's),
three rounds of both settings; first checks that both give the same output on one cache.
"""

import statistics

import torch

from tca_flex import bench
from tca_flex import triton_decode as td

SETTINGS = {"owner loaded everywhere": False, "owner skipped on the packed run": True}


def main() -> None:
    device = torch.device("cuda")
    check = bench.kernel_launch(131072, 0.39, device)
    outs = {}
    for name, skip in SETTINGS.items():
        td.SKIP_PACKED_OWNER = skip
        outs[name] = check()
    a, b = outs.values()
    print(f"128K 39%: max |out difference| {(a[0].float() - b[0].float()).abs().max().item():.3g}, "
          f"max |lse difference| {(a[1] - b[1]).abs().max().item():.3g}", flush=True)
    for length, target in ((131072, 0.39), (131072, 0.15), (32768, 0.39)):
        launch = bench.kernel_launch(length, target, device, token=True)
        times = {name: [] for name in SETTINGS}
        for _ in range(3):
            for name, skip in SETTINGS.items():
                td.SKIP_PACKED_OWNER = skip
                times[name].append(bench.graph_timed(launch, device))
        print(f"{length} {target:.0%}: " + "; ".join(
            f"{name} {' / '.join(f'{t:.1f}' for t in ts)} (median {statistics.median(ts):.1f})"
            for name, ts in times.items()), flush=True)
    td.SKIP_PACKED_OWNER = True


if __name__ == "__main__":
    main()
