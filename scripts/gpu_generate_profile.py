"""Where eager ``model.generate`` spends a decode step, dense and TCA, on the GPU.

    PYTHONPATH=. python scripts/gpu_generate_profile.py [LAYERS] [LENGTH]

Why: through plain ``generate`` eager dense decode took 65-87 ms a token on the H200 whatever the
depth (BENCHMARKS.md, 2026-12-04), while a hand-written loop of the same model's forwards took
~23 ms at 32 layers with the same attention (2026-12-04, night). This times a token both ways for
dense (the benchmarks' maskless SDPA, under SDPA's default kernel choice and with cuDNN or
flash forced, and transformers' own ``"sdpa"``) and for TCA after
``apply`` with a ``TCACache``, then profiles 8 tokens of ``generate`` (torch.profiler, CPU and
CUDA) and prints the ops that take the host's and the device's time.
"""
import sys
import time

import torch
from transformers import DynamicCache

from tca_flex import TCACache, TCAConfig, apply, remove
from tca_flex.bench_models import fastest_dense_sdpa, llama_8b_shaped
from tca_flex.budgets import HeadBudgets
from tca_flex.hfcompat import cache_kwargs

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
L = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: tiny shapes, to check the script
smoke = dev.type == "cpu"
model = llama_8b_shaped(layers, dev, torch.bfloat16 if not smoke else torch.float32, smoke, L + 128)
ids = torch.randint(1, model.config.vocab_size, (1, L), device=dev)
config = TCAConfig(block_size=128 if not smoke else 32, window=4096 if not smoke else 64)


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def generate(new: int, cache) -> None:
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))


def hand_loop(new: int, cache) -> None:
    mask = torch.ones_like(ids)
    out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    for _ in range(new - 1):
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, mask[:, :1]], 1)
        out = model(token, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))


def ms(fn, new: int, make_cache) -> float:
    sync()
    start = time.perf_counter()
    fn(new, make_cache())
    sync()
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def study(name: str, make_cache) -> None:
    generate(2, make_cache())
    for label, fn in (("generate", generate), ("hand loop", hand_loop)):
        per_token = (ms(fn, 33, make_cache) - ms(fn, 1, make_cache)) / 32
        print(f"{name:<38}{label:<10} {per_token:8.2f} ms a token ({layers} layers, {L} tokens)", flush=True)
    cache = make_cache()
    generate(1, cache)  # the prefill outside the profile
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        generate(9, make_cache())
        sync()
    table = prof.key_averages()
    print(f"--- {name}: by host time (self), generate of 9 tokens, prefill included")
    print(table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
    if dev.type == "cuda":
        print(f"--- {name}: by device time")
        print(table.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60))


model.set_attn_implementation(fastest_dense_sdpa())
study("dense (maskless sdpa)", lambda: DynamicCache(config=model.config))
if dev.type == "cuda":
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        study("dense (maskless, cuDNN/flash forced)", lambda: DynamicCache(config=model.config))
model.set_attn_implementation("sdpa")
study("dense (sdpa)", lambda: DynamicCache(config=model.config))
model.set_attn_implementation(fastest_dense_sdpa())
apply(model, budgets=HeadBudgets.uniform(layers, model.config.num_key_value_heads, 0.25, config))
study("TCA 25% + w", lambda: TCACache(model))
remove(model)
