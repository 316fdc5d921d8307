"""Accuracy probe: calibrated TCA variants, prefill-only vs pruned cache, vs baselines.

For each variant (TCAConfig overrides), budgets are calibrated on the GPL-3
text with exactly those knobs (or the shipped file is used), then run as
``tca_prefill[v]`` (sparse prefill, full-cache decode) and ``tca[v]`` (pruned
cache), with SnapKV / StreamingLLM at the variant's mean keep. One model load.

    PYTHONPATH=. python scripts/acc_probe.py --length 2048 --samples 3 \
        --variant shipped=shipped --variant v1=num_observation_queries=16,pool_kernel=7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

from tca_flex.budgets import HeadBudgets, shipped_budgets
from tca_flex.calibration import calibrate
from tca_flex.config import TCAConfig, parse_overrides
from tca_flex.eval.methods import build_methods, dense, mean_keep, tca_budgets, tca_budgets_prefill
from tca_flex.eval.report import markdown_tables, summarize
from tca_flex.eval.runner import SuiteConfig, run_suite
from tca_flex.models import load_smollm2

CALIB_TEXT = "/usr/share/common-licenses/GPL-3"


def variant_budgets(model, tok, spec: str, cache_dir: Path, max_queries: int | None) -> HeadBudgets:
    if spec == "shipped":
        return shipped_budgets("smollm2")
    items = [s for s in spec.split(",") if s]
    base = dict(block_size=64, window=512, tau=0.9, mass_criterion="lse", mass_quantile=0.1)
    base.update(parse_overrides(items))
    config = TCAConfig(**base)
    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"{key}_{max_queries}.json"
    if path.is_file():
        return HeadBudgets.load(path)
    ids = tok(Path(CALIB_TEXT).read_text(), return_tensors="pt").input_ids[:, :8192]
    start = time.perf_counter()
    budgets = calibrate(model, ids, config, progress=False, max_queries=max_queries)
    logging.warning("calibrated %s in %.0f s: mean keep %.3f, dense heads %d", spec,
                    time.perf_counter() - start, mean_keep(budgets), int((budgets.candidate == -1).sum()))
    budgets.save(path)
    return budgets


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, nargs="+", default=[2048])
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=["passkey", "niah_single", "niah_multikey",
                                                  "niah_multivalue", "niah_multiquery"])
    p.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC",
                   help="SPEC: 'shipped' or comma-separated FIELD=VALUE calibration overrides")
    p.add_argument("--modes", nargs="+", default=["prefill", "pruned"])
    p.add_argument("--baselines", nargs="*", default=["snapkv", "streaming"])
    p.add_argument("--dense", action="store_true")
    p.add_argument("--ppl-samples", type=int, default=0)
    p.add_argument("--max-queries", type=int, default=2048)
    p.add_argument("--cache", default="/tmp/acc_budgets")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, tok = load_smollm2()
    methods = [dense()] if args.dense else []
    for item in args.variant:
        name, _, spec = item.partition("=")
        budgets = variant_budgets(model, tok, spec, cache, args.max_queries)
        kept = budgets.keep_fraction()
        print(f"variant {name}: mean keep {kept.mean():.3f} (min {kept.min():.3f}, max {kept.max():.3f}), "
              f"dense heads {int((budgets.candidate == -1).sum()) if budgets.candidate is not None else '-'}",
              flush=True)
        if "prefill" in args.modes:
            methods.append(tca_budgets_prefill(budgets, name))
        if "pruned" in args.modes:
            methods.append(tca_budgets(budgets, name))
        methods += build_methods(args.baselines, [round(mean_keep(budgets), 4)], budgets.config)
    seen, unique = set(), []
    for m in methods:
        if m.name not in seen:
            seen.add(m.name)
            unique.append(m)
    cfg = SuiteConfig(lengths=tuple(args.length), tasks=tuple(args.tasks), samples=args.samples, seed=args.seed,
                      ppl_samples=args.ppl_samples, progress=False)
    start = time.perf_counter()
    records = run_suite(model, tok, unique, cfg)
    print(markdown_tables(summarize(records)))
    for r in records:
        if r["kind"] == "task" and r["score"] < 1.0:
            print(f"  miss {r['method']:<28} {r['task']:<16} want {'/'.join(r['expected'])} got {r['answer']!r}")
    print(f"wall {time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
