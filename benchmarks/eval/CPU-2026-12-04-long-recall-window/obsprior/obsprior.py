"""Prototype (eval only): the default TCA prefill, then each layer's final-window blocks compressed by the
prefill's own observation-query importance (TCACacheLayer.set_prior) instead of the decode query's attention.

Run from the repository root (seed 43 here, 2026-12-04, CPU float32, one thread):

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/eval/CPU-2026-12-04-long-recall-window/obsprior/obsprior.py \
        --tasks long_recall --methods tca_obsprior --keep --budgets tca_flex/data/smollm2_budgets.json \
        --lengths 4096 --samples 1 --seed 43 --ppl-samples 0 --no-progress --out DIR

Not adopted (EVALUATION.md, "Where `long_recall`'s loss is made").
"""
import dataclasses
import functools
import sys

import torch
from transformers import AttentionInterface

from tca_flex.eval import cli, methods
from tca_flex.hfcompat import cache_kwargs, output_cache
from tca_flex.selection import importance


def _prepare(model, budgets):
    prepared = methods._real_prepare(model, budgets, conversation="append")
    cfg = budgets.config
    inner = AttentionInterface._global_mapping["tca"]
    stash = {}

    def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
        if query.shape[2] > cfg.dense_up_to:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            with torch.no_grad():
                stash[module.layer_idx] = importance(query, key, scaling, cfg.num_observation_queries,
                                                     cfg.gqa_aggregation, cfg.spread_observation_queries, cfg.window)
        return inner(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register("tca", wrapped)

    def prefill(model, input_ids, cache, tokenizer):
        stash.clear()
        out = model(input_ids, use_cache=True, **cache_kwargs(model, cache))
        filled = output_cache(out)
        if stash:
            for i, layer in enumerate(filled.layers):
                layer.set_prior(stash[i])
        return out.logits[:, -1]

    return dataclasses.replace(prepared, prefill=prefill)


methods.TCA_VARIANTS["tca_obsprior"] = _prepare
methods.FAMILIES["tca_obsprior"] = functools.partial(methods.tca_uniform, "tca_obsprior")
if __name__ == "__main__":
    cli.main(sys.argv[1:])
