"""The kept-set probe of EVALUATION.md "The cache's own selection": per 4K `long_recall` seed and selection
variant, the share of the list's tokens (and of the entries' word tokens) that the `TCACache` keeps after
the prefill, averaged over (layer, KV head); bundled SmolLM2 in bf16 on the CPU, the shipped budgets, knobs
changed with `with_config` (`recon:recon=True`: `tca_recon`'s selection). The run quoted there:

    OMP_NUM_THREADS=2 PYTHONPATH=. python3 benchmarks/eval/CPU-2026-12-04-long-recall-cache-selection/kept_sets.py \
        --seeds 2 6 16 20 --variant base: --variant recon:recon=True \
        --variant spread0:spread_observation_queries=0
"""
import argparse
import ast
import warnings

import torch

from tca_flex.eval.cli import load_budgets
from tca_flex.eval.methods import _real_prepare, _recon_prepare
from tca_flex.eval.runner import _encode, prompt_budget
from tca_flex.eval.tasks import TASKS
from tca_flex.models import load_smollm2, load_smollm2_tokenizer

warnings.filterwarnings("ignore")
ap = argparse.ArgumentParser()
ap.add_argument("--seeds", type=int, nargs="+")
ap.add_argument("--variant", action="append")
ap.add_argument("--length", type=int, default=4096)
args = ap.parse_args()
model, _ = load_smollm2(dtype=torch.bfloat16, device="cpu")
tok = load_smollm2_tokenizer()
base = load_budgets("tca_flex/data/smollm2_budgets.json")
variants = {}
for v in args.variant:
    name, _, opts = v.partition(":")
    kw = {k: ast.literal_eval(x) for k, x in (o.split("=") for o in opts.split(",") if o)}
    variants[name] = kw
rows = {n: [] for n in variants}
for seed in args.seeds:
    probe = TASKS["long_recall"](tok, 64, seed)
    sample = TASKS["long_recall"](tok, prompt_budget(args.length, probe.max_new_tokens), seed)
    enc = tok(sample.prompt, return_offsets_mapping=True)
    a = sample.prompt.index(" Inventory entry 1:")
    b = sample.prompt.rindex(".", 0, sample.prompt.index("\nList all"))
    span = [i for i, (x, y) in enumerate(enc["offset_mapping"]) if x >= a and y <= b + 1]
    words_tok = []
    for w in sample.answers:
        s = sample.prompt.index(f": {w}.", a) + 2
        words_tok += [i for i, (x, y) in enumerate(enc["offset_mapping"]) if y > s and x < s + len(w)]
    ids = _encode(tok, sample.prompt, torch.device("cpu"))
    L = ids.shape[1]
    line = [f"seed {seed} L {L} list@-{L - span[0]}"]
    for name, kw in variants.items():
        recon = kw.pop("recon", False) if isinstance(kw, dict) else False
        budgets = base.with_config(**kw) if kw else base
        if recon:
            kw["recon"] = True
        p = (_recon_prepare if recon else lambda m, b: _real_prepare(m, b, "append"))(model, budgets)
        cache = p.make_cache()
        with torch.no_grad():
            if p.prefill is not None:
                p.prefill(model, ids, cache, tok)
            else:
                model(ids, past_key_values=cache, use_cache=True)
        sl, sw, tot = [], [], 0
        span_t, words_t = torch.tensor(span), torch.tensor(words_tok)
        for layer in cache.layers:
            for h in range(layer.num_heads):
                kp = layer.kept_positions(0, h)
                sl.append(torch.isin(span_t, kp).float().mean().item())
                sw.append(torch.isin(words_t, kp).float().mean().item())
                tot += len(kp)
        p.cleanup()
        n = len(sl)
        r = (sum(sl) / n, sum(sw) / n, min(sw), tot / n / L)
        rows[name].append(r)
        line.append(f"{name} list {r[0]:.3f} words {r[1]:.3f} (min {r[2]:.2f}) kv {r[3]:.3f}")
    print(" | ".join(line), flush=True)
for name, rs in rows.items():
    m = [sum(x[i] for x in rs) / len(rs) for i in range(4)]
    print(f"MEAN {name}: list {m[0]:.3f} words {m[1]:.3f} min-words {m[2]:.2f} kv {m[3]:.3f}")
