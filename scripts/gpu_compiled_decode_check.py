"""Compiled decode with CUDA graphs ("reduce-overhead") against eager, teacher-forced, on the GPU.

    PYTHONPATH=. TORCH_LOGS=recompiles python scripts/gpu_compiled_decode_check.py [LAYERS] [LENGTH] [STEPS]

A LLaMA-3.1-8B-shaped model (random bf16 weights, default 2 layers, 32K prompt, 200 steps): the same
forced tokens are decoded eagerly and through ``torch.compile(model, mode="reduce-overhead")`` (dense
over a ``StaticCache``; TCA 25% + window over a ``TCACache`` with reserved room, via
``tca_flex.compile``). Per step: the largest logit difference relative to the largest logit, argmax
agreement, the slow (compiling) steps, and the steady per-step time of both.
"""
import sys
import time

import torch
from torch._dynamo.utils import counters
from transformers import StaticCache

import tca_flex
from tca_flex.bench_models import fastest_dense_sdpa, llama_8b_shaped
from tca_flex.budgets import HeadBudgets
from tca_flex.config import TCAConfig
from tca_flex.hfcompat import cache_kwargs

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
L = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
N = int(sys.argv[3]) if len(sys.argv) > 3 else 200
dev, dt = torch.device("cuda"), torch.bfloat16
torch.manual_seed(0)
model = llama_8b_shaped(layers, dev, dt, False, L + N + 512)
model.set_attn_implementation(fastest_dense_sdpa())
cfg = model.config
ids = torch.randint(0, cfg.vocab_size, (1, L), device=dev)
forced = torch.randint(0, cfg.vocab_size, (1, N), device=dev)

def run(fn, cache, mark):
    logits, times = [], []
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        if mark and hasattr(cache, "mark_static"):
            cache.mark_static()
        for i in range(N):
            pos = L + i
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            s.record()
            out = fn(input_ids=forced[:, i:i + 1], position_ids=torch.tensor([[pos]], device=dev),
                     cache_position=torch.tensor([pos], device=dev), use_cache=True, logits_to_keep=1,
                     **cache_kwargs(model, cache))
            logits.append(out.logits[:, -1].float().clone())
            e.record()
            torch.cuda.synchronize()
            times.append(((time.perf_counter() - t0) * 1e3, s.elapsed_time(e)))
    return torch.cat(logits), times

def compare(name, fn, make_cache):
    ref, t_ref = run(model, make_cache(), False)
    got, t_got = run(fn, make_cache(), True)
    err = (got - ref).abs().max(-1).values / ref.abs().max(-1).values
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    slow = [(i, round(w)) for i, (w, _) in enumerate(t_got) if w > 50]
    steady = sorted(ev for _, ev in t_got[10:])
    eager = sorted(ev for _, ev in t_ref[10:])
    print(f"{name}: rel max logit error per step: first {err[:3].tolist()}, max {err.max().item():.4f}, "
          f"median {err.median().item():.4f}; argmax agreement {agree:.3f}; slow steps (ms wall) {slow}; "
          f"steady event median compiled {steady[len(steady)//2]:.3f} ms, eager {eager[len(eager)//2]:.3f} ms",
          flush=True)
    print(f"{name}: counters {dict(counters['inductor'])}", flush=True)

torch._dynamo.reset()
counters.clear()
compare("dense StaticCache", torch.compile(model, mode="reduce-overhead"),
        lambda: StaticCache(config=cfg, max_cache_len=L + N + 16))
torch._dynamo.reset()
counters.clear()
tca_flex.apply(model, budgets=HeadBudgets.uniform(layers, cfg.num_key_value_heads, 0.25,
                                                   TCAConfig(block_size=128, window=4096)))
compare("TCA 25%+w TCACache", tca_flex.compile(model, mode="reduce-overhead"),
        lambda: tca_flex.TCACache(model, reserve_tokens=N + 16))
