"""Prototype (eval only): decode's block compression ranks a leaving block's tokens by a forward smear of
the current query's attention (a token inherits the largest probability of the K tokens up to it), so the
text right after the spot being read survives. CPU tensor-form compression only.

Run from the repository root (K = 32, seeds 43, 32, 45 and 34 here, 2026-12-04, CPU float32, one thread):

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/eval/CPU-2026-12-04-long-recall-window/smear/smear.py 32 \
        --tasks long_recall --methods tca_smear --keep --budgets tca_flex/data/smollm2_budgets.json \
        --lengths 4096 --samples 1 --seed 43 --ppl-samples 0 --no-progress --out DIR

Not adopted (EVALUATION.md, "Where `long_recall`'s loss is made").
"""
import dataclasses
import functools
import sys

import torch.nn.functional as F

from tca_flex import cache as cache_mod
from tca_flex.decode import block_importance
from tca_flex.eval import cli, methods

K = int(sys.argv.pop(1))


def smeared(*args, **kwargs):
    imp = block_importance(*args, **kwargs)  # [B, H_kv, b]
    b, h, t = imp.shape
    x = F.pad(imp.reshape(b * h, 1, t), (K - 1, 0), value=0.0)
    return F.max_pool1d(x, K, stride=1).reshape(b, h, t)


def _prepare(model, budgets):
    prepared = methods._real_prepare(model, budgets, conversation="append")
    cache_mod.block_importance = smeared

    def cleanup():
        cache_mod.block_importance = block_importance
        prepared.cleanup()

    return dataclasses.replace(prepared, cleanup=cleanup)


methods.TCA_VARIANTS["tca_smear"] = _prepare
methods.FAMILIES["tca_smear"] = functools.partial(methods.tca_uniform, "tca_smear")
if __name__ == "__main__":
    cli.main(sys.argv[1:])
