"""The Triton decode kernel with and without its merge as a programmatic dependent launch.

    PYTHONPATH=. python scripts/gpu_decode_pdl.py

Over the decode sweep's TCACache layers (32K and 128K tokens, 39% and 15% kept), each setting
twice, alternating: microseconds of ``triton_decode.launch`` replayed from a CUDA graph, and the
largest error of its output and log-sum-exp against the "math" backend.
"""

import torch

from tca_flex import bench
from tca_flex import triton_decode as td
from tca_flex.config import TCAConfig
from tca_flex.decode import decode_attention


def main() -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    print("pdl_supported", td.pdl_supported(device), flush=True)
    for length in (32768, 131072):
        for target in (0.39, 0.15):
            layer = bench.build_cache_layer(length, 32, 8, 128, bench.head_fractions(target, length, 4096, 8),
                                            TCAConfig(block_size=128, window=4096), dtype, device)
            q = torch.randn(1, 32, 1, 128, device=device, dtype=dtype)
            seg = layer.segments
            live = (layer.var_len, layer.next_pos, layer.base, layer.ring)
            ref, ref_lse = decode_attention(q, layer.k_buf, layer.v_buf, layer.owner, group=4, scale=128 ** -0.5,
                                            backend="math")

            def launch(q=q, layer=layer, seg=seg, live=live):
                return td.launch(q[:, :, 0], layer.k_buf, layer.v_buf, layer.owner, seg.start, seg.length,
                                 seg.max_length, 128 ** -0.5, total_slots=seg.total_length, live=live)

            res = []
            for pdl in (False, True, False, True):
                td.PDL = pdl
                out, lse = launch()
                err = float((out.float() - ref[:, :, 0].float()).abs().max())
                lerr = float((lse - ref_lse.float()).abs().max())
                res.append(f"pdl={pdl}: {bench.graph_timed(launch, device):.1f} us (err {err:.1e}, lse {lerr:.1e})")
            print(f"{length} {target:.0%}: " + "; ".join(res), flush=True)
    td.PDL = None


if __name__ == "__main__":
    main()
