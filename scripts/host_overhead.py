"""Host time of one eager TCA decode step of one layer, its GPU kernels skipped (CPU, microseconds).

    python scripts/host_overhead.py

Eager decode (plain ``model.generate`` without compile) pays Python and dispatch per layer and
step before any kernel runs; on a GPU that host time, not the kernels, sets the pace. This runs
``TCACacheLayer.update`` + ``decode_step`` on the ``"triton"`` backend over a cache layer of
LLaMA-3.1-8B attention shapes (8K tokens, 39% kept) with every Triton kernel replaced by a no-op
launch, so only the host work is timed (Triton's interpreter makes the backend selectable on a CPU;
it never runs). Triton's own launch cost on a GPU comes on top.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402

from tca_flex import bench, triton_append, triton_compress, triton_decode  # noqa: E402
from tca_flex.config import TCAConfig  # noqa: E402


class _Skipped:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    layer = bench.build_cache_layer(8192, 32, 8, 128, bench.head_fractions(0.39, 8192, 4096, 8),
                                    TCAConfig(block_size=128, window=4096), torch.float32, torch.device("cpu"),
                                    backend="triton")
    q, new = torch.randn(1, 32, 1, 128), torch.randn(1, 8, 1, 128)
    kernels = [(m, name) for m in (triton_decode, triton_append, triton_compress) for name in dir(m)
               if name.startswith("_") and name.endswith("_kernel")]
    with contextlib.ExitStack() as stack:
        for module, name in kernels:
            stack.enter_context(mock.patch.object(module, name, _Skipped()))

        def step():
            layer.update(new, new)
            return layer.decode_step(q, 128 ** -0.5)

        for _ in range(50):
            step()
        runs = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(1000):
                step()
            runs.append((time.perf_counter() - start) / 1000 * 1e6)
    print(f"host time per layer step, kernels skipped: median {statistics.median(runs):.1f} us "
          f"(7 runs of 1000: {', '.join(f'{r:.1f}' for r in runs)})")


if __name__ == "__main__":
    main()
