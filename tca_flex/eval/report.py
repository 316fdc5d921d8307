"""Reports: a table per length, a JSON file of all results, an accuracy-vs-KV plot.

Accuracy is RULER's ``string_match_all`` in percent (the fraction of expected
strings found, averaged over samples); the suite average is the mean over
tasks. Perplexity is reported next to it (not in the average).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .perplexity import bucket_sizes, perplexity

_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (length, method): per-task accuracy, average, ppl, KV kept, timings."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["length"], r["method"])].append(r)
    rows = []
    for (length, method), recs in groups.items():
        tasks = [r for r in recs if r["kind"] == "task"]
        ppls = [r for r in recs if r["kind"] == "perplexity"]
        per_task: dict[str, list[float]] = defaultdict(list)
        for r in tasks:
            per_task[r["task"]].append(100.0 * r["score"])
        acc = {t: _mean(v) for t, v in per_task.items()}
        columns = zip(*[r["bucket_nll"] for r in ppls], strict=True)
        nll_by_bucket = [_mean(list(b)) for b in columns] if ppls else []
        rows.append({
            "length": length, "method": method, "family": recs[0]["family"], "level": recs[0]["level"],
            "accuracy": acc, "average": _mean(list(acc.values())),
            "ppl": perplexity(nll_by_bucket, bucket_sizes(length, ppls[0]["bucket"])[:len(nll_by_bucket)])
            if nll_by_bucket else None,
            "bucket_nll": nll_by_bucket,
            "kv_kept": _mean([r["kv_kept"] for r in recs]), "cache": cache_names(recs),
            "prefill_s": _mean([r["prefill_s"] for r in tasks]),
            "decode_s_per_token": _mean([r["decode_s_per_token"] for r in tasks]),
            "samples": len(tasks),
        })
    for row in rows:
        row["vs_dense"], row["vs_dense_ci95"] = paired_difference(records, row["length"], row["method"])
    return sorted(rows, key=lambda r: (r["length"], r["family"] != "dense", r["family"], r["level"] or 0))


def cache_names(records: list[dict[str, Any]]) -> str:
    """The decode cache classes of ``records``, joined by ``+`` (``unknown``: a record from before the field)."""
    return "+".join(sorted({r.get("cache") or "unknown" for r in records}))


def paired_difference(records: list[dict[str, Any]], length: int, method: str,
                      reference: str = "dense") -> tuple[float | None, float | None]:
    """Suite-average difference ``method - reference`` in points, with a 95% half-width.

    Samples are paired by seed (the same prompts): per seed, the mean over
    tasks of the score difference; then the mean over seeds and
    ``1.96 * sd / sqrt(seeds)``. Why: with a few samples per task one answer
    moves the average by several points, and the interval says whether a gap
    is more than that. ``(None, None)`` without a paired reference; the
    half-width is None with a single seed.
    """
    scores: dict[tuple[str, str, int], float] = {}
    for r in records:
        if r["kind"] == "task" and r["length"] == length and r["method"] in (method, reference):
            scores[(r["method"], r["task"], r.get("seed"))] = 100.0 * r["score"]
    pairs: dict[int, list[float]] = defaultdict(list)
    for (m, task, seed), value in scores.items():
        if m == method and (reference, task, seed) in scores and seed is not None:
            pairs[seed].append(value - scores[(reference, task, seed)])
    diffs = [sum(v) / len(v) for v in pairs.values()]
    if method == reference or not diffs:
        return None, None
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, None
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, 1.96 * math.sqrt(var / len(diffs))


def pooled_against(records: list[dict[str, Any]], length: int, method: str) -> str:
    """A text table of runs pooled by seed (records of several runs of the same prompts): each method's
    seeds, average score and ``method - it`` (``paired_difference``), best average first.

    What the ``pool.py`` scripts under ``benchmarks/eval/`` print.
    """
    scores: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["kind"] == "task" and r["length"] == length:
            scores[r["method"]][r["seed"]].append(100.0 * r["score"])
    average = {m: _mean([_mean(v) for v in seeds.values()]) for m, seeds in scores.items()}
    lines = [f"{'method':<42}{'seeds':>7}{'avg':>7}   {method.split('[')[0]} - method (95% CI)"]
    for m in sorted(scores, key=lambda m: -average[m]):
        mean, half = paired_difference(records, length, method, m)
        seeds = scores[m]
        lines.append(f"{m:<42}{min(seeds)}-{max(seeds):<5}{average[m]:>7.1f}   {_delta(mean, half)}")
    return "\n".join(lines)


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _delta(mean: float | None, half: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:+.1f}" + (f" ± {half:.1f}" if half is not None else "")


def markdown_tables(rows: list[dict[str, Any]]) -> str:
    """A markdown table per length: accuracy per task (%), average, ppl, KV kept, times, decode cache."""
    out = []
    for length in sorted({r["length"] for r in rows}):
        sel = [r for r in rows if r["length"] == length]
        tasks = sorted({t for r in sel for t in r["accuracy"]})
        head = ["method", *tasks, "average", "vs dense (95% CI)", "ppl", "KV kept", "prefill s", "decode ms/tok",
                "cache"]
        out.append(f"### {length} tokens\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in sel:
            cells = [r["method"], *[_fmt(r["accuracy"].get(t), ".1f") for t in tasks],
                     _fmt(r["average"], ".1f"), _delta(r.get("vs_dense"), r.get("vs_dense_ci95")),
                     _fmt(r["ppl"], ".2f"), _fmt(r["kv_kept"], ".3f"),
                     _fmt(r["prefill_s"], ".2f"),
                     _fmt(1000 * r["decode_s_per_token"], ".1f"), r.get("cache") or "unknown"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_json(path: str | Path, records: list[dict[str, Any]], rows: list[dict[str, Any]],
               meta: dict[str, Any]) -> None:
    """``{"meta": ..., "summary": rows, "records": records}`` (NaN written as null)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    Path(path).write_text(json.dumps(clean({"meta": meta, "summary": rows, "records": records}), indent=1))


def write_reports(out: str | Path, records: list[dict[str, Any]],
                  meta: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Write ``results.md``, ``results.json`` and ``accuracy_vs_kv.png`` into ``out``.

    Returns:
        ``(summary rows, markdown table)``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    table = markdown_tables(rows)
    (out / "results.md").write_text(table)
    write_json(out / "results.json", records, rows, meta)
    plot_accuracy_vs_kv(out / "accuracy_vs_kv.png", rows)
    return rows, table


def plot_accuracy_vs_kv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """PNG: average accuracy vs KV kept fraction, one curve per method family, one panel per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.6), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        sel = [r for r in rows if r["length"] == length]
        for i, family in enumerate(sorted({r["family"] for r in sel})):
            pts = sorted((r["kv_kept"], r["average"]) for r in sel if r["family"] == family
                         and r["average"] is not None and not math.isnan(r["average"]))
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            # Distinct hollow markers of shrinking size keep coinciding points visible.
            if family == "dense":
                style = dict(marker="*", markersize=13, linestyle="none", zorder=1)
            else:
                style = dict(marker=_MARKERS[i % len(_MARKERS)], markersize=max(4, 11 - 2 * i),
                             fillstyle="none", zorder=3)
            ax.plot(xs, ys, label=family, **style)
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("KV kept fraction")
        ax.set_ylabel("average accuracy (%)")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-3, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
