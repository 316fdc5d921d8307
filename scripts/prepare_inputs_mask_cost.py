"""Host time of ``generate``'s per-step input preparation with a reserved ``TCACache``, with and
without the 2-D attention mask ``generate`` passes (CUDA: the GPU image's transformers; on a CPU,
tiny shapes, to check the script).

    PYTHONPATH=. python scripts/prepare_inputs_mask_cost.py [LENGTH]   # default 32768

For a compileable cache ``generate`` builds each decode step's attention mask in
``prepare_inputs_for_generation``, outside the compiled step, through the attention's mask function
(``tca_mask``); a ``TCACache``'s compiled decode does not read that mask (its eager decode only checks
it). This times ``prepare_inputs_for_generation`` as ``generate`` calls it for a one-token step (2-D
mask of ones over every token so far), the same through the class's method (without the wrapper
``apply`` puts on the instance, which spares such a step its mask: ``generate_hook.py``), and the call
with no mask: what building the decode mask costs the host at every token, and what the wrapper saves.
One 2-layer model with LLaMA-3.1-8B shapes (the mask does not depend on depth), prefilled once; calls
alternate between the three forms in blocks.
"""

from __future__ import annotations

import functools
import inspect
import statistics
import sys
import time

import torch

from tca_flex import TCACache, apply
from tca_flex.bench_models import llama_8b_shaped
from tca_flex.budgets import HeadBudgets
from tca_flex.config import TCAConfig
from tca_flex.hfcompat import cache_kwargs

BLOCKS, CALLS = 10, 50


@torch.no_grad()
def main() -> None:
    length = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        length = min(length, 600)
    torch.manual_seed(0)
    model = llama_8b_shaped(2, device, torch.bfloat16 if cuda else torch.float32, not cuda, length + 64)
    config = TCAConfig() if cuda else TCAConfig(block_size=32, window=64)
    apply(model, budgets=HeadBudgets.uniform(2, model.config.num_key_value_heads, 0.25, config))
    cache = TCACache(model, reserve_tokens=64)
    ids = torch.randint(1, 256, (1, length), device=device)
    model(ids, **cache_kwargs(model, cache))
    # The inputs of the first decode step, as generate passes them (the whole sequence so far).
    seq = torch.cat([ids, ids[:, :1]], 1)
    base = dict(use_cache=True, **cache_kwargs(model, cache))
    # One new token: newer transformers say so by a length, older ones by the step's cache position.
    if "next_sequence_length" in inspect.signature(model.prepare_inputs_for_generation).parameters:
        base["next_sequence_length"] = 1
    else:
        base["cache_position"] = torch.tensor([length], device=device)
    ones = dict(attention_mask=torch.ones_like(seq))
    # The class's method skips apply's wrapper, which spares a decode step over a TCACache its mask
    # (generate_hook): what generate cost before the wrapper did.
    unwrapped = functools.partial(type(model).prepare_inputs_for_generation, model)
    forms = {"2-D mask of ones (as generate)": (model.prepare_inputs_for_generation, ones),
             "2-D mask of ones, class method (no wrapper)": (unwrapped, ones),
             "no mask": (model.prepare_inputs_for_generation, {})}
    times: dict[str, list[float]] = {name: [] for name in forms}
    handed: dict[str, object] = {}
    for _ in range(BLOCKS):
        for name, (prepare, extra) in forms.items():
            for _ in range(CALLS):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                # Each call prepares the same step again: the cache takes back a prepared step that never
                # ran before preparing the next (TCACache.prepare_decode_step).
                inputs = prepare(seq, **base, **extra)
                times[name].append((time.perf_counter() - start) * 1e3)
            mask = inputs.get("attention_mask")
            handed[name] = None if mask is None else (type(mask).__name__, tuple(getattr(mask, "shape", ())))
    print(f"{device}, {length} tokens, transformers {__import__('transformers').__version__}")
    for name, values in times.items():
        print(f"prepare_inputs_for_generation, {name}: median {statistics.median(values):.3f} ms, "
              f"mean {statistics.fmean(values):.3f} ms over {len(values)} calls; mask handed to the model: "
              f"{handed[name]}")


if __name__ == "__main__":
    main()
