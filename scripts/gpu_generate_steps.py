"""Where plain ``model.generate``'s time per token goes with a reserved ``TCACache`` (CUDA; on a CPU, tiny
shapes, to check the script).

    PYTHONPATH=. python scripts/gpu_generate_steps.py [LAYERS] [LENGTH] [KEEP]   # defaults 32 32768 0.25

Prints the host time of every decode step of a call (a logits processor stamps each step;
``generate`` synchronises every step for its stopping check), for calls of 129 and 257 new tokens,
each with a new cache, after an untimed call that compiles. The first decode step of a new cache
records its CUDA graphs; the later ones show whether they replay: before the fix of 2026-12-05
(``TCACache.prepare_decode_step``) every step ran un-replayed, 10.7-11.4 ms at 32 layers and 32K on
the H100 against 7.3 ms for the step replayed by hand (BENCHMARKS.md, thirteenth session).
``TCA_PROBE_CPROFILE=FILE`` writes a cProfile of the last call (host time by function) to FILE.
``TCA_PROBE_REQUESTS=N`` runs N requests of 17 tokens in a row instead, each with a new cache, then N
through one cache reset between requests, and prints their first and steady steps and PyTorch's count
of CUDA-graph skips (a new cache's buffers are new static addresses: each request records its graphs
again; a reset cache refills its buffers in place).
``TCA_PROBE_BUCKETS=N`` runs N prompts of distinct lengths in one size bucket, each with a new cache
of a layout per length (each records its graphs), then through one cache of bucketed layouts reset
between them (the first request's graphs replay for the others), after two untimed calls that compile.
``TCA_PROBE_HOOKS=1`` times instead, on one machine, calls of 129 tokens with the padded prefill's
packing hooks on for good (as before 2026-12-05: the compiled step guards on them) and off between
calls (as shipped since), alternating, after an untimed call that compiles each.
``TCA_PROBE_MASK=1`` times the same way calls with generate's decode mask built every step (as
before 2026-12-06) and spared (``generate_hook``: a TCACache's decode does not read it).
``TCA_PROBE_EAGER=1`` makes every cache unreserved, so ``generate`` decodes eagerly.
``TCA_PROBE_STANCE=1`` times the same way calls with Dynamo's guards evaluated before every compiled
step and with ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, then checks both give the
same tokens.
"""

from __future__ import annotations

import cProfile
import functools
import itertools
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable

import torch
from compiled_step_host_time import set_packing_hooks

from tca_flex import TCACache, apply, generate_hook, remove
from tca_flex.bench_models import generate_compile_config, llama_8b_shaped
from tca_flex.budgets import HeadBudgets
from tca_flex.config import TCAConfig
from tca_flex.hfcompat import cache_kwargs


def alternating(call, label: str, states: dict[str, Callable[[], None]], rounds: int = 3,
                caches: dict[str, TCACache] | None = None) -> None:
    """Steady decode steps of calls of 129 tokens in each of ``states`` (name: what puts the process in
    it), alternating, ``rounds`` calls each, after an untimed call that compiles each state's step.
    With ``caches`` each state's calls run on its own cache, reset before each call: its graphs
    replay, and no new cache's graphs pile up in the tree as the calls go on (later calls slower)."""
    for i, (name, enter) in enumerate(itertools.islice(itertools.cycle(states.items()), rounds * len(states))):
        enter()
        cache = None
        if caches is not None:
            cache = caches[name]
            cache.reset()
        if i < len(states):
            t0 = time.perf_counter()
            call(257, cache)  # compiles the step for this state
            print(f"untimed call, {name}: {time.perf_counter() - t0:.1f} s", flush=True)
            if cache is not None:
                cache.reset()
        total, steps = call(129, cache)
        steady = steps[8:]
        print(f"== {label}, {name}: call {total:.1f} ms; steps 9-{len(steps)}: median "
              f"{statistics.median(steady):.3f}, mean {statistics.fmean(steady):.3f}", flush=True)


def hooks_on_and_off(model: torch.nn.Module, call, label: str) -> None:
    """The padded prefill's packing hooks on for good and off between calls. The hooks go on before the
    first compile (its guards then include them: PyTorch does not guard on hooks added to a module
    after a compile); taking them off compiles a second step."""
    alternating(call, label, {"hooks on for good": lambda: set_packing_hooks(model, True),
                              "hooks off between calls": lambda: set_packing_hooks(model, False)})
    set_packing_hooks(model, False)


def mask_built_and_spared(model: torch.nn.Module, call, new_cache, label: str) -> None:
    """generate's decode mask built every step (the model's prepare_inputs_for_generation wrapped as
    before 2026-12-06: the cache's bookkeeping only; a compiled step then takes a 4-D mask and
    compiles once more, an eager one builds it and reads it back) and spared (as shipped,
    ``generate_hook``), five calls each, each state on its own reset cache."""
    name = "prepare_inputs_for_generation"
    shipped = model.__dict__[name]
    method = getattr(type(model), name)
    # functools.wraps: generate reads the signature to pick the kwargs it passes.
    before = functools.wraps(shipped)(lambda *args, **kwargs: generate_hook.prepare_tca_step(
        method(model, *args, **kwargs)))
    states = {"decode mask built": lambda: setattr(model, name, before),
              "decode mask spared": lambda: setattr(model, name, shipped)}
    alternating(call, label, states, rounds=5, caches={state: new_cache() for state in states})
    setattr(model, name, shipped)


def guard_stances(call, new_cache, tokens, label: str) -> None:
    """Dynamo's guards evaluated before every compiled step (the default) and only those that tell
    compiled entries apart (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``), five calls
    each, alternating, each state on its own reset cache; then one call each from a reset cache, whose
    greedy tokens must be equal (``tokens``: the last call's output)."""
    states = {"guards evaluated": lambda: torch.compiler.set_stance("default"),
              "skip_guard_eval_unsafe": lambda: torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)}
    caches = {state: new_cache() for state in states}
    alternating(call, label, states, rounds=5, caches=caches)
    outs = []
    for name, enter in states.items():
        enter()
        caches[name].reset()
        call(129, caches[name])
        outs.append(tokens().clone())
    torch.compiler.set_stance("default")
    print(f"== {label}: tokens of the two states {'equal' if torch.equal(*outs) else 'DIFFERENT'}", flush=True)


def many_requests(call, new_cache, count: int, label: str) -> None:
    """Steady decode steps of ``count`` short requests in a row, each with a new cache (new buffers:
    its CUDA graphs are recorded anew, and each step first checks the graphs of the requests before),
    then ``count`` more through one cache reset between requests (its buffers are refilled in place:
    the graphs of the first of them replay), and PyTorch's count of CUDA-graph skips on the way."""
    from torch._dynamo.utils import counters

    for reused in (False, True):
        cache = None
        for r in range(count):
            if reused:
                cache = cache if cache is not None else new_cache()
                cache.reset()
            _, steps = call(17, cache)
            if r < 3 or (r + 1) % 16 == 0 or r == count - 1:
                how = "one cache, reset" if reused else "a new cache each"
                print(f"== {label}, {how}, request {r + 1}: first step {steps[0]:.1f} ms, steps 5-16 median "
                      f"{statistics.median(steps[4:]):.3f} ms; CUDA-graph skips so far: "
                      f"{counters['inductor']['cudagraph_skips']}", flush=True)


def one_bucket(call, make_cache, count: int, length: int, config: TCAConfig, vocab: int, device: torch.device,
               label: str) -> None:
    """``count`` prompts of distinct lengths at or below ``length`` whose global regions share one size
    bucket (8 a doubling), first each with a new cache of a layout per length (``size_buckets=0``: new
    sizes, so each request records the step's graphs), then through one cache of bucketed layouts reset
    between requests (one layout: the graphs of the first replay for the others). Two untimed calls at
    lengths of two other buckets first compile the step with its sizes symbolic."""
    from tca_flex.layout import bucket_blocks, global_blocks

    def bucket(n: int) -> int:
        return bucket_blocks(global_blocks(n, config.window, config.block_size), 8)

    lengths = [n for n in range(length, length - 128 * count * 4, -61) if bucket(n) == bucket(length)][:count]
    others = [n for n in range(lengths[-1] - 1, config.window + 1, -61) if bucket(n) != bucket(length)][:1]
    others.append(next(n for n in range(others[0], config.window + 1, -61) if bucket(n) < bucket(others[0])))
    gen = torch.Generator(device=device).manual_seed(0)

    def prompt(n: int) -> torch.Tensor:
        return torch.randint(1, vocab, (1, n), device=device, generator=gen)

    for n in others:
        t0 = time.perf_counter()
        call(17, make_cache(0), prompt(n))
        print(f"untimed call of {n} tokens (compiles): {time.perf_counter() - t0:.1f} s", flush=True)
    reused = make_cache(8)
    for buckets in (0, 8):
        for n in lengths:
            if buckets:
                reused.reset()
            total, steps = call(17, reused if buckets else make_cache(0), prompt(n))
            how = "one cache, 8 buckets a doubling, reset" if buckets else "a new cache each, a layout per length"
            print(f"== {label}, {how}, {n} tokens: call {total:.1f} ms, first step {steps[0]:.1f} ms, steps 5-16 "
                  f"median {statistics.median(steps[4:]):.3f} ms", flush=True)


class Stamps:
    """A logits processor that records the host time at each call and leaves the scores alone."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def main() -> None:
    from transformers import LogitsProcessorList

    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    length = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    keep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.25
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = device.type == "cpu"  # tiny shapes: a check of the script itself
    longest = 257
    model = llama_8b_shaped(layers, device, torch.bfloat16 if not smoke else torch.float32, smoke,
                            length + longest + 64)
    config = TCAConfig(block_size=128, window=4096) if not smoke else TCAConfig(block_size=32, window=64)
    apply(model, budgets=HeadBudgets.uniform(layers, model.config.num_key_value_heads, keep, config))
    ids = torch.randint(1, model.config.vocab_size, (1, length), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    eager = os.environ.get("TCA_PROBE_EAGER") == "1"

    def new_cache(size_buckets: int | None = None) -> TCACache:
        # Without reserve_tokens a TCACache is not compileable: generate decodes eagerly.
        return TCACache(model, reserve_tokens=0 if eager else longest + 16, size_buckets=size_buckets)

    last: dict[str, torch.Tensor] = {}

    def call(new: int, cache: TCACache | None = None, prompt: torch.Tensor | None = None) -> tuple[float, list[float]]:
        stamps = Stamps()
        cache = cache if cache is not None else new_cache()
        prompt = ids if prompt is None else prompt
        sync()
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([stamps]),
                             compile_config=generate_compile_config(device), **cache_kwargs(model, cache))
        sync()
        total = (time.perf_counter() - start) * 1e3
        assert out.shape[1] == prompt.shape[1] + new
        last["out"] = out
        # stamps[0] ends the prefill; stamps[i] - stamps[i-1] is decode step i (its forward and sampling).
        steps = [(b - a) * 1e3 for a, b in itertools.pairwise(stamps.times)]
        return total, steps

    if os.environ.get("TCA_PROBE_HOOKS") == "1":
        hooks_on_and_off(model, call, f"{layers} layers, {length} tokens, keep {keep}")
        remove(model)
        return
    if os.environ.get("TCA_PROBE_MASK") == "1":
        mask_built_and_spared(model, call, new_cache, f"{layers} layers, {length} tokens, keep {keep}")
        remove(model)
        return
    if os.environ.get("TCA_PROBE_STANCE") == "1":
        guard_stances(call, new_cache, lambda: last["out"], f"{layers} layers, {length} tokens, keep {keep}")
        remove(model)
        return
    if os.environ.get("TCA_PROBE_BUCKETS"):
        one_bucket(call, new_cache, int(os.environ["TCA_PROBE_BUCKETS"]), length, config, model.config.vocab_size,
                   device, f"{layers} layers")
        remove(model)
        return
    if os.environ.get("TCA_PROBE_REQUESTS"):
        many_requests(call, new_cache, int(os.environ["TCA_PROBE_REQUESTS"]), f"{layers} layers, {length} tokens")
        remove(model)
        return
    t0 = time.perf_counter()
    call(longest)  # compiles (the step, and again at its second decode step)
    print(f"untimed call of {longest} tokens: {time.perf_counter() - t0:.1f} s", flush=True)
    for i, new in enumerate((129, 257, 129)):
        profile = os.environ.get("TCA_PROBE_CPROFILE") if i == 2 else None
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
        total, steps = call(new)
        if profile:
            profiler.disable()
            stats = pstats.Stats(profiler, stream=open(profile, "w"))
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(60)
        steady = steps[8:]
        print(f"== {layers} layers, {length} tokens, keep {keep}, {new} new tokens: call {total:.1f} ms; "
              f"decode steps 1-8 (ms): {' '.join(f'{s:.1f}' for s in steps[:8])}; steps 9-{len(steps)}: median "
              f"{statistics.median(steady):.3f}, mean {statistics.fmean(steady):.3f}, max {max(steady):.2f}; "
              f"sum of all decode steps {sum(steps):.1f} ms", flush=True)
    remove(model)


if __name__ == "__main__":
    main()
