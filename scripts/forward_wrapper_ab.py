"""The padded prefill's note and let-go as a pre-hook and a hook on the model (before the sixteenth
session: under ``torch.compile(model)`` each ran as a Dynamo frame of its own at every call) against
the forward wrapper ``apply`` installs since, in a decode loop of one's own over ``torch.compile(model)``.

    PYTHONPATH=. python scripts/forward_wrapper_ab.py [LAYERS] [MODE]   # defaults 32 around

One model, one reserved ``TCACache``, switched between the two forms in alternating blocks of 20
steps (two models would differ by where their weights lie: in a first version of this A/B that
moved the result by more than the effect). Each step synchronises as a loop reading its next token
does. MODE ``around``: the graph run as traced and timed alone, the host time around it (what a
replayed CUDA graph does not hide); ``inductor``: the whole step, compiled by Inductor
(``mode="reduce-overhead"`` on CUDA). On a CPU tiny shapes; on CUDA LLaMA-3.1-8B shapes at 8K tokens.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

from tca_flex import TCACache, apply
from tca_flex.bench_models import llama_8b_shaped
from tca_flex.budgets import HeadBudgets
from tca_flex.config import TCAConfig
from tca_flex.hfcompat import cache_kwargs

BLOCKS, STEPS, SKIP = 13, 20, 2  # the first pair of blocks compiles; each block's first steps re-enter


def form_switch(model: torch.nn.Module) -> Callable[[bool], None]:
    """A function putting an applied model in the form before (True: class forward, the wrapper's two
    calls in a pre-hook and a hook on the model) or now (False: the forward wrapper)."""
    unpadder = model._tca_flex_state["unpadder"]
    wrapper = model.__dict__["forward"]
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def switch(hooks: bool) -> None:
        for handle in handles:
            handle.remove()
        handles.clear()
        if hooks:
            model.__dict__.pop("forward", None)
            handles.append(model.register_forward_pre_hook(
                lambda module, args, kwargs: unpadder._note(module, args, kwargs), with_kwargs=True))
            handles.append(model.register_forward_hook(lambda *hook_args: unpadder._done()))
        else:
            model.forward = wrapper
    return switch


@torch.no_grad()
def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    mode = sys.argv[2] if len(sys.argv) > 2 else "around"
    cuda = torch.cuda.is_available()
    device, dtype, length = ((torch.device("cuda"), torch.bfloat16, 8192) if cuda
                             else (torch.device("cpu"), torch.float32, 300))
    torch._dynamo.config.recompile_limit = 64  # both forms' frames
    torch.manual_seed(0)
    model = llama_8b_shaped(layers, device, dtype, not cuda, length + 1024)
    config = TCAConfig() if cuda else TCAConfig(block_size=32, window=64)
    apply(model, budgets=HeadBudgets.uniform(layers, model.config.num_key_value_heads, 0.25, config))
    switch = form_switch(model)
    stamps: dict[str, float] = {}

    def timed_backend(gm, example_inputs):
        def run(*args):
            stamps["in"] = time.perf_counter()
            out = gm(*args)
            if cuda:  # the traced graph runs eagerly: its kernels must end before the stamp
                torch.cuda.synchronize()
            stamps["out"] = time.perf_counter()
            return out
        return run

    if mode == "around":
        step = torch.compile(model, backend=timed_backend)
    else:
        step = torch.compile(model, mode="reduce-overhead" if cuda else None)
    cache = TCACache(model, reserve_tokens=2 * BLOCKS * STEPS + 64)
    prompt = torch.randint(1, 256, (1, length), device=device)
    new = model(prompt, **cache_kwargs(model, cache)).logits[:, -1].argmax(-1, keepdim=True)  # eager prefill
    position = length
    times: dict[bool, list[float]] = {True: [], False: []}
    for block in range(BLOCKS):
        for hooks in ((True, False) if block % 2 else (False, True)):
            switch(hooks)
            for s in range(STEPS):
                if cuda and mode != "around":
                    torch.compiler.cudagraph_mark_step_begin()
                cache.prepare_decode_step()
                start = time.perf_counter()
                out = step(new, position_ids=torch.full((1, 1), position, device=device),
                           **cache_kwargs(model, cache))
                new = out.logits[:, -1].argmax(-1, keepdim=True)
                int(new)  # a loop that reads its next token waits for the step
                end = time.perf_counter()
                if block > 0 and s >= SKIP:
                    times[hooks].append(stamps["in"] - start + end - stamps["out"] if mode == "around" else end - start)
                position += 1
    what = "around the graph" if mode == "around" else "step"
    for hooks in (True, False):
        quartiles = statistics.quantiles(times[hooks], n=4)
        form = "model pre-hook and hook" if hooks else "forward wrapper"
        print(f"TCA, {layers} layers, {length} tokens, {mode}, {form}: {what} median "
              f"{statistics.median(times[hooks]) * 1e3:.3f} ms (quartiles {quartiles[0] * 1e3:.3f}-"
              f"{quartiles[2] * 1e3:.3f}), {len(times[hooks])} steps", flush=True)
    paired = [a - b for a, b in zip(times[True], times[False], strict=True)]
    print(f"paired difference (hooks - wrapper): median {statistics.median(paired) * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
