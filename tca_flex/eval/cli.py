"""``python -m tca_flex.eval``: run the suite and write table, JSON and plot.

Examples::

    python -m tca_flex.eval --smoke                      # CI: about a minute on an idle CPU
    python -m tca_flex.eval --lengths 2048 4096 8192 --samples 10 --keep 0.1 0.25 0.5
    python -m tca_flex.eval --device cuda --samples 20 --workers 12   # processes share the GPU
    python -m tca_flex.eval --merge runA runB --out both            # join runs over disjoint seeds
    python -m tca_flex.eval --tasks multi_turn --methods dense tca tca_reprefill --keep \
        --budgets tca_flex/data/smollm2_budgets.json --lengths 2048   # conversations: append vs re-prefill
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from ..budgets import HeadBudgets, check_fingerprint
from ..cli_args import config_or_error, float_in, int_at_least, output_dir_problem, overrides_or_error
from ..config import TCAConfig, parse_overrides
from ..integration import model_fingerprint
from .methods import FAMILIES, TCA_VARIANTS, build_methods, mean_keep, tca_budgets, tca_budgets_prefill, tca_file
from .parallel import merge_runs, plan_shards, run_workers
from .perplexity import SOURCES, natural_text
from .report import write_reports
from .runner import SuiteConfig, run_suite, shortest_context
from .tasks import TASKS

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ["dense", "tca", "streaming", "snapkv"]
# CI: one short sample of two tasks and one perplexity window, every method at one level.
SMOKE = dict(lengths=[512], samples=1, tasks=["passkey", "niah_single"], keep=[0.25], window=128, block=32,
             ppl_samples=1)
# Config fields set by their own flag (a --tca-option for them is refused).
TCA_FLAGS = {"block_size": "--block", "window": "--window"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tca_flex.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local HF model folder (default: bundled SmolLM2-135M)")
    p.add_argument("--lengths", type=int_at_least(1), nargs="+", default=[2048, 4096, 8192],
                   help="context lengths in tokens; each must fit the tasks' shortest prompt plus its answer")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--samples", type=int_at_least(0), default=5, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=["dense", *FAMILIES],
                   help="kvpress:* families need the kvpress package (separate venv, see EVALUATION.md)")
    p.add_argument("--keep", type=float_in(0.0, 1.0), nargs="*", default=[0.1, 0.25, 0.5],
                   help="TCA keep fractions per block; baselines get the same KV budget (none: only the "
                        "--budgets files' levels)")
    p.add_argument("--budgets", nargs="+", default=[], metavar="FILE",
                   help="TCA budget files (HeadBudgets.load, e.g. calibrated at several tau); each adds "
                        "a tca[FILE] method (the shipped path: sparse prefill, TCACache), tca_prefill[FILE], "
                        "tca_reprefill[FILE] and tca_emulated[FILE] when those families are in --methods, and "
                        "the other families at its mean keep fraction")
    p.add_argument("--tca-backend", default="flex", choices=["flex", "mask"],
                   help="attention of the --budgets TCA methods: FlexAttention (the shipped path, with "
                        "TCACache) or explicit-mask SDPA, labelled tca_mask[FILE] / tca_prefill_mask[FILE] "
                        "(the same selection, decode over the kept set in a DynamicCache: no block compression "
                        "during decode, no compiles, timings not TCA's)")
    p.add_argument("--block", type=int_at_least(1), default=64, help="TCA block size")
    p.add_argument("--window", type=int_at_least(1), default=512, help="TCA local window")
    p.add_argument("--tca-option", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra TCAConfig field, e.g. num_observation_queries=32 (repeatable); it also "
                        "overrides the --budgets files' own config (HeadBudgets.with_config: on purpose, "
                        "logged, their calibrated retained mass no longer holds)")
    p.add_argument("--ppl-samples", type=int_at_least(0), default=1, help="perplexity windows per length (0: skip)")
    p.add_argument("--ppl-source", default="pydoc", choices=list(SOURCES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="output folder (default eval_results/<UTC time>)")
    p.add_argument("--smoke", action="store_true", help="a few short samples (CI); overrides the sizes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--workers", type=int_at_least(1), default=1,
                   help="worker processes sharing the device, each running a contiguous range of seeds "
                        "(same records as one process; a small model's decode is CPU-bound, so use about "
                        "one per free core)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="instead of running, merge the results of runs of the same settings over disjoint "
                        "seeds (e.g. one per device call) into --out")
    p.add_argument("--share-prefill", action="store_true",
                   help="dense and the kvpress presses run on one dense prefill per prompt (a press compresses "
                        "after the dense attention, so their prefills are the same; single-turn tasks only)")
    p.add_argument("--gamma", type=int_at_least(0), default=0, metavar="N",
                   help="attach each TCA sample's dropped attention mass (N sampled queries; 0: off)")
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and check everything that needs neither files nor a tokenizer (``check_inputs`` does the rest)."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if not args.merge and args.samples == 0 and args.ppl_samples == 0:
        p.error("nothing to run: --samples and --ppl-samples are both 0")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"argument --device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"argument --device: {args.device} asked for, but CUDA is not available here (use --device cpu)")
    options = overrides_or_error(p, args.tca_option, "--tca-option", TCA_FLAGS)
    config_or_error(p, dict(block_size=args.block, window=args.window, **options),
                    {**TCA_FLAGS, **{k: "--tca-option" for k in options}})
    return args


def load_tokenizer(path: str | None):
    """The tokenizer of ``--model`` alone: prompt lengths are checked before the model loads."""
    if path is None:
        from ..models import load_smollm2_tokenizer

        return load_smollm2_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace, out: Path) -> None:
    """Output folder, model folder, budget files, merge inputs and lengths; ``parser.error`` on a mistake.

    Runs before any model loads, so a mistake costs seconds, not a run.
    """
    problem = output_dir_problem(out)
    if problem:
        parser.error(f"argument --out: {problem}")
    if args.merge:
        missing = [d for d in args.merge if not (Path(d) / "results.json").is_file()]
        if missing:
            parser.error(f"argument --merge: no results.json in {', '.join(missing)}")
        return
    if args.model is not None and not Path(args.model).is_dir():
        parser.error(f"argument --model: {args.model} is not a folder (default: the bundled SmolLM2)")
    for path in args.budgets:
        try:
            load_budgets(path)
        except (OSError, ValueError) as err:
            parser.error(f"argument --budgets: {err}")
    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError, ImportError) as err:
        parser.error(f"argument --model: cannot load the tokenizer of {args.model or 'the bundled SmolLM2'}: {err}")
    if args.samples:
        need, task = shortest_context(tokenizer, args.tasks, range(args.seed, args.seed + args.samples))
        short = [n for n in args.lengths if n < need]
        if short:
            parser.error(f"argument --lengths: {short} too short: the shortest {task} prompt plus its answer "
                         f"takes {need} tokens with this tokenizer (drop --tasks {task} or use lengths >= {need})")
    if args.ppl_samples:
        available = len(tokenizer(natural_text(args.ppl_source)).input_ids)
        if max(args.lengths) + 1 > available:
            parser.error(f"argument --lengths: {max(args.lengths)} does not fit --ppl-source {args.ppl_source} "
                         f"({available} tokens; a window needs length + 1): use shorter lengths, another "
                         "source or --ppl-samples 0")


def load_budgets(path: str):
    """``HeadBudgets.load(path)`` (files from ``tca_flex.calibrate`` / ``HeadBudgets.save``)."""
    return HeadBudgets.load(path)


def load_model(path: str | None, device: str, dtype: torch.dtype):
    """``(model, tokenizer)``: a local HF folder or the bundled SmolLM2."""
    if path is None:
        from ..models import load_smollm2

        return load_smollm2(dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def evaluate(model, tokenizer, args: argparse.Namespace, out: Path) -> tuple[list[dict[str, Any]], str]:
    """Run the suite described by ``args`` on a loaded model; write results into ``out``."""
    options = parse_overrides(args.tca_option, "--tca-option")
    config = TCAConfig(block_size=args.block, window=args.window, **options)
    methods = build_methods(args.methods, args.keep, config)
    for path in args.budgets:
        budgets, label = load_budgets(path), Path(path).stem
        if options:  # a probe of other knobs with these budgets (block size and window stay the file's)
            budgets = budgets.with_config(**options)
        own = (budgets.config.block_size, budgets.config.window)
        if own != (args.block, args.window):
            logger.warning("--budgets %s runs with its own block size and window %s; --block/--window %s apply to "
                           "the --keep methods only", path, own, (args.block, args.window))
        if budgets.fingerprint:  # before any compute, not when the method's turn comes
            check_fingerprint(budgets.fingerprint, model_fingerprint(model))
        listed = [v for v in TCA_VARIANTS if v in args.methods]
        if "tca" in args.methods or not listed:  # tca[FILE] unless only other TCA variants are asked for
            methods.append(tca_budgets(budgets, label, args.tca_backend))  # tca[FILE] (mask: tca_mask[FILE])
            if "tca" not in args.methods:  # said, not silent: it doubles a run meant for baselines only
                logger.warning("--budgets %s: also runs %s (--methods lists no TCA family; list another one, "
                               "e.g. tca_prefill, to leave it out)", path, methods[-1].name)
        if "tca_prefill" in args.methods:  # the same budgets with a full-cache decode
            methods.append(tca_budgets_prefill(budgets, label, args.tca_backend))
        for variant in listed:  # the same budgets, the other listed variants (tca_reprefill, tca_recon, ...)
            if variant not in ("tca", "tca_prefill"):
                methods.append(tca_file(variant, budgets, label))
        tca_families = ("dense", "tca_spread", *TCA_VARIANTS)
        others = [f for f in args.methods if f not in tca_families]
        methods += build_methods(others, [mean_keep(budgets)], budgets.config)
    cfg = SuiteConfig(lengths=tuple(args.lengths), tasks=tuple(args.tasks), samples=args.samples,
                      seed=args.seed, ppl_samples=args.ppl_samples, ppl_source=args.ppl_source,
                      progress=not args.no_progress, gamma_queries=args.gamma, share_prefill=args.share_prefill)
    start = time.perf_counter()
    records = run_suite(model, tokenizer, methods, cfg)
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    meta = {"args": vars(args), "tca_config": config.to_dict(), "date_utc": now,
            "device": str(next(model.parameters()).device), "platform": platform.platform(),
            "torch": torch.__version__, "model": getattr(model.config, "_name_or_path", "") or "smollm2",
            "wall_s": time.perf_counter() - start}
    meta["transformers"] = transformers.__version__
    if any(m.family.startswith("kvpress") for m in methods):
        meta["kvpress"] = importlib.metadata.version("kvpress")
    return write_reports(out, records, meta)


def run_parallel(argv: list[str], args: argparse.Namespace, out: Path) -> str:
    """``args.workers`` processes over disjoint seed ranges, merged into ``out``; returns the table."""
    shards = plan_shards(args.samples, args.ppl_samples, args.seed, args.workers)
    if not shards:  # parse_args refuses this on the command line
        raise ValueError("nothing to run: --samples and --ppl-samples are both 0")
    if args.model is None:
        from ..models import default_cache_dir, load_smollm2

        if not (default_cache_dir() / "model.safetensors").is_file():
            load_smollm2()  # dequantise the GGUF once, not in every worker
    start = time.perf_counter()
    records, meta = merge_runs(run_workers(argv, shards, out, progress=not args.no_progress))
    meta.update(wall_s=time.perf_counter() - start, workers=len(shards))
    return write_reports(out, records, meta)[1]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parse_args(argv, parser)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out or f"eval_results/{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}")
    check_inputs(parser, args, out)
    if args.merge:
        _, table = write_reports(out, *merge_runs(args.merge))
    elif args.workers > 1:
        table = run_parallel(argv, args, out)
    else:
        model, tok = load_model(args.model, args.device, getattr(torch, args.dtype))
        _, table = evaluate(model, tok, args, out)
    print(table)
    print(f"wrote {out}/results.md, results.json, accuracy_vs_kv.png")
