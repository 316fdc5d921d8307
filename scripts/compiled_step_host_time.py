"""Host time of a compiled decode step outside its graph (Dynamo's guards, the frame, side effects):
TCA's ``TCACache`` step against dense's ``StaticCache`` step, on the CPU with tiny shapes.

    PYTHONPATH=. python scripts/compiled_step_host_time.py [LAYERS]    # default 32
    PYTHONPATH=. python scripts/compiled_step_host_time.py [LAYERS] --hooks
    PYTHONPATH=. python scripts/compiled_step_host_time.py [LAYERS] --guards

The model is compiled with a backend that runs the traced graph as it is and times it; a step's
time minus its graph's is what the host spends around the graph at every step, which a replayed
CUDA graph does not hide (``generate`` synchronises every step). TCA's step is prepared as
``generate`` prepares it (``TCACache.prepare_decode_step``) and gets its positions as a tensor.
``--hooks``: TCA's steps only, compiled and eager, with the padded prefill's packing hooks on for
good (as before 2026-12-05) and off between calls (as shipped since), alternating.
``--guards``: both steps in one process, a step of each in turn, timing Dynamo's guard check of
the compiled frame on the step's inputs just before the step (cold: the last step ran in between,
as in a decode loop) and, at the end, 400 times back to back (hot).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import orig_code_map
from transformers import StaticCache

from tca_flex import TCACache, apply
from tca_flex.bench_models import llama_8b_shaped
from tca_flex.budgets import HeadBudgets
from tca_flex.config import TCAConfig
from tca_flex.hfcompat import cache_kwargs


def set_packing_hooks(model: torch.nn.Module, on: bool) -> None:
    """Put the padded prefill's packing hooks on for good (``on``), as ``apply`` did before 2026-12-05,
    or back to on-only-while-packing. Before a compile: PyTorch does not guard on hooks added after."""
    unpadder = model._tca_flex_state["unpadder"]
    detach = type(unpadder)._detach.__get__(unpadder)
    unpadder._detach = (lambda: None) if on else detach
    detach()
    if on:
        unpadder._attach()


def model_and_cache(layers: int, tca: bool, steps: int, prompt_length: int) -> tuple[torch.nn.Module, Any]:
    """A tiny-shape model (TCA applied, 25% + window, or dense) and a cache with room for the steps."""
    torch.manual_seed(0)
    model = llama_8b_shaped(layers, torch.device("cpu"), torch.float32, True, 1024)
    if not tca:
        return model, StaticCache(config=model.config, max_cache_len=prompt_length + steps + 24)
    config = TCAConfig(block_size=32, window=64)
    apply(model, budgets=HeadBudgets.uniform(layers, model.config.num_key_value_heads, 0.25, config))
    return model, TCACache(model, reserve_tokens=steps + 24)


@torch.no_grad()
def host_time(layers: int, tca: bool, steps: int = 40, prompt_length: int = 300, hooks_on: bool = False,
              compiled: bool = True) -> tuple[float, float]:
    """Median milliseconds of a decode step and of its compiled graph alone (0 when eager)."""
    model, cache = model_and_cache(layers, tca, steps, prompt_length)
    if tca:
        set_packing_hooks(model, hooks_on)
    inside: list[float] = []

    def backend(gm, example_inputs):
        def run(*args):
            start = time.perf_counter()
            out = gm(*args)
            inside.append(time.perf_counter() - start)
            return out
        return run

    step = torch.compile(model, backend=backend, fullgraph=True) if compiled else model
    model(torch.randint(1, 256, (1, prompt_length)), **cache_kwargs(model, cache))  # the prefill, eager
    total = []
    for i in range(steps):
        position = prompt_length + i
        kwargs = dict(position_ids=torch.full((1, 1), position))
        if tca:
            cache.prepare_decode_step()
        else:
            kwargs["cache_position"] = torch.tensor([position])
        start = time.perf_counter()
        step(torch.randint(1, 256, (1, 1)), **kwargs, **cache_kwargs(model, cache))
        total.append(time.perf_counter() - start)
    torch._dynamo.reset()
    warm = slice(5, None)  # the first calls compile
    return statistics.median(total[warm]) * 1e3, statistics.median(inside[warm]) * 1e3 if compiled else 0.0


class GuardedStep:
    """A model's decode step compiled with a backend that runs the traced graph as it is, and the
    guard check of the compiled frame (``guard_ms``) on the inputs of the step about to run."""

    def __init__(self, layers: int, tca: bool, steps: int, prompt_length: int = 300) -> None:
        self.model, self.cache = model_and_cache(layers, tca, steps, prompt_length)
        self.tca, self.position, self.code = tca, prompt_length, None

        def backend(gm, example_inputs):
            def run(*args):
                if self.code is None:  # the first run: up the stack to the compiled frame's transformed code
                    frame = sys._getframe(1)
                    while frame.f_code not in orig_code_map:
                        frame = frame.f_back
                    self.code = orig_code_map[frame.f_code]
                return gm(*args)
            return run

        self.step = torch.compile(self.model, backend=backend, fullgraph=True)
        self.model(torch.randint(1, 256, (1, prompt_length)), **cache_kwargs(self.model, self.cache))

    def inputs(self) -> tuple[tuple, dict]:
        kwargs = dict(position_ids=torch.full((1, 1), self.position))
        if self.tca:
            self.cache.prepare_decode_step()
        else:
            kwargs["cache_position"] = torch.tensor([self.position])
        return (torch.randint(1, 256, (1, 1)),), {**kwargs, **cache_kwargs(self.model, self.cache)}

    def guard_ms(self, args: tuple, kwargs: dict) -> float:
        """Milliseconds of one check of the most recent compiled entry's guards (asserted to pass)."""
        # The frame's locals on entry: TCA's is apply's forward wrapper (self, args, kwargs and its
        # closure), dense's transformers' decorated forward (args, kwargs and its closure).
        method = self.model.forward.__func__ if self.tca else type(self.model).forward
        local = {"self": self.model, "args": args} if self.tca else {"args": (self.model, *args)}
        local["kwargs"] = kwargs
        local.update(zip(method.__code__.co_freevars, (c.cell_contents for c in method.__closure__ or ()), strict=True))
        guards = _debug_get_cache_entry_list(self.code)[0].guard_manager
        start = time.perf_counter()
        passed = guards.check(local)
        elapsed = time.perf_counter() - start
        assert passed, guards.check_verbose(local).verbose_code_parts
        return elapsed * 1e3

    def __call__(self, args: tuple, kwargs: dict) -> None:
        self.step(*args, **kwargs)
        self.position += 1


@torch.no_grad()
def guard_times(layers: int, steps: int = 60, skip: int = 8) -> None:
    """Cold and hot guard checks of TCA's and dense's compiled steps, a step of each in turn."""
    runs = [GuardedStep(layers, tca, steps) for tca in (True, False)]
    cold: list[list[float]] = [[], []]
    for i in range(steps):
        for run, times in zip(runs, cold, strict=True):
            args, kwargs = run.inputs()
            if i >= skip:  # the first steps compile
                times.append(run.guard_ms(args, kwargs))
            run(args, kwargs)
    for run, times in zip(runs, cold, strict=True):
        args, kwargs = run.inputs()
        hot = [run.guard_ms(args, kwargs) for _ in range(400)]
        print(f"{'TCA, TCACache' if run.tca else 'dense, StaticCache'}, {layers} layers: guard check before a step "
              f"{statistics.median(times):.3f} ms (median of {len(times)}), back to back {statistics.median(hot):.3f} "
              f"ms (min {min(hot):.3f})", flush=True)


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 32
    if "--hooks" in sys.argv:
        for _ in range(2):
            for on in (True, False):
                step, graph = host_time(layers, True, hooks_on=on)
                eager, _ = host_time(layers, True, hooks_on=on, compiled=False)
                print(f"TCA, {layers} layers, packing hooks {'on for good' if on else 'off between calls'}: compiled "
                      f"step {step:.2f} ms, around the graph {step - graph:.3f} ms; eager step {eager:.2f} ms",
                      flush=True)
        return
    if "--guards" in sys.argv:
        for _ in range(2):
            guard_times(layers)
        return
    for tca in (True, False):
        step, graph = host_time(layers, tca)
        print(f"{'TCA, TCACache' if tca else 'dense, StaticCache'}, {layers} layers: step {step:.2f} ms, graph "
              f"{graph:.2f} ms, around the graph {step - graph:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
