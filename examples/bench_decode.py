"""Per-layer decode latency: TCACache vs SDPA on the full cache vs SDPA on a compact one.

Builds one ``TCACacheLayer`` from a synthetic prefill (random K/V, the real TCA
selection, heads keeping different fractions), then times, per decode step:

- ``tca_attn``: ``decode.decode_attention`` over the head-packed kept set;
- ``tca_step``: the whole step (append + attention + compression: the fused Triton kernel on CUDA,
  branch-free tensor ops elsewhere);
- ``sdpa_full``: SDPA over the dense cache of the same logical length;
- ``sdpa_compact``: SDPA over a rectangular cache holding the mean kept length
  per head (the ideal a packed layout should approach).

    python examples/bench_decode.py --lengths 32768 65536 131072 --compile --mode reduce-overhead  # CUDA
    python examples/bench_decode.py --lengths 4096 --heads 4 1 --dim 64   # CPU smoke run
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tca_flex import TCAConfig
from tca_flex.bench import build_cache_layer, timed
from tca_flex.decode import decode_attention


def bench_one(length: int, args: argparse.Namespace, config: TCAConfig, device: torch.device,
              dtype: torch.dtype) -> str:
    hq, hkv, d = args.heads[0], args.heads[1], args.dim
    fractions = [args.keep[i % len(args.keep)] for i in range(hkv)]
    wrap = (lambda f: torch.compile(f, mode=args.mode)) if args.compile else (lambda f: f)
    layer = build_cache_layer(length, hq, hkv, d, fractions, config, dtype, device)
    mem = layer.memory()
    q = torch.randn(1, hq, 1, d, dtype=dtype, device=device)
    new = torch.randn(1, hkv, 1, d, dtype=dtype, device=device)
    full = torch.randn(1, hkv, length, d, dtype=dtype, device=device)
    compact = full[:, :, : mem.kept_tokens // hkv].contiguous()

    def attn():
        return decode_attention(q, layer.k_buf, layer.v_buf, layer.owner, group=hq // hkv, scale=d**-0.5,
                                segments=layer.segments)

    def step():
        layer.update(new, new)
        return layer.decode_step(q, d**-0.5)

    def sdpa_full():
        return F.scaled_dot_product_attention(q, full, full, enable_gqa=True)

    def sdpa_compact():
        return F.scaled_dot_product_attention(q, compact, compact, enable_gqa=True)

    # tca_flex.bench.timed gives milliseconds; the table is in microseconds.
    times = [1e3 * timed(wrap(fn), device, warmup=3, reps=args.iters) for fn in (attn, step, sdpa_full, sdpa_compact)]
    return (f"{length:>7} {mem.kept_fraction:>6.1%} {mem.bytes_used / 2**20:>9.1f} "
            f"{mem.dense_bytes / 2**20:>9.1f} {times[0]:>9.1f} {times[1]:>9.1f} {times[2]:>9.1f} "
            f"{times[3]:>12.1f}")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8],
                        help="keep fraction of each KV head (cycled over the heads)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="torch.compile the timed functions")
    parser.add_argument("--mode", default=None,
                        help="torch.compile mode; reduce-overhead = CUDA graphs (else launch cost dominates)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TCAConfig(block_size=args.block, window=min(args.window, max(args.lengths) // 2))
    print(f"{'L':>7} {'kept':>7} {'MiB kept':>9} {'MiB dense':>9} {'tca_attn':>9} {'tca_step':>9} "
          f"{'sdpa_full':>9} {'sdpa_compact':>12}  (us)")
    for length in args.lengths:
        print(bench_one(length, args, config, device, dtype), flush=True)


if __name__ == "__main__":
    main()
