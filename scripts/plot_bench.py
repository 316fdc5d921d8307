"""Latency vs context length from ``tca_flex.bench`` result files (PNG).

    python scripts/plot_bench.py benchmarks/results/NVIDIA_H200-2026-12-02-*.json -o benchmarks/h200.png

One panel per phase found (prefill ms, decode us, time to first token ms, time per
output token ms), one line per method, log-log axes. Files are merged row by row; files
that are not a bench result (no "rows") and rows of other phases are skipped, with a word.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASES = {"prefill": ("ms", "prefill attention, one layer"), "decode": ("us", "decode attention, one layer"),
          "ttft": ("ms", "time to first token"), "tpot": ("ms", "time per output token")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    results = []
    for f in args.files:
        result = json.loads(f.read_text())
        if isinstance(result, dict) and isinstance(result.get("rows"), list):
            results.append(result)
        else:
            print(f"skipped {f}: not a tca_flex.bench result (no 'rows')")
    if not results:
        parser.error("no tca_flex.bench result among the files")
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    skipped: set[str] = set()
    for result in results:
        for row in result["rows"]:
            if row.get("phase") not in PHASES:
                skipped.add(str(row.get("phase")))
                continue
            unit = PHASES[row["phase"]][0]
            value = row.get(unit)
            if value is None or value != value:  # missing or NaN (a failed variant)
                continue
            # Decode rows carry the kept fraction in the name; group across lengths by method family.
            series[row["phase"]][row["method"]].append((row["length"], value))
    if skipped:
        print(f"skipped rows of phases {sorted(skipped)} (plotted: {list(PHASES)})")
    phases = [p for p in PHASES if p in series]
    if not phases:
        parser.error("no row of a plotted phase in the files")
    fig, axes = plt.subplots(1, len(phases), figsize=(5.2 * len(phases), 4.4), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        unit, title = PHASES[phase]
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # decode has more than 10 lines
        for method, points in sorted(series[phase].items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    first = results[0]
    fig.suptitle(f"{first['device']}, torch {first['torch']}, {first['date'][:10]}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
