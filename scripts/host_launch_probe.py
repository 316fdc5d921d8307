"""Host time of eager decode's launches on the device host (us per call, no sync inside the loop; H200 probe,
removed after the run: BENCHMARKS.md, 2026-12-04 third session).

    PYTHONPATH=. python scripts/host_launch_probe.py
"""
# ruff: noqa: B023, E501, E731, I001  (a one-off probe, as run)
import time

import torch
import torch.nn.functional as F

from tca_flex import bench
from tca_flex import triton_decode as td
from tca_flex import triton_append as ta
from tca_flex.config import TCAConfig


def host_us(fn, n=400):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def report(name, fn, n=400):
    h, w = host_us(fn, n)
    print(f"{name:<48} host {h:8.1f} us/call   wall {w:8.1f}", flush=True)


class Recorder:
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def call(*a, **kw):
            self.calls.append((grid, a, kw))
            return self.kernel[grid](*a, **kw)
        return call


def main():
    dev, dt = torch.device("cuda"), torch.bfloat16
    length = 32768
    layer = bench.build_cache_layer(length, 32, 8, 128, bench.head_fractions(0.39, length, 4096, 8),
                                    TCAConfig(block_size=128, window=4096), dt, dev)
    q = torch.randn(1, 32, 128, device=dev, dtype=dt)
    seg, live = layer.segments, (layer.var_len, layer.next_pos, layer.base, layer.ring)
    launch = lambda: td.launch(q, layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length, seg.max_length,  # noqa
                               128 ** -0.5, total_slots=seg.total_length, live=live)
    report("triton_decode.launch (2 kernels + buffers)", launch)
    rec_b, rec_c = Recorder(td._balanced_kernel), Recorder(td._balanced_combine_kernel)
    orig = td._balanced_kernel, td._balanced_combine_kernel
    td._balanced_kernel, td._balanced_combine_kernel = rec_b, rec_c
    launch()
    td._balanced_kernel, td._balanced_combine_kernel = orig
    for name, kern, rec in (("balanced", orig[0], rec_b), ("merge", orig[1], rec_c)):
        grid, a, kw = rec.calls[-1]
        report(f"  {name}: kernel[grid](**kwargs)", lambda: kern[grid](*a, **kw))
        try:
            ck = kern[grid](*a, **kw)
            device = torch.cuda.current_device()
            caches = kern.device_caches[device]
            binder = caches[-1]
            kw2 = dict(kw)
            for k in ("debug",):
                kw2.setdefault(k, False)
            report(f"  {name}: binder only", lambda: binder(*a, **kw2))
            bound, spec, opts = binder(*a, **kw2)
            vals = list(bound.values())
            stream = torch.cuda.current_stream().cuda_stream
            g = tuple(grid) + (1,) * (3 - len(grid))

            def direct():
                ck.run(g[0], g[1], g[2], stream, ck.function, ck.packed_metadata, None, None, None, *vals)
            report(f"  {name}: CompiledKernel.run direct", direct)
        except Exception as exc:  # noqa: BLE001
            print(f"  {name}: direct path failed: {type(exc).__name__}: {exc}"[:300], flush=True)
    report("5 x torch.empty (partials, out, lse)", lambda: [torch.empty(396 * 4, 128, device=dev) for _ in range(5)])
    new = torch.randn(1, 8, 1, 128, device=dev, dtype=dt)
    q4 = q.unsqueeze(2)
    report("TCACacheLayer update + decode_step (eager)", lambda: (layer.update(new, new), layer.decode_step(q4, 128 ** -0.5)), n=200)
    rec_a = Recorder(ta._append_kernel)
    orig_a = ta._append_kernel
    ta._append_kernel = rec_a
    layer.update(new, new)
    ta._append_kernel = orig_a
    grid, a, kw = rec_a.calls[-1]
    report("  append: kernel[grid](*args)", lambda: orig_a[grid](*a, **kw))
    k = torch.randn(1, 8, length, 128, device=dev, dtype=dt)
    qd = torch.randn(1, 32, 1, 128, device=dev, dtype=dt)
    report("dense: SDPA (gqa) 1 x 32K", lambda: F.scaled_dot_product_attention(qd, k, k, enable_gqa=True))
    report("dense: 2 x torch.cat 32K", lambda: (torch.cat([k[:, :, :-1], new], 2), torch.cat([k[:, :, :-1], new], 2)), n=100)


if __name__ == "__main__":
    main()
