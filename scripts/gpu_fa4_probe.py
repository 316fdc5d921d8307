"""Does FlexAttention's FLASH (FlashAttention-4, CuTe-DSL) backend run TCA's packed prefill?

Run on the GPU machine after installing the flash-attn-4 wheels (scripts/gpu_fa4.sh).
Each probe runs on its own and records what works, what fails and the error, and
where it runs, its time and its agreement with the Triton backend on the same
BlockMask. Mask functions tried (the packed layout of ``masks.py``):

- ``shipped``: ``masks.tca_mask_mod`` as the library builds it;
- ``where_index``: the packed index clamped with ``torch.where`` (no min/max; ``masks.capacity_mask_mod``);
- ``keypos``: one position table for packed and local keys, only compares,
  ``&`` and ``|`` (no clamp, no where).

    python scripts/gpu_fa4_probe.py --out $OUT/fa4_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from tca_flex.attention import tca_prefill_attention, tca_select
from tca_flex.bench import causal_block_mask, timed
from tca_flex.budgets import HeadBudgets
from tca_flex.config import TCAConfig
from tca_flex.masks import KERNEL_BLOCK, capacity_mask_mod, tca_block_indices, tca_mask_mod
from tca_flex.selection import observed_queries

FLASH = {"BACKEND": "FLASH"}
TRITON = {"USE_TMA": True}


def short_error(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return "".join(lines).strip()[-1500:]


def keypos_mask(positions: torch.Tensor, capacity: int, window: int, group: int, seq_len: int):
    local = torch.arange(seq_len, device=positions.device).expand(*positions.shape[:2], seq_len)
    keypos = torch.cat([positions, local], dim=-1).contiguous()

    def mask(b, h, q_idx, kv_idx):
        p = keypos[b, h // group, kv_idx]
        packed = (kv_idx < capacity) & (p <= q_idx - window)
        local = (kv_idx >= capacity) & (p <= q_idx) & (p > q_idx - window)
        return packed | local
    return mask


def packed_inputs(length: int, frac: float, window: int, device, dtype, hq=32, hkv=8, d=128):
    gen = torch.Generator(device=device).manual_seed(length)
    q, k, v = (torch.randn(1, h, length, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
    config = TCAConfig(block_size=128, window=window)
    cdf = HeadBudgets.uniform(1, hkv, frac, config).cdf(0).to(device)
    scale = d ** -0.5
    q_obs = observed_queries(q, config.num_observation_queries, config.spread_observation_queries, window)
    sel = tca_select(q_obs, k.contiguous(), cdf, config, scale, observed=True)
    positions = sel.positions
    idx = positions.clamp(max=length - 1).unsqueeze(-1).expand(-1, -1, -1, d)
    k_all = torch.cat([k.gather(2, idx), k], 2).contiguous()
    v_all = torch.cat([v.gather(2, idx), v], 2).contiguous()
    return q, k, v, cdf, config, scale, positions, k_all, v_all


def block_mask_with(positions, length, window, hq, mask_mod) -> BlockMask:
    capacity = positions.shape[2]
    return BlockMask.from_kv_blocks(*tca_block_indices(positions, length, window, hq), BLOCK_SIZE=KERNEL_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(length, capacity + length),
                                    compute_q_blocks=False)


_compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)


def run_flex(q, k, v, bm, scale, options, return_lse=False):
    return _compiled(q, k, v, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=options,
                     return_lse=return_lse)


OUT: Path | None = None


def save(results: list) -> None:
    if OUT is not None:  # after every probe: a run cut short keeps what it measured
        OUT.write_text(json.dumps(results, indent=1))


def probe(name: str, fn, results: list) -> object:
    t0 = time.perf_counter()
    try:
        value = fn()
        results.append({"probe": name, "ok": True, "s": round(time.perf_counter() - t0, 2),
                        **(value if isinstance(value, dict) else {})})
        print(f"[ok] {name}: {results[-1]}", flush=True)
        save(results)
        return value
    except Exception as exc:  # noqa: BLE001 - a probe records every failure
        results.append({"probe": name, "ok": False, "s": round(time.perf_counter() - t0, 2),
                        "error": short_error(exc)})
        print(f"[FAIL] {name}: {short_error(exc)}", flush=True)
        save(results)
        return None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--fracs", type=float, nargs="+", default=[0.25, 0.10])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sections", nargs="+", default=["basic", "packed", "library"],
                        choices=["basic", "packed", "library"])
    parser.add_argument("--library-lengths", type=int, nargs="+", default=[20000, 32768, 50001, 131072])
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64  # every probe compiles its own graphs
    global OUT
    OUT = args.out
    device, dtype = torch.device("cuda"), torch.bfloat16
    results: list = [{"torch": torch.__version__, "device": torch.cuda.get_device_name(), "date": time.strftime("%F")}]

    def imports():
        import cutlass  # noqa: F401
        import cutlass.cute  # noqa: F401
        import flash_attn.cute  # noqa: F401
        return {}
    probe("import flash_attn.cute + cutlass.cute", imports, results)

    # 1. Plain causal, GQA, with and without the log-sum-exp.
    for length in (8192, 32768) if "basic" in args.sections else ():
        gen = torch.Generator(device=device).manual_seed(1)
        q, k, v = (torch.randn(1, h, length, 128, device=device, dtype=dtype, generator=gen) for h in (32, 8, 8))
        cbm = causal_block_mask(length, device)

        def causal(q=q, k=k, v=v, cbm=cbm, length=length):
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out = run_flex(q, k, v, cbm, 128 ** -0.5, FLASH)
            flops = 4 * 32 * 128 * length * (length + 1) / 2
            ms_flash = timed(lambda: run_flex(q, k, v, cbm, 128 ** -0.5, FLASH), device)
            ms_triton = timed(lambda: run_flex(q, k, v, cbm, 128 ** -0.5, TRITON), device)
            ms_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), device)
            return {"length": length, "rel_err_vs_sdpa": rel(out, ref), "ms_flash": ms_flash, "ms_triton": ms_triton,
                    "ms_cudnn": ms_sdpa, "tflops_flash": flops / ms_flash / 1e9,
                    "tflops_triton": flops / ms_triton / 1e9}
        probe(f"causal FLASH L={length}", causal, results)

    def causal_lse():
        length = 8192
        q, k, v = (torch.randn(1, h, length, 128, device=device, dtype=dtype) for h in (32, 8, 8))
        cbm = causal_block_mask(length, device)
        out, lse = run_flex(q, k, v, cbm, 128 ** -0.5, FLASH, return_lse=True)
        out_t, lse_t = run_flex(q, k, v, cbm, 128 ** -0.5, TRITON, return_lse=True)
        return {"rel_err_out": rel(out, out_t), "max_lse_diff": float((lse.float() - lse_t.float()).abs().max())}
    if "basic" in args.sections:
        probe("causal FLASH return_lse", causal_lse, results)

    # 2. The packed TCA layout with each mask function, static shapes.
    for length in args.lengths if "packed" in args.sections else ():
        for frac in args.fracs:
            q, k, v, cdf, config, scale, positions, k_all, v_all = packed_inputs(length, frac, args.window, device,
                                                                                 dtype)
            cap, group = positions.shape[2], 4
            mods = {
                "shipped": tca_mask_mod(positions, length, args.window, group),
                "where_index": capacity_mask_mod(positions, args.window, group),
                "keypos": keypos_mask(positions, cap, args.window, group, length),
            }
            ref_bm = block_mask_with(positions, length, args.window, 32, mods["shipped"])
            ref = run_flex(q, k_all, v_all, ref_bm, scale, TRITON)
            blocks = int(ref_bm.kv_num_blocks.sum() + ref_bm.full_kv_num_blocks.sum())
            flops = blocks * KERNEL_BLOCK * KERNEL_BLOCK * 128 * 4
            ms_triton = timed(lambda q=q, k_all=k_all, v_all=v_all, ref_bm=ref_bm, scale=scale:
                              run_flex(q, k_all, v_all, ref_bm, scale, TRITON), device)
            ms_cudnn = timed(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               enable_gqa=True), device)
            results.append({"probe": f"packed triton L={length} frac={frac}", "ok": True, "ms_triton": ms_triton,
                            "ms_cudnn": ms_cudnn, "tflops_triton": flops / ms_triton / 1e9, "computed_blocks": blocks})
            print(results[-1], flush=True)
            for name, mod in mods.items():
                def packed(mod=mod, q=q, k_all=k_all, v_all=v_all, positions=positions, length=length, scale=scale,
                           ref=ref, ms_cudnn=ms_cudnn, flops=flops, frac=frac):
                    bm = block_mask_with(positions, length, args.window, 32, mod)
                    out = run_flex(q, k_all, v_all, bm, scale, FLASH)
                    ms = timed(lambda: run_flex(q, k_all, v_all, bm, scale, FLASH), device)
                    return {"length": length, "frac": frac, "rel_err_vs_triton": rel(out, ref), "ms_flash": ms,
                            "attention_speedup_vs_cudnn": ms_cudnn / ms, "tflops_flash": flops / ms / 1e9}
                probe(f"packed FLASH {name} L={length} frac={frac}", packed, results)
            del q, k, v, k_all, v_all, ref
            torch.cuda.empty_cache()

    # 3. The library's own entry point (length-generic compile) with FLASH options: one graph for
    # every length? (dynamo's unique-graph counter before and after the later lengths)
    if "library" in args.sections:
        from torch._dynamo.utils import counters
        for i, length in enumerate(args.library_lengths):
            def library_path(length=length, first=i == 0):
                q, k, v, cdf, config, scale, *_ = packed_inputs(length, 0.25, args.window, device, dtype)
                graphs = counters["stats"]["unique_graphs"]
                t0 = time.perf_counter()
                out_f = tca_prefill_attention(q, k, v, cdf, config, scale, kernel_options=FLASH)
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                new_graphs = counters["stats"]["unique_graphs"] - graphs
                out_t = tca_prefill_attention(q, k, v, cdf, config, scale, kernel_options=TRITON)
                return {"length": length, "first_call_s": first_s, "graphs_compiled": new_graphs,
                        "rel_err_vs_triton": rel(out_f, out_t),
                        "ms_flash": timed(lambda: tca_prefill_attention(q, k, v, cdf, config, scale,
                                                                        kernel_options=FLASH), device),
                        "ms_triton": timed(lambda: tca_prefill_attention(q, k, v, cdf, config, scale,
                                                                         kernel_options=TRITON), device)}
            probe(f"tca_prefill_attention FLASH (length-generic) L={length}", library_path, results)
            torch.cuda.empty_cache()

    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
