"""Fast accuracy probe by teacher forcing on dense's own answers.

For each sample, dense attention generates its greedy answer once. Every
method then runs one prefill on the prompt and one forward over dense's answer
tokens (its decode attention, e.g. the pruned cache, with several queries at
once). ``agree``: all answer tokens up to where dense's answer holds its expected strings
are the method's argmax, i.e. greedy
decoding would reproduce dense's answer exactly (same score); ``prefix``: the
fraction of answer tokens before the first disagreement; ``dnll``: mean NLL of
dense's answer minus dense's own. Two forwards per sample instead of a decode
loop, so variants are cheap to compare on CPU.

    PYTHONPATH=. python scripts/acc_tf.py --samples 4 --variant shipped=shipped \
        --variant obs16=num_observation_queries=16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from acc_probe import variant_budgets  # noqa: E402  (scripts/ on sys.path when run as a script)

from tca_flex.attention import tca_select
from tca_flex.eval.baselines import dense_attention, keep_then_new, masked_attention, tca_keep
from tca_flex.eval.install import install_policy, kept_fraction
from tca_flex.eval.methods import Method, Prepared, build_methods, mean_keep
from tca_flex.eval.runner import SuiteConfig, greedy, make_samples
from tca_flex.models import load_smollm2


class MaskTCAPolicy:
    """TCA's selection with explicit-mask SDPA instead of FlexAttention (no compile per length).

    Same kept keys as ``tca_prefill_attention``: query ``i`` sees the global
    subset ``<= i - w`` plus ``(i - w, i]``. ``pruned``: decode over the kept
    set (the pruned cache); else over the full cache.
    """

    def __init__(self, config, cdf, pruned: bool):
        self.config, self.cdf, self.pruned = config, cdf, pruned

    def prefill(self, module, q, k, v, scaling):
        cfg, length = self.config, k.shape[2]
        full = torch.ones(k.shape[0], k.shape[1], length, dtype=torch.bool)
        if length <= cfg.dense_up_to:
            return dense_attention(q, k, v, scaling), full
        sel = tca_select(q, k, self.cdf, cfg, scaling)
        glob = sel.keep_mask(length)
        w = cfg.window

        def visible(q_pos):
            j = torch.arange(length)
            local = (j[None] <= q_pos[:, None]) & (j[None] > q_pos[:, None] - w)
            far = j[None] <= q_pos[:, None] - w
            return local | (far & glob[:, :, None, :])

        out = masked_attention(q, k, v, visible, scaling)
        return out, (tca_keep(sel.positions, sel.counts, length, w) if self.pruned else full)

    def decode_visible(self, keep, q_pos, k_len):
        return keep_then_new(keep, q_pos, k_len)


def mask_tca(budgets, label: str, pruned: bool) -> Method:
    def prepare(model, length):
        layers = {}

        def make(layer_idx):
            layers[layer_idx] = MaskTCAPolicy(budgets.config, budgets.cdf(layer_idx), pruned)
            return layers[layer_idx]

        return Prepared(cleanup=install_policy(model, make), kept_fraction=lambda: kept_fraction(model))

    name = f"tca[{label}]" if pruned else f"tca_prefill[{label}]"
    return Method(name, "tca", mean_keep(budgets), prepare)


@torch.no_grad()
def forced(model, ids: torch.Tensor, answer: torch.Tensor, prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax ``[T]``, NLL ``[T]``) of ``answer`` after a prefill of ``ids`` (one chunked decode forward)."""
    if prepared.on_prompt:
        prepared.on_prompt(ids.shape[1])
    cache = prepared.make_cache() if prepared.make_cache else None
    out = model(ids, past_key_values=cache, use_cache=True)
    first = out.logits[:, -1]
    length, t = ids.shape[1], answer.numel()
    pos = torch.arange(length, length + t - 1)[None]
    logits = [first]
    if t > 1:
        rest = model(answer[None, :-1], past_key_values=out.past_key_values, position_ids=pos, use_cache=True)
        logits.append(rest.logits[0])
    logits = torch.cat(logits, 0).float()
    nll = torch.nn.functional.cross_entropy(logits, answer, reduction="none")
    return logits.argmax(-1), nll


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=["passkey", "niah_single", "niah_multikey",
                                                  "niah_multivalue", "niah_multiquery"])
    p.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC")
    p.add_argument("--modes", nargs="+", default=["prefill", "pruned"])
    p.add_argument("--baselines", nargs="*", default=[])
    p.add_argument("--max-queries", type=int, default=2048)
    p.add_argument("--cache", default="/tmp/acc_budgets")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    model, tok = load_smollm2()
    samples = make_samples(tok, SuiteConfig(lengths=(args.length,), tasks=tuple(args.tasks),
                                            samples=args.samples, seed=args.seed), args.length)
    start = time.perf_counter()
    refs = []
    ref_file = Path(args.cache) / "dense_refs.json"
    stored = json.loads(ref_file.read_text()) if ref_file.is_file() else {}
    for s in samples:
        ids = torch.tensor([tok(s.prompt).input_ids])
        key = hashlib.sha256(s.prompt.encode()).hexdigest()[:16]
        if key not in stored:
            new, *_ = greedy(model, ids, s.max_new_tokens, tok.eos_token_id)
            _, nll = forced(model, ids, torch.tensor(new), Prepared(cleanup=lambda: None))
            stored[key] = {"new": new, "nll": nll.tolist()}
            ref_file.write_text(json.dumps(stored))
        new, nll = stored[key]["new"], torch.tensor(stored[key]["nll"])
        answer = torch.tensor(new)
        text = tok.decode(new, skip_special_tokens=True)
        found = [a for a in s.answers if a.lower() in text.lower()]
        # Tokens up to where dense's answer holds every expected string it holds at all:
        # agreement beyond that (the chatter after the answer) does not change the score.
        crit = len(new)
        if found:
            crit = next(t for t in range(1, len(new) + 1)
                        if all(a.lower() in tok.decode(new[:t], skip_special_tokens=True).lower() for a in found))
        refs.append((ids, answer[:crit], nll[:crit].mean().item(), len(found) == len(s.answers)))
    dense_ok = defaultdict(list)
    for s, r in zip(samples, refs, strict=True):
        dense_ok[s.task].append(r[3])
    print("dense correct: " + ", ".join(f"{t} {sum(v)}/{len(v)}" for t, v in dense_ok.items()), flush=True)
    methods = []
    for item in args.variant:
        name, _, spec = item.partition("=")
        budgets = variant_budgets(model, tok, spec, Path(args.cache), args.max_queries)
        kept = budgets.keep_fraction()
        print(f"variant {name}: mean keep {kept.mean():.3f} (min {kept.min():.3f}, max {kept.max():.3f})",
              flush=True)
        if "prefill" in args.modes:
            methods.append(mask_tca(budgets, name, pruned=False))
        if "pruned" in args.modes:
            methods.append(mask_tca(budgets, name, pruned=True))
        methods += build_methods(args.baselines, [round(mean_keep(budgets), 4)], budgets.config)
    print(f"| method | {' | '.join(args.tasks)} | agree | prefix | dnll | KV kept |")
    print("|---" * (len(args.tasks) + 5) + "|")
    for method in methods:
        prepared = method.prepare(model, args.length)
        per_task, prefix, dnll, kept = defaultdict(list), [], [], []
        try:
            for s, (ids, answer, ref_nll, _) in zip(samples, refs, strict=True):
                arg, nll = forced(model, ids, answer, prepared)
                miss = (arg != answer).nonzero()
                first = int(miss[0]) if miss.numel() else answer.numel()
                per_task[s.task].append(first == answer.numel())
                prefix.append(first / answer.numel())
                dnll.append(nll.mean().item() - ref_nll)
                kept.append(prepared.kept_fraction() or 1.0)
        finally:
            prepared.cleanup()
        cells = [f"{100 * sum(per_task[t]) / len(per_task[t]):.0f}" for t in args.tasks]
        agree = sum(sum(v) for v in per_task.values()) / len(samples)
        print(f"| {method.name} | {' | '.join(cells)} | {100 * agree:.0f} | {100 * sum(prefix) / len(prefix):.0f} "
              f"| {sum(dnll) / len(dnll):.3f} | {sum(kept) / len(kept):.3f} |", flush=True)
    print(f"wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
