"""Host time of replaying a CUDA graph, by how its kernels were launched when it was captured (GPU probe).

    PYTHONPATH=. python scripts/gpu_launch_probe.py

Graphs of about 600 kernels each, launched by Triton's own launcher, by PyTorch's eager ops and by an
Inductor-compiled function (its Triton kernels go through Inductor's launcher); and graphs of 32 of
TCA's decode launches (``bench.kernel_launch``: attention and merge, each alone, between matmuls,
with and without a token to append). Prints the median host microseconds of ``graph.replay()``
right after a sync, when the GPU is idle and waits for the launch. A replayed TCA decode step took
the host far longer than any of these, timed after a profiler session in its process
(BENCHMARKS.md, 2026-12-05 twelfth session).
"""

import statistics
import time
from unittest import mock

import torch
import triton
import triton.language as tl
from gpu_decode_parts import _Skipped  # run as a script: scripts/ is on the path

from tca_flex import bench
from tca_flex import triton_decode as td


@triton.jit
def _add_one(x_ptr, N: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)


def host_replay_us(fn, reps: int = 30) -> float:
    graph = bench.captured_graph(fn)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    import torch._inductor.config as inductor_config

    print("triton", triton.__version__, "torch", torch.__version__, "static launcher",
          getattr(inductor_config, "use_static_cuda_launcher", None), flush=True)
    x = torch.zeros(64 * 128, device="cuda")
    w = torch.randn(256, 256, device="cuda")
    h = torch.randn(64, 256, device="cuda")

    def triton_launcher():
        for _ in range(600):
            _add_one[(64,)](x, N=128)

    def eager():
        for _ in range(600):
            x.add_(1)

    def chain(h):
        for _ in range(300):
            h = torch.relu(h @ w) * 0.5
        return h

    compiled = torch.compile(chain)
    print(f"600 Triton-launcher kernels: host replay {host_replay_us(triton_launcher):.1f} us", flush=True)
    print(f"600 eager kernels: host replay {host_replay_us(eager):.1f} us", flush=True)
    launch = bench.kernel_launch(32768, 0.39, torch.device("cuda"), torch.bfloat16)

    def decode_32():
        for _ in range(32):
            launch()

    print(f"32 decode launches (balanced + merge): host replay {host_replay_us(decode_32):.1f} us", flush=True)
    with mock.patch.object(td, "_combine_kernel", _Skipped()):
        print(f"32 balanced kernels: host replay {host_replay_us(decode_32):.1f} us", flush=True)
    with mock.patch.object(td, "_balanced_kernel", _Skipped()):
        print(f"32 merge kernels: host replay {host_replay_us(decode_32):.1f} us", flush=True)
    a = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    wm = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def mixed():
        for _ in range(32):
            torch.mm(a, wm)
            launch()
            torch.mm(a, wm)

    def matmuls():
        for _ in range(64):
            torch.mm(a, wm)

    print(f"32 x (matmul, decode launch, matmul): host replay {host_replay_us(mixed):.1f} us", flush=True)
    launch = bench.kernel_launch(32768, 0.39, torch.device("cuda"), torch.bfloat16, token=True)
    print(f"32 decode launches appending a token: host replay {host_replay_us(decode_32):.1f} us", flush=True)
    print(f"32 x (matmul, decode launch appending a token, matmul): host replay {host_replay_us(mixed):.1f} us",
          flush=True)
    print(f"64 matmuls: host replay {host_replay_us(matmuls):.1f} us", flush=True)
    print(f"Inductor, 300 matmuls + 300 Triton kernels: host replay {host_replay_us(lambda: compiled(h)):.1f} us",
          flush=True)


if __name__ == "__main__":
    main()
