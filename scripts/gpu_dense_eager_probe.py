"""Where eager dense decode's time goes on the GPU: one step over a growing ``DynamicCache``, per SDPA kernel.

    PYTHONPATH=. python scripts/gpu_dense_eager_probe.py [LAYERS] [LENGTH] [STEPS]

Why: through ``model.generate`` eager dense decode took ~65 ms a step on the H200 whatever the
depth (4 or 32 layers; BENCHMARKS.md, 2026-12-04 evening), against ~6 ms for eager TCA at 4
layers. One guess is that SDPA's default kernel there (cuDNN) builds a new plan for every new key
length, which eager decode over a ``DynamicCache`` gives it at every step. This times ``STEPS``
eager steps (default 2 layers, 16K prompt, 32 steps; median of the steps after the first) for
transformers' own ``"sdpa"`` attention (it passes a mask) and for the maskless variant the
benchmarks use as dense, each under SDPA's default choice and with one kernel forced.

Mind the order: every run decodes over the same key lengths, so only the first run meets them
new; the runs after it reuse the plans it built. That guess holds (``gpu_generate_profile.py``,
probe 1: the same call again, over lengths already met, is fast); the forced kernels were not
faster on their own (BENCHMARKS.md, 2026-12-04, second session).
"""
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from tca_flex.bench_models import fastest_dense_sdpa, llama_8b_shaped
from tca_flex.hfcompat import cache_kwargs

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
L = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
N = int(sys.argv[3]) if len(sys.argv) > 3 else 32
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: tiny shapes, to check the script
model = llama_8b_shaped(layers, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, dev.type == "cpu",
                        L + N + 64)
ids = torch.randint(1, model.config.vocab_size, (1, L), device=dev)
maskless = fastest_dense_sdpa()
kernels = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def steps_ms() -> list[float]:
    cache = DynamicCache(config=model.config)
    mask = torch.ones(1, L, dtype=torch.long, device=dev)
    out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(N):
        mask = torch.cat([mask, mask[:, :1]], 1)
        sync()
        start = time.perf_counter()
        out = model(token, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
        token = out.logits[:, -1:].argmax(-1)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


for attention in ("sdpa", maskless):
    model.set_attn_implementation(attention)
    for name, kernel in kernels.items():
        try:
            if kernel is None:
                times = steps_ms()
            else:
                with sdpa_kernel([kernel]):
                    times = steps_ms()
        except RuntimeError as err:  # a kernel that cannot run these shapes (e.g. a mask it does not take)
            print(f"{attention:<14}{name:<10} cannot run: {str(err).splitlines()[0][:100]}", flush=True)
            continue
        print(f"{attention:<14}{name:<10} first step {times[0]:8.2f} ms, then median "
              f"{statistics.median(times[1:]):7.2f} ms a step ({layers} layers, {L} tokens)", flush=True)
