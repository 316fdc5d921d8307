"""Where eager decode spends a step, dense and TCA, on the GPU.

    PYTHONPATH=. python scripts/gpu_generate_profile.py [LAYERS] [LENGTH]

Why: through plain ``generate`` eager dense decode took 65-87 ms a token on the H200 whatever the
depth, eager TCA 41-69 ms at 32 layers (BENCHMARKS.md, 2026-12-04), while a hand-written loop of
the same dense model's forwards took ~23 ms. Three probes:

1. ``generate`` of 33 tokens twice over the same prompt, dense (maskless SDPA, SDPA's default
   kernel choice): if the first call is much slower, a per-key-length cost that is paid once
   per process (cuDNN builds a plan for each new shape) sets eager dense's pace, not the step.
2. Decode steps only (after the prefill, a hand loop of forwards as ``generate`` makes them),
   profiled with torch.profiler: the host's and the device's top ops, dense and TCA.
3. The Python functions of 8 decode steps (cProfile): the host time the op profile does not
   see (Triton's launcher, the cache's own code).
4. One TCA decode step under ``torch.cuda.set_sync_debug_mode("warn")``: where the host waits
   for the device (each such wait stalls the launches behind it).
"""
import re
import statistics
import sys
import time
import traceback
import warnings

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
model = llama_8b_shaped(layers, dev, torch.bfloat16 if not smoke else torch.float32, smoke, L + 256)
model.set_attn_implementation(fastest_dense_sdpa())
config = TCAConfig(block_size=128 if not smoke else 32, window=4096 if not smoke else 64)


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def ms(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def generate(ids: torch.Tensor, new: int, cache) -> None:
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))


class Decoder:
    """A prefill, then one forward per new token, as generate makes them (growing 2-D mask)."""

    def __init__(self, ids: torch.Tensor, cache) -> None:
        self.cache, self.mask = cache, torch.ones_like(ids)
        out = model(ids, attention_mask=self.mask, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        self.token = out.logits[:, -1:].argmax(-1)

    def step(self) -> None:
        self.mask = torch.cat([self.mask, self.mask[:, :1]], 1)
        out = model(self.token, attention_mask=self.mask, use_cache=True, **cache_kwargs(model, self.cache))
        self.token = out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def per_length_cost() -> None:
    ids = torch.randint(1, model.config.vocab_size, (1, L + 7), device=dev)  # lengths not seen before
    first = ms(lambda: generate(ids, 33, DynamicCache(config=model.config)))
    again = ms(lambda: generate(ids, 33, DynamicCache(config=model.config)))
    print(f"probe 1, dense generate of 33 tokens over {L + 7} new key lengths: first {first:.0f} ms, "
          f"same lengths again {again:.0f} ms", flush=True)


@torch.no_grad()
def decode_profile(name: str, make_cache) -> Decoder:
    ids = torch.randint(1, model.config.vocab_size, (1, L), device=dev)
    dec = Decoder(ids, make_cache())
    for _ in range(4):
        dec.step()
    times = [ms(dec.step) for _ in range(16)]
    print(f"{name}: eager decode step, median {statistics.median(times):.2f} ms ({layers} layers, {L} tokens; "
          f"steps {min(times):.2f}-{max(times):.2f})", flush=True)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(8):
            dec.step()
        sync()
    table = prof.key_averages()
    print(f"--- {name}: 8 decode steps, by host time (self)")
    print(table.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=70))
    if dev.type == "cuda":
        print(f"--- {name}: 8 decode steps, by device time (self)")
        print(table.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=70))
    python_profile(name, dec)
    return dec


def python_profile(name: str, dec: Decoder) -> None:
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    sync()
    prof.enable()
    for _ in range(8):
        dec.step()
    sync()
    prof.disable()
    for key, rows in (("cumulative", 45), ("tottime", 20)):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(rows)
        lines = text.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        print(f"--- {name}: 8 decode steps, Python functions by {key}")
        print("\n".join(re.sub(r"\S*site-packages/", "", line)[:170] for line in lines[start - 1:start + rows + 1]))


@torch.no_grad()
def sync_sites(dec: Decoder) -> None:
    if dev.type != "cuda":
        return
    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if "/warnings.py" not in f.filename][-5:-1]
        key = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames))
        sites[key] = sites.get(key, 0) + 1

    shown, warnings.showwarning = warnings.showwarning, record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                dec.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = shown
    print(f"probe 4: {sum(sites.values())} synchronising calls in one TCA decode step ({layers} layers)")
    for key, count in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"  {count:4d}x  {key}")


per_length_cost()
decode_profile("dense (maskless sdpa)", lambda: DynamicCache(config=model.config))
apply(model, budgets=HeadBudgets.uniform(layers, model.config.num_key_value_heads, 0.25, config))
sync_sites(decode_profile("TCA 25% + w", lambda: TCACache(model)))
remove(model)
