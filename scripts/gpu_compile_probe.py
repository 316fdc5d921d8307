"""Which TCA prefill stage breaks inductor on CUDA? Compiles each stage alone (GPU diagnostic)."""
import traceback

import torch

from tca_flex import HeadBudgets, TCAConfig
from tca_flex.attention import _prefill_inputs, tca_prefill_attention
from tca_flex.masks import tca_block_mask
from tca_flex.selection import (
    block_budgets,
    budget_ladder,
    importance,
    keep_top_in_blocks,
    pack_positions,
    rank_of,
    redundancy_score,
    to_blocks,
)

dev = "cuda"
L, W, B = 32768, 4096, 128
q = torch.randn(1, 32, L, 128, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, 8, L, 128, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
cfg = TCAConfig(window=W)
cdf = HeadBudgets.uniform(1, 8, 0.25, cfg).cdf(0).to(dev)
glen = L - W
s = importance(q, k, 128 ** -0.5)
sb = to_blocks(s[..., :glen], B, 0.0)
scores = redundancy_score(sb, 0.5)
ladder = budget_ladder(cdf, sb.shape[-2])
budgets = block_budgets(scores, ladder, glen, B)
ranked = to_blocks(s[..., :glen], B, float("-inf"))
keep = keep_top_in_blocks(ranked, budgets).flatten(-2)[..., :glen]
pos, _ = pack_positions(keep, glen)

stages = {
    "importance": (lambda: importance(q, k, 128 ** -0.5)),
    "redundancy": (lambda: redundancy_score(sb, 0.5)),
    "ladder": (lambda: budget_ladder(cdf, sb.shape[-2])),
    "rank_of": (lambda: rank_of(scores)),
    "block_budgets": (lambda: block_budgets(scores, ladder, glen, B)),
    "keep_top": (lambda: keep_top_in_blocks(ranked, budgets)),
    "pack": (lambda: pack_positions(keep, glen)),
    "gather": (lambda: k.gather(2, pos.clamp(max=L - 1).unsqueeze(-1).expand(-1, -1, -1, 128))),
    "mask": (lambda: tca_block_mask(pos, L, W, 32).kv_indices),
    "prepare": (lambda: _prefill_inputs(q, k, v, cdf, cfg, 128 ** -0.5)[1]),
    "full": (lambda: tca_prefill_attention(q, k, v, cdf, cfg, 128 ** -0.5)),
}
for name, fn in stages.items():
    torch._dynamo.reset()
    try:
        torch.compile(fn, fullgraph=True)()
        print(f"PROBE {name}: ok", flush=True)
    except Exception as err:  # noqa: BLE001 - a diagnostic wants every failure
        print(f"PROBE {name}: FAIL {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
        traceback.print_exc(limit=0)
