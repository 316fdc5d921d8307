"""TCA under tensor parallelism: a tiny Llama split over 2 CPU processes (gloo).

The model is loaded with transformers' own ``tp_plan="auto"`` (q/k/v
"colwise", o "rowwise"), which runs on CPU/gloo in transformers 5.x, so each
rank holds half of the query and KV heads. Budgets differ per (layer, head),
so a rank that took the wrong slice of the budget file changes the logits.
"""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaForCausalLM

import tca_flex
from tca_flex import HeadBudgets, TCAConfig
from tca_flex.hfcompat import cache_kwargs
from tca_flex.integration import applied_budgets, applied_kv_heads, attention_modules
from tca_flex.layer import tca_layer

from .conftest import tiny_llama_config

WORLD = 2
SPARSE = TCAConfig(block_size=32, window=128)
LENGTH, NEW_TOKENS = 300, 4
PRUNED_TOKENS = 40  # through TCACache: crosses a block compression (the first at position 331)
# Tokens kept per block by each (layer, KV head): every head differs.
KEEP = [[2, 24], [16, 4]]
WORKER_TIMEOUT_S = 240


def per_head_budgets() -> HeadBudgets:
    """[2 layers, 2 KV heads] budgets, each head keeping a fixed, different count per block."""
    probs = torch.zeros(len(KEEP), len(KEEP[0]), SPARSE.block_size + 1, dtype=torch.float64)
    for layer, row in enumerate(KEEP):
        for head, keep in enumerate(row):
            probs[layer, head, keep] = 1.0
    return HeadBudgets(probs=probs, config=SPARSE)


def prompt() -> torch.Tensor:
    return torch.randint(0, 256, (1, LENGTH), generator=torch.Generator().manual_seed(0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_plan_kwargs() -> dict:
    try:
        from transformers import DistributedConfig
    except ImportError:  # older transformers take tp_plan directly
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def pruned_generate(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and every step's logits through a ``TCACache`` (each rank's holds its own KV heads)."""
    out = model.generate(prompt(), max_new_tokens=PRUNED_TOKENS, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, **cache_kwargs(model, tca_flex.TCACache(model)))
    return out.sequences, torch.stack(out.logits, 1)


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    """One TP rank: load with tp_plan="auto", apply TCA, save logits, tokens and its budget slice."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        model = LlamaForCausalLM.from_pretrained(model_dir, **tp_plan_kwargs()).eval()
        tca_flex.apply(model, budgets=per_head_budgets())
        mods = attention_modules(model)
        with torch.no_grad():
            logits = model(prompt()).logits
            tokens = model.generate(prompt(), max_new_tokens=NEW_TOKENS, do_sample=False)
            pruned = pruned_generate(model)
        torch.save({
            "logits": logits, "tokens": tokens, "kv_heads": applied_kv_heads(model), "pruned": pruned,
            "local_kv_heads": mods[0].k_proj.weight.to_local().shape[0] // mods[0].head_dim,
            "probs": applied_budgets(model).probs, "cdfs": [tca_layer(m).cdf for m in mods],
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_workers(model_dir: str, out_dir: str) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), model_dir, out_dir), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
            pytest.fail(f"tensor-parallel workers did not finish within {WORKER_TIMEOUT_S} s")


@torch.no_grad()
def test_tp2_matches_single_process_and_slices_budgets(tmp_path):
    torch.manual_seed(1234)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.save_pretrained(tmp_path / "model")
    _run_workers(str(tmp_path / "model"), str(tmp_path))

    budgets = per_head_budgets()
    tca_flex.apply(model, budgets=budgets)
    ref_logits = model(prompt()).logits
    ref_tokens = model.generate(prompt(), max_new_tokens=NEW_TOKENS, do_sample=False)
    ref_pruned = pruned_generate(model)
    tca_flex.remove(model)
    swapped = HeadBudgets(probs=budgets.probs.flip(1), config=SPARSE)
    tca_flex.apply(model, budgets=swapped)
    swapped_logits = model(prompt()).logits
    # The test can fail: ranks holding each other's budgets would give visibly different logits.
    assert (swapped_logits - ref_logits).abs().max() > 1e-2

    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["local_kv_heads"] == 1
        assert out["kv_heads"] == (rank, rank + 1)
        torch.testing.assert_close(out["probs"], budgets.probs[:, rank:rank + 1])
        for layer, cdf in enumerate(out["cdfs"]):
            torch.testing.assert_close(cdf, budgets.cdf(layer)[rank:rank + 1])
        torch.testing.assert_close(out["logits"], ref_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(out["tokens"], ref_tokens)
        assert torch.equal(out["pruned"][0], ref_pruned[0])
        torch.testing.assert_close(out["pruned"][1], ref_pruned[1], atol=1e-4, rtol=1e-4)


def test_slice_heads_and_mismatched_head_counts(tiny_llama):
    budgets = per_head_budgets()
    part = budgets.slice_heads(1, 2)
    assert part.num_kv_heads == 1 and part.config == SPARSE
    torch.testing.assert_close(part.probs, budgets.probs[:, 1:2])
    with pytest.raises(ValueError, match="out of range"):
        budgets.slice_heads(1, 3)
    with pytest.raises(ValueError, match="budgets have 4 KV heads, but the model holds 2 KV heads"):
        tca_flex.apply(tiny_llama, budgets=HeadBudgets.uniform(2, 4, 0.5, SPARSE))
    tca_flex.apply(tiny_llama, budgets=budgets)
    assert applied_kv_heads(tiny_llama) == (0, 2)
