"""On the GPU: ``generate`` over a ``TCACache`` made without ``reserve_tokens`` (decoded eagerly) says so
once per cache (tca_flex/generate_hook.py; the CPU test patches the device check).

    PYTHONPATH=. python scripts/gpu_eager_hint_check.py

2 layers of LLaMA-3.1-8B shapes, random bf16 weights, an 8K prompt: two caches, two calls each; prints
the warnings each call raised and the tokens (the second cache's equal the first's).
"""

import warnings

import torch

from tca_flex import TCACache, apply
from tca_flex.bench_models import llama_8b_shaped
from tca_flex.budgets import HeadBudgets
from tca_flex.config import TCAConfig


@torch.no_grad()
def main() -> None:
    device = torch.device("cuda")
    model = llama_8b_shaped(2, device, torch.bfloat16, False, 8192 + 64)
    config = TCAConfig(block_size=128, window=4096)
    apply(model, budgets=HeadBudgets.uniform(2, model.config.num_key_value_heads, 0.25, config))
    ids = torch.randint(1, model.config.vocab_size, (1, 8192), device=device)
    tokens = []
    for name in ("first cache", "second cache"):
        cache = TCACache(model)
        prompt = ids
        for call in (1, 2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                                     max_new_tokens=6, do_sample=False, pad_token_id=0)
            prompt = out
            hints = [str(w.message) for w in caught if "decodes this TCACache eagerly" in str(w.message)]
            print(f"{name}, call {call}: {len(hints)} eager-decode warning(s) of {len(caught)}; new tokens "
                  f"{out[0, -6:].tolist()}", flush=True)
            if hints and name == "first cache" and call == 1:
                print(f"  text: {hints[0]}", flush=True)
            for other in sorted({str(w.message)[:120] for w in caught if str(w.message) not in hints}):
                print(f"  other: {other}", flush=True)
            tokens.append(out[0, -6:].tolist())
    print("second cache's tokens equal the first's:", tokens[0] == tokens[2] and tokens[1] == tokens[3], flush=True)


if __name__ == "__main__":
    main()
