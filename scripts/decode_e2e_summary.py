"""Compact summary of the rows ``scripts/gpu_decode_e2e.sh`` wrote (issue 15's figures, one screen).

    python scripts/decode_e2e_summary.py OUT/*.json

End to end (ms; ``x`` = dense time / this time, above 1 is faster than dense): TTFT, then TPOT
(mean over one block of replayed steps, and the step where a block left). Per layer (us): the
decode kernel, the fused compression where a block leaves and where none does, the tensor form,
and whole steps with the fused kernel, the tensor form and no compression.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(paths: list[str]) -> None:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += json.load(f)["rows"]
    by_len: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_len[(r["phase"], r["length"])][r["method"]] = r
    for (phase, length), methods in sorted(by_len.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        base = methods.get("dense_sdpa") or methods.get("dense_tpot") or methods.get("sdpa_full")
        print(f"\n{phase} {length}" + (f" ({rows_layers(methods)} layers)" if phase in ("ttft", "tpot") else ""))
        for name, r in methods.items():
            value = r.get("ms", r.get("us"))
            unit = "ms" if "ms" in r else "us"
            # The compression's own rows are a part of a step, not an alternative to dense attention.
            comparable = base and value and value == value and "compress" not in name
            ratio = f"{base.get('ms', base.get('us')) / value:5.2f}x" if comparable else "   - "
            extra = []
            if r.get("ms_leaving") is not None:
                extra.append(f"leaving-step {r['ms_leaving']:.3f} ms")
            if r.get("ms_synced") is not None:
                extra.append(f"synchronised {r['ms_synced']:.3f} ms a step")
            if "kept_fraction" in r:
                extra.append(f"kept {100 * r['kept_fraction']:.1f}%")
            if "kv_bytes" in r and phase == "tpot":
                extra.append(f"KV {r['kv_bytes'] / 2**30:.2f} GiB")
            if "heads_differing_from_math" in r:
                extra.append(f"{r['heads_differing_from_math']} heads differ from math")
            if "error" in r:
                extra.append("ERROR " + r["error"][:200])
            print(f"  {name:<38} {value:10.3f} {unit} {ratio}  {', '.join(extra)}")


def rows_layers(methods: dict[str, dict]) -> int | str:
    return next((r["layers"] for r in methods.values() if "layers" in r), "?")


if __name__ == "__main__":
    main(sys.argv[1:])
