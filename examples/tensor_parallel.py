"""TCA-Attention under tensor parallelism (transformers' ``tp_plan="auto"``).

Each rank holds a contiguous slice of the query and KV heads; ``tca_flex.apply``
gives it the matching slice of the full-model budgets, and selection runs per
KV head, so TCA adds no communication. CPU processes use gloo, CUDA GPUs NCCL.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py            # small random Llama
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --model PATH_OR_ID --tokens 8192

Without ``--model`` rank 0 creates a random-weight Llama (seeded; shape from the
flags), saves it to a temporary folder on this host and every rank loads it
with the TP plan. Budgets ramp from ``--keep-min`` to ``--keep-max`` across the
KV heads, so the ranks visibly hold different budgets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tca_flex
from tca_flex.hfcompat import cache_kwargs
from tca_flex.integration import applied_budgets, applied_kv_heads
from tca_flex.selection import global_region_length


def ramp_budgets(num_layers: int, num_kv_heads: int, lo: float, hi: float,
                 config: tca_flex.TCAConfig) -> tca_flex.HeadBudgets:
    """Full-model budgets whose keep fraction grows linearly with the KV head index."""
    fractions = torch.linspace(lo, hi, num_kv_heads).tolist()
    rows = [tca_flex.HeadBudgets.uniform(num_layers, 1, f, config).probs for f in fractions]
    return tca_flex.HeadBudgets(probs=torch.cat(rows, dim=1), config=config)


def tp_plan_kwargs() -> dict:
    """``from_pretrained`` kwargs for the model's own TP plan (newer transformers: DistributedConfig)."""
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def random_model_dir(args: argparse.Namespace) -> str:
    """Rank 0 saves a seeded random Llama; every rank gets the folder's path."""
    path = [None]
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                             intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             max_position_embeddings=max(4096, 2 * args.tokens))
        path[0] = tempfile.mkdtemp(prefix="tca_tp_model_")
        LlamaForCausalLM(config).save_pretrained(path[0])
    dist.broadcast_object_list(path, src=0)
    return path[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="transformers model path or id (default: a random Llama)")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--keep-min", type=float, default=0.05, help="keep fraction of the first KV head")
    parser.add_argument("--keep-max", type=float, default=0.5, help="keep fraction of the last KV head")
    parser.add_argument("--layers", type=int, default=2, help="random model: layers")
    parser.add_argument("--hidden", type=int, default=256, help="random model: hidden size")
    parser.add_argument("--heads", type=int, default=8, help="random model: query heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="random model: KV heads")
    parser.add_argument("--vocab", type=int, default=1024, help="random model: vocabulary")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model_dir = args.model or random_model_dir(args)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **tp_plan_kwargs()).eval()

    cfg = model.config
    config = tca_flex.TCAConfig(block_size=args.block_size, window=args.window)
    budgets = ramp_budgets(cfg.num_hidden_layers, cfg.num_key_value_heads, args.keep_min, args.keep_max,
                           config)
    tca_flex.apply(model, budgets=budgets)

    # Every rank must feed the same tokens: the embedding input is replicated.
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    with torch.no_grad():
        # Each rank's TCACache holds its own KV heads' kept tokens (the pruned cache shards with the heads).
        model.generate(ids, max_new_tokens=2, do_sample=False,
                       **cache_kwargs(model, tca_flex.TCACache(model)))  # warm-up: compiles for this length
        dist.barrier()
        cache = tca_flex.TCACache(model)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, **cache_kwargs(model, cache))
        elapsed = time.perf_counter() - start

    first, stop = applied_kv_heads(model)
    local = applied_budgets(model)
    kept = local.keep_fraction().mean(0) * global_region_length(args.tokens, config.window)
    kept = (kept + min(args.tokens, config.window)).tolist()
    lines = [f"rank {rank}/{world}: KV heads [{first}, {stop}) of {cfg.num_key_value_heads}, "
             f"generate {elapsed:.2f} s, tokens {out[0, args.tokens:].tolist()}"]
    lines += [f"  KV head {first + i}: keeps ~{k:.0f} of {args.tokens} prompt tokens (mean over layers)"
              for i, k in enumerate(kept)]
    report = [None] * world
    dist.all_gather_object(report, "\n".join(lines))
    if rank == 0:
        print(f"{type(model).__name__} TP={world} on {'cuda' if cuda else 'cpu'}, prompt {args.tokens} "
              f"tokens, TCA block {config.block_size}, window {config.window}")
        print("\n".join(report))
        if args.model is None:
            shutil.rmtree(model_dir)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
