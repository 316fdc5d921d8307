"""A left-padded batch of prompts of different lengths through ``generate``, TCA vs dense.

The bundled SmolLM2-135M-Instruct answers passkey prompts of different lengths
in one batch, the way a server batches requests: the tokenizer pads on the
left and ``generate`` gets the ``attention_mask``. TCA runs the batch over one
``TCACache`` (each row selects, keeps and compresses on its own tokens; the
padding is computed on nowhere) and each row again alone; the script prints
every row's answer from dense and from TCA batched, whether the batched tokens
equal the row's tokens alone, and the batch's KV bytes against dense's.

    python examples/batch_generate.py [--tokens 1500 2600 3700 5000] [--new 8]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import tca_flex
from tca_flex.eval.tasks import passkey, score
from tca_flex.hfcompat import cache_kwargs
from tca_flex.models import load_smollm2


@torch.no_grad()
def generate(model, tok, prompts: list[str], new: int, cache=None) -> tuple[list[list[int]], float]:
    """Greedy new tokens per prompt (one left-padded batch) and the seconds it took."""
    batch = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id,
                         **cache_kwargs(model, cache))
    return out[:, batch.input_ids.shape[1]:].tolist(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1500, 2600, 3700, 5000],
                        help="prompt lengths in tokens, one row each")
    parser.add_argument("--new", type=int, default=8, help="new tokens per row")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_smollm2(device=device)
    tok.padding_side = "left"  # the only padding TCA can honour (right padding is refused with a message)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    samples = [passkey(tok, n, seed=i) for i, n in enumerate(args.tokens)]
    prompts = [s.prompt for s in samples]

    dense, dense_s = generate(model, tok, prompts, args.new)
    tca_flex.apply(model)  # the shipped SmolLM2 budgets (a message says so)
    generate(model, tok, prompts[:1], 1, tca_flex.TCACache(model))  # warm-up: compiles once for every length
    cache = tca_flex.TCACache(model)
    batched, tca_s = generate(model, tok, prompts, args.new, cache)
    alone = [generate(model, tok, [p], args.new, tca_flex.TCACache(model))[0][0] for p in prompts]

    print(f"\nSmolLM2-135M-Instruct on {device}: {len(prompts)} passkey prompts in one left-padded batch")
    print(f"{'tokens':>6} {'key':>6} | {'dense':<12} ok | {'TCA, batched':<12} ok | batched == alone")
    for s, d, b, a in zip(samples, dense, batched, alone, strict=True):
        texts = [" ".join(tok.decode(t, skip_special_tokens=True).split()) for t in (d, b)]
        n = len(tok(s.prompt).input_ids)
        print(f"{n:>6} {s.answers[0]:>6} | {texts[0][:12]:<12} {'y' if score(texts[0], s) else 'n':>2} | "
              f"{texts[1][:12]:<12} {'y' if score(texts[1], s) else 'n':>2} | {'yes' if b == a else 'NO'}")
    total = cache.memory_report().total
    print(f"batch time: dense {dense_s:.1f} s, TCA {tca_s:.1f} s (one run each on this machine, not a benchmark)")
    print(f"KV of the batch: {total.kept_fraction:.0%} of the tokens kept; {total.bytes_used / 2**20:.1f} MiB of "
          f"buffers vs {total.dense_bytes / 2**20:.1f} MiB dense ({total.bytes_fraction:.0%}: the rest is room to grow "
          f"during decode and slot indices, a larger share at short prompts)")
    tca_flex.remove(model)


if __name__ == "__main__":
    main()
