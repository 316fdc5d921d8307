"""The prototype behind `TCAConfig.cache_spread_observation_queries` (the `hyb0` runs of pool.py): the prefill
attends over the shipped selection (32 spread observers), the cache keeps a second selection at the same
budgets made with S spread observers. Runs the eval with the op patched:

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 hybrid.py S --tasks long_recall --methods tca --keep \\
        --budgets tca_flex/data/smollm2_budgets.json --lengths 4096 --samples 1 --seed SEED \\
        --ppl-samples 0 --dtype bfloat16 --no-progress --out DIR
"""

import sys

import tca_flex.attention as A
from tca_flex.eval.cli import main

S = int(sys.argv[1])
orig = A.prefill_attention_op


def patched(q, k, v, cdf, config_json, scaling, pads=None):
    out, positions, counts = orig(q, k, v, cdf, config_json, scaling, pads)
    assert pads is None or not any(pads.tolist())
    config = A._config_from_json(config_json)
    sel = A.tca_select(q, k, cdf, config.replace(spread_observation_queries=S), scaling)
    return out, sel.positions[..., :q.shape[2] - config.window].contiguous(), sel.counts


A.prefill_attention_op = patched
main(sys.argv[2:])
